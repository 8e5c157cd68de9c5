//! The `journaled` binary, run as a user would.

mod common;

use std::process::Command;

fn cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_journaled"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("JOURNALED_SCHEMA_PATH")
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn schemas_check_reports_each_broken_file() {
    let out = cli()
        .args(["schemas", "check", "--path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/broken_schemas"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("BROKEN")
            && stdout.contains("truncated.json")
            && stdout.contains("not valid JSON"),
        "{stdout}"
    );
    assert!(stdout.contains("bad_type.json"), "{stdout}");
    assert!(
        stdout.contains("ok      ") && stdout.contains("fine.json"),
        "{stdout}"
    );
    assert!(stdout.contains("2 broken"), "{stdout}");

    let out = cli()
        .args(["schemas", "check"])
        .env(
            "JOURNALED_SCHEMA_PATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/journaled_schemas"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_runs_twice_on_postgres_and_sqlite() {
    let pg = common::TestDb::<sqlx::Postgres>::new().await;
    let sqlite = common::TestDb::<sqlx::Sqlite>::new().await;
    for url in [pg.url(), sqlite.url()] {
        for _ in 0..2 {
            let out = cli()
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
        }
    }
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM journaled.schema_migrations")
        .fetch_one(&pg.pool)
        .await
        .unwrap();
    assert_eq!(count, 9, "every embedded migration, once");
}

/// `journaled capture enable|list|disable` on PostgreSQL, as an operator runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_enable_list_and_disable_from_the_cli() {
    let pg = common::TestDb::<sqlx::Postgres>::new().await;
    let run = |args: &[&str]| {
        let out = cli()
            .args(args)
            .env("DATABASE_URL", pg.url())
            .env("JOURNALED_STREAM_NAME", "cli_stream")
            .env_remove("JOURNALED_APP_NAME")
            .env_remove("JOURNALED_JOB_PRIORITY")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(run(&["migrate"]).0, Some(0));
    sqlx::raw_sql(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, first_name text, ssn text, last_seen_at text); \
         INSERT INTO users VALUES (1, 'a@x', 'Ada', '123-45-6789', NULL)",
    )
    .execute(&pg.pool)
    .await
    .unwrap();
    let enable = [
        "capture",
        "enable",
        "users",
        "--ignore",
        "last_seen_at",
        "--sensitive",
        "ssn",
        "--snapshot",
        "--changes-only-to",
        "email,first_name",
        "--priority",
        "7",
    ];
    for _ in 0..2 {
        let (code, stdout, stderr) = run(&enable);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stdout.contains("capturing users into stream cli_stream (priority 7, class User)"),
            "{stdout}"
        );
    }
    let (code, stdout, _) = run(&["capture", "list"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("users  stream cli_stream  priority 7  class User  ignore last_seen_at,created_at,updated_at  sensitive ssn  changes only to email,first_name  snapshot"),
        "{stdout}"
    );
    let (_, stdout, _) = run(&["capture", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed[0]["table"], "users");
    assert_eq!(listed[0]["installed"], true);

    sqlx::raw_sql(
        "UPDATE users SET first_name = 'Augusta', ssn = '987-65-4321', last_seen_at = 'now'",
    )
    .execute(&pg.pool)
    .await
    .unwrap();
    let (priority, records): (i32, String) =
        sqlx::query_as("SELECT priority, records FROM journaled.jobs")
            .fetch_one(&pg.pool)
            .await
            .unwrap();
    assert_eq!(priority, 7);
    let records: serde_json::Value = serde_json::from_str(&records).unwrap();
    let event = &records[0]["data"];
    assert_eq!(records[0]["stream"], "cli_stream");
    assert_eq!(
        event["changes"],
        serde_json::json!({"first_name": ["Ada", "Augusta"]})
    );
    assert_eq!(event["snapshot"]["ssn"], "[FILTERED]");
    let database = pg.url().rsplit('/').next().unwrap().to_owned();
    assert_eq!(event["actor"], format!("gid://{database}/db/postgres"));

    let (code, stdout, _) = run(&["capture", "disable", "users"]);
    assert_eq!(
        (code, stdout.trim()),
        (Some(0), "journaled: capture disabled on users")
    );
    let (_, stdout, _) = run(&["capture", "disable", "users"]);
    assert_eq!(stdout.trim(), "journaled: users was not under capture");
    let (_, stdout, _) = run(&["capture", "list"]);
    assert_eq!(stdout.trim(), "no table is under capture");

    let (code, _, stderr) = run(&["capture", "enable", "nope"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim(), "journaled: capture: there is no table nope");
    let (code, _, stderr) = run(&["capture", "enable", "users", "--ignore", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("table users has no column nope"),
        "{stderr}"
    );
}

#[test]
fn capture_is_postgresql_only() {
    let out = cli()
        .args(["capture", "enable", "users"])
        .env("DATABASE_URL", "sqlite://nowhere.db")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("capture is PostgreSQL only") && stderr.contains("tx.audit"),
        "{stderr}"
    );
}

/// On a database nobody migrated, every command but `migrate` says in one line to run
/// `journaled migrate`, and none of them creates a SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_says_to_run_migrate() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("unmigrated-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for args in [
        &["status"][..],
        &["retry", "--all-dead"],
        &["worker", "--drain"],
    ] {
        let out = cli()
            .args(args)
            .current_dir(&dir)
            .env("JOURNALED_STREAM_NAME", "s")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("journaled migrate"), "{args:?}: {stderr}");
        assert!(
            !dir.join("journaled.db").exists(),
            "{args:?} created a database file"
        );
    }
    // A PostgreSQL database without journaled's tables.
    let pg = common::TestDb::<sqlx::Postgres>::new().await;
    for args in [&["status"][..], &["worker", "--drain"]] {
        let out = cli()
            .args(args)
            .env("DATABASE_URL", pg.url())
            .env("JOURNALED_STREAM_NAME", "s")
            .env("AWS_ENDPOINT_URL_KINESIS", "http://127.0.0.1:9")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains("journaled migrate"), "{args:?}: {stderr}");
    }
    // `migrate` is the one command that creates the file.
    let out = cli().arg("migrate").current_dir(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("journaled.db").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_never_shows_the_database_password() {
    let out = cli()
        .args(["worker", "--help"])
        .env("DATABASE_URL", "postgres://u:hunter2@h/db")
        .env("JOURNALED_IAM_ROLE_ARN", "arn:aws:iam::1:role/secret-role")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("--database-url"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("secret-role"),
        "{stdout}"
    );
}

#[test]
fn without_database_url_the_cli_uses_a_sqlite_file_here() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-default-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = cli().arg("migrate").current_dir(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("journaled.db").exists());
    let out = cli()
        .args(["status", "--json"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"pending_jobs\":0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_database_urls_exit_with_one_clear_line() {
    let out = cli()
        .arg("migrate")
        .env("DATABASE_URL", "mysql://u:pw@h/db")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL must start with") && !stderr.contains("pw"),
        "{stderr}"
    );

    for url in [
        "host=127.0.0.1 port=1 password=hunter2 dbname=none",
        "postgres://nobody:pa?hunter2@127.0.0.1:1/none",
    ] {
        let out = cli()
            .arg("migrate")
            .env("DATABASE_URL", url)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{url}: {stderr}");
    }

    let out = cli()
        .arg("migrate")
        .env("DATABASE_URL", "postgres://nobody:hunter2@127.0.0.1:1/none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("cannot connect") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

/// `journaled status | head -1`: the reader gone, the command ends quietly with SIGPIPE's
/// status (141), not a panic (101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly() {
    let db = common::TestDb::<sqlx::Sqlite>::new().await;
    db.migrated().await;
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["schemas", "check"],
    ] {
        let mut child = cli()
            .args(args)
            .env("DATABASE_URL", db.url())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before the first line
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}: quietly");
    }
}

mod worker_binary {
    use super::*;
    use crate::common::TestDb;
    use crate::common::kinesis::{Emulator, FakeSts, FaultProxy, Kind};
    use journaled::{Journaled, journal};
    use std::process::{Child, Stdio};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[derive(serde::Serialize, journaled::Event)]
    struct TestEvent {
        name: String,
        count: i64,
    }

    fn worker(db_url: &str, endpoint: &str) -> Command {
        let mut cmd = cli();
        cmd.arg("worker")
            .env("DATABASE_URL", db_url)
            .env("JOURNALED_STREAM_NAME", "test_stream")
            .env("AWS_ENDPOINT_URL_KINESIS", endpoint)
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_PROFILE")
            .env("JOURNALED_WORKER_POLL_INTERVAL_MS", "50")
            .env("JOURNALED_WORKER_BACKOFF_BASE_MS", "20")
            .env("JOURNALED_WORKER_BACKOFF_MAX_SECS", "0.3");
        cmd
    }

    async fn commit(journaled: &Journaled<sqlx::Postgres>, n: usize) {
        for i in 0..n {
            let mut tx = journaled.begin().await.unwrap();
            journal!(
                tx,
                TestEvent {
                    name: format!("e{i}"),
                    count: 1
                }
            )
            .unwrap();
            journal!(
                tx,
                TestEvent {
                    name: format!("f{i}"),
                    count: 2
                }
            )
            .unwrap();
            tx.commit().await.unwrap();
        }
    }

    async fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
        crate::common::wait_until(secs, "the worker exits", || {
            let exited = child.try_wait().unwrap().is_some();
            async move { exited }
        })
        .await;
        child.wait().unwrap()
    }

    async fn wait_until_empty(journaled: &Journaled<sqlx::Postgres>, secs: u64) {
        crate::common::wait_until(secs, "every job is delivered", || async {
            journaled.jobs().await.unwrap().is_empty()
        })
        .await;
    }

    #[derive(serde::Serialize, journaled::Event)]
    #[journaled(event_type = "test_event", delay_secs = 3600)]
    struct LaterEvent {
        name: String,
        count: i64,
    }

    /// `journaled trace` says where an event is: delivered (read back from the stream at its
    /// sequence number with --fetch), pending, dead, or unknown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trace_tells_where_each_event_is() {
        let emulator = Emulator::start(Kind::Kinesalite).await;
        emulator.create_stream("test_stream", 2).await;
        let db = TestDb::<sqlx::Postgres>::new().await;
        let journaled = db.migrated().await;
        let one = |name: &str| TestEvent {
            name: name.into(),
            count: 1,
        };
        let mut tx = journaled.begin().await.unwrap();
        let delivered = journal!(tx, one("delivered")).unwrap();
        tx.commit().await.unwrap();
        let mut tx = journaled.begin().await.unwrap();
        let doomed = journal!(tx, one("doomed")).unwrap();
        tx.commit().await.unwrap();
        sqlx::query(
            "UPDATE journaled.jobs SET dead_at = now(), ready = false, last_error = 'permanently refused: test' \
             WHERE strpos(records, $1) > 0",
        )
        .bind(doomed.to_string())
        .execute(&db.pool)
        .await
        .unwrap();
        let mut tx = journaled.begin().await.unwrap();
        let later = journal!(
            tx,
            LaterEvent {
                name: "later".into(),
                count: 1
            }
        )
        .unwrap();
        tx.commit().await.unwrap();

        let out = worker(&db.url(), &emulator.endpoint())
            .arg("--drain")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let trace = |id: String, extra: &[&str]| {
            let mut cmd = cli();
            cmd.arg("trace")
                .arg(id)
                .args(extra)
                .env("DATABASE_URL", db.url())
                .env("AWS_ENDPOINT_URL_KINESIS", emulator.endpoint())
                .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
                .env("AWS_SECRET_ACCESS_KEY", "secret")
                .env("AWS_REGION", "us-east-1");
            cmd.output().unwrap()
        };
        let out = trace(delivered.to_string(), &["--json", "--fetch"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(value["state"], "delivered", "{value}");
        assert_eq!(value["stream"], "test_stream");
        assert_eq!(value["fetched"]["id"], delivered.to_string(), "{value}");
        let stream = emulator.read("test_stream").await;
        let record = stream
            .iter()
            .find(|r| String::from_utf8_lossy(&r.data).contains(&delivered.to_string()))
            .unwrap();
        assert_eq!(value["sequence_number"], record.sequence_number.as_str());
        assert_eq!(value["shard_id"], record.shard_id.as_str());

        let out = trace(delivered.to_string(), &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("delivered to stream test_stream")
                && text.contains(&record.sequence_number),
            "{text}"
        );

        let out = trace(later.to_string(), &["--json"]);
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(value["state"], "pending", "{value}");
        assert!(value["job_id"].as_i64().is_some());

        let out = trace(doomed.to_string(), &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("dead in job") && text.contains("permanently refused: test"),
            "{text}"
        );

        let out = trace(uuid::Uuid::now_v7().to_string(), &[]);
        assert_eq!(out.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("unknown"));

        let out = trace("not-a-uuid".into(), &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not an event id"));

        let out = cli()
            .args(["status", "--json"])
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["receipts"]["delivered_events"], 1, "{status}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_status_tail_and_sigterm() {
        let emulator = Emulator::start(Kind::Kinesalite).await;
        emulator.create_stream("test_stream", 1).await;
        let db = TestDb::<sqlx::Postgres>::new().await;
        let journaled = db.migrated().await;
        commit(&journaled, 5).await;

        let out = cli()
            .args(["status", "--json"])
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (
                status["pending_jobs"].as_i64(),
                status["pending_events"].as_i64()
            ),
            (Some(5), Some(10))
        );
        assert_eq!(status["due_jobs"].as_i64(), Some(5));

        let out = worker(&db.url(), &emulator.endpoint())
            .arg("--drain")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(emulator.read("test_stream").await.len(), 10);

        let out = cli()
            .arg("status")
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("pending: 0 jobs, 0 events")
                && text.contains("oldest pending event: none"),
            "{text}"
        );

        let out = cli()
            .args(["tail", "--stream", "test_stream"])
            .env("AWS_ENDPOINT_URL_KINESIS", emulator.endpoint())
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 10);
        assert_eq!(lines[0]["data"]["event_type"], "test_event");
        assert!(lines[0]["sequence_number"].is_string());

        // A running worker stops cleanly on SIGTERM.
        let mut child = worker(&db.url(), &emulator.endpoint())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        commit(&journaled, 2).await;
        wait_until_empty(&journaled, 30).await;
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = wait_exit(&mut child, 30).await;
        assert_eq!(status.code(), Some(0));
        assert_eq!(emulator.read("test_stream").await.len(), 14);

        let out = cli()
            .args(["retry", "424242"])
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no job 424242"));
        let out = cli()
            .args(["retry", "--all-dead"])
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("0 dead jobs"));
    }

    /// Invariant 5: a worker killed (SIGKILL) mid-delivery loses nothing; its lease expires and
    /// another worker delivers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_worker_loses_nothing() {
        let emulator = Emulator::start(Kind::Kinesalite).await;
        emulator.create_stream("test_stream", 1).await;
        let proxy = FaultProxy::start(emulator.port).await;
        *proxy.faults.slow_for.lock().unwrap() = Duration::from_secs(120);
        proxy.faults.slow.store(1000, Ordering::SeqCst);
        let db = TestDb::<sqlx::Postgres>::new().await;
        let journaled = db.migrated().await;
        commit(&journaled, 4).await;

        let mut doomed = worker(&db.url(), &proxy.endpoint())
            .env("JOURNALED_WORKER_LEASE_SECS", "2")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        crate::common::wait_until(30, "the worker publishes, holding leases", || async {
            // Two stalled requests: the start-up check of the default stream, and a PutRecords.
            proxy.faults.injected_slow.load(Ordering::SeqCst) >= 2
                && journaled::store::status(&db.pool)
                    .await
                    .unwrap()
                    .leased_jobs
                    > 0
        })
        .await;
        doomed.kill().unwrap(); // SIGKILL, mid-request
        doomed.wait().unwrap();

        let mut rescuer = worker(&db.url(), &emulator.endpoint())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until_empty(&journaled, 60).await;
        rescuer.kill().unwrap();
        rescuer.wait().unwrap();
        let ids: std::collections::HashSet<String> = emulator
            .read("test_stream")
            .await
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.data).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 8);
    }

    /// The worker needs no default stream (each job names its streams); given one, it checks it
    /// at start. A drain that leaves due events undelivered, held back by a configuration
    /// error, exits non-zero saying why; once the stream exists, it drains and exits 0.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_exits_non_zero_when_it_leaves_events_undelivered() {
        let emulator = Emulator::start(Kind::Kinesalite).await;
        let db = TestDb::<sqlx::Postgres>::new().await;
        let journaled = db.migrated().await;
        commit(&journaled, 2).await;
        let out = worker(&db.url(), &emulator.endpoint())
            .arg("--drain")
            .env("JOURNALED_WORKER_CONFIGURATION_BACKOFF_SECS", "0.2")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.contains("2 due jobs undelivered") && last.contains("ResourceNotFoundException"),
            "{stderr}"
        );
        assert!(
            stderr.contains("the default stream does not exist"),
            "checked at start: {stderr}"
        );
        assert_eq!(journaled.jobs().await.unwrap().len(), 2, "nothing is lost");

        emulator.create_stream("test_stream", 1).await;
        let out = worker(&db.url(), &emulator.endpoint())
            .arg("--drain")
            .env_remove("JOURNALED_STREAM_NAME")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no default stream needed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(emulator.read("test_stream").await.len(), 4);
        assert!(journaled.jobs().await.unwrap().is_empty());
    }

    /// `JOURNALED_IAM_ROLE_ARN` naming a role STS refuses to let the worker assume (for longer
    /// than `max attempts` rounds): a configuration error, said at `error` level with what to
    /// fix, no job dead; once STS grants the role, everything is delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_assume_role_refused_by_sts_kills_nothing() {
        let emulator = Emulator::start(Kind::Kinesalite).await;
        emulator.create_stream("test_stream", 1).await;
        let sts = FakeSts::start(true).await;
        let db = TestDb::<sqlx::Postgres>::new().await;
        let journaled = db.migrated().await;
        commit(&journaled, 3).await;
        let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("assume-role-{}.log", uuid::Uuid::now_v7().simple()));
        let mut child = worker(&db.url(), &emulator.endpoint())
            .env(
                "JOURNALED_IAM_ROLE_ARN",
                "arn:aws:iam::123456789012:role/journaled-test",
            )
            .env("AWS_ENDPOINT_URL_STS", sts.endpoint())
            .env("JOURNALED_WORKER_MAX_ATTEMPTS", "2")
            .env("JOURNALED_WORKER_CONFIGURATION_BACKOFF_SECS", "0.2")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        crate::common::wait_until(60, "every job was refused credentials 4 times", || async {
            let jobs = journaled.jobs().await.unwrap();
            assert!(jobs.iter().all(|j| j.dead_at.is_none()), "{jobs:#?}");
            jobs.iter().all(|j| j.attempts >= 4)
        })
        .await;
        assert!(sts.refused.load(Ordering::SeqCst) >= 4);
        let error = journaled.jobs().await.unwrap()[0]
            .last_error
            .clone()
            .unwrap();
        assert!(
            error.contains("credentials") && error.contains("AccessDenied"),
            "{error}"
        );
        let logged = std::fs::read_to_string(&log).unwrap();
        let alarms = logged
            .lines()
            .filter(|l| l.contains("configuration error"))
            .count();
        assert!(
            alarms >= 1 && logged.contains("sts:AssumeRole"),
            "said at error level, with what to fix: {logged}"
        );
        sts.refuse.store(false, Ordering::SeqCst);
        wait_until_empty(&journaled, 60).await;
        assert!(sts.granted.load(Ordering::SeqCst) >= 1);
        assert_eq!(emulator.read("test_stream").await.len(), 6);
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        assert_eq!(wait_exit(&mut child, 30).await.code(), Some(0));
        let _ = std::fs::remove_file(&log);
    }

    /// A worker whose stderr closes (its log collector went away) stops as on SIGTERM and exits
    /// 141, not 101; nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_stderr_stops_the_worker_quietly() {
        let emulator = Emulator::start(Kind::Kinesalite).await;
        emulator.create_stream("test_stream", 1).await;
        let db = TestDb::<sqlx::Postgres>::new().await;
        let journaled = db.migrated().await;
        commit(&journaled, 3).await;
        let mut child = worker(&db.url(), &emulator.endpoint())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stderr.take());
        let status = wait_exit(&mut child, 30).await;
        assert_eq!(status.code(), Some(141));
        let status = journaled::store::status(&db.pool).await.unwrap();
        assert_eq!((status.leased_jobs, status.dead_jobs), (0, 0), "{status:?}");
        let delivered = emulator.read("test_stream").await.len() as i64;
        assert_eq!(delivered + status.pending_events, 6, "nothing lost");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_worker_settings_exit_with_one_clear_line() {
        let db = TestDb::<sqlx::Postgres>::new().await;
        let cases: [(&str, &str, &str); 5] = [
            ("JOURNALED_WORKER_BATCH_SIZE", "lots", "batch-size"),
            ("JOURNALED_WORKER_LEASE_SECS", "-3", "lease-secs"),
            ("JOURNALED_WORKER_GAP_CHECK_SECS", "-1", "gap-check-secs"),
            (
                "JOURNALED_WORKER_LEASE_SECS",
                "0.001",
                "lease must be at least 1s",
            ),
            (
                "DATABASE_URL",
                "postgres://nobody@127.0.0.1:1/none",
                "cannot connect",
            ),
        ];
        for (var, value, expected) in cases {
            let out = worker(&db.url(), "http://127.0.0.1:1")
                .env(var, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{var}={value} was accepted");
            assert_eq!(stderr.trim().lines().count(), 1, "{var}={value}: {stderr}");
            assert!(stderr.contains(expected), "{var}={value}: {stderr}");
        }
    }
}

/// Parked ordered keys: `status` lists them with their reason (text and JSON); `retry --key`
/// and `skip --key` unpark them; a bad key, a key that is not parked, and `--key` beside a job
/// id are refused with one clear line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keys_are_listed_retried_and_skipped() {
    use journaled::Backend;
    let db = common::TestDb::<sqlx::Sqlite>::new().await;
    db.migrated().await;
    let park = |seq: i64| journaled::store::ParkedKey {
        stream: "test_stream".into(),
        partition_key: "a/1".into(),
        sequence: seq,
        event_id: "0190a0a0-0000-7000-8000-000000000001".into(),
        reason: "ValidationException: too big".into(),
        parked_at: None,
    };
    sqlx::Sqlite::park_key(&db.pool, &park(1)).await.unwrap();
    let run = |args: &[&str]| {
        cli()
            .args(args)
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap()
    };
    let out = run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("parked:  1 ordered keys"), "{text}");
    assert!(
        text.contains("test_stream/a/1 at record 1") && text.contains("too big"),
        "{text}"
    );
    let out = run(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["parked_keys"], 1);
    assert_eq!(json["parked"][0]["partition_key"], "a/1");

    for (args, says) in [
        (&["skip", "--key", "no-slash"][..], "STREAM/KEY"),
        (&["retry", "--key", "/a"][..], "STREAM/KEY"),
        (
            &["skip", "--key", "test_stream/b"][..],
            "test_stream/b is not parked",
        ),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = run(&["retry", "7", "--key", "test_stream/a/1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses a job id beside --key"
    );

    // No dead job holds the parked record (here: it never existed): retry cannot send it,
    // says so, and leaves the key parked. (`tests/ordering.rs` retries a real one.)
    let out = run(&["retry", "--key", "test_stream/a/1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no dead job holds its refused record"),
        "{err}"
    );
    assert_eq!(
        journaled::store::ordering::parked_keys(&db.pool)
            .await
            .unwrap()
            .len(),
        1
    );

    let out = run(&["skip", "--key", "test_stream/a/1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumes after record 1"));
    assert!(
        journaled::store::ordering::parked_keys(&db.pool)
            .await
            .unwrap()
            .is_empty()
    );

    // A key that waits for a sequence whose job was deleted: `skip --key` moves it past it,
    // then refuses while the next sequence is in a live job.
    #[derive(serde::Serialize, journaled::Event)]
    #[journaled(event_type = "free_event", ordered)]
    struct InOrder {
        #[journaled(partition_key)]
        account: String,
    }
    let journaled = db.journaled(common::test_config());
    for _ in 0..2 {
        let mut tx = journaled.begin().await.unwrap();
        journaled::journal!(
            tx,
            InOrder {
                account: "c".into()
            }
        )
        .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query("DELETE FROM journaled_jobs WHERE id = (SELECT min(id) FROM journaled_jobs)")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = run(&["skip", "--key", "test_stream/c"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("resumes after missing record 1") && text.contains("in no job"),
        "{text}"
    );
    let out = run(&["skip", "--key", "test_stream/c"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("its next sequence 2 is in live job") && err.trim().lines().count() == 1,
        "{err}"
    );
}
