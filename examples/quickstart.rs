//! The quick start: from nothing to events in a Kinesis stream, on SQLite, in one command.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! It installs a local Kinesis (kinesalite, from `tools/package.json`) if it is missing, starts
//! it on a free 127.0.0.1 port, creates a stream, journals events in SQLite transactions (some
//! committed, some rolled back, one tagged and with an actor), runs the worker until the queue
//! is drained, prints the records read back from the stream, and stops everything it started.

#[path = "../tests/common/kinesis.rs"]
mod kinesis;

use std::collections::HashSet;

use journaled::kinesis::KinesisSink;
use journaled::{Config, Journaled, Worker, WorkerConfig, journal, tagged, tags, with_actor};
use serde::Serialize;

/// A user signed up; the actor is captured when it is journaled.
#[derive(Serialize, journaled::Event)]
struct UserSignedUp {
    user_id: i64,
    email_domain: String,
    actor: String,
}

/// The reference's example, tagged with the request that caused it.
#[derive(Serialize, journaled::Event)]
#[journaled(tagged)]
struct ContractAcceptanceEvent {
    user_id: i64,
    signature: String,
}

const STREAM: &str = "journaled_quickstart";

fn step(message: &str) {
    println!("==> {message}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("quickstart failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    step("starting a local Kinesis (kinesalite from tools/, installed with npm if missing)");
    let emulator = kinesis::Emulator::try_start(kinesis::Kind::Kinesalite)
        .await
        .map_err(|e| format!("cannot start the local Kinesis: {e}"))?;
    let kinesis_config = kinesis::kinesis_config(&emulator.endpoint());
    let client = kinesis_config.client().await;
    journaled::kinesis::ensure_stream(&client, STREAM, 1).await?;
    println!("    Kinesis at {}, stream {STREAM}", emulator.endpoint());

    let dir = std::env::temp_dir().join(format!("journaled-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("journaled.db");
    step(&format!("opening SQLite database {}", path.display()));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal),
        )
        .await?;
    let config = Config::default()
        .with_stream_name(STREAM)
        .with_app_name("quickstart")
        .with_schema_roots([concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/journaled_schemas"
        )]);
    let journaled = Journaled::new(pool.clone(), config);
    journaled.migrate().await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)")
        .execute(&pool)
        .await?;

    step("journaling events in SQLite transactions");
    let mut committed = Vec::new();
    let mut rolled_back = Vec::new();

    // 1. Committed: the user row and its event, together.
    let mut tx = journaled.begin().await?;
    sqlx::query("INSERT INTO users (id, email) VALUES (1, 'ada@example.com')")
        .execute(&mut *tx)
        .await?;
    let id = journal!(
        tx,
        UserSignedUp {
            user_id: 1,
            email_domain: "example.com".into(),
            actor: journaled::actor_uri()
        }
    )?;
    tx.commit().await?;
    println!("    committed   {id}  user_signed_up (user 1)");
    committed.push(id);

    // 2. Rolled back: neither the row nor the event exists.
    let mut tx = journaled.begin().await?;
    sqlx::query("INSERT INTO users (id, email) VALUES (2, 'bob@example.com')")
        .execute(&mut *tx)
        .await?;
    let id = journal!(
        tx,
        UserSignedUp {
            user_id: 2,
            email_domain: "example.com".into(),
            actor: journaled::actor_uri()
        }
    )?;
    tx.rollback().await?;
    println!("    rolled back {id}  user_signed_up (user 2)");
    rolled_back.push(id);

    // 3. Committed, tagged with the request and attributed to an actor; a savepoint inside it
    //    rolls back its own event only.
    let (kept, dropped) = tagged(
        tags! { request_id = "req-42" },
        with_actor("gid://quickstart/User/1", async {
            let mut tx = journaled.begin().await?;
            let kept = journal!(
                tx,
                ContractAcceptanceEvent {
                    user_id: 1,
                    signature: "Ada Lovelace".into()
                }
            )?;
            let mut savepoint = tx.begin().await?;
            let dropped = journal!(
                savepoint,
                UserSignedUp {
                    user_id: 3,
                    email_domain: "example.org".into(),
                    actor: journaled::actor_uri()
                }
            )?;
            savepoint.rollback().await?;
            let also_kept = journal!(
                tx,
                UserSignedUp {
                    user_id: 1,
                    email_domain: "example.com".into(),
                    actor: journaled::actor_uri()
                }
            )?;
            tx.commit().await?;
            Ok::<_, journaled::Error>(([kept, also_kept], dropped))
        }),
    )
    .await?;
    for id in kept {
        println!("    committed   {id}  (tagged request_id=req-42, actor gid://quickstart/User/1)");
        committed.push(id);
    }
    println!("    rolled back {dropped}  (savepoint)");
    rolled_back.push(dropped);

    step("running the worker until the queue is drained");
    let sink = KinesisSink::new(client.clone());
    let worker = Worker::new(pool.clone(), sink, WorkerConfig::default().with_drain(true))?;
    let stats = worker.stats();
    worker.run(std::future::pending()).await?;
    println!(
        "    delivered {} events in {} jobs",
        stats
            .delivered_events
            .load(std::sync::atomic::Ordering::Relaxed),
        stats
            .completed_jobs
            .load(std::sync::atomic::Ordering::Relaxed)
    );

    step(&format!("records read back from stream {STREAM}"));
    let records = journaled::kinesis::read_stream(&client, STREAM).await?;
    let mut seen = HashSet::new();
    for record in &records {
        let data = String::from_utf8_lossy(&record.data);
        println!("{data}");
        let value: serde_json::Value = serde_json::from_slice(&record.data)?;
        seen.insert(value["id"].as_str().unwrap_or_default().to_owned());
    }

    let missing: Vec<String> = committed
        .iter()
        .map(ToString::to_string)
        .filter(|id| !seen.contains(id))
        .collect();
    let escaped: Vec<String> = rolled_back
        .iter()
        .map(ToString::to_string)
        .filter(|id| seen.contains(id))
        .collect();
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    if !missing.is_empty() || !escaped.is_empty() {
        return Err(format!(
            "committed events missing: {missing:?}; rolled-back events delivered: {escaped:?}"
        )
        .into());
    }
    step(&format!(
        "OK: all {} committed events arrived; none of the {} rolled-back events did. Stopping the local Kinesis.",
        committed.len(),
        rolled_back.len()
    ));
    Ok(())
}
