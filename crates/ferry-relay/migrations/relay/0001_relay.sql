-- A relay's own state, in its data folder: the nodes below it (their credentials' hashes,
-- so that it answers them without asking the server), and each update it accepted and has
-- not yet seen counted upstream (the update itself is a blob beside this file).
CREATE TABLE IF NOT EXISTS members (node_id TEXT PRIMARY KEY, name TEXT NOT NULL,
    secret_hash TEXT NOT NULL, revoked BIGINT NOT NULL DEFAULT 0);
-- state: 'held' (accepted here, not yet counted upstream), 'sent' (counted upstream).
CREATE TABLE IF NOT EXISTS held (round BIGINT NOT NULL, node_id TEXT NOT NULL,
    blob TEXT NOT NULL, examples BIGINT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (round, node_id));
