//! Notifications on every job state change: a signed webhook and/or an EventBridge event.
//!
//! This module owns the event payload ([`JobEvent`], documented in docs/notifications.md),
//! the webhook signature (the [Standard Webhooks](https://www.standardwebhooks.com)
//! scheme: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`), and the delivery: [`Notifier::notify`] never waits — it
//! puts the event on a bounded queue that one background task delivers in order, each
//! delivery retried with exponential backoff and jitter. [`Notifier::drain`] waits for the
//! queue to empty, bounded by a deadline (a Lambda invocation drains before it returns:
//! the environment freezes after the response). Events that cannot be queued (full) or
//! delivered (retries spent) are dropped, counted and logged — never retried for ever, and
//! never holding a job up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::http::{HttpClient, redact_url};
use crate::record::{EpochMillis, Progress, now_ms};
use crate::state::JobState;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Header with the message id (the same on every retry: receivers deduplicate on it).
pub const HEADER_ID: &str = "webhook-id";
/// Header with the signing time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header with the signature(s): `v1,<base64>` (space-separated when several).
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The EventBridge `source` of agentq's events.
pub const EVENT_SOURCE: &str = "agentq";
/// The EventBridge `detail-type` of a job state change.
pub const DETAIL_TYPE: &str = "Job State Change";
/// Events waiting for delivery at most; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 256;

/// Who made the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    Producer,
    Agent,
    Dispatcher,
}

/// One job state change: the `data` of a webhook, the `detail` of an EventBridge event.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: String,
    /// The state the job is in now.
    pub state: Option<JobState>,
    /// The state it left, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<JobState>,
    /// When the change was written (epoch millis).
    pub at: EpochMillis,
    pub by: Option<Actor>,
    /// The attempt (0 before the first claim).
    pub attempt: u32,
    /// The resume segment (1 for the first).
    pub segment: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Failure cause kind (`agent_exit`, `timed_out`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The dispatcher's re-plan action (`retry`, `resume`, `escalate`, `fail`, `dead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<u64>,
    /// Progress of the attempt that ended (final states only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<EventProgress>,
    /// The attempt's run time (final states only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `result.json` of the attempt (final states only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_key: Option<String>,
    /// The job's trace, when traces are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// What an attempt reported (a subset of the record's progress).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EventProgress {
    pub turns: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

impl From<&Progress> for EventProgress {
    fn from(p: &Progress) -> Self {
        Self {
            turns: p.turns,
            input_tokens: p.input_tokens,
            output_tokens: p.output_tokens,
            cost_usd: p.cost_usd,
            session_id: p.session_id.clone(),
        }
    }
}

impl JobEvent {
    /// An event for `job` entering `state`, now, by `by`.
    pub fn new(job_id: &str, state: JobState, by: Actor) -> Self {
        Self {
            job_id: job_id.to_owned(),
            state: Some(state),
            at: now_ms(),
            by: Some(by),
            segment: 1,
            ..Self::default()
        }
    }

    /// `job.queued`, `job.running`, `job.succeeded`, `job.retry_scheduled`, …
    pub fn event_type(&self) -> String {
        format!(
            "job.{}",
            self.state
                .map(|s| s.as_str().to_ascii_lowercase())
                .unwrap_or_else(|| "unknown".into())
        )
    }

    /// The webhook body: `{"type", "timestamp", "data"}` (Standard Webhooks' shape).
    pub fn webhook_body(&self) -> String {
        serde_json::json!({
            "type": self.event_type(),
            "timestamp": crate::record::rfc3339(self.at),
            "data": self,
        })
        .to_string()
    }

    /// The EventBridge detail: the event's fields plus `type`.
    pub fn detail(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("type".into(), self.event_type().into());
        }
        v.to_string()
    }
}

/// A webhook signing secret: `whsec_` + base64 (the Standard Webhooks form, as its
/// libraries generate it) or, otherwise, the string's bytes.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// Shortest accepted secret, bytes.
pub const MIN_SECRET_BYTES: usize = 16;

impl WebhookSecret {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bytes = match s.strip_prefix("whsec_") {
            Some(b64) => BASE64
                .decode(b64)
                .map_err(|_| "a whsec_ secret must be followed by base64".to_owned())?,
            None => s.as_bytes().to_vec(),
        };
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret is {} bytes; use at least {MIN_SECRET_BYTES} (e.g. whsec_ + base64 of 32 random bytes: `echo whsec_$(openssl rand -base64 32)`)",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// `v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", BASE64.encode(tag))
    }

    /// Whether one of the space-separated `v1,` signatures in `header` is valid (constant
    /// time). Receivers also check that `timestamp` is recent (Standard Webhooks: 5 min).
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header.split_whitespace().any(|sig| {
            let Some(b64) = sig.strip_prefix("v1,") else {
                return false;
            };
            let Ok(tag) = BASE64.decode(b64) else {
                return false;
            };
            self.mac(id, timestamp, body).verify_slice(&tag).is_ok()
        })
    }
}

/// Where a webhook goes.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: Uri,
    pub secret: WebhookSecret,
}

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub webhook: Option<Webhook>,
    /// EventBridge bus name or ARN.
    pub event_bus: Option<String>,
    /// Tries per delivery (the first included).
    pub attempts: u32,
    /// Time allowed for one try.
    pub attempt_timeout: Duration,
    /// Delay before the second try; doubled for each next one (with jitter).
    pub first_backoff: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            webhook: None,
            event_bus: None,
            attempts: 5,
            attempt_timeout: Duration::from_secs(5),
            first_backoff: Duration::from_millis(250),
        }
    }
}

/// What a drain found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Events still queued or being delivered at the deadline.
    pub pending: usize,
    /// Deliveries given up since the notifier started.
    pub dropped: u64,
    pub delivered: u64,
}

#[derive(Debug)]
struct Shared {
    tx: mpsc::Sender<JobEvent>,
    /// Queued + being delivered.
    pending: AtomicUsize,
    idle: Notify,
    dropped: AtomicU64,
    delivered: AtomicU64,
}

/// Sends job events in the background. Cheap to clone; disabled it does nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    shared: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Sinks {
    http: HttpClient,
    webhook: Option<Webhook>,
    eventbridge: Option<(aws_sdk_eventbridge::Client, String)>,
    cfg: NotifyConfig,
}

impl Notifier {
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Starts the delivery task (needs a Tokio runtime). Disabled when the config names
    /// neither a webhook nor a bus.
    pub fn start(cfg: NotifyConfig, eventbridge: Option<aws_sdk_eventbridge::Client>) -> Self {
        if cfg.webhook.is_none() && cfg.event_bus.is_none() {
            return Self::disabled();
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            tx,
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        let sinks = Sinks {
            http: HttpClient::new(),
            webhook: cfg.webhook.clone(),
            eventbridge: match (eventbridge, &cfg.event_bus) {
                (Some(c), Some(bus)) => Some((c, bus.clone())),
                _ => None,
            },
            cfg,
        };
        // The task holds a weak reference: it ends when the last Notifier is dropped
        // (the channel closes with it).
        tokio::spawn(deliver_all(rx, sinks, Arc::downgrade(&shared)));
        Self {
            shared: Some(shared),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues an event; never waits. A full queue drops it (counted, logged).
    pub fn notify(&self, event: JobEvent) {
        let Some(s) = &self.shared else { return };
        s.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = s.tx.try_send(event) {
            s.pending.fetch_sub(1, Ordering::SeqCst);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            let ev = match &e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
            };
            tracing::warn!(job = %ev.job_id, event = %ev.event_type(), "notification dropped: the delivery queue is full");
        }
    }

    /// Waits until every queued event was delivered (or given up), or until `until`.
    pub async fn drain(&self, until: Instant) -> DrainReport {
        let Some(s) = &self.shared else {
            return DrainReport::default();
        };
        loop {
            let idle = s.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let pending = s.pending.load(Ordering::SeqCst);
            if pending == 0 {
                break;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                let pending = s.pending.load(Ordering::SeqCst);
                if pending > 0 {
                    tracing::warn!(
                        pending,
                        "notifications not delivered before the deadline; they are sent later if this process lives on, else lost"
                    );
                }
                break;
            }
        }
        self.report()
    }

    pub fn report(&self) -> DrainReport {
        match &self.shared {
            None => DrainReport::default(),
            Some(s) => DrainReport {
                pending: s.pending.load(Ordering::SeqCst),
                dropped: s.dropped.load(Ordering::Relaxed),
                delivered: s.delivered.load(Ordering::Relaxed),
            },
        }
    }
}

async fn deliver_all(
    mut rx: mpsc::Receiver<JobEvent>,
    sinks: Sinks,
    shared: std::sync::Weak<Shared>,
) {
    while let Some(ev) = rx.recv().await {
        let ok = deliver(&sinks, &ev).await;
        let Some(s) = shared.upgrade() else { return };
        if ok {
            s.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            s.dropped.fetch_add(1, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::SeqCst);
        s.idle.notify_waiters();
    }
}

/// One event to every sink; `false` when a sink gave up.
async fn deliver(sinks: &Sinks, ev: &JobEvent) -> bool {
    let mut ok = true;
    if let Some(w) = &sinks.webhook {
        let body = Bytes::from(ev.webhook_body());
        let id = format!("msg_{}", ulid::Ulid::new());
        let attempt = || async {
            // Signed per try: the timestamp is the sending time.
            let ts = now_ms() / 1000;
            let headers = [
                (HeaderName::from_static(HEADER_ID), header(&id)),
                (
                    HeaderName::from_static(HEADER_TIMESTAMP),
                    header(&ts.to_string()),
                ),
                (
                    HeaderName::from_static(HEADER_SIGNATURE),
                    header(&w.secret.sign(&id, ts, &body)),
                ),
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    http::header::USER_AGENT,
                    HeaderValue::from_static(concat!("agentq/", env!("CARGO_PKG_VERSION"))),
                ),
            ];
            match sinks
                .http
                .post(&w.url, &headers, body.clone(), sinks.cfg.attempt_timeout)
                .await
            {
                Ok(r) if r.status.is_success() => Try::Done,
                Ok(r) if r.is_retryable() => Try::Again(format!("HTTP {}", r.status)),
                Ok(r) => Try::GiveUp(format!("HTTP {}", r.status)),
                Err(e) if e.is_retryable() => Try::Again(e.to_string()),
                Err(e) => Try::GiveUp(e.to_string()),
            }
        };
        if let Err(why) = with_retries(&sinks.cfg, attempt).await {
            tracing::warn!(job = %ev.job_id, event = %ev.event_type(), url = %redact_url(&w.url), %why, "webhook notification dropped");
            ok = false;
        }
    }
    if let Some((client, bus)) = &sinks.eventbridge {
        let detail = ev.detail();
        let attempt = || async {
            let entry = aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .source(EVENT_SOURCE)
                .detail_type(DETAIL_TYPE)
                .detail(&detail)
                .event_bus_name(bus)
                .resources(format!("agentq:job/{}", ev.job_id))
                .build();
            let put = client.put_events().entries(entry).send();
            match tokio::time::timeout(sinks.cfg.attempt_timeout, put).await {
                Err(_) => Try::Again("PutEvents timed out".into()),
                Ok(Err(e)) if crate::aws::is_transient(&e) => Try::Again(crate::aws::display(&e)),
                Ok(Err(e)) => Try::GiveUp(crate::aws::display(&e)),
                Ok(Ok(out)) if out.failed_entry_count() == 0 => Try::Done,
                Ok(Ok(out)) => {
                    let e = out.entries().first();
                    let code = e.and_then(|e| e.error_code()).unwrap_or("unknown");
                    let msg = format!(
                        "{code}: {}",
                        e.and_then(|e| e.error_message()).unwrap_or_default()
                    );
                    if code.contains("Throttl") || code.contains("Internal") {
                        Try::Again(msg)
                    } else {
                        Try::GiveUp(msg)
                    }
                }
            }
        };
        if let Err(why) = with_retries(&sinks.cfg, attempt).await {
            tracing::warn!(job = %ev.job_id, event = %ev.event_type(), %bus, %why, "EventBridge notification dropped");
            ok = false;
        }
    }
    ok
}

fn header(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

enum Try {
    Done,
    Again(String),
    GiveUp(String),
}

async fn with_retries<F, Fut>(cfg: &NotifyConfig, mut attempt: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Try>,
{
    let mut backoff = cfg.first_backoff;
    let mut last = String::new();
    for n in 1..=cfg.attempts.max(1) {
        match attempt().await {
            Try::Done => return Ok(()),
            Try::GiveUp(why) => return Err(why),
            Try::Again(why) => last = why,
        }
        if n < cfg.attempts {
            // Full jitter on the upper half: between backoff/2 and backoff.
            let half = backoff / 2;
            let jitter = Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64));
            tokio::time::sleep(half + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    Err(format!("{} tries: {last}", cfg.attempts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks reference libraries (cross-checked with
        // Python's hmac module).
        let s = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(s.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &format!("v1,bm90 {sig}")
        ));
        assert!(!s.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &sig));
        assert!(!s.verify("msg_other", 1614265330, body, &sig));
        assert!(!s.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b"{}", &sig));
        assert!(!s.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, "v2,abc"));
    }

    #[test]
    fn weak_or_malformed_secrets_are_refused() {
        assert!(WebhookSecret::parse("short").is_err());
        assert!(WebhookSecret::parse("whsec_!!notbase64!!").is_err());
        assert!(WebhookSecret::parse("a plain secret of 24 bytes").is_ok());
        let e = WebhookSecret::parse("whsec_AAAA").unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
    }

    #[test]
    fn payloads_carry_the_type_and_the_fields() {
        let mut ev = JobEvent::new("j-1", JobState::TimedOut, Actor::Agent);
        ev.attempt = 2;
        ev.cause = Some("timed_out".into());
        ev.progress = Some(EventProgress {
            turns: 3,
            cost_usd: 0.5,
            ..EventProgress::default()
        });
        assert_eq!(ev.event_type(), "job.timed_out");
        let body: serde_json::Value = serde_json::from_str(&ev.webhook_body()).unwrap();
        assert_eq!(body["type"], "job.timed_out");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(body["data"]["state"], "TIMED_OUT");
        assert_eq!(body["data"]["by"], "agent");
        assert_eq!(body["data"]["progress"]["turns"], 3);
        let back: JobEvent = serde_json::from_value(body["data"].clone()).unwrap();
        assert_eq!(back, ev);
        let detail: serde_json::Value = serde_json::from_str(&ev.detail()).unwrap();
        assert_eq!(detail["type"], "job.timed_out");
        assert_eq!(detail["job_id"], "j-1");
    }

    // Real time (tokio's paused clock needs its `test-util` feature, which would rebuild
    // tokio and its dependents for the tests): short timeouts keep it quick.
    #[tokio::test]
    async fn a_full_queue_drops_and_the_drain_is_bounded() {
        // A receiver that never answers: every try times out.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let n = Notifier::start(
            NotifyConfig {
                webhook: Some(Webhook {
                    url: format!("http://{addr}/hook").parse().unwrap(),
                    secret: WebhookSecret::parse("0123456789abcdef").unwrap(),
                }),
                attempts: 2,
                attempt_timeout: Duration::from_millis(200),
                first_backoff: Duration::from_millis(20),
                ..NotifyConfig::default()
            },
            None,
        );
        for i in 0..QUEUE_CAPACITY + 5 {
            n.notify(JobEvent::new(
                &format!("j{i}"),
                JobState::Running,
                Actor::Agent,
            ));
        }
        // One is taken by the task at once; the queue holds the capacity; the rest drop.
        let r = n.report();
        assert!(r.dropped >= 4, "{r:?}");
        let started = Instant::now();
        let r = n.drain(Instant::now() + Duration::from_millis(500)).await;
        // 256 queued events × 2 tries of 200 ms would take minutes: the drain gives up at
        // its deadline (the margin is for a loaded machine).
        assert!(started.elapsed() < Duration::from_secs(5), "bounded");
        assert!(r.pending > 0, "{r:?}");
    }
}
