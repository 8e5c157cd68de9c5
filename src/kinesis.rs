//! The Kinesis sink: `PutRecords` through the AWS SDK, error classification, and the AWS
//! configuration read from the environment.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};

use crate::store::BoxFuture;

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Throughput exceeded (Kinesis or KMS): retry later; never makes a job dead.
    Throttled,
    /// Internal failures, 5xx, timeouts, connection errors: retry with backoff.
    Transient,
    /// Stream not found, access denied, KMS set up wrong, bad credentials: retry with a long
    /// backoff and log loudly; never makes a job dead.
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

/// Where delivered records go. [`KinesisSink`] in production; anything else in benchmarks.
pub trait Sink: Send + Sync + 'static {
    /// Puts `records` to `stream` in one request. `Ok` holds one outcome per record, in order
    /// (`None` for delivered); `Err` is a failure of the whole request.
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<Failure>>, Failure>>;
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

/// Classifies a Kinesis error code (request-level or per record).
pub fn classify_code(code: &str) -> ErrorClass {
    match code {
        "ProvisionedThroughputExceededException"
        | "KMSThrottlingException"
        | "ThrottlingException"
        | "Throttling"
        | "LimitExceededException"
        | "RequestLimitExceeded"
        | "SlowDown" => ErrorClass::Throttled,
        "ResourceNotFoundException"
        | "AccessDeniedException"
        | "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => ErrorClass::Configuration,
        "ValidationException" | "InvalidArgumentException" | "SerializationException" => {
            ErrorClass::Invalid
        }
        _ => ErrorClass::Transient,
    }
}

/// Classifies an SDK error of any operation.
pub fn classify_sdk_error<E, R>(error: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let local = |code: &str, class: ErrorClass| Failure {
        class,
        code: code.to_owned(),
        message: aws_smithy_types::error::display::DisplayErrorContext(error).to_string(),
    };
    match error {
        SdkError::TimeoutError(_) => local("timeout", ErrorClass::Transient),
        SdkError::DispatchFailure(failure) => {
            if failure.is_user() {
                local("dispatch", ErrorClass::Configuration)
            } else {
                local("dispatch", ErrorClass::Transient)
            }
        }
        SdkError::ResponseError(_) => local("response", ErrorClass::Transient),
        SdkError::ConstructionFailure(_) => local("construction", ErrorClass::Configuration),
        SdkError::ServiceError(context) => {
            let err = context.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or_default().to_owned();
            let class = match err.code() {
                Some(code) => classify_code(code),
                None => ErrorClass::Transient,
            };
            Failure {
                class,
                code,
                message,
            }
        }
        _ => local("unknown", ErrorClass::Transient),
    }
}

/// How to reach Kinesis. [`KinesisConfig::from_env`] reads the standard AWS variables.
#[derive(Debug, Clone)]
pub struct KinesisConfig {
    /// `AWS_REGION` / `AWS_DEFAULT_REGION`, default `us-east-1`.
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL`: a local emulator. Set on the Kinesis
    /// client only, so assume-role still talks to the real STS.
    pub endpoint_url: Option<String>,
    /// `JOURNALED_IAM_ROLE_ARN`: a role to assume.
    pub role_arn: Option<String>,
    /// How long an idle pooled connection is kept (default 5 s; shorter than the service's).
    pub idle_timeout: Duration,
    /// Connect timeout (default 2 s).
    pub connect_timeout: Duration,
    /// Read timeout: the longest wait for response bytes (default 60 s).
    pub read_timeout: Duration,
    /// Attempts the SDK makes for one request before the worker's own backoff takes over (default 2).
    pub sdk_max_attempts: u32,
    /// Fixed (access key id, secret) instead of the credential chain: for local emulators.
    pub static_credentials: Option<(String, String)>,
}

impl Default for KinesisConfig {
    fn default() -> Self {
        KinesisConfig {
            region: None,
            endpoint_url: None,
            role_arn: None,
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(60),
            sdk_max_attempts: 2,
            static_credentials: None,
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl KinesisConfig {
    /// Reads region, endpoint and role from the environment; timeouts keep their defaults.
    pub fn from_env() -> Self {
        KinesisConfig {
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            endpoint_url: var("AWS_ENDPOINT_URL_KINESIS").or_else(|| var("AWS_ENDPOINT_URL")),
            role_arn: var("JOURNALED_IAM_ROLE_ARN"),
            ..KinesisConfig::default()
        }
    }

    /// Builds the SDK client: every timeout set, the HTTP pool's idle timeout set, ring TLS.
    pub async fn client(&self) -> Client {
        let http = aws_smithy_http_client::Builder::new()
            .pool_idle_timeout(self.idle_timeout)
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let attempt = self.connect_timeout + self.read_timeout;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout)
            .operation_attempt_timeout(attempt)
            .operation_timeout(attempt * self.sdk_max_attempts.max(1) + Duration::from_secs(5))
            .build();
        let loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(self.sdk_max_attempts.max(1)));
        // An explicit region wins; else the loader's chain (env, profile, IMDS) with our HTTP
        // client; else us-east-1, as the reference does.
        let loader = match &self.region {
            Some(region) => loader.region(aws_config::Region::new(region.clone())),
            None => loader,
        };
        let loader = match &self.static_credentials {
            Some((key, secret)) => loader.credentials_provider(
                aws_sdk_kinesis::config::Credentials::new(key, secret, None, None, "static"),
            ),
            None => loader,
        };
        let mut sdk = loader.load().await;
        // Endpoints from the environment belong to Kinesis only (below), never to STS.
        let mut builder = sdk.to_builder();
        builder.set_endpoint_url(None);
        if sdk.region().is_none() {
            builder.set_region(Some(aws_config::Region::from_static("us-east-1")));
        }
        sdk = builder.build();
        if let Some(arn) = &self.role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(arn.clone())
                .session_name("journaled")
                .configure(&sdk)
                .build()
                .await;
            sdk = sdk
                .to_builder()
                .credentials_provider(aws_sdk_kinesis::config::SharedCredentialsProvider::new(
                    provider,
                ))
                .build();
        }
        let mut config = aws_sdk_kinesis::config::Builder::from(&sdk);
        if let Some(endpoint) = &self.endpoint_url {
            config = config.endpoint_url(endpoint.clone());
        }
        Client::from_conf(config.build())
    }
}

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
}

impl Sink for KinesisSink {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        records: &'a [OutRecord<'a>],
    ) -> BoxFuture<'a, Result<Vec<Option<Failure>>, Failure>> {
        Box::pin(async move {
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
                .map(|result| {
                    result.error_code().map(|code| Failure {
                        class: match classify_code(code) {
                            // A record-level refusal is about this record alone.
                            ErrorClass::Invalid => ErrorClass::Permanent,
                            class => class,
                        },
                        code: code.to_owned(),
                        message: result.error_message().unwrap_or_default().to_owned(),
                    })
                })
                .collect())
        })
    }
}

/// A record read back from a stream.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    /// The shard it is on.
    pub shard_id: String,
    /// Its sequence number (a decimal string; it overflows u128).
    pub sequence_number: String,
    /// Its partition key.
    pub partition_key: String,
    /// Its data bytes.
    pub data: Vec<u8>,
}

/// Where [`read_stream`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record kept.
    Oldest,
    /// Only records put from now on.
    Latest,
}

/// Iterators over every shard of a stream, for reading it back (`journaled tail`, tests).
#[derive(Debug)]
pub struct StreamReader {
    client: Client,
    iterators: Vec<(String, Option<String>)>,
}

impl StreamReader {
    /// Opens an iterator on every shard of `stream`.
    pub async fn open(client: &Client, stream: &str, start: StartAt) -> Result<Self, Failure> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut request = client.list_shards();
            request = match &next {
                Some(token) => request.next_token(token),
                None => request.stream_name(stream),
            };
            let page = request.send().await.map_err(|e| classify_sdk_error(&e))?;
            shards.extend(page.shards().iter().map(|s| s.shard_id().to_owned()));
            next = page.next_token().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        let kind = match start {
            StartAt::Oldest => ShardIteratorType::TrimHorizon,
            StartAt::Latest => ShardIteratorType::Latest,
        };
        let mut iterators = Vec::new();
        for shard in shards {
            let iterator = client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(&shard)
                .shard_iterator_type(kind.clone())
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            iterators.push((shard, iterator.shard_iterator().map(str::to_owned)));
        }
        Ok(StreamReader {
            client: client.clone(),
            iterators,
        })
    }

    /// One `GetRecords` round over every shard. Returns the records and whether every shard
    /// is caught up.
    pub async fn poll(&mut self) -> Result<(Vec<ReadRecord>, bool), Failure> {
        let mut out = Vec::new();
        let mut caught_up = true;
        for (shard, iterator) in &mut self.iterators {
            let Some(current) = iterator.clone() else {
                continue;
            };
            let page = self
                .client
                .get_records()
                .shard_iterator(current)
                .limit(10_000)
                .send()
                .await
                .map_err(|e| classify_sdk_error(&e))?;
            if !page.records().is_empty() || page.millis_behind_latest().unwrap_or(0) > 0 {
                caught_up = false;
            }
            out.extend(page.records().iter().map(|r| ReadRecord {
                shard_id: shard.clone(),
                sequence_number: r.sequence_number().to_owned(),
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: r.data().as_ref().to_vec(),
            }));
            *iterator = page.next_shard_iterator().map(str::to_owned);
        }
        Ok((out, caught_up))
    }
}

/// Reads every record of `stream` from the oldest until caught up.
pub async fn read_stream(client: &Client, stream: &str) -> Result<Vec<ReadRecord>, Failure> {
    let mut reader = StreamReader::open(client, stream, StartAt::Oldest).await?;
    let mut all = Vec::new();
    loop {
        let (records, caught_up) = reader.poll().await?;
        all.extend(records);
        if caught_up {
            return Ok(all);
        }
    }
}

/// Creates `stream` with `shards` shards unless it exists, and waits until it is active.
pub async fn ensure_stream(client: &Client, stream: &str, shards: i32) -> Result<(), Failure> {
    let exists = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await;
    if let Err(error) = &exists {
        let failure = classify_sdk_error(error);
        if failure.code != "ResourceNotFoundException" {
            return Err(failure);
        }
        client
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
            .map_err(|e| classify_sdk_error(&e))?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| classify_sdk_error(&e))?;
        let status = summary
            .stream_description_summary()
            .map(|s| s.stream_status().as_str().to_owned())
            .unwrap_or_default();
        if status == "ACTIVE" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Failure {
                class: ErrorClass::Configuration,
                code: "timeout".into(),
                message: format!("stream {stream} is still {status} after 30 s"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
            ("InternalFailure", ErrorClass::Transient),
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
