//! What journaling costs a transaction, on PostgreSQL, measured side by side in one run.
//!
//! ```sh
//! cargo bench --bench commit            # DATABASE_URL defaults to postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! Transactions per second, one connection, sequential, rounds interleaved:
//! (a) one UPDATE; (b) + 10 `journal!` calls; (c) + a hand-written INSERT of an equivalent
//! batch row; (d) + 10 single-event INSERTs (the row-per-event design). Then the cost of
//! validating and serializing one small event.

use std::time::{Duration, Instant};

use journaled::{Config, Journaled, journal};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Serialize, Clone, journaled::Event)]
struct ContractAcceptanceEvent {
    user_id: i64,
    signature: String,
}

const EVENTS: usize = 10;
const PER_ROUND: usize = 200;
const ROUNDS: usize = 5;

fn event(i: usize) -> ContractAcceptanceEvent {
    ContractAcceptanceEvent {
        user_id: i as i64,
        signature: "Sarah T. User".into(),
    }
}

/// What a hand-written outbox would store: the same records, serialized without validation.
fn hand_written_records() -> String {
    let records: Vec<serde_json::Value> = (0..EVENTS)
        .map(|i| {
            let id = uuid::Uuid::now_v7().to_string();
            serde_json::json!({
                "id": id, "stream": "bench", "partition_key": id,
                "data": {"id": id, "event_type": "contract_acceptance_event",
                         "created_at": journaled::format_time(time::OffsetDateTime::now_utc()),
                         "user_id": i, "signature": "Sarah T. User"}
            })
        })
        .collect();
    serde_json::to_string(&records).unwrap()
}

async fn run(variant: char, journaled: &Journaled<sqlx::Postgres>, n: usize) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        let mut tx = journaled.begin().await.unwrap();
        sqlx::query("UPDATE bench_users SET counter = counter + 1 WHERE id = $1")
            .bind((i % 100) as i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        match variant {
            'a' => {}
            'b' => {
                for j in 0..EVENTS {
                    journal!(tx, event(j)).unwrap();
                }
            }
            'c' => {
                let records = hand_written_records();
                sqlx::query(
                    "INSERT INTO journaled.jobs (priority, event_count, records) VALUES ($1, $2, $3)",
                )
                .bind(20_i32)
                .bind(EVENTS as i32)
                .bind(records)
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            'd' => {
                for j in 0..EVENTS {
                    let id = uuid::Uuid::now_v7().to_string();
                    let data = serde_json::json!({"id": id, "event_type": "contract_acceptance_event",
                        "created_at": journaled::format_time(time::OffsetDateTime::now_utc()),
                        "user_id": j, "signature": "Sarah T. User"});
                    let record = serde_json::json!([{"id": id, "stream": "bench", "partition_key": id, "data": data}]);
                    sqlx::query(
                        "INSERT INTO journaled.jobs (priority, event_count, records) VALUES ($1, 1, $2)",
                    )
                    .bind(20_i32)
                    .bind(record.to_string())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
            }
            _ => unreachable!(),
        }
        tx.commit().await.unwrap();
    }
    start.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = PgPool::connect(&admin_url).await.expect("connect");
    for sql in [
        "DROP DATABASE IF EXISTS journaled_bench WITH (FORCE)",
        "CREATE DATABASE journaled_bench",
    ] {
        sqlx::raw_sql(sql).execute(&admin).await.unwrap();
    }
    let url = format!("{}/journaled_bench", admin_url.rsplit_once('/').unwrap().0);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE bench_users (id bigint PRIMARY KEY, counter bigint NOT NULL DEFAULT 0); \
         INSERT INTO bench_users (id) SELECT generate_series(0, 99)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let config = Config::default()
        .with_stream_name("bench")
        .with_schema_roots([concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/journaled_schemas"
        )]);
    let journaled = Journaled::new(pool.clone(), config);
    journaled.migrate().await.unwrap();

    // Warm up: connections, prepared statements, the schema cache.
    for v in ['a', 'b', 'c', 'd'] {
        run(v, &journaled, 20).await;
    }
    let mut tps: [Vec<f64>; 4] = Default::default();
    for _ in 0..ROUNDS {
        for (k, v) in ['a', 'b', 'c', 'd'].into_iter().enumerate() {
            let elapsed = run(v, &journaled, PER_ROUND).await;
            tps[k].push(PER_ROUND as f64 / elapsed.as_secs_f64());
        }
        sqlx::query("TRUNCATE journaled.jobs")
            .execute(&pool)
            .await
            .unwrap();
    }
    let [a, b, c, d] = tps.map(median);
    println!(
        "PostgreSQL, 1 connection, {PER_ROUND} transactions x {ROUNDS} interleaved rounds, median tx/s:"
    );
    println!("  (a) UPDATE only                          {a:>8.0}");
    println!("  (b) UPDATE + {EVENTS} journal! (one job row)    {b:>8.0}");
    println!("  (c) UPDATE + hand-written batch INSERT   {c:>8.0}");
    println!("  (d) UPDATE + {EVENTS} single-event INSERTs     {d:>8.0}");
    println!(
        "  (b)/(c) = {:.3}   (b)/(d) = {:.3}   (b)/(a) = {:.3}",
        b / c,
        b / d,
        b / a
    );

    // Validation + serialization of one small event, no database.
    let small = event(1);
    for _ in 0..10_000 {
        journaled.validate(&small).unwrap();
    }
    let n = 200_000;
    let start = Instant::now();
    for _ in 0..n {
        journaled.validate(std::hint::black_box(&small)).unwrap();
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("validate + serialize one small event: {per:.2} µs");

    pool.close().await;
    sqlx::raw_sql("DROP DATABASE IF EXISTS journaled_bench WITH (FORCE)")
        .execute(&admin)
        .await
        .unwrap();
}
