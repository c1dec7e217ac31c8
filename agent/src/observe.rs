//! One attempt's observability, so that each step of a job calls it in one line: the
//! job's span (a child of the trace context the message carries) and its step spans, the
//! `JobsStarted` / `JobsFinished` metrics, the `RUNNING` and final-state notifications,
//! and the telemetry variables of the child. Nothing here makes an AWS call or waits:
//! metrics are lines on stdout, spans go to a buffer, notifications to a bounded queue
//! (all three are flushed once per invocation by [`crate::handle_batch`]).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use agentq_core::layout::msg_attr;
use agentq_core::metrics::{JobFinished, JobStarted};
use agentq_core::notify::{Actor, EventProgress, JobEvent};
use agentq_core::store::Finish;
use agentq_core::telemetry::{Span, SpanKind, TraceContext};
use agentq_core::{AgentPreset, Attempt, JobRecord, JobState, ValidSpec};
use aws_lambda_events::event::sqs::SqsMessage;
use tokio::time::Instant;

use crate::Deps;
use crate::config::ChildTelemetry;

/// The trace context a message carries (`traceparent` attribute), if valid.
pub fn parent_of(m: &SqsMessage) -> Option<TraceContext> {
    m.message_attributes
        .get(msg_attr::TRACEPARENT)
        .and_then(|a| a.string_value.as_deref())
        .and_then(TraceContext::parse)
}

/// Time since SQS accepted the message (`SentTimestamp`), when the event says.
pub fn queue_wait(m: &SqsMessage) -> Option<Duration> {
    let sent: u64 = m.attributes.get("SentTimestamp")?.parse().ok()?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some(Duration::from_millis(now.saturating_sub(sent)))
}

/// A claimed attempt being observed.
#[derive(Debug)]
pub struct AttemptObs {
    obs: agentq_core::Observability,
    child_telemetry: ChildTelemetry,
    job_id: String,
    attempt: u32,
    segment: u32,
    tier: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    started: Instant,
    /// The job span, ended when the attempt is dropped. A std mutex: held only to set
    /// attributes, never across an await.
    span: Mutex<Span>,
    ctx: Option<TraceContext>,
}

impl AttemptObs {
    /// The attempt was claimed: counts it, notifies `RUNNING`, and keeps `span` (the job
    /// span) until the attempt is recorded.
    pub fn claimed(
        deps: &Deps,
        mut span: Span,
        spec: &ValidSpec,
        record: &JobRecord,
        attempt: Attempt,
        queue_wait: Option<Duration>,
    ) -> Self {
        let segment = record.segment.max(1);
        span.set("agentq.attempt", attempt.get())
            .set("agentq.segment", segment)
            .set(
                "agentq.agent",
                format!("{:?}", spec.spec.agent).to_lowercase(),
            );
        let ctx = span.context();
        let trace_id = ctx.map(|c| c.trace_id_hex());
        let obs = deps.obs.clone();
        obs.metrics.job_started(&JobStarted {
            job_id: spec.job_id.as_str(),
            attempt: attempt.get(),
            segment,
            queue_wait,
            trace_id: trace_id.clone(),
        });
        let tier = record.tier.clone().or_else(|| spec.spec.tier.clone());
        let labels = spec.spec.labels.clone();
        let mut ev = JobEvent::new(spec.job_id.as_str(), JobState::Running, Actor::Agent);
        ev.attempt = attempt.get();
        ev.segment = segment;
        ev.tier = tier.clone();
        ev.labels = labels.clone();
        ev.trace_id = trace_id;
        obs.notifier.notify(ev);
        Self {
            obs,
            child_telemetry: deps.config.child_telemetry,
            job_id: spec.job_id.to_string(),
            attempt: attempt.get(),
            segment,
            tier,
            labels,
            started: Instant::now(),
            span: Mutex::new(span),
            ctx,
        }
    }

    /// The job span's context (what the failure record carries to the dispatcher).
    pub fn context(&self) -> Option<TraceContext> {
        self.ctx
    }

    /// A step span under the job span.
    pub fn span(&self, name: &str) -> Span {
        match self.span.lock() {
            Ok(s) => s.child(name, SpanKind::Internal),
            Err(_) => Span::none(),
        }
    }

    /// What the child's environment gets so its own telemetry joins the trace under
    /// `child_span`: Claude Code's variables (`CLAUDE_CODE_ENABLE_TELEMETRY`, its
    /// exporter's `OTEL_*`, `TRACEPARENT`), or `TRACEPARENT` alone for other agents.
    /// Empty when traces are off or `AGENTQ_CHILD_TELEMETRY=off`. Second: values to
    /// redact from the job's output (the exporter's headers, when passed).
    pub fn child_env(
        &self,
        child_span: &Span,
        preset: AgentPreset,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let tel = &self.obs.telemetry;
        if !tel.is_enabled() || self.child_telemetry == ChildTelemetry::Off {
            return (Vec::new(), Vec::new());
        }
        let ctx = child_span.context();
        if preset != AgentPreset::ClaudeCode {
            return (
                ctx.map(|c| vec![("TRACEPARENT".to_owned(), c.traceparent())])
                    .unwrap_or_default(),
                Vec::new(),
            );
        }
        let with_headers = self.child_telemetry == ChildTelemetry::WithHeaders;
        let env = tel.claude_env(
            ctx,
            &[
                ("agentq.job_id", self.job_id.clone()),
                ("agentq.attempt", self.attempt.to_string()),
            ],
            with_headers,
        );
        let redact = match (with_headers, tel.config()) {
            (true, Some(c)) => c
                .headers
                .iter()
                .filter_map(|(_, v)| v.to_str().ok())
                .filter(|v| v.len() >= 4)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        (env, redact)
    }

    /// The attempt's final write landed: notifies the final state and marks the span.
    pub fn recorded(&self, fin: &Finish) {
        let trace_id = self.ctx.map(|c| c.trace_id_hex());
        let mut ev = JobEvent::new(&self.job_id, fin.state, Actor::Agent);
        ev.previous_state = Some(JobState::Running);
        ev.attempt = self.attempt;
        ev.segment = self.segment;
        ev.tier = self.tier.clone();
        ev.labels = self.labels.clone();
        ev.cause = fin.cause.as_ref().map(|c| c.kind().to_owned());
        ev.reason = Some(fin.reason.clone());
        ev.exit_code = fin.exit_code;
        ev.progress = Some(EventProgress::from(&fin.progress));
        ev.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        ev.result_key = fin.result_key.clone();
        ev.trace_id = trace_id;
        self.obs.notifier.notify(ev);
        if let Ok(mut s) = self.span.lock() {
            s.set("agentq.state", fin.state.as_str())
                .set("agentq.cost_usd", fin.progress.cost_usd)
                .set("agentq.turns", fin.progress.turns)
                .set("agentq.input_tokens", fin.progress.input_tokens)
                .set("agentq.output_tokens", fin.progress.output_tokens);
            if let Some(c) = &fin.cause {
                s.set("agentq.cause", c.kind());
            }
            if let Some(code) = fin.exit_code {
                s.set("process.exit.code", code);
            }
            if fin.state != JobState::Succeeded {
                s.set_error(format!("{}: {}", fin.state, fin.reason));
            }
        }
    }

    /// The attempt is over: its metrics line. `finalize` and `margin` come from the
    /// manifest (`None` when the child never started).
    pub fn finished(&self, fin: &Finish, finalize: Option<Duration>, margin: Option<Duration>) {
        self.obs.metrics.job_finished(&JobFinished {
            job_id: &self.job_id,
            attempt: self.attempt,
            segment: self.segment,
            state: fin.state,
            cause: fin.cause.as_ref().map(|c| c.kind()),
            duration: self.started.elapsed(),
            progress: &fin.progress,
            finalize,
            deadline_margin: margin,
            trace_id: self.ctx.map(|c| c.trace_id_hex()),
        });
    }
}

/// `DEAD` by the agent: a malformed message naming a job that had no record yet.
pub fn rejected(deps: &Deps, job: &str, reason: &str, trace: Option<TraceContext>) {
    let mut ev = JobEvent::new(job, JobState::Dead, Actor::Agent);
    ev.cause = Some(agentq_core::FailureCause::InvalidSpec.kind().to_owned());
    ev.reason = Some(reason.to_owned());
    ev.attempt = 0;
    ev.trace_id = trace.map(|c| c.trace_id_hex());
    deps.obs.notifier.notify(ev);
}
