-- The audit trail (issue 6, DESIGN §7-§8): the PostgreSQL twin of sqlite/0004. One trigger for
-- every connection; it reads which node and command the connection acts for from the settings
-- `cutoverfs.node` and `cutoverfs.command` that each connection sets (src/manifest/audit.rs).
CREATE TABLE audit (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    path        TEXT COLLATE "C" NOT NULL,
    node        TEXT NOT NULL,
    command     TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    lease       TEXT,
    why         TEXT
);
CREATE INDEX audit_by_path ON audit (path, id);
CREATE INDEX audit_by_at ON audit (at);

CREATE FUNCTION cutoverfs_audit() RETURNS trigger LANGUAGE plpgsql AS $$
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
            WHEN OLD.state = NEW.state AND NEW.purged_at IS NOT NULL THEN 'local copy purged'
            WHEN OLD.state = NEW.state AND OLD.purged_at IS NOT NULL THEN 'local copy kept or back'
            WHEN NEW.state = 'failed' THEN NEW.last_error
            WHEN NEW.state IN ('missing', 'conflict', 'unsupported', 'deleted') THEN NEW.reason
            WHEN NEW.state = 'copying' AND OLD.state = 'copying' THEN 'lease of ' || OLD.lease_owner || ' expired'
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

CREATE TRIGGER audit_insert AFTER INSERT ON entries FOR EACH ROW EXECUTE FUNCTION cutoverfs_audit();
CREATE TRIGGER audit_update AFTER UPDATE OF state, lease_owner, purged_at ON entries FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR (NEW.state = 'copying' AND OLD.lease_owner IS DISTINCT FROM NEW.lease_owner)
          OR ((OLD.purged_at IS NULL) <> (NEW.purged_at IS NULL)))
    EXECUTE FUNCTION cutoverfs_audit();
