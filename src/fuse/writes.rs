//! The write path (DESIGN §6): what the application changes lands in the local tree first,
//! and the manifest and dest follow.
//!
//! - A file opened for writing is first brought back from the dest if only the dest has it
//!   (copy-up), then held in the manifest (pending, no worker may take it), and recorded with
//!   priority when its last writer closes it.
//! - unlink, rmdir and rename record the change in the manifest first, then change the local
//!   tree, then delete the dest objects the change left behind (only objects cutoverfs wrote).
//!   A crash between the steps is repaired at the next start (`engine::repair`).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::Path;

use fuser::{
    Errno, FileHandle, FileType, FopenFlags, Generation, INodeNo, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyEmpty, ReplyEntry, ReplyOpen, Request, TimeOrNow,
};

use super::copyup::copy_up;
use super::fs::{reply_opened, FsState};
use super::local::{self, SetTime};
use super::namespace::{child_path, is_bad_name};
use crate::manifest::{Kind, Leftover};
use crate::source::Attrs;

/// A setattr request's changes.
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// Flags of the application's open that matter to a descriptor the daemon writes through.
const KEPT_OPEN_FLAGS: i32 = libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn set_time(time: Option<TimeOrNow>) -> SetTime {
    match time {
        None => SetTime::Keep,
        Some(TimeOrNow::Now) => SetTime::Now,
        Some(TimeOrNow::SpecificTime(t)) => SetTime::At(t),
    }
}

impl FsState {
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<std::path::PathBuf, Errno> {
        if is_bad_name(name) {
            return Err(Errno::EINVAL);
        }
        Ok(child_path(&self.path(parent)?, name))
    }

    /// A name the application is about to create: any name but the form purge gives a local
    /// copy it sets aside (`.cutoverfs-purge-PID-NAME`), which is refused with EPERM and a log
    /// line saying why (the application would otherwise see its file vanish).
    fn new_child(&self, parent: INodeNo, name: &OsStr) -> Result<std::path::PathBuf, Errno> {
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
        if local::exists(self.ns.source(), rel).map_err(errno)? {
            return Ok(());
        }
        match self.ns.entry(rel).map_err(errno)? {
            Some(entry) if entry.in_dest() => {
                copy_up(&self.ns, &*self.store, &self.rt, &entry).map_err(errno)
            }
            Some(entry) if entry.kind == Kind::Dir && entry.visible_without_local_copy() => {
                super::copyup::ensure_local_dirs(&self.ns, rel).map_err(errno)
            }
            _ => Err(Errno::ENOENT),
        }
    }

    /// A recorded file is about to change: nothing may copy it, purge it or serve it from
    /// the dest until its writers are done.
    fn hold(&self, rel: &Path) -> Result<(), Errno> {
        let Some(text) = rel.to_str() else {
            return Ok(());
        };
        self.records.flush();
        let recorded = self.ns.entry(rel).map_err(errno)?;
        tracing::debug!(path = text, state = ?recorded.as_ref().map(|e| e.state), "hold");
        if recorded.is_some_and(|e| e.kind == Kind::File) {
            self.block_on(self.manifest.hold_for_write(
                text,
                &self.holds.holder,
                self.holds.until(),
            ))
            .map_err(|e| {
                tracing::error!(path = text, error = %e, "cannot hold the file in the manifest");
                Errno::EIO
            })?;
            self.ns.forget_entries(&[text.to_string()]);
        }
        Ok(())
    }

    /// Queues `rel` for recording as the local tree holds it now.
    fn record(&self, rel: &Path, attrs: &Attrs) {
        if let Some(text) = rel.to_str() {
            self.records
                .record(text.to_string(), local::facts_of(attrs));
        }
    }

    /// Queues `rel` as it is on disk now; a rename or removal of it waits until it is queued
    /// (see `path_changes`).
    fn record_path(&self, rel: &Path) {
        let _no_rename = self.path_changes.read().unwrap_or_else(|e| e.into_inner());
        if let Ok(st) = self.ns.source().stat_at(rel) {
            self.record(rel, &Attrs::from_stat(&st));
        }
    }

    pub(super) fn open_for_write(&self, ino: u64, rel: &Path, flags: i32, reply: ReplyOpen) {
        let opened = self.ensure_local(rel).and_then(|()| {
            self.hold(rel)?;
            let backing_for = |file: &File| reply.open_backing(file);
            let (fh, backing) = self
                .open_local_handle(ino, rel, flags & KEPT_OPEN_FLAGS, true, &backing_for, None)
                .map_err(errno)?;
            if flags & libc::O_TRUNC != 0 {
                if let Some(file) = self
                    .files
                    .get(fh)
                    .and_then(|o| o.file().map(|f| f.set_len(0)))
                {
                    file.map_err(errno)?;
                }
            }
            Ok((fh, backing))
        });
        match opened {
            Ok((fh, backing)) => reply_opened(reply, fh, backing, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    /// The last writer of a file closed it: record it with priority, unless it was removed or
    /// replaced meanwhile (then its removal or rename recorded everything).
    pub(super) fn after_writer_closed(&self, open: &super::open::Open) {
        if self.files.writers(open.ino) > 0 {
            return;
        }
        let _no_rename = self.path_changes.read().unwrap_or_else(|e| e.into_inner());
        let (Some(rel), Some(file)) = (self.inodes.path(open.ino), open.file()) else {
            return;
        };
        let Ok(meta) = file.metadata() else { return };
        let attrs = Attrs::from_metadata(&meta);
        match self.ns.source().stat_at(&rel) {
            Ok(st) if st.st_ino == attrs.ino && st.st_dev == attrs.dev => self.record(&rel, &attrs),
            _ => {}
        }
    }

    pub(super) fn create_file(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let created = self.new_child(parent, name).and_then(|rel| {
            // A name only the dest still holds: O_CREAT opens that file.
            let dest_only = !local::exists(self.ns.source(), &rel).map_err(errno)?
                && self.ns.attr(&rel).is_ok();
            if dest_only {
                if flags & libc::O_EXCL != 0 {
                    return Err(Errno::EEXIST);
                }
                self.ensure_local(&rel)?;
            }
            let tree = self.ns.source();
            let keep = flags & (libc::O_EXCL | libc::O_TRUNC);
            let (file, new) =
                match local::create(tree, &rel, libc::O_RDWR | libc::O_EXCL | keep, mode) {
                    Ok(file) => (file, true),
                    Err(e)
                        if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 =>
                    {
                        self.hold(&rel)?;
                        (
                            local::create(tree, &rel, libc::O_RDWR | keep, mode).map_err(errno)?,
                            false,
                        )
                    }
                    Err(e) => return Err(errno(e)),
                };
            if new {
                local::give_to(tree, &rel, req.uid(), req.gid()).map_err(errno)?;
                local::exact_mode(tree, &rel, mode).map_err(errno)?;
            }
            let ino = self.inodes.number(&rel);
            let attr = self.attr_of(&rel)?;
            let backing_for = |file: &File| reply.open_backing(file);
            let daemon_file = if self.passthrough.load(std::sync::atomic::Ordering::Relaxed) {
                Some(file)
            } else {
                drop(file);
                None
            };
            let daemon_flags = flags & KEPT_OPEN_FLAGS & !libc::O_ACCMODE | libc::O_RDWR;
            let (fh, backing) = self
                .open_local_handle(ino, &rel, daemon_flags, true, &backing_for, daemon_file)
                .map_err(errno)?;
            Ok((attr, fh, backing))
        });
        match created {
            Ok((attr, fh, Some(backing))) => reply.created_passthrough(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &backing,
            ),
            Ok((attr, fh, None)) => reply.created(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    /// Something new at `rel` that the caller made: theirs, answered with its attributes.
    fn answer_new(&self, req: &Request, rel: &Path, record: bool, reply: ReplyEntry) {
        if let Err(e) = local::give_to(self.ns.source(), rel, req.uid(), req.gid()) {
            return reply.error(errno(e));
        }
        if record {
            self.record_path(rel);
        }
        self.reply_entry(rel, reply)
    }

    pub(super) fn make_dir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        reply: ReplyEntry,
    ) {
        match self.new_child(parent, name).and_then(|rel| {
            self.refuse_dest_only(&rel)?;
            local::mkdir(self.ns.source(), &rel, mode).map_err(errno)?;
            Ok(rel)
        }) {
            Ok(rel) => self.answer_new(req, &rel, true, reply),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let regular = mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0;
        match self.new_child(parent, name).and_then(|rel| {
            self.refuse_dest_only(&rel)?;
            let tree = self.ns.source();
            if regular {
                local::create(tree, &rel, libc::O_WRONLY | libc::O_EXCL, mode & 0o7777)
                    .map_err(errno)?;
                local::exact_mode(tree, &rel, mode).map_err(errno)?;
            } else {
                local::mknod(tree, &rel, mode, rdev).map_err(errno)?;
            }
            Ok(rel)
        }) {
            Ok(rel) => self.answer_new(req, &rel, regular, reply),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn make_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.new_child(parent, name).and_then(|rel| {
            self.refuse_dest_only(&rel)?;
            local::symlink(self.ns.source(), target, &rel).map_err(errno)?;
            Ok(rel)
        }) {
            // Links stay local; the scan records them (DESIGN §3: not followed, not copied).
            Ok(rel) => self.answer_new(req, &rel, false, reply),
            Err(e) => reply.error(e),
        }
    }

    /// A name the application sees (served from the dest) is taken, even with no local copy.
    fn refuse_dest_only(&self, rel: &Path) -> Result<(), Errno> {
        if !local::exists(self.ns.source(), rel).map_err(errno)? && self.ns.attr(rel).is_ok() {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    pub(super) fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        match self
            .child(parent, name)
            .and_then(|rel| self.remove_path(&rel, dir))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn remove_path(&self, rel: &Path, dir: bool) -> Result<(), Errno> {
        let attr = self.ns.attr(rel).map_err(errno)?;
        match (dir, attr.kind == FileType::Directory) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            _ => {}
        }
        if dir && !self.ns.list(rel).map_err(errno)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let changing = self.path_changes.write().unwrap_or_else(|e| e.into_inner());
        self.records.flush();
        let removed = match rel.to_str() {
            Some(text) => {
                let key = self.store.key_for(text).ok();
                self.block_on(self.manifest.mark_deleted(&[(text.to_string(), key)]))
                    .map_err(|e| {
                        tracing::error!(path = text, error = %e, "cannot record the removal");
                        Errno::EIO
                    })?
            }
            None => Default::default(),
        };
        crate::testhook::crash_point("remove:recorded");
        let tree = self.ns.source();
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
                for (path, version) in &removed.rows {
                    let _ = self.block_on(self.manifest.undelete(path, *version));
                }
                if let Some(text) = rel.to_str() {
                    self.ns.forget_entries(&[text.to_string()]);
                }
                return Err(errno(e));
            }
        }
        crate::testhook::crash_point("remove:local-done");
        self.inodes.forget(rel);
        drop(changing);
        if let Some(text) = rel.to_str() {
            self.ns.forget_entries(&[text.to_string()]);
        }
        self.delete_leftovers(removed.leftovers);
        Ok(())
    }

    /// Deletes the dest objects a removal or rename left; what fails stays recorded and is
    /// retried at the next start.
    fn delete_leftovers(&self, leftovers: Vec<Leftover>) {
        if leftovers.is_empty() {
            return;
        }
        let writer = self.manifest.id().to_string();
        for leftover in leftovers {
            let removal = self.block_on(self.store.delete_owned(
                &leftover.dest_key,
                &leftover.owned_sha256,
                &writer,
            ));
            match removal {
                Ok(_) => {
                    let settled = crate::engine::repair::settle(&self.manifest, &leftover);
                    if let Err(e) = self.block_on(settled) {
                        tracing::warn!(path = %leftover.path, error = %e, "dest object deleted; the manifest will learn it at the next start");
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %leftover.path, key = %leftover.dest_key, error = %e, "cannot delete the dest object now; it is recorded and retried at the next start")
                }
            }
        }
    }

    pub(super) fn rename_path(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let renamed = self.child(parent, name).and_then(|from| {
            let to = self.new_child(newparent, newname)?;
            self.rename_between(&from, &to, flags)
        });
        match renamed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename_between(&self, from: &Path, to: &Path, flags: RenameFlags) -> Result<(), Errno> {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE would swap two files' keys at the dest in one step; not offered.
            return Err(Errno::EINVAL);
        }
        let from_attr = self.ns.attr(from).map_err(errno)?;
        let from_dir = from_attr.kind == FileType::Directory;
        if let Ok(to_attr) = self.ns.attr(to) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (from_dir, to_attr.kind == FileType::Directory) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.ns.list(to).map_err(errno)?.is_empty() => {
                    return Err(Errno::ENOTEMPTY)
                }
                _ => {}
            }
        }
        self.bring_back_below(from, from_dir)?;
        let changing = self.path_changes.write().unwrap_or_else(|e| e.into_inner());
        self.records.flush();
        let leftovers = match (from.to_str(), to.to_str()) {
            (Some(f), Some(t)) => {
                let store = self.store.clone();
                let keys = move |path: &str| store.key_for(path).ok();
                let hold = Some((self.holds.holder.as_str(), self.holds.until()));
                self.block_on(self.manifest.rename_rows(f, t, &keys, hold))
                    .map_err(|e| {
                        tracing::error!(from = f, to = t, error = %e, "cannot record the rename");
                        Errno::EIO
                    })?
            }
            _ => Vec::new(),
        };
        crate::testhook::crash_point("rename:recorded");
        if let Err(e) = local::rename(self.ns.source(), from, to, flags.bits()) {
            if let (Some(f), Some(t)) = (from.to_str(), to.to_str()) {
                let store = self.store.clone();
                let keys = move |path: &str| store.key_for(path).ok();
                if let Err(undo) = self.block_on(self.manifest.rename_rows(t, f, &keys, None)) {
                    tracing::error!(error = %undo, "cannot undo the recorded rename; the next scan repairs it");
                }
            }
            self.ns.forget_all_entries();
            return Err(errno(e));
        }
        crate::testhook::crash_point("rename:local-done");
        self.inodes.rename(from, to);
        drop(changing);
        self.release_renamed(to);
        self.ns.forget_all_entries();
        self.delete_leftovers(leftovers);
        self.records.wake();
        Ok(())
    }

    /// The renamed files are in place: the sweeper may take them, except those still open for
    /// writing (their writers hold them until they close).
    fn release_renamed(&self, to: &Path) {
        let Some(text) = to.to_str() else { return };
        let kept: Vec<String> = self
            .files
            .written_inodes()
            .into_iter()
            .filter_map(|ino| self.inodes.path(ino))
            .filter(|p| p.starts_with(to))
            .filter_map(|p| p.to_str().map(str::to_string))
            .collect();
        if let Err(e) = self.block_on(self.manifest.release_renamed(
            text,
            &self.holds.holder,
            &kept,
        )) {
            // The daemon keeps renewing its holds: these files wait until they are written
            // again or the daemon restarts.
            tracing::warn!(path = text, error = %e, "cannot release the renamed files for copying");
        }
    }

    /// Brings every dest-only file at or below `from` back to the local tree: a rename moves
    /// the local tree, and the dest keys of those files would not follow.
    fn bring_back_below(&self, from: &Path, dir: bool) -> Result<(), Errno> {
        if !dir {
            return self.ensure_local(from);
        }
        super::copyup::ensure_local_dirs(&self.ns, from).map_err(errno)?;
        let Some(text) = from.to_str() else {
            return Ok(());
        };
        let purged = self
            .block_on(self.manifest.purged_below(text))
            .map_err(|_| Errno::EIO)?;
        for path in purged {
            if crate::manifest::refused_path(&path).is_some() {
                continue;
            }
            self.ensure_local(Path::new(&path))?;
        }
        Ok(())
    }

    pub(super) fn change_attrs(
        &self,
        ino: INodeNo,
        change: AttrChange,
        fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        match self.apply_attrs(ino, &change, fh) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn apply_attrs(
        &self,
        ino: INodeNo,
        change: &AttrChange,
        fh: Option<FileHandle>,
    ) -> Result<fuser::FileAttr, Errno> {
        let rel = self.path(ino)?;
        self.ensure_local(&rel)?;
        let writers = self.files.writers(ino.0);
        if writers == 0 {
            self.hold(&rel)?;
        }
        let tree = self.ns.source();
        if let Some(mode) = change.mode {
            local::chmod(tree, &rel, mode).map_err(errno)?;
        }
        if change.uid.is_some() || change.gid.is_some() {
            local::chown(tree, &rel, change.uid, change.gid).map_err(errno)?;
        }
        if let Some(size) = change.size {
            let open = fh.and_then(|fh| self.files.get(fh.0));
            match open.as_ref().and_then(|o| o.file()) {
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
        self.attr_of(&rel)
    }
}
