//! Worker settings: every one has a `journaled worker` flag and an environment variable.

use std::time::Duration;

use crate::Error;

/// The longest lease, backoff or timeout a setting may ask for.
const MAX_SETTING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The shortest lease: a shorter one expires while a request is in flight, and another worker
/// publishes the same records again and again.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// The shortest gap check delay (see [`WorkerConfig::gap_check_after`]) other than zero.
pub const MIN_GAP_CHECK: Duration = Duration::from_millis(100);

/// The default shutdown timeout: well within Kubernetes' default grace period (30 s between
/// SIGTERM and SIGKILL), so that a worker whose deliveries did not finish still has time to
/// give their jobs back before it is killed.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Worker settings. Every one has a `journaled worker` flag and an environment variable.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Jobs claimed at a time (default 100).
    pub batch_size: usize,
    /// Bytes of records claimed at a time, about (default 4 MiB; a claim always takes at least
    /// one job). With `concurrency`, it bounds the worker's memory whatever the backlog.
    pub max_claim_bytes: usize,
    /// Claimed batches being delivered at once (default 4).
    pub concurrency: usize,
    /// How often to look for due jobs when nothing wakes the worker (default 500 ms).
    pub poll_interval: Duration,
    /// How long a claim lasts; a crashed worker's jobs are taken over after it (default 300 s,
    /// at least 1 s).
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
    /// How long a stopping worker waits for deliveries in flight before giving their jobs back
    /// (default 20 s: shorter than Kubernetes' 30 s grace period, so the jobs are given back
    /// before SIGKILL; keep it below your own grace period).
    pub shutdown_timeout: Duration,
    /// Exit once nothing is due and nothing is in flight.
    pub drain: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when `None`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How long delivery receipts (event → shard, sequence number) are kept (default 7 days);
    /// zero keeps none. `journaled trace` reads them.
    pub receipts_retention: Duration,
    /// How long an ordered key's next record may wait behind a sequence that does not move
    /// before the worker looks for that sequence (default 300 s, at least 100 ms; zero never
    /// looks). When no live job holds it (its job was deleted, or is dead), the key is parked
    /// with the reason, as for a refused record. A look scans the whole job table for the
    /// jobs that mention the key, so a worker makes one at a time, at most one every tenth
    /// of this delay, and none while an outage or a configuration error holds it back.
    pub gap_check_after: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch_size: 100,
            max_claim_bytes: 4 * 1024 * 1024,
            concurrency: 4,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(300),
            max_attempts: 25,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            configuration_backoff: Duration::from_secs(60),
            max_records_per_request: 500,
            max_request_bytes: 5 * 1024 * 1024,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            drain: false,
            metrics_addr: None,
            receipts_retention: Duration::from_secs(7 * 24 * 3600),
            gap_check_after: Duration::from_secs(300),
        }
    }
}

impl WorkerConfig {
    /// Sets the bytes claimed at a time (see the field).
    pub fn with_max_claim_bytes(mut self, value: usize) -> Self {
        self.max_claim_bytes = value;
        self
    }

    /// Sets jobs claimed at a time (see the field).
    pub fn with_batch_size(mut self, value: usize) -> Self {
        self.batch_size = value;
        self
    }

    /// Sets claimed batches delivered at once (see the field).
    pub fn with_concurrency(mut self, value: usize) -> Self {
        self.concurrency = value;
        self
    }

    /// Sets how often to look for due jobs when nothing wakes the worker (see the field).
    pub fn with_poll_interval(mut self, value: Duration) -> Self {
        self.poll_interval = value;
        self
    }

    /// Sets how long a claim lasts (see the field).
    pub fn with_lease(mut self, value: Duration) -> Self {
        self.lease = value;
        self
    }

    /// Sets failed attempts before a job is dead (see the field).
    pub fn with_max_attempts(mut self, value: i32) -> Self {
        self.max_attempts = value;
        self
    }

    /// Sets the first retry delay (see the field).
    pub fn with_backoff_base(mut self, value: Duration) -> Self {
        self.backoff_base = value;
        self
    }

    /// Sets the longest retry delay (see the field).
    pub fn with_backoff_max(mut self, value: Duration) -> Self {
        self.backoff_max = value;
        self
    }

    /// Sets the retry delay after a configuration error (see the field).
    pub fn with_configuration_backoff(mut self, value: Duration) -> Self {
        self.configuration_backoff = value;
        self
    }

    /// Sets records per `PutRecords` request (see the field).
    pub fn with_max_records_per_request(mut self, value: usize) -> Self {
        self.max_records_per_request = value;
        self
    }

    /// Sets bytes per `PutRecords` request (see the field).
    pub fn with_max_request_bytes(mut self, value: usize) -> Self {
        self.max_request_bytes = value;
        self
    }

    /// Sets how long a stopping worker waits for deliveries in flight (see the field).
    pub fn with_shutdown_timeout(mut self, value: Duration) -> Self {
        self.shutdown_timeout = value;
        self
    }

    /// Sets whether to exit once nothing is due (see the field).
    pub fn with_drain(mut self, value: bool) -> Self {
        self.drain = value;
        self
    }

    /// Sets how long delivery receipts are kept; zero keeps none (see the field).
    pub fn with_receipts_retention(mut self, value: Duration) -> Self {
        self.receipts_retention = value;
        self
    }

    /// Sets how long an ordered key waits behind a sequence before the worker looks for it;
    /// zero never looks (see the field).
    pub fn with_gap_check_after(mut self, value: Duration) -> Self {
        self.gap_check_after = value;
        self
    }

    /// Sets where metrics are served (see the field).
    pub fn with_metrics_addr(mut self, value: Option<std::net::SocketAddr>) -> Self {
        self.metrics_addr = value;
        self
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1");
        }
        if self.max_claim_bytes == 0 {
            return bad("claim bytes must be at least 1");
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
        if self.lease < MIN_LEASE {
            return Err(Error::Config(format!(
                "the lease must be at least {MIN_LEASE:?}, got {:?}: a shorter one expires while a request is in flight and the records are published again and again",
                self.lease
            )));
        }
        for (name, value) in [
            ("poll interval", self.poll_interval),
            ("backoff base", self.backoff_base),
            ("backoff max", self.backoff_max),
            ("configuration backoff", self.configuration_backoff),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!(
                    "the {name} must be longer than zero: a zero one retries or polls in a busy loop"
                )));
            }
        }
        for (name, value) in [
            ("lease", self.lease),
            ("backoff max", self.backoff_max),
            ("configuration backoff", self.configuration_backoff),
            ("shutdown timeout", self.shutdown_timeout),
            ("poll interval", self.poll_interval),
            ("gap check delay", self.gap_check_after),
        ] {
            if value > MAX_SETTING {
                return Err(Error::Config(format!("the {name} must be at most 7 days")));
            }
        }
        if !self.gap_check_after.is_zero() && self.gap_check_after < MIN_GAP_CHECK {
            return Err(Error::Config(format!(
                "the gap check delay must be 0 (never) or at least {MIN_GAP_CHECK:?}, got {:?}: each check scans the job table",
                self.gap_check_after
            )));
        }
        if self.backoff_base > self.backoff_max {
            return bad("the backoff base must not exceed the backoff max");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_settings_are_refused() {
        assert!(WorkerConfig::default().validate().is_ok());
        let refused = |config: WorkerConfig, words: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(words), "{err}");
        };
        refused(
            WorkerConfig::default().with_poll_interval(Duration::ZERO),
            "poll interval",
        );
        refused(
            WorkerConfig::default().with_backoff_base(Duration::ZERO),
            "backoff base",
        );
        refused(
            WorkerConfig::default()
                .with_backoff_base(Duration::ZERO)
                .with_backoff_max(Duration::ZERO),
            "backoff",
        );
        refused(
            WorkerConfig::default().with_configuration_backoff(Duration::ZERO),
            "configuration backoff",
        );
        refused(
            WorkerConfig::default().with_lease(Duration::from_millis(1)),
            "lease must be at least 1s",
        );
        refused(
            WorkerConfig::default().with_gap_check_after(Duration::from_millis(1)),
            "gap check delay must be 0 (never) or at least 100ms",
        );
        assert!(
            WorkerConfig::default()
                .with_gap_check_after(Duration::ZERO)
                .validate()
                .is_ok()
        );
        assert!(
            WorkerConfig::default()
                .with_lease(Duration::from_secs(1))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn the_default_shutdown_timeout_leaves_time_before_kubernetes_kills() {
        // Kubernetes sends SIGKILL 30 s after SIGTERM by default; the worker needs the rest to
        // give unfinished jobs back.
        assert!(WorkerConfig::default().shutdown_timeout <= Duration::from_secs(20));
    }
}
