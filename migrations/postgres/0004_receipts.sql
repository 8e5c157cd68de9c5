-- Delivery receipts: where every delivered event went (shard, sequence number), kept for a
-- retention window and pruned by the worker in bounded batches. Written in bulk, one statement
-- per settled batch.
CREATE TABLE journaled.receipts (
    event_id        uuid        PRIMARY KEY,
    stream          text        NOT NULL,
    partition_key   text        NOT NULL,
    shard_id        text,
    sequence_number text,
    job_created_at  timestamptz NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL
);
CREATE INDEX receipts_delivered_at_idx ON journaled.receipts (delivered_at);
