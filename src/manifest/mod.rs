//! The manifest (DESIGN §2-§3): the database that knows the state of every path.
//!
//! Owns: the schema (versioned migrations under `migrations/`), every SQL statement, leases and
//! the source/dest pair a manifest belongs to. It may not touch files or the dest: callers act,
//! the manifest records. Everything goes through `sqlx`'s `Any` driver with SQL that SQLite and
//! PostgreSQL both accept (`$n` placeholders, `ON CONFLICT`, `RETURNING`); the only
//! engine-specific pieces are the migrations, the JSON list functions of bulk statements
//! (`Engine::sql`) and lease claiming (`FOR UPDATE SKIP LOCKED` on PostgreSQL).
//!
//! Write transactions hold writes only; reads happen before them and writes are guarded by the
//! row's `version` or lease, so two writers never need to upgrade a read lock.

mod audit;
mod health;
mod inodes;
mod namespace;
mod reach;
mod reader;
mod requests;
mod rollback;
mod state;
mod verify;
mod writes;

pub use audit::{set_actor, AuditQuery, AuditRow};
pub use health::Health;
pub use inodes::FIRST_MEMORY_ONLY_INO;
pub use namespace::Entry;
pub use reach::Reachability;
pub use requests::{RequestOutcome, REQUESTED};
pub use rollback::{RollbackRow, RollbackSelector};
pub use verify::{AtDest, DATA_AT_RISK};
pub use writes::{Leftover, LocalFacts, Removed};

pub use state::{after_scan, refused_path, Kind, Recorded, ScanChange, Scanned, State};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Connection, Executor, Row};

/// Where the manifest lives.
#[derive(Clone, PartialEq, Eq)]
pub enum ManifestUrl {
    Sqlite(PathBuf),
    /// The full connection URL, password included: never print it, print `self` (redacted).
    Postgres(String),
}

impl std::fmt::Debug for ManifestUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManifestUrl({self})")
    }
}

/// The database engine behind a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// Spells the JSON list functions of a bulk statement for this engine: `JSON_ROWS($n)` is
    /// a table of JSON arrays (column `value`, fields read with `->>`), `JSON_TEXTS($n)` one
    /// of strings, both from one JSON text parameter.
    fn sql(self, sql: &str) -> String {
        let (rows, texts) = match self {
            Engine::Sqlite => ("json_each(", "json_each("),
            Engine::Postgres => (
                "json_array_elements(CAST(",
                "json_array_elements_text(CAST(",
            ),
        };
        let mut out = String::with_capacity(sql.len() + 32);
        let mut rest = sql;
        while let Some(at) = rest.find("JSON_") {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let (func, after) = if let Some(after) = tail.strip_prefix("JSON_ROWS(") {
                (rows, after)
            } else if let Some(after) = tail.strip_prefix("JSON_TEXTS(") {
                (texts, after)
            } else {
                out.push_str("JSON_");
                rest = &tail[5..];
                continue;
            };
            let close = after
                .find(')')
                .expect("JSON_ list marker has a closing parenthesis");
            out.push_str(func);
            out.push_str(&after[..close]);
            if self == Engine::Postgres {
                out.push_str(" AS json))");
            } else {
                out.push(')');
            }
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// The URL with its password replaced, for messages and logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        // Unparseable: keep the scheme only, the rest may hold a password.
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://(unparseable)"),
            None => "(unparseable)".to_string(),
        },
    }
}

pub const DEFAULT_MANIFEST: &str = "sqlite:///var/lib/cutoverfs/manifest.db";

impl FromStr for ManifestUrl {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, ManifestError> {
        let bad = |why: &str| ManifestError::BadUrl {
            url: s.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = s.strip_prefix("sqlite://") {
            if !rest.starts_with('/') {
                return Err(bad("the path after sqlite:// must be absolute, as in sqlite:///var/lib/cutoverfs/manifest.db"));
            }
            if rest.contains('?') {
                return Err(bad(
                    "query options are not accepted on a sqlite manifest URL",
                ));
            }
            return Ok(ManifestUrl::Sqlite(PathBuf::from(rest)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let bad = |why: &str| ManifestError::BadUrl {
                url: redact(s),
                why: why.to_string(),
            };
            let parsed = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
            if parsed.path().trim_start_matches('/').is_empty() {
                return Err(bad(
                    "name the database, as in postgres://USER:PASSWORD@HOST:5432/DATABASE",
                ));
            }
            if parsed.host_str().is_none_or(str::is_empty)
                && !parsed.query_pairs().any(|(k, _)| k == "host")
            {
                return Err(bad("name the host, as in postgres://USER:PASSWORD@HOST:5432/DATABASE (or ?host=/SOCKET/DIR)"));
            }
            return Ok(ManifestUrl::Postgres(s.to_string()));
        }
        if s.starts_with('/') {
            return Ok(ManifestUrl::Sqlite(PathBuf::from(s)));
        }
        Err(bad(
            "expected sqlite:///ABSOLUTE/PATH, an absolute path or postgres://USER:PASSWORD@HOST/DATABASE",
        ))
    }
}

impl ManifestUrl {
    /// Where the manifest lives, for messages: HOST:PORT (or the socket directory) of
    /// PostgreSQL, the file of SQLite.
    pub fn host(&self) -> String {
        match self {
            ManifestUrl::Sqlite(path) => path.display().to_string(),
            ManifestUrl::Postgres(url) => {
                let Ok(parsed) = url::Url::parse(url) else {
                    return redact(url);
                };
                let socket = parsed
                    .query_pairs()
                    .find(|(k, _)| k == "host")
                    .map(|(_, v)| v.into_owned());
                match (parsed.host_str().filter(|h| !h.is_empty()), socket) {
                    (Some(host), _) => format!("{host}:{}", parsed.port().unwrap_or(5432)),
                    (None, Some(socket)) => socket,
                    (None, None) => redact(url),
                }
            }
        }
    }

    pub fn engine(&self) -> Engine {
        match self {
            ManifestUrl::Sqlite(_) => Engine::Sqlite,
            ManifestUrl::Postgres(_) => Engine::Postgres,
        }
    }
}

impl std::fmt::Display for ManifestUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            ManifestUrl::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("bad manifest URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot open manifest {location}: {source}")]
    Open {
        location: String,
        source: std::io::Error,
    },
    #[error("cannot open manifest {location}: {source}")]
    Connect {
        location: String,
        source: sqlx::Error,
    },
    #[error("cannot bring manifest {location} to the current schema: {source}")]
    Migrate {
        location: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "manifest {location} belongs to source {recorded_source} and dest {recorded_dest}, not to \
         source {source_dir} and dest {dest}; use another --manifest for this pair"
    )]
    OtherPair {
        location: String,
        recorded_source: String,
        recorded_dest: String,
        source_dir: String,
        dest: String,
    },
    #[error("manifest {location} has no source and dest recorded yet; give --source and --dest")]
    NoPair { location: String },
    #[error("manifest query failed: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("manifest holds a bad value: {0}")]
    Corrupt(String),
    #[error(
        "manifest {location} has an older schema ({applied} of {expected} migrations); \
         `cutoverfs sweep`, `mount`, `verify`, `purge` and `rollback --confirm` upgrade it"
    )]
    OlderSchema {
        location: String,
        applied: i64,
        expected: i64,
    },
    #[error(
        "manifest {location} was written by a newer cutoverfs ({applied} migrations, this one \
         knows {expected}); use that version"
    )]
    NewerSchema {
        location: String,
        applied: i64,
        expected: i64,
    },
}

pub type Result<T, E = ManifestError> = std::result::Result<T, E>;

/// The source and dest a manifest belongs to, as canonical strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub source: String,
    pub dest: String,
}

/// A row handed to a worker by `claim`.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub attempts: u32,
    /// Hashes of objects cutoverfs published at this path's key (confirmed or about to be).
    pub owned_sha256: Vec<String>,
}

/// The end of one copy attempt, recorded against the lease that allowed it.
#[derive(Debug, Clone)]
pub enum FileUpdate {
    /// About to publish content with this hash: recorded first so a crash right after the
    /// publish still knows the object is ours.
    Intent {
        path: String,
        owner: String,
        sha256: String,
    },
    Verified {
        path: String,
        owner: String,
        sha256: String,
        size: u64,
        mtime_ns: i64,
        mime: Option<String>,
        dest_key: String,
        dest_etag: Option<String>,
        /// false when an identical object was already there and cutoverfs did not write it.
        written_by_us: bool,
    },
    Failed {
        path: String,
        owner: String,
        error: String,
        retry_at: Option<i64>,
        /// false when the dest was unavailable: the failure says nothing about the file, so the
        /// attempt is given back.
        counts: bool,
    },
    Missing {
        path: String,
        owner: String,
    },
    Conflict {
        path: String,
        owner: String,
        reason: String,
    },
    Unsupported {
        path: String,
        owner: String,
        reason: String,
    },
    /// A copy was published after its lease was lost (the file was removed, renamed or opened
    /// for writing meanwhile): the object at `dest_key` is ours, whatever the row says now. A
    /// removed file's row makes it a leftover to delete; any other row may replace it.
    Orphaned {
        path: String,
        dest_key: String,
        sha256: String,
    },
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BatchTally {
    pub files: u64,
    pub copied: u64,
    pub already: u64,
    pub missing: u64,
    pub conflicts: u64,
    pub failed: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchRow {
    pub id: i64,
    pub node: String,
    pub command: String,
    pub status: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    #[serde(flatten)]
    pub tally: BatchTally,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub path: String,
    pub state: State,
    pub attempts: i64,
    pub reason: Option<String>,
}

/// One file-like row as reports need it.
#[derive(Debug, Clone)]
pub struct FileSummary {
    pub path: String,
    pub state: State,
    pub size: u64,
    /// Its local copy was purged: the file lives at the dest only.
    pub purged: bool,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

// A pending row with a live lease is held by a writer (`hold_for_write`): copying it now would
// copy a file in the middle of being written and record it verified.
// A rolled-back row waits for an operator's next `cutoverfs sweep` (`release_rollbacks`).
const CLAIMABLE: &str = "entries.kind = 'file' AND entries.rolled_back_at IS NULL AND ((entries.state = 'pending' \
     AND (entries.lease_expires_at IS NULL OR entries.lease_expires_at < $1)) \
     OR (entries.state = 'failed' AND entries.next_retry_at IS NOT NULL AND entries.next_retry_at <= $1) \
     OR (entries.state = 'copying' AND entries.lease_expires_at < $1))";

/// Claimable rows by state, each read in path order straight from the (state, path) index.
const CANDIDATES: [&str; 3] = [
    "SELECT path FROM entries WHERE state = 'pending' AND kind = 'file' AND path > $2 AND $1 = $1 \
     AND rolled_back_at IS NULL ORDER BY path LIMIT $3",
    "SELECT path FROM entries WHERE state = 'failed' AND next_retry_at IS NOT NULL AND next_retry_at <= $1 \
     AND kind = 'file' AND path > $2 ORDER BY path LIMIT $3",
    "SELECT path FROM entries WHERE state = 'copying' AND lease_expires_at < $1 AND kind = 'file' AND path > $2 \
     ORDER BY path LIMIT $3",
];

#[derive(Debug, Clone)]
pub struct Manifest {
    pool: AnyPool,
    /// The URL it was opened with, password included: only for PostgreSQL's LISTEN connection.
    url: ManifestUrl,
    location: String,
    id: String,
    engine: Engine,
    reach: std::sync::Arc<Reachability>,
    /// Inode numbers this process may hand out (`inodes.rs`).
    inos: std::sync::Arc<inodes::InoBlock>,
    /// SQLite: the mount's reads, made in place (`reader.rs`).
    reader: Option<std::sync::Arc<reader::SqliteReader>>,
}

/// SQLite's page cache of this process, in KiB (`PRAGMA cache_size`), shared out between its
/// connections: an eighth to each of the (at most four) connections of the pool, a sixteenth
/// to each of the (at most eight) kept by the mount's reader (`reader.rs`).
static SQLITE_CACHE_KIB: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1 << 20);

/// Caps SQLite's page cache of the connections this process opens from now on, all together.
/// A long-running daemon keeps its memory bounded this way (issue 15): the file's pages stay
/// in the kernel's page cache, which the kernel gives back under pressure, and a read of a page
/// from there costs a system call, not a disk read.
pub fn limit_sqlite_cache(bytes: u64) {
    let kib = (bytes / 1024).max(4096) as i64;
    SQLITE_CACHE_KIB.store(kib, std::sync::atomic::Ordering::Relaxed);
}

fn sqlite_cache_kib(share: i64) -> i64 {
    SQLITE_CACHE_KIB.load(std::sync::atomic::Ordering::Relaxed) / share
}

/// How long a query waits for a connection to PostgreSQL before it fails (and the caller
/// decides whether to pause and retry): long enough for a restart, short enough to report.
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool only says it gave up waiting; one direct connection says why (refused, unknown
/// host, authentication failed, no such database).
async fn why_no_connection(options: &AnyConnectOptions) -> sqlx::Error {
    use sqlx::ConnectOptions;
    match tokio::time::timeout(PG_ACQUIRE_TIMEOUT, options.connect()).await {
        Ok(Err(e)) => e,
        Ok(Ok(conn)) => {
            use sqlx::Connection;
            let _ = conn.close().await;
            sqlx::Error::PoolTimedOut
        }
        Err(_) => sqlx::Error::PoolTimedOut,
    }
}

/// Opens and closes one connection on its own, after every other one of the process closed: the
/// last connection to close folds the WAL back and removes the `-wal`/`-shm` files, but pool
/// connections closing at the same moment each leave them to the other. Does nothing to a
/// manifest another process has open (SQLite sees its lock and keeps the files).
async fn fold_wal_alone(path: &Path) {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    if !wal.exists() {
        return;
    }
    let Ok(options) = AnyConnectOptions::from_str(&format!("sqlite://{}?mode=rw", path.display()))
    else {
        return;
    };
    match sqlx::AnyConnection::connect_with(&options).await {
        Ok(mut conn) => {
            // A read of the schema opens the database in WAL mode, so the close cleans up.
            let _ = conn.execute("SELECT COUNT(*) FROM sqlite_master").await;
            let _ = conn.close().await;
        }
        Err(e) => tracing::debug!(error = %e, "cannot fold the manifest's WAL back"),
    }
}

impl Manifest {
    /// Opens the manifest, creating it (SQLite: mode 0600, parent 0700) and applying
    /// migrations.
    pub async fn open(url: &ManifestUrl) -> Result<Manifest> {
        let location = url.to_string();
        let manifest = match url {
            ManifestUrl::Sqlite(path) => {
                create_private_file(path).map_err(|source| ManifestError::Open {
                    location: location.clone(),
                    source,
                })?;
                // Two processes creating the same manifest at once would both migrate.
                let lock = schema_lock(path, libc::LOCK_EX, &location).await?;
                let manifest = Self::connect(url, false).await?;
                let migrator = sqlx::migrate!("src/manifest/migrations/sqlite");
                manifest.refuse_newer_schema(&migrator).await?;
                let migrated = migrator.run(&manifest.pool).await;
                drop(lock);
                migrated.map_err(|source| ManifestError::Migrate { location, source })?;
                manifest
            }
            ManifestUrl::Postgres(_) => {
                // sqlx holds an advisory lock while it migrates: nodes starting at once wait.
                let manifest = Self::connect(url, false).await?;
                let migrator = sqlx::migrate!("src/manifest/migrations/postgres");
                manifest.refuse_newer_schema(&migrator).await?;
                migrator
                    .run(&manifest.pool)
                    .await
                    .map_err(|source| ManifestError::Migrate { location, source })?;
                manifest
            }
        };
        sqlx::query("INSERT INTO meta (key, value) VALUES ('id', $1) ON CONFLICT (key) DO NOTHING")
            .bind(random_id())
            .execute(&manifest.pool)
            .await?;
        // Connections opened before the audit table existed record nothing: start afresh.
        manifest.pool.close().await;
        let manifest = Self::connect(url, false).await?;
        manifest.load_id().await
    }

    async fn load_id(mut self) -> Result<Manifest> {
        self.id = self.meta("id").await?.unwrap_or_default();
        Ok(self)
    }

    /// Opens an existing manifest without creating or changing anything (plans, dry runs,
    /// reports). None when there is none yet, including an empty file left by a crash before
    /// its schema was written, or a PostgreSQL database without the schema. Close it with
    /// `close()` so SQLite removes its WAL files.
    pub async fn open_existing(url: &ManifestUrl) -> Result<Option<Manifest>> {
        let (manifest, migrator) = match url {
            ManifestUrl::Sqlite(path) => {
                match std::fs::metadata(path) {
                    Ok(meta) if meta.len() > 0 => {}
                    _ => return Ok(None),
                }
                // Wait for a process that is creating this manifest right now to finish its
                // schema.
                let _schema_checked = schema_lock(path, libc::LOCK_SH, &url.to_string()).await?;
                (
                    Self::connect(url, false).await?,
                    sqlx::migrate!("src/manifest/migrations/sqlite"),
                )
            }
            ManifestUrl::Postgres(_) => {
                let manifest = Self::connect(url, false).await?;
                let exists: bool = sqlx::query(
                    "SELECT COUNT(*) > 0 FROM information_schema.tables \
                     WHERE table_name = '_sqlx_migrations' AND table_schema = current_schema()",
                )
                .fetch_one(&manifest.pool)
                .await?
                .get(0);
                if !exists {
                    manifest.close().await;
                    return Ok(None);
                }
                (manifest, sqlx::migrate!("src/manifest/migrations/postgres"))
            }
        };
        let expected = migrator.iter().count() as i64;
        let mut applied = manifest.applied_migrations().await;
        // Another node may be creating or upgrading a PostgreSQL schema right now (one
        // migration per transaction): give it the time to finish before calling the schema
        // older. (On SQLite the schema lock taken above already waited for that.)
        let patience = match url {
            ManifestUrl::Sqlite(_) => Duration::ZERO,
            ManifestUrl::Postgres(_) => Duration::from_secs(10),
        };
        let deadline = std::time::Instant::now() + patience;
        while 0 < applied && applied < expected && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            applied = manifest.applied_migrations().await;
        }
        if applied == 0 {
            manifest.close().await;
            return Ok(None);
        }
        if applied != expected {
            manifest.close().await;
            let location = manifest.location.clone();
            return Err(if applied < expected {
                ManifestError::OlderSchema {
                    location,
                    applied,
                    expected,
                }
            } else {
                ManifestError::NewerSchema {
                    location,
                    applied,
                    expected,
                }
            });
        }
        Ok(Some(manifest.load_id().await?))
    }

    /// A manifest a newer cutoverfs migrated is left alone: this binary does not know its
    /// schema (sqlx would only say a migration is missing).
    async fn refuse_newer_schema(&self, migrator: &sqlx::migrate::Migrator) -> Result<()> {
        let expected = migrator.iter().count() as i64;
        let applied = self.applied_migrations().await;
        if applied > expected {
            self.pool.close().await;
            return Err(ManifestError::NewerSchema {
                location: self.location.clone(),
                applied,
                expected,
            });
        }
        Ok(())
    }

    async fn applied_migrations(&self) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE")
            .fetch_one(&self.pool)
            .await
            .map(|row| row.get(0))
            .unwrap_or(0)
    }

    /// Connects read-write even for read-only commands, which simply never write: a read-only
    /// SQLite connection cannot remove the WAL files it creates on close.
    async fn connect(url: &ManifestUrl, read_only: bool) -> Result<Manifest> {
        sqlx::any::install_default_drivers();
        let location = url.to_string();
        let connect_error = |source| ManifestError::Connect {
            location: location.clone(),
            source,
        };
        let pool = match url {
            ManifestUrl::Sqlite(path) => {
                let conn_url = format!("sqlite://{}?mode=rw", path.display());
                let options = AnyConnectOptions::from_str(&conn_url).map_err(connect_error)?;
                AnyPoolOptions::new()
                    // A read-only look uses one connection: queries wait for it instead of
                    // opening more, and SQLite removes its WAL files only when a connection
                    // closes alone (two closing together each see the other and keep them).
                    .max_connections(if read_only { 1 } else { 4 })
                    .after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            if !read_only {
                                conn.execute("PRAGMA journal_mode = WAL").await?;
                            }
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute("PRAGMA busy_timeout = 30000").await?;
                            // A million rows with their indexes are a few hundred MiB: keep the
                            // hot part in memory instead of re-reading pages through syscalls
                            // (a mount keeps less: see `limit_sqlite_cache`).
                            let kib = sqlite_cache_kib(8);
                            conn.execute(format!("PRAGMA cache_size = -{kib}").as_str())
                                .await?;
                            conn.execute("PRAGMA temp_store = MEMORY").await?;
                            audit::install_sqlite(conn).await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await
                    .map_err(connect_error)?
            }
            ManifestUrl::Postgres(conn_url) => {
                let options = AnyConnectOptions::from_str(conn_url).map_err(connect_error)?;
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(PG_ACQUIRE_TIMEOUT)
                    .after_connect(|conn, _meta| Box::pin(audit::install_postgres(conn)))
                    .connect_with(options.clone())
                    .await;
                match pool {
                    Ok(pool) => pool,
                    Err(sqlx::Error::PoolTimedOut) => {
                        return Err(connect_error(why_no_connection(&options).await))
                    }
                    Err(e) => return Err(connect_error(e)),
                }
            }
        };
        Ok(Manifest {
            pool,
            url: url.clone(),
            reach: Reachability::new(url.host()),
            inos: inodes::InoBlock::new(),
            reader: match url {
                ManifestUrl::Sqlite(path) if !read_only => Some(std::sync::Arc::new(
                    reader::SqliteReader::new(path, sqlite_cache_kib(16)),
                )),
                _ => None,
            },
            location,
            id: String::new(),
            engine: url.engine(),
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The statement spelled for this manifest's engine (see `Engine::sql`).
    fn sql(&self, sql: &str) -> String {
        self.engine.sql(sql)
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// A random id made when the manifest was created: marks the dest objects it owns.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Closes every connection so that SQLite folds the WAL back and removes its files.
    ///
    /// SQLite removes them only when the last connection of the process closes. A query
    /// cancelled just before (a `select!` that lost) returns its connection to the pool from a
    /// spawned task, possibly after `close` looked at the idle list, and would then never be
    /// closed: closing again picks it up.
    pub async fn close(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.pool.close().await;
            if self.pool.size() == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.pool.size() > 0 {
            tracing::debug!(
                open = self.pool.size(),
                "manifest connections still busy at exit"
            );
        } else if let ManifestUrl::Sqlite(path) = &self.url {
            fold_wal_alone(path).await;
        }
    }

    async fn meta(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Where a running mount daemon reaches the local tree hidden under its mount
    /// (`/proc/PID/fd/N`), so other commands on that machine (purge, sweep) can too; None
    /// clears it when the daemon stops. Kept per host: machines sharing a PostgreSQL manifest
    /// each have their own mount, and a /proc path means nothing on another machine.
    pub async fn record_mounted_source(&self, path: Option<&str>) -> Result<()> {
        let key = mounted_source_key();
        match path {
            Some(path) => self.set_meta(&key, path).await,
            None => {
                sqlx::query("DELETE FROM meta WHERE key = $1")
                    .bind(key)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    }

    /// What a mount daemon on this host recorded with `record_mounted_source`.
    pub async fn mounted_source(&self) -> Result<Option<String>> {
        self.meta(&mounted_source_key()).await
    }

    /// The pair this manifest belongs to, if one was recorded.
    pub async fn pair(&self) -> Result<Option<Pair>> {
        match (self.meta("source").await?, self.meta("dest").await?) {
            (Some(source), Some(dest)) => Ok(Some(Pair { source, dest })),
            _ => Ok(None),
        }
    }

    /// Errors if the manifest belongs to another pair; records the pair on first use.
    pub async fn check_pair(&self, given: &Pair, record: bool) -> Result<()> {
        match self.pair().await? {
            Some(recorded) if recorded == *given => Ok(()),
            Some(recorded) => Err(ManifestError::OtherPair {
                location: self.location.clone(),
                recorded_source: recorded.source,
                recorded_dest: recorded.dest,
                source_dir: given.source.clone(),
                dest: given.dest.clone(),
            }),
            None if record => {
                self.set_meta("source", &given.source).await?;
                self.set_meta("dest", &given.dest).await?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Whether the manifest has no entries yet (a first scan need not look anything up).
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM entries LIMIT 1")
            .fetch_optional(&self.pool)
            .await?
            .is_none())
    }

    /// A new scan number; rows a scan does not see keep an older one.
    pub async fn next_scan_id(&self) -> Result<i64> {
        let last: i64 = self
            .meta("last_scan")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.set_meta("last_scan", &(last + 1).to_string()).await?;
        Ok(last + 1)
    }

    /// What the manifest says about these paths.
    pub async fn recorded(&self, paths: &[&str]) -> Result<HashMap<String, Recorded>> {
        let mut found = HashMap::with_capacity(paths.len());
        if paths.is_empty() {
            return Ok(found);
        }
        let rows = sqlx::query(&self.sql(
            "SELECT path, kind, state, reason, size, mtime_ns, mode, uid, gid, version, dest_owned FROM entries \
             WHERE path IN (SELECT value FROM JSON_TEXTS($1))",
        ))
        .bind(json_list(paths))
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let path: String = row.get(0);
            found.insert(path, recorded_from_row(&row)?);
        }
        Ok(found)
    }

    /// Records one batch of scan results in one transaction. `changes` pairs each scanned entry
    /// with its decision and the row version the decision was based on (0 for a new row).
    pub async fn record_scan(
        &self,
        scan_id: i64,
        seen: &[&str],
        changes: &[(&Scanned, ScanChange, i64)],
    ) -> Result<()> {
        retry_conflicts(|| self.record_scan_once(scan_id, seen, changes)).await
    }

    async fn record_scan_once(
        &self,
        scan_id: i64,
        seen: &[&str],
        changes: &[(&Scanned, ScanChange, i64)],
    ) -> Result<()> {
        let now = now_ms();
        // New rows need numbers; rows that have one keep it (`SCAN_INSERT`).
        let mut inos = self.new_inos(changes.len()).await?.into_iter();
        let mut tx = self.pool.begin().await?;
        if !seen.is_empty() {
            sqlx::query(&self.sql(
                "UPDATE entries SET seen_scan = $1, purged_at = NULL WHERE path IN (SELECT value FROM JSON_TEXTS($2))",
            ))
            .bind(scan_id)
            .bind(json_list(seen))
            .execute(&mut *tx)
            .await?;
        }
        for fresh in [true, false] {
            let rows: Vec<serde_json::Value> = changes
                .iter()
                .filter_map(|(scanned, change, version)| match change {
                    ScanChange::Write {
                        state,
                        reason,
                        fresh_copy,
                    } if *fresh_copy == fresh => Some(serde_json::json!([
                        scanned.path,
                        scanned.kind.as_str(),
                        state.as_str(),
                        reason,
                        scanned.size,
                        scanned.mtime_ns,
                        scanned.mode,
                        scanned.uid,
                        scanned.gid,
                        scanned.link_target,
                        version,
                        inos.next()
                    ])),
                    _ => None,
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            sqlx::query(&self.sql(if fresh { UPSERT_FRESH } else { UPSERT_ATTRS }))
                .bind(serde_json::Value::Array(rows).to_string())
                .bind(scan_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Paths a scan did not see, in pages (keyset on path).
    pub async fn unseen(&self, scan_id: i64, after: &str, limit: usize) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT path FROM entries WHERE seen_scan < $1 AND state NOT IN ('missing', 'deleted') \
             AND purged_at IS NULL AND path > $2 ORDER BY path LIMIT $3",
        )
        .bind(scan_id)
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn mark_missing(&self, paths: &[String]) -> Result<u64> {
        if paths.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(&self.sql(
            "UPDATE entries SET state = 'missing', reason = 'source file vanished', lease_owner = NULL, \
             version = version + 1, updated_at = $1 WHERE state NOT IN ('missing', 'deleted', 'copying') \
             AND path IN (SELECT value FROM JSON_TEXTS($2))",
        ))
        .bind(now_ms())
        .bind(json_list(paths))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// A new sweep gives failed and conflicting files a fresh set of attempts.
    pub async fn requeue_for_new_sweep(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE entries SET state = 'pending', attempts = 0, next_retry_at = NULL, \
             version = version + 1, updated_at = $1 WHERE state IN ('failed', 'conflict')",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Files a worker could take now, in path order after `after`.
    pub async fn candidates(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        let now = now_ms();
        let mut paths = Vec::new();
        for sql in CANDIDATES {
            let rows = sqlx::query(sql)
                .bind(now)
                .bind(after)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            paths.extend(rows.iter().map(|r| r.get::<String, _>(0)));
        }
        paths.sort_unstable();
        paths.truncate(limit);
        Ok(paths)
    }

    /// Takes leases on those of `paths` that are still claimable; returns what was taken.
    pub async fn claim(
        &self,
        paths: &[String],
        owner: &str,
        lease: Duration,
        batch_id: i64,
    ) -> Result<Vec<Claimed>> {
        let now = now_ms();
        // The listed paths drive the statement (primary-key lookups), whatever the table's size.
        // On PostgreSQL, rows another node is claiming right now are skipped instead of waited
        // for (a writer holds SQLite whole, so there is nothing to skip there).
        let chosen = match self.engine {
            Engine::Sqlite => "SELECT value AS path FROM JSON_TEXTS($5)".to_string(),
            Engine::Postgres => format!(
                "SELECT entries.path FROM entries WHERE entries.path IN (SELECT value FROM JSON_TEXTS($5)) \
                 AND {CLAIMABLE} FOR UPDATE SKIP LOCKED"
            ),
        };
        let sql = format!(
            "WITH c AS MATERIALIZED ({chosen}) \
             UPDATE entries SET state = 'copying', lease_owner = $2, lease_expires_at = $3, batch_id = $4, \
             attempts = attempts + 1, copy_started_at = $1, priority = 0, version = version + 1, updated_at = $1 \
             FROM c WHERE entries.path = c.path AND {CLAIMABLE} \
             RETURNING entries.path, size, mtime_ns, attempts, dest_owned, dest_sha256, intent_sha256"
        );
        let rows = sqlx::query(&self.sql(&sql))
            .bind(now)
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
            .bind(batch_id)
            .bind(json_list(paths))
            .fetch_all(&self.pool)
            .await?;
        let mut claimed: Vec<Claimed> = rows
            .iter()
            .map(|row| {
                let owned: i64 = row.get(4);
                let confirmed: Option<String> = row.get(5);
                let intent: Option<String> = row.get(6);
                Claimed {
                    path: row.get(0),
                    size: row.get::<i64, _>(1) as u64,
                    mtime_ns: row.get(2),
                    attempts: row.get::<i64, _>(3) as u32,
                    owned_sha256: confirmed
                        .filter(|_| owned == 1)
                        .into_iter()
                        .chain(intent)
                        .collect(),
                }
            })
            .collect();
        claimed.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(claimed)
    }

    /// Extends this owner's leases of `paths` (the files its run is working on); a live
    /// worker is never overtaken. Only those: a claim whose reply was lost (the connection died
    /// as it committed) leaves a lease the run does not know of, which must run out so that
    /// the file is claimed again instead of being held for as long as the run lives.
    pub async fn renew_leases(
        &self,
        owner: &str,
        lease: Duration,
        paths: &[String],
    ) -> Result<u64> {
        if paths.is_empty() {
            return Ok(0);
        }
        let until = now_ms() + lease.as_millis() as i64;
        let done = sqlx::query(&self.sql(
            "UPDATE entries SET lease_expires_at = $1 WHERE lease_owner = $2 AND state = 'copying' \
             AND path IN (SELECT value FROM JSON_TEXTS($3))",
        ))
        .bind(until)
        .bind(owner)
        .bind(json_list(paths))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Gives back every lease this owner holds (a clean stop): the files are pending again.
    pub async fn release_leases(&self, owner: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE entries SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, \
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, version = version + 1, updated_at = $1 \
             WHERE lease_owner = $2 AND lease_owner IS NOT NULL AND state = 'copying'",
        )
        .bind(now_ms())
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Gives back this owner's leases on `paths` (claimed, then left out before any copy
    /// started): pending again, the attempt not counted.
    pub async fn release(&self, paths: &[String], owner: &str) -> Result<u64> {
        let done = sqlx::query(&self.sql(
            "UPDATE entries SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, \
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, version = version + 1, updated_at = $1 \
             WHERE lease_owner = $2 AND state = 'copying' AND path IN (SELECT value FROM JSON_TEXTS($3))",
        ))
        .bind(now_ms())
        .bind(owner)
        .bind(json_list(paths))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records the outcomes of several copies in one transaction. Each update only applies while
    /// its lease is still held; the result says, per update, whether it did.
    pub async fn apply(&self, updates: &[FileUpdate]) -> Result<Vec<bool>> {
        retry_conflicts(|| self.apply_once(updates)).await
    }

    async fn apply_once(&self, updates: &[FileUpdate]) -> Result<Vec<bool>> {
        let now = now_ms();
        let mut applied = vec![false; updates.len()];
        let mut tx = self.pool.begin().await?;
        let verified: Vec<(usize, serde_json::Value)> = updates
            .iter()
            .enumerate()
            .filter_map(|(i, update)| verified_json(update).map(|json| (i, json)))
            .collect();
        if !verified.is_empty() {
            let rows =
                serde_json::Value::Array(verified.iter().map(|(_, json)| json.clone()).collect());
            let done: std::collections::HashSet<String> = sqlx::query(&self.sql(VERIFY_MANY))
                .bind(rows.to_string())
                .bind(now)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            for (i, _) in &verified {
                if let FileUpdate::Verified { path, .. } = &updates[*i] {
                    applied[*i] = done.contains(path);
                }
            }
        }
        for (i, update) in updates.iter().enumerate() {
            if let Some(query) = single_update_query(update, now) {
                applied[i] = query.execute(&mut *tx).await?.rows_affected() == 1;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Work in the way of finishing: failed files with a retry due at a time, and files leased
    /// until a time. Each with that time. Asked by a run with nothing in flight, so a lease of
    /// its own here is one it does not know of (a claim whose reply was lost): it runs out and
    /// the file is claimed again, like another node's.
    pub async fn waiting(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT path, next_retry_at FROM entries WHERE state = 'failed' AND next_retry_at IS NOT NULL \
             UNION ALL SELECT path, lease_expires_at FROM entries WHERE state = 'copying' \
             UNION ALL SELECT path, $1 FROM entries WHERE state = 'pending' AND kind = 'file' \
             AND rolled_back_at IS NULL AND (lease_expires_at IS NULL OR lease_expires_at < $1)",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<Option<i64>, _>(1).unwrap_or(0)))
            .collect())
    }

    pub async fn open_batch(&self, node: &str, command: &str) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO batches (node, command, status, started_at) VALUES ($1, $2, 'running', $3) RETURNING id",
        )
        .bind(node)
        .bind(command)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get(0))
    }

    pub async fn close_batch(&self, id: i64, tally: &BatchTally, status: &str) -> Result<()> {
        sqlx::query(
            "UPDATE batches SET status = $2, finished_at = $3, files = $4, copied = $5, already = $6, \
             missing = $7, conflicts = $8, failed = $9, bytes = $10 WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(now_ms())
        .bind(tally.files as i64)
        .bind(tally.copied as i64)
        .bind(tally.already as i64)
        .bind(tally.missing as i64)
        .bind(tally.conflicts as i64)
        .bind(tally.failed as i64)
        .bind(tally.bytes as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Batches left 'running' by a sweep that died are marked interrupted.
    pub async fn close_abandoned_batches(&self, live_node: &str) -> Result<()> {
        sqlx::query("UPDATE batches SET status = 'interrupted' WHERE status = 'running' AND node <> $1 AND NOT EXISTS (SELECT 1 FROM entries WHERE entries.batch_id = batches.id AND entries.state = 'copying' AND entries.lease_expires_at >= $2)")
            .bind(live_node)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn batches(&self) -> Result<Vec<BatchRow>> {
        let rows = sqlx::query(&format!("{BATCH_COLUMNS} ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(batch_from_row).collect())
    }

    /// Batches still marked running: the sweeps and sweepers at work now, or a run that died
    /// and was not cleaned up yet (the next sweep marks those interrupted).
    pub async fn running_batches(&self) -> Result<Vec<BatchRow>> {
        let rows = sqlx::query(&format!(
            "{BATCH_COLUMNS} WHERE status = 'running' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(batch_from_row).collect())
    }

    pub async fn batch(&self, id: i64) -> Result<Option<BatchRow>> {
        let row = sqlx::query(&format!("{BATCH_COLUMNS} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(batch_from_row))
    }

    /// The files last handled in a batch, with their current state.
    pub async fn batch_files(&self, id: i64) -> Result<Vec<Problem>> {
        let rows = sqlx::query(
            "SELECT path, state, attempts, COALESCE(last_error, reason) FROM entries \
             WHERE batch_id = $1 AND batch_id IS NOT NULL ORDER BY path",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(problem_from_row).collect()
    }

    /// Every file-like row (and directories cutoverfs could not enter), for reports that group
    /// in Rust.
    pub async fn files(&self) -> Result<Vec<FileSummary>> {
        let rows = sqlx::query("SELECT path, state, size, purged_at FROM entries WHERE kind <> 'dir' OR state = 'unsupported' ORDER BY path")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(FileSummary {
                    path: row.get(0),
                    state: parse_state(row.get(1))?,
                    size: row.get::<i64, _>(2) as u64,
                    purged: row.get::<Option<i64>, _>(3).is_some(),
                })
            })
            .collect()
    }

    /// Files (and directories cutoverfs could not enter) and their bytes per state, counted
    /// by the database: every state, zero included.
    pub async fn count_by_state(&self) -> Result<Vec<(State, u64, u64)>> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM entries \
             WHERE kind <> 'dir' OR state = 'unsupported' GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut counts: Vec<(State, u64, u64)> =
            State::ALL.iter().map(|state| (*state, 0, 0)).collect();
        for row in &rows {
            let state = parse_state(row.get(0))?;
            if let Some(slot) = counts.iter_mut().find(|(s, _, _)| *s == state) {
                slot.1 = row.get::<i64, _>(1) as u64;
                slot.2 = row.get::<i64, _>(2) as u64;
            }
        }
        Ok(counts)
    }

    /// Every recorded directory, for creating the namespace at the dest.
    pub async fn directories(&self) -> Result<Vec<(String, u32)>> {
        let rows = sqlx::query("SELECT path, mode FROM entries WHERE kind = 'dir' AND state = 'verified' ORDER BY path")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<i64, _>(1) as u32))
            .collect())
    }

    pub async fn count_dirs(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM entries WHERE kind = 'dir'")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        Ok(n as u64)
    }

    /// Files that need an operator's eye: failed, conflicting, missing, unsupported.
    pub async fn problems(&self, limit: usize) -> Result<Vec<Problem>> {
        let rows = sqlx::query(
            "SELECT path, state, attempts, COALESCE(last_error, reason) FROM entries \
             WHERE state IN ('failed', 'conflict', 'missing', 'unsupported') ORDER BY state, path LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(problem_from_row).collect()
    }

    /// Like `problems`, the most recently changed first: what went wrong last, for a live view.
    pub async fn recent_problems(&self, limit: usize) -> Result<Vec<Problem>> {
        let rows = sqlx::query(
            "SELECT path, state, attempts, COALESCE(last_error, reason) FROM entries \
             WHERE state IN ('failed', 'conflict', 'missing', 'unsupported') \
             ORDER BY updated_at DESC, path LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(problem_from_row).collect()
    }

    /// Bytes and seconds of finished batches, for estimates.
    pub async fn observed_throughput(&self) -> Result<Option<(u64, u64, f64)>> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(files), 0) AS BIGINT), CAST(COALESCE(SUM(bytes), 0) AS BIGINT), \
             CAST(COALESCE(SUM(finished_at - started_at), 0) AS BIGINT) FROM batches WHERE finished_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let (files, bytes, ms): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        Ok((ms > 0 && files > 0).then(|| (files as u64, bytes as u64, ms as f64 / 1000.0)))
    }
}

/// An flock around schema work (`LOCK_EX`) and schema checks (`LOCK_SH`): SQLite has no
/// migration lock of its own. It is taken on the manifest's directory, never on the database
/// file: closing any descriptor of that file would drop the fcntl locks SQLite holds on it.
/// The lock lasts as long as the returned directory handle is open.
async fn schema_lock(path: &Path, kind: libc::c_int, location: &str) -> Result<std::fs::File> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let locked = match std::fs::File::open(dir) {
        Ok(file) => tokio::task::spawn_blocking(move || {
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), kind) };
            if rc == 0 {
                Ok(file)
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(e) => Err(e),
    };
    locked.map_err(|source| ManifestError::Open {
        location: location.to_string(),
        source,
    })
}

/// Runs a transaction again when PostgreSQL aborted it for a deadlock or a serialization
/// failure: two nodes scanning the same tree lock the same rows in different orders, and the
/// database resolves that by aborting one of them, which then simply goes again.
async fn retry_conflicts<T, F, Fut>(mut run: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0u64;
    loop {
        match run().await {
            Err(ManifestError::Sql(e)) if tries < 8 && is_conflict(&e) => {
                tries += 1;
                tracing::debug!(error = %e, tries, "transaction aborted by a concurrent one; retrying");
                let jitter = u64::from(rand::random::<u8>());
                tokio::time::sleep(Duration::from_millis(10 * tries + jitter % 50)).await;
            }
            other => return other,
        }
    }
}

fn is_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

fn mounted_source_key() -> String {
    format!("mounted_source:{}", crate::util::hostname())
}

fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        bytes[..8].copy_from_slice(&now_ms().to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    hex::encode(bytes)
}

fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    Ok(())
}

/// A list of strings as one JSON parameter: bulk statements expand it with `json_each`, so a
/// thousand rows cost one bind instead of thousands. (PostgreSQL spells it
/// `jsonb_array_elements_text`; the bulk statements are the only engine-specific SQL.)
fn json_list<S: AsRef<str>>(items: &[S]) -> String {
    serde_json::Value::Array(
        items
            .iter()
            .map(|s| serde_json::Value::from(s.as_ref()))
            .collect(),
    )
    .to_string()
}

const SCAN_INSERT: &str = "INSERT INTO entries (path, kind, state, reason, size, mtime_ns, mode, uid, gid, \
     link_target, seen_scan, version, created_at, updated_at, queued_at, ino) \
     SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, CAST(r.value ->> 4 AS BIGINT), CAST(r.value ->> 5 AS BIGINT), \
     CAST(r.value ->> 6 AS BIGINT), CAST(r.value ->> 7 AS BIGINT), CAST(r.value ->> 8 AS BIGINT), r.value ->> 9, $2, \
     CAST(r.value ->> 10 AS BIGINT), $3, $3, $3, CAST(r.value ->> 11 AS BIGINT) FROM JSON_ROWS($1) AS r WHERE true \
     ON CONFLICT (path) DO UPDATE SET kind = excluded.kind, state = excluded.state, reason = excluded.reason, \
     ino = COALESCE(entries.ino, excluded.ino), \
     size = excluded.size, mtime_ns = excluded.mtime_ns, mode = excluded.mode, uid = excluded.uid, \
     gid = excluded.gid, link_target = excluded.link_target, seen_scan = excluded.seen_scan, \
     updated_at = excluded.updated_at, version = entries.version + 1";

/// A scanned change that needs a fresh copy: what the last copy recorded is cleared.
const UPSERT_FRESH: &str = const_format::concatcp!(
    SCAN_INSERT,
    ", sha256 = NULL, mime = NULL, attempts = 0, last_error = NULL, next_retry_at = NULL, lease_owner = NULL, \
     lease_expires_at = NULL, copy_started_at = NULL, copied_at = NULL, verified_at = NULL, batch_id = NULL, \
     queued_at = excluded.queued_at WHERE entries.version = excluded.version \
     AND (entries.state <> 'pending' OR entries.lease_expires_at IS NULL OR entries.lease_expires_at < $3)"
);

/// A scanned change of attributes only (mode, owner): the state and copy record stay.
const UPSERT_ATTRS: &str =
    const_format::concatcp!(SCAN_INSERT, " WHERE entries.version = excluded.version");

/// Marks many copies verified at once, each guarded by its lease.
const VERIFY_MANY: &str = "WITH v AS MATERIALIZED (SELECT value ->> 0 AS path, value ->> 1 AS sha256, \
     CAST(value ->> 2 AS BIGINT) AS size, CAST(value ->> 3 AS BIGINT) AS mtime_ns, value ->> 4 AS mime, \
     value ->> 5 AS dest_key, value ->> 6 AS dest_etag, CAST(value ->> 7 AS BIGINT) AS ours, \
     value ->> 8 AS owner FROM JSON_ROWS($1)) \
     UPDATE entries SET state = 'verified', reason = NULL, last_error = NULL, next_retry_at = NULL, \
     sha256 = v.sha256, size = v.size, mtime_ns = v.mtime_ns, mime = v.mime, dest_key = v.dest_key, \
     dest_etag = v.dest_etag, \
     dest_owned = CASE WHEN v.ours = 1 THEN 1 WHEN entries.dest_sha256 = v.sha256 THEN entries.dest_owned ELSE 0 END, \
     dest_sha256 = CASE WHEN v.ours = 1 OR entries.dest_sha256 = v.sha256 THEN v.sha256 ELSE NULL END, \
     intent_sha256 = NULL, lease_owner = NULL, lease_expires_at = NULL, copied_at = $2, verified_at = $2, \
     version = entries.version + 1, updated_at = $2 \
     FROM v WHERE entries.path = v.path AND entries.lease_owner = v.owner AND entries.state = 'copying' \
     RETURNING entries.path";

fn verified_json(update: &FileUpdate) -> Option<serde_json::Value> {
    match update {
        FileUpdate::Verified {
            path,
            owner,
            sha256,
            size,
            mtime_ns,
            mime,
            dest_key,
            dest_etag,
            written_by_us,
        } => Some(serde_json::json!([
            path,
            sha256,
            size,
            mtime_ns,
            mime,
            dest_key,
            dest_etag,
            *written_by_us as i64,
            owner
        ])),
        _ => None,
    }
}

/// The guard on every copy outcome: it applies only while the worker's lease is still held.
macro_rules! leased {
    () => {
        "WHERE path = $1 AND lease_owner = $2 AND state = 'copying'"
    };
}

/// The statement for an update applied row by row; None for `Verified`, applied in bulk.
fn single_update_query(
    update: &FileUpdate,
    now: i64,
) -> Option<sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>>> {
    Some(match update {
        FileUpdate::Intent { path, owner, sha256 } => {
            sqlx::query(concat!("UPDATE entries SET intent_sha256 = $3 ", leased!()))
                .bind(path.as_str())
                .bind(owner.as_str())
                .bind(sha256.as_str())
        }
        FileUpdate::Verified { .. } => return None,
        FileUpdate::Failed { path, owner, error, retry_at, counts } => sqlx::query(concat!(
            "UPDATE entries SET state = 'failed', last_error = $3, next_retry_at = $4, lease_owner = NULL, \
             lease_expires_at = NULL, version = version + 1, updated_at = $5, \
             attempts = CASE WHEN $6 = 0 AND attempts > 0 THEN attempts - 1 ELSE attempts END ",
            leased!()
        ))
        .bind(path.as_str())
        .bind(owner.as_str())
        .bind(error.as_str())
        .bind(*retry_at)
        .bind(now)
        .bind(i64::from(*counts)),
        FileUpdate::Missing { path, owner } => side_state(path, owner, "missing", "source file vanished", now),
        FileUpdate::Conflict { path, owner, reason } => side_state(path, owner, "conflict", reason, now),
        FileUpdate::Unsupported { path, owner, reason } => side_state(path, owner, "unsupported", reason, now),
        FileUpdate::Orphaned { path, dest_key, sha256 } => sqlx::query(
            "UPDATE entries SET intent_sha256 = COALESCE(intent_sha256, $3), dest_key = COALESCE(dest_key, $2), \
             dest_owned = CASE WHEN state = 'deleted' THEN 1 ELSE dest_owned END WHERE path = $1",
        )
        .bind(path.as_str())
        .bind(dest_key.as_str())
        .bind(sha256.as_str()),
    })
}

fn side_state<'q>(
    path: &'q str,
    owner: &'q str,
    state: &'static str,
    reason: &'q str,
    now: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    sqlx::query(concat!(
        "UPDATE entries SET state = $3, reason = $4, last_error = NULL, next_retry_at = NULL, lease_owner = NULL, \
         lease_expires_at = NULL, intent_sha256 = NULL, version = version + 1, updated_at = $5 ",
        leased!()
    ))
    .bind(path)
    .bind(owner)
    .bind(state)
    .bind(reason)
    .bind(now)
}

const BATCH_COLUMNS: &str =
    "SELECT id, node, command, status, started_at, finished_at, files, copied, already, \
     missing, conflicts, failed, bytes FROM batches";

fn batch_from_row(row: &AnyRow) -> BatchRow {
    let n = |i: usize| row.get::<i64, _>(i) as u64;
    BatchRow {
        id: row.get(0),
        node: row.get(1),
        command: row.get(2),
        status: row.get(3),
        started_at: row.get(4),
        finished_at: row.get(5),
        tally: BatchTally {
            files: n(6),
            copied: n(7),
            already: n(8),
            missing: n(9),
            conflicts: n(10),
            failed: n(11),
            bytes: n(12),
        },
    }
}

fn parse_kind(s: String) -> Result<Kind> {
    s.parse().map_err(ManifestError::Corrupt)
}

fn parse_state(s: String) -> Result<State> {
    s.parse().map_err(ManifestError::Corrupt)
}

fn problem_from_row(row: &AnyRow) -> Result<Problem> {
    Ok(Problem {
        path: row.get(0),
        state: parse_state(row.get(1))?,
        attempts: row.get(2),
        reason: row.get(3),
    })
}

fn recorded_from_row(row: &AnyRow) -> Result<Recorded> {
    Ok(Recorded {
        kind: parse_kind(row.get(1))?,
        state: parse_state(row.get(2))?,
        reason: row.get(3),
        size: row.get::<i64, _>(4) as u64,
        mtime_ns: row.get(5),
        mode: row.get::<i64, _>(6) as u32,
        uid: row.get::<i64, _>(7) as u32,
        gid: row.get::<i64, _>(8) as u32,
        version: row.get(9),
        dest_owned: row.get::<i64, _>(10) == 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_parse_and_never_show_their_password() {
        for url in [
            "postgres://app:s3cret@db.example:5432/cutover",
            "postgresql://app:s3cret@db.example/cutover?sslmode=require",
        ] {
            let parsed: ManifestUrl = url.parse().unwrap();
            assert_eq!(parsed, ManifestUrl::Postgres(url.to_string()));
            assert_eq!(parsed.engine(), Engine::Postgres);
            let shown = format!("{parsed} {parsed:?}");
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("app:REDACTED@db.example"), "{shown}");
        }
        for bad in [
            "postgres://app:s3cret@db.example:5432/",
            "postgres://app:s3cret@:5432/db",
            "postgres://app:s3cret@db.example:notaport/db",
        ] {
            let err = bad.parse::<ManifestUrl>().unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.starts_with("bad manifest URL"), "{err}");
        }
    }

    #[test]
    fn json_list_markers_are_spelled_per_engine() {
        let sql =
            "SELECT value FROM JSON_TEXTS($2) UNION SELECT value ->> 0 FROM JSON_ROWS($1) AS r";
        assert_eq!(
            Engine::Sqlite.sql(sql),
            "SELECT value FROM json_each($2) UNION SELECT value ->> 0 FROM json_each($1) AS r"
        );
        assert_eq!(
            Engine::Postgres.sql(sql),
            "SELECT value FROM json_array_elements_text(CAST($2 AS json)) UNION \
             SELECT value ->> 0 FROM json_array_elements(CAST($1 AS json)) AS r"
        );
    }
}
