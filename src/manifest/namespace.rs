//! What the mount asks of the manifest: single entries, the children of a directory, and the
//! copy-on-read queue.
//!
//! The mount shows the union of the local tree and these rows, so only rows that stand for
//! something the dest still holds (or a directory) are returned: a pending file that vanished
//! locally is gone, not a ghost.

use const_format::concatcp;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::state::{Kind, State};
use super::{json_list, now_ms, parse_kind, parse_state, Manifest, Result};

/// A manifest row as the mount sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub state: State,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub link_target: Option<String>,
    pub dest_key: Option<String>,
    /// SHA-256 of the copied content (verified files).
    pub sha256: Option<String>,
    /// The dest object's ETag or `file://` stamp when it was verified (`store::local_stamp`).
    pub dest_etag: Option<String>,
    /// The local copy was removed by purge.
    pub purged: bool,
    pub version: i64,
    /// The inode number the mount gives this path (none: marked deleted, or written by an older
    /// cutoverfs).
    pub ino: Option<u64>,
}

impl Entry {
    /// The dest holds this file's verified content.
    pub fn in_dest(&self) -> bool {
        self.kind == Kind::File && self.state == State::Verified && self.dest_key.is_some()
    }

    /// Still part of the namespace when there is no local copy.
    pub fn visible_without_local_copy(&self) -> bool {
        match self.kind {
            Kind::Dir => !matches!(self.state, State::Deleted | State::Missing),
            _ => matches!(self.state, State::Verified | State::Copied),
        }
    }
}

const SELECT_ENTRY: &str =
    "SELECT path, kind, state, size, mtime_ns, mode, uid, gid, link_target, dest_key, sha256, \
     dest_etag, purged_at, version, ino FROM entries";
const CHILDREN_BELOW: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path >= $1 AND path < $2 ORDER BY path LIMIT $3"
);
const CHILDREN_OF_ROOT: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path >= $1 AND path <> '' ORDER BY path LIMIT $2"
);
// The next page after a full one ($1 its last path): PostgreSQL text holds no NUL, so "the
// smallest path after it" cannot be spelled as `last || '\0'`.
const CHILDREN_BELOW_AFTER: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path > $1 AND path < $2 ORDER BY path LIMIT $3"
);
const CHILDREN_OF_ROOT_AFTER: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path > $1 AND path <> '' ORDER BY path LIMIT $2"
);

/// Rows read per query when listing a directory.
const CHILDREN_PAGE: i64 = 512;

impl Manifest {
    /// The row for one path, whatever its state.
    pub async fn entry(&self, path: &str) -> Result<Option<Entry>> {
        let row = sqlx::query(concatcp!(SELECT_ENTRY, " WHERE path = $1"))
            .bind(path)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// The row holding inode number `ino` (the root's, 1, is never stored).
    pub async fn entry_by_ino(&self, ino: u64) -> Result<Option<Entry>> {
        let row = sqlx::query(concatcp!(SELECT_ENTRY, " WHERE ino = $1"))
            .bind(ino as i64)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// Every row directly below `dir` ("" for the root), in path order. Whole subtrees are skipped with one query each, so listing the root of a
    /// million files reads its direct children and not every row.
    pub async fn children(&self, dir: &str) -> Result<Vec<Entry>> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        // '0' is the byte after '/': everything below `dir` sorts before `dir` + "0".
        let end = (!dir.is_empty()).then(|| format!("{dir}0"));
        let mut from = prefix.clone();
        let mut after_from = false;
        let mut found = Vec::new();
        loop {
            let rows = self.rows_from(&from, after_from, end.as_deref()).await?;
            let full_page = rows.len() as i64 == CHILDREN_PAGE;
            let mut next = None;
            for row in &rows {
                let entry = entry_from_row(row)?;
                let rest = &entry.path[prefix.len()..];
                match rest.find('/') {
                    // Not a name of this directory ("..", ".", ""): never shown or followed.
                    None => match super::refused_path(&entry.path) {
                        Some(why) => tracing::error!("{why}; not shown"),
                        None => found.push(entry),
                    },
                    Some(slash) => {
                        // A row deeper down: its directory's own row (if any) came before it;
                        // jump past the whole subtree.
                        next = Some(format!("{prefix}{}0", &rest[..slash]));
                        break;
                    }
                }
            }
            match (next, rows.last()) {
                (Some(jump), _) => {
                    from = jump;
                    after_from = false;
                }
                (None, Some(last)) if full_page => {
                    from = last.get::<String, _>(0);
                    after_from = true;
                }
                _ => break,
            }
        }
        Ok(found)
    }

    async fn rows_from(&self, from: &str, after: bool, end: Option<&str>) -> Result<Vec<AnyRow>> {
        let query = match (end, after) {
            (Some(end), false) => sqlx::query(CHILDREN_BELOW).bind(from).bind(end),
            (Some(end), true) => sqlx::query(CHILDREN_BELOW_AFTER).bind(from).bind(end),
            (None, false) => sqlx::query(CHILDREN_OF_ROOT).bind(from),
            (None, true) => sqlx::query(CHILDREN_OF_ROOT_AFTER).bind(from),
        };
        Ok(query.bind(CHILDREN_PAGE).fetch_all(&self.pool).await?)
    }

    /// Puts pending files at the head of the copy queue (copy-on-read); returns how many were
    /// still waiting for a copy.
    pub async fn prioritize(&self, paths: &[String]) -> Result<u64> {
        if paths.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(&self.sql(
            "UPDATE entries SET priority = 1, queued_at = $1 \
             WHERE path IN (SELECT value FROM JSON_TEXTS($2)) AND kind = 'file' AND state = 'pending' AND priority = 0 \
             AND rolled_back_at IS NULL",
        ))
        .bind(now_ms())
        .bind(json_list(paths))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// How many files copy-on-read queued that no worker has taken yet.
    pub async fn count_prioritized(&self) -> Result<u64> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) FROM entries WHERE priority > 0 AND state = 'pending' AND kind = 'file' \
             AND rolled_back_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(n as u64)
    }

    /// Files queued by copy-on-read or requested by replicas (`priority` at least `min`) and
    /// not taken yet: requests first (a reader waits for them), then oldest first.
    pub async fn prioritized(&self, limit: usize, min: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT path FROM entries WHERE priority >= $1 AND kind = 'file' \
             AND rolled_back_at IS NULL AND (state = 'pending' \
             OR (state = 'failed' AND next_retry_at IS NOT NULL AND next_retry_at <= $2)) \
             ORDER BY priority DESC, queued_at LIMIT $3",
        )
        .bind(min.max(1))
        .bind(now_ms())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

fn entry_from_row(row: &AnyRow) -> Result<Entry> {
    Ok(Entry {
        path: row.get(0),
        kind: parse_kind(row.get(1))?,
        state: parse_state(row.get(2))?,
        size: row.get::<i64, _>(3) as u64,
        mtime_ns: row.get(4),
        mode: row.get::<i64, _>(5) as u32,
        uid: row.get::<i64, _>(6) as u32,
        gid: row.get::<i64, _>(7) as u32,
        link_target: row.get(8),
        dest_key: row.get(9),
        sha256: row.get(10),
        dest_etag: row.get(11),
        purged: row.get::<Option<i64>, _>(12).is_some(),
        version: row.get(13),
        ino: row.get::<Option<i64>, _>(14).map(|ino| ino as u64),
    })
}
