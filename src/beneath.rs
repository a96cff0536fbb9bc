//! Paths below a root directory that can never lead out of it (issue 16.9): every lookup is
//! resolved by the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so neither a
//! `..` nor a symlink swapped into any component of a path, mid-copy or ever, reaches a file
//! outside the root. Where the kernel has no `openat2` (before Linux 5.6), the same rule is
//! kept by walking the path one component at a time with `O_NOFOLLOW`.
//!
//! Owns the root's descriptor and the resolution rules; it knows nothing of manifests or
//! stores. A final symlink is never followed either: opening one fails with ELOOP, and `stat`
//! describes the link itself.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct Beneath {
    root: OwnedFd,
}

/// Set once the kernel said it has no openat2.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

impl Beneath {
    /// The directory at `path` (followed as given: it is the operator's choice of root).
    pub fn open_root(path: &Path) -> io::Result<Beneath> {
        let dir = File::open(path)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Beneath { root: dir.into() })
    }

    pub fn root_fd(&self) -> RawFd {
        self.root.as_raw_fd()
    }

    /// Opens `rel` ("" is the root) with `flags` (O_CREAT takes `mode`), never following a
    /// symlink, never leaving the root.
    pub fn open(&self, rel: &Path, flags: libc::c_int, mode: u32) -> io::Result<File> {
        let fd = self.open_fd(rel, flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode)?;
        // SAFETY: a descriptor just opened for us.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// `lstat` of `rel` below the root ("" is the root itself).
    pub fn stat(&self, rel: &Path) -> io::Result<libc::stat> {
        let fd = self.open_fd(rel, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0)?;
        // SAFETY: a descriptor just opened for us, closed when dropped.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: our descriptor and a stat buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat filled the buffer.
        Ok(unsafe { st.assume_init() })
    }

    /// The directory `rel` ("" is the root), as an `O_PATH` descriptor for `*at` calls.
    pub fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = self.open_fd(rel, flags, 0)?;
        // SAFETY: a descriptor just opened for us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The directory holding `rel` and the last component's name, for `*at` calls on `rel`
    /// itself (unlink, rename, mkdir, link, chmod of what may be a symlink...).
    pub fn parent(&self, rel: &Path) -> io::Result<(OwnedFd, CString)> {
        check_relative(rel)?;
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = CString::new(name.as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok((self.dir(parent)?, name))
    }

    /// The entries of the directory `rel`; reading them resolves nothing by path.
    pub fn read_dir(&self, rel: &Path) -> io::Result<std::fs::ReadDir> {
        let dir = self.open(rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        // The magic link names the directory just opened, not a path to walk again.
        std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
    }

    /// The target of the symlink `rel`.
    pub fn read_link(&self, rel: &Path) -> io::Result<std::ffi::OsString> {
        let (dir, name) = self.parent(rel)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: our directory descriptor, a NUL-terminated name and a buffer of its length.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(buf))
    }

    /// Creates the directory `rel` (its parent must exist).
    pub fn mkdir(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        // SAFETY: a directory descriptor below the root and a NUL-terminated name.
        check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })
    }

    /// Removes the file (not directory) `rel`.
    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        self.unlink_at(rel, 0)
    }

    /// Removes the empty directory `rel`.
    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        self.unlink_at(rel, libc::AT_REMOVEDIR)
    }

    fn unlink_at(&self, rel: &Path, flags: libc::c_int) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        // SAFETY: as in `mkdir`.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
    }

    /// `renameat2` of `from` to `to`, with these flags (RENAME_NOREPLACE, RENAME_EXCHANGE...).
    pub fn rename(&self, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        // SAFETY: two directory descriptors below the root and two NUL-terminated names.
        check(unsafe {
            libc::renameat2(
                from_dir.as_raw_fd(),
                from_name.as_ptr(),
                to_dir.as_raw_fd(),
                to_name.as_ptr(),
                flags,
            )
        })
    }

    /// `linkat` of `from` to the new name `to` (a hard link; neither is followed).
    pub fn link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        // SAFETY: two directory descriptors below the root and two NUL-terminated names.
        check(unsafe {
            libc::linkat(
                from_dir.as_raw_fd(),
                from_name.as_ptr(),
                to_dir.as_raw_fd(),
                to_name.as_ptr(),
                0,
            )
        })
    }

    /// Gives an open file (an unnamed O_TMPFILE one) the name `rel`; EEXIST if it is taken.
    pub fn link_file(&self, file: &File, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
        // SAFETY: a path naming our descriptor, a directory below the root and a name.
        check(unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })
    }

    /// Changes the mode of `rel` (a symlink has none: nothing is done).
    pub fn chmod(&self, rel: &Path, mode: u32) -> io::Result<()> {
        // fchmodat cannot be told not to follow: the change goes through the descriptor of
        // the inode itself, held without following anything.
        let held = self.open(rel, libc::O_PATH, 0)?;
        if held.metadata()?.file_type().is_symlink() {
            return Ok(());
        }
        let by_fd = CString::new(format!("/proc/self/fd/{}", held.as_raw_fd())).expect("no NUL");
        // SAFETY: a NUL-terminated path naming our own descriptor.
        check(unsafe { libc::chmod(by_fd.as_ptr(), (mode & 0o7777) as libc::mode_t) })
    }

    /// The value of the extended attribute `name` of `rel` itself (not of what a symlink
    /// names), if it has one.
    pub fn xattr(&self, rel: &Path, name: &str) -> Option<Vec<u8>> {
        let held = self.open(rel, libc::O_PATH, 0).ok()?;
        let by_fd = CString::new(format!("/proc/self/fd/{}", held.as_raw_fd())).ok()?;
        let name = CString::new(name).ok()?;
        let mut buf = [0u8; 256];
        // SAFETY: NUL-terminated path and name, and a buffer of its length.
        let n = unsafe {
            libc::getxattr(
                by_fd.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n > 0).then(|| buf[..n as usize].to_vec())
    }

    fn open_fd(&self, rel: &Path, flags: libc::c_int, mode: u32) -> io::Result<RawFd> {
        check_relative(rel)?;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match openat2_beneath(self.root_fd(), rel, flags, mode) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                opened => return opened,
            }
        }
        open_walking(self.root_fd(), rel, flags, mode)
    }
}

/// Refuses what no path below a root may hold: an absolute path, `..` and `.` components,
/// empty components. EXDEV, as openat2 says of a path that would leave its root.
fn check_relative(rel: &Path) -> io::Result<()> {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Ok(());
    }
    let bad = bytes.starts_with(b"/")
        || bytes
            .split(|b| *b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..");
    if bad {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    Ok(())
}

fn c_path(rel: &Path) -> io::Result<CString> {
    let bytes = rel.as_os_str().as_bytes();
    CString::new(if bytes.is_empty() { b"." } else { bytes })
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn openat2_beneath(dir: RawFd, rel: &Path, flags: libc::c_int, mode: u32) -> io::Result<RawFd> {
    let path = c_path(rel)?;
    // SAFETY: open_how is a plain C struct; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    // openat2 refuses anything but permission bits here (a FUSE create's mode carries S_IFREG).
    how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        (mode & 0o7777) as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: our directory descriptor, a NUL-terminated path, an open_how and its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as RawFd)
}

/// The same rule without openat2: each directory component opened with O_NOFOLLOW from the
/// one before (`check_relative` already refused `..`).
fn open_walking(root: RawFd, rel: &Path, flags: libc::c_int, mode: u32) -> io::Result<RawFd> {
    let mut parts: Vec<&[u8]> = rel
        .as_os_str()
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let last = parts.pop();
    // SAFETY: duplicating our own descriptor.
    let mut dir =
        unsafe { OwnedFd::from_raw_fd(check_fd(libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0))?) };
    for part in parts {
        let name = CString::new(part).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let step = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a directory descriptor we own and a NUL-terminated name.
        let fd = check_fd(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), step) })?;
        // SAFETY: a descriptor just opened for us.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    let name = match last {
        Some(last) => CString::new(last).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        None => CString::new(".").expect("no NUL"),
    };
    // SAFETY: a directory descriptor we own, a NUL-terminated name, flags and mode.
    check_fd(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_fd(fd: libc::c_int) -> io::Result<RawFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_leads_out_of_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/f"), b"inside").unwrap();
        std::fs::write(tmp.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("up")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("a/link")).unwrap();
        let beneath = Beneath::open_root(&root).unwrap();
        assert!(beneath.open(Path::new("a/f"), libc::O_RDONLY, 0).is_ok());
        for (rel, errno) in [
            ("up/outside", libc::ELOOP),
            ("a/link", libc::ELOOP),
            ("a/../../outside", libc::EXDEV),
            ("/etc/passwd", libc::EXDEV),
            ("a//f", libc::EXDEV),
            ("./a/f", libc::EXDEV),
        ] {
            let err = beneath.open(Path::new(rel), libc::O_RDONLY, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(errno), "{rel}: {err}");
        }
        // stat describes a link itself; read_link reads it.
        let st = beneath.stat(Path::new("a/link")).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(
            beneath.read_link(Path::new("a/link")).unwrap(),
            "../outside"
        );
        assert!(beneath.stat(Path::new("up/outside")).is_err());
        // The walking fallback keeps the same rule (a link where a directory is expected is
        // "not a directory" to it).
        for (rel, errno) in [("up/outside", libc::ENOTDIR), ("a/link", libc::ELOOP)] {
            let err =
                open_walking(beneath.root_fd(), Path::new(rel), libc::O_RDONLY, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(errno), "{rel}");
        }
        let names: Vec<_> = beneath
            .read_dir(Path::new("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2);
    }
}
