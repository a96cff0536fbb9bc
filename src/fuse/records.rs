//! The manifest records of the mount that need not hold up the application: files written and
//! closed, directories made, and the numbers handed to the kernel for paths whose row held none
//! (`pin`: a row inserted, or the number given to a row without one). They are applied in
//! order, many per transaction, by one task; an operation that must see them first (unlink,
//! rename, a hold) calls `flush`.
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
    /// The number `.1` was handed out for a path: see `Pinned`.
    Pin(Pinned, u64),
    Flush(oneshot::Sender<()>),
}

/// A path the mount numbered, and how its row comes to hold the number.
pub enum Pinned {
    /// No row stood for it (its local copy, as seen): insert its row as a scan would, or give
    /// the row that appeared meanwhile this number.
    New(Scanned),
    /// Its row holds no number (a file with no local copy left): give the row this one.
    Row(String),
}

impl Pinned {
    fn path(&self) -> &str {
        match self {
            Pinned::New(seen) => &seen.path,
            Pinned::Row(path) => path,
        }
    }
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

    /// Queues the record of the number `ino` handed out for a path.
    pub fn pin(&self, pinned: Pinned, ino: u64) {
        let _ = self.tx.send(Message::Pin(pinned, ino));
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
    let mut pins: Vec<(Pinned, u64)> = Vec::new();
    let mut flushed = Vec::new();
    for message in messages {
        match message {
            Message::Record(path, facts) => {
                // The last record of a path wins.
                records.retain(|(p, _)| *p != path);
                records.push((path, facts));
            }
            Message::Pin(pinned, ino) => pins.push((pinned, ino)),
            Message::Flush(done) => flushed.push(done),
        }
    }
    // Numbers first: a record of the same path must find its row holding the kernel's number.
    if !pins.is_empty() {
        record_numbers(manifest, rows, inodes, &pins).await;
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

/// Records the numbers handed out for `pins`; each path's number is then the manifest's, or,
/// where its row got a number of its own first (a scan), stays this mount's while the kernel
/// holds it.
async fn record_numbers(manifest: &Manifest, rows: &Rows, inodes: &Inodes, pins: &[(Pinned, u64)]) {
    let mut new = Vec::new();
    let mut numberless = Vec::new();
    for (pinned, ino) in pins {
        match pinned {
            Pinned::New(seen) => new.push((seen, *ino as i64)),
            Pinned::Row(path) => numberless.push((path.as_str(), *ino as i64)),
        }
    }
    let taken = async {
        let mut taken = manifest.pin_inos(&new).await?;
        taken.extend(manifest.pin_row_inos(&numberless).await?);
        Ok::<_, crate::manifest::ManifestError>(taken)
    }
    .await;
    let paths: Vec<String> = pins.iter().map(|(p, _)| p.path().to_string()).collect();
    rows.forget(&paths);
    let taken: std::collections::HashSet<&str> = match &taken {
        Ok(taken) => taken.iter().map(String::as_str).collect(),
        Err(e) => {
            tracing::warn!(error = %e, paths = pins.len(), "cannot record inode numbers; they stay this mount's while the kernel holds them");
            Default::default()
        }
    };
    for (pinned, ino) in pins {
        if taken.contains(pinned.path()) {
            inodes.persisted(std::path::Path::new(pinned.path()), *ino);
        } else {
            inodes.not_persisted(*ino);
        }
    }
}
