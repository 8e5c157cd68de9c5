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

-- The worker's side, apart so that it never waits on a writer's open transaction: the last
-- sequence acknowledged per key (advanced only from s-1 to s, so two workers never deliver a
-- key's records out of order), and the record a key is parked at, refused for good.
CREATE TABLE journaled.key_delivery (
    stream        text        NOT NULL,
    partition_key text        NOT NULL,
    delivered     bigint      NOT NULL DEFAULT 0,
    parked_seq    bigint,
    parked_event  text,
    parked_reason text,
    parked_at     timestamptz,
    PRIMARY KEY (stream, partition_key)
);
CREATE INDEX key_delivery_parked_idx ON journaled.key_delivery (parked_at) WHERE parked_seq IS NOT NULL;
