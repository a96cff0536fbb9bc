//! What `verify` reads and records (DESIGN §7): the files the manifest says are at the dest,
//! and the findings that take a file out of `verified`.

use sqlx::Row;

use super::{now_ms, Manifest, Result};

/// Text every data-at-risk finding starts with, so `status` and scripts can find them.
pub const DATA_AT_RISK: &str = "DATA AT RISK";

/// A file recorded at the dest (verified, purged or not), as `verify` checks it.
#[derive(Debug, Clone)]
pub struct AtDest {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256: Option<String>,
    pub dest_key: String,
    /// The dest object's ETag or file stamp when it was verified (`store::RecordedCopy`).
    pub dest_etag: Option<String>,
    /// The local copy was removed by purge: the dest object is the only copy.
    pub purged: bool,
    pub version: i64,
    /// Hashes of objects cutoverfs wrote at `dest_key` (what `Store::delete_owned` needs).
    pub owned_sha256: Vec<String>,
}

impl AtDest {
    /// What was recorded of its dest copy, to compare with what is there now.
    pub fn recorded_copy(&self) -> crate::store::RecordedCopy<'_> {
        crate::store::RecordedCopy {
            key: &self.dest_key,
            size: self.size,
            sha256: self.sha256.as_deref(),
            etag: self.dest_etag.as_deref(),
        }
    }
}

const AT_DEST_COLUMNS: &str = "SELECT path, size, mtime_ns, sha256, dest_key, purged_at, version, \
     dest_owned, dest_sha256, dest_etag FROM entries \
     WHERE state = 'verified' AND kind = 'file' AND dest_key IS NOT NULL AND path > $1";

impl Manifest {
    /// Verified files with a dest key, in path order after `after`.
    pub async fn at_dest(&self, after: &str, limit: usize) -> Result<Vec<AtDest>> {
        self.verified_at_dest(after, limit, "").await
    }

    /// Verified files with a dest key and their local copy (not purged), in path order after
    /// `after`: what purge may remove.
    pub async fn purge_candidates(&self, after: &str, limit: usize) -> Result<Vec<AtDest>> {
        self.verified_at_dest(after, limit, " AND purged_at IS NULL")
            .await
    }

    async fn verified_at_dest(&self, after: &str, limit: usize, and: &str) -> Result<Vec<AtDest>> {
        let rows = sqlx::query(&format!("{AT_DEST_COLUMNS}{and} ORDER BY path LIMIT $2"))
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| AtDest {
                path: r.get(0),
                size: r.get::<i64, _>(1) as u64,
                mtime_ns: r.get(2),
                sha256: r.get(3),
                dest_key: r.get(4),
                dest_etag: r.get(9),
                purged: r.get::<Option<i64>, _>(5).is_some(),
                version: r.get(6),
                owned_sha256: r
                    .get::<Option<String>, _>(8)
                    .filter(|_| r.get::<i64, _>(7) == 1)
                    .into_iter()
                    .collect(),
            })
            .collect())
    }

    /// Records what verify found wrong with a verified file, if the row is still the one that
    /// was checked. A file with a local copy goes back to `pending` so the next sweep copies it
    /// again (over our own object: what is known about ownership stays). A purged file has no
    /// other copy: it becomes `missing` with a reason starting with `DATA AT RISK`, stays
    /// marked purged, and no sweep takes it. Returns whether the row was changed.
    pub async fn record_verify_finding(
        &self,
        file: &AtDest,
        finding: &str,
        local_changed: bool,
    ) -> Result<bool> {
        let finding = if file.purged {
            finding.to_string()
        } else {
            format!("verify: {finding}")
        };
        self.take_out_of_verified(
            &file.path,
            file.version,
            file.purged,
            &finding,
            local_changed,
        )
        .await
    }

    async fn take_out_of_verified(
        &self,
        path: &str,
        version: i64,
        purged: bool,
        finding: &str,
        local_changed: bool,
    ) -> Result<bool> {
        let now = now_ms();
        let done = if purged {
            sqlx::query(
                "UPDATE entries SET state = 'missing', reason = $3, last_error = $3, \
                 version = version + 1, updated_at = $4 \
                 WHERE path = $1 AND version = $2 AND state = 'verified'",
            )
            .bind(path)
            .bind(version)
            .bind(format!(
                "{DATA_AT_RISK}: the local copy was purged and {finding}"
            ))
            .bind(now)
            .execute(&self.pool)
            .await?
        } else {
            // A changed local copy is a new version of the file: what was copied says nothing
            // about it any more.
            sqlx::query(
                "UPDATE entries SET state = 'pending', reason = NULL, last_error = $3, attempts = 0, \
                 next_retry_at = NULL, verified_at = NULL, queued_at = $4, \
                 sha256 = CASE WHEN $5 = 1 THEN NULL ELSE sha256 END, \
                 version = version + 1, updated_at = $4 \
                 WHERE path = $1 AND version = $2 AND state = 'verified'",
            )
            .bind(path)
            .bind(version)
            .bind(finding)
            .bind(now)
            .bind(i64::from(local_changed))
            .execute(&self.pool)
            .await?
        };
        Ok(done.rows_affected() == 1)
    }

    /// The mount found the dest copy of a file with a local copy changed since it was verified:
    /// the file goes back to `pending` (if its row is still at `version`) and the local copy is
    /// served until it is copied again.
    pub async fn dest_copy_changed(&self, path: &str, version: i64, finding: &str) -> Result<bool> {
        self.take_out_of_verified(path, version, false, finding, false)
            .await
    }

    /// Records the new ETag or stamp of a dest copy found intact when read back, if the row is
    /// still the one that was checked.
    pub async fn restamp(&self, file: &AtDest, etag: Option<&str>) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE entries SET dest_etag = $3, updated_at = $4 \
             WHERE path = $1 AND version = $2 AND state = 'verified'",
        )
        .bind(&file.path)
        .bind(file.version)
        .bind(etag)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
