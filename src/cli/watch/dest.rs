//! Dest health for `status --watch`: a read-only probe of the dest now and then, in a task of
//! its own, bounded by a timeout, so a dest that hangs shows as unreachable instead of freezing
//! the view.
//!
//! Owns: the probe task. It may only look: `Store::preflight(ReadOnly)` (a permission check of
//! a file:// dest's directory, one LIST of one key at an S3 dest), never a write or a probe
//! object; and it may not draw or print.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{open_store, DestUrl, Preflight, S3Flags, Store};

/// What the last probe of the dest said.
#[derive(Debug, Clone)]
pub enum DestHealth {
    /// Not probed (yet), and why.
    Unknown(String),
    Reachable {
        checked: Instant,
    },
    Unreachable {
        reason: String,
        checked: Instant,
    },
}

/// A probe that has not answered after this long counts as unreachable. It is not started
/// again until it answers: a dest that hangs must not pile up stuck probes.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes at most this often, whatever the interval: each probe of an S3 dest is a request.
const LEAST_PAUSE: Duration = Duration::from_secs(5);

/// Probes `dest` (a dest URL; None when neither `--dest` nor the manifest names one) every
/// `interval` or `LEAST_PAUSE`, whichever is longer, until the task is aborted.
pub fn start(
    dest: Option<String>,
    flags: S3Flags,
    interval: Duration,
) -> (watch::Receiver<DestHealth>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(DestHealth::Unknown("probing".into()));
    let task = tokio::spawn(async move {
        let Some(dest) = dest else {
            let _ = tx.send(DestHealth::Unknown(
                "no dest given and none recorded in the manifest".into(),
            ));
            // The sender stays: a closed channel would wake the view in a loop.
            return std::future::pending().await;
        };
        let url = match DestUrl::parse(&dest) {
            Ok(url) => url,
            Err(e) => {
                let _ = tx.send(DestHealth::Unreachable {
                    reason: e.to_string(),
                    checked: Instant::now(),
                });
                return std::future::pending().await;
            }
        };
        probe_forever(url, flags, interval.max(LEAST_PAUSE), tx).await
    });
    (rx, task)
}

async fn probe_forever(
    url: DestUrl,
    flags: S3Flags,
    pause: Duration,
    tx: watch::Sender<DestHealth>,
) {
    let mut store: Option<Arc<dyn Store>> = None;
    loop {
        let mut probe = tokio::spawn(probe(url.clone(), flags.clone(), store.take()));
        let answered = match tokio::time::timeout(PROBE_TIMEOUT, &mut probe).await {
            Ok(answered) => answered,
            Err(_) => {
                let _ = tx.send(DestHealth::Unreachable {
                    reason: format!("no answer in {}s", PROBE_TIMEOUT.as_secs()),
                    checked: Instant::now(),
                });
                probe.await
            }
        };
        let health = match answered {
            Ok((opened, result)) => {
                store = opened;
                match result {
                    Ok(()) => DestHealth::Reachable {
                        checked: Instant::now(),
                    },
                    Err(reason) => DestHealth::Unreachable {
                        reason,
                        checked: Instant::now(),
                    },
                }
            }
            Err(e) => DestHealth::Unreachable {
                reason: format!("the probe failed: {e}"),
                checked: Instant::now(),
            },
        };
        let _ = tx.send(health);
        tokio::time::sleep(pause).await;
    }
}

/// One probe; the store is opened on the first (an S3 client is made once) and handed back.
async fn probe(
    url: DestUrl,
    flags: S3Flags,
    store: Option<Arc<dyn Store>>,
) -> (Option<Arc<dyn Store>>, Result<(), String>) {
    let store = match store {
        Some(store) => store,
        None => match open_store(&url, &flags).await {
            Ok(store) => store,
            Err(e) => return (None, Err(e.to_string())),
        },
    };
    let result = store
        .preflight(Preflight::ReadOnly)
        .await
        .map_err(|e| e.to_string());
    (Some(store), result)
}
