//! Capture (issue 15): raw SQL and bulk statements journaled by PostgreSQL's statement-level
//! triggers into journaled's job table, as the same events `tx.audit` makes.

mod common;

use common::kinesis::{Emulator, Kind, kinesis_config};
use common::{TestDb, events, test_config};
use journaled::audit::Change;
use journaled::capture::Capture;
use journaled::{CaptureError, Config, Error, Journaled, tagged, tags, with_actor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Postgres;

const SECRET: &str = "hunter2-very-secret";

const USERS: &str = "CREATE TABLE users (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    first_name text,
    plan text NOT NULL DEFAULT 'free',
    pin text,
    password_digest text,
    token_crypt text,
    api_hmac text,
    settings jsonb,
    last_seen_at text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now())";

/// The same table as a Rust struct, for `tx.audit`.
#[derive(Serialize, Deserialize, Clone, Debug, journaled::Audited)]
#[audited(table = "users", ignore = ["last_seen_at"], sensitive = ["pin"])]
struct User {
    id: i64,
    email: String,
    first_name: Option<String>,
    plan: String,
    pin: Option<String>,
    password_digest: Option<String>,
    token_crypt: Option<String>,
    api_hmac: Option<String>,
    settings: Option<Value>,
    last_seen_at: Option<String>,
    created_at: String,
    updated_at: String,
}

fn users_capture() -> Capture {
    Capture::table("users")
        .ignore(["last_seen_at"])
        .sensitive(["pin"])
}

/// A migrated database with the `users` table and a `Journaled` on it.
async fn setup(config: Config) -> (TestDb<Postgres>, Journaled<Postgres>) {
    let db = TestDb::<Postgres>::new().await;
    let journaled = db.journaled(config);
    journaled.migrate().await.unwrap();
    exec(&db, USERS).await;
    (db, journaled)
}

async fn exec(db: &TestDb<Postgres>, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn try_exec(db: &TestDb<Postgres>, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&db.pool)
        .await
        .map(drop)
}

async fn count(db: &TestDb<Postgres>, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn audit_logs(journaled: &Journaled<Postgres>) -> Vec<Value> {
    events(journaled)
        .await
        .into_iter()
        .filter(|e| e["event_type"] == "journaled_audit_log_event")
        .collect()
}

async fn user(conn: &mut sqlx::PgConnection, id: i64) -> User {
    let text: String = sqlx::query_scalar("SELECT to_json(u)::text FROM users u WHERE id = $1")
        .bind(id)
        .fetch_one(conn)
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

const UPDATE_42: &str = "UPDATE users SET first_name = 'Augusta', pin = '9999', password_digest = NULL, \
     settings = '{\"theme\": \"light\", \"api_token\": \"hunter2-very-secret\", \"n\": [{\"password\": \"x\"}]}', \
     last_seen_at = 'now', updated_at = '2024-02-03T04:05:06.789Z' WHERE id = 42";
const INSERT_43: &str = "INSERT INTO users (id, email, first_name, pin, token_crypt, api_hmac, created_at, updated_at) \
     VALUES (43, 'bob@example.com', 'Bob', 'hunter2-very-secret', 'hunter2-very-secret', 'hunter2-very-secret', \
             '2024-03-04T05:06:07.891Z', '2024-03-04T05:06:07.891Z')";
const DELETE_43: &str = "DELETE FROM users WHERE id = 43";
const RESET_42: &str = "DELETE FROM users; INSERT INTO users (id, email, first_name, pin, password_digest, settings, created_at, updated_at) \
     VALUES (42, 'ada@example.com', 'Ada', '1234', 'hunter2-very-secret', '{\"theme\": \"dark\"}', \
             '2024-01-02T03:04:05.678Z', '2024-01-02T03:04:05.678Z')";

async fn in_scope<F: std::future::Future>(fut: F) -> F::Output {
    tagged(
        tags! { request_id = "req-1" },
        with_actor("gid://app/User/7", fut),
    )
    .await
}

/// One update, one insert and one delete through raw SQL under capture, and the same three
/// through `tx.audit`: the events agree field by field, ids and the deletion's time aside.
async fn raw_sql_makes_the_events_tx_audit_makes() {
    let (db, journaled) = setup(test_config().with_capture_context(true)).await;
    exec(&db, RESET_42).await;
    journaled
        .enable_capture(&users_capture().with_snapshot())
        .await
        .unwrap();
    in_scope(async {
        let mut tx = journaled.begin().await.unwrap();
        for sql in [UPDATE_42, INSERT_43, DELETE_43] {
            sqlx::raw_sql(sql).execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    })
    .await;
    let captured = audit_logs(&journaled).await;
    assert_eq!(captured.len(), 3, "{captured:#?}");

    assert!(journaled.disable_capture("users").await.unwrap());
    exec(&db, RESET_42).await;
    exec(&db, "DELETE FROM journaled.jobs").await;
    in_scope(async {
        let mut tx = journaled.begin().await.unwrap();
        let before = user(&mut tx, 42).await;
        sqlx::raw_sql(UPDATE_42).execute(&mut *tx).await.unwrap();
        let after = user(&mut tx, 42).await;
        tx.audit(Change::update(&before, &after).with_snapshot())
            .unwrap();
        sqlx::raw_sql(INSERT_43).execute(&mut *tx).await.unwrap();
        let inserted = user(&mut tx, 43).await;
        tx.audit(Change::insert(&inserted).with_snapshot()).unwrap();
        sqlx::raw_sql(DELETE_43).execute(&mut *tx).await.unwrap();
        tx.audit(Change::delete(&inserted).with_snapshot()).unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    let audited = audit_logs(&journaled).await;
    assert_eq!(audited.len(), 3, "{audited:#?}");

    for (captured, audited) in captured.iter().zip(&audited) {
        let (c, a) = (captured.as_object().unwrap(), audited.as_object().unwrap());
        let keys = |o: &serde_json::Map<String, Value>| o.keys().cloned().collect::<Vec<_>>();
        let mut ck = keys(c);
        let mut ak = keys(a);
        ck.sort();
        ak.sort();
        assert_eq!(ck, ak, "the same fields");
        for (key, value) in a {
            let timed = key == "created_at" && a["database_operation"] == "delete";
            if key == "id" || timed {
                continue;
            }
            assert_eq!(
                &c[key], value,
                "`{key}` of the {} event",
                a["database_operation"]
            );
        }
        assert_ne!(c["id"], a["id"]);
    }
    // What they agree on is what the rules say.
    let update = &captured[0];
    assert_eq!(update["class_name"], "User");
    assert_eq!(update["table_name"], "users");
    assert_eq!(update["record_id"], "42");
    assert_eq!(update["created_at"], "2024-02-03T04:05:06.789+00:00");
    assert_eq!(update["actor"], "gid://app/User/7");
    assert_eq!(update["tags"], json!({"request_id": "req-1"}));
    assert_eq!(
        update["changes"],
        json!({
            "first_name": ["Ada", "Augusta"],
            "password_digest": ["[FILTERED]", null],
            "pin": ["[FILTERED]", "[FILTERED]"],
            "settings": [{"theme": "dark"}, {"theme": "light", "api_token": "[FILTERED]", "n": [{"password": "[FILTERED]"}]}],
        })
    );
    assert_eq!(captured[1]["created_at"], "2024-03-04T05:06:07.891+00:00");
    assert_eq!(captured[2]["snapshot"]["email"], "bob@example.com");
    assert_no_secret(&journaled).await;
}

async fn assert_no_secret(journaled: &Journaled<Postgres>) {
    for job in journaled.jobs().await.unwrap() {
        assert!(
            !job.records.contains(SECRET),
            "a secret leaked: {}",
            job.records
        );
    }
}

/// Multi-row INSERT, UPDATE and DELETE: one job per statement, one event per changed row, as
/// the library writes jobs.
async fn insert_update_delete_of_many_rows() {
    let (db, journaled) = setup(test_config()).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(
        &db,
        "INSERT INTO users (id, email) VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')",
    )
    .await;
    exec(&db, "UPDATE users SET plan = 'pro' WHERE id <= 2").await;
    exec(&db, "DELETE FROM users").await;
    let logs = audit_logs(&journaled).await;
    let summary: Vec<(String, String)> = logs
        .iter()
        .map(|e| {
            (
                e["database_operation"].as_str().unwrap().to_owned(),
                e["record_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = summary.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("delete", "1"),
            ("delete", "2"),
            ("delete", "3"),
            ("insert", "1"),
            ("insert", "2"),
            ("insert", "3"),
            ("update", "1"),
            ("update", "2")
        ]
        .map(|(o, r)| (o.to_owned(), r.to_owned()))
    );
    let insert = logs.iter().find(|e| e["record_id"] == "1").unwrap();
    assert_eq!(
        insert["changes"],
        json!({"id": [null, 1], "email": [null, "a@x"], "plan": [null, "free"]}),
        "every non-null, non-ignored column"
    );
    assert_eq!(insert["snapshot"], Value::Null);
    let update = logs
        .iter()
        .find(|e| e["database_operation"] == "update")
        .unwrap();
    assert_eq!(update["changes"], json!({"plan": ["free", "pro"]}));
    let delete = logs
        .iter()
        .find(|e| e["database_operation"] == "delete")
        .unwrap();
    assert_eq!(delete["changes"], json!({}));

    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(jobs.len(), 3, "one job per statement");
    assert_eq!(
        jobs.iter().map(|j| j.event_count).collect::<Vec<_>>(),
        [3, 2, 3]
    );
    let ok: bool = sqlx::query_scalar(
        "SELECT bool_and(ready AND bytes = octet_length(records) AND priority = 20 AND run_at <= now() \
                         AND json_array_length(records::json) = event_count) FROM journaled.jobs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(ok, "ready, sized and counted as the library's jobs");
    for job in &jobs {
        for record in job.records().unwrap() {
            let data: Value = serde_json::from_slice(record.data()).unwrap();
            assert_eq!(record.stream, "test_stream");
            assert_eq!(record.id.to_string(), data["id"]);
            assert_eq!(record.partition_key, record.id.to_string());
            assert_eq!(record.id.0.get_version_num(), 7, "UUID v7 ids");
        }
    }
    // Valid against the library's own schemas.
    for event in &logs {
        journaled
            .schemas()
            .validate("journaled_audit_log_event", true, event)
            .unwrap();
    }
    let keys: Vec<&String> = logs[0].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 11);
}

/// Updates that change nothing, or only ignored columns, or no row, journal nothing; with
/// `changes_only_to`, neither do changes to the other columns.
async fn updates_that_change_nothing_journal_nothing() {
    let (db, journaled) = setup(test_config()).await;
    exec(&db, RESET_42).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(&db, "UPDATE users SET email = email, settings = settings").await;
    exec(
        &db,
        "UPDATE users SET last_seen_at = 'today', updated_at = now(), created_at = now()",
    )
    .await;
    exec(&db, "UPDATE users SET plan = 'pro' WHERE false").await;
    exec(&db, "DELETE FROM users WHERE id = 0").await;
    exec(
        &db,
        "INSERT INTO users (id, email) SELECT 1, 'x' WHERE false",
    )
    .await;
    assert!(journaled.jobs().await.unwrap().is_empty());

    journaled
        .enable_capture(&users_capture().changes_only_to(["email"]))
        .await
        .unwrap();
    exec(&db, "UPDATE users SET first_name = 'Augusta'").await;
    assert!(journaled.jobs().await.unwrap().is_empty());
    exec(
        &db,
        "UPDATE users SET first_name = 'Ada', email = 'ada@new.example'",
    )
    .await;
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs.len(), 1);
    assert_eq!(
        logs[0]["changes"],
        json!({"email": ["ada@example.com", "ada@new.example"]})
    );
}

/// A rolled-back transaction, a rolled-back savepoint and a failed statement journal nothing.
async fn rolled_back_statements_journal_nothing() {
    let (db, journaled) = setup(test_config()).await;
    exec(&db, RESET_42).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    let mut tx = journaled.begin().await.unwrap();
    sqlx::query("UPDATE users SET plan = 'pro'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let mut tx = journaled.begin().await.unwrap();
    let mut savepoint = tx.begin().await.unwrap();
    sqlx::query("DELETE FROM users")
        .execute(&mut *savepoint)
        .await
        .unwrap();
    savepoint.rollback().await.unwrap();
    let mut savepoint = tx.begin().await.unwrap();
    let failed = sqlx::query("INSERT INTO users (id, email) VALUES (50, 'x'), (42, 'duplicate')")
        .execute(&mut *savepoint)
        .await;
    assert!(failed.is_err());
    savepoint.rollback().await.unwrap();
    sqlx::query("UPDATE users SET plan = 'team'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs.len(), 1, "{logs:#?}");
    assert_eq!(logs[0]["changes"], json!({"plan": ["free", "team"]}));
}

/// TRUNCATE journals a deletion for every row (with a snapshot when deletions have one).
async fn truncate_journals_a_deletion_per_row() {
    let (db, journaled) = setup(test_config().with_snapshot_on_deletion(true)).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(
        &db,
        "INSERT INTO users (id, email) VALUES (1, 'a@x'), (2, 'b@x')",
    )
    .await;
    exec(&db, "DELETE FROM journaled.jobs").await;
    exec(&db, "TRUNCATE users").await;
    let logs = audit_logs(&journaled).await;
    let mut ids: Vec<&str> = logs
        .iter()
        .map(|e| {
            assert_eq!(e["database_operation"], "delete");
            assert_eq!(e["changes"], json!({}));
            e["record_id"].as_str().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["1", "2"]);
    assert_eq!(logs[0]["snapshot"]["plan"], "free");
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 0);
}

/// A column added after capture was enabled is captured at once; enabling again brings the
/// generated (fast) statements back.
async fn a_new_column_is_captured_at_once() {
    let (db, journaled) = setup(test_config()).await;
    exec(&db, RESET_42).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    assert!(journaled.captures().await.unwrap()[0].current);
    exec(&db, "ALTER TABLE users ADD COLUMN nickname text").await;
    let listed = &journaled.captures().await.unwrap()[0];
    assert!(listed.installed && !listed.current, "{listed:?}");
    exec(&db, "UPDATE users SET nickname = 'Countess'").await;
    exec(&db, "ALTER TABLE users DROP COLUMN first_name").await;
    exec(&db, "UPDATE users SET nickname = 'Ada', plan = 'pro'").await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    assert!(journaled.captures().await.unwrap()[0].current);
    exec(&db, "UPDATE users SET nickname = NULL").await;
    let changes: Vec<Value> = audit_logs(&journaled)
        .await
        .iter()
        .map(|e| e["changes"].clone())
        .collect();
    assert_eq!(
        changes,
        [
            json!({"nickname": [null, "Countess"]}),
            json!({"nickname": ["Countess", "Ada"], "plan": ["free", "pro"]}),
            json!({"nickname": ["Ada", null]}),
        ]
    );

    // A renamed table keeps its capture, under its new name, from any search_path.
    exec(&db, "DELETE FROM journaled.jobs").await;
    exec(&db, "ALTER TABLE users RENAME TO members").await;
    let listed = &journaled.captures().await.unwrap()[0];
    assert!(listed.installed && !listed.current, "{listed:?}");
    exec(
        &db,
        "CREATE SCHEMA elsewhere; CREATE TABLE elsewhere.members (id int PRIMARY KEY)",
    )
    .await;
    exec(
        &db,
        "SET search_path = elsewhere; TRUNCATE public.members; RESET search_path",
    )
    .await;
    journaled
        .enable_capture(&Capture::table("members").class_name("User"))
        .await
        .unwrap();
    exec(&db, "INSERT INTO members (id, email) VALUES (7, 'x'); SET search_path = elsewhere, public; TRUNCATE public.members; RESET search_path").await;
    let logs = audit_logs(&journaled).await;
    let ops: Vec<(&str, &str, &str)> = logs
        .iter()
        .map(|e| {
            (
                e["table_name"].as_str().unwrap(),
                e["database_operation"].as_str().unwrap(),
                e["record_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("members", "delete", "42"),
            ("members", "insert", "7"),
            ("members", "delete", "7")
        ]
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM elsewhere.members").await,
        0
    );
}

/// Enabling twice leaves one set of triggers and updates the options; disabling leaves no
/// trigger, no function and no registration, and the table's writes journal nothing.
async fn enable_is_idempotent_and_disable_leaves_no_trigger() {
    let (db, journaled) = setup(test_config()).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    let info = journaled
        .enable_capture(&users_capture().stream("other_stream").priority(7))
        .await
        .unwrap();
    assert_eq!(
        (info.table.as_str(), info.stream.as_str(), info.priority),
        ("users", "other_stream", 7)
    );
    assert_eq!(info.class_name, "User");
    assert_eq!(
        info.ignore,
        ["last_seen_at", "created_at", "updated_at"].map(String::from)
    );
    assert_eq!(info.sensitive, ["pin"]);
    let triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users'::regclass AND tgname LIKE 'journaled_capture_%'";
    let functions = "SELECT count(*) FROM pg_proc WHERE pronamespace = 'journaled'::regnamespace AND proname ~ '^capture_[0-9]+$'";
    assert_eq!(count(&db, triggers).await, 4);
    assert_eq!(count(&db, functions).await, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM journaled.captures").await,
        1
    );
    exec(&db, "INSERT INTO users (id, email) VALUES (1, 'a@x')").await;
    let job = journaled.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.priority, 7);
    assert_eq!(job.records().unwrap()[0].stream, "other_stream");

    assert!(journaled.disable_capture("users").await.unwrap());
    assert_eq!(count(&db, triggers).await, 0);
    assert_eq!(count(&db, functions).await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM journaled.captures").await,
        0
    );
    assert!(journaled.captures().await.unwrap().is_empty());
    exec(&db, "DELETE FROM journaled.jobs").await;
    exec(&db, "UPDATE users SET plan = 'pro'; DELETE FROM users").await;
    assert!(journaled.jobs().await.unwrap().is_empty());
    assert!(!journaled.disable_capture("users").await.unwrap());

    // A table dropped while captured loses its registration on disable.
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(&db, "DROP TABLE users").await;
    assert!(!journaled.captures().await.unwrap()[0].installed);
    assert!(journaled.disable_capture("users").await.unwrap());
    assert!(journaled.captures().await.unwrap().is_empty());
}

/// A bulk statement is one trigger call, and its events are cut into jobs of at most 500
/// records and 5 MiB.
async fn bulk_statements_are_one_call_in_bounded_jobs() {
    let (db, journaled) = setup(test_config()).await;
    exec(
        &db,
        "INSERT INTO users (id, email) SELECT i, 'user' || i || '@example.com' FROM generate_series(1, 1201) i",
    )
    .await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'pl'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET plan = 'pro'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let calls: i64 = sqlx::query_scalar(
        "SELECT pg_stat_get_xact_function_calls(format('journaled.%I', 'capture_' || 'users'::regclass::oid)::regproc)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(calls, 1, "one trigger call for 1201 rows");
    let jobs = journaled.jobs().await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| j.event_count).collect::<Vec<_>>(),
        [500, 500, 201]
    );

    // Wide rows: the byte limit cuts before the count does.
    exec(&db, "DELETE FROM journaled.jobs").await;
    journaled
        .enable_capture(&users_capture().with_snapshot())
        .await
        .unwrap();
    exec(
        &db,
        "UPDATE users SET first_name = repeat('x', 20000) || id WHERE id <= 400",
    )
    .await;
    let jobs = journaled.jobs().await.unwrap();
    assert!(jobs.len() >= 4, "{} jobs", jobs.len());
    let mut total = 0;
    for job in &jobs {
        let records = job.records().unwrap();
        let bytes: usize = records
            .iter()
            .map(|r| r.data().len() + r.partition_key.len())
            .sum();
        assert!(bytes <= journaled::store::MAX_JOB_BYTES, "{bytes} bytes");
        assert!(records.len() <= journaled::store::MAX_JOB_RECORDS);
        assert_eq!(records.len(), job.event_count as usize);
        total += records.len();
    }
    assert_eq!(total, 400);
    // Such rows are compressed with lz4 where the server has it (migration 3).
    let lz4: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let compression: String = sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute WHERE attrelid = 'journaled.jobs'::regclass AND attname = 'records'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(compression == "l", lz4, "{compression:?}");
}

/// Actor and tags: from the task-local scope in a journaled transaction configured for it
/// (`begin`, `begin_on`, `wrap` + `set_capture_context`), else the fallback.
async fn actor_and_tags_come_from_the_journaled_transaction() {
    let (db, journaled) = setup(test_config().with_capture_context(true)).await;
    exec(&db, RESET_42).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    tagged(
        tags! { request_id = "req-9", job = 3, note = "O'Brien $j0$ é \\ \"x\"" },
        with_actor("gid://app/O'Brien$j0$/1", async {
            let mut tx = journaled.begin().await.unwrap();
            sqlx::query("UPDATE users SET plan = 'a'")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();

            let mut app_tx = db.pool.begin().await.unwrap();
            let mut tx = journaled.begin_on(&mut *app_tx).await.unwrap();
            sqlx::query("UPDATE users SET plan = 'b'")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            app_tx.commit().await.unwrap();

            let mut tx = journaled.wrap(db.pool.begin().await.unwrap());
            tx.set_capture_context().await.unwrap();
            sqlx::query("UPDATE users SET plan = 'c'")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }),
    )
    .await;
    // Without capture context, a journaled transaction is a writer like any other.
    let plain = db.journaled(test_config());
    with_actor("gid://app/Admin/1", async {
        let mut tx = plain.begin().await.unwrap();
        sqlx::query("UPDATE users SET plan = 'd'")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs.len(), 4);
    for log in &logs[..3] {
        assert_eq!(log["actor"], "gid://app/O'Brien$j0$/1");
        assert_eq!(
            log["tags"],
            json!({"request_id": "req-9", "job": 3, "note": "O'Brien $j0$ é \\ \"x\""})
        );
    }
    assert_eq!(logs[3]["actor"], "gid://journaled_test/db/postgres");
}

/// A write from outside journaled (psql, another service) gets the fallback actor and its
/// application_name as a tag; the settings of a finished transaction do not leak into it.
async fn outside_writers_get_the_fallback_actor_and_application_name() {
    let (db, journaled) = setup(test_config().with_capture_context(true)).await;
    exec(&db, RESET_42).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    with_actor("gid://app/Admin/1", async {
        let mut tx = journaled.begin_on(&mut *conn).await.unwrap();
        sqlx::query("UPDATE users SET plan = 'a'")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    sqlx::raw_sql("SET application_name = 'psql'; UPDATE users SET plan = 'b'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs[0]["actor"], "gid://app/Admin/1");
    assert_eq!(logs[1]["actor"], "gid://journaled_test/db/postgres");
    assert_eq!(logs[1]["tags"], json!({"application_name": "psql"}));
}

/// Sensitive values are filtered by the library's rules: the default names (partial,
/// case-insensitive), configured names, `_crypt` and `_hmac`, marked columns, nested keys.
async fn sensitive_values_are_filtered_by_the_same_rules() {
    let (db, journaled) = setup(test_config().with_filter_parameters(["NICK"])).await;
    exec(
        &db,
        "ALTER TABLE users ADD COLUMN nickname text, ADD COLUMN \"Secret_Answer\" text",
    )
    .await;
    journaled
        .enable_capture(&users_capture().with_snapshot())
        .await
        .unwrap();
    exec(
        &db,
        "INSERT INTO users (id, email, pin, password_digest, token_crypt, api_hmac, nickname, \"Secret_Answer\", settings) \
         VALUES (1, 'a@x', 'hunter2-very-secret', 'hunter2-very-secret', 'hunter2-very-secret', 'hunter2-very-secret', \
                 'hunter2-very-secret', 'hunter2-very-secret', '{\"deep\": {\"client_secret\": \"hunter2-very-secret\", \"otp_code\": null}}')",
    )
    .await;
    exec(&db, "UPDATE users SET api_hmac = NULL, pin = 'other'").await;
    let logs = audit_logs(&journaled).await;
    let insert = &logs[0]["changes"];
    for column in [
        "pin",
        "password_digest",
        "token_crypt",
        "api_hmac",
        "nickname",
        "Secret_Answer",
    ] {
        assert_eq!(insert[column], json!([null, "[FILTERED]"]), "{column}");
        assert_eq!(logs[0]["snapshot"][column], "[FILTERED]", "{column}");
    }
    assert_eq!(
        insert["settings"][1],
        json!({"deep": {"client_secret": "[FILTERED]", "otp_code": null}})
    );
    assert_eq!(
        logs[1]["changes"],
        json!({"api_hmac": ["[FILTERED]", null], "pin": ["[FILTERED]", "[FILTERED]"]})
    );
    assert_eq!(
        logs[1]["snapshot"]["api_hmac"],
        Value::Null,
        "a null stays null"
    );
    assert_no_secret(&journaled).await;
}

/// Composite keys are JSON arrays; a changed key is a deletion and an insertion; an upsert
/// journals what it did.
async fn composite_keys_key_changes_and_upserts() {
    let (db, journaled) = setup(test_config()).await;
    exec(
        &db,
        "CREATE TABLE memberships (org_id bigint, user_name text, role text, PRIMARY KEY (org_id, user_name))",
    )
    .await;
    journaled
        .enable_capture(&Capture::table("memberships"))
        .await
        .unwrap();
    exec(&db, "INSERT INTO memberships VALUES (7, 'b\"c', 'member')").await;
    exec(&db, "UPDATE memberships SET role = 'admin'").await;
    let logs = audit_logs(&journaled).await;
    assert_eq!(logs[0]["record_id"], "[7,\"b\\\"c\"]");
    assert_eq!(logs[0]["class_name"], "Membership");
    assert_eq!(logs[1]["changes"], json!({"role": ["member", "admin"]}));

    exec(&db, RESET_42).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(&db, "DELETE FROM journaled.jobs").await;
    exec(&db, "UPDATE users SET id = 99 WHERE id = 42").await;
    let logs = audit_logs(&journaled).await;
    let ops: Vec<(&str, &str)> = logs
        .iter()
        .map(|e| {
            (
                e["database_operation"].as_str().unwrap(),
                e["record_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ops.len(), 2);
    assert!(
        ops.contains(&("delete", "42")) && ops.contains(&("insert", "99")),
        "{ops:?}"
    );

    exec(&db, "DELETE FROM journaled.jobs").await;
    exec(
        &db,
        "INSERT INTO users (id, email) VALUES (99, 'upsert@x'), (100, 'new@x') \
         ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email",
    )
    .await;
    let logs = audit_logs(&journaled).await;
    let mut ops: Vec<(&str, &str)> = logs
        .iter()
        .map(|e| {
            (
                e["database_operation"].as_str().unwrap(),
                e["record_id"].as_str().unwrap(),
            )
        })
        .collect();
    ops.sort();
    assert_eq!(ops, [("insert", "100"), ("update", "99")]);
    let update = logs.iter().find(|e| e["record_id"] == "99").unwrap();
    assert_eq!(
        update["changes"],
        json!({"email": ["ada@example.com", "upsert@x"]})
    );
}

/// Captured events are delivered by the worker and read back from the stream, byte for byte.
async fn captured_events_are_delivered_by_the_worker() {
    let emulator = Emulator::start(Kind::Kinesalite).await;
    emulator.create_stream("test_stream", 2).await;
    let (db, journaled) = setup(test_config()).await;
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(
        &db,
        "INSERT INTO users (id, email) SELECT i, 'user' || i || '@example.com' FROM generate_series(1, 1100) i",
    )
    .await;
    exec(&db, "UPDATE users SET plan = 'pro' WHERE id % 10 = 0").await;
    let mut stored = std::collections::HashMap::new();
    for job in journaled.jobs().await.unwrap() {
        for record in job.records().unwrap() {
            stored.insert(record.id.to_string(), record.data().to_vec());
        }
    }
    assert_eq!(stored.len(), 1210);
    let sink =
        journaled::kinesis::KinesisSink::new(kinesis_config(&emulator.endpoint()).client().await);
    let worker = journaled::Worker::new(
        db.pool.clone(),
        sink,
        journaled::WorkerConfig::default().with_drain(true),
    )
    .unwrap();
    worker.run(std::future::pending()).await.unwrap();
    let records = emulator.read("test_stream").await;
    assert_eq!(records.len(), 1210);
    for record in &records {
        let data: Value = serde_json::from_slice(&record.data).unwrap();
        let id = data["id"].as_str().unwrap();
        assert_eq!(stored[id], record.data, "the stored bytes");
        assert_eq!(record.partition_key, id);
        assert_eq!(data["table_name"], "users");
    }
    assert!(journaled.jobs().await.unwrap().is_empty());
}

/// Every refusal names the table and the problem.
async fn bad_captures_are_refused_with_the_table_named() {
    let db = TestDb::<Postgres>::new().await;
    let journaled = db.journaled(test_config());
    let err = journaled
        .enable_capture(&users_capture())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated), "{err}");
    journaled.migrate().await.unwrap();
    exec(&db, USERS).await;

    let refused = |capture: Capture| {
        let journaled = journaled.clone();
        async move {
            match journaled.enable_capture(&capture).await {
                Err(Error::Capture(e)) => e,
                other => panic!("{other:?}"),
            }
        }
    };
    let err = refused(Capture::table("nope")).await;
    assert_eq!(
        err,
        CaptureError::NoSuchTable {
            table: "nope".into()
        }
    );
    assert!(err.to_string().contains("no table nope"), "{err}");
    exec(
        &db,
        "CREATE VIEW user_emails AS SELECT id, email FROM users",
    )
    .await;
    let err = refused(Capture::table("user_emails")).await;
    assert_eq!(
        err,
        CaptureError::NotATable {
            table: "user_emails".into()
        }
    );
    exec(&db, "CREATE TABLE events_log (at timestamptz, what text)").await;
    let err = refused(Capture::table("events_log")).await;
    assert_eq!(
        err,
        CaptureError::NoPrimaryKey {
            table: "events_log".into()
        }
    );
    assert!(
        err.to_string()
            .contains("table events_log has no primary key"),
        "{err}"
    );
    let err = refused(
        Capture::table("users")
            .ignore(["last_seen", "email"])
            .sensitive(["ssn"])
            .changes_only_to(["nope"]),
    )
    .await;
    assert_eq!(
        err,
        CaptureError::UnknownColumns {
            table: "users".into(),
            columns: ["last_seen", "nope", "ssn"].map(String::from).to_vec()
        }
    );
    assert!(
        err.to_string()
            .contains("table users has no column last_seen, nope, ssn"),
        "{err}"
    );
    let no_stream = Journaled::new(db.pool.clone(), Config::default());
    match no_stream.enable_capture(&users_capture()).await {
        Err(Error::Capture(CaptureError::MissingStreamName { table })) => {
            assert_eq!(table, "users")
        }
        other => panic!("{other:?}"),
    }
    let err = refused(users_capture().stream("no spaces")).await;
    assert!(
        matches!(err, CaptureError::InvalidStreamName { .. }),
        "{err}"
    );
    assert!(
        journaled.captures().await.unwrap().is_empty(),
        "nothing was installed"
    );

    // The SQL function refuses a missing stream itself, for applications' SQL migrations.
    let err = try_exec(&db, "SELECT journaled.enable_capture('users', '{}')")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("table users needs a valid stream name"),
        "{err}"
    );
    let sql = users_capture().enable_sql(&test_config()).unwrap();
    exec(&db, &sql).await;
    assert_eq!(journaled.captures().await.unwrap()[0].stream, "test_stream");
}

/// Failures at write time fail the statement, with the table named: an event over the record
/// limit, tags that are not a JSON object, a registration gone, a primary key dropped.
async fn writes_that_cannot_be_journaled_fail_their_statement() {
    let (db, journaled) = setup(test_config().with_max_record_size(4096)).await;
    exec(&db, RESET_42).await;
    journaled
        .enable_capture(&users_capture().with_snapshot())
        .await
        .unwrap();
    let err = try_exec(&db, "UPDATE users SET first_name = repeat('x', 5000)")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the audit event of users record 42 is"),
        "{err}"
    );
    assert!(
        err.to_string().contains("over the 4096-byte record limit"),
        "{err}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM users WHERE length(first_name) > 100"
        )
        .await,
        0
    );

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('journaled.actor', 'gid://x', true), set_config('journaled.tags', '[1]', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query("UPDATE users SET plan = 'pro'")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("journaled.tags is not a JSON object"),
        "{err}"
    );
    tx.rollback().await.unwrap();

    // The generated trigger function carries its settings; once the table changed, it needs
    // the registration to build its statement, and says so when it is gone.
    exec(&db, "DELETE FROM journaled.captures").await;
    exec(&db, "UPDATE users SET plan = 'team'").await;
    assert_eq!(audit_logs(&journaled).await.len(), 1);
    exec(&db, "ALTER TABLE users ADD COLUMN nickname text").await;
    let err = try_exec(&db, "UPDATE users SET plan = 'pro'")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("users has capture triggers but is not in journaled.captures"),
        "{err}"
    );
    journaled.enable_capture(&users_capture()).await.unwrap();
    exec(&db, "ALTER TABLE users DROP CONSTRAINT users_pkey").await;
    let err = try_exec(&db, "UPDATE users SET plan = 'pro'")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("table users has no primary key"),
        "{err}"
    );
    assert_eq!(
        audit_logs(&journaled).await.len(),
        1,
        "only the `team` update"
    );
}

macro_rules! postgres_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name().await;
            }
        )*
    };
}

mod postgres {
    postgres_tests!(
        raw_sql_makes_the_events_tx_audit_makes,
        insert_update_delete_of_many_rows,
        updates_that_change_nothing_journal_nothing,
        rolled_back_statements_journal_nothing,
        truncate_journals_a_deletion_per_row,
        a_new_column_is_captured_at_once,
        enable_is_idempotent_and_disable_leaves_no_trigger,
        bulk_statements_are_one_call_in_bounded_jobs,
        actor_and_tags_come_from_the_journaled_transaction,
        outside_writers_get_the_fallback_actor_and_application_name,
        sensitive_values_are_filtered_by_the_same_rules,
        composite_keys_key_changes_and_upserts,
        captured_events_are_delivered_by_the_worker,
        bad_captures_are_refused_with_the_table_named,
        writes_that_cannot_be_journaled_fail_their_statement,
    );
}
