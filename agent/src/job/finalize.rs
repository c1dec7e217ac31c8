//! Step 3: record the attempt, in order of importance, each step inside a budget derived
//! from the time left before the invocation's deadline:
//!
//! 1. the final record write (fenced by the attempt) — small, first, always;
//! 2. for a resumable timeout, the checkpoint (streamed multipart; it must exist before
//!    the dispatcher can plan the next segment);
//! 3. the failure record to the DLQ (FAILED / TIMED_OUT), noted in the record; if it
//!    cannot be sent, the message is left to come back and the next delivery sends it;
//! 4. the log drain (the uploaders have been draining since the child ended);
//! 5. artifacts (text files redacted on the way);
//! 6. `result.json`;
//! 7. the workspace's removal.
//!
//! The message's visibility is pushed past the deadline once, so it does not come back
//! while this runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentq_core::failure::FailureRecord;
use agentq_core::layout::msg_attr;
use agentq_core::record::{EpochMillis, now_ms};
use agentq_core::spec::ResumePolicy;
use agentq_core::store::{Finish, StoreError};
use agentq_core::{FailureCause, JobState, Progress, ValidSpec};
use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::prepare::Prepared;
use super::signals::CliSignal;
use super::supervise::Supervised;
use super::{RunInput, StopReason};
use crate::Deps;
use crate::checkpoint;
use crate::child::Ended;
use crate::handler::Disposition;
use crate::logs::StreamStats;
use crate::redact::Redactor;
use crate::upload::{ObjectTarget, stream_object};

/// When the run started.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub started: Instant,
    pub started_ms: EpochMillis,
}

#[derive(Debug, Serialize)]
struct ArtifactEntry {
    path: String,
    key: String,
    bytes: u64,
    /// SHA-256 of the bytes uploaded (after redaction), hex.
    sha256: String,
    redacted: bool,
}

/// How long each finalize step took, for tuning the reserve.
#[derive(Debug, Default, Serialize)]
struct Timings {
    final_write_ms: u64,
    checkpoint_ms: u64,
    failure_record_ms: u64,
    log_drain_ms: u64,
    artifacts_ms: u64,
}

/// `result.json`.
#[derive(Debug, Serialize)]
struct Manifest<'a> {
    job_id: &'a str,
    attempt: u32,
    segment: u32,
    status: JobState,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<&'a FailureCause>,
    reason: &'a str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    killed: bool,
    stop_reason: Option<StopReason>,
    started_at: EpochMillis,
    /// When the child was spawned (after prepare: secrets, workspace, restore).
    child_started_at: EpochMillis,
    /// When the child ended (the finalize starts here).
    child_ended_at: EpochMillis,
    finished_at: EpochMillis,
    duration_ms: u64,
    child_deadline_at: EpochMillis,
    invocation_deadline_at: EpochMillis,
    /// How long the child ran.
    child_ms: u64,
    /// Time from the child's end to this manifest.
    finalize_ms: u64,
    /// What was left before the invocation's deadline when the manifest was written.
    deadline_margin_ms: i64,
    finalize: Timings,
    streams: BTreeMap<&'static str, StreamStats>,
    artifacts: Vec<ArtifactEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed_session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_restored: Option<bool>,
    /// Processes the job left behind that had to be killed.
    killed_leftovers: usize,
    progress: &'a Progress,
    agent_version: &'static str,
}

fn epoch_of(at: Instant) -> EpochMillis {
    let now = Instant::now();
    if at >= now {
        now_ms() + (at - now).as_millis() as i64
    } else {
        now_ms() - (now - at).as_millis() as i64
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Time kept after the checkpoint for the failure record, the log drain's end, artifacts
/// and the manifest.
const TAIL: Duration = Duration::from_millis(1500);

/// What the finalize needs besides uploads (final write, failure record, manifest, and a
/// margin): the supervisor keeps at least the grace period plus this before the deadline.
pub(super) const FINAL_OVERHEAD: Duration = Duration::from_secs(4);

/// An attempt that ended before its child started: the final write and the failure
/// record only.
pub(super) async fn record_only(
    deps: &Arc<Deps>,
    input: &RunInput<'_>,
    segment: u32,
    fin: Finish,
) -> Disposition {
    match final_write(deps, input, &fin).await {
        Written::Yes => {
            input.obs.recorded(&fin);
            input.obs.finished(&fin, None, None);
        }
        Written::LeaseLost => return Disposition::Ack,
        Written::No => return Disposition::Retry,
    }
    report_failure(deps, input, &fin, segment).await
}

/// Records everything the run produced; see the module docs for the order.
pub(super) async fn finalize(
    deps: &Arc<Deps>,
    input: &RunInput<'_>,
    prepared: Prepared,
    sup: Supervised,
    clock: Clock,
    segment: u32,
) -> Disposition {
    let job = &input.spec.job_id;
    let deadline = input.invocation_deadline;
    let bucket = deps.settings.bucket().unwrap_or_default().to_owned();
    let layout = deps.settings.layout();
    let mut timings = Timings::default();

    // The uploaders drain while the rest happens.
    let drain_deadline = deadline
        .checked_sub(Duration::from_millis(1000))
        .unwrap_or_else(Instant::now);
    let mut joins = Vec::new();
    for (stream, sink, handle) in sup.streams {
        if let Some(s) = sink {
            s.close(drain_deadline).await;
        }
        joins.push((stream, handle));
    }
    keep_hidden_until(deps, input, deadline).await;

    let redactor = Redactor::new(prepared.redact_values());
    let (state, cause, reason) = classify(
        input.spec,
        &sup.ended,
        sup.stop,
        &sup.progress,
        sup.signal,
        &redactor,
        prepared.resume.is_some(),
    );
    let result_key = layout.result(job, input.attempt);
    let fin = Finish {
        state,
        cause: cause.clone(),
        reason: reason.clone(),
        exit_code: sup.ended.code,
        signal: sup.ended.signal,
        result_key: Some(result_key.clone()),
        progress: sup.progress.clone(),
        runtime_ms: ms(sup.child_ended.duration_since(clock.started)),
    };

    // 1. The record.
    let t = Instant::now();
    let written = if sup.stop == Some(StopReason::LeaseLost) {
        Written::LeaseLost
    } else {
        final_write(deps, input, &fin).await
    };
    timings.final_write_ms = ms(t.elapsed());
    if matches!(written, Written::Yes) {
        input.obs.recorded(&fin);
    }

    // 2. The checkpoint, when the next segment will need it.
    let t = Instant::now();
    let paused = matches!(
        cause,
        Some(FailureCause::TimedOut { resumable: true }) | Some(FailureCause::RateLimited { .. })
    ) && input.spec.resume_policy() == ResumePolicy::Auto;
    let checkpoint_key = match (&written, paused, &sup.progress.session_id) {
        (Written::Yes, true, Some(session)) => {
            let store = checkpoint::Store {
                s3: &deps.clients.s3,
                bucket: &bucket,
                layout,
                kms_key: deps.config.checkpoint_kms_key.as_deref(),
            };
            let until = deadline.checked_sub(TAIL).unwrap_or_else(Instant::now);
            match checkpoint::save(
                store,
                job,
                &prepared.ws,
                prepared.identity(),
                session,
                input.attempt,
                segment,
                until,
            )
            .await
            {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::error!(%job, error = %e, "checkpoint not saved; the next segment starts without the workspace");
                    None
                }
            }
        }
        _ => None,
    };
    timings.checkpoint_ms = ms(t.elapsed());

    // 3. The failure record.
    let t = Instant::now();
    let disposition = match written {
        Written::Yes => report_failure(deps, input, &fin, segment).await,
        Written::LeaseLost => Disposition::Ack,
        Written::No => Disposition::Retry,
    };
    timings.failure_record_ms = ms(t.elapsed());

    // 4. Logs.
    let t = Instant::now();
    let mut streams = BTreeMap::new();
    for (stream, h) in joins {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(drain_deadline + Duration::from_millis(200), h).await {
            Ok(Ok(stats)) => {
                streams.insert(stream.as_str(), stats);
            }
            _ => {
                abort.abort();
                tracing::error!(%job, stream = stream.as_str(), "log upload did not finish before the deadline");
            }
        }
    }
    timings.log_drain_ms = ms(t.elapsed());

    // 5. Artifacts.
    let t = Instant::now();
    let artifacts = upload_artifacts(
        deps,
        input,
        &prepared,
        &bucket,
        deadline
            .checked_sub(Duration::from_millis(700))
            .unwrap_or_else(Instant::now),
    )
    .await;
    timings.artifacts_ms = ms(t.elapsed());

    // 6. The manifest.
    let finished_ms = now_ms();
    let margin = deadline.saturating_duration_since(Instant::now());
    let manifest = Manifest {
        job_id: job.as_str(),
        attempt: input.attempt.get(),
        segment,
        status: state,
        cause: cause.as_ref(),
        reason: &reason,
        exit_code: sup.ended.code,
        signal: sup.ended.signal,
        killed: sup.ended.killed,
        stop_reason: sup.stop,
        started_at: clock.started_ms,
        child_started_at: epoch_of(sup.child_started),
        child_ended_at: epoch_of(sup.child_ended),
        finished_at: finished_ms,
        duration_ms: (finished_ms - clock.started_ms).max(0) as u64,
        child_deadline_at: epoch_of(sup.child_deadline),
        invocation_deadline_at: epoch_of(deadline),
        child_ms: ms(sup.child_ended.duration_since(sup.child_started)),
        finalize_ms: ms(sup.child_ended.elapsed()),
        deadline_margin_ms: margin.as_millis() as i64,
        finalize: timings,
        streams,
        artifacts,
        checkpoint_key,
        resumed_session: prepared.resume.as_deref(),
        checkpoint_restored: prepared.restored,
        killed_leftovers: sup.killed_leftovers,
        progress: &sup.progress,
        agent_version: env!("CARGO_PKG_VERSION"),
    };
    let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let finalize_time = sup.child_ended.elapsed();
    let target = ObjectTarget {
        s3: &deps.clients.s3,
        bucket: &bucket,
        key: &result_key,
        content_type: "application/json",
        kms_key: None,
    };
    let until = deadline
        .checked_sub(Duration::from_millis(100))
        .unwrap_or_else(Instant::now);
    if let Err(e) = stream_object(&target, &mut body.as_slice(), until).await {
        tracing::error!(%job, error = %e, "result manifest upload failed");
    }

    // 7. The workspace (and the job's uid and credentials with it).
    let Prepared {
        ws,
        identity,
        credentials,
        ..
    } = prepared;
    drop(credentials);
    ws.remove().await;
    drop(identity);
    tracing::info!(%job, attempt = %input.attempt, status = %state, margin_ms = margin.as_millis() as u64, "attempt recorded");
    if matches!(written, Written::Yes) {
        input.obs.finished(&fin, Some(finalize_time), Some(margin));
    }
    disposition
}

/// Whether the final write landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    /// Another attempt owns the job: write nothing more.
    LeaseLost,
    /// It failed (transiently, or the store refused it): leave the message to come back.
    No,
}

async fn final_write(deps: &Deps, input: &RunInput<'_>, fin: &Finish) -> Written {
    let job = &input.spec.job_id;
    let write = deps.store.finish(job, input.attempt, fin, now_ms());
    let res = match tokio::time::timeout_at(input.invocation_deadline, write).await {
        Ok(r) => r,
        Err(_) => {
            tracing::error!(%job, "final write did not finish before the deadline");
            return Written::No;
        }
    };
    match res {
        Ok(rec) => {
            tracing::info!(%job, status = %rec.status, reason = %fin.reason, "job finished");
            Written::Yes
        }
        Err(StoreError::Conflict { .. }) => {
            tracing::warn!(%job, "another attempt owns the job now; our result is not recorded");
            Written::LeaseLost
        }
        Err(e) if !e.is_retryable() => {
            // A value the table refuses (an oversized field from the child): record the
            // outcome without the child's progress rather than not at all.
            tracing::error!(%job, error = %e, "final write refused; writing it again without the progress fields");
            let bare = Finish {
                progress: Progress::default(),
                reason: fin.reason.chars().take(2000).collect(),
                ..fin.clone()
            };
            match deps.store.finish(job, input.attempt, &bare, now_ms()).await {
                Ok(_) => Written::Yes,
                Err(StoreError::Conflict { .. }) => Written::LeaseLost,
                Err(e) => {
                    tracing::error!(%job, error = %e, "final write failed; leaving the message for a later attempt");
                    Written::No
                }
            }
        }
        Err(e) => {
            // The lease will go stale and a later delivery takes over.
            tracing::error!(%job, error = %e, "final write failed; leaving the message for a later attempt");
            Written::No
        }
    }
}

/// Sends the failure record of a FAILED/TIMED_OUT attempt; `Retry` when it could not be
/// sent (the redelivered message sends it, see `handler::report_unreported`).
async fn report_failure(
    deps: &Deps,
    input: &RunInput<'_>,
    fin: &Finish,
    segment: u32,
) -> Disposition {
    let job = &input.spec.job_id;
    let (JobState::Failed | JobState::TimedOut, Some(cause)) = (fin.state, fin.cause.clone())
    else {
        return Disposition::Ack;
    };
    let rec = FailureRecord::attempt(
        job,
        input.attempt,
        fin.state,
        cause,
        fin.reason.clone(),
        segment,
        fin.progress.session_id.clone(),
        fin.result_key.clone(),
        Some(input.message_id.clone()),
    );
    if !send_failure(deps, &rec, input.obs.context()).await {
        return Disposition::Retry;
    }
    if let Err(e) = deps.store.mark_failure_reported(job, input.attempt).await {
        tracing::warn!(%job, error = %e, "could not note that the failure was reported");
    }
    Disposition::Ack
}

/// Sends a failure record to the DLQ (the SDK retries transient errors), with the job's
/// trace context for the dispatcher to continue.
pub(crate) async fn send_failure(
    deps: &Deps,
    rec: &FailureRecord,
    trace: Option<agentq_core::telemetry::TraceContext>,
) -> bool {
    let Ok(dlq) = deps.settings.dlq_url() else {
        tracing::error!("AGENTQ_DLQ_URL is not set: the failure record cannot be sent");
        return false;
    };
    let mut req = deps
        .clients
        .sqs
        .send_message()
        .queue_url(dlq)
        .message_body(rec.to_json())
        .message_attributes(
            msg_attr::RECORD_TYPE,
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("failure")
                .build()
                .expect("data type is set"),
        );
    if let Some(t) = trace
        && let Ok(v) = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(t.traceparent())
            .build()
    {
        req = req.message_attributes(msg_attr::TRACEPARENT, v);
    }
    let sent = req.send().await;
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %agentq_core::aws::display(&e), "failure record not sent to the DLQ");
            false
        }
    }
}

/// Pushes the message's visibility past the invocation's deadline, so it does not come
/// back while the attempt is being recorded.
async fn keep_hidden_until(deps: &Deps, input: &RunInput<'_>, deadline: Instant) {
    let Some(v) = &input.visibility else { return };
    let secs = deadline.saturating_duration_since(Instant::now()).as_secs() + 30;
    if let Err(e) = deps
        .clients
        .sqs
        .change_message_visibility()
        .queue_url(&v.queue_url)
        .receipt_handle(&v.receipt_handle)
        .visibility_timeout(secs.min(43_200) as i32)
        .send()
        .await
    {
        tracing::warn!(job = %input.spec.job_id, error = %agentq_core::aws::display(&e), "visibility not extended for the finalize");
    }
}

fn classify(
    spec: &ValidSpec,
    ended: &Ended,
    stop: Option<StopReason>,
    progress: &Progress,
    signal: Option<CliSignal>,
    redactor: &Redactor,
    resuming: bool,
) -> (JobState, Option<FailureCause>, String) {
    let how = match (ended.code, ended.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    };
    let killed = if ended.killed {
        ", killed after the grace period"
    } else {
        ""
    };
    let last = progress
        .last_event
        .as_deref()
        .map(|e| format!("; last event {}", redactor.redact_str(e)))
        .unwrap_or_default();
    match stop {
        Some(StopReason::Cancelled) => (
            JobState::Cancelled,
            Some(FailureCause::Cancelled),
            format!("cancelled on request; child stopped ({how}{killed})"),
        ),
        Some(StopReason::Budget) => (
            JobState::Failed,
            Some(FailureCause::BudgetExceeded),
            format!(
                "the job's spend reached max_budget_usd ({}); child stopped ({how}{killed})",
                spec.spec.max_budget_usd.unwrap_or_default()
            ),
        ),
        Some(StopReason::RateLimited) => {
            let reset_at = match signal {
                Some(CliSignal::RateLimited { reset_at }) => reset_at,
                _ => None,
            };
            let cause = FailureCause::RateLimited { reset_at };
            (
                cause.final_state(),
                Some(cause),
                format!(
                    "the model API rate-limited the agent; child stopped to pause the job ({how}{killed}){}",
                    reset_at
                        .map(|t| format!("; retry after {}", agentq_core::record::rfc3339(t)))
                        .unwrap_or_default()
                ),
            )
        }
        Some(StopReason::Deadline) | Some(StopReason::Shutdown) | Some(StopReason::LeaseLost) => {
            let resumable =
                progress.session_id.is_some() && spec.resume_policy() == ResumePolicy::Auto;
            let why = match stop {
                Some(StopReason::Shutdown) => "the agent is shutting down",
                Some(StopReason::LeaseLost) => "another attempt took over the lease",
                _ => "the deadline was reached",
            };
            (
                JobState::TimedOut,
                Some(FailureCause::TimedOut { resumable }),
                format!("stopped because {why} ({how}{killed})"),
            )
        }
        // The CLI stopped itself at the job's spend cap.
        None if progress.last_event.as_deref() == Some("result/error_max_budget_usd") => (
            JobState::Failed,
            Some(FailureCause::BudgetExceeded),
            format!(
                "the agent CLI stopped at the job's max_budget_usd ({}) ({how})",
                spec.spec.max_budget_usd.unwrap_or_default()
            ),
        ),
        None if ended.code == Some(0) && signal.is_none() => {
            (JobState::Succeeded, None, "exit code 0".into())
        }
        None => match signal {
            Some(CliSignal::ResumeFailed) if resuming => (
                JobState::Failed,
                Some(FailureCause::ResumeFailed),
                format!(
                    "the agent CLI could not resume its session ({how}); the next attempt starts afresh"
                ),
            ),
            Some(CliSignal::RateLimited { reset_at }) => (
                FailureCause::RateLimited { reset_at }.final_state(),
                Some(FailureCause::RateLimited { reset_at }),
                format!(
                    "the model API rate-limited the agent ({how}){}",
                    reset_at
                        .map(|t| format!(
                            "; the limit resets at {}",
                            agentq_core::record::rfc3339(t)
                        ))
                        .unwrap_or_default()
                ),
            ),
            _ if ended.code == Some(0) => (JobState::Succeeded, None, "exit code 0".into()),
            _ => (
                JobState::Failed,
                Some(FailureCause::AgentExit {
                    code: ended.code,
                    signal: ended.signal,
                }),
                format!("the agent exited with {how}{last}"),
            ),
        },
    }
}

/// Whether a file looks like text (no NUL in its first 8 KiB).
async fn is_text(path: &std::path::Path) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return false;
    };
    let mut head = vec![0u8; 8192];
    let Ok(n) = f.read(&mut head).await else {
        return false;
    };
    !head[..n].contains(&0)
}

/// A reader that redacts what it passes through (for text artifacts).
struct RedactingReader<R> {
    inner: R,
    redactor: Redactor,
    pending: Vec<u8>,
    done: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for RedactingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 64 * 1024];
            let mut rb = tokio::io::ReadBuf::new(&mut raw);
            match std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled().to_vec();
                    let out = if filled.is_empty() {
                        self.done = true;
                        self.redactor.finish()
                    } else {
                        self.redactor.push(&filled)
                    };
                    self.pending = out;
                }
            }
        }
    }
}

/// A reader that hashes what it passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if res.is_ready() {
            let new = buf.filled()[before..].to_vec();
            self.hasher.update(&new);
        }
        res
    }
}

async fn upload_artifacts(
    deps: &Deps,
    input: &RunInput<'_>,
    prepared: &Prepared,
    bucket: &str,
    deadline: Instant,
) -> Vec<ArtifactEntry> {
    let layout = deps.settings.layout();
    let values = prepared.redact_values();
    let mut out = Vec::new();
    for (rel, path) in prepared.ws.artifacts(1000).await {
        if Instant::now() >= deadline {
            tracing::warn!(job = %input.spec.job_id, "artifact upload stopped at the deadline");
            break;
        }
        let Some(key) = layout.artifact(&input.spec.job_id, input.attempt, &rel) else {
            continue;
        };
        let Ok(file) = tokio::fs::File::open(&path).await else {
            continue;
        };
        let text = !values.is_empty() && is_text(&path).await;
        let target = ObjectTarget {
            s3: &deps.clients.s3,
            bucket,
            key: &key,
            content_type: if text {
                "text/plain; charset=utf-8"
            } else {
                "application/octet-stream"
            },
            kms_key: None,
        };
        let inner: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if text {
            Box::new(RedactingReader {
                inner: file,
                redactor: Redactor::new(&values),
                pending: Vec::new(),
                done: false,
            })
        } else {
            Box::new(file)
        };
        let mut r = HashingReader {
            inner,
            hasher: Sha256::new(),
        };
        match stream_object(&target, &mut r, deadline).await {
            Ok(bytes) => out.push(ArtifactEntry {
                path: rel,
                key,
                bytes,
                sha256: hex::encode(r.hasher.finalize()),
                redacted: text,
            }),
            Err(e) => {
                tracing::error!(job = %input.spec.job_id, error = %e, "artifact upload failed")
            }
        }
    }
    out
}
