//! SQLite: `journaled_jobs` and `journaled_schema_migrations`, times in Unix milliseconds.

use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool};
use time::OffsetDateTime;

use std::sync::Arc;
use std::time::Duration;

use super::ParkedKey;
use super::{
    BoxFuture, Claimed, Job, JobId, Migration, NewJob, Receipt, ReceiptStats, Reschedule, Status,
    Trace, TracedJob, db_error, pending,
};
use crate::Error;
use crate::EventId;

pub(crate) static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "jobs",
        sql: include_str!("../../migrations/sqlite/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        description: "ready queue",
        sql: include_str!("../../migrations/sqlite/0002_ready_queue.sql"),
    },
    Migration {
        version: 4,
        description: "delivery receipts",
        sql: include_str!("../../migrations/sqlite/0004_receipts.sql"),
    },
    Migration {
        version: 5,
        description: "ordered keys' sequences",
        sql: include_str!("../../migrations/sqlite/0005_key_sequences.sql"),
    },
    Migration {
        version: 6,
        description: "first due time",
        sql: include_str!("../../migrations/sqlite/0006_due_at.sql"),
    },
];

/// The database's clock in Unix milliseconds, as SQL: every due time is computed with it,
/// never with a process's clock.
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// Rows per multi-row INSERT (SQLite allows 32,766 bound parameters per statement).
const INSERT_ROWS: usize = 1000;

/// Unix milliseconds, as SQLite stores times.
pub(crate) fn to_millis(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The inverse of [`to_millis`].
pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| Error::Database(sqlx::Error::Decode(Box::new(e))))
}

#[tracing::instrument(name = "journaled.take_sequences", skip_all, fields(keys = keys.len()), err)]
async fn take_sequences(
    conn: &mut SqliteConnection,
    keys: &[(String, String, i64)],
) -> Result<Vec<i64>, Error> {
    let mut rows = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(INSERT_ROWS) {
        let values = vec!["(?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO journaled_key_sequences (stream, partition_key, seq) VALUES {values} \
             ON CONFLICT (stream, partition_key) DO UPDATE SET seq = seq + excluded.seq \
             RETURNING stream, partition_key, seq"
        );
        let mut query = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql));
        for (stream, key, count) in chunk {
            query = query.bind(stream).bind(key).bind(count);
        }
        rows.extend(query.fetch_all(&mut *conn).await.map_err(db_error)?);
    }
    in_order(keys, rows)
}

fn in_order(
    keys: &[(String, String, i64)],
    rows: Vec<(String, String, i64)>,
) -> Result<Vec<i64>, Error> {
    let last: std::collections::HashMap<(String, String), i64> = rows
        .into_iter()
        .map(|(stream, key, seq)| ((stream, key), seq))
        .collect();
    keys.iter()
        .map(|(stream, key, _)| {
            last.get(&(stream.clone(), key.clone()))
                .copied()
                .ok_or_else(|| {
                    Error::Database(sqlx::Error::Protocol(format!(
                        "no sequence returned for {stream}/{key}"
                    )))
                })
        })
        .collect()
}

#[tracing::instrument(name = "journaled.insert_jobs", skip_all, fields(jobs = jobs.len()), err)]
async fn insert_jobs(conn: &mut SqliteConnection, jobs: &[NewJob]) -> Result<Vec<JobId>, Error> {
    let mut ids = Vec::with_capacity(jobs.len());
    for rows in jobs.chunks(INSERT_ROWS) {
        // Due time: a set time, or the database's clock plus the delay.
        let values = vec![
            format!(
                "(?, coalesce(?, {NOW_MS} + ?), coalesce(?, {NOW_MS} + ?), ?, ?, ?, ?, {NOW_MS})"
            );
            rows.len()
        ]
        .join(", ");
        let sql = format!(
            "INSERT INTO journaled_jobs (priority, run_at, due_at, ready, event_count, bytes, records, created_at) \
             VALUES {values} RETURNING id"
        );
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
        for job in rows {
            query = query
                .bind(job.priority)
                .bind(job.run_at.map(to_millis))
                .bind(job.delay.map_or(0, |d| d.as_millis() as i64))
                .bind(job.run_at.map(to_millis))
                .bind(job.delay.map_or(0, |d| d.as_millis() as i64))
                // Due now: ready at once. A set or delayed time waits; the worker promotes it
                // when the database's clock reaches it (at once if it is already past).
                .bind(job.run_at.is_none() && job.delay.is_none())
                .bind(job.event_count)
                .bind(job.bytes)
                .bind(&job.records);
        }
        let mut inserted = query.fetch_all(&mut *conn).await.map_err(db_error)?;
        inserted.sort_unstable();
        ids.extend(inserted.into_iter().map(JobId));
    }
    Ok(ids)
}

async fn begin(pool: &SqlitePool) -> Result<sqlx::Transaction<'static, Sqlite>, Error> {
    // IMMEDIATE takes the write lock at once (waiting up to the busy timeout), so a
    // read-then-write transaction cannot fail to upgrade after another connection wrote.
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}

/// SQLite has no capture triggers, so nothing reads who acts: a plain `begin`.
async fn begin_with_context(
    pool: &SqlitePool,
    _actor: &str,
    _tags: &str,
) -> Result<sqlx::Transaction<'static, Sqlite>, Error> {
    begin(pool).await
}

async fn set_context(_conn: &mut SqliteConnection, _actor: &str, _tags: &str) -> Result<(), Error> {
    Ok(())
}

/// SQLite has no notifications: workers in other processes poll.
fn announce(_pool: &SqlitePool) -> Option<BoxFuture<'_, Result<(), Error>>> {
    None
}

#[tracing::instrument(name = "journaled.migrate", skip_all, err)]
async fn migrate(pool: &SqlitePool) -> Result<(), Error> {
    let mut conn = pool.acquire().await?;
    // IMMEDIATE takes the write lock at once, so concurrent migrators queue instead of failing.
    let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS journaled_schema_migrations ( \
             version INTEGER PRIMARY KEY, \
             description TEXT NOT NULL, \
             checksum TEXT NOT NULL, \
             applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<(i64, String)> =
        sqlx::query_as("SELECT version, checksum FROM journaled_schema_migrations")
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
            "INSERT INTO journaled_schema_migrations (version, description, checksum) VALUES (?, ?, ?)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(migration.checksum())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn jobs(pool: &SqlitePool) -> Result<Vec<Job>, Error> {
    let rows = sqlx::query(
        "SELECT id, priority, run_at, attempts, last_error, dead_at, created_at, event_count, records \
         FROM journaled_jobs ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let dead_at: Option<i64> = row.try_get("dead_at")?;
            Ok(Job {
                id: JobId(row.try_get("id")?),
                priority: row.try_get("priority")?,
                run_at: from_millis(row.try_get("run_at")?)?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                dead_at: dead_at.map(from_millis).transpose()?,
                created_at: from_millis(row.try_get("created_at")?)?,
                event_count: row.try_get("event_count")?,
                records: row.try_get("records")?,
            })
        })
        .collect()
}

fn now_ms() -> i64 {
    to_millis(OffsetDateTime::now_utc())
}

#[tracing::instrument(name = "journaled.claim", skip_all, fields(limit, claimed), err)]
async fn claim(
    pool: &SqlitePool,
    owner: &str,
    limit: i64,
    max_bytes: usize,
    lease: Duration,
) -> Result<Vec<Claimed>, Error> {
    // Delayed, leased and backing-off jobs whose time came: a range scan of the waiting
    // index that stops at the first job not yet due.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE journaled_jobs SET ready = 1 \
         WHERE id IN (SELECT id FROM journaled_jobs \
                      WHERE ready = 0 AND dead_at IS NULL AND run_at <= {NOW_MS} \
                      ORDER BY run_at LIMIT 1000)"
    )))
    .execute(pool)
    .await
    .map_err(db_error)?;
    // One statement under SQLite's write lock: nobody else can claim the same rows. Ready
    // jobs only, by priority; the running byte total keeps the claim near `max_bytes`.
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE journaled_jobs SET ready = 0, locked_by = ?1, \
             locked_until = {NOW_MS} + ?2, run_at = {NOW_MS} + ?2 \
         WHERE id IN (SELECT id FROM ( \
                          SELECT id, sum(bytes) OVER (ORDER BY priority, id) - bytes AS before \
                          FROM (SELECT id, priority, bytes FROM journaled_jobs WHERE ready = 1 \
                                ORDER BY priority, id LIMIT ?3)) \
                      WHERE before = 0 OR before < ?4) \
         RETURNING id, priority, attempts, transient_failures, records, created_at"
    )))
    .bind(owner)
    .bind(lease.as_millis() as i64)
    .bind(limit)
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
                records: row.try_get("records")?,
                created_at: from_millis(row.try_get("created_at")?)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    claimed.sort_by_key(|c| (c.priority, c.id));
    tracing::Span::current().record("limit", limit);
    tracing::Span::current().record("claimed", claimed.len());
    Ok(claimed)
}

#[tracing::instrument(name = "journaled.complete", skip_all, fields(jobs = ids.len()), err)]
async fn complete(pool: &SqlitePool, owner: &str, ids: &[JobId]) -> Result<u64, Error> {
    let ids = serde_json::to_string(&ids.iter().map(|id| id.0).collect::<Vec<_>>())
        .expect("ids serialize");
    Ok(sqlx::query(
        "DELETE FROM journaled_jobs WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?2",
    )
    .bind(ids)
    .bind(owner)
    .execute(pool)
    .await?
    .rows_affected())
}

#[tracing::instrument(name = "journaled.reschedule", skip_all, fields(job = job.id.0), err)]
async fn reschedule(pool: &SqlitePool, owner: &str, job: &Reschedule) -> Result<bool, Error> {
    let now = now_ms();
    let mut conn = pool.acquire().await?;
    // A short write transaction (no network call inside): the update and the split-off dead
    // job happen together or not at all.
    let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
    let done = sqlx::query(
        "UPDATE journaled_jobs SET records = coalesce(?3, records), event_count = coalesce(?4, event_count), \
             bytes = coalesce(length(CAST(?3 AS BLOB)), bytes), attempts = ?5, \
             run_at = CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) + ?6, ready = 0, \
             last_error = ?7, dead_at = CASE WHEN ?8 THEN ?9 END, \
             transient_failures = ?10, locked_by = NULL, locked_until = NULL \
         WHERE id = ?1 AND locked_by = ?2",
    )
    .bind(job.id.0)
    .bind(owner)
    .bind(job.records.as_ref().map(|(records, _)| records.as_str()))
    .bind(job.records.as_ref().map(|(_, count)| *count))
    .bind(job.attempts)
    .bind(job.delay.as_millis() as i64)
    .bind(&job.last_error)
    .bind(job.dead)
    .bind(now)
    .bind(job.transient_failures)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    if let Some(split) = &job.split_dead {
        sqlx::query(
            "INSERT INTO journaled_jobs (priority, run_at, due_at, ready, attempts, transient_failures, last_error, \
                 dead_at, created_at, event_count, bytes, records) \
             SELECT priority, ?2, due_at, 0, attempts, transient_failures, ?3, ?2, created_at, ?4, length(CAST(?5 AS BLOB)), ?5 \
             FROM journaled_jobs WHERE id = ?1",
        )
        .bind(job.id.0)
        .bind(now)
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
async fn release(pool: &SqlitePool, owner: &str) -> Result<u64, Error> {
    Ok(sqlx::query(
        "UPDATE journaled_jobs SET locked_by = NULL, locked_until = NULL, run_at = ?2, ready = 1 \
         WHERE locked_by = ?1 AND dead_at IS NULL",
    )
    .bind(owner)
    .bind(now_ms())
    .execute(pool)
    .await?
    .rows_affected())
}

#[tracing::instrument(name = "journaled.status", skip_all, err)]
async fn status(pool: &SqlitePool) -> Result<Status, Error> {
    let now = now_ms();
    let row = sqlx::query(
        "SELECT \
           count(*) FILTER (WHERE dead_at IS NULL) AS pending_jobs, \
           coalesce(sum(event_count) FILTER (WHERE dead_at IS NULL), 0) AS pending_events, \
           count(*) FILTER (WHERE ready = 1 OR (dead_at IS NULL AND run_at <= ?1)) AS due_jobs, \
           count(*) FILTER (WHERE dead_at IS NULL AND locked_until > ?1) AS leased_jobs, \
           count(*) FILTER (WHERE dead_at IS NULL AND due_at > ?1) AS delayed_jobs, \
           count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead_jobs, \
           coalesce(sum(event_count) FILTER (WHERE dead_at IS NOT NULL), 0) AS dead_events, \
           min(due_at) FILTER (WHERE dead_at IS NULL AND due_at <= ?1) AS oldest, \
           (SELECT count(*) FROM journaled_key_delivery WHERE parked_seq IS NOT NULL) AS parked \
         FROM journaled_jobs",
    )
    .bind(now)
    .fetch_one(pool)
    .await
    .map_err(db_error)?;
    let oldest: Option<i64> = row.try_get("oldest")?;
    Ok(Status {
        pending_jobs: row.try_get("pending_jobs")?,
        pending_events: row.try_get("pending_events")?,
        due_jobs: row.try_get("due_jobs")?,
        leased_jobs: row.try_get("leased_jobs")?,
        delayed_jobs: row.try_get("delayed_jobs")?,
        dead_jobs: row.try_get("dead_jobs")?,
        dead_events: row.try_get("dead_events")?,
        oldest_pending_age_secs: oldest.map(|ms| (now - ms) as f64 / 1000.0),
        parked_keys: row.try_get("parked")?,
    })
}

#[tracing::instrument(name = "journaled.retry", skip_all, err)]
async fn retry(pool: &SqlitePool, job: Option<JobId>) -> Result<u64, Error> {
    let now = now_ms();
    let query = match job {
        Some(id) => sqlx::query(
            "UPDATE journaled_jobs SET dead_at = NULL, attempts = 0, transient_failures = 0, \
                 run_at = ?1, ready = 1, locked_by = NULL, locked_until = NULL \
             WHERE id = ?2 AND (dead_at IS NOT NULL OR locked_until IS NULL OR locked_until < ?1)",
        )
        .bind(now)
        .bind(id.0),
        None => sqlx::query(
            "UPDATE journaled_jobs SET dead_at = NULL, attempts = 0, transient_failures = 0, \
                 run_at = ?1, ready = 1, locked_by = NULL, locked_until = NULL WHERE dead_at IS NOT NULL",
        )
        .bind(now),
    };
    Ok(query.execute(pool).await.map_err(db_error)?.rows_affected())
}

/// SQLite has no notifications: the worker polls.
fn wake_on_insert(
    _pool: &SqlitePool,
    _notify: Arc<tokio::sync::Notify>,
) -> Option<BoxFuture<'static, ()>> {
    None
}

#[tracing::instrument(name = "journaled.record_receipts", skip_all, fields(receipts = receipts.len()), err)]
async fn record_receipts(pool: &SqlitePool, receipts: &[Receipt]) -> Result<u64, Error> {
    let mut written = 0;
    for rows in receipts.chunks(INSERT_ROWS) {
        let values = vec![format!("(?, ?, ?, ?, ?, ?, {NOW_MS}, ?)"); rows.len()].join(", ");
        let sql = format!(
            "INSERT INTO journaled_receipts (event_id, stream, partition_key, shard_id, \
                 sequence_number, job_created_at, delivered_at, attempts) \
             VALUES {values} ON CONFLICT (event_id) DO NOTHING"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in rows {
            query = query
                .bind(r.event_id.to_string())
                .bind(&r.stream)
                .bind(&r.partition_key)
                .bind(&r.shard_id)
                .bind(&r.sequence_number)
                .bind(to_millis(r.job_created_at))
                .bind(r.attempts);
        }
        written += query.execute(pool).await.map_err(db_error)?.rows_affected();
    }
    Ok(written)
}

#[tracing::instrument(name = "journaled.prune_receipts", skip_all, err)]
async fn prune_receipts(pool: &SqlitePool, retention: Duration, limit: i64) -> Result<u64, Error> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM journaled_receipts WHERE event_id IN ( \
             SELECT event_id FROM journaled_receipts WHERE delivered_at < {NOW_MS} - ?1 \
             ORDER BY delivered_at LIMIT ?2)"
    )))
    .bind(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
    .bind(limit)
    .execute(pool)
    .await
    .map_err(db_error)?
    .rows_affected())
}

async fn trace(pool: &SqlitePool, event: EventId) -> Result<Trace, Error> {
    let receipt = sqlx::query(
        "SELECT stream, partition_key, shard_id, sequence_number, job_created_at, delivered_at, attempts \
         FROM journaled_receipts WHERE event_id = ?",
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
            job_created_at: from_millis(row.try_get("job_created_at")?)?,
            delivered_at: Some(from_millis(row.try_get("delivered_at")?)?),
            attempts: row.try_get("attempts")?,
        }));
    }
    let needle = format!("{{\"id\":\"{event}\"");
    let job = sqlx::query(
        "SELECT id, priority, run_at, attempts, last_error, dead_at, created_at \
         FROM journaled_jobs WHERE instr(records, ?) > 0 ORDER BY id LIMIT 1",
    )
    .bind(&needle)
    .fetch_optional(pool)
    .await
    .map_err(db_error)?;
    let Some(row) = job else {
        return Ok(Trace::Unknown);
    };
    let dead_at: Option<i64> = row.try_get("dead_at")?;
    let job = TracedJob {
        job_id: JobId(row.try_get("id")?),
        priority: row.try_get("priority")?,
        run_at: from_millis(row.try_get("run_at")?)?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        created_at: from_millis(row.try_get("created_at")?)?,
    };
    Ok(if dead_at.is_some() {
        Trace::Dead(job)
    } else {
        Trace::Pending(job)
    })
}

async fn receipt_stats(pool: &SqlitePool) -> Result<ReceiptStats, Error> {
    let (delivered, oldest): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), min(delivered_at) FROM journaled_receipts")
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
    // SQLite has no percentile function: the row at each rank, by the latency.
    let at_rank = |fraction: f64| {
        let offset = ((delivered.max(1) - 1) as f64 * fraction).round() as i64;
        sqlx::query_scalar::<_, i64>(
            "SELECT delivered_at - job_created_at FROM journaled_receipts \
             ORDER BY delivered_at - job_created_at LIMIT 1 OFFSET ?",
        )
        .bind(offset)
        .fetch_optional(pool)
    };
    let p50 = at_rank(0.5).await.map_err(db_error)?;
    let p99 = at_rank(0.99).await.map_err(db_error)?;
    Ok(ReceiptStats {
        delivered_events: delivered,
        latency_p50_secs: p50.map(|ms| ms as f64 / 1000.0),
        latency_p99_secs: p99.map(|ms| ms as f64 / 1000.0),
        oldest_delivered_at: oldest.map(from_millis).transpose()?,
    })
}

async fn key_positions(
    pool: &SqlitePool,
    keys: &[(String, String)],
) -> Result<Vec<(i64, bool)>, Error> {
    let mut known: std::collections::HashMap<(String, String), (i64, bool)> = Default::default();
    for chunk in keys.chunks(INSERT_ROWS) {
        let values = vec!["(?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "SELECT stream, partition_key, delivered, parked_seq IS NOT NULL FROM journaled_key_delivery \
             WHERE (stream, partition_key) IN (VALUES {values})"
        );
        let mut query = sqlx::query_as::<_, (String, String, i64, bool)>(sqlx::AssertSqlSafe(sql));
        for (stream, key) in chunk {
            query = query.bind(stream).bind(key);
        }
        for (stream, key, delivered, parked) in query.fetch_all(pool).await.map_err(db_error)? {
            known.insert((stream, key), (delivered, parked));
        }
    }
    Ok(keys
        .iter()
        .map(|k| known.get(k).copied().unwrap_or((0, false)))
        .collect())
}

async fn advance_keys(pool: &SqlitePool, acked: &[(String, String, i64)]) -> Result<u64, Error> {
    let mut moved = 0;
    for chunk in acked.chunks(INSERT_ROWS) {
        let values = vec!["(?, ?, ?)"; chunk.len()].join(", ");
        // A key not known yet starts at 0: only its sequence 1 may create it.
        let sql = format!(
            "INSERT INTO journaled_key_delivery (stream, partition_key, delivered) \
             SELECT column1, column2, column3 FROM (VALUES {values}) AS t \
             WHERE column3 = 1 OR EXISTS (SELECT 1 FROM journaled_key_delivery x \
                                          WHERE x.stream = t.column1 AND x.partition_key = t.column2) \
             ON CONFLICT (stream, partition_key) DO UPDATE SET delivered = excluded.delivered \
             WHERE delivered = excluded.delivered - 1 AND parked_seq IS NULL"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (stream, key, seq) in chunk {
            query = query.bind(stream).bind(key).bind(seq);
        }
        moved += query.execute(pool).await.map_err(db_error)?.rows_affected();
    }
    Ok(moved)
}

async fn park_key(pool: &SqlitePool, key: &ParkedKey) -> Result<bool, Error> {
    let done = sqlx::query(
        "INSERT INTO journaled_key_delivery \
             (stream, partition_key, delivered, parked_seq, parked_event, parked_reason, parked_at) \
         VALUES (?1, ?2, ?3 - 1, ?3, ?4, ?5, ?6) \
         ON CONFLICT (stream, partition_key) DO UPDATE SET parked_seq = excluded.parked_seq, \
             parked_event = excluded.parked_event, parked_reason = excluded.parked_reason, \
             parked_at = excluded.parked_at \
         WHERE parked_seq IS NULL AND delivered = excluded.delivered",
    )
    .bind(&key.stream)
    .bind(&key.partition_key)
    .bind(key.sequence)
    .bind(&key.event_id)
    .bind(&key.reason)
    .bind(now_ms())
    .execute(pool)
    .await
    .map_err(db_error)?;
    Ok(done.rows_affected() == 1)
}

fn parked_row(row: &sqlx::sqlite::SqliteRow) -> Result<ParkedKey, Error> {
    let at: Option<i64> = row.try_get("parked_at")?;
    Ok(ParkedKey {
        stream: row.try_get("stream")?,
        partition_key: row.try_get("partition_key")?,
        sequence: row.try_get("parked_seq")?,
        event_id: row.try_get("parked_event")?,
        reason: row.try_get("parked_reason")?,
        parked_at: at.map(from_millis).transpose()?,
    })
}

async fn parked_keys(pool: &SqlitePool) -> Result<Vec<ParkedKey>, Error> {
    let rows = sqlx::query(
        "SELECT stream, partition_key, parked_seq, parked_event, parked_reason, parked_at \
         FROM journaled_key_delivery WHERE parked_seq IS NOT NULL ORDER BY parked_at, stream, partition_key",
    )
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(parked_row).collect()
}

async fn unpark(
    pool: &SqlitePool,
    stream: &str,
    partition_key: &str,
    skip: bool,
) -> Result<Option<ParkedKey>, Error> {
    let mut tx = begin(pool).await?;
    let row = sqlx::query(
        "SELECT stream, partition_key, parked_seq, parked_event, parked_reason, parked_at \
         FROM journaled_key_delivery WHERE stream = ?1 AND partition_key = ?2 AND parked_seq IS NOT NULL",
    )
    .bind(stream)
    .bind(partition_key)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let parked = parked_row(&row)?;
    sqlx::query(
        "UPDATE journaled_key_delivery SET \
             delivered = CASE WHEN ?3 AND delivered = parked_seq - 1 THEN parked_seq ELSE delivered END, \
             parked_seq = NULL, parked_event = NULL, parked_reason = NULL, parked_at = NULL \
         WHERE stream = ?1 AND partition_key = ?2",
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

/// Two statements on SQLite (it is in-process: there is no round trip to save): the sequences,
/// then the jobs with their placeholders filled here.
async fn insert_jobs_taking_sequences(
    conn: &mut SqliteConnection,
    keys: &[(String, String, i64)],
    jobs: &[NewJob],
    job_keys: &[Vec<i64>],
) -> Result<super::JobsAndBases, Error> {
    let last = take_sequences(conn, keys).await?;
    let bases: Vec<i64> = last.iter().zip(keys).map(|(last, k)| last - k.2).collect();
    let mut filled = Vec::with_capacity(jobs.len());
    for (job, own) in jobs.iter().zip(job_keys) {
        let own: Vec<i64> = own.iter().map(|&k| bases[k as usize]).collect();
        let records = super::fill_sequences(&job.records, &own)
            .map_err(|message| Error::Database(sqlx::Error::Protocol(message)))?;
        filled.push(NewJob {
            priority: job.priority,
            run_at: job.run_at,
            delay: job.delay,
            event_count: job.event_count,
            bytes: records.len() as i32,
            records,
        });
    }
    Ok((insert_jobs(conn, &filled).await?, Some(bases)))
}

/// The writer numbered its jobs: nothing waits for a number on SQLite.
async fn number_sequences(_pool: &SqlitePool, _wait: bool) -> Result<super::Numbered, Error> {
    Ok(super::Numbered::default())
}

async fn jobs_mentioning(pool: &SqlitePool, text: &str) -> Result<Vec<super::Mentioning>, Error> {
    let rows: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT id, records, dead_at IS NOT NULL FROM journaled_jobs \
         WHERE instr(records, ?) > 0 ORDER BY id",
    )
    .bind(text)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, records, dead)| super::Mentioning {
            id: JobId(id),
            records,
            dead,
        })
        .collect())
}

impl_backend!(Sqlite, SqliteConnection, SqlitePool);
