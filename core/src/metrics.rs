//! Metrics as CloudWatch Embedded Metric Format (EMF): one JSON document per line, written
//! to standard output (or standard error) where CloudWatch Logs turns it into metrics —
//! no CloudWatch API call, nothing on the hot path (one line per job start, job end and
//! re-plan; never per heartbeat).
//!
//! This module owns the metric and dimension names, their units and dimension sets, and the
//! document format: `{"_aws": {"Timestamp", "CloudWatchMetrics": [{"Namespace",
//! "Dimensions", "Metrics": [{"Name", "Unit"}]}]}, <dimension values>, <metric values>,
//! <properties>}`. Dimensions are a small fixed set (`Service`, `Tier`, and `State` +
//! `Cause` or `Action` where a count is split by them); job ids, attempts and trace ids are
//! plain properties (searchable in Logs Insights, never dimensions).
//!
//! See docs/observability.md for the list.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::record::{EpochMillis, Progress, now_ms};
use crate::state::JobState;

/// Default CloudWatch namespace (the template sets the stack's name prefix).
pub const DEFAULT_NAMESPACE: &str = "agentq";

/// Metric names.
pub mod name {
    /// Count: an attempt started (claimed).
    pub const JOBS_STARTED: &str = "JobsStarted";
    /// Count: an attempt ended, split by `State` and `Cause`.
    pub const JOBS_FINISHED: &str = "JobsFinished";
    /// Milliseconds: the attempt's run time, claim to final write.
    pub const DURATION: &str = "Duration";
    /// Milliseconds: the message's `SentTimestamp` to the claim.
    pub const QUEUE_WAIT: &str = "QueueWait";
    /// None (US dollars): what the attempt's agent CLI reported it spent.
    pub const COST: &str = "CostUSD";
    pub const INPUT_TOKENS: &str = "InputTokens";
    pub const OUTPUT_TOKENS: &str = "OutputTokens";
    pub const TURNS: &str = "Turns";
    /// Bytes: stdout + stderr of the child (after redaction).
    pub const LOG_BYTES: &str = "LogBytes";
    /// Milliseconds: the child's end to the manifest (`finalize_ms` in result.json).
    pub const FINALIZE_TIME: &str = "FinalizeTime";
    /// Milliseconds: what was left before the invocation deadline at the manifest
    /// (`deadline_margin_ms` in result.json). Near zero: raise the reserve.
    pub const DEADLINE_MARGIN: &str = "DeadlineMargin";
    /// Count: a dispatcher re-plan, split by `Action`.
    pub const REPLANS: &str = "Replans";
    /// Count: notifications given up (queue full, retries spent, drain timed out).
    pub const NOTIFICATIONS_DROPPED: &str = "NotificationsDropped";
}

/// Dimension names.
pub mod dim {
    /// `agent` or `dispatcher`.
    pub const SERVICE: &str = "Service";
    /// The capacity tier the agent serves (`AGENTQ_TIER`, default `default`).
    pub const TIER: &str = "Tier";
    /// The job state an attempt ended in (`SUCCEEDED`, `FAILED`, …).
    pub const STATE: &str = "State";
    /// The failure cause kind (`agent_exit`, `timed_out`, …), `none` on success.
    pub const CAUSE: &str = "Cause";
    /// The re-plan action (`retry`, `resume`, `escalate`, `fail`, `dead`).
    pub const ACTION: &str = "Action";
}

/// The `Cause` value of an attempt without a failure cause.
pub const NO_CAUSE: &str = "none";

/// EMF units agentq uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Bytes,
    None,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Milliseconds => "Milliseconds",
            Self::Bytes => "Bytes",
            Self::None => "None",
        }
    }
}

/// Where EMF lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsTarget {
    Stdout,
    Stderr,
    Off,
}

#[derive(Debug, Clone)]
enum Out {
    Stdout,
    Stderr,
    Off,
    /// For tests: lines kept in memory.
    Memory(Arc<Mutex<Vec<String>>>),
}

/// One EMF document under construction.
#[derive(Debug, Clone)]
pub struct Document {
    namespace: String,
    timestamp: EpochMillis,
    members: Map<String, Value>,
    directives: Vec<Directive>,
}

#[derive(Debug, Clone, Default)]
struct Directive {
    dimensions: Vec<Vec<&'static str>>,
    metrics: Vec<(&'static str, Unit)>,
}

impl Document {
    pub fn new(namespace: &str, timestamp: EpochMillis) -> Self {
        Self {
            namespace: namespace.to_owned(),
            timestamp,
            members: Map::new(),
            directives: Vec::new(),
        }
    }

    /// A dimension's value (EMF dimension values are strings; empty becomes `unknown`).
    pub fn dimension(&mut self, name: &'static str, value: &str) -> &mut Self {
        let v = if value.is_empty() { "unknown" } else { value };
        // CloudWatch caps dimension values at 1024 characters.
        let v: String = v.chars().take(1024).collect();
        self.members.insert(name.to_owned(), Value::String(v));
        self
    }

    /// A property: kept in the log line, not a metric or dimension.
    pub fn property(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// The fields that name one run of a job (never dimensions): the event, the job, its
    /// attempt and segment, and the trace when there is one.
    pub fn run_fields(
        &mut self,
        event: &str,
        job_id: &str,
        attempt: u32,
        segment: u32,
        trace_id: Option<&str>,
    ) -> &mut Self {
        self.property("event", event)
            .property("job_id", job_id)
            .property("attempt", attempt)
            .property("segment", segment);
        if let Some(t) = trace_id {
            self.property("trace_id", t);
        }
        self
    }

    /// Starts a metric directive over these dimension sets; returns its index.
    pub fn directive(&mut self, dimension_sets: &[&[&'static str]]) -> usize {
        self.directives.push(Directive {
            dimensions: dimension_sets.iter().map(|s| s.to_vec()).collect(),
            metrics: Vec::new(),
        });
        self.directives.len() - 1
    }

    /// A metric value in directive `d`. Non-finite values are left out (EMF has no NaN).
    pub fn metric(&mut self, d: usize, name: &'static str, value: f64, unit: Unit) -> &mut Self {
        if !value.is_finite() {
            return self;
        }
        if let Some(dir) = self.directives.get_mut(d)
            && !dir.metrics.iter().any(|(n, _)| *n == name)
        {
            dir.metrics.push((name, unit));
        }
        self.members.insert(name.to_owned(), json!(value));
        self
    }

    /// The document as one JSON line (no newline).
    pub fn to_json(&self) -> String {
        let directives: Vec<Value> = self
            .directives
            .iter()
            .filter(|d| !d.metrics.is_empty())
            .map(|d| {
                json!({
                    "Namespace": self.namespace,
                    "Dimensions": d.dimensions,
                    "Metrics": d.metrics.iter().map(|(n, u)| json!({"Name": n, "Unit": u.as_str()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut root = self.members.clone();
        root.insert(
            "_aws".into(),
            json!({"Timestamp": self.timestamp, "CloudWatchMetrics": directives}),
        );
        Value::Object(root).to_string()
    }
}

/// An attempt that started (the claim).
#[derive(Debug, Clone)]
pub struct JobStarted<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub segment: u32,
    /// Message `SentTimestamp` → claim; `None` when the message has no timestamp.
    pub queue_wait: Option<Duration>,
    pub trace_id: Option<String>,
}

/// An attempt that ended (after its final write).
#[derive(Debug, Clone)]
pub struct JobFinished<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub segment: u32,
    pub state: JobState,
    /// Failure cause kind (`FailureCause::kind`), `None` on success.
    pub cause: Option<&'a str>,
    pub duration: Duration,
    pub progress: &'a Progress,
    /// Child's end → manifest; `None` when the child never started.
    pub finalize: Option<Duration>,
    pub deadline_margin: Option<Duration>,
    pub trace_id: Option<String>,
}

/// A dispatcher decision.
#[derive(Debug, Clone)]
pub struct Replanned<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub action: &'a str,
    pub state: JobState,
    pub cause: Option<&'a str>,
    pub delay_seconds: Option<u64>,
    pub trace_id: Option<String>,
}

/// Writes agentq's metrics as EMF lines. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    namespace: Arc<str>,
    service: &'static str,
    tier: Arc<str>,
    out: Out,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Metrics {
    /// `service` is the `Service` dimension (`agent`, `dispatcher`); `tier` the `Tier`.
    pub fn new(namespace: &str, service: &'static str, tier: &str, target: MetricsTarget) -> Self {
        Self {
            namespace: namespace.into(),
            service,
            tier: tier.into(),
            out: match target {
                MetricsTarget::Stdout => Out::Stdout,
                MetricsTarget::Stderr => Out::Stderr,
                MetricsTarget::Off => Out::Off,
            },
        }
    }

    /// Writes nothing.
    pub fn off() -> Self {
        Self::new(DEFAULT_NAMESPACE, "none", "default", MetricsTarget::Off)
    }

    /// Keeps lines in memory (tests); the handle reads them.
    pub fn in_memory(service: &'static str, tier: &str) -> (Self, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut m = Self::new(DEFAULT_NAMESPACE, service, tier, MetricsTarget::Off);
        m.out = Out::Memory(lines.clone());
        (m, lines)
    }

    pub fn is_enabled(&self) -> bool {
        !matches!(self.out, Out::Off)
    }

    /// A document with the namespace, timestamp and the `Service` (+ `Tier`) dimensions.
    pub fn document(&self) -> Document {
        let mut d = Document::new(&self.namespace, now_ms());
        d.dimension(dim::SERVICE, self.service);
        d.dimension(dim::TIER, &self.tier);
        d
    }

    /// Writes one document as one line. A line is written whole with one `write_all` on
    /// the locked stream (small, like a log line), so lines never interleave.
    pub fn emit(&self, doc: &Document) {
        let line = doc.to_json();
        match &self.out {
            Out::Off => {}
            Out::Memory(lines) => {
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(format!("{line}\n").as_bytes());
                let _ = out.flush();
            }
            Out::Stderr => {
                let _ = std::io::stderr()
                    .lock()
                    .write_all(format!("{line}\n").as_bytes());
            }
        }
    }

    pub fn job_started(&self, e: &JobStarted<'_>) {
        if !self.is_enabled() {
            return;
        }
        let mut d = self.document();
        let per_tier = d.directive(&[&[dim::SERVICE, dim::TIER]]);
        d.metric(per_tier, name::JOBS_STARTED, 1.0, Unit::Count);
        if let Some(w) = e.queue_wait {
            d.metric(per_tier, name::QUEUE_WAIT, ms(w), Unit::Milliseconds);
        }
        d.run_fields(
            "job_started",
            e.job_id,
            e.attempt,
            e.segment,
            e.trace_id.as_deref(),
        );
        self.emit(&d);
    }

    pub fn job_finished(&self, e: &JobFinished<'_>) {
        if !self.is_enabled() {
            return;
        }
        let mut d = self.document();
        d.dimension(dim::STATE, e.state.as_str());
        d.dimension(dim::CAUSE, e.cause.unwrap_or(NO_CAUSE));
        let by_outcome = d.directive(&[
            &[dim::SERVICE, dim::TIER],
            &[dim::SERVICE, dim::TIER, dim::STATE, dim::CAUSE],
        ]);
        d.metric(by_outcome, name::JOBS_FINISHED, 1.0, Unit::Count);
        let per_tier = d.directive(&[&[dim::SERVICE, dim::TIER]]);
        let p = e.progress;
        d.metric(per_tier, name::DURATION, ms(e.duration), Unit::Milliseconds)
            .metric(per_tier, name::COST, p.cost_usd, Unit::None)
            .metric(
                per_tier,
                name::INPUT_TOKENS,
                p.input_tokens as f64,
                Unit::Count,
            )
            .metric(
                per_tier,
                name::OUTPUT_TOKENS,
                p.output_tokens as f64,
                Unit::Count,
            )
            .metric(per_tier, name::TURNS, f64::from(p.turns), Unit::Count)
            .metric(
                per_tier,
                name::LOG_BYTES,
                (p.stdout_bytes + p.stderr_bytes) as f64,
                Unit::Bytes,
            );
        if let Some(f) = e.finalize {
            d.metric(per_tier, name::FINALIZE_TIME, ms(f), Unit::Milliseconds);
        }
        if let Some(m) = e.deadline_margin {
            d.metric(per_tier, name::DEADLINE_MARGIN, ms(m), Unit::Milliseconds);
        }
        d.run_fields(
            "job_finished",
            e.job_id,
            e.attempt,
            e.segment,
            e.trace_id.as_deref(),
        );
        self.emit(&d);
    }

    pub fn replanned(&self, e: &Replanned<'_>) {
        if !self.is_enabled() {
            return;
        }
        let mut d = self.document();
        d.dimension(dim::ACTION, e.action);
        let by_action = d.directive(&[&[dim::SERVICE, dim::ACTION]]);
        d.metric(by_action, name::REPLANS, 1.0, Unit::Count);
        d.property("event", "replanned")
            .property("job_id", e.job_id)
            .property("attempt", e.attempt)
            .property("state", e.state.as_str());
        if let Some(c) = e.cause {
            d.property("cause", c);
        }
        if let Some(s) = e.delay_seconds {
            d.property("delay_seconds", s);
        }
        if let Some(t) = &e.trace_id {
            d.property("trace_id", t.as_str());
        }
        self.emit(&d);
    }

    /// Notifications given up since the last report (only written when there are some).
    pub fn notifications_dropped(&self, n: u64) {
        if n == 0 || !self.is_enabled() {
            return;
        }
        let mut d = self.document();
        let per_service = d.directive(&[&[dim::SERVICE]]);
        d.metric(
            per_service,
            name::NOTIFICATIONS_DROPPED,
            n as f64,
            Unit::Count,
        );
        d.property("event", "notifications_dropped");
        self.emit(&d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Value {
        serde_json::from_str(line).expect("one JSON document")
    }

    /// What CloudWatch checks: every metric and dimension named in a directive is a
    /// root member, dimension values are strings, metric values numbers.
    fn assert_valid_emf(v: &Value) {
        let aws = &v["_aws"];
        assert!(aws["Timestamp"].is_i64(), "{v}");
        for d in aws["CloudWatchMetrics"].as_array().unwrap() {
            assert!(!d["Namespace"].as_str().unwrap().is_empty());
            for set in d["Dimensions"].as_array().unwrap() {
                let set = set.as_array().unwrap();
                assert!(!set.is_empty() && set.len() <= 30);
                for k in set {
                    assert!(v[k.as_str().unwrap()].is_string(), "dimension {k} in {v}");
                }
            }
            let metrics = d["Metrics"].as_array().unwrap();
            assert!(!metrics.is_empty() && metrics.len() <= 100);
            for m in metrics {
                let n = m["Name"].as_str().unwrap();
                assert!(v[n].is_number(), "metric {n} in {v}");
                assert!(m["Unit"].is_string());
            }
        }
    }

    #[test]
    fn a_finished_job_is_one_valid_document() {
        let (m, lines) = Metrics::in_memory("agent", "large");
        let progress = Progress {
            turns: 3,
            input_tokens: 300,
            output_tokens: 60,
            cost_usd: 0.0369,
            stdout_bytes: 1000,
            stderr_bytes: 24,
            ..Progress::default()
        };
        m.job_finished(&JobFinished {
            job_id: "j-1",
            attempt: 2,
            segment: 1,
            state: JobState::Failed,
            cause: Some("agent_exit"),
            duration: Duration::from_millis(1500),
            progress: &progress,
            finalize: Some(Duration::from_millis(120)),
            deadline_margin: Some(Duration::from_secs(8)),
            trace_id: Some("ab".repeat(16)),
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1);
        let v = parse(&lines[0]);
        assert_valid_emf(&v);
        assert_eq!(v["Service"], "agent");
        assert_eq!(v["Tier"], "large");
        assert_eq!(v["State"], "FAILED");
        assert_eq!(v["Cause"], "agent_exit");
        assert_eq!(v["JobsFinished"], 1.0);
        assert_eq!(v["Duration"], 1500.0);
        assert_eq!(v["CostUSD"], 0.0369);
        assert_eq!(v["Turns"], 3.0);
        assert_eq!(v["LogBytes"], 1024.0);
        assert_eq!(v["DeadlineMargin"], 8000.0);
        assert_eq!(v["job_id"], "j-1", "job ids are properties");
        let dims = &v["_aws"]["CloudWatchMetrics"];
        let all: Vec<&Value> = dims
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|d| d["Dimensions"].as_array().unwrap())
            .flat_map(|s| s.as_array().unwrap())
            .collect();
        assert!(
            all.iter()
                .all(|d| ["Service", "Tier", "State", "Cause"].contains(&d.as_str().unwrap())),
            "{dims}"
        );
    }

    #[test]
    fn started_replanned_and_dropped_documents_are_valid() {
        let (m, lines) = Metrics::in_memory("dispatcher", "default");
        m.job_started(&JobStarted {
            job_id: "j",
            attempt: 1,
            segment: 1,
            queue_wait: None,
            trace_id: None,
        });
        m.replanned(&Replanned {
            job_id: "j",
            attempt: 1,
            action: "retry",
            state: JobState::RetryScheduled,
            cause: Some("crashed"),
            delay_seconds: Some(30),
            trace_id: None,
        });
        m.notifications_dropped(0);
        m.notifications_dropped(2);
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 3, "nothing is written for zero drops");
        for l in lines.iter() {
            assert_valid_emf(&parse(l));
        }
        let started = parse(&lines[0]);
        assert!(started.get("QueueWait").is_none(), "no timestamp, no wait");
        assert_eq!(parse(&lines[1])["Action"], "retry");
        assert_eq!(parse(&lines[2])["NotificationsDropped"], 2.0);
    }

    #[test]
    fn non_finite_values_and_empty_dimensions_stay_valid() {
        let mut d = Document::new("ns", 1);
        d.dimension(dim::SERVICE, "");
        let i = d.directive(&[&[dim::SERVICE]]);
        d.metric(i, "A", f64::NAN, Unit::None);
        d.metric(i, "B", 2.0, Unit::Count);
        let v = parse(&d.to_json());
        assert_valid_emf(&v);
        assert_eq!(v["Service"], "unknown");
        assert!(v.get("A").is_none());
    }
}
