-- Rollback (issue 6, DESIGN §1.8, §7): when `cutoverfs rollback` took the file back to its
-- local copy. Such a file is `pending` but no sweep of the daemon takes it until an operator
-- runs `cutoverfs sweep` again (which clears this). While the row still names an object of
-- ours (dest_owned = 1 or intent_sha256), the rollback is unfinished: the object is deleted
-- next, and a re-run after a crash finishes it.
ALTER TABLE entries ADD COLUMN rolled_back_at BIGINT;
CREATE INDEX entries_rolled_back ON entries (path) WHERE rolled_back_at IS NOT NULL;
