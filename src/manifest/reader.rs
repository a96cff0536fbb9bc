//! The mount's reads of a SQLite manifest (a row by path, by inode number, the rows of a
//! directory), made on the calling thread through SQLite's C API.
//!
//! Why not through `sqlx` like every other statement: its SQLite driver hands each row from a
//! worker thread to the caller through a channel and converts every value, which cost about
//! 25 µs per row and made a stat walk of the mount spend most of its time there (measured with
//! `perf`, docs/BENCHMARKS.md case `mountstat`). Here a row costs about a microsecond, and a
//! FUSE thread answers from SQLite's own file without a thread switch: the file is local, so
//! this never waits on the network.
//!
//! Connections are read-only by intent (`PRAGMA query_only`), kept in a lock-free queue so
//! threads never wait on each other for one (WAL mode lets them all read while the manifest's
//! writers write), and each keeps its own small page cache.

use std::path::{Path, PathBuf};

use crossbeam_queue::ArrayQueue;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::namespace::{ChildWalk, Entry, CHILDREN_PAGE, SELECT_ENTRY};
use super::{ManifestError, Result};

/// Connections kept for reuse; more may be open at once, the extra ones are closed after use.
const KEPT: usize = 8;

pub(super) struct SqliteReader {
    path: PathBuf,
    idle: ArrayQueue<Connection>,
    cache_kib: i64,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteReader({})", self.path.display())
    }
}

fn sql_error(e: rusqlite::Error) -> ManifestError {
    ManifestError::Corrupt(format!("reading the manifest: {e}"))
}

impl SqliteReader {
    /// A reader of the SQLite manifest at `path`, each connection with `cache_kib` KiB of page
    /// cache.
    pub(super) fn new(path: &Path, cache_kib: i64) -> SqliteReader {
        SqliteReader {
            path: path.to_path_buf(),
            idle: ArrayQueue::new(KEPT),
            cache_kib,
        }
    }

    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch(&format!(
            "PRAGMA query_only = ON; PRAGMA cache_size = -{};",
            self.cache_kib
        ))?;
        Ok(conn)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = match self.idle.pop() {
            Some(conn) => conn,
            None => self.connect().map_err(sql_error)?,
        };
        let out = f(&conn).map_err(sql_error);
        // A full queue drops (closes) the connection.
        let _ = self.idle.push(conn);
        out
    }

    pub(super) fn entry(&self, path: &str) -> Result<Option<Entry>> {
        self.with(|conn| {
            conn.prepare_cached(&format!("{SELECT_ENTRY} WHERE path = ?1"))?
                .query_row([path], row_entry)
                .optional()
        })?
        .transpose()
    }

    pub(super) fn entry_by_ino(&self, ino: u64) -> Result<Option<Entry>> {
        self.with(|conn| {
            conn.prepare_cached(&format!("{SELECT_ENTRY} WHERE ino = ?1"))?
                .query_row([ino as i64], row_entry)
                .optional()
        })?
        .transpose()
    }

    pub(super) fn children(&self, dir: &str) -> Result<Vec<Entry>> {
        let mut walk = ChildWalk::new(dir);
        while let Some(page) = walk.next_page() {
            let (sql, bound_end) = match (&page.end, page.after) {
                (Some(_), false) => ("path >= ?1 AND path < ?2", true),
                (Some(_), true) => ("path > ?1 AND path < ?2", true),
                (None, false) => ("path >= ?1 AND path <> ''", false),
                (None, true) => ("path > ?1 AND path <> ''", false),
            };
            let sql = format!("{SELECT_ENTRY} WHERE {sql} ORDER BY path LIMIT {CHILDREN_PAGE}");
            // Rows are read one at a time: a page that meets a subtree stops there (the next
            // page starts past it), instead of reading a whole page of that subtree's rows.
            self.with(|conn| {
                let mut statement = conn.prepare_cached(&sql)?;
                let mut rows = if bound_end {
                    let end = page.end.as_deref().unwrap_or_default();
                    statement.query([page.from.as_str(), end])?
                } else {
                    statement.query([page.from.as_str()])?
                };
                while let Some(row) = rows.next()? {
                    match row_entry(row)? {
                        Ok(entry) => {
                            if !walk.take(entry) {
                                break;
                            }
                        }
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(()))
            })??;
            walk.page_done();
        }
        Ok(walk.found)
    }
}

/// A row of `SELECT_ENTRY`; a value the manifest cannot hold is an error of its own.
fn row_entry(row: &rusqlite::Row) -> rusqlite::Result<Result<Entry>> {
    // Parsed in place: no string made for either.
    let kind = row
        .get_ref(1)?
        .as_str()
        .map_err(rusqlite::Error::from)?
        .parse();
    let state = row
        .get_ref(2)?
        .as_str()
        .map_err(rusqlite::Error::from)?
        .parse();
    let (kind, state) = match (kind, state) {
        (Ok(kind), Ok(state)) => (kind, state),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(ManifestError::Corrupt(e))),
    };
    Ok(Ok(Entry {
        path: row.get(0)?,
        kind,
        state,
        size: row.get::<_, i64>(3)? as u64,
        mtime_ns: row.get(4)?,
        mode: row.get::<_, i64>(5)? as u32,
        uid: row.get::<_, i64>(6)? as u32,
        gid: row.get::<_, i64>(7)? as u32,
        link_target: row.get(8)?,
        dest_key: row.get(9)?,
        sha256: row.get(10)?,
        dest_etag: row.get(11)?,
        purged: row.get::<_, Option<i64>>(12)?.is_some(),
        version: row.get(13)?,
        ino: row.get::<_, Option<i64>>(14)?.map(|ino| ino as u64),
    }))
}
