-- Relays: a token, and the identity enrolled with it, is a node's or a relay's; a node records
-- the relay it joined through (NULL: it dials the server itself), which is the subtree a relay
-- may speak for. (SQLite has no ADD COLUMN IF NOT EXISTS: a second server migrating the same
-- file at the same moment fails with "duplicate column name" and finds the version recorded
-- when it tries again.)
ALTER TABLE tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE nodes ADD COLUMN kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE nodes ADD COLUMN relay TEXT;
CREATE INDEX IF NOT EXISTS nodes_by_relay ON nodes (relay);
