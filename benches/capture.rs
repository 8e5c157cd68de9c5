//! What capture costs the writer, on PostgreSQL, measured side by side in one run.
//!
//! ```sh
//! cargo bench --bench capture --no-default-features --features postgres
//! # DATABASE_URL defaults to postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! A `bench_users` table of 100,000 rows (10 columns, a unique index on `email`), one
//! connection. Two workloads, each with the variants interleaved over rounds, medians printed:
//!
//! - bulk: one `UPDATE bench_users SET counter = counter + 1, updated_at = now()` of every row,
//!   in its own transaction (the time includes the COMMIT);
//! - single: 1,000 transactions of one `UPDATE … WHERE id = $1` each, through `journaled.begin()`.
//!
//! Variants: (a) the bare statement; (b) under capture (`Journaled::enable_capture`; the
//! single-row transactions with `Config::with_capture_context(true)`); (c) a row-level trigger
//! that builds the same event per row with jsonb and inserts one job row per change (the
//! Logidze-style design, without sensitive filtering, so a lower bound of its cost); (d) the
//! callback path: the application reads the rows before and after (`UPDATE … RETURNING`) and
//! calls `tx.audit` for each change.

use std::time::{Duration, Instant};

use journaled::audit::Change;
use journaled::capture::Capture;
use journaled::{Config, Journaled};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres};

const ROWS: i64 = 100_000;
const SINGLE: usize = 1_000;
const BULK_ROUNDS: usize = 3;
const SINGLE_ROUNDS: usize = 3;

#[derive(Serialize, Deserialize, journaled::Audited)]
#[audited(table = "bench_users", sensitive = ["ssn"])]
struct BenchUser {
    id: i64,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    plan: String,
    counter: i64,
    ssn: Option<String>,
    settings: Option<serde_json::Value>,
    created_at: String,
    updated_at: String,
}

const TABLE: &str = "
CREATE TABLE bench_users (
    id bigint PRIMARY KEY,
    email text NOT NULL UNIQUE,
    first_name text,
    last_name text,
    plan text NOT NULL DEFAULT 'free',
    counter bigint NOT NULL DEFAULT 0,
    ssn text,
    settings jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL);
INSERT INTO bench_users
SELECT i, 'user' || i || '@example.com', 'First' || i, 'Last' || i, 'free', 0, '123-45-' || i,
       '{\"theme\": \"dark\", \"beta\": true}', now() - i * interval '1 minute', now() - i * interval '1 second'
FROM generate_series(1, 100000) i";

/// The row-level comparison: one trigger call and one job row per changed row.
const ROW_TRIGGER: &str = r#"
CREATE FUNCTION bench_row_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    o jsonb := to_jsonb(OLD);
    n jsonb := to_jsonb(NEW);
    changes jsonb;
    id text := gen_random_uuid()::text;
    data text;
    record text;
BEGIN
    SELECT jsonb_object_agg(key, jsonb_build_array(o->key, value)) INTO changes
    FROM jsonb_each(n) WHERE key NOT IN ('created_at', 'updated_at') AND o->key IS DISTINCT FROM value;
    IF changes IS NULL THEN RETURN NULL; END IF;
    data := jsonb_build_object('id', id, 'event_type', 'journaled_audit_log_event',
        'created_at', to_char(NEW.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"'),
        'tags', '{}'::jsonb, 'class_name', 'BenchUser', 'table_name', TG_TABLE_NAME,
        'record_id', NEW.id::text, 'database_operation', 'update', 'changes', changes,
        'snapshot', NULL, 'actor', 'gid://bench/db/' || current_user)::text;
    record := '[{"id":"' || id || '","stream":"bench","partition_key":"' || id || '","data":' || data || '}]';
    INSERT INTO journaled.jobs (priority, run_at, ready, event_count, bytes, records)
    VALUES (20, now(), true, 1, octet_length(record), record);
    RETURN NULL;
END
$$"#;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Bare,
    Capture,
    RowTrigger,
    Callback,
}

const VARIANTS: [Variant; 4] = [
    Variant::Bare,
    Variant::Capture,
    Variant::RowTrigger,
    Variant::Callback,
];

async fn install(variant: Variant, journaled: &Journaled<Postgres>) {
    let pool = journaled.pool();
    journaled.disable_capture("bench_users").await.unwrap();
    sqlx::raw_sql("DROP TRIGGER IF EXISTS bench_row_audit ON bench_users")
        .execute(pool)
        .await
        .unwrap();
    match variant {
        Variant::Capture => {
            journaled
                .enable_capture(&Capture::table("bench_users").sensitive(["ssn"]))
                .await
                .unwrap();
        }
        Variant::RowTrigger => {
            sqlx::raw_sql(
                "CREATE TRIGGER bench_row_audit AFTER UPDATE ON bench_users \
                 FOR EACH ROW EXECUTE FUNCTION bench_row_audit()",
            )
            .execute(pool)
            .await
            .unwrap();
        }
        Variant::Bare | Variant::Callback => {}
    }
}

/// Untimed: no jobs left, no dead rows, a checkpoint (when allowed), so each run starts alike.
async fn settle(pool: &PgPool) {
    for sql in ["TRUNCATE journaled.jobs", "VACUUM bench_users"] {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    }
    let _ = sqlx::raw_sql("CHECKPOINT").execute(pool).await;
}

fn rows(texts: Vec<String>) -> Vec<BenchUser> {
    texts
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
}

/// The transactions of (b) tell the triggers who acts; the others begin as usual.
fn for_variant(variant: Variant, journaled: &[Journaled<Postgres>; 2]) -> &Journaled<Postgres> {
    &journaled[usize::from(variant == Variant::Capture)]
}

async fn bulk(variant: Variant, journaled: &[Journaled<Postgres>; 2]) -> (Duration, usize) {
    let journaled = for_variant(variant, journaled);
    settle(journaled.pool()).await;
    let start = Instant::now();
    let mut tx = journaled.begin().await.unwrap();
    if variant == Variant::Callback {
        let before: Vec<String> =
            sqlx::query_scalar("SELECT to_json(u)::text FROM bench_users u ORDER BY id")
                .fetch_all(&mut *tx)
                .await
                .unwrap();
        let mut after: Vec<String> = sqlx::query_scalar(
            "UPDATE bench_users u SET counter = counter + 1, updated_at = now() RETURNING to_json(u)::text",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let before = rows(before);
        let mut after = rows(std::mem::take(&mut after));
        after.sort_by_key(|u| u.id);
        for (b, a) in before.iter().zip(&after) {
            tx.audit(Change::update(b, a)).unwrap();
        }
    } else {
        sqlx::query("UPDATE bench_users SET counter = counter + 1, updated_at = now()")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let elapsed = start.elapsed();
    let events: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(event_count), 0) FROM journaled.jobs")
            .fetch_one(journaled.pool())
            .await
            .unwrap();
    (elapsed, events as usize)
}

async fn single(variant: Variant, journaled: &[Journaled<Postgres>; 2], round: usize) -> Duration {
    let journaled = for_variant(variant, journaled);
    settle(journaled.pool()).await;
    let start = Instant::now();
    for i in 0..SINGLE {
        let id = ((round * SINGLE + i) as i64 * 7919) % ROWS + 1;
        let mut tx = journaled.begin().await.unwrap();
        if variant == Variant::Callback {
            let before: String =
                sqlx::query_scalar("SELECT to_json(u)::text FROM bench_users u WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
            let after: String = sqlx::query_scalar(
                "UPDATE bench_users u SET counter = counter + 1, updated_at = now() WHERE id = $1 RETURNING to_json(u)::text",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            let before: BenchUser = serde_json::from_str(&before).unwrap();
            let after: BenchUser = serde_json::from_str(&after).unwrap();
            tx.audit(Change::update(&before, &after)).unwrap();
        } else {
            sqlx::query(
                "UPDATE bench_users SET counter = counter + 1, updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    start.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn name(variant: Variant) -> &'static str {
    match variant {
        Variant::Bare => "(a) bare statement",
        Variant::Capture => "(b) capture (statement-level trigger)",
        Variant::RowTrigger => "(c) row-level trigger, a job row per change",
        Variant::Callback => "(d) callback: read before/after + tx.audit",
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = PgPool::connect(&admin_url).await.expect("connect");
    for sql in [
        "DROP DATABASE IF EXISTS journaled_bench_capture WITH (FORCE)",
        "CREATE DATABASE journaled_bench_capture",
    ] {
        sqlx::raw_sql(sql).execute(&admin).await.unwrap();
    }
    let url = format!(
        "{}/journaled_bench_capture",
        admin_url.rsplit_once('/').unwrap().0
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let config = Config::default()
        .with_stream_name("bench")
        .with_app_name("bench");
    let both = [
        Journaled::new(pool.clone(), config.clone()),
        Journaled::new(pool.clone(), config.with_capture_context(true)),
    ];
    let journaled = &both[0];
    journaled.migrate().await.unwrap();
    sqlx::raw_sql(TABLE).execute(&pool).await.unwrap();
    sqlx::raw_sql("VACUUM ANALYZE bench_users")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(ROW_TRIGGER).execute(&pool).await.unwrap();

    // Bulk: one 100,000-row UPDATE per run.
    let mut bulk_ms: [Vec<f64>; 4] = Default::default();
    let mut bulk_events = [0; 4];
    for round in 0..=BULK_ROUNDS {
        for (k, variant) in VARIANTS.into_iter().enumerate() {
            install(variant, journaled).await;
            let (elapsed, events) = bulk(variant, &both).await;
            if round > 0 {
                // Round 0 warms the caches up.
                bulk_ms[k].push(elapsed.as_secs_f64() * 1e3);
            }
            bulk_events[k] = events;
        }
    }
    // Single-row transactions.
    let mut single_tps: [Vec<f64>; 4] = Default::default();
    for round in 0..=SINGLE_ROUNDS {
        for (k, variant) in VARIANTS.into_iter().enumerate() {
            install(variant, journaled).await;
            let elapsed = single(variant, &both, round).await;
            if round > 0 {
                single_tps[k].push(SINGLE as f64 / elapsed.as_secs_f64());
            }
        }
    }
    install(Variant::Bare, journaled).await;

    let bulk_ms = bulk_ms.map(median);
    let single_tps = single_tps.map(median);
    println!(
        "PostgreSQL, 1 connection; bulk: UPDATE of {ROWS} rows, median of {BULK_ROUNDS} rounds; \
         single: {SINGLE} one-row transactions, median of {SINGLE_ROUNDS} rounds"
    );
    println!(
        "  {:<46} {:>10} {:>9} {:>12}",
        "variant", "bulk ms", "events", "single tx/s"
    );
    for (k, variant) in VARIANTS.into_iter().enumerate() {
        println!(
            "  {:<46} {:>10.0} {:>9} {:>12.0}",
            name(variant),
            bulk_ms[k],
            bulk_events[k],
            single_tps[k]
        );
    }
    let [a, b, c, d] = bulk_ms;
    println!(
        "  bulk:   (b)/(a) = {:.2} (goal <= 2)   (c)/(b) = {:.2}   (d)/(b) = {:.2}",
        b / a,
        c / b,
        d / b
    );
    let [a, b, c, d] = single_tps;
    println!(
        "  single: (b)/(a) = {:.2}   (b)/(c) = {:.2}   (b)/(d) = {:.2} (goal >= 1: the callback path is not faster)",
        b / a,
        b / c,
        b / d
    );

    pool.close().await;
    sqlx::raw_sql("DROP DATABASE IF EXISTS journaled_bench_capture WITH (FORCE)")
        .execute(&admin)
        .await
        .unwrap();
}
