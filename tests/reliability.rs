//! The reliability suite (issue 7): writers journal concurrently — committing, rolling back,
//! failing on bad input — while several worker processes deliver through a fault-injecting proxy
//! to a real Kinesis, and at random moments a worker is SIGKILLed, the emulator is restarted,
//! PostgreSQL is restarted, and the proxy throttles, fails, stalls, resets or refuses. At the end
//! every stream is read back and checked, as sets of event ids: delivered ⊇ committed,
//! delivered ∩ rolled back = ∅, every delivered record's bytes equal the stored bytes.
//!
//! Two longer phases test the rule that failures which are not a job's fault never make it
//! dead (workers run with max attempts 3): Kinesis refusing connections for 6 s, far longer
//! than three backoff rounds; and STS refusing the workers' assume-role for 6 s, while every
//! worker is replaced so that each must get credentials anew.
//!
//! Ordered events (issue 14) ride along: in half the transactions the writers also journal 1–3
//! ordered events on ~1,000 keys (one in ten on one of three hot keys), to their own stream. At
//! the end, per key, the first appearance of each sequence number in the stream must come in
//! increasing order with no gap, and no sequence may belong to two events.
//!
//! `cargo test --test reliability` runs it for 45 s; `JOURNALED_SOAK_SECS=600` soaks.
//! `JOURNALED_RELIABILITY_PG_RESTART=0` skips restarting PostgreSQL (needs `pg_ctlcluster`).

mod common;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDb;
use common::kinesis::{Emulator, FakeSts, FaultProxy};
use journaled::{Event, Journaled, journal};
use serde::Serialize;
use serde_json::Value;

const STREAMS: [&str; 2] = ["rel_a", "rel_b"];
/// Short on purpose: the outage and credentials phases last many times this many rounds.
const MAX_ATTEMPTS: i32 = 3;
/// How long the outage and the credentials failure last.
const PHASE: Duration = Duration::from_secs(6);
const MISSING_STREAM: &str = "rel_missing";
/// The ordered events' stream.
const ORDERED_STREAM: &str = "rel_ordered";
/// Uniform keys of the ordered events; a tenth of them go to one of three hot keys instead.
const ORDERED_KEYS: usize = 1_000;

/// Delivered in commit order per key.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered, stream = "rel_ordered")]
struct OrderedEvent {
    #[journaled(partition_key)]
    key: String,
    writer: usize,
}

#[derive(Serialize)]
struct RelEvent {
    writer: usize,
    seq: u64,
    payload: String,
    #[serde(skip)]
    stream: &'static str,
}

impl Event for RelEvent {
    const EVENT_TYPE: &'static str = "free_event";
    fn stream_name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.stream))
    }
}

#[derive(Serialize, journaled::Event)]
struct TestEvent {
    name: String,
    count: Value,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Blob {
    blob: String,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Keyed {
    #[journaled(partition_key)]
    key: String,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Measured {
    reading: f64,
}

#[derive(Serialize, journaled::Event)]
struct NoSchemaAnywhere {
    n: i32,
}

#[derive(Default)]
struct Ledger {
    /// Committed for certain: id → the bytes stored.
    committed: HashMap<String, String>,
    /// Staged in a transaction whose COMMIT failed (the connection dropped): may or may not exist.
    uncertain: HashSet<String>,
    rolled_back: HashSet<String>,
    /// Committed to a stream that does not exist: must stay pending, never dead.
    to_missing_stream: HashSet<String>,
    /// Every ordered event staged, whatever became of its transaction.
    ordered: HashSet<String>,
    transactions: u64,
    bad_inputs_refused: u64,
}

/// A worker process that assumes a role through `sts` for its Kinesis credentials.
fn worker_process(db_url: &str, endpoint: &str, sts: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_journaled"))
        .arg("worker")
        .env("DATABASE_URL", db_url)
        .env("JOURNALED_STREAM_NAME", STREAMS[0])
        .env("AWS_ENDPOINT_URL_KINESIS", endpoint)
        .env("AWS_ENDPOINT_URL_STS", sts)
        .env(
            "JOURNALED_IAM_ROLE_ARN",
            "arn:aws:iam::123456789012:role/journaled-test",
        )
        .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env("JOURNALED_WORKER_BATCH_SIZE", "20")
        .env("JOURNALED_WORKER_CONCURRENCY", "2")
        .env("JOURNALED_WORKER_POLL_INTERVAL_MS", "100")
        .env("JOURNALED_WORKER_LEASE_SECS", "4")
        .env("JOURNALED_WORKER_MAX_ATTEMPTS", MAX_ATTEMPTS.to_string())
        .env("JOURNALED_WORKER_BACKOFF_BASE_MS", "20")
        .env("JOURNALED_WORKER_BACKOFF_MAX_SECS", "0.5")
        .env("JOURNALED_WORKER_CONFIGURATION_BACKOFF_SECS", "0.5")
        .env("JOURNALED_HTTP_READ_TIMEOUT_SECS", "1.5")
        .env("JOURNALED_HTTP_CONNECT_TIMEOUT_SECS", "1")
        .env("JOURNALED_SDK_MAX_ATTEMPTS", "1")
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
}

fn pg_restart_available() -> bool {
    std::env::var("JOURNALED_RELIABILITY_PG_RESTART")
        .map(|v| v != "0")
        .unwrap_or(true)
        && std::env::var("JOURNALED_TEST_DATABASE_URL").is_err()
        && std::path::Path::new("/etc/postgresql").exists()
        && Command::new("pg_ctlcluster")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

fn restart_postgres() -> bool {
    let Ok(versions) = std::fs::read_dir("/etc/postgresql") else {
        return false;
    };
    let Some(version) = versions
        .flatten()
        .next()
        .map(|e| e.file_name().to_string_lossy().into_owned())
    else {
        return false;
    };
    Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A published ordered event's text without its `"sequence":N` member (right after
/// `created_at`).
fn without_sequence(text: &str) -> String {
    let Some(at) = text.find(",\"sequence\":") else {
        return text.to_owned();
    };
    let digits = text[at + 12..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len() - at - 12);
    format!("{}{}", &text[..at], &text[at + 12 + digits..])
}

/// Notes the most failed rounds any pending job went through in a phase.
async fn record_attempts(
    db: &TestDb<sqlx::Postgres>,
    phase: &'static str,
    most: &mut BTreeMap<&'static str, i32>,
) {
    let attempts: Option<i32> = sqlx::query_scalar(
        "SELECT max(attempts) FROM journaled.jobs \
             WHERE dead_at IS NULL AND records NOT LIKE '%\"stream\":\"rel_missing\"%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap_or(None);
    let entry = most.entry(phase).or_default();
    *entry = (*entry).max(attempts.unwrap_or(0));
}

/// One writer: transactions until `stop`, recording what it committed, rolled back, or lost
/// track of; and now and then a bad input, which must be refused with nothing staged.
async fn writer(
    journaled: Journaled<sqlx::Postgres>,
    id: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(id as u64 * 7919 + 1);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut tx = match journaled.begin().await {
            Ok(tx) => tx,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await; // the database is restarting
                continue;
            }
        };
        let mut ids = Vec::new();
        let mut missing = Vec::new();
        for _ in 0..rng.usize(1..=5) {
            seq += 1;
            let to_missing = rng.u32(..200) == 0;
            let stream = if to_missing {
                MISSING_STREAM
            } else {
                STREAMS[rng.usize(..2)]
            };
            let event = RelEvent {
                writer: id,
                seq,
                payload: "x".repeat(rng.usize(0..300)),
                stream,
            };
            let event_id = journal!(tx, event).unwrap().to_string();
            if to_missing {
                missing.push(event_id)
            } else {
                ids.push(event_id)
            }
        }
        if rng.bool() {
            // Ordered events: mostly spread over many keys, some on a few hot ones.
            for _ in 0..rng.usize(1..=3) {
                let key = if rng.u32(..10) == 0 {
                    format!("hot-{}", rng.usize(..3))
                } else {
                    format!("key-{}", rng.usize(..ORDERED_KEYS))
                };
                let event_id = journal!(tx, OrderedEvent { key, writer: id })
                    .unwrap()
                    .to_string();
                ledger.lock().unwrap().ordered.insert(event_id.clone());
                ids.push(event_id);
            }
        }
        if rng.u32(..10) == 0 {
            // Bad input in the middle of a transaction: refused, nothing staged, the rest commits.
            let before = tx.staged_len();
            let refused = journal!(
                tx,
                TestEvent {
                    name: String::new(),
                    count: Value::from("many")
                }
            )
            .is_err();
            assert!(refused && tx.staged_len() == before);
            ledger.lock().unwrap().bad_inputs_refused += 1;
        }
        let roll_back = rng.u32(..5) == 0;
        let outcome = if roll_back {
            tx.rollback().await.map(|_| false)
        } else {
            tx.commit().await.map(|_| true)
        };
        let mut ledger = ledger.lock().unwrap();
        ledger.transactions += 1;
        match outcome {
            Ok(true) => {
                // Bytes are recorded by the enqueue subscriber; ids here.
                ledger.to_missing_stream.extend(missing);
                for id in ids {
                    ledger.committed.entry(id).or_default();
                }
            }
            Ok(false) => {
                ledger.rolled_back.extend(ids);
                ledger.rolled_back.extend(missing);
            }
            Err(_) if roll_back => {
                ledger.rolled_back.extend(ids);
                ledger.rolled_back.extend(missing);
            }
            Err(_) => {
                ledger.uncertain.extend(ids);
                ledger.uncertain.extend(missing);
            }
        }
    }
}

/// Each bad input gives its clear error and writes nothing, while the system runs.
async fn bad_inputs(journaled: &Journaled<sqlx::Postgres>, db: &TestDb<sqlx::Postgres>) -> usize {
    let jobs_before = journaled.jobs().await.unwrap().len();
    let mut tx = journaled.begin().await.unwrap();
    let mut checked = 0;
    let mut expect =
        |result: Result<journaled::EventId, journaled::JournalError>, what: &str, pattern: &str| {
            let err = result.expect_err(what);
            assert!(err.to_string().contains(pattern), "{what}: {err}");
            checked += 1;
        };
    expect(
        journal!(
            tx,
            TestEvent {
                name: String::new(),
                count: Value::from(1)
            }
        ),
        "too short",
        "/name",
    );
    expect(
        journal!(
            tx,
            TestEvent {
                name: "n".into(),
                count: Value::from("one")
            }
        ),
        "wrong type",
        "/count",
    );
    expect(
        journal!(
            tx,
            TestEvent {
                name: "n".into(),
                count: Value::from(-1)
            }
        ),
        "below minimum",
        "/count",
    );
    expect(
        journal!(
            tx,
            Blob {
                blob: "b".repeat(1_048_415)
            }
        ),
        "1 MiB + 1 byte",
        "1048577 bytes",
    );
    expect(
        journal!(tx, Keyed { key: String::new() }),
        "empty key",
        "empty",
    );
    expect(
        journal!(
            tx,
            Keyed {
                key: "k".repeat(257)
            }
        ),
        "long key",
        "257 characters",
    );
    expect(
        journal!(
            tx,
            Keyed {
                key: "😀".repeat(129)
            }
        ),
        "129 emoji: 258 UTF-16 units",
        "258 UTF-16 code units",
    );
    expect(
        journal!(tx, Measured { reading: f64::NAN }),
        "NaN",
        "NaN or infinite number at /reading",
    );
    expect(
        journal!(tx, NoSchemaAnywhere { n: 1 }),
        "missing schema",
        "no schema for event `no_schema_anywhere`",
    );
    let no_stream = Journaled::new(
        db.pool.clone(),
        journaled::Config::default().with_schema_roots([common::schema_root()]),
    );
    let mut tx2 = no_stream.begin().await.unwrap();
    expect(
        journal!(tx2, Keyed { key: "k".into() }),
        "no stream",
        "has no stream name",
    );
    tx2.rollback().await.unwrap();
    assert_eq!(tx.staged_len(), 0);
    // Exactly at the limit is fine.
    journal!(
        tx,
        Blob {
            blob: "b".repeat(1_048_414)
        }
    )
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(journaled.jobs().await.unwrap().len() >= jobs_before);
    checked
}

/// What the ordered stream shows, per key.
struct OrderCheck {
    records: usize,
    keys: usize,
    /// The last sequence of each hot key.
    hot: BTreeMap<String, i64>,
    /// (key, sequence first seen, the highest first seen before it) where it went backwards.
    out_of_order: Vec<(String, i64, i64)>,
    /// (key, sequence first seen, the one expected): a sequence skipped.
    gaps: Vec<(String, i64, i64)>,
    /// (key, sequence): on two different events.
    reused: Vec<(String, i64)>,
}

/// Per key, in stream order (a key's records are on one shard, in order): each sequence's first
/// appearance must be its predecessor's successor, starting at 1; a repeat (an at-least-once
/// duplicate) must be the same event.
fn check_order(records: &[journaled::kinesis::ReadRecord]) -> OrderCheck {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut owner: HashMap<(&str, i64), String> = HashMap::new();
    let mut check = OrderCheck {
        records: records.len(),
        keys: 0,
        hot: BTreeMap::new(),
        out_of_order: Vec::new(),
        gaps: Vec::new(),
        reused: Vec::new(),
    };
    for record in records {
        let value: Value = serde_json::from_slice(&record.data).unwrap();
        let key = record.partition_key.as_str();
        let seq = value["sequence"]
            .as_i64()
            .expect("an ordered record has a sequence");
        let id = value["id"].as_str().unwrap().to_owned();
        if let Some(first) = owner.get(&(key, seq)) {
            if *first != id {
                check.reused.push((key.to_owned(), seq));
            }
            continue; // a duplicate: its first appearance counted
        }
        owner.insert((key, seq), id);
        let highest = last.entry(key).or_insert(0);
        if seq < *highest {
            check.out_of_order.push((key.to_owned(), seq, *highest));
        } else if seq != *highest + 1 {
            check.gaps.push((key.to_owned(), seq, *highest + 1));
        }
        *highest = (*highest).max(seq);
    }
    check.keys = last.len();
    check.hot = last
        .iter()
        .filter(|(k, _)| k.starts_with("hot-"))
        .map(|(k, s)| ((*k).to_owned(), *s))
        .collect();
    check
}

fn malformed_configuration_is_refused(db_url: &str) -> usize {
    let cases = [
        ("worker", "JOURNALED_WORKER_BATCH_SIZE", "lots"),
        ("worker", "JOURNALED_HTTP_READ_TIMEOUT_SECS", "soon"),
        ("worker", "JOURNALED_WORKER_MAX_ATTEMPTS", "0"),
        ("schemas", "JOURNALED_JOB_PRIORITY", "high"),
        ("schemas", "JOURNALED_ENABLED", "maybe"),
    ];
    for (command, var, value) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_journaled"));
        if command == "schemas" {
            cmd.args(["schemas", "check"]);
        } else {
            cmd.arg("worker").env("JOURNALED_STREAM_NAME", "s");
        }
        let out = cmd
            .env("DATABASE_URL", db_url)
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} accepted");
        assert_eq!(stderr.trim().lines().count(), 1, "{var}={value}: {stderr}");
        assert!(
            stderr.contains(value)
                || stderr.contains(&var.to_lowercase().replace('_', "-"))
                || stderr.contains(var),
            "{var}={value}: {stderr}"
        );
    }
    cases.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_committed_is_lost_and_nothing_rolled_back_escapes() {
    let seconds: u64 = std::env::var("JOURNALED_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45);
    let started = Instant::now();
    let data_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("reliability-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut emulator = Emulator::start_persistent(&data_dir).await;
    for stream in STREAMS.into_iter().chain([ORDERED_STREAM]) {
        emulator.create_stream(stream, 2).await;
    }
    let proxy = FaultProxy::start(emulator.port).await;
    *proxy.faults.slow_for.lock().unwrap() = Duration::from_secs(3);
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    {
        let ledger = ledger.clone();
        journaled.on_enqueue(move |e| {
            ledger
                .lock()
                .unwrap()
                .committed
                .insert(e.event_id.to_string(), e.data.to_owned());
        });
    }

    let sts = FakeSts::start(false).await;
    let mut workers: Vec<Child> = (0..3)
        .map(|_| worker_process(&db.url(), &proxy.endpoint(), &sts.endpoint()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..6)
        .map(|i| tokio::spawn(writer(journaled.clone(), i, ledger.clone(), stop.clone())))
        .collect();

    // A corrupt job row among the others.
    sqlx::raw_sql(
        "INSERT INTO journaled.jobs (event_count, records) VALUES (1, '[{\"id\": broken')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let bad_inputs_checked = bad_inputs(&journaled, &db).await;

    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let pg_restarts = pg_restart_available();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // The long phases, in turn: a third of the way in and two thirds (every 2 minutes in a soak).
    let period = Duration::from_secs((seconds / 3).clamp(1, 120));
    let mut next_phase = Instant::now() + period;
    let mut phases = 0u32;
    let mut most_attempts: BTreeMap<&str, i32> = BTreeMap::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.u64(700..2000))).await;
        let f = &proxy.faults;
        if Instant::now() >= next_phase && Instant::now() + PHASE < deadline {
            next_phase += period;
            phases += 1;
            let kind = if phases % 2 == 1 {
                // Kinesis down for far longer than MAX_ATTEMPTS backoff rounds: new
                // connections refused, and the emulator gone behind pooled ones.
                f.down.store(true, Ordering::SeqCst);
                emulator.stop();
                tokio::time::sleep(PHASE).await;
                record_attempts(&db, "outage", &mut most_attempts).await;
                emulator.start_again().await;
                f.down.store(false, Ordering::SeqCst);
                "long outage (6 s, Kinesis down)"
            } else {
                // A broken role: STS refuses, and every worker must assume it anew.
                sts.refuse.store(true, Ordering::SeqCst);
                for w in &mut workers {
                    w.kill().unwrap();
                    w.wait().unwrap();
                    *w = worker_process(&db.url(), &proxy.endpoint(), &sts.endpoint());
                }
                tokio::time::sleep(PHASE).await;
                record_attempts(&db, "credentials", &mut most_attempts).await;
                sts.refuse.store(false, Ordering::SeqCst);
                "credentials failure (6 s, STS refusing assume-role; workers replaced)"
            };
            *faults.entry(kind).or_default() += 1;
            continue;
        }
        let kind = match rng.u32(..8) {
            0 => {
                let victim = rng.usize(..workers.len());
                workers[victim].kill().unwrap(); // SIGKILL
                workers[victim].wait().unwrap();
                workers[victim] = worker_process(&db.url(), &proxy.endpoint(), &sts.endpoint());
                "worker SIGKILLed and replaced"
            }
            1 => {
                emulator.stop();
                tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
                emulator.start_again().await;
                "emulator stopped and started"
            }
            2 if pg_restarts => {
                assert!(restart_postgres(), "pg_ctlcluster restart failed");
                "PostgreSQL restarted"
            }
            2 | 3 => {
                f.throttle_every.store(3, Ordering::SeqCst);
                f.throttle_requests.store(20, Ordering::SeqCst);
                "throttling (1 record in 3, 20 requests)"
            }
            4 => {
                f.fail_500.store(5, Ordering::SeqCst);
                "500s (5 requests)"
            }
            5 => {
                f.slow.store(3, Ordering::SeqCst);
                "stalls past the read timeout (3 requests)"
            }
            6 => {
                f.reset.store(5, Ordering::SeqCst);
                "connection resets (5 requests)"
            }
            _ => {
                f.down.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
                f.down.store(false, Ordering::SeqCst);
                "Kinesis unreachable for a while"
            }
        };
        *faults.entry(kind).or_default() += 1;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    // Let the faults end, then wait for everything deliverable to be delivered.
    let f = &proxy.faults;
    for counter in [&f.throttle_requests, &f.fail_500, &f.slow, &f.reset] {
        counter.store(0, Ordering::SeqCst);
    }
    f.down.store(false, Ordering::SeqCst);
    let drain_started = Instant::now();
    let drain_deadline = drain_started + Duration::from_secs(120);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM journaled.jobs WHERE dead_at IS NULL AND records NOT LIKE '%\"stream\":\"rel_missing\"%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(i64::MAX);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < drain_deadline,
            "{left} jobs still undelivered after the faults ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_in = drain_started.elapsed();
    for w in &mut workers {
        let _ = Command::new("kill")
            .args(["-TERM", &w.id().to_string()])
            .status();
    }
    for w in &mut workers {
        let _ = w.wait();
    }

    let mut delivered: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    let mut records = 0u64;
    let ordered = check_order(&emulator.read(ORDERED_STREAM).await);
    for stream in STREAMS.into_iter().chain([ORDERED_STREAM]) {
        for record in emulator.read(stream).await {
            records += 1;
            let value: Value = serde_json::from_slice(&record.data).unwrap();
            let entry = delivered
                .entry(value["id"].as_str().unwrap().to_owned())
                .or_insert((0, record.data.clone()));
            entry.0 += 1;
            assert_eq!(entry.1, record.data, "two deliveries of one event differ");
        }
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    // Events for the missing stream are committed too, but cannot be delivered: they are checked
    // to be kept, pending, below.
    let lost: Vec<&String> = ledger
        .committed
        .keys()
        .filter(|id| !delivered.contains_key(*id) && !ledger.to_missing_stream.contains(*id))
        .collect();
    let escaped: Vec<&String> = ledger
        .rolled_back
        .iter()
        .filter(|id| delivered.contains_key(*id))
        .collect();
    let unknown: Vec<&String> = delivered
        .keys()
        .filter(|id| !ledger.committed.contains_key(*id) && !ledger.uncertain.contains(*id))
        .collect();
    // An ordered event is numbered by the worker after its commit: `on_enqueue` heard it
    // without its sequence, which is otherwise the only difference allowed.
    let mismatched = ledger
        .committed
        .iter()
        .filter(|(id, bytes)| {
            delivered.get(*id).is_some_and(|(_, got)| {
                let got = String::from_utf8_lossy(got);
                let got = match ledger.ordered.contains(*id) {
                    true => without_sequence(&got),
                    false => got.into_owned(),
                };
                got != **bytes
            })
        })
        .count();
    let duplicates: u64 = delivered.values().map(|(n, _)| n - 1).sum();
    let uncertain_delivered = ledger
        .uncertain
        .iter()
        .filter(|id| delivered.contains_key(*id))
        .count();

    let jobs = journaled.jobs().await.unwrap();
    let dead: Vec<_> = jobs.iter().filter(|j| j.dead_at.is_some()).collect();
    assert_eq!(dead.len(), 1, "only the corrupt row is dead: {dead:#?}");
    for (phase, attempts) in &most_attempts {
        assert!(
            *attempts > MAX_ATTEMPTS,
            "the {phase} phase lasted only {attempts} rounds for any job"
        );
    }
    assert!(dead[0].last_error.as_deref().unwrap().contains("corrupt"));
    let stuck: HashSet<String> = jobs
        .iter()
        .filter(|j| j.dead_at.is_none())
        .flat_map(|j| j.records().unwrap())
        .map(|r| r.id.to_string())
        .collect();
    let missing_pending = ledger
        .to_missing_stream
        .iter()
        .filter(|id| stuck.contains(*id))
        .count();
    let config_errors = malformed_configuration_is_refused(&db.url());
    let ordered_committed = ledger
        .ordered
        .iter()
        .filter(|id| ledger.committed.contains_key(*id))
        .count();

    let report = format!(
        "reliability: {:.0} s of chaos, drained {:.1} s after, {} s in all; {} transactions; {} events committed, {} rolled back, {} uncertain (COMMIT interrupted; {} of them delivered); \
         {} bad inputs refused in flight + {} checked one by one + {} malformed settings refused; \
         {} records read back, {} distinct events delivered, {} duplicates; lost {}, rolled-back escaped {}, unknown {}, bytes mismatched {}; \
         {} events for a missing stream still pending (never dead), corrupt row dead, dead otherwise {}; \
         most failed rounds of a pending job (max attempts {}): {:?}; \
         ordered: {} events committed on {} keys ({} records read back, hot keys' last sequences {:?}), out of order {}, gaps {}, a sequence on two events {}; faults: {:?}",
        seconds as f64,
        drained_in.as_secs_f64(),
        started.elapsed().as_secs(),
        ledger.transactions,
        ledger.committed.len(),
        ledger.rolled_back.len(),
        ledger.uncertain.len(),
        uncertain_delivered,
        ledger.bad_inputs_refused,
        bad_inputs_checked,
        config_errors,
        records,
        delivered.len(),
        duplicates,
        lost.len(),
        escaped.len(),
        unknown.len(),
        mismatched,
        missing_pending,
        dead.len() - 1,
        MAX_ATTEMPTS,
        most_attempts,
        ordered_committed,
        ordered.keys,
        ordered.records,
        ordered.hot,
        ordered.out_of_order.len(),
        ordered.gaps.len(),
        ordered.reused.len(),
        faults
    );
    println!("{report}");
    let _ = std::fs::write(
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reliability-report.txt"),
        &report,
    );
    assert!(
        lost.is_empty(),
        "{} committed events lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        escaped.is_empty(),
        "rolled-back events delivered: {escaped:?}"
    );
    assert!(
        unknown.is_empty(),
        "events delivered that nobody committed: {unknown:?}"
    );
    assert_eq!(mismatched, 0, "delivered bytes differ from stored bytes");
    assert!(
        ordered.out_of_order.is_empty(),
        "first appearances out of order: {:?}",
        &ordered.out_of_order[..ordered.out_of_order.len().min(10)]
    );
    assert!(
        ordered.gaps.is_empty(),
        "sequence gaps: {:?}",
        &ordered.gaps[..ordered.gaps.len().min(10)]
    );
    assert!(
        ordered.reused.is_empty(),
        "a sequence on two events: {:?}",
        &ordered.reused[..ordered.reused.len().min(10)]
    );
    assert!(
        ordered_committed > 100 && ordered.keys > 100,
        "too few ordered events ({ordered_committed}) or keys ({}) to mean anything",
        ordered.keys
    );
    assert_eq!(
        missing_pending,
        ledger.to_missing_stream.len(),
        "events for a missing stream are kept, never dropped"
    );
    assert!(
        ledger.committed.len() > 100,
        "the suite journaled too little to mean anything"
    );
    drop(ledger);
    let _ = std::fs::remove_dir_all(&data_dir);
}
