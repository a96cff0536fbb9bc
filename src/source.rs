//! The legacy local tree (DESIGN §2 "source"), reached through a directory descriptor.
//!
//! Owns: opening and stat-ing files below the source root, and proving that a file did not
//! change while it was read (§4.4). It may not write to the source: cutoverfs never changes a
//! local file outside `purge` and the mount's own write path.
//!
//! Everything is reached through the root's descriptor: files with `openat`/`fstatat` on it,
//! directory walks through `/proc/self/fd/<root fd>/...`. So the same code keeps working when a
//! FUSE mount later hides the directory behind itself (the fd still reaches the real tree).

use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The attributes the application sees and that decide whether a file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    pub size: u64,
    pub mtime_ns: i64,
    pub atime_ns: i64,
    pub ctime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub ino: u64,
    pub dev: u64,
}

impl Attrs {
    pub fn from_metadata(m: &Metadata) -> Self {
        Attrs {
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            atime_ns: m.atime() * 1_000_000_000 + m.atime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    pub fn from_stat(st: &libc::stat) -> Self {
        Attrs {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            atime_ns: st.st_atime * 1_000_000_000 + st.st_atime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }

    /// Same content as far as the file system can tell: a write changes size, mtime or ctime,
    /// and a rename-over changes the inode.
    fn same_content_as(&self, other: &Attrs) -> bool {
        self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.ino == other.ino
            && self.dev == other.dev
    }
}

#[derive(Debug)]
pub struct SourceTree {
    display: PathBuf,
    _root: OwnedFd,
    base: PathBuf,
}

impl SourceTree {
    /// Opens the root directory; from then on it is reached through the descriptor.
    pub fn open(root: &Path) -> io::Result<Self> {
        Self::open_as(root, root)
    }

    /// Opens the directory at `reach` (e.g. a running daemon's `/proc/PID/fd/N`), known to the
    /// operator as `root`.
    pub fn open_as(reach: &Path, root: &Path) -> io::Result<Self> {
        let dir = File::open(reach)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", reach.display()),
            ));
        }
        let fd: OwnedFd = dir.into();
        let base = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Ok(SourceTree {
            display: root.to_path_buf(),
            _root: fd,
            base,
        })
    }

    /// The root's descriptor, for the mount's write path (`*at` calls below the root).
    pub fn dir_fd(&self) -> std::os::fd::RawFd {
        self._root.as_raw_fd()
    }

    /// The path the operator gave, for messages.
    pub fn display_root(&self) -> &Path {
        &self.display
    }

    /// A path that reaches `rel` through the root descriptor.
    pub fn path_of(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.base.clone()
        } else {
            self.base.join(rel)
        }
    }

    pub fn lstat(&self, rel: &str) -> io::Result<Metadata> {
        std::fs::symlink_metadata(self.path_of(rel))
    }

    /// `fstatat` below the root without following a final symlink ("" is the root itself).
    pub fn stat_at(&self, rel: &Path) -> io::Result<libc::stat> {
        let rel = c_rel(rel)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a NUL-terminated relative path, our directory descriptor and a stat buffer.
        let rc = unsafe {
            libc::fstatat(
                self._root.as_raw_fd(),
                rel.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatat filled the buffer.
        Ok(unsafe { st.assume_init() })
    }

    /// `openat` below the root with these flags (never following a final symlink).
    pub fn open_at(&self, rel: &Path, flags: libc::c_int) -> io::Result<File> {
        let rel = c_rel(rel)?;
        // SAFETY: a NUL-terminated relative path and a directory descriptor we own.
        let fd = unsafe {
            libc::openat(
                self._root.as_raw_fd(),
                rel.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat just returned this descriptor to us.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The target of a symlink below the root.
    pub fn read_link_at(&self, rel: &Path) -> io::Result<std::ffi::OsString> {
        std::fs::read_link(self.path_of_os(rel)).map(|p| p.into_os_string())
    }

    /// Like `path_of`, for names that need not be UTF-8.
    pub fn path_of_os(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.base.clone()
        } else {
            self.base.join(rel)
        }
    }

    /// Space and inode figures of the file system holding the tree.
    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: our descriptor and a statvfs buffer.
        let rc = unsafe { libc::fstatvfs(self._root.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatvfs filled the buffer.
        Ok(unsafe { st.assume_init() })
    }

    /// Opens a regular file for copying, refusing to follow a symlink at the last component.
    /// `openat` on the root descriptor: no path walk through /proc for every file.
    pub fn open_file(self: &Arc<Self>, rel: &str) -> io::Result<OpenedSource> {
        let rel = CString::new(rel)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: a NUL-terminated relative path and a directory descriptor we own.
        let fd = unsafe {
            libc::openat(
                self._root.as_raw_fd(),
                rel.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat just returned this descriptor to us.
        let file = unsafe { File::from_raw_fd(fd) };
        let before = Attrs::from_metadata(&file.metadata()?);
        if before.mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(OpenedSource {
            file,
            before,
            tree: self.clone(),
            rel,
        })
    }
}

/// A relative path for the `*at` calls; the root itself is ".".
pub fn c_rel(rel: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = rel.as_os_str().as_bytes();
    CString::new(if bytes.is_empty() { b"." } else { bytes })
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// An open source file together with what it looked like when opened.
#[derive(Debug)]
pub struct OpenedSource {
    pub file: File,
    pub before: Attrs,
    tree: Arc<SourceTree>,
    rel: CString,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("source changed while it was copied ({0})")]
pub struct SourceChanged(pub &'static str);

impl OpenedSource {
    /// What the path names now, without following a symlink.
    fn attrs_at_path(&self) -> io::Result<Attrs> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a NUL-terminated relative path, our directory descriptor and a stat buffer.
        let rc = unsafe {
            libc::fstatat(
                self.tree._root.as_raw_fd(),
                self.rel.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatat filled the buffer.
        Ok(Attrs::from_stat(unsafe { &st.assume_init() }))
    }

    /// Called after the last byte was read: the copy is only good if the open file did not
    /// change meanwhile and the path still names that same file.
    pub fn confirm_unchanged(&self) -> Result<(), SourceChanged> {
        let after = self
            .file
            .metadata()
            .map(|m| Attrs::from_metadata(&m))
            .map_err(|_| SourceChanged("fstat failed"))?;
        if !self.before.same_content_as(&after) {
            return Err(SourceChanged("size, mtime or ctime moved"));
        }
        match self.attrs_at_path() {
            Ok(now) if now.same_content_as(&after) => Ok(()),
            Ok(_) => Err(SourceChanged("the path now names another file")),
            Err(_) => Err(SourceChanged("the path was removed")),
        }
    }
}
