//! The copy-on-read queue (DESIGN §1.3): the first open of a file not copied yet puts it at the
//! head of the sweeper's queue. The open never waits: the manifest is written by the queue's
//! own task, many paths per statement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::ReadStats;
use crate::manifest::Manifest;

/// Paths per statement, at most.
const BATCH: usize = 512;
/// How long a queued path waits for others to share its statement.
const LINGER: Duration = Duration::from_millis(50);

/// Slots of the filter of paths queued recently (8 bytes each).
const RECENT: usize = 16_384;

/// Opens of files not copied yet, on their way to the head of the copy queue.
pub struct CopyOnRead {
    tx: mpsc::UnboundedSender<String>,
    /// Paths queued recently, not sent again: a lossy filter by hash, one slot per hash bucket
    /// (a path pushed out is sent again, which changes nothing; a full cache with its own
    /// bookkeeping cost more per open than the rest of the open did).
    recent: Box<[AtomicU64]>,
    hasher: foldhash::fast::RandomState,
}

impl CopyOnRead {
    /// The queue, and the task that records queued files in the manifest and wakes `wake`.
    pub fn start(manifest: Manifest, wake: Arc<Notify>, stats: Arc<ReadStats>) -> CopyOnRead {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            // Queued files wait while the manifest is unreachable, for as long as the mount.
            let (_never, patience) = tokio::sync::watch::channel(false);
            let mut paths = Vec::new();
            while rx.recv_many(&mut paths, BATCH).await > 0 {
                // Opens come one at a time: gather those of the next moments into one
                // statement (one each cost more than the opens). Asleep, the task is not
                // waiting on the channel, so those opens send without waking it (a wake per
                // open cost a fifth of an open's time: perf, docs/BENCHMARKS.md).
                tokio::time::sleep(LINGER).await;
                while paths.len() < BATCH {
                    match rx.try_recv() {
                        Ok(path) => paths.push(path),
                        Err(_) => break,
                    }
                }
                match manifest
                    .patiently(&patience, || manifest.prioritize(&paths))
                    .await
                {
                    Ok(queued) if queued > 0 => {
                        stats.copy_on_read_queued.inc_by(queued);
                        tracing::debug!(files = queued, "copy-on-read queued");
                        wake.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot queue files for copy-on-read"),
                }
                paths.clear();
            }
        });
        CopyOnRead {
            tx,
            recent: (0..RECENT).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
        }
    }

    /// Never blocks the open.
    pub fn queue(&self, path: &str) {
        use std::hash::BuildHasher;
        let hash = self.hasher.hash_one(path) | 1;
        let slot = &self.recent[(hash as usize >> 1) % RECENT];
        if slot.swap(hash, Ordering::Relaxed) == hash {
            return;
        }
        let _ = self.tx.send(path.to_string());
    }
}
