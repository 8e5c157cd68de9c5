//! PostgreSQL: the `journaled` schema, `journaled.jobs`, and `journaled.schema_migrations`.

use sqlx::{PgConnection, PgPool, Postgres, Row};
use time::OffsetDateTime;

use super::{Backend, BoxFuture, Job, JobId, Migration, NewJob, pending};
use crate::Error;

/// The channel a NOTIFY is sent on when jobs are inserted.
pub const NOTIFY_CHANNEL: &str = "journaled_jobs";

/// An arbitrary constant that serializes concurrent `migrate` calls.
const MIGRATION_LOCK: i64 = 0x6a6f_7572_6e61_6c64; // "journald"

pub(crate) static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "jobs",
    sql: include_str!("../../migrations/postgres/0001_jobs.sql"),
}];

async fn insert_jobs(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<JobId>, Error> {
    if let [job] = jobs {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO journaled.jobs (priority, run_at, event_count, records) \
             VALUES ($1, COALESCE($2, now()), $3, $4) RETURNING id",
        )
        .bind(job.priority)
        .bind(job.run_at)
        .bind(job.event_count)
        .bind(&job.records)
        .fetch_one(conn)
        .await?;
        return Ok(vec![JobId(id)]);
    }
    let priorities: Vec<i32> = jobs.iter().map(|j| j.priority).collect();
    let run_ats: Vec<Option<OffsetDateTime>> = jobs.iter().map(|j| j.run_at).collect();
    let counts: Vec<i32> = jobs.iter().map(|j| j.event_count).collect();
    let records: Vec<&str> = jobs.iter().map(|j| j.records.as_str()).collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO journaled.jobs (priority, run_at, event_count, records) \
         SELECT p, COALESCE(r, now()), c, d \
         FROM UNNEST($1::int4[], $2::timestamptz[], $3::int4[], $4::text[]) WITH ORDINALITY AS t(p, r, c, d, n) \
         ORDER BY n RETURNING id",
    )
    .bind(&priorities)
    .bind(&run_ats)
    .bind(&counts)
    .bind(&records)
    .fetch_all(conn)
    .await?;
    Ok(ids.into_iter().map(JobId).collect())
}

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

async fn jobs(pool: &PgPool) -> Result<Vec<Job>, Error> {
    let rows = sqlx::query(
        "SELECT id, priority, run_at, attempts, last_error, dead_at, created_at, event_count, records \
         FROM journaled.jobs ORDER BY id",
    )
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
                records: row.try_get("records")?,
            })
        })
        .collect()
}

impl Backend for Postgres {
    fn insert_jobs<'c>(
        conn: &'c mut PgConnection,
        jobs: &'c [NewJob],
    ) -> BoxFuture<'c, Result<Vec<JobId>, Error>> {
        Box::pin(insert_jobs(conn, jobs))
    }

    fn migrate(pool: &PgPool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(migrate(pool))
    }

    fn jobs(pool: &PgPool) -> BoxFuture<'_, Result<Vec<Job>, Error>> {
        Box::pin(jobs(pool))
    }
}
