//! `file://` dest: a private local directory.
//!
//! A file is written to an unnamed temporary file (`O_TMPFILE`) in its target directory, hashed
//! in the same pass, given the source's mode, owner and times and an ownership mark (the xattr
//! `user.cutoverfs` = manifest id and SHA-256), made durable, and only then linked to its name
//! with a call that fails if the name exists (`linkat`); the new directory entry is made durable
//! before the copy counts as done. Durability comes from `SyncGroup` (one `syncfs` for many
//! files), or from per-file fsyncs where a subdirectory is another file system. A crash at any
//! point leaves either nothing or the whole file at the key, and no temporary name behind. Where
//! `O_TMPFILE` is unsupported, a dot-named temporary file and `renameat2(RENAME_NOREPLACE)` give
//! the same guarantees (a crash may leave the temporary).
//!
//! Files come in groups (`put_many`): one I/O thread stages a whole group, one sync covers it,
//! one thread links it, one more sync covers the names. Large files are copied inside the kernel
//! (`copy_file_range`) and hashed from the written file itself, so the SHA-256 recorded is that
//! of the bytes that landed at the dest; small files are read once, hashed and written.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::durable::SyncGroup;
use super::{blocking, ObjectFacts, Preflight, Removal, PACED_CHUNK};
use super::{
    canonical_path, PublishGuard, PutOutcome, PutRequest, SourceRef, Store, StoreError, Stored,
};
use crate::beneath::Beneath;
use crate::source::OpenedSource;

/// The extended attribute that marks a file as written by cutoverfs for one manifest.
const OWNER_XATTR: &str = "user.cutoverfs";

/// Bytes between two requests to start write-back, so the final sync has little left to do.
const WRITEBACK_STEP: u64 = 8 << 20;

/// From this size on, data is copied inside the kernel and hashed from the written file.
const IN_KERNEL_COPY_MIN: u64 = 1 << 20;

pub struct LocalStore {
    root: PathBuf,
    /// The root, once it exists: every key is reached below it (`Beneath`: never through a
    /// symlink, never outside it).
    dir: std::sync::OnceLock<Arc<Beneath>>,
    sync: std::sync::OnceLock<(SyncGroup, u64)>,
    /// Blocking I/O calls at once: many files may be in flight, but only this many threads
    /// read and write at a time.
    io_slots: tokio::sync::Semaphore,
}

/// Threads doing file I/O at once; more only adds context switches on small machines.
const IO_THREADS: usize = 8;

impl LocalStore {
    /// Stages, syncs, links and syncs a group of files; an Err is a failure of the whole group.
    async fn put_group(
        &self,
        requests: Vec<PutRequest>,
        guard: &dyn PublishGuard,
    ) -> Result<Vec<Result<Stored, StoreError>>, StoreError> {
        let (writer, root_dev) = (guard.writer_id(), self.sync_group()?.1);
        let owned: Vec<Vec<String>> = requests.iter().map(|r| r.owned_sha256.clone()).collect();
        let targets: Vec<Target> = requests
            .iter()
            .map(|r| self.target(&r.key))
            .collect::<Result<_, _>>()?;
        let mut staged: Vec<Result<Staged, StoreError>> = self
            .io(move || {
                let stage_each = requests.iter().zip(targets);
                Ok(stage_each
                    .map(|(req, target)| stage(target, &req.source, &writer, root_dev))
                    .collect())
            })
            .await?;
        self.record_intents(&mut staged, guard).await?;
        if staged.iter().any(Result::is_ok) {
            self.sync().await?;
        }
        let writer = guard.writer_id();
        let published: Vec<Result<(PutOutcome, Staged), StoreError>> = self
            .io(move || {
                let publish_each = staged.into_iter().zip(owned);
                Ok(publish_each
                    .map(|(staged, owned)| staged.and_then(|s| publish(s, &owned, &writer)))
                    .collect())
            })
            .await?;
        if published
            .iter()
            .any(|p| matches!(p, Ok((PutOutcome::Written { .. }, _))))
        {
            self.sync().await?;
        }
        Ok(published
            .into_iter()
            .map(|p| {
                p.map(|(outcome, staged)| Stored {
                    outcome,
                    source: staged.source,
                })
            })
            .collect())
    }

    /// Files the file system could not mark get their hash recorded in the manifest before they
    /// are published; a file whose lease is gone is not published at all.
    async fn record_intents(
        &self,
        staged: &mut [Result<Staged, StoreError>],
        guard: &dyn PublishGuard,
    ) -> Result<(), StoreError> {
        let intents: Vec<(usize, String)> = staged
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .ok()
                    .filter(|s| !s.marked)
                    .map(|s| (i, s.sha256.clone()))
            })
            .collect();
        if intents.is_empty() {
            return Ok(());
        }
        let allowed = guard.before_publish(&intents).await?;
        for ((i, _), ok) in intents.iter().zip(allowed) {
            if !ok {
                staged[*i] = Err(StoreError::Guard(
                    "lease lost before publishing; not published".into(),
                ));
            }
        }
        Ok(())
    }

    pub fn new(root: &Path) -> Result<LocalStore, StoreError> {
        let root = canonical_path(root).map_err(dest_err("resolve", root))?;
        Ok(LocalStore {
            root,
            dir: std::sync::OnceLock::new(),
            sync: std::sync::OnceLock::new(),
            io_slots: tokio::sync::Semaphore::new(IO_THREADS),
        })
    }

    /// The group syncer of the dest's file system and that file system's device number.
    fn sync_group(&self) -> Result<&(SyncGroup, u64), StoreError> {
        if let Some(group) = self.sync.get() {
            return Ok(group);
        }
        let dir = File::open(&self.root).map_err(dest_err("open", &self.root))?;
        let dev = dir.metadata().map_err(dest_err("stat", &self.root))?.dev();
        let _ = self.sync.set((SyncGroup::start(dir), dev));
        Ok(self.sync.get().expect("set just above"))
    }

    async fn io<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _slot = self
            .io_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Unusable("store closed".into()))?;
        blocking(work).await
    }

    /// Waits for a group sync of the dest's file system.
    async fn sync(&self) -> Result<(), StoreError> {
        let (group, _) = self.sync_group()?;
        group.wait().await.map_err(dest_err("sync", &self.root))
    }

    /// The dest root, opened the first time it is needed (`prepare` creates it).
    fn dir(&self) -> Result<Arc<Beneath>, StoreError> {
        if let Some(dir) = self.dir.get() {
            return Ok(dir.clone());
        }
        let opened = Beneath::open_root(&self.root).map_err(dest_err("open", &self.root))?;
        Ok(self.dir.get_or_init(|| Arc::new(opened)).clone())
    }

    /// A key's file below the root.
    fn target(&self, key: &str) -> Result<Target, StoreError> {
        Ok(Target {
            dir: self.dir()?,
            rel: PathBuf::from(key),
            shown: self.root.join(key),
        })
    }
}

/// A key of this dest: where its file is below the root, and where that is for messages.
#[derive(Debug, Clone)]
struct Target {
    dir: Arc<Beneath>,
    rel: PathBuf,
    shown: PathBuf,
}

impl Target {
    fn parent_rel(&self) -> &Path {
        self.rel.parent().unwrap_or(Path::new(""))
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> StoreError + '_ {
        dest_err(op, &self.shown)
    }

    /// `lstat` of the key's file; None when nothing is there.
    fn stat(&self) -> io::Result<Option<libc::stat>> {
        match self.dir.stat(&self.rel) {
            Ok(st) => Ok(Some(st)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self) -> io::Result<File> {
        self.dir
            .open(&self.rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)
    }

    /// The ownership mark of the file, if it has one.
    fn owner_mark(&self) -> Option<String> {
        self.dir
            .xattr(&self.rel, OWNER_XATTR)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Whether the file carries this manifest's mark.
    fn is_marked_by(&self, writer: &str) -> bool {
        self.owner_mark().is_some_and(|mark| {
            mark.strip_prefix(writer)
                .is_some_and(|rest| rest.starts_with(':'))
        })
    }

    /// Size and SHA-256 of the regular file there; None when it is something else.
    fn hash_existing(&self) -> io::Result<Option<(u64, String)>> {
        let file = self.open()?;
        if !file.metadata()?.is_file() {
            return Ok(None);
        }
        Ok(Some(crate::util::sha256_of(&file)?))
    }

    /// Makes the directory entry of the key durable.
    fn fsync_parent(&self) -> io::Result<()> {
        self.dir
            .open(self.parent_rel(), libc::O_RDONLY | libc::O_DIRECTORY, 0)?
            .sync_all()
    }
}

#[async_trait]
impl Store for LocalStore {
    fn canonical_url(&self) -> String {
        url::Url::from_file_path(&self.root)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| self.root.display().to_string())
    }

    fn key_for(&self, rel: &str) -> Result<String, String> {
        // Any name the source file system holds, this one holds too (the UTF-8 rule is the
        // manifest's and applies before a key is asked for).
        Ok(rel.to_string())
    }

    async fn preflight(&self, _mode: Preflight) -> Result<(), StoreError> {
        let root = self.root.clone();
        blocking(move || check_writable(&root)).await
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        blocking(move || {
            // The root is the operator's path, taken as given; below it nothing is followed.
            std::fs::create_dir_all(&root)
                .and_then(|()| match root.parent() {
                    Some(parent) => File::open(parent)?.sync_all(),
                    None => Ok(()),
                })
                .map_err(|source| StoreError::Dest {
                    op: "create",
                    target: root.display().to_string(),
                    source: Arc::new(source),
                })
        })
        .await
    }

    async fn put_many(
        &self,
        requests: Vec<PutRequest>,
        guard: &dyn PublishGuard,
    ) -> Vec<Result<Stored, StoreError>> {
        let count = requests.len();
        match self.put_group(requests, guard).await {
            Ok(results) => results,
            Err(e) => vec![Err(e); count],
        }
    }

    async fn existing_size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let target = self.target(key)?;
        let st = target.stat().map_err(target.err("stat"))?;
        Ok(st.map(|st| st.st_size as u64))
    }

    fn open_local_file(&self, key: &str) -> Option<io::Result<File>> {
        let opened = self
            .dir()
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|dir| dir.open(Path::new(key), libc::O_RDONLY, 0));
        Some(opened)
    }

    async fn read_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, StoreError> {
        let target = self.target(key)?;
        self.io(move || {
            let read = || crate::util::read_full_at(&target.open()?, offset, len as usize);
            read().map(bytes::Bytes::from).map_err(target.err("read"))
        })
        .await
    }

    async fn inspect(&self, key: &str, deep: bool) -> Result<Option<ObjectFacts>, StoreError> {
        let target = self.target(key)?;
        self.io(move || {
            let Some(st) = target.stat().map_err(target.err("stat"))? else {
                return Ok(None);
            };
            let recorded_sha256 = target
                .owner_mark()
                .and_then(|mark| mark.split_once(':').map(|(_, sha)| sha.to_string()));
            let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
            let (size, read_sha256) = if deep && regular {
                match target.hash_existing().map_err(target.err("read"))? {
                    Some((size, sha)) => (size, Some(sha)),
                    None => (st.st_size as u64, None),
                }
            } else {
                (st.st_size as u64, None)
            };
            Ok(Some(ObjectFacts {
                size,
                recorded_sha256,
                read_sha256,
                etag: Some(super::local_stamp_of(&st)),
            }))
        })
        .await
    }

    async fn delete_owned(
        &self,
        key: &str,
        owned_sha256: &[String],
        writer: &str,
    ) -> Result<Removal, StoreError> {
        let target = self.target(key)?;
        let (owned, writer) = (owned_sha256.to_vec(), writer.to_string());
        self.io(move || {
            let Some(st) = target.stat().map_err(target.err("stat"))? else {
                return Ok(Removal::Absent);
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Ok(Removal::NotOurs);
            }
            let ours = target.is_marked_by(&writer)
                || match target.hash_existing().map_err(target.err("read"))? {
                    Some((_, sha256)) => owned.contains(&sha256),
                    None => false,
                };
            if !ours {
                return Ok(Removal::NotOurs);
            }
            match target.dir.unlink(&target.rel) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Absent),
                Err(e) => return Err(target.err("delete")(e)),
            }
            target
                .fsync_parent()
                .map_err(target.err("fsync directory of"))?;
            Ok(Removal::Deleted)
        })
        .await
    }

    async fn ensure_dir(&self, rel: &str, mode: u32) -> Result<(), StoreError> {
        let target = self.target(rel)?;
        blocking(move || {
            let made = create_dirs(&target.dir, &target.rel)
                .and_then(|()| target.dir.chmod(&target.rel, mode & 0o7777));
            made.map_err(target.err("mkdir"))
        })
        .await
    }
}

/// A fully written file that is not yet visible at its key.
struct Staged {
    file: File,
    /// Set when the fallback named temporary file was used instead of O_TMPFILE.
    temp_name: Option<PathBuf>,
    target: Target,
    sha256: String,
    size: u64,
    /// Whether the file carries the ownership mark.
    marked: bool,
    source: crate::source::Attrs,
    /// On another file system than the dest root: synced file by file.
    other_fs: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(temp) = self.temp_name.take() {
            let _ = self.target.dir.unlink(&temp);
        }
    }
}

fn dest_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + 'p {
    move |source| StoreError::Dest {
        op,
        target: path.display().to_string(),
        source: Arc::new(source),
    }
}

/// Copies one source file into an unnamed file beside its target, with its attributes and our
/// mark. On a file system other than the dest root's, it is fsynced here (the group sync does
/// not cover it).
fn stage(
    target: Target,
    source: &SourceRef,
    writer: &str,
    root_dev: u64,
) -> Result<Staged, StoreError> {
    let opened = source
        .tree
        .open_file(&source.rel)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::SourceMissing,
            _ => StoreError::SourceRead(Arc::new(e)),
        })?;
    let dir_shown = target.shown.parent().unwrap_or(&target.shown).to_path_buf();
    create_dirs(&target.dir, target.parent_rel()).map_err(dest_err("mkdir", &dir_shown))?;
    let (mut file, temp_name) =
        open_temp(&target).map_err(dest_err("create temp in", &dir_shown))?;
    let shown = target.shown.clone();
    let mut staged = Staged {
        file: file.try_clone().map_err(dest_err("dup", &dir_shown))?,
        temp_name,
        target,
        sha256: String::new(),
        size: 0,
        marked: false,
        source: opened.before,
        other_fs: false,
    };
    // Where tests hold a copy that is about to start (tests/live_control.rs).
    crate::testhook::hold_point("copy:start", &source.rel);
    let (sha256, size) = if opened.before.size >= IN_KERNEL_COPY_MIN {
        copy_in_kernel(&opened, &mut file, &shown, source)?
    } else {
        copy_hashing(&opened, &mut file, &shown, source)?
    };
    crate::testhook::hold_point("copy:read", &source.rel);
    opened.confirm_unchanged()?;
    apply_attrs(&file, &opened.before).map_err(dest_err("set attributes on", &shown))?;
    staged.marked = set_owner_mark(&file, writer, &sha256).map_err(dest_err("mark", &shown))?;
    staged.other_fs = file.metadata().map_err(dest_err("stat", &shown))?.dev() != root_dev;
    if staged.other_fs {
        file.sync_all().map_err(dest_err("fsync", &shown))?;
    }
    staged.sha256 = sha256;
    staged.size = size;
    Ok(staged)
}

/// Marks the file as written by this manifest; false where the file system has no user xattrs.
fn set_owner_mark(file: &File, writer: &str, sha256: &str) -> io::Result<bool> {
    let name = CString::new(OWNER_XATTR).expect("no NUL");
    let value = format!("{writer}:{sha256}");
    // SAFETY: valid name and value buffers for the call's duration.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOTSUP) | Some(libc::EPERM) => Ok(false),
        _ => Err(err),
    }
}

/// An unnamed file in the target's directory (O_TMPFILE); where the file system has none, a
/// dot-named temporary file there (and its relative path, to publish by rename).
fn open_temp(target: &Target) -> io::Result<(File, Option<PathBuf>)> {
    let dir = target.parent_rel();
    match target.dir.open(dir, libc::O_TMPFILE | libc::O_RDWR, 0o600) {
        Ok(file) => Ok((file, None)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let name = target
                .rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let temp = dir.join(format!(
                ".cutoverfs-tmp.{}.{}.{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                name.chars().take(64).collect::<String>()
            ));
            let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
            let file = target.dir.open(&temp, flags, 0o600)?;
            Ok((file, Some(temp)))
        }
        Err(e) => Err(e),
    }
}

fn copy_hashing(
    source: &OpenedSource,
    out: &mut File,
    target: &Path,
    pace: &SourceRef,
) -> Result<(String, u64), StoreError> {
    let mut hasher = Sha256::new();
    let buf_len = source.before.size.clamp(4096, PACED_CHUNK) as usize;
    let mut buf = vec![0u8; buf_len];
    let mut input = &source.file;
    let mut written: u64 = 0;
    let mut flushed_to: u64 = 0;
    loop {
        pace.paced((buf_len as u64).min(source.before.size.saturating_sub(written)));
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::SourceRead(Arc::new(e))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(dest_err("write", target))?;
        written += n as u64;
        if written - flushed_to >= WRITEBACK_STEP {
            start_writeback(out, flushed_to, written - flushed_to);
            flushed_to = written;
        }
    }
    Ok((hex::encode(hasher.finalize()), written))
}

/// Copies with `copy_file_range` (no pass through user space), starting write-back as it goes,
/// then hashes the written file through a read-only mapping: the SHA-256 is that of the bytes
/// now in the dest file. The mapping is safe because nobody else can reach the unnamed file.
fn copy_in_kernel(
    source: &OpenedSource,
    out: &mut File,
    target: &Path,
    pace: &SourceRef,
) -> Result<(String, u64), StoreError> {
    let mut written: u64 = 0;
    let step = if pace.pace.is_some() {
        PACED_CHUNK
    } else {
        64 << 20
    };
    loop {
        pace.paced(step.min(source.before.size.saturating_sub(written)));
        // SAFETY: two descriptors we own; null offsets use and advance the file positions.
        let n = unsafe {
            libc::copy_file_range(
                source.file.as_raw_fd(),
                std::ptr::null_mut(),
                out.as_raw_fd(),
                std::ptr::null_mut(),
                step as usize,
                0,
            )
        };
        match n {
            0 => break,
            n if n > 0 => {
                start_writeback(out, written, n as u64);
                written += n as u64;
            }
            _ => {
                let err = io::Error::last_os_error();
                let unsupported = matches!(
                    err.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                );
                if unsupported && written == 0 {
                    return copy_hashing(source, out, target, pace);
                }
                return Err(dest_err("copy to", target)(err));
            }
        }
    }
    if written == 0 {
        return Ok((hex::encode(Sha256::digest([])), 0));
    }
    // SAFETY: a read-only shared mapping of our own unnamed file, which nothing else can truncate.
    let map = unsafe { memmap2::MmapOptions::new().len(written as usize).map(&*out) }
        .map_err(dest_err("map", target))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let mut hasher = Sha256::new();
    for chunk in map.chunks(8 << 20) {
        hasher.update(chunk);
    }
    Ok((hex::encode(hasher.finalize()), written))
}

/// Asks the kernel to start writing a range now; the fsync at the end then waits for less.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: a plain syscall on an fd we own; failure only loses the hint.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Mode, owner (when running as root) and times of the source, like `cp -a`.
fn apply_attrs(file: &File, attrs: &crate::source::Attrs) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let times = [timespec(attrs.atime_ns), timespec(attrs.mtime_ns)];
    // SAFETY: syscalls on an fd we own, with plain values.
    unsafe {
        if libc::geteuid() == 0 {
            check(libc::fchown(fd, attrs.uid, attrs.gid))?;
        }
        check(libc::fchmod(fd, attrs.mode & 0o7777))?;
        check(libc::futimens(fd, times.as_ptr()))
    }
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    }
}

fn publish(
    staged: Staged,
    owned: &[String],
    writer: &str,
) -> Result<(PutOutcome, Staged), StoreError> {
    // Where tests hold a copy that is written and about to appear at its key (tests/mount_writes.rs).
    crate::testhook::hold_point("copy:publish", &staged.target.rel.to_string_lossy());
    let target = staged.target.clone();
    let mut linked = link_no_replace(&staged.file, staged.temp_name.as_deref(), &target);
    if linked
        .as_ref()
        .is_err_and(|e| e.kind() == io::ErrorKind::AlreadyExists)
        && remove_empty_dir(&target)
    {
        linked = link_no_replace(&staged.file, staged.temp_name.as_deref(), &target);
    }
    match linked {
        Ok(()) => {
            if staged.other_fs {
                target
                    .fsync_parent()
                    .map_err(target.err("fsync directory of"))?;
            }
            let written = PutOutcome::Written {
                sha256: staged.sha256.clone(),
                size: staged.size,
                etag: Some(stamp_of(&staged.file, &target)?),
            };
            return Ok((written, staged));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(target.err("link")(e)),
    }
    let Some((size, existing)) = target
        .hash_existing()
        .map_err(target.err("read existing"))?
    else {
        let reason = "dest holds something that is not a regular file".to_string();
        return Ok((PutOutcome::Conflict { reason }, staged));
    };
    // Ours: a hash we wrote here, or our mark, whatever the bytes are now (a copy of ours that
    // was damaged at the dest is rewritten, not left as a conflict).
    let ours = owned.contains(&existing) || target.is_marked_by(writer);
    if existing == staged.sha256 {
        let file = target.open().map_err(target.err("open"))?;
        if ours {
            // Our object with the right content: bring mode, owner and times up to date (a chmod
            // or touch of the source sends the file back here). A foreign one is left as it is.
            apply_attrs(&file, &staged.source).map_err(target.err("set attributes on"))?;
        }
        return Ok((
            PutOutcome::AlreadyThere {
                sha256: existing,
                size,
                ours,
                etag: Some(stamp_of(&file, &target)?),
            },
            staged,
        ));
    }
    if !ours {
        let reason =
            format!("dest already holds a different file that cutoverfs did not write (size {size}, sha256 {existing})");
        return Ok((PutOutcome::Conflict { reason }, staged));
    }
    replace_own_object(&staged, &target)?;
    if staged.other_fs {
        target
            .fsync_parent()
            .map_err(target.err("fsync directory of"))?;
    }
    Ok((
        PutOutcome::Written {
            sha256: staged.sha256.clone(),
            size: staged.size,
            etag: Some(stamp_of(&staged.file, &target)?),
        },
        staged,
    ))
}

/// The stamp recorded for a dest file (see `store::local_stamp`).
fn stamp_of(file: &File, target: &Target) -> Result<String, StoreError> {
    let meta = file.metadata().map_err(target.err("stat"))?;
    Ok(super::local_stamp(&meta))
}

/// Removes the key if it is an empty directory. A directory renamed or removed through the
/// mount stays at the dest as an empty directory (directories are not owned objects); a file the
/// application later creates under that name must not be a conflict forever. An empty
/// directory holds nothing to lose, and the kernel refuses to remove one that is not empty.
fn remove_empty_dir(target: &Target) -> bool {
    let is_dir =
        matches!(target.stat(), Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR);
    is_dir && target.dir.rmdir(&target.rel).is_ok()
}

/// Makes the staged file visible at the key unless something is already there.
fn link_no_replace(file: &File, temp_name: Option<&Path>, target: &Target) -> io::Result<()> {
    match temp_name {
        None => target.dir.link_file(file, &target.rel),
        Some(temp) => rename_no_replace(&target.dir, temp, &target.rel),
    }
}

fn rename_no_replace(dir: &Beneath, from: &Path, to: &Path) -> io::Result<()> {
    match dir.rename(from, to, libc::RENAME_NOREPLACE) {
        // No RENAME_NOREPLACE on this file system: link() also refuses an existing name.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let file = dir.open(from, libc::O_RDONLY, 0)?;
            dir.link_file(&file, to)?;
            dir.unlink(from)
        }
        other => other,
    }
}

/// A libc return code as a Result.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Replaces an object cutoverfs wrote earlier: via a temporary name and rename, so readers see
/// the old or the new file, never none.
fn replace_own_object(staged: &Staged, target: &Target) -> Result<(), StoreError> {
    let temp = match &staged.temp_name {
        Some(named) => named.clone(),
        None => {
            let name = target
                .rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let temp = target
                .parent_rel()
                .join(format!(".cutoverfs-replace.{}.{name}", std::process::id()));
            let _ = target.dir.unlink(&temp);
            target
                .dir
                .link_file(&staged.file, &temp)
                .map_err(target.err("link"))?;
            temp
        }
    };
    target
        .dir
        .rename(&temp, &target.rel, 0)
        .map_err(target.err("rename over"))
}

/// Creates the directory `rel` and any missing parents below the root. New directory entries
/// become durable with the next sync of the file system (the put that needed them waits for it).
fn create_dirs(dir: &Beneath, rel: &Path) -> io::Result<()> {
    if rel.as_os_str().is_empty() || dir.dir(rel).is_ok() {
        return Ok(());
    }
    if let Some(parent) = rel.parent() {
        create_dirs(dir, parent)?;
    }
    match dir.mkdir(rel, 0o755) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.dir(rel).is_ok() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Fails with the reason when nothing could be created at (or under) `root`.
fn check_writable(root: &Path) -> Result<(), StoreError> {
    let mut existing = root.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    let unusable = |why: String| Err(StoreError::Unusable(why));
    let meta = match std::fs::metadata(&existing) {
        Ok(meta) => meta,
        Err(e) => return unusable(format!("{}: {e}", existing.display())),
    };
    if !meta.is_dir() {
        return unusable(format!("{} is not a directory", existing.display()));
    }
    let path = cstring(&existing).map_err(|e| StoreError::Unusable(e.to_string()))?;
    // SAFETY: a NUL-terminated path.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return unusable(format!("{} is not writable: {err}", existing.display()));
    }
    Ok(())
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}
