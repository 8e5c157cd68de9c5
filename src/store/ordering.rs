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
pub async fn skip_key<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    stream: &str,
    partition_key: &str,
) -> Result<ParkedKey, Error> {
    unpark(pool, stream, partition_key, true).await
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
