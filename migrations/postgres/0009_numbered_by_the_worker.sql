-- Ordered events are numbered by the worker, in commit order, instead of in the writer's
-- statement: updating (or even reading) a key's `key_sequences` row in every ordered commit
-- cost writers 7-14 % of their throughput, while an advisory lock costs them almost nothing.
--
-- A writer of ordered events takes, before its jobs get their ids, one global advisory lock
-- shared and a transaction-scoped advisory lock per ordered key (or the global one exclusive
-- when it has many keys: see `journaled.lock_ordered_keys`), held until it commits: a key's
-- jobs therefore get ids in the order their transactions commit, and a job is visible only once
-- every earlier job of its keys is. Its jobs wait unnumbered (`run_at` 'infinity', not ready;
-- `due_at` keeps when they are due) with what the worker needs to number them: the statement
-- that wrote them (`sequence_group`), their own keys (`sequence_streams`, `sequence_keys`) and
-- how many sequences the statement takes for each (`sequence_counts`). The worker
-- numbers unnumbered jobs in id order, a whole statement's jobs at a time, from
-- `key_sequences`, which only it writes now, and makes them due.
ALTER TABLE journaled.jobs
    ADD COLUMN sequence_group bigint,
    ADD COLUMN sequence_streams text[],
    ADD COLUMN sequence_keys text[],
    ADD COLUMN sequence_counts int8[];
CREATE INDEX jobs_unnumbered_idx ON journaled.jobs (id) WHERE sequence_group IS NOT NULL;

-- The global key shared, then the keys' locks in the order given (the writer sorts them, so
-- that two writers never wait for each other crosswise). A statement of more keys than half of
-- `max_locks_per_transaction` (32 by default) takes the global key alone, exclusively,
-- instead: it holds back every ordered writer until its transaction commits rather than fill
-- PostgreSQL's shared lock table, which is sized for `max_locks_per_transaction` locks per
-- connection on average, for all sessions together (a transaction of 100,000 keys would fail,
-- and others with it). Raising `max_locks_per_transaction` raises the bound. A transaction that
-- holds the global key already keeps its mode: exclusive covers every key; shared (an earlier
-- statement of few keys, in the same transaction) goes on key by key, since asking for
-- exclusive while holding shared would deadlock with any writer waiting for one of its keys.
CREATE FUNCTION journaled.lock_ordered_keys(hi int4[], lo int4[])
RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n integer := coalesce(array_length(hi, 1), 0);
    held text;
BEGIN
    IF n > current_setting('max_locks_per_transaction')::integer / 2 THEN
        -- 7669474465959535972 as pg_locks shows a bigint key.
        SELECT max(mode) INTO held FROM pg_locks
         WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
           AND classid = 1785688676::oid AND objid = 1701995876::oid AND objsubid = 1;
        IF held IS NULL OR held = 'ExclusiveLock' THEN
            PERFORM pg_advisory_xact_lock(7669474465959535972);
            RETURN 0;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(7669474465959535972);
    FOR i IN 1 .. n LOOP
        PERFORM pg_advisory_xact_lock(hi[i], lo[i]);
    END LOOP;
    RETURN n;
END
$$;
