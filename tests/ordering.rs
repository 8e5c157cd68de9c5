//! Ordered delivery per (stream, partition key), issue 14: a gap-free sequence taken in the
//! writer's transaction, in commit order, in each event's envelope.

mod common;

use std::collections::BTreeMap;

use common::{AppSql, TestDb, test_config};
use journaled::{Backend, JournalError, Journaled, journal};
use serde::Serialize;
use serde_json::Value;

/// Ordered by type: every event of a key gets the key's next sequence.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct Ordered {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// Not ordered by type (ordered only on a stream configured so).
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event")]
struct Plain {
    #[journaled(partition_key)]
    account: String,
    n: i64,
}

/// An ordered event may not carry its own `sequence`.
#[derive(Serialize, journaled::Event)]
#[journaled(event_type = "free_event", ordered)]
struct ClaimsSequence {
    sequence: i64,
}

/// (key, sequence in the envelope, sequence in the stored record, data) of every stored event,
/// in job and record order.
async fn sequences<DB: Backend>(
    journaled: &Journaled<DB>,
) -> Vec<(String, Option<i64>, Option<i64>, String)> {
    let mut out = Vec::new();
    for job in journaled.jobs().await.unwrap() {
        for record in job.records().unwrap() {
            let text = String::from_utf8(record.data().to_vec()).unwrap();
            let value: Value = serde_json::from_str(&text).unwrap();
            out.push((
                record.partition_key.clone(),
                value["sequence"].as_i64(),
                record.sequence,
                text,
            ));
        }
    }
    out
}

/// Concurrent writers of two keys (each transaction journals b, a, a, a), some rolled back, and
/// one event journaled outside a transaction: per key the sequences are 1..=n with no gap and
/// no repeat; within a transaction they follow `journal!` order; the sequence sits in the
/// envelope right after `created_at`, and in the stored record.
async fn sequences_are_gap_free_and_follow_journal_order<DB: Backend + AppSql>(db: &TestDb<DB>) {
    let journaled = db.migrated().await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let journaled = journaled.clone();
        writers.push(tokio::spawn(async move {
            for t in 0..10 {
                let mut tx = journaled.begin().await.unwrap();
                journal!(
                    tx,
                    Ordered {
                        account: "b".into(),
                        n: w * 100 + t
                    }
                )
                .unwrap();
                for _ in 0..3 {
                    journal!(
                        tx,
                        Ordered {
                            account: "a".into(),
                            n: w * 100 + t
                        }
                    )
                    .unwrap();
                }
                if t % 5 == 4 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    journal!(
        journaled,
        Ordered {
            account: "b".into(),
            n: -1
        }
    )
    .await
    .unwrap();

    let stored = sequences(&journaled).await;
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, in_envelope, in_record, text) in &stored {
        assert_eq!(in_envelope, in_record, "{text}");
        let seq = in_envelope.unwrap_or_else(|| panic!("no sequence: {text}"));
        per_key.entry(key.clone()).or_default().push(seq);
        let created = text.find("\"created_at\"").unwrap();
        let sequence = text.find("\"sequence\"").unwrap();
        let account = text.find("\"account\"").unwrap();
        assert!(created < sequence && sequence < account, "{text}");
    }
    // 4 writers × 8 committed transactions.
    let a = per_key.remove("a").unwrap();
    let b = per_key.remove("b").unwrap();
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=96).collect::<Vec<_>>());
    let mut sorted = b.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=33).collect::<Vec<_>>());
    // One transaction is one job: its three `a` events are consecutive, in journal order.
    for chunk in a.chunks(3) {
        assert_eq!(chunk, [chunk[0], chunk[0] + 1, chunk[0] + 2], "{a:?}");
    }
}

/// `Config::with_ordered_stream` orders every event of that stream; other events carry no
/// sequence and keep today's envelope; an ordered event may not name an attribute `sequence`.
async fn an_ordered_stream_orders_every_event_type<DB: Backend + AppSql>(db: &TestDb<DB>) {
    db.migrated().await;
    let plain = db.journaled(test_config());
    journal!(
        plain,
        Plain {
            account: "k".into(),
            n: 1
        }
    )
    .await
    .unwrap();
    let ordered = db.journaled(test_config().with_ordered_stream("test_stream"));
    let mut tx = ordered.begin().await.unwrap();
    journal!(
        tx,
        Plain {
            account: "k".into(),
            n: 2
        }
    )
    .unwrap();
    journal!(
        tx,
        Plain {
            account: "k".into(),
            n: 3
        }
    )
    .unwrap();
    tx.commit().await.unwrap();
    let seqs: Vec<Option<i64>> = sequences(&plain).await.into_iter().map(|s| s.1).collect();
    assert_eq!(seqs, [None, Some(1), Some(2)]);

    let err = plain.validate(&ClaimsSequence { sequence: 7 }).unwrap_err();
    assert!(
        matches!(&err, JournalError::ReservedAttribute { name, .. } if name == "sequence"),
        "{err}"
    );
}

on_both_backends!(
    sequences_are_gap_free_and_follow_journal_order,
    an_ordered_stream_orders_every_event_type,
);
