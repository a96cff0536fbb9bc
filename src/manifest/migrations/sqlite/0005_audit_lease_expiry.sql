-- The twin of postgres/0005: SQLite's audit triggers are created by each connection
-- (src/manifest/audit.rs), which now write the expiry of a lease taken over; nothing to change in
-- the schema. Kept so both engines have the same migration steps.
SELECT 1;
