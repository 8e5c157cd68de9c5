//! The library's error type.

use std::path::PathBuf;

/// One way an event failed its JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The schema that refused it: `base_event`, `tagged_event` or the event type.
    pub schema: String,
    /// JSON pointer into the event (`""` is the whole event).
    pub pointer: String,
    /// What was wrong at that place.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pointer = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "{pointer}: {} ({} schema)", self.message, self.schema)
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn paths(items: &[PathBuf]) -> String {
    items
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Errors of the context helpers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContextError {
    /// `tag!` was called outside any `tagged`/`scope`/`with_actor` scope, so there was nowhere to keep the tags.
    #[error(
        "tag! called outside a journaled scope: wrap the work in journaled::scope(..) or journaled::tagged(..)"
    )]
    NoScope,
    /// `commit_hash()` was called but `GIT_COMMIT` is not set.
    #[error("GIT_COMMIT is not set: set it to the deployed commit to use journaled::commit_hash()")]
    GitCommitUnset,
}

/// What `journal!` can refuse: bad input, found before anything is staged or written, so the
/// transaction is left as it was. Each error names the event type and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The event does not match its schemas; every failing place is listed.
    #[error("event `{event_type}` does not match its schema: {}", list(.violations))]
    SchemaViolation {
        /// The event type.
        event_type: String,
        /// Each failing JSON pointer with its reason.
        violations: Vec<Violation>,
    },
    /// No schema file was found for the event type.
    #[error("no schema for event `{event_type}`: looked for {}", paths(.searched))]
    SchemaNotFound {
        /// The event type.
        event_type: String,
        /// Every path that was tried, in order.
        searched: Vec<PathBuf>,
    },
    /// A schema file exists but is not valid JSON or not a valid JSON Schema.
    #[error("schema for `{event_type}` at {path} is invalid: {message}")]
    InvalidSchema {
        /// The event type (or file stem) the schema is for.
        event_type: String,
        /// Where the schema was read from (`<built-in>` for the crate's own).
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Neither the event nor the configuration names a stream.
    #[error(
        "event `{event_type}` has no stream name: set JOURNALED_STREAM_NAME, Config::with_stream_name, or #[journaled(stream = ..)]"
    )]
    MissingStreamName {
        /// The event type.
        event_type: String,
    },
    /// The stream name is not a valid Kinesis stream name.
    #[error(
        "event `{event_type}` has an invalid stream name `{stream}`: use 1 to 128 of a-z, A-Z, 0-9, _ . -"
    )]
    InvalidStreamName {
        /// The event type.
        event_type: String,
        /// The refused name.
        stream: String,
    },
    /// The delay or run-at time cannot be represented.
    #[error("event `{event_type}` has an invalid run-at time: {reason}")]
    InvalidRunAt {
        /// The event type.
        event_type: String,
        /// Why it was refused.
        reason: String,
    },
    /// The partition key is empty or longer than 256 UTF-16 code units (as Kinesis counts).
    #[error("event `{event_type}` has an invalid partition key: {reason}")]
    InvalidPartitionKey {
        /// The event type.
        event_type: String,
        /// Why it was refused.
        reason: String,
    },
    /// The serialized record (data plus partition key) is over the Kinesis record limit.
    #[error(
        "event `{event_type}` is {size} bytes with its partition key, over the {limit}-byte record limit"
    )]
    RecordTooLarge {
        /// The event type.
        event_type: String,
        /// Data plus partition key, in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Staging the event would bring the transaction's staged records over the configured
    /// bound (`Config::with_max_transaction_bytes`).
    #[error(
        "event `{event_type}` would bring the transaction's staged events to {total} bytes, over the {limit}-byte limit (Config::with_max_transaction_bytes, JOURNALED_MAX_TRANSACTION_BYTES): commit in smaller transactions"
    )]
    TransactionTooLarge {
        /// The event type.
        event_type: String,
        /// The staged bytes with this event.
        total: usize,
        /// The configured bound.
        limit: usize,
    },
    /// An attribute is a NaN or an infinite number, which JSON cannot represent (serde_json
    /// would silently publish `null`).
    #[error(
        "event `{event_type}` has a NaN or infinite number at {pointer}: JSON cannot represent it (it would be published as null)"
    )]
    NonFiniteNumber {
        /// The event type.
        event_type: String,
        /// JSON pointer to the number.
        pointer: String,
    },
    /// The event nests objects and arrays deeper than the limit.
    #[error(
        "event `{event_type}` nests objects and arrays more than {limit} levels deep (at {pointer})"
    )]
    NestingTooDeep {
        /// The event type.
        event_type: String,
        /// The deepest nesting allowed, the event itself being the first level.
        limit: usize,
        /// JSON pointer to where the limit was passed.
        pointer: String,
    },
    /// The event's attributes use a name the envelope owns.
    #[error("event `{event_type}` has an attribute named `{name}`, which the envelope owns")]
    ReservedAttribute {
        /// The event type.
        event_type: String,
        /// The clashing attribute.
        name: String,
    },
    /// The event did not serialize to a JSON object.
    #[error("event `{event_type}` could not be serialized to a JSON object: {message}")]
    Serialization {
        /// The event type.
        event_type: String,
        /// What serde said, or what it produced instead of an object.
        message: String,
    },
}

/// Why capture could not be enabled on a table (see `journaled::capture`). Each names the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureError {
    /// Capture needs PostgreSQL (statement-level triggers with transition tables).
    #[error(
        "capture is PostgreSQL only: SQLite has no statement-level triggers with transition tables; journal SQLite changes with tx.audit"
    )]
    PostgresOnly,
    /// There is no table of that name (in the search path, when unqualified).
    #[error("capture: there is no table {table}")]
    NoSuchTable {
        /// The name asked for.
        table: String,
    },
    /// The name is a view, a sequence or another relation that is not a table.
    #[error("capture: {table} is not a table (only tables can be captured)")]
    NotATable {
        /// The relation.
        table: String,
    },
    /// The table has no primary key, so its changes would have no record id.
    #[error("capture: table {table} has no primary key, so its changes have no record id")]
    NoPrimaryKey {
        /// The table.
        table: String,
    },
    /// Columns named in `ignore`, `sensitive` or `changes_only_to` are not the table's.
    #[error("capture: table {table} has no column {}", .columns.join(", "))]
    UnknownColumns {
        /// The table.
        table: String,
        /// The names it does not have.
        columns: Vec<String>,
    },
    /// Neither the capture nor the configuration names a stream.
    #[error(
        "capture: table {table} has no stream: pass --stream (Capture::stream) or set JOURNALED_STREAM_NAME"
    )]
    MissingStreamName {
        /// The table.
        table: String,
    },
    /// The stream name is not a valid Kinesis stream name.
    #[error(
        "capture: table {table} has an invalid stream name `{stream}`: use 1 to 128 of a-z, A-Z, 0-9, _ . -"
    )]
    InvalidStreamName {
        /// The table.
        table: String,
        /// The refused name.
        stream: String,
    },
}

/// Everything that can go wrong in `journaled`'s operations: the database, migrations,
/// configuration, and (through [`Error::Journal`]) refused input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An event was refused (see [`JournalError`]).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A configuration value is missing or malformed.
    #[error("configuration: {0}")]
    Config(String),
    /// A task-local context operation failed (no scope, `GIT_COMMIT` unset).
    #[error(transparent)]
    Context(#[from] ContextError),
    /// journaled's tables are not in the database yet.
    #[error(
        "journaled's tables are missing from this database: run `journaled migrate` (or journaled::migrate(&pool)) first"
    )]
    NotMigrated,
    /// A migration could not be applied, or an applied one was changed.
    #[error("migration: {0}")]
    Migration(String),
    /// Capture could not be enabled on a table (see [`CaptureError`]).
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A job row could not be decoded.
    #[error("job {job_id} is corrupt: {message}")]
    CorruptJob {
        /// The job's id.
        job_id: i64,
        /// What could not be decoded.
        message: String,
    },
    /// A draining worker stopped with jobs that fell due still undelivered, held back by a
    /// failure that is not going away by itself (a configuration error, or the service
    /// unavailable for longer than the configuration backoff).
    #[error("the drain left {jobs} due jobs undelivered: {reason}")]
    Undelivered {
        /// Pending jobs past their first due time.
        jobs: i64,
        /// What holds them back.
        reason: String,
    },
    /// `journaled retry --key` / `skip --key` named a key that is not parked (and, for
    /// `skip`, has no record waiting behind a missing sequence).
    #[error(
        "{stream}/{partition_key} is not parked, and none of its records waits for a missing sequence (see `journaled status`)"
    )]
    NotParked {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
    },
    /// `journaled retry --key` found no dead job holding the parked record: a worker is still
    /// settling it (try again), or it is gone (use `skip --key`).
    #[error(
        "{stream}/{partition_key}: no dead job holds its refused record {event_id} yet (a worker may still be settling it: try again in a moment; if it is gone, `journaled skip --key`)"
    )]
    RecordNotDead {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
        /// The refused event.
        event_id: String,
    },
    /// `journaled retry --key` on a key parked on a sequence that no job holds (its job was
    /// deleted): there is nothing to send again.
    #[error(
        "{stream}/{partition_key} is parked on sequence {sequence}, which no readable job holds: there is nothing to send again; `journaled skip --key` moves the key past it"
    )]
    RecordGone {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
        /// The missing sequence.
        sequence: i64,
    },
    /// `journaled skip --key` on a key parked on a record that a live job holds again (its
    /// dead job was retried): skipping it would count it as delivered, unsent.
    #[error(
        "{stream}/{partition_key} is parked on sequence {sequence}, which is in live job {job} again: `journaled retry --key` unparks the key so that it is sent; nothing to skip"
    )]
    ParkedRecordLive {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
        /// The parked sequence.
        sequence: i64,
        /// The live job holding it.
        job: i64,
    },
    /// `journaled skip --key` on a key that is not parked: the sequence its records wait for
    /// is in a live job, so it will be delivered (or park the key); nothing is skipped.
    #[error(
        "{stream}/{partition_key} is not parked and its next sequence {sequence} is in live job {job}: it will be delivered, or park the key if refused; nothing to skip"
    )]
    SequenceLive {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
        /// The sequence the key's later records wait for.
        sequence: i64,
        /// The job holding it.
        job: i64,
    },
    /// `journaled skip --key`: the key was delivered to or parked while it was being skipped;
    /// nothing changed.
    #[error(
        "{stream}/{partition_key} moved while it was being skipped (a worker delivered or parked it); nothing changed: see `journaled status` and run it again"
    )]
    KeyMoved {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
    },
    /// `journaled skip --key`: a live job that mentions the key cannot be read, so whether it
    /// holds the missing sequence is unknown until a worker marks it dead.
    #[error(
        "{stream}/{partition_key}: live job {job} mentions the key but cannot be read; once a worker has marked it dead (`journaled status`), run it again"
    )]
    UnsettledJob {
        /// The stream.
        stream: String,
        /// The partition key.
        partition_key: String,
        /// The unreadable live job.
        job: i64,
    },
    /// The database returned an error.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
