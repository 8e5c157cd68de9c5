-- When each job was first due: its commit, or the end of the delay the application asked for.
-- The age of the oldest pending event counts from it, so an event delayed by an hour is not
-- "falling behind" while it waits, nor an hour late the moment it falls due. Never changed by
-- claims, retries or backoff (run_at is).
ALTER TABLE journaled_jobs ADD COLUMN due_at INTEGER NOT NULL DEFAULT 0;
-- A job never tried nor leased still has its first due time in run_at; the others were due
-- at their commit, near enough.
UPDATE journaled_jobs
   SET due_at = CASE WHEN attempts = 0 AND locked_by IS NULL THEN run_at ELSE created_at END;
