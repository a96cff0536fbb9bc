//! The daemon's tree: the local tree, plus what the manifest knows that is no longer (or not
//! yet) local — so purged files and directories stay where they were.
//!
//! Local attributes win: before purge every file still has its local copy, and its own size,
//! mtime, mode and owner are what the application always saw. Numbers come from the manifest's
//! rows (`Numbering`), so a listing costs one query per directory and no memory per file.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::Errno;

use super::{
    attr_from_entry, attr_from_metadata, attr_from_stat, child_path, found, is_absent, is_reserved,
    Found, Listed, Namespace, Numbering,
};
use crate::fuse::rows::Rows;
use crate::manifest::{Entry, Kind};
use crate::source::{Attrs, SourceTree};

pub struct SourceNamespace {
    source: Arc<SourceTree>,
    rows: Arc<Rows>,
    numbers: Numbering,
    links: Arc<HardLinks>,
}

/// The names of local files with several (hard links) that this mount has seen, by local
/// inode: a write through one name changes the others, which must be recorded too
/// (`writes.rs`). Only files with a link count above one are kept, and a name found stale
/// (renamed, removed) is dropped when next used.
#[derive(Default)]
pub struct HardLinks {
    groups: dashmap::DashMap<(u64, u64), Vec<PathBuf>, foldhash::fast::RandomState>,
}

impl HardLinks {
    /// `rel` is a name of the local file with these attributes.
    pub fn note(&self, attrs: &Attrs, rel: &Path) {
        if attrs.nlink < 2 {
            return;
        }
        let mut names = self.groups.entry((attrs.dev, attrs.ino)).or_default();
        if !names.iter().any(|n| n == rel) {
            names.push(rel.to_path_buf());
        }
    }

    /// The other names of the local file with these attributes that still name it.
    pub fn others(&self, tree: &SourceTree, attrs: &Attrs, rel: &Path) -> Vec<PathBuf> {
        let key = (attrs.dev, attrs.ino);
        let Some(mut names) = self.groups.get_mut(&key) else {
            return Vec::new();
        };
        names.retain(|name| {
            tree.stat_at(name)
                .is_ok_and(|st| st.st_dev == attrs.dev && st.st_ino == attrs.ino)
        });
        names
            .iter()
            .filter(|n| n.as_path() != rel)
            .cloned()
            .collect()
    }
}

impl SourceNamespace {
    pub fn new(
        source: Arc<SourceTree>,
        rows: Arc<Rows>,
        numbers: Numbering,
        links: Arc<HardLinks>,
    ) -> Self {
        SourceNamespace {
            source,
            rows,
            numbers,
            links,
        }
    }

    /// The row of `rel` when the manifest can say; None (with the local copy to serve) when it
    /// cannot be reached.
    fn row_if_reachable(&self, rel: &Path) -> Result<Option<Arc<Entry>>, Errno> {
        match self.rows.entry(rel) {
            Ok(row) => Ok(row),
            Err(_) if self.rows.manifest_down() => Ok(None),
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// The local directory's names with their attributes (none if it has no local copy).
    fn read_local(&self, dir: &Path) -> Result<Vec<(OsString, std::fs::Metadata)>, Errno> {
        let mut local = Vec::new();
        match self.source.read_dir(dir) {
            Ok(entries) => {
                for item in entries {
                    let item = item.map_err(Errno::from)?;
                    let name = item.file_name();
                    if is_reserved(&name) {
                        continue;
                    }
                    // Gone since the directory was read: not listed.
                    let Ok(meta) = item.metadata() else { continue };
                    local.push((name, meta));
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(Errno::from(e)),
        }
        Ok(local)
    }

    fn local_found(&self, rel: &Path, st: &libc::stat) -> Result<Found, Errno> {
        let row = self.row_if_reachable(rel)?;
        let attrs = Attrs::from_stat(st);
        self.links.note(&attrs, rel);
        let ino = self.numbers.number(rel, row.as_deref(), Some(&attrs));
        Ok(found(attr_from_stat(st, ino)))
    }
}

impl Namespace for SourceNamespace {
    fn lookup(&self, dir: &Path, name: &OsStr) -> Result<Found, Errno> {
        if is_reserved(name) {
            return Err(Errno::ENOENT);
        }
        let rel = child_path(dir, name);
        match self.source.stat_at(&rel) {
            Ok(st) => self.local_found(&rel, &st),
            Err(e) if is_absent(&e) => match self.rows.entry(&rel).map_err(Errno::from)? {
                Some(row) if row.visible_without_local_copy() => {
                    let ino = self.numbers.number(&rel, Some(&row), None);
                    Ok(found(attr_from_entry(&row, ino)))
                }
                _ => Err(Errno::ENOENT),
            },
            Err(e) => Err(Errno::from(e)),
        }
    }

    fn attr(&self, rel: &Path, ino: u64) -> Result<Found, Errno> {
        if rel.file_name().is_some_and(is_reserved) {
            return Err(Errno::ENOENT);
        }
        match self.source.stat_at(rel) {
            Ok(st) => Ok(found(attr_from_stat(&st, ino))),
            Err(e) if is_absent(&e) => match self.rows.entry(rel).map_err(Errno::from)? {
                Some(row) if row.visible_without_local_copy() => {
                    Ok(found(attr_from_entry(&row, ino)))
                }
                _ => Err(Errno::ENOENT),
            },
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// The union of the local directory and the manifest's rows below it: one directory read
    /// and one query.
    fn list(&self, dir: &Path) -> Result<Vec<Listed>, Errno> {
        // The directory read (a stat per name) and the query go on at once, on two threads:
        // a listing of a large directory takes the longer of the two, not their sum.
        let read_at = self.rows.generation();
        let (local, rows) = rayon::join(|| self.read_local(dir), || self.rows.children(dir));
        let local = local?;
        // Without the manifest a listing shows the local names only: what lives on only at the
        // dest (purged files) is missing from it until the manifest is back.
        let rows = rows.map_err(Errno::from)?;
        let reachable = rows.is_some();
        let rows = rows.unwrap_or_default();
        // Names borrowed from the rows: no allocation per name.
        let mut by_name: HashMap<&OsStr, usize, foldhash::fast::RandomState> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, row)| Some((Path::new(&row.path).file_name()?, i)))
            .collect();
        let mut listed = Vec::with_capacity(local.len() + by_name.len());
        for (name, meta) in local {
            if meta.nlink() > 1 {
                self.links
                    .note(&Attrs::from_metadata(&meta), &child_path(dir, &name));
            }
            let row = by_name.remove(name.as_os_str()).map(|i| &rows[i]);
            if row.is_none() && reachable {
                if let Some(text) = child_path(dir, &name).to_str() {
                    self.rows.note_absent(read_at, text);
                }
            }
            let ino = self.numbers.number_in(dir, &name, row.map(|r| &**r), || {
                Attrs::from_metadata(&meta)
            });
            listed.push(Listed {
                found: found(attr_from_metadata(&meta, ino)),
                name,
            });
        }
        let mut rest: Vec<usize> = by_name.into_values().collect();
        rest.sort_unstable();
        for i in rest {
            let row = &rows[i];
            let Some(name) = Path::new(&row.path).file_name() else {
                continue;
            };
            if !row.visible_without_local_copy() || is_reserved(name) {
                continue;
            }
            let ino = self.numbers.number_in(dir, name, Some(row), Attrs::default);
            listed.push(Listed {
                name: name.to_os_string(),
                found: found(attr_from_entry(row, ino)),
            });
        }
        if dir.as_os_str().is_empty() && listed.is_empty() {
            // An empty or unreadable root still lists.
            self.source.stat_at(dir).map_err(Errno::from)?;
        }
        Ok(listed)
    }

    fn read_link(&self, rel: &Path) -> Result<OsString, Errno> {
        match self.source.read_link_at(rel) {
            Ok(target) => Ok(target),
            Err(e) if is_absent(&e) => match self.rows.entry(rel).map_err(Errno::from)? {
                Some(entry) if entry.kind == Kind::Symlink => entry
                    .link_target
                    .clone()
                    .map(OsString::from)
                    .ok_or(Errno::EIO),
                _ => Err(Errno::from(e)),
            },
            Err(e) => Err(Errno::from(e)),
        }
    }

    fn statfs(&self) -> Result<libc::statvfs, Errno> {
        self.source.statvfs().map_err(Errno::from)
    }

    fn local(&self) -> Option<&Arc<SourceTree>> {
        Some(&self.source)
    }
}
