//! Change journaling and audit logs (issue 5), on PostgreSQL and SQLite.

mod common;

use common::kinesis::{Emulator, Kind, kinesis_config};
use common::{AppSql, TestDb, events, test_config};
use journaled::audit::{Audited, Change, with_snapshots, without_audit_logging};
use journaled::{Backend, Config, Journaled, tagged, tags, with_actor};
use serde::Serialize;
use serde_json::{Value, json};

const SECRET: &str = "hunter2-very-secret";

#[derive(Serialize, Clone, journaled::Audited)]
#[audited(table = "users", ignore = ["last_synced_at"], sensitive = ["pin"])]
#[journal_changes_to(email, first_name, as = "identity_change")]
#[journal_changes_to(plan, as = "plan_change", tagged)]
struct User {
    id: i64,
    email: String,
    first_name: String,
    plan: String,
    password_digest: Option<String>,
    token_crypt: Option<String>,
    pin: Option<String>,
    last_synced_at: Option<String>,
    created_at: String,
    updated_at: String,
}

fn user() -> User {
    User {
        id: 42,
        email: "ada@example.com".into(),
        first_name: "Ada".into(),
        plan: "free".into(),
        password_digest: Some(SECRET.into()),
        token_crypt: Some(SECRET.into()),
        pin: Some(SECRET.into()),
        last_synced_at: None,
        created_at: "2024-01-02T03:04:05.678Z".into(),
        updated_at: "2024-01-02T03:04:05.678Z".into(),
    }
}

fn config() -> Config {
    test_config().with_filter_parameters(["PASSW"])
}

async fn setup<DB: Backend + AppSql>(db: &TestDb<DB>, config: Config) -> Journaled<DB> {
    db.migrated().await;
    db.journaled(config)
}

async fn audit_logs<DB: Backend>(journaled: &Journaled<DB>) -> Vec<Value> {
    by_type(journaled, "journaled_audit_log_event").await
}

async fn by_type<DB: Backend>(journaled: &Journaled<DB>, event_type: &str) -> Vec<Value> {
    events(journaled)
        .await
        .into_iter()
        .filter(|e| e["event_type"] == event_type)
        .collect()
}

/// Insert, update and delete, each with the reference's fields; secrets filtered everywhere.
async fn audit_log_events_follow_the_reference<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let before = user();
    let mut after = user();
    after.first_name = "Augusta".into();
    after.pin = Some("other-secret".into());
    after.password_digest = None;
    after.last_synced_at = Some("now".into()); // ignored by the type
    after.updated_at = "2024-02-03T04:05:06.789+01:00".into(); // ignored by default

    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::insert(&before)).unwrap();
    tx.audit(Change::update(&before, &after)).unwrap();
    tx.audit(Change::delete(&after)).unwrap();
    tx.commit().await.unwrap();

    let logs = audit_logs(&journaled).await;
    assert_eq!(logs.len(), 3);
    let insert = &logs[0];
    assert_eq!(insert["class_name"], "User");
    assert_eq!(insert["table_name"], "users");
    assert_eq!(insert["record_id"], "42");
    assert_eq!(insert["database_operation"], "insert");
    assert_eq!(
        insert["created_at"], "2024-01-02T03:04:05.678+00:00",
        "the record's created_at"
    );
    assert_eq!(insert["changes"]["email"], json!([null, "ada@example.com"]));
    assert_eq!(
        insert["changes"]["password_digest"],
        json!([null, "[FILTERED]"])
    );
    assert_eq!(
        insert["changes"]["token_crypt"],
        json!([null, "[FILTERED]"])
    );
    assert_eq!(insert["changes"]["pin"], json!([null, "[FILTERED]"]));
    assert!(
        insert["changes"].get("created_at").is_none()
            && insert["changes"].get("last_synced_at").is_none()
    );
    assert_eq!(insert["snapshot"], Value::Null);
    assert_eq!(insert["actor"], format!("gid://{}", journaled::app_name()));
    assert_eq!(insert["tags"], json!({}));

    let update = &logs[1];
    assert_eq!(update["database_operation"], "update");
    assert_eq!(
        update["created_at"], "2024-02-03T04:05:06.789+01:00",
        "the record's updated_at"
    );
    assert_eq!(
        update["changes"],
        json!({
            "first_name": ["Ada", "Augusta"],
            "password_digest": ["[FILTERED]", null],
            "pin": ["[FILTERED]", "[FILTERED]"],
        })
    );

    let delete = &logs[2];
    assert_eq!(delete["database_operation"], "delete");
    assert_eq!(delete["changes"], json!({}));
    assert_eq!(delete["snapshot"], Value::Null);
    let age = time::OffsetDateTime::now_utc()
        - time::OffsetDateTime::parse(
            delete["created_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
    assert!(age.whole_seconds() < 60, "a deletion is dated now");

    assert_no_secret(&journaled).await;
}

async fn assert_no_secret<DB: Backend>(journaled: &Journaled<DB>) {
    for job in journaled.jobs().await.unwrap() {
        assert!(
            !job.records.contains(SECRET) && !job.records.contains("other-secret"),
            "a secret leaked: {}",
            job.records
        );
    }
}

/// Only ignored columns changed: no audit event.
async fn ignored_only_updates_emit_nothing<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let before = user();
    let mut after = user();
    after.updated_at = "2025-01-01T00:00:00Z".into();
    after.last_synced_at = Some("2025-01-01".into());
    let mut tx = journaled.begin().await.unwrap();
    assert!(
        tx.audit(Change::update(&before, &after))
            .unwrap()
            .is_empty()
    );
    tx.commit().await.unwrap();
    assert!(journaled.jobs().await.unwrap().is_empty());

    // The default ignored columns can be replaced globally.
    let journaled = db.journaled(config().with_default_ignored_columns(["plan"]));
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::update(&before, &after)).unwrap();
    after.plan = "pro".into();
    tx.audit(Change::update(&before, &after)).unwrap();
    tx.commit().await.unwrap();
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs.len(), 2);
    assert_eq!(
        logs[0]["changes"],
        json!({"updated_at": ["2024-01-02T03:04:05.678Z", "2025-01-01T00:00:00Z"]})
    );
    assert!(
        logs[1]["changes"].get("plan").is_none(),
        "plan is ignored now"
    );
}

async fn snapshots_per_call_per_scope_and_on_deletion<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let before = user();
    let mut after = user();
    after.email = "augusta@example.com".into();
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::update(&before, &after).with_snapshot())
        .unwrap();
    tx.audit(Change::delete(&after)).unwrap();
    with_snapshots(async {
        tx.audit(Change::update(&after, &before)).unwrap();
    })
    .await;
    tx.audit(Change::update(&before, &after)).unwrap();
    tx.commit().await.unwrap();
    let snapshots: Vec<Value> = audit_logs(&journaled)
        .await
        .iter()
        .map(|e| e["snapshot"].clone())
        .collect();
    assert_eq!(snapshots[0]["email"], "augusta@example.com");
    assert_eq!(snapshots[0]["pin"], "[FILTERED]");
    assert_eq!(
        snapshots[0]["last_synced_at"],
        Value::Null,
        "a null stays null"
    );
    assert_eq!(
        snapshots[0]["created_at"], "2024-01-02T03:04:05.678Z",
        "a snapshot has every column"
    );
    assert_eq!(
        snapshots[1],
        Value::Null,
        "deletions have none unless configured"
    );
    assert_eq!(
        snapshots[2]["email"], "ada@example.com",
        "with_snapshots scope"
    );
    assert_eq!(snapshots[3], Value::Null, "the scope ended");

    let journaled = db.journaled(config().with_snapshot_on_deletion(true));
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::delete(&after)).unwrap();
    tx.commit().await.unwrap();
    let last = audit_logs(&journaled).await.pop().unwrap();
    assert_eq!(last["database_operation"], "delete");
    assert_eq!(last["snapshot"]["email"], "augusta@example.com");
    assert_eq!(last["snapshot"]["password_digest"], "[FILTERED]");
    assert_no_secret(&journaled).await;
}

/// Change journaling: create → every watched attribute; update → the changed ones, nothing if
/// none; delete → as they were. `changes` is a JSON string; tagged declarations carry tags.
async fn change_journaling_rules<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let before = user();
    let mut renamed = user();
    renamed.first_name = "Augusta".into();
    let mut upgraded = renamed.clone();
    upgraded.plan = "pro".into();
    let mut untracked = upgraded.clone();
    untracked.token_crypt = None;

    tagged(tags! { request_id = "req-7" }, async {
        let mut tx = journaled.begin().await.unwrap();
        tx.audit(Change::insert(&before)).unwrap();
        tx.audit(Change::update(&before, &renamed)).unwrap();
        tx.audit(Change::update(&renamed, &upgraded)).unwrap();
        tx.audit(Change::update(&upgraded, &untracked)).unwrap();
        tx.audit(Change::delete(&untracked)).unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    let changes = by_type(&journaled, "journaled_change").await;
    let summary: Vec<(String, String, Value)> = changes
        .iter()
        .map(|c| {
            (
                c["database_operation"].as_str().unwrap().to_owned(),
                c["logical_operation"].as_str().unwrap().to_owned(),
                serde_json::from_str(c["changes"].as_str().expect("changes is a JSON string"))
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "create".into(),
                "identity_change".into(),
                json!({"email": "ada@example.com", "first_name": "Ada"})
            ),
            (
                "create".into(),
                "plan_change".into(),
                json!({"plan": "free"})
            ),
            (
                "update".into(),
                "identity_change".into(),
                json!({"first_name": "Augusta"})
            ),
            (
                "update".into(),
                "plan_change".into(),
                json!({"plan": "pro"})
            ),
            (
                "delete".into(),
                "identity_change".into(),
                json!({"email": "ada@example.com", "first_name": "Augusta"})
            ),
            (
                "delete".into(),
                "plan_change".into(),
                json!({"plan": "pro"})
            ),
        ]
    );
    assert!(
        changes
            .iter()
            .all(|c| c["table_name"] == "users" && c["record_id"] == "42")
    );
    for change in &changes {
        if change["logical_operation"] == "plan_change" {
            assert_eq!(change["tags"], json!({"request_id": "req-7"}));
        } else {
            assert!(
                change.get("tags").is_none(),
                "untagged declarations carry no tags"
            );
        }
    }
    assert_eq!(User::CHANGES.len(), 2);
}

async fn without_audit_logging_suppresses_only_audit_logs<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let before = user();
    let mut after = user();
    after.email = "x@example.com".into();
    without_audit_logging(async {
        let mut tx = journaled.begin().await.unwrap();
        tx.audit(Change::update(&before, &after)).unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    assert!(audit_logs(&journaled).await.is_empty());
    assert_eq!(by_type(&journaled, "journaled_change").await.len(), 1);
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::update(&before, &after)).unwrap();
    tx.commit().await.unwrap();
    assert_eq!(audit_logs(&journaled).await.len(), 1, "the scope ended");
}

async fn actor_and_tags_are_those_of_the_change<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    tagged(
        tags! { request_id = "req-1" },
        with_actor("gid://app/AdminUser/7", async {
            let mut tx = journaled.begin().await.unwrap();
            tx.audit(Change::insert(&user())).unwrap();
            tx.commit().await.unwrap();
        }),
    )
    .await;
    let log = &audit_logs(&journaled).await[0];
    assert_eq!(log["actor"], "gid://app/AdminUser/7");
    assert_eq!(log["tags"], json!({"request_id": "req-1"}));
}

async fn rolled_back_changes_emit_nothing<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::insert(&user())).unwrap();
    tx.rollback().await.unwrap();
    let mut tx = journaled.begin().await.unwrap();
    let mut savepoint = tx.begin().await.unwrap();
    savepoint.audit(Change::delete(&user())).unwrap();
    savepoint.rollback().await.unwrap();
    tx.commit().await.unwrap();
    assert!(journaled.jobs().await.unwrap().is_empty());
}

/// Delivered later, under another actor and other tags: the events keep the actor, tags and
/// created_at of the moment of the change.
async fn delivery_later_keeps_the_moment_of_the_change<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 1).await;
    let journaled = setup(db, config()).await;
    let mut after = user();
    after.email = "new@example.com".into();
    after.updated_at = "2024-05-06T07:08:09.123Z".into();
    tagged(
        tags! { request_id = "at-change" },
        with_actor("gid://app/User/1", async {
            let mut tx = journaled.begin().await.unwrap();
            tx.audit(Change::update(&user(), &after)).unwrap();
            tx.commit().await.unwrap();
        }),
    )
    .await;
    let sink =
        journaled::kinesis::KinesisSink::new(kinesis_config(&emulator.endpoint()).client().await);
    let worker = journaled::Worker::new(
        db.pool.clone(),
        sink,
        journaled::WorkerConfig::default().with_drain(true),
    )
    .unwrap();
    tagged(
        tags! { request_id = "at-delivery" },
        with_actor("gid://app/Worker/9", worker.run(std::future::pending())),
    )
    .await
    .unwrap();
    let records = emulator.read("test_stream").await;
    let delivered: Vec<Value> = records
        .iter()
        .map(|r| serde_json::from_slice(&r.data).unwrap())
        .collect();
    assert_eq!(delivered.len(), 2);
    let log = delivered
        .iter()
        .find(|e| e["event_type"] == "journaled_audit_log_event")
        .unwrap();
    assert_eq!(log["actor"], "gid://app/User/1");
    assert_eq!(log["tags"], json!({"request_id": "at-change"}));
    assert_eq!(log["created_at"], "2024-05-06T07:08:09.123+00:00");
    let change = delivered
        .iter()
        .find(|e| e["event_type"] == "journaled_change")
        .unwrap();
    assert_eq!(change["actor"], "gid://app/User/1");
}

on_both_backends!(
    audit_log_events_follow_the_reference,
    ignored_only_updates_emit_nothing,
    snapshots_per_call_per_scope_and_on_deletion,
    change_journaling_rules,
    without_audit_logging_suppresses_only_audit_logs,
    actor_and_tags_are_those_of_the_change,
    rolled_back_changes_emit_nothing,
    delivery_later_keeps_the_moment_of_the_change,
);

#[derive(Serialize, Clone, journaled::Audited)]
#[serde(rename_all = "camelCase")]
#[audited(table = "accounts")]
#[journal_changes_to(display_name, as = "rename")]
struct Account {
    id: i64,
    display_name: String,
    #[serde(rename = "pinCode")]
    #[audited(sensitive)]
    pin: String,
    settings: Value,
    #[serde(skip)]
    #[allow(dead_code)]
    cache: u8,
}

/// Columns are the serialized names; nested keys are filtered too; the defaults filter
/// passwords and tokens without configuration.
async fn filtering_follows_serde_names_nesting_and_defaults<DB: Backend + AppSql>(db: &TestDb<DB>) {
    db.migrated().await;
    let journaled = db.journaled(test_config()); // no filter parameters configured
    let before = Account {
        id: 7,
        display_name: "A".into(),
        pin: SECRET.into(),
        settings: json!({"theme": "dark", "api_token": SECRET, "nested": [{"password": SECRET}]}),
        cache: 0,
    };
    let mut after = before.clone();
    after.display_name = "B".into();
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::insert(&before)).unwrap();
    tx.audit(Change::update(&before, &after).with_snapshot())
        .unwrap();
    tx.commit().await.unwrap();
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs[0]["changes"]["pinCode"], json!([null, "[FILTERED]"]));
    assert_eq!(
        logs[0]["changes"]["settings"][1],
        json!({"theme": "dark", "api_token": "[FILTERED]", "nested": [{"password": "[FILTERED]"}]})
    );
    assert!(logs[0]["changes"].get("cache").is_none());
    assert_eq!(logs[1]["changes"], json!({"displayName": ["A", "B"]}));
    assert_eq!(logs[1]["snapshot"]["pinCode"], "[FILTERED]");
    let change = &by_type(&journaled, "journaled_change").await[1];
    assert_eq!(change["changes"], "{\"displayName\":\"B\"}");
    assert_no_secret(&journaled).await;
}

on_both_backends!(filtering_follows_serde_names_nesting_and_defaults);

#[derive(Serialize, journaled::Audited)]
#[audited(table = "profiles")]
#[journal_changes_to(nickname, as = "nickname_change")]
struct Profile {
    id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nickname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f64>,
}

/// A field that disappears from the serialized record (`skip_serializing_if`, Some → None) is
/// a change to null, in the audit log and in change journaling; and a NaN is refused, not
/// logged as null.
async fn a_field_that_disappears_is_a_change<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = setup(db, config()).await;
    let before = Profile {
        id: 7,
        nickname: Some("ada".into()),
        score: None,
    };
    let after = Profile {
        id: 7,
        nickname: None,
        score: None,
    };
    let mut tx = journaled.begin().await.unwrap();
    tx.audit(Change::update(&before, &after)).unwrap();
    let nan = Profile {
        id: 7,
        nickname: None,
        score: Some(f64::NAN),
    };
    let err = tx.audit(Change::update(&after, &nan)).unwrap_err();
    assert!(err.to_string().contains("/score"), "{err}");
    tx.commit().await.unwrap();
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs.len(), 1, "{logs:#?}");
    assert_eq!(logs[0]["changes"], json!({"nickname": ["ada", null]}));
    let changes = by_type(&journaled, "journaled_change").await;
    assert_eq!(changes.len(), 1, "{changes:#?}");
    let changed: Value = serde_json::from_str(changes[0]["changes"].as_str().unwrap()).unwrap();
    assert_eq!(changed, json!({"nickname": null}));
}

on_both_backends!(a_field_that_disappears_is_a_change);

/// A hand-written impl naming a column the type does not have is refused at start-up.
#[test]
fn declarations_are_checked_against_the_columns() {
    #[derive(Serialize)]
    struct Account {
        id: i64,
        name: String,
    }
    impl Audited for Account {
        const CLASS_NAME: &'static str = "Account";
        const TABLE_NAME: &'static str = "accounts";
        const CHANGES: &'static [journaled::audit::ChangeDeclaration] =
            &[journaled::audit::ChangeDeclaration {
                logical_operation: "rename",
                attributes: &["name", "nickname"],
                tagged: false,
            }];
        fn record_id(&self) -> String {
            self.id.to_string()
        }
    }
    let err = journaled::audit::check_declarations(&Account {
        id: 1,
        name: "a".into(),
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("Account declares columns it does not have: nickname"),
        "{err}"
    );
    journaled::audit::check_declarations(&user()).unwrap();
}
