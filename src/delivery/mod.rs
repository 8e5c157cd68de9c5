//! The delivery worker: claim due jobs with a lease, publish them, delete what was delivered,
//! and retry the rest with backoff. No row lock or transaction is held across a network call.

pub mod metrics;
mod publish;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::Error;
use crate::kinesis::{ErrorClass, Sink};
use crate::store::{Backend, Claimed, JobId};
use publish::JobState;

/// `PutRecords` requests one claimed batch keeps in flight at most.
const REQUESTS_PER_BATCH: usize = 8;

/// Consecutive failed claims after which a draining worker gives up.
const DRAIN_CLAIM_FAILURES: u32 = 10;

/// The longest lease, backoff or timeout a setting may ask for.
const MAX_SETTING: Duration = Duration::from_secs(7 * 24 * 3600);

/// Worker settings. Every one has a `journaled worker` flag and an environment variable.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs claimed at a time (default 100).
    pub batch_size: usize,
    /// Claimed batches being delivered at once (default 4).
    pub concurrency: usize,
    /// How often to look for due jobs when nothing wakes the worker (default 500 ms).
    pub poll_interval: Duration,
    /// How long a claim lasts; a crashed worker's jobs are taken over after it (default 300 s).
    pub lease: Duration,
    /// Failed attempts (transient errors) before a job is dead (default 25).
    pub max_attempts: i32,
    /// First retry delay; it doubles per attempt, with jitter (default 1 s).
    pub backoff_base: Duration,
    /// Longest retry delay (default 600 s).
    pub backoff_max: Duration,
    /// Retry delay after a configuration error (stream missing, access denied; default 60 s).
    pub configuration_backoff: Duration,
    /// Records per `PutRecords` request (default and service maximum 500).
    pub max_records_per_request: usize,
    /// Bytes (data plus partition keys) per `PutRecords` request (default 5 MiB).
    pub max_request_bytes: usize,
    /// How long a stopping worker waits for deliveries in flight before giving their jobs back (default 30 s).
    pub shutdown_timeout: Duration,
    /// Exit once nothing is due and nothing is in flight.
    pub drain: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when `None`.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch_size: 100,
            concurrency: 4,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(300),
            max_attempts: 25,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            configuration_backoff: Duration::from_secs(60),
            max_records_per_request: 500,
            max_request_bytes: 5 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            drain: false,
            metrics_addr: None,
        }
    }
}

impl WorkerConfig {
    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1");
        }
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if self.max_records_per_request == 0 || self.max_records_per_request > 500 {
            return bad("records per request must be between 1 and 500");
        }
        if self.max_request_bytes == 0 {
            return bad("request bytes must be at least 1");
        }
        if self.max_attempts < 1 {
            return bad("max attempts must be at least 1");
        }
        if self.lease.is_zero() {
            return bad("the lease must be longer than zero");
        }
        for (name, value) in [
            ("lease", self.lease),
            ("backoff max", self.backoff_max),
            ("configuration backoff", self.configuration_backoff),
            ("shutdown timeout", self.shutdown_timeout),
            ("poll interval", self.poll_interval),
        ] {
            if value > MAX_SETTING {
                return Err(Error::Config(format!("the {name} must be at most 7 days")));
            }
        }
        if self.backoff_base > self.backoff_max {
            return bad("the backoff base must not exceed the backoff max");
        }
        Ok(())
    }
}

/// Counters a running worker keeps; read them while it runs.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Events published and acknowledged.
    pub delivered_events: AtomicU64,
    /// Jobs fully delivered and deleted.
    pub completed_jobs: AtomicU64,
    /// Records that failed (and will be retried, or made their job dead).
    pub failed_records: AtomicU64,
    /// Jobs rescheduled for a retry.
    pub retried_jobs: AtomicU64,
    /// Jobs given up on.
    pub dead_jobs: AtomicU64,
    /// Jobs whose lease was lost before they were settled (another worker took them over).
    pub lost_leases: AtomicU64,
    /// Batches claimed.
    pub claims: AtomicU64,
}

/// The delivery worker. Build with [`Worker::new`], then [`Worker::run`].
pub struct Worker<DB: Backend> {
    pool: sqlx::Pool<DB>,
    sink: Arc<dyn Sink>,
    config: WorkerConfig,
    id: String,
    stats: Arc<WorkerStats>,
    metrics: Arc<metrics::Metrics>,
}

impl<DB: Backend> std::fmt::Debug for Worker<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}

struct Shared<DB: Backend> {
    pool: sqlx::Pool<DB>,
    sink: Arc<dyn Sink>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    metrics: Arc<metrics::Metrics>,
    in_flight: Mutex<HashSet<String>>,
}

impl<DB: Backend> Worker<DB> {
    /// A worker delivering jobs from `pool` to `sink`.
    pub fn new(pool: sqlx::Pool<DB>, sink: impl Sink, config: WorkerConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Worker {
            pool,
            sink: Arc::new(sink),
            config,
            id: worker_id(),
            stats: Arc::default(),
            metrics: Arc::default(),
        })
    }

    /// This worker's lease owner name (`host:pid:random`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its metrics (what `--metrics-addr` serves).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    /// Its counters, shared with the running worker.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Delivers until `shutdown` completes (or, with `drain`, until nothing is due). Then stops
    /// claiming, lets deliveries in flight finish within the shutdown timeout, and gives the
    /// jobs of any that did not back to the queue.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Worker {
            pool,
            sink,
            config,
            id,
            stats,
            metrics,
        } = self;
        let metrics_server = match config.metrics_addr {
            Some(addr) => {
                let listener = metrics::bind(addr).await?;
                tracing::info!(%addr, "serving metrics on /metrics");
                Some(tokio::spawn(metrics::serve(
                    listener,
                    pool.clone(),
                    metrics.clone(),
                )))
            }
            None => None,
        };
        tracing::info!(worker = %id, batch_size = config.batch_size, concurrency = config.concurrency, "worker started");
        let shared = Arc::new(Shared {
            pool,
            sink,
            config,
            stats,
            metrics,
            in_flight: Mutex::new(HashSet::new()),
        });
        let config = &shared.config;
        let wake = Arc::new(Notify::new());
        let listener = DB::wake_on_insert(&shared.pool, wake.clone()).map(tokio::spawn);
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let mut units: JoinSet<()> = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut sequence: u64 = 0;
        let mut claim_failures: u32 = 0;
        let mut outcome = Ok(());

        loop {
            // `biased`: once shutdown is asked for, no new batch is claimed.
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                permit = permits.clone().acquire_owned() => permit.expect("never closed"),
            };
            while units.try_join_next().is_some() {}
            sequence += 1;
            let owner = format!("{id}:{sequence}");
            let claimed = DB::claim(&shared.pool, &owner, config.batch_size as i64, config.lease)
                .instrument(tracing::debug_span!("claim", owner = %owner))
                .await;
            let claimed = match claimed {
                Ok(claimed) => {
                    claim_failures = 0;
                    claimed
                }
                Err(e) => {
                    claim_failures += 1;
                    if config.drain && claim_failures >= DRAIN_CLAIM_FAILURES {
                        tracing::error!(error = %e, "claiming jobs keeps failing; giving up the drain");
                        outcome = Err(e);
                        break;
                    }
                    tracing::warn!(error = %e, "claiming jobs failed; trying again");
                    drop(permit);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(config.poll_interval) => {}
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(permit);
                if config.drain {
                    if units.is_empty() {
                        break;
                    }
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        _ = units.join_next() => {}
                    }
                    continue;
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = wake.notified() => {}
                    () = tokio::time::sleep(config.poll_interval) => {}
                    Some(_) = units.join_next(), if !units.is_empty() => {}
                }
                continue;
            }
            shared.stats.claims.fetch_add(1, Ordering::Relaxed);
            shared
                .in_flight
                .lock()
                .expect("poisoned")
                .insert(owner.clone());
            let shared = shared.clone();
            units.spawn(deliver(shared, owner, claimed, permit));
        }

        if let Some(listener) = listener {
            listener.abort();
        }
        if let Some(server) = metrics_server {
            server.abort();
        }
        let finished = tokio::time::timeout(config.shutdown_timeout, async {
            while units.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            units.abort_all();
            while units.join_next().await.is_some() {}
            let owners: Vec<String> = shared.in_flight.lock().expect("poisoned").drain().collect();
            for owner in owners {
                match DB::release(&shared.pool, &owner).await {
                    Ok(n) => tracing::warn!(
                        owner,
                        jobs = n,
                        "shutdown timeout: gave unfinished jobs back"
                    ),
                    Err(e) => {
                        tracing::error!(owner, error = %e, "could not give jobs back; their lease will expire")
                    }
                }
            }
        }
        tracing::info!(worker = %id, "worker stopped");
        outcome
    }
}

async fn deliver<DB: Backend>(
    shared: Arc<Shared<DB>>,
    owner: String,
    claimed: Vec<Claimed>,
    _permit: OwnedSemaphorePermit,
) {
    let config = &shared.config;
    let jobs: Vec<JobState> = claimed.into_iter().map(JobState::decode).collect();
    let requests = publish::chunk(
        &jobs,
        config.max_records_per_request,
        config.max_request_bytes,
    );
    let span = tracing::debug_span!("publish", owner = %owner, jobs = jobs.len(), requests = requests.len());
    // At most REQUESTS_PER_BATCH requests in flight, and nothing past the publish deadline
    // (well within the lease): records whose request did not complete stay "not attempted"
    // and are retried.
    let deadline = tokio::time::Instant::now() + config.lease.mul_f64(0.8);
    let mut results = Vec::new();
    {
        use futures_util::StreamExt;
        let sends: Vec<_> = requests
            .into_iter()
            .map(|(stream, slots)| {
                publish::send(shared.sink.as_ref(), &shared.metrics, stream, slots, &jobs)
            })
            .collect();
        let mut sends = futures_util::stream::iter(sends).buffer_unordered(REQUESTS_PER_BATCH);
        async {
            loop {
                match tokio::time::timeout_at(deadline, sends.next()).await {
                    Ok(Some(done)) => results.push(done),
                    Ok(None) => break,
                    Err(_) => {
                        tracing::warn!(
                            "publishing ran into the lease deadline; the rest is retried"
                        );
                        break;
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }
    let mut jobs = jobs;
    for ((j, r), outcome) in results.into_iter().flatten() {
        jobs[j].outcomes[r] = outcome;
    }
    settle(&shared, &owner, &jobs)
        .instrument(tracing::debug_span!("settle", owner = %owner))
        .await;
    shared.in_flight.lock().expect("poisoned").remove(&owner);
}

async fn settle<DB: Backend>(shared: &Shared<DB>, owner: &str, jobs: &[JobState]) {
    let stats = &shared.stats;
    let metrics = &shared.metrics;
    let now = OffsetDateTime::now_utc();
    let mut done: Vec<JobId> = Vec::new();
    for job in jobs {
        let delivered = job.outcomes.iter().filter(|o| o.is_none()).count() as u64;
        let failed = job.outcomes.len() as u64 - delivered;
        if job.records.is_ok() {
            stats
                .delivered_events
                .fetch_add(delivered, Ordering::Relaxed);
            metrics.events_delivered.inc_by(delivered);
            let latency = (now - job.claimed.created_at).as_seconds_f64().max(0.0);
            for _ in 0..delivered {
                metrics.delivery_latency.observe(latency);
            }
        }
        if job.records.is_ok() && failed == 0 {
            done.push(job.claimed.id);
            continue;
        }
        stats.failed_records.fetch_add(failed, Ordering::Relaxed);
        let update = publish::reschedule(job, &shared.config, now);
        let configuration = job
            .outcomes
            .iter()
            .flatten()
            .any(|f| f.class == ErrorClass::Configuration);
        if update.dead {
            tracing::error!(job_id = update.id.0, error = %update.last_error, "job is dead: `journaled retry` brings it back");
        } else if configuration {
            tracing::error!(job_id = update.id.0, error = %update.last_error, "configuration error: check the stream, its KMS key and the credentials; retrying later");
        } else {
            tracing::warn!(job_id = update.id.0, attempts = update.attempts, error = %update.last_error, "delivery failed; retrying later");
        }
        match DB::reschedule(&shared.pool, owner, &update).await {
            Ok(true) if update.dead => {
                stats.dead_jobs.fetch_add(1, Ordering::Relaxed);
                metrics.dead.inc();
            }
            Ok(true) => {
                stats.retried_jobs.fetch_add(1, Ordering::Relaxed);
                metrics.retries.inc();
            }
            Ok(false) => {
                stats.lost_leases.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(job_id = update.id.0, error = %e, "could not reschedule; the lease will expire and it is retried");
            }
        }
    }
    if !done.is_empty() {
        match DB::complete(&shared.pool, owner, &done).await {
            Ok(n) => {
                stats.completed_jobs.fetch_add(n, Ordering::Relaxed);
                stats
                    .lost_leases
                    .fetch_add(done.len() as u64 - n, Ordering::Relaxed);
                tracing::debug!(jobs = n, "delivered jobs deleted");
            }
            Err(e) => {
                tracing::error!(error = %e, "could not delete delivered jobs; they will be delivered again when their lease expires");
            }
        }
    }
}
