//! The job table: one module per backend behind the small [`Backend`] trait.
//!
//! A job holds the records of one transaction's events that share a priority and run-at time.
//! Its `records` column is JSON text, `[{"id","stream","partition_key","data"}, ...]`, where
//! `data` is each event's exact serialized bytes, embedded as raw JSON. It is stored as text,
//! never as `jsonb`, so the bytes read back are the bytes validated (invariant 3).

pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::Error;
use crate::event::{EventId, Prepared};

/// A boxed, sendable future, as the backends return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The id of a job row.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A job about to be inserted.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Lower runs first.
    pub priority: i32,
    /// When it becomes due; `None` is now.
    pub run_at: Option<OffsetDateTime>,
    /// How many records `records` holds.
    pub event_count: i32,
    /// The encoded records (see the module docs).
    pub records: String,
}

/// A job row as stored.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Lower runs first.
    pub priority: i32,
    /// When it is next due.
    pub run_at: OffsetDateTime,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// The last delivery error, if any.
    pub last_error: Option<String>,
    /// When it was given up on, if it was.
    pub dead_at: Option<OffsetDateTime>,
    /// When it was inserted.
    pub created_at: OffsetDateTime,
    /// How many records it holds.
    pub event_count: i32,
    /// The encoded records (see the module docs); decode with [`Job::records`].
    pub records: String,
}

impl Job {
    /// Decodes the records this job holds.
    pub fn records(&self) -> Result<Vec<StoredRecord>, Error> {
        decode_records(&self.records).map_err(|message| Error::CorruptJob {
            job_id: self.id.0,
            message,
        })
    }
}

/// One event as stored in a job: where it goes and its exact bytes.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredRecord {
    /// The event id.
    pub id: EventId,
    /// The Kinesis stream.
    pub stream: String,
    /// The Kinesis partition key.
    pub partition_key: String,
    /// The record's data: the event's JSON exactly as validated.
    pub data: Box<RawValue>,
}

impl StoredRecord {
    /// The record's data bytes.
    pub fn data(&self) -> &[u8] {
        self.data.get().as_bytes()
    }
}

/// Encodes events into the `records` column format.
pub(crate) fn encode_records<'a>(events: impl IntoIterator<Item = &'a Prepared>) -> String {
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(event.id.to_string().as_bytes());
        out.extend_from_slice(b"\",\"stream\":");
        serde_json::to_writer(&mut out, &event.stream).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"partition_key\":");
        serde_json::to_writer(&mut out, &event.partition_key)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(event.data.as_bytes());
        out.push(b'}');
    }
    out.push(b']');
    String::from_utf8(out).expect("JSON written from strings is UTF-8")
}

/// Decodes the `records` column; the message says what is wrong.
pub fn decode_records(text: &str) -> Result<Vec<StoredRecord>, String> {
    serde_json::from_str(text).map_err(|e| format!("records are not decodable: {e}"))
}

/// Groups staged events into jobs: one per distinct (priority, run-at), in first-seen order.
pub(crate) fn group(staged: &[Prepared]) -> Vec<NewJob> {
    let mut groups: Vec<(i32, Option<OffsetDateTime>, Vec<&Prepared>)> = Vec::new();
    for event in staged {
        match groups
            .iter_mut()
            .find(|(priority, run_at, _)| *priority == event.priority && *run_at == event.run_at)
        {
            Some((_, _, events)) => events.push(event),
            None => groups.push((event.priority, event.run_at, vec![event])),
        }
    }
    groups
        .into_iter()
        .map(|(priority, run_at, events)| NewJob {
            priority,
            run_at,
            event_count: events.len() as i32,
            records: encode_records(events),
        })
        .collect()
}

/// A migration: a version, a name, and its SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// FNV-1a, stable across Rust versions, to notice an applied migration that was edited.
    pub fn checksum(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Checks applied migrations against the embedded ones; returns those still to apply.
pub(crate) fn pending(
    all: &'static [Migration],
    applied: &[(i64, String)],
) -> Result<Vec<&'static Migration>, Error> {
    let mut todo = Vec::new();
    for migration in all {
        match applied.iter().find(|(v, _)| *v == migration.version) {
            Some((_, checksum)) if *checksum != migration.checksum() => {
                return Err(Error::Migration(format!(
                    "migration {} ({}) was changed after it was applied",
                    migration.version, migration.description
                )));
            }
            Some(_) => {}
            None => todo.push(migration),
        }
    }
    if let Some((version, _)) = applied
        .iter()
        .find(|(v, _)| !all.iter().any(|m| m.version == *v))
    {
        return Err(Error::Migration(format!(
            "the database has migration {version}, which this version of journaled does not know: is a newer version deployed?"
        )));
    }
    Ok(todo)
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database journaled can keep its jobs in: PostgreSQL or SQLite.
///
/// Sealed: the SQL for each backend lives in this crate.
pub trait Backend: sqlx::Database + sealed::Sealed {
    /// Inserts jobs on this connection (in the caller's transaction) and returns their ids.
    fn insert_jobs<'c>(
        conn: &'c mut Self::Connection,
        jobs: &'c [NewJob],
    ) -> BoxFuture<'c, Result<Vec<JobId>, Error>>;

    /// Creates or updates journaled's tables; running it again is a no-op.
    fn migrate(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<(), Error>>;

    /// All job rows, oldest first (for status, tests and examples).
    fn jobs(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<Vec<Job>, Error>>;
}

/// Runs journaled's migrations on `pool`. Tracked in journaled's own table, so the
/// application's own migrator never sees them; safe to run concurrently and repeatedly.
pub async fn migrate<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<(), Error> {
    DB::migrate(pool).await
}
