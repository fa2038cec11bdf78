-- The coordinator lease: which of the servers sharing this store is active, until when (in
-- milliseconds of the database's own clock), and its epoch, which grows with every change of
-- holder and fences every state change (a server whose epoch is no longer here writes
-- nothing). IF NOT EXISTS: SQLite has no lock to migrate under, and two servers opening a
-- store at once may both run this; the second then finds the version recorded and stops.
CREATE TABLE IF NOT EXISTS lease (
    id BIGINT PRIMARY KEY,
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
