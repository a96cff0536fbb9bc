//! The mount's semantics checked in-process, without FUSE (issue 15.6): a property test drives
//! the core the way the kernel would (lookups along a path, then the operation, then release)
//! and does the same to a plain directory, the reference, after every step comparing each
//! operation's outcome (success, the bytes read or the errno) and the whole tree (names, kinds,
//! sizes, modes, link counts, content). The sweeper and `purge` run in-process between steps,
//! so files move from the local copy to the dest and back underneath.
//!
//! No root, no kernel, no mount: it runs in seconds on any machine. The kernel's own part
//! (permission checks, the page cache, passthrough) is left to the FUSE model test,
//! `tests/mount_model.rs`, which runs the same kinds of operations through a real mount.
//!
//! Knobs: `PROPTEST_CASES` (default 48), `CUTOVERFS_CORE_MODEL_OPS` (operations per case, 30).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileType, RenameFlags};
use proptest::prelude::*;

use super::core::{Core, Ttls};
use super::inode::ROOT;
use super::open::Backing;
use super::writes::{AttrChange, Caller};
use super::{MountSettings, Parts};
use crate::manifest::{Manifest, ManifestUrl};
use crate::source::SourceTree;
use crate::store::Store;

/// No passthrough in-process: every read and write reaches the core.
struct NoPassthrough;

impl Backing for NoPassthrough {
    fn open_backing(&self, _file: &File) -> io::Result<fuser::BackingId> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

const DIRS: [&str; 3] = ["", "a", "b"];
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const SLOTS: usize = 2;

/// A path of the name space: `DIRS[.0]/NAMES[.1]`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct P(u8, u8);

impl P {
    fn rel(self) -> String {
        let (dir, name) = (DIRS[self.0 as usize], NAMES[self.1 as usize]);
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    }
}

impl std::fmt::Debug for P {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.rel())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        path: P,
        mode: u32,
        len: usize,
        seed: u8,
    },
    Write {
        path: P,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Append {
        path: P,
        len: usize,
        seed: u8,
    },
    Truncate {
        path: P,
        size: u64,
        by_fd: bool,
    },
    Rename {
        from: P,
        to: P,
    },
    Unlink {
        path: P,
    },
    Mkdir {
        path: P,
        mode: u32,
    },
    Rmdir {
        path: P,
    },
    Chmod {
        path: P,
        mode: u32,
    },
    Read {
        path: P,
    },
    Link {
        from: P,
        to: P,
    },
    /// open(O_RDWR) kept in a slot across the next operations (unlink, rename, sweeps...).
    Keep {
        slot: usize,
        path: P,
    },
    FdWrite {
        slot: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    FdRead {
        slot: usize,
    },
    FdStat {
        slot: usize,
    },
    FdTruncate {
        slot: usize,
        size: u64,
    },
    FdChmod {
        slot: usize,
        mode: u32,
    },
    Close {
        slot: usize,
    },
    /// The sweeper copies everything it may.
    Sweep,
    /// `purge --confirm`.
    Purge,
}

const FILE_MODES: [u32; 5] = [0o600, 0o644, 0o664, 0o755, 0o640];
const DIR_MODES: [u32; 3] = [0o700, 0o755, 0o775];
const LENS: [usize; 5] = [0, 1, 100, 4096, 70_001];
const OFFSETS: [u64; 4] = [0, 1, 4096, 100_000];
const SIZES: [u64; 4] = [0, 1, 4096, 70_001];

fn path() -> impl Strategy<Value = P> {
    (0u8..3, 0u8..4).prop_map(|(d, n)| P(d, n))
}

fn pick<T: Clone + std::fmt::Debug + 'static>(values: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(values)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (path(), pick(&FILE_MODES), pick(&LENS), any::<u8>())
            .prop_map(|(path, mode, len, seed)| Op::Create { path, mode, len, seed }),
        2 => (path(), pick(&OFFSETS), pick(&LENS), any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        1 => (path(), pick(&LENS), any::<u8>())
            .prop_map(|(path, len, seed)| Op::Append { path, len, seed }),
        1 => (path(), pick(&SIZES), any::<bool>())
            .prop_map(|(path, size, by_fd)| Op::Truncate { path, size, by_fd }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Rename { from, to }),
        2 => path().prop_map(|path| Op::Unlink { path }),
        1 => (path(), pick(&DIR_MODES)).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        1 => path().prop_map(|path| Op::Rmdir { path }),
        1 => (path(), pick(&FILE_MODES)).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        2 => path().prop_map(|path| Op::Read { path }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (0..SLOTS, path()).prop_map(|(slot, path)| Op::Keep { slot, path }),
        2 => (0..SLOTS, pick(&OFFSETS), pick(&LENS), any::<u8>())
            .prop_map(|(slot, offset, len, seed)| Op::FdWrite { slot, offset, len, seed }),
        1 => (0..SLOTS).prop_map(|slot| Op::FdRead { slot }),
        1 => (0..SLOTS).prop_map(|slot| Op::FdStat { slot }),
        1 => (0..SLOTS, pick(&SIZES)).prop_map(|(slot, size)| Op::FdTruncate { slot, size }),
        1 => (0..SLOTS, pick(&FILE_MODES)).prop_map(|(slot, mode)| Op::FdChmod { slot, mode }),
        1 => (0..SLOTS).prop_map(|slot| Op::Close { slot }),
        1 => Just(Op::Sweep),
        1 => Just(Op::Purge),
    ]
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What an operation came to: its bytes (a read, a stat), or its errno.
type Outcome = Result<Vec<u8>, i32>;

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn code(e: Errno) -> i32 {
    e.code()
}

fn umask() -> u32 {
    // SAFETY: umask only reads and sets this process's mask; it is put back at once.
    let mask = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(mask) };
    mask
}

/// The plain directory: the reference.
struct Plain {
    root: PathBuf,
    slots: [Option<File>; SLOTS],
}

impl Plain {
    fn at(&self, p: P) -> PathBuf {
        self.root.join(p.rel())
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        let none = |r: io::Result<()>| r.map(|()| Vec::new()).map_err(errno);
        match op {
            Op::Create {
                path,
                mode,
                len,
                seed,
            } => none((|| {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(*mode)
                    .open(self.at(*path))?;
                std::io::Write::write_all(&mut f, &content(*len, *seed))
            })()),
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => none((|| {
                let f = fs::OpenOptions::new().write(true).open(self.at(*path))?;
                f.write_all_at(&content(*len, *seed), *offset)
            })()),
            Op::Append { path, len, seed } => none((|| {
                let mut f = fs::OpenOptions::new().append(true).open(self.at(*path))?;
                std::io::Write::write_all(&mut f, &content(*len, *seed))
            })()),
            Op::Truncate { path, size, by_fd } => none(if *by_fd {
                fs::OpenOptions::new()
                    .write(true)
                    .open(self.at(*path))
                    .and_then(|f| f.set_len(*size))
            } else {
                truncate(&self.at(*path), *size)
            }),
            Op::Rename { from, to } => none(fs::rename(self.at(*from), self.at(*to))),
            Op::Unlink { path } => none(fs::remove_file(self.at(*path))),
            Op::Mkdir { path, mode } => none((|| {
                fs::create_dir(self.at(*path))?;
                fs::set_permissions(self.at(*path), fs::Permissions::from_mode(*mode))
            })()),
            Op::Rmdir { path } => none(fs::remove_dir(self.at(*path))),
            Op::Chmod { path, mode } => none(fs::set_permissions(
                self.at(*path),
                fs::Permissions::from_mode(*mode),
            )),
            Op::Read { path } => fs::read(self.at(*path)).map_err(errno),
            Op::Link { from, to } => none(fs::hard_link(self.at(*from), self.at(*to))),
            Op::Keep { slot, path } => {
                self.slots[*slot] = None;
                let f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.at(*path))
                    .map_err(errno)?;
                self.slots[*slot] = Some(f);
                Ok(Vec::new())
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                seed,
            } => match &self.slots[*slot] {
                Some(f) => none(f.write_all_at(&content(*len, *seed), *offset)),
                None => Err(libc::EBADF),
            },
            Op::FdRead { slot } => match &self.slots[*slot] {
                Some(f) => read_all_at(f),
                None => Err(libc::EBADF),
            },
            Op::FdStat { slot } => match &self.slots[*slot] {
                Some(f) => {
                    let m = f.metadata().map_err(errno)?;
                    Ok(stat_bytes(m.size(), m.mode() & 0o7777, m.nlink() as u32))
                }
                None => Err(libc::EBADF),
            },
            Op::FdTruncate { slot, size } => match &self.slots[*slot] {
                Some(f) => none(f.set_len(*size)),
                None => Err(libc::EBADF),
            },
            Op::FdChmod { slot, mode } => match &self.slots[*slot] {
                Some(f) => none(f.set_permissions(fs::Permissions::from_mode(*mode))),
                None => Err(libc::EBADF),
            },
            Op::Close { slot } => {
                self.slots[*slot] = None;
                Ok(Vec::new())
            }
            Op::Sweep | Op::Purge => Ok(Vec::new()),
        }
    }
}

fn truncate(path: &Path, size: u64) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::truncate(c.as_ptr(), size as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn read_all_at(f: &File) -> Outcome {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).map_err(errno)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn stat_bytes(size: u64, mode: u32, nlink: u32) -> Vec<u8> {
    format!("size={size} mode={mode:o} nlink={nlink}").into_bytes()
}

/// The core, driven as the kernel would drive it.
struct Mounted {
    rt: tokio::runtime::Runtime,
    core: Arc<Core>,
    manifest: Manifest,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    hook: crate::engine::sweep::VerifiedHook,
    /// Kept handles: (inode number, fh).
    slots: [Option<(u64, u64)>; SLOTS],
    caller: Caller,
    umask: u32,
}

impl Mounted {
    fn new(work: &Path) -> Mounted {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let src = work.join("src");
        let dest = work.join("dest");
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dest).unwrap();
        let (manifest, source, store) = rt.block_on(async {
            let url = ManifestUrl::Sqlite(work.join("manifest.db"));
            let manifest = Manifest::open(&url).await.expect("manifest");
            let source = Arc::new(SourceTree::open(&src).expect("source"));
            let dest = crate::store::DestUrl::parse(&format!("file://{}", dest.display()))
                .expect("dest url");
            let store = crate::store::open_store(&dest, &Default::default())
                .await
                .expect("store");
            store.prepare().await.expect("prepare");
            (manifest, source, store)
        });
        let settings = MountSettings {
            mountpoint: src.clone(),
            fsname: "model".into(),
            ttl: Ttls {
                entry: Duration::from_secs(1),
                attr: Duration::from_secs(1),
            },
            row_ttl: Duration::from_secs(1),
            cache_memory: 4 << 20,
            threads: 1,
            prefetch_memory: 16 << 20,
            node: "model".into(),
            hold_for: Duration::from_secs(60),
            dest_read_deadline: Duration::from_secs(3),
        };
        let parts = Parts {
            source: source.clone(),
            manifest: manifest.clone(),
            store: store.clone(),
            wake_sweeper: Arc::new(tokio::sync::Notify::new()),
            metrics: crate::metrics::Metrics::new(crate::metrics::Role::Mount),
        };
        let (core, hook) = {
            let _in_runtime = rt.enter();
            super::source_core(parts, &settings)
        };
        Mounted {
            rt,
            core,
            manifest,
            source,
            store,
            hook,
            slots: [None; SLOTS],
            // SAFETY: plain getters.
            caller: unsafe {
                Caller {
                    uid: libc::getuid(),
                    gid: libc::getgid(),
                }
            },
            umask: umask(),
        }
    }

    /// The number of `rel` by lookups from the root, as the kernel walks a path.
    fn resolve(&self, rel: &str) -> Result<u64, i32> {
        let mut ino = ROOT;
        for name in rel.split('/').filter(|n| !n.is_empty()) {
            // The kernel walks only through directories.
            if !self.is_dir(ino)? {
                return Err(libc::ENOTDIR);
            }
            ino = self.core.lookup(ino, OsStr::new(name)).map_err(code)?.ino();
        }
        Ok(ino)
    }

    fn parent(&self, p: P) -> Result<(u64, &'static str), i32> {
        let parent = self.resolve(DIRS[p.0 as usize])?;
        if !self.is_dir(parent)? {
            return Err(libc::ENOTDIR);
        }
        Ok((parent, NAMES[p.1 as usize]))
    }

    /// The kernel's checks before it asks the file system to make a name: the parent exists
    /// and is a directory, the name is free.
    fn free_name(&self, p: P) -> Result<(u64, &'static str), i32> {
        let (parent, name) = self.parent(p)?;
        match self.core.lookup(parent, OsStr::new(name)) {
            Ok(_) => Err(libc::EEXIST),
            Err(e) if e == Errno::ENOENT => Ok((parent, name)),
            Err(e) => Err(code(e)),
        }
    }

    fn is_dir(&self, ino: u64) -> Result<bool, i32> {
        Ok(self.core.getattr(ino, None).map_err(code)?.attr.kind == FileType::Directory)
    }

    /// open(2) of an existing file, as the kernel asks: a directory opened for writing is
    /// refused before the file system hears of it.
    fn open(&self, ino: u64, flags: i32) -> Result<u64, i32> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY && self.is_dir(ino)? {
            return Err(libc::EISDIR);
        }
        Ok(self
            .core
            .open(ino, flags, &NoPassthrough, false)
            .map_err(code)?
            .fh)
    }

    fn read_fh(&self, fh: u64) -> Outcome {
        let mut out = Vec::new();
        loop {
            let chunk = match self.core.read(fh, out.len() as u64, 65_536) {
                super::open::Read::Now(data) => data.map_err(code)?,
                super::open::Read::Later(future) => {
                    self.rt.block_on(future).map_err(code)?.to_vec()
                }
            };
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    fn with_open<T>(
        &self,
        path: P,
        flags: i32,
        f: impl FnOnce(u64, u64) -> Result<T, i32>,
    ) -> Result<T, i32> {
        let ino = self.resolve(&path.rel())?;
        let fh = self.open(ino, flags)?;
        let out = f(ino, fh);
        self.core.release(fh);
        out
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.core.write(fh, offset, data).map(|_| ()).map_err(code)
    }

    fn setattr(&self, ino: u64, change: AttrChange, fh: Option<u64>) -> Result<(), i32> {
        self.core
            .setattr(ino, &change, fh)
            .map(|_| ())
            .map_err(code)
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        let none = |r: Result<(), i32>| r.map(|()| Vec::new());
        match op {
            Op::Create {
                path,
                mode,
                len,
                seed,
            } => {
                let data = content(*len, *seed);
                let (parent, name) = self.parent(*path)?;
                match self.core.lookup(parent, OsStr::new(name)) {
                    Ok(found) => {
                        none(
                            self.with_open(*path, libc::O_WRONLY | libc::O_TRUNC, |_, fh| {
                                let _ = found;
                                self.write(fh, 0, &data)
                            }),
                        )
                    }
                    Err(e) if e == Errno::ENOENT => {
                        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
                        let (_, opened) = self
                            .core
                            .create(
                                parent,
                                OsStr::new(name),
                                mode & !self.umask,
                                flags,
                                self.caller,
                                &NoPassthrough,
                            )
                            .map_err(code)?;
                        let written = self.write(opened.fh, 0, &data);
                        self.core.release(opened.fh);
                        none(written)
                    }
                    Err(e) => Err(code(e)),
                }
            }
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => none(self.with_open(*path, libc::O_WRONLY, |_, fh| {
                self.write(fh, *offset, &content(*len, *seed))
            })),
            // The daemon's descriptor is opened O_APPEND: its writes land at the end whatever
            // the offset the kernel sends.
            Op::Append { path, len, seed } => none(self.with_open(
                *path,
                libc::O_WRONLY | libc::O_APPEND,
                |_, fh| self.write(fh, 0, &content(*len, *seed)),
            )),
            Op::Truncate { path, size, by_fd } => {
                let change = AttrChange {
                    size: Some(*size),
                    ..Default::default()
                };
                if *by_fd {
                    none(self.with_open(*path, libc::O_WRONLY, |ino, fh| {
                        self.setattr(ino, change, Some(fh))
                    }))
                } else {
                    let ino = self.resolve(&path.rel())?;
                    if self.is_dir(ino)? {
                        return Err(libc::EISDIR);
                    }
                    none(self.setattr(ino, change, None))
                }
            }
            Op::Rename { from, to } => {
                // Both parents are resolved before either name is looked up.
                let (from_parent, from_name) = self.parent(*from)?;
                let (to_parent, to_name) = self.parent(*to)?;
                let from_ino = self
                    .core
                    .lookup(from_parent, OsStr::new(from_name))
                    .map_err(code)?
                    .ino();
                if from == to {
                    return Ok(Vec::new());
                }
                // The kernel refuses a directory moved below itself before asking.
                if self.is_dir(from_ino)? && to.rel().starts_with(&format!("{}/", from.rel())) {
                    return Err(libc::EINVAL);
                }
                if to_parent == from_ino {
                    return Err(libc::EINVAL);
                }
                // ... and a target that is an ancestor of the source.
                if from.rel().starts_with(&format!("{}/", to.rel())) {
                    return Err(libc::ENOTEMPTY);
                }
                none(
                    self.core
                        .rename(
                            from_parent,
                            OsStr::new(from_name),
                            to_parent,
                            OsStr::new(to_name),
                            RenameFlags::empty(),
                        )
                        .map_err(code),
                )
            }
            Op::Unlink { path } => {
                let (parent, name) = self.parent(*path)?;
                none(self.core.unlink(parent, OsStr::new(name)).map_err(code))
            }
            Op::Mkdir { path, mode } => {
                let (parent, name) = self.free_name(*path)?;
                let found = self
                    .core
                    .mkdir(parent, OsStr::new(name), mode & !self.umask, self.caller)
                    .map_err(code)?;
                // The plain side sets the exact mode after mkdir; so does the application.
                none(self.setattr(
                    found.ino(),
                    AttrChange {
                        mode: Some(*mode),
                        ..Default::default()
                    },
                    None,
                ))
            }
            Op::Rmdir { path } => {
                let (parent, name) = self.parent(*path)?;
                none(self.core.rmdir(parent, OsStr::new(name)).map_err(code))
            }
            Op::Chmod { path, mode } => {
                let ino = self.resolve(&path.rel())?;
                none(self.setattr(
                    ino,
                    AttrChange {
                        mode: Some(*mode),
                        ..Default::default()
                    },
                    None,
                ))
            }
            Op::Read { path } => {
                let ino = self.resolve(&path.rel())?;
                if self.is_dir(ino)? {
                    return Err(libc::EISDIR);
                }
                self.with_open(*path, libc::O_RDONLY, |_, fh| self.read_fh(fh))
            }
            Op::Link { from, to } => {
                let ino = self.resolve(&from.rel())?;
                let (parent, name) = self.free_name(*to)?;
                if self.is_dir(ino)? {
                    return Err(libc::EPERM);
                }
                none(
                    self.core
                        .link(ino, parent, OsStr::new(name))
                        .map(|_| ())
                        .map_err(code),
                )
            }
            Op::Keep { slot, path } => {
                self.close(*slot);
                let ino = self.resolve(&path.rel())?;
                let fh = self.open(ino, libc::O_RDWR)?;
                self.slots[*slot] = Some((ino, fh));
                Ok(Vec::new())
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                seed,
            } => {
                let (_, fh) = self.slots[*slot].ok_or(libc::EBADF)?;
                none(self.write(fh, *offset, &content(*len, *seed)))
            }
            Op::FdRead { slot } => {
                let (_, fh) = self.slots[*slot].ok_or(libc::EBADF)?;
                self.read_fh(fh)
            }
            Op::FdStat { slot } => {
                let (ino, fh) = self.slots[*slot].ok_or(libc::EBADF)?;
                let attr = self.core.getattr(ino, Some(fh)).map_err(code)?.attr;
                Ok(stat_bytes(attr.size, attr.perm as u32, attr.nlink))
            }
            Op::FdTruncate { slot, size } => {
                let (ino, fh) = self.slots[*slot].ok_or(libc::EBADF)?;
                let change = AttrChange {
                    size: Some(*size),
                    ..Default::default()
                };
                none(self.setattr(ino, change, Some(fh)))
            }
            // fchmod: the kernel sends no handle with it.
            Op::FdChmod { slot, mode } => {
                let (ino, _) = self.slots[*slot].ok_or(libc::EBADF)?;
                let change = AttrChange {
                    mode: Some(*mode),
                    ..Default::default()
                };
                none(self.setattr(ino, change, None))
            }
            Op::Close { slot } => {
                self.close(*slot);
                Ok(Vec::new())
            }
            Op::Sweep => {
                self.sweep();
                Ok(Vec::new())
            }
            Op::Purge => {
                self.purge();
                Ok(Vec::new())
            }
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some((_, fh)) = self.slots[slot].take() {
            self.core.release(fh);
        }
    }

    /// A scan and a sweep to the end, in-process, as the daemon's sweeper runs them.
    fn sweep(&self) {
        let (_never, stop) = tokio::sync::watch::channel(false);
        let opts = crate::engine::sweep::SweepOptions {
            limits: crate::engine::LiveLimits::new(crate::engine::Limits {
                concurrency: 4,
                bwlimit: None,
                max_ops: None,
                filter: crate::engine::filter::PathFilter::new(&[], &[]).expect("filter"),
            }),
            batch_size: 100,
            max_retries: 3,
            retry_delay: Duration::from_millis(10),
            lease: Duration::from_secs(60),
            node: "model-sweeper".into(),
            command: "sweep".into(),
            dest_timeout: Duration::from_secs(10),
            keep_running: None,
            on_verified: Some(self.hook.clone()),
            requests_only: false,
            stop_grace: Duration::from_secs(10),
        };
        self.rt.block_on(async {
            crate::engine::scan::scan_patiently(
                &self.manifest,
                self.source.clone(),
                self.store.clone(),
                &stop,
            )
            .await
            .expect("scan");
            let progress =
                crate::engine::progress::Progress::start("model", true, Duration::from_secs(60));
            crate::engine::sweep::run_sweep(
                &self.manifest,
                self.source.clone(),
                self.store.clone(),
                &opts,
                progress,
                &stop,
            )
            .await
            .expect("sweep");
        });
    }

    fn purge(&self) {
        let (_never, stop) = tokio::sync::watch::channel(false);
        let opts = crate::engine::purge::PurgeOptions {
            filter: crate::engine::filter::PathFilter::new(&[], &[]).expect("filter"),
            paranoid: false,
            confirm: true,
        };
        self.rt
            .block_on(crate::engine::purge::purge(
                &self.manifest,
                &*self.store,
                &self.source,
                &opts,
                &stop,
            ))
            .expect("purge");
        // What purge changed reaches the mount as on a live system: rows are read again.
        self.core.rows.forget_all();
    }

    /// The tree as the application sees it through the core.
    fn tree(&self) -> Tree {
        let mut out = Tree::new();
        let mut stack = vec![(ROOT, String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let listing = match self.core.listing(dir, 0) {
                Ok(listing) => listing,
                Err(e) => {
                    out.insert(format!("{rel}/"), Node::Error(code(e)));
                    continue;
                }
            };
            for (_, item) in listing.iter() {
                let name = item.name.to_string_lossy().into_owned();
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let attr = &item.found.attr;
                let node = match attr.kind {
                    FileType::Directory => {
                        stack.push((attr.ino.0, child.clone()));
                        Node::Dir {
                            mode: attr.perm as u32,
                        }
                    }
                    FileType::RegularFile => {
                        let attr = match self.core.getattr(attr.ino.0, None) {
                            Ok(found) => found.attr,
                            Err(e) => {
                                out.insert(child, Node::Error(code(e)));
                                continue;
                            }
                        };
                        let bytes = self.open(attr.ino.0, libc::O_RDONLY).and_then(|fh| {
                            let data = self.read_fh(fh);
                            self.core.release(fh);
                            data
                        });
                        match bytes {
                            Ok(bytes) => Node::File {
                                mode: attr.perm as u32,
                                size: attr.size,
                                nlink: attr.nlink,
                                bytes: digest(&bytes),
                            },
                            Err(e) => Node::Error(e),
                        }
                    }
                    other => Node::Other(format!("{other:?}")),
                };
                out.insert(child, node);
            }
        }
        out
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for slot in 0..SLOTS {
            self.close(slot);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
        nlink: u32,
        bytes: String,
    },
    Other(String),
    Error(i32),
}

type Tree = BTreeMap<String, Node>;

fn digest(bytes: &[u8]) -> String {
    {
        use sha2::Digest;
        format!(
            "{}:{}",
            bytes.len(),
            &hex::encode(sha2::Sha256::digest(bytes))[..12]
        )
    }
}

fn plain_tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in fs::read_dir(&dir).expect("plain listing") {
            let entry = entry.expect("plain entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(entry.path()).expect("plain stat");
            let node = if meta.is_dir() {
                stack.push(child.clone());
                Node::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else if meta.is_file() {
                Node::File {
                    mode: meta.mode() & 0o7777,
                    size: meta.size(),
                    nlink: meta.nlink() as u32,
                    bytes: digest(&fs::read(entry.path()).expect("plain read")),
                }
            } else {
                Node::Other(format!("{:?}", meta.file_type()))
            };
            out.insert(child, node);
        }
    }
    out
}

fn diff(want: &Tree, got: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (path, w) in want {
        match got.get(path) {
            None => out.push(format!("{path}: want {w:?}, got nothing")),
            Some(g) if g != w => out.push(format!("{path}: want {w:?}, got {g:?}")),
            _ => {}
        }
    }
    for (path, g) in got {
        if !want.contains_key(path) {
            out.push(format!("{path}: want nothing, got {g:?}"));
        }
    }
    out
}

fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
    let work = tempfile::tempdir().expect("tempdir");
    let plain_root = work.path().join("plain");
    fs::create_dir(&plain_root).unwrap();
    for dir in ["a", "b"] {
        fs::create_dir(plain_root.join(dir)).unwrap();
    }
    let mut plain = Plain {
        root: plain_root.clone(),
        slots: [None, None],
    };
    let mut mounted = Mounted::new(work.path());
    for dir in ["a", "b"] {
        mounted
            .core
            .mkdir(
                ROOT,
                OsStr::new(dir),
                0o755 & !mounted.umask,
                mounted.caller,
            )
            .expect("setup mkdir");
    }
    for (step, op) in ops.iter().enumerate() {
        let want = plain.apply(op);
        let got = mounted.apply(op);
        prop_assert_eq!(
            &got,
            &want,
            "step {} {:?}: the core answered differently from a plain directory",
            step,
            op
        );
        let (want_tree, got_tree) = (plain_tree(&plain_root), mounted.tree());
        let differences = diff(&want_tree, &got_tree);
        prop_assert!(
            differences.is_empty(),
            "after step {} {:?} the trees differ:\n{}",
            step,
            op,
            differences.join("\n")
        );
    }
    Ok(())
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env_or("PROPTEST_CASES", 48),
        max_shrink_iters: env_or("PROPTEST_MAX_SHRINK_ITERS", 400),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_core_behaves_like_a_plain_directory(
        ops in proptest::collection::vec(op(), 1..=env_or("CUTOVERFS_CORE_MODEL_OPS", 30) as usize)
    ) {
        run_case(&ops)?;
    }
}

/// Regressions the property test found, kept as plain tests.
#[test]
fn an_open_file_keeps_working_after_unlink_and_rename_over_it() {
    run_case(&[
        Op::Create {
            path: P(0, 0),
            mode: 0o644,
            len: 100,
            seed: 1,
        },
        Op::Keep {
            slot: 0,
            path: P(0, 0),
        },
        Op::Unlink { path: P(0, 0) },
        Op::FdWrite {
            slot: 0,
            offset: 4096,
            len: 100,
            seed: 2,
        },
        Op::FdStat { slot: 0 },
        Op::FdTruncate { slot: 0, size: 1 },
        Op::FdChmod {
            slot: 0,
            mode: 0o600,
        },
        Op::FdStat { slot: 0 },
        Op::FdRead { slot: 0 },
        Op::Create {
            path: P(1, 1),
            mode: 0o644,
            len: 4096,
            seed: 3,
        },
        Op::Keep {
            slot: 1,
            path: P(1, 1),
        },
        Op::Create {
            path: P(1, 2),
            mode: 0o644,
            len: 1,
            seed: 4,
        },
        Op::Rename {
            from: P(1, 2),
            to: P(1, 1),
        },
        Op::FdRead { slot: 1 },
        Op::FdStat { slot: 1 },
        Op::Sweep,
        Op::Close { slot: 0 },
        Op::Close { slot: 1 },
    ])
    .unwrap();
}

#[test]
fn hard_links_share_content_and_link_counts() {
    run_case(&[
        Op::Create {
            path: P(0, 0),
            mode: 0o644,
            len: 100,
            seed: 1,
        },
        Op::Sweep,
        Op::Link {
            from: P(0, 0),
            to: P(1, 0),
        },
        Op::Write {
            path: P(1, 0),
            offset: 10,
            len: 100,
            seed: 5,
        },
        Op::Read { path: P(0, 0) },
        Op::Purge,
        Op::Unlink { path: P(0, 0) },
        Op::Sweep,
        Op::Purge,
        Op::Read { path: P(1, 0) },
    ])
    .unwrap();
}
