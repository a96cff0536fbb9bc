-- Copy-on-read (DESIGN §1.3): files an application opened before they were copied go first.
CREATE INDEX entries_by_priority ON entries (queued_at) WHERE priority > 0;
