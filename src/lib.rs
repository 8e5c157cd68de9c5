//! # journaled
//!
//! Durably deliver schematized events to Amazon Kinesis: events are raised inside your own SQL
//! transaction, validated against JSON Schema at once, and written as **one job row just
//! before COMMIT** (several bounded rows for a very large transaction, in one statement) — so
//! they exist if and only if the transaction commits. The `journaled
//! worker` publishes them at least once.
//!
//! ## Guarantees
//! - Commit ⇒ every journaled event is stored (and delivered at least once by the worker);
//!   rollback, drop, or an error before commit ⇒ none is.
//! - Bad input (schema violation, missing schema, no stream, a partition key empty or over 256
//!   UTF-16 code units, a record over 1 MiB, a NaN or infinite number, nesting deeper than
//!   100 levels, a transaction over its byte bound) fails the `journal!` call with an error
//!   naming the event type; nothing is staged.
//! - The bytes published are the bytes validated: an event is serialized once, at `journal!`.
//!
//! ## Quick start
//!
//! ```no_run
//! use journaled::{Journaled, journal};
//!
//! #[derive(serde::Serialize, journaled::Event)]
//! #[journaled(tagged, priority = 10)] // event_type: "contract_acceptance_event"
//! struct ContractAcceptanceEvent {
//!     user_id: i64,
//!     signature: String,
//! }
//!
//! # async fn run() -> Result<(), journaled::Error> {
//! let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
//! let journaled = Journaled::from_env(pool)?; // JOURNALED_STREAM_NAME etc.
//! journaled.migrate().await?;
//!
//! let mut tx = journaled.begin().await?;
//! sqlx::query("UPDATE users SET contract_accepted = true WHERE id = $1")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! journal!(tx, ContractAcceptanceEvent { user_id: 42, signature: "Sarah T. User".into() })?;
//! tx.commit().await?; // one INSERT of the batch, then COMMIT
//! # Ok(()) }
//! ```
//!
//! The schema lives in `journaled_schemas/contract_acceptance_event.json`.
//!
//! ## Map of the crate
//!
//! | module | what it owns |
//! |---|---|
//! | [`Journaled`], [`Transaction`], [`journal!`] | staging events in a transaction and writing their jobs before COMMIT |
//! | [`Event`], [`EventId`], [`RunAt`] | the event trait (derive it), its envelope, its one-time serialization |
//! | [`schema`] | loading and compiling `journaled_schemas/*.json` once; validation |
//! | [`context`] | task-local actor and tags, app name, commit hash |
//! | [`audit`] | audit log and change-journaling events from before/after values |
//! | `capture` (feature `postgres`) | database-side capture: statement-level triggers that journal every change to a table, raw SQL included, as audit log events |
//! | [`store`] | the job table behind the [`Backend`] trait: PostgreSQL (`postgres`) and SQLite (`sqlite`), migrations |
//! | `delivery` (feature `worker`) | the worker: claim, publish through a `Sink`, settle, retry |
//! | `kinesis` (feature `worker`) | the Kinesis `Sink`, its client configuration, error classification, a stream reader |
//! | `testing` (feature `testing`) | capture and match the events code journals |
//! | `tower` (feature `tower`) | a tower layer that puts each request's actor and tags in scope |
//! | [`Error`], [`JournalError`], [`CaptureError`] | operational errors; what `journal!` refuses; why capture cannot be enabled |
//!
//! Dependencies run one way: transaction → event, schema, context, audit → store → error, config.
//! The worker owns its port (`delivery::Sink`); the Kinesis adapter implements it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate self as journaled;

pub mod audit;
#[cfg(feature = "postgres")]
pub mod capture;
mod config;
pub mod context;
#[cfg(feature = "worker")]
pub mod delivery;
mod error;
mod event;
#[cfg(feature = "worker")]
pub mod kinesis;
pub mod schema;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
// Request attribution for web services: the tower layer (its docs are the module's own).
#[cfg(feature = "tower")]
pub mod tower;
mod transaction;
mod wake;

#[cfg(not(any(feature = "postgres", feature = "sqlite")))]
compile_error!(
    "journaled needs a database: enable the `postgres` or the `sqlite` feature (or both)"
);

pub use config::{
    Config, DEFAULT_FILTER_PARAMETERS, DEFAULT_IGNORED_COLUMNS, DEFAULT_MAX_RECORD_SIZE,
    DEFAULT_MAX_TRANSACTION_BYTES, DEFAULT_PRIORITY,
};
pub use context::{
    Context, ContextError, Tags, actor_uri, app_name, commit_hash, current_actor, current_tags,
    scope, tagged, with_actor,
};
#[cfg(feature = "worker")]
pub use delivery::{Worker, WorkerConfig, WorkerStats};
pub use error::{CaptureError, Error, JournalError, Result, Violation};
pub use event::checks::MAX_NESTING_DEPTH;
pub use event::{Event, EventId, MAX_PARTITION_KEY_CHARS, RunAt, format_time};
pub use journaled_derive::{Audited, Event};
pub use store::{Backend, BoxFuture, Job, JobId, Status, StoredRecord, migrate};
pub use transaction::{Enqueued, Journaled, Transaction};

/// Journals an event: validated and serialized now.
///
/// - `journal!(tx, event)` on a [`Transaction`] stages it for COMMIT and returns
///   `Result<EventId, Error>`.
/// - `journal!(journaled, event).await` on a [`Journaled`] writes its job at once, outside any
///   transaction.
///
/// The event is borrowed; pass a value or a place.
#[macro_export]
macro_rules! journal {
    ($target:expr, $event:expr $(,)?) => {{
        #[allow(unused_imports)]
        use $crate::__private::{JournalNow as _, Stage as _};
        ($target).journal_event(&$event)
    }};
}

#[doc(hidden)]
pub mod __private {
    pub use crate::transaction::targets::{JournalNow, Stage};
    pub use serde_json::json;
}
