-- Claims that ignore jobs that are not due (invariant 11): a ready job is claimed from its own
-- partial index; delayed, leased and backing-off jobs wait in another, ordered by due time,
-- until the worker promotes the ones that fell due. Dead jobs are in neither.
ALTER TABLE journaled_jobs ADD COLUMN ready INTEGER NOT NULL DEFAULT 0;
-- Bytes of `records`, so that a claim is bounded in bytes as well as jobs (invariant 10).
ALTER TABLE journaled_jobs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE journaled_jobs
   SET ready = (dead_at IS NULL AND run_at <= CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)),
       bytes = length(CAST(records AS BLOB));
DROP INDEX journaled_jobs_claim_idx;
CREATE INDEX journaled_jobs_ready_idx ON journaled_jobs (priority, id) WHERE ready = 1;
CREATE INDEX journaled_jobs_scheduled_idx ON journaled_jobs (run_at) WHERE ready = 0 AND dead_at IS NULL;
