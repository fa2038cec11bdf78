-- The store as Ferry wrote it before versioned migrations. IF NOT EXISTS lets this first
-- migration adopt a store made by that release: its tables are kept with their rows.
CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL, used BIGINT NOT NULL DEFAULT 0, revoked BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, name TEXT NOT NULL,
    secret_hash TEXT NOT NULL, enrolled_ms BIGINT NOT NULL, revoked BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS run (id BIGINT PRIMARY KEY, run_id TEXT NOT NULL,
    config_hash TEXT NOT NULL, round BIGINT NOT NULL, model_sha TEXT NOT NULL,
    state_sha TEXT NOT NULL, finished TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (round BIGINT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cohort (round BIGINT NOT NULL, node_id TEXT NOT NULL,
    PRIMARY KEY (round, node_id));
CREATE TABLE IF NOT EXISTS accepted (round BIGINT NOT NULL, node_id TEXT NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (round, node_id));
CREATE TABLE IF NOT EXISTS population (round BIGINT PRIMARY KEY, nodes BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS failed_rounds (round BIGINT NOT NULL, attempt BIGINT NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (round, attempt));
CREATE TABLE IF NOT EXISTS round_blobs (round BIGINT PRIMARY KEY, shas TEXT NOT NULL);
