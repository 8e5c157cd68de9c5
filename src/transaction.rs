//! The journaled transaction: stage events in memory, write one job row per enqueue group
//! just before COMMIT.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::event::{self, EventId, Prepared};
use crate::schema::SchemaRegistry;
use crate::store::{self, Backend, BoxFuture, Job, NewJob};
use crate::{Config, Error, Event, JournalError};

type Subscriber = Arc<dyn Fn(&Enqueued<'_>) + Send + Sync>;

struct Shared {
    config: Config,
    schemas: SchemaRegistry,
    subscribers: std::sync::RwLock<Vec<Subscriber>>,
    announcer: Option<crate::wake::Announcer>,
}

impl Shared {
    /// After a COMMIT that wrote jobs: wake this process's workers at once, and the others
    /// through the coalescing announcer. Nothing here runs inside the transaction.
    fn wake(&self) {
        crate::wake::wake_local();
        if let Some(announcer) = &self.announcer {
            announcer.poke();
        }
    }

    /// Tells subscribers (and a capturing test) about events whose transaction committed.
    fn enqueued(&self, events: &[Prepared]) {
        #[cfg(feature = "testing")]
        crate::testing::record(events);
        let subscribers = self.subscribers.read().expect("poisoned").clone();
        if subscribers.is_empty() {
            return;
        }
        for event in events {
            let enqueued = Enqueued {
                event_id: event.id,
                event_type: event.event_type,
                stream: &event.stream,
                partition_key: &event.partition_key,
                priority: event.priority,
                data: &event.data,
            };
            for subscriber in &subscribers {
                subscriber(&enqueued);
            }
        }
    }
}

/// An event whose transaction just committed (the reference's `journaled.event.enqueue`
/// notification); see [`Journaled::on_enqueue`].
#[derive(Debug, Clone, Copy)]
pub struct Enqueued<'a> {
    /// Its id.
    pub event_id: EventId,
    /// Its type.
    pub event_type: &'a str,
    /// Its stream.
    pub stream: &'a str,
    /// Its partition key.
    pub partition_key: &'a str,
    /// Its job priority.
    pub priority: i32,
    /// Its exact JSON.
    pub data: &'a str,
}

/// The entry point: a connection pool plus the configuration and compiled schemas.
///
/// Cheap to clone; clones share the schema cache.
pub struct Journaled<DB: Backend> {
    pool: sqlx::Pool<DB>,
    shared: Arc<Shared>,
}

impl<DB: Backend> Clone for Journaled<DB> {
    fn clone(&self) -> Self {
        Journaled {
            pool: self.pool.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Journaled<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journaled")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Journaled<DB> {
    /// Journals into `pool` with `config`.
    pub fn new(pool: sqlx::Pool<DB>, config: Config) -> Self {
        let schemas = SchemaRegistry::new(config.schema_roots.clone());
        if let Some(name) = &config.app_name {
            crate::context::configure_app_name(name);
        }
        let announcer = if config.notify {
            let announce_pool = pool.clone();
            let announce: crate::wake::Announce = Arc::new(move || {
                let pool = announce_pool.clone();
                Box::pin(async move {
                    match DB::announce(&pool) {
                        Some(sent) => sent.await,
                        None => Ok(()),
                    }
                })
            });
            DB::announce(&pool)
                .is_some()
                .then(|| crate::wake::Announcer::new(announce, config.notify_interval))
        } else {
            None
        };
        Journaled {
            pool,
            shared: Arc::new(Shared {
                config,
                schemas,
                subscribers: std::sync::RwLock::new(Vec::new()),
                announcer,
            }),
        }
    }

    /// Journals into `pool` with [`Config::from_env`].
    pub fn from_env(pool: sqlx::Pool<DB>) -> Result<Self, Error> {
        Ok(Self::new(pool, Config::from_env()?))
    }

    /// Calls `subscriber` for every event whose transaction commits (or that `journal_now`
    /// writes), after the commit, on the committing task. Keep it quick: it runs inline.
    ///
    /// ```no_run
    /// # fn f(journaled: &journaled::Journaled<sqlx::Postgres>) {
    /// use std::collections::HashMap;
    /// use std::sync::{Arc, Mutex};
    /// let counts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    /// let c = counts.clone();
    /// journaled.on_enqueue(move |e| *c.lock().unwrap().entry(e.event_type.to_owned()).or_default() += 1);
    /// # }
    /// ```
    pub fn on_enqueue(&self, subscriber: impl Fn(&Enqueued<'_>) + Send + Sync + 'static) {
        self.shared
            .subscribers
            .write()
            .expect("poisoned")
            .push(Arc::new(subscriber));
    }

    /// The pool jobs are written to.
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The schema registry (compiled schemas are cached here).
    pub fn schemas(&self) -> &SchemaRegistry {
        &self.shared.schemas
    }

    /// Runs journaled's migrations on the pool (see [`crate::migrate`]).
    pub async fn migrate(&self) -> Result<(), Error> {
        store::migrate(&self.pool).await
    }

    /// Begins a journaled transaction on a new pooled connection.
    /// On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken at once (waiting up to the
    /// busy timeout), so a read-then-write transaction never fails with "database is locked".
    pub async fn begin(&self) -> Result<Transaction<'static, DB>, Error> {
        Ok(self.wrap(DB::begin(&self.pool).await?))
    }

    /// Makes the application's own sqlx transaction a journaled one; commit it through the
    /// returned [`Transaction`].
    pub fn wrap<'c>(&self, tx: sqlx::Transaction<'c, DB>) -> Transaction<'c, DB> {
        use sqlx_core::transaction::TransactionManager;
        // A savepoint (depth > 1) commits only with its outer transaction, which journaled
        // cannot see: its events are not reported as enqueued.
        let report = <DB as sqlx::Database>::TransactionManager::get_transaction_depth(&tx) <= 1;
        Transaction {
            tx,
            staged: Vec::new(),
            parent: None,
            shared: self.shared.clone(),
            report,
        }
    }

    /// Begins a journaled transaction on a connection the application holds — a savepoint when
    /// that connection is already in a transaction, as `&mut *app_tx` is:
    ///
    /// ```no_run
    /// # async fn f(journaled: journaled::Journaled<sqlx::Postgres>, pool: sqlx::PgPool) -> Result<(), journaled::Error> {
    /// let mut app_tx = pool.begin().await?;              // the application's own transaction
    /// let mut jtx = journaled.begin_on(&mut *app_tx).await?;
    /// // journal!(jtx, SomeEvent { .. })?;
    /// jtx.commit().await?;      // writes the job, releases the savepoint
    /// app_tx.commit().await?;   // the job exists if and only if this commits
    /// # Ok(()) }
    /// ```
    ///
    /// Inside an outer transaction, the events are committed only when that one is, which
    /// journaled cannot see: they are not reported to [`on_enqueue`](Self::on_enqueue)
    /// subscribers or to `testing::capture`.
    pub async fn begin_on<'c>(
        &self,
        conn: &'c mut DB::Connection,
    ) -> Result<Transaction<'c, DB>, Error> {
        let tx = sqlx::Connection::begin(conn).await?;
        Ok(self.wrap(tx))
    }

    /// Validates and serializes `event` without writing anything: the same checks `journal!` makes.
    pub fn validate<E: Event>(&self, event: &E) -> Result<(), JournalError> {
        self.prepare(event).map(drop)
    }

    fn prepare<E: Event>(&self, event: &E) -> Result<Prepared, JournalError> {
        event::prepare(event, &self.shared.config, &self.shared.schemas)
    }

    /// Journals one event outside any transaction: its job is written at once, on its own.
    /// This is what `journal!(journaled, event).await` does.
    pub fn journal_now<E: Event>(&self, event: &E) -> BoxFuture<'_, Result<EventId, Error>> {
        let prepared = self.prepare(event);
        Box::pin(async move {
            let mut prepared = prepared?;
            let id = prepared.id;
            if self.shared.config.enabled {
                let ids;
                let jobs;
                if prepared.ordered {
                    // The sequence and the job commit together: no gap.
                    let mut tx = DB::begin(&self.pool).await?;
                    take_sequences::<DB>(&mut tx, std::slice::from_mut(&mut prepared)).await?;
                    jobs = store::group(std::slice::from_ref(&prepared));
                    ids = DB::insert_jobs(&mut tx, &jobs).await?;
                    tx.commit().await?;
                } else {
                    jobs = store::group(std::slice::from_ref(&prepared));
                    let mut conn = self.pool.acquire().await?;
                    ids = DB::insert_jobs(&mut conn, &jobs).await?;
                }
                self.shared.wake();
                log_enqueued(&jobs, &ids, std::slice::from_ref(&prepared));
                self.shared.enqueued(std::slice::from_ref(&prepared));
            }
            Ok(id)
        })
    }

    /// Every job row, oldest first (for status, tests and examples).
    pub async fn jobs(&self) -> Result<Vec<Job>, Error> {
        DB::jobs(&self.pool).await
    }
}

/// A database transaction that journals events: they are validated when journaled, kept in
/// memory, and written as job rows just before COMMIT.
///
/// Dereferences to the connection, so `&mut *tx` runs the application's own queries in the
/// same transaction. Dropping it, or [`rollback`](Self::rollback), discards the staged events.
pub struct Transaction<'c, DB: Backend> {
    tx: sqlx::Transaction<'c, DB>,
    staged: Vec<Prepared>,
    /// A savepoint hands its events to its parent on release.
    parent: Option<&'c mut Vec<Prepared>>,
    shared: Arc<Shared>,
    /// Whether committing this transaction really commits (false inside an outer one).
    report: bool,
}

impl<DB: Backend> std::fmt::Debug for Transaction<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("staged", &self.staged.len())
            .field("savepoint", &self.parent.is_some())
            .finish_non_exhaustive()
    }
}

impl<'c, DB: Backend> Transaction<'c, DB> {
    /// Validates and serializes `event` now, and stages it for COMMIT. On error nothing is
    /// staged and the transaction is untouched. This is what `journal!(tx, event)` does.
    pub fn journal_event<E: Event>(&mut self, event: &E) -> Result<EventId, JournalError> {
        let prepared = event::prepare(event, &self.shared.config, &self.shared.schemas)?;
        Ok(self.stage(prepared))
    }

    fn stage(&mut self, prepared: Prepared) -> EventId {
        let id = prepared.id;
        tracing::debug!(
            target: "journaled.event.stage",
            event_type = prepared.event_type,
            event_id = %id,
            priority = prepared.priority,
            "event staged"
        );
        if self.shared.config.enabled {
            self.staged.push(prepared);
        }
        id
    }

    /// Journals a change to an audited record: its audit log event and its change-journaling
    /// events, all validated now and staged together, or none of them on error.
    pub fn audit<R: crate::audit::Audited>(
        &mut self,
        change: crate::audit::Change<'_, R>,
    ) -> Result<Vec<EventId>, JournalError> {
        let prepared = crate::audit::prepare(&change, &self.shared.config, &self.shared.schemas)?;
        Ok(prepared.into_iter().map(|p| self.stage(p)).collect())
    }

    /// How many events are staged in this transaction (not counting open savepoints).
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    /// Begins a savepoint. Its events join this transaction's when it commits (releases), and
    /// are dropped when it rolls back or is dropped.
    pub async fn begin(&mut self) -> Result<Transaction<'_, DB>, Error> {
        let tx = sqlx::Connection::begin(&mut *self.tx).await?;
        Ok(Transaction {
            tx,
            staged: Vec::new(),
            parent: Some(&mut self.staged),
            shared: self.shared.clone(),
            report: false,
        })
    }

    /// Writes one job per (priority, run-at) group of the staged events, then commits.
    /// For a savepoint: releases it and hands the events to the parent transaction.
    #[tracing::instrument(
        name = "journaled.commit",
        skip_all,
        fields(events = self.staged.len(), savepoint = self.parent.is_some()),
        err
    )]
    pub async fn commit(self) -> Result<(), Error> {
        let Transaction {
            mut tx,
            staged,
            parent,
            shared,
            report,
        } = self;
        if let Some(parent) = parent {
            tx.commit().await?;
            parent.extend(staged);
            return Ok(());
        }
        if staged.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        let mut staged = staged;
        take_sequences::<DB>(&mut tx, &mut staged).await?;
        let jobs = store::group(&staged);
        let ids = DB::insert_jobs(&mut tx, &jobs).await?;
        tx.commit().await?;
        if report {
            shared.wake();
        }
        log_enqueued(&jobs, &ids, &staged);
        if report {
            shared.enqueued(&staged);
        }
        Ok(())
    }

    /// Rolls back; the staged events are discarded.
    pub async fn rollback(self) -> Result<(), Error> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// Takes the sequences of the ordered events among `staged`, in the writer's transaction, and
/// puts each in its event's envelope: per (stream, partition key), in `journal!` order. One
/// statement for all keys, sorted, so that writers of several keys never deadlock.
async fn take_sequences<DB: Backend>(
    conn: &mut DB::Connection,
    staged: &mut [Prepared],
) -> Result<(), Error> {
    let mut counts: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
    for event in staged.iter().filter(|e| e.ordered) {
        *counts
            .entry((event.stream.as_str(), event.partition_key.as_str()))
            .or_default() += 1;
    }
    if counts.is_empty() {
        return Ok(());
    }
    let keys: Vec<(String, String, i64)> = counts
        .into_iter()
        .map(|((stream, key), n)| (stream.to_owned(), key.to_owned(), n))
        .collect();
    let last = DB::take_sequences(conn, &keys).await?;
    let mut next: std::collections::HashMap<(String, String), i64> = keys
        .into_iter()
        .zip(last)
        .map(|((stream, key, n), last)| ((stream, key), last - n + 1))
        .collect();
    for event in staged.iter_mut().filter(|e| e.ordered) {
        let key = (event.stream.clone(), event.partition_key.clone());
        let slot = next.get_mut(&key).expect("every ordered key was counted");
        let seq = *slot;
        *slot += 1;
        event.set_sequence(seq);
    }
    Ok(())
}

fn log_enqueued(jobs: &[NewJob], ids: &[store::JobId], events: &[Prepared]) {
    for (job, id) in jobs.iter().zip(ids) {
        tracing::info!(
            target: "journaled.batch.enqueue",
            job_id = id.0,
            priority = job.priority,
            event_count = job.event_count,
            "job enqueued"
        );
    }
    for event in events {
        tracing::debug!(
            target: "journaled.event.enqueue",
            event_type = event.event_type,
            event_id = %event.id,
            priority = event.priority,
            "event enqueued"
        );
    }
}

impl<DB: Backend> Deref for Transaction<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl<DB: Backend> DerefMut for Transaction<'_, DB> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

#[doc(hidden)]
pub mod targets {
    //! What `journal!` dispatches on: a transaction stages, a `Journaled` writes at once.
    use super::*;

    /// `journal!(tx, event)`: stage in a transaction.
    pub trait Stage {
        /// See [`Transaction::journal_event`].
        fn journal_event<E: Event>(&mut self, event: &E) -> Result<EventId, JournalError>;
    }

    impl<DB: Backend> Stage for Transaction<'_, DB> {
        fn journal_event<E: Event>(&mut self, event: &E) -> Result<EventId, JournalError> {
            Transaction::journal_event(self, event)
        }
    }

    /// `journal!(journaled, event).await`: write a job at once.
    pub trait JournalNow {
        /// See [`Journaled::journal_now`].
        fn journal_event<E: Event>(&self, event: &E) -> BoxFuture<'_, Result<EventId, Error>>;
    }

    impl<DB: Backend> JournalNow for Journaled<DB> {
        fn journal_event<E: Event>(&self, event: &E) -> BoxFuture<'_, Result<EventId, Error>> {
            self.journal_now(event)
        }
    }
}
