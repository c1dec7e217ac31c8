//! The HTTP front end: the Amazon Bedrock AgentCore Runtime service contract (HTTP
//! protocol) over the same handler as the Lambda and poll front ends.
//!
//! - `POST /invocations` takes an SQS event (`{"Records": [...]}`, as the event source
//!   mapping delivers it) or a bare job spec (wrapped into a one-record event) and
//!   answers with the partial batch response plus each job's id and state. In `async`
//!   mode it answers `202` once the payload is accepted and runs it in the background.
//! - `GET /ping` answers `{"status": "Healthy" | "HealthyBusy", "time_of_last_update": <epoch s>}`:
//!   busy while an invocation runs, and the time of the last change between the two.
//!
//! Everything is bounded: invocations at once (`503` beyond), request body size (`413`)
//! and read time (`408`), header read time, open connections. The shutdown token
//! (SIGTERM) stops accepting, stops running children the way a deadline does (their logs
//! and results are still uploaded) and drains within a bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentq_core::JobId;
use agentq_core::layout::msg_attr;
use agentq_core::payload::PayloadPointer;
use agentq_core::spec::{JobSpec, SpecViolation, ValidationContext};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::AgentConfigError;
use crate::{Deps, Invocation, handle_batch};

/// The session header AgentCore Runtime sets on every invocation (33-256 characters).
pub const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";
/// The request id header AgentCore Runtime sets (used as the lease owner's prefix).
pub const REQUEST_ID_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-request-id";
/// AgentCore Runtime's longest asynchronous job and session lifetime (`maxLifetime`):
/// 8 hours.
pub const AGENTCORE_MAX_SECONDS: u64 = 8 * 3600;
/// Records accepted in one SQS event (the most one ReceiveMessage returns).
pub const MAX_RECORDS: usize = 10;
/// Longest header value echoed into logs and responses.
const MAX_ID_CHARS: usize = 256;

/// When `POST /invocations` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InvocationMode {
    /// When the jobs have finished: the answer carries the batch response and the final
    /// states (AgentCore cuts synchronous requests at 15 minutes; the jobs go on).
    Sync,
    /// At once (`202`), after the payload was checked; the jobs run in the background
    /// while `/ping` says `HealthyBusy` (AgentCore allows 8 hours). Acknowledged SQS
    /// messages with a receipt handle are deleted by the agent itself.
    Async,
}

/// `agentq-agent serve` settings, as given on the command line or in the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (AgentCore Runtime connects to 0.0.0.0:8080).
    #[arg(long, env = "AGENTQ_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// `sync`: answer when the jobs have finished; `async`: answer 202 once accepted and
    /// run in the background (use it for jobs longer than AgentCore's 15-minute
    /// synchronous request limit).
    #[arg(long, env = "AGENTQ_INVOCATION_MODE", value_enum, default_value_t = InvocationMode::Sync)]
    pub invocation_mode: InvocationMode,
    /// Time one invocation may run: the handler's deadline, as a Lambda function's
    /// timeout would be (children are stopped the reserve before it). Default: 8 h, the
    /// AgentCore Runtime maximum.
    #[arg(long, env = "AGENTQ_INVOCATION_TIMEOUT_SECONDS", default_value_t = AGENTCORE_MAX_SECONDS)]
    pub invocation_timeout_seconds: u64,
    /// Invocations handled at once; more are refused with 503 (default: the agent's
    /// AGENTQ_MAX_CONCURRENT_JOBS).
    #[arg(long, env = "AGENTQ_MAX_CONCURRENT_INVOCATIONS")]
    pub max_concurrent_invocations: Option<usize>,
    /// Largest request body accepted, in bytes (an SQS event of ten 1 MiB messages fits).
    #[arg(long, env = "AGENTQ_MAX_REQUEST_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Time allowed to receive a request's headers, and then its body.
    #[arg(
        long,
        env = "AGENTQ_REQUEST_READ_TIMEOUT_SECONDS",
        default_value_t = 30.0
    )]
    pub request_read_timeout_seconds: f64,
    /// Open connections at once; more are closed at accept.
    #[arg(long, env = "AGENTQ_MAX_CONNECTIONS", default_value_t = 64)]
    pub max_connections: usize,
}

/// Validated server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub mode: InvocationMode,
    pub invocation_timeout: Duration,
    pub max_invocations: usize,
    pub max_request_bytes: usize,
    pub read_timeout: Duration,
    pub max_connections: usize,
    /// Upper bound for the drain after shutdown.
    pub drain_timeout: Duration,
}

impl ServeOptions {
    /// Checks `a` against the agent's own settings (the invocation must leave room for
    /// the deadline reserve, or no job could ever start).
    pub fn from_args(a: &ServeArgs, config: &crate::AgentConfig) -> Result<Self, AgentConfigError> {
        let invocation_timeout = Duration::from_secs(a.invocation_timeout_seconds);
        if invocation_timeout <= config.reserve * 2 || a.invocation_timeout_seconds > 12 * 3600 {
            return Err(AgentConfigError {
                setting: "AGENTQ_INVOCATION_TIMEOUT_SECONDS",
                why: format!(
                    "{} must be longer than twice AGENTQ_DEADLINE_RESERVE_SECONDS ({} s) and at most 43200",
                    a.invocation_timeout_seconds,
                    config.reserve.as_secs_f64()
                ),
            });
        }
        let max_invocations = a
            .max_concurrent_invocations
            .unwrap_or(config.max_concurrent_jobs);
        if !(1..=1000).contains(&max_invocations) {
            return Err(AgentConfigError {
                setting: "AGENTQ_MAX_CONCURRENT_INVOCATIONS",
                why: format!("{max_invocations} is outside 1..=1000"),
            });
        }
        if !(1024..=128 * 1024 * 1024).contains(&a.max_request_bytes) {
            return Err(AgentConfigError {
                setting: "AGENTQ_MAX_REQUEST_BYTES",
                why: format!(
                    "{} is outside 1024..=134217728 (AgentCore's own limit is 100 MB)",
                    a.max_request_bytes
                ),
            });
        }
        let t = a.request_read_timeout_seconds;
        if !(t.is_finite() && (0.1..=600.0).contains(&t)) {
            return Err(AgentConfigError {
                setting: "AGENTQ_REQUEST_READ_TIMEOUT_SECONDS",
                why: format!("{t} is out of range: use 0.1..=600 seconds"),
            });
        }
        if !(1..=10_000).contains(&a.max_connections) {
            return Err(AgentConfigError {
                setting: "AGENTQ_MAX_CONNECTIONS",
                why: format!("{} is outside 1..=10000", a.max_connections),
            });
        }
        Ok(Self {
            mode: a.invocation_mode,
            invocation_timeout,
            max_invocations,
            max_request_bytes: a.max_request_bytes,
            read_timeout: Duration::from_secs_f64(t),
            max_connections: a.max_connections,
            drain_timeout: config.reserve + config.grace + Duration::from_secs(5),
        })
    }
}

/// `/ping`'s state: invocations running, and when the status last changed.
#[derive(Debug)]
struct Health {
    running: AtomicUsize,
    changed_at: AtomicU64,
}

fn epoch_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Health {
    fn new() -> Self {
        Self {
            running: AtomicUsize::new(0),
            changed_at: AtomicU64::new(epoch_seconds()),
        }
    }

    fn enter(self: &Arc<Self>) -> BusyGuard {
        if self.running.fetch_add(1, Ordering::SeqCst) == 0 {
            self.changed_at.store(epoch_seconds(), Ordering::SeqCst);
        }
        BusyGuard(self.clone())
    }
}

/// One running invocation; `/ping` says `HealthyBusy` while any exists.
#[derive(Debug)]
struct BusyGuard(Arc<Health>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.changed_at.store(epoch_seconds(), Ordering::SeqCst);
        }
    }
}

#[derive(Debug)]
struct Server {
    deps: Arc<Deps>,
    opts: ServeOptions,
    health: Arc<Health>,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Serves on `listener` until `shutdown`, then drains (bounded by the options' drain
/// timeout): running invocations see the same token and stop their children.
pub async fn run(
    deps: Arc<Deps>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let conns = Arc::new(Semaphore::new(opts.max_connections));
    let read_timeout = opts.read_timeout;
    let drain_timeout = opts.drain_timeout;
    let server = Arc::new(Server {
        slots: Arc::new(Semaphore::new(opts.max_invocations)),
        deps,
        opts,
        health: Arc::new(Health::new()),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    let app = router(server.clone());
    tracing::info!(addr = %listener.local_addr()?, mode = ?server.opts.mode, "serving the AgentCore Runtime contract");
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing the new connection");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    // Finish the request in flight (its job sees the same token), then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down; draining invocations");
    server.tasks.close();
    connections.close();
    let drain = async {
        server.tasks.wait().await;
        connections.wait().await;
    };
    if tokio::time::timeout(drain_timeout, drain).await.is_err() {
        tracing::error!("drain timed out; abandoning in-flight invocations");
    }
    Ok(())
}

fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/invocations", post(invocations))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such path: use POST /invocations or GET /ping".into(),
            )
        })
        .with_state(server)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    json_response(status, &json!({ "error": message }))
}

async fn ping(State(s): State<Arc<Server>>) -> Response {
    let status = if s.health.running.load(Ordering::SeqCst) > 0 {
        "HealthyBusy"
    } else {
        "Healthy"
    };
    json_response(
        StatusCode::OK,
        &json!({
            "status": status,
            "time_of_last_update": s.health.changed_at.load(Ordering::SeqCst),
        }),
    )
}

/// A header as printable ASCII, at most [`MAX_ID_CHARS`] characters.
fn header_id(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| {
        v.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(MAX_ID_CHARS)
            .collect()
    })
}

/// One job of an invocation, as the answer reports it.
#[derive(Debug, Clone, Serialize)]
struct JobRef {
    message_id: String,
    /// `None` for an offloaded body whose message carries no `agentq-job-id` attribute.
    job_id: Option<JobId>,
}

/// Why a payload was refused: the field and the fix.
#[derive(Debug)]
struct BadPayload {
    field: String,
    /// The whole message (it names the field).
    message: String,
    violations: Vec<SpecViolation>,
}

impl BadPayload {
    fn new(field: impl Into<String>, why: impl std::fmt::Display) -> Self {
        let field = field.into();
        Self {
            message: format!("{field}: {why}"),
            field,
            violations: Vec::new(),
        }
    }

    fn response(&self) -> Response {
        let mut body = json!({
            "error": self.message,
            "field": self.field,
        });
        if !self.violations.is_empty() {
            body["violations"] = json!(self.violations);
        }
        json_response(StatusCode::BAD_REQUEST, &body)
    }
}

/// The job id a message names: the `agentq-job-id` attribute, else the body's `job_id`.
fn job_id_of(m: &SqsMessage) -> Option<JobId> {
    m.message_attributes
        .get(msg_attr::JOB_ID)
        .and_then(|a| a.string_value.as_deref())
        .and_then(|s| JobId::parse(s).ok())
        .or_else(|| {
            let v: Value = serde_json::from_str(m.body.as_deref()?).ok()?;
            JobId::parse(v.get("job_id")?.as_str()?).ok()
        })
}

/// Turns a request body into the event the handler takes: an SQS event as it is, or a
/// bare spec (checked like `agentq submit` checks it, and given its job id if it has
/// none) or an SQS Extended Client pointer wrapped into a one-record event.
fn parse_payload(
    bytes: &[u8],
    ctx: &ValidationContext,
) -> Result<(SqsEvent, Vec<JobRef>), BadPayload> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| BadPayload::new("body", "is not UTF-8 JSON"))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        BadPayload::new(
            "body",
            format!("is not JSON ({e}); send a job spec or an SQS event {{\"Records\": [...]}}"),
        )
    })?;
    if value.get("Records").is_some() {
        return sqs_event(value);
    }
    let wrap = |body: String, job_id: Option<JobId>| {
        let mut m = SqsMessage::default();
        let message_id = format!("http-{}", ulid::Ulid::new());
        m.message_id = Some(message_id.clone());
        m.body = Some(body);
        let mut event = SqsEvent::default();
        event.records.push(m);
        (event, vec![JobRef { message_id, job_id }])
    };
    if PayloadPointer::parse(text).is_some() {
        return Ok(wrap(text.to_owned(), None));
    }
    let valid = JobSpec::parse_valid(bytes, ctx).map_err(|e| {
        let violations = e.violations();
        BadPayload {
            field: violations
                .first()
                .map_or_else(|| "body".to_owned(), |v| v.field.clone()),
            message: e.to_string(),
            violations,
        }
    })?;
    // The spec as validated, with its job id filled in, so the answer can name it.
    Ok(wrap(valid.to_json(), Some(valid.job_id)))
}

fn sqs_event(value: Value) -> Result<(SqsEvent, Vec<JobRef>), BadPayload> {
    let records = value
        .get("Records")
        .and_then(Value::as_array)
        .ok_or_else(|| BadPayload::new("Records", "must be an array of SQS messages"))?;
    if records.is_empty() {
        return Err(BadPayload::new(
            "Records",
            "is empty: send at least one message",
        ));
    }
    if records.len() > MAX_RECORDS {
        return Err(BadPayload::new(
            "Records",
            format!(
                "holds {} messages; send at most {MAX_RECORDS} per invocation",
                records.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, r) in records.iter().enumerate() {
        let field = |k: &str| format!("Records[{i}].{k}");
        let Some(obj) = r.as_object() else {
            return Err(BadPayload::new(
                format!("Records[{i}]"),
                "must be an object (an SQS message as the event source mapping delivers it)",
            ));
        };
        match obj.get("messageId").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => {
                if !seen.insert(id.to_owned()) {
                    return Err(BadPayload::new(
                        field("messageId"),
                        format!("{id:?} appears twice; every message needs its own id"),
                    ));
                }
            }
            _ => {
                return Err(BadPayload::new(
                    field("messageId"),
                    "is missing: every message needs a non-empty id (the batch response names failures by it)",
                ));
            }
        }
        if !obj.get("body").is_some_and(Value::is_string) {
            return Err(BadPayload::new(
                field("body"),
                "is missing: the job spec (or an Extended Client pointer) as a JSON string",
            ));
        }
    }
    let event: SqsEvent = serde_json::from_value(value)
        .map_err(|e| BadPayload::new("Records", format!("is not an SQS event: {e}")))?;
    let jobs = event
        .records
        .iter()
        .map(|m| JobRef {
            message_id: m.message_id.clone().unwrap_or_default(),
            job_id: job_id_of(m),
        })
        .collect();
    Ok((event, jobs))
}

/// Reads the body within the size and time limits.
async fn read_body(s: &Server, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Response> {
    let max = s.opts.max_request_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {max} bytes (AGENTQ_MAX_REQUEST_BYTES); offload big specs to S3 with a payload pointer"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(s.opts.read_timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                s.opts.read_timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("the request body could not be read: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes().to_vec()),
    }
}

async fn invocations(State(s): State<Arc<Server>>, headers: HeaderMap, body: Body) -> Response {
    let session = header_id(&headers, SESSION_HEADER);
    let request_id = header_id(&headers, REQUEST_ID_HEADER)
        .unwrap_or_else(|| format!("http-{}", ulid::Ulid::new()));
    let span = tracing::info_span!("invocation", %request_id, session_id = session.as_deref().unwrap_or("-"));
    async move {
        if s.shutdown.is_cancelled() {
            return unavailable("shutting down".into());
        }
        let bytes = match read_body(&s, &headers, body).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let (event, jobs) = match parse_payload(&bytes, &s.deps.settings.validation()) {
            Ok(x) => x,
            Err(bad) => {
                tracing::info!(field = %bad.field, "payload refused");
                return bad.response();
            }
        };
        let Ok(slot) = s.slots.clone().try_acquire_owned() else {
            return unavailable(format!(
                "busy: {} invocation(s) running (AGENTQ_MAX_CONCURRENT_INVOCATIONS); retry later",
                s.opts.max_invocations
            ));
        };
        let inv = Invocation {
            request_id: format!("agentcore-{request_id}"),
            deadline: Instant::now() + s.opts.invocation_timeout,
        };
        let busy = s.health.enter();
        let (tx, rx) = oneshot::channel();
        let deps = s.deps.clone();
        let shutdown = s.shutdown.clone();
        let mode = s.opts.mode;
        // Detached from the request: a client that goes away does not stop its jobs.
        s.tasks.spawn(
            async move {
                let _slot = slot;
                let _busy = busy;
                let receipts = (mode == InvocationMode::Async).then(|| event.records.clone());
                let resp = handle_batch(&deps, event, &inv, &shutdown).await;
                if let Some(records) = receipts {
                    delete_acknowledged(&deps, &records, &resp).await;
                }
                let _ = tx.send(resp);
            }
            .in_current_span(),
        );
        match mode {
            InvocationMode::Async => json_response(
                StatusCode::ACCEPTED,
                &json!({
                    "status": "accepted",
                    "jobs": jobs,
                    "session_id": session,
                }),
            ),
            InvocationMode::Sync => match rx.await {
                Ok(resp) => {
                    let states = job_states(&s.deps, &jobs).await;
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "batchItemFailures": resp.batch_item_failures,
                            "jobs": states,
                            "session_id": session,
                        }),
                    )
                }
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the invocation ended without an answer (see the agent's log)".into(),
                ),
            },
        }
    }
    .instrument(span)
    .await
}

fn unavailable(message: String) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// Each job's state after the batch, read back from the table.
async fn job_states(deps: &Deps, jobs: &[JobRef]) -> Vec<Value> {
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        let mut v = json!({ "message_id": j.message_id, "job_id": j.job_id });
        if let Some(id) = &j.job_id {
            match deps.store.get(id).await {
                Ok(Some(rec)) => {
                    v["status"] = json!(rec.status);
                    v["attempt"] = json!(rec.attempt.get());
                    v["cause"] = json!(rec.cause);
                    v["reason"] = json!(rec.reason);
                }
                Ok(None) => v["status"] = Value::Null,
                Err(e) => v["error"] = json!(format!("could not read the job's record: {e}")),
            }
        }
        out.push(v);
    }
    out
}

/// `async` mode: nobody waits for the batch response, so the agent deletes the SQS
/// messages it acknowledged itself (as the event source mapping would); the others come
/// back after their visibility timeout.
async fn delete_acknowledged(deps: &Deps, records: &[SqsMessage], resp: &SqsBatchResponse) {
    for m in records {
        let (Some(id), Some(handle), Some(arn)) =
            (&m.message_id, &m.receipt_handle, &m.event_source_arn)
        else {
            continue;
        };
        if resp
            .batch_item_failures
            .iter()
            .any(|f| &f.item_identifier == id)
        {
            continue;
        }
        let Some(url) = deps.queue_url_for(arn).await else {
            tracing::warn!(message_id = %id, "queue of an acknowledged message not found; it will come back and be acknowledged then");
            continue;
        };
        if let Err(e) = deps
            .clients
            .sqs
            .delete_message()
            .queue_url(url)
            .receipt_handle(handle)
            .send()
            .await
        {
            tracing::warn!(message_id = %id, error = %agentq_core::aws::display(&e), "could not delete an acknowledged message; it will come back and be acknowledged then");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ValidationContext {
        ValidationContext {
            secrets_prefix: "/agentq/secrets/".into(),
        }
    }

    #[test]
    fn a_bare_spec_is_wrapped_with_its_job_id() {
        let (event, jobs) = parse_payload(
            br#"{"spec_version":1,"agent":"command","command":["true"]}"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(event.records.len(), 1);
        let id = jobs[0].job_id.clone().expect("a generated id");
        let body: Value = serde_json::from_str(event.records[0].body.as_deref().unwrap()).unwrap();
        assert_eq!(body["job_id"], id.as_str());
        assert_eq!(
            event.records[0].message_id.as_deref(),
            Some(jobs[0].message_id.as_str())
        );
    }

    #[test]
    fn bad_payloads_name_the_field() {
        let cases: [(&[u8], &str); 8] = [
            (b"not json", "body"),
            (br#"{"spec_version":1,"agent":"nope"}"#, "agent"),
            (
                br#"{"spec_version":1,"agent":"command","command":["true"],"secrets":{"K":"/elsewhere/k"}}"#,
                "secrets.K",
            ),
            (br#"{"Records": {}}"#, "Records"),
            (br#"{"Records": []}"#, "Records"),
            (br#"{"Records": [{"body": "{}"}]}"#, "Records[0].messageId"),
            (br#"{"Records": [{"messageId": "a"}]}"#, "Records[0].body"),
            (
                br#"{"Records": [{"messageId": "a", "body": "x"}, {"messageId": "a", "body": "y"}]}"#,
                "Records[1].messageId",
            ),
        ];
        for (payload, field) in cases {
            let bad = parse_payload(payload, &ctx()).unwrap_err();
            assert_eq!(bad.field, field, "{}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn an_sqs_event_keeps_its_records_and_names_their_jobs() {
        let body = r#"{"spec_version":1,"job_id":"j-1","agent":"command","command":["true"]}"#;
        let payload = json!({"Records": [
            {"messageId": "m1", "receiptHandle": "rh", "body": body,
             "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "attributes": {}, "messageAttributes": {}},
            {"messageId": "m2", "body": "[\"software.amazon.payloadoffloading.PayloadS3Pointer\",{\"s3BucketName\":\"b\",\"s3Key\":\"k\"}]"}
        ]});
        let (event, jobs) = parse_payload(payload.to_string().as_bytes(), &ctx()).unwrap();
        assert_eq!(event.records.len(), 2);
        assert_eq!(event.records[0].receipt_handle.as_deref(), Some("rh"));
        assert_eq!(jobs[0].job_id.as_ref().map(|j| j.as_str()), Some("j-1"));
        assert!(jobs[1].job_id.is_none());
    }

    #[test]
    fn busy_while_any_invocation_runs_and_the_time_moves_only_on_changes() {
        let h = Arc::new(Health::new());
        h.changed_at.store(1, Ordering::SeqCst);
        let a = h.enter();
        let t = h.changed_at.load(Ordering::SeqCst);
        assert!(t > 1);
        h.changed_at.store(2, Ordering::SeqCst);
        let b = h.enter();
        assert_eq!(h.changed_at.load(Ordering::SeqCst), 2, "already busy");
        drop(a);
        assert_eq!(h.running.load(Ordering::SeqCst), 1);
        assert_eq!(h.changed_at.load(Ordering::SeqCst), 2, "still busy");
        drop(b);
        assert_eq!(h.running.load(Ordering::SeqCst), 0);
        assert!(h.changed_at.load(Ordering::SeqCst) > 2);
    }
}
