//! The FUSE request handlers: each turns a kernel request into questions to the namespace,
//! the store and the copy-on-read queue, and answers. Remote reads are answered from the async
//! runtime, so no FUSE thread ever waits on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tokio::sync::Semaphore;

use super::inodes::Inodes;
use super::namespace::{child_path, is_bad_name, Listed, Namespace};
use super::prefetch::RemoteFile;
use super::{CopyOnRead, DestHealth, ReadStats};
use crate::manifest::State;
use crate::store::Store;

/// What an open file reads from.
enum OpenFile {
    /// The kernel reads the backing file itself; the file stays open so a stray READ can
    /// still be answered.
    Passthrough { _backing: BackingId, file: File },
    /// A local file (the source or a `file://` dest) read by the daemon.
    Local(File),
    /// An object at a remote dest; `rel` names the local copy to fall back to.
    Remote { file: Arc<RemoteFile>, rel: PathBuf },
}

/// A directory's entries with their inode numbers, as read at opendir.
type Listing = Vec<(u64, Listed)>;

/// Where an open is served from.
enum Route {
    Source,
    DestFile(PathBuf),
    Remote { key: String, size: u64 },
}

pub struct CutoverFs {
    pub(super) ns: Arc<Namespace>,
    pub(super) inodes: Inodes,
    pub(super) store: Arc<dyn Store>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) ttl: Duration,
    pub(super) copy_on_read: CopyOnRead,
    pub(super) dest_health: Arc<DestHealth>,
    pub(super) stats: Arc<ReadStats>,
    pub(super) prefetch_budget: Arc<Semaphore>,
    pub(super) ready: Mutex<Option<std::sync::mpsc::Sender<bool>>>,
    pub(super) passthrough: AtomicBool,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    next_handle: AtomicU64,
}

impl CutoverFs {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        ns: Arc<Namespace>,
        store: Arc<dyn Store>,
        rt: tokio::runtime::Handle,
        ttl: Duration,
        copy_on_read: CopyOnRead,
        dest_health: Arc<DestHealth>,
        stats: Arc<ReadStats>,
        prefetch_budget: Arc<Semaphore>,
        ready: std::sync::mpsc::Sender<bool>,
    ) -> CutoverFs {
        CutoverFs {
            ns,
            inodes: Inodes::new(),
            store,
            rt,
            ttl,
            copy_on_read,
            dest_health,
            stats,
            prefetch_budget,
            ready: Mutex::new(Some(ready)),
            passthrough: AtomicBool::new(false),
            handles: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    fn path(&self, ino: INodeNo) -> Result<Arc<Path>, Errno> {
        self.inodes.path(ino.0).ok_or(Errno::ENOENT)
    }

    fn attr_of(&self, path: &Path) -> Result<FileAttr, Errno> {
        let mut attr = self.ns.attr(path).map_err(Errno::from)?;
        attr.ino = INodeNo(self.inodes.number(path));
        Ok(attr)
    }

    fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<OpenFile>> {
        lock(&self.handles).get(&fh.0).cloned()
    }

    /// Decides where an open is served from, queueing a pending file for copy on the way.
    fn route(&self, rel: &Path) -> Result<Route, Errno> {
        let entry = self.ns.entry(rel).map_err(Errno::from)?;
        let Some(entry) = entry else {
            return Ok(Route::Source);
        };
        if entry.in_dest() && !self.dest_health.is_down() {
            let key = entry.dest_key.clone().unwrap_or_default();
            return Ok(match self.store.local_file(&key) {
                Some(path) => Route::DestFile(path),
                None => Route::Remote {
                    key,
                    size: entry.size,
                },
            });
        }
        if entry.state == State::Pending {
            self.copy_on_read.queue(&entry.path);
        }
        Ok(Route::Source)
    }

    fn open_local(&self, file: File, reply: ReplyOpen) {
        let fh = self.new_handle();
        if self.passthrough.load(Ordering::Relaxed) {
            match reply.open_backing(&file) {
                Ok(backing) => {
                    self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                    lock(&self.handles).insert(
                        fh,
                        Arc::new(OpenFile::Passthrough {
                            _backing: backing,
                            file,
                        }),
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "passthrough refused; the daemon serves reads itself from now on");
                    self.passthrough.store(false, Ordering::Relaxed);
                }
            }
        }
        lock(&self.handles).insert(fh, Arc::new(OpenFile::Local(file)));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn open_source(&self, rel: &Path) -> io::Result<File> {
        self.ns.source().open_at(rel, libc::O_RDONLY)
    }

    fn reply_entry(&self, path: &Path, reply: ReplyEntry) {
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
        if is_bad_name(name) {
            return reply.error(Errno::ENOENT);
        }
        match self.path(parent) {
            Ok(dir) => self.reply_entry(&child_path(&dir, name), reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|p| self.attr_of(&p)) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
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
        // default_permissions: the kernel checks modes itself; this only says it exists.
        match self.path(ino).and_then(|p| self.attr_of(&p)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
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
        match self.listing(ino) {
            Ok(listing) => {
                let fh = self.new_handle();
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
        lock(&self.listings).remove(&fh.0);
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let rel = match self.path(ino) {
            Ok(rel) => rel,
            Err(e) => return reply.error(e),
        };
        let _span = tracing::debug_span!("open", path = %rel.display()).entered();
        let route = match self.route(&rel) {
            Ok(route) => route,
            Err(e) => return reply.error(e),
        };
        match route {
            Route::DestFile(path) => match File::open(&path) {
                Ok(file) => {
                    self.stats.opens_dest.fetch_add(1, Ordering::Relaxed);
                    return self.open_local(file, reply);
                }
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "dest copy unreadable; serving the local copy")
                }
            },
            Route::Remote { key, size } => {
                self.stats.opens_dest.fetch_add(1, Ordering::Relaxed);
                let file =
                    RemoteFile::new(self.store.clone(), key, size, self.prefetch_budget.clone());
                let fh = self.new_handle();
                lock(&self.handles).insert(
                    fh,
                    Arc::new(OpenFile::Remote {
                        file: Arc::new(file),
                        rel: rel.to_path_buf(),
                    }),
                );
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Route::Source => {}
        }
        match self.open_source(&rel) {
            Ok(file) => {
                self.stats.opens_local.fetch_add(1, Ordering::Relaxed);
                self.open_local(file, reply)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                tracing::error!(path = %rel.display(), "neither the dest nor a local copy can serve this file");
                reply.error(Errno::EIO)
            }
            Err(e) => reply.error(Errno::from(e)),
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
        self.stats.read_requests.fetch_add(1, Ordering::Relaxed);
        let Some(handle) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match &*handle {
            OpenFile::Passthrough { file, .. } | OpenFile::Local(file) => {
                match read_at(file, offset, size) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(Errno::from(e)),
                }
            }
            OpenFile::Remote { file, rel } => {
                let (file, rel) = (file.clone(), rel.clone());
                let source = self.ns.source().clone();
                let health = self.dest_health.clone();
                let stats = self.stats.clone();
                self.rt.spawn(async move {
                    match file.read(offset, size as u64).await {
                        Ok(data) => {
                            health.mark_up();
                            stats.bytes_dest.fetch_add(data.len() as u64, Ordering::Relaxed);
                            reply.data(&data)
                        }
                        Err(e) => {
                            health.mark_down(&e.to_string());
                            let local = tokio::task::spawn_blocking(move || {
                                source
                                    .open_at(&rel, libc::O_RDONLY)
                                    .and_then(|file| read_at(&file, offset, size))
                                    .map_err(|le| (rel, le))
                            })
                            .await;
                            match local {
                                Ok(Ok(data)) => {
                                    stats.fallback_reads.fetch_add(1, Ordering::Relaxed);
                                    reply.data(&data)
                                }
                                Ok(Err((rel, le))) => {
                                    tracing::error!(path = %rel.display(), dest_error = %e, local_error = %le, "read failed at the dest and there is no local copy");
                                    reply.error(Errno::EIO)
                                }
                                Err(_) => reply.error(Errno::EIO),
                            }
                        }
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
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
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
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }
}
