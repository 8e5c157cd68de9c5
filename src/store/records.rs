//! The `records` column codec: JSON text `[{"id","stream","partition_key","data"}, ...]`, where
//! `data` is each event's exact serialized bytes embedded as raw JSON, and the grouping of staged
//! events into jobs.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::NewJob;
use crate::event::{EventId, Prepared, RunAt};

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
        out.push_str("{\"id\":\"");
        out.push_str(
            id.0.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        );
        out.push_str("\",\"stream\":");
        push_json_string(&mut out, stream);
        out.push_str(",\"partition_key\":");
        push_json_string(&mut out, partition_key);
        match sequence {
            Some(PENDING_SEQUENCE) => out.push_str(crate::event::SEQUENCE_MARK),
            Some(sequence) => {
                out.push_str(",\"sequence\":");
                super::push_decimal(&mut out, sequence);
            }
            None => {}
        }
        out.push_str(",\"data\":");
        out.push_str(data);
        out.push('}');
    }
    out.push(']');
    out
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

/// A sequence not taken yet: written as the placeholder (sequences start at 1).
const PENDING_SEQUENCE: i64 = i64::MIN;

/// Encodes staged events into the `records` column format (an event whose sequence is pending
/// gets the placeholder in its record too).
pub(crate) fn encode_records<'a>(events: impl IntoIterator<Item = &'a Prepared>) -> String {
    encode_parts(events.into_iter().map(|e| {
        (
            e.id,
            e.stream.as_str(),
            e.partition_key.as_str(),
            e.data.as_str(),
            if e.sequence_pending() {
                Some(PENDING_SEQUENCE)
            } else {
                e.sequence
            },
        )
    }))
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
    group_with_members(staged).0
}

/// [`group`], and which of `staged` each job holds, in order.
pub(crate) fn group_with_members(staged: &[Prepared]) -> (Vec<NewJob>, Vec<Vec<usize>>) {
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
    let mut jobs = Vec::with_capacity(groups.len());
    let mut members = Vec::with_capacity(groups.len());
    for (priority, run_at, indices) in groups {
        let events: Vec<&Prepared> = indices.iter().map(|&i| &staged[i]).collect();
        let mut start = 0;
        while start < events.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < events.len() && end - start < MAX_JOB_RECORDS {
                let size = events[end].data.len() + events[end].partition_key.len();
                if end > start && bytes + size > MAX_JOB_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let chunk = &events[start..end];
            members.push(indices[start..end].to_vec());
            let records = encode_records(chunk.iter().copied());
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
            start = end;
        }
    }
    (jobs, members)
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
