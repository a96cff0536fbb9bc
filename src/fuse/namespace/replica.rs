//! A replica's tree (issue 7.3): the migration served on a machine without the local tree.
//!
//! The namespace is the manifest's rows (files, directories, links), the data the dest's
//! verified copies. A file not copied yet is requested from the nodes that have the source
//! (`Manifest::request_copy`), and its open waits (`CopyWaits`, off the FUSE threads) until the
//! file is verified or the wait runs out (EIO). Nothing can be changed here: the mount is
//! read-only (EROFS), since the local tree that every change must reach first is elsewhere.
//!
//! What it knows of the manifest is at most `--manifest-cache` old (plus the kernel's TTL): the
//! bound on how late changes made on other nodes show here (docs/multi-node.md).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{Errno, FileAttr, INodeNo};
use tokio::sync::OnceCell;

use super::{attr_from_entry, child_path, found, Found, Listed, Namespace, Numbering};
use crate::fuse::rows::Rows;
use crate::manifest::{Entry, Kind, Manifest, RequestOutcome, State};
use crate::source::SourceTree;

pub struct ReplicaNamespace {
    rows: Arc<Rows>,
    numbers: Numbering,
    /// Attributes of the root directory (the mountpoint's own).
    root: FileAttr,
}

/// Part of the tree a replica shows: everything the source still has (copied or not) and
/// directories, not what was removed or vanished.
pub fn shown(entry: &Entry) -> bool {
    !matches!(entry.state, State::Deleted | State::Missing)
}

impl ReplicaNamespace {
    pub fn new(rows: Arc<Rows>, numbers: Numbering, root: FileAttr) -> Self {
        ReplicaNamespace {
            rows,
            numbers,
            root,
        }
    }

    fn shown_row(&self, rel: &Path) -> Result<Arc<Entry>, Errno> {
        match self.rows.entry(rel).map_err(Errno::from)? {
            Some(entry) if shown(&entry) => Ok(entry),
            _ => Err(Errno::ENOENT),
        }
    }
}

impl Namespace for ReplicaNamespace {
    fn lookup(&self, dir: &Path, name: &OsStr) -> Result<Found, Errno> {
        let rel = child_path(dir, name);
        let row = self.shown_row(&rel)?;
        let ino = self.numbers.number(&rel, Some(&row), None);
        Ok(found(attr_from_entry(&row, ino)))
    }

    fn attr(&self, rel: &Path, ino: u64) -> Result<Found, Errno> {
        if rel.as_os_str().is_empty() {
            return Ok(found(self.root));
        }
        Ok(found(attr_from_entry(&*self.shown_row(rel)?, ino)))
    }

    fn list(&self, dir: &Path) -> Result<Vec<Listed>, Errno> {
        let Some(rows) = self.rows.children(dir).map_err(Errno::from)? else {
            return Err(Errno::EIO);
        };
        let mut listed = Vec::with_capacity(rows.len());
        for row in rows.iter().filter(|row| shown(row)) {
            let path = PathBuf::from(&row.path);
            let Some(name) = path.file_name() else {
                continue;
            };
            let ino = self.numbers.number(&path, Some(row), None);
            listed.push(Listed {
                name: name.to_os_string(),
                found: found(attr_from_entry(row, ino)),
            });
        }
        Ok(listed)
    }

    fn read_link(&self, rel: &Path) -> Result<OsString, Errno> {
        match self.rows.entry(rel).map_err(Errno::from)? {
            Some(entry) if entry.kind == Kind::Symlink && shown(&entry) => entry
                .link_target
                .clone()
                .map(OsString::from)
                .ok_or(Errno::EIO),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    /// A replica holds nothing locally: no space, and names as long as keys may be.
    fn statfs(&self) -> Result<libc::statvfs, Errno> {
        // SAFETY: statvfs is plain data; all zeros is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        st.f_bsize = 4096;
        st.f_frsize = 4096;
        st.f_namemax = 255;
        Ok(st)
    }

    fn local(&self) -> Option<&Arc<SourceTree>> {
        None
    }
}

/// The root's attributes: the mountpoint's own, as a directory.
pub fn root_attr(meta: &std::fs::Metadata) -> FileAttr {
    let mut attr = super::attr_from_metadata(meta, crate::fuse::inode::ROOT);
    attr.ino = INodeNo(crate::fuse::inode::ROOT);
    attr.size = 0;
    attr.blocks = 0;
    attr.nlink = 2;
    attr.rdev = 0;
    attr.blksize = 4096;
    attr
}

type Waited = Result<Arc<Entry>, Errno>;

/// How often a waiting open looks at its file's row again.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Opens waiting for files to be copied by a node with the source: one wait per path however
/// many opens share it.
pub struct CopyWaits {
    manifest: Manifest,
    rows: Arc<Rows>,
    wait: Duration,
    waits: Mutex<HashMap<String, Arc<OnceCell<Waited>>>>,
}

impl CopyWaits {
    /// `wait`: how long an open waits for a requested copy (`--remote-wait`).
    pub fn new(rows: Arc<Rows>, wait: Duration) -> CopyWaits {
        CopyWaits {
            manifest: rows.manifest().clone(),
            rows,
            wait,
            waits: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `path` is verified at the dest, asking nodes with the source to copy it.
    pub async fn copied(&self, path: String) -> Waited {
        let cell = self
            .waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_init(|| async {
            let outcome = self.wait_for_copy(&path).await;
            self.waits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&path);
            outcome
        })
        .await
        .clone()
    }

    async fn wait_for_copy(&self, path: &str) -> Waited {
        let started = Instant::now();
        let mut requested = false;
        let mut last_state = None;
        loop {
            match self.manifest.note(self.manifest.entry(path).await) {
                Ok(None) => return Err(Errno::ENOENT),
                Ok(Some(entry)) => {
                    let entry = Arc::new(entry);
                    self.rows.remember(entry.clone());
                    if entry.in_dest() {
                        if requested {
                            tracing::info!(
                                path,
                                waited_ms = started.elapsed().as_millis() as u64,
                                "requested file copied"
                            );
                        }
                        return Ok(entry);
                    }
                    last_state = Some(entry.state);
                    self.request(path, &entry, &mut requested).await?;
                }
                // Waited out like a slow copy: PostgreSQL may be back before the deadline.
                Err(e) if e.is_unreachable() => {}
                Err(e) => {
                    tracing::error!(path, error = %e, "manifest lookup failed");
                    return Err(Errno::EIO);
                }
            }
            let left = self.wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                let state = last_state.map_or("unknown (manifest unreachable)".to_string(), |s| {
                    s.to_string()
                });
                tracing::error!(
                    path,
                    state,
                    waited = %humantime::format_duration(self.wait),
                    "no node with the source copied this file in time (is a mount daemon or a sweep running where the source is?); EIO"
                );
                return Err(Errno::EIO);
            }
            tokio::time::sleep(left.min(WAIT_POLL)).await;
        }
    }

    /// Asks for a copy of a file not at the dest yet; fails at once for files no node will copy.
    async fn request(&self, path: &str, entry: &Entry, requested: &mut bool) -> Result<(), Errno> {
        match entry.state {
            State::Deleted | State::Missing => Err(Errno::ENOENT),
            State::Conflict | State::Unsupported => {
                tracing::error!(path, state = %entry.state, "cannot serve this file: it cannot be migrated (see `cutoverfs status`)");
                Err(Errno::EIO)
            }
            State::Pending | State::Failed => {
                match self.manifest.note(self.manifest.request_copy(path).await) {
                    Ok(RequestOutcome::Requested) if !*requested => {
                        *requested = true;
                        tracing::info!(path, state = %entry.state, "not migrated yet: copy requested from a node with the source");
                        Ok(())
                    }
                    Ok(RequestOutcome::Held(why)) => {
                        tracing::error!(path, "cannot serve this file: {why}");
                        Err(Errno::EIO)
                    }
                    Ok(_) => Ok(()),
                    Err(e) if e.is_unreachable() => Ok(()),
                    Err(e) => {
                        tracing::error!(path, error = %e, "cannot request a copy");
                        Err(Errno::EIO)
                    }
                }
            }
            _ => Ok(()),
        }
    }
}
