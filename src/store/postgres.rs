//! PostgreSQL: the `journaled` schema, `journaled.jobs`, and `journaled.schema_migrations`.

use sqlx::{PgConnection, PgPool, Postgres, Row};
use time::OffsetDateTime;

use std::sync::Arc;
use std::time::Duration;

use super::ParkedKey;
use super::{
    BoxFuture, Claimed, Job, JobId, Migration, NewJob, Receipt, ReceiptStats, Reschedule, Status,
    Trace, TracedJob, db_error, pending, with_sequences,
};
use crate::Error;
use crate::EventId;

/// The channel a NOTIFY is sent on when jobs are inserted.
pub const NOTIFY_CHANNEL: &str = "journaled_jobs";

/// An arbitrary constant that serializes concurrent `migrate` calls.
const MIGRATION_LOCK: i64 = 0x6a6f_7572_6e61_6c64; // "journald"

pub(crate) static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "jobs",
        sql: include_str!("../../migrations/postgres/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        description: "ready queue, no NOTIFY trigger",
        sql: include_str!("../../migrations/postgres/0002_ready_queue.sql"),
    },
    Migration {
        version: 3,
        description: "capture: statement-level audit triggers",
        sql: include_str!("../../migrations/postgres/0003_capture.sql"),
    },
    Migration {
        version: 4,
        description: "delivery receipts",
        sql: include_str!("../../migrations/postgres/0004_receipts.sql"),
    },
    Migration {
        version: 5,
        description: "ordered keys' sequences",
        sql: include_str!("../../migrations/postgres/0005_key_sequences.sql"),
    },
    Migration {
        version: 6,
        description: "first due time",
        sql: include_str!("../../migrations/postgres/0006_due_at.sql"),
    },
    Migration {
        version: 7,
        description: "room for in-place updates of ordered keys' rows",
        sql: include_str!("../../migrations/postgres/0007_key_rows_fillfactor.sql"),
    },
    Migration {
        version: 8,
        description: "ordered jobs' sequence bases, filled on read",
        sql: include_str!("../../migrations/postgres/0008_job_sequence_bases.sql"),
    },
    Migration {
        version: 9,
        description: "ordered jobs numbered by the worker, in commit order",
        sql: include_str!("../../migrations/postgres/0009_numbered_by_the_worker.sql"),
    },
];

/// The jobs' priorities, set due times, delays (seconds) and event counts, as the arrays a
/// multi-row INSERT unnests.
type JobColumns = (
    Vec<i32>,
    Vec<Option<OffsetDateTime>>,
    Vec<Option<f64>>,
    Vec<i32>,
);

fn job_columns(jobs: &[NewJob]) -> JobColumns {
    (
        jobs.iter().map(|j| j.priority).collect(),
        jobs.iter().map(|j| j.run_at).collect(),
        jobs.iter()
            .map(|j| j.delay.map(|d| d.as_secs_f64()))
            .collect(),
        jobs.iter().map(|j| j.event_count).collect(),
    )
}

/// One job's own columns bound as `$1`–`$6`: priority, set due time, delay (seconds), event
/// count, bytes, records.
fn bind_job<'q>(
    query: sqlx::query::QueryScalar<'q, Postgres, i64, sqlx::postgres::PgArguments>,
    job: &'q NewJob,
) -> sqlx::query::QueryScalar<'q, Postgres, i64, sqlx::postgres::PgArguments> {
    query
        .bind(job.priority)
        .bind(job.run_at)
        .bind(job.delay.map(|d| d.as_secs_f64()))
        .bind(job.event_count)
        .bind(job.bytes)
        .bind(&job.records)
}

#[tracing::instrument(name = "journaled.insert_jobs", skip_all, fields(jobs = jobs.len()), err)]
async fn insert_jobs(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<JobId>, Error> {
    // Due times are the database's: `now()` plus the delay, never the application's clock.
    if let [job] = jobs {
        let insert = sqlx::query_scalar(
            "INSERT INTO journaled.jobs (priority, run_at, due_at, ready, event_count, bytes, records) \
             SELECT $1, r, r, r <= now(), $4, $5, $6 \
             FROM (SELECT coalesce($2, now() + make_interval(secs => coalesce($3, 0))) AS r) AS due \
             RETURNING id",
        );
        let id: i64 = bind_job(insert, job)
            .fetch_one(conn)
            .await
            .map_err(db_error)?;
        return Ok(vec![JobId(id)]);
    }
    // Every row in one statement, however many a large transaction needs.
    let (priorities, run_ats, delays, counts) = job_columns(jobs);
    let bytes: Vec<i32> = jobs.iter().map(|j| j.bytes).collect();
    let records: Vec<&str> = jobs.iter().map(|j| j.records.as_str()).collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO journaled.jobs (priority, run_at, due_at, ready, event_count, bytes, records) \
         SELECT p, r, r, r <= now(), c, b, d FROM ( \
             SELECT p, coalesce(a, now() + make_interval(secs => coalesce(dl, 0))) AS r, c, b, d, n \
             FROM UNNEST($1::int4[], $2::timestamptz[], $3::float8[], $4::int4[], $5::int4[], $6::text[]) \
                  WITH ORDINALITY AS t(p, a, dl, c, b, d, n)) AS due \
         ORDER BY n RETURNING id",
    )
    .bind(&priorities)
    .bind(&run_ats)
    .bind(&delays)
    .bind(&counts)
    .bind(&bytes)
    .bind(&records)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(ids.into_iter().map(JobId).collect())
}

/// The advisory key every writer of ordered events holds shared until it commits, or
/// exclusively when it has more keys than half of `max_locks_per_transaction` ("jordered";
/// migration 9's `journaled.lock_ordered_keys` decides which, and names it too).
const ORDERED_LOCK: i64 = 0x6a6f_7264_6572_6564;
/// The advisory key of the one process numbering ordered jobs at a time ("jnumbers").
const NUMBERING_LOCK: i64 = 0x6a6e_756d_6265_7273;

/// A (stream, key)'s advisory lock: FNV-1a over both (0xff, which UTF-8 never holds, between
/// them), the same in every process and every version, as two `int4` keys.
fn key_lock(stream: &str, key: &str) -> (i32, i32) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in stream.bytes().chain([0xff]).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ((hash >> 32) as u32 as i32, hash as u32 as i32)
}

/// What identifies one statement's jobs to the numbering worker: the 62 random bits at the
/// end of a UUIDv7.
fn statement_group() -> i64 {
    (uuid::Uuid::now_v7().as_u64_pair().1 & (u64::MAX >> 2)) as i64
}

/// Inserts ordered jobs unnumbered, one statement: the keys' advisory locks first (held until
/// the transaction ends: see migration 9), then the jobs, each with its own keys and the
/// statement's count for each, for the worker to number ([`number_sequences`]). Returns no
/// bases: they are the worker's to take.
#[tracing::instrument(name = "journaled.insert_jobs", skip_all, fields(jobs = jobs.len(), ordered_keys = keys.len()), err)]
async fn insert_jobs_taking_sequences(
    conn: &mut PgConnection,
    keys: &[(String, String, i64)],
    jobs: &[NewJob],
    job_keys: &[Vec<i64>],
) -> Result<super::JobsAndBases, Error> {
    let group = statement_group();
    if let ([(stream, key, count)], [job]) = (keys, jobs) {
        // The usual ordered transaction, one job of one key: two lock calls in one
        // subquery (evaluated in order, before the row and its id exist) and a plain row.
        let (hi, lo) = key_lock(stream, key);
        let insert = sqlx::query_scalar(
            "INSERT INTO journaled.jobs (priority, run_at, due_at, ready, event_count, bytes, records, \
                 sequence_group, sequence_streams, sequence_keys, sequence_counts) \
             SELECT $1, 'infinity', r, false, $4, $5, $6, $7, ARRAY[$8::text], ARRAY[$9::text], ARRAY[$10::int8] \
             FROM (SELECT pg_advisory_xact_lock_shared($11), pg_advisory_xact_lock($12, $13)) AS locked, \
                  (SELECT coalesce($2, now() + make_interval(secs => coalesce($3, 0))) AS r) AS due \
             RETURNING id",
        );
        let id: i64 = bind_job(insert, job)
            .bind(group)
            .bind(stream)
            .bind(key)
            .bind(count)
            .bind(ORDERED_LOCK)
            .bind(hi)
            .bind(lo)
            .fetch_one(conn)
            .await
            .map_err(db_error)?;
        return Ok((vec![JobId(id)], None));
    }
    // The keys' locks sorted (every writer takes them in one order) and without repeats; the
    // function takes the global key exclusively instead when there are too many.
    let mut locks: Vec<(i32, i32)> = keys.iter().map(|(s, k, _)| key_lock(s, k)).collect();
    locks.sort_unstable();
    locks.dedup();
    let (his, los): (Vec<i32>, Vec<i32>) = locks.into_iter().unzip();
    let (priorities, run_ats, delays, event_counts) = job_columns(jobs);
    let bytes: Vec<i32> = jobs.iter().map(|j| j.bytes).collect();
    let records: Vec<&str> = jobs.iter().map(|j| j.records.as_str()).collect();
    // Each job's own keys, flattened: (job, stream, key, count), the job 1-based.
    let mut own_jobs = Vec::new();
    let mut own_streams = Vec::new();
    let mut own_keys = Vec::new();
    let mut own_counts = Vec::new();
    for (j, own) in job_keys.iter().enumerate() {
        for &k in own {
            let (stream, key, count) = &keys[k as usize];
            own_jobs.push(j as i32 + 1);
            own_streams.push(stream.as_str());
            own_keys.push(key.as_str());
            own_counts.push(*count);
        }
    }
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO journaled.jobs (priority, run_at, due_at, ready, event_count, bytes, records, \
             sequence_group, sequence_streams, sequence_keys, sequence_counts) \
         SELECT p, CASE WHEN own.j IS NULL THEN r ELSE 'infinity' END, r, own.j IS NULL AND r <= now(), c, b, d, \
                CASE WHEN own.j IS NOT NULL THEN $7::int8 END, own.streams, own.keys, own.counts FROM ( \
             SELECT p, coalesce(a, now() + make_interval(secs => coalesce(dl, 0))) AS r, c, b, d, n \
             FROM UNNEST($1::int4[], $2::timestamptz[], $3::float8[], $4::int4[], $5::int4[], $6::text[]) \
                  WITH ORDINALITY AS t(p, a, dl, c, b, d, n)) AS due \
         CROSS JOIN (SELECT journaled.lock_ordered_keys($8, $9) AS locks) AS locked \
         LEFT JOIN ( \
             SELECT j, array_agg(s ORDER BY i) AS streams, array_agg(k ORDER BY i) AS keys, \
                    array_agg(n ORDER BY i) AS counts \
             FROM UNNEST($10::int4[], $11::text[], $12::text[], $13::int8[]) WITH ORDINALITY AS x(j, s, k, n, i) \
             GROUP BY j) AS own ON own.j = due.n \
         ORDER BY due.n \
         RETURNING id",
    )
    .bind(&priorities)
    .bind(&run_ats)
    .bind(&delays)
    .bind(&event_counts)
    .bind(&bytes)
    .bind(&records)
    .bind(group)
    .bind(&his)
    .bind(&los)
    .bind(&own_jobs)
    .bind(&own_streams)
    .bind(&own_keys)
    .bind(&own_counts)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok((ids.into_iter().map(JobId).collect(), None))
}

/// Unnumbered jobs numbered per round at most (a statement's jobs are never split: a larger
/// statement is numbered alone).
const NUMBER_BATCH: i64 = 1000;

/// An unnumbered job: id, statement, and its own keys with the statement's count for each.
type Unnumbered = (
    i64,
    i64,
    Option<Vec<String>>,
    Option<Vec<String>>,
    Option<Vec<i64>>,
);

/// Most numbering rounds one call makes (each a transaction of up to [`NUMBER_BATCH`] jobs).
const NUMBER_ROUNDS: usize = 8;

/// Numbers unnumbered ordered jobs (see migration 9) in id order, which is commit order for
/// each key: a whole statement's jobs at once, each key's events from the key's last sequence
/// on, and makes them due. One process at a time: with `wait`, it waits for the one numbering;
/// without, it leaves the work to it (and says there may be more).
#[tracing::instrument(name = "journaled.number_sequences", skip_all, fields(numbered), err)]
async fn number_sequences(pool: &PgPool, wait: bool) -> Result<super::Numbered, Error> {
    let mut done = super::Numbered::default();
    for round in 0..NUMBER_ROUNDS {
        let (numbered, more, contended) = number_round(pool, wait).await?;
        done.jobs += numbered;
        done.more = contended || (more && round + 1 == NUMBER_ROUNDS);
        if contended || !more {
            break;
        }
    }
    tracing::Span::current().record("numbered", done.jobs);
    Ok(done)
}

/// One numbering transaction; returns how many jobs it numbered, whether more may wait, and
/// whether another process held the numbering lock.
async fn number_round(pool: &PgPool, wait: bool) -> Result<(u64, bool, bool), Error> {
    let any: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM journaled.jobs WHERE sequence_group IS NOT NULL)",
    )
    .fetch_one(pool)
    .await
    .map_err(db_error)?;
    if !any {
        return Ok((0, false, false));
    }
    let mut tx = pool.begin().await?;
    let locked: bool = if wait {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(NUMBERING_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        true
    } else {
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(NUMBERING_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?
    };
    if !locked {
        return Ok((0, false, true));
    }
    let select = "SELECT id, sequence_group, sequence_streams, sequence_keys, sequence_counts \
                  FROM journaled.jobs WHERE sequence_group IS NOT NULL";
    let mut rows: Vec<Unnumbered> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{select} ORDER BY id LIMIT $1"
    )))
    .bind(NUMBER_BATCH)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let more = rows.len() as i64 == NUMBER_BATCH;
    if more {
        // A statement's jobs got their ids one by one, so other statements' jobs (of other
        // keys: a key's lock is held from before its statement's first id to its commit) may
        // lie between them, and the batch's end may cut any of its statements: take the rest
        // of each, so that every statement is numbered whole.
        let after = rows.last().expect("a full batch").0;
        let mut groups: Vec<i64> = rows.iter().map(|r| r.1).collect();
        groups.sort_unstable();
        groups.dedup();
        let rest: Vec<Unnumbered> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{select} AND sequence_group = ANY($1) AND id > $2 ORDER BY id"
        )))
        .bind(&groups)
        .bind(after)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        rows.extend(rest);
        rows.sort_unstable_by_key(|r| r.0);
    }
    let numbered = number(&mut tx, &rows).await?;
    tx.commit().await?;
    Ok((numbered, more, false))
}

/// Gives `rows` (unnumbered jobs in id order, whole statements) their bases, and the keys'
/// rows their last sequences, in the numbering transaction.
async fn number<'r>(conn: &mut PgConnection, rows: &'r [Unnumbered]) -> Result<u64, Error> {
    use std::collections::HashMap;
    // The keys' last sequences so far.
    let mut last: HashMap<(&str, &str), i64> = HashMap::new();
    let own = |row: &'r Unnumbered| {
        let (streams, keys, counts) = (&row.2, &row.3, &row.4);
        let streams = streams.as_deref().unwrap_or_default().iter();
        let keys = keys.as_deref().unwrap_or_default().iter();
        let counts = counts.as_deref().unwrap_or_default().iter();
        streams
            .zip(keys)
            .zip(counts)
            .map(|((s, k), n)| (s.as_str(), k.as_str(), *n))
    };
    for row in rows {
        for (stream, key, _) in own(row) {
            last.insert((stream, key), 0);
        }
    }
    let (streams, keys): (Vec<&str>, Vec<&str>) = last.keys().copied().unzip();
    let known: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT stream, partition_key, seq FROM journaled.key_sequences \
         WHERE (stream, partition_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
    )
    .bind(&streams)
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    for (stream, key, seq) in &known {
        if let Some(at) = last.get_mut(&(stream.as_str(), key.as_str())) {
            *at = *seq;
        }
    }
    // In id order, which is commit order per key: a statement's key takes its sequences the
    // first time one of the statement's jobs names it; its other jobs get the same base.
    let mut taken: HashMap<(i64, &str, &str), i64> = HashMap::new();
    let mut ids = Vec::with_capacity(rows.len());
    let mut starts = Vec::with_capacity(rows.len());
    let mut lens = Vec::with_capacity(rows.len());
    let mut bases = Vec::new();
    for row in rows {
        let (id, group) = (row.0, row.1);
        ids.push(id);
        starts.push(bases.len() as i32 + 1);
        let before = bases.len();
        for (stream, key, count) in own(row) {
            let base = *taken.entry((group, stream, key)).or_insert_with(|| {
                let at = last.get_mut(&(stream, key)).expect("every key was read");
                *at += count;
                *at - count
            });
            bases.push(base);
        }
        lens.push((bases.len() - before) as i32);
    }
    let numbered = sqlx::query(
        "UPDATE journaled.jobs j \
         SET sequence_bases = ($4::int8[])[t.s : t.s + t.l - 1], \
             sequence_group = NULL, sequence_streams = NULL, sequence_keys = NULL, sequence_counts = NULL, \
             run_at = j.due_at, ready = j.dead_at IS NULL AND j.due_at <= now() \
         FROM UNNEST($1::int8[], $2::int4[], $3::int4[]) AS t(id, s, l) \
         WHERE j.id = t.id AND j.sequence_group IS NOT NULL",
    )
    .bind(&ids)
    .bind(&starts)
    .bind(&lens)
    .bind(&bases)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?
    .rows_affected();
    let seqs: Vec<i64> = streams
        .iter()
        .zip(&keys)
        .map(|(stream, key)| last[&(*stream, *key)])
        .collect();
    sqlx::query(
        "INSERT INTO journaled.key_sequences AS k (stream, partition_key, seq) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[]) \
         ON CONFLICT (stream, partition_key) DO UPDATE SET seq = EXCLUDED.seq",
    )
    .bind(&streams)
    .bind(&keys)
    .bind(&seqs)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(numbered)
}

async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, Error> {
    Ok(pool.begin().await?)
}

/// `text` as a dollar-quoted SQL string, with a tag that does not occur in it: literal
/// whatever `standard_conforming_strings` says.
fn dollar_quoted(text: &str) -> String {
    let tag = (0..)
        .map(|n| format!("$j{n}$"))
        .find(|tag| !text.contains(tag.as_str()))
        .expect("some tag is free");
    format!("{tag}{text}{tag}")
}

/// `BEGIN` and the capture context in one simple query, so one round trip (no bind parameters
/// are allowed there, hence the quoting); `SET LOCAL` is a utility statement, not planned.
#[tracing::instrument(name = "journaled.begin", skip_all, err)]
async fn begin_with_context(
    pool: &PgPool,
    actor: &str,
    tags: &str,
) -> Result<sqlx::Transaction<'static, Postgres>, Error> {
    let begin = format!(
        "BEGIN; SET LOCAL journaled.actor = {}; SET LOCAL journaled.tags = {}",
        dollar_quoted(actor),
        dollar_quoted(tags)
    );
    Ok(pool.begin_with(sqlx::AssertSqlSafe(begin)).await?)
}

async fn set_context(conn: &mut PgConnection, actor: &str, tags: &str) -> Result<(), Error> {
    sqlx::query(
        "SELECT set_config('journaled.actor', $1, true), set_config('journaled.tags', $2, true)",
    )
    .bind(actor)
    .bind(tags)
    .execute(conn)
    .await?;
    Ok(())
}

/// One `NOTIFY`, in its own short transaction on a pooled connection: never inside an
/// application's transaction.
///
/// That transaction commits without waiting for its WAL flush (`synchronous_commit` off for
/// it alone): a `NOTIFY` takes an xid, so its commit would otherwise be one more flush for the
/// writers' server to wait on, and a notification lost in a crash costs nothing (workers
/// poll). Listeners hear it at the commit, before the flush.
fn announce(pool: &PgPool) -> Option<BoxFuture<'_, Result<(), Error>>> {
    Some(Box::pin(async move {
        sqlx::query("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')")
            .bind(NOTIFY_CHANNEL)
            .execute(pool)
            .await?;
        Ok(())
    }))
}

#[tracing::instrument(name = "journaled.migrate", skip_all, err)]
async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS journaled; \
         CREATE TABLE IF NOT EXISTS journaled.schema_migrations ( \
             version bigint PRIMARY KEY, \
             description text NOT NULL, \
             checksum text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<(i64, String)> =
        sqlx::query_as("SELECT version, checksum FROM journaled.schema_migrations")
            .fetch_all(&mut *tx)
            .await?;
    for migration in pending(MIGRATIONS, &applied)? {
        sqlx::raw_sql(migration.sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                Error::Migration(format!(
                    "{} ({}) failed: {e}",
                    migration.version, migration.description
                ))
            })?;
        sqlx::query(
            "INSERT INTO journaled.schema_migrations (version, description, checksum) VALUES ($1, $2, $3)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(migration.checksum())
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            version = migration.version,
            description = migration.description,
            "applied journaled migration"
        );
    }
    tx.commit().await?;
    Ok(())
}

/// A job's run-at time as listed: an unnumbered job's `run_at` is 'infinity' (which no
/// timestamp type reads) until the worker numbers it; it is due at `due_at`.
macro_rules! run_at {
    () => {
        "CASE WHEN sequence_group IS NULL THEN run_at ELSE due_at END AS run_at"
    };
}

async fn jobs(pool: &PgPool) -> Result<Vec<Job>, Error> {
    // Committed ordered jobs are listed numbered, as the worker will send them.
    while number_sequences(pool, true).await?.more {}
    let rows = sqlx::query(concat!(
        "SELECT id, priority, ",
        run_at!(),
        ", attempts, last_error, dead_at, created_at, event_count, records, sequence_bases \
             FROM journaled.jobs ORDER BY id"
    ))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Job {
                id: JobId(row.try_get("id")?),
                priority: row.try_get("priority")?,
                run_at: row.try_get("run_at")?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                dead_at: row.try_get("dead_at")?,
                created_at: row.try_get("created_at")?,
                event_count: row.try_get("event_count")?,
                records: with_sequences(row.try_get("records")?, row.try_get("sequence_bases")?),
            })
        })
        .collect()
}

/// Jobs promoted from waiting to ready per statement (the rest on the next claim).
const PROMOTE_BATCH: i64 = 1000;

#[tracing::instrument(name = "journaled.claim", skip_all, fields(limit, claimed), err)]
async fn claim(
    pool: &PgPool,
    owner: &str,
    limit: i64,
    max_bytes: usize,
    lease: Duration,
) -> Result<Vec<Claimed>, Error> {
    // Delayed, leased and backing-off jobs whose time came: a range scan of the waiting
    // index that stops at the first job not yet due.
    sqlx::query(
        "UPDATE journaled.jobs SET ready = true \
         WHERE id IN (SELECT id FROM journaled.jobs \
                      WHERE NOT ready AND dead_at IS NULL AND run_at <= now() \
                      ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(PROMOTE_BATCH)
    .execute(pool)
    .await
    .map_err(db_error)?;
    // Ready jobs only, by priority: the not-due backlog is in another index. The running
    // byte total keeps a claim near `max_bytes`; the first job is always taken.
    let rows = sqlx::query(
        "WITH picked AS ( \
             SELECT id, priority, bytes FROM journaled.jobs \
             WHERE ready \
             ORDER BY priority, id \
             LIMIT $1 \
             FOR UPDATE SKIP LOCKED), \
         sized AS ( \
             SELECT id, sum(bytes) OVER (ORDER BY priority, id) - bytes AS before FROM picked) \
         UPDATE journaled.jobs j \
         SET ready = false, \
             locked_by = $2, \
             locked_until = now() + make_interval(secs => $3), \
             run_at = now() + make_interval(secs => $3) \
         FROM sized WHERE j.id = sized.id AND (sized.before = 0 OR sized.before < $4) \
         RETURNING j.id, j.priority, j.attempts, j.transient_failures, j.records, j.sequence_bases, j.created_at",
    )
    .bind(limit)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    let mut claimed = rows
        .iter()
        .map(|row| {
            Ok(Claimed {
                id: JobId(row.try_get("id")?),
                priority: row.try_get("priority")?,
                attempts: row.try_get("attempts")?,
                transient_failures: row.try_get("transient_failures")?,
                records: with_sequences(row.try_get("records")?, row.try_get("sequence_bases")?),
                created_at: row.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    claimed.sort_by_key(|c| (c.priority, c.id));
    tracing::Span::current().record("limit", limit);
    tracing::Span::current().record("claimed", claimed.len());
    Ok(claimed)
}

#[tracing::instrument(name = "journaled.complete", skip_all, fields(jobs = ids.len()), err)]
async fn complete(pool: &PgPool, owner: &str, ids: &[JobId]) -> Result<u64, Error> {
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    Ok(
        sqlx::query("DELETE FROM journaled.jobs WHERE id = ANY($1) AND locked_by = $2")
            .bind(&ids)
            .bind(owner)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

#[tracing::instrument(name = "journaled.reschedule", skip_all, fields(job = job.id.0), err)]
async fn reschedule(pool: &PgPool, owner: &str, job: &Reschedule) -> Result<bool, Error> {
    // A short transaction (no network call inside): the update and the split-off dead job
    // happen together or not at all.
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE journaled.jobs SET records = coalesce($3, records), event_count = coalesce($4, event_count), \
             sequence_bases = CASE WHEN $3 IS NULL THEN sequence_bases END, \
             bytes = coalesce(octet_length($3), bytes), attempts = $5, \
             run_at = now() + make_interval(secs => $6), ready = false, \
             last_error = $7, dead_at = CASE WHEN $8 THEN now() END, \
             transient_failures = $9, locked_by = NULL, locked_until = NULL \
         WHERE id = $1 AND locked_by = $2",
    )
    .bind(job.id.0)
    .bind(owner)
    .bind(job.records.as_ref().map(|(records, _)| records.as_str()))
    .bind(job.records.as_ref().map(|(_, count)| *count))
    .bind(job.attempts)
    .bind(job.delay.as_secs_f64())
    .bind(&job.last_error)
    .bind(job.dead)
    .bind(job.transient_failures)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    if let Some(split) = &job.split_dead {
        sqlx::query(
            "INSERT INTO journaled.jobs (priority, run_at, due_at, ready, attempts, transient_failures, last_error, \
                 dead_at, created_at, event_count, bytes, records) \
             SELECT priority, now(), due_at, false, attempts, transient_failures, $2, now(), created_at, $3, octet_length($4), $4 \
             FROM journaled.jobs WHERE id = $1",
        )
        .bind(job.id.0)
        .bind(&split.last_error)
        .bind(split.event_count)
        .bind(&split.records)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

#[tracing::instrument(name = "journaled.release", skip_all, err)]
async fn release(pool: &PgPool, owner: &str) -> Result<u64, Error> {
    Ok(sqlx::query(
        "UPDATE journaled.jobs SET locked_by = NULL, locked_until = NULL, run_at = now(), ready = true \
         WHERE locked_by = $1 AND dead_at IS NULL",
    )
    .bind(owner)
    .execute(pool)
    .await?
    .rows_affected())
}

#[tracing::instrument(name = "journaled.status", skip_all, err)]
async fn status(pool: &PgPool) -> Result<Status, Error> {
    let row = sqlx::query(
        "SELECT \
           count(*) FILTER (WHERE dead_at IS NULL) AS pending_jobs, \
           coalesce(sum(event_count) FILTER (WHERE dead_at IS NULL), 0)::int8 AS pending_events, \
           count(*) FILTER (WHERE ready OR (dead_at IS NULL AND run_at <= now())) AS due_jobs, \
           count(*) FILTER (WHERE dead_at IS NULL AND locked_until > now()) AS leased_jobs, \
           count(*) FILTER (WHERE dead_at IS NULL AND due_at > now()) AS delayed_jobs, \
           count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead_jobs, \
           coalesce(sum(event_count) FILTER (WHERE dead_at IS NOT NULL), 0)::int8 AS dead_events, \
           extract(epoch FROM now() - min(due_at) FILTER (WHERE dead_at IS NULL AND due_at <= now()))::float8 AS oldest, \
           (SELECT count(*) FROM journaled.key_delivery WHERE parked_seq IS NOT NULL) AS parked \
         FROM journaled.jobs",
    )
    .fetch_one(pool)
    .await
    .map_err(db_error)?;
    Ok(Status {
        pending_jobs: row.try_get("pending_jobs")?,
        pending_events: row.try_get("pending_events")?,
        due_jobs: row.try_get("due_jobs")?,
        leased_jobs: row.try_get("leased_jobs")?,
        delayed_jobs: row.try_get("delayed_jobs")?,
        dead_jobs: row.try_get("dead_jobs")?,
        dead_events: row.try_get("dead_events")?,
        oldest_pending_age_secs: row.try_get("oldest")?,
        parked_keys: row.try_get("parked")?,
    })
}

#[tracing::instrument(name = "journaled.retry", skip_all, err)]
async fn retry(pool: &PgPool, job: Option<JobId>) -> Result<u64, Error> {
    let query = match job {
        Some(id) => sqlx::query(
            "UPDATE journaled.jobs SET dead_at = NULL, attempts = 0, transient_failures = 0, \
                 run_at = now(), ready = true, locked_by = NULL, locked_until = NULL \
             WHERE id = $1 AND (dead_at IS NOT NULL OR locked_until IS NULL OR locked_until < now()) \
               AND sequence_group IS NULL",
        )
        .bind(id.0),
        None => sqlx::query(
            "UPDATE journaled.jobs SET dead_at = NULL, attempts = 0, transient_failures = 0, \
                 run_at = now(), ready = true, locked_by = NULL, locked_until = NULL \
             WHERE dead_at IS NOT NULL AND sequence_group IS NULL",
        ),
    };
    Ok(query.execute(pool).await.map_err(db_error)?.rows_affected())
}

async fn listen(pool: PgPool, notify: Arc<tokio::sync::Notify>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; polling until it is back");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything committed while we were not listening is found by the next claim.
        notify.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => notify.notify_one(),
                Ok(None) => {
                    // The connection dropped; it reconnects on the next call.
                    notify.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}

fn wake_on_insert(
    pool: &PgPool,
    notify: Arc<tokio::sync::Notify>,
) -> Option<BoxFuture<'static, ()>> {
    Some(Box::pin(listen(pool.clone(), notify)))
}

#[tracing::instrument(name = "journaled.record_receipts", skip_all, fields(receipts = receipts.len()), err)]
async fn record_receipts(pool: &PgPool, receipts: &[Receipt]) -> Result<u64, Error> {
    if receipts.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = receipts.iter().map(|r| r.event_id.to_string()).collect();
    let streams: Vec<&str> = receipts.iter().map(|r| r.stream.as_str()).collect();
    let keys: Vec<&str> = receipts.iter().map(|r| r.partition_key.as_str()).collect();
    let shards: Vec<Option<&str>> = receipts.iter().map(|r| r.shard_id.as_deref()).collect();
    let sequences: Vec<Option<&str>> = receipts
        .iter()
        .map(|r| r.sequence_number.as_deref())
        .collect();
    let created: Vec<OffsetDateTime> = receipts.iter().map(|r| r.job_created_at).collect();
    let attempts: Vec<i32> = receipts.iter().map(|r| r.attempts).collect();
    Ok(sqlx::query(
        "INSERT INTO journaled.receipts \
             (event_id, stream, partition_key, shard_id, sequence_number, job_created_at, attempts) \
         SELECT e::uuid, s, k, sh, sq, c, a FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
                              $5::text[], $6::timestamptz[], $7::int4[]) AS t(e, s, k, sh, sq, c, a) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&streams)
    .bind(&keys)
    .bind(&shards)
    .bind(&sequences)
    .bind(&created)
    .bind(&attempts)
    .execute(pool)
    .await
    .map_err(db_error)?
    .rows_affected())
}

#[tracing::instrument(name = "journaled.prune_receipts", skip_all, err)]
async fn prune_receipts(pool: &PgPool, retention: Duration, limit: i64) -> Result<u64, Error> {
    // A bounded batch by the delivered_at index: no long lock, however many are due to go.
    Ok(sqlx::query(
        "DELETE FROM journaled.receipts WHERE event_id IN ( \
             SELECT event_id FROM journaled.receipts \
             WHERE delivered_at < now() - make_interval(secs => $1) \
             ORDER BY delivered_at LIMIT $2)",
    )
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(pool)
    .await
    .map_err(db_error)?
    .rows_affected())
}

async fn trace(pool: &PgPool, event: EventId) -> Result<Trace, Error> {
    let receipt = sqlx::query(
        "SELECT stream, partition_key, shard_id, sequence_number, job_created_at, delivered_at, attempts \
         FROM journaled.receipts WHERE event_id = $1::uuid",
    )
    .bind(event.to_string())
    .fetch_optional(pool)
    .await
    .map_err(db_error)?;
    if let Some(row) = receipt {
        return Ok(Trace::Delivered(Receipt {
            event_id: event,
            stream: row.try_get("stream")?,
            partition_key: row.try_get("partition_key")?,
            shard_id: row.try_get("shard_id")?,
            sequence_number: row.try_get("sequence_number")?,
            job_created_at: row.try_get("job_created_at")?,
            delivered_at: Some(row.try_get("delivered_at")?),
            attempts: row.try_get("attempts")?,
        }));
    }
    // The id as it is written in the records column.
    let needle = format!("{{\"id\":\"{event}\"");
    let job = sqlx::query(concat!(
        "SELECT id, priority, ",
        run_at!(),
        ", attempts, last_error, dead_at, created_at \
             FROM journaled.jobs WHERE strpos(records, $1) > 0 ORDER BY id LIMIT 1"
    ))
    .bind(&needle)
    .fetch_optional(pool)
    .await
    .map_err(db_error)?;
    let Some(row) = job else {
        return Ok(Trace::Unknown);
    };
    let dead_at: Option<OffsetDateTime> = row.try_get("dead_at")?;
    let job = TracedJob {
        job_id: JobId(row.try_get("id")?),
        priority: row.try_get("priority")?,
        run_at: row.try_get("run_at")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
    };
    Ok(if dead_at.is_some() {
        Trace::Dead(job)
    } else {
        Trace::Pending(job)
    })
}

async fn receipt_stats(pool: &PgPool) -> Result<ReceiptStats, Error> {
    let row = sqlx::query(
        "SELECT count(*) AS delivered, \
             percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - job_created_at)) AS p50, \
             percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM delivered_at - job_created_at)) AS p99, \
             min(delivered_at) AS oldest \
         FROM journaled.receipts",
    )
    .fetch_one(pool)
    .await
    .map_err(db_error)?;
    Ok(ReceiptStats {
        delivered_events: row.try_get("delivered")?,
        latency_p50_secs: row.try_get("p50")?,
        latency_p99_secs: row.try_get("p99")?,
        oldest_delivered_at: row.try_get("oldest")?,
    })
}

async fn key_positions(
    pool: &PgPool,
    keys: &[(String, String)],
) -> Result<Vec<(i64, bool)>, Error> {
    let streams: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let partition_keys: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let rows: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT t.o, coalesce(d.delivered, 0), d.parked_seq IS NOT NULL \
         FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS t(s, p, o) \
         LEFT JOIN journaled.key_delivery d ON d.stream = t.s AND d.partition_key = t.p \
         ORDER BY t.o",
    )
    .bind(&streams)
    .bind(&partition_keys)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(_, d, p)| (d, p)).collect())
}

async fn advance_keys(pool: &PgPool, acked: &[(String, String, i64)]) -> Result<u64, Error> {
    let streams: Vec<&str> = acked.iter().map(|k| k.0.as_str()).collect();
    let partition_keys: Vec<&str> = acked.iter().map(|k| k.1.as_str()).collect();
    let sequences: Vec<i64> = acked.iter().map(|k| k.2).collect();
    // A key not known yet starts at 0: only its sequence 1 may create it.
    Ok(sqlx::query(
        "INSERT INTO journaled.key_delivery AS d (stream, partition_key, delivered) \
         SELECT s, p, q FROM UNNEST($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS t(s, p, q, o) \
         WHERE q = 1 OR EXISTS (SELECT 1 FROM journaled.key_delivery x WHERE x.stream = t.s AND x.partition_key = t.p) \
         ORDER BY o \
         ON CONFLICT (stream, partition_key) DO UPDATE SET delivered = EXCLUDED.delivered \
         WHERE d.delivered = EXCLUDED.delivered - 1 AND d.parked_seq IS NULL",
    )
    .bind(&streams)
    .bind(&partition_keys)
    .bind(&sequences)
    .execute(pool)
    .await
    .map_err(db_error)?
    .rows_affected())
}

async fn park_key(pool: &PgPool, key: &ParkedKey) -> Result<bool, Error> {
    let done = sqlx::query(
        "INSERT INTO journaled.key_delivery AS d \
             (stream, partition_key, delivered, parked_seq, parked_event, parked_reason, parked_at) \
         VALUES ($1, $2, $3 - 1, $3, $4, $5, now()) \
         ON CONFLICT (stream, partition_key) DO UPDATE SET parked_seq = EXCLUDED.parked_seq, \
             parked_event = EXCLUDED.parked_event, parked_reason = EXCLUDED.parked_reason, parked_at = now() \
         WHERE d.parked_seq IS NULL AND d.delivered = EXCLUDED.delivered",
    )
    .bind(&key.stream)
    .bind(&key.partition_key)
    .bind(key.sequence)
    .bind(&key.event_id)
    .bind(&key.reason)
    .execute(pool)
    .await
    .map_err(db_error)?;
    Ok(done.rows_affected() == 1)
}

fn parked_row(row: &sqlx::postgres::PgRow) -> Result<ParkedKey, Error> {
    Ok(ParkedKey {
        stream: row.try_get("stream")?,
        partition_key: row.try_get("partition_key")?,
        sequence: row.try_get("parked_seq")?,
        event_id: row.try_get("parked_event")?,
        reason: row.try_get("parked_reason")?,
        parked_at: row.try_get("parked_at")?,
    })
}

async fn parked_keys(pool: &PgPool) -> Result<Vec<ParkedKey>, Error> {
    let rows = sqlx::query(
        "SELECT stream, partition_key, parked_seq, parked_event, parked_reason, parked_at \
         FROM journaled.key_delivery WHERE parked_seq IS NOT NULL ORDER BY parked_at, stream, partition_key",
    )
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(parked_row).collect()
}

async fn unpark(
    pool: &PgPool,
    stream: &str,
    partition_key: &str,
    skip: bool,
) -> Result<Option<ParkedKey>, Error> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT stream, partition_key, parked_seq, parked_event, parked_reason, parked_at \
         FROM journaled.key_delivery WHERE stream = $1 AND partition_key = $2 AND parked_seq IS NOT NULL \
         FOR UPDATE",
    )
    .bind(stream)
    .bind(partition_key)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let parked = parked_row(&row)?;
    sqlx::query(
        "UPDATE journaled.key_delivery SET \
             delivered = CASE WHEN $3 AND delivered = parked_seq - 1 THEN parked_seq ELSE delivered END, \
             parked_seq = NULL, parked_event = NULL, parked_reason = NULL, parked_at = NULL \
         WHERE stream = $1 AND partition_key = $2",
    )
    .bind(stream)
    .bind(partition_key)
    .bind(skip)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await?;
    Ok(Some(parked))
}

async fn jobs_mentioning(pool: &PgPool, text: &str) -> Result<Vec<super::Mentioning>, Error> {
    while number_sequences(pool, true).await?.more {}
    let rows: Vec<(i64, String, Option<Vec<i64>>, bool)> = sqlx::query_as(
        "SELECT id, records, sequence_bases, dead_at IS NOT NULL FROM journaled.jobs \
         WHERE strpos(records, $1) > 0 ORDER BY id",
    )
    .bind(text)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, records, bases, dead)| super::Mentioning {
            id: JobId(id),
            records: super::with_sequences(records, bases),
            dead,
        })
        .collect())
}

impl_backend!(Postgres, PgConnection, PgPool);

#[cfg(test)]
mod tests {
    use super::dollar_quoted;

    #[test]
    fn dollar_quotes_pick_a_tag_the_text_lacks() {
        assert_eq!(
            dollar_quoted("gid://app/User/1"),
            "$j0$gid://app/User/1$j0$"
        );
        assert_eq!(dollar_quoted("a$j0$b"), "$j1$a$j0$b$j1$");
        assert_eq!(dollar_quoted("it's"), "$j0$it's$j0$");
    }
}
