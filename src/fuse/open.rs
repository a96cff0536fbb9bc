//! Open files and the I/O mode of each inode.
//!
//! The kernel lets every open of one inode use either the same passthrough backing file or no
//! passthrough at all; mixing them fails the open with EIO. So the first open of an inode picks
//! its mode and every open that overlaps it follows:
//!
//! - the local copy (source route, or any open for writing) → passthrough on the local file,
//!   opened read-write so later writers share it;
//! - a `file://` dest file → passthrough on that file;
//! - a remote object → served by the daemon (kernel page cache kept).
//!
//! Later opens share what the first chose: readers of a file being written read the local copy,
//! readers of a dest-backed file the dest copy. A writer cannot share a dest backing file (it
//! must write the local copy), so it waits a moment for those readers to close (`writer_wait`)
//! and is refused with ETXTBSY if they do not. While a writer waits, new readers of that inode
//! wait behind it (on a blocking thread, never a FUSE thread), or a steady stream of readers
//! would keep the writer out for ever; once the writer is in, they share the local copy. A
//! writer on a daemon-served inode is served by the daemon too.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fuser::BackingId;

use super::prefetch::RemoteFile;

/// What an open file handle reads from and writes to.
pub enum Handle {
    /// The kernel does the I/O on the inode's backing file; `file` answers stray requests
    /// (and fsync, ftruncate, fallocate).
    Passthrough { file: Arc<File> },
    /// A local file (the source, or a `file://` dest) served by the daemon.
    Local(File),
    /// An object at a remote dest; `rel` names the local copy to fall back to, and `deadline`
    /// (set while there is one) how long a read may wait for the dest before it answers.
    Remote {
        file: Arc<RemoteFile>,
        rel: PathBuf,
        deadline: Option<std::time::Duration>,
    },
}

/// One open handle: its inode, what it serves from, and whether it was opened for writing.
pub struct Open {
    pub ino: u64,
    pub handle: Handle,
    pub writable: bool,
}

impl Open {
    pub fn file(&self) -> Option<&File> {
        match &self.handle {
            Handle::Passthrough { file } => Some(file),
            Handle::Local(file) => Some(file),
            Handle::Remote { .. } => None,
        }
    }
}

/// The mode an inode is in while it has open handles.
#[derive(Clone)]
pub enum Mode {
    Passthrough {
        backing: Arc<BackingId>,
        file: Arc<File>,
        /// The backing file is the local copy (not a dest file): writers may share it.
        local: bool,
    },
    Daemon,
}

impl Mode {
    /// A writer must not join: the inode reads a dest file through the kernel.
    pub fn excludes_writers(&self) -> bool {
        matches!(self, Mode::Passthrough { local: false, .. })
    }
}

struct InodeIo {
    opens: usize,
    mode: Mode,
}

#[derive(Default)]
pub struct OpenFiles {
    handles: Mutex<HashMap<u64, Arc<Open>>>,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    /// Writers waiting for the dest readers of an inode to leave, by inode.
    waiting_writers: Mutex<HashMap<u64, usize>>,
    next: std::sync::atomic::AtomicU64,
}

/// A writer's place in the queue of an inode: new readers wait while it is held.
pub struct WaitingWriter<'a> {
    files: &'a OpenFiles,
    ino: u64,
}

impl Drop for WaitingWriter<'_> {
    fn drop(&mut self) {
        self.files.writer_stops_waiting(self.ino);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OpenFiles {
    pub fn new() -> OpenFiles {
        OpenFiles {
            next: std::sync::atomic::AtomicU64::new(1),
            ..Default::default()
        }
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Open>> {
        lock(&self.handles).get(&fh).cloned()
    }

    /// Opens a handle on `ino`. `choose` runs with the inode's current mode (None: no handle
    /// is open) under the registry's lock, so two first opens cannot pick different modes; it
    /// returns the handle and the mode it put the inode in.
    pub fn open<T>(
        &self,
        ino: u64,
        choose: impl FnOnce(Option<&Mode>, u64) -> std::io::Result<(Open, Mode, T)>,
    ) -> std::io::Result<(u64, T)> {
        let fh = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut inodes = lock(&self.inodes);
        let current = inodes.get(&ino).map(|io| &io.mode);
        let (open, mode, out) = choose(current, fh)?;
        let io = inodes.entry(ino).or_insert(InodeIo {
            opens: 0,
            mode: mode.clone(),
        });
        io.opens += 1;
        io.mode = mode;
        lock(&self.handles).insert(fh, Arc::new(open));
        Ok((fh, out))
    }

    /// Closes a handle; the inode's mode ends with its last handle.
    pub fn release(&self, fh: u64) -> Option<Arc<Open>> {
        let open = lock(&self.handles).remove(&fh)?;
        let mut inodes = lock(&self.inodes);
        if let Some(io) = inodes.get_mut(&open.ino) {
            io.opens = io.opens.saturating_sub(1);
            if io.opens == 0 {
                inodes.remove(&open.ino);
            }
        }
        Some(open)
    }

    /// Whether `ino` currently reads a dest file through the kernel (no writer may join).
    pub fn excludes_writers(&self, ino: u64) -> bool {
        lock(&self.inodes)
            .get(&ino)
            .is_some_and(|io| io.mode.excludes_writers())
    }

    /// Marks a writer waiting on `ino` until the returned guard is dropped.
    pub fn writer_waiting(&self, ino: u64) -> WaitingWriter<'_> {
        self.writer_starts_waiting(ino);
        WaitingWriter { files: self, ino }
    }

    /// Marks a writer waiting on `ino` until `writer_stops_waiting` (for a writer whose open
    /// goes on on another thread).
    pub fn writer_starts_waiting(&self, ino: u64) {
        *lock(&self.waiting_writers).entry(ino).or_default() += 1;
    }

    pub fn writer_stops_waiting(&self, ino: u64) {
        let mut waiting = lock(&self.waiting_writers);
        if let Some(n) = waiting.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&ino);
            }
        }
    }

    /// Whether a writer waits to open `ino` (new readers queue behind it).
    pub fn has_waiting_writer(&self, ino: u64) -> bool {
        lock(&self.waiting_writers).contains_key(&ino)
    }

    /// The inodes that have a handle open for writing.
    pub fn written_inodes(&self) -> Vec<u64> {
        let mut inodes: Vec<u64> = lock(&self.handles)
            .values()
            .filter(|o| o.writable)
            .map(|o| o.ino)
            .collect();
        inodes.sort_unstable();
        inodes.dedup();
        inodes
    }

    /// How many handles open for writing `ino` has.
    pub fn writers(&self, ino: u64) -> usize {
        lock(&self.handles)
            .values()
            .filter(|o| o.ino == ino && o.writable)
            .count()
    }
}
