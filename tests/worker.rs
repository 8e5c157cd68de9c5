//! The delivery worker against a real PostgreSQL (and SQLite) and a real Kinesis emulator,
//! reading every record back from the stream.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::kinesis::{Emulator, FaultProxy, Kind, kinesis_config};
use common::{AppSql, TestDb, wait_until};
use journaled::kinesis::KinesisSink;
use journaled::{Backend, Journaled, Worker, WorkerConfig, WorkerStats, journal};
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

#[derive(Serialize, journaled::Event)]
struct TestEvent {
    name: String,
    count: i64,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", stream = "other_stream")]
struct OtherStream {
    n: i64,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", priority_with = priority_of)]
struct Prioritized {
    priority: i32,
    seq: i64,
}

fn priority_of(event: &Prioritized) -> i32 {
    event.priority
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Blob {
    blob: String,
}

/// Every instance has the partition key `one-key`.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct OneKey {
    #[journaled(partition_key)]
    key: String,
    n: i64,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", priority = 1, delay_secs = 3600)]
struct Later {
    n: i64,
}

fn test_config() -> WorkerConfig {
    WorkerConfig::default()
        .with_poll_interval(Duration::from_millis(50))
        .with_lease(Duration::from_secs(10))
        .with_backoff_base(Duration::from_millis(20))
        .with_backoff_max(Duration::from_millis(300))
        .with_configuration_backoff(Duration::from_millis(200))
        .with_shutdown_timeout(Duration::from_secs(5))
}

/// A worker running in the background until stopped.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), journaled::Error>>,
    stats: Arc<WorkerStats>,
}

impl Running {
    async fn stop(mut self) -> Arc<WorkerStats> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.handle)
            .await
            .expect("the worker stops")
            .unwrap()
            .unwrap();
        self.stats.clone()
    }
}

async fn spawn_worker<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    endpoint: &str,
    config: WorkerConfig,
) -> Running {
    spawn_worker_with(pool, kinesis_config(endpoint), config).await
}

async fn spawn_worker_with<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    kinesis: journaled::kinesis::KinesisConfig,
    config: WorkerConfig,
) -> Running {
    let sink = KinesisSink::new(kinesis.client().await);
    let worker = Worker::new(pool.clone(), sink, config).unwrap();
    let stats = worker.stats();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    Running {
        stop: Some(tx),
        handle,
        stats,
    }
}

/// Runs a worker until no job is left (retries included), then stops it.
async fn deliver_all<DB: Backend>(
    journaled: &Journaled<DB>,
    endpoint: &str,
    config: WorkerConfig,
) -> Arc<WorkerStats> {
    let worker = spawn_worker(journaled.pool(), endpoint, config).await;
    wait_until(90, "every job is delivered", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    worker.stop().await
}

async fn drain<DB: Backend>(
    pool: &sqlx::Pool<DB>,
    endpoint: &str,
    config: WorkerConfig,
) -> Arc<WorkerStats> {
    let sink = KinesisSink::new(kinesis_config(endpoint).client().await);
    let worker = Worker::new(pool.clone(), sink, config.with_drain(true)).unwrap();
    let stats = worker.stats();
    tokio::time::timeout(Duration::from_secs(120), worker.run(std::future::pending()))
        .await
        .expect("the worker drains in time")
        .unwrap();
    stats
}

/// Every stored record's exact bytes, by event id.
async fn stored<DB: Backend>(journaled: &Journaled<DB>) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    for job in journaled.jobs().await.unwrap() {
        for record in job.records().unwrap() {
            out.insert(record.id.to_string(), record.data().to_vec());
        }
    }
    out
}

/// (event id, bytes) of every record in a stream, duplicates included.
async fn delivered(emulator: &Emulator, stream: &str) -> Vec<(String, Vec<u8>)> {
    emulator
        .read(stream)
        .await
        .into_iter()
        .map(|r| {
            let value: Value = serde_json::from_slice(&r.data).expect("records are JSON");
            (value["id"].as_str().unwrap().to_owned(), r.data)
        })
        .collect()
}

/// Journals `transactions` committed transactions of `per_tx` events each.
async fn commit_events<DB: Backend>(journaled: &Journaled<DB>, transactions: usize, per_tx: usize) {
    for t in 0..transactions {
        let mut tx = journaled.begin().await.unwrap();
        for e in 0..per_tx {
            journal!(
                tx,
                TestEvent {
                    name: format!("t{t}-e{e}"),
                    count: e as i64
                }
            )
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
}

fn assert_exactly_delivered(expected: &HashMap<String, Vec<u8>>, got: &[(String, Vec<u8>)]) {
    let ids: HashSet<&String> = got.iter().map(|(id, _)| id).collect();
    let missing: Vec<&String> = expected.keys().filter(|id| !ids.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} committed events never arrived: {missing:?}",
        missing.len()
    );
    for (id, bytes) in got {
        let want = expected
            .get(id)
            .unwrap_or_else(|| panic!("event {id} was never committed"));
        assert_eq!(
            bytes, want,
            "event {id} arrived with other bytes than stored"
        );
    }
}

/// Invariant 1 and 3: every committed event arrives with exactly its stored bytes; rolled-back
/// events never do; delivered jobs are deleted. kinesis-mock: the most faithful API.
async fn committed_events_arrive_with_their_stored_bytes<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::KinesisMock).await;
    emulator.create_stream("test_stream", 2).await;
    emulator.create_stream("other_stream", 1).await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 3, 4).await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, OtherStream { n: 1 }).unwrap();
    journal!(
        tx,
        TestEvent {
            name: "beside other".into(),
            count: 1
        }
    )
    .unwrap();
    tx.commit().await.unwrap();
    let mut tx = journaled.begin().await.unwrap();
    let rolled_back = journal!(
        tx,
        TestEvent {
            name: "rolled back".into(),
            count: 1
        }
    )
    .unwrap();
    tx.rollback().await.unwrap();
    let expected = stored(&journaled).await;
    assert_eq!(expected.len(), 14);

    let stats = drain(&db.pool, &emulator.endpoint(), test_config()).await;
    let mut got = delivered(&emulator, "test_stream").await;
    let other = delivered(&emulator, "other_stream").await;
    assert_eq!(other.len(), 1);
    got.extend(other);
    assert_exactly_delivered(&expected, &got);
    assert!(got.iter().all(|(id, _)| *id != rolled_back.to_string()));
    assert!(
        journaled.jobs().await.unwrap().is_empty(),
        "delivered jobs are deleted"
    );
    assert_eq!(stats.delivered_events.load(Ordering::Relaxed), 14);
    assert_eq!(stats.dead_jobs.load(Ordering::Relaxed), 0);
}

/// When the worker is behind, lower priority values go first.
async fn priority_order_is_respected_when_behind<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let journaled = db.migrated().await;
    for (seq, priority) in [30, 30, 20, 10, 30, 10, 20].into_iter().enumerate() {
        let mut tx = journaled.begin().await.unwrap();
        journal!(
            tx,
            Prioritized {
                priority,
                seq: seq as i64
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    let config = test_config().with_batch_size(1).with_concurrency(1);
    drain(&db.pool, &emulator.endpoint(), config).await;
    let order: Vec<(i64, i64)> = emulator
        .read("test_stream")
        .await
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.data).unwrap();
            (v["priority"].as_i64().unwrap(), v["seq"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        order,
        [
            (10, 3),
            (10, 5),
            (20, 2),
            (20, 6),
            (30, 0),
            (30, 1),
            (30, 4)
        ]
    );
}

/// Two workers on one table deliver everything, each job once.
async fn two_workers_share_one_table<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 2).await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 120, 3).await;
    let expected = stored(&journaled).await;
    let config = test_config().with_batch_size(5).with_concurrency(2);
    let endpoint = emulator.endpoint();
    let (a, b) = tokio::join!(
        drain(&db.pool, &endpoint, config.clone()),
        drain(&db.pool, &endpoint, config)
    );
    let got = delivered(&emulator, "test_stream").await;
    assert_exactly_delivered(&expected, &got);
    assert_eq!(got.len(), expected.len(), "no duplicates without faults");
    let jobs = a.completed_jobs.load(Ordering::Relaxed) + b.completed_jobs.load(Ordering::Relaxed);
    assert_eq!(jobs, 120);
    assert!(journaled.jobs().await.unwrap().is_empty());
}

/// Throttled records in partly failed responses are retried alone; nothing dies.
async fn throttled_records_are_retried<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let proxy = FaultProxy::start(emulator.port).await;
    proxy.faults.throttle_every.store(3, Ordering::SeqCst);
    proxy.faults.throttle_requests.store(4, Ordering::SeqCst);
    let journaled = db.migrated().await;
    commit_events(&journaled, 10, 5).await;
    let expected = stored(&journaled).await;
    let stats = deliver_all(&journaled, &proxy.endpoint(), test_config()).await;
    let got = delivered(&emulator, "test_stream").await;
    assert_exactly_delivered(&expected, &got);
    assert_eq!(
        got.len(),
        expected.len(),
        "only the throttled records were sent again"
    );
    assert!(proxy.faults.throttled_records.load(Ordering::SeqCst) > 0);
    assert!(stats.failed_records.load(Ordering::Relaxed) > 0);
    assert_eq!(stats.dead_jobs.load(Ordering::Relaxed), 0);
    assert!(journaled.jobs().await.unwrap().is_empty());
    // Each event has one receipt: the shard and sequence number of its acknowledged delivery,
    // retried ones included.
    for record in emulator.read("test_stream").await {
        let data: Value = serde_json::from_slice(&record.data).unwrap();
        let id = journaled::EventId(data["id"].as_str().unwrap().parse().unwrap());
        match journaled::store::trace(&db.pool, id).await.unwrap() {
            journaled::store::Trace::Delivered(receipt) => {
                assert_eq!(
                    receipt.sequence_number,
                    Some(record.sequence_number.clone())
                );
                assert_eq!(receipt.shard_id, Some(record.shard_id.clone()));
                assert_eq!(receipt.stream, "test_stream");
            }
            other => panic!("event {id}: {other:?}"),
        }
    }
}

/// Receipts older than the retention go; newer ones stay. Zero retention keeps none.
async fn receipts_are_pruned_by_age_only<DB: Backend + AppSql>(db: &TestDb<DB>) {
    use journaled::store::{Receipt, Trace};
    let journaled = db.migrated().await;
    let receipt = |n: u128| Receipt {
        event_id: journaled::EventId(uuid::Uuid::from_u128(n)),
        stream: "s".into(),
        partition_key: "k".into(),
        shard_id: Some("shardId-000000000000".into()),
        sequence_number: Some(format!("4959{n}")),
        job_created_at: time::OffsetDateTime::now_utc(),
        delivered_at: None,
        attempts: 0,
    };
    let all: Vec<Receipt> = (1..=10).map(receipt).collect();
    assert_eq!(DB::record_receipts(&db.pool, &all).await.unwrap(), 10);
    assert_eq!(
        DB::record_receipts(&db.pool, &all[..2]).await.unwrap(),
        0,
        "a receipted event keeps its first receipt"
    );
    // Age four of them by two days.
    DB::exec(&mut *db.pool.acquire().await.unwrap(), DB::AGE_RECEIPTS).await;
    let pruned = DB::prune_receipts(&db.pool, Duration::from_secs(86_400), 3)
        .await
        .unwrap();
    assert_eq!(pruned, 3, "a bounded batch");
    let pruned = DB::prune_receipts(&db.pool, Duration::from_secs(86_400), 3)
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    for n in 1..=10u128 {
        let trace = journaled::store::trace(&db.pool, all[n as usize - 1].event_id)
            .await
            .unwrap();
        if n <= 4 {
            assert_eq!(trace, Trace::Unknown, "receipt {n} was old");
        } else {
            assert!(
                matches!(trace, Trace::Delivered(_)),
                "receipt {n}: {trace:?}"
            );
        }
    }
    let stats = journaled::store::receipt_stats(&db.pool).await.unwrap();
    assert_eq!(stats.delivered_events, 6);
    assert!(stats.latency_p50_secs.is_some());
    drop(journaled);
}

/// 500s, responses slower than the read timeout, and connection resets: all retried.
async fn server_errors_slow_responses_and_resets_are_retried<DB: Backend + AppSql>(
    db: &TestDb<DB>,
) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let proxy = FaultProxy::start(emulator.port).await;
    proxy.faults.fail_500.store(2, Ordering::SeqCst);
    proxy.faults.reset.store(2, Ordering::SeqCst);
    *proxy.faults.slow_for.lock().unwrap() = Duration::from_secs(4); // read timeout: 2 s
    proxy.faults.slow.store(2, Ordering::SeqCst);
    let journaled = db.migrated().await;
    commit_events(&journaled, 6, 3).await;
    let expected = stored(&journaled).await;
    let stats = deliver_all(&journaled, &proxy.endpoint(), test_config()).await;
    let got = delivered(&emulator, "test_stream").await;
    assert_exactly_delivered(&expected, &got);
    let f = &proxy.faults;
    assert_eq!(
        (
            f.injected_500.load(Ordering::SeqCst),
            f.injected_resets.load(Ordering::SeqCst),
            f.injected_slow.load(Ordering::SeqCst)
        ),
        (2, 2, 2)
    );
    assert!(stats.failed_records.load(Ordering::Relaxed) > 0);
    assert_eq!(stats.dead_jobs.load(Ordering::Relaxed), 0);
    assert!(journaled.jobs().await.unwrap().is_empty());
}

/// Waits until every job failed at least `rounds` times, and checks that none is dead.
async fn wait_for_rounds<DB: Backend>(journaled: &Journaled<DB>, rounds: i32) {
    wait_until(60, &format!("every job failed {rounds} times"), || async {
        let jobs = journaled.jobs().await.unwrap();
        assert!(
            jobs.iter().all(|j| j.dead_at.is_none()),
            "a job is dead: {jobs:#?}"
        );
        jobs.iter().all(|j| j.attempts >= rounds)
    })
    .await;
}

/// The emulator refusing connections for longer than `max attempts` backoff rounds: no job is
/// dead, and everything is delivered once it is back. Not the job's fault, never counted.
async fn an_unreachable_kinesis_delays_but_loses_nothing<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let proxy = FaultProxy::start(emulator.port).await;
    proxy.faults.down.store(true, Ordering::SeqCst);
    let journaled = db.migrated().await;
    commit_events(&journaled, 5, 2).await;
    let expected = stored(&journaled).await;
    let worker = spawn_worker(
        &db.pool,
        &proxy.endpoint(),
        test_config().with_max_attempts(2),
    )
    .await;
    wait_for_rounds(&journaled, 6).await;
    assert!(proxy.faults.refused_while_down.load(Ordering::SeqCst) > 0);
    let error = journaled.jobs().await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(
        error.contains("dispatch") && error.contains("check the endpoint"),
        "{error}"
    );
    proxy.faults.down.store(false, Ordering::SeqCst);
    wait_until(60, "every job is delivered", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    let stats = worker.stop().await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
    assert_eq!(stats.dead_jobs.load(Ordering::Relaxed), 0);
}

/// A credentials provider that fails until it is told to work.
#[derive(Debug)]
struct FlakyCredentials {
    working: Arc<std::sync::atomic::AtomicBool>,
    asked: Arc<std::sync::atomic::AtomicUsize>,
}

impl aws_credential_types::provider::ProvideCredentials for FlakyCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        use aws_credential_types::provider::error::CredentialsError;
        self.asked.fetch_add(1, Ordering::SeqCst);
        aws_credential_types::provider::future::ProvideCredentials::ready(
            if self.working.load(Ordering::SeqCst) {
                Ok(aws_credential_types::Credentials::new(
                    "AKIDTEST", "secret", None, None, "flaky",
                ))
            } else {
                Err(CredentialsError::not_loaded(
                    "no credentials in the environment, no profile, no metadata endpoint",
                ))
            },
        )
    }
}

/// No credentials for longer than `max attempts` rounds (a broken IAM role, IMDS unreachable):
/// a configuration error, said at `error` level; no job is dead, and everything is delivered
/// once credentials work.
async fn a_failing_credentials_provider_kills_nothing<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 3, 2).await;
    let expected = stored(&journaled).await;
    let working = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let provider = aws_sdk_kinesis::config::SharedCredentialsProvider::new(FlakyCredentials {
        working: working.clone(),
        asked: asked.clone(),
    });
    let kinesis = kinesis_config(&emulator.endpoint()).with_credentials_provider(Some(provider));
    let worker = spawn_worker_with(&db.pool, kinesis, test_config().with_max_attempts(2)).await;
    wait_for_rounds(&journaled, 5).await;
    assert!(
        asked.load(Ordering::SeqCst) >= 5,
        "the provider is asked again each round"
    );
    for job in journaled.jobs().await.unwrap() {
        let error = job.last_error.unwrap();
        assert!(
            error.contains("credentials") && error.contains("AWS_ACCESS_KEY_ID"),
            "the error says what is wrong and how to fix it: {error}"
        );
    }
    working.store(true, Ordering::SeqCst);
    wait_until(60, "every job is delivered", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    let stats = worker.stop().await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
    assert_eq!(stats.dead_jobs.load(Ordering::Relaxed), 0);
}

/// A record Kinesis refuses makes its job dead with the reason; the rest keep flowing; retry
/// revives it. (The journaled side allows 2 MiB records, as if the stream's limit were raised,
/// but the emulator keeps 1 MiB.)
async fn a_rejected_record_kills_only_its_job<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    db.migrated().await;
    let journaled = db.journaled(common::test_config().with_max_record_size(2 * 1024 * 1024));
    commit_events(&journaled, 3, 2).await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        TestEvent {
            name: "beside the big one".into(),
            count: 1
        }
    )
    .unwrap();
    let big = journal!(
        tx,
        Blob {
            blob: "x".repeat(1024 * 1024 + 10)
        }
    )
    .unwrap();
    tx.commit().await.unwrap();
    commit_events(&journaled, 3, 2).await;
    let mut expected = stored(&journaled).await;
    expected.remove(&big.to_string());

    let stats = drain(&db.pool, &emulator.endpoint(), test_config()).await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(
        jobs.len(),
        1,
        "only the job with the refused record is left"
    );
    let dead = &jobs[0];
    assert!(dead.dead_at.is_some());
    assert_eq!(dead.event_count, 1, "it keeps only the undelivered record");
    assert_eq!(dead.records().unwrap()[0].id, big);
    let error = dead.last_error.as_deref().unwrap();
    assert!(
        error.contains("ValidationException") && error.contains(&big.to_string()),
        "{error}"
    );
    assert_eq!(stats.dead_jobs.load(Ordering::Relaxed), 1);
    let status = journaled::store::status(&db.pool).await.unwrap();
    assert_eq!(
        (status.dead_jobs, status.dead_events, status.pending_jobs),
        (1, 1, 0)
    );

    assert_eq!(journaled::store::retry(&db.pool, None).await.unwrap(), 1);
    let revived = &journaled.jobs().await.unwrap()[0];
    assert!(revived.dead_at.is_none() && revived.attempts == 0);
    let status = journaled::store::status(&db.pool).await.unwrap();
    assert_eq!(
        (status.dead_jobs, status.pending_jobs, status.due_jobs),
        (0, 1, 1)
    );
}

/// A job row that cannot be decoded is dead with the reason; the others flow on.
async fn a_corrupt_job_is_dead_and_the_rest_flow<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 2, 2).await;
    let expected = stored(&journaled).await;
    DB::exec(&mut *db.pool.acquire().await.unwrap(), DB::CORRUPT_JOB).await;
    commit_events(&journaled, 2, 2).await;
    let expected: HashMap<String, Vec<u8>> = expected
        .into_iter()
        .chain(stored_valid(&journaled).await)
        .collect();
    drain(&db.pool, &emulator.endpoint(), test_config()).await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].dead_at.is_some());
    assert!(
        jobs[0].last_error.as_deref().unwrap().contains("corrupt"),
        "{:?}",
        jobs[0].last_error
    );
}

async fn stored_valid<DB: Backend>(journaled: &Journaled<DB>) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    for job in journaled.jobs().await.unwrap() {
        if let Ok(records) = job.records() {
            for record in records {
                out.insert(record.id.to_string(), record.data().to_vec());
            }
        }
    }
    out
}

/// A stream that does not exist is a configuration error: retried, never dead, and delivered
/// once the stream is there.
async fn a_missing_stream_is_retried_until_it_exists<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 2, 2).await;
    let expected = stored(&journaled).await;
    let config = test_config().with_max_attempts(2);
    let worker = spawn_worker(&db.pool, &emulator.endpoint(), config).await;
    let stats = worker.stats.clone();
    wait_until(30, "several failed attempts", || {
        let stats = stats.clone();
        async move { stats.retried_jobs.load(Ordering::Relaxed) >= 6 }
    })
    .await;
    let jobs = journaled.jobs().await.unwrap();
    assert!(
        jobs.iter().all(|j| j.dead_at.is_none()),
        "configuration errors never kill jobs"
    );
    assert!(jobs.iter().any(|j| {
        j.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("ResourceNotFoundException")
    }));
    emulator.create_stream("test_stream", 1).await;
    wait_until(30, "every job is delivered", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    worker.stop().await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
}

/// One transaction of 1,200 events (three job rows) arrives whole.
async fn a_chunked_transaction_is_delivered_whole<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 2).await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 1, 1_200).await;
    assert_eq!(journaled.jobs().await.unwrap().len(), 3);
    let expected = stored(&journaled).await;
    drain(&db.pool, &emulator.endpoint(), test_config()).await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
    assert!(journaled.jobs().await.unwrap().is_empty());
}

/// One transaction of 600 events of one key (two job rows, two requests) arrives in
/// `journal!` order: the second request is sent only after the first (it once arrived with
/// 501–600 first).
async fn a_transaction_of_one_key_arrives_in_order<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    for n in 0..600 {
        journal!(
            tx,
            OneKey {
                key: "one-key".into(),
                n
            }
        )
        .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(journaled.jobs().await.unwrap().len(), 2);
    drain(&db.pool, &emulator.endpoint(), test_config()).await;
    let got: Vec<i64> = emulator
        .read("test_stream")
        .await
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.data).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(got, (0..600).collect::<Vec<_>>());
}

/// A claim takes at least one job and stops near its byte budget, and never takes jobs that
/// are not due (delayed, ahead in priority) however many there are.
async fn claims_are_bounded_by_bytes_and_skip_jobs_not_due<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    for n in 0..50 {
        journal!(tx, Later { n }).unwrap();
    }
    tx.commit().await.unwrap();
    for _ in 0..4 {
        let mut tx = journaled.begin().await.unwrap();
        journal!(
            tx,
            Blob {
                blob: "b".repeat(10_000)
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    let lease = Duration::from_secs(60);
    let one = DB::claim(&db.pool, "owner-1", 100, 1, lease).await.unwrap();
    assert_eq!(
        one.len(),
        1,
        "a claim always takes one job, whatever its size"
    );
    let two = DB::claim(&db.pool, "owner-2", 100, 15_000, lease)
        .await
        .unwrap();
    assert_eq!(
        two.len(),
        2,
        "the second job starts under the budget, the third would not"
    );
    let rest = DB::claim(&db.pool, "owner-3", 100, 1 << 30, lease)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1, "delayed jobs are never claimed early");
    assert!(
        DB::claim(&db.pool, "owner-4", 100, 1 << 30, lease)
            .await
            .unwrap()
            .is_empty()
    );
    let status = journaled::store::status(&db.pool).await.unwrap();
    assert_eq!(
        (status.pending_jobs, status.leased_jobs, status.due_jobs),
        (5, 4, 0)
    );
}

/// An event delayed by an hour is not behind: the oldest pending age counts from when an event
/// falls due, and events not due yet are counted as delayed (the README's "falling behind"
/// alert must not fire for them).
async fn the_oldest_pending_age_ignores_delayed_events<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, Later { n: 1 }).unwrap();
    tx.commit().await.unwrap();
    // Committed an hour ago with its delay still ahead (a clock cannot be moved in a test).
    DB::exec(&mut *db.pool.acquire().await.unwrap(), DB::BACKDATE_AN_HOUR).await;
    let status = journaled::store::status(&db.pool).await.unwrap();
    assert_eq!(
        (status.pending_jobs, status.delayed_jobs, status.due_jobs),
        (1, 1, 0)
    );
    assert_eq!(status.oldest_pending_age_secs, None, "{status:?}");
    commit_events(&journaled, 1, 1).await;
    let status = journaled::store::status(&db.pool).await.unwrap();
    let age = status.oldest_pending_age_secs.unwrap();
    assert!((0.0..60.0).contains(&age), "{status:?}");
    assert_eq!((status.pending_jobs, status.delayed_jobs), (2, 1));
}

on_both_backends!(
    receipts_are_pruned_by_age_only,
    the_oldest_pending_age_ignores_delayed_events,
    a_transaction_of_one_key_arrives_in_order,
    a_chunked_transaction_is_delivered_whole,
    claims_are_bounded_by_bytes_and_skip_jobs_not_due,
    committed_events_arrive_with_their_stored_bytes,
    priority_order_is_respected_when_behind,
    two_workers_share_one_table,
    throttled_records_are_retried,
    server_errors_slow_responses_and_resets_are_retried,
    an_unreachable_kinesis_delays_but_loses_nothing,
    a_failing_credentials_provider_kills_nothing,
    a_rejected_record_kills_only_its_job,
    a_corrupt_job_is_dead_and_the_rest_flow,
    a_missing_stream_is_retried_until_it_exists,
);

/// SQLite: application transactions that read, then write, run beside a worker for seconds
/// without "database is locked" (journaled's transactions begin IMMEDIATE), and every event
/// they commit is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writers_beside_a_worker_never_see_database_is_locked() {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let db = TestDb::<sqlx::Sqlite>::new().await;
    let journaled = db.migrated().await;
    sqlx::raw_sql("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL); INSERT INTO counters VALUES (1, 0)")
        .execute(&db.pool)
        .await
        .unwrap();
    let worker = spawn_worker(&db.pool, &emulator.endpoint(), test_config()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut writers = Vec::new();
    for w in 0..3 {
        let journaled = journaled.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            while tokio::time::Instant::now() < deadline {
                let mut tx = journaled.begin().await.unwrap();
                let n: i64 = sqlx::query_scalar("SELECT n FROM counters WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("UPDATE counters SET n = ? WHERE id = 1")
                    .bind(n + 1)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let id = journal!(
                    tx,
                    TestEvent {
                        name: format!("w{w}"),
                        count: n
                    }
                )
                .unwrap();
                tx.commit().await.unwrap();
                committed.push(id.to_string());
            }
            committed
        }));
    }
    let mut committed = HashSet::new();
    for writer in writers {
        committed.extend(writer.await.unwrap());
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM counters WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n as usize, committed.len(), "no lost update");
    wait_until(60, "every job is delivered", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    worker.stop().await;
    let got: HashSet<String> = delivered(&emulator, "test_stream")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(committed.is_subset(&got), "every committed event arrives");
}

/// SQLite: two workers with their own connections to one file deliver everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_sqlite_file() {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let db = TestDb::<sqlx::Sqlite>::new().await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 80, 2).await;
    let expected = stored(&journaled).await;
    let second_pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(
            db.url()
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .busy_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let config = test_config().with_batch_size(4).with_concurrency(2);
    let endpoint = emulator.endpoint();
    let (a, b) = tokio::join!(
        drain(&db.pool, &endpoint, config.clone()),
        drain(&second_pool, &endpoint, config)
    );
    let got = delivered(&emulator, "test_stream").await;
    assert_exactly_delivered(&expected, &got);
    assert_eq!(got.len(), expected.len(), "each job delivered once");
    let jobs = a.completed_jobs.load(Ordering::Relaxed) + b.completed_jobs.load(Ordering::Relaxed);
    assert_eq!(jobs, 80);
    assert!(journaled.jobs().await.unwrap().is_empty());
}

/// A stopping worker waits for deliveries in flight only up to its shutdown timeout, then gives
/// their jobs back, due at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_unfinished_jobs_back() {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let proxy = FaultProxy::start(emulator.port).await;
    *proxy.faults.slow_for.lock().unwrap() = Duration::from_secs(60);
    proxy.faults.slow.store(1000, Ordering::SeqCst);
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 3, 2).await;
    let mut config = test_config();
    config.shutdown_timeout = Duration::from_millis(500);
    let sink = KinesisSink::new(
        kinesis_config(&proxy.endpoint())
            .with_read_timeout(Duration::from_secs(60))
            .client()
            .await,
    );
    let worker = Worker::new(db.pool.clone(), sink, config).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    wait_until(30, "the worker is publishing", || async {
        proxy.faults.injected_slow.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(
        journaled::store::status(&db.pool)
            .await
            .unwrap()
            .leased_jobs,
        3
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("stops within the timeout")
        .unwrap()
        .unwrap();
    let status = journaled::store::status(&db.pool).await.unwrap();
    assert_eq!(
        (status.leased_jobs, status.due_jobs, status.pending_events),
        (0, 3, 6)
    );
}

/// A job too big to publish before the delivery deadline makes progress every round: the
/// cut-off is rescheduled at once, with no attempt counted and no backoff, however many rounds
/// it takes (max attempts 1, a first backoff of 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_job_cut_off_by_the_deadline_is_neither_counted_nor_delayed() {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let proxy = FaultProxy::start(emulator.port).await;
    *proxy.faults.slow_for.lock().unwrap() = Duration::from_millis(300);
    proxy.faults.slow.store(100_000, Ordering::SeqCst);
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    commit_events(&journaled, 1, 200).await;
    assert_eq!(journaled.jobs().await.unwrap().len(), 1);
    let expected = stored(&journaled).await;
    // 40 requests of 5 records, 8 at a time, 300 ms each: about 16 fit in a round (0.8 s).
    let config = test_config()
        .with_lease(Duration::from_secs(1))
        .with_max_records_per_request(5)
        .with_max_attempts(1)
        .with_backoff_base(Duration::from_secs(30))
        .with_backoff_max(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let worker = spawn_worker(&db.pool, &proxy.endpoint(), config).await;
    let stats = worker.stats.clone();
    wait_until(20, "the big job is delivered", || async {
        let jobs = journaled.jobs().await.unwrap();
        assert!(jobs.iter().all(|j| j.dead_at.is_none()), "{jobs:#?}");
        assert!(jobs.iter().all(|j| j.attempts == 0), "no attempt counted");
        jobs.is_empty()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stats.retried_jobs.load(Ordering::Relaxed) >= 1,
        "it took more than one round"
    );
    worker.stop().await;
    assert_exactly_delivered(&expected, &delivered(&emulator, "test_stream").await);
}

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The metrics endpoint of a running worker moves after a delivery and after a throttled retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_after_delivery_and_throttling() {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let proxy = FaultProxy::start(emulator.port).await;
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = test_config().with_metrics_addr(Some(([127, 0, 0, 1], port).into()));
    let worker = spawn_worker(&db.pool, &proxy.endpoint(), config).await;

    commit_events(&journaled, 1, 5).await;
    wait_until(30, "delivered", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    let text = scrape(port).await;
    assert_eq!(metric(&text, "journaled_events_delivered_total"), 5.0);
    assert!(
        metric(
            &text,
            "journaled_put_records_requests_total{outcome=\"ok\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric(&text, "journaled_delivery_latency_seconds_count"),
        5.0
    );
    assert_eq!(metric(&text, "journaled_put_records_records_sum"), 5.0);
    assert!(metric(&text, "journaled_put_records_bytes_sum") > 0.0);
    assert_eq!(metric(&text, "journaled_jobs_pending"), 0.0);
    assert_eq!(metric(&text, "journaled_keys_parked"), 0.0);
    assert_eq!(
        metric(&text, "journaled_oldest_pending_event_age_seconds"),
        0.0
    );

    proxy.faults.throttle_every.store(2, Ordering::SeqCst);
    proxy.faults.throttle_requests.store(1, Ordering::SeqCst);
    commit_events(&journaled, 1, 3).await;
    wait_until(30, "delivered after a retry", || async {
        journaled.jobs().await.unwrap().is_empty()
    })
    .await;
    let text = scrape(port).await;
    assert_eq!(metric(&text, "journaled_events_delivered_total"), 8.0);
    assert_eq!(
        metric(
            &text,
            "journaled_records_failed_total{code=\"ProvisionedThroughputExceededException\"}"
        ),
        2.0
    );
    assert_eq!(metric(&text, "journaled_job_retries_total"), 1.0);
    assert_eq!(metric(&text, "journaled_jobs_killed_total"), 0.0);
    worker.stop().await;
}

/// The store's settle operations: a split-off dead job and the retry guard on leased jobs.
async fn reschedule_splits_and_retry_spares_leased_jobs<DB: Backend + AppSql>(db: &TestDb<DB>) {
    use journaled::store::{DeadSplit, Reschedule};
    let journaled = db.migrated().await;
    commit_events(&journaled, 1, 3).await;
    let job = journaled.jobs().await.unwrap().remove(0);
    let records = job.records().unwrap();
    let claimed = DB::claim(&db.pool, "owner-1", 10, 1 << 20, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        journaled::store::retry(&db.pool, Some(job.id))
            .await
            .unwrap(),
        0,
        "a leased job is not retried"
    );

    let update = Reschedule {
        id: job.id,
        records: Some((serde_json::to_string(&[&records[1]]).unwrap(), 1)),
        attempts: 1,
        transient_failures: 0,
        delay: Duration::ZERO,
        last_error: "throttled".into(),
        dead: false,
        split_dead: Some(DeadSplit {
            records: serde_json::to_string(&[&records[0]]).unwrap(),
            event_count: 1,
            last_error: "permanently refused".into(),
        }),
    };
    assert!(
        !DB::reschedule(&db.pool, "someone-else", &update)
            .await
            .unwrap(),
        "the owner guards it"
    );
    assert!(DB::reschedule(&db.pool, "owner-1", &update).await.unwrap());
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 2);
    let (live, dead) = (&jobs[0], &jobs[1]);
    assert_eq!(
        (live.event_count, live.dead_at.is_none(), live.attempts),
        (1, true, 1)
    );
    assert_eq!(live.records().unwrap()[0].id, records[1].id);
    assert_eq!((dead.event_count, dead.dead_at.is_some()), (1, true));
    assert_eq!(dead.records().unwrap()[0].id, records[0].id);
    assert_eq!(dead.last_error.as_deref(), Some("permanently refused"));
    assert_eq!(
        (dead.priority, dead.created_at),
        (live.priority, live.created_at)
    );
    assert_eq!(
        journaled::store::retry(&db.pool, Some(dead.id))
            .await
            .unwrap(),
        1
    );
}

on_both_backends!(reschedule_splits_and_retry_spares_leased_jobs);

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", delay_secs = 60)]
struct InAMinute {
    n: i64,
}

/// Delays and backoff count from the database's clock, never the process's: here the
/// database's clock runs two minutes ahead of the process (its `now()` is shadowed in the
/// connections' search path), as a worker or application host whose clock is two minutes
/// slow sees it. A due time computed as process time + 60 s would already have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_times_follow_the_database_clock_not_the_process_clock() {
    use journaled::store::Reschedule;
    let db = TestDb::<sqlx::Postgres>::new().await;
    sqlx::raw_sql(
        "CREATE SCHEMA skew; \
         CREATE FUNCTION skew.now() RETURNS timestamptz LANGUAGE sql STABLE \
             AS $$ SELECT pg_catalog.now() + interval '2 minutes' $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET search_path = skew, pg_catalog")
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
        .connect(&db.url())
        .await
        .unwrap();
    let skewed: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - pg_catalog.now())::float8")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(skewed, 120.0, "the database's clock runs ahead");
    let journaled = Journaled::new(pool.clone(), common::test_config());
    journaled.migrate().await.unwrap();
    let lease = Duration::from_secs(30);

    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, InAMinute { n: 1 }).unwrap();
    tx.commit().await.unwrap();
    let claimed = sqlx::Postgres::claim(&pool, "owner-1", 10, 1 << 20, lease)
        .await
        .unwrap();
    assert!(
        claimed.is_empty(),
        "a delay counts from the database's clock"
    );

    journal!(
        journaled,
        TestEvent {
            name: "now".into(),
            count: 1
        }
    )
    .await
    .unwrap();
    let claimed = sqlx::Postgres::claim(&pool, "owner-2", 10, 1 << 20, lease)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let rescheduled = sqlx::Postgres::reschedule(
        &pool,
        "owner-2",
        &Reschedule {
            id: claimed[0].id,
            records: None,
            attempts: 1,
            transient_failures: 0,
            delay: Duration::from_secs(60),
            last_error: "throttled".into(),
            dead: false,
            split_dead: None,
        },
    )
    .await
    .unwrap();
    assert!(rescheduled);
    let claimed = sqlx::Postgres::claim(&pool, "owner-3", 10, 1 << 20, lease)
        .await
        .unwrap();
    assert!(
        claimed.is_empty(),
        "a backoff counts from the database's clock"
    );
    let ahead: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM run_at - now())::float8 FROM journaled.jobs ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        ahead.iter().all(|s| (50.0..=61.0).contains(s)),
        "due a minute after the database's now: {ahead:?}"
    );
}
