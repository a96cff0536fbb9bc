//! The thin FUSE adapter: turns the kernel's requests into calls to the core (`core.rs`,
//! `open.rs`, `writes.rs`) and their results into replies. Here only: timing every request to
//! its reply, a span per request, choosing the thread a handler runs on, and the kernel
//! settings of the session. No file system logic lives here, and nothing here reads the
//! manifest or the dest.
//!
//! A handler that may wait — on the network (a PostgreSQL manifest, a remote dest for a
//! copy-up), on another open (a writer waiting for readers of a dest copy), on a copy a replica
//! asked for — runs on the runtime's blocking threads and replies from there; remote reads run
//! on the async runtime. The FUSE threads never wait for any of it.
//!
//! Requests per operation this layer asks of the kernel (docs/SEMANTICS.md, "Round trips"): no
//! OPENDIR/RELEASEDIR (ENOSYS once: the kernel then caches directory listings itself), no FLUSH
//! (FOPEN_NOFLUSH and ENOSYS), READDIRPLUS carrying every attribute.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::core::{Core, Invalidate};
use super::namespace::Found;
use super::open::{Backing, OpenPlan, Opened, Read};
use super::writes::{AttrChange, Caller, NewTime};
use crate::metrics::{RequestTimes, Timer};

/// Every open answered here carries these: no FLUSH at close (nothing is done there).
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The file system as the kernel sees it.
pub struct Adapter {
    core: Arc<Core>,
    times: OpTimes,
    ready: Mutex<Option<std::sync::mpsc::Sender<bool>>>,
}

/// One latency histogram per operation, looked up once (no shared map on the request path).
struct OpTimes {
    by_op: HashMap<&'static str, crate::metrics::OpTimer>,
    times: RequestTimes,
}

const OPS: &[&str] = &[
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "fallocate",
    "forget",
];

impl OpTimes {
    fn new(times: RequestTimes) -> OpTimes {
        let by_op = OPS.iter().map(|op| (*op, times.of(op))).collect();
        OpTimes { by_op, times }
    }

    fn start(&self, op: &'static str) -> Timer {
        match self.by_op.get(op) {
            Some(timer) => timer.start(),
            None => self.times.start(op),
        }
    }
}

impl Adapter {
    pub fn new(
        core: Arc<Core>,
        times: RequestTimes,
        ready: std::sync::mpsc::Sender<bool>,
    ) -> Adapter {
        Adapter {
            core,
            times: OpTimes::new(times),
            ready: Mutex::new(Some(ready)),
        }
    }

    /// Runs `work` here, or on a blocking thread when `elsewhere`, and hands its result to
    /// `reply` on the same thread.
    fn run<T: 'static>(
        &self,
        elsewhere: bool,
        work: impl FnOnce(&Arc<Core>) -> T + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) {
        if elsewhere {
            let core = self.core.clone();
            self.core.rt.spawn_blocking(move || reply(work(&core)));
        } else {
            reply(work(&self.core));
        }
    }

    /// Whether handlers that read the manifest leave the FUSE threads.
    fn namespace_elsewhere(&self) -> bool {
        self.core.manifest_is_remote()
    }

    /// Whether handlers that change things leave the FUSE threads.
    fn changes_elsewhere(&self) -> bool {
        self.core.writes_may_wait()
    }

    fn entry_reply(&self) -> impl FnOnce(ReplyEntry, Result<Found, Errno>) + Send + 'static {
        let ttl = self.core.ttls;
        move |reply: ReplyEntry, found: Result<Found, Errno>| match found {
            Ok(found) => reply.entry_with_ttls(
                &found.attr_ttl.unwrap_or(ttl.attr),
                &ttl.entry,
                &found.attr,
                Generation(0),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn attr_reply(&self) -> impl FnOnce(ReplyAttr, Result<Found, Errno>) + Send + 'static {
        let ttl = self.core.ttls;
        move |reply: ReplyAttr, found: Result<Found, Errno>| match found {
            Ok(found) => reply.attr(&found.attr_ttl.unwrap_or(ttl.attr), &found.attr),
            Err(e) => reply.error(e),
        }
    }
}

fn empty_reply(reply: ReplyEmpty, done: Result<(), Errno>) {
    match done {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn new_time(time: Option<TimeOrNow>) -> Option<NewTime> {
    time.map(|t| match t {
        TimeOrNow::Now => NewTime::Now,
        TimeOrNow::SpecificTime(at) => NewTime::At(at),
    })
}

impl Backing for ReplyOpen {
    fn open_backing(&self, file: &File) -> io::Result<BackingId> {
        ReplyOpen::open_backing(self, file)
    }
}

impl Backing for ReplyCreate {
    fn open_backing(&self, file: &File) -> io::Result<BackingId> {
        ReplyCreate::open_backing(self, file)
    }
}

fn reply_opened(reply: ReplyOpen, opened: Result<Opened, Errno>) {
    match opened {
        // The kernel refuses page-cache flags (FOPEN_KEEP_CACHE) on a passthrough open (EIO):
        // its pages are the backing file's.
        Ok(Opened {
            fh,
            backing: Some(backing),
            ..
        }) => reply.opened_passthrough(FileHandle(fh), OPEN_FLAGS, &backing),
        Ok(Opened { fh, flags, .. }) => reply.opened(FileHandle(fh), flags | OPEN_FLAGS),
        Err(e) => reply.error(e),
    }
}

/// The kernel's cache, told to drop what it knows of an inode through the session's notifier.
pub struct Notifier(pub fuser::Notifier);

impl Invalidate for Notifier {
    fn inode(&self, ino: u64) {
        if let Err(e) = self.0.inval_inode(INodeNo(ino), 0, 0) {
            tracing::debug!(error = %e, "cannot invalidate a cached inode");
        }
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // READDIRPLUS always (no _AUTO): a listing carries every attribute, so a walk needs no
        // LOOKUP per file.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_PARALLEL_DIROPS;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::debug!(?missing, "kernel lacks some optional FUSE features");
        }
        let _ = config.set_max_readahead(1 << 20);
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.core.passthrough.store(passthrough, Ordering::Relaxed);
        if passthrough {
            tracing::info!("FUSE passthrough on: local files are read by the kernel directly");
        } else {
            tracing::info!("FUSE passthrough unavailable: the daemon serves local reads itself");
        }
        if let Some(ready) = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = ready.send(true);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let timer = self.times.start("lookup");
        let name = name.to_os_string();
        let answer = self.entry_reply();
        self.run(
            self.namespace_elsewhere(),
            move |core| core.lookup(parent.0, &name),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _timer = self.times.start("forget");
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let timer = self.times.start("getattr");
        let answer = self.attr_reply();
        self.run(
            self.namespace_elsewhere(),
            move |core| core.getattr(ino.0, fh.map(|fh| fh.0)),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let timer = self.times.start("readlink");
        self.run(
            self.namespace_elsewhere(),
            move |core| core.readlink(ino.0),
            move |target| {
                use std::os::unix::ffi::OsStrExt;
                match target {
                    Ok(target) => reply.data(target.as_bytes()),
                    Err(e) => reply.error(e),
                }
                drop(timer);
            },
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let timer = self.times.start("access");
        self.run(
            self.namespace_elsewhere(),
            move |core| core.access(ino.0),
            move |done| {
                empty_reply(reply, done);
                drop(timer);
            },
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.times.start("statfs");
        match self.core.statfs() {
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
            Err(e) => reply.error(e),
        }
    }

    /// ENOSYS: the kernel stops asking (no OPENDIR or RELEASEDIR again for the life of the
    /// mount) and caches every directory's listing itself; readdir gets no handle and answers
    /// from the offset alone (`Core::listing`).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.times.start("opendir");
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let timer = self.times.start("readdir");
        self.run(
            self.namespace_elsewhere(),
            move |core| core.listing(ino.0, offset),
            move |listing| {
                match listing {
                    Ok(listing) => {
                        for (at, item) in Core::entries_after(&listing, offset) {
                            if reply.add(item.found.attr.ino, *at, item.found.attr.kind, &item.name)
                            {
                                break;
                            }
                        }
                        reply.ok();
                    }
                    Err(e) => reply.error(e),
                }
                drop(timer);
            },
        );
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let timer = self.times.start("readdirplus");
        let ttls = self.core.ttls;
        self.run(
            self.namespace_elsewhere(),
            move |core| core.listing(ino.0, offset).map(|l| (core.clone(), l)),
            move |listing| {
                match listing {
                    Ok((core, listing)) => {
                        for (at, item) in Core::entries_after(&listing, offset) {
                            let found = &core.served(ino.0, item);
                            // One TTL for both here: a file with several names is asked again.
                            let ttl = found.attr_ttl.unwrap_or(ttls.attr).min(ttls.entry);
                            let full = reply.add(
                                found.attr.ino,
                                *at,
                                &item.name,
                                &ttl,
                                &found.attr,
                                Generation(0),
                            );
                            if full {
                                break;
                            }
                            core.listed(found);
                        }
                        reply.ok();
                    }
                    Err(e) => reply.error(e),
                }
                drop(timer);
            },
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Timed to the reply, also when it is sent from another thread.
        let timer = self.times.start("open");
        match self.core.open_plan(ino.0, flags.0) {
            OpenPlan::Here => {
                let opened = self.core.open(ino.0, flags.0, &reply, false);
                reply_opened(reply, opened);
            }
            OpenPlan::Elsewhere { counted_writer } => {
                let core = self.core.clone();
                self.core.rt.spawn_blocking(move || {
                    let _timer = timer;
                    let opened = core.open(ino.0, flags.0, &reply, counted_writer);
                    reply_opened(reply, opened);
                });
            }
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
        let timer = self.times.start("read");
        match self.core.read(fh.0, offset, size) {
            Read::Now(Ok(data)) => reply.data(&data),
            Read::Now(Err(e)) => reply.error(e),
            Read::Later(read) => {
                self.core.rt.spawn(async move {
                    let _timer = timer;
                    match read.await {
                        Ok(data) => reply.data(&data),
                        Err(e) => reply.error(e),
                    }
                });
            }
        }
    }

    /// Not needed: FOPEN_NOFLUSH on every open, and ENOSYS makes the kernel stop asking.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = self.times.start("flush");
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
        let timer = self.times.start("release");
        self.run(
            self.namespace_elsewhere(),
            move |core| core.release(fh.0),
            move |()| {
                reply.ok();
                drop(timer);
            },
        );
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
        let _timer = self.times.start("write");
        match self.core.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
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
        let _timer = self.times.start("fsync");
        empty_reply(reply, self.core.fsync(fh.0, datasync));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.times.start("fsyncdir");
        empty_reply(reply, self.core.fsyncdir(ino.0));
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
        let _timer = self.times.start("fallocate");
        empty_reply(reply, self.core.fallocate(fh.0, offset, length, mode));
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
        let timer = self.times.start("create");
        let (name, caller, ttls) = (name.to_os_string(), caller(req), self.core.ttls);
        let core = self.core.clone();
        let work = move || {
            let _timer = timer;
            match core.create(parent.0, &name, mode & !umask, flags, caller, &reply) {
                Ok((found, opened)) => {
                    let attr_ttl = found.attr_ttl.unwrap_or(ttls.attr);
                    let flags = opened.flags | OPEN_FLAGS;
                    match opened.backing {
                        Some(backing) => reply.created_passthrough(
                            &attr_ttl,
                            &found.attr,
                            Generation(0),
                            FileHandle(opened.fh),
                            flags,
                            &backing,
                        ),
                        None => reply.created(
                            &attr_ttl,
                            &found.attr,
                            Generation(0),
                            FileHandle(opened.fh),
                            flags,
                        ),
                    }
                }
                Err(e) => reply.error(e),
            }
        };
        if self.changes_elsewhere() {
            self.core.rt.spawn_blocking(work);
        } else {
            work();
        }
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
        let timer = self.times.start("mknod");
        let (name, caller, answer) = (name.to_os_string(), caller(req), self.entry_reply());
        self.run(
            self.changes_elsewhere(),
            move |core| core.mknod(parent.0, &name, mode & !umask, rdev, caller),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
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
        let timer = self.times.start("mkdir");
        let (name, caller, answer) = (name.to_os_string(), caller(req), self.entry_reply());
        self.run(
            self.changes_elsewhere(),
            move |core| core.mkdir(parent.0, &name, mode & !umask, caller),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let timer = self.times.start("symlink");
        let (name, target, caller) = (link_name.to_os_string(), target.to_path_buf(), caller(req));
        let answer = self.entry_reply();
        self.run(
            self.changes_elsewhere(),
            move |core| core.symlink(parent.0, &name, &target, caller),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let timer = self.times.start("link");
        let (name, answer) = (newname.to_os_string(), self.entry_reply());
        self.run(
            self.changes_elsewhere(),
            move |core| core.link(ino.0, newparent.0, &name),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let timer = self.times.start("unlink");
        let name = name.to_os_string();
        self.run(
            self.changes_elsewhere(),
            move |core| core.unlink(parent.0, &name),
            move |done| {
                empty_reply(reply, done);
                drop(timer);
            },
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let timer = self.times.start("rmdir");
        let name = name.to_os_string();
        self.run(
            self.changes_elsewhere(),
            move |core| core.rmdir(parent.0, &name),
            move |done| {
                empty_reply(reply, done);
                drop(timer);
            },
        );
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
        let timer = self.times.start("rename");
        let (name, newname) = (name.to_os_string(), newname.to_os_string());
        self.run(
            self.changes_elsewhere(),
            move |core| core.rename(parent.0, &name, newparent.0, &newname, flags),
            move |done| {
                empty_reply(reply, done);
                drop(timer);
            },
        );
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
        let timer = self.times.start("setattr");
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime: new_time(atime),
            mtime: new_time(mtime),
        };
        let answer = self.attr_reply();
        self.run(
            self.changes_elsewhere(),
            move |core| core.setattr(ino.0, &change, fh.map(|fh| fh.0)),
            move |found| {
                answer(reply, found);
                drop(timer);
            },
        );
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
        let _timer = self.times.start("getxattr");
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        let _timer = self.times.start("listxattr");
        reply.error(Errno::ENOSYS);
    }

    /// Extended attributes are not migrated; setting one is refused as unsupported (EROFS on
    /// a replica, which changes nothing).
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
        let _timer = self.times.start("setxattr");
        reply.error(self.refusal());
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.times.start("removexattr");
        reply.error(self.refusal());
    }
}

impl Adapter {
    fn refusal(&self) -> Errno {
        if self.core.writes.is_some() {
            Errno::EOPNOTSUPP
        } else {
            Errno::EROFS
        }
    }
}
