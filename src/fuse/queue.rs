//! The copy-on-read queue (DESIGN §1.3): the first open of a file not copied yet puts it at the
//! head of the sweeper's queue. The open never waits: the manifest is written by the queue's
//! own task, many paths per statement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::ReadStats;
use crate::manifest::Manifest;

/// Paths per statement, at most.
const BATCH: usize = 512;
/// How long a queued path waits for others to share its statement.
const LINGER: Duration = Duration::from_millis(50);

/// Slots of the filter of paths queued recently (8 bytes each).
const RECENT: usize = 16_384;

/// How long the daemon's exit waits for the queue's last statement.
const FLUSH_PATIENCE: Duration = Duration::from_secs(5);

enum Message {
    Open(String),
    /// Sent once everything before it is recorded (or given up on).
    Flush(oneshot::Sender<()>),
}

/// Opens of files not copied yet, on their way to the head of the copy queue.
pub struct CopyOnRead {
    tx: mpsc::UnboundedSender<Message>,
    /// Paths queued recently, not sent again: a lossy filter by hash, one slot per hash bucket
    /// (a path pushed out is sent again, which changes nothing; a full cache with its own
    /// bookkeeping cost more per open than the rest of the open did).
    recent: Box<[AtomicU64]>,
    hasher: foldhash::fast::RandomState,
}

impl CopyOnRead {
    /// The queue, and the task that records queued files in the manifest and wakes `wake`.
    pub fn start(manifest: Manifest, wake: Arc<Notify>, stats: Arc<ReadStats>) -> CopyOnRead {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            // Queued files wait while the manifest is unreachable, for as long as the mount.
            let (_never, patience) = tokio::sync::watch::channel(false);
            let mut messages = Vec::new();
            while rx.recv_many(&mut messages, BATCH).await > 0 {
                // Opens come one at a time: gather those of the next moments into one
                // statement (one each cost more than the opens). Asleep, the task is not
                // waiting on the channel, so those opens send without waking it (a wake per
                // open cost a fifth of an open's time: perf, docs/BENCHMARKS.md). A flush
                // (the daemon's exit) does not wait.
                if !messages.iter().any(|m| matches!(m, Message::Flush(_))) {
                    tokio::time::sleep(LINGER).await;
                }
                while messages.len() < BATCH {
                    match rx.try_recv() {
                        Ok(message) => messages.push(message),
                        Err(_) => break,
                    }
                }
                let (mut paths, mut flushed) = (Vec::new(), Vec::new());
                for message in messages.drain(..) {
                    match message {
                        Message::Open(path) => paths.push(path),
                        Message::Flush(done) => flushed.push(done),
                    }
                }
                if !paths.is_empty() {
                    record(&manifest, &patience, &paths, &stats, &wake).await;
                }
                for done in flushed {
                    let _ = done.send(());
                }
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
        let _ = self.tx.send(Message::Open(path.to_string()));
    }

    /// Waits until the opens queued so far are recorded (the daemon's exit), for at most
    /// `FLUSH_PATIENCE`: a manifest that does not answer then leaves them to the next sweep,
    /// which copies them all the same.
    pub fn flush(&self, rt: &tokio::runtime::Handle) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            // The timer is made inside the runtime: this thread is not one of its own.
            let _ = rt.block_on(async { tokio::time::timeout(FLUSH_PATIENCE, wait).await });
        }
    }
}

/// Puts `paths` at the head of the copy queue and wakes the sweeper.
async fn record(
    manifest: &Manifest,
    patience: &tokio::sync::watch::Receiver<bool>,
    paths: &[String],
    stats: &ReadStats,
    wake: &Notify,
) {
    match manifest
        .patiently(patience, || manifest.prioritize(paths))
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
}
