//! Ordered keys as the worker and the operator see them: where each key's delivery stands, and
//! the keys parked on a record refused for good.

use time::OffsetDateTime;

use super::{Backend, JobId, Trace};
use crate::Error;

/// A key whose delivery stopped at a record refused for good: later records of the key wait
/// until `journaled retry --key` or `journaled skip --key`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParkedKey {
    /// The stream.
    pub stream: String,
    /// The partition key.
    pub partition_key: String,
    /// The sequence of the refused record.
    pub sequence: i64,
    /// The refused event.
    pub event_id: String,
    /// Why it was refused.
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

/// Sends a parked key's refused record again: its dead job is made due, then the key is
/// unparked, and its later records follow once it is delivered. Returns what the key was
/// parked on. Refused while no dead job holds the record (a worker still settling it).
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
    let revived = match dead_job_of(pool, &parked).await? {
        Some(job) => DB::retry(pool, Some(job)).await? == 1,
        None => false,
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

/// Unparks a key past its refused record, which stays dead-lettered in its dead job: the key's
/// later records flow. Returns what the key was parked on.
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
    match DB::unpark(pool, stream, partition_key, true).await? {
        Some(parked) => Ok(parked),
        None => skip_missing(pool, stream, partition_key).await,
    }
}

/// Moves a key that is not parked past a next sequence that no live job holds.
async fn skip_missing<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
) -> Result<ParkedKey, Error> {
    let not_parked = || Error::NotParked {
        stream: stream.to_owned(),
        partition_key: partition_key.to_owned(),
    };
    let key = [(stream.to_owned(), partition_key.to_owned())];
    let (delivered, parked) = DB::key_positions(pool, &key)
        .await?
        .first()
        .copied()
        .unwrap_or((0, false));
    let moved_meanwhile = || Error::KeyMoved {
        stream: stream.to_owned(),
        partition_key: partition_key.to_owned(),
    };
    if parked {
        return Err(moved_meanwhile()); // parked since: `skip --key` again skips its record
    }
    let next = delivered + 1;
    let needle = super::records::key_needle(stream, partition_key);
    let mut waiting = false;
    let mut dead_holder = None;
    let mut unreadable = Vec::new();
    for job in DB::jobs_mentioning(pool, &needle).await? {
        let Ok(records) = super::decode_records(&job.records) else {
            if !job.dead {
                // A worker has not settled it yet: it may hold the sequence.
                return Err(Error::UnsettledJob {
                    stream: stream.to_owned(),
                    partition_key: partition_key.to_owned(),
                    job: job.id.0,
                });
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
                    return Err(Error::SequenceLive {
                        stream: stream.to_owned(),
                        partition_key: partition_key.to_owned(),
                        sequence,
                        job: job.id.0,
                    });
                }
                Some(sequence) if sequence == next => {
                    dead_holder = Some((job.id, record.id.to_string()));
                }
                Some(sequence) if sequence > next && !job.dead => waiting = true,
                _ => {}
            }
        }
    }
    if !waiting {
        // Nothing waits behind it: skipping would drop a sequence still to be committed.
        return Err(not_parked());
    }
    // From `delivered` to `next` only: if a worker moved the key meanwhile, nothing changes.
    let moved =
        DB::advance_keys(pool, &[(stream.to_owned(), partition_key.to_owned(), next)]).await?;
    if moved == 0 {
        return Err(moved_meanwhile());
    }
    let (event_id, reason) = match dead_holder {
        Some((job, event)) => (
            event,
            format!(
                "sequence {next} was in dead job {job}: it stays there, and is not sent if that job is retried (the key is past it)"
            ),
        ),
        None if !unreadable.is_empty() => (
            String::new(),
            format!(
                "sequence {next} was in no readable job: in dead unreadable job(s) {}, or deleted",
                unreadable.join(", ")
            ),
        ),
        None => (
            String::new(),
            format!("sequence {next} was in no job (its job was deleted)"),
        ),
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

async fn dead_job_of<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    parked: &ParkedKey,
) -> Result<Option<JobId>, Error> {
    let Ok(id) = parked.event_id.parse() else {
        return Ok(None);
    };
    Ok(match DB::trace(pool, crate::EventId(id)).await? {
        Trace::Dead(job) => Some(job.job_id),
        _ => None,
    })
}
