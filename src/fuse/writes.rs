//! The write path (DESIGN §6): what the application changes lands in the local tree first,
//! and the manifest and dest follow. Only the daemon's mount has one; on a replica every change
//! is EROFS.
//!
//! - A file opened for writing is first brought back from the dest if only the dest has it
//!   (copy-up), then held in the manifest (pending, no worker may take it), and recorded with
//!   priority when its last writer closes it.
//! - unlink, rmdir and rename record the change in the manifest first, then change the local
//!   tree, then delete the dest objects the change left behind (only objects cutoverfs wrote).
//!   A crash between the steps is repaired at the next start (`engine::repair`).
//! - A file unlinked (or renamed over) while open keeps working through its handles until the
//!   last close: its record keeps a descriptor of the local copy, and its dest objects are
//!   deleted only then. Its data is never recorded or copied again.
//! - `link(2)` makes another name of a local file; each name is a path of its own in the
//!   manifest and a key of its own at the dest (docs/SEMANTICS.md, "Hard links").

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{Errno, FileType, FopenFlags, RenameFlags};

use super::copyup::{copy_up, ensure_local_dirs};
use super::core::{Core, WritePath};
use super::handles::Handle;
use super::local::{self, SetTime};
use super::namespace::{attr_from_metadata, found, Found};
use super::open::{Backing, Opened};
use crate::manifest::{Kind, Leftover};
use crate::source::{Attrs, SourceTree};

/// Who asks: a new file is theirs.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set, as a setattr asks.
#[derive(Debug, Clone, Copy)]
pub enum NewTime {
    At(SystemTime),
    Now,
}

/// A setattr request's changes.
#[derive(Debug, Clone, Default)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<NewTime>,
    pub mtime: Option<NewTime>,
}

/// Flags of the application's open that matter to a descriptor the daemon writes through.
const KEPT_OPEN_FLAGS: i32 = libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn set_time(time: Option<NewTime>) -> SetTime {
    match time {
        None => SetTime::Keep,
        Some(NewTime::Now) => SetTime::Now,
        Some(NewTime::At(t)) => SetTime::At(t),
    }
}

impl Core {
    /// The write path, or EROFS on a replica.
    fn writable(&self) -> Result<(&WritePath, &Arc<SourceTree>), Errno> {
        match (&self.writes, self.ns.local()) {
            (Some(writes), Some(tree)) => Ok((writes, tree)),
            _ => Err(Errno::EROFS),
        }
    }

    /// Whether changes must run off the FUSE threads: they write a manifest over the network,
    /// or may bring a file back from a remote dest first.
    pub fn writes_may_wait(&self) -> bool {
        self.writes.is_some() && (self.manifest_is_remote() || self.store_is_remote())
    }

    /// A name the application is about to create: any name but the form purge gives a local
    /// copy it sets aside (`.cutoverfs-purge-PID-NAME`), which is refused with EPERM and a log
    /// line saying why (the application would otherwise see its file vanish).
    fn new_child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        use std::os::unix::ffi::OsStrExt;
        let rel = self.child(parent, name)?;
        if crate::engine::purge::set_aside_pid(name.as_bytes()).is_some() {
            tracing::warn!(path = %rel.display(), "refused (EPERM): names of the form .cutoverfs-purge-PID-NAME are reserved for the local copies purge sets aside");
            return Err(Errno::EPERM);
        }
        Ok(rel)
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// Makes sure the local tree has the file at `rel`: brings it back from the dest if only
    /// the dest has it. ENOENT if neither has it.
    fn ensure_local(&self, rel: &Path) -> Result<(), Errno> {
        let (_, tree) = self.writable()?;
        if local::exists(tree, rel).map_err(errno)? {
            return Ok(());
        }
        match self.rows.entry(rel).map_err(errno)? {
            Some(entry) if entry.in_dest() => {
                copy_up(tree, &self.rows, &*self.store, &self.rt, &entry).map_err(errno)
            }
            Some(entry) if entry.kind == Kind::Dir && entry.visible_without_local_copy() => {
                ensure_local_dirs(tree, &self.rows, rel).map_err(errno)
            }
            _ => Err(Errno::ENOENT),
        }
    }

    /// A recorded file is about to change: nothing may copy it, purge it or serve it from
    /// the dest until its writers are done.
    fn hold(&self, rel: &Path) -> Result<(), Errno> {
        let (writes, _) = self.writable()?;
        let Some(text) = rel.to_str() else {
            return Ok(());
        };
        writes.records.flush();
        let recorded = self.rows.entry(rel).map_err(errno)?;
        tracing::debug!(path = text, state = ?recorded.as_ref().map(|e| e.state), "hold");
        if recorded.is_some_and(|e| e.kind == Kind::File) {
            let manifest = self.rows.manifest();
            self.block_on(manifest.hold_for_write(
                text,
                &writes.holds.holder,
                writes.holds.until(),
            ))
            .map_err(|e| {
                tracing::error!(path = text, error = %e, "cannot hold the file in the manifest");
                Errno::EIO
            })?;
            self.rows.forget(&[text.to_string()]);
        }
        Ok(())
    }

    /// Queues `rel` for recording as the local tree holds it now, with the file's other names
    /// (hard links: what changed through one changed through all).
    fn record(&self, rel: &Path, attrs: &Attrs) {
        let Ok((writes, tree)) = self.writable() else {
            return;
        };
        let others = if attrs.nlink > 1 {
            writes.links.others(tree, attrs, rel)
        } else {
            Vec::new()
        };
        for name in std::iter::once(rel).chain(others.iter().map(PathBuf::as_path)) {
            if let Some(text) = name.to_str() {
                writes
                    .records
                    .record(text.to_string(), local::facts_of(attrs));
            }
        }
    }

    /// Queues `rel` as it is on disk now; a rename or removal of it waits until it is queued.
    fn record_path(&self, rel: &Path) {
        let Ok((writes, tree)) = self.writable() else {
            return;
        };
        let _no_rename = writes.rename_gate.read().unwrap_or_else(|e| e.into_inner());
        if let Ok(st) = tree.stat_at(rel) {
            self.record(rel, &Attrs::from_stat(&st));
        }
    }

    pub(super) fn open_for_write(
        self: &Arc<Self>,
        ino: u64,
        rel: &Path,
        flags: i32,
        backing: &dyn Backing,
        counted_writer: bool,
    ) -> Result<Opened, Errno> {
        let opened = self
            .ensure_local(rel)
            .and_then(|()| self.hold(rel))
            .and_then(|()| {
                self.open_local_handle(
                    ino,
                    rel,
                    flags & KEPT_OPEN_FLAGS,
                    true,
                    backing,
                    None,
                    counted_writer,
                )
                .map_err(errno)
            });
        let (fh, backing) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                if counted_writer {
                    self.writer_gives_up(ino);
                }
                return Err(e);
            }
        };
        if flags & libc::O_TRUNC != 0 {
            self.changed();
            if let Some(Err(e)) = self
                .handles
                .get(fh)
                .and_then(|h| h.file().map(|f| f.set_len(0)))
            {
                self.release(fh);
                return Err(errno(e));
            }
        }
        Ok(Opened {
            fh,
            backing,
            flags: FopenFlags::empty(),
        })
    }

    /// The last writer of a file closed it: record it with priority, unless it was removed or
    /// replaced meanwhile (then its removal or rename recorded everything). Other names of the
    /// same file (hard links) this mount knows of changed too.
    pub(super) fn after_writer_closed(&self, handle: &Handle) {
        let Ok((writes, tree)) = self.writable() else {
            return;
        };
        let _no_rename = writes.rename_gate.read().unwrap_or_else(|e| e.into_inner());
        let rel = handle.inode.lock().path.clone();
        let (Some(rel), Some(file)) = (rel, handle.file()) else {
            return;
        };
        let Ok(meta) = file.metadata() else { return };
        let attrs = Attrs::from_metadata(&meta);
        match tree.stat_at(&rel) {
            Ok(st) if st.st_ino == attrs.ino && st.st_dev == attrs.dev => self.record(&rel, &attrs),
            _ => {}
        }
    }

    /// open(O_CREAT): makes the file locally (or opens the one there), answers its attributes
    /// and a handle open for writing.
    pub fn create(
        self: &Arc<Self>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
        backing: &dyn Backing,
    ) -> Result<(Found, Opened), Errno> {
        let (_, tree) = self.writable()?;
        let rel = self.new_child(parent, name)?;
        // A name only the dest still holds: O_CREAT opens that file.
        let dest_only = !local::exists(tree, &rel).map_err(errno)?
            && self.ns.lookup(&self.path(parent)?, name).is_ok();
        if dest_only {
            if flags & libc::O_EXCL != 0 {
                return Err(Errno::EEXIST);
            }
            self.ensure_local(&rel)?;
        }
        let keep = flags & (libc::O_EXCL | libc::O_TRUNC);
        let (file, new) = match local::create(tree, &rel, libc::O_RDWR | libc::O_EXCL | keep, mode)
        {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                self.hold(&rel)?;
                (
                    local::create(tree, &rel, libc::O_RDWR | keep, mode).map_err(errno)?,
                    false,
                )
            }
            Err(e) => return Err(errno(e)),
        };
        if new {
            local::give_to(tree, &rel, caller.uid, caller.gid).map_err(errno)?;
            local::exact_mode(tree, &rel, mode).map_err(errno)?;
            self.dir_changed(parent);
        } else {
            self.changed();
        }
        let found = self.lookup(parent, name)?;
        if new {
            // Numbering the new name recorded a row for it (a pending file, as a scan would):
            // held now like any file opened for writing, or the sweeper could copy it half
            // written and serve that copy as verified until the close is recorded
            // (tests/mount_model.rs, the concurrent workers).
            self.hold(&rel)?;
        }
        let ino = found.ino();
        let passthrough = self.passthrough.load(std::sync::atomic::Ordering::Relaxed);
        let daemon_flags = flags & KEPT_OPEN_FLAGS & !libc::O_ACCMODE | libc::O_RDWR;
        let given = if passthrough {
            Some(file)
        } else {
            drop(file);
            None
        };
        let (fh, backing) = self
            .open_local_handle(ino, &rel, daemon_flags, true, backing, given, false)
            .map_err(errno)?;
        Ok((
            found,
            Opened {
                fh,
                backing,
                flags: FopenFlags::empty(),
            },
        ))
    }

    /// Something new at `name` in `parent` that `caller` made: theirs, answered with its
    /// attributes (and recorded, with `record`).
    fn answer_new(
        &self,
        parent: u64,
        name: &OsStr,
        rel: &Path,
        caller: Caller,
        record: bool,
    ) -> Result<Found, Errno> {
        let (_, tree) = self.writable()?;
        local::give_to(tree, rel, caller.uid, caller.gid).map_err(errno)?;
        if record {
            self.record_path(rel);
        }
        self.dir_changed(parent);
        self.lookup(parent, name)
    }

    /// A name the application sees (served from the dest) is taken, even with no local copy.
    fn refuse_dest_only(&self, parent: u64, name: &OsStr, rel: &Path) -> Result<(), Errno> {
        let (_, tree) = self.writable()?;
        if !local::exists(tree, rel).map_err(errno)?
            && self.ns.lookup(&self.path(parent)?, name).is_ok()
        {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> Result<Found, Errno> {
        let (_, tree) = self.writable()?;
        let rel = self.new_child(parent, name)?;
        self.refuse_dest_only(parent, name, &rel)?;
        local::mkdir(tree, &rel, mode).map_err(errno)?;
        self.answer_new(parent, name, &rel, caller, true)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Found, Errno> {
        let (_, tree) = self.writable()?;
        let regular = mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0;
        let rel = self.new_child(parent, name)?;
        self.refuse_dest_only(parent, name, &rel)?;
        if regular {
            local::create(tree, &rel, libc::O_WRONLY | libc::O_EXCL, mode & 0o7777)
                .map_err(errno)?;
            local::exact_mode(tree, &rel, mode).map_err(errno)?;
        } else {
            local::mknod(tree, &rel, mode, rdev).map_err(errno)?;
        }
        self.answer_new(parent, name, &rel, caller, regular)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> Result<Found, Errno> {
        let (_, tree) = self.writable()?;
        let rel = self.new_child(parent, name)?;
        self.refuse_dest_only(parent, name, &rel)?;
        local::symlink(tree, target, &rel).map_err(errno)?;
        // Links stay local; they are recorded as a scan records them (DESIGN §3: not followed,
        // not copied).
        self.answer_new(parent, name, &rel, caller, false)
    }

    /// link(2): another name for a file with a local copy (a file only the dest holds is
    /// brought back first). The new name is a file of its own for the manifest and the dest.
    pub fn link(
        self: &Arc<Self>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<Found, Errno> {
        let (_, tree) = self.writable()?;
        let from = self.path(ino)?;
        let to = self.new_child(newparent, newname)?;
        self.refuse_dest_only(newparent, newname, &to)?;
        self.ensure_local(&from)?;
        tree.beneath().link(&from, &to).map_err(errno)?;
        if let Ok(st) = tree.stat_at(&to) {
            let attrs = Attrs::from_stat(&st);
            let (writes, _) = self.writable()?;
            writes.links.note(&attrs, &from);
            writes.links.note(&attrs, &to);
        }
        self.record_path(&to);
        self.dir_changed(newparent);
        // The kernel made an inode of its own for the new name (each name has its number) and
        // still holds the old name's link count and ctime: it asks again, also for a stat that
        // comes right after the link returns (tests/mount_writes.rs, open-unlinked and links).
        self.invalidate_inode_before_reply(ino);
        self.lookup(newparent, newname)
    }

    pub fn unlink(self: &Arc<Self>, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        self.remove_path(&rel, false)?;
        self.dir_changed(parent);
        Ok(())
    }

    pub fn rmdir(self: &Arc<Self>, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        self.remove_path(&rel, true)?;
        self.dir_changed(parent);
        Ok(())
    }

    fn remove_path(self: &Arc<Self>, rel: &Path, dir: bool) -> Result<(), Errno> {
        let (writes, tree) = self.writable()?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = rel.file_name().ok_or(Errno::EINVAL)?;
        let attr = self.ns.lookup(parent, name)?.attr;
        match (dir, attr.kind == FileType::Directory) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            _ => {}
        }
        if dir && !self.ns.list(rel)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let changing = writes
            .rename_gate
            .write()
            .unwrap_or_else(|e| e.into_inner());
        writes.records.flush();
        let removed = match rel.to_str() {
            Some(text) => {
                let key = self.store.key_for(text).ok();
                let manifest = self.rows.manifest();
                self.block_on(manifest.mark_deleted(&[(text.to_string(), key)]))
                    .map_err(|e| {
                        tracing::error!(path = text, error = %e, "cannot record the removal");
                        Errno::EIO
                    })?
            }
            None => Default::default(),
        };
        crate::testhook::crash_point("remove:recorded");
        // A file open here keeps working after its name is gone: its record keeps the local
        // copy open.
        let open = (!dir)
            .then(|| self.keep_local_of_open(attr.ino.0, rel))
            .flatten();
        let done = if dir {
            local::rmdir(tree, rel)
        } else {
            local::unlink(tree, rel)
        };
        match done {
            Ok(()) => {}
            // Only the dest had it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !removed.rows.is_empty() => {}
            Err(e) => {
                let manifest = self.rows.manifest();
                for (path, version) in &removed.rows {
                    let _ = self.block_on(manifest.undelete(path, *version));
                }
                self.forget_row(rel);
                return Err(errno(e));
            }
        }
        crate::testhook::crash_point("remove:local-done");
        self.inodes.unlinked(rel);
        if dir {
            // Its number may be known by path; a directory made there next is another.
            self.rows.forget_all();
        }
        drop(changing);
        self.forget_row(rel);
        match open {
            Some(inode) => self.delete_when_closed(&inode, removed.leftovers),
            None => self.delete_leftovers(removed.leftovers),
        }
        Ok(())
    }

    /// If `ino` (at `rel`) is open, gives its record a descriptor of the local copy (so fstat,
    /// fchmod, ftruncate and fsync reach it once its name is gone) and returns the record.
    fn keep_local_of_open(&self, ino: u64, rel: &Path) -> Option<Arc<super::inode::Inode>> {
        let inode = self.inodes.get(ino)?;
        let needs_local = {
            let state = inode.lock();
            if state.handles == 0 {
                return None;
            }
            state.local.is_none()
        };
        if needs_local {
            let tree = self.ns.local()?;
            let file = tree
                .open_at(rel, libc::O_RDWR)
                .or_else(|_| tree.open_at(rel, libc::O_RDONLY))
                .ok()
                .map(Arc::new);
            let mut state = inode.lock();
            if state.local.is_none() {
                state.local = file;
            }
        }
        Some(inode)
    }

    /// Keeps the dest objects of a file unlinked while open until its last handle closes (a
    /// reader of the dest copy still reads them); deletes them now if it closed meanwhile.
    fn delete_when_closed(self: &Arc<Self>, inode: &super::inode::Inode, leftovers: Vec<Leftover>) {
        let now = {
            let mut state = inode.lock();
            if state.handles > 0 {
                state.leftovers.extend(leftovers);
                Vec::new()
            } else {
                leftovers
            }
        };
        self.delete_leftovers(now);
    }

    /// Deletes the dest objects a removal or rename left; what fails stays recorded and is
    /// retried at the next start. It waits for the dest: a change that may call it runs off the
    /// FUSE threads when the dest is remote (`writes_may_wait`), so the object is gone when the
    /// application's unlink returns.
    pub(super) fn delete_leftovers(&self, leftovers: Vec<Leftover>) {
        if leftovers.is_empty() {
            return;
        }
        let (store, manifest) = (self.store.clone(), self.rows.manifest().clone());
        self.block_on(delete_leftovers(store, manifest, leftovers));
    }

    /// `delete_leftovers`, on the runtime (a release on a FUSE thread must not wait for it).
    pub(super) fn delete_leftovers_later(&self, leftovers: Vec<Leftover>) {
        if leftovers.is_empty() {
            return;
        }
        let (store, manifest) = (self.store.clone(), self.rows.manifest().clone());
        self.rt.spawn(delete_leftovers(store, manifest, leftovers));
    }

    pub fn rename(
        self: &Arc<Self>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let from = self.child(parent, name)?;
        let to = self.new_child(newparent, newname)?;
        self.rename_between(&from, &to, flags)?;
        self.dir_changed(parent);
        self.dir_changed(newparent);
        Ok(())
    }

    fn rename_between(
        self: &Arc<Self>,
        from: &Path,
        to: &Path,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let (writes, tree) = self.writable()?;
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE would swap two files' keys at the dest in one step; not offered.
            return Err(Errno::EINVAL);
        }
        let split = |p: &Path| {
            (
                p.parent().unwrap_or(Path::new("")).to_path_buf(),
                p.file_name().unwrap_or_default().to_os_string(),
            )
        };
        let (from_dir, from_name) = split(from);
        let (to_dir, to_name) = split(to);
        let from_attr = self.ns.lookup(&from_dir, &from_name)?.attr;
        let from_is_dir = from_attr.kind == FileType::Directory;
        let replaced = self.ns.lookup(&to_dir, &to_name).ok();
        if let Some(to_found) = &replaced {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (from_is_dir, to_found.attr.kind == FileType::Directory) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.ns.list(to)?.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.bring_back_below(from, from_is_dir)?;
        let changing = writes
            .rename_gate
            .write()
            .unwrap_or_else(|e| e.into_inner());
        writes.records.flush();
        let leftovers = match (from.to_str(), to.to_str()) {
            (Some(f), Some(t)) => {
                let store = self.store.clone();
                let keys = move |path: &str| store.key_for(path).ok();
                let hold = Some((writes.holds.holder.as_str(), writes.holds.until()));
                let manifest = self.rows.manifest();
                self.block_on(manifest.rename_rows(f, t, &keys, hold))
                    .map_err(|e| {
                        tracing::error!(from = f, to = t, error = %e, "cannot record the rename");
                        Errno::EIO
                    })?
            }
            _ => Vec::new(),
        };
        crate::testhook::crash_point("rename:recorded");
        // A file replaced while open keeps working, as after an unlink.
        let replaced_open = replaced
            .as_ref()
            .filter(|f| f.attr.kind != FileType::Directory)
            .and_then(|f| self.keep_local_of_open(f.ino(), to));
        if let Err(e) = local::rename(tree, from, to, flags.bits()) {
            if let (Some(f), Some(t)) = (from.to_str(), to.to_str()) {
                let store = self.store.clone();
                let keys = move |path: &str| store.key_for(path).ok();
                let manifest = self.rows.manifest();
                if let Err(undo) = self.block_on(manifest.rename_rows(t, f, &keys, None)) {
                    tracing::error!(error = %undo, "cannot undo the recorded rename; the next scan repairs it");
                }
            }
            self.rows.forget_all();
            return Err(errno(e));
        }
        crate::testhook::crash_point("rename:local-done");
        if replaced.is_some() {
            self.inodes.unlinked(to);
        }
        self.inodes.renamed(from, to);
        drop(changing);
        self.release_renamed(to);
        self.rows.forget_all();
        if let Some(inode) = &replaced_open {
            inode.changed();
        }
        self.delete_leftovers(leftovers);
        writes.records.wake();
        Ok(())
    }

    /// The renamed files are in place: the sweeper may take them, except those still open for
    /// writing (their writers hold them until they close).
    fn release_renamed(&self, to: &Path) {
        let (Ok((writes, _)), Some(text)) = (self.writable(), to.to_str()) else {
            return;
        };
        let kept: Vec<String> = self
            .inodes
            .written_below(to)
            .into_iter()
            .filter_map(|p| p.to_str().map(str::to_string))
            .collect();
        let manifest = self.rows.manifest();
        if let Err(e) = self.block_on(manifest.release_renamed(text, &writes.holds.holder, &kept)) {
            // The daemon keeps renewing its holds: these files wait until they are written
            // again or the daemon restarts.
            tracing::warn!(path = text, error = %e, "cannot release the renamed files for copying");
        }
    }

    /// Brings every dest-only file at or below `from` back to the local tree: a rename moves
    /// the local tree, and the dest keys of those files would not follow.
    fn bring_back_below(&self, from: &Path, dir: bool) -> Result<(), Errno> {
        let (_, tree) = self.writable()?;
        if !dir {
            return self.ensure_local(from);
        }
        ensure_local_dirs(tree, &self.rows, from).map_err(errno)?;
        let Some(text) = from.to_str() else {
            return Ok(());
        };
        let manifest = self.rows.manifest();
        let purged = self
            .block_on(manifest.purged_below(text))
            .map_err(|_| Errno::EIO)?;
        for path in purged {
            if crate::manifest::refused_path(&path).is_some() {
                continue;
            }
            self.ensure_local(Path::new(&path))?;
        }
        Ok(())
    }

    /// setattr: chmod, chown, truncate, utimens, on the local copy (brought back first if only
    /// the dest has it), or on the descriptor a file unlinked while open keeps.
    pub fn setattr(&self, ino: u64, change: &AttrChange, fh: Option<u64>) -> Result<Found, Errno> {
        self.writable()?;
        self.changed();
        if let Some(file) = self.unlinked_local(ino)? {
            return apply_to_file(&file, change, ino);
        }
        let rel = self.path(ino)?;
        self.ensure_local(&rel)?;
        let (_, tree) = self.writable()?;
        let writers = self.inodes.get(ino).map_or(0, |inode| inode.lock().writers);
        if writers == 0 {
            self.hold(&rel)?;
        }
        if let Some(mode) = change.mode {
            local::chmod(tree, &rel, mode).map_err(errno)?;
        }
        if change.uid.is_some() || change.gid.is_some() {
            local::chown(tree, &rel, change.uid, change.gid).map_err(errno)?;
        }
        if let Some(size) = change.size {
            let handle = fh.and_then(|fh| self.handles.get(fh));
            match handle.as_ref().and_then(|h| h.file()) {
                Some(file) => file.set_len(size).map_err(errno)?,
                None => local::truncate(tree, &rel, size).map_err(errno)?,
            }
        }
        if change.atime.is_some() || change.mtime.is_some() {
            local::set_times(tree, &rel, set_time(change.atime), set_time(change.mtime))
                .map_err(errno)?;
        }
        if writers == 0 {
            self.record_path(&rel);
        }
        self.ns.attr(&rel, ino)
    }

    /// The local copy a file unlinked while open keeps, if `ino` is such a file.
    fn unlinked_local(&self, ino: u64) -> Result<Option<Arc<File>>, Errno> {
        let Some(inode) = self.inodes.get(ino) else {
            return Ok(None);
        };
        let state = inode.lock();
        if !state.unlinked() {
            return Ok(None);
        }
        state.local.clone().map(Some).ok_or(Errno::ENOENT)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        use std::os::unix::fs::FileExt;
        let handle = self
            .handles
            .get(fh)
            .filter(|h| h.writable)
            .ok_or(Errno::EBADF)?;
        let file = handle.file().ok_or(Errno::EBADF)?;
        file.write_all_at(data, offset).map_err(errno)?;
        self.changed();
        Ok(data.len() as u32)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let handle = self.handles.get(fh).ok_or(Errno::EBADF)?;
        let synced = match handle.file() {
            Some(file) if datasync => file.sync_data(),
            Some(file) => file.sync_all(),
            None => Ok(()),
        };
        synced.map_err(errno)
    }

    pub fn fsyncdir(&self, ino: u64) -> Result<(), Errno> {
        let (_, tree) = self.writable()?;
        let rel = self.path(ino)?;
        local::sync_dir(tree, &rel).map_err(errno)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        let handle = self
            .handles
            .get(fh)
            .filter(|h| h.writable)
            .ok_or(Errno::EBADF)?;
        let file = handle.file().ok_or(Errno::EBADF)?;
        self.changed();
        // SAFETY: a descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno(io::Error::last_os_error()))
        }
    }
}

/// A setattr on a file unlinked while open: applied to its local copy's descriptor. Its data is
/// never recorded again.
fn apply_to_file(file: &File, change: &AttrChange, ino: u64) -> Result<Found, Errno> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(mode) = change.mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(errno)?;
    }
    if change.uid.is_some() || change.gid.is_some() {
        std::os::unix::fs::fchown(file, change.uid, change.gid).map_err(errno)?;
    }
    if let Some(size) = change.size {
        file.set_len(size).map_err(errno)?;
    }
    if change.atime.is_some() || change.mtime.is_some() {
        local::set_file_times(file, set_time(change.atime), set_time(change.mtime))
            .map_err(errno)?;
    }
    Ok(found(attr_from_metadata(
        &file.metadata().map_err(errno)?,
        ino,
    )))
}

async fn delete_leftovers(
    store: Arc<dyn crate::store::Store>,
    manifest: crate::manifest::Manifest,
    leftovers: Vec<Leftover>,
) {
    let writer = manifest.id().to_string();
    for leftover in leftovers {
        let removal = store
            .delete_owned(&leftover.dest_key, &leftover.owned_sha256, &writer)
            .await;
        match removal {
            Ok(_) => {
                if let Err(e) = crate::engine::repair::settle(&manifest, &leftover).await {
                    tracing::warn!(path = %leftover.path, error = %e, "dest object deleted; the manifest will learn it at the next start");
                }
            }
            Err(e) => {
                tracing::warn!(path = %leftover.path, key = %leftover.dest_key, error = %e, "cannot delete the dest object now; it is recorded and retried at the next start")
            }
        }
    }
}
