-- The manifest: one row per path below the source root (DESIGN §3).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE entries (
    path              TEXT PRIMARY KEY,   -- relative, '/'-separated, valid UTF-8
    kind              TEXT NOT NULL,      -- file | dir | symlink | special
    state             TEXT NOT NULL,
    reason            TEXT,               -- why unsupported / conflict / missing
    size              BIGINT NOT NULL DEFAULT 0,
    mtime_ns          BIGINT NOT NULL DEFAULT 0,
    mode              BIGINT NOT NULL DEFAULT 0,
    uid               BIGINT NOT NULL DEFAULT 0,
    gid               BIGINT NOT NULL DEFAULT 0,
    link_target       TEXT,
    sha256            TEXT,               -- of the source content that was copied
    mime              TEXT,
    dest_key          TEXT,
    dest_etag         TEXT,
    dest_sha256       TEXT,               -- content of the dest object cutoverfs wrote
    intent_sha256     TEXT,               -- content about to be published (crash-safe ownership)
    dest_owned        BIGINT NOT NULL DEFAULT 0, -- 1: cutoverfs wrote the object at dest_key
    batch_id          BIGINT,
    attempts          BIGINT NOT NULL DEFAULT 0,
    last_error        TEXT,
    next_retry_at     BIGINT,
    lease_owner       TEXT,
    lease_expires_at  BIGINT,
    priority          BIGINT NOT NULL DEFAULT 0,
    seen_scan         BIGINT NOT NULL DEFAULT 0,
    version           BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL,
    queued_at         BIGINT,
    copy_started_at   BIGINT,
    copied_at         BIGINT,
    verified_at       BIGINT,
    updated_at        BIGINT NOT NULL
);

CREATE INDEX entries_by_state ON entries (state, path);
-- Partial: most rows have no batch or lease, and a scan of a million files should not pay
-- for indexing NULLs.
CREATE INDEX entries_by_batch ON entries (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX entries_by_lease ON entries (lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TABLE batches (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    node         TEXT NOT NULL,
    command      TEXT NOT NULL,
    status       TEXT NOT NULL,           -- running | completed | partial | interrupted
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    files        BIGINT NOT NULL DEFAULT 0,
    copied       BIGINT NOT NULL DEFAULT 0,
    already      BIGINT NOT NULL DEFAULT 0,
    missing      BIGINT NOT NULL DEFAULT 0,
    conflicts    BIGINT NOT NULL DEFAULT 0,
    failed       BIGINT NOT NULL DEFAULT 0,
    bytes        BIGINT NOT NULL DEFAULT 0
);
