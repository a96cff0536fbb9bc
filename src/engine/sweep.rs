//! The sweeper: claims files in recorded batches and copies them with a pool of workers.
//!
//! Each file: lease in the manifest → open the source → `Store::put` (hash in the same pass,
//! intent recorded before anything is visible) → outcome recorded against the lease. Outcomes
//! are committed by one recorder task in groups, so a thousand small files cost a handful of
//! transactions, not thousands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::filter::PathFilter;
use super::progress::Progress;
use crate::manifest::{now_ms, BatchTally, Claimed, FileUpdate, Manifest, ManifestError};
use crate::source::SourceTree;
use crate::store::{PublishGuard, PutOutcome, SourceRef, Store, StoreError};

#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub concurrency: usize,
    pub batch_size: usize,
    pub max_retries: u32,
    pub retry_delay: Duration,
    pub lease: Duration,
    pub filter: PathFilter,
    pub node: String,
    pub command: String,
}

/// What this run did (the manifest holds the whole picture).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SweepReport {
    pub copied: u64,
    pub copied_bytes: u64,
    pub already_there: u64,
    pub missing: u64,
    pub conflicts: u64,
    pub unsupported: u64,
    pub failed_attempts: u64,
    pub batches: u64,
    pub interrupted: bool,
    #[serde(skip)]
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Copied(u64),
    Already,
    Missing,
    Conflict,
    Unsupported,
    Failed,
    /// The lease was lost (another node took the file over) or the run was stopped first.
    Abandoned,
}

/// Batches being copied at once: the next batch is claimed while the last files of the
/// previous one finish, so workers never idle at a batch boundary.
const BATCHES_IN_FLIGHT: usize = 2;

/// What every copy task shares.
struct Shared {
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    recorder: Recorder,
    opts: SweepOptions,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
}

pub async fn run_sweep(
    manifest: &Manifest,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    opts: &SweepOptions,
    progress: Arc<Progress>,
    stop: &watch::Receiver<bool>,
) -> Result<SweepReport, ManifestError> {
    let started = Instant::now();
    let shared = Arc::new(Shared {
        source,
        store: store.clone(),
        recorder: Recorder::start(manifest.clone()),
        opts: opts.clone(),
        progress,
        stop: stop.clone(),
    });
    let renewer = spawn_lease_renewer(manifest.clone(), opts.node.clone(), opts.lease);
    let in_flight = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut batches: JoinSet<Result<BatchTally, ManifestError>> = JoinSet::new();
    let mut report = SweepReport::default();
    let mut cursor = String::new();
    let result = async {
        loop {
            if *stop.borrow() {
                report.interrupted = true;
                break;
            }
            let (batch_id, claimed) = claim_batch(manifest, opts, &mut cursor).await?;
            if claimed.is_empty() {
                if let Some(id) = batch_id {
                    manifest
                        .close_batch(id, &BatchTally::default(), "completed")
                        .await?;
                }
                // Files in flight may fail and come due for a retry: finish them first.
                while let Some(done) = batches.join_next().await {
                    report.add(&done.map_err(join_error)??);
                }
                if !wait_for_more_work(manifest, opts, stop).await? {
                    break;
                }
                continue;
            }
            let batch_id = batch_id.unwrap_or_default();
            let files = dispatch_batch(claimed, &shared, &in_flight).await;
            let manifest = manifest.clone();
            let stop = stop.clone();
            batches.spawn(
                async move {
                    let tally = Arc::new(TallyCounters::default());
                    let mut files = files;
                    while let Some(outcome) = files.join_next().await {
                        tally.add(outcome.unwrap_or(Outcome::Abandoned));
                    }
                    let tally = tally.snapshot();
                    let status = if *stop.borrow() {
                        "interrupted"
                    } else if tally.failed + tally.conflicts + tally.missing > 0 {
                        "partial"
                    } else {
                        "completed"
                    };
                    manifest.close_batch(batch_id, &tally, status).await?;
                    Ok(tally)
                }
                .instrument(tracing::info_span!("batch", id = batch_id)),
            );
            while batches.len() >= BATCHES_IN_FLIGHT {
                if let Some(done) = batches.join_next().await {
                    report.add(&done.map_err(join_error)??);
                }
            }
        }
        while let Some(done) = batches.join_next().await {
            report.add(&done.map_err(join_error)??);
        }
        Ok::<(), ManifestError>(())
    }
    .await;
    renewer.abort();
    let released = manifest.release_leases(&opts.node).await?;
    if released > 0 {
        tracing::info!(files = released, "gave back leases of files not copied");
    }
    result?;
    // Batches of runs that died are closed once their files have been taken over.
    manifest.close_abandoned_batches(&opts.node).await?;
    if !report.interrupted {
        create_directories(manifest, &store, &opts.filter).await;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn join_error(e: tokio::task::JoinError) -> ManifestError {
    ManifestError::Corrupt(format!("a batch task failed: {e}"))
}

impl SweepReport {
    fn add(&mut self, tally: &BatchTally) {
        self.batches += 1;
        self.copied += tally.copied;
        self.copied_bytes += tally.bytes;
        self.already_there += tally.already;
        self.missing += tally.missing;
        self.conflicts += tally.conflicts;
        self.failed_attempts += tally.failed;
    }
}

/// Starts a task per file, each once a slot among `--concurrency` is free. Files not started
/// because the run is stopping stay leased and are released when the sweep ends.
async fn dispatch_batch(
    claimed: Vec<Claimed>,
    shared: &Arc<Shared>,
    in_flight: &Arc<Semaphore>,
) -> JoinSet<Outcome> {
    let mut files = JoinSet::new();
    for file in claimed {
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            break;
        };
        if *shared.stop.borrow() {
            break;
        }
        let shared = shared.clone();
        let span = tracing::info_span!("copy", path = %file.path, attempt = file.attempts);
        files.spawn(
            async move {
                let size = file.size;
                let outcome = copy_one(file, &shared).await;
                drop(slot);
                if outcome != Outcome::Abandoned {
                    shared
                        .progress
                        .file_done(if let Outcome::Copied(bytes) = outcome {
                            bytes
                        } else {
                            size
                        });
                }
                outcome
            }
            .instrument(span),
        );
    }
    files
}

/// Claims up to one batch of in-scope files, opening a batch record for them.
async fn claim_batch(
    manifest: &Manifest,
    opts: &SweepOptions,
    cursor: &mut String,
) -> Result<(Option<i64>, Vec<Claimed>), ManifestError> {
    let mut claimed = Vec::new();
    let mut batch_id = None;
    let mut wrapped = false;
    while claimed.len() < opts.batch_size {
        let page = manifest.candidates(cursor, 1000).await?;
        let Some(last) = page.last() else {
            if cursor.is_empty() || wrapped {
                break;
            }
            // End of the pass: start over from the first path once (retries come due there).
            cursor.clear();
            wrapped = true;
            continue;
        };
        *cursor = last.clone();
        let wanted: Vec<String> = page
            .into_iter()
            .filter(|path| opts.filter.matches(path))
            .take(opts.batch_size - claimed.len())
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let id = match batch_id {
            Some(id) => id,
            None => *batch_id.insert(manifest.open_batch(&opts.node, &opts.command).await?),
        };
        claimed.extend(manifest.claim(&wanted, &opts.node, opts.lease, id).await?);
    }
    Ok((batch_id, claimed))
}

/// Nothing claimable now: waits for retries coming due or leases of other nodes; false when
/// nothing in scope is left to wait for.
async fn wait_for_more_work(
    manifest: &Manifest,
    opts: &SweepOptions,
    stop: &watch::Receiver<bool>,
) -> Result<bool, ManifestError> {
    let waiting = manifest.waiting(&opts.node).await?;
    let next = waiting
        .iter()
        .filter(|(path, _)| opts.filter.matches(path))
        .map(|(_, at)| *at)
        .min();
    let Some(next) = next else { return Ok(false) };
    let pause = Duration::from_millis((next - now_ms()).clamp(20, 1000) as u64);
    tracing::debug!(
        files = waiting.len(),
        pause_ms = pause.as_millis() as u64,
        "waiting for retries or leases of other nodes"
    );
    let mut stop = stop.clone();
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
    Ok(true)
}

async fn copy_one(file: Claimed, shared: &Shared) -> Outcome {
    let (recorder, opts) = (&shared.recorder, &shared.opts);
    let path = file.path.clone();
    let owner = opts.node.clone();
    let (update, outcome) =
        match attempt_copy(&file, &shared.source, &shared.store, recorder, &owner).await {
            Ok(done) => done,
            Err(error) => {
                let retry_at = (file.attempts <= opts.max_retries).then(|| {
                    let backoff = opts
                        .retry_delay
                        .saturating_mul(1 << (file.attempts.saturating_sub(1)).min(16));
                    now_ms() + backoff.as_millis() as i64
                });
                match retry_at {
                    Some(_) => tracing::warn!(error = %error, "copy failed; will retry"),
                    None => tracing::error!(error = %error, "copy failed; no retries left"),
                }
                (
                    FileUpdate::Failed {
                        path,
                        owner,
                        error: error.to_string(),
                        retry_at,
                    },
                    Outcome::Failed,
                )
            }
        };
    match recorder.apply(update).await {
        Ok(true) => outcome,
        Ok(false) => {
            tracing::warn!(
                "lease lost before the outcome was recorded; another node owns this file now"
            );
            Outcome::Abandoned
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record copy outcome; the lease will expire and the file be retried");
            Outcome::Abandoned
        }
    }
}

/// One copy attempt; Err is a failure worth retrying.
async fn attempt_copy(
    file: &Claimed,
    source: &Arc<SourceTree>,
    store: &Arc<dyn Store>,
    recorder: &Recorder,
    owner: &str,
) -> Result<(FileUpdate, Outcome), StoreError> {
    let (path, owner_s) = (file.path.clone(), owner.to_string());
    let key = match store.key_for(&file.path) {
        Ok(key) => key,
        Err(reason) => {
            return Ok((
                FileUpdate::Unsupported {
                    path,
                    owner: owner_s,
                    reason,
                },
                Outcome::Unsupported,
            ))
        }
    };
    let guard = Guard {
        recorder,
        path: &file.path,
        owner,
        owned: &file.owned_sha256,
    };
    let source_ref = SourceRef {
        tree: source.clone(),
        rel: file.path.clone(),
    };
    let stored = match store.put(&key, source_ref, &guard).await {
        Ok(stored) => stored,
        Err(StoreError::SourceMissing) => {
            return Ok((
                FileUpdate::Missing {
                    path,
                    owner: owner_s,
                },
                Outcome::Missing,
            ))
        }
        Err(e) => return Err(e),
    };
    let seen = stored.source;
    let mime = mime_guess::from_path(&file.path)
        .first_raw()
        .map(str::to_string);
    let verified =
        |sha256: String, written_by_us: bool, etag: Option<String>| FileUpdate::Verified {
            path: path.clone(),
            owner: owner_s.clone(),
            sha256,
            size: seen.size,
            mtime_ns: seen.mtime_ns,
            mime: mime.clone(),
            dest_key: key.clone(),
            dest_etag: etag,
            written_by_us,
        };
    Ok(match stored.outcome {
        PutOutcome::Written { sha256, size, etag } => {
            tracing::debug!(bytes = size, "copied and verified");
            (verified(sha256, true, etag), Outcome::Copied(size))
        }
        PutOutcome::AlreadyThere { sha256, ours, .. } => {
            tracing::debug!(ours, "dest already holds identical content");
            (verified(sha256, ours, None), Outcome::Already)
        }
        PutOutcome::Conflict { reason } => {
            tracing::warn!(reason = %reason, "conflict: dest holds another object; left untouched");
            (
                FileUpdate::Conflict {
                    path: path.clone(),
                    owner: owner_s.clone(),
                    reason,
                },
                Outcome::Conflict,
            )
        }
    })
}

struct Guard<'a> {
    recorder: &'a Recorder,
    path: &'a str,
    owner: &'a str,
    owned: &'a [String],
}

#[async_trait]
impl PublishGuard for Guard<'_> {
    fn writer_id(&self) -> String {
        self.recorder.manifest_id.clone()
    }

    async fn before_publish(&self, sha256: &str) -> Result<(), StoreError> {
        let intent = FileUpdate::Intent {
            path: self.path.to_string(),
            owner: self.owner.to_string(),
            sha256: sha256.to_string(),
        };
        match self.recorder.apply(intent).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::Guard(
                "lease lost before publishing; not published".into(),
            )),
            Err(e) => Err(StoreError::Guard(format!(
                "cannot record intent in the manifest: {e}"
            ))),
        }
    }

    fn owned_sha256(&self) -> Vec<String> {
        self.owned.to_vec()
    }
}

#[derive(Default)]
struct TallyCounters {
    files: AtomicU64,
    copied: AtomicU64,
    already: AtomicU64,
    missing: AtomicU64,
    conflicts: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

impl TallyCounters {
    fn add(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Copied(bytes) => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
                &self.copied
            }
            Outcome::Already => &self.already,
            Outcome::Missing => &self.missing,
            Outcome::Conflict => &self.conflicts,
            Outcome::Failed => &self.failed,
            Outcome::Unsupported | Outcome::Abandoned => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.files.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> BatchTally {
        let n = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BatchTally {
            files: n(&self.files),
            copied: n(&self.copied),
            already: n(&self.already),
            missing: n(&self.missing),
            conflicts: n(&self.conflicts),
            failed: n(&self.failed),
            bytes: n(&self.bytes),
        }
    }
}

/// Commits copy outcomes in groups: whatever has queued up while the previous group committed.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<(FileUpdate, oneshot::Sender<Result<bool, String>>)>,
    manifest_id: String,
}

const RECORDER_GROUP: usize = 512;

impl Recorder {
    pub fn start(manifest: Manifest) -> Recorder {
        let manifest_id = manifest.id().to_string();
        let (tx, mut rx) = mpsc::channel::<(FileUpdate, oneshot::Sender<Result<bool, String>>)>(
            RECORDER_GROUP * 2,
        );
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(RECORDER_GROUP);
            while rx.recv_many(&mut group, RECORDER_GROUP).await > 0 {
                let (updates, replies): (Vec<_>, Vec<_>) = group.drain(..).unzip();
                match manifest.apply(&updates).await {
                    Ok(applied) => {
                        for (reply, ok) in replies.into_iter().zip(applied) {
                            let _ = reply.send(Ok(ok));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        });
        Recorder { tx, manifest_id }
    }

    pub async fn apply(&self, update: FileUpdate) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((update, reply))
            .await
            .map_err(|_| "manifest recorder stopped".to_string())?;
        answer
            .await
            .map_err(|_| "manifest recorder stopped".to_string())?
    }
}

fn spawn_lease_renewer(
    manifest: Manifest,
    node: String,
    lease: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            if let Err(e) = manifest.renew_leases(&node, lease).await {
                tracing::warn!(error = %e, "cannot renew leases");
            }
        }
    })
}

/// Gives every recorded directory in scope its place at the dest (a no-op where the dest has
/// no directories), so empty directories survive the cutover too.
async fn create_directories(manifest: &Manifest, store: &Arc<dyn Store>, filter: &PathFilter) {
    let dirs = match manifest.directories().await {
        Ok(dirs) => dirs,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list directories");
            return;
        }
    };
    for (path, mode) in dirs
        .into_iter()
        .filter(|(path, _)| filter.is_everything() || filter.matches(path))
    {
        if let Err(e) = store.ensure_dir(&path, mode).await {
            tracing::warn!(dir = %path, error = %e, "cannot create directory at dest");
        }
    }
}
