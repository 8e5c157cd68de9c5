//! The core guarantees of issue 2, on PostgreSQL and SQLite: events exist if and only if the
//! transaction commits, in one job per enqueue group, with the exact validated bytes.

mod common;

use common::{AppSql, TestDb, events, test_config};
use journaled::{
    Backend, Error, Event, JournalError, Journaled, journal, tagged, tags, with_actor,
};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Serialize, journaled::Event)]
struct TestEvent {
    name: String,
    count: i64,
}

fn test_event(name: &str) -> TestEvent {
    TestEvent {
        name: name.into(),
        count: 1,
    }
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", priority = 5)]
struct Urgent {
    n: i32,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", delay_secs = 3600)]
struct Delayed {
    n: i32,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", stream = "other_stream")]
struct OtherStream {
    n: i32,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Keyed {
    #[journaled(partition_key)]
    account: String,
}

fn key_of(event: &CustomKey) -> String {
    format!("account-{}", event.account)
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", partition_key_with = key_of)]
struct CustomKey {
    account: u64,
}

#[derive(Serialize, journaled::Event)]
#[journaled(tagged)]
struct TaggedTestEvent {
    name: String,
}

#[derive(Serialize, journaled::Event)]
struct Draft4Event {
    level: i64,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Blob {
    blob: String,
}

#[derive(Serialize, journaled::Event)]
struct MissingSchemaEvent {
    n: i32,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Clash {
    id: i32,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Scalar(i32);

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", stream = "no spaces allowed")]
struct BadStream {
    n: i32,
}

/// Events that share (priority, run_at) share a job, whatever their stream; each group is one job.
async fn commit_writes_one_job_per_group<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("a")).unwrap();
    journal!(tx, OtherStream { n: 1 }).unwrap();
    journal!(tx, Urgent { n: 2 }).unwrap();
    journal!(tx, test_event("b")).unwrap();
    journal!(tx, Delayed { n: 3 }).unwrap();
    journal!(tx, Urgent { n: 4 }).unwrap();
    journal!(tx, Delayed { n: 5 }).unwrap(); // the same delay: the same job
    assert_eq!(tx.staged_len(), 7);
    assert!(
        journaled.jobs().await.unwrap().is_empty(),
        "nothing before commit"
    );
    tx.commit().await.unwrap();

    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 3, "{jobs:#?}");
    let summary: Vec<(i32, i32, Vec<String>)> = jobs
        .iter()
        .map(|job| {
            let records = job.records().unwrap();
            let streams = records.iter().map(|r| r.stream.clone()).collect();
            (job.priority, job.event_count, streams)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                20,
                3,
                vec![
                    "test_stream".into(),
                    "other_stream".into(),
                    "test_stream".into()
                ]
            ),
            (5, 2, vec!["test_stream".into(), "test_stream".into()]),
            (20, 2, vec!["test_stream".into(), "test_stream".into()]),
        ]
    );
    let delayed = &jobs[2];
    let wait = delayed.run_at - delayed.created_at;
    assert!(
        wait.whole_minutes() >= 59,
        "delayed job runs in an hour: {wait}"
    );
    assert!(jobs[0].run_at <= jobs[0].created_at + time::Duration::seconds(1));
    assert!(jobs.iter().all(|j| j.attempts == 0 && j.dead_at.is_none()));
}

async fn rollback_and_drop_write_nothing<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("rolled back")).unwrap();
    tx.rollback().await.unwrap();

    {
        let mut tx = journaled.begin().await.unwrap();
        journal!(tx, test_event("dropped")).unwrap();
        // dropped without commit
    }

    // An error in the application's own statement before commit: the caller bails out.
    let result: Result<(), Error> = async {
        let mut tx = journaled.begin().await?;
        journal!(tx, test_event("failed"))?;
        DB::try_exec(&mut tx, "SELECT * FROM no_such_table").await?;
        tx.commit().await
    }
    .await;
    assert!(matches!(result, Err(Error::Database(_))), "{result:?}");
    assert!(journaled.jobs().await.unwrap().is_empty());
}

async fn application_writes_share_the_transaction<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    DB::exec(
        &mut *db.pool.acquire().await.unwrap(),
        "CREATE TABLE app_users (id INTEGER PRIMARY KEY, accepted BOOLEAN NOT NULL DEFAULT FALSE); \
         INSERT INTO app_users (id) VALUES (1), (2)",
    )
    .await;
    let mut tx = journaled.begin().await.unwrap();
    DB::exec(&mut tx, "UPDATE app_users SET accepted = TRUE WHERE id = 1").await;
    journal!(tx, test_event("one")).unwrap();
    tx.commit().await.unwrap();

    let mut tx = journaled.begin().await.unwrap();
    DB::exec(&mut tx, "UPDATE app_users SET accepted = TRUE WHERE id = 2").await;
    journal!(tx, test_event("two")).unwrap();
    tx.rollback().await.unwrap();

    let accepted = DB::count(&db.pool, "SELECT COUNT(*) FROM app_users WHERE accepted").await;
    assert_eq!(accepted, 1);
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    let data: Value = serde_json::from_slice(jobs[0].records().unwrap()[0].data()).unwrap();
    assert_eq!(data["name"], "one");
}

async fn savepoints_merge_on_release_and_drop_on_rollback<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("outer")).unwrap();
    {
        let mut released = tx.begin().await.unwrap();
        journal!(released, test_event("released")).unwrap();
        {
            let mut inner_rolled_back = released.begin().await.unwrap();
            journal!(inner_rolled_back, test_event("inner rolled back")).unwrap();
            inner_rolled_back.rollback().await.unwrap();
        }
        {
            let mut inner = released.begin().await.unwrap();
            journal!(inner, test_event("inner released")).unwrap();
            inner.commit().await.unwrap();
        }
        released.commit().await.unwrap();
    }
    {
        let mut rolled_back = tx.begin().await.unwrap();
        journal!(rolled_back, test_event("rolled back")).unwrap();
        rolled_back.rollback().await.unwrap();
    }
    {
        let mut dropped = tx.begin().await.unwrap();
        journal!(dropped, test_event("dropped")).unwrap();
    }
    assert_eq!(tx.staged_len(), 3);
    tx.commit().await.unwrap();
    assert_eq!(
        names(&journaled).await,
        ["outer", "released", "inner released"]
    );
}

async fn names<DB: Backend>(journaled: &Journaled<DB>) -> Vec<String> {
    events(journaled)
        .await
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn journaling_outside_a_transaction_writes_at_once<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let id = journal!(journaled, test_event("now")).await.unwrap();
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    let records = jobs[0].records().unwrap();
    assert_eq!(records[0].id, id);
    assert_eq!(
        records[0].partition_key,
        id.to_string(),
        "default key: the event id"
    );

    let err = journal!(journaled, MissingSchemaEvent { n: 1 })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Journal(JournalError::SchemaNotFound { .. })),
        "{err}"
    );
    assert_eq!(journaled.jobs().await.unwrap().len(), 1);
}

/// An application that already holds a sqlx transaction journals through a savepoint on it.
async fn an_existing_sqlx_transaction_can_journal<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut app_tx = db.pool.begin().await.unwrap();
    let mut jtx = journaled.begin_on(&mut app_tx).await.unwrap();
    journal!(jtx, test_event("in app tx")).unwrap();
    jtx.commit().await.unwrap();
    app_tx.rollback().await.unwrap();
    assert!(
        journaled.jobs().await.unwrap().is_empty(),
        "the outer rollback wins"
    );

    let mut app_tx = db.pool.begin().await.unwrap();
    let mut jtx = journaled.begin_on(&mut app_tx).await.unwrap();
    journal!(jtx, test_event("committed")).unwrap();
    jtx.commit().await.unwrap();
    app_tx.commit().await.unwrap();

    let app_tx = db.pool.begin().await.unwrap();
    let mut jtx = journaled.wrap(app_tx);
    journal!(jtx, test_event("wrapped")).unwrap();
    jtx.commit().await.unwrap();
    assert_eq!(names(&journaled).await, ["committed", "wrapped"]);
}

/// Invariant 2: each bad input fails `journal!` with an error naming the event type and the
/// problem; nothing is staged and the application's own writes can still commit.
async fn bad_input_is_refused_and_nothing_is_written<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    DB::exec(
        &mut *db.pool.acquire().await.unwrap(),
        "CREATE TABLE app_notes (id INTEGER PRIMARY KEY)",
    )
    .await;
    let mut tx = journaled.begin().await.unwrap();
    DB::exec(&mut tx, "INSERT INTO app_notes (id) VALUES (1)").await;

    let err = journal!(
        tx,
        TestEvent {
            name: String::new(),
            count: -1
        }
    )
    .unwrap_err();
    match &err {
        JournalError::SchemaViolation {
            event_type,
            violations,
        } => {
            assert_eq!(event_type, "test_event");
            let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
            assert!(
                pointers.contains(&"/name") && pointers.contains(&"/count"),
                "{violations:?}"
            );
        }
        other => panic!("expected a schema violation, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("test_event") && message.contains("/count"),
        "{message}"
    );

    let err = journal!(tx, MissingSchemaEvent { n: 1 }).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("missing_schema_event"), "{message}");
    assert!(
        message.contains("tests/journaled_schemas/missing_schema_event.json"),
        "{message}"
    );

    let no_stream = Journaled::new(
        db.pool.clone(),
        test_config().with_schema_roots([common::schema_root()]),
    );
    let mut config_without_stream =
        journaled::Config::default().with_schema_roots([common::schema_root()]);
    config_without_stream = config_without_stream.with_app_name("x");
    let no_stream_journaled = Journaled::new(db.pool.clone(), config_without_stream);
    drop(no_stream);
    // A savepoint on the same connection: on SQLite a second write transaction would wait for
    // the first (journaled begins IMMEDIATE).
    let mut tx2 = no_stream_journaled.begin_on(&mut tx).await.unwrap();
    let err = journal!(tx2, test_event("x")).unwrap_err();
    assert!(
        matches!(err, JournalError::MissingStreamName { ref event_type } if event_type == "test_event"),
        "{err}"
    );
    assert!(err.to_string().contains("JOURNALED_STREAM_NAME"), "{err}");
    // An event naming its own stream needs no default.
    journal!(tx2, OtherStream { n: 1 }).unwrap();
    tx2.rollback().await.unwrap();

    let err = journal!(
        tx,
        Keyed {
            account: String::new()
        }
    )
    .unwrap_err();
    assert!(
        matches!(err, JournalError::InvalidPartitionKey { .. })
            && err.to_string().contains("empty"),
        "{err}"
    );
    let err = journal!(
        tx,
        Keyed {
            account: "k".repeat(257)
        }
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("257 characters") && err.to_string().contains("free_event"),
        "{err}"
    );
    journal!(
        tx,
        Keyed {
            account: "k".repeat(256)
        }
    )
    .unwrap();

    let err = journal!(
        tx,
        Blob {
            blob: "x".repeat(1024 * 1024)
        }
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::RecordTooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{err}"
    );

    struct Forever;
    impl Serialize for Forever {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            json!({}).serialize(s)
        }
    }
    impl Event for Forever {
        const EVENT_TYPE: &'static str = "free_event";
        fn run_at(&self) -> Option<journaled::RunAt> {
            Some(journaled::RunAt::After(std::time::Duration::MAX))
        }
    }
    let err = journal!(tx, Forever).unwrap_err();
    assert!(
        matches!(err, JournalError::InvalidRunAt { .. }) && err.to_string().contains("free_event"),
        "{err}"
    );
    let err = journal!(tx, BadStream { n: 1 }).unwrap_err();
    assert!(
        matches!(err, JournalError::InvalidStreamName { .. }),
        "{err}"
    );

    let err = journal!(tx, Clash { id: 1 }).unwrap_err();
    assert!(
        matches!(err, JournalError::ReservedAttribute { ref name, .. } if name == "id"),
        "{err}"
    );
    let err = journal!(tx, Scalar(1)).unwrap_err();
    assert!(err.to_string().contains("not an object"), "{err}");

    assert_eq!(tx.staged_len(), 1, "only the valid event is staged");
    tx.commit().await.unwrap();
    assert_eq!(
        DB::count(&db.pool, "SELECT COUNT(*) FROM app_notes").await,
        1
    );
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].event_count, 1);
    assert_eq!(jobs[0].records().unwrap()[0].partition_key, "k".repeat(256));
}

/// Invariant 3: the stored bytes are exactly the serialization that was validated.
async fn stored_bytes_are_the_validated_bytes<DB: Backend + AppSql>(db: &TestDb<DB>) {
    #[derive(Serialize)]
    struct Exact {
        text: String,
        ratio: f64,
        nested: Value,
    }
    impl Event for Exact {
        const EVENT_TYPE: &'static str = "free_event";
        fn created_at(&self) -> Option<time::OffsetDateTime> {
            Some(time::macros::datetime!(2019-01-28 11:06:54.928 -05:00))
        }
        fn partition_key(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some("p \"quoted\" ✓".into())
        }
    }
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    let event = Exact {
        text: "é \"q\" \n\u{1}".into(),
        ratio: 0.1,
        nested: json!({"z": 1, "a": [true, null]}),
    };
    let id = journal!(tx, event).unwrap();
    tx.commit().await.unwrap();
    let expected = format!(
        r#"{{"id":"{id}","event_type":"free_event","created_at":"2019-01-28T11:06:54.928-05:00","text":"é \"q\" \n\u0001","ratio":0.1,"nested":{{"z":1,"a":[true,null]}}}}"#
    );
    let jobs = journaled.jobs().await.unwrap();
    let record = &jobs[0].records().unwrap()[0];
    assert_eq!(std::str::from_utf8(record.data()).unwrap(), expected);
    assert_eq!(record.partition_key, "p \"quoted\" ✓");
    assert_eq!(record.id, id);
}

async fn derive_attributes_set_key_stream_and_priority<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        Keyed {
            account: "acct-1".into()
        }
    )
    .unwrap();
    journal!(tx, CustomKey { account: 7 }).unwrap();
    journal!(tx, OtherStream { n: 1 }).unwrap();
    tx.commit().await.unwrap();
    let jobs = journaled.jobs().await.unwrap();
    let records = jobs[0].records().unwrap();
    let keys: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.partition_key.as_str(), r.stream.as_str()))
        .collect();
    assert_eq!(keys[0], ("acct-1", "test_stream"));
    assert_eq!(keys[1], ("account-7", "test_stream"));
    assert_eq!(keys[2].1, "other_stream");
    assert_eq!(Urgent::EVENT_TYPE, "free_event");
    assert_eq!(TaggedTestEvent::EVENT_TYPE, "tagged_test_event");
    const { assert!(TaggedTestEvent::TAGGED && !TestEvent::TAGGED) };
}

/// A schema without `$schema` is Draft 4: boolean `exclusiveMaximum` means "strictly below".
async fn schemas_without_dollar_schema_are_draft4<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, Draft4Event { level: 9 }).unwrap();
    let err = journal!(tx, Draft4Event { level: 10 }).unwrap_err();
    assert!(err.to_string().contains("/level"), "{err}");
}

async fn tags_and_actor_are_captured_at_journal_time<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for i in 0..2 {
        let journaled = journaled.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(tagged(
            tags! { request_id = format!("req-{i}") },
            with_actor(format!("gid://app/User/{i}"), async move {
                barrier.wait().await; // both tasks are inside their scopes now
                journaled::tag!(step = i).unwrap();
                tokio::task::yield_now().await;
                let mut tx = journaled.begin().await.unwrap();
                journal!(
                    tx,
                    TaggedTestEvent {
                        name: format!("task-{i}")
                    }
                )
                .unwrap();
                assert_eq!(journaled::actor_uri(), format!("gid://app/User/{i}"));
                // (No second barrier here: on SQLite journaled's transactions begin IMMEDIATE,
                // so two open write transactions wait for each other.)
                // Tags changed after journal! do not reach the staged event.
                journaled::tag!(request_id = "changed later").unwrap();
                tx.commit().await.unwrap();
            }),
        )));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let events = events(&journaled).await;
    assert_eq!(events.len(), 2);
    for event in events {
        let i = event["name"]
            .as_str()
            .unwrap()
            .strip_prefix("task-")
            .unwrap()
            .to_owned();
        assert_eq!(
            event["tags"],
            json!({ "request_id": format!("req-{i}"), "step": i.parse::<i64>().unwrap() })
        );
    }

    // Outside any scope: no tags, the fallback actor, and tag! says why it cannot tag.
    assert_eq!(journaled::current_tags(), journaled::Tags::new());
    assert_eq!(
        journaled::actor_uri(),
        format!("gid://{}", journaled::app_name())
    );
    assert_eq!(
        journaled::tag!(x = 1),
        Err(journaled::ContextError::NoScope)
    );
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        TaggedTestEvent {
            name: "untagged".into()
        }
    )
    .unwrap();
    tx.rollback().await.unwrap();
}

async fn disabled_journaling_validates_but_writes_nothing<DB: Backend + AppSql>(db: &TestDb<DB>) {
    db.migrated().await;
    let journaled = db.journaled(test_config().with_enabled(false));
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("ignored")).unwrap();
    assert!(
        journal!(
            tx,
            TestEvent {
                name: String::new(),
                count: 0
            }
        )
        .is_err()
    );
    tx.commit().await.unwrap();
    journal!(journaled, test_event("ignored")).await.unwrap();
    assert!(journaled.jobs().await.unwrap().is_empty());
}

async fn migrations_are_idempotent_and_private<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let mut conn = db.pool.acquire().await.unwrap();
    DB::exec(
        &mut conn,
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL); \
         INSERT INTO _sqlx_migrations VALUES (20240101000000, 'the app''s own')",
    )
    .await;
    drop(conn);
    let journaled = db.journaled(test_config());
    let (a, b) = tokio::join!(journaled.migrate(), journaled.migrate());
    a.unwrap();
    b.unwrap();
    journaled.migrate().await.unwrap();
    assert_eq!(
        DB::count(&db.pool, "SELECT COUNT(*) FROM _sqlx_migrations").await,
        1
    );
    journal!(journaled, test_event("after migrations"))
        .await
        .unwrap();
    assert_eq!(journaled.jobs().await.unwrap().len(), 1);
}

on_both_backends!(
    commit_writes_one_job_per_group,
    rollback_and_drop_write_nothing,
    application_writes_share_the_transaction,
    savepoints_merge_on_release_and_drop_on_rollback,
    journaling_outside_a_transaction_writes_at_once,
    an_existing_sqlx_transaction_can_journal,
    bad_input_is_refused_and_nothing_is_written,
    stored_bytes_are_the_validated_bytes,
    derive_attributes_set_key_stream_and_priority,
    schemas_without_dollar_schema_are_draft4,
    tags_and_actor_are_captured_at_journal_time,
    disabled_journaling_validates_but_writes_nothing,
    migrations_are_idempotent_and_private,
);

/// A transaction larger than one PutRecords request is written as several bounded job rows,
/// all in the same transaction: every event iff it commits, no row over 500 records or 5 MiB.
async fn large_transactions_are_chunked_into_bounded_jobs<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let big = "x".repeat(20_000);

    let mut tx = journaled.begin().await.unwrap();
    for n in 0..1_200 {
        journal!(tx, Urgent { n }).unwrap();
    }
    // 300 records of ~20 KB: ~6 MB, over the 5 MiB a row may hold.
    for _ in 0..300 {
        journal!(tx, Blob { blob: big.clone() }).unwrap();
    }
    tx.rollback().await.unwrap();
    assert!(
        journaled.jobs().await.unwrap().is_empty(),
        "a rolled-back chunked transaction leaves nothing"
    );

    let mut tx = journaled.begin().await.unwrap();
    for n in 0..1_200 {
        journal!(tx, Urgent { n }).unwrap();
    }
    for _ in 0..300 {
        journal!(tx, Blob { blob: big.clone() }).unwrap();
    }
    tx.commit().await.unwrap();
    let jobs = journaled.jobs().await.unwrap();
    for job in &jobs {
        let records = job.records().unwrap();
        let bytes: usize = records
            .iter()
            .map(|r| r.data().len() + r.partition_key.len())
            .sum();
        assert!(
            records.len() <= journaled::store::MAX_JOB_RECORDS,
            "{} records",
            records.len()
        );
        assert!(bytes <= journaled::store::MAX_JOB_BYTES, "{bytes} bytes");
        assert_eq!(records.len(), job.event_count as usize);
    }
    let urgent: Vec<i64> = jobs
        .iter()
        .filter(|j| j.priority == 5)
        .flat_map(|j| j.records().unwrap())
        .map(|r| {
            serde_json::from_slice::<Value>(r.data()).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        urgent,
        (0..1_200).collect::<Vec<_>>(),
        "every event, in journal! order"
    );
    assert_eq!(jobs.iter().filter(|j| j.priority == 5).count(), 3);
    let blobs: usize = jobs
        .iter()
        .filter(|j| j.priority != 5)
        .map(|j| j.event_count as usize)
        .sum();
    assert_eq!(blobs, 300);
    assert!(jobs.iter().filter(|j| j.priority != 5).count() >= 2);
}

/// Journaling into a database nobody migrated says, in one line, to run `journaled migrate`.
async fn an_unmigrated_database_says_to_migrate<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.journaled(test_config());
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("too early")).unwrap();
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, Error::NotMigrated), "{err:?}");
    assert!(err.to_string().contains("journaled migrate"), "{err}");
    let err = journal!(journaled, test_event("too early"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated), "{err:?}");
    let err = journaled::store::status(&db.pool).await.unwrap_err();
    assert!(matches!(err, Error::NotMigrated), "{err:?}");
}

on_both_backends!(
    large_transactions_are_chunked_into_bounded_jobs,
    an_unmigrated_database_says_to_migrate,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_tracking_tables_are_journaleds_own() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    db.migrated().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "journaled.captures",
            "journaled.jobs",
            "journaled.key_delivery",
            "journaled.key_sequences",
            "journaled.receipts",
            "journaled.schema_migrations"
        ]
    );
}

/// A subscriber that panics after the COMMIT succeeded does not make `commit()` panic or fail,
/// nor keep the other subscribers from hearing of the event.
async fn a_panicking_subscriber_does_not_fail_the_commit<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    journaled.on_enqueue(|_| panic!("a subscriber's bug"));
    let counter = heard.clone();
    journaled.on_enqueue(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("committed")).unwrap();
    tx.commit().await.expect("the commit succeeded and says so");
    assert_eq!(names(&journaled).await, ["committed"]);
    assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A transaction may stage at most `max_transaction_bytes` (savepoints count toward their
/// parent's): the event that would go over is refused at `journal!`, naming the event and the
/// limit, and what was staged still commits.
async fn a_transaction_is_bounded_in_staged_bytes<DB: Backend + AppSql>(db: &TestDb<DB>) {
    db.migrated().await;
    let journaled = db.journaled(test_config().with_max_transaction_bytes(10_000));
    let mut tx = journaled.begin().await.unwrap();
    let big = "b".repeat(2_000);
    let mut staged = 0;
    let err = loop {
        match journal!(tx, test_event(&big)) {
            Ok(_) => staged += 1,
            Err(e) => break e,
        }
        assert!(staged < 10, "never refused");
    };
    assert!(
        matches!(err, JournalError::TransactionTooLarge { .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("test_event") && message.contains("10000-byte limit"),
        "{message}"
    );
    assert_eq!(tx.staged_len(), staged);
    assert!(tx.staged_bytes() <= 10_000);
    {
        let mut savepoint = tx.begin().await.unwrap();
        assert!(
            matches!(
                journal!(savepoint, test_event(&big)),
                Err(JournalError::TransactionTooLarge { .. })
            ),
            "a savepoint counts its parent's bytes"
        );
        savepoint.rollback().await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(names(&journaled).await.len(), staged);
}

on_both_backends!(
    a_panicking_subscriber_does_not_fail_the_commit,
    a_transaction_is_bounded_in_staged_bytes,
);

/// Log lines written to memory.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

/// A transaction (or a savepoint) dropped with staged events says, at `warn`, that they are
/// discarded; commit and rollback say nothing.
#[tokio::test]
async fn dropping_staged_events_leaves_a_trace() {
    let logs = Captured::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish(),
    );
    let db = TestDb::<sqlx::Sqlite>::new().await;
    let journaled = db.migrated().await;
    {
        let mut tx = journaled.begin().await.unwrap();
        journal!(tx, test_event("dropped")).unwrap();
        journal!(tx, Urgent { n: 1 }).unwrap();
    }
    let said = logs.take();
    assert!(
        said.contains("dropped with staged events")
            && said.contains("events=2")
            && said.contains("test_event")
            && said.contains("free_event"),
        "{said}"
    );
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("rolled back")).unwrap();
    tx.rollback().await.unwrap();
    let mut tx = journaled.begin().await.unwrap();
    {
        let mut savepoint = tx.begin().await.unwrap();
        journal!(savepoint, test_event("in a dropped savepoint")).unwrap();
    }
    assert!(logs.take().contains("events=1"), "a savepoint too");
    journal!(tx, test_event("committed")).unwrap();
    tx.commit().await.unwrap();
    assert_eq!(logs.take(), "", "commit and rollback say nothing");
    assert_eq!(names(&journaled).await, ["committed"]);
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Measured {
    reading: f64,
    more: Vec<f32>,
}

/// Nested `levels` arrays deep, without building them (a deep `serde_json::Value` alike).
struct Nest(usize);

impl Serialize for Nest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(1))?;
        if self.0 > 1 {
            seq.serialize_element(&Nest(self.0 - 1))?;
        }
        seq.end()
    }
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Deep {
    tree: Nest,
}

/// What Kinesis or JSON cannot take is refused at `journal!`, naming the event and the limit,
/// with nothing staged: partition keys counted in UTF-16 units as Kinesis counts them, NaN and
/// infinite numbers (serde_json would write null), and nesting deep enough to overflow the
/// stack.
async fn unrepresentable_input_is_refused_at_journal<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut tx = journaled.begin().await.unwrap();
    let refused = |result: Result<journaled::EventId, JournalError>, words: &[&str]| {
        let message = result.expect_err("refused").to_string();
        for word in words {
            assert!(message.contains(word), "{word:?} not in: {message}");
        }
    };
    for wide in ["😀", "𠀀"] {
        refused(
            journal!(
                tx,
                Keyed {
                    account: wide.repeat(129)
                }
            ),
            &["free_event", "258 UTF-16 code units", "256"],
        );
        journal!(
            tx,
            Keyed {
                account: wide.repeat(128)
            }
        )
        .unwrap();
    }
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        refused(
            journal!(
                tx,
                Measured {
                    reading: bad,
                    more: vec![]
                }
            ),
            &["free_event", "NaN or infinite", "/reading"],
        );
    }
    refused(
        journal!(
            tx,
            Measured {
                reading: 1.0,
                more: vec![0.5, f32::NAN]
            }
        ),
        &["/more/1"],
    );
    journal!(
        tx,
        Measured {
            reading: 1.5,
            more: vec![2.0]
        }
    )
    .unwrap();
    refused(
        journal!(tx, Deep { tree: Nest(8_000) }),
        &["free_event", "more than 100 levels"],
    );
    journal!(tx, Deep { tree: Nest(99) }).unwrap();
    assert_eq!(tx.staged_len(), 4);
    tx.commit().await.unwrap();
    let stored = events(&journaled).await;
    assert_eq!(stored[2]["reading"], json!(1.5));
}

on_both_backends!(unrepresentable_input_is_refused_at_journal);

/// Schemas can be compiled before any transaction needs them: after `preload_schemas`, a
/// journal! uses the compiled schema and never reads or compiles a file (changing the file
/// changes nothing); a broken file is reported by name.
#[tokio::test]
async fn schemas_can_be_compiled_ahead_of_time() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("preload-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("test_event.json"),
        r#"{"type": "object", "required": ["name"]}"#,
    )
    .unwrap();
    let db = TestDb::<sqlx::Sqlite>::new().await;
    db.migrated().await;
    let journaled =
        db.journaled(test_config().with_schema_roots([dir.clone(), common::schema_root()]));
    let ready = journaled.preload_schemas().await.unwrap();
    assert!(ready >= 6, "{ready}");
    // Compiled already: a stricter file now is not read by journal!.
    std::fs::write(
        dir.join("test_event.json"),
        r#"{"type": "object", "required": ["never_there"]}"#,
    )
    .unwrap();
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("preloaded")).unwrap();
    tx.commit().await.unwrap();

    std::fs::write(dir.join("broken_event.json"), "{ not json").unwrap();
    let fresh = db.journaled(test_config().with_schema_roots([dir.clone()]));
    let err = fresh.preload_schemas().await.unwrap_err().to_string();
    assert!(err.contains("broken_event.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Workers in other processes hear of a commit by one coalesced `NOTIFY`, sent after it on a
/// connection of its own; with `with_notify(false)` nothing is sent and they poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_announced_to_other_processes_after_the_commit() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    db.migrated().await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url())
        .await
        .unwrap();
    listener
        .listen(journaled::store::postgres::NOTIFY_CHANNEL)
        .await
        .unwrap();
    let within = std::time::Duration::from_secs(10);

    let quiet = db.journaled(test_config().with_notify(false));
    let mut tx = quiet.begin().await.unwrap();
    journal!(tx, test_event("unannounced")).unwrap();
    tx.commit().await.unwrap();
    // Nothing to wait for here but the absence of a notification: the announcer would send
    // one 5 ms after the commit, so 300 ms of silence says there is none.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "with_notify(false) sends no NOTIFY"
    );

    let journaled = db.journaled(test_config());
    let mut tx = journaled.begin().await.unwrap();
    journal!(tx, test_event("announced")).unwrap();
    tx.commit().await.unwrap();
    let heard = tokio::time::timeout(within, listener.recv())
        .await
        .expect("a NOTIFY within 10 s of the commit")
        .unwrap();
    assert_eq!(heard.channel(), journaled::store::postgres::NOTIFY_CHANNEL);
    assert_eq!(names(&journaled).await, ["unannounced", "announced"]);
}
