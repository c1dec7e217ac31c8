//! A fault-injecting HTTP/1.1 proxy in front of the AWS emulator: per request, with given
//! probabilities, it answers a throttling error, a 429, a 500 or a 503 in the shape the
//! calling service uses (SQS and DynamoDB/SSM JSON `__type`, SQS query XML, S3 XML), drops
//! the connection without an answer before forwarding or AFTER forwarding (the call took
//! effect, the client sees an error), and adds latency (fixed + jitter, optionally only
//! for some services). It counts what it did, per service and fault.
//!
//! Services are told apart by the request: the SigV4 credential scope
//! (`Credential=KEY/DATE/REGION/SERVICE/aws4_request`, in the `Authorization` header or a
//! presigned query), then `X-Amz-Target`, then an `Action=` form body (SQS query), else S3.
//! The emulator's own API (`/moto-api/...`) is never faulted.
//!
//! Decisions come from one seeded generator, drawn in the order requests arrive: the same
//! seed and the same sequence of requests give the same faults (concurrent clients make
//! the sequence itself vary from run to run).
//!
//! Control endpoints on the proxy itself: `GET /__faultproxy/stats` (the counters as JSON)
//! and `PUT /__faultproxy/config` (a [`FaultConfig`] as JSON, applied to later requests).
//!
//! Messages are buffered whole (request and response), which is fine for test traffic;
//! `Expect: 100-continue` is answered by the proxy itself. Connections are bounded by a
//! semaphore and every connection task ends when the proxy is dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 1024;
/// Largest request or response head.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body buffered (S3 log segments and artifacts in tests are far smaller).
const MAX_BODY: usize = 256 * 1024 * 1024;

/// The AWS service a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Sqs,
    Dynamodb,
    S3,
    Ssm,
    /// Any other AWS service (STS, Lambda, ...): JSON error shape.
    Other,
    /// The emulator's own API: never faulted.
    Emulator,
}

impl Service {
    pub const ALL: [Service; 5] = [
        Service::Sqs,
        Service::Dynamodb,
        Service::S3,
        Service::Ssm,
        Service::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqs => "sqs",
            Self::Dynamodb => "dynamodb",
            Self::S3 => "s3",
            Self::Ssm => "ssm",
            Self::Other => "other",
            Self::Emulator => "emulator",
        }
    }
}

impl std::str::FromStr for Service {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sqs" => Ok(Self::Sqs),
            "dynamodb" | "ddb" => Ok(Self::Dynamodb),
            "s3" => Ok(Self::S3),
            "ssm" => Ok(Self::Ssm),
            "other" => Ok(Self::Other),
            other => Err(format!(
                "unknown service {other:?}: use sqs, dynamodb, s3, ssm or other"
            )),
        }
    }
}

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The service's throttling error (SQS `RequestThrottled` 400, DynamoDB
    /// `ProvisionedThroughputExceededException` or `ThrottlingException` 400, SSM
    /// `ThrottlingException` 400, S3 `SlowDown` 503).
    Throttle,
    /// HTTP 429 with the service's throttling code.
    TooManyRequests,
    /// HTTP 500 `InternalError` / `InternalServerError`.
    Internal,
    /// HTTP 503 `ServiceUnavailable`.
    Unavailable,
    /// The connection is closed before the request is forwarded: nothing happened.
    DropBefore,
    /// The request is forwarded and took effect, then the connection is closed without
    /// the answer.
    DropAfter,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Throttle,
        Fault::TooManyRequests,
        Fault::Internal,
        Fault::Unavailable,
        Fault::DropBefore,
        Fault::DropAfter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttle => "throttle",
            Self::TooManyRequests => "too_many_requests",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::DropBefore => "drop_before",
            Self::DropAfter => "drop_after",
        }
    }
}

/// What to inject. Probabilities are per request and add up (at most 1 in total).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Seed of the decision generator.
    pub seed: u64,
    /// Probability of each fault kind.
    pub faults: BTreeMap<Fault, f64>,
    /// Services that get faults; empty means every AWS service.
    pub fault_services: Vec<Service>,
    /// Added to every request of `latency_services` before it is forwarded.
    pub latency_ms: u64,
    /// Up to this much more, uniformly drawn.
    pub jitter_ms: u64,
    /// Services that get latency; empty means every AWS service.
    pub latency_services: Vec<Service>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            faults: BTreeMap::new(),
            fault_services: Vec::new(),
            latency_ms: 0,
            jitter_ms: 0,
            latency_services: Vec::new(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault proxy config: {0}")]
pub struct ConfigError(pub String);

impl FaultConfig {
    /// `rate` spread evenly over every fault kind.
    pub fn uniform(rate: f64, seed: u64) -> Self {
        let each = rate / Fault::ALL.len() as f64;
        Self {
            seed,
            faults: Fault::ALL.iter().map(|f| (*f, each)).collect(),
            ..Self::default()
        }
    }

    /// Only `fault`, with probability `p`.
    pub fn only(fault: Fault, p: f64, seed: u64) -> Self {
        Self {
            seed,
            faults: [(fault, p)].into_iter().collect(),
            ..Self::default()
        }
    }

    /// The total fault probability.
    pub fn total_rate(&self) -> f64 {
        self.faults.values().sum()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (f, p) in &self.faults {
            if !(p.is_finite() && (0.0..=1.0).contains(p)) {
                return Err(ConfigError(format!(
                    "faults.{}: {p} is not a probability (use 0..=1)",
                    f.as_str()
                )));
            }
        }
        if self.total_rate() > 1.0 + 1e-9 {
            return Err(ConfigError(format!(
                "faults: the probabilities add up to {}, more than 1",
                self.total_rate()
            )));
        }
        if self.latency_ms > 600_000 || self.jitter_ms > 600_000 {
            return Err(ConfigError(
                "latency_ms and jitter_ms: use at most 600000 (10 minutes)".into(),
            ));
        }
        Ok(())
    }
}

/// Counters of what the proxy saw and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests per service (control requests excluded).
    pub requests: BTreeMap<Service, u64>,
    /// Requests answered by the upstream and passed back.
    pub forwarded: u64,
    /// Injected faults per service and kind.
    pub faults: BTreeMap<Service, BTreeMap<Fault, u64>>,
    /// Requests that got added latency, and how much in total.
    pub delayed: u64,
    pub delay_ms_total: u64,
    /// The upstream could not be reached or broke off (the client connection is closed).
    pub upstream_errors: u64,
}

impl Stats {
    /// Injected faults of every kind and service.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().flat_map(|m| m.values()).sum()
    }

    /// Injected faults of one kind, over every service.
    pub fn faults_of(&self, fault: Fault) -> u64 {
        self.faults
            .values()
            .filter_map(|m| m.get(&fault))
            .sum::<u64>()
    }

    /// Requests over every service.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Decision {
    fault: Option<Fault>,
    delay: Duration,
    /// A coin for variants of one fault (DynamoDB's two throttling codes).
    pick: bool,
}

/// Config, generator and counters. The std mutex is never held across an await.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    upstream_host: String,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    config: FaultConfig,
    rng: fastrand::Rng,
    stats: Stats,
}

impl Shared {
    fn decide(&self, service: Service) -> Decision {
        let Ok(mut st) = self.state.lock() else {
            return Decision {
                fault: None,
                delay: Duration::ZERO,
                pick: false,
            };
        };
        let st = &mut *st;
        *st.stats.requests.entry(service).or_default() += 1;
        let applies = |list: &[Service]| list.is_empty() || list.contains(&service);
        // Always draw the same number of values per request, so that one request's service
        // does not shift the decisions of the next.
        let u = st.rng.f64();
        let j = st.rng.f64();
        let pick = st.rng.bool();
        let mut fault = None;
        if service != Service::Emulator && applies(&st.config.fault_services) {
            let mut acc = 0.0;
            for (f, p) in &st.config.faults {
                acc += p;
                if u < acc {
                    fault = Some(*f);
                    break;
                }
            }
        }
        let mut delay = Duration::ZERO;
        if service != Service::Emulator
            && applies(&st.config.latency_services)
            && (st.config.latency_ms > 0 || st.config.jitter_ms > 0)
        {
            let ms = st.config.latency_ms + (j * st.config.jitter_ms as f64) as u64;
            delay = Duration::from_millis(ms);
            st.stats.delayed += 1;
            st.stats.delay_ms_total += ms;
        }
        if let Some(f) = fault {
            *st.stats
                .faults
                .entry(service)
                .or_default()
                .entry(f)
                .or_default() += 1;
        }
        Decision { fault, delay, pick }
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut st) = self.state.lock() {
            f(&mut st.stats);
        }
    }

    fn stats(&self) -> Stats {
        self.state
            .lock()
            .map(|s| s.stats.clone())
            .unwrap_or_default()
    }

    fn config(&self) -> FaultConfig {
        self.state
            .lock()
            .map(|s| s.config.clone())
            .unwrap_or_default()
    }

    fn set_config(&self, config: FaultConfig) -> Result<(), ConfigError> {
        config.validate()?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| ConfigError("state lock poisoned".into()))?;
        if st.config.seed != config.seed {
            st.rng = fastrand::Rng::with_seed(config.seed);
        }
        st.config = config;
        Ok(())
    }
}

/// A running proxy. Dropping it stops it (the accept loop and every connection).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("upstream {0:?} is not an http://HOST:PORT URL")]
    Upstream(String),
    #[error("upstream {url}: {source}")]
    Resolve { url: String, source: std::io::Error },
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `upstream`
    /// (`http://HOST:PORT`).
    pub async fn start(
        upstream: &str,
        listen: SocketAddr,
        config: FaultConfig,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let host = upstream
            .strip_prefix("http://")
            .map(|h| h.trim_end_matches('/'))
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .ok_or_else(|| StartError::Upstream(upstream.to_owned()))?
            .to_owned();
        let upstream_addr = tokio::net::lookup_host(&host)
            .await
            .map_err(|source| StartError::Resolve {
                url: upstream.to_owned(),
                source,
            })?
            .next()
            .ok_or_else(|| StartError::Upstream(upstream.to_owned()))?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            upstream: upstream_addr,
            upstream_host: host,
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(config.seed),
                config,
                stats: Stats::default(),
            }),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `HOST:PORT` of the upstream.
    pub fn upstream(&self) -> &str {
        &self.shared.upstream_host
    }

    /// `http://127.0.0.1:PORT`: what clients use as their endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    pub fn config(&self) -> FaultConfig {
        self.shared.config()
    }

    /// Applies `config` to the requests that follow.
    pub fn set_config(&self, config: FaultConfig) -> Result<(), ConfigError> {
        self.shared.set_config(config)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owned here: when the proxy is dropped this task is aborted and the set aborts every
    // connection task with it.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing_free_log(&format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        conns.spawn(async move {
            let _permit = permit;
            serve(sock, &shared).await;
        });
    }
}

/// The testkit has no logging framework: errors of the proxy itself go to stderr.
fn tracing_free_log(msg: &str) {
    eprintln!("faultproxy: {msg}");
}

/// One parsed HTTP/1.1 message: the head exactly as received, and the body as received
/// (with its chunked framing, if any).
#[derive(Debug, Default)]
struct Message {
    head: Vec<u8>,
    /// Request line: method and target (empty for a response).
    method: String,
    target: String,
    headers: Headers,
    body: Vec<u8>,
    /// A response without length that ends when the connection closes.
    close_delimited: bool,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("connection closed")]
    Closed,
    #[error("malformed HTTP: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads a head up to the blank line. `Ok(None)` at a clean EOF before any byte.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, HttpError> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(HttpError::Closed)
            };
        }
        if head.len() > MAX_HEAD {
            return Err(HttpError::Malformed("head too large"));
        }
        if head == b"\r\n" || head == b"\n" {
            // Stray line breaks between messages are allowed: skip them.
            head.clear();
            continue;
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(Some(head));
        }
    }
}

/// Header names and values, in order.
type Headers = Vec<(String, String)>;

/// The first two words of the start line (method and target, or version and status) and
/// the headers.
fn parse_head(head: &[u8]) -> Result<(String, String, Headers), HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("head not UTF-8"))?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let first = lines.next().ok_or(HttpError::Malformed("empty head"))?;
    let mut parts = first.splitn(3, ' ');
    let a = parts.next().unwrap_or_default().to_owned();
    let b = parts.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    Ok((a, b, headers))
}

/// Reads a chunked body, keeping its framing, into `out`.
async fn read_chunked<R: AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<(), HttpError> {
    loop {
        let start = out.len();
        if r.read_until(b'\n', out).await? == 0 {
            return Err(HttpError::Closed);
        }
        let line = std::str::from_utf8(&out[start..])
            .map_err(|_| HttpError::Malformed("chunk size"))?
            .trim();
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Malformed("chunk size"))?;
        if out.len() + size > MAX_BODY {
            return Err(HttpError::Malformed("body too large"));
        }
        if size == 0 {
            // Trailers up to the blank line.
            loop {
                let s = out.len();
                if r.read_until(b'\n', out).await? == 0 {
                    return Err(HttpError::Closed);
                }
                if &out[s..] == b"\r\n" || &out[s..] == b"\n" {
                    return Ok(());
                }
            }
        }
        let s = out.len();
        out.resize(s + size, 0);
        r.read_exact(&mut out[s..]).await?;
        let s = out.len();
        if r.read_until(b'\n', out).await? == 0 {
            return Err(HttpError::Closed);
        }
        if out[s..].iter().any(|b| !matches!(b, b'\r' | b'\n')) {
            return Err(HttpError::Malformed("chunk not followed by CRLF"));
        }
    }
}

async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    m: &mut Message,
    until_close: bool,
) -> Result<(), HttpError> {
    let chunked = m
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked(r, &mut m.body).await;
    }
    if let Some(len) = m.header("content-length") {
        let n: usize = len
            .parse()
            .map_err(|_| HttpError::Malformed("content-length"))?;
        if n > MAX_BODY {
            return Err(HttpError::Malformed("body too large"));
        }
        m.body.resize(n, 0);
        r.read_exact(&mut m.body).await?;
        return Ok(());
    }
    if until_close {
        m.close_delimited = true;
        r.take(MAX_BODY as u64).read_to_end(&mut m.body).await?;
    }
    Ok(())
}

async fn read_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Message>, HttpError> {
    let Some(head) = read_head(r).await? else {
        return Ok(None);
    };
    let (method, target, headers) = parse_head(&head)?;
    Ok(Some(Message {
        head,
        method,
        target,
        headers,
        ..Message::default()
    }))
}

/// Reads the body of a request whose head is already parsed.
async fn read_request_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    m: &mut Message,
) -> Result<(), HttpError> {
    read_body(r, m, false).await
}

/// Reads one final response (1xx interim answers are skipped) for a request with
/// `method`.
async fn read_response<R: AsyncBufRead + Unpin>(
    r: &mut R,
    method: &str,
) -> Result<Message, HttpError> {
    loop {
        let head = read_head(r).await?.ok_or(HttpError::Closed)?;
        let (_, code, headers) = parse_head(&head)?;
        let status: u16 = code.parse().map_err(|_| HttpError::Malformed("status"))?;
        let mut m = Message {
            head,
            headers,
            ..Message::default()
        };
        if (100..200).contains(&status) {
            continue;
        }
        if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
            return Ok(m);
        }
        read_body(r, &mut m, true).await?;
        return Ok(m);
    }
}

/// Which service a request is for.
fn classify(m: &Message) -> Service {
    if m.target.starts_with("/moto-api") {
        return Service::Emulator;
    }
    let scope = m
        .header("authorization")
        .and_then(|a| a.split("Credential=").nth(1))
        .map(str::to_owned)
        .or_else(|| {
            m.target
                .split_once('?')
                .and_then(|(_, q)| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("X-Amz-Credential="))
                })
                .map(|v| v.replace("%2F", "/").replace("%2f", "/"))
        });
    if let Some(scope) = scope {
        // KEY/DATE/REGION/SERVICE/aws4_request
        let service = scope
            .split(['/', ',', ' '])
            .nth(3)
            .unwrap_or_default()
            .to_ascii_lowercase();
        return match service.as_str() {
            "sqs" => Service::Sqs,
            "dynamodb" => Service::Dynamodb,
            "s3" => Service::S3,
            "ssm" => Service::Ssm,
            _ => Service::Other,
        };
    }
    if let Some(t) = m.header("x-amz-target") {
        return if t.starts_with("AmazonSQS") {
            Service::Sqs
        } else if t.starts_with("DynamoDB") {
            Service::Dynamodb
        } else if t.starts_with("AmazonSSM") {
            Service::Ssm
        } else {
            Service::Other
        };
    }
    if m.body.starts_with(b"Action=") || m.target.contains("Action=") {
        return Service::Sqs;
    }
    Service::S3
}

/// Whether an SQS request uses the query protocol (form body, XML answers).
fn is_query(m: &Message) -> bool {
    m.header("content-type")
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
}

/// The error answer a real service gives for `fault`, as raw bytes.
fn error_response(service: Service, fault: Fault, req: &Message, rng_pick: bool) -> Vec<u8> {
    let request_id = ulid::Ulid::new().to_string();
    let (status, reason) = match fault {
        Fault::Throttle if service == Service::S3 => (503, "Service Unavailable"),
        Fault::Throttle => (400, "Bad Request"),
        Fault::TooManyRequests => (429, "Too Many Requests"),
        Fault::Internal => (500, "Internal Server Error"),
        Fault::Unavailable | Fault::DropBefore | Fault::DropAfter => (503, "Service Unavailable"),
    };
    let throttled = matches!(fault, Fault::Throttle | Fault::TooManyRequests);
    let (content_type, body, extra): (&str, String, Vec<(String, String)>) = match service {
        Service::S3 => {
            let code = match fault {
                _ if throttled => "SlowDown",
                Fault::Internal => "InternalError",
                _ => "ServiceUnavailable",
            };
            let message = match code {
                "SlowDown" => "Please reduce your request rate.",
                "InternalError" => "We encountered an internal error. Please try again.",
                _ => "Service is unable to handle request.",
            };
            (
                "application/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
                ),
                vec![("x-amz-request-id".into(), request_id.clone())],
            )
        }
        Service::Sqs if is_query(req) => {
            let (code, ty) = match fault {
                _ if throttled => ("RequestThrottled", "Sender"),
                Fault::Internal => ("InternalError", "Receiver"),
                _ => ("ServiceUnavailable", "Receiver"),
            };
            (
                "text/xml",
                format!(
                    "<?xml version=\"1.0\"?><ErrorResponse xmlns=\"http://queue.amazonaws.com/doc/2012-11-05/\"><Error><Type>{ty}</Type><Code>{code}</Code><Message>injected by faultproxy</Message><Detail/></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
                ),
                vec![("x-amzn-RequestId".into(), request_id.clone())],
            )
        }
        _ => {
            let (namespace, code) = match (service, fault) {
                (Service::Sqs, _) if throttled => ("com.amazonaws.sqs", "RequestThrottled"),
                (Service::Sqs, Fault::Internal) => ("com.amazonaws.sqs", "InternalError"),
                (Service::Sqs, _) => ("com.amazonaws.sqs", "ServiceUnavailable"),
                (Service::Dynamodb, _) if throttled => (
                    "com.amazonaws.dynamodb.v20120810",
                    if rng_pick {
                        "ThrottlingException"
                    } else {
                        "ProvisionedThroughputExceededException"
                    },
                ),
                (Service::Dynamodb, Fault::Internal) => {
                    ("com.amazonaws.dynamodb.v20120810", "InternalServerError")
                }
                (Service::Dynamodb, _) => {
                    ("com.amazonaws.dynamodb.v20120810", "ServiceUnavailable")
                }
                (_, _) if throttled => ("", "ThrottlingException"),
                (_, Fault::Internal) => ("", "InternalServerError"),
                _ => ("", "ServiceUnavailable"),
            };
            let ty = if namespace.is_empty() {
                code.to_owned()
            } else {
                format!("{namespace}#{code}")
            };
            let mut extra = vec![("x-amzn-RequestId".to_owned(), request_id.clone())];
            if service == Service::Sqs {
                // SQS' JSON protocol is query-compatible: the SDK reads the code from here.
                let fault_side = if throttled { "Sender" } else { "Receiver" };
                extra.push(("x-amzn-query-error".into(), format!("{code};{fault_side}")));
            }
            (
                "application/x-amz-json-1.0",
                serde_json::json!({"__type": ty, "message": "injected by faultproxy"}).to_string(),
                extra,
            )
        }
    };
    let head_only = req.method.eq_ignore_ascii_case("HEAD");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n");
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if throttled || matches!(fault, Fault::Unavailable) {
        out.push_str("Retry-After: 1\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if req.wants_close() {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}

fn simple_response(status: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `/__faultproxy/...`: the proxy's own API.
fn control(shared: &Shared, req: &Message) -> Vec<u8> {
    let path = req.target.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/__faultproxy/stats") => simple_response(
            200,
            "OK",
            "application/json",
            &serde_json::to_string(&shared.stats()).unwrap_or_default(),
        ),
        ("GET", "/__faultproxy/config") => simple_response(
            200,
            "OK",
            "application/json",
            &serde_json::to_string(&shared.config()).unwrap_or_default(),
        ),
        ("PUT" | "POST", "/__faultproxy/config") => {
            let parsed: Result<FaultConfig, String> =
                serde_json::from_slice(&req.body).map_err(|e| format!("body: {e}"));
            match parsed.and_then(|c| shared.set_config(c).map_err(|e| e.to_string())) {
                Ok(()) => simple_response(
                    200,
                    "OK",
                    "application/json",
                    &serde_json::to_string(&shared.config()).unwrap_or_default(),
                ),
                Err(e) => simple_response(
                    400,
                    "Bad Request",
                    "application/json",
                    &serde_json::json!({"error": e}).to_string(),
                ),
            }
        }
        _ => simple_response(
            404,
            "Not Found",
            "application/json",
            r#"{"error":"use GET /__faultproxy/stats, GET or PUT /__faultproxy/config"}"#,
        ),
    }
}

/// The head without `Expect:` (the proxy answered it already).
fn head_without_expect(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|b| *b == b'\n') {
        let is_expect = line.len() >= 7 && line[..7].eq_ignore_ascii_case(b"expect:");
        if !is_expect {
            out.extend_from_slice(line);
        }
    }
    out
}

async fn serve(client: TcpStream, shared: &Shared) {
    let (cr, mut cw) = client.into_split();
    let mut cr = BufReader::new(cr);
    let mut upstream: Option<BufReader<TcpStream>> = None;
    loop {
        let mut req = match read_request(&mut cr).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        if req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            if cw
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            req.head = head_without_expect(&req.head);
        }
        if read_request_body(&mut cr, &mut req).await.is_err() {
            return;
        }
        if req.target.starts_with("/__faultproxy/") {
            if cw.write_all(&control(shared, &req)).await.is_err() {
                return;
            }
            if req.wants_close() {
                let _ = cw.shutdown().await;
                return;
            }
            continue;
        }
        let service = classify(&req);
        let decision = shared.decide(service);
        if !decision.delay.is_zero() {
            tokio::time::sleep(decision.delay).await;
        }
        match decision.fault {
            Some(Fault::DropBefore) => return,
            Some(
                f @ (Fault::Throttle
                | Fault::TooManyRequests
                | Fault::Internal
                | Fault::Unavailable),
            ) => {
                if cw
                    .write_all(&error_response(service, f, &req, decision.pick))
                    .await
                    .is_err()
                {
                    return;
                }
                if req.wants_close() {
                    let _ = cw.shutdown().await;
                    return;
                }
                continue;
            }
            Some(Fault::DropAfter) | None => {}
        }
        let resp = match forward(shared, &mut upstream, &req).await {
            Ok(r) => r,
            Err(e) => {
                shared.count(|s| s.upstream_errors += 1);
                tracing_free_log(&format!(
                    "upstream {} {}: {e}",
                    req.method,
                    req.target.chars().take(120).collect::<String>()
                ));
                return;
            }
        };
        if decision.fault == Some(Fault::DropAfter) {
            return;
        }
        shared.count(|s| s.forwarded += 1);
        if cw.write_all(&resp.head).await.is_err() || cw.write_all(&resp.body).await.is_err() {
            return;
        }
        if resp.close_delimited || resp.wants_close() || req.wants_close() {
            let _ = cw.shutdown().await;
            return;
        }
    }
}

/// Sends `req` upstream (reconnecting once if a kept-alive connection went stale) and
/// reads the answer.
async fn forward(
    shared: &Shared,
    upstream: &mut Option<BufReader<TcpStream>>,
    req: &Message,
) -> Result<Message, HttpError> {
    for fresh in [false, true] {
        if fresh || upstream.is_none() {
            let s = TcpStream::connect(shared.upstream).await?;
            let _ = s.set_nodelay(true);
            *upstream = Some(BufReader::new(s));
        }
        let Some(conn) = upstream.as_mut() else {
            continue;
        };
        let sent = async {
            conn.get_mut().write_all(&req.head).await?;
            conn.get_mut().write_all(&req.body).await?;
            Ok::<_, std::io::Error>(())
        }
        .await;
        let result = match sent {
            Ok(()) => read_response(conn, &req.method).await,
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(resp) => {
                if resp.close_delimited || resp.wants_close() {
                    *upstream = None;
                }
                return Ok(resp);
            }
            // A kept-alive connection the upstream closed meanwhile: retry once on a new
            // one (the request never reached the application).
            Err(HttpError::Closed) if !fresh => {
                *upstream = None;
                continue;
            }
            Err(e) => {
                *upstream = None;
                return Err(e);
            }
        }
    }
    Err(HttpError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(head: &str, body: &[u8]) -> Message {
        let (method, target, headers) = parse_head(head.as_bytes()).unwrap();
        Message {
            head: head.as_bytes().to_vec(),
            method,
            target,
            headers,
            body: body.to_vec(),
            ..Message::default()
        }
    }

    #[test]
    fn services_are_told_apart_by_the_request() {
        let auth = |svc: &str| {
            format!(
                "POST / HTTP/1.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/{svc}/aws4_request, SignedHeaders=host, Signature=x\r\n\r\n"
            )
        };
        assert_eq!(classify(&req(&auth("sqs"), b"")), Service::Sqs);
        assert_eq!(classify(&req(&auth("dynamodb"), b"")), Service::Dynamodb);
        assert_eq!(classify(&req(&auth("s3"), b"")), Service::S3);
        assert_eq!(classify(&req(&auth("ssm"), b"")), Service::Ssm);
        assert_eq!(classify(&req(&auth("sts"), b"")), Service::Other);
        assert_eq!(
            classify(&req(
                "POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.PutItem\r\n\r\n",
                b"{}"
            )),
            Service::Dynamodb
        );
        assert_eq!(
            classify(&req(
                "POST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n",
                b"Action=SendMessage&QueueUrl=x"
            )),
            Service::Sqs
        );
        assert_eq!(
            classify(&req(
                "GET /bucket/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=test%2F20250101%2Fus-east-1%2Fs3%2Faws4_request HTTP/1.1\r\n\r\n",
                b""
            )),
            Service::S3
        );
        assert_eq!(
            classify(&req("PUT /bucket/key HTTP/1.1\r\n\r\n", b"data")),
            Service::S3
        );
        assert_eq!(
            classify(&req("POST /moto-api/reset HTTP/1.1\r\n\r\n", b"")),
            Service::Emulator
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_decisions() {
        let shared = |seed| Shared {
            upstream: "127.0.0.1:1".parse().unwrap(),
            upstream_host: "127.0.0.1:1".into(),
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(seed),
                config: FaultConfig {
                    latency_ms: 5,
                    jitter_ms: 10,
                    latency_services: vec![Service::S3],
                    ..FaultConfig::uniform(0.3, seed)
                },
                stats: Stats::default(),
            }),
        };
        let services = [Service::Sqs, Service::S3, Service::Dynamodb, Service::Ssm];
        let run =
            |s: &Shared| -> Vec<Decision> { (0..500).map(|i| s.decide(services[i % 4])).collect() };
        let (a, b, c) = (shared(7), shared(7), shared(8));
        let (da, db, dc) = (run(&a), run(&b), run(&c));
        assert_eq!(da, db);
        assert_ne!(da, dc);
        let faults = da.iter().filter(|d| d.fault.is_some()).count();
        assert!((90..=210).contains(&faults), "{faults} of 500 at 30 %");
        // Latency only on S3, within fixed + jitter.
        for (i, d) in da.iter().enumerate() {
            if services[i % 4] == Service::S3 {
                assert!(d.delay >= Duration::from_millis(5) && d.delay < Duration::from_millis(15));
            } else {
                assert_eq!(d.delay, Duration::ZERO);
            }
        }
        let st = a.stats();
        assert_eq!(st.total_requests(), 500);
        assert_eq!(st.total_faults() as usize, faults);
        assert_eq!(st.delayed, 125);
    }

    #[test]
    fn the_emulator_api_and_unlisted_services_are_never_faulted() {
        let s = Shared {
            upstream: "127.0.0.1:1".parse().unwrap(),
            upstream_host: "127.0.0.1:1".into(),
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(1),
                config: FaultConfig {
                    fault_services: vec![Service::S3],
                    ..FaultConfig::only(Fault::Internal, 1.0, 1)
                },
                stats: Stats::default(),
            }),
        };
        assert_eq!(s.decide(Service::Emulator).fault, None);
        assert_eq!(s.decide(Service::Sqs).fault, None);
        assert_eq!(s.decide(Service::S3).fault, Some(Fault::Internal));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = FaultConfig::only(Fault::Throttle, 1.5, 1);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("faults.throttle")
        );
        c = FaultConfig::uniform(1.2, 1);
        assert!(c.validate().unwrap_err().to_string().contains("add up"));
        let parsed: Result<FaultConfig, _> = serde_json::from_str(r#"{"fault_rate": 0.1}"#);
        assert!(parsed.is_err(), "unknown fields are refused");
        let parsed: FaultConfig =
            serde_json::from_str(r#"{"faults": {"drop_after": 0.1}, "latency_services": ["s3"]}"#)
                .unwrap();
        assert_eq!(parsed.faults[&Fault::DropAfter], 0.1);
    }

    #[test]
    fn the_expect_header_is_removed_and_nothing_else() {
        let head =
            b"PUT /b/k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            head_without_expect(head),
            b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn chunked_bodies_keep_their_framing() {
        let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut r = BufReader::new(&raw[..]);
        let mut out = Vec::new();
        read_chunked(&mut r, &mut out).await.unwrap();
        assert_eq!(out, &raw[..raw.len() - 4]);
        let mut rest = String::new();
        r.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "NEXT");
    }
}
