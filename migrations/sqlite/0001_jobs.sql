-- Jobs: the events of one committed transaction that share a priority and run-at time.
-- Times are Unix milliseconds, so they compare as numbers.
CREATE TABLE journaled_jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    priority       INTEGER NOT NULL DEFAULT 20,
    run_at         INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    transient_failures INTEGER NOT NULL DEFAULT 0,
    locked_by      TEXT,
    locked_until   INTEGER,
    last_error     TEXT,
    dead_at        INTEGER,
    created_at     INTEGER NOT NULL,
    event_count    INTEGER NOT NULL CHECK (event_count > 0),
    records        TEXT    NOT NULL
);

CREATE INDEX journaled_jobs_claim_idx ON journaled_jobs (priority, run_at, id) WHERE dead_at IS NULL;
CREATE INDEX journaled_jobs_dead_idx ON journaled_jobs (dead_at) WHERE dead_at IS NOT NULL;
