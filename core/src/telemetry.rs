//! Traces: optional OpenTelemetry export over OTLP/HTTP (JSON encoding), configured by the
//! standard `OTEL_*` variables, with one trace per job across producer → agent →
//! dispatcher. The W3C trace context travels in the SQS message attribute
//! [`msg_attr::TRACEPARENT`](crate::layout::msg_attr::TRACEPARENT).
//!
//! This module owns the trace context ([`TraceContext`], `traceparent` parsing and
//! formatting), spans ([`Span`]: ended explicitly or when dropped), the bounded buffer of
//! finished spans, the OTLP/HTTP JSON encoding and export ([`Telemetry::flush`], bounded by
//! a time budget: callers flush before a Lambda invocation returns, since the environment
//! freezes after the response), and the variables that let Claude Code's own telemetry
//! join the job's trace ([`Telemetry::child_env`]).
//!
//! Why not the `opentelemetry` crates: see docs/observability.md (they are well kept, but
//! pull a second HTTP client and protobuf code generation into every binary for what is
//! here a few spans per job; this exporter reuses the SDK's HTTP stack).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use serde_json::{Value, json};

use crate::http::{HttpClient, parse_url, redact_url};

/// Most finished spans kept between flushes; more are dropped (and counted).
pub const MAX_BUFFERED_SPANS: usize = 4096;
/// Spans per export request.
const EXPORT_BATCH: usize = 512;
/// The default OTLP/HTTP endpoint when `OTEL_TRACES_EXPORTER=otlp` names no endpoint (a
/// collector beside the process, e.g. the ADOT Lambda layer).
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4318";

/// A W3C trace context: trace id, the id of the span that is the parent of whatever
/// continues it, and the sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

impl TraceContext {
    /// Parses a `traceparent` value (`00-{trace-id}-{parent-id}-{flags}`). Invalid values
    /// (all-zero ids, version `ff`, wrong lengths, upper case) give `None`: a new trace
    /// starts instead, as the W3C spec asks.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let s = traceparent.trim();
        let mut parts = s.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || version == "ff" || hex_to::<1>(version).is_none() {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == "00" && rest.is_some() {
            return None;
        }
        let trace_id = hex_to::<16>(trace)?;
        let span_id = hex_to::<8>(span)?;
        let flags = hex_to::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

fn random_trace_id() -> [u8; 16] {
    loop {
        let v = fastrand::u128(..).to_be_bytes();
        if v != [0; 16] {
            return v;
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let v = fastrand::u64(..).to_be_bytes();
        if v != [0; 8] {
            return v;
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// OTLP span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// A span attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}
impl From<&String> for AttrValue {
    fn from(v: &String) -> Self {
        Self::Str(v.clone())
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<u32> for AttrValue {
    fn from(v: u32) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<u64> for AttrValue {
    fn from(v: u64) -> Self {
        Self::Int(v.min(i64::MAX as u64) as i64)
    }
}
impl From<i32> for AttrValue {
    fn from(v: i32) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        Self::Double(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl AttrValue {
    fn to_otlp(&self) -> Value {
        match self {
            Self::Str(s) => json!({ "stringValue": s }),
            Self::Int(i) => json!({ "intValue": i.to_string() }),
            Self::Double(d) if d.is_finite() => json!({ "doubleValue": d }),
            Self::Double(d) => json!({ "stringValue": d.to_string() }),
            Self::Bool(b) => json!({ "boolValue": b }),
        }
    }
}

/// A finished span, waiting for export.
#[derive(Debug, Clone)]
struct SpanData {
    ctx: TraceContext,
    parent: Option<[u8; 8]>,
    name: String,
    kind: SpanKind,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<(String, AttrValue)>,
    error: Option<String>,
}

impl SpanData {
    fn to_otlp(&self) -> Value {
        let mut v = json!({
            "traceId": hex::encode(self.ctx.trace_id),
            "spanId": hex::encode(self.ctx.span_id),
            "name": self.name,
            "kind": self.kind as i32,
            "startTimeUnixNano": self.start_ns.to_string(),
            "endTimeUnixNano": self.end_ns.max(self.start_ns).to_string(),
            "attributes": attrs(&self.attributes),
            "status": match &self.error {
                Some(m) => json!({"code": 2, "message": m}),
                None => json!({"code": 0}),
            },
        });
        if let Some(p) = self.parent {
            v["parentSpanId"] = Value::String(hex::encode(p));
        }
        v
    }
}

fn attrs(a: &[(String, AttrValue)]) -> Vec<Value> {
    a.iter()
        .map(|(k, v)| json!({"key": k, "value": v.to_otlp()}))
        .collect()
}

/// How root spans (no parent) are sampled; a span with a parent follows it (the
/// `parentbased_*` samplers, the default). `always_off` / `always_on` ignore the parent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBased(Root),
}

/// The root sampler of `parentbased_*`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

fn ratio_sample(trace_id: &[u8; 16], ratio: f64) -> bool {
    // As the spec's TraceIdRatioBased: compare the low 8 bytes to ratio × 2^64.
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let x = u64::from_be_bytes(low);
    (x as f64) < ratio * (u64::MAX as f64)
}

impl Sampler {
    fn sample(&self, trace_id: &[u8; 16], parent: Option<&TraceContext>) -> bool {
        match (self, parent) {
            (Self::AlwaysOn, _) => true,
            (Self::AlwaysOff, _) => false,
            (Self::TraceIdRatio(r), _) => ratio_sample(trace_id, *r),
            (Self::ParentBased(_), Some(p)) => p.sampled,
            (Self::ParentBased(Root::AlwaysOn), None) => true,
            (Self::ParentBased(Root::AlwaysOff), None) => false,
            (Self::ParentBased(Root::TraceIdRatio(r)), None) => ratio_sample(trace_id, *r),
        }
    }
}

/// A setting among the `OTEL_*` variables that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {why}")]
pub struct TelemetryConfigError {
    pub var: &'static str,
    pub value: String,
    pub why: String,
}

/// OTLP export settings, from the standard variables.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// Where spans are POSTed (`…/v1/traces`).
    pub traces_endpoint: Uri,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` when given (the base for all signals).
    pub base_endpoint: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The headers as given (`k=v,k=v`), for the child's exporter.
    pub headers_raw: Option<String>,
    pub timeout: Duration,
    pub service_name: String,
    /// Resource attributes, `service.name` first.
    pub resource: Vec<(String, AttrValue)>,
    /// `OTEL_RESOURCE_ATTRIBUTES` as given.
    pub resource_raw: Option<String>,
    pub sampler: Sampler,
}

/// Splits `k=v,k=v` (W3C baggage-like, values percent-encoded) into pairs.
fn key_values(var: &'static str, raw: &str) -> Result<Vec<(String, String)>, TelemetryConfigError> {
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(TelemetryConfigError {
                var,
                value: raw.to_owned(),
                why: format!("{item:?} is not key=value (use k1=v1,k2=v2)"),
            });
        };
        out.push((k.trim().to_owned(), percent_decode(v.trim())));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let hexval = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl OtlpConfig {
    /// Reads the standard variables through `get`. `Ok(None)`: tracing is off (no endpoint
    /// and no `OTEL_TRACES_EXPORTER=otlp`, `OTEL_TRACES_EXPORTER=none`, or
    /// `OTEL_SDK_DISABLED=true`).
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
        default_service: &str,
    ) -> Result<Option<Self>, TelemetryConfigError> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let exporter = get("OTEL_TRACES_EXPORTER");
        if let Some(e) = &exporter {
            let names: Vec<&str> = e.split(',').map(str::trim).collect();
            if names.iter().all(|n| *n == "none") {
                return Ok(None);
            }
            if !names.contains(&"otlp") {
                return Err(TelemetryConfigError {
                    var: "OTEL_TRACES_EXPORTER",
                    value: e.clone(),
                    why: "agentq exports traces with otlp only: use otlp or none".into(),
                });
            }
        }
        let traces = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let base = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let endpoint = match (&traces, &base, &exporter) {
            (Some(t), _, _) => t.clone(),
            (None, Some(b), _) => format!("{}/v1/traces", b.trim_end_matches('/')),
            (None, None, Some(_)) => format!("{DEFAULT_ENDPOINT}/v1/traces"),
            (None, None, None) => return Ok(None),
        };
        let var = if traces.is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        } else {
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        };
        let traces_endpoint = parse_url(&endpoint).map_err(|why| TelemetryConfigError {
            var,
            value: endpoint.clone(),
            why,
        })?;
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = get(var) {
                match p.as_str() {
                    "http/json" | "http/protobuf" => {}
                    _ => {
                        return Err(TelemetryConfigError {
                            var,
                            value: p,
                            why: "agentq exports OTLP over HTTP (JSON encoding): use http/json and the collector's HTTP port (4318), not gRPC (4317)".into(),
                        });
                    }
                }
                break;
            }
        }
        let (hvar, headers_raw) = match get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") {
            Some(h) => ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", Some(h)),
            None => (
                "OTEL_EXPORTER_OTLP_HEADERS",
                get("OTEL_EXPORTER_OTLP_HEADERS"),
            ),
        };
        let mut headers = Vec::new();
        if let Some(raw) = &headers_raw {
            for (k, v) in key_values(hvar, raw)? {
                let bad = |why: String| TelemetryConfigError {
                    var: hvar,
                    value: "(hidden: it may hold a token)".into(),
                    why,
                };
                let name = HeaderName::try_from(k.as_str())
                    .map_err(|_| bad(format!("{k:?} is not a header name")))?;
                let value = HeaderValue::try_from(v.as_str())
                    .map_err(|_| bad(format!("the value of {k:?} is not a header value")))?;
                headers.push((name, value));
            }
        }
        let timeout_var = if get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
        } else {
            "OTEL_EXPORTER_OTLP_TIMEOUT"
        };
        let timeout = match get(timeout_var) {
            None => Duration::from_secs(10),
            Some(t) => {
                Duration::from_millis(t.parse::<u64>().map_err(|_| TelemetryConfigError {
                    var: timeout_var,
                    value: t.clone(),
                    why: "use milliseconds, e.g. 10000".into(),
                })?)
            }
        };
        let resource_raw = get("OTEL_RESOURCE_ATTRIBUTES");
        let mut given = match &resource_raw {
            Some(r) => key_values("OTEL_RESOURCE_ATTRIBUTES", r)?,
            None => Vec::new(),
        };
        let service_name = get("OTEL_SERVICE_NAME")
            .or_else(|| {
                given
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| default_service.to_owned());
        given.retain(|(k, _)| k != "service.name");
        let mut resource: Vec<(String, AttrValue)> = vec![
            ("service.name".into(), service_name.clone().into()),
            ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
            ("telemetry.sdk.name".into(), "agentq".into()),
            ("telemetry.sdk.language".into(), "rust".into()),
            (
                "telemetry.sdk.version".into(),
                env!("CARGO_PKG_VERSION").into(),
            ),
            ("cloud.provider".into(), "aws".into()),
        ];
        for (k, v) in [
            ("cloud.region", get("AWS_REGION")),
            ("faas.name", get("AWS_LAMBDA_FUNCTION_NAME")),
            ("faas.version", get("AWS_LAMBDA_FUNCTION_VERSION")),
        ] {
            if let Some(v) = v {
                resource.push((k.into(), v.into()));
            }
        }
        for (k, v) in given {
            resource.retain(|(rk, _)| *rk != k);
            resource.push((k, v.into()));
        }
        let sampler = sampler_from(get("OTEL_TRACES_SAMPLER"), get("OTEL_TRACES_SAMPLER_ARG"))?;
        Ok(Some(Self {
            traces_endpoint,
            base_endpoint: base,
            headers,
            headers_raw,
            timeout,
            service_name,
            resource,
            resource_raw,
            sampler,
        }))
    }
}

fn sampler_from(
    name: Option<String>,
    arg: Option<String>,
) -> Result<Sampler, TelemetryConfigError> {
    let ratio = || -> Result<f64, TelemetryConfigError> {
        match &arg {
            None => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| TelemetryConfigError {
                    var: "OTEL_TRACES_SAMPLER_ARG",
                    value: a.clone(),
                    why: "use a ratio between 0 and 1".into(),
                }),
        }
    };
    Ok(match name.as_deref() {
        None | Some("parentbased_always_on") => Sampler::ParentBased(Root::AlwaysOn),
        Some("parentbased_always_off") => Sampler::ParentBased(Root::AlwaysOff),
        Some("parentbased_traceidratio") => Sampler::ParentBased(Root::TraceIdRatio(ratio()?)),
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::TraceIdRatio(ratio()?),
        Some(other) => {
            return Err(TelemetryConfigError {
                var: "OTEL_TRACES_SAMPLER",
                value: other.to_owned(),
                why: "use always_on, always_off, traceidratio or their parentbased_ forms".into(),
            });
        }
    })
}

#[derive(Debug)]
struct Inner {
    config: OtlpConfig,
    client: HttpClient,
    /// Finished spans. A std mutex: held for a push or a swap, never across an await.
    buffer: Mutex<Vec<SpanData>>,
    dropped: AtomicU64,
    exported: AtomicU64,
}

/// What a flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub exported: u64,
    /// Spans given up in this flush (the collector refused or did not answer in time).
    pub dropped: u64,
}

/// The tracer: makes spans, buffers finished ones, exports them on [`flush`](Self::flush).
/// Disabled (no `OTEL_*` configuration) it still carries trace contexts through, so a
/// trace started upstream continues downstream. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    inner: Option<Arc<Inner>>,
}

impl Telemetry {
    /// Records nothing (contexts still pass through).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// From the process environment; see [`OtlpConfig::from_vars`].
    pub fn from_env(default_service: &str) -> Result<Self, TelemetryConfigError> {
        Ok(
            match OtlpConfig::from_vars(|k| std::env::var(k).ok(), default_service)? {
                Some(c) => Self::new(c),
                None => Self::disabled(),
            },
        )
    }

    pub fn new(config: OtlpConfig) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                config,
                client: HttpClient::new(),
                buffer: Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
                exported: AtomicU64::new(0),
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn config(&self) -> Option<&OtlpConfig> {
        self.inner.as_ref().map(|i| &i.config)
    }

    /// Starts a span: a child of `parent` when given (the upstream service's span, or one
    /// of ours), else the root of a new trace.
    pub fn span(&self, name: &str, kind: SpanKind, parent: Option<TraceContext>) -> Span {
        let Some(inner) = &self.inner else {
            // Not recording: whatever came in goes on unchanged.
            return Span {
                sink: None,
                ctx: parent,
                parent: None,
                name: String::new(),
                kind,
                start_ns: 0,
                attributes: Vec::new(),
                error: None,
                ended: true,
            };
        };
        let trace_id = parent.map(|p| p.trace_id).unwrap_or_else(random_trace_id);
        let sampled = inner.config.sampler.sample(&trace_id, parent.as_ref());
        let ctx = TraceContext {
            trace_id,
            span_id: random_span_id(),
            sampled,
        };
        Span {
            sink: sampled.then(|| inner.clone()),
            ctx: Some(ctx),
            parent: parent.map(|p| p.span_id),
            name: name.to_owned(),
            kind,
            start_ns: unix_nanos(),
            attributes: Vec::new(),
            error: None,
            ended: !sampled,
        }
    }

    /// Spans finished and not yet exported.
    pub fn buffered(&self) -> usize {
        self.inner
            .as_ref()
            .and_then(|i| i.buffer.lock().ok().map(|b| b.len()))
            .unwrap_or(0)
    }

    /// Spans dropped since the start (buffer full, export failed).
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }

    /// Exports every finished span, within `budget` (each request also within the
    /// configured timeout). A failed request is retried while the budget lasts; spans
    /// that cannot be delivered are dropped and counted, never kept for ever.
    pub async fn flush(&self, budget: Duration) -> FlushReport {
        let Some(inner) = &self.inner else {
            return FlushReport::default();
        };
        let spans = match inner.buffer.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(_) => return FlushReport::default(),
        };
        if spans.is_empty() {
            return FlushReport::default();
        }
        let until = tokio::time::Instant::now() + budget;
        let mut report = FlushReport::default();
        for batch in spans.chunks(EXPORT_BATCH) {
            let body = Bytes::from(encode(&inner.config.resource, batch).to_string());
            if export(inner, body, until).await {
                report.exported += batch.len() as u64;
            } else {
                report.dropped += batch.len() as u64;
            }
        }
        inner.exported.fetch_add(report.exported, Ordering::Relaxed);
        inner.dropped.fetch_add(report.dropped, Ordering::Relaxed);
        if report.dropped > 0 {
            tracing::warn!(
                dropped = report.dropped,
                endpoint = %redact_url(&inner.config.traces_endpoint),
                "spans not exported"
            );
        }
        report
    }

    /// The variables that make Claude Code export its own telemetry to the same collector
    /// with its spans under `parent` (its `TRACEPARENT` support). Empty when tracing is off.
    /// The exporter's headers (often a token) go to the child only with `with_headers`:
    /// the child is untrusted code.
    pub fn claude_env(
        &self,
        parent: Option<TraceContext>,
        extra_resource: &[(&str, String)],
        with_headers: bool,
    ) -> Vec<(String, String)> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let c = &inner.config;
        let mut env: Vec<(String, String)> = vec![
            ("CLAUDE_CODE_ENABLE_TELEMETRY".into(), "1".into()),
            ("CLAUDE_CODE_ENHANCED_TELEMETRY_BETA".into(), "1".into()),
            ("OTEL_TRACES_EXPORTER".into(), "otlp".into()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(),
                c.traces_endpoint.to_string(),
            ),
        ];
        if let Some(base) = &c.base_endpoint {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), base.clone()));
            env.push(("OTEL_METRICS_EXPORTER".into(), "otlp".into()));
            env.push(("OTEL_LOGS_EXPORTER".into(), "otlp".into()));
        }
        if with_headers && let Some(h) = &c.headers_raw {
            env.push(("OTEL_EXPORTER_OTLP_HEADERS".into(), h.clone()));
        }
        let mut resource: Vec<String> = c
            .resource_raw
            .iter()
            .flat_map(|r| r.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.starts_with("service.name="))
            .map(str::to_owned)
            .collect();
        resource.extend(
            extra_resource
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace([',', '=', ' '], "_"))),
        );
        if !resource.is_empty() {
            env.push(("OTEL_RESOURCE_ATTRIBUTES".into(), resource.join(",")));
        }
        if let Some(p) = parent {
            env.push(("TRACEPARENT".into(), p.traceparent()));
        }
        env
    }
}

async fn export(inner: &Inner, body: Bytes, until: tokio::time::Instant) -> bool {
    let mut headers = vec![(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    headers.extend(inner.config.headers.iter().cloned());
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=4 {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = inner.config.timeout.min(left);
        match inner
            .client
            .post(
                &inner.config.traces_endpoint,
                &headers,
                body.clone(),
                timeout,
            )
            .await
        {
            Ok(r) if r.status.is_success() => return true,
            Ok(r) if r.is_retryable() => {
                tracing::debug!(status = %r.status, attempt, "span export refused; retrying")
            }
            Ok(r) => {
                tracing::warn!(status = %r.status, body = %String::from_utf8_lossy(&r.body), "span export refused");
                return false;
            }
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, attempt, "span export failed; retrying")
            }
            Err(e) => {
                tracing::warn!(error = %e, "span export failed");
                return false;
            }
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left <= backoff {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    false
}

/// An OTLP `ExportTraceServiceRequest` in its JSON encoding.
fn encode(resource: &[(String, AttrValue)], spans: &[SpanData]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": { "attributes": attrs(resource) },
            "scopeSpans": [{
                "scope": { "name": "agentq", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(SpanData::to_otlp).collect::<Vec<_>>(),
            }],
        }],
    })
}

/// A span in progress. Ends with [`end`](Self::end) or when dropped; a span that is not
/// sampled (or tracing is off) records nothing but still hands out its context.
#[derive(Debug)]
pub struct Span {
    sink: Option<Arc<Inner>>,
    ctx: Option<TraceContext>,
    parent: Option<[u8; 8]>,
    name: String,
    kind: SpanKind,
    start_ns: u64,
    attributes: Vec<(String, AttrValue)>,
    error: Option<String>,
    ended: bool,
}

impl Span {
    /// A span that records nothing and has no context.
    pub fn none() -> Self {
        Telemetry::disabled().span("", SpanKind::Internal, None)
    }

    /// The context to hand downstream (`None`: no trace at all).
    pub fn context(&self) -> Option<TraceContext> {
        self.ctx
    }

    pub fn trace_id(&self) -> Option<String> {
        self.ctx.map(|c| c.trace_id_hex())
    }

    /// Whether this span is recorded and exported.
    pub fn is_recording(&self) -> bool {
        self.sink.is_some() && !self.ended
    }

    /// A child span (same trace, this span as parent).
    pub fn child(&self, name: &str, kind: SpanKind) -> Span {
        // Not recording here (off, or not sampled): the child passes this span's context
        // on unchanged.
        Telemetry {
            inner: self.sink.clone(),
        }
        .span(name, kind, self.ctx)
    }

    pub fn set(&mut self, key: &str, value: impl Into<AttrValue>) -> &mut Self {
        if self.is_recording() {
            let v = value.into();
            match self.attributes.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = v,
                None => self.attributes.push((key.to_owned(), v)),
            }
        }
        self
    }

    /// Marks the span failed (status ERROR) with a message.
    pub fn set_error(&mut self, message: impl Into<String>) -> &mut Self {
        if self.is_recording() {
            self.error = Some(message.into());
        }
        self
    }

    /// Moves the start to now (a span made ahead of its work, to hand out its context).
    pub fn restart(&mut self) {
        self.start_ns = unix_nanos();
    }

    /// Ends the span; it is exported at the next flush.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let (Some(sink), Some(ctx)) = (&self.sink, self.ctx) else {
            return;
        };
        let data = SpanData {
            ctx,
            parent: self.parent,
            name: std::mem::take(&mut self.name),
            kind: self.kind,
            start_ns: self.start_ns,
            end_ns: unix_nanos(),
            attributes: std::mem::take(&mut self.attributes),
            error: self.error.take(),
        };
        match sink.buffer.lock() {
            Ok(mut b) if b.len() < MAX_BUFFERED_SPANS => b.push(data),
            _ => {
                sink.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, TelemetryConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        OtlpConfig::from_vars(|k| m.get(k).cloned(), "svc")
    }

    #[test]
    fn traceparent_round_trips_and_rejects_invalid_values() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(tp).unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), tp);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!unsampled.unwrap().sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn the_standard_variables_configure_the_exporter() {
        assert!(config(&[]).unwrap().is_none(), "off without configuration");
        assert!(
            config(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .unwrap()
            .is_none()
        );
        assert!(
            config(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_TRACES_EXPORTER", "none")
            ])
            .unwrap()
            .is_none()
        );
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=abc%20def, x-team=a",
            ),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,service.name=from-attrs",
            ),
            ("AWS_REGION", "eu-west-1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            c.traces_endpoint.to_string(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(c.headers.len(), 2);
        assert_eq!(c.headers[0].1, "abc def");
        assert_eq!(c.service_name, "from-attrs");
        assert!(
            c.resource
                .contains(&("deployment.environment".into(), "prod".into()))
        );
        assert!(
            c.resource
                .contains(&("cloud.region".into(), "eu-west-1".into()))
        );
        assert_eq!(c.sampler, Sampler::ParentBased(Root::AlwaysOn));

        let c = config(&[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://x.example/otlp/v1/traces",
            ),
            ("OTEL_SERVICE_NAME", "named"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            c.traces_endpoint.to_string(),
            "https://x.example/otlp/v1/traces"
        );
        assert_eq!(c.service_name, "named");
        assert_eq!(c.sampler, Sampler::ParentBased(Root::TraceIdRatio(0.25)));

        let c = config(&[("OTEL_TRACES_EXPORTER", "otlp")])
            .unwrap()
            .unwrap();
        assert_eq!(
            c.traces_endpoint.to_string(),
            "http://localhost:4318/v1/traces"
        );
        assert_eq!(c.service_name, "svc");
    }

    #[test]
    fn unusable_settings_name_the_variable() {
        for (vars, var) in [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![("OTEL_TRACES_EXPORTER", "jaeger")],
                "OTEL_TRACES_EXPORTER",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_TRACES_SAMPLER", "sometimes"),
                ],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_EXPORTER_OTLP_HEADERS", "token"),
                ],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
                ],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
        ] {
            let e = config(&vars).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
        let e = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer se\u{1}cret",
            ),
        ])
        .unwrap_err();
        assert!(
            !e.to_string().contains("cret"),
            "the value is not shown: {e}"
        );
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }

    fn enabled() -> Telemetry {
        Telemetry::new(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")])
                .unwrap()
                .unwrap(),
        )
    }

    #[test]
    fn spans_continue_the_parent_and_encode_as_otlp_json() {
        let t = enabled();
        let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let mut root = t.span("agentq.job", SpanKind::Consumer, parent);
        root.set("agentq.job_id", "j-1").set("agentq.attempt", 2u32);
        let child = root.child("agentq.claim", SpanKind::Internal);
        let child_ctx = child.context().unwrap();
        child.end();
        root.set_error("FAILED");
        let root_ctx = root.context().unwrap();
        drop(root);
        assert_eq!(root_ctx.trace_id, parent.unwrap().trace_id);
        assert_eq!(child_ctx.trace_id, root_ctx.trace_id);
        assert_eq!(t.buffered(), 2);

        let spans = t.inner.as_ref().unwrap().buffer.lock().unwrap().clone();
        let v = encode(&t.config().unwrap().resource, &spans);
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(s[0]["name"], "agentq.claim");
        assert_eq!(s[0]["parentSpanId"], hex::encode(root_ctx.span_id));
        assert_eq!(s[1]["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s[1]["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s[1]["kind"], 5);
        assert_eq!(s[1]["status"]["code"], 2);
        assert_eq!(s[1]["attributes"][1]["value"]["intValue"], "2");
        let start: u64 = s[1]["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = s[1]["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(end >= start && start > 1_600_000_000_000_000_000);
        let res = &v["resourceSpans"][0]["resource"]["attributes"][0];
        assert_eq!(res["key"], "service.name");
        assert_eq!(res["value"]["stringValue"], "svc");
    }

    #[test]
    fn unsampled_and_disabled_spans_record_nothing_but_pass_the_context_on() {
        let t = enabled();
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        let s = t.span("x", SpanKind::Internal, unsampled);
        let ctx = s.context().unwrap();
        assert!(!ctx.sampled && ctx.trace_id == unsampled.unwrap().trace_id);
        drop(s);
        assert_eq!(t.buffered(), 0);

        let off = Telemetry::disabled();
        let sampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let s = off.span("x", SpanKind::Internal, sampled);
        assert_eq!(s.context(), sampled, "passed through unchanged");
        assert_eq!(s.child("y", SpanKind::Internal).context(), sampled);
        assert_eq!(off.span("x", SpanKind::Internal, None).context(), None);
        assert!(off.claude_env(sampled, &[], true).is_empty());
    }

    #[test]
    fn the_buffer_is_bounded() {
        let t = enabled();
        for _ in 0..MAX_BUFFERED_SPANS + 10 {
            t.span("s", SpanKind::Internal, None).end();
        }
        assert_eq!(t.buffered(), MAX_BUFFERED_SPANS);
        assert_eq!(t.dropped(), 10);
    }

    #[test]
    fn claude_gets_the_exporter_and_the_parent_but_headers_only_when_allowed() {
        let t = Telemetry::new(
            config(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer t0ken"),
                ("OTEL_RESOURCE_ATTRIBUTES", "team=a,service.name=x"),
            ])
            .unwrap()
            .unwrap(),
        );
        let span = t.span("agentq.child", SpanKind::Internal, None);
        let env: HashMap<String, String> = t
            .claude_env(span.context(), &[("agentq.job_id", "j 1".into())], false)
            .into_iter()
            .collect();
        assert_eq!(env["CLAUDE_CODE_ENABLE_TELEMETRY"], "1");
        assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://collector:4318");
        assert_eq!(env["OTEL_EXPORTER_OTLP_PROTOCOL"], "http/json");
        assert_eq!(env["TRACEPARENT"], span.context().unwrap().traceparent());
        assert_eq!(env["OTEL_RESOURCE_ATTRIBUTES"], "team=a,agentq.job_id=j_1");
        assert!(!env.contains_key("OTEL_EXPORTER_OTLP_HEADERS"));
        let with: HashMap<String, String> = t.claude_env(None, &[], true).into_iter().collect();
        assert_eq!(
            with["OTEL_EXPORTER_OTLP_HEADERS"],
            "authorization=Bearer t0ken"
        );
    }

    #[test]
    fn ratio_sampling_keeps_about_the_ratio() {
        let kept = (0..4000)
            .filter(|_| ratio_sample(&random_trace_id(), 0.25))
            .count();
        assert!((800..1200).contains(&kept), "{kept}");
        assert!(!ratio_sample(&random_trace_id(), 0.0));
    }
}
