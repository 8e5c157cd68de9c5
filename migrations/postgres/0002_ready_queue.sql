-- Writers never wait on each other (invariant 9): no NOTIFY inside the writer's transaction.
-- A NOTIFY takes PostgreSQL's global notification lock at COMMIT and holds it through the WAL
-- flush, so every committer queued behind the others. Wake-ups now come from a coalescing
-- notifier on its own connection, outside any application transaction.
DROP TRIGGER IF EXISTS jobs_notify ON journaled.jobs;
DROP FUNCTION IF EXISTS journaled.notify_jobs();

-- Claims that ignore jobs that are not due (invariant 11): a ready job is claimed from its own
-- partial index; delayed, leased and backing-off jobs wait in another, ordered by due time,
-- until the worker promotes the ones that fell due. Dead jobs are in neither.
ALTER TABLE journaled.jobs ADD COLUMN ready boolean NOT NULL DEFAULT false;
-- Bytes of `records`, so that a claim is bounded in bytes as well as jobs (invariant 10).
ALTER TABLE journaled.jobs ADD COLUMN bytes integer NOT NULL DEFAULT 0;
UPDATE journaled.jobs SET ready = (dead_at IS NULL AND run_at <= now()), bytes = octet_length(records);
DROP INDEX journaled.jobs_claim_idx;
CREATE INDEX jobs_ready_idx ON journaled.jobs (priority, id) WHERE ready;
CREATE INDEX jobs_scheduled_idx ON journaled.jobs (run_at) WHERE NOT ready AND dead_at IS NULL;
