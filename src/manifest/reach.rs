//! Whether the manifest answers (issue 7.5): PostgreSQL may go away for a while (restart,
//! failover, network). Work that needs it pauses and resumes; reads that can do without it go on.
//!
//! Owns: the one "down" flag per manifest (shared by every clone of a `Manifest`), the one log
//! line when it goes away and the one when it is back, and the probe that notices it is back.
//! While it is down, only the probe queries it: callers wait for it (`patiently`) or do without
//! (`is_down`), so no request thread stalls on connection timeouts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::{Manifest, ManifestError, Result};

/// The probe's first pause and its longest (each failed probe doubles it).
const FIRST_PROBE: Duration = Duration::from_millis(250);
const LONGEST_PROBE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Reachability {
    /// Where the manifest is, for messages: HOST:PORT of PostgreSQL or the SQLite path.
    host: String,
    down_since: Mutex<Option<Instant>>,
    probing: AtomicBool,
    back: Notify,
}

impl Reachability {
    pub(super) fn new(host: String) -> Arc<Reachability> {
        Arc::new(Reachability {
            host,
            down_since: Mutex::new(None),
            probing: AtomicBool::new(false),
            back: Notify::new(),
        })
    }

    fn since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.down_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_down(&self) -> bool {
        self.since().is_some()
    }

    /// Records that the manifest did not answer; the first time, says so once.
    fn mark_down(&self, error: &ManifestError) {
        let mut since = self.since();
        if since.is_none() {
            tracing::error!(
                manifest = %self.host,
                "manifest unreachable at {}: {error}; copies paused, retrying",
                self.host
            );
            *since = Some(Instant::now());
        }
    }

    fn mark_up(&self) {
        if let Some(since) = self.since().take() {
            tracing::info!(
                manifest = %self.host,
                after = %crate::util::human_duration(since.elapsed()),
                "manifest reachable again at {}; copies resume",
                self.host
            );
        }
        self.back.notify_waiters();
    }
}

impl ManifestError {
    /// The manifest could not be reached (refused or cut connection, PostgreSQL shutting down
    /// or starting, pool timeout): says nothing about the statement, which may simply be run
    /// again once it is back.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ManifestError::Connect { source, .. } | ManifestError::Sql(source) => {
                sql_unreachable(source)
            }
            _ => false,
        }
    }
}

fn sql_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exceptions; 57P01-57P03: admin or crash shutdown, cannot connect
            // now (starting up or recovering).
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

impl Manifest {
    pub fn reachability(&self) -> &Arc<Reachability> {
        &self.reach
    }

    /// Notes how a query ended: an unreachable manifest is marked down (and probed until it is
    /// back), a success marks it up. Returns the result unchanged.
    pub fn note<T>(&self, result: Result<T>) -> Result<T> {
        match &result {
            Err(e) if e.is_unreachable() => {
                self.reach.mark_down(e);
                self.probe_until_back();
            }
            Ok(_) => {
                if self.reach.is_down() {
                    self.reach.mark_up();
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Starts the task that queries the manifest, with growing pauses, until it answers (one at
    /// a time).
    fn probe_until_back(&self) {
        if self.reach.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let manifest = self.clone();
        tokio::spawn(async move {
            let mut pause = FIRST_PROBE;
            loop {
                tokio::time::sleep(pause).await;
                if sqlx::query("SELECT 1")
                    .execute(&manifest.pool)
                    .await
                    .is_ok()
                {
                    break;
                }
                pause = (pause * 2).min(LONGEST_PROBE);
            }
            manifest.reach.probing.store(false, Ordering::SeqCst);
            manifest.reach.mark_up();
        });
    }

    /// Waits until the manifest is back (or `stop`); true when it is.
    pub async fn wait_until_reachable(&self, stop: &watch::Receiver<bool>) -> bool {
        let mut stop = stop.clone();
        loop {
            let back = self.reach.back.notified();
            if !self.reach.is_down() {
                return true;
            }
            if *stop.borrow() {
                return false;
            }
            tokio::select! {
                _ = back => {}
                _ = stop.wait_for(|s| *s) => return false,
                // A missed wake-up costs a second at most.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Runs `op` until it ends otherwise than with an unreachable manifest: meanwhile the work
    /// pauses until the probe sees the manifest back. Gives the error up once `stop` is set.
    /// `op` must be safe to run again after a failure (a transaction that did not commit, or a
    /// statement whose effect is the same twice).
    pub async fn patiently<T, F, Fut>(&self, stop: &watch::Receiver<bool>, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        loop {
            if self.reach.is_down() && !self.wait_until_reachable(stop).await {
                return op().await;
            }
            match self.note(op().await) {
                Err(e) if e.is_unreachable() && !*stop.borrow() => {
                    tracing::debug!(error = %e, "manifest unreachable; the query waits for it");
                }
                other => return other,
            }
        }
    }
}
