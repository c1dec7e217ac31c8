//! One claimed job's life, a module per step:
//!
//! 1. [`prepare`]: settle secrets and AWS access, lease a uid, make the workspace (a drop
//!    guard), restore a checkpoint, build the child's command and environment. Nothing
//!    runs yet; a failure here never starts the child.
//! 2. [`supervise`]: run the child with its output streamed to S3 (behind spill files),
//!    heartbeats (progress, cancel, lease, visibility, spend), and a deadline that keeps
//!    room for what is left to upload; then kill everything the job left behind.
//! 3. [`finalize`]: in order of importance, each inside a budget derived from the time
//!    left: the final record write, the checkpoint (resumable timeouts), the failure
//!    record, the log drain, artifacts, the manifest, the workspace's removal.
//!
//! [`run`] strings them together and tells the handler what to do with the message.

mod finalize;
mod prepare;
mod signals;
mod supervise;

use std::sync::Arc;

use agentq_core::record::now_ms;
use agentq_core::store::Finish;
use agentq_core::{Attempt, FailureCause, JobRecord, Progress, ValidSpec};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Deps;
use crate::handler::Disposition;
use crate::isolation::RunningJob;
use crate::observe::AttemptObs;

pub(crate) use finalize::send_failure;
pub use signals::{CliSignal, detect_signal};

/// The SQS message a run keeps invisible while it works.
#[derive(Debug, Clone)]
pub struct VisibilityLease {
    pub queue_url: String,
    pub receipt_handle: String,
}

/// Inputs of one run.
#[derive(Debug)]
pub struct RunInput<'a> {
    /// The spec to run: the job record's, when the record has one.
    pub spec: &'a ValidSpec,
    pub attempt: Attempt,
    pub record: &'a JobRecord,
    /// The hard end of the invocation (Lambda deadline, or simulated).
    pub invocation_deadline: Instant,
    pub visibility: Option<VisibilityLease>,
    pub shutdown: CancellationToken,
    pub message_id: String,
    /// The attempt's span, metrics and notifications.
    pub obs: &'a AttemptObs,
}

/// Why the child was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Deadline,
    Cancelled,
    LeaseLost,
    Shutdown,
    /// The job's spend reached `max_budget_usd`.
    Budget,
    /// The model API kept refusing with rate limits: pause the job rather than let the
    /// CLI wait out the limit on the clock.
    RateLimited,
}

/// Runs a claimed job to its end: prepare → supervise → finalize.
pub async fn run(deps: &Arc<Deps>, input: RunInput<'_>) -> Disposition {
    let clock = finalize::Clock {
        started: Instant::now(),
        started_ms: now_ms(),
    };
    let segment = input.record.segment.max(1);
    let running = RunningJob::enter();
    let mut span = input.obs.span("agentq.prepare");
    let mut prepared = match prepare::prepare(deps, &input, segment).await {
        Ok(p) => p,
        Err(fin) => {
            span.set_error(fin.reason.clone());
            drop(span);
            return finalize::record_only(deps, &input, segment, *fin).await;
        }
    };
    span.end();
    // The child's own telemetry (Claude Code's) joins the trace under the child span.
    let mut span = input.obs.span("agentq.child");
    span.set("process.executable.name", prepared.child.program.as_str());
    let (env, redact) = input.obs.child_env(&span, input.spec.spec.agent);
    prepared.child.env.extend(env);
    prepared.secret_values.extend(redact);
    let supervised =
        match supervise::supervise(deps, &input, &prepared, &running, clock.started).await {
            Ok(s) => s,
            Err(fin) => {
                span.set_error(fin.reason.clone());
                drop(span);
                drop(prepared);
                return finalize::record_only(deps, &input, segment, *fin).await;
            }
        };
    if let Some(code) = supervised.ended.code {
        span.set("process.exit.code", code);
    }
    if let Some(stop) = supervised.stop {
        span.set("agentq.stop_reason", format!("{stop:?}").to_lowercase());
    }
    span.end();
    let span = input.obs.span("agentq.finalize");
    let disposition = finalize::finalize(deps, &input, prepared, supervised, clock, segment).await;
    span.end();
    disposition
}

/// Ends a claimed attempt without running it (e.g. its recorded spec could not be read).
pub async fn fail_claimed(
    deps: &Arc<Deps>,
    input: RunInput<'_>,
    cause: FailureCause,
    reason: String,
) -> Disposition {
    let fin = Finish {
        state: cause.final_state(),
        cause: Some(cause),
        reason,
        exit_code: None,
        signal: None,
        result_key: None,
        progress: Progress::default(),
        runtime_ms: 0,
    };
    let segment = input.record.segment.max(1);
    finalize::record_only(deps, &input, segment, fin).await
}
