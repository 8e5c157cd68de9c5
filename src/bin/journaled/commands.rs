//! What each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use journaled::capture::{self, Capture};
use journaled::delivery::Worker;
use journaled::kinesis::{KinesisSink, ReadRecord, StartAt, StreamReader};
use journaled::schema::SchemaRegistry;
use journaled::store::JobId;
use journaled::store::{Receipt, Trace};
use journaled::{CaptureError, Config, Error};

use crate::args::{CaptureCommand, CaptureEnableArgs, Cli, Command, SchemasCommand, WorkerArgs};
use crate::db::{DbPool, on_pool};
use crate::out::{self, PipeClosed};

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failed {
    /// What went wrong, to say in one line.
    Error(Error),
    /// The reader of stdout is gone: end quietly.
    PipeClosed,
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed::Error(e)
    }
}

impl From<PipeClosed> for Failed {
    fn from(_: PipeClosed) -> Self {
        Failed::PipeClosed
    }
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<ExitCode, Failed> {
    match cli.command {
        Command::Migrate => {
            let pool = DbPool::connect(&cli.database_url, true).await?;
            pool.migrate().await?;
            out::line("journaled: migrations are up to date")?;
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
            Ok(check_schemas(roots)?)
        }
        Command::Worker(args) => Ok(run_worker(&cli.database_url, &args).await?),
        Command::Capture { command } => Ok(run_capture(&cli.database_url, command).await?),
        Command::Status { json } => {
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let status = on_pool!(&pool, pool => journaled::store::status(pool).await?);
            let receipts = on_pool!(&pool, pool => journaled::store::receipt_stats(pool).await?);
            let parked =
                on_pool!(&pool, pool => journaled::store::ordering::parked_keys(pool).await?);
            if json {
                let mut value = serde_json::to_value(&status).expect("status serializes");
                value["receipts"] = serde_json::to_value(&receipts).expect("stats serialize");
                value["parked"] = serde_json::to_value(&parked).expect("keys serialize");
                out::line(value)?;
            } else {
                out::line(format_args!(
                    "pending: {} jobs, {} events ({} due, {} leased, {} delayed)",
                    status.pending_jobs,
                    status.pending_events,
                    status.due_jobs,
                    status.leased_jobs,
                    status.delayed_jobs
                ))?;
                out::line(format_args!(
                    "dead:    {} jobs, {} events",
                    status.dead_jobs, status.dead_events
                ))?;
                match status.oldest_pending_age_secs {
                    Some(age) => {
                        out::line(format_args!("oldest pending event: due {age:.1} s ago"))?
                    }
                    None => out::line("oldest pending event: none")?,
                }
                println!("parked:  {} ordered keys", parked.len());
                for key in &parked {
                    // A key parked on a lost sequence has no event to name.
                    let event = if key.event_id.is_empty() {
                        String::new()
                    } else {
                        format!(" (event {})", key.event_id)
                    };
                    println!(
                        "  {}/{} at record {}{event}: {}",
                        key.stream, key.partition_key, key.sequence, key.reason
                    );
                }
            }
            if !json {
                let ms =
                    |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1e3));
                println!(
                    "delivered (receipts kept): {} events; commit to acknowledged p50 {}, p99 {}",
                    receipts.delivered_events,
                    ms(receipts.latency_p50_secs),
                    ms(receipts.latency_p99_secs)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trace {
            event_id,
            json,
            fetch,
            aws,
        } => {
            let id = uuid::Uuid::parse_str(event_id.trim()).map_err(|e| {
                Error::Config(format!("`{event_id}` is not an event id (a UUID): {e}"))
            })?;
            let event = journaled::EventId(id);
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let trace = on_pool!(&pool, pool => journaled::store::trace(pool, event).await?);
            let record = match (&trace, fetch) {
                (Trace::Delivered(receipt), true) => Some(fetch_record(&aws, receipt).await?),
                _ => None,
            };
            print_trace(&trace, record.as_ref(), json);
            Ok(match trace {
                Trace::Unknown => ExitCode::from(3),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Retry { key: Some(key), .. } => {
            let (stream, partition_key) = journaled::store::ordering::parse_key(&key)?;
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let parked = on_pool!(&pool, pool => journaled::store::ordering::retry_key(pool, &stream, &partition_key).await?);
            println!(
                "journaled: {stream}/{partition_key} unparked; record {} (event {}) is sent again",
                parked.sequence, parked.event_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip { key } => {
            let (stream, partition_key) = journaled::store::ordering::parse_key(&key)?;
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let parked = on_pool!(&pool, pool => journaled::store::ordering::skip_key(pool, &stream, &partition_key).await?);
            if parked.parked_at.is_some() && parked.event_id.is_empty() {
                // Parked by a worker on a sequence no job holds.
                println!(
                    "journaled: {stream}/{partition_key} resumes after missing record {}",
                    parked.sequence
                );
            } else if parked.parked_at.is_some() {
                println!(
                    "journaled: {stream}/{partition_key} resumes after record {}; event {} stays dead-lettered",
                    parked.sequence, parked.event_id
                );
            } else {
                // It was not parked: its records waited for a sequence no live job holds.
                println!(
                    "journaled: {stream}/{partition_key} resumes after missing record {}: {}",
                    parked.sequence, parked.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry {
            job_id,
            all_dead: _,
            key: None,
        } => {
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let job = job_id.map(JobId);
            let n = on_pool!(&pool, pool => journaled::store::retry(pool, job).await?);
            match job {
                Some(id) if n == 0 => {
                    return Err(Error::Config(format!(
                        "there is no job {id} to retry (or a worker holds its lease right now)"
                    ))
                    .into());
                }
                Some(id) => out::line(format_args!("journaled: job {id} is due now"))?,
                None => out::line(format_args!("journaled: {n} dead jobs are due again"))?,
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
                    out::line(line)?;
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

/// Reads the record a receipt points at back from its shard.
async fn fetch_record(aws: &crate::args::AwsArgs, receipt: &Receipt) -> Result<ReadRecord, Error> {
    let (Some(shard), Some(sequence)) = (&receipt.shard_id, &receipt.sequence_number) else {
        return Err(Error::Config(
            "this receipt has no shard or sequence number to fetch from".into(),
        ));
    };
    let client = aws.kinesis_config().client().await;
    journaled::kinesis::read_at(&client, &receipt.stream, shard, sequence)
        .await
        .map_err(|f| Error::Config(format!("cannot read {} at {sequence}: {f}", receipt.stream)))?
        .ok_or_else(|| {
            Error::Config(format!(
                "the stream {} no longer holds sequence number {sequence} on {shard} (past its retention?)",
                receipt.stream
            ))
        })
}

fn print_trace(trace: &Trace, record: Option<&ReadRecord>, json: bool) {
    let data = record.map(|r| {
        serde_json::from_slice::<serde_json::Value>(&r.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&r.data).into_owned())
        })
    });
    if json {
        let mut value = serde_json::to_value(trace).expect("a trace serializes");
        if let (Some(data), Some(object)) = (data, value.as_object_mut()) {
            object.insert("fetched".into(), data);
        }
        println!("{value}");
        return;
    }
    match trace {
        Trace::Delivered(r) => {
            println!(
                "delivered to stream {} (partition key {})",
                r.stream, r.partition_key
            );
            println!(
                "  shard {} sequence number {}",
                r.shard_id.as_deref().unwrap_or("-"),
                r.sequence_number.as_deref().unwrap_or("-")
            );
            if let Some(at) = r.delivered_at {
                println!(
                    "  acknowledged {} ({:.1} ms after commit; {} failed attempts before)",
                    journaled::format_time(at),
                    (at - r.job_created_at).as_seconds_f64() * 1e3,
                    r.attempts
                );
            }
            if let Some(data) = data {
                println!("  record read back: {data}");
            }
        }
        Trace::Pending(job) | Trace::Dead(job) => {
            let state = if matches!(trace, Trace::Dead(_)) {
                "dead"
            } else {
                "pending"
            };
            println!(
                "{state} in job {} (priority {}, committed {}, next due {}, {} failed attempts)",
                job.job_id,
                job.priority,
                journaled::format_time(job.created_at),
                journaled::format_time(job.run_at),
                job.attempts
            );
            if let Some(error) = &job.last_error {
                println!("  last error: {error}");
            }
        }
        _ => {
            println!("unknown: never committed, or delivered longer ago than the receipts are kept")
        }
    }
}

async fn run_worker(database_url: &str, args: &WorkerArgs) -> Result<ExitCode, Error> {
    let config = args.worker_config();
    config.validate()?;
    let pool = DbPool::connect(database_url, false).await?;
    let sink = KinesisSink::new(args.aws.kinesis_config().client().await);
    // Each job names its streams; the default stream is only checked, beside the first
    // deliveries, so that a wrong name or a missing stream is said at start rather than at
    // the first delivery, and a slow answer delays nothing.
    if let Some(stream) = args.stream_name.clone().filter(|s| !s.is_empty()) {
        let sink = sink.clone();
        tokio::spawn(async move {
            match sink.check_stream(&stream).await {
                Ok(()) => tracing::info!(stream, "the default stream is there"),
                Err(failure) if failure.code == "ResourceNotFoundException" => tracing::error!(
                    stream,
                    error = %failure,
                    "the default stream does not exist: its events wait (never dead) until it does"
                ),
                Err(failure) => tracing::warn!(
                    stream,
                    error = %failure,
                    "could not check the default stream (DescribeStreamSummary); delivering anyway"
                ),
            }
        });
    }
    // A closed stderr stops the worker as SIGTERM does (main then exits 141).
    let shutdown = async {
        tokio::select! {
            () = shutdown_signal() => {}
            () = out::closed() => tracing::info!("stderr is closed: stopping"),
        }
    };
    match pool {
        DbPool::Postgres(pool) => Worker::new(pool, sink, config)?.run(shutdown).await?,
        DbPool::Sqlite(pool) => Worker::new(pool, sink, config)?.run(shutdown).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_capture(database_url: &str, command: CaptureCommand) -> Result<ExitCode, Error> {
    if database_url.starts_with("sqlite:") {
        return Err(CaptureError::PostgresOnly.into());
    }
    let DbPool::Postgres(pool) = DbPool::connect(database_url, false).await? else {
        return Err(CaptureError::PostgresOnly.into());
    };
    let mut conn = pool.acquire().await?;
    match command {
        CaptureCommand::Enable(args) => {
            let capture = capture_of(&args, &mut conn).await?;
            let info = capture::enable(&mut conn, &Config::from_env()?, &capture).await?;
            println!(
                "journaled: capturing {} into stream {} (priority {}, class {})",
                info.table, info.stream, info.priority, info.class_name
            );
        }
        CaptureCommand::Disable { table } => {
            if capture::disable(&mut conn, &table).await? {
                println!("journaled: capture disabled on {table}");
            } else {
                println!("journaled: {table} was not under capture");
            }
        }
        CaptureCommand::List { json } => {
            let captures = capture::list(&mut conn).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&captures).expect("captures serialize")
                );
            } else if captures.is_empty() {
                println!("no table is under capture");
            } else {
                for c in &captures {
                    let mut line = format!(
                        "{}  stream {}  priority {}  class {}  ignore {}",
                        c.table,
                        c.stream,
                        c.priority,
                        c.class_name,
                        c.ignore.join(",")
                    );
                    if !c.sensitive.is_empty() {
                        line.push_str(&format!("  sensitive {}", c.sensitive.join(",")));
                    }
                    if let Some(only) = &c.changes_only_to {
                        line.push_str(&format!("  changes only to {}", only.join(",")));
                    }
                    if c.snapshot {
                        line.push_str("  snapshot");
                    }
                    if !c.installed {
                        line.push_str("  NOT INSTALLED (its triggers are gone: enable it again)");
                    } else if !c.current {
                        line.push_str(
                            "  stale (the table changed since: enable it again for the fast path)",
                        );
                    }
                    println!("{line}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn capture_of(
    args: &CaptureEnableArgs,
    conn: &mut sqlx::PgConnection,
) -> Result<Capture, Error> {
    let mut capture = Capture::table(&args.table)
        .ignore(&args.ignore)
        .sensitive(&args.sensitive);
    if let Some(columns) = &args.changes_only_to {
        capture = capture.changes_only_to(columns);
    }
    if args.snapshot {
        capture = capture.with_snapshot();
    }
    if let Some(stream) = &args.stream {
        capture = capture.stream(stream);
    }
    if let Some(priority) = args.priority {
        capture = capture.priority(priority);
    }
    if let Some(class_name) = &args.class_name {
        capture = capture.class_name(class_name);
    }
    let app_name = match args.app_name.clone().filter(|a| !a.is_empty()) {
        Some(app_name) => app_name,
        None => {
            sqlx::query_scalar("SELECT current_database()::text")
                .fetch_one(conn)
                .await?
        }
    };
    Ok(capture.app_name(app_name))
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

fn check_schemas(roots: Vec<PathBuf>) -> Result<ExitCode, PipeClosed> {
    let registry = SchemaRegistry::new(roots.clone());
    let results = registry.check();
    let broken = results.iter().filter(|r| r.error.is_some()).count();
    for result in &results {
        match &result.error {
            None => out::line(format_args!("ok      {}", result.path.display()))?,
            Some(e) => out::line(format_args!("BROKEN  {}: {e}", result.path.display()))?,
        }
    }
    let searched: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    out::line(format_args!(
        "{} schema files checked in <built-in>, {}; {broken} broken",
        results.len(),
        searched.join(", ")
    ))?;
    Ok(if broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
