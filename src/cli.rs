//! The `journaled` command line. `main` in `src/bin/journaled.rs` only calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::schema::SchemaRegistry;
use crate::{Config, Error};

/// The SQLite file used when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://journaled.db?mode=rwc";

/// Durably deliver schematized events to Amazon Kinesis.
#[derive(Debug, Parser)]
#[command(name = "journaled", version, about)]
pub struct Cli {
    /// The database holding the jobs: postgres://… or sqlite://…; a SQLite file
    /// `journaled.db` in the working directory when unset.
    #[arg(long, env = "DATABASE_URL", global = true, default_value = DEFAULT_DATABASE_URL, hide_default_value = true)]
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
                    .map_err(|e| Error::Config(format!("bad DATABASE_URL {url}: {e}")))?
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(std::time::Duration::from_secs(10));
                Ok(AnyPool::Sqlite(
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .connect_with(options)
                        .await
                        .map_err(|e| Error::Config(format!("cannot open {url}: {e}")))?,
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

/// Hides a password in a database URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            let userinfo = &url[start + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..start + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Parses the command line, runs it, and prints errors as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
    }
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
    }
}
