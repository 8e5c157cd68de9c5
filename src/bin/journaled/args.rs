//! Command-line arguments: every setting has a flag and an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use journaled::delivery::WorkerConfig;
use journaled::kinesis::KinesisConfig;

/// The SQLite file used when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://journaled.db?mode=rwc";

/// Durably deliver schematized events to Amazon Kinesis.
#[derive(Debug, Parser)]
#[command(name = "journaled", version, about)]
pub struct Cli {
    /// The database holding the jobs: postgres://… or sqlite://…; a SQLite file
    /// `journaled.db` in the working directory when unset.
    #[arg(long, hide_env_values = true, env = "DATABASE_URL", global = true, default_value = DEFAULT_DATABASE_URL, hide_default_value = true)]
    pub database_url: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update journaled's tables (a no-op when up to date).
    Migrate,
    /// Work with the JSON Schema files.
    Schemas {
        /// What to do with them.
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Publish committed events to Kinesis until SIGTERM or SIGINT (or, with --drain, until
    /// nothing is due).
    Worker(Box<WorkerArgs>),
    /// Show pending, due, leased and dead jobs and the age of the oldest pending event.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a job due now (dead or not), every dead job with --all-dead, or send a parked
    /// ordered key's refused record again with --key.
    Retry {
        /// The job to retry.
        #[arg(required_unless_present_any = ["all_dead", "key"], conflicts_with_all = ["all_dead", "key"])]
        job_id: Option<i64>,
        /// Retry every dead job.
        #[arg(long, conflicts_with = "key")]
        all_dead: bool,
        /// Unpark an ordered key and send its refused record again (see `journaled status`).
        #[arg(long, value_name = "STREAM/KEY")]
        key: Option<String>,
    },
    /// Dead-letter a parked ordered key's refused record (it stays in its dead job) and let
    /// the key's later records flow. A key that is not parked but whose records wait for a
    /// sequence no live job holds (its job deleted, or dead unreadable) moves past it.
    Skip {
        /// The parked or waiting key (see `journaled status`).
        #[arg(long, value_name = "STREAM/KEY")]
        key: String,
    },
    /// Say where an event is: pending (its job), dead (the reason), delivered (stream, shard,
    /// sequence number, when, latency from commit), or unknown.
    Trace {
        /// The event's id (a UUID).
        event_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Read the delivered record back from Kinesis at its sequence number and print it.
        #[arg(long)]
        fetch: bool,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Capture every change to a table, raw SQL and bulk statements included, as audit log
    /// events (PostgreSQL).
    Capture {
        /// What to do.
        #[command(subcommand)]
        command: CaptureCommand,
    },
    /// Print a stream's records as JSON lines, from the oldest (default) or from now.
    Tail {
        /// The stream to read (default JOURNALED_STREAM_NAME).
        #[arg(long, hide_env_values = true, env = "JOURNALED_STREAM_NAME")]
        stream: String,
        /// Only records put from now on.
        #[arg(long)]
        from_now: bool,
        /// Keep reading; without it, exit once caught up.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        aws: AwsArgs,
    },
}

/// A retention: a number with a unit (`s`, `m`, `h`, `d`; seconds without one); `0` is none.
pub(crate) fn retention(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, unit) = match value.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => value.split_at(i),
        None => (value, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => {
            return Err(format!(
                "`{value}`: use a number with s, m, h or d, e.g. 7d"
            ));
        }
    };
    let number: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a duration, e.g. 7d or 12h"))?;
    if !number.is_finite() || number < 0.0 || number * scale > 3650.0 * 86_400.0 {
        return Err(format!("`{value}` must be from 0 to 3650d"));
    }
    Ok(Duration::from_secs_f64(number * scale))
}

fn seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("`{value}` must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{value}` is too many seconds"))
}

fn seconds_or_zero(value: &str) -> Result<Duration, String> {
    match value.trim().parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        Ok(secs) if secs < 0.0 => Err(format!(
            "`{value}` must be 0 (never) or a positive number of seconds"
        )),
        _ => seconds(value),
    }
}

fn millis(value: &str) -> Result<Duration, String> {
    let ms: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a whole number of milliseconds"))?;
    if ms == 0 {
        return Err("must be at least 1 ms".into());
    }
    Ok(Duration::from_millis(ms))
}

/// How to reach Kinesis.
#[derive(Debug, Clone, clap::Args)]
pub struct AwsArgs {
    /// AWS region (else AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long, hide_env_values = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Kinesis endpoint, for a local emulator (else AWS_ENDPOINT_URL).
    #[arg(long, hide_env_values = true, env = "AWS_ENDPOINT_URL_KINESIS")]
    pub endpoint_url: Option<String>,
    /// A role to assume for Kinesis.
    #[arg(long, hide_env_values = true, env = "JOURNALED_IAM_ROLE_ARN")]
    pub iam_role_arn: Option<String>,
    /// Seconds an idle HTTP connection is kept.
    #[arg(long, hide_env_values = true, env = "JOURNALED_HTTP_IDLE_TIMEOUT_SECS", default_value = "5", value_parser = seconds)]
    pub http_idle_timeout_secs: Duration,
    /// Seconds to wait for a connection.
    #[arg(long, hide_env_values = true, env = "JOURNALED_HTTP_CONNECT_TIMEOUT_SECS", default_value = "2", value_parser = seconds)]
    pub http_connect_timeout_secs: Duration,
    /// Seconds to wait for response bytes.
    #[arg(long, hide_env_values = true, env = "JOURNALED_HTTP_READ_TIMEOUT_SECS", default_value = "60", value_parser = seconds)]
    pub http_read_timeout_secs: Duration,
    /// Attempts the AWS SDK makes per request before the worker's own backoff.
    #[arg(long, hide_env_values = true, env = "JOURNALED_SDK_MAX_ATTEMPTS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub sdk_max_attempts: u32,
}

impl AwsArgs {
    /// The Kinesis configuration these flags describe.
    pub fn kinesis_config(&self) -> KinesisConfig {
        let env = KinesisConfig::from_env();
        KinesisConfig::default()
            .with_region(self.region.clone().or(env.region))
            .with_endpoint_url(self.endpoint_url.clone().or(env.endpoint_url))
            .with_role_arn(self.iam_role_arn.clone())
            .with_idle_timeout(self.http_idle_timeout_secs)
            .with_connect_timeout(self.http_connect_timeout_secs)
            .with_read_timeout(self.http_read_timeout_secs)
            .with_sdk_max_attempts(self.sdk_max_attempts)
            .with_static_credentials(None)
    }
}

/// `journaled worker` settings; each has an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The default stream, checked at start (optional: every job names its streams).
    #[arg(long, hide_env_values = true, env = "JOURNALED_STREAM_NAME")]
    pub stream_name: Option<String>,
    /// Jobs claimed at a time.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Bytes of records claimed at a time, about (a claim always takes at least one job).
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_MAX_CLAIM_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_claim_bytes: u32,
    /// Claimed batches delivered at once.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// Milliseconds between looks for due jobs when nothing wakes the worker.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_POLL_INTERVAL_MS", default_value = "500", value_parser = millis)]
    pub poll_interval_ms: Duration,
    /// Seconds a claim lasts before another worker may take the job over (at least 1).
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_LEASE_SECS", default_value = "300", value_parser = seconds)]
    pub lease_secs: Duration,
    /// Failed attempts (transient errors) before a job is dead.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_MAX_ATTEMPTS", default_value_t = 25, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_attempts: i32,
    /// Milliseconds before the first retry; doubles per attempt, with jitter.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_BACKOFF_BASE_MS", default_value = "1000", value_parser = millis)]
    pub backoff_base_ms: Duration,
    /// Longest retry delay, in seconds.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_BACKOFF_MAX_SECS", default_value = "600", value_parser = seconds)]
    pub backoff_max_secs: Duration,
    /// Retry delay after a configuration error, in seconds.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_CONFIGURATION_BACKOFF_SECS", default_value = "60", value_parser = seconds)]
    pub configuration_backoff_secs: Duration,
    /// Records per PutRecords request (at most 500).
    #[arg(long, hide_env_values = true, env = "JOURNALED_MAX_RECORDS_PER_REQUEST", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub max_records_per_request: u32,
    /// Bytes per PutRecords request (data plus partition keys).
    #[arg(long, hide_env_values = true, env = "JOURNALED_MAX_REQUEST_BYTES", default_value_t = 5 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_request_bytes: u32,
    /// Seconds a stopping worker waits for deliveries in flight (keep it below the grace period
    /// before SIGKILL: Kubernetes' is 30 s).
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_SHUTDOWN_TIMEOUT_SECS", default_value = "20", value_parser = seconds)]
    pub shutdown_timeout_secs: Duration,
    /// Exit once nothing is due.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_DRAIN")]
    pub drain: bool,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9187 (off by default).
    #[arg(long, hide_env_values = true, env = "JOURNALED_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How long delivery receipts are kept for `journaled trace` (e.g. 7d, 12h; 0 keeps none).
    #[arg(long, hide_env_values = true, env = "JOURNALED_RECEIPTS_RETENTION", default_value = "7d", value_parser = retention)]
    pub receipts_retention: Duration,
    /// Seconds an ordered key's next record may wait behind a sequence that does not move
    /// before the worker looks for it and, if no live job holds it, parks the key (0: never).
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_GAP_CHECK_SECS", default_value = "300", value_parser = seconds_or_zero)]
    pub gap_check_secs: Duration,
    #[command(flatten)]
    pub aws: AwsArgs,
}

impl WorkerArgs {
    /// The worker configuration these flags describe.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig::default()
            .with_batch_size(self.batch_size as usize)
            .with_max_claim_bytes(self.max_claim_bytes as usize)
            .with_concurrency(self.concurrency as usize)
            .with_poll_interval(self.poll_interval_ms)
            .with_lease(self.lease_secs)
            .with_max_attempts(self.max_attempts)
            .with_backoff_base(self.backoff_base_ms)
            .with_backoff_max(self.backoff_max_secs)
            .with_configuration_backoff(self.configuration_backoff_secs)
            .with_max_records_per_request(self.max_records_per_request as usize)
            .with_max_request_bytes(self.max_request_bytes as usize)
            .with_shutdown_timeout(self.shutdown_timeout_secs)
            .with_drain(self.drain)
            .with_metrics_addr(self.metrics_addr)
            .with_receipts_retention(self.receipts_retention)
            .with_gap_check_after(self.gap_check_secs)
    }
}

/// `journaled schemas …`
#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Compile every schema file found and report each broken one.
    Check {
        /// Folders to search (default: JOURNALED_SCHEMA_PATH, else ./journaled_schemas).
        #[arg(long = "path", value_name = "DIR")]
        paths: Vec<PathBuf>,
    },
}

/// `journaled capture …`
#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Install capture on a table (or update its options): statement-level triggers that
    /// journal every INSERT, UPDATE, DELETE and TRUNCATE in the writer's transaction.
    Enable(Box<CaptureEnableArgs>),
    /// Remove capture from a table: its triggers and its registration.
    Disable {
        /// The table (`users`, `app.users`).
        table: String,
    },
    /// List the tables under capture.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `journaled capture enable` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct CaptureEnableArgs {
    /// The table (`users`, `app.users`).
    pub table: String,
    /// Columns whose changes are not journaled (besides created_at and updated_at).
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub ignore: Vec<String>,
    /// Columns whose values are always filtered (besides the sensitive names, `_crypt` and `_hmac`).
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub sensitive: Vec<String>,
    /// Journal changes to these columns only.
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub changes_only_to: Option<Vec<String>>,
    /// Every event carries a snapshot of the row.
    #[arg(long)]
    pub snapshot: bool,
    /// The stream (default JOURNALED_STREAM_NAME).
    #[arg(long, hide_env_values = true, env = "JOURNALED_STREAM_NAME")]
    pub stream: Option<String>,
    /// The jobs' priority, lower runs first (default JOURNALED_JOB_PRIORITY, else 20).
    #[arg(
        long,
        hide_env_values = true,
        env = "JOURNALED_JOB_PRIORITY",
        allow_negative_numbers = true
    )]
    pub priority: Option<i32>,
    /// The events' class_name (default: the table name in CamelCase, without its final s).
    #[arg(long)]
    pub class_name: Option<String>,
    /// The app in the actor of writes made outside journaled, gid://<app>/db/<user>
    /// (default JOURNALED_APP_NAME, else the database's name).
    #[arg(long, hide_env_values = true, env = "JOURNALED_APP_NAME")]
    pub app_name: Option<String>,
}
