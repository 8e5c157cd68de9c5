//! The `records` column codec: JSON text `[{"id","stream","partition_key","data"}, ...]`, where
//! `data` is each event's exact serialized bytes embedded as raw JSON, and the grouping of staged
//! events into jobs.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::NewJob;
use crate::event::{EventId, Prepared, RunAt, SEQUENCE_ROOM};

/// One event as stored in a job: where it goes and its exact bytes.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct StoredRecord {
    /// The event id.
    pub id: EventId,
    /// The Kinesis stream.
    pub stream: String,
    /// The Kinesis partition key.
    pub partition_key: String,
    /// Its place among its (stream, partition key)'s records, for an ordered event: delivered
    /// only after its predecessor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    /// The record's data: the event's JSON exactly as validated.
    pub data: Box<RawValue>,
}

impl StoredRecord {
    /// The record's data bytes.
    pub fn data(&self) -> &[u8] {
        self.data.get().as_bytes()
    }
}

/// Encodes records into the `records` column format from (id, stream, partition key, data,
/// sequence).
///
/// Every commit pays this once per record, so it writes into one buffer sized up front, with
/// no allocation per record.
#[cfg(any(feature = "worker", test))]
pub(crate) fn encode_parts<'a>(
    parts: impl IntoIterator<Item = (EventId, &'a str, &'a str, &'a str, Option<i64>)>,
) -> String {
    let parts: Vec<_> = parts.into_iter().collect();
    let capacity = 2 + parts
        .iter()
        .map(|(_, stream, key, data, _)| 112 + stream.len() + key.len() + data.len())
        .sum::<usize>();
    let mut out = String::with_capacity(capacity);
    out.push('[');
    for (i, (id, stream, partition_key, data, sequence)) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let sequence = sequence.map_or(Sequence::None, Sequence::Taken);
        push_record_head(&mut out, id, stream, partition_key, sequence);
        out.push_str(data);
        out.push('}');
    }
    out.push(']');
    out
}

/// An event's sequence, as its job's records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sequence {
    /// Not ordered.
    None,
    Taken(i64),
    /// The `n`th sequence of the job's own key number `key`, taken by the statement that writes
    /// the job: a placeholder that describes it (see [`Backend::insert_jobs_taking_sequences`](super::Backend::insert_jobs_taking_sequences)).
    Pending {
        key: usize,
        n: i64,
    },
}

/// `,"sequence":` and the sequence (or its placeholder); nothing for [`Sequence::None`].
fn push_sequence(out: &mut String, sequence: Sequence) {
    let p = crate::event::SEQUENCE_PLACEHOLDER;
    match sequence {
        Sequence::None => {}
        Sequence::Taken(sequence) => {
            out.push_str(crate::event::SEQUENCE_KEY);
            super::push_decimal(out, sequence);
        }
        Sequence::Pending { key, n } => {
            out.push_str(crate::event::SEQUENCE_KEY);
            out.push(p);
            super::push_decimal(out, key as i64);
            out.push('.');
            super::push_decimal(out, n);
            out.push(p);
        }
    }
}

/// A record up to its data: `{"id":…,"stream":…,"partition_key":…[,"sequence":…],"data":`.
fn push_record_head(
    out: &mut String,
    id: EventId,
    stream: &str,
    partition_key: &str,
    sequence: Sequence,
) {
    out.push_str("{\"id\":\"");
    out.push_str(
        id.0.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    out.push_str("\",\"stream\":");
    push_json_string(out, stream);
    out.push_str(",\"partition_key\":");
    push_json_string(out, partition_key);
    push_sequence(out, sequence);
    out.push_str(",\"data\":");
}

/// The text every record of (stream, partition key) holds in the `records` column, as
/// [`encode_parts`] writes it: for finding a key's jobs by a text search.
pub(crate) fn key_needle(stream: &str, partition_key: &str) -> String {
    let mut out = String::from("\"stream\":");
    push_json_string(&mut out, stream);
    out.push_str(",\"partition_key\":");
    push_json_string(&mut out, partition_key);
    out
}

/// Appends `text` as a JSON string: as it is when nothing in it needs escaping (the usual
/// stream name or key), else as serde_json escapes it.
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
    }
}

/// Encodes staged events into the `records` column format, `sequences[i]` being the
/// sequence of `events[i]`. An ordered event's sequence goes in its record and in its envelope
/// (right after `created_at`), written here: its `data` never holds it.
fn encode_staged(events: &[&Prepared], sequences: &[Sequence]) -> String {
    let capacity = 2 + events
        .iter()
        .map(|e| {
            let sequence = if e.ordered { 2 * SEQUENCE_ROOM } else { 0 };
            112 + e.stream.len() + e.partition_key.len() + e.data.len() + sequence
        })
        .sum::<usize>();
    let mut out = String::with_capacity(capacity);
    out.push('[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let sequence = sequences[i];
        push_record_head(&mut out, e.id, &e.stream, &e.partition_key, sequence);
        if sequence == Sequence::None {
            out.push_str(&e.data);
        } else {
            out.push_str(&e.data[..e.splice_at]);
            push_sequence(&mut out, sequence);
            out.push_str(&e.data[e.splice_at..]);
        }
        out.push('}');
    }
    out.push(']');
    out
}

#[cfg(feature = "worker")]
/// Encodes stored records again (what is left of a job after a partial delivery).
pub(crate) fn encode_stored<'a>(records: impl IntoIterator<Item = &'a StoredRecord>) -> String {
    encode_parts(records.into_iter().map(|r| {
        (
            r.id,
            r.stream.as_str(),
            r.partition_key.as_str(),
            r.data.get(),
            r.sequence,
        )
    }))
}

/// Decodes the `records` column; the message says what is wrong.
pub fn decode_records(text: &str) -> Result<Vec<StoredRecord>, String> {
    serde_json::from_str(text).map_err(|e| {
        if let Some(placeholder) = text.find(crate::event::SEQUENCE_PLACEHOLDER) {
            let near: String = text[placeholder..].chars().take(24).collect();
            format!(
                "records are not decodable: they hold a sequence placeholder that was not filled \
                 (its job's sequence bases are missing or do not match it) at {near:?}"
            )
        } else {
            format!("records are not decodable: {e}")
        }
    })
}

/// Most records one job row holds: one `PutRecords` request's worth.
pub const MAX_JOB_RECORDS: usize = 500;
/// Most bytes (data plus partition keys) one job row holds: one `PutRecords` request's worth.
pub const MAX_JOB_BYTES: usize = 5 * 1024 * 1024;

/// Groups staged events into jobs: one group per distinct (priority, run-at), in first-seen
/// order, cut into rows of at most [`MAX_JOB_RECORDS`] records and [`MAX_JOB_BYTES`] bytes, so
/// that no row outgrows one `PutRecords` request however large the transaction. A delay is
/// passed to the database, which adds it to its own clock: events with the same delay share a
/// job, and no application clock is compared with the database's.
pub(crate) fn group(staged: &[Prepared]) -> Vec<NewJob> {
    group_taking_sequences(staged, &[], 0).0
}

/// [`group`], for events some of which take sequences in the statement that writes the jobs:
/// `slots[i]` is `Some((key, n))` when `staged[i]` takes the `n`th sequence of the
/// transaction's key number `key` (of `key_count`). Their records hold placeholders naming
/// the job's own keys (see [`Backend::insert_jobs_taking_sequences`](super::Backend::insert_jobs_taking_sequences));
/// returns the jobs with, for each, its own keys (numbers of the transaction's keys, in order
/// of first appearance), so that a job carries the bases of its own keys only, however many
/// the transaction has.
pub(crate) fn group_taking_sequences(
    staged: &[Prepared],
    slots: &[Option<(usize, i64)>],
    key_count: usize,
) -> (Vec<NewJob>, Vec<Vec<i64>>) {
    let mut groups: Vec<(i32, Option<RunAt>, Vec<usize>)> = Vec::new();
    for (i, event) in staged.iter().enumerate() {
        match groups
            .iter_mut()
            .find(|(priority, at, _)| *priority == event.priority && *at == event.run_at)
        {
            Some((_, _, events)) => events.push(i),
            None => groups.push((event.priority, event.run_at, vec![i])),
        }
    }
    // Per transaction key: the last job that named it, and its number among that job's keys.
    let mut own: Vec<(usize, usize)> = vec![(usize::MAX, 0); key_count];
    let mut jobs = Vec::with_capacity(groups.len());
    let mut job_keys = Vec::with_capacity(groups.len());
    for (priority, run_at, indices) in groups {
        let events: Vec<&Prepared> = indices.iter().map(|&i| &staged[i]).collect();
        let mut start = 0;
        while start < events.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < events.len() && end - start < MAX_JOB_RECORDS {
                let e = events[end];
                let sequence = if e.ordered { SEQUENCE_ROOM } else { 0 };
                let size = e.data.len() + e.partition_key.len() + sequence;
                if end > start && bytes + size > MAX_JOB_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let job = jobs.len();
            let mut keys = Vec::new();
            let sequences: Vec<Sequence> = indices[start..end]
                .iter()
                .map(
                    |&i| match (slots.get(i).copied().flatten(), staged[i].sequence) {
                        (Some((key, n)), _) => {
                            let entry = &mut own[key];
                            if entry.0 != job {
                                *entry = (job, keys.len());
                                keys.push(key as i64);
                            }
                            Sequence::Pending { key: entry.1, n }
                        }
                        (None, Some(sequence)) => Sequence::Taken(sequence),
                        (None, None) => Sequence::None,
                    },
                )
                .collect();
            let chunk = &events[start..end];
            let records = encode_staged(chunk, &sequences);
            jobs.push(NewJob {
                priority,
                run_at: match run_at {
                    Some(RunAt::At(at)) => Some(at),
                    _ => None,
                },
                delay: match run_at {
                    Some(RunAt::After(delay)) => Some(delay),
                    _ => None,
                },
                event_count: chunk.len() as i32,
                bytes: records.len() as i32,
                records,
            });
            job_keys.push(keys);
            start = end;
        }
    }
    (jobs, job_keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_encode_as_serde_json_would_write_them() {
        let id = EventId::new();
        let data = r#"{"id":"x","note":"caf\u00e9 \"quoted\""}"#;
        for (stream, key) in [
            ("s", "plain"),
            ("s", "with \"quotes\" and \\ and \u{1}"),
            ("s", "caf\u{e9} \u{1F600} \u{7f}"),
        ] {
            for sequence in [None, Some(42), Some(-7)] {
                let text = encode_parts([(id, stream, key, data, sequence)]);
                let records = decode_records(&text).unwrap();
                assert_eq!(records.len(), 1);
                assert_eq!(records[0].partition_key, key);
                assert_eq!(records[0].stream, stream);
                assert_eq!(records[0].sequence, sequence);
                assert_eq!(records[0].data.get(), data);
                assert_eq!(records[0].id, id);
            }
        }
        assert!(
            encode_parts([(id, "s", "k \"q\"", "{}", Some(3))])
                .contains(&key_needle("s", "k \"q\""))
        );
        assert_eq!(encode_parts(std::iter::empty()), "[]");
        let two = encode_parts([(id, "s", "a", "{}", None), (id, "s", "b", "{}", Some(1))]);
        assert_eq!(decode_records(&two).unwrap().len(), 2);
    }

    fn staged(key: &str, priority: i32, ordered: bool) -> Prepared {
        let data = r#"{"id":"x","created_at":"t","n":1}"#.to_owned();
        Prepared {
            id: EventId::new(),
            event_type: "e",
            stream: "s".into(),
            partition_key: key.into(),
            splice_at: data.find(",\"n\"").unwrap(),
            data,
            priority,
            run_at: None,
            ordered,
            sequence: None,
        }
    }

    #[test]
    fn sequences_are_written_as_placeholders_naming_their_jobs_own_keys() {
        let p = crate::event::SEQUENCE_PLACEHOLDER;
        // Transaction keys: 0 = "a", 1 = "b", 2 = "c". Job 1 (priority 20) holds c then a;
        // job 2 (priority 10) holds a again and an unordered event.
        let mut events = vec![
            staged("c", 20, true),
            staged("a", 20, true),
            staged("a", 10, true),
            staged("u", 10, false),
            staged("c", 20, true),
        ];
        let slots = [Some((2, 1)), Some((0, 4)), Some((0, 5)), None, Some((2, 2))];
        let (jobs, keys) = group_taking_sequences(&events, &slots, 3);
        assert_eq!(keys, vec![vec![2, 0], vec![0]]);
        assert!(
            jobs[0]
                .records
                .contains(&format!("\"sequence\":{p}1.4{p},\"data\"")),
            "{}",
            jobs[0].records
        );
        assert!(
            jobs[1]
                .records
                .contains(&format!("\"t\",\"sequence\":{p}0.5{p},\"n\""))
        );
        // Filled with the bases of each job's own keys, they decode as published.
        let filled = [
            super::super::fill_sequences(&jobs[0].records, &[40, 10]).unwrap(),
            super::super::fill_sequences(&jobs[1].records, &[10]).unwrap(),
        ];
        for (event, sequence) in events.iter_mut().zip([41, 14, 15, 0, 42]) {
            event.sequence = event.ordered.then_some(sequence);
        }
        let decoded: Vec<StoredRecord> = filled
            .iter()
            .flat_map(|r| decode_records(r).unwrap())
            .collect();
        let order = [0, 1, 4, 2, 3];
        for (record, &i) in decoded.iter().zip(&order) {
            let event = &events[i];
            assert_eq!(record.id, event.id);
            assert_eq!(record.sequence, event.sequence);
            assert_eq!(record.data.get(), event.published_data());
        }
        assert_eq!(
            events[0].published_data(),
            r#"{"id":"x","created_at":"t","sequence":41,"n":1}"#
        );
        assert_eq!(events[3].published_data(), events[3].data);
        // Without sequences, jobs are grouped as before: the same records, no placeholders.
        let plain = group(&events[3..4]);
        assert_eq!(
            plain[0].records,
            encode_parts([(events[3].id, "s", "u", events[3].data.as_str(), None)])
        );
    }

    #[test]
    fn an_unfilled_sequence_placeholder_is_named_when_records_do_not_decode() {
        let text = "[{\"id\":\"0190a5d8-0000-7000-8000-000000000000\",\"stream\":\"s\",\"partition_key\":\"k\",\"sequence\":\u{1}0.1\u{1},\"data\":{}}]";
        let err = decode_records(text).unwrap_err();
        assert!(
            err.contains("sequence placeholder that was not filled"),
            "{err}"
        );
        let err = decode_records("[{").unwrap_err();
        assert!(err.starts_with("records are not decodable: EOF"), "{err}");
    }
}
