//! Copies requested by replica mounts (issue 7.3): a node without the local tree asks, through
//! the manifest, a node that has it to copy a file next.
//!
//! A request is the row's `priority` set to `REQUESTED` (copy-on-read of a mount uses 1): every
//! sweeper claims prioritized rows before the rest, and a daemon started with `--no-sweep` claims
//! only these. On PostgreSQL the request also sends a notification that wakes idle nodes at once
//! (`LISTEN cutoverfs_requests`); on SQLite, and on PostgreSQL in case a notification is lost,
//! nodes poll for new requests.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::Notify;

use super::{json_list, now_ms, Engine, Manifest, ManifestUrl, Result};

/// The `priority` of a file a replica is waiting for.
pub const REQUESTED: i64 = 2;

/// The PostgreSQL notification channel of new requests.
const CHANNEL: &str = "cutoverfs_requests";

/// How often a node looks for new requests without a notification.
const POLL_SQLITE: Duration = Duration::from_millis(200);
const POLL_POSTGRES: Duration = Duration::from_secs(2);

/// What became of a request for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Flagged now: a node with the source copies it next.
    Requested,
    /// Already flagged, being copied, or changed meanwhile: wait and look again.
    Waiting,
    /// No node will copy it until an operator acts (why).
    Held(String),
}

impl Manifest {
    /// Asks nodes with the source to copy `path` next. A failed file waiting for its next retry
    /// is made due now: someone is waiting for it.
    pub async fn request_copy(&self, path: &str) -> Result<RequestOutcome> {
        let now = now_ms();
        let flagged = sqlx::query(&self.sql(
            "UPDATE entries SET priority = $1, queued_at = $2, \
             next_retry_at = CASE WHEN state = 'failed' THEN $2 ELSE next_retry_at END \
             WHERE path IN (SELECT value FROM JSON_TEXTS($3)) AND kind = 'file' AND priority < $1 \
             AND rolled_back_at IS NULL \
             AND (state = 'pending' OR (state = 'failed' AND next_retry_at IS NOT NULL))",
        ))
        .bind(REQUESTED)
        .bind(now)
        .bind(json_list(&[path.to_string()]))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if flagged > 0 {
            if self.engine == Engine::Postgres {
                sqlx::query("SELECT pg_notify($1, '')")
                    .bind(CHANNEL)
                    .execute(&self.pool)
                    .await?;
            }
            return Ok(RequestOutcome::Requested);
        }
        let row = sqlx::query(
            "SELECT state, CAST(CASE WHEN next_retry_at IS NULL THEN 1 ELSE 0 END AS BIGINT), \
             CAST(CASE WHEN rolled_back_at IS NULL THEN 0 ELSE 1 END AS BIGINT), last_error \
             FROM entries WHERE path = $1",
        )
        .bind(path)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(RequestOutcome::Waiting);
        };
        let state: String = row.get(0);
        let no_retry = row.get::<i64, _>(1) == 1;
        let rolled_back = row.get::<i64, _>(2) == 1;
        let error: Option<String> = row.get(3);
        Ok(if rolled_back {
            RequestOutcome::Held(
                "rolled back: held out of copies until the next `cutoverfs sweep`".into(),
            )
        } else if state == "failed" && no_retry {
            RequestOutcome::Held(format!(
                "failed for good ({}); `cutoverfs sweep` retries it",
                error.unwrap_or_default()
            ))
        } else {
            RequestOutcome::Waiting
        })
    }

    /// How many files are prioritized and the latest time one was: changes when a new request
    /// (or copy-on-read) comes in.
    async fn request_mark(&self) -> Result<(i64, Option<i64>)> {
        let row = sqlx::query("SELECT COUNT(*), MAX(queued_at) FROM entries WHERE priority > 0")
            .fetch_one(&self.pool)
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Wakes `wake` whenever a new copy is requested, until the task is aborted: at once on
    /// PostgreSQL (LISTEN), within `POLL_SQLITE` on SQLite.
    pub fn watch_requests(&self, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let manifest = self.clone();
        tokio::spawn(async move {
            let poll = match manifest.engine {
                Engine::Sqlite => POLL_SQLITE,
                Engine::Postgres => POLL_POSTGRES,
            };
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut listener = None;
            let mut seen = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if listener.is_none() {
                            listener = manifest.listen().await;
                        }
                        if manifest.reach.is_down() {
                            continue;
                        }
                        if let Ok(mark) = manifest.request_mark().await {
                            if seen.replace(mark) != Some(mark) && mark.0 > 0 {
                                wake.notify_one();
                            }
                        }
                    }
                    heard = notification(&mut listener) => match heard {
                        Ok(()) => wake.notify_one(),
                        Err(e) => {
                            // Connected again at the next tick.
                            tracing::debug!(error = %e, "lost the LISTEN connection to the manifest");
                            listener = None;
                        }
                    }
                }
            }
        })
    }

    /// A connection listening for requests (PostgreSQL only).
    async fn listen(&self) -> Option<sqlx::postgres::PgListener> {
        let ManifestUrl::Postgres(url) = &self.url else {
            return None;
        };
        let listening = async {
            let mut listener = sqlx::postgres::PgListener::connect(url).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listening.await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::debug!(error = %e, "cannot LISTEN for copy requests; polling");
                None
            }
        }
    }
}

/// The next notification; never ends without a listener.
async fn notification(
    listener: &mut Option<sqlx::postgres::PgListener>,
) -> std::result::Result<(), sqlx::Error> {
    match listener {
        Some(listener) => listener.recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}
