//! journaled::testing, as an application's tests use it (feature `testing`).

mod common;

use common::TestDb;
use journaled::testing::{Expect, assert_journals_changes_to, capture, check_journals_changes_to};
use journaled::{Journaled, journal};
use serde::Serialize;
use serde_json::json;
use std::sync::{Arc, Mutex};

#[derive(Serialize, journaled::Event)]
struct TestEvent {
    name: String,
    count: i64,
}

#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", priority = 5, stream = "other_stream")]
struct Nested {
    name: String,
    detail: serde_json::Value,
    #[journaled(partition_key)]
    account: String,
}

async fn journal_some(journaled: &Journaled<sqlx::Postgres>) {
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        TestEvent {
            name: "foo".into(),
            count: 1
        }
    )
    .unwrap();
    journal!(
        tx,
        TestEvent {
            name: "foo".into(),
            count: 2
        }
    )
    .unwrap();
    journal!(
        tx,
        Nested {
            name: "deep".into(),
            detail: json!({"a": {"b": 1, "c": [1, 2]}, "z": true}),
            account: "acct-9".into()
        }
    )
    .unwrap();
    tx.commit().await.unwrap();
    let mut tx = journaled.begin().await.unwrap();
    journal!(
        tx,
        TestEvent {
            name: "rolled back".into(),
            count: 3
        }
    )
    .unwrap();
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_rules() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let ((), captured) = capture(journal_some(&journaled)).await;
    assert_eq!(captured.events.len(), 3, "rolled-back events do not count");

    // Partial, recursive; unrelated events ignored.
    captured.assert(&[Expect::event(json!({"name": "foo"}))]);
    captured.assert(&[Expect::event(json!({"detail": {"a": {"c": [1, 2]}}}))]);
    // Each expectation needs an event of its own.
    captured.assert(&[
        Expect::event(json!({"name": "foo"})),
        Expect::event(json!({"name": "foo", "count": 1})),
    ]);
    let err = captured
        .check(&[
            Expect::event(json!({"name": "foo"})),
            Expect::event(json!({"name": "foo"})),
            Expect::event(json!({"name": "foo"})),
        ])
        .unwrap_err();
    assert!(
        err.0.contains("already matched by another expectation"),
        "{err}"
    );
    // Refinements.
    captured.assert(&[Expect::event(json!({"name": "deep"}))
        .with_priority(5)
        .with_stream("other_stream")
        .with_partition_key("acct-9")
        .with_event_type("free_event")]);
    let err = captured
        .check(&[Expect::event(json!({"name": "deep"})).with_priority(20)])
        .unwrap_err();
    assert!(err.0.contains("priority: expected 20, got 5"), "{err}");
    // Negative matching.
    captured.assert_not(&[
        Expect::event(json!({"name": "rolled back"})),
        Expect::event(json!({"name": "bar"})),
    ]);
    let err = captured
        .check_not(&[Expect::event(json!({"count": 2}))])
        .unwrap_err();
    assert!(
        err.0
            .contains("expected no journaled event including {\"count\":2}"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_match_shows_the_closest_events_diffed() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let ((), captured) = capture(journal_some(&journaled)).await;
    let err = captured
        .check(&[Expect::event(
            json!({"name": "foo", "count": 7, "missing": true}),
        )])
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(
            "expected a journaled event including {\"name\":\"foo\",\"count\":7,\"missing\":true}"
        ),
        "{message}"
    );
    assert!(message.contains("closest: {\"id\""), "{message}");
    assert!(message.contains("- /count: expected 7, got 1"), "{message}");
    assert!(
        message.contains("- /missing: expected true, missing"),
        "{message}"
    );
    // The closest come first: the two "foo" events before the nested one.
    let first_closest = message.lines().find(|l| l.contains("closest")).unwrap();
    assert!(first_closest.contains("\"name\":\"foo\""), "{message}");

    let ((), nothing) = capture(async {}).await;
    let err = nothing
        .check(&[Expect::event(json!({"name": "foo"}))])
        .unwrap_err();
    assert!(err.0.contains("nothing was journaled"), "{err}");
    let panicked = std::panic::catch_unwind(|| nothing.assert(&[Expect::event(json!({}))]));
    assert!(panicked.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_captures_see_only_their_own_events() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let task = |name: &'static str| {
        let journaled = journaled.clone();
        let barrier = barrier.clone();
        tokio::spawn(capture(async move {
            barrier.wait().await;
            let mut tx = journaled.begin().await.unwrap();
            journal!(
                tx,
                TestEvent {
                    name: name.into(),
                    count: 1
                }
            )
            .unwrap();
            barrier.wait().await;
            tx.commit().await.unwrap();
            journal!(
                journaled,
                TestEvent {
                    name: name.into(),
                    count: 2
                }
            )
            .await
            .unwrap();
        }))
    };
    let (a, b) = tokio::join!(task("a"), task("b"));
    let ((), a) = a.unwrap();
    let ((), b) = b.unwrap();
    assert_eq!(a.events.len(), 2);
    assert_eq!(b.events.len(), 2);
    a.assert(&[
        Expect::event(json!({"name": "a", "count": 1})),
        Expect::event(json!({"name": "a", "count": 2})),
    ]);
    a.assert_not(&[Expect::event(json!({"name": "b"}))]);
    b.assert_not(&[Expect::event(json!({"name": "a"}))]);
}

#[derive(Serialize, journaled::Audited)]
#[journal_changes_to(email, first_name, as = "identity_change")]
#[journal_changes_to(plan, as = "plan_change")]
struct User {
    id: i64,
    email: String,
    first_name: String,
    plan: String,
}

#[test]
fn journal_changes_to_guards_declarations() {
    assert_journals_changes_to::<User>(&["first_name", "email"], "identity_change");
    assert_journals_changes_to::<User>(&["plan"], "plan_change");
    let err = check_journals_changes_to::<User>(&["email"], "identity_change").unwrap_err();
    assert!(
        err.0
            .contains("expected User to journal changes to [\"email\"] as identity_change"),
        "{err}"
    );
    assert!(
        err.0
            .contains("[\"email\", \"first_name\"] as identity_change"),
        "{err}"
    );
    assert!(check_journals_changes_to::<User>(&["plan"], "billing").is_err());
}

/// The reference's `journaled.event.enqueue` notification: subscribers see committed events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_count_enqueued_events_by_type() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let counts: Arc<Mutex<std::collections::BTreeMap<String, (u64, i32)>>> = Arc::default();
    let c = counts.clone();
    journaled.on_enqueue(move |e| {
        let mut counts = c.lock().unwrap();
        let entry = counts.entry(e.event_type.to_owned()).or_default();
        entry.0 += 1;
        entry.1 = e.priority;
    });
    journal_some(&journaled).await;
    journal!(
        journaled,
        TestEvent {
            name: "now".into(),
            count: 1
        }
    )
    .await
    .unwrap();
    let counts = counts.lock().unwrap().clone();
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [
            ("free_event".to_owned(), (1, 5)),
            ("test_event".to_owned(), (3, 20))
        ]
    );
}

/// Events journaled through a savepoint on the application's own transaction are committed only
/// with it, so they are not reported as enqueued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_on_an_outer_transaction_are_not_reported_early() {
    let db = TestDb::<sqlx::Postgres>::new().await;
    let journaled = db.migrated().await;
    let ((), captured) = capture(async {
        let mut app_tx = db.pool.begin().await.unwrap();
        let mut jtx = journaled.begin_on(&mut app_tx).await.unwrap();
        journal!(
            jtx,
            TestEvent {
                name: "inside".into(),
                count: 1
            }
        )
        .unwrap();
        jtx.commit().await.unwrap();
        app_tx.rollback().await.unwrap();
        let mut app_tx = db.pool.begin().await.unwrap();
        let savepoint = sqlx::Connection::begin(&mut *app_tx).await.unwrap();
        let mut jtx = journaled.wrap(savepoint);
        journal!(
            jtx,
            TestEvent {
                name: "wrapped savepoint".into(),
                count: 1
            }
        )
        .unwrap();
        jtx.commit().await.unwrap();
        app_tx.rollback().await.unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        let mut jtx = journaled.begin_on(&mut conn).await.unwrap();
        journal!(
            jtx,
            TestEvent {
                name: "own transaction".into(),
                count: 1
            }
        )
        .unwrap();
        jtx.commit().await.unwrap();
    })
    .await;
    captured.assert_not(&[
        Expect::event(json!({"name": "inside"})),
        Expect::event(json!({"name": "wrapped savepoint"})),
    ]);
    captured.assert(&[Expect::event(json!({"name": "own transaction"}))]);
}
