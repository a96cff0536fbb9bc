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

pub(super) const SELECT_ENTRY: &str =
    "SELECT path, kind, state, size, mtime_ns, mode, uid, gid, link_target, dest_key, sha256, \
     dest_etag, purged_at, version, ino FROM entries";
pub(super) const CHILDREN_BELOW: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path >= $1 AND path < $2 ORDER BY path LIMIT $3"
);
pub(super) const CHILDREN_OF_ROOT: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path >= $1 AND path <> '' ORDER BY path LIMIT $2"
);
// The next page after a full one ($1 its last path): PostgreSQL text holds no NUL, so "the
// smallest path after it" cannot be spelled as `last || '\0'`.
pub(super) const CHILDREN_BELOW_AFTER: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path > $1 AND path < $2 ORDER BY path LIMIT $3"
);
pub(super) const CHILDREN_OF_ROOT_AFTER: &str = concatcp!(
    SELECT_ENTRY,
    " WHERE path > $1 AND path <> '' ORDER BY path LIMIT $2"
);

/// Rows read per query when listing a directory.
pub(super) const CHILDREN_PAGE: i64 = 512;

/// One query of a directory listing: rows from `from` (after it, with `after`) up to `end`
/// (the end of the directory's range; None for the root).
pub(super) struct Page {
    pub from: String,
    pub after: bool,
    pub end: Option<String>,
}

/// The walk of a directory's rows that `children` makes, page by page: a row deeper down says
/// where its subtree ends, and the next page starts after it.
pub(super) struct ChildWalk {
    prefix: String,
    next: Option<Page>,
    pub found: Vec<Entry>,
    /// Rows taken from the current page, whether it ended in a jump, and its last row.
    read: i64,
    jumped: bool,
    last: Option<String>,
}

impl ChildWalk {
    pub fn new(dir: &str) -> ChildWalk {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        // '0' is the byte after '/': everything below `dir` sorts before `dir` + "0".
        let end = (!dir.is_empty()).then(|| format!("{dir}0"));
        ChildWalk {
            next: Some(Page {
                from: prefix.clone(),
                after: false,
                end,
            }),
            prefix,
            found: Vec::new(),
            read: 0,
            jumped: false,
            last: None,
        }
    }

    /// The next query to make, if any.
    pub fn next_page(&mut self) -> Option<Page> {
        self.next.take()
    }

    /// Takes the next row of the current page (in path order); false: stop reading this page
    /// (the row is deeper down, and the next page starts past its subtree).
    pub fn take(&mut self, entry: Entry) -> bool {
        self.read += 1;
        let rest = &entry.path[self.prefix.len()..];
        if let Some(slash) = rest.find('/') {
            // A row deeper down: its directory's own row (if any) came before it; jump past the
            // whole subtree.
            self.next = Some(Page {
                from: format!("{}{}0", self.prefix, &rest[..slash]),
                after: false,
                end: self.end(),
            });
            self.jumped = true;
            return false;
        }
        self.last = Some(entry.path.clone());
        // Not a name of this directory ("..", ".", ""): never shown or followed.
        match super::refused_path(&entry.path) {
            Some(why) => tracing::error!("{why}; not shown"),
            None => self.found.push(entry),
        }
        true
    }

    /// The current page is read: a full one continues after its last row.
    pub fn page_done(&mut self) {
        let full = self.read == CHILDREN_PAGE;
        if let (false, true, Some(last)) = (self.jumped, full, self.last.take()) {
            self.next = Some(Page {
                from: last,
                after: true,
                end: self.end(),
            });
        }
        self.read = 0;
        self.jumped = false;
        self.last = None;
    }

    fn end(&self) -> Option<String> {
        (!self.prefix.is_empty()).then(|| format!("{}0", self.prefix.trim_end_matches('/')))
    }
}

impl Manifest {
    /// `entry`, `entry_by_ino` and `children` answered on this thread without waiting on
    /// anything but the local file (a SQLite manifest); None: use the async ones.
    pub fn reads_in_place(&self) -> bool {
        self.reader.is_some()
    }

    pub fn entry_now(&self, path: &str) -> Option<Result<Option<Entry>>> {
        self.reader.as_ref().map(|r| r.entry(path))
    }

    pub fn entry_by_ino_now(&self, ino: u64) -> Option<Result<Option<Entry>>> {
        self.reader.as_ref().map(|r| r.entry_by_ino(ino))
    }

    pub fn children_now(&self, dir: &str) -> Option<Result<Vec<Entry>>> {
        self.reader.as_ref().map(|r| r.children(dir))
    }

    /// The row for one path, whatever its state.
    pub async fn entry(&self, path: &str) -> Result<Option<Entry>> {
        if let Some(reader) = &self.reader {
            return reader.entry(path);
        }
        let row = sqlx::query(concatcp!(SELECT_ENTRY, " WHERE path = $1"))
            .bind(path)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// The row holding inode number `ino` (the root's, 1, is never stored).
    pub async fn entry_by_ino(&self, ino: u64) -> Result<Option<Entry>> {
        if let Some(reader) = &self.reader {
            return reader.entry_by_ino(ino);
        }
        let row = sqlx::query(concatcp!(SELECT_ENTRY, " WHERE ino = $1"))
            .bind(ino as i64)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// Every row directly below `dir` ("" for the root), in path order. Whole subtrees are
    /// skipped with one query each, so listing the root of a million files reads its direct
    /// children and not every row.
    pub async fn children(&self, dir: &str) -> Result<Vec<Entry>> {
        if let Some(reader) = &self.reader {
            return reader.children(dir);
        }
        let mut walk = ChildWalk::new(dir);
        while let Some(page) = walk.next_page() {
            self.walk_page(&page, &mut walk).await?;
            walk.page_done();
        }
        Ok(walk.found)
    }

    /// Feeds the rows of `page` to `walk` until it has had enough (rows are streamed: a page
    /// that meets a subtree stops there).
    async fn walk_page(&self, page: &Page, walk: &mut ChildWalk) -> Result<()> {
        use futures_util::TryStreamExt;
        let query = match (&page.end, page.after) {
            (Some(end), false) => sqlx::query(CHILDREN_BELOW).bind(&page.from).bind(end),
            (Some(end), true) => sqlx::query(CHILDREN_BELOW_AFTER).bind(&page.from).bind(end),
            (None, false) => sqlx::query(CHILDREN_OF_ROOT).bind(&page.from),
            (None, true) => sqlx::query(CHILDREN_OF_ROOT_AFTER).bind(&page.from),
        };
        let mut rows = query.bind(CHILDREN_PAGE).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            if !walk.take(entry_from_row(&row)?) {
                break;
            }
        }
        Ok(())
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
        // Through the index of prioritized rows by level (migration 0008), on SQLite by name:
        // its planner preferred the index on state, and an idle daemon read every pending row
        // of a million-file manifest every few seconds.
        let from = match self.engine {
            super::Engine::Sqlite => "entries INDEXED BY entries_by_priority_level",
            super::Engine::Postgres => "entries",
        };
        let rows = sqlx::query(&format!(
            "SELECT path FROM {from} WHERE priority > 0 AND priority >= $1 AND kind = 'file' \
             AND rolled_back_at IS NULL AND (state = 'pending' \
             OR (state = 'failed' AND next_retry_at IS NOT NULL AND next_retry_at <= $2)) \
             ORDER BY priority DESC, queued_at LIMIT $3",
        ))
        .bind(min.max(1))
        .bind(now_ms())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

pub(super) fn entry_from_row(row: &AnyRow) -> Result<Entry> {
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
