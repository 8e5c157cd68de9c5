//! Ordered delivery: the records of an ordered (stream, key) go out one at a time, each only
//! once its predecessor is acknowledged, in rounds that share requests across keys.
//!
//! Each round sends the next record of every key of the batch together (so never two records
//! of one key in a request, and thousands of keys per request). A record is sent only if its
//! key's `delivered` sequence is its predecessor's; after a round, `delivered` moves from s-1
//! to s for every acknowledged record, so two workers never deliver a key's records out of
//! order. A failure stops its key for this batch: the same record is sent again before
//! anything after it. A record refused for good parks its key; every other key flows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use futures_util::StreamExt;

use super::WorkerConfig;
use super::metrics::Metrics;
use super::publish::{self, JobState, Slot};
use super::sink::{Ack, ErrorClass, Failure, RecordOutcome, Sink};
use crate::store::{Backend, ParkedKey, Reschedule, encode_stored};

/// The code of a record that waits for its predecessor (no attempt is counted).
pub(crate) const WAITING: &str = "waiting";
/// The code of a record whose key is parked.
pub(crate) const PARKED: &str = "parked";

/// Requests one round keeps in flight at most.
const REQUESTS_PER_ROUND: usize = 8;

fn wait(code: &str, message: &str) -> Failure {
    Failure {
        class: ErrorClass::Throttled,
        code: code.into(),
        message: message.into(),
    }
}

fn waiting() -> Failure {
    wait(
        WAITING,
        "waiting for the key's previous record to be acknowledged",
    )
}

fn parked() -> Failure {
    wait(
        PARKED,
        "its key is parked: see `journaled status`, then `journaled retry --key` or `skip --key`",
    )
}

/// Delivers the ordered records of `jobs` (those with a sequence); returns an outcome for
/// each of them.
pub(crate) async fn deliver<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    sink: &dyn Sink,
    metrics: &Metrics,
    jobs: &[JobState],
    config: &WorkerConfig,
    deadline: tokio::time::Instant,
) -> Vec<(Slot, RecordOutcome)> {
    let mut by_key: BTreeMap<(&str, &str), Vec<(i64, Slot)>> = BTreeMap::new();
    for (j, job) in jobs.iter().enumerate() {
        let Ok(records) = &job.records else { continue };
        for (r, record) in records.iter().enumerate() {
            if let Some(seq) = record.sequence {
                by_key
                    .entry((record.stream.as_str(), record.partition_key.as_str()))
                    .or_default()
                    .push((seq, (j, r)));
            }
        }
    }
    let mut out = Vec::new();
    if by_key.is_empty() {
        return out;
    }
    let keys: Vec<(String, String)> = by_key
        .keys()
        .map(|(s, k)| ((*s).to_owned(), (*k).to_owned()))
        .collect();
    let positions = match DB::key_positions(pool, &keys).await {
        Ok(positions) => positions,
        Err(e) => {
            tracing::warn!(error = %e, "could not read ordered keys' positions; they wait");
            for (_, slot) in by_key.into_values().flatten() {
                out.push((slot, Err(waiting())));
            }
            return out;
        }
    };
    // Per key: the records that may go, in sequence order, without a gap.
    let mut queues: Vec<(usize, VecDeque<(i64, Slot)>)> = Vec::new();
    for (k, (mut records, (delivered, is_parked))) in
        by_key.into_values().zip(positions).enumerate()
    {
        records.sort_by_key(|(seq, _)| *seq);
        let mut queue = VecDeque::new();
        let mut next = delivered + 1;
        for (seq, slot) in records {
            if seq <= delivered {
                // Acknowledged before (a lease lost after the send): delivered.
                out.push((slot, Ok(Ack::default())));
            } else if is_parked {
                out.push((slot, Err(parked())));
            } else if seq == next {
                queue.push_back((seq, slot));
                next += 1;
            } else {
                out.push((slot, Err(waiting())));
            }
        }
        if !queue.is_empty() {
            queues.push((k, queue));
        }
    }

    while !queues.is_empty() {
        // This round: the next record of every key, by stream, cut to the request limits.
        let mut owner: HashMap<Slot, usize> = HashMap::new();
        let mut by_stream: BTreeMap<&str, Vec<Slot>> = BTreeMap::new();
        for (q, (k, queue)) in queues.iter().enumerate() {
            let (_, slot) = queue[0];
            owner.insert(slot, q);
            by_stream.entry(keys[*k].0.as_str()).or_default().push(slot);
        }
        let mut sends = Vec::new();
        for (stream, slots) in by_stream {
            let mut current: Vec<Slot> = Vec::new();
            let mut bytes = 0;
            for slot in slots {
                let record = &jobs[slot.0].records.as_ref().expect("decoded")[slot.1];
                let size = record.data().len() + record.partition_key.len();
                if !current.is_empty()
                    && (current.len() == config.max_records_per_request
                        || bytes + size > config.max_request_bytes)
                {
                    sends.push(publish::send(
                        sink,
                        metrics,
                        stream,
                        std::mem::take(&mut current),
                        jobs,
                    ));
                    bytes = 0;
                }
                current.push(slot);
                bytes += size;
            }
            if !current.is_empty() {
                sends.push(publish::send(sink, metrics, stream, current, jobs));
            }
        }
        let mut results: Vec<(Slot, RecordOutcome)> = Vec::new();
        let mut sends = futures_util::stream::iter(sends).buffer_unordered(REQUESTS_PER_ROUND);
        let mut timed_out = false;
        loop {
            match tokio::time::timeout_at(deadline, sends.next()).await {
                Ok(Some(done)) => results.extend(done),
                Ok(None) => break,
                Err(_) => {
                    timed_out = true;
                    break;
                }
            }
        }
        drop(sends);

        let mut acked: Vec<(String, String, i64)> = Vec::new();
        let mut acked_slots: Vec<(Slot, Ack)> = Vec::new();
        let mut stopped: Vec<usize> = Vec::new();
        for (slot, outcome) in results {
            let q = owner.remove(&slot).expect("a slot of this round");
            let (k, queue) = &mut queues[q];
            let (seq, _) = queue.pop_front().expect("the round's record");
            let (stream, key) = &keys[*k];
            match outcome {
                Ok(ack) => {
                    acked.push((stream.clone(), key.clone(), seq));
                    acked_slots.push((slot, ack));
                }
                Err(failure) if failure.class == ErrorClass::Permanent => {
                    let record = &jobs[slot.0].records.as_ref().expect("decoded")[slot.1];
                    let parked_key = ParkedKey {
                        stream: stream.clone(),
                        partition_key: key.clone(),
                        sequence: seq,
                        event_id: record.id.to_string(),
                        reason: failure.to_string(),
                        parked_at: None,
                    };
                    match DB::park_key(pool, &parked_key).await {
                        Ok(()) => {
                            tracing::error!(stream, key, seq, error = %failure, "ordered key parked: its record is refused for good");
                            out.extend(queue.drain(..).map(|(_, later)| (later, Err(parked()))));
                            out.push((slot, Err(failure)));
                        }
                        Err(e) => {
                            // Not parked, the record must not go dead: it is kept (without
                            // using up attempts) and parking is tried again next time.
                            tracing::error!(error = %e, stream, key, "could not park the key; trying again later");
                            out.push((
                                slot,
                                Err(Failure {
                                    class: ErrorClass::Throttled,
                                    code: "park_failed".into(),
                                    message: format!("{failure}; parking its key failed: {e}"),
                                }),
                            ));
                        }
                    }
                    stopped.push(q);
                }
                Err(failure) => {
                    out.push((slot, Err(failure)));
                    stopped.push(q);
                }
            }
        }
        // Requests cut off by the deadline: their outcome is unknown; the same record goes
        // first next time.
        for (slot, q) in owner {
            let (_, queue) = &mut queues[q];
            queue.pop_front();
            out.push((slot, Err(publish::not_attempted())));
            stopped.push(q);
        }
        acked.sort();
        let progress = if acked.is_empty() {
            Ok(0)
        } else {
            DB::advance_keys(pool, &acked).await
        };
        match progress {
            Ok(_) => out.extend(acked_slots.into_iter().map(|(slot, ack)| (slot, Ok(ack)))),
            Err(e) => {
                // Acknowledged but not recorded: the records stay in their jobs and are sent
                // again (a duplicate, never a gap), and nothing after them goes.
                tracing::warn!(error = %e, "could not record ordered keys' progress; their records go again");
                let failure = Failure {
                    class: ErrorClass::Transient,
                    code: "progress_not_recorded".into(),
                    message: format!("acknowledged, but the key's progress was not recorded: {e}"),
                };
                out.extend(
                    acked_slots
                        .into_iter()
                        .map(|(slot, _)| (slot, Err(failure.clone()))),
                );
                timed_out = true;
            }
        }
        for q in stopped {
            let (_, queue) = &mut queues[q];
            out.extend(queue.drain(..).map(|(_, slot)| (slot, Err(waiting()))));
        }
        if timed_out {
            for (_, queue) in &mut queues {
                out.extend(queue.drain(..).map(|(_, slot)| (slot, Err(waiting()))));
            }
        }
        queues.retain(|(_, queue)| !queue.is_empty());
    }
    out
}

/// A job whose only undelivered records wait (for a predecessor, or on a parked key): kept
/// as it is, due again shortly, without counting an attempt. `None` for any other job.
pub(crate) fn reschedule(job: &JobState, config: &WorkerConfig) -> Option<Reschedule> {
    let records = job.records.as_ref().ok()?;
    let mut held = Vec::new();
    let mut any_parked = false;
    for (record, outcome) in records.iter().zip(&job.outcomes) {
        match outcome {
            None => {}
            Some(f) if f.code == WAITING => held.push(record),
            Some(f) if f.code == PARKED => {
                any_parked = true;
                held.push(record);
            }
            Some(_) => return None,
        }
    }
    if held.is_empty() {
        return None;
    }
    let delay = if any_parked {
        config.configuration_backoff
    } else {
        config.backoff_base
    }
    .mul_f64(0.5 + fastrand::f64() * 0.5)
    .max(Duration::from_millis(10));
    let first = held[0];
    Some(Reschedule {
        id: job.claimed.id,
        records: Some((encode_stored(held.iter().copied()), held.len() as i32)),
        attempts: job.claimed.attempts,
        transient_failures: job.claimed.transient_failures,
        delay,
        last_error: format!(
            "{} ordered records wait; event {} on stream {} key {}: {}",
            held.len(),
            first.id,
            first.stream,
            first.partition_key,
            if any_parked { parked() } else { waiting() }
        ),
        dead: false,
        split_dead: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;
    use crate::store::records::encode_parts;
    use crate::store::{Claimed, JobId, decode_records};
    use time::OffsetDateTime;

    fn job(attempts: i32, sequences: &[i64]) -> JobState {
        let encoded = encode_parts(
            sequences
                .iter()
                .map(|s| (EventId::new(), "s", "k", "{}", Some(*s))),
        );
        let mut state = JobState::decode(Claimed {
            id: JobId(3),
            priority: 20,
            attempts,
            transient_failures: attempts,
            records: encoded,
            created_at: OffsetDateTime::now_utc(),
        });
        state.outcomes.fill(None);
        state
    }

    #[test]
    fn records_that_only_wait_are_kept_without_an_attempt() {
        let config = WorkerConfig::default();
        let mut state = job(2, &[4, 5, 6]);
        state.outcomes[1] = Some(waiting());
        state.outcomes[2] = Some(waiting());
        let r = reschedule(&state, &config).expect("only waiting records");
        assert_eq!((r.attempts, r.transient_failures, r.dead), (2, 2, false));
        assert!(r.delay <= config.backoff_base, "{:?}", r.delay);
        let (records, count) = r.records.unwrap();
        assert_eq!(count, 2);
        let kept: Vec<Option<i64>> = decode_records(&records)
            .unwrap()
            .iter()
            .map(|r| r.sequence)
            .collect();
        assert_eq!(kept, [Some(5), Some(6)], "the sequence is kept");

        state.outcomes[1] = Some(parked());
        let r = reschedule(&state, &config).unwrap();
        assert!(r.delay >= config.configuration_backoff / 2, "{:?}", r.delay);
        assert!(r.last_error.contains("parked"), "{}", r.last_error);
    }

    #[test]
    fn a_real_failure_takes_the_usual_path() {
        let mut state = job(0, &[1, 2]);
        state.outcomes[0] = Some(publish::not_attempted());
        state.outcomes[1] = Some(waiting());
        assert!(reschedule(&state, &WorkerConfig::default()).is_none());
        let delivered = job(0, &[1]);
        assert!(reschedule(&delivered, &WorkerConfig::default()).is_none());
    }
}
