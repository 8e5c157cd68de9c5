//! Audit logs and change journaling from a plain struct, on SQLite: a user is created,
//! updated (once touching only ignored columns, once a sensitive one), and deleted, under an
//! actor and request tags. Prints every event journaled.
//!
//! ```sh
//! cargo run --example audit_log
//! ```

use journaled::audit::{Change, with_snapshots};
use journaled::{Config, Journaled, tagged, tags, with_actor};
use serde::Serialize;

#[derive(Serialize, Clone, journaled::Audited)]
#[audited(table = "users", ignore = ["last_seen_at"], sensitive = ["ssn"])]
#[journal_changes_to(email, name, as = "identity_change")]
struct User {
    id: i64,
    email: String,
    name: String,
    ssn: Option<String>,
    password_digest: Option<String>,
    last_seen_at: Option<String>,
    created_at: String,
    updated_at: String,
}

async fn setup() -> Result<Journaled<sqlx::Sqlite>, journaled::Error> {
    // One connection: each connection to `sqlite::memory:` is a database of its own.
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await?;
    let config = Config::default()
        .with_stream_name("audit_example")
        .with_app_name("audit_example")
        .with_filter_parameters(["passw"]);
    let journaled = Journaled::new(pool, config);
    journaled.migrate().await?;
    Ok(journaled)
}

/// Creates, updates (ignored columns only, then a name and a sensitive column), and deletes a user.
async fn lifecycle(journaled: &Journaled<sqlx::Sqlite>) -> Result<(), journaled::Error> {
    let created = User {
        id: 1,
        email: "ada@example.com".into(),
        name: "Ada".into(),
        ssn: Some("123-45-6789".into()),
        password_digest: Some("$2b$12$secret".into()),
        last_seen_at: None,
        created_at: "2026-11-23T10:00:00Z".into(),
        updated_at: "2026-11-23T10:00:00Z".into(),
    };
    let mut seen = created.clone();
    seen.last_seen_at = Some("2026-11-23T10:05:00Z".into());
    seen.updated_at = "2026-11-23T10:05:00Z".into();
    let mut renamed = seen.clone();
    renamed.name = "Augusta Ada".into();
    renamed.ssn = Some("987-65-4321".into());
    renamed.updated_at = "2026-11-23T10:10:00Z".into();

    tagged(
        tags! { request_id = "req-1" },
        with_actor("gid://audit_example/AdminUser/7", async {
            let mut tx = journaled.begin().await?;
            tx.audit(Change::insert(&created))?;
            let ignored = tx.audit(Change::update(&created, &seen))?; // only ignored columns changed
            println!("update of ignored columns only: {} events", ignored.len());
            with_snapshots(async { tx.audit(Change::update(&seen, &renamed)) }).await?;
            tx.audit(Change::delete(&renamed))?;
            tx.commit().await
        }),
    )
    .await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let journaled = setup().await?;
    lifecycle(&journaled).await?;
    for job in journaled.jobs().await? {
        for record in job.records()? {
            println!("{}", record.data.get());
        }
    }
    Ok(())
}

/// The example's own tests, with `journaled::testing` (run by `cargo test --features testing`).
#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use journaled::testing::{Expect, assert_journals_changes_to, capture};
    use serde_json::json;

    #[tokio::test]
    async fn the_lifecycle_journals_what_consumers_expect() {
        let journaled = setup().await.unwrap();
        let (result, captured) = capture(lifecycle(&journaled)).await;
        result.unwrap();
        captured.assert(&[
            Expect::event(
                json!({"database_operation": "insert", "changes": {"ssn": [null, "[FILTERED]"]}}),
            )
            .with_event_type("journaled_audit_log_event"),
            Expect::event(json!({
                "database_operation": "update",
                "changes": {"name": ["Ada", "Augusta Ada"]},
                "snapshot": {"password_digest": "[FILTERED]"},
                "actor": "gid://audit_example/AdminUser/7",
                "tags": {"request_id": "req-1"},
            })),
            Expect::event(
                json!({"logical_operation": "identity_change", "database_operation": "delete"}),
            ),
        ]);
        captured.assert_not(&[Expect::event(
            json!({"changes": {"last_seen_at": ["2026-11-23T10:05:00Z", null]}}),
        )]);
        assert!(
            !captured
                .events
                .iter()
                .any(|e| e.data.to_string().contains("123-45-6789"))
        );
        assert_journals_changes_to::<User>(&["email", "name"], "identity_change");
    }
}
