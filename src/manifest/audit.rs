//! The audit trail (issue 6): every state change of a path, with when, which node and command,
//! from, to and why.
//!
//! Owns: the `audit` table's rows and the triggers that write them. Statements that change a
//! state know nothing of it: a trigger on `entries` writes the row in the same transaction as the
//! change, so the trail can neither miss a change nor record one that was rolled back. Only the
//! connection knows which process and command it acts for, so on SQLite each connection creates
//! its own TEMP trigger with the actor written into it (a trigger in the main schema cannot see
//! per-connection state).

use std::sync::OnceLock;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Executor, Row};

use super::{Manifest, Result};

/// Who changes states through this process's connections.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The process: `host:pid:start_ms`, the id its leases carry.
    pub node: String,
    /// The subcommand: sweep, mount, purge, ...
    pub command: String,
}

static ACTOR: OnceLock<Actor> = OnceLock::new();

/// Names the process for the audit trail; set once, before the manifest is opened. A process
/// that never sets it (a library user, a test) is recorded as command `library`.
pub fn set_actor(node: &str, command: &str) {
    let _ = ACTOR.set(Actor {
        node: node.to_string(),
        command: command.to_string(),
    });
}

fn actor() -> Actor {
    ACTOR.get().cloned().unwrap_or_else(|| Actor {
        node: format!("unknown:{}", std::process::id()),
        command: "library".into(),
    })
}

/// One recorded change.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRow {
    pub id: i64,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub path: String,
    pub node: String,
    pub command: String,
    /// None when the path was first recorded.
    pub from: Option<String>,
    pub to: String,
    /// Who held the lease, for changes into or out of `copying`.
    pub lease: Option<String>,
    pub why: Option<String>,
}

/// Why a change happened, told by the row before and after it. Failures and side states carry
/// their own reason; the rest is told by the transition.
const WHY: &str = "CASE \
     WHEN OLD.rolled_back_at IS NULL AND NEW.rolled_back_at IS NOT NULL THEN NEW.reason \
     WHEN OLD.rolled_back_at IS NOT NULL AND NEW.rolled_back_at IS NULL THEN 'released from rollback by a new sweep' \
     WHEN OLD.state = NEW.state AND NEW.purged_at IS NOT NULL THEN 'local copy purged' \
     WHEN OLD.state = NEW.state AND OLD.purged_at IS NOT NULL THEN 'local copy kept or back' \
     WHEN NEW.state = 'failed' THEN NEW.last_error \
     WHEN NEW.state IN ('missing', 'conflict', 'unsupported', 'deleted') THEN NEW.reason \
     WHEN NEW.state = 'copying' AND OLD.state = 'copying' THEN 'lease of ' || OLD.lease_owner || ' expired at ' \
       || strftime('%Y-%m-%dT%H:%M:%fZ', OLD.lease_expires_at / 1000.0, 'unixepoch') \
     WHEN NEW.state = 'copying' THEN 'attempt ' || NEW.attempts \
     WHEN NEW.state = 'verified' AND OLD.state = 'copying' THEN 'copied, sha256 ' || NEW.sha256 \
     WHEN NEW.state = 'pending' AND NEW.lease_owner IS NOT NULL THEN 'opened for writing' \
     WHEN NEW.state = 'pending' AND (NEW.size <> OLD.size OR NEW.mtime_ns <> OLD.mtime_ns) THEN 'local file changed' \
     WHEN NEW.state = 'pending' AND OLD.state = 'copying' THEN 'lease given back' \
     WHEN NEW.state = 'pending' AND OLD.state IN ('failed', 'conflict') THEN 'retried by a new run' \
     WHEN OLD.state = 'deleted' THEN 'recreated' \
     ELSE NULL END";

/// The lease holder when a change enters or leaves `copying`.
const LEASE: &str = "CASE WHEN NEW.state = 'copying' THEN NEW.lease_owner \
     WHEN OLD.state = 'copying' THEN OLD.lease_owner ELSE NULL END";

/// Milliseconds since the epoch, in SQLite.
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// A string as an SQL literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The statements that make this connection record changes as `actor`.
fn sqlite_triggers(actor: &Actor) -> [String; 2] {
    let (node, command) = (literal(&actor.node), literal(&actor.command));
    let columns = "audit (at, path, node, command, from_state, to_state, lease, why)";
    [
        format!(
            "CREATE TEMP TRIGGER IF NOT EXISTS audit_insert AFTER INSERT ON main.entries BEGIN \
             INSERT INTO {columns} VALUES ({NOW_MS}, NEW.path, {node}, {command}, NULL, NEW.state, \
             CASE WHEN NEW.state = 'copying' THEN NEW.lease_owner END, NEW.reason); END"
        ),
        format!(
            "CREATE TEMP TRIGGER IF NOT EXISTS audit_update AFTER UPDATE OF state, lease_owner, purged_at, \
             rolled_back_at ON main.entries WHEN OLD.state IS NOT NEW.state \
             OR (NEW.state = 'copying' AND OLD.lease_owner IS NOT NEW.lease_owner) \
             OR ((OLD.purged_at IS NULL) <> (NEW.purged_at IS NULL)) \
             OR ((OLD.rolled_back_at IS NULL) <> (NEW.rolled_back_at IS NULL)) BEGIN \
             INSERT INTO {columns} VALUES ({NOW_MS}, NEW.path, {node}, {command}, OLD.state, NEW.state, \
             {LEASE}, {WHY}); END"
        ),
    ]
}

/// Makes a new SQLite connection record changes. A manifest whose schema is older than the
/// trigger (no audit table, or no `rolled_back_at` yet: being created, or older) gets none:
/// `open` reconnects once it has migrated.
pub(super) async fn install_sqlite(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    let ready = sqlx::query(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit' \
         AND EXISTS (SELECT 1 FROM pragma_table_info('entries') WHERE name = 'rolled_back_at')",
    )
    .fetch_optional(&mut *conn)
    .await?
    .is_some();
    if ready {
        for sql in sqlite_triggers(&actor()) {
            conn.execute(sql.as_str()).await?;
        }
    }
    Ok(())
}

/// Makes a new PostgreSQL connection record changes: the trigger of migration 0004 reads the
/// actor from these session settings.
pub(super) async fn install_postgres(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    let actor = actor();
    sqlx::query("SELECT set_config('cutoverfs.node', $1, false), set_config('cutoverfs.command', $2, false)")
        .bind(actor.node)
        .bind(actor.command)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Which changes `Manifest::audit` returns.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this exact path.
    pub path: Option<String>,
    /// Only changes at or after this time (ms since the epoch).
    pub since: Option<i64>,
}

impl Manifest {
    /// Recorded changes oldest first, `limit` at a time after id `after` (0 to start).
    pub async fn audit(
        &self,
        query: &AuditQuery,
        after: i64,
        limit: usize,
    ) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT id, at, path, node, command, from_state, to_state, lease, why FROM audit \
             WHERE id > $1 AND at >= $2 AND ($3 = '' OR path = $4) ORDER BY id LIMIT $5",
        )
        .bind(after)
        .bind(query.since.unwrap_or(i64::MIN))
        .bind(if query.path.is_some() { "x" } else { "" })
        .bind(query.path.clone().unwrap_or_default())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_from_row).collect())
    }

    /// Deletes changes recorded before `before` (ms since the epoch), or only counts them.
    pub async fn prune_audit(&self, before: i64, delete: bool) -> Result<u64> {
        if delete {
            let done = sqlx::query("DELETE FROM audit WHERE at < $1")
                .bind(before)
                .execute(&self.pool)
                .await?;
            return Ok(done.rows_affected());
        }
        let row = sqlx::query("SELECT COUNT(*) FROM audit WHERE at < $1")
            .bind(before)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }
}

fn audit_from_row(row: &AnyRow) -> AuditRow {
    AuditRow {
        id: row.get(0),
        at: row.get(1),
        path: row.get(2),
        node: row.get(3),
        command: row.get(4),
        from: row.get(5),
        to: row.get(6),
        lease: row.get(7),
        why: row.get(8),
    }
}
