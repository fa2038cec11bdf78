-- Relays: a token, and the identity enrolled with it, is a node's or a relay's; a node records
-- the relay it joined through (NULL: it dials the server itself), which is the subtree a relay
-- may speak for.
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS relay TEXT;
CREATE INDEX IF NOT EXISTS nodes_by_relay ON nodes (relay);
