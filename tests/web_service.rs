//! The web service example (`examples/web_service.rs`), served on a free 127.0.0.1 port and
//! called over HTTP: each event carries its request's actor, request id and tags; concurrent
//! requests never see each other's; a handler that fails leaves no event. On PostgreSQL and
//! SQLite, a fresh database each.

mod common;

#[path = "../examples/web_service.rs"]
#[allow(dead_code)]
mod web_service;

use std::collections::HashMap;

use bytes::Bytes;
use common::TestDb;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use journaled::Journaled;
use journaled::testing::{Captured, CapturedEvent, Expect};
use serde_json::{Value, json};
use web_service::{Db, user_gid};

/// The example's router, served until the test ends.
struct Server<DB: Db> {
    base: String,
    journaled: Journaled<DB>,
    client: Client<HttpConnector, Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl<DB: Db> Drop for Server<DB> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the service answered.
struct Reply {
    status: u16,
    request_id: Option<String>,
    body: Value,
}

impl<DB: Db> Server<DB> {
    async fn start(db: &TestDb<DB>) -> Self {
        let journaled = db.journaled(web_service::config());
        web_service::setup(&journaled).await.expect("setup");
        // Bound before the server task starts: requests queue on the socket, no waiting needed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = web_service::app(journaled.clone());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Server {
            base,
            journaled,
            client,
            task,
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Bytes::from(json.to_string())
            }
            None => Bytes::new(),
        };
        let response = self
            .client
            .request(request.body(Full::new(body)).unwrap())
            .await
            .expect("the service answers");
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            request_id,
            body,
        }
    }

    /// Signs a user up, as `headers` say; returns the new user's id.
    async fn sign_up(&self, name: &str, headers: &[(&str, &str)]) -> i64 {
        let body = json!({"name": name, "email": format!("{name}@example.com")});
        let reply = self.send("POST", "/users", headers, Some(body)).await;
        assert_eq!(reply.status, 201, "sign-up: {}", reply.body);
        reply.body["id"].as_i64().unwrap()
    }

    /// Every committed event, read from the job table, for `journaled::testing` to match.
    async fn committed(&self) -> Captured {
        let mut events = Vec::new();
        for job in self.journaled.jobs().await.unwrap() {
            for record in job.records().unwrap() {
                let data: Value = serde_json::from_slice(record.data()).unwrap();
                events.push(CapturedEvent {
                    event_type: data["event_type"].as_str().unwrap().to_owned(),
                    stream: record.stream,
                    partition_key: record.partition_key,
                    priority: job.priority,
                    run_at: None,
                    data,
                });
            }
        }
        Captured { events }
    }
}

async fn events_carry_the_requests_actor_request_id_and_tags<DB: Db>(db: &TestDb<DB>) {
    let server = Server::start(db).await;
    let headers = [
        ("x-user-id", "42"),
        ("x-request-id", "req-sign-up"),
        ("x-client", "ios/3.1"),
    ];
    let id = server.sign_up("ada", &headers).await;

    // No x-request-id: tower-http makes one up, returns it, and the events carry it.
    let path = format!("/users/{id}/plan");
    let reply = server
        .send(
            "PUT",
            &path,
            &[("x-user-id", "42")],
            Some(json!({"plan": "pro"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let made_up = reply.request_id.expect("x-request-id on the response");
    assert!(!made_up.is_empty());

    let read = server.send("GET", &format!("/users/{id}"), &[], None).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["plan"], "pro");

    let actor = user_gid(42);
    let sign_up_tags = json!({"request_id": "req-sign-up", "client": "ios/3.1", "route": "/users"});
    let plan_tags = json!({"request_id": made_up, "route": "/users/{id}/plan"});
    let committed = server.committed().await;
    committed.assert(&[
        Expect::event(json!({"user_id": id, "email_domain": "example.com", "actor": actor, "tags": sign_up_tags}))
            .with_event_type("user_signed_up"),
        Expect::event(json!({"database_operation": "insert", "record_id": id.to_string(), "actor": actor, "tags": sign_up_tags}))
            .with_event_type("journaled_audit_log_event"),
        Expect::event(json!({"user_id": id, "from": "free", "to": "pro", "actor": actor, "tags": plan_tags}))
            .with_event_type("plan_changed"),
        Expect::event(json!({"database_operation": "update", "changes": {"plan": ["free", "pro"]}, "actor": actor, "tags": plan_tags}))
            .with_event_type("journaled_audit_log_event"),
    ]);
    assert_eq!(committed.events.len(), 4, "{:#?}", committed.events);
    // Tags are the request's own: nothing from one request leaks into the other's events.
    for event in &committed.events {
        let expected = match event.data["tags"]["request_id"].as_str() {
            Some("req-sign-up") => &sign_up_tags,
            _ => &plan_tags,
        };
        assert_eq!(&event.data["tags"], expected, "{}", event.data);
    }
}

async fn anonymous_and_impersonated_requests<DB: Db>(db: &TestDb<DB>) {
    let server = Server::start(db).await;
    // No user: the layer sets no actor, and the fallback rules apply as anywhere else.
    let id = server
        .sign_up("grace", &[("x-request-id", "req-anonymous")])
        .await;
    // Staff user 7 acting as the new user: the event is the user's, tagged with who really did it.
    let acting_as = id.to_string();
    let staff = [
        ("x-user-id", "7"),
        ("x-act-as", acting_as.as_str()),
        ("x-request-id", "req-impersonated"),
    ];
    let path = format!("/users/{id}/credits");
    let reply = server
        .send("POST", &path, &staff, Some(json!({"amount": 25})))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.request_id.as_deref(), Some("req-impersonated"));

    let fallback = journaled::actor_uri(); // this process, outside any scope
    let committed = server.committed().await;
    committed.assert(&[
        Expect::event(json!({"actor": fallback, "tags": {"request_id": "req-anonymous"}}))
            .with_event_type("user_signed_up"),
        Expect::event(json!({"actor": fallback, "database_operation": "insert"}))
            .with_event_type("journaled_audit_log_event"),
        Expect::event(json!({
            "amount": 25, "balance": 25, "actor": user_gid(id),
            "tags": {"request_id": "req-impersonated", "impersonator": user_gid(7)},
        }))
        .with_event_type("credits_adjusted"),
        Expect::event(json!({
            "changes": {"credits": [0, 25]}, "actor": user_gid(id),
            "tags": {"impersonator": user_gid(7)},
        }))
        .with_event_type("journaled_audit_log_event"),
    ]);
    committed.assert_not(&[
        Expect::event(json!({"actor": user_gid(7)})),
        Expect::event(
            json!({"tags": {"request_id": "req-anonymous", "impersonator": user_gid(7)}}),
        ),
    ]);
}

async fn concurrent_requests_never_see_each_others_context<DB: Db>(db: &TestDb<DB>) {
    const REQUESTS: i64 = 64;
    let server = std::sync::Arc::new(Server::start(db).await);
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let (user, request_id, client) =
                    (i.to_string(), format!("req-{i}"), format!("client-{i}"));
                let headers = [
                    ("x-user-id", user.as_str()),
                    ("x-request-id", request_id.as_str()),
                    ("x-client", client.as_str()),
                ];
                (server.sign_up(&format!("user{i}"), &headers).await, i)
            })
        })
        .collect();
    let mut requester_of: HashMap<String, i64> = HashMap::new();
    for request in requests {
        let (id, i) = request.await.unwrap();
        requester_of.insert(id.to_string(), i);
    }

    let committed = server.committed().await;
    assert_eq!(committed.events.len(), 2 * REQUESTS as usize);
    for event in &committed.events {
        // Which request made it, from the row it is about, not from its context.
        let record = match event.event_type.as_str() {
            "user_signed_up" => event.data["user_id"].to_string(),
            _ => event.data["record_id"].as_str().unwrap().to_owned(),
        };
        let i = requester_of[&record];
        assert_eq!(event.data["actor"], user_gid(i), "{}", event.data);
        assert_eq!(
            event.data["tags"],
            json!({"request_id": format!("req-{i}"), "client": format!("client-{i}"), "route": "/users"}),
            "{}",
            event.data
        );
    }
}

async fn a_failing_handler_leaves_no_event<DB: Db>(db: &TestDb<DB>) {
    let server = Server::start(db).await;
    let id = server.sign_up("alan", &[("x-user-id", "1")]).await;
    let credits = format!("/users/{id}/credits");
    let plan = format!("/users/{id}/plan");
    let as_user = |request_id: &'static str| [("x-user-id", "1"), ("x-request-id", request_id)];

    let ok = server
        .send(
            "POST",
            &credits,
            &as_user("req-top-up"),
            Some(json!({"amount": 10})),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // The handler updates, journals and audits, then finds the balance negative: 409.
    let overdrawn = server
        .send(
            "POST",
            &credits,
            &as_user("req-overdraw"),
            Some(json!({"amount": -50})),
        )
        .await;
    assert_eq!(overdrawn.status, 409, "{}", overdrawn.body);
    // The update runs, then the event fails its schema: 422.
    let bad_plan = server
        .send(
            "PUT",
            &plan,
            &as_user("req-bad-plan"),
            Some(json!({"plan": "platinum"})),
        )
        .await;
    assert_eq!(bad_plan.status, 422, "{}", bad_plan.body);
    assert!(
        bad_plan.body["error"]
            .as_str()
            .unwrap()
            .contains("plan_changed")
    );

    let read = server.send("GET", &format!("/users/{id}"), &[], None).await;
    assert_eq!(
        (read.body["credits"].clone(), read.body["plan"].clone()),
        (json!(10), json!("free"))
    );

    let committed = server.committed().await;
    committed.assert(&[
        Expect::event(json!({"amount": 10, "tags": {"request_id": "req-top-up"}}))
            .with_event_type("credits_adjusted"),
        Expect::event(json!({"changes": {"credits": [0, 10]}}))
            .with_event_type("journaled_audit_log_event"),
    ]);
    committed.assert_not(&[
        Expect::event(json!({"tags": {"request_id": "req-overdraw"}})),
        Expect::event(json!({"tags": {"request_id": "req-bad-plan"}})),
        Expect::event(json!({"amount": -50})),
    ]);
    assert_eq!(committed.events.len(), 4, "{:#?}", committed.events);
}

on_both_backends!(
    events_carry_the_requests_actor_request_id_and_tags,
    anonymous_and_impersonated_requests,
    concurrent_requests_never_see_each_others_context,
    a_failing_handler_leaves_no_event,
);
