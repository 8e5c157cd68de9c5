//! How to reach Kinesis: region, endpoint, role, timeouts; builds the SDK client.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::SharedCredentialsProvider;

/// How to reach Kinesis. [`KinesisConfig::from_env`] reads the standard AWS variables.
///
/// Its `Debug` output never shows a secret: static credentials print as `<redacted>`.
#[derive(Clone)]
#[non_exhaustive]
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
    /// A credentials provider of your own instead of the standard chain (and of
    /// `static_credentials`); `role_arn` is still assumed with it when set.
    pub credentials_provider: Option<SharedCredentialsProvider>,
}

impl std::fmt::Debug for KinesisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisConfig")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("role_arn", &self.role_arn)
            .field("idle_timeout", &self.idle_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("sdk_max_attempts", &self.sdk_max_attempts)
            .field(
                "static_credentials",
                &self.static_credentials.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "credentials_provider",
                &self.credentials_provider.as_ref().map(|_| "<custom>"),
            )
            .finish()
    }
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
            credentials_provider: None,
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl KinesisConfig {
    /// Sets the region (see the field).
    pub fn with_region(mut self, value: Option<String>) -> Self {
        self.region = value;
        self
    }

    /// Sets the Kinesis endpoint (see the field).
    pub fn with_endpoint_url(mut self, value: Option<String>) -> Self {
        self.endpoint_url = value;
        self
    }

    /// Sets the role to assume (see the field).
    pub fn with_role_arn(mut self, value: Option<String>) -> Self {
        self.role_arn = value;
        self
    }

    /// Sets the pooled connection idle timeout (see the field).
    pub fn with_idle_timeout(mut self, value: Duration) -> Self {
        self.idle_timeout = value;
        self
    }

    /// Sets the connect timeout (see the field).
    pub fn with_connect_timeout(mut self, value: Duration) -> Self {
        self.connect_timeout = value;
        self
    }

    /// Sets the read timeout (see the field).
    pub fn with_read_timeout(mut self, value: Duration) -> Self {
        self.read_timeout = value;
        self
    }

    /// Sets the SDK's attempts per request (see the field).
    pub fn with_sdk_max_attempts(mut self, value: u32) -> Self {
        self.sdk_max_attempts = value;
        self
    }

    /// Sets fixed credentials (local emulators) (see the field).
    pub fn with_static_credentials(mut self, value: Option<(String, String)>) -> Self {
        self.static_credentials = value;
        self
    }

    /// Uses a credentials provider of your own (see the field).
    pub fn with_credentials_provider(mut self, value: Option<SharedCredentialsProvider>) -> Self {
        self.credentials_provider = value;
        self
    }

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
        let loader = match (&self.credentials_provider, &self.static_credentials) {
            (Some(provider), _) => loader.credentials_provider(provider.clone()),
            (None, Some((key, secret))) => loader.credentials_provider(
                aws_sdk_kinesis::config::Credentials::new(key, secret, None, None, "static"),
            ),
            (None, None) => loader,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_static_credentials() {
        let config = KinesisConfig::default()
            .with_static_credentials(Some(("AKIDSECRETID".into(), "hunter2-secret".into())));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("AKIDSECRETID"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
