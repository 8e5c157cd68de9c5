-- Ordered delivery: the last sequence taken per (stream, partition key), upserted in the
-- writer's transaction (`seq = seq + n ... RETURNING seq`); a rollback takes nothing, so
-- sequences have no gaps. The worker never writes here.
CREATE TABLE journaled_key_sequences (
    stream        TEXT    NOT NULL,
    partition_key TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    PRIMARY KEY (stream, partition_key)
);

-- The worker's side: the last sequence acknowledged per key (advanced only from s-1 to s), and
-- the record a key is parked at, refused for good. Times in Unix milliseconds.
CREATE TABLE journaled_key_delivery (
    stream        TEXT    NOT NULL,
    partition_key TEXT    NOT NULL,
    delivered     INTEGER NOT NULL DEFAULT 0,
    parked_seq    INTEGER,
    parked_event  TEXT,
    parked_reason TEXT,
    parked_at     INTEGER,
    PRIMARY KEY (stream, partition_key)
);
CREATE INDEX journaled_key_delivery_parked_idx ON journaled_key_delivery (parked_at) WHERE parked_seq IS NOT NULL;
