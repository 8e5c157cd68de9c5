//! Test harness: a fresh database per test, on PostgreSQL and on SQLite.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use journaled::{Backend, Config, Journaled};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool};

/// The server tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("JOURNALED_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn schema_root() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/journaled_schemas"
    ))
}

/// The configuration tests start from: a stream, the test schemas, nothing from the environment.
pub fn test_config() -> Config {
    Config::default()
        .with_stream_name("test_stream")
        .with_app_name("journaled_test")
        .with_schema_roots([schema_root()])
}

/// Every staged-and-committed event's JSON, in job and record order.
pub async fn events<DB: Backend>(journaled: &Journaled<DB>) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for job in journaled.jobs().await.unwrap() {
        for record in job.records().unwrap() {
            out.push(serde_json::from_slice(record.data()).unwrap());
        }
    }
    out
}

/// Waits until `check` holds, or fails after `secs`.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb<DB: Backend> {
    pub pool: sqlx::Pool<DB>,
    cleanup: Option<Cleanup>,
}

enum Cleanup {
    Postgres { name: String },
    Sqlite { path: PathBuf },
}

impl<DB: Backend> TestDb<DB> {
    pub fn journaled(&self, config: Config) -> Journaled<DB> {
        Journaled::new(self.pool.clone(), config)
    }

    /// A migrated journaled with the test configuration.
    pub async fn migrated(&self) -> Journaled<DB> {
        let journaled = self.journaled(test_config());
        journaled.migrate().await.expect("migrate");
        journaled
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

impl TestDb<Postgres> {
    pub async fn new() -> Self {
        let name = unique("journaled_t");
        let admin = PgPool::connect(&admin_url())
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .expect("connect to test database");
        TestDb {
            pool,
            cleanup: Some(Cleanup::Postgres { name }),
        }
    }

    pub fn url(&self) -> String {
        match &self.cleanup {
            Some(Cleanup::Postgres { name }) => {
                format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0)
            }
            _ => unreachable!(),
        }
    }
}

impl TestDb<Sqlite> {
    pub async fn new() -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join(format!("{}.db", unique("journaled_t")));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("open SQLite test database");
        TestDb {
            pool,
            cleanup: Some(Cleanup::Sqlite { path }),
        }
    }

    pub fn url(&self) -> String {
        match &self.cleanup {
            Some(Cleanup::Sqlite { path }) => format!("sqlite://{}", path.display()),
            _ => unreachable!(),
        }
    }
}

impl<DB: Backend> Drop for TestDb<DB> {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        match self.cleanup.take() {
            Some(Cleanup::Postgres { name }) => {
                // Drop may run inside a runtime that cannot make progress now: leave the pool to
                // FORCE, and drop the database from a thread with its own runtime.
                drop(pool);
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        if let Ok(admin) = PgPool::connect(&admin_url()).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .execute(&admin)
                            .await;
                        }
                    });
                })
                .join();
            }
            Some(Cleanup::Sqlite { path }) => {
                drop(pool);
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            None => {}
        }
    }
}

/// Runs one generic test body on both backends, each with a fresh database.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let db = $crate::common::TestDb::<sqlx::Postgres>::new().await;
                    super::$name(&db).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = $crate::common::TestDb::<sqlx::Sqlite>::new().await;
                    super::$name(&db).await;
                }
            }
        )*
    };
}

/// The application's own SQL in tests, per backend (placeholders and types differ).
pub trait AppSql: Backend {
    /// Runs one statement on a connection (in the caller's transaction).
    fn exec<'c>(conn: &'c mut Self::Connection, sql: &'static str) -> BoxFuture<'c, ()> {
        Box::pin(async move { Self::try_exec(conn, sql).await.expect(sql) })
    }
    /// Runs one statement, returning its error.
    fn try_exec<'c>(
        conn: &'c mut Self::Connection,
        sql: &'static str,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>;
    /// Inserts a job whose records cannot be decoded.
    const CORRUPT_JOB: &'static str;
    /// Makes the receipts of events 1 to 4 (UUIDs from_u128) two days old.
    const AGE_RECEIPTS: &'static str;
    /// Moves every job's commit (`created_at`) an hour into the past.
    const BACKDATE_AN_HOUR: &'static str;
    /// Deletes the oldest job, as an operator might by hand.
    const DELETE_OLDEST_JOB: &'static str;
    /// Marks the oldest job dead.
    const KILL_OLDEST_JOB: &'static str;
    /// Inserts a live job that mentions key `a` of `test_stream` but cannot be decoded.
    const UNREADABLE_JOB_OF_A: &'static str;
    /// Marks the newest job dead.
    const KILL_NEWEST_JOB: &'static str;
    /// Runs a `SELECT COUNT(*) ...` on the pool.
    fn count<'c>(pool: &'c sqlx::Pool<Self>, sql: &'static str) -> BoxFuture<'c, i64>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

macro_rules! app_sql {
    ($db:ty, $pool:ty, $corrupt:expr, $age:expr, $backdate:expr, $delete:expr, $kill:expr,
     $unreadable_a:expr, $kill_newest:expr) => {
        impl AppSql for $db {
            const CORRUPT_JOB: &'static str = $corrupt;
            const AGE_RECEIPTS: &'static str = $age;
            const BACKDATE_AN_HOUR: &'static str = $backdate;
            const DELETE_OLDEST_JOB: &'static str = $delete;
            const KILL_OLDEST_JOB: &'static str = $kill;
            const UNREADABLE_JOB_OF_A: &'static str = $unreadable_a;
            const KILL_NEWEST_JOB: &'static str = $kill_newest;
            fn try_exec<'c>(
                conn: &'c mut Self::Connection,
                sql: &'static str,
            ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
                Box::pin(async move { sqlx::raw_sql(sql).execute(conn).await.map(drop) })
            }
            fn count<'c>(pool: &'c $pool, sql: &'static str) -> BoxFuture<'c, i64> {
                Box::pin(async move { sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql) })
            }
        }
    };
}
app_sql!(
    Postgres,
    PgPool,
    "INSERT INTO journaled.jobs (event_count, records) VALUES (1, '[{\"id\": not json')",
    "UPDATE journaled.receipts SET delivered_at = now() - interval '2 days' \
     WHERE event_id <= '00000000-0000-0000-0000-000000000004'",
    "UPDATE journaled.jobs SET created_at = created_at - interval '1 hour'",
    "DELETE FROM journaled.jobs WHERE id = (SELECT min(id) FROM journaled.jobs)",
    "UPDATE journaled.jobs SET dead_at = now(), ready = false, last_error = 'killed by the test' \
     WHERE id = (SELECT min(id) FROM journaled.jobs)",
    "INSERT INTO journaled.jobs (event_count, records) \
     VALUES (1, '[{\"stream\":\"test_stream\",\"partition_key\":\"a\", not json')",
    "UPDATE journaled.jobs SET dead_at = now(), ready = false, last_error = 'killed by the test' \
     WHERE id = (SELECT max(id) FROM journaled.jobs)"
);
app_sql!(
    Sqlite,
    SqlitePool,
    "INSERT INTO journaled_jobs (run_at, created_at, event_count, records) VALUES (0, 0, 1, '[{\"id\": not json')",
    "UPDATE journaled_receipts SET delivered_at = delivered_at - 172800000 \
     WHERE event_id <= '00000000-0000-0000-0000-000000000004'",
    "UPDATE journaled_jobs SET created_at = created_at - 3600000",
    "DELETE FROM journaled_jobs WHERE id = (SELECT min(id) FROM journaled_jobs)",
    "UPDATE journaled_jobs SET dead_at = created_at, ready = 0, last_error = 'killed by the test' \
     WHERE id = (SELECT min(id) FROM journaled_jobs)",
    "INSERT INTO journaled_jobs (run_at, created_at, event_count, records) \
     VALUES (0, 0, 1, '[{\"stream\":\"test_stream\",\"partition_key\":\"a\", not json')",
    "UPDATE journaled_jobs SET dead_at = created_at, ready = 0, last_error = 'killed by the test' \
     WHERE id = (SELECT max(id) FROM journaled_jobs)"
);

#[cfg(feature = "worker")]
pub mod kinesis;
