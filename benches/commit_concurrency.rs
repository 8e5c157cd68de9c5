//! What journaling costs writers at 1, 4, 16 and 64 connections, and what a claim costs with a
//! million jobs that are not due, on PostgreSQL, measured side by side in one run.
//!
//! ```sh
//! cargo bench --bench commit_concurrency --no-default-features --features postgres
//! ```
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names the server; the
//! bench creates and drops its own database. `JOURNALED_BENCH_SECS` (default 3) is the length of
//! one measurement, `JOURNALED_BENCH_ROUNDS` (default 2) the rounds of interleaved modes;
//! `JOURNALED_BENCH_MODES=L,O` measures those modes only (and skips the claims, and 4x16
//! unless L and H are among them); `JOURNALED_BENCH_CONNECTIONS=16,4x16` those sizes only.
//!
//! Each transaction: UPDATE a random row of 10,000, then
//! - (L) the library: 10 `journal!` calls (~200-byte events), COMMIT (one job row);
//! - (H) hand-written: one INSERT of the same bytes into a plain table with no trigger, COMMIT;
//! - (N) hand-written plus `pg_notify` in the transaction: what the dropped trigger did;
//! - (Q) the library with `Config::with_notify(false)` (no coalesced NOTIFY to other processes);
//! - (O) L with ordered events (issue 14), on keys no other writer uses: all 10 events of a
//!   transaction on one key of the writer's own 100, so a transaction takes its key's advisory
//!   lock and writes its job unnumbered (no worker runs here to number it); the keys are new to
//!   the database (before migration 9 a transaction upserted its key's sequence row, most of
//!   them new at 64 connections);
//! - (K) O on keys that recur: each writer's own 10, whose sequence rows exist before the
//!   measurement (an application whose aggregates are written more than once; before
//!   migration 9 a transaction updated its key's row in place);
//! - (U) O's events, the same fields and keys, not ordered: what the ordering itself costs is
//!   O against U, since O's events also carry a key field that L's do not.
//!
//! Modes are interleaved (L, H, N, Q, O, K, U, then H, N, Q, O, K, U, L: each round starts with the
//! next mode) with VACUUM and CHECKPOINT before each measurement.
//! Client CPU per transaction ("µs") is the process's user+system time over the transactions
//! done; server CPU ("srv") is that of every `postgres` process on this machine (with the
//! postmaster's exited children), read from `/proc`, so only for a local server. "paired" is
//! the median (min–max) over rounds of each round's own ratio: a machine that slows down
//! between rounds moves it less than the ratio of the medians.
//!
//! `JOURNALED_BENCH_EXPERIMENT_SQL` runs SQL on the bench database after migrating it, to
//! measure what a schema change would do (e.g. `DROP INDEX journaled.jobs_ready_idx`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use journaled::{Backend, Config, Journaled, journal};
use serde::Serialize;
use sqlx::{PgPool, Postgres};

#[derive(Serialize, Clone, journaled::Event)]
#[journaled(event_type = "free_event")]
struct AccountCredited {
    account_id: i64,
    amount_cents: i64,
    currency: String,
    reference: String,
    note: String,
}

/// The ordered event's fields and partition key, not ordered (mode U).
#[derive(Serialize, Clone, journaled::Event)]
#[journaled(event_type = "free_event")]
struct AccountCreditedKeyed {
    #[journaled(partition_key)]
    key: String,
    account_id: i64,
    amount_cents: i64,
    currency: String,
    reference: String,
    note: String,
}

/// The same event, ordered per key.
#[derive(Serialize, Clone, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct AccountCreditedInOrder {
    #[journaled(partition_key)]
    key: String,
    account_id: i64,
    amount_cents: i64,
    currency: String,
    reference: String,
    note: String,
}

const EVENTS: usize = 10;
/// Keys per writer in mode K.
const KNOWN_KEYS: u64 = 10;
const ACCOUNTS: i64 = 10_000;

fn event(account_id: i64, i: usize) -> AccountCredited {
    AccountCredited {
        account_id,
        amount_cents: 1_000 + i as i64,
        currency: "EUR".into(),
        reference: format!("ref-{account_id}-{i}"),
        note: "monthly interest, credited by the batch run".into(),
    }
}

/// What a hand-written outbox stores for the same transaction: the same records, the same size.
fn hand_written_records(account_id: i64) -> String {
    let records: Vec<serde_json::Value> = (0..EVENTS)
        .map(|i| {
            let id = uuid::Uuid::now_v7().to_string();
            let e = event(account_id, i);
            serde_json::json!({
                "id": id, "stream": "bench", "partition_key": id,
                "data": {"id": id, "event_type": "free_event",
                         "created_at": journaled::format_time(time::OffsetDateTime::now_utc()),
                         "account_id": e.account_id, "amount_cents": e.amount_cents,
                         "currency": e.currency, "reference": e.reference, "note": e.note}
            })
        })
        .collect();
    serde_json::to_string(&records).unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Library,
    LibraryQuiet,
    Hand,
    HandNotify,
    Ordered,
    OrderedKnown,
    Keyed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Library => "L",
            Mode::LibraryQuiet => "Q",
            Mode::Hand => "H",
            Mode::HandNotify => "N",
            Mode::Ordered => "O",
            Mode::OrderedKnown => "K",
            Mode::Keyed => "U",
        }
    }

    fn parse(s: &str) -> Mode {
        match s {
            "L" => Mode::Library,
            "Q" => Mode::LibraryQuiet,
            "H" => Mode::Hand,
            "O" => Mode::Ordered,
            "K" => Mode::OrderedKnown,
            "U" => Mode::Keyed,
            _ => Mode::HandNotify,
        }
    }
}

/// One transaction of `mode` by writer `writer`, its `n`th.
async fn one_transaction(
    mode: Mode,
    journaled: &Journaled<Postgres>,
    pool: &PgPool,
    writer: usize,
    n: u64,
) {
    let account = fastrand::i64(0..ACCOUNTS);
    match mode {
        Mode::Library | Mode::LibraryQuiet | Mode::Ordered | Mode::OrderedKnown | Mode::Keyed => {
            let key = match mode {
                Mode::Ordered | Mode::Keyed => Some(format!("w{writer}-{}", n % 100)),
                Mode::OrderedKnown => Some(format!("w{writer}-{}", n % KNOWN_KEYS)),
                _ => None,
            };
            let mut tx = journaled.begin().await.unwrap();
            sqlx::query("UPDATE bench_accounts SET balance = balance + 1 WHERE id = $1")
                .bind(account)
                .execute(&mut *tx)
                .await
                .unwrap();
            for i in 0..EVENTS {
                let e = event(account, i);
                // O's event or U's: the same fields, the key from the writer's keys.
                macro_rules! keyed {
                    ($event:ident, $key:expr) => {
                        journal!(
                            tx,
                            $event {
                                key: $key.clone(),
                                account_id: e.account_id,
                                amount_cents: e.amount_cents,
                                currency: e.currency,
                                reference: e.reference,
                                note: e.note,
                            }
                        )
                        .unwrap()
                    };
                }
                if let (Some(key), Mode::Keyed) = (&key, mode) {
                    keyed!(AccountCreditedKeyed, key);
                } else if let Some(key) = &key {
                    keyed!(AccountCreditedInOrder, key);
                } else {
                    journal!(tx, e).unwrap();
                }
            }
            tx.commit().await.unwrap();
        }
        Mode::Hand | Mode::HandNotify => {
            let records = hand_written_records(account);
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("UPDATE bench_accounts SET balance = balance + 1 WHERE id = $1")
                .bind(account)
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO bench_outbox (priority, event_count, records) VALUES ($1, $2, $3)",
            )
            .bind(20_i32)
            .bind(EVENTS as i32)
            .bind(records)
            .execute(&mut *tx)
            .await
            .unwrap();
            if mode == Mode::HandNotify {
                sqlx::query("SELECT pg_notify('bench_outbox', '')")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
}

/// The process's user + system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// (comm, ppid, utime + stime, cutime + cstime) of a process, in ticks.
fn proc_stat(pid: &str) -> Option<(String, String, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, after) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((comm, f.get(1)?.to_string(), n(11) + n(12), n(13) + n(14)))
}

/// CPU time of the PostgreSQL server on this machine: every live `postgres` process, plus what
/// the postmaster's exited children used. `None` when no local server is visible.
fn server_cpu_time() -> Option<Duration> {
    let mut stats = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid.bytes().all(|b| b.is_ascii_digit())
            && let Some(stat) = proc_stat(&pid)
            && stat.0 == "postgres"
        {
            stats.insert(pid, stat);
        }
    }
    let ticks: u64 = stats
        .values()
        .map(|(_, ppid, own, children)| {
            // The postmaster's parent is not a postgres process: count its reaped children.
            own + if stats.contains_key(ppid) {
                0
            } else {
                *children
            }
        })
        .sum();
    (!stats.is_empty()).then(|| Duration::from_millis(ticks * 10))
}

struct Measured {
    tps: f64,
    cpu_us_per_tx: f64,
    /// The PostgreSQL server's CPU per transaction (NaN when not measurable from here).
    server_us_per_tx: f64,
    /// Transactions done (the 3 of the warm-up not counted).
    transactions: u64,
}

/// C tasks, each on its own connection, for `secs`. `gated`: once the pool is connected and
/// warmed up, print "ready" and start at a line on stdin (the 4x16 children start together,
/// so that none's start-up runs in another's measurement).
async fn measure(mode: Mode, connections: usize, secs: f64, url: &str, gated: bool) -> Measured {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections as u32 + 2)
        .min_connections(connections as u32 + 2)
        .connect(url)
        .await
        .unwrap();
    let journaled = Journaled::new(
        pool.clone(),
        config().with_notify(mode != Mode::LibraryQuiet),
    );
    // Warm up: connections, prepared statements, the schema cache.
    for n in 0..3 {
        one_transaction(mode, &journaled, &pool, usize::MAX, n).await;
    }
    // Writers of each measurement get keys of their own, new to the database and to this
    // process: at 64 connections most ordered transactions are their key's first, at 1 a key
    // recurs every 100th transaction. In mode K each writer's keys get their rows here.
    static MEASUREMENTS: AtomicU64 = AtomicU64::new(0);
    let first_writer = MEASUREMENTS.fetch_add(1, Ordering::Relaxed) as usize * 1000;
    if mode == Mode::OrderedKnown {
        let mut tasks = Vec::new();
        for writer in 0..connections {
            let (journaled, pool) = (journaled.clone(), pool.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..KNOWN_KEYS {
                    one_transaction(mode, &journaled, &pool, first_writer + writer, n).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }
    if gated {
        tokio::task::spawn_blocking(|| {
            use std::io::Write;
            let mut out = std::io::stdout();
            writeln!(out, "ready").unwrap();
            out.flush().unwrap();
            std::io::stdin().read_line(&mut String::new()).unwrap();
        })
        .await
        .unwrap();
    }
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let cpu_before = cpu_time();
    let server_before = server_cpu_time();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..connections {
        let (journaled, pool, done) = (journaled.clone(), pool.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                one_transaction(mode, &journaled, &pool, first_writer + writer, n).await;
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu_before).as_secs_f64();
    let server = server_before
        .zip(server_cpu_time())
        .map_or(f64::NAN, |(before, after)| {
            after.saturating_sub(before).as_secs_f64()
        });
    let n = done.load(Ordering::Relaxed) as f64;
    drop(journaled);
    pool.close().await;
    Measured {
        transactions: n as u64,
        tps: n / elapsed,
        cpu_us_per_tx: cpu * 1e6 / n.max(1.0),
        server_us_per_tx: server * 1e6 / n.max(1.0),
    }
}

fn config() -> Config {
    let config = Config::default()
        .with_stream_name("bench")
        .with_schema_roots([concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/journaled_schemas"
        )]);
    // The coalescing window of mode L's NOTIFY, as the library reads it from the environment.
    match std::env::var("JOURNALED_NOTIFY_INTERVAL_MS") {
        Ok(ms) => config.with_notify_interval(Duration::from_millis(ms.parse().unwrap())),
        Err(_) => config,
    }
}

async fn quiesce(admin: &PgPool) {
    for sql in [
        "TRUNCATE journaled.jobs",
        "TRUNCATE journaled.key_sequences",
        "TRUNCATE bench_outbox",
        "VACUUM ANALYZE bench_accounts",
        "VACUUM ANALYZE journaled.jobs",
        "VACUUM ANALYZE bench_outbox",
        "CHECKPOINT",
    ] {
        sqlx::raw_sql(sql).execute(admin).await.unwrap();
    }
}

/// The connection counts chosen by `JOURNALED_BENCH_CONNECTIONS` (all when unset).
struct Sizes(Option<String>);

impl Sizes {
    fn chosen(&self, size: &str) -> bool {
        self.0
            .as_deref()
            .is_none_or(|s| s.split(',').any(|s| s.trim() == size))
    }
}

/// The median; NaN for a mode left out (`JOURNALED_BENCH_MODES`).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench_url(admin_url: &str) -> String {
    format!(
        "{}/journaled_bench_cc",
        admin_url.rsplit_once('/').unwrap().0
    )
}

/// Claim latency: `samples` claims of 100 ready jobs, each given back after.
async fn claim_latency(pool: &PgPool, samples: usize) -> (f64, f64) {
    let lease = Duration::from_secs(60);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let claimed = <Postgres as Backend>::claim(pool, "bench", 100, 4 << 20, lease)
            .await
            .unwrap();
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(claimed.len(), 100);
        <Postgres as Backend>::release(pool, "bench").await.unwrap();
    }
    let p50 = median(times.clone());
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (p50, times[times.len() * 9 / 10])
}

async fn explain(pool: &PgPool, sql: &'static str) -> String {
    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {sql}"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.join("\n    ")
}

const READY_CLAIM: &str = "SELECT id FROM journaled.jobs WHERE ready ORDER BY priority, id LIMIT 100 FOR UPDATE SKIP LOCKED";
const OLD_CLAIM: &str = "SELECT id FROM journaled.jobs WHERE dead_at IS NULL AND run_at <= now() ORDER BY priority, run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED";

async fn claims(admin: &PgPool) {
    sqlx::raw_sql("TRUNCATE journaled.jobs")
        .execute(admin)
        .await
        .unwrap();
    let record = hand_written_records(1);
    sqlx::query(
        "INSERT INTO journaled.jobs (priority, run_at, ready, event_count, bytes, records) \
         SELECT 20, now(), true, 10, octet_length($1), $1 FROM generate_series(1, 1000)",
    )
    .bind(&record)
    .execute(admin)
    .await
    .unwrap();
    sqlx::raw_sql("VACUUM ANALYZE journaled.jobs")
        .execute(admin)
        .await
        .unwrap();
    let (before_p50, before_p90) = claim_latency(admin, 50).await;
    let plan_before = explain(admin, READY_CLAIM).await;

    // A million jobs ahead in priority that are not due: delayed, leased, backing off, dead.
    sqlx::query(
        "INSERT INTO journaled.jobs (priority, run_at, ready, event_count, bytes, records, \
             locked_by, locked_until, attempts, dead_at) \
         SELECT 10, now() + interval '1 day', false, 10, octet_length($1), $1, \
                CASE WHEN g % 4 = 1 THEN 'other-worker' END, \
                CASE WHEN g % 4 = 1 THEN now() + interval '1 day' END, \
                CASE WHEN g % 4 = 2 THEN 5 ELSE 0 END, \
                CASE WHEN g % 4 = 3 THEN now() END \
         FROM generate_series(1, 1000000) AS g",
    )
    .bind(&record)
    .execute(admin)
    .await
    .unwrap();
    sqlx::raw_sql("VACUUM ANALYZE journaled.jobs")
        .execute(admin)
        .await
        .unwrap();
    let (after_p50, after_p90) = claim_latency(admin, 50).await;
    let plan_after = explain(admin, READY_CLAIM).await;

    // The claim of migration 1 on the same rows, with its index, for comparison.
    for sql in [
        "CREATE INDEX bench_old_claim_idx ON journaled.jobs (priority, run_at, id) WHERE dead_at IS NULL",
        "VACUUM ANALYZE journaled.jobs",
    ] {
        sqlx::raw_sql(sql).execute(admin).await.unwrap();
    }
    let mut old = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let mut tx = admin.begin().await.unwrap();
        let ids: Vec<i64> = sqlx::query_scalar(OLD_CLAIM)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(ids.len(), 100);
        tx.rollback().await.unwrap();
        old.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let plan_old = explain(admin, OLD_CLAIM).await;
    for sql in [
        "DROP INDEX journaled.bench_old_claim_idx",
        "TRUNCATE journaled.jobs",
    ] {
        sqlx::raw_sql(sql).execute(admin).await.unwrap();
    }

    println!();
    println!("Claim of 100 jobs (promote + claim, then released), 50 samples each:");
    println!(
        "  1,000 due jobs only:                          p50 {before_p50:.2} ms, p90 {before_p90:.2} ms"
    );
    println!(
        "  + 1,000,000 not-due jobs ahead in priority:   p50 {after_p50:.2} ms, p90 {after_p90:.2} ms"
    );
    println!(
        "  ratio (with / without) p50: {:.2}",
        after_p50 / before_p50
    );
    println!(
        "  migration 1's claim query on the same rows (its index restored): p50 {:.2} ms",
        median(old)
    );
    println!("  EXPLAIN ANALYZE, ready claim, without:\n    {plan_before}");
    println!("  EXPLAIN ANALYZE, ready claim, with 1M not due:\n    {plan_after}");
    println!("  EXPLAIN ANALYZE, migration 1's claim, with 1M not due:\n    {plan_old}");
}

async fn child(spec: &str, url: &str) {
    let mut parts = spec.split(',');
    let mode = Mode::parse(parts.next().unwrap());
    let connections: usize = parts.next().unwrap().parse().unwrap();
    let secs: f64 = parts.next().unwrap().parse().unwrap();
    // A child of `processes` says when it is ready, and starts when told.
    let gated = std::env::var("JOURNALED_BENCH_GATED").is_ok();
    let m = measure(mode, connections, secs, url, gated).await;
    // tx/s, client CPU µs per transaction, transactions (for an instruction count per
    // transaction under callgrind: see BENCHMARKS.md).
    println!("{} {} {}", m.tps, m.cpu_us_per_tx, m.transactions);
}

/// 4 processes x 16 connections of one mode, at once; total tx/s and mean CPU µs per tx. The
/// children connect and warm up first, then all start together: a child still starting up
/// (the library compiles its schemas) would otherwise take CPU from the others' measurement.
fn processes(mode: Mode, secs: f64) -> Measured {
    use std::io::{BufRead, Read, Write};
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(&exe)
                .env(
                    "JOURNALED_BENCH_CHILD",
                    format!("{},16,{secs}", mode.name()),
                )
                .env("JOURNALED_BENCH_GATED", "1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "a child of the 4x16 run");
            out
        })
        .collect();
    let server_before = server_cpu_time();
    for c in &mut children {
        writeln!(c.stdin.take().unwrap(), "go").unwrap();
    }
    let mut tps = 0.0;
    let mut cpu = 0.0;
    let mut transactions = 0;
    for (c, out) in children.iter_mut().zip(&mut outputs) {
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert!(c.wait().unwrap().success(), "a child of the 4x16 run");
        let mut f = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
        tps += f.next().unwrap();
        cpu += f.next().unwrap() / 4.0;
        transactions += f.next().unwrap() as u64;
    }
    let server = server_before
        .zip(server_cpu_time())
        .map_or(f64::NAN, |(before, after)| {
            after.saturating_sub(before).as_secs_f64()
        });
    Measured {
        tps,
        cpu_us_per_tx: cpu,
        server_us_per_tx: server * 1e6 / (transactions as f64).max(1.0),
        transactions,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let url = bench_url(&admin_url);
    if let Ok(spec) = std::env::var("JOURNALED_BENCH_CHILD") {
        child(&spec, &url).await;
        return;
    }
    let secs: f64 = std::env::var("JOURNALED_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rounds: usize = std::env::var("JOURNALED_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let server = PgPool::connect(&admin_url).await.expect("connect");
    for sql in [
        "DROP DATABASE IF EXISTS journaled_bench_cc WITH (FORCE)",
        "CREATE DATABASE journaled_bench_cc",
    ] {
        sqlx::raw_sql(sql).execute(&server).await.unwrap();
    }
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE bench_accounts (id bigint PRIMARY KEY, balance bigint NOT NULL DEFAULT 0); \
         INSERT INTO bench_accounts (id) SELECT generate_series(0, 9999); \
         CREATE TABLE bench_outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             priority integer NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp(), \
             event_count integer NOT NULL, records text NOT NULL)",
    )
    .execute(&admin)
    .await
    .unwrap();
    journaled::migrate(&admin).await.unwrap();
    if let Ok(sql) = std::env::var("JOURNALED_BENCH_EXPERIMENT_SQL") {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'autovacuum', 'synchronous_commit', 'max_connections')",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    println!("PostgreSQL settings: {settings:?}");
    println!(
        "{secs} s per measurement, modes interleaved, each round starting with the next; medians of {rounds} rounds; each transaction = UPDATE + {EVENTS} events"
    );
    println!();
    println!(
        "{:>4} | {:>7} {:>7} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>6} {:>6} | {:>17} {:>17} | {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} {:>6} | {:>7} {:>6} {:>17} {:>6} {:>6} | {:>7} {:>6} {:>17} {:>6} {:>17} {:>6} {:>6}",
        "C",
        "L tx/s",
        "H tx/s",
        "N tx/s",
        "Q tx/s",
        "O tx/s",
        "L/H",
        "N/H",
        "Q/H",
        "O/L",
        "L/H paired",
        "O/L paired",
        "L µs",
        "H µs",
        "Q µs",
        "O µs",
        "L srv",
        "H srv",
        "Q srv",
        "O srv",
        "K tx/s",
        "K/L",
        "K/L paired",
        "K µs",
        "K srv",
        "U tx/s",
        "O/U",
        "O/U paired",
        "U/L",
        "U/L paired",
        "U µs",
        "U srv",
    );
    let only_claims = std::env::var("JOURNALED_BENCH_ONLY_CLAIMS").is_ok()
        || std::env::var("JOURNALED_BENCH_PROFILE").is_ok();
    // Some modes only, e.g. JOURNALED_BENCH_MODES=L,O (then no 4x16 and no claims).
    let modes = std::env::var("JOURNALED_BENCH_MODES").ok();
    let chosen = |mode: Mode| {
        modes
            .as_deref()
            .is_none_or(|m| m.split(',').any(|m| m.trim() == mode.name()))
    };
    // "paired": the median (min–max) over rounds of each round's own ratio, which a machine
    // slowing down between rounds moves less than the ratio of medians.
    let paired = |a: &[f64], b: &[f64]| -> String {
        let r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        if r.is_empty() {
            return "-".into();
        }
        let (lo, hi) = r
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{:.3} ({lo:.2}–{hi:.2})", median(r))
    };
    // Some sizes only, e.g. JOURNALED_BENCH_CONNECTIONS=16,4x16.
    let sizes = Sizes(std::env::var("JOURNALED_BENCH_CONNECTIONS").ok());
    for connections in [1usize, 4, 16, 64]
        .into_iter()
        .filter(|c| !only_claims && sizes.chosen(&c.to_string()))
    {
        let mut tps: [Vec<f64>; 7] = Default::default();
        let mut cpu: [Vec<f64>; 7] = Default::default();
        let mut srv: [Vec<f64>; 7] = Default::default();
        for round in 0..rounds {
            let mut order: Vec<(usize, Mode)> = [
                Mode::Library,
                Mode::Hand,
                Mode::HandNotify,
                Mode::LibraryQuiet,
                Mode::Ordered,
                Mode::OrderedKnown,
                Mode::Keyed,
            ]
            .into_iter()
            .enumerate()
            .filter(|(_, mode)| chosen(*mode))
            .collect();
            // Each round starts with the next mode, so that none always follows the same one.
            let len = order.len();
            order.rotate_left(round % len.max(1));
            for (k, mode) in order {
                quiesce(&admin).await;
                let m = measure(mode, connections, secs, &url, false).await;
                tps[k].push(m.tps);
                cpu[k].push(m.cpu_us_per_tx);
                srv[k].push(m.server_us_per_tx);
            }
        }
        let pl = paired(&tps[0], &tps[1]);
        let po = paired(&tps[4], &tps[0]);
        let pk = paired(&tps[5], &tps[0]);
        let pu = paired(&tps[4], &tps[6]);
        let pkl = paired(&tps[6], &tps[0]);
        let [l, h, n, q, o, k, u] = tps.map(median);
        let [lc, hc, _, qc, oc, kc, uc] = cpu.map(median);
        let [ls, hs, _, qs, os, ks, us] = srv.map(median);
        println!(
            "{connections:>4} | {l:>7.0} {h:>7.0} {n:>7.0} {q:>7.0} {o:>7.0} | {:>6.3} {:>6.3} {:>6.3} {:>6.3} | {pl:>17} {po:>17} | {lc:>6.0} {hc:>6.0} {qc:>6.0} {oc:>6.0} | {ls:>6.0} {hs:>6.0} {qs:>6.0} {os:>6.0} | {k:>7.0} {:>6.3} {pk:>17} {kc:>6.0} {ks:>6.0} | {u:>7.0} {:>6.3} {pu:>17} {:>6.3} {pkl:>17} {uc:>6.0} {us:>6.0}",
            l / h,
            n / h,
            q / h,
            o / l,
            k / l,
            o / u,
            u / l,
        );
    }
    // 4 processes x 16 connections: L, H and (if chosen) Q, interleaved.
    let processes_too =
        !only_claims && chosen(Mode::Library) && chosen(Mode::Hand) && sizes.chosen("4x16");
    let quiet_too = chosen(Mode::LibraryQuiet);
    let (mut l4, mut h4, mut q4) = (Vec::new(), Vec::new(), Vec::new());
    for round in (0..rounds.max(2)).filter(|_| processes_too) {
        let mut order = vec![Mode::Library, Mode::Hand];
        if quiet_too {
            order.push(Mode::LibraryQuiet);
        }
        let len = order.len();
        order.rotate_left(round % len);
        for mode in order {
            quiesce(&admin).await;
            let m = processes(mode, secs);
            match mode {
                Mode::Library => l4.push(m),
                Mode::Hand => h4.push(m),
                _ => q4.push(m),
            }
        }
    }
    if processes_too {
        let col = |ms: &[Measured], f: fn(&Measured) -> f64| median(ms.iter().map(f).collect());
        let tps = |ms: &[Measured]| ms.iter().map(|m| m.tps).collect::<Vec<_>>();
        let (l, h, q) = (
            col(&l4, |m| m.tps),
            col(&h4, |m| m.tps),
            col(&q4, |m| m.tps),
        );
        let pl = paired(&tps(&l4), &tps(&h4));
        println!(
            "4x16 | {l:>7.0} {h:>7.0} {:>7} {q:>7.0} {:>7} | {:>6.3} {:>6} {:>6.3} {:>6} | {pl:>17} {:>17} | {:>6.0} {:>6.0} {:>6.0} {:>6} | {:>6.0} {:>6.0} {:>6.0} {:>6}   (4 processes x 16 connections)",
            "-",
            "-",
            l / h,
            "-",
            q / h,
            "-",
            "-",
            col(&l4, |m| m.cpu_us_per_tx),
            col(&h4, |m| m.cpu_us_per_tx),
            col(&q4, |m| m.cpu_us_per_tx),
            "-",
            col(&l4, |m| m.server_us_per_tx),
            col(&h4, |m| m.server_us_per_tx),
            col(&q4, |m| m.server_us_per_tx),
            "-",
        );
    }

    if let Ok(spec) = std::env::var("JOURNALED_BENCH_PROFILE") {
        // One mode alone, for a profiler: e.g. JOURNALED_BENCH_PROFILE=L,1,10
        child(&spec, &url).await;
    } else if modes.is_none() && sizes.0.is_none() {
        claims(&admin).await;
    }

    admin.close().await;
    sqlx::raw_sql("DROP DATABASE IF EXISTS journaled_bench_cc WITH (FORCE)")
        .execute(&server)
        .await
        .unwrap();
}
