//! Events: the [`Event`] trait, its envelope, and the one-time serialization of a record.

pub(crate) mod checks;
pub(crate) mod instance;

use std::borrow::Cow;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::FormatItem;
use time::macros::format_description;
use uuid::Uuid;

use crate::{Config, JournalError, context, schema::SchemaRegistry};
use instance::Document;

/// A Kinesis partition key may not be longer than this: "256 Unicode characters", which
/// Kinesis counts in UTF-16 code units (an emoji or a CJK Extension B character is two).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// The id of one event: a UUID v7, so ids sort by creation time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// When a job may first be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAt {
    /// At this moment.
    At(OffsetDateTime),
    /// This long after the event is journaled.
    After(Duration),
}

/// An event type whose serde fields are its journaled attributes.
///
/// Usually derived: `#[derive(Serialize, journaled::Event)]`, with `#[journaled(...)]` attributes
/// for the per-type settings. Implement it by hand to decide settings per instance.
///
/// The published record is a JSON object: the envelope (`id`, `event_type`, `created_at`, and
/// `tags` when [`Event::TAGGED`]) followed by the attributes.
///
/// `journal!` serializes an event twice (a check for unrepresentable numbers and nesting, then
/// the published text, which the schemas read), so its `Serialize` must give the same output
/// each time, as derived ones do: a field that changes between calls (a counter, the clock, a
/// lock another thread writes to) could slip a NaN or too deep a nesting past the check. Take
/// such values into a plain field before journaling.
pub trait Event: Serialize {
    /// The event type; also the name of its schema file, `<event_type>.json`.
    const EVENT_TYPE: &'static str;
    /// Whether the event carries the task-local tags.
    const TAGGED: bool = false;
    /// Whether events of this type are delivered in commit order per (stream, partition key):
    /// each gets a gap-free `sequence` in its envelope, in the order the writers' transactions
    /// committed (taken by the writer on SQLite; on PostgreSQL the writer locks the key and the
    /// worker numbers its events after the commit), and a key's next record is sent only once
    /// its predecessor is acknowledged. An event without
    /// a [`partition_key`](Self::partition_key) (keyed by its own id) is not ordered.
    const ORDERED: bool = false;

    /// The stream for this event; `None` uses the configured default stream.
    fn stream_name(&self) -> Option<Cow<'_, str>> {
        None
    }

    /// The partition key; `None` uses the event id, which spreads events over all shards.
    ///
    /// Kinesis orders records only within a shard, and only per partition key. Return an
    /// aggregate id here when consumers need one aggregate's events on one shard.
    fn partition_key(&self) -> Option<Cow<'_, str>> {
        None
    }

    /// The job priority (lower runs first); `None` uses the configured default (20).
    fn priority(&self) -> Option<i32> {
        None
    }

    /// When the event may be delivered; `None` means at once.
    fn run_at(&self) -> Option<RunAt> {
        None
    }

    /// The event's `created_at`; `None` means now.
    fn created_at(&self) -> Option<OffsetDateTime> {
        None
    }
}

/// An event validated and serialized once, ready to be written into a job.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub id: EventId,
    pub event_type: &'static str,
    pub stream: String,
    pub partition_key: String,
    /// The exact JSON bytes that will be published, which the schemas read.
    /// An ordered event's sequence is not in it: see [`published_data`](Self::published_data).
    pub data: String,
    pub priority: i32,
    /// Resolved when the job is written, so that events with the same delay share a job.
    pub run_at: Option<RunAt>,
    /// Delivered in commit order per (stream, partition key), with a sequence.
    pub ordered: bool,
    /// The sequence, when the writer takes it (SQLite); on PostgreSQL the worker numbers
    /// ordered events after the commit, and this stays `None`.
    pub sequence: Option<i64>,
    /// Where in `data` the sequence goes: right after `created_at`.
    pub splice_at: usize,
}

/// Room a sequence takes in the envelope: `,"sequence":` and up to 19 digits.
pub(crate) const SEQUENCE_ROOM: usize = 32;

/// Where a sequence not taken yet goes, in an envelope and a stored record, for the database to
/// fill in the statement that takes it: a character serde_json never writes raw (it escapes
/// control characters in strings), so splitting at it is unambiguous.
pub(crate) const SEQUENCE_PLACEHOLDER: char = '\u{1}';

/// The prefix of a sequence in an envelope or a stored record.
pub(crate) const SEQUENCE_KEY: &str = ",\"sequence\":";

impl Prepared {
    /// The event's JSON as published: with its sequence in the envelope, right after
    /// `created_at`, once one is taken. (`data` never holds it: the job's records are written
    /// with it, or with a placeholder for it, around `data`.)
    pub(crate) fn published_data(&self) -> std::borrow::Cow<'_, str> {
        match self.sequence {
            Some(sequence) if self.ordered => {
                let mut out = String::with_capacity(self.data.len() + SEQUENCE_ROOM);
                out.push_str(&self.data[..self.splice_at]);
                out.push_str(SEQUENCE_KEY);
                crate::store::push_decimal(&mut out, sequence);
                out.push_str(&self.data[self.splice_at..]);
                out.into()
            }
            _ => self.data.as_str().into(),
        }
    }
}

/// When `run_at` falls, seen from `now`; a delay too large for a date saturates far ahead
/// (it was checked at journal time).
#[cfg(feature = "testing")]
pub(crate) fn resolve(run_at: Option<RunAt>, now: OffsetDateTime) -> Option<OffsetDateTime> {
    run_at.map(|run_at| match run_at {
        RunAt::At(at) => at,
        RunAt::After(delay) => time::Duration::try_from(delay)
            .ok()
            .and_then(|d| now.checked_add(d))
            .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc()),
    })
}

const CREATED_AT_FORMAT: &[FormatItem<'static>] = format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3][offset_hour sign:mandatory]:[offset_minute]"
);

/// Formats a time as RFC 3339 with milliseconds and an explicit offset.
pub fn format_time(at: OffsetDateTime) -> String {
    // Written by hand: every event pays this, and the format description walk cost ten times
    // as much (2,300 instructions a call, callgrind). Years outside 0..=9999 take the slow path.
    let year = at.year();
    if !(0..=9999).contains(&year) {
        return at
            .format(CREATED_AT_FORMAT)
            .expect("a valid OffsetDateTime always formats");
    }
    let (offset_hours, offset_minutes, _) = at.offset().as_hms();
    let mut out = [0u8; 29];
    let mut put = |at: usize, value: u32, digits: usize| {
        let mut value = value;
        for i in (0..digits).rev() {
            out[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, u8::from(at.month()).into(), 2);
    put(8, at.day().into(), 2);
    put(11, at.hour().into(), 2);
    put(14, at.minute().into(), 2);
    put(17, at.second().into(), 2);
    put(20, at.millisecond().into(), 3);
    put(24, offset_hours.unsigned_abs().into(), 2);
    put(27, offset_minutes.unsigned_abs().into(), 2);
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b':'),
    ] {
        out[i] = c;
    }
    // `[offset_hour sign:mandatory]`: the sign of the whole offset, `+` for UTC.
    out[23] = if at.offset().is_negative() {
        b'-'
    } else {
        b'+'
    };
    String::from_utf8(out.to_vec()).expect("ASCII")
}

/// Validates, serializes once, and checks the Kinesis limits. Nothing is written.
pub(crate) fn prepare<E: Event>(
    event: &E,
    config: &Config,
    schemas: &SchemaRegistry,
) -> Result<Prepared, JournalError> {
    let event_type = E::EVENT_TYPE;
    if event_type.is_empty() {
        // The one part of the envelope that is input: base_event requires it non-empty.
        return Err(JournalError::SchemaViolation {
            event_type: String::new(),
            violations: vec![crate::Violation {
                schema: "base_event".into(),
                pointer: "/event_type".into(),
                message: "the event type is empty: set Event::EVENT_TYPE".into(),
            }],
        });
    }
    let serialization = |message: String| JournalError::Serialization {
        event_type: event_type.to_owned(),
        message,
    };
    refuse_unrepresentable(event_type, event)?;
    // Serialized once, in the struct's field order; the envelope is written in front of these
    // bytes, so key order holds by construction (no global `preserve_order`).
    let attributes_json = serde_json::to_string(event).map_err(|e| serialization(e.to_string()))?;
    if !attributes_json.starts_with('{') {
        let value: Value =
            serde_json::from_str(&attributes_json).map_err(|e| serialization(e.to_string()))?;
        return Err(serialization(format!(
            "it serialized to {}, not an object",
            kind(&value)
        )));
    }
    let id = EventId::new();
    let now = OffsetDateTime::now_utc();
    let created_at = event.created_at().unwrap_or(now);
    let id_text = id.to_string();
    let created_at_text = format_time(created_at);
    let tags_json = E::TAGGED
        .then(|| serde_json::to_string(&context::current_tags()))
        .transpose()
        .map_err(|e| serialization(e.to_string()))?;

    // What is published: the envelope, then the attributes' own bytes.
    let body = &attributes_json[1..]; // after the attributes' `{`
    let mut data = String::with_capacity(attributes_json.len() + 128);
    data.push_str("{\"id\":\"");
    data.push_str(&id_text);
    data.push_str("\",\"event_type\":");
    data.push_str(&serde_json::to_string(event_type).expect("a string serializes"));
    data.push_str(",\"created_at\":\"");
    data.push_str(&created_at_text);
    data.push('"');
    let splice_at = data.len();
    if let Some(tags_json) = &tags_json {
        data.push_str(",\"tags\":");
        data.push_str(tags_json);
    }
    if body.trim_start() != "}" {
        data.push(',');
    }
    data.push_str(body);

    // What the schemas see: the published text read in place, with the sequence an ordered
    // event takes at commit (1 here, so that a schema that forbids it fails now rather than the
    // published record breaking it). Text the fast reader does not take (a name repeated in an
    // object, a lone surrogate escape, nesting or a number beyond serde_json's limits) is
    // parsed by serde_json, which says what is wrong with it before any other check, and the
    // schemas see the value it reads.
    let mut document = Document::parse(&data);
    let fallback: Option<Value> = match document {
        Some(_) => None,
        None => Some(serde_json::from_str(&data).map_err(|e| serialization(e.to_string()))?),
    };

    let stream = match event.stream_name() {
        Some(stream) => stream.into_owned(),
        None => config
            .stream_name
            .clone()
            .ok_or_else(|| JournalError::MissingStreamName {
                event_type: event_type.to_owned(),
            })?,
    };
    // An event keyed by its own id has nothing to be ordered with: it takes no sequence.
    let own_key = event.partition_key();
    let ordered = (E::ORDERED || config.is_ordered_stream(&stream)) && own_key.is_some();

    // The envelope's names, refused as attributes. With a document the scanner found no name
    // repeated, so none of the names the envelope writes is the event's own too: only
    // `sequence` (written at commit) can be taken.
    let taken = match &document {
        Some(document) => (ordered && document.root_has("sequence")).then_some("sequence"),
        None => {
            let attributes: serde_json::Map<String, Value> =
                serde_json::from_str(&attributes_json).map_err(|e| serialization(e.to_string()))?;
            ["id", "event_type", "created_at"]
                .into_iter()
                .chain(E::TAGGED.then_some("tags"))
                .chain(ordered.then_some("sequence"))
                .find(|name| attributes.contains_key(*name))
        }
    };
    if let Some(name) = taken {
        return Err(JournalError::ReservedAttribute {
            event_type: event_type.to_owned(),
            name: name.to_owned(),
        });
    }

    if stream.is_empty() {
        return Err(JournalError::MissingStreamName {
            event_type: event_type.to_owned(),
        });
    }
    check_stream_name(event_type, &stream)?;

    if let (Some(document), true) = (&mut document, ordered) {
        document.push_root_number("sequence", "1");
    }
    schemas.validate_generated(event_type, E::TAGGED, document.as_ref(), || {
        let mut value: Value = match fallback {
            Some(value) => value,
            None => serde_json::from_str(&data).map_err(|e| serialization(e.to_string()))?,
        };
        if let (Value::Object(object), true) = (&mut value, ordered) {
            object.insert("sequence".into(), Value::from(1));
        }
        Ok(value)
    })?;
    drop(document);

    let partition_key = match own_key {
        Some(key) => key.into_owned(),
        None => id_text.clone(),
    };
    check_partition_key(event_type, &partition_key)?;
    // An ordered event's sequence is spliced in at commit: its room counts now.
    let size = data.len() + partition_key.len() + if ordered { SEQUENCE_ROOM } else { 0 };
    if size > config.max_record_size {
        return Err(JournalError::RecordTooLarge {
            event_type: event_type.to_owned(),
            size,
            limit: config.max_record_size,
        });
    }

    let run_at = event.run_at();
    if let Some(RunAt::After(delay)) = run_at {
        let far = time::Duration::try_from(delay)
            .ok()
            .and_then(|d| now.checked_add(d))
            .is_none_or(|at| at.year() > 9000);
        if far {
            return Err(JournalError::InvalidRunAt {
                event_type: event_type.to_owned(),
                reason: format!("a delay of {delay:?} is beyond any date"),
            });
        }
    }
    Ok(Prepared {
        id,
        event_type,
        stream,
        partition_key,
        data,
        priority: event.priority().unwrap_or(config.default_priority),
        run_at,
        ordered,
        sequence: None,
        splice_at,
    })
}

/// Refuses what serde_json would change or choke on: a NaN or infinite number (written as
/// `null`) and nesting deeper than [`checks::MAX_NESTING_DEPTH`] (a stack overflow). A type
/// that fails to serialize passes here: serializing it for real says why.
pub(crate) fn refuse_unrepresentable<T: Serialize + ?Sized>(
    event_type: &str,
    value: &T,
) -> Result<(), JournalError> {
    match checks::check(value) {
        Ok(()) | Err(checks::Found::Other) => Ok(()),
        Err(checks::Found::NonFinite(pointer)) => Err(JournalError::NonFiniteNumber {
            event_type: event_type.to_owned(),
            pointer,
        }),
        Err(checks::Found::TooDeep(pointer)) => Err(JournalError::NestingTooDeep {
            event_type: event_type.to_owned(),
            limit: checks::MAX_NESTING_DEPTH,
            pointer,
        }),
    }
}

/// Kinesis stream names: 1 to 128 of `a-z A-Z 0-9 _ . -`.
fn check_stream_name(event_type: &str, stream: &str) -> Result<(), JournalError> {
    let valid = stream.len() <= 128
        && stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(JournalError::InvalidStreamName {
            event_type: event_type.to_owned(),
            stream: stream.to_owned(),
        })
    }
}

fn check_partition_key(event_type: &str, key: &str) -> Result<(), JournalError> {
    let reason = if key.is_empty() {
        "it is empty".to_owned()
    } else {
        // Kinesis counts UTF-16 code units: a character outside the Basic Multilingual Plane
        // (emoji, CJK Extension B) is two. A character is never more units than UTF-8 bytes,
        // so a short key needs no counting.
        if key.len() <= MAX_PARTITION_KEY_CHARS {
            return Ok(());
        }
        let units = key.encode_utf16().count();
        if units <= MAX_PARTITION_KEY_CHARS {
            return Ok(());
        }
        let chars = key.chars().count();
        format!(
            "it is {chars} characters long, {units} UTF-16 code units, over Kinesis' limit of {MAX_PARTITION_KEY_CHARS} UTF-16 code units"
        )
    };
    Err(JournalError::InvalidPartitionKey {
        event_type: event_type.to_owned(),
        reason,
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn created_at_has_milliseconds_and_offset() {
        let at = datetime!(2019-01-28 11:06:54.928123 -05:00);
        assert_eq!(format_time(at), "2019-01-28T11:06:54.928-05:00");
        assert_eq!(
            format_time(datetime!(2026-11-23 01:02:03 UTC)),
            "2026-11-23T01:02:03.000+00:00"
        );
    }

    #[test]
    fn the_hand_written_format_agrees_with_the_format_description() {
        let offsets = [
            (0, 0, 0),
            (-5, 0, 0),
            (5, 30, 0),
            (0, -30, 0),
            (-9, -59, 0),
            (14, 0, 0),
            (-23, -59, -59),
        ];
        let mut seconds: i64 = 0;
        for i in 0..20_000i64 {
            // Spread over years 0..9999, every field's digits seen.
            seconds = (seconds + 15_778_463_371 + i * 7_919) % 315_537_897_600;
            let utc = OffsetDateTime::from_unix_timestamp(seconds - 62_167_219_200).unwrap()
                + time::Duration::nanoseconds(i * 1_000_003);
            let (h, m, s) = offsets[i as usize % offsets.len()];
            let at = utc.to_offset(time::UtcOffset::from_hms(h, m, s).unwrap());
            if !(0..=9999).contains(&at.year()) {
                continue;
            }
            let expected = at.format(CREATED_AT_FORMAT).unwrap();
            assert_eq!(format_time(at), expected, "{at:?}");
        }
        for at in [
            datetime!(-0001-12-31 23:59:59.999 UTC),
            datetime!(0000-01-01 00:00:00 +00:00:01),
            datetime!(9999-12-31 23:59:59.999999999 -00:00:30),
        ] {
            assert_eq!(format_time(at), at.format(CREATED_AT_FORMAT).unwrap());
        }
    }

    #[test]
    fn stream_names_follow_the_kinesis_rules() {
        assert!(check_stream_name("e", "my_app.events-1").is_ok());
        assert!(check_stream_name("e", &"s".repeat(128)).is_ok());
        for bad in ["has space", "slash/name", &"s".repeat(129), "é"] {
            let err = check_stream_name("e", bad).unwrap_err();
            assert!(err.to_string().contains("invalid stream name"), "{err}");
        }
    }

    #[test]
    fn partition_key_limits_count_utf16_units_as_kinesis_does() {
        assert!(check_partition_key("e", &"k".repeat(256)).is_ok());
        let err = check_partition_key("e", &"k".repeat(257)).unwrap_err();
        assert!(err.to_string().contains("257 UTF-16 code units"), "{err}");
        assert!(check_partition_key("e", &"é".repeat(256)).is_ok());
        let err = check_partition_key("e", &"é".repeat(257)).unwrap_err();
        assert!(err.to_string().contains("257 characters"), "{err}");
        // Outside the BMP a character is two units: 128 fit, 129 do not.
        for wide in ["😀", "𠀀"] {
            assert!(check_partition_key("e", &wide.repeat(128)).is_ok());
            let err = check_partition_key("e", &wide.repeat(129)).unwrap_err();
            assert!(err.to_string().contains("258 UTF-16 code units"), "{err}");
        }
        let err = check_partition_key("e", "").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[derive(Serialize)]
    struct Plain {
        n: i64,
    }
    impl Event for Plain {
        const EVENT_TYPE: &'static str = "plain";
    }

    #[derive(Serialize)]
    struct Tagged {
        n: i64,
    }
    impl Event for Tagged {
        const EVENT_TYPE: &'static str = "tagged";
        const TAGGED: bool = true;
    }

    #[derive(Serialize)]
    struct Nameless {}
    impl Event for Nameless {
        const EVENT_TYPE: &'static str = "";
    }

    /// A schema registry over a fresh directory holding `files` (name, text), and the directory.
    fn schemas_in(name: &str, files: &[(&str, &str)]) -> (SchemaRegistry, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("journaled-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        (SchemaRegistry::new(vec![dir.clone()]), dir)
    }

    /// The fast path skips `base_event` and `tagged_event` because journaled's envelope holds
    /// them by construction: this checks the construction against the built-in schemas, so a
    /// change to either side is caught here.
    #[test]
    fn generated_envelopes_satisfy_the_built_in_schemas() {
        let (schemas, dir) = schemas_in("envelope", &[("plain.json", "{}"), ("tagged.json", "{}")]);
        let config = Config::default().with_stream_name("s");
        for (data, tagged) in [
            (
                prepare(&Plain { n: 1 }, &config, &schemas).unwrap().data,
                false,
            ),
            (
                prepare(&Tagged { n: 2 }, &config, &schemas).unwrap().data,
                true,
            ),
        ] {
            let value: Value = serde_json::from_str(&data).unwrap();
            let event_type = value["event_type"].as_str().unwrap().to_owned();
            schemas.validate(&event_type, tagged, &value).unwrap();
            assert!(data.starts_with("{\"id\":\""), "{data}");
        }
        let err = prepare(&Nameless {}, &config, &schemas).unwrap_err();
        assert!(err.to_string().contains("/event_type"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[derive(Serialize)]
    struct Loose {
        #[serde(flatten)]
        fields: std::collections::BTreeMap<&'static str, u8>,
    }
    impl Event for Loose {
        const EVENT_TYPE: &'static str = "loose";
    }

    #[derive(Serialize)]
    struct LooseTaggedInOrder {
        #[serde(flatten)]
        fields: std::collections::BTreeMap<&'static str, u8>,
    }
    impl Event for LooseTaggedInOrder {
        const EVENT_TYPE: &'static str = "loose";
        const TAGGED: bool = true;
        const ORDERED: bool = true;
        fn partition_key(&self) -> Option<Cow<'_, str>> {
            Some("k".into())
        }
    }

    /// The envelope's names are refused as attributes (read from the published text, where
    /// the envelope writes each once), `tags` only for a tagged event and `sequence` only for
    /// an ordered one.
    #[test]
    fn attributes_cannot_take_the_envelopes_names() {
        let (schemas, dir) = schemas_in("reserved", &[("loose.json", "{}")]);
        let config = Config::default().with_stream_name("s");
        let fields = |name: &'static str| [(name, 1), ("other", 2)].into_iter().collect();
        let plain = |name| {
            prepare(
                &Loose {
                    fields: fields(name),
                },
                &config,
                &schemas,
            )
        };
        let tagged_in_order = |name| {
            prepare(
                &LooseTaggedInOrder {
                    fields: fields(name),
                },
                &config,
                &schemas,
            )
        };
        let refused = |result: &Result<Prepared, JournalError>, name: &str| matches!(result, Err(JournalError::ReservedAttribute { name: n, .. }) if n == name);
        for name in ["id", "event_type", "created_at"] {
            for result in [plain(name), tagged_in_order(name)] {
                assert!(refused(&result, name), "{name}: {result:?}");
            }
        }
        for name in ["tags", "sequence"] {
            let result = tagged_in_order(name);
            assert!(refused(&result, name), "{name}: {result:?}");
            let value: Value = serde_json::from_str(&plain(name).unwrap().data).unwrap();
            assert_eq!(
                value[name], 1,
                "{name} is an attribute of an untagged, unordered event"
            );
        }
        tagged_in_order("other").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[derive(Serialize)]
    struct Repeating {
        a: u8,
        #[serde(flatten)]
        more: std::collections::BTreeMap<&'static str, u8>,
    }
    impl Event for Repeating {
        const EVENT_TYPE: &'static str = "repeating";
    }

    /// Text the fast reader leaves to serde_json is judged as serde_json reads it: a repeated
    /// name by its last value, counted once; a lone surrogate in a raw value is refused.
    #[test]
    fn text_the_fast_reader_refuses_is_judged_as_serde_json_reads_it() {
        let (schemas, dir) = schemas_in(
            "repeating",
            &[
                (
                    "repeating.json",
                    r#"{"properties": {"a": {"maximum": 1}}, "maxProperties": 4}"#,
                ),
                ("carrying.json", "{}"),
            ],
        );
        let config = Config::default().with_stream_name("s");
        let event = |a| Repeating {
            a: 0,
            more: [("a", a)].into_iter().collect(),
        };
        // {id, event_type, created_at, "a":0, "a":a}: four members, the last `a` counts.
        let prepared = prepare(&event(1), &config, &schemas).unwrap();
        assert!(
            prepared.data.ends_with(r#""a":0,"a":1}"#),
            "{}",
            prepared.data
        );
        let err = prepare(&event(2), &config, &schemas).unwrap_err();
        assert!(
            matches!(&err, JournalError::SchemaViolation { violations, .. } if violations.len() == 1 && violations[0].pointer == "/a"),
            "{err:?}"
        );
        let lone = Carrying {
            raw: serde_json::value::RawValue::from_string(r#""\ud800""#.into()).unwrap(),
        };
        let err = prepare(&lone, &Config::default(), &schemas).unwrap_err();
        assert!(
            matches!(&err, JournalError::Serialization { .. }),
            "refused before the missing stream name is: {err:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A schema that a value fails is reported with every violation, from the same text the
    /// fast check read: the fast check and the report agree.
    #[test]
    fn a_failed_fast_check_is_reported_in_full() {
        let (schemas, dir) = schemas_in(
            "failing",
            &[(
                "loose.json",
                r#"{"type": "object", "required": ["must"], "properties": {"other": {"maximum": 1}, "sequence": {"maximum": 0}}}"#,
            )],
        );
        let config = Config::default().with_stream_name("s");
        let fields = [("other", 2)].into_iter().collect();
        let err = prepare(&LooseTaggedInOrder { fields }, &config, &schemas).unwrap_err();
        let JournalError::SchemaViolation { violations, .. } = &err else {
            panic!("{err:?}");
        };
        let mut pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort();
        assert_eq!(pointers, ["", "/other", "/sequence"], "{violations:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[derive(Serialize)]
    struct Measured {
        single: f32,
        double: f64,
        label: &'static str,
        nested: Vec<std::collections::BTreeMap<&'static str, f32>>,
    }
    impl Event for Measured {
        const EVENT_TYPE: &'static str = "measured";
    }

    #[derive(Serialize)]
    struct Labelled {
        label: &'static str,
        count: u64,
        ratio: f64,
    }
    impl Event for Labelled {
        const EVENT_TYPE: &'static str = "labelled";
    }

    #[derive(Serialize)]
    struct Carrying {
        raw: Box<serde_json::value::RawValue>,
    }
    impl Event for Carrying {
        const EVENT_TYPE: &'static str = "carrying";
    }

    /// A raw JSON attribute counts toward serde_json's nesting limit with the levels around
    /// it, as when the whole text is parsed: an event whose record a consumer could not parse
    /// is refused, not published.
    #[test]
    fn raw_json_attributes_are_bounded_with_what_surrounds_them() {
        let (schemas, dir) = schemas_in("raw", &[("carrying.json", "{}")]);
        let config = Config::default().with_stream_name("s");
        let mut refused_only_together = false;
        for levels in [1, 100, 126, 127, 128] {
            let raw = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            let alone = serde_json::from_str::<Value>(&raw).is_ok();
            let together = serde_json::from_str::<Value>(&format!("{{\"raw\":{raw}}}")).is_ok();
            let event = Carrying {
                raw: serde_json::value::RawValue::from_string(raw).unwrap(),
            };
            let prepared = prepare(&event, &config, &schemas);
            assert_eq!(prepared.is_ok(), together, "{levels} levels: {prepared:?}");
            if let Ok(prepared) = prepared {
                serde_json::from_str::<Value>(&prepared.data).expect("the record parses");
            }
            refused_only_together |= alone && !together;
        }
        assert!(
            refused_only_together,
            "some depth parses alone but not inside the event"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The schemas see the value the published text reads as: an `f32` of 0.1 is 0.1 (as a
    /// Rust value it widens to 0.10000000149011612, which would break `maximum: 0.1`).
    #[test]
    fn schemas_see_what_is_published() {
        let (schemas, dir) = schemas_in(
            "f32",
            &[
                (
                    "measured.json",
                    r#"{"properties": {"single": {"maximum": 0.1},
                "nested": {"items": {"additionalProperties": {"maximum": 0.3}}}}}"#,
                ),
                (
                    "labelled.json",
                    r#"{"properties": {"label": {"const": "a\"b"}, "count": {"maximum": 18446744073709551615},
                "ratio": {"maximum": 0.1}}, "required": ["label", "count", "ratio"]}"#,
                ),
            ],
        );
        let config = Config::default().with_stream_name("s");
        let measured = Measured {
            single: 0.1,
            double: 0.1,
            label: "x",
            nested: vec![[("a", 0.3_f32)].into_iter().collect()],
        };
        let prepared = prepare(&measured, &config, &schemas).unwrap();
        assert!(
            prepared.data.contains(r#""single":0.1,"#),
            "{}",
            prepared.data
        );
        let over = Measured {
            single: 0.2,
            ..measured
        };
        let err = prepare(&over, &config, &schemas).unwrap_err();
        assert!(err.to_string().contains("/single"), "{err}");

        let labelled = Labelled {
            label: "a\"b",
            count: u64::MAX,
            ratio: 0.1,
        };
        let prepared = prepare(&labelled, &config, &schemas).unwrap();
        let read_back: Value = serde_json::from_str(&prepared.data).unwrap();
        assert_eq!(read_back["count"], Value::from(u64::MAX));
        let err = prepare(
            &Labelled {
                ratio: 0.10000000000000002,
                ..labelled
            },
            &config,
            &schemas,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/ratio"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
