//! `file://` dest: a private local directory.
//!
//! A file is written to an unnamed temporary file (`O_TMPFILE`) in its target directory, hashed
//! in the same pass, given the source's mode, owner and times, fsynced, and only then linked to
//! its name with a call that fails if the name exists (`linkat`), followed by an fsync of the
//! directory. A crash at any point leaves either nothing or the whole file at the key, and no
//! temporary name behind. Where `O_TMPFILE` is unsupported, a dot-named temporary file and
//! `renameat2(RENAME_NOREPLACE)` give the same guarantees (a crash may leave the temporary).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{canonical_path, PublishGuard, PutOutcome, Store, StoreError};
use crate::source::OpenedSource;

/// Bytes between two requests to start write-back, so the final fsync has little left to do.
const WRITEBACK_STEP: u64 = 8 << 20;

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: &Path) -> Result<LocalStore, StoreError> {
        let root = canonical_path(root).map_err(|source| StoreError::Dest {
            op: "resolve",
            target: root.display().to_string(),
            source,
        })?;
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn target(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

#[async_trait]
impl Store for LocalStore {
    fn canonical_url(&self) -> String {
        url::Url::from_file_path(&self.root).map(|u| u.to_string()).unwrap_or_else(|_| self.root.display().to_string())
    }

    fn key_for(&self, rel: &str) -> Result<String, String> {
        // Any name the source file system holds, this one holds too (the UTF-8 rule is the
        // manifest's and applies before a key is asked for).
        Ok(rel.to_string())
    }

    async fn preflight(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        blocking(move || check_writable(&root)).await
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        blocking(move || {
            create_dirs_durably(Path::new("/"), &root).map_err(|source| StoreError::Dest {
                op: "create",
                target: root.display().to_string(),
                source,
            })
        })
        .await
    }

    async fn put(&self, key: &str, source: OpenedSource, guard: &dyn PublishGuard) -> Result<PutOutcome, StoreError> {
        let root = self.root.clone();
        let target = self.target(key);
        let staged = blocking(move || stage(&root, &target, source)).await?;
        guard.before_publish(&staged.sha256).await?;
        let owned = guard.owned_sha256();
        blocking(move || publish(staged, &owned)).await
    }

    async fn existing_size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match std::fs::symlink_metadata(self.target(key)) {
            Ok(meta) => Ok(Some(meta.size())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Dest { op: "stat", target: key.to_string(), source }),
        }
    }

    async fn ensure_dir(&self, rel: &str, mode: u32) -> Result<(), StoreError> {
        let root = self.root.clone();
        let dir = self.target(rel);
        blocking(move || {
            let err = |source| StoreError::Dest { op: "mkdir", target: dir.display().to_string(), source };
            create_dirs_durably(&root, &dir).map_err(err)?;
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777)).map_err(err)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(StoreError::Unusable(format!("copy thread failed: {e}"))))
}

/// A fully written, fsynced file that is not yet visible at its key.
struct Staged {
    file: File,
    /// Set when the fallback named temporary file was used instead of O_TMPFILE.
    temp_name: Option<PathBuf>,
    target: PathBuf,
    sha256: String,
    size: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(temp) = self.temp_name.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

fn dest_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + 'p {
    move |source| StoreError::Dest { op, target: path.display().to_string(), source }
}

fn stage(root: &Path, target: &Path, source: OpenedSource) -> Result<Staged, StoreError> {
    let dir = target.parent().unwrap_or(root);
    create_dirs_durably(root, dir).map_err(dest_err("mkdir", dir))?;
    let (mut file, temp_name) = open_temp(dir, target).map_err(dest_err("create temp in", dir))?;
    let staged = (|| -> Result<(String, u64), StoreError> {
        let (sha256, size) = copy_hashing(&source, &mut file, target)?;
        source.confirm_unchanged()?;
        apply_attrs(&file, &source).map_err(dest_err("set attributes on", target))?;
        file.sync_all().map_err(dest_err("fsync", target))?;
        Ok((sha256, size))
    })();
    let mut staged_file = Staged { file, temp_name, target: target.to_path_buf(), sha256: String::new(), size: 0 };
    let (sha256, size) = staged?;
    staged_file.sha256 = sha256;
    staged_file.size = size;
    Ok(staged_file)
}

fn open_temp(dir: &Path, target: &Path) -> io::Result<(File, Option<PathBuf>)> {
    let tmpfile = OpenOptions::new().write(true).custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC).mode(0o600).open(dir);
    match tmpfile {
        Ok(file) => Ok((file, None)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)) => {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let temp = dir.join(format!(
                ".cutoverfs-tmp.{}.{}.{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                name.chars().take(64).collect::<String>()
            ));
            let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
            Ok((file, Some(temp)))
        }
        Err(e) => Err(e),
    }
}

fn copy_hashing(source: &OpenedSource, out: &mut File, target: &Path) -> Result<(String, u64), StoreError> {
    let mut hasher = Sha256::new();
    let buf_len = source.before.size.clamp(4096, 1 << 20) as usize;
    let mut buf = vec![0u8; buf_len];
    let mut input = &source.file;
    let mut written: u64 = 0;
    let mut flushed_to: u64 = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::SourceRead(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(dest_err("write", target))?;
        written += n as u64;
        if written - flushed_to >= WRITEBACK_STEP {
            start_writeback(out, flushed_to, written - flushed_to);
            flushed_to = written;
        }
    }
    Ok((hex::encode(hasher.finalize()), written))
}

/// Asks the kernel to start writing a range now; the fsync at the end then waits for less.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: a plain syscall on an fd we own; failure only loses the hint.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Mode, owner (when running as root) and times of the source, like `cp -a`.
fn apply_attrs(file: &File, source: &OpenedSource) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let attrs = source.before;
    // SAFETY: syscalls on an fd we own, with plain values.
    unsafe {
        if libc::geteuid() == 0 && libc::fchown(fd, attrs.uid, attrs.gid) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fchmod(fd, attrs.mode & 0o7777) != 0 {
            return Err(io::Error::last_os_error());
        }
        let times = [timespec(attrs.atime_ns), timespec(attrs.mtime_ns)];
        if libc::futimens(fd, times.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) }
}

fn publish(staged: Staged, owned: &[String]) -> Result<PutOutcome, StoreError> {
    let target = staged.target.clone();
    match link_no_replace(&staged.file, staged.temp_name.as_deref(), &target) {
        Ok(()) => {
            fsync_parent(&target).map_err(dest_err("fsync directory of", &target))?;
            return Ok(PutOutcome::Written { sha256: staged.sha256.clone(), size: staged.size, etag: None });
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(dest_err("link", &target)(e)),
    }
    let Some((size, existing)) = hash_existing(&target).map_err(dest_err("read existing", &target))? else {
        return Ok(PutOutcome::Conflict { reason: "dest holds something that is not a regular file".into() });
    };
    if existing == staged.sha256 {
        let ours = owned.contains(&existing);
        return Ok(PutOutcome::AlreadyThere { sha256: existing, size, ours });
    }
    if !owned.contains(&existing) {
        return Ok(PutOutcome::Conflict {
            reason: format!(
                "dest already holds a different file that cutoverfs did not write (size {size}, sha256 {existing})"
            ),
        });
    }
    replace_own_object(&staged, &target)?;
    Ok(PutOutcome::Written { sha256: staged.sha256.clone(), size: staged.size, etag: None })
}

/// Makes the staged file visible at `target` unless something is already there.
fn link_no_replace(file: &File, temp_name: Option<&Path>, target: &Path) -> io::Result<()> {
    match temp_name {
        None => {
            let proc_path = cstring(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
            let dest = cstring(target)?;
            // SAFETY: two NUL-terminated paths; linkat does not keep them.
            let rc = unsafe {
                libc::linkat(libc::AT_FDCWD, proc_path.as_ptr(), libc::AT_FDCWD, dest.as_ptr(), libc::AT_SYMLINK_FOLLOW)
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        Some(temp) => rename_no_replace(temp, target),
    }
}

fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let (from_c, to_c) = (cstring(from)?, cstring(to)?);
    // SAFETY: two NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // No RENAME_NOREPLACE on this file system: link() also refuses an existing name.
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
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
                target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            let _ = std::fs::remove_file(&temp);
            link_no_replace(&staged.file, None, &temp).map_err(dest_err("link", &temp))?;
            temp
        }
    };
    std::fs::rename(&temp, target).map_err(dest_err("rename over", target))?;
    fsync_parent(target).map_err(dest_err("fsync directory of", target))
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

/// Creates `dir` and any missing parents below `root`, fsyncing each parent that gained an
/// entry so the new directories survive a crash.
fn create_dirs_durably(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(root);
    if parent != dir {
        create_dirs_durably(root, parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => fsync_parent(dir),
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
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::W_OK | libc::X_OK, libc::AT_EACCESS) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return unusable(format!("{} is not writable: {err}", existing.display()));
    }
    Ok(())
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}
