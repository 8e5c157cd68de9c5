//! The `journaled` binary, run as a user would.

mod common;

use std::process::Command;

fn journaled() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_journaled"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("JOURNALED_SCHEMA_PATH")
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn schemas_check_reports_each_broken_file() {
    let out = journaled()
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

    let out = journaled()
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
            let out = journaled()
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
    assert_eq!(count, 1);
}

#[test]
fn bad_database_urls_exit_with_one_clear_line() {
    let out = journaled()
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

    let out = journaled()
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
