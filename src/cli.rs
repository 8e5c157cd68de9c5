//! The `journaled` command line. `main` in `src/bin/journaled.rs` only calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::time::Duration;

use crate::delivery::{Worker, WorkerConfig};
use crate::kinesis::{KinesisConfig, KinesisSink, StartAt, StreamReader};
use crate::schema::SchemaRegistry;
use crate::store::JobId;
use crate::{Config, Error};

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
    /// Make a job due now (dead or not), or every dead job with --all-dead.
    Retry {
        /// The job to retry.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        job_id: Option<i64>,
        /// Retry every dead job.
        #[arg(long)]
        all_dead: bool,
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
        KinesisConfig {
            region: self.region.clone().or(env.region),
            endpoint_url: self.endpoint_url.clone().or(env.endpoint_url),
            role_arn: self.iam_role_arn.clone(),
            idle_timeout: self.http_idle_timeout_secs,
            connect_timeout: self.http_connect_timeout_secs,
            read_timeout: self.http_read_timeout_secs,
            sdk_max_attempts: self.sdk_max_attempts,
            static_credentials: None,
        }
    }
}

/// `journaled worker` settings; each has an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The default stream (required; events may name their own).
    #[arg(long, hide_env_values = true, env = "JOURNALED_STREAM_NAME")]
    pub stream_name: Option<String>,
    /// Jobs claimed at a time.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Claimed batches delivered at once.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// Milliseconds between looks for due jobs when nothing wakes the worker.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_POLL_INTERVAL_MS", default_value = "500", value_parser = millis)]
    pub poll_interval_ms: Duration,
    /// Seconds a claim lasts before another worker may take the job over.
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
    /// Seconds a stopping worker waits for deliveries in flight.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_SHUTDOWN_TIMEOUT_SECS", default_value = "30", value_parser = seconds)]
    pub shutdown_timeout_secs: Duration,
    /// Exit once nothing is due.
    #[arg(long, hide_env_values = true, env = "JOURNALED_WORKER_DRAIN")]
    pub drain: bool,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9187 (off by default).
    #[arg(long, hide_env_values = true, env = "JOURNALED_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

impl WorkerArgs {
    /// The worker configuration these flags describe.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            batch_size: self.batch_size as usize,
            concurrency: self.concurrency as usize,
            poll_interval: self.poll_interval_ms,
            lease: self.lease_secs,
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base_ms,
            backoff_max: self.backoff_max_secs,
            configuration_backoff: self.configuration_backoff_secs,
            max_records_per_request: self.max_records_per_request as usize,
            max_request_bytes: self.max_request_bytes as usize,
            shutdown_timeout: self.shutdown_timeout_secs,
            drain: self.drain,
            metrics_addr: self.metrics_addr,
        }
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

/// A pool on whichever backend the URL names.
#[derive(Debug, Clone)]
pub enum AnyPool {
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
    /// SQLite.
    Sqlite(sqlx::SqlitePool),
}

impl AnyPool {
    /// Connects, choosing the backend by the URL's scheme.
    pub async fn connect(url: &str) -> Result<AnyPool, Error> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => {
                use std::str::FromStr;
                let unreachable = |e: sqlx::Error| {
                    Error::Config(format!("cannot connect to {}: {e}", redact(url)))
                };
                let options =
                    sqlx::postgres::PgConnectOptions::from_str(url).map_err(unreachable)?;
                // One direct connection first: an unreachable server fails at once instead of
                // after the pool's acquire timeout.
                let probe = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
                    .await
                    .map_err(unreachable)?;
                sqlx::Connection::close(probe).await.map_err(unreachable)?;
                Ok(AnyPool::Postgres(
                    sqlx::postgres::PgPoolOptions::new()
                        .acquire_timeout(std::time::Duration::from_secs(30))
                        .connect_lazy_with(options),
                ))
            }
            "sqlite" => {
                use std::str::FromStr;
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .map_err(|e| Error::Config(format!("bad DATABASE_URL {}: {e}", redact(url))))?
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(std::time::Duration::from_secs(10));
                Ok(AnyPool::Sqlite(
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .connect_with(options)
                        .await
                        .map_err(|e| Error::Config(format!("cannot open {}: {e}", redact(url))))?,
                ))
            }
            _ => Err(Error::Config(format!(
                "DATABASE_URL must start with postgres://, postgresql:// or sqlite:, got `{}`",
                redact(url)
            ))),
        }
    }

    /// Runs journaled's migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        match self {
            AnyPool::Postgres(pool) => crate::migrate(pool).await,
            AnyPool::Sqlite(pool) => crate::migrate(pool).await,
        }
    }
}

/// Hides passwords in a database URL: in the user info and in `password` / `sslpassword`
/// query parameters. A URL that does not parse is shown by its scheme only.
pub fn redact(url: &str) -> String {
    let scheme = url.split(':').next().unwrap_or_default();
    if scheme == "sqlite" {
        return url.to_owned(); // a file name: no credentials
    }
    let Some(start) = url.find("://") else {
        return format!("{scheme}:<unparseable URL>");
    };
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match base.rfind('@') {
        Some(at) if at > start => {
            let userinfo = &base[start + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..start + 3], &base[at..]),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _))
                    if key.eq_ignore_ascii_case("password")
                        || key.eq_ignore_ascii_case("sslpassword") =>
                {
                    format!("{key}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Parses the command line, runs it, and prints errors as one line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("bad arguments");
            eprintln!("journaled: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("journaled: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("journaled: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Migrate => {
            let pool = AnyPool::connect(&cli.database_url).await?;
            pool.migrate().await?;
            println!("journaled: migrations are up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Schemas {
            command: SchemasCommand::Check { paths },
        } => {
            let roots = if paths.is_empty() {
                Config::from_env()?.schema_roots().to_vec()
            } else {
                paths
            };
            Ok(check_schemas(roots))
        }
        Command::Worker(args) => run_worker(&cli.database_url, &args).await,
        Command::Status { json } => {
            let pool = AnyPool::connect(&cli.database_url).await?;
            let status = match &pool {
                AnyPool::Postgres(pool) => crate::store::status(pool).await?,
                AnyPool::Sqlite(pool) => crate::store::status(pool).await?,
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&status).expect("status serializes")
                );
            } else {
                println!(
                    "pending: {} jobs, {} events ({} due, {} leased)",
                    status.pending_jobs, status.pending_events, status.due_jobs, status.leased_jobs
                );
                println!(
                    "dead:    {} jobs, {} events",
                    status.dead_jobs, status.dead_events
                );
                match status.oldest_pending_age_secs {
                    Some(age) => println!("oldest pending event: {age:.1} s old"),
                    None => println!("oldest pending event: none"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry {
            job_id,
            all_dead: _,
        } => {
            let pool = AnyPool::connect(&cli.database_url).await?;
            let job = job_id.map(JobId);
            let n = match &pool {
                AnyPool::Postgres(pool) => crate::store::retry(pool, job).await?,
                AnyPool::Sqlite(pool) => crate::store::retry(pool, job).await?,
            };
            match job {
                Some(id) if n == 0 => {
                    return Err(Error::Config(format!(
                        "there is no job {id} to retry (or a worker holds its lease right now)"
                    )));
                }
                Some(id) => println!("journaled: job {id} is due now"),
                None => println!("journaled: {n} dead jobs are due again"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail {
            stream,
            from_now,
            follow,
            aws,
        } => {
            let client = aws.kinesis_config().client().await;
            let start = if from_now {
                StartAt::Latest
            } else {
                StartAt::Oldest
            };
            let mut reader = StreamReader::open(&client, &stream, start)
                .await
                .map_err(|f| Error::Config(format!("cannot read stream {stream}: {f}")))?;
            loop {
                let (records, caught_up) = reader
                    .poll()
                    .await
                    .map_err(|f| Error::Config(format!("cannot read stream {stream}: {f}")))?;
                for record in records {
                    let data = serde_json::from_slice::<serde_json::Value>(&record.data)
                        .unwrap_or_else(|_| {
                            serde_json::Value::String(
                                String::from_utf8_lossy(&record.data).into_owned(),
                            )
                        });
                    let line = serde_json::json!({
                        "shard_id": record.shard_id,
                        "sequence_number": record.sequence_number,
                        "partition_key": record.partition_key,
                        "data": data,
                    });
                    println!("{line}");
                }
                if caught_up {
                    if !follow {
                        return Ok(ExitCode::SUCCESS);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

async fn run_worker(database_url: &str, args: &WorkerArgs) -> Result<ExitCode, Error> {
    let Some(_stream) = args.stream_name.as_deref().filter(|s| !s.is_empty()) else {
        return Err(Error::Config(
            "JOURNALED_STREAM_NAME (or --stream-name) is not set: name the default Kinesis stream"
                .into(),
        ));
    };
    let config = args.worker_config();
    config.validate()?;
    let pool = AnyPool::connect(database_url).await?;
    let sink = KinesisSink::new(args.aws.kinesis_config().client().await);
    let shutdown = shutdown_signal();
    match pool {
        AnyPool::Postgres(pool) => Worker::new(pool, sink, config)?.run(shutdown).await?,
        AnyPool::Sqlite(pool) => Worker::new(pool, sink, config)?.run(shutdown).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("can listen for SIGTERM");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown requested: finishing deliveries in flight");
}

fn check_schemas(roots: Vec<PathBuf>) -> ExitCode {
    let registry = SchemaRegistry::new(roots.clone());
    let results = registry.check();
    let broken = results.iter().filter(|r| r.error.is_some()).count();
    for result in &results {
        match &result.error {
            None => println!("ok      {}", result.path.display()),
            Some(e) => println!("BROKEN  {}: {e}", result.path.display()),
        }
    }
    let searched: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    println!(
        "{} schema files checked in <built-in>, {}; {broken} broken",
        results.len(),
        searched.join(", ")
    );
    if broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=pw&PASSWORD=x"),
            "postgres://u@h/db?sslmode=require&password=***&PASSWORD=***"
        );
        assert_eq!(redact("postgres:u:pw@h"), "postgres:<unparseable URL>");
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
    }
}
