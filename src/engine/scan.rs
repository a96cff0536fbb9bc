//! The scanner: a parallel walk of the source recorded in the manifest in batched transactions.
//!
//! Walking and recording overlap: walker threads (rayon) stat entries through the source's
//! directory descriptor and send batches over a channel; one async task turns each batch into
//! manifest writes using `after_scan`, the single rule for re-scans.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::manifest::{after_scan, Kind, Manifest, ManifestError, ScanChange, Scanned};
use crate::source::SourceTree;
use crate::store::Store;

/// Entries per batch sent from the walk to the recorder.
const WALK_BATCH: usize = 1000;
/// Walker threads: directory reads and stats wait on the kernel, so a few more than cores.
const WALK_THREADS: usize = 4;
/// Walk batches merged into one manifest transaction at most.
const RECORD_GROUP: usize = 16;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScanStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub unsupported: u64,
    pub new: u64,
    pub changed: u64,
    pub missing: u64,
    pub unreadable_dirs: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl ScanStats {
    pub fn rate(&self) -> f64 {
        (self.files + self.dirs) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("scan interrupted")]
    Interrupted,
}

/// Walks the whole source, sending batches of what it saw. Runs on blocking threads.
pub struct Walk {
    pub batches: mpsc::Receiver<Vec<Scanned>>,
    pub unreadable_dirs: Arc<AtomicU64>,
}

pub fn start_walk(source: Arc<SourceTree>, store: Arc<dyn Store>) -> Walk {
    let (tx, rx) = mpsc::channel(16);
    let unreadable = Arc::new(AtomicU64::new(0));
    let counter = unreadable.clone();
    std::thread::spawn(move || {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(WALK_THREADS)
            .thread_name(|i| format!("scan-{i}"))
            .build();
        let walker = Walker {
            source: &source,
            store: &*store,
            tx,
            unreadable: &counter,
        };
        match pool {
            Ok(pool) => pool.scope(|scope| walker.walk_dir(scope, String::new())),
            Err(_) => rayon::scope(|scope| walker.walk_dir(scope, String::new())),
        }
    });
    Walk {
        batches: rx,
        unreadable_dirs: unreadable,
    }
}

struct Walker<'a> {
    source: &'a SourceTree,
    store: &'a dyn Store,
    tx: mpsc::Sender<Vec<Scanned>>,
    unreadable: &'a AtomicU64,
}

impl<'a> Walker<'a> {
    fn walk_dir<'s>(&'s self, scope: &rayon::Scope<'s>, dir: String)
    where
        'a: 's,
    {
        let entries = match self.source.read_dir(Path::new(&dir)) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %display_dir(&dir), error = %e, "cannot read directory; its contents are not scanned");
                self.unreadable.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut batch = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(dir = %display_dir(&dir), error = %e, "error while listing directory");
                    self.unreadable.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let Some(scanned) = self.classify(&dir, &entry) else {
                continue;
            };
            if scanned.kind == Kind::Dir && scanned.unsupported.is_none() {
                let child = scanned.path.clone();
                scope.spawn(move |scope| self.walk_dir(scope, child));
            }
            batch.push(scanned);
            if batch.len() >= WALK_BATCH {
                self.send(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            self.send(batch);
        }
    }

    fn send(&self, batch: Vec<Scanned>) {
        // A closed channel means the scan was abandoned; the walk just runs out.
        let _ = self.tx.blocking_send(batch);
    }

    fn classify(&self, dir: &str, entry: &std::fs::DirEntry) -> Option<Scanned> {
        let name = entry.file_name();
        if super::purge::set_aside_in_flight(name.as_bytes()) {
            // A local copy a running purge set aside for an instant: its file is verified at the
            // dest, it is not part of the tree.
            return None;
        }
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %Path::new(dir).join(&name).display(), error = %e, "cannot stat");
                return None;
            }
        };
        let attrs = crate::source::Attrs::from_metadata(&meta);
        Some(describe(self.source, self.store, dir, &name, &attrs))
    }
}

/// What a scan records of the entry `name` in the directory `dir` (relative, "" for the root),
/// whose attributes are `attrs`: its kind, and why cutoverfs cannot migrate it, if it cannot.
/// The mount records entries it meets before the scan the same way (`fuse::records`).
pub fn describe(
    source: &SourceTree,
    store: &dyn Store,
    dir: &str,
    name: &OsStr,
    attrs: &crate::source::Attrs,
) -> Scanned {
    let reserved = super::purge::set_aside_pid(name.as_bytes()).is_some();
    let (name_text, bad_name) = match name.to_str() {
        Some(text) => (text.to_string(), None),
        None => (name.to_string_lossy().into_owned(), Some(escaped(name))),
    };
    let path = if dir.is_empty() {
        name_text
    } else {
        format!("{dir}/{name_text}")
    };
    let (kind, mut unsupported) = match attrs.mode & libc::S_IFMT {
        libc::S_IFDIR => (Kind::Dir, None),
        libc::S_IFREG => (Kind::File, None),
        libc::S_IFLNK => (
            Kind::Symlink,
            Some(
                "symbolic link: recorded, not followed; cutoverfs migrates regular files"
                    .to_string(),
            ),
        ),
        other => {
            let what = match other {
                libc::S_IFIFO => "fifo",
                libc::S_IFSOCK => "socket",
                libc::S_IFCHR => "character device",
                _ => "block device",
            };
            (
                Kind::Special,
                Some(format!("{what}: only regular files can be migrated")),
            )
        }
    };
    if let Some(bad) = bad_name {
        unsupported = Some(format!(
            "name is not valid UTF-8 ({bad}); the manifest and dest keys need UTF-8"
        ));
    } else if reserved {
        unsupported = Some(
            "the name has the form cutoverfs gives a local copy while purge removes it \
             (.cutoverfs-purge-PID-NAME) and is left out; rename the file to migrate it"
                .to_string(),
        );
    } else if kind == Kind::File {
        if let Err(reason) = store.key_for(&path) {
            unsupported = Some(reason);
        }
    }
    let link_target = if kind == Kind::Symlink {
        source
            .read_link_at(Path::new(&path))
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    Scanned {
        path,
        kind,
        size: if kind == Kind::File { attrs.size } else { 0 },
        mtime_ns: attrs.mtime_ns,
        mode: attrs.mode,
        uid: attrs.uid,
        gid: attrs.gid,
        link_target,
        unsupported,
    }
}

fn display_dir(dir: &str) -> &str {
    if dir.is_empty() {
        "."
    } else {
        dir
    }
}

/// A printable form of a name that is not UTF-8: invalid bytes as \xNN.
fn escaped(name: &OsStr) -> String {
    name.as_bytes()
        .utf8_chunks()
        .fold(String::new(), |mut out, chunk| {
            out.push_str(chunk.valid());
            for byte in chunk.invalid() {
                out.push_str(&format!("\\x{byte:02x}"));
            }
            out
        })
}

/// `scan_into_manifest`, started over once the manifest is back when it went away mid-scan
/// (issue 7.5): a scan only records what it sees, and marks nothing missing until it has seen
/// everything, so a cut-off one leaves nothing wrong behind.
pub async fn scan_patiently(
    manifest: &Manifest,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<ScanStats, ScanError> {
    loop {
        match scan_into_manifest(manifest, source.clone(), store.clone(), stop).await {
            Err(ScanError::Manifest(e)) if e.is_unreachable() => {
                let _ = manifest.note::<()>(Err(e));
                if !manifest.wait_until_reachable(stop).await {
                    return Err(ScanError::Interrupted);
                }
                tracing::info!("scanning again from the start");
            }
            other => return other,
        }
    }
}

/// Scans the source into the manifest: new files pending, changed files back to pending,
/// vanished files missing. `stop` ends it early (nothing is marked missing then).
pub async fn scan_into_manifest(
    manifest: &Manifest,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<ScanStats, ScanError> {
    let started = Instant::now();
    let scan_id = manifest.next_scan_id().await?;
    let first_scan = manifest.is_empty().await?;
    let mut walk = start_walk(source.clone(), store);
    let mut stats = ScanStats::default();
    let mut stop = stop.clone();
    let mut received = Vec::new();
    loop {
        // Whatever the walkers have queued meanwhile goes into one transaction.
        let more = tokio::select! {
            n = walk.batches.recv_many(&mut received, RECORD_GROUP) => n,
            _ = stop.wait_for(|stopped| *stopped) => return Err(ScanError::Interrupted),
        };
        if more == 0 {
            break;
        }
        let batch: Vec<Scanned> = received.drain(..).flatten().collect();
        record_batch(manifest, scan_id, &batch, first_scan, &mut stats).await?;
    }
    stats.unreadable_dirs = walk.unreadable_dirs.load(Ordering::Relaxed);
    stats.missing = mark_vanished(manifest, &source, scan_id).await?;
    stats.elapsed = started.elapsed();
    tracing::info!(
        files = stats.files,
        dirs = stats.dirs,
        new = stats.new,
        changed = stats.changed,
        missing = stats.missing,
        seconds = stats.elapsed.as_secs_f64(),
        "scan finished"
    );
    Ok(stats)
}

async fn record_batch(
    manifest: &Manifest,
    scan_id: i64,
    batch: &[Scanned],
    first_scan: bool,
    stats: &mut ScanStats,
) -> Result<(), ScanError> {
    let paths: Vec<&str> = batch.iter().map(|s| s.path.as_str()).collect();
    let recorded = if first_scan {
        Default::default()
    } else {
        manifest.recorded(&paths).await?
    };
    let mut changes = Vec::new();
    for scanned in batch {
        count(stats, scanned);
        let old = recorded.get(&scanned.path);
        let change = after_scan(old, scanned);
        if let ScanChange::Write {
            fresh_copy: true, ..
        } = change
        {
            if old.is_some() {
                stats.changed += 1;
            } else {
                stats.new += 1;
            }
        }
        if change != ScanChange::Unchanged {
            changes.push((scanned, change, old.map_or(0, |o| o.version)));
        }
    }
    let seen: Vec<&str> = paths
        .into_iter()
        .filter(|p| recorded.contains_key(*p))
        .collect();
    manifest.record_scan(scan_id, &seen, &changes).await?;
    Ok(())
}

fn count(stats: &mut ScanStats, scanned: &Scanned) {
    match (scanned.kind, &scanned.unsupported) {
        (Kind::Dir, None) => stats.dirs += 1,
        (Kind::File, None) => {
            stats.files += 1;
            stats.bytes += scanned.size;
        }
        _ => stats.unsupported += 1,
    }
}

/// Rows the scan did not see are missing only if the path is really gone now: a file created
/// after the walk passed its directory is not.
async fn mark_vanished(
    manifest: &Manifest,
    source: &SourceTree,
    scan_id: i64,
) -> Result<u64, ScanError> {
    let mut after = String::new();
    let mut marked = 0;
    loop {
        let page = manifest.unseen(scan_id, &after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.clone();
        let gone: Vec<String> = page
            .into_iter()
            .filter(|p| matches!(source.stat_at(Path::new(p)), Err(e) if e.kind() == io::ErrorKind::NotFound))
            .collect();
        marked += manifest.mark_missing(&gone).await?;
    }
    Ok(marked)
}
