-- Delivery receipts: where every delivered event went (shard, sequence number), kept for a
-- retention window and pruned by the worker in bounded batches. Times in Unix milliseconds.
CREATE TABLE journaled_receipts (
    event_id        TEXT    PRIMARY KEY,
    stream          TEXT    NOT NULL,
    partition_key   TEXT    NOT NULL,
    shard_id        TEXT,
    sequence_number TEXT,
    job_created_at  INTEGER NOT NULL,
    delivered_at    INTEGER NOT NULL,
    attempts        INTEGER NOT NULL
);
CREATE INDEX journaled_receipts_delivered_at_idx ON journaled_receipts (delivered_at);
