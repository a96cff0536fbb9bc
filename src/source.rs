//! The legacy local tree (DESIGN §2 "source"), reached through a directory descriptor.
//!
//! Owns: opening and stat-ing files below the source root, and proving that a file did not
//! change while it was read (§4.4). It may not write to the source: cutoverfs never changes a
//! local file outside `purge` and the mount's own write path.
//!
//! Everything is reached through the root's descriptor (`Beneath`: no path below it can lead
//! out through `..` or a symlink, even one swapped in mid-copy). So the same code keeps working
//! when a FUSE mount later hides the directory behind itself (the fd still reaches the real
//! tree).

use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::beneath::Beneath;

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
    pub nlink: u64,
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
            nlink: m.nlink(),
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
            // nlink_t is u64 here but u32 on other Linux targets.
            #[allow(clippy::useless_conversion)]
            nlink: u64::from(st.st_nlink),
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
    root: Beneath,
}

impl SourceTree {
    /// Opens the root directory; from then on it is reached through the descriptor.
    pub fn open(root: &Path) -> io::Result<Self> {
        Self::open_as(root, root)
    }

    /// Opens the directory at `reach` (e.g. a running daemon's `/proc/PID/fd/N`), known to the
    /// operator as `root`.
    pub fn open_as(reach: &Path, root: &Path) -> io::Result<Self> {
        Ok(SourceTree {
            display: root.to_path_buf(),
            root: Beneath::open_root(reach)?,
        })
    }

    /// The root's descriptor (another process reaches the tree as `/proc/PID/fd/N`).
    pub fn dir_fd(&self) -> std::os::fd::RawFd {
        self.root.root_fd()
    }

    /// The path the operator gave, for messages.
    pub fn display_root(&self) -> &Path {
        &self.display
    }

    /// `lstat` below the root ("" is the root itself); never leaves the root (`Beneath`).
    pub fn stat_at(&self, rel: &Path) -> io::Result<libc::stat> {
        self.root.stat(rel)
    }

    /// Opens `rel` below the root with these flags (never following a symlink, never leaving
    /// the root); O_CREAT takes `mode` from `open_new`.
    pub fn open_at(&self, rel: &Path, flags: libc::c_int) -> io::Result<File> {
        self.root.open(rel, flags, 0)
    }

    /// Creates (O_CREAT) and opens `rel` with `mode`.
    pub fn open_new(&self, rel: &Path, flags: libc::c_int, mode: u32) -> io::Result<File> {
        self.root.open(rel, flags | libc::O_CREAT, mode)
    }

    /// An unnamed file (O_TMPFILE) in the directory `dir`: nothing is visible until linked.
    pub fn open_new_unnamed(&self, dir: &Path, mode: u32) -> io::Result<File> {
        self.root.open(dir, libc::O_TMPFILE | libc::O_RDWR, mode)
    }

    /// The directory `rel` as an `O_PATH` descriptor.
    pub fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.root.dir(rel)
    }

    /// The directory holding `rel` and its last name, for the `*at` calls of the write path.
    pub fn parent(&self, rel: &Path) -> io::Result<(OwnedFd, CString)> {
        self.root.parent(rel)
    }

    /// The tree below the root, for the changes only purge and the mount's write path make.
    pub fn beneath(&self) -> &Beneath {
        &self.root
    }

    /// `renameat2` of `from` to `to` below the root, with these flags (RENAME_NOREPLACE...).
    pub fn rename(&self, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
        self.root.rename(from, to, flags)
    }

    /// Removes the file (not directory) `rel`.
    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        self.root.unlink(rel)
    }

    /// The entries of the directory `rel`.
    pub fn read_dir(&self, rel: &Path) -> io::Result<std::fs::ReadDir> {
        self.root.read_dir(rel)
    }

    /// The target of a symlink below the root.
    pub fn read_link_at(&self, rel: &Path) -> io::Result<std::ffi::OsString> {
        self.root.read_link(rel)
    }

    /// Space and inode figures of the file system holding the tree.
    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: our descriptor and a statvfs buffer.
        let rc = unsafe { libc::fstatvfs(self.dir_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatvfs filled the buffer.
        Ok(unsafe { st.assume_init() })
    }

    /// Opens a regular file for copying (never through a symlink, never outside the root).
    pub fn open_file(self: &Arc<Self>, rel: &str) -> io::Result<OpenedSource> {
        let file = self.open_at(Path::new(rel), libc::O_RDONLY)?;
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
            rel: PathBuf::from(rel),
        })
    }
}

/// An open source file together with what it looked like when opened.
#[derive(Debug)]
pub struct OpenedSource {
    pub file: File,
    pub before: Attrs,
    tree: Arc<SourceTree>,
    rel: PathBuf,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("source changed while it was copied ({0})")]
pub struct SourceChanged(pub &'static str);

impl OpenedSource {
    /// What the path names now, without following a symlink.
    fn attrs_at_path(&self) -> io::Result<Attrs> {
        Ok(Attrs::from_stat(&self.tree.stat_at(&self.rel)?))
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
