-- Purge (DESIGN §4.1, §4.7): the name a purge set the local copy aside under while it confirms
-- the dest copy, recorded with purged_at before the rename and cleared once the copy is gone.
-- A row that still has one after a crash is finished or undone by the next purge or mount.
ALTER TABLE entries ADD COLUMN purge_aside TEXT;
CREATE INDEX entries_purge_aside ON entries (path) WHERE purge_aside IS NOT NULL;
-- A file removed or renamed while a copy of it was in flight: that copy may still land at the
-- dest after the removal was handled (an S3 server finishing a request whose sender died). Its
-- leftover is kept, and the object looked for again, until this time.
ALTER TABLE entries ADD COLUMN leftover_until BIGINT;
