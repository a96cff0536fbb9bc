//! Destinations (DESIGN §2 "destination"): where migrated files go.
//!
//! Owns: parsing dest URLs, the `Store` interface and its implementations, and the rules that
//! keep a dest safe — nothing partial is ever visible at a key (§4.3) and an object cutoverfs did
//! not write is never replaced (§4.2). A store never touches the manifest: what it must know
//! about ownership it asks through `PublishGuard`.

mod durable;
mod local;
pub mod s3;
mod timed;

pub use local::LocalStore;
pub use s3::{RemoteError, RemoteKind, S3Flags, S3Store};
pub use timed::TimedStore;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::source::{Attrs, SourceChanged, SourceTree};

/// A parsed `--dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestUrl {
    /// `file:///abs/path`: a private local directory.
    Local(PathBuf),
    /// `s3://bucket/prefix[?endpoint=URL&region=R&path_style=true]`.
    S3(s3::S3Location),
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
        let url = url::Url::parse(text).map_err(|e| {
            bad(&format!(
                "{e}; expected file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX"
            ))
        })?;
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
            "s3" => Ok(DestUrl::S3(s3::S3Location::parse(text, &url)?)),
            other => Err(bad(&format!(
                "unknown scheme {other:?}; expected file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX"
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
        etag: Option<String>,
    },
    /// The key holds something else that cutoverfs did not write; nothing was changed.
    Conflict { reason: String },
}

/// A file of the source to copy; the store opens it on its own I/O thread.
#[derive(Clone)]
pub struct SourceRef {
    pub tree: Arc<SourceTree>,
    pub rel: String,
    /// Set for a file too large to be charged to `--bwlimit` at once: the store calls it before
    /// reading each chunk (at most `PACED_CHUNK` bytes) of the copy it sends.
    pub pace: Option<Arc<dyn ReadPace>>,
}

impl std::fmt::Debug for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRef")
            .field("rel", &self.rel)
            .field("paced", &self.pace.is_some())
            .finish()
    }
}

/// Paces the reads of one copy (`--bwlimit`); the store never knows the limit itself.
pub trait ReadPace: Send + Sync {
    /// Returns once `bytes` more may be read; blocks the calling I/O thread meanwhile.
    fn wait_blocking(&self, bytes: u64);
}

/// The largest read between two calls of a `ReadPace`.
pub const PACED_CHUNK: u64 = 1 << 20;

impl SourceRef {
    pub(crate) fn paced(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if let Some(pace) = &self.pace {
            pace.wait_blocking(bytes);
        }
    }
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
    #[error("dest {op} {target}: {error}")]
    Remote {
        op: &'static str,
        target: String,
        error: RemoteError,
    },
    #[error("{0}")]
    Guard(String),
    #[error("dest unusable: {0}")]
    Unusable(String),
}

impl StoreError {
    /// The dest is down or busy, not wrong: the same copy may well work in a while, and the
    /// failure says nothing about the file.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Remote { error, .. } => error.kind.is_transient(),
            _ => false,
        }
    }

    /// Nothing is at the key (the object was deleted, e.g. by a rollback in another process).
    pub fn is_not_found(&self) -> bool {
        match self {
            StoreError::Remote { error, .. } => error.kind == RemoteKind::NotFound,
            StoreError::Dest { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }

    /// No connection could be made at all: never the fault of the file being copied.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::Remote { error, .. } if error.kind == RemoteKind::Unreachable)
    }
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

    /// Checks that the dest can be used, before anything else is done with it. `ReadWrite` may
    /// write a probe (and removes it); `ReadOnly` writes nothing.
    async fn preflight(&self, mode: Preflight) -> Result<(), StoreError>;

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

    /// Billable write requests (PUT class) a put of a file of this size makes; 0 where nothing
    /// is billed.
    fn put_requests(&self, _size: u64) -> u64 {
        0
    }

    /// The size of whatever is at `key`, if anything (for dry runs: reads nothing else).
    async fn existing_size(&self, key: &str) -> Result<Option<u64>, StoreError>;

    /// Records a directory of the namespace at the dest, where the dest has directories.
    async fn ensure_dir(&self, rel: &str, mode: u32) -> Result<(), StoreError>;

    /// The local file that holds `key`, opened read-only, where the dest is a local directory:
    /// readers read it themselves (and the kernel can pass reads straight through to it).
    /// None for a remote dest. Never reached through a symlink or outside the dest.
    fn open_local_file(&self, _key: &str) -> Option<std::io::Result<std::fs::File>> {
        None
    }

    /// Deletes the object at `key` only if cutoverfs wrote it: it carries the mark of
    /// `writer` (this manifest's id) or its recorded content hash is one of `owned_sha256`.
    async fn delete_owned(
        &self,
        key: &str,
        owned_sha256: &[String],
        writer: &str,
    ) -> Result<Removal, StoreError>;

    /// What is at `key` now, for `verify`: its size, the content hash recorded on it when
    /// cutoverfs wrote it, and with `deep` the SHA-256 of its bytes read in full. None when
    /// nothing is there.
    async fn inspect(&self, key: &str, deep: bool) -> Result<Option<ObjectFacts>, StoreError>;

    /// Up to `len` bytes of the object at `key` from `offset` (fewer only at its end).
    async fn read_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, StoreError>;
}

/// What `Store::inspect` found at a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectFacts {
    pub size: u64,
    /// The SHA-256 cutoverfs recorded on the object (S3 metadata, a local xattr), if any.
    pub recorded_sha256: Option<String>,
    /// The SHA-256 of the bytes read back (deep inspections only).
    pub read_sha256: Option<String>,
    /// What identifies this very object version: the S3 ETag, or a `file://` dest file's
    /// stamp (`local_stamp`). Compared with the one recorded when the copy was verified.
    pub etag: Option<String>,
}

/// What the manifest recorded about a dest copy when it was verified.
#[derive(Debug, Clone, Copy)]
pub struct RecordedCopy<'a> {
    pub key: &'a str,
    pub size: u64,
    pub sha256: Option<&'a str>,
    /// `PutOutcome`'s etag as recorded (None for copies verified by an older cutoverfs).
    pub etag: Option<&'a str>,
}

/// How a dest copy differs from what was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMismatch {
    Missing,
    Size,
    /// The content hash read back, or recorded on the object, is another one.
    Hash,
    /// The object was replaced or modified since it was verified (ETag or file stamp moved).
    Changed,
}

impl ObjectFacts {
    /// Whether this object is still the copy that was recorded, and if not, why (with a message
    /// naming the key and both values). `found` None: nothing is at the key.
    pub fn compare(
        found: Option<&ObjectFacts>,
        recorded: &RecordedCopy,
    ) -> Option<(CopyMismatch, String)> {
        let key = recorded.key;
        let Some(found) = found else {
            return Some((
                CopyMismatch::Missing,
                format!("the dest object {key} is missing"),
            ));
        };
        if found.size != recorded.size {
            return Some((
                CopyMismatch::Size,
                format!(
                    "the dest object {key} has {} bytes, the manifest {}",
                    found.size, recorded.size
                ),
            ));
        }
        if let Some(expected) = recorded.sha256 {
            let seen = match (&found.read_sha256, &found.recorded_sha256) {
                (Some(read), _) => Some((read, "read back")),
                (None, Some(on_object)) => Some((on_object, "recorded on it")),
                (None, None) => None,
            };
            if let Some((seen, how)) = seen.filter(|(seen, _)| *seen != expected) {
                return Some((
                    CopyMismatch::Hash,
                    format!(
                        "the dest object {key} has SHA-256 {seen} ({how}), the manifest {expected}"
                    ),
                ));
            }
        }
        match (recorded.etag, found.etag.as_deref()) {
            (Some(then), Some(now)) if unquoted(then) != unquoted(now) => Some((
                CopyMismatch::Changed,
                format!(
                    "the dest object {key} changed since it was verified (was {then}, now {now})"
                ),
            )),
            _ => None,
        }
    }
}

/// ETags come quoted from some servers and SDK paths, bare from others.
fn unquoted(etag: &str) -> &str {
    etag.trim_matches('"')
}

/// The stamp of a `file://` dest file: which file it is and when its content last changed.
/// Rewriting a file in place moves its mtime (unless put back) and replacing it moves its inode,
/// so a stamp that still matches means the bytes served are those that were verified, as far as
/// a stat can tell (a deep check re-reads them).
pub fn local_stamp(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    stamp(meta.ino(), meta.mtime() * 1_000_000_000 + meta.mtime_nsec())
}

/// `local_stamp` from a `stat`.
pub fn local_stamp_of(st: &libc::stat) -> String {
    stamp(st.st_ino, st.st_mtime * 1_000_000_000 + st.st_mtime_nsec)
}

fn stamp(ino: u64, mtime_ns: i64) -> String {
    format!("file:ino={ino},mtime={mtime_ns}")
}

/// What `delete_owned` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Deleted,
    /// Nothing was at the key.
    Absent,
    /// The object there is not one cutoverfs wrote; it was left alone (DESIGN §4.2).
    NotOurs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflight {
    ReadOnly,
    ReadWrite,
}

/// Builds the store for a dest URL; `flags` are the S3 settings given beside the URL.
pub async fn open_store(url: &DestUrl, flags: &S3Flags) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        DestUrl::Local(path) => Ok(Arc::new(LocalStore::new(path)?)),
        DestUrl::S3(location) => {
            let settings =
                s3::S3Settings::resolve(location, flags).map_err(StoreError::Unusable)?;
            Ok(Arc::new(S3Store::connect(settings).await?))
        }
    }
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(StoreError::Unusable(format!("copy thread failed: {e}"))))
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
            ("s3://Bad_Bucket/x", "not a valid bucket name"),
            ("file:///srv/../etc", "'..'"),
            ("file:///srv?x=1", "no ?query"),
        ] {
            let err = DestUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
