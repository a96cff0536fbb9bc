//! The manifest records of the write path that need not hold up the application: files
//! written and closed, directories made. They are applied in order, many per transaction, by one
//! task; an operation that must see them first (unlink, rename, a hold) calls `flush`.
//!
//! The same task renews the holds on files open for writing, so no worker takes them meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::namespace::Namespace;
use crate::manifest::{now_ms, LocalFacts, Manifest};

enum Message {
    Record(String, LocalFacts),
    Flush(oneshot::Sender<()>),
}

pub struct WriteRecords {
    tx: mpsc::UnboundedSender<Message>,
    rt: tokio::runtime::Handle,
    wake: Arc<Notify>,
}

/// Who holds the files this daemon has open for writing, and for how long a hold lasts.
#[derive(Debug, Clone)]
pub struct Holds {
    pub holder: String,
    pub lasts: Duration,
}

impl Holds {
    pub fn until(&self) -> i64 {
        now_ms() + self.lasts.as_millis() as i64
    }
}

impl WriteRecords {
    pub fn start(
        manifest: Manifest,
        ns: Arc<Namespace>,
        wake: Arc<Notify>,
        holds: Holds,
        rt: tokio::runtime::Handle,
    ) -> WriteRecords {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let task_wake = wake.clone();
        rt.spawn(async move {
            let wake = task_wake;
            let mut renew = tokio::time::interval(holds.lasts / 3);
            let mut messages = Vec::new();
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut messages, 512) => {
                        if n == 0 {
                            break;
                        }
                        apply(&manifest, &ns, &wake, std::mem::take(&mut messages)).await;
                    }
                    _ = renew.tick() => {
                        if manifest.reachability().is_down() {
                            continue;
                        }
                        match manifest.note(manifest.renew_holds(&holds.holder, holds.until()).await) {
                            Err(e) if !e.is_unreachable() => tracing::warn!(error = %e, "cannot renew the holds on files open for writing"),
                            _ => {}
                        }
                    }
                }
            }
        });
        WriteRecords { tx, rt, wake }
    }

    /// Wakes the sweeper (new work was recorded directly, e.g. by a rename).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Queues a path as the local tree holds it now.
    pub fn record(&self, path: String, facts: LocalFacts) {
        let _ = self.tx.send(Message::Record(path, facts));
    }

    /// Waits until everything queued so far is in the manifest.
    pub fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = self.rt.block_on(wait);
        }
    }
}

async fn apply(manifest: &Manifest, ns: &Namespace, wake: &Notify, messages: Vec<Message>) {
    let mut rows: Vec<(String, LocalFacts)> = Vec::new();
    let mut flushed = Vec::new();
    for message in messages {
        match message {
            Message::Record(path, facts) => {
                // The last record of a path wins.
                rows.retain(|(p, _)| *p != path);
                rows.push((path, facts));
            }
            Message::Flush(done) => flushed.push(done),
        }
    }
    if !rows.is_empty() {
        let refs: Vec<(&str, &LocalFacts)> = rows.iter().map(|(p, f)| (p.as_str(), f)).collect();
        match manifest.record_local(&refs, true).await {
            Ok(()) => {
                let paths: Vec<String> = rows.into_iter().map(|(p, _)| p).collect();
                ns.forget_entries(&paths);
                wake.notify_one();
            }
            Err(e) => {
                // The files are on disk; the next scan records them.
                tracing::error!(error = %e, files = rows.len(), "cannot record written files; the next scan will");
            }
        }
    }
    for done in flushed {
        let _ = done.send(());
    }
}
