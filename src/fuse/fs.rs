//! The FUSE request handlers: each turns a kernel request into questions to the namespace,
//! the store and the copy-on-read queue, and answers. Remote reads are answered from the async
//! runtime, so no FUSE thread ever waits on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::sync::Semaphore;

use super::inodes::Inodes;
use super::namespace::{child_path, is_bad_name, Listed, Namespace};
use super::open::{Handle, Mode, Open, OpenFiles};
use super::prefetch::RemoteFile;
use super::records::{Holds, WriteRecords};
use super::{CopyOnRead, DestHealth, ReadStats};
use crate::manifest::{Entry, Manifest, State};
use crate::metrics::RequestTimes;
use crate::store::{local_stamp, ObjectFacts, RecordedCopy, Store};

/// A directory's entries with their inode numbers, as read at opendir.
type Listing = Vec<(u64, Listed)>;

/// Where an open is served from.
pub(super) enum Route {
    Source,
    /// The local copy of a file verified at the dest, because the dest is down.
    Fallback,
    /// A `file://` dest file (opened, or why not), and the row that says what was verified.
    DestFile(io::Result<File>, Arc<Entry>),
    Remote {
        key: String,
        size: u64,
        /// The local copy is still there (not purged): it answers when the dest is too slow.
        local_copy: bool,
    },
}

/// The file system as the kernel sees it: a handle on the shared state, so that an open that
/// must wait (see `open.rs`) can finish on another thread without holding a FUSE thread.
pub struct CutoverFs(Arc<FsState>);

impl std::ops::Deref for CutoverFs {
    type Target = FsState;
    fn deref(&self) -> &FsState {
        &self.0
    }
}

/// Everything the request handlers share.
pub struct FsState {
    pub(super) ns: Arc<Namespace>,
    pub(super) inodes: Inodes,
    pub(super) store: Arc<dyn Store>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) ttl: Duration,
    pub(super) copy_on_read: CopyOnRead,
    pub(super) dest_health: Arc<DestHealth>,
    pub(super) dest_read_deadline: Duration,
    pub(super) stats: Arc<ReadStats>,
    pub(super) requests: RequestTimes,
    pub(super) prefetch_budget: Arc<Semaphore>,
    pub(super) ready: Mutex<Option<std::sync::mpsc::Sender<bool>>>,
    pub(super) passthrough: AtomicBool,
    pub(super) manifest: Manifest,
    pub(super) records: WriteRecords,
    pub(super) holds: Holds,
    pub(super) files: OpenFiles,
    /// Renames and removals (write) against the recording of a closed file under its path
    /// (read): a close that read the old name of a file being renamed must queue its record
    /// before the rename moves the rows, or see the new name.
    pub(super) path_changes: std::sync::RwLock<()>,
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    next_listing: AtomicU64,
}

/// The parts a `CutoverFs` is made of.
pub(super) struct FsParts {
    pub ns: Arc<Namespace>,
    pub store: Arc<dyn Store>,
    pub rt: tokio::runtime::Handle,
    pub ttl: Duration,
    pub copy_on_read: CopyOnRead,
    pub dest_health: Arc<DestHealth>,
    pub dest_read_deadline: Duration,
    pub stats: Arc<ReadStats>,
    pub requests: RequestTimes,
    pub prefetch_budget: Arc<Semaphore>,
    pub ready: std::sync::mpsc::Sender<bool>,
    pub manifest: Manifest,
    pub records: WriteRecords,
    pub holds: Holds,
}

impl CutoverFs {
    pub(super) fn new(parts: FsParts) -> CutoverFs {
        CutoverFs(Arc::new(FsState::new(parts)))
    }
}

impl FsState {
    fn new(parts: FsParts) -> FsState {
        FsState {
            ns: parts.ns,
            inodes: Inodes::new(),
            store: parts.store,
            rt: parts.rt,
            ttl: parts.ttl,
            copy_on_read: parts.copy_on_read,
            dest_health: parts.dest_health,
            dest_read_deadline: parts.dest_read_deadline,
            stats: parts.stats,
            requests: parts.requests,
            prefetch_budget: parts.prefetch_budget,
            ready: Mutex::new(Some(parts.ready)),
            passthrough: AtomicBool::new(false),
            manifest: parts.manifest,
            records: parts.records,
            holds: parts.holds,
            files: OpenFiles::new(),
            path_changes: std::sync::RwLock::new(()),
            listings: Mutex::new(HashMap::new()),
            next_listing: AtomicU64::new(1),
        }
    }

    pub(super) fn path(&self, ino: INodeNo) -> Result<Arc<Path>, Errno> {
        self.inodes.path(ino.0).ok_or(Errno::ENOENT)
    }

    pub(super) fn attr_of(&self, path: &Path) -> Result<FileAttr, Errno> {
        let mut attr = self.ns.attr(path).map_err(Errno::from)?;
        attr.ino = INodeNo(self.inodes.number(path));
        Ok(attr)
    }

    /// Decides where a read-only open is served from, queueing a pending file for copy on
    /// the way.
    pub(super) fn route(&self, rel: &Path) -> Result<Route, Errno> {
        let entry = match self.ns.entry(rel) {
            Ok(entry) => entry,
            Err(e) if self.ns.manifest_down() => return self.route_without_manifest(rel, e),
            Err(e) => return Err(Errno::from(e)),
        };
        let Some(entry) = entry else {
            return Ok(Route::Source);
        };
        tracing::debug!(path = %rel.display(), state = ?entry.state, size = entry.size, "route");
        if entry.in_dest() && self.dest_health.is_down() {
            return Ok(Route::Fallback);
        }
        if entry.in_dest() {
            let key = entry.dest_key.clone().unwrap_or_default();
            return Ok(match self.store.open_local_file(&key) {
                Some(opened) => Route::DestFile(opened, entry),
                None => Route::Remote {
                    key,
                    size: entry.size,
                    local_copy: !entry.purged,
                },
            });
        }
        if entry.state == State::Pending {
            self.copy_on_read.queue(&entry.path);
        }
        Ok(Route::Source)
    }

    /// The manifest cannot say where the file is (issue 7.5). Writes through the mount go to the
    /// local copy first, so a local copy is current and is served; without one (purged) the
    /// file lives only at the dest, which only the manifest can find.
    fn route_without_manifest(&self, rel: &Path, e: io::Error) -> Result<Route, Errno> {
        match self.ns.source().stat_at(rel) {
            Ok(_) => Ok(Route::Source),
            Err(absent) if matches!(absent.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                tracing::error!(
                    path = %rel.display(),
                    "manifest unreachable and no local copy (purged?): cannot serve this file until the manifest is back"
                );
                Err(Errno::from(e))
            }
            Err(other) => Err(Errno::from(other)),
        }
    }

    /// The local copy opened read-write to back passthrough (so writers can share it), or
    /// read-only where it cannot be written.
    pub(super) fn open_backing_file(&self, rel: &Path, write: bool) -> io::Result<File> {
        match self.ns.source().open_at(rel, libc::O_RDWR) {
            Ok(file) => Ok(file),
            Err(e)
                if !write
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::ETXTBSY | libc::EPERM)
                    ) =>
            {
                self.ns.source().open_at(rel, libc::O_RDONLY)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a handle on `ino` that reads and writes the local copy at `rel`: passthrough when
    /// the inode is (or can be put) in passthrough mode, else served by the daemon with the
    /// caller's flags.
    pub(super) fn open_local_handle(
        &self,
        ino: u64,
        rel: &Path,
        flags: i32,
        writable: bool,
        backing_for: &dyn Fn(&File) -> io::Result<fuser::BackingId>,
        given: Option<File>,
    ) -> io::Result<(u64, Option<Arc<fuser::BackingId>>)> {
        let _turn = writable.then(|| self.files.writer_waiting(ino));
        let started = std::time::Instant::now();
        let mut given = given;
        let mut wait_logged = false;
        loop {
            let opened =
                self.try_open_local_handle(ino, rel, flags, writable, backing_for, &mut given);
            match opened {
                Err(e) if is_dest_readers_busy(&e) => {
                    // Readers of the dest copy hold the inode: the writer waits for them a
                    // little (new readers queue behind it meanwhile), then gives up.
                    if !std::mem::replace(&mut wait_logged, true) {
                        // tests/mount_writes.rs waits for this line.
                        tracing::debug!(ino, "a writer waits for the readers of the dest copy");
                    }
                    if started.elapsed() > WRITER_WAIT {
                        tracing::warn!(ino, "a file read from the dest stayed open; refusing to open it for writing (ETXTBSY)");
                        return Err(io::Error::from_raw_os_error(libc::ETXTBSY));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                opened => return opened,
            }
        }
    }

    fn try_open_local_handle(
        &self,
        ino: u64,
        rel: &Path,
        flags: i32,
        writable: bool,
        backing_for: &dyn Fn(&File) -> io::Result<fuser::BackingId>,
        given: &mut Option<File>,
    ) -> io::Result<(u64, Option<Arc<fuser::BackingId>>)> {
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        self.files.open(ino, |mode, _fh| match mode {
            Some(mode @ Mode::Passthrough { .. }) if !(writable && mode.excludes_writers()) => {
                Ok(share(ino, mode, writable))
            }
            Some(Mode::Passthrough { .. }) => Err(io::Error::other(DestReadersBusy)),
            None if passthrough => {
                let file = match given.take() {
                    Some(file) => file,
                    None => self.open_backing_file(rel, writable)?,
                };
                Ok(self.first_passthrough(ino, file, true, writable, backing_for))
            }
            _ => {
                let file = match given.take() {
                    Some(file) => file,
                    None => self.ns.source().open_at(rel, flags)?,
                };
                let open = Open {
                    ino,
                    handle: Handle::Local(file),
                    writable,
                };
                Ok((open, Mode::Daemon, None))
            }
        })
    }

    /// New readers wait while a writer waits for the inode (it waits at most `WRITER_WAIT`).
    fn wait_for_waiting_writers(&self, ino: u64) {
        let started = std::time::Instant::now();
        while self.files.has_waiting_writer(ino) && started.elapsed() < 2 * WRITER_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The first open of an inode in passthrough mode: `file` becomes its backing file.
    fn first_passthrough(
        &self,
        ino: u64,
        file: File,
        local: bool,
        writable: bool,
        backing_for: &dyn Fn(&File) -> io::Result<fuser::BackingId>,
    ) -> (Open, Mode, Option<Arc<fuser::BackingId>>) {
        match backing_for(&file) {
            Ok(backing) => {
                self.stats.passthrough_opens.inc();
                let mode = Mode::Passthrough {
                    backing: Arc::new(backing),
                    file: Arc::new(file),
                    local,
                };
                share(ino, &mode, writable)
            }
            Err(e) => {
                tracing::warn!(error = %e, "passthrough refused; the daemon serves reads itself from now on");
                self.passthrough.store(false, Ordering::Relaxed);
                let open = Open {
                    ino,
                    handle: Handle::Local(file),
                    writable,
                };
                (open, Mode::Daemon, None)
            }
        }
    }

    /// Opens a read-only handle on a dest copy: a dest file goes through the kernel when the
    /// inode is free, a remote object is served by the daemon. An inode already in passthrough
    /// mode is shared whatever its backing file (same bytes, or the newer local ones).
    fn open_dest_handle(
        &self,
        ino: u64,
        handle: Handle,
        backing_for: &dyn Fn(&File) -> io::Result<fuser::BackingId>,
    ) -> io::Result<(u64, Option<Arc<fuser::BackingId>>)> {
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        self.files.open(ino, |mode, _fh| match (mode, handle) {
            (Some(mode @ Mode::Passthrough { .. }), _) => Ok(share(ino, mode, false)),
            (None, Handle::Local(file)) if passthrough => {
                Ok(self.first_passthrough(ino, file, false, false, backing_for))
            }
            (_, handle) => Ok((
                Open {
                    ino,
                    handle,
                    writable: false,
                },
                Mode::Daemon,
                None,
            )),
        })
    }

    /// A read-only open: from the dest when the file is verified there, else the local copy.
    fn open_for_read(&self, ino: u64, rel: &Path, reply: ReplyOpen) {
        let route = match self.route(rel) {
            Ok(route) => route,
            Err(e) => return reply.error(e),
        };
        let mut fallback = matches!(route, Route::Fallback);
        // Why the dest copy could not be served, when it could not.
        let mut dest_problem = None;
        let opened = match route {
            Route::DestFile(opened, entry) => {
                match self.open_verified_dest_file(rel, opened, &entry) {
                    Ok(file) => Some(self.open_dest_handle(
                        ino,
                        Handle::Local(file),
                        &|f: &File| reply.open_backing(f),
                    )),
                    Err(why) => {
                        tracing::warn!(path = %rel.display(), problem = %why, "dest copy not served; serving the local copy");
                        dest_problem = Some(why);
                        fallback = true;
                        None
                    }
                }
            }
            Route::Remote {
                key,
                size,
                local_copy,
            } => {
                let file =
                    RemoteFile::new(self.store.clone(), key, size, self.prefetch_budget.clone());
                let handle = Handle::Remote {
                    file: Arc::new(file),
                    rel: rel.to_path_buf(),
                    deadline: local_copy.then_some(self.dest_read_deadline),
                };
                Some(self.open_dest_handle(ino, handle, &|f: &File| reply.open_backing(f)))
            }
            Route::Source | Route::Fallback => None,
        };
        if let Some(opened) = opened {
            return match opened {
                Ok((fh, backing)) => {
                    self.stats.opens_dest.inc();
                    reply_opened(reply, fh, backing, FopenFlags::FOPEN_KEEP_CACHE)
                }
                Err(e) => reply.error(Errno::from(e)),
            };
        }
        let backing_for = |file: &File| reply.open_backing(file);
        match self.open_local_handle(ino, rel, libc::O_RDONLY, false, &backing_for, None) {
            Ok((fh, backing)) => {
                if fallback {
                    self.stats.opens_fallback.inc();
                } else {
                    self.stats.opens_local.inc();
                }
                reply_opened(reply, fh, backing, FopenFlags::empty())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if self.ns.attr(rel).is_err() {
                    // Renamed or removed since the kernel looked it up: as if the open came
                    // after that.
                    return reply.error(Errno::ENOENT);
                }
                match dest_problem {
                    Some(why) => tracing::error!(path = %rel.display(), problem = %why,
                        "DATA AT RISK: the dest copy is not the one verified and there is no local copy; not served"),
                    None => {
                        tracing::error!(path = %rel.display(), "neither the dest nor a local copy can serve this file")
                    }
                }
                reply.error(Errno::EIO)
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    /// Opens the dest file of a verified file if it is still the copy that was verified (size,
    /// and the stamp recorded at publish: inode and mtime). A copy that changed is never served:
    /// the row is read again (a `verify --deep` may have found the bytes intact and recorded the
    /// new stamp), and if it still does not match, a file with a local copy goes back to
    /// `pending` and its local copy is served. Err says why it was not served.
    fn open_verified_dest_file(
        &self,
        rel: &Path,
        opened: io::Result<File>,
        entry: &Entry,
    ) -> Result<File, String> {
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                // Deleted by a rollback the cached row does not know of yet, or lost.
                self.forget_row(rel);
                let key = entry.dest_key.as_deref().unwrap_or_default();
                return Err(format!("the dest copy {key} cannot be opened: {e}"));
            }
        };
        let Err(why) = dest_file_matches(&file, entry) else {
            return Ok(file);
        };
        self.forget_row(rel);
        let fresh = self.ns.entry(rel).ok().flatten();
        let Some(fresh) = fresh.filter(|fresh| fresh.in_dest()) else {
            return Err(why);
        };
        if dest_file_matches(&file, &fresh).is_ok() {
            return Ok(file);
        }
        if !fresh.purged {
            self.dest_copy_changed(&fresh, &why);
        }
        Err(why)
    }

    /// Sends a file whose dest copy changed back to `pending`, off the FUSE thread.
    fn dest_copy_changed(&self, entry: &Entry, why: &str) {
        let (manifest, ns) = (self.manifest.clone(), self.ns.clone());
        let (path, version, why) = (entry.path.clone(), entry.version, why.to_string());
        self.rt.spawn(async move {
            let finding = format!("the mount found {why}");
            match manifest.dest_copy_changed(&path, version, &finding).await {
                Ok(true) => tracing::warn!(
                    path,
                    "dest copy changed since it was verified; the file is pending again"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(path, error = %e, "cannot send the file back to pending"),
            }
            ns.forget_entries(&[path]);
        });
    }

    /// Drops the cached manifest row of `rel`: it was found out of date.
    fn forget_row(&self, rel: &Path) {
        if let Some(text) = rel.to_str() {
            self.ns.forget_entries(&[text.to_string()]);
        }
    }

    pub(super) fn reply_entry(&self, path: &Path, reply: ReplyEntry) {
        match self.attr_of(path) {
            Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn listing(&self, ino: INodeNo) -> Result<Arc<Listing>, Errno> {
        let path = self.path(ino)?;
        let listed = self.ns.list(&path).map_err(Errno::from)?;
        Ok(Arc::new(
            listed
                .into_iter()
                .map(|mut item| {
                    let ino = self.inodes.number(&child_path(&path, &item.name));
                    item.attr.ino = INodeNo(ino);
                    (ino, item)
                })
                .collect(),
        ))
    }
}

/// Whether an open `file://` dest file is the copy the manifest verified: its size, and its
/// stamp (inode and mtime) where one was recorded, else its mtime (older rows; the dest file
/// carries the source's mtime).
fn dest_file_matches(file: &File, entry: &Entry) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat the dest copy: {e}"))?;
    let key = entry.dest_key.as_deref().unwrap_or_default();
    let found = ObjectFacts {
        size: meta.len(),
        recorded_sha256: None,
        read_sha256: None,
        etag: Some(local_stamp(&meta)),
    };
    let recorded = RecordedCopy {
        key,
        size: entry.size,
        sha256: None,
        etag: entry.dest_etag.as_deref(),
    };
    if let Some((_, why)) = ObjectFacts::compare(Some(&found), &recorded) {
        return Err(why);
    }
    let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    if entry.dest_etag.is_none() && mtime_ns != entry.mtime_ns {
        return Err(format!(
            "the dest object {key} was modified since it was verified (mtime {mtime_ns} ns, recorded {} ns)",
            entry.mtime_ns
        ));
    }
    Ok(())
}

/// Why a read from a remote dest was not answered from there.
#[derive(Debug, thiserror::Error)]
enum RemoteReadFailure {
    #[error(transparent)]
    Failed(Arc<crate::store::StoreError>),
    #[error("the dest took longer than {0:?} to answer a read")]
    TooSlow(Duration),
    #[error("the dest is down")]
    DestDown,
}

impl RemoteReadFailure {
    fn is_not_found(&self) -> bool {
        matches!(self, RemoteReadFailure::Failed(e) if e.is_not_found())
    }
}

/// How long a writer waits for readers of the dest copy to close.
const WRITER_WAIT: Duration = Duration::from_secs(2);

/// A writer met readers of the dest copy on the inode it wants to open.
#[derive(Debug, thiserror::Error)]
#[error("readers of the dest copy hold the file")]
struct DestReadersBusy;

fn is_dest_readers_busy(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<DestReadersBusy>())
}

/// A handle on an inode already in passthrough mode: it shares the backing file.
pub(super) fn share(
    ino: u64,
    mode: &Mode,
    writable: bool,
) -> (Open, Mode, Option<Arc<fuser::BackingId>>) {
    let Mode::Passthrough { backing, file, .. } = mode else {
        unreachable!("share is only called in passthrough mode");
    };
    let open = Open {
        ino,
        handle: Handle::Passthrough { file: file.clone() },
        writable,
    };
    (open, mode.clone(), Some(backing.clone()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_at(file: &File, offset: u64, size: u32) -> io::Result<Vec<u8>> {
    crate::util::read_full_at(file, offset, size as usize)
}

impl Filesystem for CutoverFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_PARALLEL_DIROPS;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::debug!(?missing, "kernel lacks some optional FUSE features");
        }
        let _ = config.set_max_readahead(1 << 20);
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        if passthrough {
            tracing::info!("FUSE passthrough on: local files are read by the kernel directly");
        } else {
            tracing::info!("FUSE passthrough unavailable: the daemon serves local reads itself");
        }
        if let Some(ready) = lock(&self.ready).take() {
            let _ = ready.send(true);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.requests.start("lookup");
        if is_bad_name(name) {
            return reply.error(Errno::ENOENT);
        }
        match self.path(parent) {
            Ok(dir) => self.reply_entry(&child_path(&dir, name), reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.requests.start("getattr");
        match self.path(ino).and_then(|p| self.attr_of(&p)) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.requests.start("readlink");
        use std::os::unix::ffi::OsStrExt;
        match self
            .path(ino)
            .and_then(|p| self.ns.read_link(&p).map_err(Errno::from))
        {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = self.requests.start("access");
        // default_permissions: the kernel checks modes itself; this only says it exists.
        match self.path(ino).and_then(|p| self.attr_of(&p)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.requests.start("statfs");
        match self.ns.source().statvfs() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.requests.start("opendir");
        match self.listing(ino) {
            Ok(listing) => {
                let fh = self.next_listing.fetch_add(1, Ordering::Relaxed);
                lock(&self.listings).insert(fh, listing);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.requests.start("readdir");
        let Some(listing) = lock(&self.listings).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, item)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, item.attr.kind, &item.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = self.requests.start("readdirplus");
        let Some(listing) = lock(&self.listings).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, item)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(*ino),
                (i + 1) as u64,
                &item.name,
                &self.ttl,
                &item.attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("releasedir");
        lock(&self.listings).remove(&fh.0);
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Timed to the reply, also when it is sent from another thread.
        let timer = self.requests.start("open");
        let rel = match self.path(ino) {
            Ok(rel) => rel,
            Err(e) => return reply.error(e),
        };
        let ino = ino.0;
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if writing && self.files.excludes_writers(ino) {
            // Readers of the dest copy hold the inode: wait for them off the FUSE threads.
            self.files.writer_starts_waiting(ino);
            let fs = self.0.clone();
            self.rt.spawn_blocking(move || {
                let _timer = timer;
                let _span = tracing::debug_span!("open", path = %rel.display()).entered();
                fs.open_for_write(ino, &rel, flags.0, reply);
                fs.files.writer_stops_waiting(ino);
            });
        } else if writing {
            let _span = tracing::debug_span!("open", path = %rel.display()).entered();
            self.open_for_write(ino, &rel, flags.0, reply);
        } else if self.files.has_waiting_writer(ino) {
            let fs = self.0.clone();
            self.rt.spawn_blocking(move || {
                let _timer = timer;
                let _span = tracing::debug_span!("open", path = %rel.display()).entered();
                fs.wait_for_waiting_writers(ino);
                fs.open_for_read(ino, &rel, reply);
            });
        } else {
            let _span = tracing::debug_span!("open", path = %rel.display()).entered();
            self.open_for_read(ino, &rel, reply);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let timer = self.requests.start("read");
        self.stats.read_requests.inc();
        let Some(open) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        match &open.handle {
            Handle::Passthrough { file } => match read_at(file, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(Errno::from(e)),
            },
            Handle::Local(file) => match read_at(file, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(Errno::from(e)),
            },
            Handle::Remote {
                file,
                rel,
                deadline,
            } => {
                let (file, rel, deadline) = (file.clone(), rel.clone(), *deadline);
                let source = self.ns.source().clone();
                let health = self.dest_health.clone();
                let stats = self.stats.clone();
                let ns = self.ns.clone();
                self.rt.spawn(async move {
                    let _timer = timer;
                    let read = file.read(offset, size as u64);
                    let failure = match deadline {
                        // The dest went down since this file was opened: its local copy answers.
                        Some(_) if health.is_down() => Err(RemoteReadFailure::DestDown),
                        Some(deadline) => match tokio::time::timeout(deadline, read).await {
                            Ok(Ok(data)) => Ok(data),
                            Ok(Err(e)) => Err(RemoteReadFailure::Failed(e)),
                            Err(_) => Err(RemoteReadFailure::TooSlow(deadline)),
                        },
                        None => read.await.map_err(RemoteReadFailure::Failed),
                    };
                    let failure = match failure {
                        Ok(data) => {
                            health.mark_up();
                            stats.bytes_dest.inc_by(data.len() as u64);
                            return reply.data(&data);
                        }
                        Err(failure) => failure,
                    };
                    // An object that is gone (a rollback deleted it) says nothing about the
                    // dest's health; the row behind it changed.
                    if failure.is_not_found() {
                        ns.forget_entries(&[rel.to_string_lossy().into_owned()]);
                    } else if !matches!(failure, RemoteReadFailure::DestDown) {
                        health.mark_down(&failure.to_string(), file.key());
                    }
                    let local = tokio::task::spawn_blocking(move || {
                        source
                            .open_at(&rel, libc::O_RDONLY)
                            .and_then(|file| read_at(&file, offset, size))
                            .map_err(|le| (rel, le))
                    })
                    .await;
                    match local {
                        Ok(Ok(data)) => {
                            stats.fallback_reads.inc();
                            reply.data(&data)
                        }
                        Ok(Err((rel, le))) => {
                            tracing::error!(path = %rel.display(), dest_error = %failure, local_error = %le, "read failed at the dest and there is no local copy");
                            reply.error(Errno::EIO)
                        }
                        Err(_) => reply.error(Errno::EIO),
                    }
                });
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("flush");
        reply.ok();
    }

    /// Extended attributes are not part of what cutoverfs migrates; ENOSYS makes the kernel
    /// stop asking for the life of the mount.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        let _timer = self.requests.start("getxattr");
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        let _timer = self.requests.start("listxattr");
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("release");
        if let Some(open) = self.files.release(fh.0) {
            if open.writable {
                self.after_writer_closed(&open);
            }
        }
        reply.ok();
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timer = self.requests.start("write");
        use std::os::unix::fs::FileExt;
        let Some(open) = self.files.get(fh.0).filter(|o| o.writable) else {
            return reply.error(Errno::EBADF);
        };
        match open.file().map(|f| f.write_all_at(data, offset)) {
            Some(Ok(())) => reply.written(data.len() as u32),
            Some(Err(e)) => reply.error(Errno::from(e)),
            None => reply.error(Errno::EBADF),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("fsync");
        let Some(open) = self.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let synced = match open.file() {
            Some(file) if datasync => file.sync_data(),
            Some(file) => file.sync_all(),
            None => Ok(()),
        };
        match synced {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("fsyncdir");
        match self
            .path(ino)
            .and_then(|rel| super::local::sync_dir(self.ns.source(), &rel).map_err(Errno::from))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("fallocate");
        use std::os::fd::AsRawFd;
        let Some(file) = self.files.get(fh.0).filter(|o| o.writable) else {
            return reply.error(Errno::EBADF);
        };
        let Some(file) = file.file() else {
            return reply.error(Errno::EBADF);
        };
        // SAFETY: a descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
        if rc == 0 {
            reply.ok()
        } else {
            reply.error(Errno::from(io::Error::last_os_error()))
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _timer = self.requests.start("create");
        self.create_file(req, parent, name, mode & !umask, flags, reply)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.requests.start("mknod");
        self.make_node(req, parent, name, mode & !umask, rdev, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.requests.start("mkdir");
        self.make_dir(req, parent, name, mode & !umask, reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _timer = self.requests.start("symlink");
        self.make_symlink(req, parent, link_name, target, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.requests.start("unlink");
        self.remove(parent, name, false, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.requests.start("rmdir");
        self.remove(parent, name, true, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("rename");
        self.rename_path(parent, name, newparent, newname, flags, reply)
    }

    /// Hard links would give one file two keys at the dest; the mount does not make them.
    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timer = self.requests.start("link");
        reply.error(Errno::EPERM)
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timer = self.requests.start("setattr");
        let change = super::writes::AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        self.change_attrs(ino, change, fh, reply)
    }

    /// Extended attributes are not migrated; setting one is refused as unsupported.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.requests.start("setxattr");
        reply.error(Errno::EOPNOTSUPP)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.requests.start("removexattr");
        reply.error(Errno::EOPNOTSUPP)
    }
}

pub(super) fn reply_opened(
    reply: ReplyOpen,
    fh: u64,
    backing: Option<Arc<fuser::BackingId>>,
    flags: FopenFlags,
) {
    match backing {
        Some(backing) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing),
        None => reply.opened(FileHandle(fh), flags),
    }
}
