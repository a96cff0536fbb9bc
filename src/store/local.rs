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
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
use crate::source::OpenedSource;

/// The extended attribute that marks a file as written by cutoverfs for one manifest.
const OWNER_XATTR: &str = "user.cutoverfs";

/// Bytes between two requests to start write-back, so the final sync has little left to do.
const WRITEBACK_STEP: u64 = 8 << 20;

/// From this size on, data is copied inside the kernel and hashed from the written file.
const IN_KERNEL_COPY_MIN: u64 = 1 << 20;

pub struct LocalStore {
    root: PathBuf,
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
        let (root, writer, root_dev) = (self.root.clone(), guard.writer_id(), self.sync_group()?.1);
        let owned: Vec<Vec<String>> = requests.iter().map(|r| r.owned_sha256.clone()).collect();
        let targets: Vec<PathBuf> = requests.iter().map(|r| self.target(&r.key)).collect();
        let mut staged: Vec<Result<Staged, StoreError>> = self
            .io(move || {
                let stage_each = requests.iter().zip(&targets);
                Ok(stage_each
                    .map(|(req, target)| stage(&root, target, &req.source, &writer, root_dev))
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

    fn target(&self, key: &str) -> PathBuf {
        self.root.join(key)
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
            create_dirs(Path::new("/"), &root)
                .and_then(|()| fsync_parent(&root))
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
        match std::fs::symlink_metadata(self.target(key)) {
            Ok(meta) => Ok(Some(meta.size())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Dest {
                op: "stat",
                target: key.to_string(),
                source: Arc::new(source),
            }),
        }
    }

    fn local_file(&self, key: &str) -> Option<PathBuf> {
        Some(self.target(key))
    }

    async fn read_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, StoreError> {
        let path = self.target(key);
        let key = key.to_string();
        self.io(move || {
            let read = || crate::util::read_full_at(&File::open(&path)?, offset, len as usize);
            read()
                .map(bytes::Bytes::from)
                .map_err(|source| StoreError::Dest {
                    op: "read",
                    target: key,
                    source: Arc::new(source),
                })
        })
        .await
    }

    async fn inspect(&self, key: &str, deep: bool) -> Result<Option<ObjectFacts>, StoreError> {
        let target = self.target(key);
        self.io(move || {
            let meta = match std::fs::symlink_metadata(&target) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(dest_err("stat", &target)(e)),
            };
            let recorded_sha256 = owner_mark(&target)
                .and_then(|mark| mark.split_once(':').map(|(_, sha)| sha.to_string()));
            let (size, read_sha256) = if deep && meta.is_file() {
                match hash_existing(&target).map_err(dest_err("read", &target))? {
                    Some((size, sha)) => (size, Some(sha)),
                    None => (meta.size(), None),
                }
            } else {
                (meta.size(), None)
            };
            Ok(Some(ObjectFacts {
                size,
                recorded_sha256,
                read_sha256,
                etag: Some(super::local_stamp(&meta)),
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
        let target = self.target(key);
        let (owned, writer) = (owned_sha256.to_vec(), writer.to_string());
        self.io(move || {
            let meta = match std::fs::symlink_metadata(&target) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Absent),
                Err(e) => return Err(dest_err("stat", &target)(e)),
            };
            if !meta.is_file() {
                return Ok(Removal::NotOurs);
            }
            let ours = is_marked_by(&target, &writer)
                || match hash_existing(&target).map_err(dest_err("read", &target))? {
                    Some((_, sha256)) => owned.contains(&sha256),
                    None => false,
                };
            if !ours {
                return Ok(Removal::NotOurs);
            }
            match std::fs::remove_file(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Absent),
                Err(e) => return Err(dest_err("delete", &target)(e)),
            }
            fsync_parent(&target).map_err(dest_err("fsync directory of", &target))?;
            Ok(Removal::Deleted)
        })
        .await
    }

    async fn ensure_dir(&self, rel: &str, mode: u32) -> Result<(), StoreError> {
        let root = self.root.clone();
        let dir = self.target(rel);
        blocking(move || {
            let err = |source: io::Error| StoreError::Dest {
                op: "mkdir",
                target: dir.display().to_string(),
                source: Arc::new(source),
            };
            create_dirs(&root, &dir).map_err(err)?;
            std::fs::set_permissions(
                &dir,
                std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
            )
            .map_err(err)
        })
        .await
    }
}

/// A fully written file that is not yet visible at its key.
struct Staged {
    file: File,
    /// Set when the fallback named temporary file was used instead of O_TMPFILE.
    temp_name: Option<PathBuf>,
    target: PathBuf,
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
            let _ = std::fs::remove_file(temp);
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
    root: &Path,
    target: &Path,
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
    let dir = target.parent().unwrap_or(root);
    create_dirs(root, dir).map_err(dest_err("mkdir", dir))?;
    let (mut file, temp_name) = open_temp(dir, target).map_err(dest_err("create temp in", dir))?;
    let mut staged = Staged {
        file: file.try_clone().map_err(dest_err("dup", dir))?,
        temp_name,
        target: target.to_path_buf(),
        sha256: String::new(),
        size: 0,
        marked: false,
        source: opened.before,
        other_fs: false,
    };
    let (sha256, size) = if opened.before.size >= IN_KERNEL_COPY_MIN {
        copy_in_kernel(&opened, &mut file, target, source)?
    } else {
        copy_hashing(&opened, &mut file, target, source)?
    };
    crate::testhook::hold_point("copy:read", &source.rel);
    opened.confirm_unchanged()?;
    apply_attrs(&file, &opened.before).map_err(dest_err("set attributes on", target))?;
    staged.marked = set_owner_mark(&file, writer, &sha256).map_err(dest_err("mark", target))?;
    staged.other_fs = file.metadata().map_err(dest_err("stat", target))?.dev() != root_dev;
    if staged.other_fs {
        file.sync_all().map_err(dest_err("fsync", target))?;
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

/// The ownership mark of a file, if it has one.
fn owner_mark(path: &Path) -> Option<String> {
    let name = CString::new(OWNER_XATTR).expect("no NUL");
    let path = cstring(path).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: valid buffers for the call's duration.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

fn open_temp(dir: &Path, target: &Path) -> io::Result<(File, Option<PathBuf>)> {
    let tmpfile = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(0o600)
        .open(dir);
    match tmpfile {
        Ok(file) => Ok((file, None)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let temp = dir.join(format!(
                ".cutoverfs-tmp.{}.{}.{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                name.chars().take(64).collect::<String>()
            ));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
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
                fsync_parent(&target).map_err(dest_err("fsync directory of", &target))?;
            }
            let written = PutOutcome::Written {
                sha256: staged.sha256.clone(),
                size: staged.size,
                etag: Some(stamp_of(&staged.file, &target)?),
            };
            return Ok((written, staged));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(dest_err("link", &target)(e)),
    }
    let Some((size, existing)) =
        hash_existing(&target).map_err(dest_err("read existing", &target))?
    else {
        let reason = "dest holds something that is not a regular file".to_string();
        return Ok((PutOutcome::Conflict { reason }, staged));
    };
    // Ours: a hash we wrote here, or our mark, whatever the bytes are now (a copy of ours that
    // was damaged at the dest is rewritten, not left as a conflict).
    let ours = owned.contains(&existing) || is_marked_by(&target, writer);
    if existing == staged.sha256 {
        let file = File::open(&target).map_err(dest_err("open", &target))?;
        if ours {
            // Our object with the right content: bring mode, owner and times up to date (a chmod
            // or touch of the source sends the file back here). A foreign one is left as it is.
            apply_attrs(&file, &staged.source).map_err(dest_err("set attributes on", &target))?;
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
        fsync_parent(&target).map_err(dest_err("fsync directory of", &target))?;
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
fn stamp_of(file: &File, target: &Path) -> Result<String, StoreError> {
    let meta = file.metadata().map_err(dest_err("stat", target))?;
    Ok(super::local_stamp(&meta))
}

/// Whether the file at `path` carries this manifest's mark.
fn is_marked_by(path: &Path, writer: &str) -> bool {
    owner_mark(path).is_some_and(|mark| {
        mark.strip_prefix(writer)
            .is_some_and(|rest| rest.starts_with(':'))
    })
}

/// Removes `path` if it is an empty directory. A directory renamed or removed through the mount
/// stays at the dest as an empty directory (directories are not owned objects); a file the
/// application later creates under that name must not be a conflict forever. An empty
/// directory holds nothing to lose, and the kernel refuses to remove one that is not empty.
fn remove_empty_dir(path: &Path) -> bool {
    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    is_dir && std::fs::remove_dir(path).is_ok()
}

/// Makes the staged file visible at `target` unless something is already there.
fn link_no_replace(file: &File, temp_name: Option<&Path>, target: &Path) -> io::Result<()> {
    let Some(temp) = temp_name else {
        return link_unnamed(file, target);
    };
    rename_no_replace(temp, target)
}

/// Gives an O_TMPFILE file its name. `AT_EMPTY_PATH` links the descriptor itself (it needs
/// CAP_DAC_READ_SEARCH, which root has); otherwise the same link goes through /proc.
fn link_unnamed(file: &File, target: &Path) -> io::Result<()> {
    let dest = cstring(target)?;
    // SAFETY: a descriptor we own and NUL-terminated paths; linkat does not keep them.
    let by_fd = check(unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dest.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    });
    match by_fd {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
            let proc_path = cstring(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
            // SAFETY: as above.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    dest.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
        }
        other => other,
    }
}

fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let (from_c, to_c) = (cstring(from)?, cstring(to)?);
    // SAFETY: two NUL-terminated paths.
    let renamed = check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    });
    match renamed {
        // No RENAME_NOREPLACE on this file system: link() also refuses an existing name.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
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
fn replace_own_object(staged: &Staged, target: &Path) -> Result<(), StoreError> {
    let temp = match &staged.temp_name {
        Some(named) => named.clone(),
        None => {
            let temp = target.with_file_name(format!(
                ".cutoverfs-replace.{}.{}",
                std::process::id(),
                target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            let _ = std::fs::remove_file(&temp);
            link_no_replace(&staged.file, None, &temp).map_err(dest_err("link", &temp))?;
            temp
        }
    };
    std::fs::rename(&temp, target).map_err(dest_err("rename over", target))
}

/// Size and SHA-256 of a regular file at `path`; None when it is something else.
fn hash_existing(path: &Path) -> io::Result<Option<(u64, String)>> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let (size, sha) = crate::util::sha256_of(&file)?;
    Ok(Some((size, sha)))
}

fn fsync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Creates `dir` and any missing parents below `root`. New directory entries become durable with
/// the next sync of the file system (the put that needed them waits for it).
fn create_dirs(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(root);
    if parent != dir {
        create_dirs(root, parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
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
