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
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

use super::WorkerConfig;
use super::gaps::Waiting;
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

/// How long a batch whose records all wait for predecessors (in another batch of this process,
/// or another worker's) keeps waiting for one of them to be acknowledged before giving the
/// rest back (rescheduled after about `backoff_base`).
const PATIENCE: Duration = Duration::from_secs(1);
/// How often a waiting batch reads its keys' positions again, besides whenever this process
/// acknowledges ordered records.
const LOOK_AGAIN: Duration = Duration::from_millis(20);
/// A batch stops waiting when no ordered key of this process has moved for this long.
const QUIET: Duration = Duration::from_millis(100);

/// Bumped whenever this process records ordered keys' progress: batches waiting on a
/// predecessor look again at once, so that the batches of one worker pipeline.
static ADVANCED: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Delivers the ordered records of `jobs` (those with a sequence); returns an outcome for
/// each of them, and the keys left waiting behind a sequence after their delivered one (see
/// `gaps`).
///
/// Rounds: each sends the next record of every key that may go, then records the keys'
/// progress. A key whose next record waits for a predecessor held elsewhere is looked at
/// again whenever this process records progress (and every [`LOOK_AGAIN`]); once nothing of
/// the batch can go for [`PATIENCE`], or nothing in this process has moved for [`QUIET`], the
/// records still waiting are given back.
pub(crate) async fn deliver<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    sink: &dyn Sink,
    metrics: &Metrics,
    jobs: &[JobState],
    config: &WorkerConfig,
    deadline: tokio::time::Instant,
) -> (Vec<(Slot, RecordOutcome)>, Vec<Waiting>) {
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
        return (out, Vec::new());
    }
    let keys: Vec<(String, String)> = by_key
        .keys()
        .map(|(s, k)| ((*s).to_owned(), (*k).to_owned()))
        .collect();
    // Per key, its records not settled yet, in sequence order.
    let mut pending: Vec<VecDeque<(i64, Slot)>> = by_key
        .into_values()
        .map(|mut records| {
            records.sort_by_key(|(seq, _)| *seq);
            records.into()
        })
        .collect();
    // Keys whose next record may go now (its predecessor is acknowledged).
    let mut active: Vec<usize> = Vec::new();
    // Keys whose position is to be read.
    let mut look: Vec<usize> = (0..keys.len()).collect();
    // Each key's delivered sequence when last read (`None` while parked or not read).
    let mut delivered_at: Vec<Option<i64>> = vec![None; keys.len()];
    let mut advanced = ADVANCED.subscribe();
    let mut idle_since: Option<tokio::time::Instant> = None;
    let mut last_advance = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= deadline {
            break; // what is left goes next time
        }
        if !look.is_empty() {
            advanced.borrow_and_update();
            let names: Vec<(String, String)> = look.iter().map(|&k| keys[k].clone()).collect();
            let positions = match DB::key_positions(pool, &names).await {
                Ok(positions) => positions,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read ordered keys' positions; they wait");
                    break;
                }
            };
            for (k, (delivered, is_parked)) in std::mem::take(&mut look).into_iter().zip(positions)
            {
                delivered_at[k] = (!is_parked).then_some(delivered);
                let queue = &mut pending[k];
                while let Some(&(_, slot)) = queue.front().filter(|(seq, _)| *seq <= delivered) {
                    // Acknowledged before (a lease lost after the send): delivered.
                    queue.pop_front();
                    out.push((slot, Ok(Ack::default())));
                }
                if is_parked {
                    out.extend(queue.drain(..).map(|(_, slot)| (slot, Err(parked()))));
                } else if queue.front().is_some_and(|(seq, _)| *seq == delivered + 1) {
                    active.push(k);
                }
            }
        }
        if active.is_empty() {
            let waiting = pending.iter().any(|q| !q.is_empty());
            let now = tokio::time::Instant::now();
            let idle = *idle_since.get_or_insert(now);
            // Waiting is worth it while this process is delivering ordered keys (the
            // predecessor is likely in flight here); when nothing moves (an outage, the
            // predecessor backing off), the batch gives its waiting records back at once.
            let quiet = now >= last_advance + QUIET;
            if !waiting || quiet || now >= idle + PATIENCE || now + LOOK_AGAIN >= deadline {
                break;
            }
            if let Ok(Ok(())) = tokio::time::timeout(LOOK_AGAIN, advanced.changed()).await {
                last_advance = tokio::time::Instant::now();
            }
            look = waiting_keys(&pending, &active);
            continue;
        }
        idle_since = None;
        let (stop, acknowledged) = round::<DB>(
            pool,
            sink,
            metrics,
            jobs,
            config,
            deadline,
            &keys,
            &mut pending,
            &mut active,
            &mut out,
        )
        .await;
        if stop {
            break;
        }
        if acknowledged {
            last_advance = tokio::time::Instant::now();
        }
        if advanced.has_changed().unwrap_or(false) {
            last_advance = tokio::time::Instant::now();
            look = waiting_keys(&pending, &active);
        }
    }
    // Keys whose next record waits behind a sequence after the delivered one: its
    // predecessor is elsewhere, or lost.
    let gaps = pending
        .iter()
        .zip(&delivered_at)
        .zip(&keys)
        .filter_map(|((queue, delivered), (stream, key))| {
            let (delivered, &(next, _)) = ((*delivered)?, queue.front()?);
            (next > delivered + 1).then(|| (stream.clone(), key.clone(), delivered))
        })
        .collect();
    // Whatever could not go this time waits for the next.
    for queue in &mut pending {
        out.extend(queue.drain(..).map(|(_, slot)| (slot, Err(waiting()))));
    }
    (out, gaps)
}

/// Keys with records pending that may not go yet.
fn waiting_keys(pending: &[VecDeque<(i64, Slot)>], active: &[usize]) -> Vec<usize> {
    let mut is_active = vec![false; pending.len()];
    for &k in active {
        is_active[k] = true;
    }
    (0..pending.len())
        .filter(|&k| !pending[k].is_empty() && !is_active[k])
        .collect()
}

/// One round: the next record of every active key, by stream, cut to the request limits;
/// then the acknowledged keys' progress is recorded. A key stays active while its next record
/// follows the one acknowledged. Returns whether the batch must stop (the deadline, or
/// progress that could not be recorded), and whether any record was acknowledged.
#[allow(clippy::too_many_arguments)]
async fn round<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    sink: &dyn Sink,
    metrics: &Metrics,
    jobs: &[JobState],
    config: &WorkerConfig,
    deadline: tokio::time::Instant,
    keys: &[(String, String)],
    pending: &mut [VecDeque<(i64, Slot)>],
    active: &mut Vec<usize>,
    out: &mut Vec<(Slot, RecordOutcome)>,
) -> (bool, bool) {
    let mut owner: HashMap<Slot, usize> = HashMap::new();
    let mut by_stream: BTreeMap<&str, Vec<Slot>> = BTreeMap::new();
    for &k in active.iter() {
        let (_, slot) = pending[k][0];
        owner.insert(slot, k);
        by_stream.entry(keys[k].0.as_str()).or_default().push(slot);
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
    let mut stop = false;
    loop {
        match tokio::time::timeout_at(deadline, sends.next()).await {
            Ok(Some(done)) => results.extend(done),
            Ok(None) => break,
            Err(_) => {
                stop = true;
                break;
            }
        }
    }
    drop(sends);

    let mut acked: Vec<(String, String, i64)> = Vec::new();
    let mut acked_slots: Vec<(usize, i64, Slot, Ack)> = Vec::new();
    let mut stopped: Vec<usize> = Vec::new();
    for (slot, outcome) in results {
        let k = owner.remove(&slot).expect("a slot of this round");
        let (seq, _) = pending[k].pop_front().expect("the round's record");
        let (stream, key) = &keys[k];
        match outcome {
            Ok(ack) => {
                acked.push((stream.clone(), key.clone(), seq));
                acked_slots.push((k, seq, slot, ack));
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
                    Ok(false) => {
                        // Parked already, or moved past this record by another worker that
                        // took the job over: it is looked at again next time, as one waiting.
                        tracing::warn!(stream, key, seq, error = %failure, "refused, but the key was parked or moved meanwhile");
                        out.push((slot, Err(waiting())));
                    }
                    Ok(true) => {
                        tracing::error!(stream, key, seq, error = %failure, "ordered key parked: its record is refused for good");
                        out.extend(
                            pending[k]
                                .drain(..)
                                .map(|(_, later)| (later, Err(parked()))),
                        );
                        out.push((slot, Err(failure)));
                    }
                    Err(e) => {
                        // Not parked, the record must not go dead: it is kept (without using
                        // up attempts) and parking is tried again next time.
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
                stopped.push(k);
            }
            Err(failure) => {
                out.push((slot, Err(failure)));
                stopped.push(k);
            }
        }
    }
    // A key stopped by a failure: its later records wait for the next time, so that the
    // same record goes again before anything after it.
    // Requests cut off by the deadline: their outcome is unknown; the same record goes first
    // next time.
    for (slot, k) in owner {
        pending[k].pop_front();
        out.push((slot, Err(publish::not_attempted())));
        stopped.push(k);
    }
    for &k in &stopped {
        out.extend(pending[k].drain(..).map(|(_, slot)| (slot, Err(waiting()))));
    }
    acked.sort();
    let acknowledged = !acked.is_empty();
    let progress = if acked.is_empty() {
        Ok(0)
    } else {
        DB::advance_keys(pool, &acked).await
    };
    match progress {
        Ok(_) => {
            if !acked.is_empty() {
                ADVANCED.send_modify(|n| *n = n.wrapping_add(1));
            }
            for (k, seq, slot, ack) in acked_slots {
                out.push((slot, Ok(ack)));
                if pending[k].front().is_none_or(|(next, _)| *next != seq + 1) {
                    stopped.push(k); // done, or its next record waits for one held elsewhere
                }
            }
        }
        Err(e) => {
            // Acknowledged but not recorded: the records stay in their jobs and are sent again
            // (a duplicate, never a gap), and nothing after them goes.
            tracing::warn!(error = %e, "could not record ordered keys' progress; their records go again");
            let failure = Failure {
                class: ErrorClass::Transient,
                code: "progress_not_recorded".into(),
                message: format!("acknowledged, but the key's progress was not recorded: {e}"),
            };
            for (k, _, slot, _) in acked_slots {
                out.push((slot, Err(failure.clone())));
                out.extend(pending[k].drain(..).map(|(_, slot)| (slot, Err(waiting()))));
            }
            stop = true;
        }
    }
    let stopped: std::collections::HashSet<usize> = stopped.into_iter().collect();
    active.retain(|k| !stopped.contains(k) && !pending[*k].is_empty());
    (stop, acknowledged && !stop)
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
    // A job all of whose records wait keeps its records as they are (not rewritten).
    let records = (held.len() < records.len())
        .then(|| (encode_stored(held.iter().copied()), held.len() as i32));
    Some(Reschedule {
        id: job.claimed.id,
        records,
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

        state.outcomes[0] = Some(waiting());
        let r = reschedule(&state, &config).expect("every record waits");
        assert!(
            r.records.is_none(),
            "a job that only waits is not rewritten"
        );
        state.outcomes[0] = None;

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
