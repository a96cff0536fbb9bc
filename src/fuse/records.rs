//! The manifest records of the mount that need not hold up the application: files written and
//! closed, directories made, and the numbers handed to the kernel for paths no row held yet
//! (`pin`). They are applied in order, many per transaction, by one task; an operation that must
//! see them first (unlink, rename, a hold) calls `flush`.
//!
//! The same task renews the holds on files open for writing, so no worker takes them meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::inode::Inodes;
use super::rows::Rows;
use crate::manifest::{now_ms, LocalFacts, Manifest, Scanned};

enum Message {
    Record(String, LocalFacts),
    /// The number `.1` was handed out for the path `.0.path`: insert its row as a scan would, or
    /// give the row that appeared meanwhile this number.
    Pin(Scanned, u64),
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
        rows: Arc<Rows>,
        inodes: Arc<Inodes>,
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
                    n = rx.recv_many(&mut messages, BATCH) => {
                        if n == 0 {
                            break;
                        }
                        linger(&mut rx, &mut messages).await;
                        let batch = std::mem::take(&mut messages);
                        apply(&manifest, &rows, &inodes, &wake, batch).await;
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

    /// Queues the row that records the number `ino` handed out for `seen.path`.
    pub fn pin(&self, seen: Scanned, ino: u64) {
        let _ = self.tx.send(Message::Pin(seen, ino));
    }

    /// Waits until everything queued so far is in the manifest.
    pub fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = self.rt.block_on(wait);
        }
    }
}

/// Records per transaction, at most.
const BATCH: usize = 512;
/// How long a record waits for others to share its transaction. The application's closes come
/// one at a time: one transaction each cost more than the closes themselves.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Gathers more messages for the same transaction, for at most `LINGER`, unless someone waits
/// for them already (a flush).
async fn linger(rx: &mut mpsc::UnboundedReceiver<Message>, messages: &mut Vec<Message>) {
    let waited_for = |m: &[Message]| m.iter().any(|m| matches!(m, Message::Flush(_)));
    let until = tokio::time::Instant::now() + LINGER;
    while messages.len() < BATCH && !waited_for(messages) {
        let room = BATCH - messages.len();
        let more = tokio::time::timeout_at(until, rx.recv_many(messages, room));
        match more.await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

async fn apply(
    manifest: &Manifest,
    rows: &Rows,
    inodes: &Inodes,
    wake: &Notify,
    messages: Vec<Message>,
) {
    let mut records: Vec<(String, LocalFacts)> = Vec::new();
    let mut pins: Vec<(Scanned, u64)> = Vec::new();
    let mut flushed = Vec::new();
    for message in messages {
        match message {
            Message::Record(path, facts) => {
                // The last record of a path wins.
                records.retain(|(p, _)| *p != path);
                records.push((path, facts));
            }
            Message::Pin(seen, ino) => pins.push((seen, ino)),
            Message::Flush(done) => flushed.push(done),
        }
    }
    // Numbers first: a record of the same path must find its row holding the kernel's number.
    if !pins.is_empty() {
        let refs: Vec<(&Scanned, i64)> = pins.iter().map(|(s, ino)| (s, *ino as i64)).collect();
        let pinned = manifest.pin_inos(&refs).await;
        let paths: Vec<String> = pins.iter().map(|(s, _)| s.path.clone()).collect();
        rows.forget(&paths);
        let taken: std::collections::HashSet<&str> = match &pinned {
            Ok(taken) => taken.iter().map(String::as_str).collect(),
            Err(e) => {
                tracing::warn!(error = %e, paths = pins.len(), "cannot record inode numbers; they stay this mount's while the kernel holds them");
                Default::default()
            }
        };
        for (seen, ino) in &pins {
            if taken.contains(seen.path.as_str()) {
                inodes.persisted(std::path::Path::new(&seen.path), *ino);
            } else {
                // The row got a number of its own first (a scan): this mount keeps answering
                // with the one the kernel holds until the kernel forgets it.
                inodes.not_persisted(*ino);
            }
        }
    }
    if !records.is_empty() {
        // A path this mount numbered before any row held it gets that number (a memory-only
        // one excepted: the manifest gives such a row one from its counter instead).
        let refs: Vec<(&str, &LocalFacts, Option<i64>)> = records
            .iter()
            .map(|(p, f)| {
                let pinned = inodes.pinned(std::path::Path::new(p)).map(|ino| ino as i64);
                (p.as_str(), f, pinned)
            })
            .collect();
        match manifest.record_local(&refs, true).await {
            Ok(()) => {
                let paths: Vec<String> = records.into_iter().map(|(p, _)| p).collect();
                rows.forget(&paths);
                wake.notify_one();
            }
            Err(e) => {
                // The files are on disk; the next scan records them.
                tracing::error!(error = %e, files = records.len(), "cannot record written files; the next scan will");
            }
        }
    }
    for done in flushed {
        let _ = done.send(());
    }
}
