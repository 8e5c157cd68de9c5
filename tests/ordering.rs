//! Ordered delivery per (stream, partition key), issue 14: a gap-free sequence taken in the
//! writer's transaction, in commit order, in each event's envelope.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::kinesis::{Emulator, FaultProxy, Kind, kinesis_config};
use common::{AppSql, TestDb, test_config, wait_until};
use journaled::kinesis::KinesisSink;
use journaled::{Backend, Error, JournalError, Journaled, Worker, WorkerConfig, journal};
use serde::Serialize;
use serde_json::Value;

/// Ordered by type: every event of a key gets the key's next sequence.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct Ordered {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// Not ordered by type (ordered only on a stream configured so).
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Plain {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// An ordered event whose size the test chooses.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct OrderedBlob {
    #[journaled(partition_key)]
    account: String,
    blob: String,
}

/// A hand-written ordered event.
#[derive(Serialize)]
struct HandWritten {
    n: i64,
}

impl journaled::Event for HandWritten {
    const EVENT_TYPE: &'static str = "free_event";
    const ORDERED: bool = true;

    fn partition_key(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some("hand".into())
    }
}

/// An ordered event on one key with a priority of its own (so one job each).
#[derive(Serialize)]
struct Prioritized {
    n: i64,
}

impl journaled::Event for Prioritized {
    const EVENT_TYPE: &'static str = "free_event";
    const ORDERED: bool = true;

    fn partition_key(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some("prioritized".into())
    }

    fn priority(&self) -> Option<i32> {
        Some(self.n as i32)
    }
}

/// An ordered event whose schema forbids properties it does not list (`sequence` too).
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "strict_ordered_event", ordered)]
struct StrictOrdered {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// An ordered event may not carry its own `sequence`.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct ClaimsSequence {
    #[journaled(partition_key)]
    account: String,
    sequence: i64,
}

/// Ordered, but keyed by its own id (no partition key): nothing to order it with.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct Unkeyed {
    n: i64,
}

/// (key, sequence in the envelope, sequence in the stored record, data) of every stored event,
/// in job and record order.
async fn sequences<DB: Backend>(
    journaled: &Journaled<DB>,
) -> Vec<(String, Option<i64>, Option<i64>, String)> {
    let mut out = Vec::new();
    for job in journaled.jobs().await.unwrap() {
        for record in job.records().unwrap() {
            let text = String::from_utf8(record.data().to_vec()).unwrap();
            let value: Value = serde_json::from_str(&text).unwrap();
            out.push((
                record.partition_key.clone(),
                value["sequence"].as_i64(),
                record.sequence,
                text,
            ));
        }
    }
    out
}

/// Concurrent writers of two keys (each transaction journals b, a, a, a), some rolled back, and
/// one event journaled outside a transaction: per key the sequences are 1..=n with no gap and
/// no repeat; within a transaction they follow `journal!` order; the sequence sits in the
/// envelope right after `created_at`, and in the stored record.
async fn sequences_are_gap_free_and_follow_journal_order<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let journaled = journaled.clone();
        writers.push(tokio::spawn(async move {
            for t in 0..10 {
                let mut tx = journaled.begin().await.unwrap();
                journal!(
                    tx,
                    Ordered {
                        account: "b".into(),
                        n: w * 100 + t
                    }
                )
                .unwrap();
                for _ in 0..3 {
                    journal!(
                        tx,
                        Ordered {
                            account: "a".into(),
                            n: w * 100 + t
                        }
                    )
                    .unwrap();
                }
                if t % 5 == 4 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    journal!(
        journaled,
        Ordered {
            account: "b".into(),
            n: -1
        }
    )
    .await
    .unwrap();

    let stored = sequences(&journaled).await;
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, in_envelope, in_record, text) in &stored {
        assert_eq!(in_envelope, in_record, "{text}");
        let seq = in_envelope.unwrap_or_else(|| panic!("no sequence: {text}"));
        per_key.entry(key.clone()).or_default().push(seq);
        let created = text.find("\"created_at\"").unwrap();
        let sequence = text.find("\"sequence\"").unwrap();
        let account = text.find("\"account\"").unwrap();
        assert!(created < sequence && sequence < account, "{text}");
    }
    // 4 writers × 8 committed transactions.
    let a = per_key.remove("a").unwrap();
    let b = per_key.remove("b").unwrap();
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=96).collect::<Vec<_>>());
    let mut sorted = b.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=33).collect::<Vec<_>>());
    // One transaction is one job: its three `a` events are consecutive, in journal order.
    for chunk in a.chunks(3) {
        assert_eq!(chunk, [chunk[0], chunk[0] + 1, chunk[0] + 2], "{a:?}");
    }
}

/// `Config::with_ordered_stream` orders every event of that stream; other events carry no
/// sequence and keep today's envelope; an ordered event may not name an attribute `sequence`.
async fn an_ordered_stream_orders_every_event_type<DB: Backend + AppSql>(db: &TestDb<DB>) {
    db.migrated().await;
    let plain = db.journaled(test_config());
    journal!(
        plain,
        Plain {
            account: "k".into(),
            n: 1
        }
    )
    .await
    .unwrap();
    let ordered = db.journaled(test_config().with_ordered_stream("test_stream"));
    let mut tx = ordered.begin().await.unwrap();
    journal!(
        tx,
        Plain {
            account: "k".into(),
            n: 2
        }
    )
    .unwrap();
    journal!(
        tx,
        Plain {
            account: "k".into(),
            n: 3
        }
    )
    .unwrap();
    tx.commit().await.unwrap();
    let seqs: Vec<Option<i64>> = sequences(&plain).await.into_iter().map(|s| s.1).collect();
    assert_eq!(seqs, [None, Some(1), Some(2)]);

    // Keyed by its own id, an event takes no sequence (and no row per event).
    journal!(ordered, Unkeyed { n: 1 }).await.unwrap();
    let last = sequences(&plain).await.pop().unwrap();
    assert_eq!((last.1, last.2), (None, None), "{}", last.3);

    // A hand-written `Event` opts in with `const ORDERED`.
    journal!(plain, HandWritten { n: 1 }).await.unwrap();
    journal!(plain, HandWritten { n: 2 }).await.unwrap();
    let hand: Vec<Option<i64>> = sequences(&plain)
        .await
        .into_iter()
        .filter(|s| s.0 == "hand")
        .map(|s| s.1)
        .collect();
    assert_eq!(hand, [Some(1), Some(2)]);

    // The schemas see the sequence at `journal!`: one that forbids it fails there, not later.
    let strict = |account: &str| StrictOrdered {
        account: account.into(),
        n: 1,
    };
    let err = plain.validate(&strict("k")).unwrap_err();
    assert!(
        matches!(err, JournalError::SchemaViolation { .. })
            && err.to_string().contains("'sequence' was unexpected"),
        "{err}"
    );

    let err = plain
        .validate(&ClaimsSequence {
            account: "k".into(),
            sequence: 7,
        })
        .unwrap_err();
    assert!(
        matches!(&err, JournalError::ReservedAttribute { name, .. } if name == "sequence"),
        "{err}"
    );
}

fn worker_config() -> WorkerConfig {
    WorkerConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_lease(Duration::from_secs(10))
        .with_backoff_base(Duration::from_millis(20))
        .with_backoff_max(Duration::from_millis(300))
        .with_configuration_backoff(Duration::from_millis(200))
        .with_shutdown_timeout(Duration::from_secs(5))
}

/// A worker running until the returned sender is dropped or fires.
async fn spawn_worker<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    endpoint: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    spawn_worker_with(pool, endpoint, worker_config()).await
}

/// [`spawn_worker`] with these settings.
async fn spawn_worker_with<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    endpoint: &str,
    config: WorkerConfig,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let sink = KinesisSink::new(kinesis_config(endpoint).client().await);
    let worker = Worker::new(pool.clone(), sink, config).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    (tx, handle)
}

/// The parked keys; none when the (shared, busy) server fails a poll: it polls again.
async fn parked_or_none<DB: Backend>(pool: &sqlx::Pool<DB>) -> Vec<journaled::store::ParkedKey> {
    journaled::store::ordering::parked_keys(pool)
        .await
        .unwrap_or_else(|e| {
            eprintln!("listing parked keys failed, polling again: {e}");
            Vec::new()
        })
}

/// Whether the backend is PostgreSQL, where the worker numbers ordered events.
fn postgres<DB: Backend>() -> bool {
    std::any::type_name::<DB>().contains("Postgres")
}

/// Per partition key, the sequences in the order they first appear in the stream (unordered
/// records, without one, left out).
async fn first_appearances(emulator: &Emulator, stream: &str) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for record in emulator.read(stream).await {
        let value: Value = serde_json::from_slice(&record.data).unwrap();
        let Some(seq) = value["sequence"].as_i64() else {
            continue;
        };
        let seen = out.entry(record.partition_key).or_default();
        if !seen.contains(&seq) {
            seen.push(seq);
        }
    }
    out
}

/// Key `a`'s second record is refused for good (over the emulator's 1 MiB): `a` parks with the
/// reason, its later records wait, key `b` flows in order. `skip --key` dead-letters the
/// refused record and `a`'s later records follow, in order. Unknown keys and bad key syntax
/// are errors.
async fn a_refused_record_parks_only_its_key<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    db.migrated().await;
    let journaled = db.journaled(test_config().with_max_record_size(2 * 1024 * 1024));
    let small = |account: &str| OrderedBlob {
        account: account.into(),
        blob: "x".into(),
    };
    for t in 0..4 {
        let mut tx = journaled.begin().await.unwrap();
        if t == 1 {
            journal!(
                tx,
                OrderedBlob {
                    account: "a".into(),
                    blob: "x".repeat(1024 * 1024 + 10)
                }
            )
            .unwrap();
        } else {
            journal!(tx, small("a")).unwrap();
        }
        journal!(tx, small("b")).unwrap();
        journal!(tx, small("b")).unwrap();
        tx.commit().await.unwrap();
    }
    let (stop, handle) = spawn_worker(&db.pool, &emulator.endpoint()).await;
    wait_until(60, "a is parked and b is delivered", || async {
        let parked = parked_or_none(&db.pool).await;
        let seen = first_appearances(&emulator, "test_stream").await;
        parked.len() == 1 && seen.get("b").map_or(0, Vec::len) == 8
    })
    .await;
    let parked = journaled::store::ordering::parked_keys(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (
            parked[0].stream.as_str(),
            parked[0].partition_key.as_str(),
            parked[0].sequence
        ),
        ("test_stream", "a", 2)
    );
    assert!(
        parked[0].reason.contains("ValidationException"),
        "{}",
        parked[0].reason
    );
    let status = journaled::store::status(&db.pool).await.unwrap();
    assert_eq!(status.parked_keys, 1);
    let seen = first_appearances(&emulator, "test_stream").await;
    assert_eq!(seen["a"], [1], "a's later records wait");
    assert_eq!(seen["b"], (1..=8).collect::<Vec<_>>());

    // Error paths: a key that is not parked, a key without a stream.
    let err = journaled::store::ordering::skip_key(&db.pool, "test_stream", "b")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotParked { .. }), "{err}");
    assert!(
        err.to_string().contains("test_stream/b is not parked"),
        "{err}"
    );
    for bad in ["no-slash", "/key", "stream/"] {
        let err = journaled::store::ordering::parse_key(bad).unwrap_err();
        assert!(err.to_string().contains("STREAM/KEY"), "{err}");
    }
    assert_eq!(
        journaled::store::ordering::parse_key("s/a/b").unwrap(),
        ("s".to_owned(), "a/b".to_owned())
    );

    // Parked before its job is settled: wait until the refused record is in a dead job.
    wait_until(60, "the refused record's job is dead", || async {
        let jobs = journaled.jobs().await.unwrap_or_default();
        jobs.iter().any(|j| j.dead_at.is_some())
    })
    .await;
    // `retry --key`: the refused record is sent again (and refused again: the key parks again
    // at the same record, with nothing of `a` delivered meanwhile).
    let retried = journaled::store::ordering::retry_key(&db.pool, "test_stream", "a")
        .await
        .unwrap();
    assert_eq!(retried.sequence, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = journaled.jobs().await.unwrap_or_default();
        let parked = parked_or_none(&db.pool).await;
        if parked.len() == 1 && jobs.iter().any(|j| j.dead_at.is_some() && j.attempts == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a is not parked again: {parked:?}\n{:#?}",
            jobs.iter()
                .map(|j| (
                    j.id,
                    j.attempts,
                    j.dead_at.is_some(),
                    j.last_error.clone(),
                    j.event_count
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first_appearances(&emulator, "test_stream").await["a"], [1]);

    let skipped = journaled::store::ordering::skip_key(&db.pool, "test_stream", "a")
        .await
        .unwrap();
    assert_eq!(skipped.sequence, 2);
    wait_until(60, "a's later records are delivered", || async {
        let seen = first_appearances(&emulator, "test_stream").await;
        seen["a"].len() == 3
    })
    .await;
    assert_eq!(
        first_appearances(&emulator, "test_stream").await["a"],
        [1, 3, 4]
    );
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    // The refused record stays dead-lettered with its reason; nothing else is left.
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].dead_at.is_some());
    assert!(
        journaled::store::ordering::parked_keys(&db.pool)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Concurrent writers of one hot key (and a key each), two workers delivering while they
/// write, through a proxy that fails requests: per key, the sequences first appear in the
/// stream in increasing order with no gap, through throttled records, server errors, resets and
/// timeouts.
async fn commit_order_per_key_survives_concurrency_and_throttling<DB: Backend + AppSql>(
    db: &TestDb<DB>,
) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 2).await;
    let proxy = FaultProxy::start(emulator.port).await;
    proxy.faults.throttle_every.store(2, Ordering::SeqCst);
    proxy.faults.throttle_requests.store(30, Ordering::SeqCst);
    // Unknown outcomes too: server errors, resets, and responses slower than the read timeout.
    proxy.faults.fail_500.store(2, Ordering::SeqCst);
    proxy.faults.reset.store(2, Ordering::SeqCst);
    *proxy.faults.slow_for.lock().unwrap() = Duration::from_secs(4); // read timeout: 2 s
    proxy.faults.slow.store(2, Ordering::SeqCst);
    let journaled = db.migrated().await;
    let one = spawn_worker(&db.pool, &proxy.endpoint()).await;
    let two = spawn_worker(&db.pool, &proxy.endpoint()).await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let journaled = journaled.clone();
        writers.push(tokio::spawn(async move {
            for t in 0..15 {
                let mut tx = journaled.begin().await.unwrap();
                for _ in 0..2 {
                    journal!(
                        tx,
                        Ordered {
                            account: "hot".into(),
                            n: w * 100 + t
                        }
                    )
                    .unwrap();
                }
                journal!(
                    tx,
                    Ordered {
                        account: format!("w{w}"),
                        n: t
                    }
                )
                .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    wait_until(90, "every job is delivered", || async {
        // A poll may meet a busy shared server; it polls again (the deadline still holds).
        match journaled.jobs().await {
            Ok(jobs) => jobs.is_empty(),
            Err(e) => {
                eprintln!("listing jobs failed, polling again: {e}");
                false
            }
        }
    })
    .await;
    for (stop, handle) in [one, two] {
        let _ = stop.send(());
        handle.await.unwrap().unwrap();
    }
    let f = &proxy.faults;
    assert!(f.throttled_records.load(Ordering::SeqCst) > 0);
    assert_eq!(
        (
            f.injected_500.load(Ordering::SeqCst),
            f.injected_resets.load(Ordering::SeqCst),
            f.injected_slow.load(Ordering::SeqCst)
        ),
        (2, 2, 2)
    );
    let seen = first_appearances(&emulator, "test_stream").await;
    assert_eq!(seen["hot"], (1..=120).collect::<Vec<_>>());
    for w in 0..4 {
        assert_eq!(seen[&format!("w{w}")], (1..=15).collect::<Vec<_>>());
    }
}

/// Ordered too, but urgent: a job of its own (another priority).
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered, priority = 5)]
struct UrgentOrdered {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// Not ordered, urgent: a job of its own among ordered ones.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", priority = 1)]
struct UrgentPlain {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// One transaction of 1,300 ordered events on three keys, in two priorities (so several job
/// rows, cut at 500 records), with unordered events between them, after a transaction that took
/// some sequences already: the sequences continue per key in journal! order across every row,
/// each stored record's envelope and record agree, and the bytes stored are the bytes
/// `on_enqueue` reported.
async fn a_large_ordered_transaction_spans_jobs_in_order<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let reported = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let sink = reported.clone();
    journaled.on_enqueue(move |e| {
        sink.lock()
            .unwrap()
            .insert(e.event_id.to_string(), e.data.to_owned());
    });
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        Ordered {
            account: "k0".into(),
            n: -1
        }
    )
    .unwrap();
    tx.commit().await.unwrap();

    let mut tx = journaled.begin().await.unwrap();
    let mut expected: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for n in 0..1_300 {
        let account = format!("k{}", n % 3);
        if n % 7 == 0 {
            journal!(
                tx,
                UrgentOrdered {
                    account: account.clone(),
                    n
                }
            )
            .unwrap();
        } else {
            journal!(
                tx,
                Ordered {
                    account: account.clone(),
                    n
                }
            )
            .unwrap();
        }
        if n % 10 == 0 {
            journal!(
                tx,
                Plain {
                    account: "unordered".into(),
                    n
                }
            )
            .unwrap();
        }
        if n % 100 == 0 {
            // A job of unordered events only, written by the same statement: due at once.
            journal!(
                tx,
                UrgentPlain {
                    account: "unordered".into(),
                    n
                }
            )
            .unwrap();
        }
        expected.entry(account).or_default().push(n);
    }
    tx.commit().await.unwrap();
    if postgres::<DB>() {
        let due = "SELECT count(*) FROM journaled.jobs \
                   WHERE priority = 1 AND ready AND sequence_group IS NULL";
        assert_eq!(
            DB::count(&db.pool, due).await,
            1,
            "no ordered event: due at its commit"
        );
    }
    let jobs = journaled.jobs().await.unwrap();
    assert!(jobs.len() >= 5, "{} job rows", jobs.len());

    let reported = reported.lock().unwrap().clone();
    let mut by_key: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for job in &jobs {
        for record in job.records().unwrap() {
            let text = String::from_utf8(record.data().to_vec()).unwrap();
            // On PostgreSQL the worker numbers ordered events after the commit: what
            // `on_enqueue` heard has no sequence yet, and is otherwise the same bytes.
            let mut heard = text.clone();
            if let (Some(seq), true) = (record.sequence, postgres::<DB>()) {
                heard = heard.replacen(&format!(",\"sequence\":{seq}"), "", 1);
            }
            assert_eq!(
                reported.get(&record.id.to_string()),
                Some(&heard),
                "stored bytes differ from those reported"
            );
            assert!(!text.contains('\u{1}'), "a placeholder left: {text}");
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["sequence"].as_i64(), record.sequence, "{text}");
            if record.partition_key == "unordered" {
                assert_eq!(record.sequence, None);
                continue;
            }
            if value["n"] == -1 {
                assert_eq!(record.sequence, Some(1));
                continue;
            }
            by_key
                .entry(record.partition_key.clone())
                .or_default()
                .push((record.sequence.unwrap(), value["n"].as_i64().unwrap()));
        }
    }
    for (key, mut got) in by_key {
        got.sort_unstable();
        let first = if key == "k0" { 2 } else { 1 };
        let sequences: Vec<i64> = got.iter().map(|g| g.0).collect();
        let ns: Vec<i64> = got.iter().map(|g| g.1).collect();
        assert_eq!(
            sequences,
            (first..first + ns.len() as i64).collect::<Vec<_>>(),
            "{key}: gap-free, continuing"
        );
        assert_eq!(ns, expected[&key], "{key}: in journal! order");
    }
}

/// A key whose next sequence is lost with its job (deleted by hand, or dead) waits without
/// being parked; `skip --key` moves it past each missing sequence, refuses while a live job
/// holds the next one, and the key's later records then flow in order.
async fn a_missing_sequence_can_be_skipped<DB: Backend + AppSql>(db: &TestDb<DB>) {
    use journaled::store::ordering::skip_key;
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    db.migrated().await;
    let journaled = db.journaled(test_config());
    for blob in ["one", "two", "three", "four"] {
        let mut tx = journaled.begin().await.unwrap();
        journal!(
            tx,
            OrderedBlob {
                account: "a".into(),
                blob: blob.into()
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    // Sequence 1 is in a live job: it will be delivered, there is nothing to skip.
    let err = skip_key(&db.pool, "test_stream", "a").await.unwrap_err();
    assert!(
        matches!(err, Error::SequenceLive { sequence: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("is in live job"), "{err}");

    // Sequence 1's job is deleted, sequence 2's is dead.
    let mut conn = db.pool.acquire().await.unwrap();
    DB::exec(&mut conn, DB::DELETE_OLDEST_JOB).await;
    DB::exec(&mut conn, DB::KILL_OLDEST_JOB).await;
    // A live job that mentions the key but cannot be read might hold it: not yet.
    DB::exec(&mut conn, DB::UNREADABLE_JOB_OF_A).await;
    let err = skip_key(&db.pool, "test_stream", "a").await.unwrap_err();
    assert!(matches!(err, Error::UnsettledJob { .. }), "{err}");
    assert!(err.to_string().contains("cannot be read"), "{err}");
    DB::exec(&mut conn, DB::KILL_NEWEST_JOB).await;
    drop(conn);
    let skipped = skip_key(&db.pool, "test_stream", "a").await.unwrap();
    assert_eq!(skipped.sequence, 1);
    assert!(
        skipped
            .reason
            .contains("no readable job: in dead unreadable job(s)"),
        "{}",
        skipped.reason
    );
    let skipped = skip_key(&db.pool, "test_stream", "a").await.unwrap();
    assert_eq!(skipped.sequence, 2);
    assert!(skipped.reason.contains("dead job"), "{}", skipped.reason);
    assert!(!skipped.event_id.is_empty());
    let err = skip_key(&db.pool, "test_stream", "a").await.unwrap_err();
    assert!(
        matches!(err, Error::SequenceLive { sequence: 3, .. }),
        "{err}"
    );
    // A parked key's position moves only by unparking it: a skip racing with parking changes
    // nothing (the worker's progress writes obey the same rule).
    let parked = journaled::store::ParkedKey {
        stream: "test_stream".into(),
        partition_key: "z".into(),
        sequence: 1,
        event_id: "e".into(),
        reason: "refused".into(),
        parked_at: None,
    };
    assert!(DB::park_key(&db.pool, &parked).await.unwrap());
    assert!(
        !DB::park_key(&db.pool, &parked).await.unwrap(),
        "a parked key keeps its first parking"
    );
    let z = [("test_stream".to_owned(), "z".to_owned(), 1)];
    assert_eq!(DB::advance_keys(&db.pool, &z).await.unwrap(), 0);
    let skipped = skip_key(&db.pool, "test_stream", "z").await.unwrap();
    assert_eq!(skipped.sequence, 1, "skipping a parked key unparks it");
    assert!(
        !DB::park_key(&db.pool, &parked).await.unwrap(),
        "a key past the record is not parked on it"
    );

    let (stop, handle) = spawn_worker(&db.pool, &emulator.endpoint()).await;
    wait_until(60, "a's records behind the gap are delivered", || async {
        let seen = first_appearances(&emulator, "test_stream").await;
        seen.get("a").map_or(0, Vec::len) == 2
    })
    .await;
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    assert_eq!(
        first_appearances(&emulator, "test_stream").await["a"],
        [3, 4]
    );
    // Nothing waits any more: skipping now would drop a sequence not yet committed.
    let err = skip_key(&db.pool, "test_stream", "a").await.unwrap_err();
    assert!(matches!(err, Error::NotParked { .. }), "{err}");
    let err = skip_key(&db.pool, "test_stream", "never-used")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotParked { .. }), "{err}");
    // The dead jobs stay dead-lettered.
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(jobs.iter().all(|j| j.dead_at.is_some()));
}

/// A key whose next sequence is lost — its job deleted (`c`) or dead (`a`) — is found by the
/// worker once its later records have waited `gap_check_after` on it, and parked with the
/// reason, so `status` shows it; `retry --key` sends a dead record again (and refuses, naming
/// `skip --key`, when no job holds it), `skip --key` moves past a deleted one and refuses to
/// skip a record made live again. Key `b` flows
/// throughout, and every key's records then arrive in order.
async fn a_lost_sequence_parks_its_key<DB: Backend + AppSql>(db: &TestDb<DB>) {
    use journaled::store::ordering::{retry_key, skip_key};
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let journaled = db.migrated().await;
    for (key, n) in [("c", 1), ("a", 1), ("a", 2), ("a", 3), ("c", 2), ("b", 1)] {
        let mut tx = journaled.begin().await.unwrap();
        journal!(
            tx,
            Ordered {
                account: key.into(),
                n
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    // Numbered (on PostgreSQL the worker numbers them; listing them does too), then lost.
    assert_eq!(journaled.jobs().await.unwrap().len(), 6);
    let mut conn = db.pool.acquire().await.unwrap();
    DB::exec(&mut conn, DB::DELETE_OLDEST_JOB).await; // c's 1
    DB::exec(&mut conn, DB::KILL_OLDEST_JOB).await; // a's 1
    drop(conn);

    let (stop, handle) = spawn_worker_with(
        &db.pool,
        &emulator.endpoint(),
        worker_config().with_gap_check_after(Duration::from_millis(300)),
    )
    .await;
    let pool = db.pool.clone();
    wait_until(60, "a and c are parked on their lost sequences", || {
        let pool = pool.clone();
        async move { parked_or_none(&pool).await.len() == 2 }
    })
    .await;
    let parked = parked_or_none(&db.pool).await;
    let of = |key: &str| parked.iter().find(|p| p.partition_key == key).unwrap();
    assert_eq!(of("a").sequence, 1);
    assert!(of("a").reason.contains("is in dead job"), "{:?}", of("a"));
    assert!(of("a").reason.contains("retry --key"), "{:?}", of("a"));
    assert!(!of("a").event_id.is_empty());
    assert_eq!(of("c").sequence, 1);
    assert!(
        of("c")
            .reason
            .contains("is in no job (its job was deleted)"),
        "{:?}",
        of("c")
    );
    assert!(of("c").event_id.is_empty());
    wait_until(60, "b is delivered meanwhile", || async {
        first_appearances(&emulator, "test_stream")
            .await
            .contains_key("b")
    })
    .await;

    let err = retry_key(&db.pool, "test_stream", "c").await.unwrap_err();
    assert!(
        matches!(err, Error::RecordGone { sequence: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("skip --key"), "{err}");
    // `a`'s dead job revived the usual way (`journaled retry --all-dead`) while its key is
    // parked: skipping it now would count a live record as delivered, so `skip --key` refuses
    // and `retry --key` only unparks the key.
    assert_eq!(DB::retry(&db.pool, None).await.unwrap(), 1);
    let err = skip_key(&db.pool, "test_stream", "a").await.unwrap_err();
    assert!(
        matches!(err, Error::ParkedRecordLive { sequence: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("retry --key"), "{err}");
    retry_key(&db.pool, "test_stream", "a").await.unwrap();
    skip_key(&db.pool, "test_stream", "c").await.unwrap();
    wait_until(60, "every key's records are delivered", || async {
        let seen = first_appearances(&emulator, "test_stream").await;
        seen.get("a").map_or(0, Vec::len) == 3 && seen.get("c").map_or(0, Vec::len) == 1
    })
    .await;
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    let seen = first_appearances(&emulator, "test_stream").await;
    assert_eq!(seen["a"], [1, 2, 3]);
    assert_eq!(seen["b"], [1]);
    assert_eq!(seen["c"], [2]);
    assert!(parked_or_none(&db.pool).await.is_empty());
}

on_both_backends!(
    a_missing_sequence_can_be_skipped,
    a_lost_sequence_parks_its_key,
    a_large_ordered_transaction_spans_jobs_in_order,
    sequences_are_gap_free_and_follow_journal_order,
    an_ordered_stream_orders_every_event_type,
    a_refused_record_parks_only_its_key,
    commit_order_per_key_survives_concurrency_and_throttling,
);

/// A sink that acknowledges every record but refuses for good those whose data says "refuse".
struct RefusingSink;

impl journaled::delivery::Sink for RefusingSink {
    fn put_records<'a>(
        &'a self,
        _stream: &'a str,
        records: &'a [journaled::delivery::OutRecord<'a>],
    ) -> journaled::BoxFuture<
        'a,
        Result<Vec<Option<journaled::delivery::Failure>>, journaled::delivery::Failure>,
    > {
        let outcomes = records
            .iter()
            .map(|r| {
                String::from_utf8_lossy(r.data).contains("refuse").then(|| {
                    journaled::delivery::Failure {
                        class: journaled::delivery::ErrorClass::Permanent,
                        code: "Refused".into(),
                        message: "refused for good".into(),
                    }
                })
            })
            .collect();
        Box::pin(std::future::ready(Ok(outcomes)))
    }
}

/// When the worker cannot write a key's progress or park it (the database fails those writes),
/// nothing is lost: acknowledged records stay in their job and go again, and a refused record
/// stays pending (not dead, the key not silently stalled) until parking succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_parking_survive_database_errors() {
    let db = TestDb::<sqlx::Sqlite>::new().await;
    let journaled = db.migrated().await;
    sqlx::raw_sql(
        "CREATE TRIGGER fail_key_delivery BEFORE INSERT ON journaled_key_delivery \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        Ordered {
            account: "ok".into(),
            n: 1
        }
    )
    .unwrap();
    journal!(
        tx,
        Ordered {
            account: "ok".into(),
            n: 2
        }
    )
    .unwrap();
    tx.commit().await.unwrap();
    journal!(
        journaled,
        OrderedBlob {
            account: "bad".into(),
            blob: "refuse".into()
        }
    )
    .await
    .unwrap();

    let worker = Worker::new(db.pool.clone(), RefusingSink, worker_config()).unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    wait_until(30, "each failure is recorded on its job", || async {
        let jobs = journaled.jobs().await.unwrap_or_default();
        let error = |i: usize| jobs[i].last_error.clone().unwrap_or_default();
        jobs.len() == 2
            && jobs.iter().all(|j| j.dead_at.is_none())
            && (jobs[0].event_count, jobs[1].event_count) == (2, 1)
            && error(0).contains("progress was not recorded")
            && error(1).contains("parking its key failed")
    })
    .await;
    assert!(parked_or_none(&db.pool).await.is_empty());

    sqlx::raw_sql("DROP TRIGGER fail_key_delivery")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_until(30, "`ok` is delivered and `bad` is parked", || async {
        let jobs = journaled.jobs().await.unwrap_or_default();
        let parked = parked_or_none(&db.pool).await;
        parked.len() == 1
            && parked[0].partition_key == "bad"
            && jobs.len() == 1
            && jobs[0].dead_at.is_some()
            && jobs[0].event_count == 1
            && jobs[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("Refused"))
    })
    .await;
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    let delivered: i64 = sqlx::query_scalar(
        "SELECT delivered FROM journaled_key_delivery WHERE partition_key = 'ok'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(delivered, 2);
}

/// On PostgreSQL an ordered job is stored unnumbered: with described placeholders, its own
/// keys and the statement's count of each (the writer's statement takes advisory locks, no
/// sequence), not due and not retryable until the worker numbers it. Listing the jobs numbers
/// them as the worker would, and they are read back filled. A job whose bases were lost is dead
/// as corrupt, with the reason; the other keys flow in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_jobs_are_stored_unnumbered_and_filled_when_read() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    // One job of two keys (the general statement), then one of one key each (the short one).
    for accounts in [&["a", "a", "b"][..], &["a"], &["c"]] {
        let mut tx = journaled.begin().await.unwrap();
        for (n, account) in accounts.iter().enumerate() {
            journal!(
                tx,
                Ordered {
                    account: (*account).into(),
                    n: n as i64
                }
            )
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    type Stored = (
        i64,
        String,
        Option<Vec<i64>>,
        Option<i64>,
        Option<Vec<String>>,
        Option<Vec<i64>>,
        bool,
    );
    let stored = || async {
        let rows: Vec<Stored> = sqlx::query_as(
            "SELECT id, records, sequence_bases, sequence_group, sequence_keys, sequence_counts, ready \
             FROM journaled.jobs ORDER BY id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        rows
    };
    let before = stored().await;
    assert_eq!(before.len(), 3);
    let p = '\u{1}';
    assert!(before[0].1.contains(&format!("\"sequence\":{p}1.1{p}")));
    assert!(before.iter().all(|j| !j.1.contains("\"sequence\":1")));
    assert!(
        before
            .iter()
            .all(|j| j.2.is_none() && j.3.is_some() && !j.6)
    );
    let keys: Vec<_> = before.iter().map(|j| j.4.clone().unwrap()).collect();
    assert_eq!(keys, [vec!["a", "b"], vec!["a"], vec!["c"]]);
    let counts: Vec<_> = before.iter().map(|j| j.5.clone().unwrap()).collect();
    assert_eq!(counts, [vec![2, 1], vec![1], vec![1]]);
    // Not due until numbered: `retry JOB` does not make it so.
    let first = journaled::store::JobId(before[0].0);
    assert_eq!(
        journaled::store::retry(&db.pool, Some(first))
            .await
            .unwrap(),
        0
    );

    let read: Vec<_> = sequences(&journaled)
        .await
        .into_iter()
        .map(|(key, envelope, record, _)| {
            assert_eq!(envelope, record, "{key}");
            (key, envelope.unwrap())
        })
        .collect();
    let expected = [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("c", 1)];
    assert_eq!(
        read,
        expected.map(|(k, s)| (k.to_owned(), s)),
        "filled when read"
    );
    let after = stored().await;
    let bases: Vec<_> = after.iter().map(|j| j.2.clone()).collect();
    assert_eq!(bases, [Some(vec![0, 0]), Some(vec![2]), Some(vec![0])]);
    assert!(after.iter().all(|j| j.3.is_none() && j.4.is_none() && j.6));
    assert!(after[0].1.contains(&format!("\"sequence\":{p}1.1{p}")));

    sqlx::query("UPDATE journaled.jobs SET sequence_bases = '{}' WHERE id = $1")
        .bind(after[2].0)
        .execute(&db.pool)
        .await
        .unwrap();
    let err = journaled.jobs().await.unwrap()[2].records().unwrap_err();
    assert!(err.to_string().contains("sequence placeholder"), "{err}");
    let (stop, worker) = spawn_worker(&db.pool, &emulator.endpoint()).await;
    wait_until(60, "a and b delivered, c's job dead", || async {
        let jobs = journaled.jobs().await.unwrap_or_default();
        jobs.len() == 1
            && jobs[0].dead_at.is_some()
            && jobs[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("sequence placeholder"))
    })
    .await;

    // Committed while the worker runs: it numbers them itself, in order.
    for n in 0..3 {
        let mut tx = journaled.begin().await.unwrap();
        journal!(
            tx,
            Ordered {
                account: "a".into(),
                n
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    wait_until(60, "a's later records delivered", || async {
        first_appearances(&emulator, "test_stream")
            .await
            .get("a")
            .is_some_and(|a| a.len() == 6)
    })
    .await;
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    let order = first_appearances(&emulator, "test_stream").await;
    assert_eq!(order.get("a"), Some(&vec![1, 2, 3, 4, 5, 6]));
    assert_eq!(order.get("b"), Some(&vec![1]));
    assert_eq!(order.get("c"), None);
}

/// Transactions waiting on an advisory lock in this test's database (tests run side by side on
/// one server), seen from another session.
async fn lock_waiters(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Journals `n` ordered events on `key` and commits, in a task of its own.
fn commit_in_task(
    journaled: &Journaled<sqlx::Postgres>,
    keys: Vec<String>,
) -> tokio::task::JoinHandle<()> {
    let journaled = journaled.clone();
    tokio::spawn(async move {
        let mut tx = journaled.begin().await.unwrap();
        for (n, account) in keys.into_iter().enumerate() {
            journal!(
                tx,
                Ordered {
                    account,
                    n: n as i64
                }
            )
            .unwrap();
        }
        tx.commit().await.unwrap();
    })
}

/// On PostgreSQL a writer of an ordered key holds the key's lock from its job's INSERT to its
/// COMMIT: a second writer of the key waits for it (so the key's jobs get ids, and numbers, in
/// commit order), a writer of another key does not. A transaction of more keys than it locks
/// one by one takes the global key exclusively: it waits for the ordered writers in progress,
/// and those after it wait for it. Two journaled transactions inside one application
/// transaction (savepoints) are numbered in `journal!` order. A job deleted before it was
/// numbered leaves no gap; a dead one is numbered and stays dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_writers_commit_in_turn_and_are_numbered_in_commit_order() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let mut app_tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    for n in [1, 2] {
        let mut jtx = journaled.begin_on(&mut app_tx).await.unwrap();
        journal!(
            jtx,
            Ordered {
                account: "x".into(),
                n
            }
        )
        .unwrap();
        journal!(
            jtx,
            Ordered {
                account: "x".into(),
                n: n * 10
            }
        )
        .unwrap();
        jtx.commit().await.unwrap();
    }
    // x is locked until app_tx commits: another writer of x waits, one of y does not.
    let second = commit_in_task(&journaled, vec!["x".into()]);
    tokio::time::timeout(
        Duration::from_secs(60),
        commit_in_task(&journaled, vec!["y".into()]),
    )
    .await
    .expect("a writer of another key does not wait")
    .unwrap();
    wait_until(30, "the second writer of x waits", || async {
        lock_waiters(&db.pool).await == 1
    })
    .await;
    assert!(!second.is_finished());
    // Many keys: the global key exclusively, behind app_tx; a writer of z queues behind it.
    let many: Vec<String> = (0..40).map(|k| format!("m{k}")).collect();
    let big = commit_in_task(&journaled, many.clone());
    wait_until(30, "the transaction of many keys waits", || async {
        lock_waiters(&db.pool).await == 2
    })
    .await;
    let after_big = commit_in_task(&journaled, vec!["z".into()]);
    wait_until(30, "a writer of z waits behind it", || async {
        lock_waiters(&db.pool).await == 3
    })
    .await;
    app_tx.commit().await.unwrap();
    drop(conn);
    for task in [second, big, after_big] {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every writer commits")
            .unwrap();
    }

    // Lost before numbering: deleted (no gap), or dead (numbered, stays dead).
    for n in [100, 101] {
        let mut tx = journaled.begin().await.unwrap();
        journal!(
            tx,
            Ordered {
                account: "w".into(),
                n
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query(
        "DELETE FROM journaled.jobs WHERE id = (SELECT min(id) FROM journaled.jobs \
         WHERE sequence_keys = ARRAY['w'])",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE journaled.jobs SET dead_at = now() WHERE sequence_keys = ARRAY['w']")
        .execute(&db.pool)
        .await
        .unwrap();
    // Not revived while unnumbered, even with every dead job.
    assert_eq!(journaled::store::retry(&db.pool, None).await.unwrap(), 0);

    let mut per_key: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (key, envelope, _, text) in sequences(&journaled).await {
        let n = serde_json::from_str::<Value>(&text).unwrap()["n"]
            .as_i64()
            .unwrap();
        per_key.entry(key).or_default().push((envelope.unwrap(), n));
    }
    assert_eq!(per_key["x"], [(1, 1), (2, 10), (3, 2), (4, 20), (5, 0)]);
    assert_eq!(per_key["y"], [(1, 0)]);
    assert_eq!(per_key["z"], [(1, 0)]);
    assert_eq!(per_key["w"], [(1, 101)]);
    for (n, key) in many.iter().enumerate() {
        assert_eq!(per_key[key], [(1, n as i64)], "{key}");
    }
    let dead: Vec<(bool, bool)> = sqlx::query_as(
        "SELECT ready, dead_at IS NOT NULL FROM journaled.jobs WHERE sequence_bases = ARRAY[0::int8] \
         AND strpos(records, '\"account\":\"w\"') > 0",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead, [(false, true)]);
}

/// On PostgreSQL the worker numbers at most 1,000 jobs a round and never splits a statement's
/// jobs: one statement of 1,001 jobs is numbered whole, and a statement cut by a round's end
/// waits for the next round; the numbers follow `journal!` order across all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_takes_whole_statements_however_large() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    // 1,001 jobs in one statement: a priority per event.
    let mut tx = journaled.begin().await.unwrap();
    for n in 0..1_001 {
        journal!(tx, Prioritized { n }).unwrap();
    }
    tx.commit().await.unwrap();
    // 998 statements of one job, then one of three jobs across the next round's start.
    for n in 0..998 {
        journal!(journaled, Prioritized { n: 2_000 + n })
            .await
            .unwrap();
    }
    let mut tx = journaled.begin().await.unwrap();
    for n in 0..3 {
        journal!(tx, Prioritized { n: 3_000 + n }).unwrap();
    }
    tx.commit().await.unwrap();
    let mut got = Vec::new();
    for (_, envelope, _, text) in sequences(&journaled).await {
        let n = serde_json::from_str::<Value>(&text).unwrap()["n"]
            .as_i64()
            .unwrap();
        got.push((envelope.unwrap(), n));
    }
    got.sort_unstable();
    let ns: Vec<i64> = got.iter().map(|g| g.1).collect();
    let expected: Vec<i64> = (0..1_001).chain(2_000..2_998).chain(3_000..3_003).collect();
    assert_eq!(ns, expected);
    assert_eq!(got.last().unwrap().0, expected.len() as i64);
}

/// A PostgreSQL database whose `key_sequences` refuses every write (so numbering fails), and an
/// emulator with `test_stream`.
async fn numbering_refused() -> (TestDb<sqlx::Postgres>, Journaled<sqlx::Postgres>, Emulator) {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER refuse_key_sequences BEFORE INSERT OR UPDATE ON journaled.key_sequences \
             FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    (db, journaled, emulator)
}

/// When the worker cannot number ordered jobs (here a trigger makes the database refuse the
/// keys' rows), it says so and goes on delivering everything else; the ordered jobs wait,
/// unnumbered, and flow in order once numbering works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_events_flow_while_numbering_fails() {
    let (db, journaled, emulator) = numbering_refused().await;
    let mut tx = journaled.begin().await.unwrap();
    for n in 0..3 {
        journal!(
            tx,
            Ordered {
                account: "o".into(),
                n
            }
        )
        .unwrap();
    }
    tx.commit().await.unwrap();
    journal!(
        journaled,
        UrgentPlain {
            account: "p".into(),
            n: 0
        }
    )
    .await
    .unwrap();
    let (stop, worker) = spawn_worker(&db.pool, &emulator.endpoint()).await;
    wait_until(60, "the unordered event is delivered", || async {
        let seen = emulator.read("test_stream").await;
        seen.iter().any(|r| r.partition_key == "p")
    })
    .await;
    let unnumbered = "SELECT count(*) FROM journaled.jobs WHERE sequence_group IS NOT NULL";
    assert_eq!(sqlx::Postgres::count(&db.pool, unnumbered).await, 1);
    sqlx::raw_sql("DROP TRIGGER refuse_key_sequences ON journaled.key_sequences")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_until(
        60,
        "the ordered events are numbered and delivered",
        || async {
            first_appearances(&emulator, "test_stream")
                .await
                .get("o")
                .is_some_and(|o| o.len() == 3)
        },
    )
    .await;
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    assert_eq!(
        first_appearances(&emulator, "test_stream").await["o"],
        [1, 2, 3]
    );
}

/// On PostgreSQL a statement's jobs get their ids one by one, so other statements' jobs (of
/// other keys) can lie between them, and a numbering round's end can cut a statement that is
/// not the round's last: the round takes the rest of every statement it started, so the key's
/// numbers have no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_cut_by_a_rounds_end_is_numbered_whole() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    for n in 1..=3 {
        journal!(tx, Prioritized { n }).unwrap();
    }
    tx.commit().await.unwrap();
    for n in 0..998 {
        journal!(
            journaled,
            Ordered {
                account: format!("single-{n}"),
                n
            }
        )
        .await
        .unwrap();
    }
    // The statement's third job moves past the round's end: its first 1,000 unnumbered jobs
    // are the statement's first two and the 998 others, the last of them another statement.
    let moved: i64 = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM journaled.jobs WHERE priority = 3 RETURNING *) \
         INSERT INTO journaled.jobs OVERRIDING SYSTEM VALUE \
         SELECT (jsonb_populate_record(NULL::journaled.jobs, \
                 to_jsonb(gone) || jsonb_build_object('id', 5000))).* FROM gone \
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(moved, 5000);
    let mut got = Vec::new();
    for (key, envelope, _, text) in sequences(&journaled).await {
        if key == "prioritized" {
            let n = serde_json::from_str::<Value>(&text).unwrap()["n"]
                .as_i64()
                .unwrap();
            got.push((envelope.unwrap(), n));
        } else {
            assert_eq!(envelope, Some(1), "{key}");
        }
    }
    got.sort_unstable();
    assert_eq!(got, [(1, 1), (2, 2), (3, 3)]);
}

/// On PostgreSQL a transaction that journaled few ordered keys in one statement and then many in
/// another (two `begin_on` in one application transaction) keeps the global key shared and
/// locks the many key by key: asking for it exclusively while holding it shared would deadlock
/// with any writer waiting for one of its keys. Writers of its keys wait; others do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holding_the_global_key_shared_locks_more_keys_one_by_one() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let mut app_tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    for keys in [1, 40] {
        let mut jtx = journaled.begin_on(&mut app_tx).await.unwrap();
        for k in 0..keys {
            journal!(
                jtx,
                Ordered {
                    account: format!("k{k}"),
                    n: keys
                }
            )
            .unwrap();
        }
        jtx.commit().await.unwrap();
    }
    let modes: Vec<String> = sqlx::query_scalar(
        "SELECT mode FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(modes, ["ShareLock"], "the global key, still shared");
    tokio::time::timeout(
        Duration::from_secs(60),
        commit_in_task(&journaled, vec!["other".into()]),
    )
    .await
    .expect("a writer of another key does not wait")
    .unwrap();
    let waiting = commit_in_task(&journaled, vec!["k39".into()]);
    wait_until(30, "a writer of one of its keys waits", || async {
        lock_waiters(&db.pool).await == 1
    })
    .await;
    app_tx.commit().await.unwrap();
    drop(conn);
    tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("it commits")
        .unwrap();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, envelope, _, _) in sequences(&journaled).await {
        per_key.entry(key).or_default().push(envelope.unwrap());
    }
    assert_eq!(per_key["k0"], [1, 2]);
    assert_eq!(per_key["k39"], [1, 2]);
    assert_eq!(per_key["other"], [1]);
}

/// A draining worker whose numbering keeps failing gives up with the error instead of waiting
/// for ever for jobs that can never fall due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_gives_up_when_numbering_keeps_failing() {
    let (db, journaled, emulator) = numbering_refused().await;
    journal!(
        journaled,
        Ordered {
            account: "o".into(),
            n: 0
        }
    )
    .await
    .unwrap();
    let sink = KinesisSink::new(kinesis_config(&emulator.endpoint()).client().await);
    let worker = Worker::new(db.pool.clone(), sink, worker_config().with_drain(true)).unwrap();
    let outcome =
        tokio::time::timeout(Duration::from_secs(120), worker.run(std::future::pending()))
            .await
            .expect("the drain ends");
    let err = outcome.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
}
