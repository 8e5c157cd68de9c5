//! The Kinesis adapter (feature `worker`): [`KinesisSink`] implements the worker's
//! `delivery::Sink` with `PutRecords`; [`KinesisConfig`] builds the SDK client;
//! [`classify_code`] and [`classify_sdk_error`] map errors to failure classes; [`StreamReader`]
//! reads a stream back.

mod classify;
mod client;
mod reader;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tracing::Instrument;

pub use classify::{advice, classify_code, classify_sdk_error};
pub use client::KinesisConfig;
pub use reader::{ReadRecord, StartAt, StreamReader, ensure_stream, read_at, read_stream};

use crate::delivery::{Ack, ErrorClass, Failure, OutRecord, RecordOutcome, Sink};
use crate::store::BoxFuture;

/// Publishes with `PutRecords`.
#[derive(Debug, Clone)]
pub struct KinesisSink {
    client: Client,
}

impl KinesisSink {
    /// A sink over an SDK client.
    pub fn new(client: Client) -> Self {
        KinesisSink { client }
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks that `stream` exists and that these credentials reach it
    /// (`DescribeStreamSummary`): what `journaled worker` does at start for its default stream.
    pub async fn check_stream(&self, stream: &str) -> Result<(), Failure> {
        self.client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify_sdk_error(&e))
    }
}

impl Sink for KinesisSink {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<Failure>>, Failure>> {
        Box::pin(async move {
            let outcomes = self.put_records_acked(stream, records).await?;
            Ok(outcomes.into_iter().map(Result::err).collect())
        })
    }

    fn put_records_acked<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<RecordOutcome>, Failure>> {
        let span = tracing::info_span!(
            "journaled.put_records",
            stream,
            records = records.len(),
            failed = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let fut = async move {
            let entries = records
                .iter()
                .map(|record| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(record.data))
                        .partition_key(record.partition_key)
                        .build()
                        .map_err(|e| Failure {
                            class: ErrorClass::Permanent,
                            code: "construction".into(),
                            message: e.to_string(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let output = self
                .client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            let results = output.records();
            if results.len() != records.len() {
                return Err(Failure {
                    class: ErrorClass::Transient,
                    code: "response".into(),
                    message: format!(
                        "PutRecords answered {} results for {} records",
                        results.len(),
                        records.len()
                    ),
                });
            }
            Ok(results
                .iter()
                .map(|result| match result.error_code() {
                    Some(code) => Err(Failure {
                        class: match classify_code(code) {
                            // A record-level refusal is about this record alone.
                            ErrorClass::Invalid => ErrorClass::Permanent,
                            class => class,
                        },
                        code: code.to_owned(),
                        message: classify::advised(
                            code,
                            result.error_message().unwrap_or_default().to_owned(),
                        ),
                    }),
                    None => Ok(Ack {
                        shard_id: result.shard_id().map(str::to_owned),
                        sequence_number: result.sequence_number().map(str::to_owned),
                    }),
                })
                .collect::<Vec<_>>())
        };
        Box::pin(
            async move {
                let result = fut.await;
                match &result {
                    Ok(outcomes) => {
                        let failed = outcomes.iter().filter(|o| o.is_err()).count();
                        tracing::Span::current().record("failed", failed);
                    }
                    Err(failure) => {
                        tracing::Span::current().record("error", tracing::field::display(failure));
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
    use aws_sdk_kinesis::types::PutRecordsResultEntry;
    use aws_smithy_mocks::{RuleMode, mock, mock_client};

    #[test]
    fn codes_are_classified() {
        assert_eq!(
            classify_code("ProvisionedThroughputExceededException"),
            ErrorClass::Throttled
        );
        assert_eq!(
            classify_code("KMSThrottlingException"),
            ErrorClass::Throttled
        );
        assert_eq!(classify_code("InternalFailure"), ErrorClass::Transient);
        assert_eq!(
            classify_code("ResourceNotFoundException"),
            ErrorClass::Configuration
        );
        assert_eq!(
            classify_code("KMSDisabledException"),
            ErrorClass::Configuration
        );
        assert_eq!(
            classify_code("AccessDeniedException"),
            ErrorClass::Configuration
        );
        assert_eq!(classify_code("ValidationException"), ErrorClass::Invalid);
        assert_eq!(classify_code("SomethingNew"), ErrorClass::Transient);
    }

    fn records() -> Vec<OutRecord<'static>> {
        vec![
            OutRecord {
                partition_key: "a",
                data: b"{}",
            },
            OutRecord {
                partition_key: "b",
                data: b"{}",
            },
        ]
    }

    #[tokio::test]
    async fn partly_failed_responses_fail_only_their_records() {
        let rule = mock!(Client::put_records).then_output(|| {
            PutRecordsOutput::builder()
                .failed_record_count(1)
                .records(
                    PutRecordsResultEntry::builder()
                        .sequence_number("1")
                        .shard_id("s")
                        .build(),
                )
                .records(
                    PutRecordsResultEntry::builder()
                        .error_code("ProvisionedThroughputExceededException")
                        .error_message("slow down")
                        .build(),
                )
                .build()
                .unwrap()
        });
        let client = mock_client!(aws_sdk_kinesis, RuleMode::Sequential, [&rule]);
        let sink = KinesisSink::new(client);
        let outcomes = sink.put_records("s", &records()).await.unwrap();
        assert_eq!(outcomes[0], None);
        assert_eq!(outcomes[1].as_ref().unwrap().class, ErrorClass::Throttled);
    }

    #[tokio::test]
    async fn request_errors_are_classified() {
        for (code, class) in [
            ("ResourceNotFoundException", ErrorClass::Configuration),
            ("KMSAccessDeniedException", ErrorClass::Configuration),
            ("KMSThrottlingException", ErrorClass::Throttled),
            ("ValidationException", ErrorClass::Invalid),
            // A whole request failed by the service is no record's fault.
            ("InternalFailure", ErrorClass::Unavailable),
            ("SomethingNew", ErrorClass::Transient),
        ] {
            let rule = mock!(Client::put_records).then_error(move || {
                PutRecordsError::generic(
                    aws_sdk_kinesis::error::ErrorMetadata::builder()
                        .code(code)
                        .message("m")
                        .build(),
                )
            });
            let client = mock_client!(aws_sdk_kinesis, RuleMode::Sequential, [&rule]);
            let failure = KinesisSink::new(client)
                .put_records("s", &records())
                .await
                .unwrap_err();
            assert_eq!((failure.code.as_str(), failure.class), (code, class));
        }
    }

    #[tokio::test]
    async fn a_server_error_for_the_whole_request_is_unavailable() {
        use aws_sdk_kinesis::config::http::HttpResponse;
        use aws_smithy_types::body::SdkBody;
        let rule = mock!(Client::put_records).then_http_response(|| {
            HttpResponse::new(
                503.try_into().unwrap(),
                SdkBody::from(r#"{"__type":"ServiceUnavailable","message":"try later"}"#),
            )
        });
        let client = mock_client!(aws_sdk_kinesis, RuleMode::Sequential, [&rule]);
        let failure = KinesisSink::new(client)
            .put_records("s", &records())
            .await
            .unwrap_err();
        assert_eq!(failure.class, ErrorClass::Unavailable, "{failure}");
    }

    /// `ensure_stream` finds a stream created between its look and its create (by someone
    /// else, or by its own request sent again after a late response) and waits for it.
    #[tokio::test]
    async fn a_stream_created_meanwhile_is_ensured() {
        use aws_sdk_kinesis::operation::create_stream::CreateStreamError;
        use aws_sdk_kinesis::operation::describe_stream_summary::{
            DescribeStreamSummaryError, DescribeStreamSummaryOutput,
        };
        use aws_sdk_kinesis::types::{StreamDescriptionSummary, StreamStatus};
        let error = |code: &'static str| {
            aws_sdk_kinesis::error::ErrorMetadata::builder()
                .code(code)
                .message("m")
                .build()
        };
        let missing = mock!(Client::describe_stream_summary).then_error(move || {
            DescribeStreamSummaryError::generic(error("ResourceNotFoundException"))
        });
        let in_use = mock!(Client::create_stream)
            .then_error(move || CreateStreamError::generic(error("ResourceInUseException")));
        let active = mock!(Client::describe_stream_summary).then_output(|| {
            DescribeStreamSummaryOutput::builder()
                .stream_description_summary(
                    StreamDescriptionSummary::builder()
                        .stream_name("s")
                        .stream_arn("arn:aws:kinesis:eu-west-1:1:stream/s")
                        .stream_status(StreamStatus::Active)
                        .retention_period_hours(24)
                        .stream_creation_timestamp(aws_smithy_types::DateTime::from_secs(0))
                        .set_enhanced_monitoring(Some(Vec::new()))
                        .open_shard_count(1)
                        .build()
                        .unwrap(),
                )
                .build()
        });
        let client = mock_client!(
            aws_sdk_kinesis,
            RuleMode::Sequential,
            [&missing, &in_use, &active]
        );
        ensure_stream(&client, "s", 1).await.unwrap();

        // Any other refusal of the create is reported.
        let missing = mock!(Client::describe_stream_summary).then_error(move || {
            DescribeStreamSummaryError::generic(error("ResourceNotFoundException"))
        });
        let refused = mock!(Client::create_stream)
            .then_error(move || CreateStreamError::generic(error("LimitExceededException")));
        let client = mock_client!(aws_sdk_kinesis, RuleMode::Sequential, [&missing, &refused]);
        let failure = ensure_stream(&client, "s", 1).await.unwrap_err();
        assert_eq!(failure.code, "LimitExceededException");
    }

    #[tokio::test]
    async fn a_short_response_is_transient() {
        let rule = mock!(Client::put_records).then_output(|| {
            PutRecordsOutput::builder()
                .records(
                    PutRecordsResultEntry::builder()
                        .sequence_number("1")
                        .build(),
                )
                .build()
                .unwrap()
        });
        let client = mock_client!(aws_sdk_kinesis, RuleMode::Sequential, [&rule]);
        let failure = KinesisSink::new(client)
            .put_records("s", &records())
            .await
            .unwrap_err();
        assert_eq!(failure.class, ErrorClass::Transient);
    }
}
