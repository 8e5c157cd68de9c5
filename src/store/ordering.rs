//! Ordered keys as the worker and the operator see them: where each key's delivery stands, and
//! the keys parked on a record refused for good or lost (its job deleted, or dead).

use time::OffsetDateTime;

use super::{Backend, JobId, Trace};
use crate::Error;

/// A key whose delivery stopped at a record refused for good, or at a sequence the worker found
/// lost (in a dead job, or in none): later records of the key wait until `journaled retry
/// --key` or `journaled skip --key`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParkedKey {
    /// The stream.
    pub stream: String,
    /// The partition key.
    pub partition_key: String,
    /// The sequence of the refused record.
    pub sequence: i64,
    /// The refused event; empty when no job holds the sequence.
    pub event_id: String,
    /// Why the key is parked.
    pub reason: String,
    /// When the key was parked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub parked_at: Option<OffsetDateTime>,
}

/// Parses `STREAM/KEY` (the key may itself contain `/`; the stream may not).
pub fn parse_key(text: &str) -> Result<(String, String), Error> {
    match text.split_once('/') {
        Some((stream, key)) if !stream.is_empty() && !key.is_empty() => {
            Ok((stream.to_owned(), key.to_owned()))
        }
        _ => Err(Error::Config(format!(
            "`{text}` is not STREAM/KEY (a stream name, a slash, a partition key)"
        ))),
    }
}

/// Every parked key, oldest first.
pub async fn parked_keys<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<Vec<ParkedKey>, Error> {
    DB::parked_keys(pool).await
}

/// Sends a parked key's record again: its dead job is made due (or, made live already, left
/// as it is), then the key is unparked, and its later records follow once it is delivered.
/// Returns what the key was parked on. Refused while no job holds the record: a worker still
/// settling it ([`Error::RecordNotDead`]), or a sequence whose job was deleted
/// ([`Error::RecordGone`]: `skip_key` moves past it).
pub async fn retry_key<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
) -> Result<ParkedKey, Error> {
    let parked = DB::parked_keys(pool)
        .await?
        .into_iter()
        .find(|k| k.stream == stream && k.partition_key == partition_key)
        .ok_or_else(|| Error::NotParked {
            stream: stream.to_owned(),
            partition_key: partition_key.to_owned(),
        })?;
    if parked.event_id.is_empty() {
        // Parked on a sequence no job holds (see `park_if_missing`): nothing to send again.
        return Err(Error::RecordGone {
            stream: stream.to_owned(),
            partition_key: partition_key.to_owned(),
            sequence: parked.sequence,
        });
    }
    let revived = match traced_job(pool, &parked).await? {
        Some(Trace::Dead(job)) => DB::retry(pool, Some(job.job_id)).await? == 1,
        // Made live again (`journaled retry JOB`) after the key parked on it: it only needs
        // the key unparked.
        Some(Trace::Pending(_)) => true,
        _ => false,
    };
    if !revived {
        return Err(Error::RecordNotDead {
            stream: stream.to_owned(),
            partition_key: partition_key.to_owned(),
            event_id: parked.event_id,
        });
    }
    unpark(pool, stream, partition_key, false).await
}

/// Unparks a key past its parked record, which stays dead-lettered in its dead job (if any):
/// the key's later records flow. Returns what the key was parked on. Refused with
/// [`Error::ParkedRecordLive`] while a live job holds that record (it was made live again
/// after the key parked: `retry_key` unparks the key so that it is sent).
///
/// A key that is not parked but whose records wait for a sequence no live job holds (its job
/// was deleted, or is dead because it could not be read) is moved past that sequence, so that
/// the records waiting behind it flow; the returned `reason` says where the sequence was.
/// Refused with [`Error::SequenceLive`] while a live job holds it, [`Error::UnsettledJob`]
/// while a live job that mentions the key cannot be read, [`Error::NotParked`] when no record
/// of the key waits behind it, and [`Error::KeyMoved`] when a worker moved or parked the key
/// meanwhile. This reads every job that mentions the key: an operator's command, not a hot
/// path.
pub async fn skip_key<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
) -> Result<ParkedKey, Error> {
    let parked = DB::parked_keys(pool)
        .await?
        .into_iter()
        .find(|k| k.stream == stream && k.partition_key == partition_key);
    if let Some(parked) = parked {
        // Its record made live again (`journaled retry JOB`): skipping would count it as
        // delivered and it would never be sent.
        if let Next::Live { sequence, job } =
            locate_next(pool, stream, partition_key, parked.sequence - 1).await?
        {
            return Err(Error::ParkedRecordLive {
                stream: stream.to_owned(),
                partition_key: partition_key.to_owned(),
                sequence,
                job: job.0,
            });
        }
    }
    match DB::unpark(pool, stream, partition_key, true).await? {
        Some(parked) => Ok(parked),
        None => skip_missing(pool, stream, partition_key).await,
    }
}

/// Where the sequence a key's waiting records need stands, as one scan of the jobs that
/// mention the key finds it.
enum Next {
    /// A live job holds it: it will be delivered (or park the key if refused).
    Live { sequence: i64, job: JobId },
    /// A live job that mentions the key cannot be read: it may hold it.
    Unsettled { job: JobId },
    /// No record of the key waits behind it.
    NothingWaits,
    /// No live job holds it, and later records of the key wait: it is lost (deleted, or in a
    /// dead job), the key stuck behind it.
    Missing {
        sequence: i64,
        /// The dead job holding it, and its event.
        dead: Option<(JobId, String)>,
        /// Dead jobs that mention the key but cannot be read.
        unreadable: Vec<String>,
    },
}

impl Next {
    /// Why a key is held back by a missing sequence, and the event (empty when no job holds
    /// it).
    fn missing_reason(
        sequence: i64,
        dead: &Option<(JobId, String)>,
        unreadable: &[String],
    ) -> (String, String) {
        match dead {
            Some((job, event)) => (
                event.clone(),
                format!("sequence {sequence} is in dead job {job}"),
            ),
            None if !unreadable.is_empty() => (
                String::new(),
                format!(
                    "sequence {sequence} is in no readable job: in dead unreadable job(s) {}, or deleted",
                    unreadable.join(", ")
                ),
            ),
            None => (
                String::new(),
                format!("sequence {sequence} is in no job (its job was deleted)"),
            ),
        }
    }
}

/// Reads every job that mentions (stream, key) — a scan of the job table — to find the
/// sequence after `delivered`.
async fn locate_next<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
    delivered: i64,
) -> Result<Next, Error> {
    let next = delivered + 1;
    let needle = super::records::key_needle(stream, partition_key);
    let mut waiting = false;
    let mut dead = None;
    let mut unreadable = Vec::new();
    for job in DB::jobs_mentioning(pool, &needle).await? {
        let Ok(records) = super::decode_records(&job.records) else {
            if !job.dead {
                // A worker has not settled it yet: it may hold the sequence.
                return Ok(Next::Unsettled { job: job.id });
            }
            unreadable.push(job.id.to_string());
            continue;
        };
        for record in records
            .iter()
            .filter(|r| r.stream == stream && r.partition_key == partition_key)
        {
            match record.sequence {
                Some(sequence) if sequence == next && !job.dead => {
                    return Ok(Next::Live {
                        sequence,
                        job: job.id,
                    });
                }
                Some(sequence) if sequence == next => {
                    dead = Some((job.id, record.id.to_string()));
                }
                Some(sequence) if sequence > next && !job.dead => waiting = true,
                _ => {}
            }
        }
    }
    Ok(if waiting {
        Next::Missing {
            sequence: next,
            dead,
            unreadable,
        }
    } else {
        Next::NothingWaits
    })
}

/// Where (stream, key) stands: its delivered sequence, and whether it is parked.
async fn position<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
) -> Result<(i64, bool), Error> {
    let key = [(stream.to_owned(), partition_key.to_owned())];
    Ok(DB::key_positions(pool, &key)
        .await?
        .first()
        .copied()
        .unwrap_or((0, false)))
}

/// Moves a key that is not parked past a next sequence that no live job holds.
async fn skip_missing<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
) -> Result<ParkedKey, Error> {
    let (delivered, parked) = position(pool, stream, partition_key).await?;
    let moved_meanwhile = || Error::KeyMoved {
        stream: stream.to_owned(),
        partition_key: partition_key.to_owned(),
    };
    if parked {
        return Err(moved_meanwhile()); // parked since: `skip --key` again skips its record
    }
    let (next, dead, unreadable) = match locate_next(pool, stream, partition_key, delivered).await?
    {
        Next::Live { sequence, job } => {
            return Err(Error::SequenceLive {
                stream: stream.to_owned(),
                partition_key: partition_key.to_owned(),
                sequence,
                job: job.0,
            });
        }
        Next::Unsettled { job } => {
            return Err(Error::UnsettledJob {
                stream: stream.to_owned(),
                partition_key: partition_key.to_owned(),
                job: job.0,
            });
        }
        // Nothing waits behind it: skipping would drop a sequence still to be committed.
        Next::NothingWaits => {
            return Err(Error::NotParked {
                stream: stream.to_owned(),
                partition_key: partition_key.to_owned(),
            });
        }
        Next::Missing {
            sequence,
            dead,
            unreadable,
        } => (sequence, dead, unreadable),
    };
    // From `delivered` to `next` only: if a worker moved the key meanwhile, nothing changes.
    let moved =
        DB::advance_keys(pool, &[(stream.to_owned(), partition_key.to_owned(), next)]).await?;
    if moved == 0 {
        return Err(moved_meanwhile());
    }
    let (event_id, mut reason) = Next::missing_reason(next, &dead, &unreadable);
    reason = match dead {
        Some(_) => format!(
            "{reason}: it stays there, and is not sent if that job is retried (the key is past it)"
        ),
        None => reason,
    };
    tracing::warn!(stream, partition_key, sequence = next, %reason, "skipped a missing sequence");
    Ok(ParkedKey {
        stream: stream.to_owned(),
        partition_key: partition_key.to_owned(),
        sequence: next,
        event_id,
        reason,
        parked_at: None,
    })
}

/// Parks (stream, key) when its records wait behind a sequence after `delivered` that no live
/// job holds (its job was deleted, or is dead), so that `journaled status`, the parked-keys
/// gauge and `retry --key` / `skip --key` see it. Returns the parking, or `None` when the key
/// moved, is parked already, or its next sequence is live or may be. A scan of the job
/// table: the worker calls it rarely (see [`crate::WorkerConfig::gap_check_after`]).
#[cfg_attr(not(feature = "worker"), allow(dead_code))]
pub(crate) async fn park_if_missing<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
    delivered: i64,
) -> Result<Option<ParkedKey>, Error> {
    if position(pool, stream, partition_key).await? != (delivered, false) {
        return Ok(None);
    }
    let Next::Missing {
        sequence,
        dead,
        unreadable,
    } = locate_next(pool, stream, partition_key, delivered).await?
    else {
        return Ok(None);
    };
    // A worker advances a key before it deletes the delivered record's job: a key still at
    // `delivered` after the scan did not have its next record delivered during it.
    if position(pool, stream, partition_key).await? != (delivered, false) {
        return Ok(None);
    }
    let (event_id, reason) = Next::missing_reason(sequence, &dead, &unreadable);
    let reason = format!(
        "{reason}; later records of the key wait behind it ({})",
        if dead.is_some() {
            "`journaled retry --key` sends it, `skip --key` moves past it"
        } else {
            "`journaled skip --key` moves past it"
        }
    );
    let parked = ParkedKey {
        stream: stream.to_owned(),
        partition_key: partition_key.to_owned(),
        sequence,
        event_id,
        reason,
        parked_at: None,
    };
    Ok(DB::park_key(pool, &parked).await?.then_some(parked))
}

async fn unpark<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
    skip: bool,
) -> Result<ParkedKey, Error> {
    DB::unpark(pool, stream, partition_key, skip)
        .await?
        .ok_or_else(|| Error::NotParked {
            stream: stream.to_owned(),
            partition_key: partition_key.to_owned(),
        })
}

async fn traced_job<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    parked: &ParkedKey,
) -> Result<Option<Trace>, Error> {
    let Ok(id) = parked.event_id.parse() else {
        return Ok(None);
    };
    Ok(Some(DB::trace(pool, crate::EventId(id)).await?))
}
