//! The mount (DESIGN §1, §5): a FUSE file system over the application's directory that
//! serves every file from wherever it lives right now, and the read-only replica of it on
//! machines without the local tree.
//!
//! Layout: `adapter.rs` is the thin fuser adapter; `core.rs`, `open.rs` and `writes.rs` are the
//! file system, one core for both kinds of mount, which differ in their namespace
//! (`namespace/`); `inode.rs` holds one record per inode with something to remember, `rows.rs`
//! the manifest as the mount reads it. The mount reads the source through `SourceTree`, the
//! dest only through the `Store` trait (never S3 directly) and the manifest through its
//! queries; copying is the engine's job, which this part only wakes. This file mounts and
//! unmounts.

mod adapter;
mod copyup;
mod core;
mod handles;
mod health;
mod inode;
mod local;
#[cfg(test)]
mod model;
mod namespace;
mod open;
mod prefetch;
mod probe;
mod queue;
mod readahead;
mod records;
mod rows;
mod writes;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fuser::FileAttr;
use tokio::sync::Notify;

use crate::manifest::Manifest;
pub use crate::metrics::ReadStats;
use crate::source::SourceTree;
use crate::store::Store;

use self::core::{Core, CoreParts, Ttls, WritePath};
pub use health::DestHealth;
use inode::Inodes;
pub use namespace::replica::root_attr;
use namespace::{Numbering, Recorder};
pub use probe::{probe_kernel, KernelOffer};
use rows::Rows;

/// The file system type in /proc/mounts: `fuse.` + this.
pub const SUBTYPE: &str = "cutoverfs";

/// How the mount looks and behaves.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub mountpoint: PathBuf,
    pub fsname: String,
    /// Kernel cache lifetimes of names and attributes.
    pub ttl: Ttls,
    /// How long a manifest row read by the mount is trusted before it is read again.
    pub row_ttl: Duration,
    /// Bytes the cached manifest rows may take (`--cache-memory`).
    pub cache_memory: u64,
    pub threads: usize,
    /// Bytes of remote data fetched ahead, across all open files.
    pub prefetch_memory: u64,
    /// This daemon's node id: files it has open for writing are held in its name.
    pub node: String,
    /// How long a hold on a file open for writing lasts unless renewed (the lease timeout).
    pub hold_for: Duration,
    /// How long a read from a remote dest may take for a file that also has a local copy,
    /// before the local copy answers instead (`--dest-read-timeout`).
    pub dest_read_deadline: Duration,
}

/// How a replica mount looks and behaves.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub mountpoint: PathBuf,
    pub fsname: String,
    pub ttl: Ttls,
    pub row_ttl: Duration,
    pub cache_memory: u64,
    pub threads: usize,
    pub prefetch_memory: u64,
    /// How long an open waits for a requested file to be copied.
    pub wait: Duration,
    /// Attributes of the root directory (the mountpoint's own).
    pub root: FileAttr,
}

pub use self::core::Ttls as KernelTtls;

/// A live mount: its FUSE session runs on its own threads until unmounted.
pub struct Mounted {
    mountpoint: PathBuf,
    session: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    pub ended: Arc<Notify>,
    pub stats: Arc<ReadStats>,
    times: crate::metrics::RequestTimes,
}

/// Everything the file system needs from the daemon.
pub struct Parts {
    pub source: Arc<SourceTree>,
    pub manifest: Manifest,
    pub store: Arc<dyn Store>,
    pub wake_sweeper: Arc<Notify>,
    /// Where the mount counts what it serves and times its requests.
    pub metrics: crate::metrics::Metrics,
}

/// Mounts and returns once the kernel has finished the FUSE handshake (the mount is live).
/// Also returns the hook that drops cached manifest rows when the sweeper verifies files.
pub fn mount(
    parts: Parts,
    settings: &MountSettings,
) -> Result<(Mounted, crate::engine::sweep::VerifiedHook)> {
    let times = parts.metrics.fuse_requests.clone();
    let stats = parts.metrics.served.clone();
    let (core, hook) = source_core(parts, settings);
    let session = SessionSettings {
        mountpoint: &settings.mountpoint,
        fsname: &settings.fsname,
        threads: settings.threads,
        read_only: false,
    };
    let mounted = start_session(core, times, &session, stats)?;
    Ok((mounted, hook))
}

/// The daemon's file system over the local tree, not mounted yet (tests drive it in-process:
/// `model.rs`). Must be called within the runtime.
fn source_core(
    parts: Parts,
    settings: &MountSettings,
) -> (Arc<Core>, crate::engine::sweep::VerifiedHook) {
    let rt = tokio::runtime::Handle::current();
    let stats = parts.metrics.served.clone();
    let rows = Arc::new(Rows::new(
        parts.manifest.clone(),
        rt.clone(),
        settings.row_ttl,
        settings.cache_memory,
    ));
    let inodes = Arc::new(Inodes::new());
    let holds = records::Holds {
        holder: format!("{}/writes", settings.node),
        lasts: settings.hold_for.max(Duration::from_secs(3)),
    };
    let records = Arc::new(records::WriteRecords::start(
        parts.manifest.clone(),
        rows.clone(),
        inodes.clone(),
        parts.wake_sweeper.clone(),
        holds.clone(),
        rt.clone(),
    ));
    let numbers = Numbering::new(
        inodes.clone(),
        parts.manifest.clone(),
        rt.clone(),
        Some(Recorder {
            records: records.clone(),
            source: parts.source.clone(),
            store: parts.store.clone(),
        }),
    );
    let numbers = numbers.with_rows(rows.clone());
    let links = Arc::new(namespace::source::HardLinks::default());
    let ns = namespace::source::SourceNamespace::new(
        parts.source.clone(),
        rows.clone(),
        numbers,
        links.clone(),
    );
    let core = Core::start(CoreParts {
        ns: Box::new(ns),
        rows: rows.clone(),
        inodes,
        dest_health: DestHealth::new(parts.store.clone(), rt.clone()),
        store: parts.store,
        rt,
        ttls: settings.ttl,
        dest_read_deadline: settings.dest_read_deadline,
        stats: stats.clone(),
        prefetch_budget: prefetch::prefetch_budget(settings.prefetch_memory),
        copy_on_read: Some(queue::CopyOnRead::start(
            parts.manifest.clone(),
            parts.wake_sweeper.clone(),
            stats,
        )),
        writes: Some(WritePath {
            records,
            holds,
            links,
            rename_gate: std::sync::RwLock::new(()),
        }),
        copy_waits: None,
    });
    let hook =
        crate::engine::sweep::VerifiedHook(Arc::new(move |paths: &[String]| rows.forget(paths)));
    (core, hook)
}

/// Mounts a replica; returns once the mount is live.
pub fn mount_replica(
    manifest: Manifest,
    store: Arc<dyn Store>,
    settings: &ReplicaSettings,
    metrics: &crate::metrics::Metrics,
) -> Result<Mounted> {
    let rt = tokio::runtime::Handle::current();
    let stats = metrics.served.clone();
    let rows = Arc::new(Rows::new(
        manifest.clone(),
        rt.clone(),
        settings.row_ttl,
        settings.cache_memory,
    ));
    let inodes = Arc::new(Inodes::new());
    let numbers = Numbering::new(inodes.clone(), manifest, rt.clone(), None);
    let ns = namespace::replica::ReplicaNamespace::new(rows.clone(), numbers, settings.root);
    let core = Core::start(CoreParts {
        ns: Box::new(ns),
        rows: rows.clone(),
        inodes,
        dest_health: DestHealth::new(store.clone(), rt.clone()),
        store,
        rt,
        ttls: settings.ttl,
        dest_read_deadline: Duration::ZERO,
        stats: stats.clone(),
        prefetch_budget: prefetch::prefetch_budget(settings.prefetch_memory),
        copy_on_read: None,
        writes: None,
        copy_waits: Some(namespace::replica::CopyWaits::new(rows, settings.wait)),
    });
    let session = SessionSettings {
        mountpoint: &settings.mountpoint,
        fsname: &settings.fsname,
        threads: settings.threads,
        read_only: true,
    };
    start_session(core, metrics.fuse_requests.clone(), &session, stats)
}

/// What every mount passes to the kernel.
pub(crate) struct SessionSettings<'a> {
    pub mountpoint: &'a Path,
    pub fsname: &'a str,
    pub threads: usize,
    /// Mounted `ro`: the kernel refuses every change with EROFS before asking the daemon.
    pub read_only: bool,
}

/// Mounts the core behind the adapter and runs its FUSE session on its own threads; returns
/// once the kernel has finished the handshake.
fn start_session(
    core: Arc<Core>,
    times: crate::metrics::RequestTimes,
    settings: &SessionSettings,
    stats: Arc<ReadStats>,
) -> Result<Mounted> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let fs = adapter::Adapter::new(core.clone(), times.clone(), ready_tx);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(settings.fsname.to_string()),
        // Straight to the kernel: the type becomes fuse.cutoverfs in /proc/mounts.
        fuser::MountOption::CUSTOM(format!("subtype={SUBTYPE}")),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
    ];
    if settings.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(settings.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, settings.mountpoint, &config)
        .with_context(|| format!("cannot mount on {}", settings.mountpoint.display()))?;
    core.set_invalidate(Box::new(adapter::Notifier(session.notifier())));
    let ended = Arc::new(Notify::new());
    let session_ended = ended.clone();
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let result = session.run();
            // Told even if what follows panics: the daemon waits for it to exit.
            let _ended = NotifyOnDrop(session_ended);
            // What the write path queued (a record lingers a moment to share a transaction)
            // is in the manifest before the daemon goes on to exit.
            core.finish();
            result
        })?;
    let mut mounted = Mounted {
        mountpoint: settings.mountpoint.to_path_buf(),
        session: Some(thread),
        ended,
        stats,
        times,
    };
    if ready.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = mounted.unmount();
        bail!(
            "the kernel did not complete the FUSE handshake on {}",
            settings.mountpoint.display()
        );
    }
    Ok(mounted)
}

/// Wakes the daemon's wait for the session's end when dropped, also while unwinding.
struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl Mounted {
    /// Unmounts and waits for the session to end. A mount still in use is detached: the
    /// kernel keeps serving open files from this daemon until they are closed.
    pub fn unmount(&mut self) -> Result<()> {
        if let Some(thread) = self.session.take() {
            match unmount(&self.mountpoint) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), "mount busy: detaching it; open files are served until closed");
                    detach(&self.mountpoint)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot unmount {}", self.mountpoint.display()))
                }
            }
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session ended with an error"),
                Err(_) => tracing::error!("FUSE session thread panicked"),
            }
            self.stats.log();
            tracing::info!(requests = %self.times.summary(), "FUSE requests answered (count/mean time in the daemon)");
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::error!(error = %e, "unmount failed");
        }
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(path: &Path) -> std::io::Result<()> {
    umount2(path, 0)
}

/// Detaches a mount at once; whatever still uses it keeps working until closed.
fn detach(path: &Path) -> std::io::Result<()> {
    umount2(path, libc::MNT_DETACH)
}

fn remove_stale_mount(path: &Path) -> Result<()> {
    tracing::warn!(mountpoint = %path.display(), "removing a stale mount left by a daemon that died");
    detach(path).with_context(|| format!("cannot remove the stale mount on {}", path.display()))
}

/// Checks a mountpoint before mounting: removes a stale cutoverfs mount left by a daemon that
/// died ("Transport endpoint is not connected"), refuses one that is live, and returns its
/// canonical path.
pub fn prepare_mountpoint(given: &Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(given).with_context(|| format!("mountpoint {}", given.display()))?;
    match std::fs::metadata(&absolute) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => remove_stale_mount(&absolute)?,
        Err(e) => {
            return Err(e).with_context(|| format!("mountpoint {}", absolute.display()));
        }
        Ok(meta) if !meta.is_dir() => bail!("mountpoint {} is not a directory", absolute.display()),
        Ok(_) => {}
    }
    let canonical = std::fs::canonicalize(&absolute)
        .with_context(|| format!("mountpoint {}", absolute.display()))?;
    if mounted_type(&canonical)?.is_some_and(|t| t == format!("fuse.{SUBTYPE}")) {
        // The kernel may still answer stat from its cache; statfs always asks the daemon.
        match statfs_of(&canonical) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => remove_stale_mount(&canonical)?,
            _ => bail!(
                "mountpoint {} is busy: cutoverfs is already mounted there (unmount it first)",
                canonical.display()
            ),
        }
    }
    Ok(canonical)
}

fn statfs_of(path: &Path) -> std::io::Result<()> {
    let path = c_path(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a statvfs buffer.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The type of the file system mounted exactly at `path`, if any (the topmost one).
pub fn mounted_type(path: &Path) -> Result<Option<String>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() > dash + 1
            && fields.len() > 4
            && unescape(fields[4]) == path.as_os_str().as_bytes()
        {
            found = Some(fields[dash + 1].to_string());
        }
    }
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, b| v * 8 + (b - b'0') as u32);
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/srv/my\040media"), b"/srv/my media");
        assert_eq!(unescape("/plain"), b"/plain");
    }
}
