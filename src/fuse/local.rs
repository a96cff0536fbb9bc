//! Changes to the local tree on behalf of the application: the `*at` system calls below the
//! source root's descriptor that the write path makes. Nothing here knows about the manifest
//! or the dest; `writes` decides when each is made.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use crate::manifest::{Kind, LocalFacts};
use crate::source::{Attrs, SourceTree};

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates and opens a file (the caller's flags, O_CREAT added, never following a symlink).
pub fn create(tree: &SourceTree, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
    tree.open_new(rel, flags, mode)
}

pub fn mkdir(tree: &SourceTree, rel: &Path, mode: u32) -> io::Result<()> {
    tree.beneath().mkdir(rel, mode)?;
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
    let (dir, name) = tree.parent(rel)?;
    // SAFETY: as in `mkdir`.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })?;
    exact_mode(tree, rel, mode)
}

pub fn symlink(tree: &SourceTree, target: &Path, rel: &Path) -> io::Result<()> {
    let (dir, name) = tree.parent(rel)?;
    let target = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated target, a directory descriptor below the root and a name.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

pub fn unlink(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    tree.unlink(rel)
}

pub fn rmdir(tree: &SourceTree, rel: &Path) -> io::Result<()> {
    tree.beneath().rmdir(rel)
}

/// `renameat2` below the root, with the caller's flags (RENAME_NOREPLACE and the like).
pub fn rename(tree: &SourceTree, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    tree.rename(from, to, flags)
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

/// The directory holding `rel` and its last name ("." of the root for the root itself), for
/// the `*at` calls that act on `rel` without following it.
fn at(tree: &SourceTree, rel: &Path) -> io::Result<(OwnedFd, CString)> {
    if rel.as_os_str().is_empty() {
        return Ok((tree.dir(rel)?, CString::new(".").expect("no NUL")));
    }
    tree.parent(rel)
}

pub fn chown(tree: &SourceTree, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let (dir, name) = at(tree, rel)?;
    // SAFETY: a directory descriptor below the root and a name; -1 leaves an id as it is.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn chmod(tree: &SourceTree, rel: &Path, mode: u32) -> io::Result<()> {
    tree.beneath().chmod(rel, mode)
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
    let (dir, name) = at(tree, rel)?;
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: as in `chown`, and two timespecs.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Sets the times of an open file.
pub fn set_file_times(file: &File, atime: SetTime, mtime: SetTime) -> io::Result<()> {
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: a descriptor we own and two timespecs.
    check(unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) })
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
    tree.open_new_unnamed(dir, 0o600)
}

/// Gives an unnamed file its name; fails with EEXIST if the name is taken.
pub fn link_unnamed(tree: &SourceTree, file: &File, rel: &Path) -> io::Result<()> {
    tree.beneath().link_file(file, rel)
}
