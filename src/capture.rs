//! Capture (PostgreSQL): every change to a table — raw SQL, bulk statements, `psql`, other
//! services — journaled by the database itself as `journaled_audit_log_event` records, in the
//! writer's transaction, into journaled's job table.
//!
//! ```no_run
//! use journaled::capture::Capture;
//!
//! # async fn f(journaled: journaled::Journaled<sqlx::Postgres>) -> Result<(), journaled::Error> {
//! journaled
//!     .enable_capture(&Capture::table("users").ignore(["last_seen_at"]).sensitive(["ssn"]))
//!     .await?;
//! // From now on, `UPDATE users SET plan = 'pro'` (100,000 rows or one) journals one audit log
//! // event per changed row, committed or rolled back with the statement.
//! # Ok(()) }
//! ```
//!
//! How it works: `enable` installs statement-level `AFTER INSERT/UPDATE/DELETE` triggers with
//! transition tables and a `BEFORE TRUNCATE` trigger on the table. Each statement makes one
//! trigger call, whatever its number of rows, and that call runs one `INSERT … SELECT` that
//! builds every event in SQL and writes them into `journaled.jobs` in rows of at most 500
//! records and 5 MiB, as the library's own jobs are. The trigger function is generated for the
//! table's columns and options, so each session plans its statements once; after an
//! `ALTER TABLE` it builds them from the catalog on each call (a new column is captured at
//! once), until capture is enabled again, which brings the fast path back.
//!
//! The events are those [`Transaction::audit`](crate::Transaction::audit) makes for the same
//! change: `class_name`, `table_name`, `record_id` (the primary key; a composite key as a JSON
//! array, e.g. `[7,"b"]`), `database_operation`, `changes` (`{"column": [old, new]}`, changed
//! and not ignored columns only; every non-null column on insert; none on delete), `snapshot`
//! (when asked for, and on deletion with [`Config::with_snapshot_on_deletion`]), sensitive
//! values `"[FILTERED]"` by the same rules (the configured names, `_crypt` / `_hmac`, marked
//! columns, keys nested in JSON), `created_at` (the row's `created_at` on insert, its
//! `updated_at` on update when they are timestamps, else the statement's time), `actor` and
//! `tags`. A table under capture needs no `tx.audit`: do not do both for one change.
//!
//! - An `UPDATE` that changes nothing, or only ignored columns, journals nothing; a statement
//!   rolled back (or in a rolled-back transaction or savepoint) journals nothing.
//! - An `UPDATE` that changes a row's primary key is journaled as the deletion of the old key
//!   and the insertion of the new one.
//! - `TRUNCATE` journals a deletion for every row, read before they go (a truncated table of a
//!   million rows is a million events).
//! - Actor and tags: in a transaction begun by a [`Journaled`] configured with
//!   [`Config::with_capture_context`], the task-local actor and tags (sent with the `BEGIN`
//!   as transaction-local settings, which PgBouncer in transaction mode keeps). Any other
//!   writer gets the actor `gid://<app>/db/<current_user>` and the tags
//!   `{"application_name": …}`.
//! - Writers other than the application's role need `USAGE` on schema `journaled`, `SELECT` on
//!   `journaled.captures` and `INSERT` on `journaled.jobs`: the triggers run as the writer.
//! - A change whose event is over the record limit fails its statement with an error that
//!   names the table and record, as `journal!` refuses one.
//! - Renaming a captured table keeps its capture; dropping it drops its triggers (its
//!   registration stays until `disable`).
//!
//! SQLite has no statement-level triggers with transition tables: capture is PostgreSQL only,
//! and SQLite applications journal their changes with `tx.audit`.

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, Postgres, Row};
use time::OffsetDateTime;

use crate::{CaptureError, Config, Error, Journaled};

/// What to capture on one table. Build it with [`Capture::table`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    table: String,
    ignore: Vec<String>,
    sensitive: Vec<String>,
    changes_only_to: Option<Vec<String>>,
    snapshot: bool,
    stream: Option<String>,
    priority: Option<i32>,
    class_name: Option<String>,
    app_name: Option<String>,
}

impl Capture {
    /// Capture on `table`: a name as PostgreSQL reads it (`users`, `app.users`, `"Users"`).
    pub fn table(table: impl Into<String>) -> Self {
        Capture {
            table: table.into(),
            ..Capture::default()
        }
    }

    /// Columns whose changes are not journaled, on top of the configured defaults
    /// (`created_at`, `updated_at`; see [`Config::with_default_ignored_columns`]).
    pub fn ignore<I, S>(mut self, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ignore.extend(columns.into_iter().map(Into::into));
        self
    }

    /// Columns whose values are always `"[FILTERED]"`, on top of the names that are sensitive
    /// by configuration ([`Config::with_filter_parameters`]) and `_crypt` / `_hmac` columns.
    pub fn sensitive<I, S>(mut self, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sensitive.extend(columns.into_iter().map(Into::into));
        self
    }

    /// Journals changes to these columns only (still minus the ignored ones): a change to
    /// other columns alone journals nothing. Snapshots keep every column.
    pub fn changes_only_to<I, S>(mut self, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.changes_only_to = Some(columns.into_iter().map(Into::into).collect());
        self
    }

    /// Every event carries a snapshot of the row (after the change; before it on deletion).
    pub fn with_snapshot(mut self) -> Self {
        self.snapshot = true;
        self
    }

    /// The stream (default: the configuration's default stream at the time capture is enabled).
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// The jobs' priority (default: the configuration's default priority).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// The `class_name` of the events (default: the table name in CamelCase without its final
    /// `s`, the inverse of `#[derive(Audited)]`'s default table name: `user_accounts` →
    /// `UserAccount`).
    pub fn class_name(mut self, class_name: impl Into<String>) -> Self {
        self.class_name = Some(class_name.into());
        self
    }

    /// The app in the actor of writes made outside journaled, `gid://<app>/db/<user>`
    /// (default: the configured app name, else [`crate::app_name`]).
    pub fn app_name(mut self, app_name: impl Into<String>) -> Self {
        self.app_name = Some(app_name.into());
        self
    }

    /// The table, as given.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The options `journaled.enable_capture` takes, resolved against `config`: the stream,
    /// priority, sensitive names, default ignored columns, record limit and app name in force
    /// now are stored with the capture.
    pub fn options(&self, config: &Config) -> Result<Value, CaptureError> {
        let stream = self
            .stream
            .clone()
            .or_else(|| config.stream_name.clone())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CaptureError::MissingStreamName {
                table: self.table.clone(),
            })?;
        let valid = stream.len() <= 128
            && stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err(CaptureError::InvalidStreamName {
                table: self.table.clone(),
                stream,
            });
        }
        let app_name = self
            .app_name
            .clone()
            .or_else(|| config.app_name.clone())
            .unwrap_or_else(crate::app_name);
        Ok(json!({
            "class_name": self.class_name.clone().unwrap_or_else(|| class_name_of(&self.table)),
            "stream": stream,
            "priority": self.priority.unwrap_or(config.default_priority),
            "ignore": self.ignore,
            "default_ignore": config.audit_ignored_columns,
            "sensitive": self.sensitive,
            "only": self.changes_only_to,
            "filter_parameters": config.filter_parameters,
            "snapshot": self.snapshot,
            "snapshot_on_deletion": config.snapshot_on_deletion,
            "app_name": app_name,
            "max_record_size": config.max_record_size,
        }))
    }

    /// The SQL that enables this capture, for an application whose migrations are SQL files:
    /// `SELECT journaled.enable_capture('users', '{…}');` (idempotent; run after journaled's
    /// own migrations).
    pub fn enable_sql(&self, config: &Config) -> Result<String, CaptureError> {
        let options = self.options(config)?;
        Ok(format!(
            "SELECT journaled.enable_capture({}, {}::jsonb);",
            literal(&self.table),
            literal(&options.to_string())
        ))
    }
}

/// A standard SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `user_accounts` → `UserAccount`; `app.users` → `User`.
fn class_name_of(table: &str) -> String {
    let name = table.rsplit('.').next().unwrap_or(table).trim_matches('"');
    let singular = match name.strip_suffix('s') {
        Some(stem) if !stem.is_empty() => stem,
        _ => name,
    };
    singular
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// A table under capture, as `journaled.captures` records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CaptureInfo {
    /// The table (schema-qualified unless it is in `public`).
    pub table: String,
    /// The events' `class_name`.
    pub class_name: String,
    /// The stream its events go to.
    pub stream: String,
    /// Its jobs' priority.
    pub priority: i32,
    /// Columns ignored, the configured defaults included.
    pub ignore: Vec<String>,
    /// Columns marked sensitive.
    pub sensitive: Vec<String>,
    /// The only columns whose changes are journaled, if limited.
    pub changes_only_to: Option<Vec<String>>,
    /// Whether every event carries a snapshot.
    pub snapshot: bool,
    /// Whether its triggers are on the table.
    pub installed: bool,
    /// Whether its trigger function was generated for the table's columns as they are (false
    /// after an `ALTER TABLE`: capture still works, more slowly, until it is enabled again).
    pub current: bool,
    /// When it was last enabled.
    #[serde(with = "time::serde::rfc3339")]
    pub enabled_at: OffsetDateTime,
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Maps the errors `journaled.enable_capture` raises (SQLSTATE `JC00x`) to [`CaptureError`].
fn capture_error(table: &str, error: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &error {
        let table = table.to_owned();
        match db.code().as_deref() {
            Some("JC001") => return CaptureError::NoSuchTable { table }.into(),
            Some("JC002") => return CaptureError::NotATable { table }.into(),
            Some("JC003") => return CaptureError::NoPrimaryKey { table }.into(),
            Some("JC004") => {
                let detail = db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .and_then(|e| e.detail())
                    .unwrap_or_default();
                let columns = detail.split(',').map(str::to_owned).collect();
                return CaptureError::UnknownColumns { table, columns }.into();
            }
            // An unknown function or schema: journaled's migrations have not run.
            Some("42883") | Some("3F000") if db.message().contains("journaled") => {
                return Error::NotMigrated;
            }
            _ => {}
        }
    }
    crate::store::db_error(error)
}

/// Enables capture on a table, on `conn` (in its transaction, if one is open): registers it in
/// `journaled.captures` (or updates its options) and (re)creates its trigger function and
/// triggers. Idempotent. Refuses a missing table, a view, a table without a primary key and
/// unknown columns with a [`CaptureError`] naming the table.
#[tracing::instrument(name = "journaled.capture.enable", skip_all, fields(table = %capture.table), err(level = "debug"))]
pub async fn enable(
    conn: &mut PgConnection,
    config: &Config,
    capture: &Capture,
) -> Result<CaptureInfo, Error> {
    let options = capture.options(config)?;
    sqlx::query("SELECT 1 FROM journaled.enable_capture($1, $2::jsonb)")
        .bind(&capture.table)
        .bind(options.to_string())
        .execute(&mut *conn)
        .await
        .map_err(|e| capture_error(&capture.table, e))?;
    let listed = list_where(conn, Some(&capture.table)).await?;
    listed
        .into_iter()
        .next()
        .ok_or_else(|| CaptureError::NoSuchTable {
            table: capture.table.clone(),
        })
        .map_err(Error::from)
}

/// Disables capture on a table, on `conn`: drops its triggers and trigger function and its
/// registration. Returns whether it was under capture; a table that was not is left as it is.
#[tracing::instrument(
    name = "journaled.capture.disable",
    skip_all,
    fields(table),
    err(level = "debug")
)]
pub async fn disable(conn: &mut PgConnection, table: &str) -> Result<bool, Error> {
    tracing::Span::current().record("table", table);
    sqlx::query_scalar("SELECT journaled.disable_capture($1)")
        .bind(table)
        .fetch_one(conn)
        .await
        .map_err(|e| capture_error(table, e))
}

/// Every table under capture, by schema and name.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<CaptureInfo>, Error> {
    list_where(conn, None).await
}

async fn list_where(
    conn: &mut PgConnection,
    table: Option<&str>,
) -> Result<Vec<CaptureInfo>, Error> {
    let rows = sqlx::query(
        "SELECT c.table_schema, c.table_name, c.class_name, c.stream, c.priority, c.options::text AS options, c.enabled_at, \
                t.tgfoid IS NOT NULL AS installed, \
                coalesce(position(quote_literal(journaled.capture_signature(c.relid)) IN p.prosrc) > 0 \
                         AND position(format('TG_TABLE_NAME <> %L OR TG_TABLE_SCHEMA <> %L', r.relname, ns.nspname) IN p.prosrc) > 0 \
                         AND position(quote_literal(c.options::text) IN p.prosrc) > 0, false) AS current \
         FROM journaled.captures c \
         LEFT JOIN pg_trigger t ON t.tgrelid = c.relid AND t.tgname = 'journaled_capture_update' \
         LEFT JOIN pg_proc p ON p.oid = t.tgfoid \
         LEFT JOIN pg_class r ON r.oid = c.relid \
         LEFT JOIN pg_namespace ns ON ns.oid = r.relnamespace \
         WHERE $1::text IS NULL OR c.relid = to_regclass($1) \
         ORDER BY c.table_schema, c.table_name",
    )
    .bind(table)
    .fetch_all(conn)
    .await
    .map_err(crate::store::db_error)?;
    rows.iter()
        .map(|row| {
            let schema: String = row.try_get("table_schema")?;
            let name: String = row.try_get("table_name")?;
            let options: String = row.try_get("options")?;
            let options: Value = serde_json::from_str(&options).unwrap_or_default();
            let mut ignore = strings(options.get("ignore"));
            ignore.extend(strings(options.get("default_ignore")));
            Ok(CaptureInfo {
                table: if schema == "public" {
                    name
                } else {
                    format!("{schema}.{name}")
                },
                class_name: row.try_get("class_name")?,
                stream: row.try_get("stream")?,
                priority: row.try_get("priority")?,
                ignore,
                sensitive: strings(options.get("sensitive")),
                changes_only_to: options
                    .get("only")
                    .filter(|v| v.is_array())
                    .map(|v| strings(Some(v))),
                snapshot: options
                    .get("snapshot")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                installed: row.try_get("installed")?,
                current: row.try_get("current")?,
                enabled_at: row.try_get("enabled_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

impl Journaled<Postgres> {
    /// Enables capture on a table with this `Journaled`'s configuration (default stream,
    /// priority, sensitive names, ignored columns), on a pooled connection. See [`enable`].
    pub async fn enable_capture(&self, capture: &Capture) -> Result<CaptureInfo, Error> {
        let mut conn = self.pool().acquire().await?;
        enable(&mut conn, self.config(), capture).await
    }

    /// Enables capture within the application's own transaction or migration, on `conn`.
    pub async fn enable_capture_on(
        &self,
        conn: &mut PgConnection,
        capture: &Capture,
    ) -> Result<CaptureInfo, Error> {
        enable(conn, self.config(), capture).await
    }

    /// Disables capture on a table; returns whether it was under capture. See [`disable`].
    pub async fn disable_capture(&self, table: &str) -> Result<bool, Error> {
        let mut conn = self.pool().acquire().await?;
        disable(&mut conn, table).await
    }

    /// Disables capture within the application's own transaction or migration, on `conn`.
    pub async fn disable_capture_on(
        &self,
        conn: &mut PgConnection,
        table: &str,
    ) -> Result<bool, Error> {
        disable(conn, table).await
    }

    /// Every table under capture.
    pub async fn captures(&self) -> Result<Vec<CaptureInfo>, Error> {
        let mut conn = self.pool().acquire().await?;
        list(&mut conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_invert_the_derived_table_names() {
        assert_eq!(class_name_of("users"), "User");
        assert_eq!(class_name_of("user_accounts"), "UserAccount");
        assert_eq!(class_name_of("app.users"), "User");
        assert_eq!(class_name_of("\"Users\""), "User");
        assert_eq!(class_name_of("s"), "S");
        assert_eq!(class_name_of("news"), "New");
    }

    #[test]
    fn options_need_a_valid_stream() {
        let config = Config::default();
        assert_eq!(
            Capture::table("users").options(&config),
            Err(CaptureError::MissingStreamName {
                table: "users".into()
            })
        );
        let err = Capture::table("users")
            .stream("bad name")
            .options(&config)
            .unwrap_err();
        assert!(err.to_string().contains("`bad name`"), "{err}");
        let options = Capture::table("users")
            .options(&config.with_stream_name("events").with_default_priority(5))
            .unwrap();
        assert_eq!(options["stream"], "events");
        assert_eq!(options["priority"], 5);
        assert_eq!(options["class_name"], "User");
        assert_eq!(options["only"], Value::Null);
    }

    #[test]
    fn enable_sql_quotes_its_literals() {
        let sql = Capture::table("o'brien")
            .stream("s")
            .enable_sql(&Config::default())
            .unwrap();
        assert!(
            sql.starts_with("SELECT journaled.enable_capture('o''brien', '{"),
            "{sql}"
        );
    }
}
