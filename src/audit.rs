//! Change journaling (`journaled_change`) and audit logs (`journaled_audit_log_event`) from
//! plain Rust structs: no ORM, emitted in the same transaction as the write.
//!
//! ```no_run
//! use journaled::audit::{Audited, Change};
//!
//! #[derive(serde::Serialize, journaled::Audited)]
//! #[audited(table = "users", ignore = ["last_seen_at"], sensitive = ["ssn"])]
//! #[journal_changes_to(email, first_name, as = "identity_change")]
//! struct User {
//!     id: i64,
//!     email: String,
//!     first_name: String,
//!     ssn: Option<String>,
//!     last_seen_at: Option<String>,
//! }
//!
//! # async fn f(journaled: journaled::Journaled<sqlx::Postgres>, before: User, after: User) -> Result<(), journaled::Error> {
//! let mut tx = journaled.begin().await?;
//! // UPDATE users SET … (the application's own write)
//! tx.audit(Change::update(&before, &after))?;   // audit log + identity_change, if anything changed
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! What is captured — actor, tags, `created_at` — is captured when the change is journaled,
//! never when the job runs.

use std::borrow::Cow;
use std::future::Future;

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::event::{self, Event, Prepared};
use crate::{Config, Error, JournalError, context, schema::SchemaRegistry};

/// The value that replaces a sensitive one.
pub const FILTERED: &str = "[FILTERED]";

pub use crate::config::DEFAULT_IGNORED_COLUMNS;

/// One `#[journal_changes_to(...)]` declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeDeclaration {
    /// The logical operation, e.g. `identity_change`.
    pub logical_operation: &'static str,
    /// The watched attributes.
    pub attributes: &'static [&'static str],
    /// Whether its events carry the task-local tags.
    pub tagged: bool,
}

/// A record type whose changes are journaled. Usually derived with `#[derive(Audited)]`; its
/// serde fields are the columns.
pub trait Audited: Serialize {
    /// The class name in audit log events (default: the type name).
    const CLASS_NAME: &'static str;
    /// The table name (default: the snake_case type name plus `s`).
    const TABLE_NAME: &'static str;
    /// Columns this type ignores in audit logs, on top of the configured defaults.
    const IGNORED_COLUMNS: &'static [&'static str] = &[];
    /// Columns whose values are always filtered.
    const SENSITIVE_COLUMNS: &'static [&'static str] = &[];
    /// Whether this type emits audit log events (`skip_audit_log` turns them off).
    const AUDIT_LOG: bool = true;
    /// Its change-journaling declarations.
    const CHANGES: &'static [ChangeDeclaration] = &[];

    /// The record's primary key, as a string.
    fn record_id(&self) -> String;

    /// The stream for this type's events; `None` is the configured default.
    fn audit_stream(&self) -> Option<Cow<'_, str>> {
        None
    }

    /// The priority of this type's events; `None` is the configured default.
    fn audit_priority(&self) -> Option<i32> {
        None
    }
}

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// It was created.
    Insert,
    /// It was changed.
    Update,
    /// It was deleted.
    Delete,
}

/// A change to journal: build it with [`Change::insert`], [`Change::update`] or
/// [`Change::delete`], and pass it to [`crate::Transaction::audit`].
#[derive(Debug)]
pub struct Change<'a, R> {
    operation: Operation,
    before: Option<&'a R>,
    after: Option<&'a R>,
    snapshot: bool,
}

impl<'a, R: Audited> Change<'a, R> {
    /// A record was inserted.
    pub fn insert(record: &'a R) -> Self {
        Change {
            operation: Operation::Insert,
            before: None,
            after: Some(record),
            snapshot: false,
        }
    }

    /// A record changed from `before` to `after`.
    pub fn update(before: &'a R, after: &'a R) -> Self {
        Change {
            operation: Operation::Update,
            before: Some(before),
            after: Some(after),
            snapshot: false,
        }
    }

    /// A record was deleted.
    pub fn delete(record: &'a R) -> Self {
        Change {
            operation: Operation::Delete,
            before: Some(record),
            after: None,
            snapshot: false,
        }
    }

    /// Adds a snapshot of all the record's columns to the audit log event (the reference's
    /// `_log_snapshot: true`).
    pub fn with_snapshot(mut self) -> Self {
        self.snapshot = true;
        self
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct AuditScope {
    snapshots: bool,
    disabled: bool,
}

tokio::task_local! {
    static AUDIT: AuditScope;
}

fn audit_scope() -> AuditScope {
    AUDIT.try_with(|scope| *scope).unwrap_or_default()
}

/// Every audit log event emitted inside `fut` carries a snapshot.
pub async fn with_snapshots<F: Future>(fut: F) -> F::Output {
    let scope = AuditScope {
        snapshots: true,
        ..audit_scope()
    };
    AUDIT.scope(scope, fut).await
}

/// No audit log events are emitted inside `fut` (change journaling still is).
pub async fn without_audit_logging<F: Future>(fut: F) -> F::Output {
    let scope = AuditScope {
        disabled: true,
        ..audit_scope()
    };
    AUDIT.scope(scope, fut).await
}

/// Whether `column` is sensitive: it contains one of the configured names (case-insensitive,
/// as Rails' `filter_parameters` matches), ends in `_crypt` or `_hmac`, or the type marks it.
pub fn is_sensitive(column: &str, filter_parameters: &[String], marked: &[&str]) -> bool {
    let lower = column.to_ascii_lowercase();
    lower.ends_with("_crypt")
        || lower.ends_with("_hmac")
        || marked.iter().any(|m| m.eq_ignore_ascii_case(column))
        || filter_parameters
            .iter()
            .any(|name| !name.is_empty() && lower.contains(&name.to_ascii_lowercase()))
}

fn filtered(value: &Value) -> Value {
    if value.is_null() {
        Value::Null
    } else {
        Value::String(FILTERED.to_owned())
    }
}

struct Columns<'c> {
    config: &'c Config,
    marked: &'static [&'static str],
}

impl Columns<'_> {
    /// The value to publish for `column`: filtered when the column is sensitive, and otherwise
    /// with every sensitive key of nested objects filtered too (as `filter_parameters` does).
    fn value(&self, column: &str, value: &Value) -> Value {
        if is_sensitive(column, &self.config.filter_parameters, self.marked) {
            filtered(value)
        } else {
            self.nested(value)
        }
    }

    fn nested(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let v = if is_sensitive(k, &self.config.filter_parameters, &[]) {
                            filtered(v)
                        } else {
                            self.nested(v)
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.nested(v)).collect()),
            other => other.clone(),
        }
    }

    fn snapshot(&self, record: &Map<String, Value>) -> Map<String, Value> {
        record
            .iter()
            .map(|(k, v)| (k.clone(), self.value(k, v)))
            .collect()
    }
}

fn columns<R: Audited>(type_name: &str, record: &R) -> Result<Map<String, Value>, JournalError> {
    event::refuse_unrepresentable(type_name, record)?;
    match serde_json::to_value(record) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JournalError::Serialization {
            event_type: type_name.to_owned(),
            message: format!(
                "{} did not serialize to an object of columns",
                R::CLASS_NAME
            ),
        }),
        Err(e) => Err(JournalError::Serialization {
            event_type: type_name.to_owned(),
            message: e.to_string(),
        }),
    }
}

fn timestamp(record: Option<&Map<String, Value>>, column: &str) -> Option<OffsetDateTime> {
    let text = record?.get(column)?.as_str()?;
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

#[derive(Serialize)]
struct AuditLogEvent {
    class_name: &'static str,
    table_name: &'static str,
    record_id: String,
    database_operation: &'static str,
    changes: Map<String, Value>,
    snapshot: Option<Map<String, Value>>,
    actor: String,
    #[serde(skip)]
    at: OffsetDateTime,
    #[serde(skip)]
    stream: Option<String>,
    #[serde(skip)]
    priority: Option<i32>,
}

impl Event for AuditLogEvent {
    const EVENT_TYPE: &'static str = "journaled_audit_log_event";
    const TAGGED: bool = true;

    fn created_at(&self) -> Option<OffsetDateTime> {
        Some(self.at)
    }
    fn stream_name(&self) -> Option<Cow<'_, str>> {
        self.stream.as_deref().map(Cow::Borrowed)
    }
    fn priority(&self) -> Option<i32> {
        self.priority
    }
}

#[derive(Serialize)]
struct ChangeEvent<const TAGGED: bool> {
    table_name: &'static str,
    record_id: String,
    database_operation: &'static str,
    logical_operation: &'static str,
    /// A JSON object serialized as a string, as the reference does.
    changes: String,
    actor: String,
    #[serde(skip)]
    at: OffsetDateTime,
    #[serde(skip)]
    stream: Option<String>,
    #[serde(skip)]
    priority: Option<i32>,
}

impl<const T: bool> Event for ChangeEvent<T> {
    const EVENT_TYPE: &'static str = "journaled_change";
    const TAGGED: bool = T;

    fn created_at(&self) -> Option<OffsetDateTime> {
        Some(self.at)
    }
    fn stream_name(&self) -> Option<Cow<'_, str>> {
        self.stream.as_deref().map(Cow::Borrowed)
    }
    fn priority(&self) -> Option<i32> {
        self.priority
    }
}

/// Builds, validates and serializes every event a change emits; nothing is staged unless all
/// of them succeed.
static NULL: Value = Value::Null;

pub(crate) fn prepare<R: Audited>(
    change: &Change<'_, R>,
    config: &Config,
    schemas: &SchemaRegistry,
) -> Result<Vec<Prepared>, JournalError> {
    let type_name = R::CLASS_NAME;
    let before = change.before.map(|r| columns(type_name, r)).transpose()?;
    let after = change.after.map(|r| columns(type_name, r)).transpose()?;
    let record = change
        .after
        .or(change.before)
        .expect("a change has a record");
    let record_id = record.record_id();
    let stream = record.audit_stream().map(Cow::into_owned);
    let priority = record.audit_priority();
    let actor = context::actor_uri();
    let now = OffsetDateTime::now_utc();
    let cols = Columns {
        config,
        marked: R::SENSITIVE_COLUMNS,
    };
    let mut prepared = Vec::new();

    let scope = audit_scope();
    if R::AUDIT_LOG && !scope.disabled {
        let ignored = |column: &str| {
            config.audit_ignored_columns.iter().any(|c| c == column)
                || R::IGNORED_COLUMNS.contains(&column)
        };
        let mut changes = Map::new();
        let (operation, at, snapshot_source) = match change.operation {
            Operation::Insert => {
                let after = after.as_ref().expect("insert has a record");
                for (column, value) in after {
                    if !ignored(column) && !value.is_null() {
                        changes.insert(
                            column.clone(),
                            Value::Array(vec![Value::Null, cols.value(column, value)]),
                        );
                    }
                }
                ("insert", timestamp(Some(after), "created_at"), Some(after))
            }
            Operation::Update => {
                let (before, after) = (
                    before.as_ref().expect("before"),
                    after.as_ref().expect("after"),
                );
                // Every column on either side: one that disappears from the serialized
                // record (`skip_serializing_if`, Some → None) changed to null.
                let gone = before.keys().filter(|c| !after.contains_key(*c));
                for column in after.keys().chain(gone) {
                    let old = before.get(column).unwrap_or(&Value::Null);
                    let new = after.get(column).unwrap_or(&Value::Null);
                    if !ignored(column) && old != new {
                        changes.insert(
                            column.clone(),
                            Value::Array(vec![cols.value(column, old), cols.value(column, new)]),
                        );
                    }
                }
                ("update", timestamp(Some(after), "updated_at"), Some(after))
            }
            Operation::Delete => ("delete", None, before.as_ref()),
        };
        let skip = change.operation == Operation::Update && changes.is_empty();
        if !skip {
            let snapshot_wanted = change.snapshot
                || scope.snapshots
                || (change.operation == Operation::Delete && config.snapshot_on_deletion);
            let event = AuditLogEvent {
                class_name: R::CLASS_NAME,
                table_name: R::TABLE_NAME,
                record_id: record_id.clone(),
                database_operation: operation,
                changes,
                snapshot: snapshot_wanted
                    .then(|| snapshot_source.map(|s| cols.snapshot(s)))
                    .flatten(),
                actor: actor.clone(),
                at: at.unwrap_or(now),
                stream: stream.clone(),
                priority,
            };
            prepared.push(event::prepare(&event, config, schemas)?);
        }
    }

    for declaration in R::CHANGES {
        let mut changes = Map::new();
        let operation = match change.operation {
            Operation::Insert => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        };
        for attribute in declaration.attributes {
            let attribute = *attribute;
            let value = match change.operation {
                Operation::Insert => after.as_ref().and_then(|a| a.get(attribute)),
                Operation::Delete => before.as_ref().and_then(|b| b.get(attribute)),
                Operation::Update => {
                    let new = after.as_ref().and_then(|a| a.get(attribute));
                    let old = before.as_ref().and_then(|b| b.get(attribute));
                    // Absent (skipped when None) is null: a value that disappears changed.
                    if new == old {
                        None
                    } else {
                        Some(new.unwrap_or(&NULL))
                    }
                }
            };
            if let Some(value) = value {
                changes.insert(attribute.to_owned(), cols.value(attribute, value));
            }
        }
        if change.operation == Operation::Update && changes.is_empty() {
            continue;
        }
        let changes = serde_json::to_string(&changes).expect("a map serializes");
        let (at, stream, priority) = (now, stream.clone(), priority);
        let event = |tagged: bool| -> Result<Prepared, JournalError> {
            macro_rules! build {
                ($t:literal) => {
                    event::prepare(
                        &ChangeEvent::<$t> {
                            table_name: R::TABLE_NAME,
                            record_id: record_id.clone(),
                            database_operation: operation,
                            logical_operation: declaration.logical_operation,
                            changes: changes.clone(),
                            actor: actor.clone(),
                            at,
                            stream: stream.clone(),
                            priority,
                        },
                        config,
                        schemas,
                    )
                };
            }
            if tagged { build!(true) } else { build!(false) }
        };
        prepared.push(event(declaration.tagged)?);
    }
    Ok(prepared)
}

/// Checks a type's declarations against its columns at start-up: every watched attribute, and
/// every ignored or sensitive column the type names, must be one of `record`'s columns. The
/// derive checks watched attributes at compile time; call this for hand-written impls.
pub fn check_declarations<R: Audited>(record: &R) -> Result<(), Error> {
    let columns = columns(R::CLASS_NAME, record)?;
    let unknown: Vec<&str> = R::CHANGES
        .iter()
        .flat_map(|d| d.attributes.iter().copied())
        .chain(R::IGNORED_COLUMNS.iter().copied())
        .chain(R::SENSITIVE_COLUMNS.iter().copied())
        .filter(|name| !columns.contains_key(*name))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{} declares columns it does not have: {}",
            R::CLASS_NAME,
            unknown.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_names_match_partially_and_by_suffix() {
        let names = vec!["passw".to_owned(), "SSN".to_owned()];
        assert!(is_sensitive("password", &names, &[]));
        assert!(is_sensitive("user_Password_hash", &names, &[]));
        assert!(is_sensitive("ssn", &names, &[]));
        assert!(is_sensitive("token_crypt", &[], &[]));
        assert!(is_sensitive("email_hmac", &[], &[]));
        assert!(is_sensitive("pin", &[], &["pin"]));
        assert!(!is_sensitive("email", &names, &[]));
        assert!(!is_sensitive("crypto_wallet", &[], &[]));
    }
}
