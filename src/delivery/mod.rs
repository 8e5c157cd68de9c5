//! The delivery worker: claim due jobs with a lease, publish them, delete what was delivered,
//! and retry the rest with backoff. No row lock or transaction is held across a network call.

mod alarm;
mod config;
mod gaps;
mod keyed;
pub mod metrics;
mod ordered;
mod publish;
mod sink;

pub use config::{DEFAULT_SHUTDOWN_TIMEOUT, MIN_GAP_CHECK, MIN_LEASE, WorkerConfig};

pub use sink::{Ack, ErrorClass, Failure, NoopSink, OutRecord, RecordOutcome, Sink};

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
use crate::store::{Backend, Claimed, JobId, Receipt};
use publish::JobState;

/// `PutRecords` requests one claimed batch keeps in flight at most.
const REQUESTS_PER_BATCH: usize = 8;

/// Consecutive failed claims after which a draining worker gives up.
const DRAIN_CLAIM_FAILURES: u32 = 10;
/// How often a busy worker looks for ordered jobs to number when nothing woke it (on
/// PostgreSQL a NOTIFY or a commit in this process does; one look is a query).
const NUMBER_EVERY: Duration = Duration::from_millis(100);

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
    alarm: alarm::Alarm,
    /// Ordered keys waiting behind a sequence, and whether one is being checked.
    gaps: Mutex<gaps::Gaps>,
    gap_check: Arc<std::sync::atomic::AtomicBool>,
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
            alarm: alarm::Alarm::new(config.configuration_backoff),
            config,
            stats,
            metrics,
            in_flight: Mutex::new(HashSet::new()),
            gaps: Mutex::default(),
            gap_check: Arc::default(),
        });
        let config = &shared.config;
        let wake = Arc::new(Notify::new());
        let listener = DB::wake_on_insert(&shared.pool, wake.clone()).map(tokio::spawn);
        let pruner = (!shared.config.receipts_retention.is_zero()).then(|| {
            tokio::spawn(prune_receipts(
                shared.pool.clone(),
                shared.config.receipts_retention,
            ))
        });
        // Commits made in this process wake the worker directly.
        let mut local = crate::wake::subscribe_local();
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let mut units: JoinSet<()> = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut sequence: u64 = 0;
        let mut claim_failures: u32 = 0;
        let mut outcome = Ok(());
        // Whether numbering ordered jobs may find some: at the start, after a wake-up (a
        // commit here, a NOTIFY, the poll timer) and after a round that numbered some; and at
        // least every NUMBER_EVERY while claims keep the loop busy.
        let mut number_due = true;
        let mut numbered_at = tokio::time::Instant::now();
        let mut numbering_failures: u32 = 0;

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
            // Ordered jobs committed since get their numbers and fall due (PostgreSQL; one
            // worker at a time, the others go on).
            if local.has_changed().unwrap_or(false) {
                local.borrow_and_update();
                number_due = true;
            }
            if futures_util::FutureExt::now_or_never(wake.notified()).is_some() {
                number_due = true;
            }
            if number_due || numbered_at.elapsed() >= NUMBER_EVERY {
                numbered_at = tokio::time::Instant::now();
                number_due = match DB::number_sequences(&shared.pool, false)
                    .instrument(tracing::debug_span!("number_sequences"))
                    .await
                {
                    Ok(numbered) => {
                        numbering_failures = 0;
                        numbered.jobs > 0 || numbered.more
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "numbering ordered jobs failed; delivering the rest");
                        numbering_failures += 1;
                        if config.drain && numbering_failures >= DRAIN_CLAIM_FAILURES {
                            // Unnumbered jobs are never due: a drain would wait for ever.
                            tracing::error!(error = %e, "numbering ordered jobs keeps failing; giving up the drain");
                            outcome = Err(e);
                            break;
                        }
                        true
                    }
                };
            }
            let claimed = DB::claim(
                &shared.pool,
                &owner,
                config.batch_size as i64,
                config.max_claim_bytes,
                config.lease,
            )
            .instrument(tracing::debug_span!("claim", owner = %owner))
            .await;
            let claimed = match claimed {
                Ok(claimed) => {
                    claim_failures = 0;
                    claimed
                }
                Err(e @ Error::NotMigrated) => {
                    tracing::error!(error = %e, "cannot deliver");
                    outcome = Err(e);
                    break;
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
                        match drain_check(&shared).await {
                            DrainCheck::Done => break,
                            DrainCheck::GiveUp(e) => {
                                tracing::error!(error = %e, "giving up the drain");
                                outcome = Err(e);
                                break;
                            }
                            DrainCheck::Wait => {
                                tokio::select! {
                                    biased;
                                    () = &mut shutdown => break,
                                    () = tokio::time::sleep(config.poll_interval) => {}
                                }
                                number_due = true;
                                continue;
                            }
                        }
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
                    _ = local.changed() => {}
                    () = tokio::time::sleep(config.poll_interval) => {}
                    Some(_) = units.join_next(), if !units.is_empty() => {}
                }
                number_due = true;
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
        if let Some(pruner) = pruner {
            pruner.abort();
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

enum DrainCheck {
    /// Nothing that fell due is left (delayed jobs wait for their time; dead jobs stay dead).
    Done,
    /// Jobs wait for a retry, a lease, or their backoff: keep going.
    Wait,
    /// Jobs are held back by what a drain cannot outwait.
    GiveUp(Error),
}

/// Nothing is claimable and nothing is in flight: is the drain over? Not while jobs that fell
/// due wait for a retry — unless what holds them back will not go away by itself: a
/// configuration error, or the service unavailable for longer than the configuration backoff.
async fn drain_check<DB: Backend>(shared: &Shared<DB>) -> DrainCheck {
    let status = match DB::status(&shared.pool).await {
        Ok(status) => status,
        Err(e) => {
            tracing::warn!(error = %e, "reading the queue failed; draining on");
            return DrainCheck::Wait;
        }
    };
    let held = status.pending_jobs - status.delayed_jobs;
    if held <= 0 {
        return DrainCheck::Done;
    }
    match shared.alarm.holding_back() {
        Some((failure, lasted))
            if failure.class == ErrorClass::Configuration
                || lasted >= shared.config.configuration_backoff =>
        {
            DrainCheck::GiveUp(Error::Undelivered {
                jobs: held,
                reason: failure.to_string(),
            })
        }
        _ => DrainCheck::Wait,
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
    // A key's records are never in two requests sent at once (see `keyed`).
    let lanes = keyed::lanes(
        &jobs,
        config.max_records_per_request,
        config.max_request_bytes,
    );
    let requests: usize = lanes.iter().map(Vec::len).sum();
    let span = tracing::debug_span!("publish", owner = %owner, jobs = jobs.len(), requests);
    // At most REQUESTS_PER_BATCH requests in flight, and nothing past the publish deadline
    // (well within the lease): records whose request did not complete stay "not attempted"
    // and are retried.
    let deadline = tokio::time::Instant::now() + config.lease.mul_f64(0.8);
    let mut results = Vec::new();
    {
        use futures_util::StreamExt;
        let (sink, metrics, jobs) = (shared.sink.as_ref(), &*shared.metrics, &jobs);
        let mut streams = Vec::with_capacity(lanes.len());
        for lane in lanes {
            streams.push(keyed::send_lane(sink, metrics, lane, jobs));
        }
        let mut sends = futures_util::stream::iter(streams).flatten_unordered(REQUESTS_PER_BATCH);
        let unordered = async {
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
        };
        // Ordered records go in rounds beside the rest (see `ordered`).
        let ordered = ordered::deliver::<DB>(&shared.pool, sink, metrics, jobs, config, deadline);
        let ((), (ordered, waiting)) = async { tokio::join!(unordered, ordered) }
            .instrument(span)
            .await;
        results.push(ordered);
        let may_check = !shared.gap_check.load(std::sync::atomic::Ordering::Acquire)
            && shared.alarm.holding_back().is_none();
        let check = shared.gaps.lock().expect("poisoned").note(
            waiting,
            tokio::time::Instant::now(),
            config.gap_check_after,
            may_check,
        );
        if let Some(key) = check {
            gaps::check(&shared.pool, &shared.gap_check, key);
        }
    }
    let mut jobs = jobs;
    for ((j, r), outcome) in results.into_iter().flatten() {
        match outcome {
            Ok(ack) => {
                jobs[j].outcomes[r] = None;
                jobs[j].acks[r] = Some(ack);
            }
            Err(failure) => jobs[j].outcomes[r] = Some(failure),
        }
    }
    settle(&shared, &owner, &jobs)
        .instrument(tracing::debug_span!("settle", owner = %owner))
        .await;
    shared.in_flight.lock().expect("poisoned").remove(&owner);
}

/// Receipts older than the retention go in batches of this many.
const PRUNE_BATCH: i64 = 10_000;
/// How often receipts are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Deletes expired receipts now and then, a bounded batch at a time.
async fn prune_receipts<DB: Backend>(pool: sqlx::Pool<DB>, retention: Duration) {
    loop {
        loop {
            match DB::prune_receipts(&pool, retention, PRUNE_BATCH).await {
                Ok(n) if n >= PRUNE_BATCH as u64 => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune delivery receipts; trying again later");
                    break;
                }
            }
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}

/// The receipts of every record of `jobs` the sink acknowledged.
fn receipts(jobs: &[JobState]) -> Vec<Receipt> {
    let mut out = Vec::new();
    for job in jobs {
        let Ok(records) = &job.records else { continue };
        for ((record, outcome), ack) in records.iter().zip(&job.outcomes).zip(&job.acks) {
            if let (None, Some(ack)) = (outcome, ack) {
                out.push(Receipt {
                    event_id: record.id,
                    stream: record.stream.clone(),
                    partition_key: record.partition_key.clone(),
                    shard_id: ack.shard_id.clone(),
                    sequence_number: ack.sequence_number.clone(),
                    job_created_at: job.claimed.created_at,
                    delivered_at: None,
                    attempts: job.claimed.attempts,
                });
            }
        }
    }
    out
}

async fn settle<DB: Backend>(shared: &Shared<DB>, owner: &str, jobs: &[JobState]) {
    if !shared.config.receipts_retention.is_zero() {
        // Before the jobs are deleted or rewritten: a receipt never outlives its proof.
        let receipts = receipts(jobs);
        if !receipts.is_empty()
            && let Err(e) = DB::record_receipts(&shared.pool, &receipts).await
        {
            tracing::warn!(error = %e, receipts = receipts.len(), "could not keep delivery receipts");
        }
    }
    let stats = &shared.stats;
    let metrics = &shared.metrics;
    let now = OffsetDateTime::now_utc();
    let mut done: Vec<JobId> = Vec::new();
    let acknowledged = jobs
        .iter()
        .any(|job| job.records.is_ok() && job.outcomes.iter().any(Option::is_none));
    if acknowledged {
        shared.alarm.clear();
    }
    // Failures that are not a job's fault, said once per interval for all the jobs they hold.
    let held: Vec<&Failure> = jobs
        .iter()
        .flat_map(|job| job.outcomes.iter().flatten())
        .filter(|f| {
            matches!(f.class, ErrorClass::Configuration | ErrorClass::Unavailable)
                && f.code != publish::NOT_ATTEMPTED
        })
        .collect();
    if let Some(first) = held
        .iter()
        .find(|f| f.class == ErrorClass::Configuration)
        .or(held.first())
    {
        let waiting = jobs
            .iter()
            .filter(|job| job.outcomes.iter().flatten().any(|f| f.code == first.code))
            .count();
        shared.alarm.raise(first, waiting);
    }
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
        if let Some(update) = ordered::reschedule(job, &shared.config) {
            // Ordered records waiting for a predecessor (or on a parked key): nothing failed.
            tracing::debug!(job_id = update.id.0, reason = %update.last_error, "ordered records wait");
            match DB::reschedule(&shared.pool, owner, &update).await {
                Ok(true) => {}
                Ok(false) => {
                    stats.lost_leases.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(job_id = update.id.0, error = %e, "could not reschedule; the lease will expire and it is retried");
                }
            }
            continue;
        }
        stats.failed_records.fetch_add(failed, Ordering::Relaxed);
        let update = publish::reschedule(job, &shared.config);
        let counted = update.transient_failures > job.claimed.transient_failures;
        if update.dead {
            tracing::error!(job_id = update.id.0, error = %update.last_error, "job is dead: `journaled retry` brings it back");
        } else if counted {
            tracing::warn!(job_id = update.id.0, attempts = update.transient_failures, max_attempts = shared.config.max_attempts, error = %update.last_error, "delivery failed; retrying later");
        } else {
            // Throttling, a deadline cut-off, or what the alarm above reports.
            tracing::debug!(job_id = update.id.0, error = %update.last_error, "not delivered yet; retrying later (not counted toward max attempts)");
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
