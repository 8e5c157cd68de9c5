//! What each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use journaled::delivery::Worker;
use journaled::kinesis::{KinesisSink, ReadRecord, StartAt, StreamReader};
use journaled::schema::SchemaRegistry;
use journaled::store::JobId;
use journaled::store::{Receipt, Trace};
use journaled::{Config, Error};

use crate::args::{Cli, Command, SchemasCommand, WorkerArgs};
use crate::db::DbPool;

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Migrate => {
            let pool = DbPool::connect(&cli.database_url, true).await?;
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
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let status = match &pool {
                DbPool::Postgres(pool) => journaled::store::status(pool).await?,
                DbPool::Sqlite(pool) => journaled::store::status(pool).await?,
            };
            let receipts = match &pool {
                DbPool::Postgres(pool) => journaled::store::receipt_stats(pool).await?,
                DbPool::Sqlite(pool) => journaled::store::receipt_stats(pool).await?,
            };
            let parked = match &pool {
                DbPool::Postgres(pool) => journaled::store::ordering::parked_keys(pool).await?,
                DbPool::Sqlite(pool) => journaled::store::ordering::parked_keys(pool).await?,
            };
            if json {
                let mut value = serde_json::to_value(&status).expect("status serializes");
                value["receipts"] = serde_json::to_value(&receipts).expect("stats serialize");
                value["parked"] = serde_json::to_value(&parked).expect("keys serialize");
                println!("{value}");
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
                println!("parked:  {} ordered keys", parked.len());
                for key in &parked {
                    println!(
                        "  {}/{} at record {} (event {}): {}",
                        key.stream, key.partition_key, key.sequence, key.event_id, key.reason
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
            let trace = match &pool {
                DbPool::Postgres(pool) => journaled::store::trace(pool, event).await?,
                DbPool::Sqlite(pool) => journaled::store::trace(pool, event).await?,
            };
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
            let parked = match &pool {
                DbPool::Postgres(pool) => {
                    journaled::store::ordering::retry_key(pool, &stream, &partition_key).await?
                }
                DbPool::Sqlite(pool) => {
                    journaled::store::ordering::retry_key(pool, &stream, &partition_key).await?
                }
            };
            println!(
                "journaled: {stream}/{partition_key} unparked; record {} (event {}) is sent again",
                parked.sequence, parked.event_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip { key } => {
            let (stream, partition_key) = journaled::store::ordering::parse_key(&key)?;
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let parked = match &pool {
                DbPool::Postgres(pool) => {
                    journaled::store::ordering::skip_key(pool, &stream, &partition_key).await?
                }
                DbPool::Sqlite(pool) => {
                    journaled::store::ordering::skip_key(pool, &stream, &partition_key).await?
                }
            };
            println!(
                "journaled: {stream}/{partition_key} resumes after record {}; event {} stays dead-lettered",
                parked.sequence, parked.event_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry {
            job_id,
            all_dead: _,
            key: None,
        } => {
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let job = job_id.map(JobId);
            let n = match &pool {
                DbPool::Postgres(pool) => journaled::store::retry(pool, job).await?,
                DbPool::Sqlite(pool) => journaled::store::retry(pool, job).await?,
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
    let Some(_stream) = args.stream_name.as_deref().filter(|s| !s.is_empty()) else {
        return Err(Error::Config(
            "JOURNALED_STREAM_NAME (or --stream-name) is not set: name the default Kinesis stream"
                .into(),
        ));
    };
    let config = args.worker_config();
    config.validate()?;
    let pool = DbPool::connect(database_url, false).await?;
    let sink = KinesisSink::new(args.aws.kinesis_config().client().await);
    let shutdown = shutdown_signal();
    match pool {
        DbPool::Postgres(pool) => Worker::new(pool, sink, config)?.run(shutdown).await?,
        DbPool::Sqlite(pool) => Worker::new(pool, sink, config)?.run(shutdown).await?,
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
