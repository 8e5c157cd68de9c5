//! What ordered delivery costs: the same events delivered unordered and ordered, on SQLite, to
//! a local Kinesis (kinesalite), and a hot key's burst, with the order checked on the stream.
//!
//! ```sh
//! cargo run --example ordered_delivery     # a debug build: compare the figures, not their size
//! ```

#[path = "../tests/common/kinesis.rs"]
mod kinesis;

use std::collections::HashMap;
use std::time::Instant;

use journaled::kinesis::KinesisSink;
use journaled::{Config, Journaled, Worker, WorkerConfig, journal};
use serde::Serialize;

/// Unordered: today's path.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "account_event")]
struct Unordered {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// Ordered: a sequence per account, one record per account in flight.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "account_event", ordered)]
struct Ordered {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let emulator = kinesis::Emulator::try_start(kinesis::Kind::Kinesalite).await?;
    let kinesis_config = kinesis::kinesis_config(&emulator.endpoint());
    let client = kinesis_config.client().await;
    println!("| run | events | keys | seconds | events/s |");
    println!("|---|---|---|---|---|");
    for (i, (run, ordered, keys, events)) in [
        ("unordered", false, 1_000, 20_000),
        ("ordered", true, 1_000, 20_000),
        ("ordered, one hot key", true, 1, 500),
    ]
    .into_iter()
    .enumerate()
    {
        let stream = format!("ordered_example_{i}");
        journaled::kinesis::ensure_stream(&client, &stream, 2).await?;
        let dir = std::env::temp_dir().join(format!("journaled-ordered-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{i}.db"));
        let _ = std::fs::remove_file(&path);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal),
            )
            .await?;
        let config = Config::default()
            .with_stream_name(&stream)
            .with_schema_roots([concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/journaled_schemas"
            )]);
        let journaled = Journaled::new(pool.clone(), config);
        journaled.migrate().await?;
        // Transactions of 100 events, keys round-robin.
        for t in 0..events / 100 {
            let mut tx = journaled.begin().await?;
            for e in 0..100 {
                let n = (t * 100 + e) as i64;
                let account = format!("account-{}", n % keys);
                if ordered {
                    journal!(tx, Ordered { account, n })?;
                } else {
                    journal!(tx, Unordered { account, n })?;
                }
            }
            tx.commit().await?;
        }
        let started = Instant::now();
        let sink = KinesisSink::new(client.clone());
        Worker::new(pool.clone(), sink, WorkerConfig::default().with_drain(true))?
            .run(std::future::pending())
            .await?;
        let secs = started.elapsed().as_secs_f64();
        // Per key, `n` increases in the order records first appear (they were journaled so).
        let mut last: HashMap<String, i64> = HashMap::new();
        let mut out_of_order = 0;
        for record in journaled::kinesis::read_stream(&client, &stream).await? {
            let value: serde_json::Value = serde_json::from_slice(&record.data)?;
            let n = value["n"].as_i64().unwrap_or_default();
            let seen = last.entry(record.partition_key).or_insert(-1);
            if n < *seen {
                out_of_order += 1;
            }
            *seen = n.max(*seen);
        }
        println!(
            "| {run} | {events} | {keys} | {secs:.2} | {:.0} |{}",
            events as f64 / secs,
            if out_of_order > 0 {
                format!(" {out_of_order} records out of order")
            } else {
                String::new()
            }
        );
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
