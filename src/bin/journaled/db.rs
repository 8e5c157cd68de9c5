//! Opening the database a URL names, and keeping passwords out of messages.

use journaled::Error;

/// A pool on whichever backend the URL names.
#[derive(Debug, Clone)]
pub enum DbPool {
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
    /// SQLite.
    Sqlite(sqlx::SqlitePool),
}

impl DbPool {
    /// Connects, choosing the backend by the URL's scheme. Only `create` (what `journaled
    /// migrate` asks for) may create a SQLite file; otherwise a missing file is an error that
    /// says to run `journaled migrate`.
    pub async fn connect(url: &str, create: bool) -> Result<DbPool, Error> {
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
                Ok(DbPool::Postgres(
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
                let options = if create {
                    options
                } else {
                    let file = options.get_filename().to_owned();
                    if file != std::path::Path::new(":memory:") && !file.exists() {
                        return Err(Error::Config(format!(
                            "there is no SQLite database at {}: run `journaled migrate` to create it (or set DATABASE_URL)",
                            file.display()
                        )));
                    }
                    options.create_if_missing(false)
                };
                Ok(DbPool::Sqlite(
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
            DbPool::Postgres(pool) => journaled::migrate(pool).await,
            DbPool::Sqlite(pool) => journaled::migrate(pool).await,
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
