-- Writes through the mount (DESIGN §6) and purge (§7).
-- Set when purge removed the local copy of a verified file: a scan that does not find the file
-- then knows it lives on at the dest, instead of calling it missing.
ALTER TABLE entries ADD COLUMN purged_at BIGINT;
