//! Inode numbers (issue 15): every row that stands for something in the tree carries the number
//! the mount gives that path (`entries.ino`, migration 0008), so `st_ino` survives the kernel
//! forgetting the inode, unmounts and restarts, and the daemon can answer for a number with one
//! indexed query instead of keeping a table of every path it ever handed out.
//!
//! Numbers come from the counter `next_ino` in `meta`, taken a block at a time by each process
//! (one short statement per block, never inside another transaction), so writers of new rows
//! never wait on each other for a number. Numbers of a block a process did not use are simply
//! never used. 1 is the root's and never stored.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use sqlx::Row;

use super::state::Scanned;
use super::{now_ms, Manifest, Result};

/// How many numbers a process takes from the counter at a time.
const BLOCK: i64 = 4096;

/// Numbers from here up belong to one mount's memory (names that are not UTF-8, paths numbered
/// while a PostgreSQL manifest is down): each process hands them out from this base, so two
/// processes give the same number to different paths. The counter never reaches them and no
/// row may hold one (`storable`): a row holding one would share its number with whatever path
/// the next process numbers first, and the kernel would open the wrong file under it
/// (tests/daemon_kill_rounds.rs found that).
pub const FIRST_MEMORY_ONLY_INO: u64 = 1 << 62;

/// The number a row may hold: one from the counter, never a mount's memory-only one.
pub fn storable(ino: Option<i64>) -> Option<i64> {
    ino.filter(|n| *n > 1 && (*n as u64) < FIRST_MEMORY_ONLY_INO)
}

/// The numbers this process may hand out, from its current block.
#[derive(Debug, Default)]
pub(super) struct InoBlock {
    free: Mutex<Range<i64>>,
}

impl InoBlock {
    pub(super) fn new() -> Arc<InoBlock> {
        Arc::new(InoBlock::default())
    }
}

/// The new rows the mount records for paths it numbered before any row stood for them (files
/// the scan has not reached yet, or made through the mount): inserted as a scan would record
/// them, or, where a row without a number appeared meanwhile (one marked deleted), given that
/// number. A row that got a number of its own meanwhile (a scan recorded the path first) keeps
/// it: RETURNING names the paths that took the mount's.
const PIN_INOS: &str = "INSERT INTO entries (path, kind, state, reason, size, mtime_ns, mode, uid, gid, \
     link_target, seen_scan, version, created_at, updated_at, queued_at, ino) \
     SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, CAST(r.value ->> 4 AS BIGINT), \
     CAST(r.value ->> 5 AS BIGINT), CAST(r.value ->> 6 AS BIGINT), CAST(r.value ->> 7 AS BIGINT), \
     CAST(r.value ->> 8 AS BIGINT), r.value ->> 9, 0, 0, $2, $2, $2, CAST(r.value ->> 10 AS BIGINT) \
     FROM JSON_ROWS($1) AS r WHERE true \
     ON CONFLICT (path) DO UPDATE SET ino = excluded.ino WHERE entries.ino IS NULL \
     RETURNING path";

/// Numbers the mount handed out for rows that hold none (rows of files with no local copy left,
/// whose number an upgrade or an earlier mount did not record): given to those rows unless one
/// got a number meanwhile. RETURNING names the rows that took the mount's.
const PIN_ROW_INOS: &str = "UPDATE entries SET ino = CAST(r.value ->> 1 AS BIGINT) \
     FROM JSON_ROWS($1) AS r \
     WHERE entries.path = r.value ->> 0 AND entries.ino IS NULL AND entries.state <> 'deleted' \
     RETURNING entries.path";

impl Manifest {
    /// `n` inode numbers nobody else will get (not necessarily consecutive across blocks).
    pub async fn new_inos(&self, n: usize) -> Result<Vec<i64>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let taken: Vec<i64> = {
                let mut free = self.inos.free.lock().unwrap_or_else(|e| e.into_inner());
                let want = (n - out.len()) as i64;
                let end = (free.start + want).min(free.end);
                let taken = (free.start..end).collect();
                free.start = end;
                taken
            };
            out.extend(taken);
            if out.len() < n {
                let want = (n - out.len()) as i64;
                let block = self.take_block(want.max(BLOCK)).await?;
                *self.inos.free.lock().unwrap_or_else(|e| e.into_inner()) = block;
            }
        }
        Ok(out)
    }

    /// One inode number nobody else will get.
    pub async fn new_ino(&self) -> Result<i64> {
        Ok(self.new_inos(1).await?[0])
    }

    async fn take_block(&self, size: i64) -> Result<Range<i64>> {
        let row = sqlx::query(
            "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + $1 AS TEXT) WHERE key = 'next_ino' \
             RETURNING value",
        )
        .bind(size)
        .fetch_one(&self.pool)
        .await?;
        let end: i64 = row.get::<String, _>(0).parse().map_err(|_| {
            super::ManifestError::Corrupt("the inode counter next_ino is not a number".into())
        })?;
        Ok(end - size..end)
    }

    /// Records the numbers the mount handed out for paths no row stood for (see `PIN_INOS`);
    /// returns the paths whose rows now hold those numbers (the others kept their own).
    pub async fn pin_inos(&self, rows: &[(&Scanned, i64)]) -> Result<Vec<String>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let json: Vec<serde_json::Value> = rows
            .iter()
            .filter(|(_, ino)| storable(Some(*ino)).is_some())
            .map(|(seen, ino)| {
                let (state, reason) = match super::after_scan(None, seen) {
                    super::ScanChange::Write { state, reason, .. } => (state, reason),
                    super::ScanChange::Unchanged => (super::State::Pending, None),
                };
                serde_json::json!([
                    seen.path,
                    seen.kind.as_str(),
                    state.as_str(),
                    reason,
                    seen.size,
                    seen.mtime_ns,
                    seen.mode,
                    seen.uid,
                    seen.gid,
                    seen.link_target,
                    ino
                ])
            })
            .collect();
        let taken = sqlx::query(&self.sql(PIN_INOS))
            .bind(serde_json::Value::Array(json).to_string())
            .bind(now_ms())
            .fetch_all(&self.pool)
            .await?;
        Ok(taken.iter().map(|row| row.get(0)).collect())
    }

    /// Records the numbers the mount handed out for rows that held none (see `PIN_ROW_INOS`);
    /// returns the paths whose rows now hold those numbers.
    pub async fn pin_row_inos(&self, rows: &[(&str, i64)]) -> Result<Vec<String>> {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .filter(|(_, ino)| storable(Some(*ino)).is_some())
            .map(|(path, ino)| serde_json::json!([path, ino]))
            .collect();
        if json.is_empty() {
            return Ok(Vec::new());
        }
        let taken = sqlx::query(&self.sql(PIN_ROW_INOS))
            .bind(serde_json::Value::Array(json).to_string())
            .fetch_all(&self.pool)
            .await?;
        Ok(taken.iter().map(|row| row.get(0)).collect())
    }
}
