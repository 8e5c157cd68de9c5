//! The delivery port: where records go ([`Sink`]) and how a failure is handled ([`ErrorClass`]).
//! The worker owns these; the Kinesis adapter (`crate::kinesis`, feature `worker`) implements them.

use crate::store::BoxFuture;

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Throughput exceeded (Kinesis or KMS): retry later; never makes a job dead.
    Throttled,
    /// The service answered that this record failed (`InternalFailure` in a `PutRecords`
    /// result, an unexplained refusal): retry with backoff; counts toward `max_attempts`.
    Transient,
    /// No answer, or the service failed the whole request: connection refused, timeouts, 5xx,
    /// an endpoint down, a regional outage. Not the job's fault: retry with backoff, log loudly
    /// once per interval; never makes a job dead, however long it lasts.
    Unavailable,
    /// Stream not found, access denied, KMS set up wrong, no or bad credentials, an assume-role
    /// refused: retry with a long backoff and log loudly once per interval; never makes a job
    /// dead.
    Configuration,
    /// The request was refused as invalid: split it to find the record at fault.
    Invalid,
    /// This record will never be accepted: its job is dead.
    Permanent,
}

/// Why a record or a request was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What to do about it.
    pub class: ErrorClass,
    /// The service's error code, or a short name for a local failure (`timeout`, `dispatch`).
    pub code: String,
    /// The detail.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Failure {}

/// One record to put.
#[derive(Debug, Clone, Copy)]
pub struct OutRecord<'a> {
    /// The partition key.
    pub partition_key: &'a str,
    /// The data bytes.
    pub data: &'a [u8],
}

/// Where the service put a delivered record: what a delivery receipt keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ack {
    /// The shard, when the sink knows it.
    pub shard_id: Option<String>,
    /// The sequence number within the shard (a decimal string: it overflows u128).
    pub sequence_number: Option<String>,
}

/// What became of one record of a request.
pub type RecordOutcome = Result<Ack, Failure>;

/// Where delivered records go. `KinesisSink` (feature `worker`) in production; anything else in
/// benchmarks.
pub trait Sink: Send + Sync + 'static {
    /// Puts `records` to `stream` in one request. `Ok` holds one outcome per record, in order
    /// (`None` for delivered); `Err` is a failure of the whole request.
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<Failure>>, Failure>>;

    /// The same, with where each delivered record was put (for delivery receipts). The default
    /// knows no shard or sequence number.
    fn put_records_acked<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<RecordOutcome>, Failure>> {
        Box::pin(async move {
            let outcomes = self.put_records(stream, records).await?;
            Ok(outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    None => Ok(Ack::default()),
                    Some(failure) => Err(failure),
                })
                .collect())
        })
    }
}

/// A sink that accepts everything without sending it anywhere: the worker's own ceiling.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSink;

impl Sink for NoopSink {
    fn put_records<'a>(
        &'a self,
        _stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<Failure>>, Failure>> {
        Box::pin(std::future::ready(Ok(vec![None; records.len()])))
    }
}
