//! The tree the mount shows, behind one trait with two implementations:
//!
//! - `source::SourceNamespace`: the daemon's mount over the application's directory: the local
//!   tree, plus what the manifest knows that is no longer (or not yet) local, so purged files
//!   stay where they were;
//! - `replica::ReplicaNamespace`: a replica on a machine without the local tree: the manifest's
//!   rows only, and the dest's verified copies.
//!
//! Owns: names, attributes, listings and where an open is served from (`Route`). Numbers come
//! from `Inodes` (in-memory) and the manifest's rows (`Rows`); open files and their I/O are the
//! core's (`core.rs`, `open.rs`). A namespace never talks to the dest beyond opening a `file://`
//! copy to route to, and never to SQL except through `Rows`.

pub mod replica;
pub mod source;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::inode::{Inodes, NewNumber, ROOT};
use super::records::{Pinned, WriteRecords};

use crate::manifest::{Entry, Kind, Manifest};
use crate::source::{Attrs, SourceTree};
use crate::store::Store;

/// What a name stands for: its inode number and attributes.
#[derive(Debug, Clone)]
pub struct Found {
    pub attr: FileAttr,
    /// The kernel may cache `attr` this long at most (zero for files with several names, whose
    /// link count and ctime change through their other names).
    pub attr_ttl: Option<Duration>,
}

impl Found {
    pub fn ino(&self) -> u64 {
        self.attr.ino.0
    }
}

/// One name in a directory listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: OsString,
    pub found: Found,
}

/// Where an open is served from.
pub enum Route {
    /// The local copy. `fallback`: the file is verified at the dest, but the dest is down or its
    /// copy could not be served (`dest_problem` says why, for the log).
    Local {
        fallback: bool,
        dest_problem: Option<String>,
    },
    /// A `file://` dest copy that is still the one verified.
    DestFile(File, Arc<Entry>),
    /// An object at a remote dest.
    Remote {
        key: String,
        size: u64,
        /// The local copy is still there: it answers when the dest is too slow.
        local_copy: bool,
    },
    /// Not at the dest yet and no local copy here (a replica): wait until a node with the
    /// source copied it.
    NotCopied(String),
}

/// The tree behind the mount (see the module comment for the two kinds).
pub trait Namespace: Send + Sync {
    /// What `name` in the directory `dir` is; ENOENT if nothing.
    fn lookup(&self, dir: &Path, name: &OsStr) -> Result<Found, Errno>;
    /// Attributes of `path`, known to the kernel as `ino`.
    fn attr(&self, path: &Path, ino: u64) -> Result<Found, Errno>;
    /// Every name in the directory `dir`, with its attributes.
    fn list(&self, dir: &Path) -> Result<Vec<Listed>, Errno>;
    /// The target of the symlink `path`.
    fn read_link(&self, path: &Path) -> Result<OsString, Errno>;
    /// The file system's figures for statfs.
    fn statfs(&self) -> Result<libc::statvfs, Errno>;
    /// The local tree, on a mount that has one (None: a replica, which changes nothing).
    fn local(&self) -> Option<&Arc<SourceTree>>;
}

/// Numbers for paths: the one already handed out here, else the row's, else a new one from the
/// manifest's counter, recorded (`records.rs`) so it outlives this mount.
pub struct Numbering {
    pub inodes: Arc<Inodes>,
    /// The manifest's rows as the mount reads them (for the numbers it gave last).
    known: Option<Arc<super::rows::Rows>>,
    manifest: Manifest,
    rt: tokio::runtime::Handle,
    /// Where new numbers are recorded; None on a replica, which keeps them in memory.
    recorder: Option<Recorder>,
}

/// What recording a new number needs: the row is written as the scan would write it.
pub struct Recorder {
    pub records: Arc<WriteRecords>,
    pub source: Arc<SourceTree>,
    pub store: Arc<dyn Store>,
}

impl Numbering {
    pub fn new(
        inodes: Arc<Inodes>,
        manifest: Manifest,
        rt: tokio::runtime::Handle,
        recorder: Option<Recorder>,
    ) -> Numbering {
        Numbering {
            inodes,
            known: None,
            manifest,
            rt,
            recorder,
        }
    }

    /// Numbers given while the manifest does not answer come from `rows` where it can.
    pub fn with_rows(mut self, rows: Arc<super::rows::Rows>) -> Numbering {
        self.known = Some(rows);
        self
    }

    /// `number` of `name` in `dir`, without building its path when the row has a number and
    /// nothing is pinned (a listing's common case). `local`: its local copy's attributes, if
    /// it has one (asked for only when a new number is needed).
    pub fn number_in(
        &self,
        dir: &Path,
        name: &OsStr,
        row: Option<&Entry>,
        local: impl FnOnce() -> Attrs,
    ) -> u64 {
        if let (Some(ino), false) = (row.and_then(|r| r.ino), self.inodes.has_pins()) {
            return ino;
        }
        let attrs = row.is_none().then(local);
        self.number(&child_path(dir, name), row, attrs.as_ref())
    }

    /// The number of `path`, whose row (if any) is `row` and whose local copy (if any) has
    /// `local` attributes.
    pub fn number(&self, path: &Path, row: Option<&Entry>, local: Option<&Attrs>) -> u64 {
        if path.as_os_str().is_empty() {
            return ROOT;
        }
        if let Some(ino) = self.inodes.pinned(path) {
            return ino;
        }
        if let Some(ino) = row.and_then(|r| r.ino) {
            return ino;
        }
        // A path with a row but no number has no local copy to number it by (`local` is
        // asked for only without a row): its row is given the number as it is.
        let (Some(recorder), Some(text)) = (&self.recorder, path.to_str()) else {
            return self.inodes.pin_in_memory(path);
        };
        if row.is_none() && local.is_none() {
            return self.inodes.pin_in_memory(path);
        }
        let manifest = &self.manifest;
        if manifest.reachability().is_down() {
            // No row to read now (issue 7.5): the number the manifest gave last for this path,
            // else one of this mount's own (the path gets the manifest's again once the kernel
            // has forgotten this one).
            return self
                .known
                .as_ref()
                .and_then(|rows| rows.known_number(text))
                .unwrap_or_else(|| self.inodes.pin_in_memory(path));
        }
        let (ino, fresh) = self.inodes.pin_with(path, || {
            // Decided while no one else can number this path: a row may have appeared since the
            // caller read none (the write path's record, or the scan, committed meanwhile), and
            // its number wins while the kernel has not seen ours.
            let row = match manifest.entry_now(text) {
                Some(row) => row,
                None => self.rt.block_on(manifest.entry(text)),
            };
            if let Ok(Some(theirs)) = row.map(|row| row.and_then(|row| row.ino)) {
                return NewNumber::Theirs(theirs);
            }
            match self.rt.block_on(async { manifest.note(manifest.new_ino().await) }) {
                Ok(ino) => NewNumber::Ours(ino as u64),
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "no inode number from the manifest; this mount keeps its own");
                    NewNumber::MemoryOnly
                }
            }
        });
        if fresh {
            let pinned = match local {
                Some(local) => {
                    let dir = path.parent().unwrap_or(Path::new(""));
                    let name = path.file_name().unwrap_or_default();
                    Pinned::New(crate::engine::scan::describe(
                        &recorder.source,
                        &*recorder.store,
                        dir.to_str().unwrap_or_default(),
                        name,
                        local,
                    ))
                }
                None => Pinned::Row(text.to_string()),
            };
            recorder.records.pin(pinned, ino);
        }
        ino
    }
}

pub fn child_path(parent: &Path, name: &OsStr) -> PathBuf {
    if parent.as_os_str().is_empty() {
        PathBuf::from(name)
    } else {
        parent.join(name)
    }
}

/// A name the kernel may hand us that must never reach a path join.
pub fn is_bad_name(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/')
}

/// Names cutoverfs uses for an instant in the local tree (purge sets files aside under them).
pub fn is_reserved(name: &OsStr) -> bool {
    crate::engine::purge::set_aside_in_flight(name.as_bytes())
}

pub fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn time(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Attributes of a local file, numbered `ino`.
pub fn attr_from_stat(st: &libc::stat, ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: time(st.st_ctime, st.st_ctime_nsec),
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Attributes of an open local file, numbered `ino`.
pub fn attr_from_metadata(m: &std::fs::Metadata, ino: u64) -> FileAttr {
    use std::os::unix::fs::MetadataExt;
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind: kind_of(m.mode()),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

/// Attributes of something only the manifest still knows: the ones recorded at the scan.
pub fn attr_from_entry(entry: &Entry, ino: u64) -> FileAttr {
    let mtime = time(
        entry.mtime_ns.div_euclid(1_000_000_000),
        entry.mtime_ns.rem_euclid(1_000_000_000),
    );
    let kind = match entry.kind {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::File => FileType::RegularFile,
        Kind::Special => kind_of(entry.mode),
    };
    FileAttr {
        ino: INodeNo(ino),
        size: entry.size,
        blocks: entry.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: (entry.mode & 0o7777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: entry.uid,
        gid: entry.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// How long the kernel may keep `attr`: a file with several names changes its link count and
/// ctime through the others, which this mount cannot tell the kernel about, so it asks anew.
pub fn attr_ttl_of(attr: &FileAttr) -> Option<Duration> {
    (attr.kind != FileType::Directory && attr.nlink > 1).then_some(Duration::ZERO)
}

/// A `Found` for `attr`.
pub fn found(attr: FileAttr) -> Found {
    Found {
        attr_ttl: attr_ttl_of(&attr),
        attr,
    }
}
