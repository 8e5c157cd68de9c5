//! SQLite: `journaled_jobs` and `journaled_schema_migrations`, times in Unix milliseconds.

use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool};
use time::OffsetDateTime;

use super::{Backend, BoxFuture, Job, JobId, Migration, NewJob, pending};
use crate::Error;

pub(crate) static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "jobs",
    sql: include_str!("../../migrations/sqlite/0001_jobs.sql"),
}];

/// Unix milliseconds, as SQLite stores times.
pub(crate) fn to_millis(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The inverse of [`to_millis`].
pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| Error::Database(sqlx::Error::Decode(Box::new(e))))
}

async fn insert_jobs(conn: &mut SqliteConnection, jobs: &[NewJob]) -> Result<Vec<JobId>, Error> {
    let now = to_millis(OffsetDateTime::now_utc());
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO journaled_jobs (priority, run_at, event_count, records, created_at) \
             VALUES (?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(job.priority)
        .bind(job.run_at.map(to_millis).unwrap_or(now))
        .bind(job.event_count)
        .bind(&job.records)
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
        ids.push(JobId(id));
    }
    Ok(ids)
}

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

impl Backend for Sqlite {
    fn insert_jobs<'c>(
        conn: &'c mut SqliteConnection,
        jobs: &'c [NewJob],
    ) -> BoxFuture<'c, Result<Vec<JobId>, Error>> {
        Box::pin(insert_jobs(conn, jobs))
    }

    fn migrate(pool: &SqlitePool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(migrate(pool))
    }

    fn jobs(pool: &SqlitePool) -> BoxFuture<'_, Result<Vec<Job>, Error>> {
        Box::pin(jobs(pool))
    }
}
