//! The read path of an open, in one place: where an open is served from (`route`), the handle
//! it gets, how its reads are answered, and its release.
//!
//! 1. **Route.** The manifest's row decides: a file verified at the dest is read from there (a
//!    `file://` copy only while it is still the one verified: size and the stamp recorded when
//!    it was published), unless the dest is down; everything else from the local copy, and a
//!    pending file is queued for copy on the way (copy-on-read, never waited for). Without the
//!    manifest, the local copy is served when there is one. A replica has no local copy: a file
//!    not copied yet is waited for (`CopyWaits`, off the FUSE threads).
//! 2. **Handle.** The kernel lets every open of one inode use the same passthrough backing file
//!    or none; mixing them fails the open. So the first open of an inode picks (`InodeIo`, kept
//!    in the inode's record) and the others follow: the local copy (source route, or any open
//!    for writing) → passthrough on the local file, opened read-write so later writers share
//!    it; a `file://` dest file → passthrough on that file; a remote object → served by the
//!    daemon. A writer cannot share a dest backing file (it must write the local copy), so it
//!    waits a moment for those readers to close and is refused with ETXTBSY if they do not;
//!    while it waits, new readers wait behind it, or a steady stream of readers would keep it
//!    out for ever. All such waiting happens off the FUSE threads (`open_plan`).
//! 3. **Reads.** Passthrough reads never reach the daemon. Local files served by the daemon are
//!    read with `pread`; remote objects through the prefetcher, on the async runtime, with the
//!    local copy answering when the dest fails or is slower than `--dest-read-timeout`.
//! 4. **Release.** The last handle ends the inode's mode; the last writer's close records the
//!    file (`writes.rs`); a file unlinked while open has its dest objects deleted now.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fuser::{BackingId, Errno, FopenFlags};

use super::core::Core;
use super::handles::{Handle, HandleIo};
use super::inode::{Inode, InodeIo};
use super::namespace::replica::shown;
use super::namespace::Route;
use super::prefetch::RemoteFile;
use crate::manifest::{Entry, Kind, State};
use crate::store::{local_stamp, ObjectFacts, RecordedCopy};

/// How long a writer waits for readers of the dest copy to close.
const WRITER_WAIT: Duration = Duration::from_secs(2);

/// Makes a passthrough backing file of an open file (the kernel's side of a FUSE open reply).
pub trait Backing {
    fn open_backing(&self, file: &File) -> io::Result<BackingId>;
}

/// What an open answers: the handle, the backing file for passthrough, the open flags.
pub struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<BackingId>>,
    pub flags: FopenFlags,
}

/// Where an open runs.
pub enum OpenPlan {
    /// On the FUSE thread: nothing to wait for.
    Here,
    /// On a blocking thread: it may wait (for readers of a dest copy, a waiting writer, a copy
    /// a replica requested). `counted_writer`: the writer was already counted as waiting, so
    /// readers arriving meanwhile queue behind it.
    Elsewhere { counted_writer: bool },
}

/// A read's answer: ready now, or from the async runtime (a remote object).
pub enum Read {
    Now(Result<Vec<u8>, Errno>),
    Later(Pin<Box<dyn Future<Output = Result<Bytes, Errno>> + Send>>),
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

/// Whether an open with these flags may change the file.
pub fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl Core {
    /// Decides where the open of `ino` runs; a writer that will have to wait is counted as
    /// waiting right away (see `OpenPlan`).
    pub fn open_plan(&self, ino: u64, flags: i32) -> OpenPlan {
        let writing = writes(flags);
        if let Some(inode) = self.inodes.get(ino) {
            let mut state = inode.lock();
            if writing && state.io.as_ref().is_some_and(InodeIo::excludes_writers) {
                state.waiting_writers += 1;
                return OpenPlan::Elsewhere {
                    counted_writer: true,
                };
            }
            if !writing && state.waiting_writers > 0 {
                return OpenPlan::Elsewhere {
                    counted_writer: false,
                };
            }
        }
        let wait_for_copy = self.copy_waits.is_some()
            && self.path(ino).is_ok_and(
                |path| !matches!(self.rows.entry(&path), Ok(Some(row)) if row.in_dest()),
            );
        if wait_for_copy || (writing && self.writes_may_wait()) || self.manifest_is_remote() {
            OpenPlan::Elsewhere {
                counted_writer: false,
            }
        } else {
            OpenPlan::Here
        }
    }

    /// Opens `ino` with the application's `flags`.
    pub fn open(
        self: &Arc<Self>,
        ino: u64,
        flags: i32,
        backing: &dyn Backing,
        counted_writer: bool,
    ) -> Result<Opened, Errno> {
        let (rel, row) = match self.resolve(ino) {
            Ok(resolved) => resolved,
            Err(e) => {
                if counted_writer {
                    self.writer_gives_up(ino);
                }
                return Err(e);
            }
        };
        let _span = tracing::debug_span!("open", path = %rel.display()).entered();
        if writes(flags) {
            self.open_for_write(ino, &rel, flags, backing, counted_writer)
        } else {
            self.open_for_read(ino, &rel, row, backing)
        }
    }

    /// A writer counted as waiting will not open after all.
    pub(super) fn writer_gives_up(&self, ino: u64) {
        if let Some(inode) = self.inodes.get(ino) {
            let mut state = inode.lock();
            state.waiting_writers = state.waiting_writers.saturating_sub(1);
            drop(state);
            inode.changed();
        }
        self.inodes.settle(ino);
    }

    /// A read-only open: from the dest when the file is verified there, else the local copy.
    /// `row`: the file's row, just read (it routes the open without reading it again).
    fn open_for_read(
        self: &Arc<Self>,
        ino: u64,
        rel: &Path,
        row: Option<Arc<Entry>>,
        backing: &dyn Backing,
    ) -> Result<Opened, Errno> {
        let mut route = self.route(rel, row)?;
        if let Route::NotCopied(path) = route {
            let waits = self.copy_waits.as_ref().ok_or(Errno::EIO)?;
            let entry = self.rt.block_on(waits.copied(path))?;
            route = self.dest_route(rel, entry)?;
        }
        let (fallback, dest_problem) = match route {
            Route::DestFile(file, entry) => {
                return self.opened_from_dest(ino, rel, HandleIo::Local(file), &entry, backing)
            }
            Route::Remote {
                key,
                size,
                local_copy,
            } => {
                let entry = self.rows.entry(rel).ok().flatten();
                let file =
                    RemoteFile::new(self.store.clone(), key, size, self.prefetch_budget.clone());
                let io = HandleIo::Remote {
                    file: Arc::new(file),
                    rel: rel.to_path_buf(),
                    deadline: local_copy.then_some(self.dest_read_deadline),
                };
                let sha = entry.as_ref().and_then(|e| e.sha256.clone());
                return self.opened_remote(ino, rel, io, sha);
            }
            Route::Local {
                fallback,
                dest_problem,
            } => (fallback, dest_problem),
            Route::NotCopied(_) => unreachable!("waited for above"),
        };
        match self.open_local_handle(ino, rel, libc::O_RDONLY, false, backing, None, false) {
            Ok((fh, backing)) => {
                if fallback {
                    self.stats.opens_fallback.inc();
                } else {
                    self.stats.opens_local.inc();
                }
                Ok(Opened {
                    fh,
                    backing,
                    flags: FopenFlags::empty(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if self.ns.attr(rel, ino).is_err() {
                    // Renamed or removed since the kernel looked it up: as if the open came
                    // after that.
                    return Err(Errno::ENOENT);
                }
                match dest_problem {
                    Some(why) => tracing::error!(path = %rel.display(), problem = %why,
                        "DATA AT RISK: the dest copy is not the one verified and there is no local copy; not served"),
                    None => {
                        tracing::error!(path = %rel.display(), "neither the dest nor a local copy can serve this file")
                    }
                }
                Err(Errno::EIO)
            }
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// Decides where a read-only open is served from, queueing a pending file for copy on the
    /// way.
    pub(super) fn route(&self, rel: &Path, known: Option<Arc<Entry>>) -> Result<Route, Errno> {
        let rows = &self.rows;
        let entry = match known {
            Some(row) => Some(row),
            None => match rows.entry(rel) {
                Ok(entry) => entry,
                Err(e) if rows.manifest_down() => return self.route_without_manifest(rel, e),
                Err(e) => return Err(Errno::from(e)),
            },
        };
        let Some(local) = self.ns.local() else {
            // A replica: the dest or nothing.
            return match entry {
                Some(entry) if !shown(&entry) => Err(Errno::ENOENT),
                Some(entry) if entry.in_dest() => self.dest_route(rel, entry),
                Some(entry) if entry.kind != Kind::File => Err(Errno::EIO),
                Some(entry) => Ok(Route::NotCopied(entry.path.clone())),
                None => Err(Errno::ENOENT),
            };
        };
        let Some(entry) = entry else {
            return Ok(local_route());
        };
        tracing::debug!(path = %rel.display(), state = ?entry.state, size = entry.size, "route");
        if entry.in_dest() && self.dest_health.is_down() {
            return Ok(Route::Local {
                fallback: true,
                dest_problem: None,
            });
        }
        if entry.in_dest() && !self.local_copy_changed(local, rel) {
            return self.dest_route(rel, entry);
        }
        if entry.state == State::Pending {
            if let Some(queue) = &self.copy_on_read {
                queue.queue(&entry.path);
            }
        }
        Ok(local_route())
    }

    /// Whether a verified file's local copy has other names (hard links): a write through one of
    /// them changed this file too, and only the local copy has that (its other names are
    /// recorded when the writer closes; `writes.rs`). Its local copy is served then. (Also for
    /// a file recorded purged: a link to it brought its local copy back.)
    fn local_copy_changed(&self, local: &crate::source::SourceTree, rel: &Path) -> bool {
        local.stat_at(rel).is_ok_and(|st| st.st_nlink > 1)
    }

    /// The route to a verified file's dest copy: a `file://` one is opened and checked.
    fn dest_route(&self, rel: &Path, entry: Arc<Entry>) -> Result<Route, Errno> {
        let key = entry.dest_key.clone().unwrap_or_default();
        let local = self.ns.local().is_some();
        match self.store.open_local_file(&key) {
            Some(opened) => match self.open_verified_dest_file(rel, opened, &entry) {
                Ok(file) => Ok(Route::DestFile(file, entry)),
                Err(why) if local => {
                    tracing::warn!(path = %rel.display(), problem = %why, "dest copy not served; serving the local copy");
                    Ok(Route::Local {
                        fallback: true,
                        dest_problem: Some(why),
                    })
                }
                Err(why) => match self.newer_row(rel, &entry) {
                    // The row was read before another node changed the file (a rewrite copied
                    // over the key): route by the manifest's row as it is now.
                    Some(fresh) => self.route(rel, Some(fresh)),
                    None => {
                        tracing::error!(path = %rel.display(), problem = %why, "the dest copy is not the one verified; not served");
                        Err(Errno::EIO)
                    }
                },
            },
            None => Ok(Route::Remote {
                key,
                size: entry.size,
                local_copy: local && !entry.purged,
            }),
        }
    }

    /// `rel`'s row read again from the manifest, when it has changed since `known` was read
    /// (cached rows live for `--manifest-cache`).
    fn newer_row(&self, rel: &Path, known: &Entry) -> Option<Arc<Entry>> {
        let text = rel.to_str()?;
        self.rows.forget(&[text.to_string()]);
        let fresh = self.rows.entry(rel).ok()??;
        (fresh.version != known.version || fresh.sha256 != known.sha256).then_some(fresh)
    }

    /// The manifest cannot say where the file is (issue 7.5). Writes through the mount go to the
    /// local copy first, so a local copy is current and is served; without one (purged) the
    /// file lives only at the dest, which only the manifest can find.
    fn route_without_manifest(&self, rel: &Path, e: io::Error) -> Result<Route, Errno> {
        let Some(local) = self.ns.local() else {
            return Err(Errno::from(e));
        };
        match local.stat_at(rel) {
            Ok(_) => Ok(local_route()),
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
        let fresh = self.rows.entry(rel).ok().flatten();
        let Some(fresh) = fresh.filter(|fresh| fresh.in_dest()) else {
            return Err(why);
        };
        if dest_file_matches(&file, &fresh).is_ok() {
            return Ok(file);
        }
        if !fresh.purged && self.writes.is_some() {
            self.dest_copy_changed(&fresh, &why);
        }
        Err(why)
    }

    /// Sends a file whose dest copy changed back to `pending`, off the FUSE thread.
    fn dest_copy_changed(&self, entry: &Entry, why: &str) {
        let rows = self.rows.clone();
        let (path, version, why) = (entry.path.clone(), entry.version, why.to_string());
        self.rt.spawn(async move {
            let finding = format!("the mount found {why}");
            let manifest = rows.manifest();
            match manifest.dest_copy_changed(&path, version, &finding).await {
                Ok(true) => tracing::warn!(
                    path,
                    "dest copy changed since it was verified; the file is pending again"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(path, error = %e, "cannot send the file back to pending"),
            }
            rows.forget(&[path]);
        });
    }

    /// Drops the cached manifest row of `rel`: it was found out of date.
    pub(super) fn forget_row(&self, rel: &Path) {
        if let Some(text) = rel.to_str() {
            self.rows.forget(&[text.to_string()]);
        }
    }

    /// Registers a handle on a dest copy served from a local file (`file://`).
    fn opened_from_dest(
        &self,
        ino: u64,
        rel: &Path,
        io: HandleIo,
        entry: &Entry,
        backing: &dyn Backing,
    ) -> Result<Opened, Errno> {
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        let (fh, backing) = self
            .register(ino, rel, false, false, |current| {
                Ok(match (current, io) {
                    (Some(mode @ InodeIo::Passthrough { .. }), _) => share(mode),
                    (None, HandleIo::Local(file)) if passthrough => {
                        self.first_passthrough(file, false, backing)
                    }
                    (_, io) => (io, InodeIo::Daemon, None),
                })
            })
            .map_err(Errno::from)?;
        self.stats.opens_dest.inc();
        Ok(Opened {
            fh,
            backing,
            flags: self.cache_flags(ino, entry.sha256.clone()),
        })
    }

    /// Registers a handle on a remote object (served by the daemon; an inode already in
    /// passthrough mode is shared: same bytes, or the newer local ones).
    fn opened_remote(
        &self,
        ino: u64,
        rel: &Path,
        io: HandleIo,
        sha256: Option<String>,
    ) -> Result<Opened, Errno> {
        let (fh, backing) = self
            .register(ino, rel, false, false, |current| {
                Ok(match current {
                    Some(mode @ InodeIo::Passthrough { .. }) => share(mode),
                    _ => (io, InodeIo::Daemon, None),
                })
            })
            .map_err(Errno::from)?;
        self.stats.opens_dest.inc();
        Ok(Opened {
            fh,
            backing,
            flags: self.cache_flags(ino, sha256),
        })
    }

    /// FOPEN_KEEP_CACHE when the inode was last opened with the same content: its pages in the
    /// kernel's cache are still right.
    fn cache_flags(&self, ino: u64, sha256: Option<String>) -> FopenFlags {
        let Some(sha) = sha256.filter(|s| !s.is_empty()) else {
            self.opened_content.invalidate(&ino);
            return FopenFlags::empty();
        };
        let same = self
            .opened_content
            .get(&ino)
            .is_some_and(|was| *was == *sha);
        self.opened_content.insert(ino, Arc::from(sha.as_str()));
        if same {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    /// The local copy opened read-write to back passthrough (so writers can share it), or
    /// read-only where it cannot be written.
    fn open_backing_file(&self, rel: &Path, write: bool) -> io::Result<File> {
        let local = self.local_tree()?;
        match local.open_at(rel, libc::O_RDWR) {
            Ok(file) => Ok(file),
            Err(e)
                if !write
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::ETXTBSY | libc::EPERM)
                    ) =>
            {
                local.open_at(rel, libc::O_RDONLY)
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn local_tree(&self) -> io::Result<&Arc<crate::source::SourceTree>> {
        self.ns
            .local()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }

    /// Opens a handle on `ino` that reads and writes the local copy at `rel`: passthrough when
    /// the inode is (or can be put) in passthrough mode, else served by the daemon with the
    /// caller's flags. `given`: the local file, already open (a create).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_local_handle(
        &self,
        ino: u64,
        rel: &Path,
        flags: i32,
        writable: bool,
        backing: &dyn Backing,
        given: Option<File>,
        counted_writer: bool,
    ) -> io::Result<(u64, Option<Arc<BackingId>>)> {
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        // Opened before the inode's state is taken: no lock is held across a system call that
        // may wait on the local disk.
        let file = match given {
            Some(file) => file,
            None if passthrough => self.open_backing_file(rel, writable)?,
            None => self.local_tree()?.open_at(rel, flags)?,
        };
        self.register(
            ino,
            rel,
            writable,
            counted_writer,
            |current| match current {
                Some(mode @ InodeIo::Passthrough { .. }) => Ok(share(mode)),
                None if passthrough => Ok(self.first_passthrough(file, true, backing)),
                _ => Ok((HandleIo::Local(file), InodeIo::Daemon, None)),
            },
        )
    }

    /// The first open of an inode in passthrough mode: `file` becomes its backing file.
    fn first_passthrough(
        &self,
        file: File,
        local: bool,
        backing: &dyn Backing,
    ) -> (HandleIo, InodeIo, Option<Arc<BackingId>>) {
        match backing.open_backing(&file) {
            Ok(id) => {
                self.stats.passthrough_opens.inc();
                let mode = InodeIo::Passthrough {
                    backing: Arc::new(id),
                    file: Arc::new(file),
                    local,
                };
                share(&mode)
            }
            Err(e) => {
                tracing::warn!(error = %e, "passthrough refused; the daemon serves reads itself from now on");
                self.passthrough.store(false, Ordering::Relaxed);
                (HandleIo::Local(file), InodeIo::Daemon, None)
            }
        }
    }

    /// Adds a handle to `ino`'s record: `pick` gets the inode's current I/O mode (None: no
    /// handle is open) under the record's lock, so two first opens cannot pick different modes.
    /// A writer waits while readers of a dest copy hold the inode (at most `WRITER_WAIT`, then
    /// ETXTBSY); a reader waits while a writer does.
    fn register(
        &self,
        ino: u64,
        rel: &Path,
        writable: bool,
        counted_writer: bool,
        pick: impl FnOnce(Option<&InodeIo>) -> io::Result<(HandleIo, InodeIo, Option<Arc<BackingId>>)>,
    ) -> io::Result<(u64, Option<Arc<BackingId>>)> {
        let started = Instant::now();
        let mut counted = counted_writer;
        let mut pick = Some(pick);
        loop {
            let outcome = self.inodes.with_record(ino, rel, |inode, state| {
                let blocked = if writable {
                    state.io.as_ref().is_some_and(InodeIo::excludes_writers)
                } else {
                    state.waiting_writers > 0
                };
                if blocked {
                    if writable && !counted {
                        state.waiting_writers += 1;
                        counted = true;
                    }
                    return Turn::Wait(inode.clone());
                }
                let picked = (pick.take().expect("picked once"))(state.io.as_ref());
                let (io, mode, backing) = match picked {
                    Ok(picked) => picked,
                    Err(e) => return Turn::Failed(e),
                };
                if writable && counted {
                    state.waiting_writers -= 1;
                    counted = false;
                }
                state.handles += 1;
                if writable {
                    state.writers += 1;
                }
                if state.local.is_none() {
                    state.local = local_file_of(&io, &mode);
                }
                state.io = Some(mode);
                inode.changed();
                Turn::Open(inode.clone(), io, backing)
            });
            let (inode, io, backing) = match outcome {
                Turn::Open(inode, io, backing) => (inode, io, backing),
                Turn::Failed(e) => {
                    if counted {
                        self.writer_gives_up(ino);
                    }
                    return Err(e);
                }
                Turn::Wait(inode) => {
                    self.wait_turn(&inode, writable, started)?;
                    continue;
                }
            };
            let fh = self.handles.insert(Handle {
                inode,
                io,
                writable,
            });
            return Ok((fh, backing));
        }
    }

    /// Waits for readers of a dest copy to leave (a writer) or for a waiting writer to get in
    /// (a reader). ETXTBSY when a writer waited `WRITER_WAIT` in vain.
    fn wait_turn(&self, inode: &Arc<Inode>, writer: bool, started: Instant) -> io::Result<()> {
        let state = inode.lock();
        if writer {
            // tests/mount_writes.rs waits for this line.
            tracing::debug!(
                ino = inode.ino,
                "a writer waits for the readers of the dest copy"
            );
            let left = WRITER_WAIT.saturating_sub(started.elapsed());
            let (state, free) = inode.wait_until(state, left, |s| {
                !s.io.as_ref().is_some_and(InodeIo::excludes_writers)
            });
            if !free {
                drop(state);
                tracing::warn!(ino = inode.ino, "a file read from the dest stayed open; refusing to open it for writing (ETXTBSY)");
                self.writer_gives_up(inode.ino);
                return Err(io::Error::from_raw_os_error(libc::ETXTBSY));
            }
        } else {
            // The writer waits at most WRITER_WAIT; this bound only guards against a lost wakeup.
            let _ = inode.wait_until(state, 2 * WRITER_WAIT, |s| s.waiting_writers == 0);
        }
        Ok(())
    }

    /// Answers a READ.
    pub fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Read {
        self.stats.read_requests.inc();
        let Some(handle) = self.handles.get(fh) else {
            return Read::Now(Err(Errno::EBADF));
        };
        match &handle.io {
            HandleIo::Passthrough { file } => Read::Now(read_at(file, offset, size)),
            HandleIo::Local(file) => Read::Now(read_at(file, offset, size)),
            HandleIo::Remote {
                file,
                rel,
                deadline,
            } => {
                let (file, rel, deadline) = (file.clone(), rel.clone(), *deadline);
                let core = self.clone();
                Read::Later(Box::pin(async move {
                    core.read_remote(file, rel, deadline, offset, size).await
                }))
            }
        }
    }

    /// A read of a remote object; the local copy answers when the dest fails, is down or is
    /// slower than `deadline`.
    async fn read_remote(
        self: Arc<Self>,
        file: Arc<RemoteFile>,
        rel: std::path::PathBuf,
        deadline: Option<Duration>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, Errno> {
        let read = file.read(offset, size as u64);
        let outcome = match deadline {
            // The dest went down since this file was opened: its local copy answers.
            Some(_) if self.dest_health.is_down() => Err(RemoteReadFailure::DestDown),
            Some(deadline) => match tokio::time::timeout(deadline, read).await {
                Ok(Ok(data)) => Ok(data),
                Ok(Err(e)) => Err(RemoteReadFailure::Failed(e)),
                Err(_) => Err(RemoteReadFailure::TooSlow(deadline)),
            },
            None => read.await.map_err(RemoteReadFailure::Failed),
        };
        let failure = match outcome {
            Ok(data) => {
                self.dest_health.mark_up();
                self.stats.bytes_dest.inc_by(data.len() as u64);
                return Ok(data);
            }
            Err(failure) => failure,
        };
        // An object that is gone (a rollback deleted it) says nothing about the dest's health;
        // the row behind it changed.
        if failure.is_not_found() {
            self.forget_row(&rel);
        } else if !matches!(failure, RemoteReadFailure::DestDown) {
            self.dest_health.mark_down(&failure.to_string(), file.key());
        }
        let Some(local) = self.ns.local().cloned() else {
            tracing::error!(path = %rel.display(), error = %failure, "read failed at the dest");
            return Err(Errno::EIO);
        };
        let local_read = tokio::task::spawn_blocking(move || {
            local
                .open_at(&rel, libc::O_RDONLY)
                .and_then(|file| crate::util::read_full_at(&file, offset, size as usize))
                .map_err(|le| (rel, le))
        })
        .await;
        match local_read {
            Ok(Ok(data)) => {
                self.stats.fallback_reads.inc();
                Ok(Bytes::from(data))
            }
            Ok(Err((rel, le))) => {
                tracing::error!(path = %rel.display(), dest_error = %failure, local_error = %le, "read failed at the dest and there is no local copy");
                Err(Errno::EIO)
            }
            Err(_) => Err(Errno::EIO),
        }
    }

    /// Closes a handle: the inode's mode ends with its last handle, the last writer's close
    /// records the file, and a file unlinked while open has its dest objects deleted now.
    pub fn release(self: &Arc<Self>, fh: u64) {
        let Some(handle) = self.handles.remove(fh) else {
            return;
        };
        let inode = handle.inode.clone();
        let (last_writer, leftovers) = {
            let mut state = inode.lock();
            state.handles = state.handles.saturating_sub(1);
            if handle.writable {
                state.writers = state.writers.saturating_sub(1);
            }
            let last_writer = handle.writable && state.writers == 0;
            let mut leftovers = Vec::new();
            if state.handles == 0 {
                state.io = None;
                state.local = None;
                leftovers = std::mem::take(&mut state.leftovers);
            }
            (last_writer, leftovers)
        };
        inode.changed();
        if handle.writable {
            // Its size and times are final now; listings built while it was written are not.
            self.changed();
        }
        if last_writer {
            self.after_writer_closed(&handle);
        }
        self.delete_leftovers_later(leftovers);
        self.inodes.settle(inode.ino);
    }
}

/// What registering a handle came to.
enum Turn {
    Open(Arc<Inode>, HandleIo, Option<Arc<BackingId>>),
    Wait(Arc<Inode>),
    Failed(io::Error),
}

fn local_route() -> Route {
    Route::Local {
        fallback: false,
        dest_problem: None,
    }
}

/// A descriptor of the local copy behind a new handle, kept by the inode's record for the
/// requests that reach a file unlinked while open.
fn local_file_of(io: &HandleIo, mode: &InodeIo) -> Option<Arc<File>> {
    match (mode, io) {
        (
            InodeIo::Passthrough {
                file, local: true, ..
            },
            _,
        ) => Some(file.clone()),
        (InodeIo::Daemon, HandleIo::Local(file)) => file.try_clone().ok().map(Arc::new),
        _ => None,
    }
}

/// A handle on an inode already in passthrough mode: it shares the backing file.
fn share(mode: &InodeIo) -> (HandleIo, InodeIo, Option<Arc<BackingId>>) {
    let InodeIo::Passthrough { backing, file, .. } = mode else {
        unreachable!("share is only called in passthrough mode");
    };
    (
        HandleIo::Passthrough { file: file.clone() },
        mode.clone(),
        Some(backing.clone()),
    )
}

fn read_at(file: &File, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    crate::util::read_full_at(file, offset, size as usize).map_err(Errno::from)
}

/// Whether an open `file://` dest file is the copy the manifest verified: its size, and its
/// stamp (inode and mtime) where one was recorded, else its mtime (older rows; the dest file
/// carries the source's mtime).
pub fn dest_file_matches(file: &File, entry: &Entry) -> Result<(), String> {
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
