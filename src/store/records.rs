//! The `records` column codec: JSON text `[{"id","stream","partition_key","data"}, ...]`, where
//! `data` is each event's exact serialized bytes embedded as raw JSON, and the grouping of staged
//! events into jobs.

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::NewJob;
use crate::event::{EventId, Prepared};

/// One event as stored in a job: where it goes and its exact bytes.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct StoredRecord {
    /// The event id.
    pub id: EventId,
    /// The Kinesis stream.
    pub stream: String,
    /// The Kinesis partition key.
    pub partition_key: String,
    /// The record's data: the event's JSON exactly as validated.
    pub data: Box<RawValue>,
}

impl StoredRecord {
    /// The record's data bytes.
    pub fn data(&self) -> &[u8] {
        self.data.get().as_bytes()
    }
}

/// Encodes records into the `records` column format from (id, stream, partition key, data).
pub(crate) fn encode_parts<'a>(
    parts: impl IntoIterator<Item = (EventId, &'a str, &'a str, &'a str)>,
) -> String {
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (i, (id, stream, partition_key, data)) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(id.to_string().as_bytes());
        out.extend_from_slice(b"\",\"stream\":");
        serde_json::to_writer(&mut out, stream).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"partition_key\":");
        serde_json::to_writer(&mut out, partition_key).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(data.as_bytes());
        out.push(b'}');
    }
    out.push(b']');
    String::from_utf8(out).expect("JSON written from strings is UTF-8")
}

/// Encodes staged events into the `records` column format.
pub(crate) fn encode_records<'a>(events: impl IntoIterator<Item = &'a Prepared>) -> String {
    encode_parts(events.into_iter().map(|e| {
        (
            e.id,
            e.stream.as_str(),
            e.partition_key.as_str(),
            e.data.as_str(),
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
        )
    }))
}

/// Decodes the `records` column; the message says what is wrong.
pub fn decode_records(text: &str) -> Result<Vec<StoredRecord>, String> {
    serde_json::from_str(text).map_err(|e| format!("records are not decodable: {e}"))
}

/// Groups staged events into jobs: one per distinct (priority, run-at), in first-seen order.
/// Delays are resolved against one clock reading, so events with the same delay share a job.
pub(crate) fn group(staged: &[Prepared]) -> Vec<NewJob> {
    let now = OffsetDateTime::now_utc();
    let mut groups: Vec<(i32, Option<OffsetDateTime>, Vec<&Prepared>)> = Vec::new();
    for event in staged {
        let run_at = crate::event::resolve(event.run_at, now);
        match groups
            .iter_mut()
            .find(|(priority, at, _)| *priority == event.priority && *at == run_at)
        {
            Some((_, _, events)) => events.push(event),
            None => groups.push((event.priority, run_at, vec![event])),
        }
    }
    groups
        .into_iter()
        .map(|(priority, run_at, events)| NewJob {
            priority,
            run_at,
            event_count: events.len() as i32,
            records: encode_records(events),
        })
        .collect()
}
