//! Open file handles: what each `fh` the kernel holds reads from and writes to.
//!
//! Owns: the table from handle numbers to handles. A handle points at its inode's record
//! (`inode.rs`), where everything shared by the handles of one file lives; nothing here decides
//! routes or modes (`open.rs` does).

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use super::inode::Inode;
use super::prefetch::RemoteFile;

/// What an open file handle reads from and writes to.
pub enum HandleIo {
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
        deadline: Option<Duration>,
    },
}

/// One open handle: its inode's record, what it serves from, and whether it may write.
pub struct Handle {
    pub inode: Arc<Inode>,
    pub io: HandleIo,
    pub writable: bool,
}

impl Handle {
    /// The local file this handle does its I/O on, if any.
    pub fn file(&self) -> Option<&File> {
        match &self.io {
            HandleIo::Passthrough { file } => Some(file),
            HandleIo::Local(file) => Some(file),
            HandleIo::Remote { .. } => None,
        }
    }
}

pub struct Handles {
    open: DashMap<u64, Arc<Handle>, foldhash::fast::RandomState>,
    next: AtomicU64,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            open: DashMap::default(),
            next: AtomicU64::new(1),
        }
    }
}

impl Handles {
    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.open.get(&fh).map(|h| h.clone())
    }

    pub fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.insert(fh, Arc::new(handle));
        fh
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.open.remove(&fh).map(|(_, h)| h)
    }
}
