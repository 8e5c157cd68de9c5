//! Real Kinesis implementations for tests (kinesalite and kinesis-mock, installed from
//! tools/package.json), started per test on a free port, and a fault-injecting proxy.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use journaled::kinesis::KinesisConfig;
use serde_json::{Value, json};

fn tools() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tools"))
}

/// Installs the emulators from tools/package-lock.json once, if scripts/test did not.
fn install() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if tools().join("node_modules/kinesalite").exists()
                && tools().join("node_modules/kinesis-local").exists()
            {
                return Ok(());
            }
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(tools())
                .status()
                .map_err(|e| {
                    format!("cannot run npm ({e}): install Node.js with npm to get a local Kinesis")
                })?;
            if status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`npm ci` in {} failed ({status}); is the npm registry reachable?",
                    tools().display()
                ))
            }
        })
        .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port(port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the emulator exited before listening ({status})"));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the emulator did not open port {port} within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Fast, for volume.
    Kinesalite,
    /// kinesis-mock: the most faithful API; slows down as a stream grows.
    KinesisMock,
}

/// A local Kinesis on 127.0.0.1, killed when dropped.
pub struct Emulator {
    child: Child,
    pub port: u16,
    pub kind: Kind,
    path: Option<PathBuf>,
}

async fn spawn(kind: Kind, port: u16, path: Option<&std::path::Path>) -> Result<Child, String> {
    let mut cmd = Command::new("node");
    cmd.current_dir(tools())
        .arg("-r")
        .arg("./localhost-only.js")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match kind {
        Kind::Kinesalite => {
            cmd.args([
                "node_modules/kinesalite/cli.js",
                "--createStreamMs",
                "0",
                "--port",
            ])
            .arg(port.to_string());
            if let Some(path) = path {
                cmd.arg("--path").arg(path);
            }
        }
        Kind::KinesisMock => {
            cmd.arg("node_modules/kinesis-local/main.js")
                .env("KINESIS_MOCK_PLAIN_PORT", port.to_string())
                .env("KINESIS_MOCK_TLS_PORT", free_port().to_string())
                .env(
                    "KINESIS_MOCK_CERT_PATH",
                    tools().join("node_modules/kinesis-local/server.json"),
                )
                .env("CREATE_STREAM_DURATION", "0ms")
                .env("LOG_LEVEL", "ERROR");
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run node ({e}): install Node.js"))?;
    if let Err(e) = wait_for_port(port, &mut child).await {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

impl Emulator {
    pub async fn start(kind: Kind) -> Emulator {
        match Self::try_start(kind).await {
            Ok(emulator) => emulator,
            Err(e) => panic!("cannot start {kind:?}: {e}"),
        }
    }

    /// Starts an emulator, or says clearly why it could not.
    pub async fn try_start(kind: Kind) -> Result<Emulator, String> {
        install()?;
        let port = free_port();
        let child = spawn(kind, port, None).await?;
        Ok(Emulator {
            child,
            port,
            kind,
            path: None,
        })
    }

    /// kinesalite keeping its data in `dir`, so it survives [`restart`](Self::restart).
    pub async fn start_persistent(dir: &std::path::Path) -> Emulator {
        install().unwrap();
        let port = free_port();
        let child = spawn(Kind::Kinesalite, port, Some(dir)).await.unwrap();
        Emulator {
            child,
            port,
            kind: Kind::Kinesalite,
            path: Some(dir.to_owned()),
        }
    }

    /// Kills the emulator; the port refuses connections until [`start_again`](Self::start_again).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port (with the same data when persistent).
    pub async fn start_again(&mut self) {
        self.child = spawn(self.kind, self.port, self.path.as_deref())
            .await
            .unwrap();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client talking to the emulator directly.
    pub async fn client(&self) -> aws_sdk_kinesis::Client {
        kinesis_config(&self.endpoint()).client().await
    }

    /// Creates a stream and waits until it is active.
    pub async fn create_stream(&self, name: &str, shards: i32) {
        journaled::kinesis::ensure_stream(&self.client().await, name, shards)
            .await
            .expect("create stream");
    }

    /// Every record of a stream, oldest first per shard.
    pub async fn read(&self, stream: &str) -> Vec<journaled::kinesis::ReadRecord> {
        journaled::kinesis::read_stream(&self.client().await, stream)
            .await
            .expect("read stream")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client settings for tests: dummy credentials, short timeouts.
pub fn kinesis_config(endpoint: &str) -> KinesisConfig {
    KinesisConfig::default()
        .with_region(Some("us-east-1".into()))
        .with_endpoint_url(Some(endpoint.to_owned()))
        .with_static_credentials(Some(("AKIDTEST".into(), "secret".into())))
        .with_read_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1))
        .with_sdk_max_attempts(1)
}

/// Faults the proxy injects; each counter is "the next N requests".
#[derive(Debug, Default)]
pub struct Faults {
    /// Throttle one record in every `throttle_every` (0: never) of PutRecords requests…
    pub throttle_every: AtomicUsize,
    /// …for this many more requests.
    pub throttle_requests: AtomicUsize,
    pub fail_500: AtomicUsize,
    pub slow: AtomicUsize,
    pub slow_for: Mutex<Duration>,
    pub reset: AtomicUsize,
    pub down: AtomicBool,
    // What was injected.
    pub requests: AtomicUsize,
    pub throttled_records: AtomicUsize,
    pub injected_500: AtomicUsize,
    pub injected_slow: AtomicUsize,
    pub injected_resets: AtomicUsize,
    pub refused_while_down: AtomicUsize,
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// An HTTP proxy between the worker and the emulator that injects faults.
pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

impl FaultProxy {
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let client: Client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let state = faults.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if state.down.load(Ordering::SeqCst) {
                    state.refused_while_down.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                let state = state.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, state.clone(), client.clone(), upstream_port)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultProxy { port, faults, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

#[derive(Debug)]
struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected reset")
    }
}
impl std::error::Error for Reset {}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    faults: Arc<Faults>,
    client: Client,
    upstream: u16,
) -> Result<Response<Full<Bytes>>, Reset> {
    faults.requests.fetch_add(1, Ordering::SeqCst);
    if take(&faults.reset) {
        faults.injected_resets.fetch_add(1, Ordering::SeqCst);
        return Err(Reset);
    }
    if take(&faults.fail_500) {
        faults.injected_500.fetch_add(1, Ordering::SeqCst);
        return Ok(json_response(
            500,
            json!({"__type": "InternalFailure", "message": "injected by the test proxy"}),
        ));
    }
    if take(&faults.slow) {
        faults.injected_slow.fetch_add(1, Ordering::SeqCst);
        let delay = *faults.slow_for.lock().unwrap();
        tokio::time::sleep(delay).await;
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let every = faults.throttle_every.load(Ordering::SeqCst);
    if target.ends_with(".PutRecords") && every > 0 && take(&faults.throttle_requests) {
        return throttle(parts, body, every, &faults, &client, upstream).await;
    }
    forward(parts, body, &client, upstream).await
}

async fn forward(
    parts: hyper::http::request::Parts,
    body: Bytes,
    client: &Client,
    upstream: u16,
) -> Result<Response<Full<Bytes>>, Reset> {
    let uri = format!(
        "http://127.0.0.1:{upstream}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut builder = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            builder = builder.header(name, value);
        }
    }
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .map_err(|_| Reset)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
    let mut out = Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        if name != "content-length" && name != "transfer-encoding" {
            out = out.header(name, value);
        }
    }
    Ok(out.body(Full::new(body)).unwrap())
}

/// Sends all but every `every`-th record upstream and answers a partly failed 200, as Kinesis
/// does when a shard is over its throughput.
async fn throttle(
    parts: hyper::http::request::Parts,
    body: Bytes,
    every: usize,
    faults: &Faults,
    client: &Client,
    upstream: u16,
) -> Result<Response<Full<Bytes>>, Reset> {
    let mut request: Value = serde_json::from_slice(&body).map_err(|_| Reset)?;
    let records = request["Records"].as_array().cloned().unwrap_or_default();
    let throttled: Vec<bool> = (0..records.len()).map(|i| i % every == 0).collect();
    let kept: Vec<Value> = records
        .iter()
        .zip(&throttled)
        .filter(|(_, t)| !**t)
        .map(|(r, _)| r.clone())
        .collect();
    let mut upstream_results: Vec<Value> = Vec::new();
    if !kept.is_empty() {
        request["Records"] = Value::Array(kept);
        let response = forward(parts, Bytes::from(request.to_string()), client, upstream).await?;
        if response.status() != 200 {
            return Ok(response);
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| Reset)?
            .to_bytes();
        let parsed: Value = serde_json::from_slice(&body).map_err(|_| Reset)?;
        upstream_results = parsed["Records"].as_array().cloned().unwrap_or_default();
    }
    let mut upstream_results = upstream_results.into_iter();
    let mut failed = 0;
    let results: Vec<Value> = throttled
        .iter()
        .map(|t| {
            if *t {
                failed += 1;
                faults.throttled_records.fetch_add(1, Ordering::SeqCst);
                json!({"ErrorCode": "ProvisionedThroughputExceededException",
                       "ErrorMessage": "Rate exceeded for shard shardId-000000000000 (injected)"})
            } else {
                let r = upstream_results.next().unwrap_or(Value::Null);
                if r.get("ErrorCode").is_some() {
                    failed += 1;
                }
                r
            }
        })
        .collect();
    Ok(json_response(
        200,
        json!({"FailedRecordCount": failed, "Records": results}),
    ))
}

/// A local STS that answers `AssumeRole`: `AccessDenied` while `refuse` is set (a role that
/// does not exist or does not trust the caller), else temporary credentials valid for an hour.
/// Point a worker at it with `AWS_ENDPOINT_URL_STS` and `JOURNALED_IAM_ROLE_ARN`.
pub struct FakeSts {
    pub port: u16,
    pub refuse: Arc<AtomicBool>,
    pub refused: Arc<AtomicUsize>,
    pub granted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSts {
    pub async fn start(refuse: bool) -> FakeSts {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let refuse = Arc::new(AtomicBool::new(refuse));
        let refused = Arc::new(AtomicUsize::new(0));
        let granted = Arc::new(AtomicUsize::new(0));
        let (r, n, g) = (refuse.clone(), refused.clone(), granted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (r, n, g) = (r.clone(), n.clone(), g.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (r, n, g) = (r.clone(), n.clone(), g.clone());
                        async move {
                            let body = req.into_body().collect().await.map_err(|_| Reset)?;
                            let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                            Ok::<_, Reset>(sts_answer(&body, &r, &n, &g))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeSts {
            port,
            refuse,
            refused,
            granted,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn sts_answer(
    body: &str,
    refuse: &AtomicBool,
    refused: &AtomicUsize,
    granted: &AtomicUsize,
) -> Response<Full<Bytes>> {
    let xml = |status: u16, text: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/xml")
            .body(Full::new(Bytes::from(text)))
            .unwrap()
    };
    if !body.contains("Action=AssumeRole") {
        return xml(400, "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code><Message>only AssumeRole</Message></Error></ErrorResponse>".into());
    }
    if refuse.load(Ordering::SeqCst) {
        refused.fetch_add(1, Ordering::SeqCst);
        return xml(
            403,
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
             <Code>AccessDenied</Code><Message>User: arn:aws:iam::123456789012:user/worker is not authorized \
             to perform: sts:AssumeRole on resource: arn:aws:iam::123456789012:role/journaled-test</Message>\
             </Error><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
                .into(),
        );
    }
    granted.fetch_add(1, Ordering::SeqCst);
    let expiration = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    xml(
        200,
        format!(
            "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
             <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/journaled-test/journaled</Arn>\
             <AssumedRoleId>AROATEST:journaled</AssumedRoleId></AssumedRoleUser>\
             <Credentials><AccessKeyId>ASIATEST</AccessKeyId><SecretAccessKey>assumed-secret</SecretAccessKey>\
             <SessionToken>assumed-token</SessionToken><Expiration>{expiration}</Expiration></Credentials>\
             </AssumeRoleResult><ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000001</RequestId>\
             </ResponseMetadata></AssumeRoleResponse>"
        ),
    )
}
