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
            let data = event.published_data();
            let enqueued = Enqueued {
                event_id: event.id,
                event_type: event.event_type,
                stream: &event.stream,
                partition_key: &event.partition_key,
                priority: event.priority,
                data: &data,
            };
            for subscriber in &subscribers {
                // The COMMIT happened: a panicking subscriber must not make `commit()` look
                // like it failed, nor keep the others from hearing about the event.
                let call = std::panic::AssertUnwindSafe(|| subscriber(&enqueued));
                if std::panic::catch_unwind(call).is_err() {
                    tracing::error!(
                        event_type = event.event_type,
                        event_id = %event.id,
                        "an on_enqueue subscriber panicked; the event is committed all the same"
                    );
                }
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
    /// Its exact JSON. An ordered event's `sequence` is in it where the writer takes it
    /// (SQLite); on PostgreSQL the worker numbers ordered events after the commit, so it is
    /// not there yet.
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

    /// Compiles every schema file now, on a blocking thread, so that no transaction pays for
    /// compiling one on first use (see [`SchemaRegistry::preload`]). Call it at start-up,
    /// before serving; returns how many schemas are ready, or the first broken one.
    pub async fn preload_schemas(&self) -> Result<usize, Error> {
        let shared = self.shared.clone();
        match tokio::task::spawn_blocking(move || shared.schemas.preload()).await {
            Ok(result) => Ok(result?),
            Err(e) => Err(Error::Config(format!("compiling the schemas failed: {e}"))),
        }
    }

    /// Runs journaled's migrations on the pool (see [`crate::migrate`]).
    pub async fn migrate(&self) -> Result<(), Error> {
        store::migrate(&self.pool).await
    }

    /// Begins a journaled transaction on a new pooled connection.
    /// On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken at once (waiting up to the
    /// busy timeout), so a read-then-write transaction never fails with "database is locked".
    ///
    /// With [`Config::with_capture_context`], the `BEGIN` also sets the task-local actor and
    /// tags for capture triggers (see `journaled::capture`), in the same round trip.
    pub async fn begin(&self) -> Result<Transaction<'static, DB>, Error> {
        let tx = if self.shared.config.capture_context {
            let (actor, tags) = capture_context();
            DB::begin_with_context(&self.pool, &actor, &tags).await?
        } else {
            DB::begin(&self.pool).await?
        };
        Ok(self.wrap(tx))
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
            staged: Staged::default(),
            parent: None,
            outer_bytes: 0,
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
    ///
    /// With [`Config::with_capture_context`], it also sets the actor and tags for capture
    /// triggers (one more round trip).
    pub async fn begin_on<'c>(
        &self,
        conn: &'c mut DB::Connection,
    ) -> Result<Transaction<'c, DB>, Error> {
        let mut tx = sqlx::Connection::begin(conn).await?;
        if self.shared.config.capture_context {
            let (actor, tags) = capture_context();
            DB::set_context(&mut tx, &actor, &tags).await?;
        }
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
                    // The job and its key's lock (or sequence) commit together: no gap.
                    let mut tx = DB::begin(&self.pool).await?;
                    (jobs, ids) =
                        insert_taking_sequences::<DB>(&mut tx, std::slice::from_mut(&mut prepared))
                            .await?
                            .expect("an ordered event takes a sequence");
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

/// The events a transaction staged, and their size. Dropped with events still in it (the
/// transaction was dropped without `commit` or `rollback`), it says so: they are discarded.
#[derive(Default)]
struct Staged {
    events: Vec<Prepared>,
    /// Bytes of the staged records (data, partition key, stream, and the record's framing).
    bytes: usize,
}

/// The framing of one record in a job row, near enough: id and field names.
const RECORD_OVERHEAD: usize = 96;

fn record_bytes(prepared: &Prepared) -> usize {
    prepared.data.len() + prepared.partition_key.len() + prepared.stream.len() + RECORD_OVERHEAD
}

impl Staged {
    /// Takes the events out (to commit them, or to drop them on purpose).
    fn take(&mut self) -> (Vec<Prepared>, usize) {
        let bytes = std::mem::take(&mut self.bytes);
        (std::mem::take(&mut self.events), bytes)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let mut types: Vec<&str> = self.events.iter().map(|e| e.event_type).collect();
        types.sort_unstable();
        types.dedup();
        tracing::warn!(
            target: "journaled.event.discard",
            events = self.events.len(),
            event_types = ?types,
            "a journaled transaction was dropped with staged events, which are discarded: commit() or rollback() it"
        );
    }
}

/// A database transaction that journals events: they are validated when journaled, kept in
/// memory, and written as job rows just before COMMIT.
///
/// Dereferences to the connection, so `&mut *tx` runs the application's own queries in the
/// same transaction. Dropping it, or [`rollback`](Self::rollback), discards the staged events.
pub struct Transaction<'c, DB: Backend> {
    tx: sqlx::Transaction<'c, DB>,
    staged: Staged,
    /// A savepoint hands its events to its parent on release.
    parent: Option<&'c mut Staged>,
    /// Bytes the enclosing transactions staged (for a savepoint).
    outer_bytes: usize,
    shared: Arc<Shared>,
    /// Whether committing this transaction really commits (false inside an outer one).
    report: bool,
}

impl<DB: Backend> std::fmt::Debug for Transaction<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("staged", &self.staged.events.len())
            .field("savepoint", &self.parent.is_some())
            .finish_non_exhaustive()
    }
}

impl<'c, DB: Backend> Transaction<'c, DB> {
    /// Validates and serializes `event` now, and stages it for COMMIT. On error nothing is
    /// staged and the transaction is untouched. This is what `journal!(tx, event)` does.
    pub fn journal_event<E: Event>(&mut self, event: &E) -> Result<EventId, JournalError> {
        let prepared = event::prepare(event, &self.shared.config, &self.shared.schemas)?;
        self.check_size(std::slice::from_ref(&prepared))?;
        Ok(self.stage(prepared))
    }

    /// Refuses events that would bring the transaction (its savepoints' parents included)
    /// over `Config::with_max_transaction_bytes`: the application learns at `journal!`, not
    /// at COMMIT, and its memory stays bounded.
    fn check_size(&self, batch: &[Prepared]) -> Result<(), JournalError> {
        if !self.shared.config.enabled {
            return Ok(());
        }
        let limit = self.shared.config.max_transaction_bytes;
        let mut total = self.outer_bytes + self.staged.bytes;
        for prepared in batch {
            total += record_bytes(prepared);
            if total > limit {
                return Err(JournalError::TransactionTooLarge {
                    event_type: prepared.event_type.to_owned(),
                    total,
                    limit,
                });
            }
        }
        Ok(())
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
            self.staged.bytes += record_bytes(&prepared);
            self.staged.events.push(prepared);
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
        self.check_size(&prepared)?;
        Ok(prepared.into_iter().map(|p| self.stage(p)).collect())
    }

    /// Tells capture triggers (see `journaled::capture`) who acts from now on in this
    /// transaction: the current task-local actor and tags. [`Journaled::begin`] does it with
    /// the `BEGIN` when the configuration asks for it
    /// ([`Config::with_capture_context`]); call this for a transaction adopted with
    /// [`Journaled::wrap`], or after the scope's actor or tags changed. One round trip on
    /// PostgreSQL; nothing on SQLite.
    pub async fn set_capture_context(&mut self) -> Result<(), Error> {
        let (actor, tags) = capture_context();
        DB::set_context(&mut self.tx, &actor, &tags).await
    }

    /// How many events are staged in this transaction (not counting open savepoints).
    pub fn staged_len(&self) -> usize {
        self.staged.events.len()
    }

    /// Bytes staged in this transaction (not counting open savepoints), as counted against
    /// `Config::with_max_transaction_bytes`.
    pub fn staged_bytes(&self) -> usize {
        self.staged.bytes
    }

    /// Begins a savepoint. Its events join this transaction's when it commits (releases), and
    /// are dropped when it rolls back or is dropped.
    pub async fn begin(&mut self) -> Result<Transaction<'_, DB>, Error> {
        let tx = sqlx::Connection::begin(&mut *self.tx).await?;
        Ok(Transaction {
            tx,
            staged: Staged::default(),
            outer_bytes: self.outer_bytes + self.staged.bytes,
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
        fields(events = self.staged.events.len(), savepoint = self.parent.is_some()),
        err
    )]
    pub async fn commit(self) -> Result<(), Error> {
        let Transaction {
            mut tx,
            mut staged,
            parent,
            outer_bytes: _,
            shared,
            report,
        } = self;
        // From here the events are either committed or the error says they are not.
        let (staged, bytes) = staged.take();
        if let Some(parent) = parent {
            tx.commit().await?;
            parent.events.extend(staged);
            parent.bytes += bytes;
            return Ok(());
        }
        if staged.is_empty() {
            tx.commit().await?;
            // Capture triggers may have written jobs: wake the workers as for staged events.
            if report && shared.config.capture_context {
                shared.wake();
            }
            return Ok(());
        }
        let mut staged = staged;
        let (jobs, ids) = match insert_taking_sequences::<DB>(&mut tx, &mut staged).await? {
            Some(done) => done,
            None => {
                let jobs = store::group(&staged);
                let ids = DB::insert_jobs(&mut tx, &jobs).await?;
                (jobs, ids)
            }
        };
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
    pub async fn rollback(mut self) -> Result<(), Error> {
        self.staged.take();
        self.tx.rollback().await?;
        Ok(())
    }
}

/// The actor and tags (JSON) capture triggers put in their events: the task-local ones, as
/// `journal!` and `tx.audit` would.
fn capture_context() -> (String, String) {
    let tags = serde_json::to_string(&crate::context::current_tags()).expect("tags serialize");
    (crate::context::actor_uri(), tags)
}

/// The ordered keys among `staged` with how many sequences each takes, sorted (so that writers
/// of several keys lock them in one order and never deadlock).
fn ordered_keys(staged: &[Prepared]) -> Vec<(String, String, i64)> {
    let mut counts: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
    for event in staged.iter().filter(|e| e.ordered) {
        *counts
            .entry((event.stream.as_str(), event.partition_key.as_str()))
            .or_default() += 1;
    }
    counts
        .into_iter()
        .map(|((stream, key), n)| (stream.to_owned(), key.to_owned(), n))
        .collect()
}

/// Inserts the jobs of a transaction with ordered events, in one statement on PostgreSQL (one
/// round trip, as for unordered events): the records carry placeholders for their sequences,
/// taken here on SQLite (and set on the events), by the worker after the commit on
/// PostgreSQL. `None` when nothing is ordered.
async fn insert_taking_sequences<DB: Backend>(
    conn: &mut DB::Connection,
    staged: &mut [Prepared],
) -> Result<Option<(Vec<store::NewJob>, Vec<store::JobId>)>, Error> {
    let keys = ordered_keys(staged);
    if keys.is_empty() {
        return Ok(None);
    }
    // Each ordered event's key and place among that key's sequences (1-based), in journal! order.
    let index: std::collections::HashMap<(&str, &str), usize> = keys
        .iter()
        .enumerate()
        .map(|(k, (stream, key, _))| ((stream.as_str(), key.as_str()), k))
        .collect();
    let mut taken = vec![0i64; keys.len()];
    let mut slots: Vec<Option<(usize, i64)>> = Vec::with_capacity(staged.len());
    for event in staged.iter() {
        slots.push(event.ordered.then(|| {
            let k = index[&(event.stream.as_str(), event.partition_key.as_str())];
            taken[k] += 1;
            (k, taken[k])
        }));
    }
    drop(index);
    let (jobs, job_keys) = store::records::group_taking_sequences(staged, &slots, keys.len());
    let (ids, bases) = DB::insert_jobs_taking_sequences(conn, &keys, &jobs, &job_keys).await?;
    if let Some(bases) = bases {
        for (event, slot) in staged.iter_mut().zip(slots) {
            if let Some((k, n)) = slot {
                event.sequence = Some(bases[k] + n);
            }
        }
    }
    Ok(Some((jobs, ids)))
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
