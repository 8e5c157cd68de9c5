//! The worker's metrics, in the OpenMetrics/Prometheus text format, served on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::store::{Backend, Status};

/// `outcome` of a `PutRecords` request: `ok` (some records may still have failed) or `error`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// The Kinesis error code a record failed with.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The error code.
    pub code: String,
}

/// Every metric the worker keeps; names are prefixed `journaled_`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) events_delivered: Counter,
    pub(crate) requests: Family<OutcomeLabel, Counter>,
    pub(crate) records_failed: Family<CodeLabel, Counter>,
    pub(crate) retries: Counter,
    pub(crate) dead: Counter,
    jobs_pending: Gauge,
    events_pending: Gauge,
    jobs_dead: Gauge,
    keys_parked: Gauge,
    oldest_pending: Gauge<f64, AtomicU64>,
    pub(crate) delivery_latency: Histogram,
    pub(crate) request_latency: Histogram,
    pub(crate) records_per_request: Histogram,
    pub(crate) bytes_per_request: Histogram,
    /// Status queries the metrics server ran (not exported).
    pub(crate) status_queries: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("journaled");
        let m = Metrics {
            events_delivered: Counter::default(),
            requests: Family::default(),
            records_failed: Family::default(),
            retries: Counter::default(),
            dead: Counter::default(),
            jobs_pending: Gauge::default(),
            events_pending: Gauge::default(),
            jobs_dead: Gauge::default(),
            keys_parked: Gauge::default(),
            oldest_pending: Gauge::default(),
            delivery_latency: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            request_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            records_per_request: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            bytes_per_request: Histogram::new(exponential_buckets(256.0, 2.0, 16)),
            status_queries: AtomicU64::new(0),
            registry: Registry::default(),
        };
        registry.register(
            "events_delivered",
            "Events published and acknowledged",
            m.events_delivered.clone(),
        );
        registry.register(
            "put_records_requests",
            "PutRecords requests by outcome",
            m.requests.clone(),
        );
        registry.register(
            "records_failed",
            "Records not delivered, by error code",
            m.records_failed.clone(),
        );
        registry.register(
            "job_retries",
            "Jobs rescheduled after a failed delivery",
            m.retries.clone(),
        );
        registry.register("jobs_killed", "Jobs given up on (dead)", m.dead.clone());
        registry.register(
            "jobs_pending",
            "Jobs not yet delivered and not dead",
            m.jobs_pending.clone(),
        );
        registry.register(
            "events_pending",
            "Events in pending jobs",
            m.events_pending.clone(),
        );
        registry.register("jobs_dead", "Dead jobs in the table", m.jobs_dead.clone());
        registry.register(
            "keys_parked",
            "Ordered keys parked on a record refused for good",
            m.keys_parked.clone(),
        );
        registry.register(
            "oldest_pending_event_age_seconds",
            "Age of the oldest pending event",
            m.oldest_pending.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From the job's insert (just before COMMIT) to the PutRecords acknowledgement",
            m.delivery_latency.clone(),
        );
        registry.register(
            "put_records_duration_seconds",
            "PutRecords request latency",
            m.request_latency.clone(),
        );
        registry.register(
            "put_records_records",
            "Records per PutRecords request",
            m.records_per_request.clone(),
        );
        registry.register(
            "put_records_bytes",
            "Bytes (data and keys) per PutRecords request",
            m.bytes_per_request.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets the queue gauges from the database's figures.
    pub fn set_status(&self, status: &Status) {
        self.jobs_pending.set(status.pending_jobs);
        self.events_pending.set(status.pending_events);
        self.jobs_dead.set(status.dead_jobs);
        self.keys_parked.set(status.parked_keys);
        self.oldest_pending
            .set(status.oldest_pending_age_secs.unwrap_or(0.0));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// How long the queue's figures are reused across scrapes: at most one status query per
/// interval, however many scrapers there are and however often they come.
pub(crate) const STATUS_MAX_AGE: Duration = Duration::from_secs(5);

/// The queue's figures, refreshed from the database at most once per [`STATUS_MAX_AGE`];
/// concurrent scrapes share one refresh.
#[derive(Debug, Default)]
struct StatusCache {
    refreshed: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl StatusCache {
    async fn refresh<DB: Backend>(&self, pool: &sqlx::Pool<DB>, metrics: &Metrics) {
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|at| at.elapsed() < STATUS_MAX_AGE) {
            return;
        }
        metrics.status_queries.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(5), DB::status(pool)).await {
            Ok(Ok(status)) => metrics.set_status(&status),
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics: cannot read the queue's figures"),
            Err(_) => tracing::warn!("metrics: reading the queue's figures timed out"),
        }
        // A failed refresh is not retried before the interval either: a struggling database
        // is not asked again by every scrape.
        *refreshed = Some(std::time::Instant::now());
    }
}

/// Calls `accept` for ever, handing each connection to `handle`. A failing accept (too many
/// open files, …) is logged and retried after a pause that doubles up to 1 s, never in a
/// busy loop.
pub(crate) async fn accept_loop<S, A, F>(mut accept: A, mut handle: impl FnMut(S))
where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<S>>,
{
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    let mut pause = FIRST_PAUSE;
    loop {
        match accept().await {
            Ok(stream) => {
                pause = FIRST_PAUSE;
                handle(stream);
            }
            Err(e) => {
                tracing::warn!(error = %e, ?pause, "metrics: accepting a connection failed; pausing");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Serves `GET /metrics` on `addr` until the task is aborted; the queue gauges are read from
/// the database at most once per [`STATUS_MAX_AGE`].
pub(crate) async fn serve<DB: Backend>(
    listener: tokio::net::TcpListener,
    pool: sqlx::Pool<DB>,
    metrics: std::sync::Arc<Metrics>,
) {
    let cache = std::sync::Arc::new(StatusCache::default());
    accept_loop(
        || async { listener.accept().await.map(|(stream, _)| stream) },
        |mut stream: tokio::net::TcpStream| {
            let pool = pool.clone();
            let metrics = metrics.clone();
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let response = if path == "/metrics" || path.starts_with("/metrics?") {
                    cache.refresh(&pool, &metrics).await;
                    let body = metrics.encode();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        },
    )
    .await
}

/// Binds the metrics listener, with an error that names the address.
pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::Config(format!("cannot serve metrics on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn failing_accepts_pause_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let looping = accept_loop(
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Err::<(), _>(std::io::Error::other("too many open files")))
            },
            |()| {},
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), looping).await;
        let calls = calls.load(Ordering::Relaxed);
        assert!((2..=12).contains(&calls), "{calls} accepts in 0.5 s");
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn scrapes_share_one_status_query_per_interval() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        crate::migrate(&pool).await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, pool, metrics.clone()));
        for _ in 0..20 {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            assert!(response.contains("journaled_jobs_pending"), "{response}");
        }
        server.abort();
        assert_eq!(metrics.status_queries.load(Ordering::Relaxed), 1);
    }
}
