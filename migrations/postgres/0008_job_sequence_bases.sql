-- Ordered events' sequences, filled on read instead of in the writer's statement. A job whose
-- records were written with sequence placeholders (U+0001, the job's own key index, `.`, the
-- event's place among its key's events in the transaction, U+0001) holds here, for each of its
-- keys, the sequence just before the transaction's first event of that key; a placeholder reads
-- as `sequence_bases[key + 1] + place`. Splicing the numbers into the records text inside the
-- INSERT cost committers a third of their throughput at 16 connections; storing a few integers
-- costs them almost nothing. NULL for a job without placeholders (all jobs written before).
ALTER TABLE journaled.jobs ADD COLUMN sequence_bases int8[];
