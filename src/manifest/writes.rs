//! What the mount's write path and `purge` record (DESIGN §6, §7): files changed or created
//! through the mount, holds on files open for writing, removals and renames with the dest
//! objects they leave to delete, and local copies removed by purge.
//!
//! Every change is recorded before it is acted on (§4.7): a removal marks the row `deleted`
//! and keeps the key of an object cutoverfs may have written there (a "leftover") until that
//! object is gone, so a crash between the steps is repaired on the next start.

use const_format::concatcp;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::state::{Kind, State};
use super::{now_ms, parse_kind, parse_state, Manifest, Result};

/// What the local tree holds at a path, as the write path records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFacts {
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A dest object a removal left to delete: at `dest_key`, cutoverfs's own if its content hash
/// is one of `owned_sha256` or it carries this manifest's mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: String,
    pub kind: Kind,
    pub dest_key: String,
    pub owned_sha256: Vec<String>,
    pub version: i64,
    /// The file was being copied when it was removed: that copy may still land at the key
    /// until this time (ms since the epoch), so "nothing there" does not settle it before.
    pub may_land_until: Option<i64>,
}

impl Leftover {
    /// Whether an object may still appear at the key (see `may_land_until`): finding nothing
    /// there now does not clear the leftover.
    pub fn may_still_land(&self) -> bool {
        self.may_land_until.is_some_and(|until| now_ms() < until)
    }
}

/// What `mark_deleted` changed: each row with its new version, and the leftovers.
#[derive(Debug, Clone, Default)]
pub struct Removed {
    pub rows: Vec<(String, i64)>,
    pub leftovers: Vec<Leftover>,
}

/// A row to write at a path as it is in the local tree now: files wait for a copy (queued first
/// when `priority`), directories are recorded as they are. What an earlier copy recorded about
/// the content is cleared; what is known about the object at the key (ours or not) is kept, so
/// the next copy may replace our own object there and nothing else.
const UPSERT_LOCAL_HEAD: &str = "INSERT INTO entries (path, kind, state, reason, size, mtime_ns, mode, uid, gid, \
     link_target, seen_scan, version, created_at, updated_at, queued_at, priority, ino) \
     SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, CAST(r.value ->> 4 AS BIGINT), \
     CAST(r.value ->> 5 AS BIGINT), CAST(r.value ->> 6 AS BIGINT), CAST(r.value ->> 7 AS BIGINT), \
     CAST(r.value ->> 8 AS BIGINT), r.value ->> 9, 0, 0, $2, $2, $2, CAST(r.value ->> 10 AS BIGINT), \
     CAST(r.value ->> 11 AS BIGINT) \
     FROM JSON_ROWS($1) AS r WHERE true \
     ON CONFLICT (path) DO UPDATE SET kind = excluded.kind, state = excluded.state, reason = excluded.reason, \
     size = excluded.size, mtime_ns = excluded.mtime_ns, mode = excluded.mode, uid = excluded.uid, \
     gid = excluded.gid, link_target = excluded.link_target, sha256 = NULL, mime = NULL, attempts = 0, \
     last_error = NULL, next_retry_at = NULL, lease_owner = NULL, lease_expires_at = NULL, \
     copy_started_at = NULL, copied_at = NULL, verified_at = NULL, batch_id = NULL, purged_at = NULL, \
     priority = excluded.priority, queued_at = excluded.queued_at, version = entries.version + 1, \
     updated_at = excluded.updated_at, ";

/// `UPSERT_LOCAL_HEAD` for a path changed in place: a row keeps its inode number (one marked
/// deleted has none and takes the new one). A record that says nothing new is dropped: the row
/// is already verified with exactly these facts (a scan and a copy got to the file first, and
/// maybe purge too; sending it back to `pending` would copy it again, or, with its local copy
/// purged meanwhile, lose it from the tree).
const UPSERT_LOCAL: &str = concatcp!(
    UPSERT_LOCAL_HEAD,
    "ino = COALESCE(entries.ino, excluded.ino) WHERE NOT (entries.state = 'verified' \
     AND entries.kind = excluded.kind AND entries.size = excluded.size \
     AND entries.mtime_ns = excluded.mtime_ns AND entries.mode = excluded.mode \
     AND entries.uid = excluded.uid AND entries.gid = excluded.gid)"
);

/// `UPSERT_LOCAL_HEAD` for the new paths of a rename: the numbers move with the files.
const UPSERT_MOVED: &str = concatcp!(UPSERT_LOCAL_HEAD, "ino = excluded.ino");

/// Rows of a path and everything below it ($1 the path, $2 path + '/', $3 path + '0').
const SUBTREE: &str = "(path = $1 OR (path >= $2 AND path < $3))";

const LEFTOVER_COLUMNS: &str =
    "SELECT path, kind, dest_key, dest_owned, dest_sha256, intent_sha256, version, leftover_until FROM entries";

/// How long after its lease ran out a copy in flight may still land at the dest: an S3 server
/// can finish a request whose sender died for as long as a request attempt may last (the
/// client's attempt timeout, 5 minutes; src/store/s3/settings.rs), and a little more.
const STRAY_COPY_MS: i64 = 6 * 60 * 1000;

/// The statement that marks the paths of `JSON_ROWS($1)` (`[path, dest_key]`) deleted at `$2`
/// (now), for removals and for the old names of a rename. A copy that may still land at the key
/// (the row is `copying`, or was taken from a copying worker less than its leftover deadline ago)
/// keeps the key as a leftover, owned, until `$3` after that copy's lease ends.
fn mark_deleted_sql(reason: &str, only_rows: &str) -> String {
    const MAY_LAND: &str = "(entries.state = 'copying' OR entries.leftover_until > $2)";
    format!(
        "WITH d AS MATERIALIZED (SELECT value ->> 0 AS path, value ->> 1 AS dest_key FROM JSON_ROWS($1)) \
         UPDATE entries SET \
         dest_owned = CASE WHEN {MAY_LAND} THEN 1 ELSE entries.dest_owned END, \
         dest_key = CASE WHEN {MAY_LAND} OR entries.intent_sha256 IS NOT NULL \
             THEN COALESCE(entries.dest_key, d.dest_key) ELSE entries.dest_key END, \
         leftover_until = CASE WHEN entries.state = 'copying' THEN COALESCE(entries.lease_expires_at, $2) + $3 \
             WHEN entries.leftover_until > $2 THEN entries.leftover_until ELSE NULL END, \
         state = 'deleted', reason = '{reason}', lease_owner = NULL, lease_expires_at = NULL, ino = NULL, \
         priority = 0, purged_at = NULL, version = entries.version + 1, updated_at = $2 \
         FROM d WHERE entries.path = d.path {only_rows} \
         RETURNING entries.path, entries.kind, entries.dest_key, entries.dest_owned, entries.dest_sha256, \
         entries.intent_sha256, entries.version, entries.leftover_until"
    )
}

impl Manifest {
    /// A file is being opened for writing: it waits for a copy again, and no worker may take it
    /// (nor purge remove it) while `holder` holds it, until `until` unless renewed. A worker
    /// copying it now loses its lease, so what it copied is never recorded as verified; that copy
    /// may still land at the dest (its worker may be a node that died with a request in flight),
    /// so the row keeps a leftover deadline, and a removal or rename before it passes deletes what
    /// lands (tests/daemon_kill_rounds.rs found this).
    pub async fn hold_for_write(&self, path: &str, holder: &str, until: i64) -> Result<()> {
        sqlx::query(
            "UPDATE entries SET state = 'pending', reason = NULL, sha256 = NULL, attempts = 0, last_error = NULL, \
             next_retry_at = NULL, lease_owner = $2, lease_expires_at = $3, priority = 0, purged_at = NULL, \
             leftover_until = CASE WHEN state = 'copying' THEN COALESCE(lease_expires_at, $4) + $5 \
                 ELSE leftover_until END, \
             version = version + 1, updated_at = $4 WHERE path = $1 AND kind = 'file'",
        )
        .bind(path)
        .bind(holder)
        .bind(until)
        .bind(now_ms())
        .bind(STRAY_COPY_MS)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Extends the holds of files still open for writing.
    pub async fn renew_holds(&self, holder: &str, until: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE entries SET lease_expires_at = $2 WHERE lease_owner = $1 AND state = 'pending'",
        )
        .bind(holder)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records paths as the local tree holds them now (created, written, truncated, chmod-ed
    /// through the mount). Files wait for a copy, first in line when `priority`; a hold on them
    /// ends.
    ///
    /// A row without an inode number takes the one given with its path (the number the mount
    /// already handed out for it), else a new one; a row keeps its own.
    pub async fn record_local(
        &self,
        rows: &[(&str, &LocalFacts, Option<i64>)],
        priority: bool,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut fresh = self
            .new_inos(
                rows.iter()
                    .filter(|(_, _, ino)| super::inodes::storable(*ino).is_none())
                    .count(),
            )
            .await?
            .into_iter();
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|(path, facts, ino)| {
                let ino = super::inodes::storable(*ino).or_else(|| fresh.next());
                local_row(path, facts, None, priority, ino)
            })
            .collect();
        sqlx::query(&self.sql(UPSERT_LOCAL))
            .bind(serde_json::Value::Array(json).to_string())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks paths removed through the mount, before they are removed. `keys` gives each path's
    /// dest key: where a worker may be publishing a copy right now, the key is kept as a
    /// leftover so that object is deleted too. Returns the rows marked and the leftovers.
    pub async fn mark_deleted(&self, paths: &[(String, Option<String>)]) -> Result<Removed> {
        if paths.is_empty() {
            return Ok(Removed::default());
        }
        let json: Vec<serde_json::Value> = paths
            .iter()
            .map(|(path, key)| serde_json::json!([path, key]))
            .collect();
        let rows = sqlx::query(&self.sql(&mark_deleted_sql(
            "removed through the mount",
            "AND entries.state <> 'deleted'",
        )))
        .bind(serde_json::Value::Array(json).to_string())
        .bind(now_ms())
        .bind(STRAY_COPY_MS)
        .fetch_all(&self.pool)
        .await?;
        Ok(Removed {
            rows: rows.iter().map(|r| (r.get(0), r.get(6))).collect(),
            leftovers: leftovers_from(&rows)?,
        })
    }

    /// Records a rename of `from` (and everything below it) to `to`, before the local rename:
    /// the rows at the new paths wait for a copy from the renamed local files, the old rows
    /// are deleted and their objects become leftovers. `keys` maps old paths to dest keys.
    ///
    /// With `hold` (holder, until), the files at their new paths are held: the rename is
    /// recorded before the local tree is renamed, and a sweeper claiming a new path in between
    /// would find no file there and call it missing. `release_renamed` ends the hold.
    pub async fn rename_rows(
        &self,
        from: &str,
        to: &str,
        keys: &dyn Fn(&str) -> Option<String>,
        hold: Option<(&str, i64)>,
    ) -> Result<Vec<Leftover>> {
        super::retry_conflicts(|| self.rename_rows_once(from, to, keys, hold)).await
    }

    /// Ends the holds `rename_rows` put on the files now at or below `to`, except on `kept`
    /// (files still open for writing: their writers' holds go on).
    pub async fn release_renamed(&self, to: &str, holder: &str, kept: &[String]) -> Result<()> {
        sqlx::query(&self.sql(&format!(
            "UPDATE entries SET lease_owner = NULL, lease_expires_at = NULL WHERE {SUBTREE} \
             AND kind = 'file' AND state = 'pending' AND lease_owner = $4 \
             AND path NOT IN (SELECT value FROM JSON_TEXTS($5))"
        )))
        .bind(to)
        .bind(format!("{to}/"))
        .bind(format!("{to}0"))
        .bind(holder)
        .bind(serde_json::json!(kept).to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn rename_rows_once(
        &self,
        from: &str,
        to: &str,
        keys: &dyn Fn(&str) -> Option<String>,
        hold: Option<(&str, i64)>,
    ) -> Result<Vec<Leftover>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Write first: a transaction that reads before it writes fails on SQLite when another
        // connection wrote in between (SQLITE_BUSY_SNAPSHOT) instead of waiting its turn.
        sqlx::query("UPDATE entries SET version = version WHERE path = $1")
            .bind(from)
            .execute(&mut *tx)
            .await?;
        let old = sqlx::query(&format!(
            "SELECT path, kind, state, reason, size, mtime_ns, mode, uid, gid, link_target, ino FROM entries \
             WHERE {SUBTREE} AND state NOT IN ('deleted', 'missing')"
        ))
        .bind(from)
        .bind(format!("{from}/"))
        .bind(format!("{from}0"))
        .fetch_all(&mut *tx)
        .await?;
        let mut fresh = Vec::with_capacity(old.len());
        let mut gone = Vec::with_capacity(old.len());
        for row in &old {
            let path: String = row.get(0);
            let new_path = format!("{to}{}", &path[from.len()..]);
            let facts = LocalFacts {
                kind: parse_kind(row.get(1))?,
                size: row.get::<i64, _>(4) as u64,
                mtime_ns: row.get(5),
                mode: row.get::<i64, _>(6) as u32,
                uid: row.get::<i64, _>(7) as u32,
                gid: row.get::<i64, _>(8) as u32,
            };
            // Links and special files are never copied: they keep what the scan said of them.
            let kept = (!matches!(facts.kind, Kind::File | Kind::Dir))
                .then(|| (parse_state(row.get(2)), row.get::<Option<String>, _>(3)));
            // The number moves with the file. (A row without one, written by an older
            // cutoverfs, stays without: the mount numbers such paths itself.)
            let ino: Option<i64> = row.get(10);
            let mut json = local_row(&new_path, &facts, row.get(9), true, ino);
            if let Some((Ok(state), reason)) = kept {
                json[2] = state.as_str().into();
                json[3] = reason.into();
            }
            fresh.push(json);
            gone.push(serde_json::json!([path, keys(&path)]));
        }
        let mut leftovers = Vec::new();
        if !gone.is_empty() {
            let rows = sqlx::query(&self.sql(&mark_deleted_sql("renamed through the mount", "")))
                .bind(serde_json::Value::Array(gone).to_string())
                .bind(now)
                .bind(STRAY_COPY_MS)
                .fetch_all(&mut *tx)
                .await?;
            leftovers = leftovers_from(&rows)?;
            sqlx::query(&self.sql(UPSERT_MOVED))
                .bind(serde_json::Value::Array(fresh).to_string())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            if let Some((holder, until)) = hold {
                sqlx::query(&format!(
                    "UPDATE entries SET lease_owner = $4, lease_expires_at = $5 WHERE {SUBTREE} \
                     AND kind = 'file' AND state = 'pending'"
                ))
                .bind(to)
                .bind(format!("{to}/"))
                .bind(format!("{to}0"))
                .bind(holder)
                .bind(until)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(leftovers)
    }

    /// Objects removals left to delete (after a crash, or while the dest was down).
    pub async fn leftovers(&self) -> Result<Vec<Leftover>> {
        let rows = sqlx::query(&format!(
            "{LEFTOVER_COLUMNS} WHERE state = 'deleted' AND dest_key IS NOT NULL \
             AND (dest_owned = 1 OR intent_sha256 IS NOT NULL) ORDER BY path"
        ))
        .fetch_all(&self.pool)
        .await?;
        leftovers_from(&rows)
    }

    /// The leftover's object is gone (or was never ours): the row forgets it.
    pub async fn leftover_cleared(&self, leftover: &Leftover) -> Result<()> {
        sqlx::query(
            "UPDATE entries SET dest_key = NULL, dest_etag = NULL, dest_owned = 0, dest_sha256 = NULL, \
             intent_sha256 = NULL WHERE path = $1 AND state = 'deleted' AND version = $2",
        )
        .bind(&leftover.path)
        .bind(leftover.version)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// After a removed file's object was deleted: if the file was created again meanwhile and
    /// counts as copied (or is being copied), it is copied again, since the object deleted may
    /// have been its new copy. Returns whether it was.
    pub async fn recopy_if_recreated(&self, path: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE entries SET state = 'pending', sha256 = NULL, lease_owner = NULL, lease_expires_at = NULL, \
             priority = 1, queued_at = $2, version = version + 1, updated_at = $2 \
             WHERE path = $1 AND kind = 'file' AND state IN ('verified', 'copied', 'copying')",
        )
        .bind(path)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A removal that never reached the local tree (the daemon died first): the row stands
    /// again, waiting for a copy, and still knows the object at its key is ours.
    pub async fn undelete(&self, path: &str, version: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE entries SET state = CASE WHEN kind = 'dir' THEN 'verified' WHEN kind = 'file' THEN 'pending' \
             ELSE 'unsupported' END, reason = NULL, sha256 = NULL, attempts = 0, last_error = NULL, \
             next_retry_at = NULL, priority = 0, version = version + 1, updated_at = $3 \
             WHERE path = $1 AND state = 'deleted' AND version = $2",
        )
        .bind(path)
        .bind(version)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
    /// Records that the local copy of a verified file is about to be set aside under `aside`
    /// (the text of `engine::purge::Aside`; None: it is gone already) and removed, if the row still says what purge checked. Returns
    /// the row's new version, None when it changed meanwhile.
    pub async fn mark_purged(
        &self,
        file: &super::AtDest,
        aside: Option<&str>,
    ) -> Result<Option<i64>> {
        let row = sqlx::query(
            "UPDATE entries SET purged_at = $4, purge_aside = $5, version = version + 1, updated_at = $4 \
             WHERE path = $1 AND kind = 'file' AND state = 'verified' AND size = $2 AND mtime_ns = $3 \
             AND purged_at IS NULL RETURNING version",
        )
        .bind(&file.path)
        .bind(file.size as i64)
        .bind(file.mtime_ns)
        .bind(now_ms())
        .bind(aside)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The local copy of a purged file is gone: nothing is set aside any more.
    pub async fn purge_done(&self, path: &str) -> Result<()> {
        sqlx::query("UPDATE entries SET purge_aside = NULL WHERE path = $1")
            .bind(path)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Purges that a crash interrupted between recording and finishing: (path, aside text).
    pub async fn interrupted_purges(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT path, purge_aside FROM entries WHERE purge_aside IS NOT NULL ORDER BY path",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Whether a purge marked at `version` still stands (nothing opened the file for writing,
    /// renamed or removed it since).
    pub async fn purge_stands(&self, path: &str, version: i64) -> Result<bool> {
        let row = sqlx::query(
            "SELECT 1 FROM entries WHERE path = $1 AND version = $2 AND state = 'verified' AND purged_at IS NOT NULL",
        )
        .bind(path)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// A purge that was given up: the local copy stays and is known again.
    pub async fn unpurge(&self, path: &str) -> Result<()> {
        sqlx::query("UPDATE entries SET purged_at = NULL, purge_aside = NULL WHERE path = $1")
            .bind(path)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Paths of every dest-only file at `dir` or below (they must come back to the local tree
    /// before the directory is renamed).
    pub async fn purged_below(&self, dir: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(&format!(
            "SELECT path FROM entries WHERE {SUBTREE} AND purged_at IS NOT NULL AND state = 'verified' ORDER BY path"
        ))
        .bind(dir)
        .bind(format!("{dir}/"))
        .bind(format!("{dir}0"))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

fn local_row(
    path: &str,
    facts: &LocalFacts,
    link_target: Option<String>,
    priority: bool,
    ino: Option<i64>,
) -> serde_json::Value {
    let ino = super::inodes::storable(ino);
    let state = match facts.kind {
        Kind::Dir => State::Verified,
        _ => State::Pending,
    };
    serde_json::json!([
        path,
        facts.kind.as_str(),
        state.as_str(),
        serde_json::Value::Null,
        facts.size,
        facts.mtime_ns,
        facts.mode,
        facts.uid,
        facts.gid,
        link_target,
        i64::from(priority && facts.kind == Kind::File),
        ino
    ])
}

fn leftovers_from(rows: &[AnyRow]) -> Result<Vec<Leftover>> {
    let mut found = Vec::new();
    for row in rows {
        let owned = row.get::<i64, _>(3) == 1;
        let confirmed: Option<String> = row.get(4);
        let intent: Option<String> = row.get(5);
        let Some(dest_key) = row.get::<Option<String>, _>(2) else {
            continue;
        };
        if !owned && intent.is_none() {
            continue;
        }
        found.push(Leftover {
            path: row.get(0),
            kind: parse_kind(row.get(1))?,
            dest_key,
            owned_sha256: confirmed
                .filter(|_| owned)
                .into_iter()
                .chain(intent)
                .collect(),
            version: row.get(6),
            may_land_until: row.get(7),
        });
    }
    Ok(found)
}
