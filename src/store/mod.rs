//! The job table: one module per backend behind the small [`Backend`] trait.
//!
//! A job holds the records of one transaction's events that share a priority and run-at time.
//! Its `records` column is JSON text, `[{"id","stream","partition_key","data"}, ...]`, where
//! `data` is each event's exact serialized bytes, embedded as raw JSON. It is stored as text,
//! never as `jsonb`, so the bytes read back are the bytes validated (invariant 3).

/// Implements [`Backend`] for a database by boxing the free functions of the same names in the
/// module where it is invoked (`insert_jobs`, `migrate`, `jobs`, `claim`, `begin`,
/// `begin_with_context`, `set_context`, `announce`, `complete`, `reschedule`, `release`,
/// `status`, `retry`, `wake_on_insert`): each backend module holds only its SQL.
macro_rules! impl_backend {
    ($db:ty, $conn:ty, $pool:ty) => {
        impl $crate::store::Backend for $db {
            fn insert_jobs<'c>(
                conn: &'c mut $conn,
                jobs: &'c [$crate::store::NewJob],
            ) -> $crate::store::BoxFuture<'c, Result<Vec<$crate::store::JobId>, $crate::Error>>
            {
                Box::pin(insert_jobs(conn, jobs))
            }
            fn insert_jobs_taking_sequences<'c>(
                conn: &'c mut $conn,
                keys: &'c [(String, String, i64)],
                jobs: &'c [$crate::store::NewJob],
                job_keys: &'c [Vec<i64>],
            ) -> $crate::store::BoxFuture<'c, Result<$crate::store::JobsAndBases, $crate::Error>>
            {
                Box::pin(insert_jobs_taking_sequences(conn, keys, jobs, job_keys))
            }
            fn number_sequences(
                pool: &$pool,
                wait: bool,
            ) -> $crate::store::BoxFuture<'_, Result<$crate::store::Numbered, $crate::Error>> {
                Box::pin(number_sequences(pool, wait))
            }
            fn key_positions<'a>(
                pool: &'a $pool,
                keys: &'a [(String, String)],
            ) -> $crate::store::BoxFuture<'a, Result<Vec<(i64, bool)>, $crate::Error>> {
                Box::pin(key_positions(pool, keys))
            }
            fn advance_keys<'a>(
                pool: &'a $pool,
                acked: &'a [(String, String, i64)],
            ) -> $crate::store::BoxFuture<'a, Result<u64, $crate::Error>> {
                Box::pin(advance_keys(pool, acked))
            }
            fn park_key<'a>(
                pool: &'a $pool,
                key: &'a $crate::store::ParkedKey,
            ) -> $crate::store::BoxFuture<'a, Result<bool, $crate::Error>> {
                Box::pin(park_key(pool, key))
            }
            fn parked_keys(
                pool: &$pool,
            ) -> $crate::store::BoxFuture<'_, Result<Vec<$crate::store::ParkedKey>, $crate::Error>>
            {
                Box::pin(parked_keys(pool))
            }
            fn unpark<'a>(
                pool: &'a $pool,
                stream: &'a str,
                partition_key: &'a str,
                skip: bool,
            ) -> $crate::store::BoxFuture<'a, Result<Option<$crate::store::ParkedKey>, $crate::Error>>
            {
                Box::pin(unpark(pool, stream, partition_key, skip))
            }
            fn jobs_mentioning<'a>(
                pool: &'a $pool,
                text: &'a str,
            ) -> $crate::store::BoxFuture<'a, Result<Vec<$crate::store::Mentioning>, $crate::Error>>
            {
                Box::pin(jobs_mentioning(pool, text))
            }
            fn migrate(pool: &$pool) -> $crate::store::BoxFuture<'_, Result<(), $crate::Error>> {
                Box::pin(migrate(pool))
            }
            fn jobs(
                pool: &$pool,
            ) -> $crate::store::BoxFuture<'_, Result<Vec<$crate::store::Job>, $crate::Error>> {
                Box::pin(jobs(pool))
            }
            fn claim<'a>(
                pool: &'a $pool,
                owner: &'a str,
                limit: i64,
                max_bytes: usize,
                lease: std::time::Duration,
            ) -> $crate::store::BoxFuture<'a, Result<Vec<$crate::store::Claimed>, $crate::Error>>
            {
                Box::pin(claim(pool, owner, limit, max_bytes, lease))
            }
            fn begin(
                pool: &$pool,
            ) -> $crate::store::BoxFuture<'_, Result<sqlx::Transaction<'static, $db>, $crate::Error>>
            {
                Box::pin(begin(pool))
            }
            fn begin_with_context<'a>(
                pool: &'a $pool,
                actor: &'a str,
                tags: &'a str,
            ) -> $crate::store::BoxFuture<'a, Result<sqlx::Transaction<'static, $db>, $crate::Error>>
            {
                Box::pin(begin_with_context(pool, actor, tags))
            }
            fn set_context<'c>(
                conn: &'c mut $conn,
                actor: &'c str,
                tags: &'c str,
            ) -> $crate::store::BoxFuture<'c, Result<(), $crate::Error>> {
                Box::pin(set_context(conn, actor, tags))
            }
            fn announce(
                pool: &$pool,
            ) -> Option<$crate::store::BoxFuture<'_, Result<(), $crate::Error>>> {
                announce(pool)
            }
            fn record_receipts<'a>(
                pool: &'a $pool,
                receipts: &'a [$crate::store::Receipt],
            ) -> $crate::store::BoxFuture<'a, Result<u64, $crate::Error>> {
                Box::pin(record_receipts(pool, receipts))
            }
            fn prune_receipts(
                pool: &$pool,
                retention: std::time::Duration,
                limit: i64,
            ) -> $crate::store::BoxFuture<'_, Result<u64, $crate::Error>> {
                Box::pin(prune_receipts(pool, retention, limit))
            }
            fn trace(
                pool: &$pool,
                event: $crate::EventId,
            ) -> $crate::store::BoxFuture<'_, Result<$crate::store::Trace, $crate::Error>> {
                Box::pin(trace(pool, event))
            }
            fn receipt_stats(
                pool: &$pool,
            ) -> $crate::store::BoxFuture<'_, Result<$crate::store::ReceiptStats, $crate::Error>>
            {
                Box::pin(receipt_stats(pool))
            }
            fn complete<'a>(
                pool: &'a $pool,
                owner: &'a str,
                ids: &'a [$crate::store::JobId],
            ) -> $crate::store::BoxFuture<'a, Result<u64, $crate::Error>> {
                Box::pin(complete(pool, owner, ids))
            }
            fn reschedule<'a>(
                pool: &'a $pool,
                owner: &'a str,
                job: &'a $crate::store::Reschedule,
            ) -> $crate::store::BoxFuture<'a, Result<bool, $crate::Error>> {
                Box::pin(reschedule(pool, owner, job))
            }
            fn release<'a>(
                pool: &'a $pool,
                owner: &'a str,
            ) -> $crate::store::BoxFuture<'a, Result<u64, $crate::Error>> {
                Box::pin(release(pool, owner))
            }
            fn status(
                pool: &$pool,
            ) -> $crate::store::BoxFuture<'_, Result<$crate::store::Status, $crate::Error>> {
                Box::pin(status(pool))
            }
            fn retry(
                pool: &$pool,
                job: Option<$crate::store::JobId>,
            ) -> $crate::store::BoxFuture<'_, Result<u64, $crate::Error>> {
                Box::pin(retry(pool, job))
            }
            fn wake_on_insert(
                pool: &$pool,
                notify: std::sync::Arc<tokio::sync::Notify>,
            ) -> Option<$crate::store::BoxFuture<'static, ()>> {
                wake_on_insert(pool, notify)
            }
        }
    };
}

mod migrate;
pub mod ordering;
#[cfg(feature = "postgres")]
pub mod postgres;
pub(crate) mod records;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use time::OffsetDateTime;

use serde::Deserialize;

use crate::Error;
pub use migrate::migrate;
pub(crate) use migrate::{Migration, pending};
pub use ordering::ParkedKey;
#[cfg(feature = "worker")]
pub(crate) use records::encode_stored;
pub(crate) use records::group;
pub use records::{MAX_JOB_BYTES, MAX_JOB_RECORDS};
pub use records::{StoredRecord, decode_records};

/// Turns "journaled's tables are missing" into [`Error::NotMigrated`]; other errors pass.
pub(crate) fn db_error(error: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &error {
        let message = db.message();
        let missing = message.contains("journaled.jobs")
            || message.contains("journaled.captures")
            || message.contains("\"journaled\"")
            || message.contains("\"jobs\"")
            || message.contains("no such table: journaled_");
        if missing && (message.contains("does not exist") || message.contains("no such table")) {
            return Error::NotMigrated;
        }
    }
    Error::Database(error)
}

/// A boxed, sendable future, as the backends return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A job whose records mention some text (see [`Backend::jobs_mentioning`]).
#[derive(Debug, Clone)]
pub struct Mentioning {
    /// The job.
    pub id: JobId,
    /// Its records, sequences filled.
    pub records: String,
    /// Whether it is dead.
    pub dead: bool,
}

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

/// The ids of jobs inserted, and per ordered key the sequence before the first it took, when
/// the writer takes them (SQLite; on PostgreSQL the worker numbers the jobs after the commit).
pub type JobsAndBases = (Vec<JobId>, Option<Vec<i64>>);

/// What a call of [`Backend::number_sequences`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Numbered {
    /// Jobs it numbered.
    pub jobs: u64,
    /// Whether some may be left: its rounds ran out, or another process was numbering.
    pub more: bool,
}

/// A job about to be inserted.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Lower runs first.
    pub priority: i32,
    /// When it becomes due, at a set time; `None` is now plus `delay`.
    pub run_at: Option<OffsetDateTime>,
    /// How long after the database's `now()` it becomes due; `None` is at once.
    pub delay: Option<std::time::Duration>,
    /// How many records `records` holds.
    pub event_count: i32,
    /// The length of `records` in bytes.
    pub bytes: i32,
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

/// A job claimed by a worker, under a lease.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Its id.
    pub id: JobId,
    /// Its priority.
    pub priority: i32,
    /// Failed deliveries so far.
    pub attempts: i32,
    /// Failed deliveries that count toward the attempt limit (transient errors).
    pub transient_failures: i32,
    /// The encoded records.
    pub records: String,
    /// When it was inserted (the commit time, near enough).
    pub created_at: OffsetDateTime,
}

/// What to write back for a job that was not fully delivered.
#[derive(Debug, Clone)]
pub struct Reschedule {
    /// The job.
    pub id: JobId,
    /// The records still to deliver, encoded, with their count; `None` leaves them as they are.
    pub records: Option<(String, i32)>,
    /// Failed deliveries, this one included.
    pub attempts: i32,
    /// Failed deliveries that count toward the attempt limit, this one included if transient.
    pub transient_failures: i32,
    /// How long after the database's `now()` to try again (the worker's clock is never used).
    pub delay: std::time::Duration,
    /// Why it failed.
    pub last_error: String,
    /// Give up: keep it, with its error, until `journaled retry`.
    pub dead: bool,
    /// Records refused for good, split off into a dead job of their own (same priority and
    /// created_at) so that the job's retryable records go on.
    pub split_dead: Option<DeadSplit>,
}

/// Records split off a job into a new dead job.
#[derive(Debug, Clone)]
pub struct DeadSplit {
    /// The encoded records.
    pub records: String,
    /// How many.
    pub event_count: i32,
    /// Why they were refused.
    pub last_error: String,
}

/// The queue at a glance, as `journaled status` shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Status {
    /// Jobs not yet delivered and not dead.
    pub pending_jobs: i64,
    /// Events in those jobs.
    pub pending_events: i64,
    /// Pending jobs due now (not leased, not backing off, not delayed).
    pub due_jobs: i64,
    /// Jobs a worker holds a lease on.
    pub leased_jobs: i64,
    /// Pending jobs not due yet for the first time: delayed by the application (`run_at`,
    /// `delay_secs`). They are not behind.
    pub delayed_jobs: i64,
    /// Jobs given up on.
    pub dead_jobs: i64,
    /// Events in those jobs.
    pub dead_events: i64,
    /// Seconds since the oldest pending event became due — its commit, or the end of its
    /// delay; events delayed into the future do not count. `None` when none is due.
    pub oldest_pending_age_secs: Option<f64>,
    /// Ordered keys parked on a record refused for good.
    pub parked_keys: i64,
}

/// Where one delivered event went, as the worker keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    /// The event.
    pub event_id: crate::EventId,
    /// Its stream.
    pub stream: String,
    /// Its partition key.
    pub partition_key: String,
    /// The shard `PutRecords` put it on, when the sink says.
    pub shard_id: Option<String>,
    /// Its sequence number in that shard (a decimal string), when the sink says.
    pub sequence_number: Option<String>,
    /// When its job was committed.
    #[serde(with = "time::serde::rfc3339")]
    pub job_created_at: OffsetDateTime,
    /// When it was acknowledged (set by the database when the receipt is written).
    #[serde(with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
    /// Failed deliveries of its job before this one.
    pub attempts: i32,
}

/// Where an event is, as `journaled trace` tells it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Trace {
    /// Published and acknowledged.
    Delivered(Receipt),
    /// In a job not yet delivered.
    Pending(TracedJob),
    /// In a job given up on; `journaled retry` brings it back.
    Dead(TracedJob),
    /// Never committed, or its receipt was pruned (or receipts are off).
    Unknown,
}

/// The job an event is in.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TracedJob {
    /// The job.
    pub job_id: JobId,
    /// Its priority.
    pub priority: i32,
    /// When it is next due.
    #[serde(with = "time::serde::rfc3339")]
    pub run_at: OffsetDateTime,
    /// Failed deliveries so far.
    pub attempts: i32,
    /// The last delivery error (the reason, for a dead job).
    pub last_error: Option<String>,
    /// When it was committed.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Deliveries over the receipts kept (the retention window).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReceiptStats {
    /// Events delivered.
    pub delivered_events: i64,
    /// Commit-to-acknowledged latency, median, in seconds.
    pub latency_p50_secs: Option<f64>,
    /// Commit-to-acknowledged latency, 99th percentile, in seconds.
    pub latency_p99_secs: Option<f64>,
    /// The oldest receipt kept.
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_delivered_at: Option<OffsetDateTime>,
}

/// Where `event` is: delivered, pending, dead or unknown.
pub async fn trace<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    event: crate::EventId,
) -> Result<Trace, Error> {
    DB::trace(pool, event).await
}

/// Delivered counts and latency percentiles over the receipts kept.
pub async fn receipt_stats<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<ReceiptStats, Error> {
    DB::receipt_stats(pool).await
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
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

    /// Inserts `jobs`, whose events take `count` sequences for each (stream, partition key,
    /// count) of `keys` (sorted, so that writers of several keys lock them in one order and
    /// never deadlock), in the caller's transaction, one statement. The jobs' records hold
    /// placeholders: U+0001, `k`, `.`, `n`, U+0001 stands for the `n`th sequence the statement
    /// takes of the job's own key number `k`, which is key number `job_keys[job][k]` of `keys`
    /// (see [`records::group_taking_sequences`]). Returns the job ids and, when this backend
    /// numbers at the writer, per key the sequence before the first taken.
    ///
    /// PostgreSQL takes no sequence here: the statement takes an advisory lock per key, held
    /// to the commit (so a key's jobs get ids in commit order), and stores the jobs unnumbered
    /// with their keys; the worker numbers them ([`Backend::number_sequences`]) and the
    /// placeholders are filled when a job is read (see [`fill_sequences`]). Reading, or even
    /// updating, a key's row in every writer's statement cost ordered commits 7–14 % of their
    /// throughput. SQLite (one writer at a time) takes the sequences from the keys' rows in a
    /// second statement and stores the records filled.
    fn insert_jobs_taking_sequences<'c>(
        conn: &'c mut Self::Connection,
        keys: &'c [(String, String, i64)],
        jobs: &'c [NewJob],
        job_keys: &'c [Vec<i64>],
    ) -> BoxFuture<'c, Result<JobsAndBases, Error>>;

    /// Numbers unnumbered ordered jobs (PostgreSQL; nothing to do on SQLite) in commit order
    /// per key and makes them due, in up to 8 rounds of up to 1,000 jobs; one process at a
    /// time: with `wait` it waits for another one numbering, without it leaves the work to
    /// that one.
    fn number_sequences(
        pool: &sqlx::Pool<Self>,
        wait: bool,
    ) -> BoxFuture<'_, Result<Numbered, Error>>;

    /// Where each ordered (stream, key) stands, in order: its last delivered sequence (0 when
    /// none) and whether it is parked.
    fn key_positions<'a>(
        pool: &'a sqlx::Pool<Self>,
        keys: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<Vec<(i64, bool)>, Error>>;

    /// Advances each (stream, key)'s delivered sequence from s-1 to s, in one statement, unless
    /// the key is parked (its position then stays where the parking put it); returns how many
    /// moved.
    fn advance_keys<'a>(
        pool: &'a sqlx::Pool<Self>,
        acked: &'a [(String, String, i64)],
    ) -> BoxFuture<'a, Result<u64, Error>>;

    /// Parks a key on its record `key.sequence` (refused for good, or missing), if the key is
    /// not parked and its last delivered sequence is the one before; returns whether it
    /// parked. A parked key keeps its first reason.
    fn park_key<'a>(
        pool: &'a sqlx::Pool<Self>,
        key: &'a ParkedKey,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// Parked keys, oldest first.
    fn parked_keys(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<Vec<ParkedKey>, Error>>;

    /// Unparks a key (with `skip`, its delivered sequence moves past the parked record);
    /// returns what it was parked on, `None` when it was not parked.
    fn unpark<'a>(
        pool: &'a sqlx::Pool<Self>,
        stream: &'a str,
        partition_key: &'a str,
        skip: bool,
    ) -> BoxFuture<'a, Result<Option<ParkedKey>, Error>>;

    /// Every job whose records text holds `text`, dead or not, oldest first, with its records
    /// as a worker would read them (sequences filled). A scan of the whole job table: for an
    /// operator's command (`journaled skip --key`) and the worker's rare look for a key's lost
    /// sequence (paced by `WorkerConfig::gap_check_after`), never for a hot path.
    fn jobs_mentioning<'a>(
        pool: &'a sqlx::Pool<Self>,
        text: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Mentioning>, Error>>;

    /// Creates or updates journaled's tables; running it again is a no-op.
    fn migrate(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<(), Error>>;

    /// All job rows, oldest first (for status, tests and examples).
    fn jobs(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<Vec<Job>, Error>>;

    /// Claims up to `limit` due jobs and about `max_bytes` of records (always at least one
    /// job), lowest priority value first, leasing them to `owner` for `lease`. First promotes
    /// the delayed, leased and backing-off jobs that fell due; then claims from the ready
    /// jobs alone, so the cost does not grow with jobs that are not due. Short statements: no
    /// lock outlives them.
    fn claim<'a>(
        pool: &'a sqlx::Pool<Self>,
        owner: &'a str,
        limit: i64,
        max_bytes: usize,
        lease: std::time::Duration,
    ) -> BoxFuture<'a, Result<Vec<Claimed>, Error>>;

    /// Begins the transaction a [`Journaled`](crate::Journaled) writes in: on SQLite
    /// `BEGIN IMMEDIATE`, so a read-then-write transaction never fails with "database is
    /// locked" when another connection wrote in between.
    fn begin(
        pool: &sqlx::Pool<Self>,
    ) -> BoxFuture<'_, Result<sqlx::Transaction<'static, Self>, Error>>;

    /// Keeps a delivery receipt for each delivered record, in one statement; a record already
    /// receipted keeps its first receipt. Returns how many were new.
    fn record_receipts<'a>(
        pool: &'a sqlx::Pool<Self>,
        receipts: &'a [Receipt],
    ) -> BoxFuture<'a, Result<u64, Error>>;

    /// Deletes up to `limit` receipts older than `retention`; returns how many.
    fn prune_receipts(
        pool: &sqlx::Pool<Self>,
        retention: std::time::Duration,
        limit: i64,
    ) -> BoxFuture<'_, Result<u64, Error>>;

    /// Where an event is: delivered (its receipt), pending or dead (its job), or unknown.
    fn trace(pool: &sqlx::Pool<Self>, event: crate::EventId)
    -> BoxFuture<'_, Result<Trace, Error>>;

    /// Delivered counts and latencies over the receipts kept.
    fn receipt_stats(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<ReceiptStats, Error>>;

    /// Begins like [`begin`](Self::begin), and tells capture triggers who acts: the
    /// transaction-local settings `journaled.actor` and `journaled.tags` (JSON), sent with the
    /// `BEGIN` in the same round trip (PostgreSQL). Where there is no capture (SQLite), a plain
    /// `begin`.
    #[doc(hidden)]
    fn begin_with_context<'a>(
        pool: &'a sqlx::Pool<Self>,
        actor: &'a str,
        tags: &'a str,
    ) -> BoxFuture<'a, Result<sqlx::Transaction<'static, Self>, Error>>;

    /// Sets those settings in the transaction open on `conn`; a no-op where there is no capture.
    #[doc(hidden)]
    fn set_context<'c>(
        conn: &'c mut Self::Connection,
        actor: &'c str,
        tags: &'c str,
    ) -> BoxFuture<'c, Result<(), Error>>;

    /// Tells workers in other processes that jobs were committed, outside any application
    /// transaction (PostgreSQL: one `NOTIFY`); `None` where the backend cannot (SQLite).
    fn announce(pool: &sqlx::Pool<Self>) -> Option<BoxFuture<'_, Result<(), Error>>>;

    /// Deletes delivered jobs that `owner` still holds; returns how many.
    fn complete<'a>(
        pool: &'a sqlx::Pool<Self>,
        owner: &'a str,
        ids: &'a [JobId],
    ) -> BoxFuture<'a, Result<u64, Error>>;

    /// Writes back a job that was not fully delivered, if `owner` still holds it.
    fn reschedule<'a>(
        pool: &'a sqlx::Pool<Self>,
        owner: &'a str,
        job: &'a Reschedule,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// Gives back every lease `owner` holds, due at once.
    fn release<'a>(pool: &'a sqlx::Pool<Self>, owner: &'a str)
    -> BoxFuture<'a, Result<u64, Error>>;

    /// The queue's figures.
    fn status(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, Result<Status, Error>>;

    /// Makes one job (dead, or pending and not leased), or every dead job, due now with no
    /// attempts.
    fn retry(pool: &sqlx::Pool<Self>, job: Option<JobId>) -> BoxFuture<'_, Result<u64, Error>>;

    /// Wakes `notify` whenever jobs are committed, where the backend can tell (PostgreSQL
    /// LISTEN/NOTIFY); `None` where it cannot, and the worker polls.
    fn wake_on_insert(
        pool: &sqlx::Pool<Self>,
        notify: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<BoxFuture<'static, ()>>;
}

/// The queue's figures (what `journaled status` prints).
pub async fn status<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<Status, Error> {
    DB::status(pool).await
}

/// Makes one job (dead or not), or every dead job, due now with its attempts reset; returns
/// how many jobs changed.
pub async fn retry<DB: Backend>(pool: &sqlx::Pool<DB>, job: Option<JobId>) -> Result<u64, Error> {
    DB::retry(pool, job).await
}

/// Appends `value` in decimal, without the formatting machinery (`write!` was a third of the
/// cost of describing a transaction's placeholders).
pub(crate) fn push_decimal(out: &mut String, value: i64) {
    out.push_str(decimal(value, &mut [0; 20]));
}

/// `value` in decimal, written into `digits`.
pub(crate) fn decimal(value: i64, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    std::str::from_utf8(&digits[at..]).expect("ASCII digits")
}

/// Fills a job's sequence placeholders (see [`Backend::insert_jobs_taking_sequences`]): `k.n`
/// becomes `bases[k] + n`. The message says what is wrong with a placeholder that cannot be filled.
pub fn fill_sequences(records: &str, bases: &[i64]) -> Result<String, String> {
    let p = crate::event::SEQUENCE_PLACEHOLDER;
    let mut filled = String::with_capacity(records.len());
    let mut rest = records;
    while let Some(at) = rest.find(p) {
        filled.push_str(&rest[..at]);
        let after = &rest[at + p.len_utf8()..];
        let end = after
            .find(p)
            .ok_or_else(|| "a sequence placeholder is not closed".to_owned())?;
        let placeholder = &after[..end];
        let sequence = placeholder
            .split_once('.')
            .and_then(|(k, n)| {
                let base = bases.get(k.parse::<usize>().ok()?)?;
                base.checked_add(n.parse::<i64>().ok()?)
            })
            .ok_or_else(|| {
                format!(
                    "the sequence placeholder {placeholder:?} names no key of the job's {} sequence bases",
                    bases.len()
                )
            })?;
        filled.push_str(&sequence.to_string());
        rest = &after[end + p.len_utf8()..];
    }
    filled.push_str(rest);
    Ok(filled)
}

/// A claimed or listed job's records with its sequences filled in, when it has bases; kept as
/// written when they cannot be filled, which decoding then reports as a corrupt job.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn with_sequences(records: String, bases: Option<Vec<i64>>) -> String {
    match bases {
        Some(bases) => fill_sequences(&records, &bases).unwrap_or(records),
        None => records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_match_to_string() {
        for value in [0, 1, -1, 9, 10, 42, -1234567, i64::MAX, i64::MIN, 1 << 40] {
            assert_eq!(decimal(value, &mut [0; 20]), value.to_string());
            let mut out = "x".to_owned();
            push_decimal(&mut out, value);
            assert_eq!(out, format!("x{value}"));
        }
    }

    #[test]
    fn placeholders_fill_from_their_jobs_own_bases() {
        let p = crate::event::SEQUENCE_PLACEHOLDER;
        let records = format!("a{p}0.1{p}b{p}0.1{p}c{p}1.4{p}");
        assert_eq!(fill_sequences(&records, &[40, 10]).unwrap(), "a41b41c14");
        assert_eq!(fill_sequences("plain", &[]).unwrap(), "plain");
    }

    #[test]
    fn placeholders_that_cannot_be_filled_say_why_and_are_kept() {
        let p = crate::event::SEQUENCE_PLACEHOLDER;
        let err = fill_sequences(&format!("a{p}0.1"), &[1]).unwrap_err();
        assert!(err.contains("not closed"), "{err}");
        for bad in ["1.1", "x.1", "0", "0.y", "0.9223372036854775807"] {
            let err = fill_sequences(&format!("a{p}{bad}{p}"), &[1]).unwrap_err();
            assert!(err.contains("names no key"), "{bad}: {err}");
        }
        let raw = format!("[{p}0.1{p}]");
        assert_eq!(with_sequences(raw.clone(), Some(vec![])), raw);
        assert_eq!(with_sequences(raw.clone(), Some(vec![6])), "[7]");
        assert_eq!(with_sequences(raw.clone(), None), raw);
    }
}
