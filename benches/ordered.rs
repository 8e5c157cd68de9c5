//! Ordered delivery (issue 14) against unordered, from one run, worker → kinesalite:
//! 1. 40,000 events of ~200 bytes on 1,000 uniform keys, committed in transactions of 100
//!    events, drained by one worker (batch 50 jobs, 4 in flight): ordered against the same
//!    events unordered, interleaved, 3 rounds;
//!    Then, once, how long the worker's numbering of those ordered jobs takes (PostgreSQL
//!    numbers ordered jobs in the worker: migration 9), which the ordered drains include;
//! 2. one hot key: 5,000 ordered events on a single key, drained the same way: the rate one
//!    key can go at, one record per round trip.
//!
//! ```sh
//! cargo bench --bench ordered --features worker    # needs PostgreSQL on 127.0.0.1:5432 and Node.js (tools/)
//! ```
//!
//! The commit side (ordered events on distinct keys at 1, 4, 16 and 64 connections) is mode O
//! of `benches/commit_concurrency.rs`.

#[path = "../tests/common/kinesis.rs"]
mod kinesis;
mod support;

use journaled::kinesis::KinesisSink;
use journaled::{Config, Journaled, WorkerConfig, journal};
use kinesis::{Emulator, Kind, kinesis_config};
use sqlx::PgPool;
use support::{drain, fresh_db, median};

#[derive(serde::Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct InOrder {
    #[journaled(partition_key)]
    account: String,
    amount_cents: i64,
    note: &'static str,
}

#[derive(serde::Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct AnyOrder {
    #[journaled(partition_key)]
    account: String,
    amount_cents: i64,
    note: &'static str,
}

const NOTE: &str = "monthly interest, credited by the batch run of the ledger service";

/// Commits `events` events in transactions of 100, each on a key drawn from `keys`.
async fn commit(journaled: &Journaled<sqlx::Postgres>, events: usize, keys: usize, ordered: bool) {
    let mut rng = fastrand::Rng::with_seed(42);
    for chunk in 0..events.div_ceil(100) {
        let mut tx = journaled.begin().await.unwrap();
        for i in 0..100.min(events - chunk * 100) {
            let account = format!("account-{}", rng.usize(..keys));
            let amount_cents = i as i64;
            if ordered {
                journal!(
                    tx,
                    InOrder {
                        account,
                        amount_cents,
                        note: NOTE
                    }
                )
                .unwrap();
            } else {
                journal!(
                    tx,
                    AnyOrder {
                        account,
                        amount_cents,
                        note: NOTE
                    }
                )
                .unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
}

fn worker_config() -> WorkerConfig {
    WorkerConfig::default()
        .with_batch_size(50)
        .with_concurrency(4)
}

/// Commits, then drains; events per second of the drain.
async fn rate(
    pool: &PgPool,
    journaled: &Journaled<sqlx::Postgres>,
    client: &aws_sdk_kinesis::Client,
    events: usize,
    keys: usize,
    ordered: bool,
) -> f64 {
    commit(journaled, events, keys, ordered).await;
    let elapsed = drain(pool, KinesisSink::new(client.clone()), worker_config()).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM journaled.jobs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "drained");
    events as f64 / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = PgPool::connect(&admin_url).await.expect("connect");
    let pool = fresh_db(&admin, "journaled_bench_ordered", &admin_url).await;
    let journaled = Journaled::new(
        pool.clone(),
        Config::default()
            .with_stream_name("bench")
            .with_schema_roots([concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/journaled_schemas"
            )]),
    );
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("bench", 4).await;
    let client = kinesis_config(&emulator.endpoint()).client().await;
    // Warm up: connections, statements, schemas.
    rate(&pool, &journaled, &client, 1_000, 100, false).await;
    rate(&pool, &journaled, &client, 1_000, 100, true).await;

    let (events, keys) = (40_000, 1_000);
    let (mut ordered, mut unordered) = (Vec::new(), Vec::new());
    for _round in 0..3 {
        unordered.push(rate(&pool, &journaled, &client, events, keys, false).await);
        ordered.push(rate(&pool, &journaled, &client, events, keys, true).await);
    }
    let (o, u) = (median(ordered.clone()), median(unordered.clone()));
    println!(
        "1. {events} events on {keys} uniform keys, transactions of 100, worker batch 50 x 4 in flight, kinesalite, median of 3 interleaved rounds:"
    );
    println!(
        "   unordered {u:.0} events/s {unordered:.0?}; ordered {o:.0} events/s {ordered:.0?}; ordered/unordered = {:.3}",
        o / u
    );

    // What the drain of ordered events includes on PostgreSQL: the worker numbering them.
    commit(&journaled, events, keys, true).await;
    let started = std::time::Instant::now();
    let numbered = <sqlx::Postgres as journaled::Backend>::number_sequences(&pool, true)
        .await
        .unwrap()
        .jobs;
    let took = started.elapsed();
    drain(&pool, KinesisSink::new(client.clone()), worker_config()).await;
    println!(
        "   of which numbering: {numbered} jobs ({events} events) in {:.0} ms, {:.0} events/s",
        took.as_secs_f64() * 1e3,
        events as f64 / took.as_secs_f64()
    );

    let hot = 5_000;
    let rate = rate(&pool, &journaled, &client, hot, 1, true).await;
    println!("2. one hot key, {hot} ordered events, same worker: {rate:.0} records/s");

    pool.close().await;
    sqlx::raw_sql("DROP DATABASE IF EXISTS journaled_bench_ordered WITH (FORCE)")
        .execute(&admin)
        .await
        .unwrap();
}
