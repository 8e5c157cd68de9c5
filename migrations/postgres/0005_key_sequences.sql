-- Ordered delivery: the last sequence taken per (stream, partition key), upserted in the
-- writer's transaction (`seq = seq + n ... RETURNING seq`). Only writers of the same ordered key
-- queue, on its row; a rollback takes nothing, so sequences have no gaps. The worker never
-- writes here, so it never waits on a writer's open transaction.
CREATE TABLE journaled.key_sequences (
    stream        text   NOT NULL,
    partition_key text   NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (stream, partition_key)
);
