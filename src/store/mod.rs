//! Destinations (DESIGN §2 "destination"): where migrated files go.
//!
//! Owns: parsing dest URLs, the `Store` interface and its implementations, and the rules that
//! keep a dest safe — nothing partial is ever visible at a key (§4.3) and an object cutoverfs did
//! not write is never replaced (§4.2). A store never touches the manifest: what it must know
//! about ownership it asks through `PublishGuard`.

mod durable;
mod local;

pub use local::LocalStore;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::source::{Attrs, SourceChanged, SourceTree};

/// A parsed `--dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestUrl {
    /// `file:///abs/path`: a private local directory.
    Local(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error("bad dest URL {url:?}: {why}")]
pub struct BadDestUrl {
    pub url: String,
    pub why: String,
}

impl DestUrl {
    pub fn parse(text: &str) -> Result<DestUrl, BadDestUrl> {
        let bad = |why: &str| BadDestUrl {
            url: text.to_string(),
            why: why.to_string(),
        };
        // Checked on the raw text: the URL parser would silently resolve '..' away.
        if text.split('/').any(|segment| segment == "..") {
            return Err(bad("the path may not contain '..'"));
        }
        let url = url::Url::parse(text)
            .map_err(|e| bad(&format!("{e}; expected file:///ABSOLUTE/PATH")))?;
        match url.scheme() {
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad("a file:// URL names a local path and takes no host: use file:///ABSOLUTE/PATH"));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(bad("a file:// URL takes no ?query or #fragment"));
                }
                let path = url
                    .to_file_path()
                    .map_err(|_| bad("not a usable local path"))?;
                Ok(DestUrl::Local(path))
            }
            "s3" => Err(bad(
                "S3 destinations are not available in this version; use file:///ABSOLUTE/PATH",
            )),
            other => Err(bad(&format!(
                "unknown scheme {other:?}; expected file:///ABSOLUTE/PATH"
            ))),
        }
    }
}

/// What happened to one `put`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// cutoverfs wrote the object; `sha256` and `size` are of the bytes written.
    Written {
        sha256: String,
        size: u64,
        etag: Option<String>,
    },
    /// The key already held identical content. `ours` says whether cutoverfs wrote it earlier.
    AlreadyThere {
        sha256: String,
        size: u64,
        ours: bool,
    },
    /// The key holds something else that cutoverfs did not write; nothing was changed.
    Conflict { reason: String },
}

/// A file of the source to copy; the store opens it on its own I/O thread.
#[derive(Debug, Clone)]
pub struct SourceRef {
    pub tree: Arc<SourceTree>,
    pub rel: String,
}

/// The result of a put and what the source looked like when it was read.
#[derive(Debug, Clone)]
pub struct Stored {
    pub outcome: PutOutcome,
    pub source: Attrs,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("source file vanished")]
    SourceMissing,
    #[error(transparent)]
    SourceChanged(#[from] SourceChanged),
    #[error("cannot read source: {0}")]
    SourceRead(Arc<std::io::Error>),
    #[error("dest {op} {target}: {source}")]
    Dest {
        op: &'static str,
        target: String,
        source: Arc<std::io::Error>,
    },
    #[error("{0}")]
    Guard(String),
    #[error("dest unusable: {0}")]
    Unusable(String),
}

/// One file to put, with the hashes of objects cutoverfs wrote at its key before (an existing
/// object with another hash is not ours and is never replaced).
#[derive(Debug, Clone)]
pub struct PutRequest {
    pub key: String,
    pub source: SourceRef,
    pub owned_sha256: Vec<String>,
}

/// What a store asks of the caller about ownership, so it never needs the manifest.
///
/// Before anything is visible at a key, ownership of what will be there must be provable after
/// a crash: either the object carries a mark naming this manifest (`writer_id`), or, where the
/// dest cannot mark objects, the store calls `before_publish` so the manifest records it.
#[async_trait]
pub trait PublishGuard: Send + Sync {
    /// A stable id of the manifest on whose behalf objects are written.
    fn writer_id(&self) -> String;
    /// Called with (request index, content hash) for objects that could not be marked, before
    /// publishing them; answers per entry whether it may be published (false: the lease is lost).
    async fn before_publish(&self, intents: &[(usize, String)]) -> Result<Vec<bool>, StoreError>;
}

#[async_trait]
pub trait Store: Send + Sync {
    /// The dest in canonical URL form, as recorded in the manifest.
    fn canonical_url(&self) -> String;

    /// The key for a relative path, or the reason this dest cannot hold that name.
    fn key_for(&self, rel: &str) -> Result<String, String>;

    /// Checks, without writing anything, that the dest can be used.
    async fn preflight(&self) -> Result<(), StoreError>;

    /// Makes the dest ready to receive files (creates the root of a local dest).
    async fn prepare(&self) -> Result<(), StoreError>;

    /// Copies each request's source to its key and answers per request, in order. The store
    /// hashes what it copies, must check `OpenedSource::confirm_unchanged` after the last byte was
    /// read and before publishing (DESIGN §4.4), and make ownership provable as `PublishGuard`
    /// says. Taking many files at once lets a store share syscalls, syncs and round trips.
    async fn put_many(
        &self,
        requests: Vec<PutRequest>,
        guard: &dyn PublishGuard,
    ) -> Vec<Result<Stored, StoreError>>;

    /// The size of whatever is at `key`, if anything (for dry runs: reads nothing else).
    async fn existing_size(&self, key: &str) -> Result<Option<u64>, StoreError>;

    /// Records a directory of the namespace at the dest, where the dest has directories.
    async fn ensure_dir(&self, rel: &str, mode: u32) -> Result<(), StoreError>;
}

/// Builds the store for a dest URL.
pub fn open_store(url: &DestUrl) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        DestUrl::Local(path) => Ok(Arc::new(LocalStore::new(path)?)),
    }
}

/// The canonical form of a path that may not exist yet: its deepest existing ancestor
/// canonicalized, the rest appended.
pub fn canonical_path(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut canonical = std::fs::canonicalize(&existing)?;
    for name in rest.into_iter().rev() {
        canonical.push(name);
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            DestUrl::parse("file:///srv/private").unwrap(),
            DestUrl::Local("/srv/private".into())
        );
        assert_eq!(
            DestUrl::parse("file:///srv/with%20space").unwrap(),
            DestUrl::Local("/srv/with space".into())
        );
        for (bad, says) in [
            ("/srv/private", "expected file:///"),
            ("file://host/srv", "takes no host"),
            ("ftp://x/y", "unknown scheme"),
            ("file:///srv/../etc", "'..'"),
            ("file:///srv?x=1", "no ?query"),
        ] {
            let err = DestUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
