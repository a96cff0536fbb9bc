//! Changes to the local tree on behalf of the application: the `*at` system calls below the
//! source root's descriptor that the write path makes. Nothing here knows about the manifest
//! or the dest; `writes` decides when each is made.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use crate::manifest::{Kind, LocalFacts};
use crate::source::{c_rel, Attrs, SourceTree};

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates and opens a file (the caller's flags, O_CREAT added, never following a symlink).
pub fn create(tree: &SourceTree, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let c = c_rel(rel)?;
    // SAFETY: a NUL-terminated relative path and the root's descriptor.
    let fd = unsafe {
        libc::openat(
            tree.dir_fd(),
            c.as_ptr(),
            flags | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor to us.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn mkdir(tree: &SourceTree, rel: &Path, mode: u32) -> io::Result<()> {
    let c = c_rel(rel)?;
    // SAFETY: as in `create`.
    check(unsafe { libc::mkdirat(tree.dir_fd(), c.as_ptr(), mode as libc::mode_t) })?;
    exact_mode(tree, rel, mode)
}

/// Gives something just made exactly the mode the caller asked for (with the caller's umask
/// already applied): the daemon's own umask must not mask it again. A set-group-ID bit that a
/// directory inherited from its parent stays.
pub fn exact_mode(tree: &SourceTree, rel: &Path, mode: u32) -> io::Result<()> {
    let st = tree.stat_at(rel)?;
    let inherited = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        st.st_mode & libc::S_ISGID
    } else {
        0
    };
    let wanted = (mode & 0o7777) | inherited;
    if st.st_mode & 0o7777 == wanted {
        return Ok(());
    }
    chmod(tree, rel, wanted)
}

pub fn mknod(tree: &SourceTree, rel: &Path, mode: u32, rdev: u32) -> io::Result<()> {
    let c = c_rel(rel)?;
    // SAFETY: as in `create`.
    check(unsafe {
        libc::mknodat(
            tree.dir_fd(),
            c.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })?;
    exact_mode(tree, rel, mode)
}

pub fn symlink(tree: &SourceTree, target: &Path, rel: &Path) -> io::Result<()> {
    let c = c_rel(rel)?;
    let target = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: two NUL-terminated paths and the root's descriptor.
    check(unsafe { libc::symlinkat(target.as_ptr(), tree.dir_fd(), c.as_ptr()) })
}

pub fn unlink(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    let c = c_rel(rel)?;
    // SAFETY: as in `create`.
    check(unsafe { libc::unlinkat(tree.dir_fd(), c.as_ptr(), 0) })
}

pub fn rmdir(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    let c = c_rel(rel)?;
    // SAFETY: as in `create`.
    check(unsafe { libc::unlinkat(tree.dir_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
}

/// `renameat2` below the root, with the caller's flags (RENAME_NOREPLACE and the like).
pub fn rename(tree: &SourceTree, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (from, to) = (c_rel(from)?, c_rel(to)?);
    // SAFETY: two NUL-terminated relative paths and the root's descriptor.
    check(unsafe {
        libc::renameat2(
            tree.dir_fd(),
            from.as_ptr(),
            tree.dir_fd(),
            to.as_ptr(),
            flags,
        )
    })
}

/// Hands a new file to the caller (the daemon runs as root): its user, and its group, or the
/// directory's where the directory passes its group on (set-group-ID).
pub fn give_to(tree: &SourceTree, rel: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let dir = tree.stat_at(parent)?;
    let gid = if dir.st_mode & libc::S_ISGID != 0 {
        dir.st_gid
    } else {
        gid
    };
    chown(tree, rel, Some(uid), Some(gid))
}

pub fn chown(tree: &SourceTree, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let c = c_rel(rel)?;
    // SAFETY: as in `create`; -1 leaves an id as it is.
    check(unsafe {
        libc::fchownat(
            tree.dir_fd(),
            c.as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH,
        )
    })
}

pub fn chmod(tree: &SourceTree, rel: &Path, mode: u32) -> io::Result<()> {
    if tree.stat_at(rel)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        // Links have no mode of their own on Linux.
        return Ok(());
    }
    let c = c_rel(rel)?;
    // SAFETY: as in `create`; the last component is not a link (checked above).
    check(unsafe {
        libc::fchmodat(
            tree.dir_fd(),
            c.as_ptr(),
            (mode & 0o7777) as libc::mode_t,
            0,
        )
    })
}

/// A time to set: a given one, now, or left as it is.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    At(SystemTime),
    Now,
    Keep,
}

fn timespec(time: SetTime) -> libc::timespec {
    match time {
        SetTime::Keep => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        SetTime::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        SetTime::At(t) => {
            let (sec, nsec) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let (s, n) = (-(d.as_secs() as i64), d.subsec_nanos() as i64);
                    if n == 0 {
                        (s, 0)
                    } else {
                        (s - 1, 1_000_000_000 - n)
                    }
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

pub fn set_times(tree: &SourceTree, rel: &Path, atime: SetTime, mtime: SetTime) -> io::Result<()> {
    let c = c_rel(rel)?;
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: as in `create`, and two timespecs.
    check(unsafe {
        libc::utimensat(
            tree.dir_fd(),
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Sets the times of an open file.
pub fn set_file_times(file: &File, atime: SetTime, mtime: SetTime) -> io::Result<()> {
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: a descriptor we own and two timespecs.
    check(unsafe { libc::futimens(std::os::fd::AsRawFd::as_raw_fd(file), times.as_ptr()) })
}

pub fn truncate(tree: &SourceTree, rel: &Path, size: u64) -> io::Result<()> {
    tree.open_at(rel, libc::O_WRONLY)?.set_len(size)
}

/// Makes a directory's entries durable.
pub fn sync_dir(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    tree.open_at(rel, libc::O_RDONLY | libc::O_DIRECTORY)?
        .sync_all()
}

/// What the local tree holds at `rel`, as the manifest records it; None when nothing is there.
pub fn facts(tree: &SourceTree, rel: &Path) -> io::Result<Option<LocalFacts>> {
    match tree.stat_at(rel) {
        Ok(st) => Ok(Some(facts_of(&Attrs::from_stat(&st)))),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn facts_of(attrs: &Attrs) -> LocalFacts {
    let kind = match attrs.mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Special,
    };
    LocalFacts {
        kind,
        size: if kind == Kind::Dir { 0 } else { attrs.size },
        mtime_ns: attrs.mtime_ns,
        mode: attrs.mode,
        uid: attrs.uid,
        gid: attrs.gid,
    }
}

/// Whether the local tree has anything at `rel`.
pub fn exists(tree: &SourceTree, rel: &Path) -> io::Result<bool> {
    Ok(facts(tree, rel)?.is_some())
}

/// An unnamed file in directory `dir` (O_TMPFILE): nothing is visible until it is linked.
pub fn unnamed_file(tree: &SourceTree, dir: &Path) -> io::Result<File> {
    let c = c_rel(dir)?;
    // SAFETY: as in `create`.
    let fd = unsafe {
        libc::openat(
            tree.dir_fd(),
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor to us.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Gives an unnamed file its name; fails with EEXIST if the name is taken.
pub fn link_unnamed(tree: &SourceTree, file: &File, rel: &Path) -> io::Result<()> {
    let from = CString::new(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ))
    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let to = c_rel(rel)?;
    // SAFETY: NUL-terminated paths and the root's descriptor.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            tree.dir_fd(),
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}
