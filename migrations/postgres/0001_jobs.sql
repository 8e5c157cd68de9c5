-- Jobs: the events of one committed transaction that share a priority and run-at time.
CREATE TABLE journaled.jobs (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    priority       integer     NOT NULL DEFAULT 20,
    run_at         timestamptz NOT NULL DEFAULT now(),
    attempts       integer     NOT NULL DEFAULT 0,  -- failed deliveries, any cause (drives backoff)
    transient_failures integer NOT NULL DEFAULT 0,  -- those that count toward max attempts
    locked_by      text,
    locked_until   timestamptz,
    last_error     text,
    dead_at        timestamptz,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(), -- the insert, just before COMMIT
    event_count    integer     NOT NULL CHECK (event_count > 0),
    -- JSON text, never jsonb: the records' data must stay byte for byte as validated.
    records        text        NOT NULL
);

-- The worker's claim: live jobs by priority, then due time.
CREATE INDEX jobs_claim_idx ON journaled.jobs (priority, run_at, id) WHERE dead_at IS NULL;
CREATE INDEX jobs_dead_idx ON journaled.jobs (dead_at) WHERE dead_at IS NOT NULL;

-- Wake workers that LISTEN journaled_jobs; delivered at COMMIT, once per statement.
CREATE FUNCTION journaled.notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('journaled_jobs', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify AFTER INSERT ON journaled.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION journaled.notify_jobs();
