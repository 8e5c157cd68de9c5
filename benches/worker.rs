//! The delivery worker's speed, from one run:
//! 1. its own ceiling with the sink replaced by a no-op, on a backlog of one million events
//!    (10 per job), and its peak memory (VmHWM) while draining it;
//! 2. events per second from PostgreSQL to kinesalite, against raw `PutRecords` from the same
//!    SDK client to the same kinesalite, same concurrency and request size;
//! 3. commit-to-acknowledged latency at a steady moderate rate: commits made in the worker's
//!    process (woken in memory) and in another process (woken by the coalesced NOTIFY);
//! 4. memory and time draining 10 transactions of 100,000 events of ~1 KB each (committed by a
//!    child process, so that the figure is the worker's alone).
//!
//! ```sh
//! cargo bench --bench worker --features worker    # needs PostgreSQL on 127.0.0.1:5432 and Node.js (tools/)
//! ```

#[path = "../tests/common/kinesis.rs"]
mod kinesis;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use journaled::delivery::{Failure, NoopSink, OutRecord, Sink};
use journaled::kinesis::KinesisSink;
use journaled::store::BoxFuture;
use journaled::{Config, Journaled, Worker, WorkerConfig, journal};
use kinesis::{Emulator, Kind, kinesis_config};
use sqlx::PgPool;
use support::{drain, fresh_db, median};

#[derive(serde::Serialize, journaled::Event)]
struct ContractAcceptanceEvent {
    user_id: i64,
    signature: String,
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Inserts `jobs` jobs of 10 events each in one statement (a backlog, fast).
async fn backlog(journaled: &Journaled<sqlx::Postgres>, jobs: i64) {
    // One real job as the template, then copies of it.
    let mut tx = journaled.begin().await.unwrap();
    for i in 0..10 {
        journal!(
            tx,
            ContractAcceptanceEvent {
                user_id: i,
                signature: "Sarah T. User".into()
            }
        )
        .unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query(
        "INSERT INTO journaled.jobs (priority, ready, event_count, bytes, records) \
         SELECT j.priority, true, j.event_count, j.bytes, j.records FROM journaled.jobs j, generate_series(2, $1)",
    )
    .bind(jobs)
    .execute(journaled.pool())
    .await
    .unwrap();
}

/// Records when each event id was acknowledged.
struct TimingSink {
    inner: KinesisSink,
    acked: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Sink for TimingSink {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<Failure>>, Failure>> {
        Box::pin(async move {
            let result = self.inner.put_records(stream, records).await;
            let now = Instant::now();
            if let Ok(outcomes) = &result {
                let mut acked = self.acked.lock().unwrap();
                for (record, outcome) in records.iter().zip(outcomes) {
                    if outcome.is_none() {
                        // Records start with {"id":"<36-char uuid>"
                        let id = String::from_utf8_lossy(&record.data[7..43]).into_owned();
                        acked.insert(id, now);
                    }
                }
            }
            result
        })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(serde::Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct KilobyteEvent {
    n: i64,
    body: String,
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Child process modes: commit what the parent measures, so that the parent's memory and wake
/// path are the worker's own.
async fn child(mode: &str, url: &str, config: Config) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap();
    let journaled = Journaled::new(pool, config);
    match mode {
        "big" => {
            let body = "x".repeat(1_000);
            for t in 0..10 {
                let mut tx = journaled.begin().await.unwrap();
                for n in 0..100_000 {
                    journal!(
                        tx,
                        KilobyteEvent {
                            n: t * 100_000 + n,
                            body: body.clone()
                        }
                    )
                    .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }
        _ => {
            // One event per transaction at 100/s; prints "<event id> <commit unix ns>".
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            for i in 0..1000 {
                ticker.tick().await;
                let mut tx = journaled.begin().await.unwrap();
                let id = journal!(
                    tx,
                    ContractAcceptanceEvent {
                        user_id: i,
                        signature: "Sarah T. User".into()
                    }
                )
                .unwrap();
                tx.commit().await.unwrap();
                println!("{id} {}", unix_ns());
            }
            // Let the coalesced NOTIFY of the last commit go out before exiting.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn_child(mode: &str, url: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .env("JOURNALED_BENCH_CHILD", mode)
        .env("JOURNALED_BENCH_URL", url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let config = Config::default()
        .with_stream_name("bench")
        .with_schema_roots([concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/journaled_schemas"
        )]);
    if let Ok(mode) = std::env::var("JOURNALED_BENCH_CHILD") {
        let url = std::env::var("JOURNALED_BENCH_URL").unwrap();
        child(&mode, &url, config).await;
        return;
    }
    let admin = PgPool::connect(&admin_url).await.expect("connect");
    let bench_url = format!(
        "{}/journaled_bench_worker",
        admin_url.rsplit_once('/').unwrap().0
    );

    // 4 (first, so that the high-water mark is this phase's): 10 transactions of 100,000
    // events of ~1 KB, committed by a child process, drained by the default worker.
    {
        let pool = fresh_db(&admin, "journaled_bench_worker", &admin_url).await;
        let start = Instant::now();
        let out = spawn_child("big", &bench_url).wait_with_output().unwrap();
        assert!(out.status.success());
        let commit_secs = start.elapsed().as_secs_f64();
        let (rows, bytes): (i64, i64) =
            sqlx::query_as("SELECT count(*), coalesce(max(bytes), 0)::int8 FROM journaled.jobs")
                .fetch_one(&pool)
                .await
                .unwrap();
        let rss_before = peak_rss_mib();
        let elapsed = drain(&pool, NoopSink, WorkerConfig::default()).await;
        println!(
            "4. 10 transactions x 100,000 events of ~1 KB (committed by a child in {commit_secs:.1} s as {rows} job rows, largest {:.2} MiB), default worker, no-op sink:",
            bytes as f64 / (1024.0 * 1024.0)
        );
        println!(
            "   drained in {:.1} s ({:.0} events/s); worker process peak RSS {:.1} MiB (before: {rss_before:.1} MiB)",
            elapsed.as_secs_f64(),
            1_000_000.0 / elapsed.as_secs_f64(),
            peak_rss_mib()
        );
        pool.close().await;
    }
    let million: i64 = std::env::var("BENCH_BACKLOG_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);

    // 1. Ceiling: a no-op sink draining a backlog of a million events.
    let pool = fresh_db(&admin, "journaled_bench_worker", &admin_url).await;
    let journaled = Journaled::new(pool.clone(), config.clone());
    backlog(&journaled, million / 10).await;
    let rss_before = peak_rss_mib();
    let ceiling_config = WorkerConfig::default()
        .with_batch_size(500)
        .with_concurrency(4);
    let elapsed = drain(&pool, NoopSink, ceiling_config).await;
    let rss_after = peak_rss_mib();
    println!(
        "1. no-op sink, backlog of {million} events (10 per job), batch 500 jobs x 4 in flight:"
    );
    println!(
        "   {:.0} events/s ({:.1} s); peak RSS {rss_after:.1} MiB (before draining: {rss_before:.1} MiB)",
        million as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );

    // 2. Worker vs raw PutRecords, same client, same kinesalite, same request size and concurrency.
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("bench", 4).await;
    let client = kinesis_config(&emulator.endpoint()).client().await;
    let events: i64 = 40_000;
    let data: Vec<Vec<u8>> = (0..500)
        .map(|i| format!(r#"{{"id":"00000000-0000-7000-8000-{i:012}","event_type":"contract_acceptance_event","created_at":"2026-11-23T00:00:00.000+00:00","user_id":{i},"signature":"Sarah T. User"}}"#).into_bytes())
        .collect();
    let keys: Vec<String> = (0..500)
        .map(|i| format!("00000000-0000-7000-8000-{i:012}"))
        .collect();
    let raw_sink = KinesisSink::new(client.clone());
    let requests = (events / 500) as usize;
    // Warm up connections.
    let records: Vec<OutRecord<'_>> = keys
        .iter()
        .zip(&data)
        .map(|(k, d)| OutRecord {
            partition_key: k,
            data: d,
        })
        .collect();
    raw_sink.put_records("bench", &records).await.unwrap();
    let mut raw_rates = Vec::new();
    let mut worker_rates = Vec::new();
    let mut no_receipt_rates = Vec::new();
    for _round in 0..3 {
        let start = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(4));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..requests {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let sink = raw_sink.clone();
            let keys = keys.clone();
            let data = data.clone();
            set.spawn(async move {
                let records: Vec<OutRecord<'_>> = keys
                    .iter()
                    .zip(&data)
                    .map(|(k, d)| OutRecord {
                        partition_key: k,
                        data: d,
                    })
                    .collect();
                let outcomes = sink.put_records("bench", &records).await.unwrap();
                assert!(outcomes.iter().all(Option::is_none));
                drop(permit);
            });
        }
        while set.join_next().await.is_some() {}
        raw_rates.push(events as f64 / start.elapsed().as_secs_f64());

        backlog(&journaled, events / 10).await;
        let elapsed = drain(
            &pool,
            KinesisSink::new(client.clone()),
            WorkerConfig::default()
                .with_batch_size(50)
                .with_concurrency(4),
        )
        .await;
        worker_rates.push(events as f64 / elapsed.as_secs_f64());

        backlog(&journaled, events / 10).await;
        let elapsed = drain(
            &pool,
            KinesisSink::new(client.clone()),
            WorkerConfig::default()
                .with_batch_size(50)
                .with_concurrency(4)
                .with_receipts_retention(Duration::ZERO),
        )
        .await;
        no_receipt_rates.push(events as f64 / elapsed.as_secs_f64());
    }
    let (raw, worker, no_receipts) = (
        median(raw_rates),
        median(worker_rates),
        median(no_receipt_rates),
    );
    println!(
        "2. kinesalite, {events} events, 500 records per request, 4 requests in flight, median of 3 interleaved rounds:"
    );
    println!(
        "   raw PutRecords {raw:.0} events/s; worker from PostgreSQL {worker:.0} events/s; worker/raw = {:.3}",
        worker / raw
    );
    println!(
        "   worker with receipts (default) {worker:.0} events/s, without {no_receipts:.0} events/s; with/without = {:.3}",
        worker / no_receipts
    );

    // 3. Latency: one event per transaction at a steady rate, the worker woken by NOTIFY.
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let sink = TimingSink {
        inner: KinesisSink::new(client.clone()),
        acked: acked.clone(),
    };
    let worker = Worker::new(pool.clone(), sink, WorkerConfig::default()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(500)).await; // LISTEN is up
    let rate = 100u64;
    let total = 1000;
    let mut committed = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..total {
        ticker.tick().await;
        let mut tx = journaled.begin().await.unwrap();
        let id = journal!(
            tx,
            ContractAcceptanceEvent {
                user_id: i,
                signature: "Sarah T. User".into()
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
        committed.insert(id.to_string(), Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same from another process: woken by the committer's coalesced NOTIFY.
    let acked_before = acked.lock().unwrap().len();
    let out = spawn_child("latency", &bench_url)
        .wait_with_output()
        .unwrap();
    let remote: Vec<(String, u128)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (id, ns) = l.split_once(' ')?;
            Some((id.to_owned(), ns.parse().ok()?))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < acked_before + remote.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    let mut remote_latencies: Vec<f64> = {
        let acked = acked.lock().unwrap();
        let (now_ns, now) = (unix_ns(), Instant::now());
        remote
            .iter()
            .filter_map(|(id, committed_ns)| {
                let ack = acked.get(id)?;
                let ack_ns = now_ns - now.saturating_duration_since(*ack).as_nanos();
                Some(ack_ns.saturating_sub(*committed_ns) as f64 / 1e6)
            })
            .collect()
    };
    remote_latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut latencies: Vec<f64> = {
        let acked = acked.lock().unwrap();
        committed
            .iter()
            .filter_map(|(id, at)| {
                acked
                    .get(id)
                    .map(|ack| ack.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("3. commit-to-acknowledged, {total} transactions of 1 event at {rate}/s, kinesalite:");
    println!(
        "   committed in the worker's process (woken in memory): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {total} acknowledged)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    println!(
        "   committed in another process (coalesced NOTIFY): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} acknowledged)",
        percentile(&remote_latencies, 0.5),
        percentile(&remote_latencies, 0.99),
        remote_latencies.last().copied().unwrap_or(f64::NAN),
        remote_latencies.len(),
        remote.len()
    );

    pool.close().await;
    sqlx::raw_sql("DROP DATABASE IF EXISTS journaled_bench_worker WITH (FORCE)")
        .execute(&admin)
        .await
        .unwrap();
}
