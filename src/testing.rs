//! Helpers for your application's tests (feature `testing`): capture the events a piece of code
//! journals and commits, and match them partially, as the reference's RSpec matchers do.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use journaled::testing::{Expect, capture};
//! use serde_json::json;
//!
//! let ((), journaled) = capture(async {
//!     // code that journals events and commits its transactions
//! }).await;
//! assert!(journaled.check(&[Expect::event(json!({"name": "foo"}))]).is_err());
//! journaled.assert_not(&[Expect::event(json!({"name": "foo"}))]);
//! # }
//! ```
//!
//! Only events whose transaction committed are captured; staged events that were rolled back are
//! not. Capture is task-local: concurrent tests see only their own events, and a task spawned
//! inside the captured future is not captured (run it inside `capture` of its own, or await it).

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use time::OffsetDateTime;

use crate::audit::Audited;
use crate::event::Prepared;

/// One committed event as a test sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CapturedEvent {
    /// Its type.
    pub event_type: String,
    /// Its stream.
    pub stream: String,
    /// Its partition key.
    pub partition_key: String,
    /// Its job priority.
    pub priority: i32,
    /// When it may be delivered (`None`: at once).
    pub run_at: Option<OffsetDateTime>,
    /// The record, parsed.
    pub data: Value,
}

tokio::task_local! {
    static CAPTURE: Arc<Mutex<Vec<CapturedEvent>>>;
}

/// Called by the library when events are committed.
pub(crate) fn record(events: &[Prepared]) {
    let _ = CAPTURE.try_with(|captured| {
        let mut captured = captured.lock().expect("poisoned");
        captured.extend(events.iter().map(|e| CapturedEvent {
            event_type: e.event_type.to_owned(),
            stream: e.stream.clone(),
            partition_key: e.partition_key.clone(),
            priority: e.priority,
            run_at: crate::event::resolve(e.run_at, OffsetDateTime::now_utc()),
            data: serde_json::from_str(&e.published_data()).expect("the record is JSON"),
        }));
    });
}

/// Runs `fut` and returns its output with every event it journaled and committed.
pub async fn capture<F: Future>(fut: F) -> (F::Output, Captured) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let output = CAPTURE.scope(events.clone(), fut).await;
    let events = std::mem::take(&mut *events.lock().expect("poisoned"));
    (output, Captured { events })
}

/// An expected event: a partial JSON object plus optional refinements.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    including: Value,
    event_type: Option<String>,
    priority: Option<i32>,
    stream: Option<String>,
    partition_key: Option<String>,
    run_at: Option<OffsetDateTime>,
}

impl Expect {
    /// An event whose JSON includes `partial`: every key given must be there with a matching
    /// value (objects match partially and recursively, arrays element by element); other keys
    /// are not looked at.
    pub fn event(partial: Value) -> Self {
        Expect {
            including: partial,
            event_type: None,
            priority: None,
            stream: None,
            partition_key: None,
            run_at: None,
        }
    }

    /// …of this event type.
    pub fn with_event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// …enqueued with this priority.
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// …bound for this stream.
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// …with this partition key.
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// …due at this time.
    pub fn with_run_at(mut self, run_at: OffsetDateTime) -> Self {
        self.run_at = Some(run_at);
        self
    }

    fn describe(&self) -> String {
        let mut out = self.including.to_string();
        let mut with = Vec::new();
        if let Some(t) = &self.event_type {
            with.push(format!("event type {t}"));
        }
        if let Some(p) = self.priority {
            with.push(format!("priority {p}"));
        }
        if let Some(s) = &self.stream {
            with.push(format!("stream {s}"));
        }
        if let Some(k) = &self.partition_key {
            with.push(format!("partition key {k}"));
        }
        if let Some(r) = self.run_at {
            with.push(format!("run at {r}"));
        }
        if !with.is_empty() {
            out.push_str(&format!(" with {}", with.join(", ")));
        }
        out
    }

    /// Every way `actual` differs from this expectation (empty: it matches).
    fn differences(&self, actual: &CapturedEvent) -> Vec<String> {
        let mut out = Vec::new();
        diff("", &self.including, &actual.data, &mut out);
        let mut refine = |what: &str, expected: Option<String>, got: String| {
            if let Some(expected) = expected
                && expected != got
            {
                out.push(format!("{what}: expected {expected}, got {got}"));
            }
        };
        refine(
            "event type",
            self.event_type.clone(),
            actual.event_type.clone(),
        );
        refine(
            "priority",
            self.priority.map(|p| p.to_string()),
            actual.priority.to_string(),
        );
        refine("stream", self.stream.clone(), actual.stream.clone());
        refine(
            "partition key",
            self.partition_key.clone(),
            actual.partition_key.clone(),
        );
        refine(
            "run at",
            self.run_at.map(|r| r.to_string()),
            actual
                .run_at
                .map(|r| r.to_string())
                .unwrap_or_else(|| "now".into()),
        );
        out
    }
}

fn diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => {
            for (key, value) in want {
                let here = format!("{path}/{key}");
                match got.get(key) {
                    Some(actual) => diff(&here, value, actual, out),
                    None => out.push(format!("{here}: expected {value}, missing")),
                }
            }
        }
        (Value::Array(want), Value::Array(got)) if want.len() == got.len() => {
            for (i, (w, g)) in want.iter().zip(got).enumerate() {
                diff(&format!("{path}/{i}"), w, g, out);
            }
        }
        (want, got) if want == got => {}
        (want, got) => out.push(format!(
            "{}: expected {want}, got {got}",
            if path.is_empty() { "/" } else { path }
        )),
    }
}

/// Why a match failed, with the closest actual events and how they differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchFailure(pub String);

impl std::fmt::Display for MatchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MatchFailure {}

/// The events a captured future journaled and committed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Captured {
    /// In commit order.
    pub events: Vec<CapturedEvent>,
}

impl Captured {
    /// Every expectation is matched by a distinct captured event; other events are ignored.
    pub fn check(&self, expected: &[Expect]) -> Result<(), MatchFailure> {
        let fits: Vec<Vec<usize>> = expected
            .iter()
            .map(|e| {
                (0..self.events.len())
                    .filter(|&i| e.differences(&self.events[i]).is_empty())
                    .collect()
            })
            .collect();
        // Kuhn's augmenting paths: each expectation gets an event of its own.
        let mut owner: Vec<Option<usize>> = vec![None; self.events.len()];
        let mut unmatched = Vec::new();
        for e in 0..expected.len() {
            let mut seen = vec![false; self.events.len()];
            if !augment(e, &fits, &mut owner, &mut seen) {
                unmatched.push(e);
            }
        }
        if unmatched.is_empty() {
            return Ok(());
        }
        let mut message = String::new();
        for e in unmatched {
            let expectation = &expected[e];
            message.push_str(&format!(
                "expected a journaled event including {}\n",
                expectation.describe()
            ));
            if !fits[e].is_empty() {
                message.push_str(
                    "  every event that matches it is already matched by another expectation\n",
                );
            }
            let mut closest: Vec<(usize, Vec<String>)> = self
                .events
                .iter()
                .enumerate()
                .map(|(i, actual)| (i, expectation.differences(actual)))
                .collect();
            closest.sort_by_key(|(_, d)| d.len());
            if closest.is_empty() {
                message.push_str("  but nothing was journaled (and committed)\n");
            }
            for (i, differences) in closest.into_iter().take(3) {
                let actual = &self.events[i];
                message.push_str(&format!(
                    "  closest: {} (priority {}, stream {}, key {})\n",
                    actual.data, actual.priority, actual.stream, actual.partition_key
                ));
                for d in differences {
                    message.push_str(&format!("    - {d}\n"));
                }
            }
        }
        Err(MatchFailure(message))
    }

    /// No captured event matches any of `unexpected`.
    pub fn check_not(&self, unexpected: &[Expect]) -> Result<(), MatchFailure> {
        let mut message = String::new();
        for e in unexpected {
            for actual in &self.events {
                if e.differences(actual).is_empty() {
                    message.push_str(&format!(
                        "expected no journaled event including {}, but found {}\n",
                        e.describe(),
                        actual.data
                    ));
                }
            }
        }
        if message.is_empty() {
            Ok(())
        } else {
            Err(MatchFailure(message))
        }
    }

    /// Panics with the closest events, diffed, unless [`check`](Self::check) passes.
    #[track_caller]
    pub fn assert(&self, expected: &[Expect]) {
        if let Err(failure) = self.check(expected) {
            panic!("{failure}");
        }
    }

    /// Panics unless [`check_not`](Self::check_not) passes.
    #[track_caller]
    pub fn assert_not(&self, unexpected: &[Expect]) {
        if let Err(failure) = self.check_not(unexpected) {
            panic!("{failure}");
        }
    }
}

fn augment(e: usize, fits: &[Vec<usize>], owner: &mut [Option<usize>], seen: &mut [bool]) -> bool {
    for &i in &fits[e] {
        if seen[i] {
            continue;
        }
        seen[i] = true;
        if owner[i].is_none_or(|other| augment(other, fits, owner, seen)) {
            owner[i] = Some(e);
            return true;
        }
    }
    false
}

/// Checks that `R` journals changes to exactly `attributes` under `logical_operation` (the
/// reference's `journal_changes_to` matcher), to guard consumers against accidental changes.
pub fn check_journals_changes_to<R: Audited>(
    attributes: &[&str],
    logical_operation: &str,
) -> Result<(), MatchFailure> {
    let mut want: Vec<&str> = attributes.to_vec();
    want.sort_unstable();
    let declared: Vec<String> = R::CHANGES
        .iter()
        .map(|d| format!("{:?} as {}", d.attributes, d.logical_operation))
        .collect();
    let found = R::CHANGES.iter().any(|d| {
        let mut have: Vec<&str> = d.attributes.to_vec();
        have.sort_unstable();
        d.logical_operation == logical_operation && have == want
    });
    if found {
        Ok(())
    } else {
        Err(MatchFailure(format!(
            "expected {} to journal changes to {want:?} as {logical_operation}; it declares: {}",
            R::CLASS_NAME,
            if declared.is_empty() {
                "nothing".to_owned()
            } else {
                declared.join("; ")
            }
        )))
    }
}

/// Panics unless [`check_journals_changes_to`] passes.
#[track_caller]
pub fn assert_journals_changes_to<R: Audited>(attributes: &[&str], logical_operation: &str) {
    if let Err(failure) = check_journals_changes_to::<R>(attributes, logical_operation) {
        panic!("{failure}");
    }
}
