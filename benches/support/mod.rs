//! What the worker benches share: a database of their own, and a draining worker.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use journaled::delivery::Sink;
use journaled::{Worker, WorkerConfig};
use sqlx::PgPool;

/// Creates (dropping any left over) and migrates database `name` on the server of `admin_url`.
pub async fn fresh_db(admin: &PgPool, name: &str, admin_url: &str) -> PgPool {
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(admin)
            .await
            .unwrap();
    }
    let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    journaled::migrate(&pool).await.unwrap();
    pool
}

/// Runs a worker until nothing is due; how long it took.
pub async fn drain(pool: &PgPool, sink: impl Sink, config: WorkerConfig) -> Duration {
    let start = Instant::now();
    Worker::new(pool.clone(), sink, config.with_drain(true))
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap();
    start.elapsed()
}

/// The median of some figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
