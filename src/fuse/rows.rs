//! The manifest as the mount reads it: rows by path, by inode number, and the children of a
//! directory, through one cache bounded in bytes (`--cache-memory`).
//!
//! Owns: the row cache and how fresh it is. Rows are trusted for `row_ttl` (`--manifest-cache`:
//! other nodes and commands change states too) unless forgotten sooner: the sweeper's
//! "verified" notices, the write path's own changes, a dest copy found gone. It may not write
//! the manifest; the write path does that (`records.rs`, `writes.rs`).
//!
//! Memory: every cached row is weighed by its size (strings included), and the two indexes
//! share the budget, so a walk over millions of files keeps at most the budget's worth of rows
//! (issue 15, `bench/` case `scale`); what falls out is read again with one indexed query.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::manifest::{Entry, Manifest};

/// What the cache knows of a path: its row, or that it has none.
type Slot = Option<Arc<Entry>>;

type Hasher = foldhash::fast::RandomState;

pub struct Rows {
    manifest: Manifest,
    rt: tokio::runtime::Handle,
    by_path: Option<moka::sync::Cache<Box<str>, Slot, Hasher>>,
    by_ino: Option<moka::sync::Cache<u64, Arc<Entry>, Hasher>>,
    /// Paths of directories by number, whatever the manifest: every lookup asks for its
    /// directory's path, and directories are few.
    dir_paths: moka::sync::Cache<u64, Arc<str>, Hasher>,
    /// A remote manifest: the numbers and paths it gave lately, kept without a time limit (and
    /// bounded in bytes) for when it does not answer: the local files of those paths are still
    /// served, under the numbers the kernel has (issue 7.5).
    known: Option<Known>,
    /// The manifest answers on the calling thread from a local file (`Manifest::entry_now`).
    reads_in_place: bool,
    /// Bumped by every forget. A row read from the manifest is cached only if no forget ran
    /// while it was read: a forget means the row may have changed since, and caching the older
    /// read would bring back what the forget dropped (a file held for writing served from the
    /// dest).
    generation: std::sync::RwLock<u64>,
}

/// Directory paths kept by number (about 100 bytes each).
const DIRS_KEPT: u64 = 16_384;

/// Numbers and paths of a remote manifest kept for its outages, each way.
const KNOWN_KEPT: u64 = 8 << 20;

struct Known {
    paths: moka::sync::Cache<u64, Arc<str>, Hasher>,
    numbers: moka::sync::Cache<Arc<str>, u64, Hasher>,
}

impl Known {
    fn new() -> Known {
        let weigh = |path: &Arc<str>| (path.len() + 96) as u32;
        Known {
            paths: moka::sync::Cache::builder()
                .max_capacity(KNOWN_KEPT)
                .weigher(move |_: &u64, path: &Arc<str>| weigh(path))
                .build_with_hasher(Hasher::default()),
            numbers: moka::sync::Cache::builder()
                .max_capacity(KNOWN_KEPT)
                .weigher(move |path: &Arc<str>, _: &u64| weigh(path))
                .build_with_hasher(Hasher::default()),
        }
    }

    fn note(&self, row: &Entry) {
        if let Some(ino) = row.ino {
            let path: Arc<str> = Arc::from(row.path.as_str());
            self.paths.insert(ino, path.clone());
            self.numbers.insert(path, ino);
        }
    }
}

/// Bytes a cached row costs beyond its strings: the row itself and the cache's bookkeeping.
const ROW_OVERHEAD: usize = std::mem::size_of::<Entry>() + 160;

/// The weight of a cached path lookup: its row, or the path alone when it has none.
// moka hands the key as it is stored (`Box<str>`), so `&str` would not fit the weigher.
#[allow(clippy::borrowed_box)]
fn path_slot_weight(path: &Box<str>, slot: &Slot) -> u32 {
    slot.as_deref()
        .map_or((ROW_OVERHEAD + path.len()) as u32, weight)
}

fn weight(entry: &Entry) -> u32 {
    let strings = entry.path.len()
        + entry.link_target.as_ref().map_or(0, String::len)
        + entry.dest_key.as_ref().map_or(0, String::len)
        + entry.sha256.as_ref().map_or(0, String::len)
        + entry.dest_etag.as_ref().map_or(0, String::len);
    (ROW_OVERHEAD + strings).min(u32::MAX as usize) as u32
}

impl Rows {
    /// `row_ttl` zero: nothing is cached (every question reads the manifest). `budget`: bytes
    /// the cached rows may take, both indexes together.
    pub fn new(
        manifest: Manifest,
        rt: tokio::runtime::Handle,
        row_ttl: Duration,
        budget: u64,
    ) -> Rows {
        // A local manifest answers a row in a few microseconds on the calling thread (less than
        // caching it costs); a remote one is cached for `row_ttl`.
        let cached = !row_ttl.is_zero() && !manifest.reads_in_place();
        let by_path = cached.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(budget / 2)
                .weigher(path_slot_weight)
                .time_to_live(row_ttl)
                .build_with_hasher(Hasher::default())
        });
        let by_ino = cached.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(budget / 2)
                .weigher(|_: &u64, entry: &Arc<Entry>| weight(entry))
                .time_to_live(row_ttl)
                .build_with_hasher(Hasher::default())
        });
        Rows {
            known: (!manifest.reads_in_place()).then(Known::new),
            dir_paths: moka::sync::Cache::builder()
                .max_capacity(DIRS_KEPT)
                .time_to_live(row_ttl.max(Duration::from_millis(1)))
                .build_with_hasher(Hasher::default()),
            reads_in_place: manifest.reads_in_place(),
            manifest,
            rt,
            by_path,
            by_ino,
            generation: std::sync::RwLock::new(0),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest cannot be reached now (issue 7.5): callers serve what they can locally.
    pub fn manifest_down(&self) -> bool {
        self.manifest.reachability().is_down()
    }

    /// The row of `rel` (cached); None for a path without a row or that no row can name.
    pub fn entry(&self, rel: &Path) -> io::Result<Slot> {
        let Some(text) = rel.to_str() else {
            return Ok(None);
        };
        if let Some(cached) = self.by_path.as_ref().and_then(|c| c.get(text)) {
            return Ok(cached);
        }
        if self.manifest_down() {
            // Its probe watches it: this request does not wait on a connection timeout.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let read_at = self.generation();
        let manifest = &self.manifest;
        let row = match manifest.entry_now(text) {
            Some(row) => row,
            None => self
                .rt
                .block_on(async { manifest.note(manifest.entry(text).await) }),
        }
        .map_err(|e| manifest_error(text, e))?
        .map(Arc::new);
        self.cache(read_at, [(text, row.clone())]);
        Ok(row)
    }

    /// The row holding inode number `ino`, if any (cached).
    pub fn by_ino(&self, ino: u64) -> io::Result<Slot> {
        if let Some(cached) = self.by_ino.as_ref().and_then(|c| c.get(&ino)) {
            return Ok(Some(cached));
        }
        if self.manifest_down() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let read_at = self.generation();
        let manifest = &self.manifest;
        let row = match manifest.entry_by_ino_now(ino) {
            Some(row) => row,
            None => self
                .rt
                .block_on(async { manifest.note(manifest.entry_by_ino(ino).await) }),
        }
        .map_err(|e| manifest_error(&format!("inode {ino}"), e))?
        .filter(|row| crate::manifest::refused_path(&row.path).is_none())
        .map(Arc::new);
        if let Some(row) = &row {
            self.cache(read_at, [(row.path.as_str(), Some(row.clone()))]);
            self.note_dir(read_at, row);
        }
        Ok(row)
    }

    /// While a remote manifest does not answer: the path it last gave for number `ino`.
    pub fn known_path(&self, ino: u64) -> Option<Arc<str>> {
        self.known.as_ref()?.paths.get(&ino)
    }

    /// While a remote manifest does not answer: the number it last gave for `path`.
    pub fn known_number(&self, path: &str) -> Option<u64> {
        self.known.as_ref()?.numbers.get(path)
    }

    /// The path of the directory numbered `ino`, if it is known without asking the manifest.
    pub fn dir_path(&self, ino: u64) -> Option<Arc<str>> {
        self.dir_paths.get(&ino)
    }

    /// Remembers a directory's path by its number (unless a forget ran since `read_at`).
    fn note_dir(&self, read_at: u64, row: &Entry) {
        if let (crate::manifest::Kind::Dir, Some(ino)) = (row.kind, row.ino) {
            let generation = self.generation.read().unwrap_or_else(|e| e.into_inner());
            if *generation == read_at {
                self.dir_paths.insert(ino, Arc::from(row.path.as_str()));
            }
        }
    }

    /// The rows directly below `dir`, cached on the way; None while the manifest cannot be
    /// reached (a listing then shows the local names only).
    pub fn children(&self, dir: &Path) -> io::Result<Option<Vec<Arc<Entry>>>> {
        let Some(text) = dir.to_str() else {
            return Ok(Some(Vec::new()));
        };
        if self.manifest_down() {
            return Ok(None);
        }
        let read_at = self.generation();
        let manifest = &self.manifest;
        let rows = match manifest.children_now(text) {
            Some(rows) => rows,
            None => self
                .rt
                .block_on(async { manifest.note(manifest.children(text).await) }),
        };
        match rows {
            Ok(rows) => {
                let rows: Vec<Arc<Entry>> = rows.into_iter().map(Arc::new).collect();
                for row in &rows {
                    self.note_dir(read_at, row);
                }
                // Rows of a remote manifest are kept for the opens that usually follow a
                // listing; a local one answers those in microseconds, less than keeping every
                // listed row would cost a walk.
                if !self.reads_in_place {
                    self.cache(
                        read_at,
                        rows.iter()
                            .map(|row| (row.path.as_str(), Some(row.clone()))),
                    );
                }
                Ok(Some(rows))
            }
            Err(e) if e.is_unreachable() => {
                manifest_error(text, e);
                Ok(None)
            }
            Err(e) => Err(manifest_error(text, e)),
        }
    }

    /// Caches a row just read elsewhere (a replica's wait for a copy).
    pub fn remember(&self, row: Arc<Entry>) {
        let read_at = self.generation();
        self.cache(read_at, [(row.path.as_str(), Some(row.clone()))]);
    }

    /// Remembers that `rel` has no row (a listing found it local only), unless a forget ran
    /// since `read_at`.
    pub fn note_absent(&self, read_at: u64, rel: &str) {
        if !self.reads_in_place {
            self.cache(read_at, [(rel, None)]);
        }
    }

    pub fn generation(&self) -> u64 {
        *self.generation.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Caches rows read when the generation was `read_at`, unless a forget ran since.
    fn cache<'a>(&self, read_at: u64, rows: impl IntoIterator<Item = (&'a str, Slot)>) {
        let generation = self.generation.read().unwrap_or_else(|e| e.into_inner());
        if *generation != read_at {
            return;
        }
        for (path, row) in rows {
            if let (Some(known), Some(row)) = (&self.known, &row) {
                known.note(row);
            }
            if let (Some(by_ino), Some(row)) = (&self.by_ino, &row) {
                if let Some(ino) = row.ino {
                    by_ino.insert(ino, row.clone());
                }
            }
            if let Some(by_path) = &self.by_path {
                by_path.insert(path.into(), row);
            }
        }
    }

    /// Drops cached rows (their state just changed).
    pub fn forget(&self, paths: &[String]) {
        let mut generation = self.generation.write().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        for path in paths {
            self.forget_one(path);
        }
    }

    fn forget_one(&self, path: &str) {
        let Some(by_path) = &self.by_path else { return };
        if let Some(Some(row)) = by_path.remove(path) {
            if let (Some(by_ino), Some(ino)) = (&self.by_ino, row.ino) {
                by_ino.invalidate(&ino);
            }
        }
    }

    /// Drops every cached row (a directory was renamed: rows below it moved).
    pub fn forget_all(&self) {
        let mut generation = self.generation.write().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        self.dir_paths.invalidate_all();
        if let Some(by_path) = &self.by_path {
            by_path.invalidate_all();
        }
        if let Some(by_ino) = &self.by_ino {
            by_ino.invalidate_all();
        }
    }
}

fn manifest_error(what: &str, e: crate::manifest::ManifestError) -> io::Error {
    // An unreachable manifest is logged once by its reachability, not per request.
    if e.is_unreachable() {
        tracing::debug!(path = what, error = %e, "manifest unreachable");
    } else {
        tracing::error!(path = what, error = %e, "manifest lookup failed");
    }
    io::Error::from_raw_os_error(libc::EIO)
}
