-- A takeover of an expired lease records when that lease expired ("lease of X expired at
-- 2026-11-22T10:54:10.123Z"), so the trail itself shows that no file was taken from a node
-- whose lease was still running (tests/multi_node.rs checks it). Otherwise as 0004.
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
