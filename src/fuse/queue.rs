//! The copy-on-read queue (DESIGN §1.3): the first open of a file not copied yet puts it at the
//! head of the sweeper's queue. The open never waits: the manifest is written by the queue's
//! own task, many paths per statement.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::ReadStats;
use crate::manifest::Manifest;

/// Paths queued recently, not sent again: a bounded set (one forgotten costs a statement that
/// changes nothing).
const RECENT: u64 = 16_384;

/// Opens of files not copied yet, on their way to the head of the copy queue.
pub struct CopyOnRead {
    tx: mpsc::UnboundedSender<String>,
    recent: moka::sync::Cache<String, ()>,
}

impl CopyOnRead {
    /// The queue, and the task that records queued files in the manifest and wakes `wake`.
    pub fn start(manifest: Manifest, wake: Arc<Notify>, stats: Arc<ReadStats>) -> CopyOnRead {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            // Queued files wait while the manifest is unreachable, for as long as the mount.
            let (_never, patience) = tokio::sync::watch::channel(false);
            let mut paths = Vec::new();
            while rx.recv_many(&mut paths, 256).await > 0 {
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
            recent: moka::sync::Cache::builder()
                .max_capacity(RECENT)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }
    }

    /// Never blocks the open.
    pub fn queue(&self, path: &str) {
        if self.recent.contains_key(path) {
            return;
        }
        self.recent.insert(path.to_string(), ());
        let _ = self.tx.send(path.to_string());
    }
}
