//! One claimed batch: decode, publish in `PutRecords` requests, decide what becomes of each job.

use std::time::Duration;

use super::WorkerConfig;
use super::metrics::{CodeLabel, Metrics, OutcomeLabel};
use super::sink::{Ack, ErrorClass, Failure, OutRecord, RecordOutcome, Sink};
use crate::store::{
    BoxFuture, Claimed, DeadSplit, Reschedule, StoredRecord, decode_records, encode_stored,
};

/// (job index, record index) within a batch.
pub(crate) type Slot = (usize, usize);

/// A claimed job with its decoded records and what became of each.
pub(crate) struct JobState {
    pub claimed: Claimed,
    pub records: Result<Vec<StoredRecord>, String>,
    pub outcomes: Vec<Option<Failure>>,
    /// Where each delivered record was put (for receipts).
    pub acks: Vec<Option<Ack>>,
}

impl JobState {
    pub fn decode(claimed: Claimed) -> Self {
        let records = decode_records(&claimed.records);
        // Every record counts as not attempted until the sink says otherwise: nothing is
        // taken as delivered without an acknowledgement.
        let outcomes = match &records {
            Ok(records) => vec![Some(not_attempted()); records.len()],
            Err(_) => Vec::new(),
        };
        let acks = vec![None; outcomes.len()];
        JobState {
            claimed,
            records,
            outcomes,
            acks,
        }
    }
}

/// The code of a record whose request did not complete before the delivery deadline.
pub(crate) const NOT_ATTEMPTED: &str = "not_attempted";

/// The outcome of a record whose request never completed.
pub(crate) fn not_attempted() -> Failure {
    Failure {
        class: ErrorClass::Unavailable,
        code: NOT_ATTEMPTED.into(),
        message: "the request did not complete before the delivery deadline".into(),
    }
}

fn cut_off(failure: &Failure) -> bool {
    failure.code == NOT_ATTEMPTED
}

/// Sends one request; when it is refused as invalid, splits it in halves until the record at
/// fault stands alone, which is then permanent. The other records are delivered.
pub(crate) fn send<'a>(
    sink: &'a dyn Sink,
    metrics: &'a Metrics,
    stream: &'a str,
    mut slots: Vec<Slot>,
    jobs: &'a [JobState],
) -> BoxFuture<'a, Vec<(Slot, RecordOutcome)>> {
    Box::pin(async move {
        let out: Vec<OutRecord<'_>> = slots
            .iter()
            .map(|&(j, r)| {
                let record = &jobs[j].records.as_ref().expect("decoded")[r];
                OutRecord {
                    partition_key: &record.partition_key,
                    data: record.data(),
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let result = sink.put_records_acked(stream, &out).await;
        metrics
            .request_latency
            .observe(started.elapsed().as_secs_f64());
        metrics.records_per_request.observe(out.len() as f64);
        let bytes: usize = out
            .iter()
            .map(|r| r.data.len() + r.partition_key.len())
            .sum();
        metrics.bytes_per_request.observe(bytes as f64);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics
            .requests
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        match &result {
            Ok(results) => {
                for failure in results.iter().filter_map(|r| r.as_ref().err()) {
                    let code = CodeLabel {
                        code: failure.code.clone(),
                    };
                    metrics.records_failed.get_or_create(&code).inc();
                }
            }
            Err(failure) => {
                let code = CodeLabel {
                    code: failure.code.clone(),
                };
                metrics
                    .records_failed
                    .get_or_create(&code)
                    .inc_by(out.len() as u64);
            }
        }
        match result {
            Ok(results) if results.len() != slots.len() => {
                let failure = Failure {
                    class: ErrorClass::Transient,
                    code: "response".into(),
                    message: format!("{} results for {} records", results.len(), slots.len()),
                };
                slots
                    .into_iter()
                    .map(|s| (s, Err(failure.clone())))
                    .collect()
            }
            Ok(results) => slots.into_iter().zip(results).collect(),
            Err(failure) if failure.class == ErrorClass::Invalid && slots.len() > 1 => {
                tracing::debug!(stream, records = slots.len(), code = %failure.code, "request refused as invalid; splitting it");
                // One half after the other: a request-wide refusal costs 2n-1 requests, but
                // never n at once.
                let right = slots.split_off(slots.len() / 2);
                let mut a = send(sink, metrics, stream, slots, jobs).await;
                a.extend(send(sink, metrics, stream, right, jobs).await);
                a
            }
            Err(failure) if failure.class == ErrorClass::Invalid => {
                let failure = Failure {
                    class: ErrorClass::Permanent,
                    ..failure
                };
                slots
                    .into_iter()
                    .map(|s| (s, Err(failure.clone())))
                    .collect()
            }
            Err(failure) => slots
                .into_iter()
                .map(|s| (s, Err(failure.clone())))
                .collect(),
        }
    })
}

/// Exponential backoff with jitter: uniform in [d/2, d], d = min(max, base · 2^(attempts−1)).
pub(crate) fn backoff(attempts: i32, base: Duration, max: Duration) -> Duration {
    let exponent = attempts.clamp(1, 32) as u32 - 1;
    let full = base.saturating_mul(2u32.saturating_pow(exponent)).min(max);
    full.mul_f64(0.5 + fastrand::f64() * 0.5)
}

fn describe(record: &StoredRecord, failure: &Failure, failed: usize, total: usize) -> String {
    format!(
        "{failed} of {total} records failed; event {} on stream {}: {failure}",
        record.id, record.stream
    )
}

/// What becomes of a job some of whose records failed.
///
/// - Records refused for good are dead: alone, the job is dead; beside retryable records, they
///   are split off into a dead job of their own and the rest is retried.
/// - Only [`ErrorClass::Transient`] failures — the service said this record failed — count
///   toward `max_attempts`. Throttling, configuration errors (credentials, access, stream
///   missing) and unavailability (no answer, a whole request failed) never make a job dead,
///   however long they last.
/// - Records the delivery deadline cut off were never answered: when they are all that is
///   left, the job is due again at once and no attempt is counted.
/// - The records column is rewritten only when some records were delivered or split off.
pub(crate) fn reschedule(job: &JobState, config: &WorkerConfig) -> Reschedule {
    let attempts = job.claimed.attempts.saturating_add(1);
    let records = match &job.records {
        Ok(records) => records,
        Err(message) => {
            return Reschedule {
                id: job.claimed.id,
                records: None,
                attempts,
                transient_failures: job.claimed.transient_failures,
                delay: Duration::ZERO,
                last_error: format!("corrupt job: {message}"),
                dead: true,
                split_dead: None,
            };
        }
    };
    let failed: Vec<(&StoredRecord, &Failure)> = records
        .iter()
        .zip(&job.outcomes)
        .filter_map(|(record, outcome)| outcome.as_ref().map(|f| (record, f)))
        .collect();
    let total = job.outcomes.len();
    let (permanent, retryable): (Vec<_>, Vec<_>) = failed
        .into_iter()
        .partition(|(_, f)| f.class == ErrorClass::Permanent);
    let encode = |list: &[(&StoredRecord, &Failure)]| {
        (
            encode_stored(list.iter().map(|(r, _)| *r)),
            list.len() as i32,
        )
    };
    let permanent_error = permanent.first().map(|(r, f)| {
        format!(
            "permanently refused: {}",
            describe(r, f, permanent.len(), total)
        )
    });
    if retryable.is_empty() {
        return Reschedule {
            id: job.claimed.id,
            records: (permanent.len() != total).then(|| encode(&permanent)),
            attempts,
            transient_failures: job.claimed.transient_failures,
            delay: Duration::ZERO,
            last_error: permanent_error.expect("a failed record"),
            dead: true,
            split_dead: None,
        };
    }
    let split_dead = permanent_error.map(|last_error| {
        let (records, event_count) = encode(&permanent);
        DeadSplit {
            records,
            event_count,
            last_error,
        }
    });
    // Nothing to rewrite when every record is still to deliver.
    let remaining = (retryable.len() != total).then(|| encode(&retryable));
    if retryable.iter().all(|(_, f)| cut_off(f)) {
        return Reschedule {
            id: job.claimed.id,
            records: remaining,
            attempts: job.claimed.attempts,
            transient_failures: job.claimed.transient_failures,
            delay: Duration::ZERO,
            last_error: format!(
                "the delivery deadline cut publishing off with {} of {total} records unanswered; due again at once",
                retryable.len()
            ),
            dead: false,
            split_dead,
        };
    }
    let find = |class: ErrorClass| {
        retryable
            .iter()
            .find(|(_, f)| f.class == class && !cut_off(f))
    };
    let transient = find(ErrorClass::Transient);
    let transient_failures = job
        .claimed
        .transient_failures
        .saturating_add(i32::from(transient.is_some()));
    let (delay, (record, failure)) = if let Some(found) = find(ErrorClass::Configuration) {
        let delay = config
            .configuration_backoff
            .mul_f64(0.75 + fastrand::f64() * 0.5);
        (delay, *found)
    } else {
        let found = transient
            .or_else(|| find(ErrorClass::Unavailable))
            .or_else(|| find(ErrorClass::Throttled))
            .unwrap_or(&retryable[0]);
        (
            backoff(attempts, config.backoff_base, config.backoff_max),
            *found,
        )
    };
    Reschedule {
        id: job.claimed.id,
        records: remaining,
        attempts,
        transient_failures,
        delay,
        last_error: describe(record, failure, retryable.len(), total),
        // Only a failure counted now can make it dead.
        dead: transient.is_some() && transient_failures >= config.max_attempts,
        split_dead,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;
    use crate::store::JobId;
    use crate::store::records::encode_parts;
    use time::OffsetDateTime;

    fn job(attempts: i32, records: &[(&str, usize)]) -> JobState {
        let data: Vec<String> = records
            .iter()
            .map(|(_, n)| format!("\"{}\"", "x".repeat(*n)))
            .collect();
        let ids: Vec<EventId> = records.iter().map(|_| EventId::new()).collect();
        let encoded = encode_parts(
            records
                .iter()
                .zip(&data)
                .zip(&ids)
                .map(|(((stream, _), data), id)| (*id, *stream, "k", data.as_str(), None)),
        );
        let mut state = JobState::decode(Claimed {
            id: JobId(1),
            priority: 20,
            attempts,
            transient_failures: attempts,
            records: encoded,
            created_at: OffsetDateTime::now_utc(),
        });
        assert!(
            state
                .outcomes
                .iter()
                .all(|o| o.as_ref().unwrap().code == "not_attempted")
        );
        state.outcomes.fill(None);
        state
    }

    #[test]
    fn backoff_grows_and_is_capped_with_jitter() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(600);
        for attempts in 1..40 {
            let d = backoff(attempts, base, max);
            let full = base
                .saturating_mul(2u32.saturating_pow(attempts as u32 - 1))
                .min(max);
            assert!(d >= full / 2 && d <= full, "{attempts}: {d:?}");
        }
    }

    fn failure(class: ErrorClass) -> Option<Failure> {
        Some(Failure {
            class,
            code: format!("{class:?}"),
            message: "m".into(),
        })
    }

    #[test]
    fn only_transient_failures_exhaust_attempts() {
        let config = WorkerConfig {
            max_attempts: 3,
            ..WorkerConfig::default()
        };
        for (class, dead) in [
            (ErrorClass::Transient, true),
            (ErrorClass::Throttled, false),
            (ErrorClass::Configuration, false),
            (ErrorClass::Unavailable, false),
            (ErrorClass::Permanent, true),
        ] {
            let mut state = job(2, &[("a", 1), ("a", 1)]);
            state.outcomes[1] = failure(class);
            let r = reschedule(&state, &config);
            assert_eq!(r.dead, dead, "{class:?}");
            assert_eq!(r.attempts, 3);
            let (records, count) = r.records.unwrap();
            assert_eq!(count, 1, "only the failed record is kept");
            assert_eq!(
                decode_records(&records).unwrap()[0].id,
                state.records.as_ref().unwrap()[1].id
            );
            assert!(
                r.last_error.contains("1 of 2 records failed"),
                "{}",
                r.last_error
            );
        }
        let mut early = job(0, &[("a", 1)]);
        early.outcomes[0] = failure(ErrorClass::Transient);
        assert!(!reschedule(&early, &config).dead);
    }

    #[test]
    fn throttling_and_configuration_errors_do_not_use_up_attempts() {
        let config = WorkerConfig {
            max_attempts: 25,
            ..WorkerConfig::default()
        };
        let mut state = job(0, &[("a", 1)]);
        state.claimed.attempts = 24; // 24 throttled deliveries before
        state.outcomes[0] = failure(ErrorClass::Transient);
        let r = reschedule(&state, &config);
        assert_eq!((r.attempts, r.transient_failures, r.dead), (25, 1, false));
    }

    #[test]
    fn failures_that_are_not_the_jobs_fault_never_kill_it() {
        let config = WorkerConfig {
            max_attempts: 2,
            ..WorkerConfig::default()
        };
        for class in [ErrorClass::Unavailable, ErrorClass::Configuration] {
            let mut state = job(1000, &[("a", 1), ("a", 1)]);
            state.outcomes.fill(failure(class));
            let r = reschedule(&state, &config);
            assert!(!r.dead, "{class:?}");
            assert_eq!(r.transient_failures, 1000, "{class:?}: not counted");
            assert_eq!(r.attempts, 1001, "{class:?}: drives the backoff");
            assert!(r.records.is_none(), "nothing delivered: nothing rewritten");
            assert!(r.delay > Duration::ZERO);
        }
    }

    #[test]
    fn a_deadline_cut_off_is_due_at_once_and_not_counted() {
        let config = WorkerConfig {
            max_attempts: 1,
            ..WorkerConfig::default()
        };
        // Progress: the first record was acknowledged, the rest was cut off.
        let mut state = job(3, &[("a", 1), ("a", 1), ("a", 1)]);
        state.outcomes[1] = Some(not_attempted());
        state.outcomes[2] = Some(not_attempted());
        let r = reschedule(&state, &config);
        assert!(!r.dead);
        assert_eq!((r.attempts, r.transient_failures), (3, 3));
        assert_eq!(r.delay, Duration::ZERO);
        assert_eq!(
            r.records.as_ref().unwrap().1,
            2,
            "the delivered record is dropped"
        );
        // No progress: nothing is rewritten.
        let mut state = job(0, &[("a", 1), ("a", 1)]);
        state.outcomes.fill(Some(not_attempted()));
        let r = reschedule(&state, &config);
        assert!(!r.dead && r.records.is_none() && r.delay.is_zero());
        assert_eq!((r.attempts, r.transient_failures), (0, 0));
        // A real failure beside a cut-off is one: the job is retried after a backoff.
        let mut state = job(0, &[("a", 1), ("a", 1)]);
        state.outcomes[0] = Some(not_attempted());
        state.outcomes[1] = failure(ErrorClass::Transient);
        let r = reschedule(&state, &config);
        assert!(r.dead, "max attempts 1: the transient failure counts");
    }

    #[test]
    fn a_refused_record_is_split_off_and_the_rest_retried() {
        let mut state = job(0, &[("a", 1), ("a", 2), ("a", 3)]);
        state.outcomes[0] = failure(ErrorClass::Permanent);
        state.outcomes[1] = failure(ErrorClass::Throttled);
        let r = reschedule(&state, &WorkerConfig::default());
        assert!(!r.dead);
        let (records, count) = r.records.unwrap();
        assert_eq!(count, 1);
        assert_eq!(
            decode_records(&records).unwrap()[0].id,
            state.records.as_ref().unwrap()[1].id
        );
        let split = r.split_dead.unwrap();
        assert_eq!(split.event_count, 1);
        assert_eq!(
            decode_records(&split.records).unwrap()[0].id,
            state.records.as_ref().unwrap()[0].id
        );
        assert!(
            split.last_error.starts_with("permanently refused"),
            "{}",
            split.last_error
        );
    }

    #[test]
    fn corrupt_jobs_are_dead_with_the_reason() {
        let state = JobState::decode(Claimed {
            id: JobId(9),
            priority: 20,
            attempts: 0,
            transient_failures: 0,
            records: "[{\"id\":".into(),
            created_at: OffsetDateTime::now_utc(),
        });
        let r = reschedule(&state, &WorkerConfig::default());
        assert!(
            r.dead && r.records.is_none() && r.last_error.contains("corrupt"),
            "{r:?}"
        );
    }
}
