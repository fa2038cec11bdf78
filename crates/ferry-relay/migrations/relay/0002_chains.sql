-- Chains of relays. A member may be a relay below this one, and a node may be below such a
-- relay (`via`: the relay below this one it joined through; NULL for a node of this relay's
-- own). An update held here may be a lower relay's partial aggregate, so the held updates are
-- keyed by their blob, and who each one counts for is kept apart, one row per node: a node is
-- counted at most once per round, whichever path its update took.
ALTER TABLE members ADD COLUMN kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE members ADD COLUMN via TEXT;
CREATE TABLE held_updates (round BIGINT NOT NULL, holder TEXT NOT NULL, blob TEXT NOT NULL,
    examples BIGINT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (round, holder, blob));
CREATE TABLE counted (round BIGINT NOT NULL, node_id TEXT NOT NULL, holder TEXT NOT NULL,
    blob TEXT NOT NULL, PRIMARY KEY (round, node_id));
INSERT INTO held_updates (round, holder, blob, examples, state)
    SELECT round, node_id, blob, examples, state FROM held;
INSERT INTO counted (round, node_id, holder, blob) SELECT round, node_id, node_id, blob FROM held;
DROP TABLE held;
