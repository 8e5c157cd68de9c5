//! Opening the database a URL names, and keeping passwords out of messages.

use journaled::Error;

/// Runs `$body` with `$pool` bound to the backend's own pool, whichever it is.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::DbPool::Postgres($pool) => $body,
            $crate::db::DbPool::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

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
        on_pool!(self, pool => journaled::migrate(pool).await)
    }
}

/// Hides passwords in a database URL, whatever its form: in the user info (which may hold
/// `@`, `?`, `/` unescaped: it ends at the last `@`), in `password` / `sslpassword` query
/// parameters, and in libpq `key=value` strings. Anything else is shown by its scheme only.
pub fn redact(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.to_owned(); // a file name: no credentials
    }
    let Some(start) = url.find("://") else {
        if url.contains('=') {
            return redact_key_values(url);
        }
        let scheme = url.split(':').next().unwrap_or_default();
        let is_scheme = scheme.len() < url.len()
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        return if is_scheme {
            format!("{scheme}:<unparseable URL>")
        } else {
            "<unparseable database URL>".to_owned()
        };
    };
    let head = &url[..start + 3];
    let rest = &url[start + 3..];
    // When in doubt (an `@` in the query), more is hidden, never less.
    let (userinfo, remainder) = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None if userinfo.contains(['?', '&', '=']) => "***".to_owned(),
                None => userinfo.to_owned(),
            };
            (shown, &rest[at..])
        }
        None => (String::new(), rest),
    };
    let mut out = format!("{head}{userinfo}");
    match remainder.split_once('?') {
        Some((base, query)) => {
            out.push_str(base);
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if is_password_key(key) => format!("{key}=***"),
                    _ => param.to_owned(),
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
        None => out.push_str(remainder),
    }
    out
}

fn is_password_key(key: &str) -> bool {
    let key = key.trim();
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
}

/// libpq's `key=value` form (`host=h password='a b' dbname=d`): values may be single-quoted,
/// with backslash escapes, and spaces may surround `=`.
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    loop {
        while let Some(c) = chars.next_if(|c| c.is_whitespace()) {
            out.push(c);
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        out.push_str(&key);
        while let Some(c) = chars.next_if(|c| c.is_whitespace()) {
            out.push(c);
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        out.push('=');
        while let Some(c) = chars.next_if(|c| c.is_whitespace()) {
            out.push(c);
        }
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            value.push('\'');
            while let Some(c) = chars.next() {
                value.push(c);
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if is_password_key(&key) {
            out.push_str("***");
        } else {
            out.push_str(&value);
        }
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

    #[test]
    fn passwords_are_redacted_whatever_the_form() {
        // A password holding `?`, `/` or `#`: the user info ends at the last `@`.
        assert_eq!(redact("postgres://u:pa?ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://u:a/b#c?d@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        // An `@` in the query: more is hidden, never the password.
        assert!(!redact("postgres://u:pw@h/db?application_name=a@b").contains("pw"));
        // libpq key=value strings.
        assert_eq!(
            redact("host=localhost password=hunter2 dbname=app"),
            "host=localhost password=*** dbname=app"
        );
        assert_eq!(
            redact("host=h password = 'hun ter\\'2' sslpassword=x user=u"),
            "host=h password = *** sslpassword=*** user=u"
        );
        // Nothing recognisable: nothing shown.
        assert_eq!(redact("hunter2"), "<unparseable database URL>");
        assert!(!redact("u:hunter2@h").contains("hunter2"));
    }
}
