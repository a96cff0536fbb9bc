-- Rollback (issue 6, DESIGN §1.8, §7): the PostgreSQL twin of sqlite/0006. The function is
-- 0005's with two more reasons first. The audit trigger
-- also records when a rollback holds a file back and when a new sweep releases it
-- (the SQLite twin of this trigger lives in src/manifest/audit.rs).
ALTER TABLE entries ADD COLUMN rolled_back_at BIGINT;
CREATE INDEX entries_rolled_back ON entries (path) WHERE rolled_back_at IS NOT NULL;

CREATE OR REPLACE FUNCTION cutoverfs_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    node TEXT := COALESCE(NULLIF(current_setting('cutoverfs.node', true), ''), 'unknown');
    command TEXT := COALESCE(NULLIF(current_setting('cutoverfs.command', true), ''), 'library');
    at BIGINT := (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit (at, path, node, command, from_state, to_state, lease, why)
        VALUES (at, NEW.path, node, command, NULL, NEW.state,
                CASE WHEN NEW.state = 'copying' THEN NEW.lease_owner END, NEW.reason);
        RETURN NULL;
    END IF;
    INSERT INTO audit (at, path, node, command, from_state, to_state, lease, why)
    VALUES (at, NEW.path, node, command, OLD.state, NEW.state,
        CASE WHEN NEW.state = 'copying' THEN NEW.lease_owner
             WHEN OLD.state = 'copying' THEN OLD.lease_owner END,
        CASE
            WHEN OLD.rolled_back_at IS NULL AND NEW.rolled_back_at IS NOT NULL THEN NEW.reason
            WHEN OLD.rolled_back_at IS NOT NULL AND NEW.rolled_back_at IS NULL THEN 'released from rollback by a new sweep'
            WHEN OLD.state = NEW.state AND NEW.purged_at IS NOT NULL THEN 'local copy purged'
            WHEN OLD.state = NEW.state AND OLD.purged_at IS NOT NULL THEN 'local copy kept or back'
            WHEN NEW.state = 'failed' THEN NEW.last_error
            WHEN NEW.state IN ('missing', 'conflict', 'unsupported', 'deleted') THEN NEW.reason
            WHEN NEW.state = 'copying' AND OLD.state = 'copying' THEN 'lease of ' || OLD.lease_owner || ' expired at '
                || to_char(to_timestamp(OLD.lease_expires_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
            WHEN NEW.state = 'copying' THEN 'attempt ' || NEW.attempts
            WHEN NEW.state = 'verified' AND OLD.state = 'copying' THEN 'copied, sha256 ' || NEW.sha256
            WHEN NEW.state = 'pending' AND NEW.lease_owner IS NOT NULL THEN 'opened for writing'
            WHEN NEW.state = 'pending' AND (NEW.size <> OLD.size OR NEW.mtime_ns <> OLD.mtime_ns) THEN 'local file changed'
            WHEN NEW.state = 'pending' AND OLD.state = 'copying' THEN 'lease given back'
            WHEN NEW.state = 'pending' AND OLD.state IN ('failed', 'conflict') THEN 'retried by a new run'
            WHEN OLD.state = 'deleted' THEN 'recreated'
        END);
    RETURN NULL;
END
$$;

DROP TRIGGER audit_update ON entries;
CREATE TRIGGER audit_update AFTER UPDATE OF state, lease_owner, purged_at, rolled_back_at ON entries
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR (NEW.state = 'copying' AND OLD.lease_owner IS DISTINCT FROM NEW.lease_owner)
          OR ((OLD.purged_at IS NULL) <> (NEW.purged_at IS NULL))
          OR ((OLD.rolled_back_at IS NULL) <> (NEW.rolled_back_at IS NULL)))
    EXECUTE FUNCTION cutoverfs_audit();
