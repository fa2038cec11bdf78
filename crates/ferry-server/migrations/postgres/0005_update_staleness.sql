-- Asynchronous aggregation: the version (round) whose model an accepted update was trained
-- on, so that a restarted coordinator weighs it by the same staleness (NULL: the round it
-- was counted in, as every synchronous update is).
ALTER TABLE accepted ADD COLUMN IF NOT EXISTS trained_on BIGINT;
