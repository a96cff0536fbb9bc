//! What `rollback` reads and records (DESIGN §1.8, §7): the files a selector picks, the
//! rollback recorded before the dest object goes, its end once the object is gone, and the
//! release of rolled-back files by the next `cutoverfs sweep`.
//!
//! A rolled-back file is `pending` with `rolled_back_at` set: the mount serves its local copy,
//! and no sweep takes it (see `CLAIMABLE`) until an operator sweeps again. While its row still
//! knows of an object of ours at its key (`dest_owned` or `intent_sha256`), the rollback is
//! unfinished: every run of `rollback` finishes those first (DESIGN §4.7).

use sqlx::Row;

use super::state::State;
use super::{json_list, now_ms, parse_state, Manifest, Result};

/// Which files a rollback takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackSelector {
    /// The files whose last copy attempt was in this sweep batch.
    Batch(i64),
    /// Files in `failed` or `conflict`.
    FailedOnly,
    /// Every file (a path filter narrows it down in the engine).
    All,
}

/// One file a rollback looks at.
#[derive(Debug, Clone)]
pub struct RollbackRow {
    pub path: String,
    pub state: State,
    pub size: u64,
    pub mtime_ns: i64,
    /// SHA-256 of the local content that was copied, when known.
    pub sha256: Option<String>,
    pub dest_key: Option<String>,
    /// Hashes of objects cutoverfs wrote (or was about to write) at the key; empty when the
    /// object there is not ours or there is none.
    pub owned_sha256: Vec<String>,
    pub purged: bool,
    pub version: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub rolled_back: bool,
}

impl RollbackRow {
    /// The row may know of an object cutoverfs wrote at the key.
    pub fn has_owned_object(&self) -> bool {
        !self.owned_sha256.is_empty()
    }

    /// Rolled back, but the object of ours is not known to be gone yet.
    pub fn unfinished(&self) -> bool {
        self.rolled_back && self.has_owned_object()
    }
}

const COLUMNS: &str =
    "SELECT path, state, size, mtime_ns, sha256, dest_key, dest_owned, dest_sha256, \
     intent_sha256, purged_at, version, lease_owner, lease_expires_at, rolled_back_at FROM entries";

impl Manifest {
    /// Files `selector` picks, plus every unfinished rollback, in path order after `after`.
    pub async fn rollback_candidates(
        &self,
        selector: &RollbackSelector,
        after: &str,
        limit: usize,
    ) -> Result<Vec<RollbackRow>> {
        let (which, batch) = match selector {
            RollbackSelector::Batch(id) => ("batch", *id),
            RollbackSelector::FailedOnly => ("failed", 0),
            RollbackSelector::All => ("all", 0),
        };
        let rows = sqlx::query(&format!(
            "{COLUMNS} WHERE kind = 'file' AND path > $1 AND ($2 = 'all' \
             OR ($2 = 'batch' AND batch_id = $3) \
             OR ($2 = 'failed' AND state IN ('failed', 'conflict')) \
             OR (rolled_back_at IS NOT NULL AND state = 'pending' \
                 AND (dest_owned = 1 OR intent_sha256 IS NOT NULL))) \
             ORDER BY path LIMIT $4"
        ))
        .bind(after)
        .bind(which)
        .bind(batch)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let owned = r.get::<i64, _>(6) == 1;
                let confirmed: Option<String> = r.get(7);
                let intent: Option<String> = r.get(8);
                Ok(RollbackRow {
                    path: r.get(0),
                    state: parse_state(r.get(1))?,
                    size: r.get::<i64, _>(2) as u64,
                    mtime_ns: r.get(3),
                    sha256: r.get(4),
                    dest_key: r.get(5),
                    owned_sha256: confirmed
                        .filter(|_| owned)
                        .into_iter()
                        .chain(intent)
                        .collect(),
                    purged: r.get::<Option<i64>, _>(9).is_some(),
                    version: r.get(10),
                    lease_owner: r.get(11),
                    lease_expires_at: r.get(12),
                    rolled_back: r.get::<Option<i64>, _>(13).is_some(),
                })
            })
            .collect()
    }

    /// Records the rollback of a file before its dest object is touched, if the row is still
    /// the one that was checked: it waits locally (`pending`, held back from sweeps) and keeps
    /// knowing the object at `dest_key` is ours until `finish_rollback`. `reason` goes to the
    /// audit trail. Returns whether the row was changed.
    pub async fn mark_rolled_back(
        &self,
        row: &RollbackRow,
        dest_key: Option<&str>,
        reason: &str,
    ) -> Result<bool> {
        let now = now_ms();
        // A writer's hold on a pending file (lease on a pending row) stays; a dead copy's
        // expired lease goes.
        let done = sqlx::query(
            "UPDATE entries SET state = 'pending', reason = $3, rolled_back_at = $4, attempts = 0, \
             last_error = NULL, next_retry_at = NULL, copied_at = NULL, verified_at = NULL, priority = 0, \
             lease_owner = CASE WHEN state = 'copying' THEN NULL ELSE lease_owner END, \
             lease_expires_at = CASE WHEN state = 'copying' THEN NULL ELSE lease_expires_at END, \
             dest_key = COALESCE(dest_key, $5), version = version + 1, updated_at = $4 \
             WHERE path = $1 AND version = $2 AND purged_at IS NULL \
             AND (state <> 'copying' OR lease_expires_at < $4)",
        )
        .bind(&row.path)
        .bind(row.version)
        .bind(reason)
        .bind(now)
        .bind(dest_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The object a rollback deleted is gone (or was found not to be ours): the row forgets it,
    /// and the rollback is finished.
    pub async fn finish_rollback(&self, path: &str, reason: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE entries SET dest_key = NULL, dest_etag = NULL, dest_owned = 0, dest_sha256 = NULL, \
             intent_sha256 = NULL, reason = $2, updated_at = $3 \
             WHERE path = $1 AND state = 'pending' AND rolled_back_at IS NOT NULL",
        )
        .bind(path)
        .bind(reason)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Rolled-back files whose rollback is finished, for a new sweep to release.
    pub async fn rolled_back_paths(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT path FROM entries WHERE rolled_back_at IS NOT NULL \
             AND dest_owned = 0 AND intent_sha256 IS NULL ORDER BY path",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// A new sweep takes these rolled-back files into the migration again. An unfinished
    /// rollback stays held: its object is about to be deleted.
    pub async fn release_rollbacks(&self, paths: &[String]) -> Result<u64> {
        let mut released = 0;
        for chunk in paths.chunks(500) {
            let done = sqlx::query(&self.sql(
                "UPDATE entries SET rolled_back_at = NULL, \
                 reason = CASE WHEN state = 'pending' THEN NULL ELSE reason END, version = version + 1, updated_at = $1 \
                 WHERE path IN (SELECT value FROM JSON_TEXTS($2)) AND rolled_back_at IS NOT NULL \
                 AND dest_owned = 0 AND intent_sha256 IS NULL",
            ))
            .bind(now_ms())
            .bind(json_list(chunk))
            .execute(&self.pool)
            .await?;
            released += done.rows_affected();
        }
        Ok(released)
    }

    /// How many files are rolled back and held from sweeps.
    pub async fn count_rolled_back(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM entries WHERE rolled_back_at IS NOT NULL")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        Ok(n as u64)
    }
}
