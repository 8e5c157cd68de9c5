-- Ordered delivery: the last sequence taken per (stream, partition key), upserted in the
-- writer's transaction (`seq = seq + n ... RETURNING seq`); a rollback takes nothing, so
-- sequences have no gaps. The worker never writes here.
CREATE TABLE journaled_key_sequences (
    stream        TEXT    NOT NULL,
    partition_key TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    PRIMARY KEY (stream, partition_key)
);
