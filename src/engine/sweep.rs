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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::control::LiveLimits;
use super::filter::PathFilter;
use super::progress::Progress;
use crate::manifest::{now_ms, BatchTally, Claimed, FileUpdate, Manifest, ManifestError};
use crate::source::SourceTree;
use crate::store::{
    Preflight, PublishGuard, PutOutcome, PutRequest, SourceRef, Store, StoreError, Stored,
};

#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Files in flight, throttles and scope: they may change while the sweep runs.
    pub limits: Arc<LiveLimits>,
    pub batch_size: usize,
    pub max_retries: u32,
    pub retry_delay: Duration,
    pub lease: Duration,
    pub node: String,
    pub command: String,
    /// How long the dest may stay unavailable before the sweep stops (it resumes when re-run).
    pub dest_timeout: Duration,
    /// Inside the daemon: keep waiting for work (woken by copy-on-read) instead of finishing.
    pub keep_running: Option<Arc<tokio::sync::Notify>>,
    /// Told which paths were just recorded verified (the mount drops what it cached of them).
    pub on_verified: Option<VerifiedHook>,
    /// Copy only the files replica mounts request (a daemon with `--no-sweep`), never sweep.
    pub requests_only: bool,
    /// After a stop, how long copies in flight may take to finish before they are abandoned
    /// (as a crash would leave them: redone by a later run). A dest that stalls cannot hold a
    /// stop up for longer.
    pub stop_grace: Duration,
}

/// Called with the paths whose verified state was just committed.
#[derive(Clone)]
pub struct VerifiedHook(pub Arc<VerifiedFn>);

pub type VerifiedFn = dyn Fn(&[String]) + Send + Sync;

impl std::fmt::Debug for VerifiedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerifiedHook")
    }
}

/// How long an idle daemon sweeper sleeps before looking for work from other nodes, retries
/// that came due and files the scan did not know.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// What this run did (the manifest holds the whole picture).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SweepReport {
    pub copied: u64,
    pub copied_bytes: u64,
    pub already_there: u64,
    pub missing: u64,
    pub conflicts: u64,
    pub failed_attempts: u64,
    pub batches: u64,
    pub interrupted: bool,
    /// Set when the sweep stopped because the dest stayed unavailable: why.
    pub dest_unavailable: Option<String>,
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
    /// The dest was unavailable; retried later without using up an attempt.
    Deferred,
    /// The lease was lost (another node took the file over) or the run was stopped first.
    Abandoned,
}

impl Outcome {
    /// How `--metrics` counts it; a lost lease is not counted (another node or run owns it).
    fn for_metrics(&self) -> Option<crate::metrics::CopyOutcome> {
        use crate::metrics::CopyOutcome as M;
        Some(match self {
            Outcome::Copied(_) => M::Migrated,
            Outcome::Already => M::AlreadyThere,
            Outcome::Missing => M::Failed("source_missing"),
            Outcome::Conflict => M::Failed("conflict"),
            Outcome::Unsupported => M::Failed("unsupported"),
            Outcome::Failed => M::Failed("copy_failed"),
            Outcome::Deferred => M::Failed("dest_unavailable"),
            Outcome::Abandoned => return None,
        })
    }
}

/// Batches being copied at once: the next batch is claimed while the last files of the
/// previous one finish, so workers never idle at a batch boundary.
const BATCHES_IN_FLIGHT: usize = 2;

/// What every copy task shares.
struct Shared {
    manifest: Manifest,
    source: Arc<SourceTree>,
    store: Arc<dyn Store>,
    recorder: Recorder,
    opts: SweepOptions,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
    health: DestHealth,
    busy: Busy,
}

/// Paths this run is copying now. A file changed through the mount while its copy is in flight
/// goes back to pending and could be claimed again by this same run; the first copy's outcome
/// would then pass the lease check of the second claim (same owner, state `copying`) and record
/// the old content as verified. So a run never claims a path it is still copying.
#[derive(Clone, Default)]
struct Busy(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl Busy {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn free(&self, paths: Vec<String>) -> Vec<String> {
        let busy = self.lock();
        paths.into_iter().filter(|p| !busy.contains(p)).collect()
    }

    fn take(&self, claimed: &[Claimed]) {
        self.lock().extend(claimed.iter().map(|c| c.path.clone()));
    }

    fn done(&self, paths: &[String]) {
        let mut busy = self.lock();
        for path in paths {
            busy.remove(path);
        }
    }
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
        manifest: manifest.clone(),
        source,
        store: store.clone(),
        recorder: Recorder::start(manifest.clone(), opts.on_verified.clone(), stop.clone()),
        opts: opts.clone(),
        progress,
        stop: stop.clone(),
        health: DestHealth::new(opts.dest_timeout),
        busy: Busy::default(),
    });
    let renewer = spawn_lease_renewer(
        manifest.clone(),
        opts.node.clone(),
        opts.lease,
        shared.busy.clone(),
    );
    let mut batches: JoinSet<Result<BatchTally, ManifestError>> = JoinSet::new();
    let mut report = SweepReport::default();
    let mut cursor = String::new();
    let mut copied_since_idle = false;
    let result = async {
        loop {
            if *stop.borrow() {
                report.interrupted = true;
                break;
            }
            if let Some(why) = shared.health.gave_up() {
                report.dest_unavailable = Some(why);
                break;
            }
            if let Some(pause) = shared.health.pause() {
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            let (batch_id, claimed) =
                claim_batch(manifest, opts, &mut cursor, &shared.busy, stop).await?;
            if claimed.is_empty() {
                if let Some(id) = batch_id {
                    let empty = BatchTally::default();
                    manifest
                        .patiently(stop, || manifest.close_batch(id, &empty, "completed"))
                        .await?;
                }
                // Files in flight may fail and come due for a retry: finish them first (a stop
                // goes on to `finish_batches`, which gives them a grace period).
                while let Some(Some(done)) = super::unless_stopped(stop, batches.join_next()).await
                {
                    report.add(&done.map_err(join_error)??);
                }
                if *stop.borrow() {
                    continue;
                }
                if shared.health.gave_up().is_some() {
                    continue;
                }
                if opts.requests_only || !wait_for_more_work(manifest, opts, stop).await? {
                    match &opts.keep_running {
                        Some(wake) => {
                            if std::mem::take(&mut copied_since_idle) {
                                let filter = opts.limits.get().filter.clone();
                                create_directories(manifest, &store, &filter).await;
                            }
                            wait_for_wake(wake, stop).await
                        }
                        None => break,
                    }
                }
                continue;
            }
            let batch_id = batch_id.unwrap_or_default();
            copied_since_idle = true;
            let files = dispatch_batch(claimed, &shared).await;
            let (manifest, batch_stop) = (manifest.clone(), stop.clone());
            batches.spawn(
                async move {
                    let stop = batch_stop;
                    let tally = Arc::new(TallyCounters::default());
                    let mut files = files;
                    while let Some(outcomes) = files.join_next().await {
                        for outcome in outcomes.unwrap_or_default() {
                            tally.add(outcome);
                        }
                    }
                    let tally = tally.snapshot();
                    let status = if *stop.borrow() {
                        "interrupted"
                    } else if tally.failed + tally.conflicts + tally.missing > 0 {
                        "partial"
                    } else {
                        "completed"
                    };
                    manifest
                        .patiently(&stop, || manifest.close_batch(batch_id, &tally, status))
                        .await?;
                    Ok(tally)
                }
                .instrument(tracing::info_span!("batch", id = batch_id)),
            );
            while batches.len() >= BATCHES_IN_FLIGHT {
                match super::unless_stopped(stop, batches.join_next()).await {
                    Some(Some(done)) => report.add(&done.map_err(join_error)??),
                    Some(None) | None => break,
                }
            }
        }
        finish_batches(&mut batches, &mut report, stop, opts.stop_grace).await?;
        Ok::<(), ManifestError>(())
    }
    .await;
    renewer.abort();
    let released = manifest
        .patiently(stop, || manifest.release_leases(&opts.node))
        .await?;
    if released > 0 {
        tracing::info!(files = released, "gave back leases of files not copied");
    }
    result?;
    // Batches of runs that died are closed once their files have been taken over.
    manifest
        .patiently(stop, || manifest.close_abandoned_batches(&opts.node))
        .await?;
    if !report.interrupted {
        let filter = opts.limits.get().filter.clone();
        create_directories(manifest, &store, &filter).await;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Whether a stop came (false: no stop can come any more). Resolves to a plain bool so that no
/// lock guard of the channel lives across an await of a spawned task.
async fn stopped(stop: &mut watch::Receiver<bool>) -> bool {
    stop.wait_for(|s| *s).await.is_ok()
}

/// Waits for the batches in flight; once a stop came, for `grace` at most, then abandons them
/// (their copies are cancelled where they stand, and their files are given back).
async fn finish_batches(
    batches: &mut JoinSet<Result<BatchTally, ManifestError>>,
    report: &mut SweepReport,
    stop: &watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), ManifestError> {
    let mut stop = stop.clone();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_none() && *stop.borrow() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        // Far enough never to come before the stop does (then it is set from the stop).
        let give_up_at = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 86_400));
        tokio::select! {
            done = batches.join_next() => match done {
                Some(done) => report.add(&done.map_err(join_error)??),
                None => return Ok(()),
            },
            _ = tokio::time::sleep_until(give_up_at), if deadline.is_some() => {
                tracing::warn!(batches = batches.len(), grace = ?grace, "copies in flight did not finish in time after the stop; abandoned (they are redone by a later run)");
                batches.abort_all();
                while batches.join_next().await.is_some() {}
                return Ok(());
            }
            true = stopped(&mut stop), if deadline.is_none() => {}
        }
    }
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

/// Files per group handed to the store at once, and bytes at most (a large file goes alone).
/// Groups are a slice of `--concurrency`, so several are in flight and the store's I/O threads,
/// syncs and manifest writes overlap.
const GROUP_FILES: usize = 64;
const GROUP_BYTES: u64 = 32 << 20;
const GROUPS_IN_FLIGHT: usize = 8;

/// Splits a batch into groups and starts a task per group once enough of the `--concurrency`
/// slots are free and the throttles allow it. Files not started because the run is stopping
/// stay leased and are released when the sweep ends; files a new scope (SIGHUP) leaves out are
/// given back at once.
async fn dispatch_batch(claimed: Vec<Claimed>, shared: &Arc<Shared>) -> JoinSet<Vec<Outcome>> {
    let mut groups = JoinSet::new();
    let mut group: Vec<Claimed> = Vec::new();
    let mut group_bytes = 0;
    let mut left_out = Vec::new();
    let mut claimed = claimed.into_iter().peekable();
    while let Some(file) = claimed.next() {
        let limits = &shared.opts.limits;
        if !limits.get().filter.matches(&file.path) {
            left_out.push(file.path);
            continue;
        }
        let (group_files, max_bytes) = limits.group_caps(
            (limits.get().concurrency / GROUPS_IN_FLIGHT).clamp(1, GROUP_FILES),
            GROUP_BYTES,
        );
        group_bytes += file.size;
        group.push(file);
        let full = group.len() >= group_files
            || group_bytes >= max_bytes
            || claimed
                .peek()
                .is_none_or(|next| group_bytes + next.size > max_bytes);
        if !full {
            continue;
        }
        let files = std::mem::take(&mut group);
        group_bytes = 0;
        let slots = limits.slots(files.len()).await;
        let pace_above = limits.paced_above();
        let bytes = files
            .iter()
            .map(|f| f.size)
            .filter(|size| pace_above.is_none_or(|above| *size <= above))
            .sum();
        let requests = files
            .iter()
            .map(|f| shared.store.put_requests(f.size).max(1))
            .sum();
        let paced = files
            .iter()
            .any(|f| pace_above.is_some_and(|above| f.size > above));
        let mut stop = shared.stop.clone();
        let turn = tokio::select! {
            turn = limits.start(bytes, requests, paced) => turn,
            _ = stop.wait_for(|s| *s) => None,
        };
        if *shared.stop.borrow() {
            break;
        }
        let shared = shared.clone();
        groups.spawn(
            async move {
                let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
                let outcomes = copy_group(files, pace_above, &shared).await;
                shared.busy.done(&paths);
                drop((slots, turn));
                outcomes
            }
            .instrument(tracing::info_span!("group")),
        );
    }
    if !left_out.is_empty() {
        give_back(shared, left_out).await;
    }
    groups
}

/// Leases of claimed files the scope no longer takes: pending again, for a later scope.
async fn give_back(shared: &Shared, paths: Vec<String>) {
    match shared.manifest.release(&paths, &shared.opts.node).await {
        Ok(n) => tracing::info!(files = n, "claimed files now out of scope given back"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot give back files now out of scope; their leases expire")
        }
    }
    shared.busy.done(&paths);
}

/// Claims up to one batch of in-scope files, opening a batch record for them.
async fn claim_batch(
    manifest: &Manifest,
    opts: &SweepOptions,
    cursor: &mut String,
    busy: &Busy,
    stop: &watch::Receiver<bool>,
) -> Result<(Option<i64>, Vec<Claimed>), ManifestError> {
    let mut claimed = Vec::new();
    let mut batch_id = None;
    let filter = opts.limits.get().filter.clone();
    // Files replicas wait for, then files the application opened before they were copied
    // (copy-on-read) go first.
    let min_priority = if opts.requests_only {
        crate::manifest::REQUESTED
    } else {
        1
    };
    let urgent: Vec<String> = busy.free(
        manifest
            .patiently(stop, || manifest.prioritized(opts.batch_size, min_priority))
            .await?
            .into_iter()
            .filter(|path| filter.matches(path))
            .collect(),
    );
    if !urgent.is_empty() {
        let id = *batch_id.insert(open_batch(manifest, opts, stop).await?);
        claimed.extend(
            manifest
                .patiently(stop, || manifest.claim(&urgent, &opts.node, opts.lease, id))
                .await?,
        );
        busy.take(&claimed);
        if !claimed.is_empty() {
            return Ok((batch_id, claimed));
        }
    }
    if opts.requests_only {
        return Ok((batch_id, claimed));
    }
    let mut wrapped = false;
    while claimed.len() < opts.batch_size {
        let after = cursor.clone();
        let page = manifest
            .patiently(stop, || manifest.candidates(&after, 1000))
            .await?;
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
        let wanted: Vec<String> = busy
            .free(page)
            .into_iter()
            .filter(|path| filter.matches(path))
            .take(opts.batch_size - claimed.len())
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let id = match batch_id {
            Some(id) => id,
            None => *batch_id.insert(open_batch(manifest, opts, stop).await?),
        };
        // A claim whose commit was cut off unanswered is simply made again: the rows it took
        // are ours (same owner) or expire.
        let more = manifest
            .patiently(stop, || manifest.claim(&wanted, &opts.node, opts.lease, id))
            .await?;
        busy.take(&more);
        claimed.extend(more);
    }
    Ok((batch_id, claimed))
}

/// A new batch record. Made again if the manifest went away before answering: at worst an
/// empty batch is left `running`, and closed as interrupted by a later run.
async fn open_batch(
    manifest: &Manifest,
    opts: &SweepOptions,
    stop: &watch::Receiver<bool>,
) -> Result<i64, ManifestError> {
    manifest
        .patiently(stop, || manifest.open_batch(&opts.node, &opts.command))
        .await
}

/// An idle daemon sweeper: sleeps until copy-on-read wakes it, a while has passed, or the
/// run stops.
async fn wait_for_wake(wake: &tokio::sync::Notify, stop: &watch::Receiver<bool>) {
    // Tests wait for this line to know every copy in scope has finished (tests/live_control.rs).
    tracing::debug!("nothing to copy now; the sweeper waits for work");
    let mut stop = stop.clone();
    tokio::select! {
        _ = wake.notified() => {}
        _ = tokio::time::sleep(IDLE_RECHECK) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Nothing claimable now: waits for retries coming due, leases of other nodes, or pending files
/// another node is claiming this instant (PostgreSQL skips rows locked by a claim in flight);
/// false when nothing in scope is left to wait for.
async fn wait_for_more_work(
    manifest: &Manifest,
    opts: &SweepOptions,
    stop: &watch::Receiver<bool>,
) -> Result<bool, ManifestError> {
    let waiting = manifest.patiently(stop, || manifest.waiting()).await?;
    let filter = opts.limits.get().filter.clone();
    let next = waiting
        .iter()
        .filter(|(path, _)| filter.matches(path))
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

/// Copies a group of files through the store and records every outcome in one go. Files larger
/// than `pace_above` have their reads paced by the store.
async fn copy_group(files: Vec<Claimed>, pace_above: Option<u64>, shared: &Shared) -> Vec<Outcome> {
    let owner = shared.opts.node.as_str();
    let mut results: Vec<Option<(FileUpdate, Outcome)>> = vec![None; files.len()];
    let mut requests = Vec::with_capacity(files.len());
    let mut requested = Vec::with_capacity(files.len());
    for (i, file) in files.iter().enumerate() {
        let key = match crate::manifest::refused_path(&file.path) {
            Some(why) => {
                tracing::error!(path = %file.path, "{why}");
                Err(why)
            }
            None => shared.store.key_for(&file.path),
        };
        match key {
            Ok(key) => {
                let paced = pace_above.is_some_and(|above| file.size > above);
                let source = SourceRef {
                    tree: shared.source.clone(),
                    rel: file.path.clone(),
                    pace: paced.then(|| shared.opts.limits.pacer(shared.stop.clone())),
                };
                requests.push(PutRequest {
                    key,
                    source,
                    owned_sha256: file.owned_sha256.clone(),
                });
                requested.push(i);
            }
            Err(reason) => {
                let update = FileUpdate::Unsupported {
                    path: file.path.clone(),
                    owner: owner.to_string(),
                    reason,
                };
                results[i] = Some((update, Outcome::Unsupported));
            }
        }
    }
    let keys: Vec<String> = requests.iter().map(|r| r.key.clone()).collect();
    let guard = GroupGuard {
        recorder: &shared.recorder,
        owner,
        paths: requested.iter().map(|i| files[*i].path.clone()).collect(),
    };
    let started = Instant::now();
    let stored = shared.store.put_many(requests, &guard).await;
    // Published at the dest, not yet recorded: a crash here must be resumed by the next run.
    crate::testhook::crash_point("sweep:copied");
    let dest_up = shared.health.judge(&*shared.store, started, &stored).await;
    for ((i, key), result) in requested.into_iter().zip(keys).zip(stored) {
        results[i] = Some(outcome_of(&files[i], key, result, dest_up, &shared.opts));
    }
    let (updates, outcomes): (Vec<FileUpdate>, Vec<Outcome>) =
        results.into_iter().flatten().unzip();
    let orphan_candidates: Vec<FileUpdate> = updates.clone();
    let applied = match shared.recorder.apply_many(updates).await {
        Ok(applied) => applied,
        Err(e) => {
            tracing::error!(error = %e, "cannot record copy outcomes; the leases will expire and the files be retried");
            vec![false; outcomes.len()]
        }
    };
    remember_orphans(shared, &orphan_candidates, &applied).await;
    crate::testhook::crash_point("sweep:recorded");
    files
        .iter()
        .zip(outcomes)
        .zip(applied)
        .map(|((file, outcome), applied)| {
            let outcome = if applied {
                outcome
            } else {
                tracing::info!(path = %file.path, "lease lost before the outcome was recorded (the file was changed, removed or taken by another node); not counted");
                Outcome::Abandoned
            };
            if let Some(counted) = outcome.for_metrics() {
                let bytes = if let Outcome::Copied(bytes) = outcome { bytes } else { file.size };
                shared.progress.copy_done(counted, bytes);
            }
            if !matches!(outcome, Outcome::Abandoned | Outcome::Deferred) {
                shared.progress.file_done(if let Outcome::Copied(bytes) = outcome { bytes } else { file.size });
            }
            outcome
        })
        .collect()
}

/// Objects this worker published whose outcome could not be recorded (the lease was taken back
/// by a removal, rename or writer): the manifest learns they are ours, so a removed file's
/// object is deleted and a changed file's object may be replaced.
async fn remember_orphans(shared: &Shared, updates: &[FileUpdate], applied: &[bool]) {
    let orphans: Vec<FileUpdate> = updates
        .iter()
        .zip(applied)
        .filter_map(|(update, ok)| match update {
            FileUpdate::Verified {
                path,
                sha256,
                dest_key,
                written_by_us: true,
                ..
            } if !ok => Some(FileUpdate::Orphaned {
                path: path.clone(),
                dest_key: dest_key.clone(),
                sha256: sha256.clone(),
            }),
            _ => None,
        })
        .collect();
    if orphans.is_empty() {
        return;
    }
    if let Err(e) = shared.recorder.apply_many(orphans).await {
        tracing::error!(error = %e, "cannot record objects published after their lease was lost");
        return;
    }
    // Those of removed files go at once (the daemon's periodic check is the backstop).
    if let Err(e) =
        super::repair::clean_leftovers_live(&shared.manifest, &shared.source, &shared.store).await
    {
        tracing::warn!(error = %e, "cannot delete dest objects of removed files now; retried later");
    }
}

/// The manifest update and tally outcome for one file's put.
fn outcome_of(
    file: &Claimed,
    key: String,
    result: Result<Stored, StoreError>,
    dest_up: bool,
    opts: &SweepOptions,
) -> (FileUpdate, Outcome) {
    let (path, owner) = (file.path.clone(), opts.node.clone());
    let _span = tracing::info_span!("copy", path = %file.path, attempt = file.attempts).entered();
    let stored = match result {
        Ok(stored) => stored,
        Err(StoreError::SourceMissing) => {
            return (FileUpdate::Missing { path, owner }, Outcome::Missing)
        }
        Err(error) if error.is_unreachable() || (error.is_transient() && !dest_up) => {
            tracing::debug!(error = %error, "dest unavailable; will retry");
            return (
                FileUpdate::Failed {
                    path,
                    owner,
                    error: error.to_string(),
                    retry_at: Some(now_ms() + opts.retry_delay.as_millis() as i64),
                    counts: false,
                },
                Outcome::Deferred,
            );
        }
        Err(error) => {
            let retry_at = (file.attempts <= opts.max_retries).then(|| {
                let backoff = opts
                    .retry_delay
                    .saturating_mul(1 << file.attempts.saturating_sub(1).min(16));
                now_ms() + backoff.as_millis() as i64
            });
            match retry_at {
                Some(_) => tracing::warn!(error = %error, "copy failed; will retry"),
                None => tracing::error!(error = %error, "copy failed; no retries left"),
            }
            return (
                FileUpdate::Failed {
                    path,
                    owner,
                    error: error.to_string(),
                    retry_at,
                    counts: true,
                },
                Outcome::Failed,
            );
        }
    };
    let seen = stored.source;
    let verified =
        |sha256: String, written_by_us: bool, etag: Option<String>| FileUpdate::Verified {
            path: path.clone(),
            owner: owner.clone(),
            sha256,
            size: seen.size,
            mtime_ns: seen.mtime_ns,
            mime: mime_guess::from_path(&file.path)
                .first_raw()
                .map(str::to_string),
            dest_key: key.clone(),
            dest_etag: etag,
            written_by_us,
        };
    match stored.outcome {
        PutOutcome::Written { sha256, size, etag } => {
            tracing::debug!(bytes = size, "copied and verified");
            (verified(sha256, true, etag), Outcome::Copied(size))
        }
        PutOutcome::AlreadyThere {
            sha256, ours, etag, ..
        } => {
            tracing::debug!(ours, "dest already holds identical content");
            (verified(sha256, ours, etag), Outcome::Already)
        }
        PutOutcome::Conflict { reason } => {
            tracing::warn!(reason = %reason, "conflict: dest holds another object; left untouched");
            (
                FileUpdate::Conflict {
                    path,
                    owner,
                    reason,
                },
                Outcome::Conflict,
            )
        }
    }
}

/// Ownership answers for one group: our manifest's id, and intents recorded through the
/// recorder against each file's lease.
struct GroupGuard<'a> {
    recorder: &'a Recorder,
    owner: &'a str,
    paths: Vec<String>,
}

#[async_trait]
impl PublishGuard for GroupGuard<'_> {
    fn writer_id(&self) -> String {
        self.recorder.manifest_id.clone()
    }

    async fn before_publish(&self, intents: &[(usize, String)]) -> Result<Vec<bool>, StoreError> {
        let updates = intents
            .iter()
            .map(|(i, sha256)| FileUpdate::Intent {
                path: self.paths[*i].clone(),
                owner: self.owner.to_string(),
                sha256: sha256.clone(),
            })
            .collect();
        self.recorder
            .apply_many(updates)
            .await
            .map_err(|e| StoreError::Guard(format!("cannot record intent in the manifest: {e}")))
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
            Outcome::Unsupported | Outcome::Abandoned | Outcome::Deferred => return,
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
    tx: mpsc::Sender<RecorderJob>,
    manifest_id: String,
}

type RecorderJob = (Vec<FileUpdate>, oneshot::Sender<Result<Vec<bool>, String>>);

/// Jobs merged into one transaction at most.
const RECORDER_GROUP: usize = 64;

impl Recorder {
    /// While the manifest is unreachable, outcomes wait to be recorded (the copies behind them
    /// hold their leases until then); once the run stops, they are given up and their files
    /// copied again after their leases expire.
    pub fn start(
        manifest: Manifest,
        on_verified: Option<VerifiedHook>,
        stop: watch::Receiver<bool>,
    ) -> Recorder {
        let manifest_id = manifest.id().to_string();
        let (tx, mut rx) = mpsc::channel::<RecorderJob>(RECORDER_GROUP * 2);
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(RECORDER_GROUP);
            while rx.recv_many(&mut jobs, RECORDER_GROUP).await > 0 {
                let sizes: Vec<usize> = jobs.iter().map(|(updates, _)| updates.len()).collect();
                let (updates, replies): (Vec<Vec<FileUpdate>>, Vec<_>) = jobs.drain(..).unzip();
                let updates: Vec<FileUpdate> = updates.into_iter().flatten().collect();
                match manifest.patiently(&stop, || manifest.apply(&updates)).await {
                    Ok(applied) => {
                        if let Some(hook) = &on_verified {
                            let verified: Vec<String> = updates
                                .iter()
                                .zip(&applied)
                                .filter_map(|(update, ok)| match update {
                                    FileUpdate::Verified { path, .. } if *ok => Some(path.clone()),
                                    _ => None,
                                })
                                .collect();
                            if !verified.is_empty() {
                                tracing::debug!(?verified, "recorded verified");
                                (hook.0)(&verified);
                            }
                        }
                        let mut applied = applied.into_iter();
                        for (reply, size) in replies.into_iter().zip(sizes) {
                            let _ = reply.send(Ok(applied.by_ref().take(size).collect()));
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

    /// Records the updates; answers per update whether its lease still held.
    pub async fn apply_many(&self, updates: Vec<FileUpdate>) -> Result<Vec<bool>, String> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((updates, reply))
            .await
            .map_err(|_| "manifest recorder stopped".to_string())?;
        answer
            .await
            .map_err(|_| "manifest recorder stopped".to_string())?
    }
}

/// Renews the leases of the files in `busy` (claimed by this run and not finished) every third
/// of the lease.
fn spawn_lease_renewer(
    manifest: Manifest,
    node: String,
    lease: Duration,
    busy: Busy,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            // While the manifest is away its probe watches it; the leases run on meanwhile.
            if manifest.reachability().is_down() {
                continue;
            }
            let held: Vec<String> = busy.lock().iter().cloned().collect();
            match manifest.note(manifest.renew_leases(&node, lease, &held).await) {
                Err(e) if !e.is_unreachable() => tracing::warn!(error = %e, "cannot renew leases"),
                _ => {}
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

/// Whether the dest answers. While it does not, copies fail fast and are retried without using
/// up their attempts, new work waits with a growing pause, and after `timeout` the sweep stops
/// (a re-run resumes). One line is logged when the dest goes away and one when it is back.
struct DestHealth {
    state: std::sync::Mutex<HealthState>,
    timeout: Duration,
}

#[derive(Default)]
struct HealthState {
    last_success: Option<Instant>,
    down_since: Option<Instant>,
    last_error: String,
    pause: Duration,
}

const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

impl DestHealth {
    fn new(timeout: Duration) -> DestHealth {
        DestHealth {
            state: Default::default(),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the dest works, judged from a group's results: a transient failure (5xx,
    /// throttling, timeout) is the dest's fault, not the file's, only when nothing else
    /// succeeded since the group started and a cheap read-only check of the dest fails too.
    /// (A refused connection is always the dest's: see `outcome_of`.)
    async fn judge(
        &self,
        store: &dyn Store,
        group_started: Instant,
        results: &[Result<Stored, StoreError>],
    ) -> bool {
        let failure = results
            .iter()
            .find_map(|r| r.as_ref().err().filter(|e| e.is_transient()));
        let answered = |r: &Result<Stored, StoreError>| match r {
            Ok(_) => true,
            Err(e @ StoreError::Remote { .. }) => !e.is_transient(),
            Err(_) => false,
        };
        if results.iter().any(answered) {
            self.mark_up();
        }
        let Some(failure) = failure else {
            return true;
        };
        if self
            .lock()
            .last_success
            .is_some_and(|at| at >= group_started)
        {
            return true;
        }
        match store.preflight(Preflight::ReadOnly).await {
            Ok(()) => {
                self.mark_up();
                true
            }
            Err(check) => {
                self.mark_down(&format!("{failure} (check: {check})"));
                false
            }
        }
    }

    fn mark_up(&self) {
        let mut state = self.lock();
        state.last_success = Some(Instant::now());
        if let Some(since) = state.down_since.take() {
            tracing::info!(after = %crate::util::human_duration(since.elapsed()), "dest is back; copies resume");
        }
    }

    fn mark_down(&self, error: &str) {
        let mut state = self.lock();
        if state.down_since.is_none() {
            tracing::warn!(
                error,
                "dest unavailable; copies pause and are retried until it is back"
            );
            state.down_since = Some(Instant::now());
            state.pause = FIRST_PAUSE;
        }
        state.last_error = error.to_string();
    }

    /// While the dest is down: how long to wait before trying it again (growing each time).
    fn pause(&self) -> Option<Duration> {
        let mut state = self.lock();
        state.down_since?;
        let pause = state.pause;
        state.pause = (pause * 2).min(LONGEST_PAUSE);
        Some(pause)
    }

    fn gave_up(&self) -> Option<String> {
        let state = self.lock();
        let since = state.down_since?;
        (since.elapsed() >= self.timeout).then(|| {
            format!(
                "the dest has been unavailable for {} (last error: {})",
                crate::util::human_duration(since.elapsed()),
                state.last_error
            )
        })
    }
}
