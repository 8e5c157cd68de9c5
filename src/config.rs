//! Configuration: environment first, then code.

use std::path::PathBuf;

use crate::Error;

/// Kinesis' default maximum record size (data plus partition key).
pub const DEFAULT_MAX_RECORD_SIZE: usize = 1024 * 1024;
/// Sensitive names filtered by default: Rails' default `filter_parameters`.
pub const DEFAULT_FILTER_PARAMETERS: &[&str] = &[
    "passw",
    "secret",
    "token",
    "_key",
    "crypt",
    "salt",
    "certificate",
    "otp",
    "ssn",
    "cvv",
    "cvc",
];

/// The columns every audited type ignores unless configured otherwise.
pub const DEFAULT_IGNORED_COLUMNS: &[&str] = &["created_at", "updated_at"];

/// How long commits are gathered into one notification to other processes' workers.
pub const DEFAULT_NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// The default bound on the bytes a transaction may stage (256 MiB): far above any sensible
/// transaction, well below what would exhaust the application's memory or PostgreSQL's 1 GB
/// message limit at COMMIT.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 256 * 1024 * 1024;

/// The default job priority (lower runs first), as in the reference gem.
pub const DEFAULT_PRIORITY: i32 = 20;

/// How events are journaled. Build it with [`Config::from_env`] and adjust with the `with_*` methods.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) stream_name: Option<String>,
    pub(crate) app_name: Option<String>,
    pub(crate) schema_roots: Vec<PathBuf>,
    pub(crate) default_priority: i32,
    pub(crate) enabled: bool,
    pub(crate) max_record_size: usize,
    pub(crate) max_transaction_bytes: usize,
    pub(crate) filter_parameters: Vec<String>,
    pub(crate) audit_ignored_columns: Vec<String>,
    pub(crate) snapshot_on_deletion: bool,
    pub(crate) notify: bool,
    pub(crate) notify_interval: std::time::Duration,
    pub(crate) capture_context: bool,
    pub(crate) ordered_streams: Vec<String>,
}

impl Default for Config {
    /// No stream, no app name, `./journaled_schemas`, priority 20, enabled, 1 MiB records.
    fn default() -> Self {
        Config {
            stream_name: None,
            app_name: None,
            schema_roots: vec![PathBuf::from("journaled_schemas")],
            default_priority: DEFAULT_PRIORITY,
            enabled: true,
            max_record_size: DEFAULT_MAX_RECORD_SIZE,
            max_transaction_bytes: DEFAULT_MAX_TRANSACTION_BYTES,
            filter_parameters: DEFAULT_FILTER_PARAMETERS
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
            audit_ignored_columns: DEFAULT_IGNORED_COLUMNS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            snapshot_on_deletion: false,
            notify: true,
            notify_interval: DEFAULT_NOTIFY_INTERVAL,
            capture_context: false,
            ordered_streams: Vec::new(),
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Parses a boolean the way operators write them; `None` when it is not one.
pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl Config {
    /// Delivers every event of `stream` in commit order per partition key, as if each event
    /// type were `#[journaled(ordered)]` (see the README's "Ordering" section).
    pub fn with_ordered_stream(mut self, stream: impl Into<String>) -> Self {
        self.ordered_streams.push(stream.into());
        self
    }

    /// Whether events of `stream` are ordered whatever their type.
    pub(crate) fn is_ordered_stream(&self, stream: &str) -> bool {
        self.ordered_streams.iter().any(|s| s == stream)
    }

    /// Reads `JOURNALED_STREAM_NAME`, `JOURNALED_APP_NAME`, `JOURNALED_SCHEMA_PATH` (a
    /// `:`-separated list of folders, first match wins), `JOURNALED_JOB_PRIORITY` and
    /// `JOURNALED_ENABLED`, `JOURNALED_FILTER_PARAMETERS` (comma-separated sensitive names),
    /// `JOURNALED_MAX_TRANSACTION_BYTES`, `JOURNALED_NOTIFY`, `JOURNALED_NOTIFY_INTERVAL_MS` and
    /// `JOURNALED_CAPTURE_CONTEXT`.
    /// A malformed value is an error that names the variable.
    pub fn from_env() -> Result<Config, Error> {
        let mut config = Config {
            stream_name: var("JOURNALED_STREAM_NAME"),
            app_name: var("JOURNALED_APP_NAME"),
            ..Config::default()
        };
        if let Some(path) = var("JOURNALED_SCHEMA_PATH") {
            config.schema_roots = std::env::split_paths(&path).collect();
        }
        if let Some(priority) = var("JOURNALED_JOB_PRIORITY") {
            config.default_priority = priority.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "JOURNALED_JOB_PRIORITY must be an integer, got `{priority}`"
                ))
            })?;
        }
        if let Some(names) = var("JOURNALED_FILTER_PARAMETERS") {
            config.filter_parameters.extend(
                names
                    .split(',')
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect::<Vec<_>>(),
            );
        }
        if let Some(notify) = var("JOURNALED_NOTIFY") {
            config.notify = parse_bool(&notify).ok_or_else(|| {
                Error::Config(format!(
                    "JOURNALED_NOTIFY must be true or false, got `{notify}`"
                ))
            })?;
        }
        if let Some(ms) = var("JOURNALED_NOTIFY_INTERVAL_MS") {
            let parsed: u64 = ms.trim().parse().ok().filter(|ms| (1..=60_000).contains(ms)).ok_or_else(|| {
                Error::Config(format!(
                    "JOURNALED_NOTIFY_INTERVAL_MS must be a whole number of milliseconds from 1 to 60000, got `{ms}`"
                ))
            })?;
            config.notify_interval = std::time::Duration::from_millis(parsed);
        }
        if let Some(bytes) = var("JOURNALED_MAX_TRANSACTION_BYTES") {
            config.max_transaction_bytes = bytes.trim().parse().ok().filter(|b| *b > 0).ok_or_else(|| {
                Error::Config(format!(
                    "JOURNALED_MAX_TRANSACTION_BYTES must be a positive whole number of bytes, got `{bytes}`"
                ))
            })?;
        }
        if let Some(capture) = var("JOURNALED_CAPTURE_CONTEXT") {
            config.capture_context = parse_bool(&capture).ok_or_else(|| {
                Error::Config(format!(
                    "JOURNALED_CAPTURE_CONTEXT must be true or false, got `{capture}`"
                ))
            })?;
        }
        if let Some(enabled) = var("JOURNALED_ENABLED") {
            config.enabled = parse_bool(&enabled).ok_or_else(|| {
                Error::Config(format!(
                    "JOURNALED_ENABLED must be true or false, got `{enabled}`"
                ))
            })?;
        }
        Ok(config)
    }

    /// The stream used by events that do not name their own.
    pub fn with_stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream_name = Some(name.into());
        self
    }

    /// The application's name, used in actor fallbacks (`gid://<app>`); overrides
    /// `JOURNALED_APP_NAME`. Process-wide: the first `Journaled` built with one sets it.
    pub fn with_app_name(mut self, name: impl Into<String>) -> Self {
        self.app_name = Some(name.into());
        self
    }

    /// Replaces the schema search path (the crate's built-in schemas always come first).
    pub fn with_schema_roots<I, P>(mut self, roots: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.schema_roots = roots.into_iter().map(Into::into).collect();
        self
    }

    /// The priority of events that do not set their own (lower runs first; default 20).
    pub fn with_default_priority(mut self, priority: i32) -> Self {
        self.default_priority = priority;
        self
    }

    /// When disabled, events are still validated but nothing is written.
    pub fn with_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The largest record (data plus partition key) accepted; Kinesis' default is 1 MiB.
    pub fn with_max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// The most bytes of records one transaction may stage (default 256 MiB): the event that
    /// would go over is refused at `journal!` with [`JournalError::TransactionTooLarge`](crate::JournalError::TransactionTooLarge),
    /// so a runaway transaction neither exhausts memory nor fails at COMMIT.
    pub fn with_max_transaction_bytes(mut self, bytes: usize) -> Self {
        self.max_transaction_bytes = bytes;
        self
    }

    /// Sensitive names: a column (or nested key) containing one, case-insensitively, is filtered
    /// in audit events, like Rails' `filter_parameters`. Adds to the defaults
    /// ([`DEFAULT_FILTER_PARAMETERS`]) and to `JOURNALED_FILTER_PARAMETERS`.
    pub fn with_filter_parameters<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.filter_parameters
            .extend(names.into_iter().map(Into::into));
        self
    }

    /// Replaces the whole list of sensitive names, defaults included. An empty list filters
    /// only `_crypt`/`_hmac` columns and the columns types mark sensitive.
    pub fn with_only_filter_parameters<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.filter_parameters = names.into_iter().map(Into::into).collect();
        self
    }

    /// Replaces the columns every audited type ignores (default `created_at`, `updated_at`).
    pub fn with_default_ignored_columns<I, S>(mut self, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.audit_ignored_columns = columns.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a snapshot to every deletion's audit log event.
    pub fn with_snapshot_on_deletion(mut self, enabled: bool) -> Self {
        self.snapshot_on_deletion = enabled;
        self
    }

    /// Whether commits notify workers in other processes (PostgreSQL: a `NOTIFY` sent after
    /// the commit, on its own connection, at most once per [`notify interval`](Self::with_notify_interval)).
    /// Off: those workers find jobs by polling. Workers in the same process are always woken.
    pub fn with_notify(mut self, enabled: bool) -> Self {
        self.notify = enabled;
        self
    }

    /// How long commits are gathered into one notification (default 5 ms): the added wake-up
    /// latency for workers in other processes, and at most one `NOTIFY` per interval per process.
    pub fn with_notify_interval(mut self, interval: std::time::Duration) -> Self {
        self.notify_interval = interval.max(std::time::Duration::from_millis(1));
        self
    }

    /// Whether the transactions this `Journaled` begins tell the database who acts (PostgreSQL):
    /// the task-local actor and tags become the transaction-local settings `journaled.actor`
    /// and `journaled.tags`, which capture triggers (see `journaled::capture`) put in their
    /// events. They are sent with the `BEGIN`, in the same round trip, so it costs no extra
    /// round trip; off by default, because only applications with captured tables need it.
    /// Ignored on SQLite.
    pub fn with_capture_context(mut self, enabled: bool) -> Self {
        self.capture_context = enabled;
        self
    }

    /// The default stream name, if any.
    pub fn stream_name(&self) -> Option<&str> {
        self.stream_name.as_deref()
    }

    /// The default job priority (lower runs first).
    pub fn default_priority(&self) -> i32 {
        self.default_priority
    }

    /// The schema search path, in order, after the built-in schemas.
    pub fn schema_roots(&self) -> &[PathBuf] {
        &self.schema_roots
    }
}
