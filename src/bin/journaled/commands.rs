//! What each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use journaled::capture::{self, Capture};
use journaled::delivery::Worker;
use journaled::kinesis::{KinesisSink, StartAt, StreamReader};
use journaled::schema::SchemaRegistry;
use journaled::store::JobId;
use journaled::{CaptureError, Config, Error};

use crate::args::{CaptureCommand, CaptureEnableArgs, Cli, Command, SchemasCommand, WorkerArgs};
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
        Command::Capture { command } => run_capture(&cli.database_url, command).await,
        Command::Status { json } => {
            let pool = DbPool::connect(&cli.database_url, false).await?;
            let status = match &pool {
                DbPool::Postgres(pool) => journaled::store::status(pool).await?,
                DbPool::Sqlite(pool) => journaled::store::status(pool).await?,
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
