//! Requests in which one partition key's records never race each other.
//!
//! `PutRecords` requests sent concurrently can land in any order, so a key whose records sit
//! in two requests sent together can arrive out of order (a 600-event transaction with one key
//! arrived with events 501–600 first). Here a stream's records are grouped by key (in claim
//! order, so in commit and `journal!` order), a key's records are kept in one request where
//! they fit, and the requests a key spans form one *lane*: sent one after the other. Lanes run
//! concurrently.

use std::collections::{BTreeMap, HashMap};

use std::pin::Pin;

use futures_util::{Stream, StreamExt};

use super::metrics::Metrics;
use super::publish::{self, JobState, Slot};
use super::sink::{RecordOutcome, Sink};

/// Requests of one stream to send one after the other (they share a key).
pub(crate) type Lane<'a> = Vec<(&'a str, Vec<Slot>)>;

/// One stream's keys in first-seen order, each with its records in claim order.
type Runs<'a> = (HashMap<&'a str, usize>, Vec<Vec<Slot>>);

/// A lane being sent: each request's outcomes as it completes.
pub(crate) type LaneSends<'a> = Pin<Box<dyn Stream<Item = Vec<(Slot, RecordOutcome)>> + Send + 'a>>;

/// Cuts every record of `jobs` into requests of at most `max_records` records and `max_bytes`
/// bytes (data plus partition key), per stream, keeping each key's records together where they
/// fit; requests that share a key are in one lane, in order.
pub(crate) fn lanes(jobs: &[JobState], max_records: usize, max_bytes: usize) -> Vec<Lane<'_>> {
    // stream → keys in first-seen order → the key's records in claim order.
    let mut by_stream: BTreeMap<&str, Runs<'_>> = BTreeMap::new();
    for (j, job) in jobs.iter().enumerate() {
        let Ok(records) = &job.records else { continue };
        for (r, record) in records.iter().enumerate() {
            if record.sequence.is_some() {
                continue; // ordered: sent in rounds (see `ordered`)
            }
            let (index, runs) = by_stream.entry(record.stream.as_str()).or_default();
            let at = *index
                .entry(record.partition_key.as_str())
                .or_insert_with(|| {
                    runs.push(Vec::new());
                    runs.len() - 1
                });
            runs[at].push((j, r));
        }
    }
    let size = |&(j, r): &Slot| {
        let record = &jobs[j].records.as_ref().expect("decoded")[r];
        record.data().len() + record.partition_key.len()
    };
    let mut lanes: Vec<Lane<'_>> = Vec::new();
    for (stream, (_, runs)) in by_stream {
        // The open lane: its full requests, then the request being filled.
        let mut lane: Lane<'_> = Vec::new();
        let mut current: Vec<Slot> = Vec::new();
        let mut bytes = 0;
        for run in runs {
            let run_bytes: usize = run.iter().map(size).sum();
            if current.len() + run.len() <= max_records && bytes + run_bytes <= max_bytes {
                current.extend(run);
                bytes += run_bytes;
                continue;
            }
            // Not in this request: close the lane, so the key starts a request of its own.
            if !current.is_empty() {
                lane.push((stream, std::mem::take(&mut current)));
            }
            if !lane.is_empty() {
                lanes.push(std::mem::take(&mut lane));
            }
            bytes = 0;
            // A key too big for one request spans several, all in this lane.
            for slot in run {
                let s = size(&slot);
                if !current.is_empty() && (current.len() == max_records || bytes + s > max_bytes) {
                    lane.push((stream, std::mem::take(&mut current)));
                    bytes = 0;
                }
                current.push(slot);
                bytes += s;
            }
        }
        if !current.is_empty() {
            lane.push((stream, current));
        }
        if !lane.is_empty() {
            lanes.push(lane);
        }
    }
    lanes
}

/// Sends a lane's requests one after the other; yields each request's outcomes.
pub(crate) fn send_lane<'a>(
    sink: &'a dyn Sink,
    metrics: &'a Metrics,
    lane: Lane<'a>,
    jobs: &'a [JobState],
) -> LaneSends<'a> {
    Box::pin(
        futures_util::stream::iter(lane)
            .then(move |(stream, slots)| publish::send(sink, metrics, stream, slots, jobs)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;
    use crate::store::records::encode_parts;
    use crate::store::{Claimed, JobId};
    use time::OffsetDateTime;

    /// A job of (stream, key, data bytes) records, all delivered.
    fn job(records: &[(&str, &str, usize)]) -> JobState {
        let data: Vec<String> = records
            .iter()
            .map(|(_, _, n)| format!("\"{}\"", "x".repeat(*n)))
            .collect();
        let encoded =
            encode_parts(records.iter().zip(&data).map(|((stream, key, _), data)| {
                (EventId::new(), *stream, *key, data.as_str(), None)
            }));
        JobState::decode(Claimed {
            id: JobId(1),
            priority: 20,
            attempts: 0,
            transient_failures: 0,
            records: encoded,
            created_at: OffsetDateTime::now_utc(),
        })
    }

    fn shape(lanes: &[Lane<'_>]) -> Vec<Vec<(String, usize)>> {
        lanes
            .iter()
            .map(|lane| {
                lane.iter()
                    .map(|(s, slots)| (s.to_string(), slots.len()))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_key_spanning_requests_is_one_lane_in_order() {
        // 600 records of one key (as a 600-event transaction makes: two jobs).
        let jobs = vec![
            job(&vec![("s", "k", 1); 500]),
            job(&vec![("s", "k", 1); 100]),
        ];
        let planned = lanes(&jobs, 500, 1_000_000);
        assert_eq!(
            shape(&planned),
            [vec![("s".into(), 500), ("s".into(), 100)]]
        );
        let order: Vec<Slot> = planned[0].iter().flat_map(|(_, s)| s.clone()).collect();
        let expected: Vec<Slot> = (0..500)
            .map(|r| (0, r))
            .chain((0..100).map(|r| (1, r)))
            .collect();
        assert_eq!(order, expected, "claim order is kept");
    }

    #[test]
    fn keys_stay_whole_where_they_fit_and_share_requests() {
        // a×3, b×3, c×1 by 4 records a request: a fills one, b and c the next.
        let jobs = vec![job(&[
            ("s", "a", 1),
            ("s", "b", 1),
            ("s", "a", 1),
            ("s", "b", 1),
            ("s", "a", 1),
            ("s", "b", 1),
            ("s", "c", 1),
            ("t", "a", 1),
        ])];
        let planned = lanes(&jobs, 4, 1_000_000);
        assert_eq!(
            shape(&planned),
            [
                vec![("s".into(), 3)],
                vec![("s".into(), 4)],
                vec![("t".into(), 1)]
            ]
        );
        let first: Vec<usize> = planned[0][0].1.iter().map(|&(_, r)| r).collect();
        assert_eq!(first, [0, 2, 4]);
        // Bytes: 1 + 2 quotes + 1 key byte = 4 each; 8 bytes hold two.
        let jobs = vec![job(&[
            ("s", "a", 1),
            ("s", "a", 1),
            ("s", "a", 1),
            ("s", "b", 1),
        ])];
        let planned = lanes(&jobs, 500, 8);
        assert_eq!(
            shape(&planned),
            [vec![("s".into(), 2), ("s".into(), 2)],],
            "a spans two requests; b fills the last one"
        );
        assert_eq!(
            planned
                .iter()
                .flatten()
                .map(|(_, s)| s.len())
                .sum::<usize>(),
            4
        );
    }
}
