-- Inode numbers (issue 15): the number the mount gives a path, kept here so that st_ino stays
-- the same across the kernel forgetting the inode, unmounts and daemon restarts, and so the
-- daemon needs no memory per path to answer for it. Unique among the rows that hold one; a row
-- marked deleted gives its number up (a new file at that name gets a new one), a rename moves
-- it to the new path. New numbers come from the counter `next_ino` in `meta`, taken in blocks
-- (src/manifest/inodes.rs); 1 is the root's.
ALTER TABLE entries ADD COLUMN ino BIGINT;
UPDATE entries SET ino = rowid + 1 WHERE state <> 'deleted' AND path <> '';
CREATE UNIQUE INDEX entries_by_ino ON entries (ino) WHERE ino IS NOT NULL;
INSERT INTO meta (key, value)
    SELECT 'next_ino', CAST(COALESCE(MAX(ino), 1) + 1 AS TEXT) FROM entries WHERE true
    ON CONFLICT (key) DO NOTHING;
-- Files asked for by level: replicas' requests (priority 2) are found without reading every
-- file the application opened before it was copied (priority 1), of which there can be many.
CREATE INDEX entries_by_priority_level ON entries (priority, queued_at) WHERE priority > 0;
