//! A replica mount (issue 7.3): the migration served on a machine without the local tree.
//!
//! The namespace is the manifest's rows (files, directories, links), the data the dest's
//! verified copies, reached through the `Store` like every mount. A file not copied yet is
//! requested from the nodes that have the source (`Manifest::request_copy`); its open waits on
//! the async runtime, never on a FUSE thread, until the file is verified or `wait` runs out
//! (EIO). Nothing can be changed here: the mount is read-only (EROFS), since the local tree
//! that every change must reach first is on another machine.
//!
//! What it knows of the manifest is at most `row_ttl` old (plus the kernel's `ttl`): the bound
//! on how late changes made on other nodes show here (docs/multi-node.md).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::sync::{OnceCell, Semaphore};

use super::fs::{reply_opened, share};
use super::inodes::Inodes;
use super::namespace::{attr_from_entry, child_path, is_bad_name, ENTRY_CACHE_ROWS};
use super::open::{Handle, Mode, Open, OpenFiles};
use super::prefetch::{prefetch_budget, RemoteFile};
use super::{start_session, Mounted, ReadStats, SessionSettings};
use crate::manifest::{Entry, Kind, Manifest, RequestOutcome, State};
use crate::metrics::{RequestTimes, Timer};
use crate::store::Store;

/// How a replica mount looks and behaves.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub mountpoint: PathBuf,
    pub fsname: String,
    /// Kernel entry and attribute cache lifetime.
    pub ttl: Duration,
    /// How long a manifest row is trusted before it is read again.
    pub row_ttl: Duration,
    pub threads: usize,
    pub prefetch_memory: u64,
    /// How long an open waits for a requested file to be copied.
    pub wait: Duration,
    /// Attributes of the root directory (the mountpoint's own).
    pub root: FileAttr,
}

/// How often a waiting open looks at its file's row again.
const WAIT_POLL: Duration = Duration::from_millis(100);

type Listing = Vec<(u64, PathBuf, FileAttr)>;
type Waited = Result<Arc<Entry>, Errno>;

struct Replica {
    manifest: Manifest,
    store: Arc<dyn Store>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    wait: Duration,
    root: FileAttr,
    rows: Option<moka::sync::Cache<String, Option<Arc<Entry>>>>,
    inodes: Inodes,
    files: OpenFiles,
    passthrough: AtomicBool,
    prefetch: Arc<Semaphore>,
    stats: Arc<ReadStats>,
    requests: RequestTimes,
    ready: Mutex<Option<std::sync::mpsc::Sender<bool>>>,
    /// Opens waiting for a file to be copied, one wait per path however many opens share it.
    waits: Mutex<HashMap<String, Arc<OnceCell<Waited>>>>,
    /// The content (SHA-256) each inode was last opened with: the kernel may keep its cached
    /// pages only for the same content.
    opened_content: Mutex<HashMap<u64, String>>,
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    next_listing: AtomicU64,
}

pub struct ReplicaFs(Arc<Replica>);

/// Mounts a replica; returns once the mount is live.
pub fn mount_replica(
    manifest: Manifest,
    store: Arc<dyn Store>,
    settings: &ReplicaSettings,
    metrics: &crate::metrics::Metrics,
) -> Result<Mounted> {
    let stats = metrics.served.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rows = (!settings.row_ttl.is_zero()).then(|| {
        moka::sync::Cache::builder()
            .max_capacity(ENTRY_CACHE_ROWS)
            .time_to_live(settings.row_ttl)
            .build()
    });
    let replica = Replica {
        manifest,
        store,
        rt: tokio::runtime::Handle::current(),
        ttl: settings.ttl,
        wait: settings.wait,
        root: settings.root,
        rows,
        inodes: Inodes::new(),
        files: OpenFiles::new(),
        passthrough: AtomicBool::new(false),
        prefetch: prefetch_budget(settings.prefetch_memory),
        stats: stats.clone(),
        requests: metrics.fuse_requests.clone(),
        ready: Mutex::new(Some(ready_tx)),
        waits: Mutex::new(HashMap::new()),
        opened_content: Mutex::new(HashMap::new()),
        listings: Mutex::new(HashMap::new()),
        next_listing: AtomicU64::new(1),
    };
    let session = SessionSettings {
        mountpoint: &settings.mountpoint,
        fsname: &settings.fsname,
        threads: settings.threads,
        read_only: true,
    };
    start_session(ReplicaFs(Arc::new(replica)), &session, ready_rx, stats)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Part of the tree a replica shows: everything the source still has (copied or not) and
/// directories, not what was removed or vanished.
fn shown(entry: &Entry) -> bool {
    !matches!(entry.state, State::Deleted | State::Missing)
}

impl Replica {
    fn path(&self, ino: INodeNo) -> Result<Arc<Path>, Errno> {
        self.inodes.path(ino.0).ok_or(Errno::ENOENT)
    }

    /// The row of a path, from the cache while it is fresh.
    fn entry(&self, rel: &Path) -> Result<Option<Arc<Entry>>, Errno> {
        let Some(text) = rel.to_str() else {
            return Ok(None);
        };
        if let Some(cached) = self.rows.as_ref().and_then(|rows| rows.get(text)) {
            return Ok(cached);
        }
        if self.manifest.reachability().is_down() {
            return Err(Errno::EIO);
        }
        let manifest = &self.manifest;
        let row = self
            .rt
            .block_on(async { manifest.note(manifest.entry(text).await) })
            .map_err(|e| manifest_error(text, &e))?
            .map(Arc::new);
        self.remember(text, row.clone());
        Ok(row)
    }

    fn remember(&self, path: &str, row: Option<Arc<Entry>>) {
        if let Some(rows) = &self.rows {
            rows.insert(path.to_string(), row);
        }
    }

    fn forget(&self, path: &str) {
        if let Some(rows) = &self.rows {
            rows.invalidate(path);
        }
    }

    fn attr(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let mut attr = if rel.as_os_str().is_empty() {
            self.root
        } else {
            match self.entry(rel)? {
                Some(entry) if shown(&entry) => attr_from_entry(&entry),
                _ => return Err(Errno::ENOENT),
            }
        };
        attr.ino = INodeNo(self.inodes.number(rel));
        Ok(attr)
    }

    fn listing(&self, ino: INodeNo) -> Result<Arc<Listing>, Errno> {
        let dir = self.path(ino)?;
        let Some(text) = dir.to_str() else {
            return Err(Errno::ENOENT);
        };
        if self.manifest.reachability().is_down() {
            return Err(Errno::EIO);
        }
        let manifest = &self.manifest;
        let rows = self
            .rt
            .block_on(async { manifest.note(manifest.children(text).await) })
            .map_err(|e| manifest_error(text, &e))?;
        let mut listing = Vec::with_capacity(rows.len());
        for row in rows {
            let path = PathBuf::from(&row.path);
            if shown(&row) {
                let mut attr = attr_from_entry(&row);
                let ino = self.inodes.number(&path);
                attr.ino = INodeNo(ino);
                listing.push((ino, path, attr));
            }
            let text = row.path.clone();
            self.remember(&text, Some(Arc::new(row)));
        }
        Ok(Arc::new(listing))
    }

    /// Opens a verified file's dest copy and answers the kernel. A `file://` copy whose size is
    /// not the row's was replaced since the row was read (cached, or read during a rewrite): the
    /// row is read again (`fresh`: it was just read; then they disagree for real).
    fn open_verified(
        self: &Arc<Self>,
        ino: u64,
        entry: &Entry,
        reply: ReplyOpen,
        fresh: bool,
        timer: Timer,
    ) {
        let key = entry.dest_key.clone().unwrap_or_default();
        let same_content = {
            let mut opened = lock(&self.opened_content);
            let sha = entry.sha256.clone().unwrap_or_default();
            opened
                .insert(ino, sha.clone())
                .is_some_and(|was| was == sha && !sha.is_empty())
        };
        let opened = match self.store.open_local_file(&key) {
            Some(opened) => match opened {
                Ok(file) if file.metadata().is_ok_and(|m| m.len() != entry.size) => {
                    self.forget(&entry.path);
                    if fresh {
                        tracing::error!(path = %entry.path, "the dest copy does not have the size the manifest records; not served");
                        return reply.error(Errno::EIO);
                    }
                    return self.open_when_copied(ino, entry.path.clone(), reply, timer);
                }
                Ok(file) => {
                    let passthrough = self.passthrough.load(Ordering::Relaxed);
                    self.files.open(ino, |mode, _fh| {
                        Ok(match mode {
                            Some(mode @ Mode::Passthrough { .. }) => share(ino, mode, false),
                            None if passthrough => self.first_passthrough(ino, file, &reply),
                            _ => daemon_served(ino, Handle::Local(file)),
                        })
                    })
                }
                Err(e) => {
                    // Replaced or removed since the row was read: the next open reads it again.
                    self.forget(&entry.path);
                    tracing::warn!(path = %entry.path, error = %e, "dest copy unreadable");
                    return reply.error(Errno::EIO);
                }
            },
            None => {
                let file =
                    RemoteFile::new(self.store.clone(), key, entry.size, self.prefetch.clone());
                // No local copy here to answer instead: reads wait for the dest.
                let handle = Handle::Remote {
                    file: Arc::new(file),
                    rel: PathBuf::from(&entry.path),
                    deadline: None,
                };
                self.files.open(ino, |_, _| Ok(daemon_served(ino, handle)))
            }
        };
        match opened {
            Ok((fh, backing)) => {
                self.stats.opens_dest.inc();
                let flags = if same_content {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply_opened(reply, fh, backing, flags)
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    /// Answers the open once `path` is verified, from a task: no FUSE thread waits.
    fn open_when_copied(self: &Arc<Self>, ino: u64, path: String, reply: ReplyOpen, timer: Timer) {
        let replica = self.clone();
        self.rt.spawn(async move {
            match replica.copied(path).await {
                Ok(entry) => {
                    let _ = tokio::task::spawn_blocking(move || {
                        replica.open_verified(ino, &entry, reply, true, timer)
                    })
                    .await;
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn first_passthrough(
        &self,
        ino: u64,
        file: File,
        reply: &ReplyOpen,
    ) -> (Open, Mode, Option<Arc<fuser::BackingId>>) {
        match reply.open_backing(&file) {
            Ok(backing) => {
                self.stats.passthrough_opens.inc();
                let mode = Mode::Passthrough {
                    backing: Arc::new(backing),
                    file: Arc::new(file),
                    local: false,
                };
                share(ino, &mode, false)
            }
            Err(e) => {
                tracing::warn!(error = %e, "passthrough refused; the daemon serves reads itself from now on");
                self.passthrough.store(false, Ordering::Relaxed);
                daemon_served(ino, Handle::Local(file))
            }
        }
    }

    /// Waits until `path` is verified at the dest, asking nodes with the source to copy it;
    /// opens of the same path share one wait.
    async fn copied(self: &Arc<Self>, path: String) -> Waited {
        let cell = lock(&self.waits)
            .entry(path.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let outcome = cell
            .get_or_init(|| async {
                let outcome = self.wait_for_copy(&path).await;
                lock(&self.waits).remove(&path);
                outcome
            })
            .await
            .clone();
        outcome
    }

    async fn wait_for_copy(&self, path: &str) -> Waited {
        let started = Instant::now();
        let mut requested = false;
        let mut last_state = None;
        loop {
            match self.manifest.note(self.manifest.entry(path).await) {
                Ok(None) => return Err(Errno::ENOENT),
                Ok(Some(entry)) => {
                    let entry = Arc::new(entry);
                    self.remember(path, Some(entry.clone()));
                    if entry.in_dest() {
                        if requested {
                            tracing::info!(
                                path,
                                waited_ms = started.elapsed().as_millis() as u64,
                                "requested file copied"
                            );
                        }
                        return Ok(entry);
                    }
                    last_state = Some(entry.state);
                    match entry.state {
                        State::Deleted | State::Missing => return Err(Errno::ENOENT),
                        State::Conflict | State::Unsupported => {
                            tracing::error!(path, state = %entry.state, "cannot serve this file: it cannot be migrated (see `cutoverfs status`)");
                            return Err(Errno::EIO);
                        }
                        State::Pending | State::Failed => {
                            match self.manifest.note(self.manifest.request_copy(path).await) {
                                Ok(RequestOutcome::Requested) if !requested => {
                                    requested = true;
                                    tracing::info!(path, state = %entry.state, "not migrated yet: copy requested from a node with the source");
                                }
                                Ok(RequestOutcome::Held(why)) => {
                                    tracing::error!(path, "cannot serve this file: {why}");
                                    return Err(Errno::EIO);
                                }
                                Ok(_) => {}
                                Err(e) if e.is_unreachable() => {}
                                Err(e) => {
                                    tracing::error!(path, error = %e, "cannot request a copy");
                                    return Err(Errno::EIO);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                // Waited out like a slow copy: PostgreSQL may be back before the deadline.
                Err(e) if e.is_unreachable() => {}
                Err(e) => return Err(manifest_error(path, &e)),
            }
            let left = self.wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                let state = last_state.map_or("unknown (manifest unreachable)".to_string(), |s| {
                    s.to_string()
                });
                tracing::error!(
                    path,
                    state,
                    waited = %humantime::format_duration(self.wait),
                    "no node with the source copied this file in time (is a mount daemon or a sweep running where the source is?); EIO"
                );
                return Err(Errno::EIO);
            }
            tokio::time::sleep(left.min(WAIT_POLL)).await;
        }
    }
}

fn read_local(file: &File, offset: u64, size: u32, reply: ReplyData) {
    match crate::util::read_full_at(file, offset, size as usize) {
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(Errno::from(e)),
    }
}

fn daemon_served(ino: u64, handle: Handle) -> (Open, Mode, Option<Arc<fuser::BackingId>>) {
    let open = Open {
        ino,
        handle,
        writable: false,
    };
    (open, Mode::Daemon, None)
}

fn manifest_error(path: &str, e: &crate::manifest::ManifestError) -> Errno {
    if e.is_unreachable() {
        tracing::debug!(path, error = %e, "manifest unreachable");
    } else {
        tracing::error!(path, error = %e, "manifest lookup failed");
    }
    Errno::EIO
}

impl ReplicaFs {
    /// `timer` times the open until its reply, which may come from a task that waited.
    fn open_file(&self, ino: INodeNo, rel: Arc<Path>, reply: ReplyOpen, timer: Timer) {
        let entry = match self.0.entry(&rel) {
            Ok(Some(entry)) if shown(&entry) => entry,
            Ok(_) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(e),
        };
        if entry.in_dest() {
            return self.0.open_verified(ino.0, &entry, reply, false, timer);
        }
        if entry.kind != Kind::File {
            return reply.error(Errno::EIO);
        }
        // Not copied yet (or the cached row says so).
        self.0
            .open_when_copied(ino.0, entry.path.clone(), reply, timer);
    }
}

impl Filesystem for ReplicaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_PARALLEL_DIROPS;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::debug!(?missing, "kernel lacks some optional FUSE features");
        }
        let _ = config.set_max_readahead(1 << 20);
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.0.passthrough.store(passthrough, Ordering::Relaxed);
        if let Some(ready) = lock(&self.0.ready).take() {
            let _ = ready.send(true);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.0.requests.start("lookup");
        if is_bad_name(name) {
            return reply.error(Errno::ENOENT);
        }
        match self
            .0
            .path(parent)
            .and_then(|dir| self.0.attr(&child_path(&dir, name)))
        {
            Ok(attr) => reply.entry(&self.0.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.0.requests.start("getattr");
        match self.0.path(ino).and_then(|p| self.0.attr(&p)) {
            Ok(attr) => reply.attr(&self.0.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.0.requests.start("readlink");
        let target = self.0.path(ino).and_then(|p| match self.0.entry(&p)? {
            Some(entry) if entry.kind == Kind::Symlink && shown(&entry) => {
                entry.link_target.clone().ok_or(Errno::EIO)
            }
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        });
        match target {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = self.0.requests.start("access");
        match self.0.path(ino).and_then(|p| self.0.attr(&p)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.0.requests.start("opendir");
        match self.0.listing(ino) {
            Ok(listing) => {
                let fh = self.0.next_listing.fetch_add(1, Ordering::Relaxed);
                lock(&self.0.listings).insert(fh, listing);
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
        let _timer = self.0.requests.start("readdir");
        let Some(listing) = lock(&self.0.listings).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, path, attr)) in listing.iter().enumerate().skip(offset as usize) {
            let name = path.file_name().unwrap_or_default();
            if reply.add(INodeNo(*ino), (i + 1) as u64, attr.kind, name) {
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
        let _timer = self.0.requests.start("readdirplus");
        let Some(listing) = lock(&self.0.listings).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, path, attr)) in listing.iter().enumerate().skip(offset as usize) {
            let name = path.file_name().unwrap_or_default();
            if reply.add(
                INodeNo(*ino),
                (i + 1) as u64,
                name,
                &self.0.ttl,
                attr,
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
        let _timer = self.0.requests.start("releasedir");
        lock(&self.0.listings).remove(&fh.0);
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let timer = self.0.requests.start("open");
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.0.path(ino) {
            Ok(rel) => {
                let _span = tracing::debug_span!("open", path = %rel.display()).entered();
                self.open_file(ino, rel, reply, timer)
            }
            Err(e) => reply.error(e),
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
        let timer = self.0.requests.start("read");
        self.0.stats.read_requests.inc();
        let Some(open) = self.0.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        match &open.handle {
            Handle::Passthrough { file } => read_local(file, offset, size, reply),
            Handle::Local(file) => read_local(file, offset, size, reply),
            Handle::Remote { file, rel, .. } => {
                let (file, rel) = (file.clone(), rel.clone());
                let replica = self.0.clone();
                self.0.rt.spawn(async move {
                    let _timer = timer;
                    match file.read(offset, size as u64).await {
                        Ok(data) => {
                            replica.stats.bytes_dest.inc_by(data.len() as u64);
                            reply.data(&data)
                        }
                        Err(e) => {
                            if e.is_not_found() {
                                // Rewritten, removed or rolled back since it was opened.
                                replica.forget(&rel.to_string_lossy());
                            }
                            tracing::error!(path = %rel.display(), error = %e, "read failed at the dest");
                            reply.error(Errno::EIO)
                        }
                    }
                });
            }
        }
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
        let _timer = self.0.requests.start("release");
        self.0.files.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.requests.start("flush");
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        let _timer = self.0.requests.start("getxattr");
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        let _timer = self.0.requests.start("listxattr");
        reply.error(Errno::ENOSYS);
    }

    // Every change is refused: the mount is read-only (the kernel already answers EROFS for a
    // `ro` mount; these hold should a request get through).

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timer = self.0.requests.start("write");
        reply.error(Errno::EROFS)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let _timer = self.0.requests.start("create");
        reply.error(Errno::EROFS)
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.requests.start("mknod");
        reply.error(Errno::EROFS)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.requests.start("mkdir");
        reply.error(Errno::EROFS)
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.requests.start("symlink");
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.requests.start("unlink");
        reply.error(Errno::EROFS)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.requests.start("rmdir");
        reply.error(Errno::EROFS)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.requests.start("rename");
        reply.error(Errno::EROFS)
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.requests.start("link");
        reply.error(Errno::EROFS)
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timer = self.0.requests.start("setattr");
        reply.error(Errno::EROFS)
    }

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
        let _timer = self.0.requests.start("setxattr");
        reply.error(Errno::EROFS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.requests.start("removexattr");
        reply.error(Errno::EROFS)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.requests.start("fallocate");
        reply.error(Errno::EROFS)
    }
}

/// The root's attributes: the mountpoint's own, as a directory.
pub fn root_attr(meta: &std::fs::Metadata) -> FileAttr {
    use std::os::unix::fs::MetadataExt;
    let time = |secs: i64, nsec: i64| {
        std::time::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsec.clamp(0, 999_999_999) as u32)
    };
    FileAttr {
        ino: INodeNo(super::inodes::ROOT),
        size: 0,
        blocks: 0,
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: time(meta.ctime(), meta.ctime_nsec()),
        kind: FileType::Directory,
        perm: (meta.mode() & 0o7777) as u16,
        nlink: 2,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}
