//! The tree the application sees: the local tree, plus what the manifest knows that is no
//! longer (or not yet) local — so purged files and directories stay where they were.
//!
//! Local attributes win: before purge every file still has its local copy, and its own size,
//! mtime, mode and owner are what the application always saw. Manifest rows are read through a
//! cache that the sweeper's "verified" notices and a short TTL keep fresh.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::manifest::{Entry, Kind, Manifest};
use crate::source::SourceTree;

pub const ENTRY_CACHE_ROWS: u64 = 1_000_000;

pub struct Namespace {
    source: Arc<SourceTree>,
    manifest: Manifest,
    rt: tokio::runtime::Handle,
    entries: moka::sync::Cache<PathBuf, Option<Arc<Entry>>>,
    /// Bumped by every forget. A row read from the manifest is cached only if no forget ran
    /// while it was read: a forget means the row may have changed since, and caching the older
    /// read would bring back what the forget dropped (a file held for writing served from the
    /// dest).
    generation: std::sync::RwLock<u64>,
}

/// One name in a directory listing, with its attributes (inode number left to the caller).
pub struct Listed {
    pub name: OsString,
    pub attr: FileAttr,
}

impl Namespace {
    /// `row_ttl`: how long a manifest row is trusted without a notice (`--manifest-cache`):
    /// other nodes change states too.
    pub fn new(
        source: Arc<SourceTree>,
        manifest: Manifest,
        rt: tokio::runtime::Handle,
        row_ttl: Duration,
    ) -> Self {
        Namespace {
            source,
            manifest,
            rt,
            entries: moka::sync::Cache::builder()
                .max_capacity(ENTRY_CACHE_ROWS)
                .time_to_live(row_ttl)
                .build(),
            generation: std::sync::RwLock::new(0),
        }
    }

    pub fn source(&self) -> &Arc<SourceTree> {
        &self.source
    }

    /// Attributes of a path: the local file's, else the manifest's for what lives on at the dest.
    pub fn attr(&self, rel: &Path) -> io::Result<FileAttr> {
        if rel.file_name().is_some_and(is_reserved) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        match self.source.stat_at(rel) {
            Ok(st) => Ok(attr_from_stat(&st)),
            Err(e) if is_absent(&e) => match self.entry(rel)? {
                Some(entry) if entry.visible_without_local_copy() => Ok(attr_from_entry(&entry)),
                _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            },
            Err(e) => Err(e),
        }
    }

    /// The manifest row of a path (cached); None for names the manifest cannot hold.
    pub fn entry(&self, rel: &Path) -> io::Result<Option<Arc<Entry>>> {
        let Some(text) = rel.to_str() else {
            return Ok(None);
        };
        if let Some(cached) = self.entries.get(rel) {
            return Ok(cached);
        }
        if self.manifest_down() {
            // Its probe watches it: this request does not wait on a connection timeout.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let read_at = self.generation();
        let manifest = &self.manifest;
        let row = self
            .rt
            .block_on(async { manifest.note(manifest.entry(text).await) })
            .map_err(|e| manifest_error(rel, e))?
            .map(Arc::new);
        self.cache_rows(read_at, [(rel.to_path_buf(), row.clone())]);
        Ok(row)
    }

    /// The manifest cannot be reached now (issue 7.5): callers serve what they can locally.
    pub fn manifest_down(&self) -> bool {
        self.manifest.reachability().is_down()
    }

    fn generation(&self) -> u64 {
        *self.generation.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Caches rows read when the generation was `read_at`, unless a forget ran since.
    fn cache_rows(
        &self,
        read_at: u64,
        rows: impl IntoIterator<Item = (PathBuf, Option<Arc<Entry>>)>,
    ) {
        let generation = self.generation.read().unwrap_or_else(|e| e.into_inner());
        if *generation != read_at {
            return;
        }
        for (path, row) in rows {
            self.entries.insert(path, row);
        }
    }

    /// Drops cached rows (their state just changed).
    pub fn forget_entries(&self, paths: &[String]) {
        let mut generation = self.generation.write().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        for path in paths {
            self.entries.invalidate(Path::new(path));
        }
    }

    /// Drops every cached row (a directory was renamed: rows below it moved).
    pub fn forget_all_entries(&self) {
        let mut generation = self.generation.write().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        self.entries.invalidate_all();
    }

    /// The union of the local directory and the manifest's rows below it. Rows read here are
    /// cached, so the opens that usually follow a listing need no query.
    pub fn list(&self, rel: &Path) -> io::Result<Vec<Listed>> {
        let mut listed = Vec::new();
        let mut local_names = std::collections::HashSet::new();
        match self.source.read_dir(rel) {
            Ok(dir) => {
                for item in dir {
                    let item = item?;
                    let name = item.file_name();
                    if is_reserved(&name) {
                        continue;
                    }
                    let Ok(meta) = item.metadata() else { continue };
                    local_names.insert(name.clone());
                    listed.push(Listed {
                        name,
                        attr: attr_from_metadata(&meta),
                    });
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e),
        }
        // Without the manifest a listing shows the local names only: what lives on only at the
        // dest (purged files) is missing from it until the manifest is back.
        let dir_rows = match rel.to_str() {
            Some(dir) => self.children(rel, dir)?,
            None => None,
        };
        if let Some((read_at, rows)) = dir_rows {
            let mut unrecorded = local_names.clone();
            let mut read = Vec::with_capacity(rows.len() + unrecorded.len());
            for row in rows {
                let path = PathBuf::from(&row.path);
                if let Some(name) = path.file_name() {
                    unrecorded.remove(name);
                }
                let name = path.file_name().unwrap_or_default().to_os_string();
                let visible = !local_names.contains(&name) && row.visible_without_local_copy();
                if visible {
                    listed.push(Listed {
                        name,
                        attr: attr_from_entry(&row),
                    });
                }
                read.push((path, Some(Arc::new(row))));
            }
            read.extend(
                unrecorded
                    .into_iter()
                    .map(|name| (child_path(rel, &name), None)),
            );
            self.cache_rows(read_at, read);
        }
        if rel.as_os_str().is_empty() && local_names.is_empty() && listed.is_empty() {
            // An empty or unreadable root still lists.
            self.source.stat_at(rel)?;
        }
        Ok(listed)
    }

    /// The manifest's rows below `dir` and the generation they were read at; None while the
    /// manifest cannot be reached.
    fn children(&self, rel: &Path, dir: &str) -> io::Result<Option<(u64, Vec<Entry>)>> {
        if self.manifest_down() {
            return Ok(None);
        }
        let read_at = self.generation();
        let manifest = &self.manifest;
        match self
            .rt
            .block_on(async { manifest.note(manifest.children(dir).await) })
        {
            Ok(rows) => Ok(Some((read_at, rows))),
            Err(e) if e.is_unreachable() => {
                manifest_error(rel, e);
                Ok(None)
            }
            Err(e) => Err(manifest_error(rel, e)),
        }
    }

    /// The target of a symlink, local or recorded.
    pub fn read_link(&self, rel: &Path) -> io::Result<OsString> {
        match self.source.read_link_at(rel) {
            Ok(target) => Ok(target),
            Err(e) if is_absent(&e) => match self.entry(rel)? {
                Some(entry) if entry.kind == Kind::Symlink => entry
                    .link_target
                    .clone()
                    .map(OsString::from)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO)),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

/// Names cutoverfs uses for an instant in the local tree (purge sets files aside under them).
fn is_reserved(name: &OsStr) -> bool {
    crate::engine::purge::set_aside_in_flight(name.as_bytes())
}

fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn manifest_error(rel: &Path, e: crate::manifest::ManifestError) -> io::Error {
    // An unreachable manifest is logged once by its reachability, not per request.
    if e.is_unreachable() {
        tracing::debug!(path = %rel.display(), error = %e, "manifest unreachable");
    } else {
        tracing::error!(path = %rel.display(), error = %e, "manifest lookup failed");
    }
    io::Error::from_raw_os_error(libc::EIO)
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

pub fn attr_from_stat(st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
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

fn attr_from_metadata(m: &std::fs::Metadata) -> FileAttr {
    use std::os::unix::fs::MetadataExt;
    FileAttr {
        ino: INodeNo(0),
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
pub fn attr_from_entry(entry: &Entry) -> FileAttr {
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
        ino: INodeNo(0),
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
