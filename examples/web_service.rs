//! A web service that journals: axum and sqlx, SQLite by default, PostgreSQL when `DATABASE_URL`
//! says so. `journaled::tower::JournaledLayer` runs every request in a scope holding its actor
//! (the signed-in user, or whom they impersonate) and its tags (request id, client, route), so
//! each event and audit change a handler journals says who did it and in which request.
//!
//! ```sh
//! cargo run --example web_service --features tower       # serves on 127.0.0.1:3000
//! curl -si localhost:3000/users -H 'x-request-id: req-1' \
//!      -H 'content-type: application/json' -d '{"name": "Ada", "email": "ada@example.com"}'
//! curl -si -X PUT localhost:3000/users/1/plan -H 'x-user-id: 1' \
//!      -H 'content-type: application/json' -d '{"plan": "pro"}'
//! curl -si -X POST localhost:3000/users/1/credits -H 'x-user-id: 7' -H 'x-act-as: 1' \
//!      -H 'content-type: application/json' -d '{"amount": -5}'     # 409: nothing journaled
//! curl -s localhost:3000/users/1
//! journaled status                                                 # the jobs, same database
//! ```
//!
//! `DATABASE_URL` (default `sqlite://journaled.db?mode=rwc`, the CLI's default too),
//! `JOURNALED_STREAM_NAME` (default `web_service_events`), `WEB_SERVICE_ADDR` (default
//! `127.0.0.1:3000`). `tests/web_service.rs` serves this router and checks what it journals.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use journaled::audit::Change;
use journaled::tower::{Impersonation, JournaledLayer};
use journaled::{Config, Journaled, actor_uri, journal};
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

/// A user row; its changes are audited (`journaled_audit_log_event`).
#[derive(Debug, Clone, Serialize, journaled::Audited)]
#[audited(table = "web_service_users")]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub plan: String,
    pub credits: i64,
}

type UserRow = (i64, String, String, String, i64);

impl From<UserRow> for User {
    fn from((id, name, email, plan, credits): UserRow) -> Self {
        User {
            id,
            name,
            email,
            plan,
            credits,
        }
    }
}

/// Someone signed up (`examples/journaled_schemas/user_signed_up.json`).
#[derive(Serialize, journaled::Event)]
#[journaled(tagged)]
pub struct UserSignedUp {
    pub user_id: i64,
    pub email_domain: String,
    pub actor: String,
}

/// A user's plan changed; the schema refuses unknown plans.
#[derive(Serialize, journaled::Event)]
#[journaled(tagged)]
pub struct PlanChanged {
    pub user_id: i64,
    pub from: String,
    pub to: String,
    pub actor: String,
}

/// Credits were added to (or taken from) a user.
#[derive(Serialize, journaled::Event)]
#[journaled(tagged)]
pub struct CreditsAdjusted {
    pub user_id: i64,
    pub amount: i64,
    pub balance: i64,
    pub actor: String,
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The service's own SQL. The statements are the same on both backends (sqlx binds `$1` on
/// SQLite too); the table definition differs.
pub trait Db: journaled::Backend {
    /// Creates the service's table if it is missing.
    fn create_table(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, sqlx::Result<()>>;

    /// Inserts a user.
    fn insert_user<'c>(
        conn: &'c mut Self::Connection,
        name: &'c str,
        email: &'c str,
    ) -> BoxFuture<'c, sqlx::Result<User>>;

    /// Reads a user.
    fn find_user(conn: &mut Self::Connection, id: i64)
    -> BoxFuture<'_, sqlx::Result<Option<User>>>;

    /// Sets a user's plan.
    fn set_plan<'c>(
        conn: &'c mut Self::Connection,
        id: i64,
        plan: &'c str,
    ) -> BoxFuture<'c, sqlx::Result<Option<User>>>;

    /// Adds `amount` to a user's credits.
    fn add_credits(
        conn: &mut Self::Connection,
        id: i64,
        amount: i64,
    ) -> BoxFuture<'_, sqlx::Result<Option<User>>>;
}

macro_rules! columns {
    () => {
        "id, name, email, plan, credits"
    };
}
const INSERT_USER: &str = concat!(
    "INSERT INTO web_service_users (name, email) VALUES ($1, $2) RETURNING ",
    columns!()
);
const FIND_USER: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM web_service_users WHERE id = $1"
);
const SET_PLAN: &str = concat!(
    "UPDATE web_service_users SET plan = $2 WHERE id = $1 RETURNING ",
    columns!()
);
const ADD_CREDITS: &str = concat!(
    "UPDATE web_service_users SET credits = credits + $2 WHERE id = $1 RETURNING ",
    columns!()
);

macro_rules! db {
    ($db:ty, $create_table:expr) => {
        impl Db for $db {
            fn create_table(pool: &sqlx::Pool<Self>) -> BoxFuture<'_, sqlx::Result<()>> {
                Box::pin(async move { sqlx::raw_sql($create_table).execute(pool).await.map(drop) })
            }

            fn insert_user<'c>(
                conn: &'c mut Self::Connection,
                name: &'c str,
                email: &'c str,
            ) -> BoxFuture<'c, sqlx::Result<User>> {
                let query = sqlx::query_as::<_, UserRow>(INSERT_USER)
                    .bind(name)
                    .bind(email);
                Box::pin(async move { query.fetch_one(conn).await.map(User::from) })
            }

            fn find_user(
                conn: &mut Self::Connection,
                id: i64,
            ) -> BoxFuture<'_, sqlx::Result<Option<User>>> {
                let query = sqlx::query_as::<_, UserRow>(FIND_USER).bind(id);
                Box::pin(async move { Ok(query.fetch_optional(conn).await?.map(User::from)) })
            }

            fn set_plan<'c>(
                conn: &'c mut Self::Connection,
                id: i64,
                plan: &'c str,
            ) -> BoxFuture<'c, sqlx::Result<Option<User>>> {
                let query = sqlx::query_as::<_, UserRow>(SET_PLAN).bind(id).bind(plan);
                Box::pin(async move { Ok(query.fetch_optional(conn).await?.map(User::from)) })
            }

            fn add_credits(
                conn: &mut Self::Connection,
                id: i64,
                amount: i64,
            ) -> BoxFuture<'_, sqlx::Result<Option<User>>> {
                let query = sqlx::query_as::<_, UserRow>(ADD_CREDITS)
                    .bind(id)
                    .bind(amount);
                Box::pin(async move { Ok(query.fetch_optional(conn).await?.map(User::from)) })
            }
        }
    };
}

db!(
    sqlx::Postgres,
    "CREATE TABLE IF NOT EXISTS web_service_users (id bigserial PRIMARY KEY, name text NOT NULL, \
     email text NOT NULL, plan text NOT NULL DEFAULT 'free', credits bigint NOT NULL DEFAULT 0)"
);
db!(
    sqlx::Sqlite,
    "CREATE TABLE IF NOT EXISTS web_service_users (id INTEGER PRIMARY KEY AUTOINCREMENT, \
     name TEXT NOT NULL, email TEXT NOT NULL, plan TEXT NOT NULL DEFAULT 'free', \
     credits INTEGER NOT NULL DEFAULT 0)"
);

/// What the (stand-in) authentication layer puts in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct CurrentUser {
    pub id: i64,
    /// The user this one impersonates, if any.
    pub acting_as: Option<i64>,
}

/// A user's global id, the actor of what they do.
pub fn user_gid(id: i64) -> String {
    format!("gid://web_service/User/{id}")
}

/// Stand-in authentication: trusts `x-user-id`, and `x-act-as` for impersonation. A real
/// service verifies a session or a token here, and who may impersonate whom.
async fn authenticate(mut request: Request, next: Next) -> Response {
    if let Some(user) = current_user(request.headers()) {
        request.extensions_mut().insert(user);
    }
    next.run(request).await
}

fn current_user(headers: &axum::http::HeaderMap) -> Option<CurrentUser> {
    let id = |name: &str| headers.get(name)?.to_str().ok()?.parse::<i64>().ok();
    Some(CurrentUser {
        id: id("x-user-id")?,
        acting_as: id("x-act-as"),
    })
}

/// The attribution of every request: the user (or whom they impersonate) is the actor; the
/// request id, the `x-client` header and the matched route are tags.
pub fn journaled_layer() -> JournaledLayer {
    JournaledLayer::new()
        .actor(|req| req.extensions.get::<CurrentUser>().map(|u| user_gid(u.id)))
        .impersonation(|req| {
            let user = req.extensions.get::<CurrentUser>()?;
            Some(Impersonation::new(
                user_gid(user.id),
                user_gid(user.acting_as?),
            ))
        })
        .tag_header("x-client", "client")
        .tag_extension("route", |path: &MatchedPath| path.as_str().to_owned())
}

/// The service. Layers wrap what is above them, so a request meets them bottom-up: the
/// request id is made (when missing), the user authenticated, then the journaled scope set.
pub fn app<DB: Db>(journaled: Journaled<DB>) -> Router {
    Router::new()
        .route("/users", post(create_user::<DB>))
        .route("/users/{id}", get(show_user::<DB>))
        .route("/users/{id}/plan", put(set_plan::<DB>))
        .route("/users/{id}/credits", post(adjust_credits::<DB>))
        .layer(journaled_layer())
        .layer(middleware::from_fn(authenticate))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(journaled)
}

/// The configuration this service journals with.
pub fn config() -> Config {
    Config::default()
        .with_stream_name(
            std::env::var("JOURNALED_STREAM_NAME").unwrap_or_else(|_| "web_service_events".into()),
        )
        .with_app_name("web_service")
        .with_schema_roots([concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/journaled_schemas"
        )])
}

/// Migrates journaled's tables and creates the service's own.
pub async fn setup<DB: Db>(journaled: &Journaled<DB>) -> Result<(), journaled::Error> {
    journaled.migrate().await?;
    DB::create_table(journaled.pool()).await?;
    Ok(())
}

#[derive(Deserialize)]
pub struct NewUser {
    pub name: String,
    pub email: String,
}

#[derive(Deserialize)]
pub struct NewPlan {
    pub plan: String,
}

#[derive(Deserialize)]
pub struct Adjustment {
    pub amount: i64,
}

/// Signs a user up: the row, a `user_signed_up` event and an audit insert, in one transaction.
async fn create_user<DB: Db>(
    State(journaled): State<Journaled<DB>>,
    Json(new): Json<NewUser>,
) -> Result<(StatusCode, Json<User>), AppError> {
    let mut tx = journaled.begin().await?;
    let user = DB::insert_user(&mut tx, &new.name, &new.email).await?;
    let email_domain = user.email.rsplit('@').next().unwrap_or_default().to_owned();
    journal!(
        tx,
        UserSignedUp {
            user_id: user.id,
            email_domain,
            actor: actor_uri(),
        }
    )?;
    tx.audit(Change::insert(&user))?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Reads a user back.
async fn show_user<DB: Db>(
    State(journaled): State<Journaled<DB>>,
    Path(id): Path<i64>,
) -> Result<Json<User>, AppError> {
    let mut conn = journaled.pool().acquire().await?;
    let user = DB::find_user(&mut conn, id).await?;
    user.map(Json).ok_or(AppError::NotFound)
}

/// Changes a user's plan: the update, a `plan_changed` event and an audit update. An unknown
/// plan fails the event's schema: 422, and the update is rolled back with the transaction.
async fn set_plan<DB: Db>(
    State(journaled): State<Journaled<DB>>,
    Path(id): Path<i64>,
    Json(new): Json<NewPlan>,
) -> Result<Json<User>, AppError> {
    let mut tx = journaled.begin().await?;
    let before = DB::find_user(&mut tx, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let after = DB::set_plan(&mut tx, id, &new.plan)
        .await?
        .ok_or(AppError::NotFound)?;
    journal!(
        tx,
        PlanChanged {
            user_id: id,
            from: before.plan.clone(),
            to: after.plan.clone(),
            actor: actor_uri(),
        }
    )?;
    tx.audit(Change::update(&before, &after))?;
    tx.commit().await?;
    Ok(Json(after))
}

/// Adds credits, journals `credits_adjusted` and the audit update, then checks the balance: a
/// negative one is refused with 409, and dropping the transaction discards the update and
/// both staged events.
async fn adjust_credits<DB: Db>(
    State(journaled): State<Journaled<DB>>,
    Path(id): Path<i64>,
    Json(adjustment): Json<Adjustment>,
) -> Result<Json<User>, AppError> {
    let mut tx = journaled.begin().await?;
    let before = DB::find_user(&mut tx, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let after = DB::add_credits(&mut tx, id, adjustment.amount)
        .await?
        .ok_or(AppError::NotFound)?;
    journal!(
        tx,
        CreditsAdjusted {
            user_id: id,
            amount: adjustment.amount,
            balance: after.credits,
            actor: actor_uri(),
        }
    )?;
    tx.audit(Change::update(&before, &after))?;
    if after.credits < 0 {
        return Err(AppError::InsufficientCredits {
            balance: before.credits,
        });
    }
    tx.commit().await?;
    Ok(Json(after))
}

/// What a handler fails with.
#[derive(Debug)]
pub enum AppError {
    /// No such user: 404.
    NotFound,
    /// The credits would go below zero: 409.
    InsufficientCredits { balance: i64 },
    /// journaled refused or failed: 422 for an event that fails its schema, else 500.
    Journaled(journaled::Error),
}

impl From<journaled::Error> for AppError {
    fn from(error: journaled::Error) -> Self {
        AppError::Journaled(error)
    }
}

impl From<journaled::JournalError> for AppError {
    fn from(error: journaled::JournalError) -> Self {
        AppError::Journaled(error.into())
    }
}

impl From<sqlx::Error> for AppError {
    fn from(error: sqlx::Error) -> Self {
        AppError::Journaled(error.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            AppError::NotFound => (StatusCode::NOT_FOUND, "no such user".to_owned()),
            AppError::InsufficientCredits { balance } => (
                StatusCode::CONFLICT,
                format!("insufficient credits: the balance is {balance}"),
            ),
            AppError::Journaled(
                error @ journaled::Error::Journal(journaled::JournalError::SchemaViolation {
                    ..
                }),
            ) => (StatusCode::UNPROCESSABLE_ENTITY, error.to_string()),
            AppError::Journaled(error) => {
                eprintln!("web_service: {error}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// Serves `app` on `addr` until Ctrl-C.
async fn serve<DB: Db>(
    journaled: Journaled<DB>,
    addr: SocketAddr,
) -> Result<(), Box<dyn std::error::Error>> {
    setup(&journaled).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "web_service: listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app(journaled))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://journaled.db?mode=rwc".into());
    let addr: SocketAddr = std::env::var("WEB_SERVICE_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let pool = sqlx::PgPool::connect(&url).await?;
        serve(Journaled::new(pool, config()), addr).await
    } else {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::SqlitePool::connect_with(options).await?;
        serve(Journaled::new(pool, config()), addr).await
    }
}
