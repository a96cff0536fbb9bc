//! One record per inode the mount has something to remember about: everything it knows of an
//! open file (its handles, the backing file they share, writers and waiting writers, the local
//! copy kept for a file unlinked while open, what to delete at the dest once it is closed), and
//! the numbers of paths no manifest row holds yet.
//!
//! An inode without such a record costs the daemon nothing: its number is in the manifest
//! (`entries.ino`, see `manifest/inodes.rs`) and its path is found again from there (`Rows`).
//! So the memory of the daemon grows with the files open and the paths it numbered ahead of the
//! manifest, not with every path the kernel still remembers (issue 15).
//!
//! # Lock order
//!
//! 1. a shard of `Inodes::records` or `Inodes::pins` (DashMap; held only inside one call of this
//!    file, never while calling out),
//! 2. one `Inode::state`.
//!
//! Never two `Inode::state` at once. Nothing here holds a lock across a call to the manifest, the
//! dest or a blocking system call on a file: callers take the state, decide, drop it, act, and
//! come back (`Inode::turn` wakes those who wait for the state to change).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fuser::BackingId;

use crate::manifest::Leftover;

/// The root directory's number (FUSE's).
pub const ROOT: u64 = 1;

/// Numbers this mount gives paths that no manifest row can hold (a name that is not UTF-8, a
/// replica's row written without a number): above every number the manifest hands out, and
/// never written to it (the manifest refuses them: `manifest::inodes::storable`).
const MEMORY_ONLY_BASE: u64 = crate::manifest::FIRST_MEMORY_ONLY_INO;

/// What numbering a path came to (`Inodes::pin_with`).
pub enum NewNumber {
    /// The manifest's row has one now.
    Theirs(u64),
    /// A new one from the manifest's counter.
    Ours(u64),
    /// The manifest gave none: this mount's own.
    MemoryOnly,
}

/// How the open handles of an inode do their I/O. The kernel lets every open of one inode use
/// the same passthrough backing file or none: the first open picks, the others follow.
#[derive(Clone)]
pub enum InodeIo {
    Passthrough {
        backing: Arc<BackingId>,
        file: Arc<File>,
        /// The backing file is the local copy (not a dest file): writers may share it.
        local: bool,
    },
    Daemon,
}

impl InodeIo {
    /// A writer must not join: the inode reads a dest file through the kernel.
    pub fn excludes_writers(&self) -> bool {
        matches!(self, InodeIo::Passthrough { local: false, .. })
    }
}

/// What the mount knows of one inode (see the module comment).
#[derive(Default)]
pub struct InodeState {
    /// Its path below the root; None once it was unlinked or replaced while open.
    pub path: Option<Arc<Path>>,
    /// The number is not in the manifest: this record is the only place that knows it.
    pub memory_only: bool,
    /// The number is on its way into the manifest (`records.rs`).
    pub pin_pending: bool,
    /// How often the kernel was given this number and has not forgotten it (counted only
    /// while `memory_only`: other numbers can be found again in the manifest).
    pub lookups: u64,
    pub handles: usize,
    pub writers: usize,
    /// Writers waiting for readers of a dest copy to close; new readers wait behind them.
    pub waiting_writers: usize,
    /// How the open handles do their I/O; None while none is open.
    pub io: Option<InodeIo>,
    /// A descriptor of the local copy while handles are open: what fstat, fchmod, ftruncate
    /// and fsync reach once the file was unlinked.
    pub local: Option<Arc<File>>,
    /// Dest objects of a file unlinked while open, deleted when its last handle closes.
    pub leftovers: Vec<Leftover>,
    /// Removed from the table: whoever still holds the record must look again.
    detached: bool,
}

impl InodeState {
    fn idle(&self) -> bool {
        self.handles == 0
            && self.waiting_writers == 0
            && !(self.memory_only && (self.lookups > 0 || self.pin_pending))
            && self.leftovers.is_empty()
    }

    /// Unlinked (or replaced) while open.
    pub fn unlinked(&self) -> bool {
        self.path.is_none()
    }
}

pub struct Inode {
    pub ino: u64,
    state: Mutex<InodeState>,
    /// Signalled whenever `state` changes in a way a waiter may care for.
    turn: Condvar,
}

impl Inode {
    pub fn lock(&self) -> MutexGuard<'_, InodeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whoever waits for this inode's state to change.
    pub fn changed(&self) {
        self.turn.notify_all();
    }

    /// Waits (on the calling thread, never a FUSE one) until `done` holds or `limit` passes;
    /// returns the state and whether `done` holds.
    pub fn wait_until<'a>(
        &'a self,
        mut state: MutexGuard<'a, InodeState>,
        limit: Duration,
        done: impl Fn(&InodeState) -> bool,
    ) -> (MutexGuard<'a, InodeState>, bool) {
        let until = Instant::now() + limit;
        loop {
            if done(&state) {
                return (state, true);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (state, false);
            }
            state = self
                .turn
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The records, and the numbers of paths no row holds yet.
type Hasher = foldhash::fast::RandomState;

pub struct Inodes {
    records: DashMap<u64, Arc<Inode>, Hasher>,
    /// Paths numbered here, by path: the same path keeps its number until the manifest has it.
    pins: DashMap<PathBuf, u64, Hasher>,
    /// How many pins there are: most lookups find none and need not hash their path.
    pinned_count: AtomicU64,
    next_memory_only: AtomicU64,
}

impl Default for Inodes {
    fn default() -> Self {
        Inodes {
            records: DashMap::default(),
            pins: DashMap::default(),
            pinned_count: AtomicU64::new(0),
            next_memory_only: AtomicU64::new(MEMORY_ONLY_BASE),
        }
    }
}

impl Inodes {
    pub fn new() -> Inodes {
        Inodes::default()
    }

    /// The record of `ino`, if it has one.
    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.records.get(&ino).map(|r| r.clone())
    }

    /// Runs `f` on the state of `ino`'s record, made (at `path`) if it has none.
    pub fn with<T>(&self, ino: u64, path: &Path, f: impl FnOnce(&mut InodeState) -> T) -> T {
        self.with_record(ino, path, |_, state| f(state))
    }

    /// As `with`, also giving `f` the record.
    pub fn with_record<T>(
        &self,
        ino: u64,
        path: &Path,
        f: impl FnOnce(&Arc<Inode>, &mut InodeState) -> T,
    ) -> T {
        loop {
            let inode = self
                .records
                .entry(ino)
                .or_insert_with(|| {
                    Arc::new(Inode {
                        ino,
                        state: Mutex::new(InodeState {
                            path: Some(Arc::from(path)),
                            ..Default::default()
                        }),
                        turn: Condvar::new(),
                    })
                })
                .clone();
            let mut state = inode.lock();
            if state.detached {
                continue;
            }
            return f(&inode, &mut state);
        }
    }

    /// Drops `ino`'s record if nothing keeps it (call after a change that may leave it idle).
    pub fn settle(&self, ino: u64) {
        let mut pinned_path = None;
        self.records.remove_if(&ino, |_, inode| {
            let mut state = inode.lock();
            if !state.idle() {
                return false;
            }
            state.detached = true;
            if state.memory_only {
                pinned_path = state.path.clone();
            }
            true
        });
        if let Some(path) = pinned_path {
            if self
                .pins
                .remove_if(&path.to_path_buf(), |_, pinned| *pinned == ino)
                .is_some()
            {
                self.pin_removed();
            }
        }
    }

    /// The path of `ino` as its record knows it: Some(None) if it was unlinked while open;
    /// None if it has no record (ask the manifest).
    pub fn path_of(&self, ino: u64) -> Option<Option<Arc<Path>>> {
        let inode = self.get(ino)?;
        let state = inode.lock();
        Some(state.path.clone())
    }

    /// The number given to `path` here while no row holds one.
    pub fn pinned(&self, path: &Path) -> Option<u64> {
        if self.pinned_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.pins.get(path).map(|n| *n)
    }

    /// Whether any path is pinned (most of the time none is).
    pub fn has_pins(&self) -> bool {
        self.pinned_count.load(Ordering::Acquire) > 0
    }

    fn pin_added(&self) {
        self.pinned_count.fetch_add(1, Ordering::AcqRel);
    }

    fn pin_removed(&self) {
        self.pinned_count.fetch_sub(1, Ordering::AcqRel);
    }

    /// The number of a path no row held when its caller looked: the one already given here,
    /// else what `decide` says, decided while no other thread can number this path. A new
    /// number of ours is kept here until `persisted` says the manifest has it. Returns the
    /// number, and whether it is a new one of ours (the caller records it).
    pub fn pin_with(&self, path: &Path, decide: impl FnOnce() -> NewNumber) -> (u64, bool) {
        match self.pins.entry(path.to_path_buf()) {
            dashmap::Entry::Occupied(taken) => (*taken.get(), false),
            dashmap::Entry::Vacant(free) => {
                let (ino, pending) = match decide() {
                    NewNumber::Theirs(ino) => return (ino, false),
                    NewNumber::Ours(ino) => (ino, true),
                    NewNumber::MemoryOnly => {
                        (self.next_memory_only.fetch_add(1, Ordering::Relaxed), false)
                    }
                };
                free.insert(ino);
                self.pin_added();
                self.with(ino, path, |state| {
                    state.memory_only = true;
                    state.pin_pending = pending;
                    // Counted as handed out already: the caller is about to give it to the
                    // kernel, and if the manifest keeps another number for the path (a scan
                    // recorded it first), the record must outlive that answer. At worst one
                    // reference too many keeps this small record until unmount.
                    state.lookups = 1;
                });
                (ino, pending)
            }
        }
    }

    /// A number for `path` that only this mount will ever know (no row can hold the path).
    pub fn pin_in_memory(&self, path: &Path) -> u64 {
        if let Some(ino) = self.pinned(path) {
            return ino;
        }
        let ino = self.next_memory_only.fetch_add(1, Ordering::Relaxed);
        match self.pins.entry(path.to_path_buf()) {
            dashmap::Entry::Occupied(taken) => *taken.get(),
            dashmap::Entry::Vacant(free) => {
                free.insert(ino);
                self.pin_added();
                self.with(ino, path, |state| state.memory_only = true);
                ino
            }
        }
    }

    /// The manifest now holds `ino` for `path`: the record may go.
    pub fn persisted(&self, path: &Path, ino: u64) {
        if self
            .pins
            .remove_if(&path.to_path_buf(), |_, pinned| *pinned == ino)
            .is_some()
        {
            self.pin_removed();
        }
        if let Some(inode) = self.get(ino) {
            let mut state = inode.lock();
            state.memory_only = false;
            state.pin_pending = false;
        }
        self.settle(ino);
    }

    /// The manifest could not take the number: it stays this mount's own.
    pub fn not_persisted(&self, ino: u64) {
        if let Some(inode) = self.get(ino) {
            inode.lock().pin_pending = false;
        }
        self.settle(ino);
    }

    /// The kernel was handed `ino` once more.
    pub fn looked_up(&self, ino: u64) {
        if let Some(inode) = self.get(ino) {
            let mut state = inode.lock();
            if state.memory_only {
                state.lookups += 1;
            }
        }
    }

    /// The kernel forgot `n` of its references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let Some(inode) = self.get(ino) else { return };
        {
            let mut state = inode.lock();
            state.lookups = state.lookups.saturating_sub(n);
        }
        self.settle(ino);
    }

    /// The path `rel` was removed (or replaced by a rename): records there are unlinked (their
    /// handles keep working) and a number pinned there is dropped.
    pub fn unlinked(&self, rel: &Path) {
        if let Some((_, ino)) = self.pins.remove(rel) {
            self.pin_removed();
            if let Some(inode) = self.get(ino) {
                let mut state = inode.lock();
                state.memory_only = false;
                state.pin_pending = false;
            }
            self.settle(ino);
        }
        for ino in self.records_at(rel, false) {
            if let Some(inode) = self.get(ino) {
                inode.lock().path = None;
                inode.changed();
            }
            self.settle(ino);
        }
    }

    /// A path (and everything below it) was renamed: records and pins move with it.
    pub fn renamed(&self, from: &Path, to: &Path) {
        let moved_pins: Vec<(PathBuf, u64)> = self
            .pins
            .iter()
            .filter(|pin| pin.key().starts_with(from))
            .map(|pin| (pin.key().clone(), *pin.value()))
            .collect();
        for (old, ino) in moved_pins {
            if self.pins.remove_if(&old, |_, n| *n == ino).is_some() {
                let rest = old.strip_prefix(from).unwrap_or(Path::new(""));
                if self.pins.insert(join(to, rest), ino).is_some() {
                    self.pin_removed();
                }
            }
        }
        for ino in self.records_at(from, true) {
            if let Some(inode) = self.get(ino) {
                let mut state = inode.lock();
                if let Some(rest) = state
                    .path
                    .as_ref()
                    .and_then(|p| p.strip_prefix(from).ok().map(Path::to_path_buf))
                {
                    state.path = Some(Arc::from(join(to, &rest)));
                }
            }
        }
    }

    /// Numbers of the records at `rel` (and below it, with `below`).
    fn records_at(&self, rel: &Path, below: bool) -> Vec<u64> {
        self.records
            .iter()
            .filter(|r| {
                let state = r.value().lock();
                state.path.as_deref().is_some_and(
                    |p| {
                        if below {
                            p.starts_with(rel)
                        } else {
                            p == rel
                        }
                    },
                )
            })
            .map(|r| *r.key())
            .collect()
    }

    /// The records of inodes open for writing at or below `rel`, with their paths.
    pub fn written_below(&self, rel: &Path) -> Vec<Arc<Path>> {
        self.records
            .iter()
            .filter_map(|r| {
                let state = r.value().lock();
                let path = state.path.clone()?;
                (state.writers > 0 && path.starts_with(rel)).then_some(path)
            })
            .collect()
    }
}

fn join(base: &Path, rest: &Path) -> PathBuf {
    if rest.as_os_str().is_empty() {
        base.to_path_buf()
    } else if base.as_os_str().is_empty() {
        rest.to_path_buf()
    } else {
        base.join(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_number_stays_with_its_path_until_persisted() {
        let inodes = Inodes::new();
        assert_eq!(
            inodes.pin_with(Path::new("a/b"), || NewNumber::Ours(10)),
            (10, true)
        );
        assert_eq!(
            inodes.pin_with(Path::new("a/b"), || NewNumber::Ours(11)),
            (10, false),
            "the first number stays"
        );
        assert_eq!(
            inodes.pin_with(Path::new("c"), || NewNumber::Theirs(12)),
            (12, false),
            "a row's number is not pinned"
        );
        assert_eq!(inodes.pinned(Path::new("c")), None);
        assert_eq!(inodes.pinned(Path::new("a/b")), Some(10));
        assert_eq!(inodes.path_of(10), Some(Some(Arc::from(Path::new("a/b")))));
        inodes.renamed(Path::new("a"), Path::new("z"));
        assert_eq!(inodes.pinned(Path::new("z/b")), Some(10));
        assert_eq!(inodes.path_of(10), Some(Some(Arc::from(Path::new("z/b")))));
        inodes.persisted(Path::new("z/b"), 10);
        assert_eq!(inodes.pinned(Path::new("z/b")), None);
        assert!(
            inodes.path_of(10).is_none(),
            "the record went: the manifest knows"
        );
    }

    #[test]
    fn memory_only_numbers_live_while_the_kernel_holds_them() {
        let inodes = Inodes::new();
        let ino = inodes.pin_in_memory(Path::new("bad"));
        assert!(ino >= MEMORY_ONLY_BASE);
        assert_eq!(inodes.pin_in_memory(Path::new("bad")), ino);
        inodes.looked_up(ino);
        inodes.looked_up(ino);
        inodes.forget(ino, 1);
        assert!(inodes.path_of(ino).is_some());
        inodes.forget(ino, 1);
        assert!(inodes.path_of(ino).is_none());
        assert_eq!(inodes.pinned(Path::new("bad")), None);
    }

    #[test]
    fn an_open_record_survives_unlink_without_a_path() {
        let inodes = Inodes::new();
        inodes.with(20, Path::new("f"), |state| state.handles = 1);
        inodes.unlinked(Path::new("f"));
        assert_eq!(inodes.path_of(20), Some(None));
        inodes.with(20, Path::new("ignored"), |state| state.handles = 0);
        inodes.settle(20);
        assert!(inodes.path_of(20).is_none());
    }
}
