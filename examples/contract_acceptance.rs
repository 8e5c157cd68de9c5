//! The reference gem's ContractAcceptance example on PostgreSQL: one transaction commits its
//! user update and its event; another rolls both back. Prints the job rows it finds.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1/test cargo run --example contract_acceptance
//! ```

use journaled::{Config, Journaled, journal, tagged, tags};
use serde::Serialize;

/// `journaled_schemas/contract_acceptance_event.json` describes its attributes.
#[derive(Serialize, journaled::Event)]
#[journaled(tagged)]
struct ContractAcceptanceEvent {
    user_id: i64,
    signature: String,
}

async fn accept(
    journaled: &Journaled<sqlx::Postgres>,
    user_id: i64,
    commit: bool,
) -> Result<(), journaled::Error> {
    let mut tx = journaled.begin().await?;
    sqlx::query("UPDATE example_users SET contract_accepted = true WHERE id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    let event_id = journal!(
        tx,
        ContractAcceptanceEvent {
            user_id,
            signature: format!("User {user_id}")
        }
    )?;
    if commit {
        tx.commit().await?;
        println!("committed  user {user_id}: event {event_id}");
    } else {
        tx.rollback().await?;
        println!("rolled back user {user_id}: event {event_id} is gone");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = sqlx::PgPool::connect(&url).await?;
    let config = Config::from_env()?
        .with_stream_name(
            std::env::var("JOURNALED_STREAM_NAME").unwrap_or_else(|_| "example_events".into()),
        )
        .with_schema_roots([concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/journaled_schemas"
        )]);
    let journaled = Journaled::new(pool.clone(), config);
    journaled.migrate().await?;

    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS example_users (id bigint PRIMARY KEY, contract_accepted boolean NOT NULL DEFAULT false); \
         INSERT INTO example_users (id) VALUES (1), (2) ON CONFLICT (id) DO UPDATE SET contract_accepted = false",
    )
    .execute(&pool)
    .await?;
    // Shows only the jobs this run writes; it never deletes anything (the database may hold
    // other applications' jobs, and a worker may be delivering them).
    let first_new_job: i64 =
        sqlx::query_scalar("SELECT coalesce(max(id), 0) + 1 FROM journaled.jobs")
            .fetch_one(&pool)
            .await?;

    tagged(tags! { request_id = "req-1" }, accept(&journaled, 1, true)).await?;
    tagged(tags! { request_id = "req-2" }, accept(&journaled, 2, false)).await?;

    println!("\njob rows written by this run:");
    for job in journaled
        .jobs()
        .await?
        .into_iter()
        .filter(|job| job.id.0 >= first_new_job)
    {
        println!(
            "job {} priority {} with {} event(s):",
            job.id, job.priority, job.event_count
        );
        for record in job.records()? {
            println!(
                "  stream {} key {}: {}",
                record.stream,
                record.partition_key,
                record.data.get()
            );
        }
    }
    let accepted: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM example_users WHERE contract_accepted ORDER BY id")
            .fetch_all(&pool)
            .await?;
    println!("users with contract_accepted: {accepted:?}");
    Ok(())
}
