-- The audit trail (issue 6, DESIGN §7-§8): one row per state change of a path, written in the
-- same transaction as the change by a trigger each connection creates (src/manifest/audit.rs),
-- because only that connection knows which node and command it acts for.
CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT NOT NULL,   -- ms since the epoch
    path        TEXT NOT NULL,
    node        TEXT NOT NULL,     -- the process that made the change (host:pid:start_ms)
    command     TEXT NOT NULL,     -- sweep, mount, purge, ...
    from_state  TEXT,              -- NULL: the path was first recorded
    to_state    TEXT NOT NULL,
    lease       TEXT,              -- the lease holder, when the change enters or leaves 'copying'
    why         TEXT
);
CREATE INDEX audit_by_path ON audit (path, id);
CREATE INDEX audit_by_at ON audit (at);
