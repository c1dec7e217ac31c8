//! The handler: a batch of SQS messages in, a partial batch response out. Each message is
//! processed in its own span; a bad message never poisons the others.
//!
//! Per message: defer it if it is not due yet (`agentq-not-before`, bounded), resolve an
//! offloaded body (configured bucket only, bounded), parse and validate (malformed →
//! recorded and sent to the DLQ once, never ending an existing job), claim (one live run
//! per job, fenced by attempt), shorten the message's visibility at once, and run the
//! job's recorded spec through [`crate::job::run`].

use std::sync::Arc;
use std::time::Duration;

use agentq_core::failure::FailureRecord;
use agentq_core::layout::msg_attr;
use agentq_core::payload::{MAX_PAYLOAD_BYTES, resolve_body_within};
use agentq_core::record::now_ms;
use agentq_core::spec::{JobSpec, ValidSpec, ValidationContext};
use agentq_core::store::{ClaimOutcome, ClaimRequest};
use agentq_core::telemetry::{SpanKind, TraceContext};
use agentq_core::{Attempt, FailureCause, JobId, JobRecord, JobState};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::MessageAttributeValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Deps;
use crate::job::{self, RunInput, VisibilityLease};
use crate::observe::{self, AttemptObs};

/// Largest spec kept whole in the job record.
const RECORD_SPEC_MAX: usize = 300 * 1024;

/// Longest a message may defer itself with `agentq-not-before`; a later time is treated
/// as due (a hostile or broken producer cannot park a message forever).
const MAX_DEFERRAL_MS: i64 = 48 * 3600 * 1000;

/// One invocation: who we are (lease owner) and when it must end.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request_id: String,
    pub deadline: Instant,
}

/// What to tell SQS about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it (ran, recorded, or deliberately dropped): delete.
    Ack,
    /// Leave it: it comes back after its visibility timeout.
    Retry,
}
/// Handles a batch; the failed message ids go into `batchItemFailures`. Before it
/// returns, the batch's spans are exported and its notifications delivered (bounded by
/// the invocation's deadline): a Lambda environment freezes after the response.
pub async fn handle_batch(
    deps: &Arc<Deps>,
    event: SqsEvent,
    inv: &Invocation,
    shutdown: &CancellationToken,
) -> SqsBatchResponse {
    let results = futures::future::join_all(event.records.into_iter().map(|m| {
        let id = m.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!("message", message_id = %id, job_id = tracing::field::Empty, trace_id = tracing::field::Empty);
        async move { (id, Box::pin(process(deps, m, inv, shutdown)).await) }.instrument(span)
    }))
    .await;
    deps.obs
        .flush(
            inv.deadline
                .checked_sub(Duration::from_millis(300))
                .unwrap_or_else(Instant::now),
        )
        .await;
    let mut resp = SqsBatchResponse::default();
    for (id, d) in results {
        if d == Disposition::Retry {
            let mut f = BatchItemFailure::default();
            f.item_identifier = id;
            resp.batch_item_failures.push(f);
        }
    }
    resp
}

fn not_before(m: &SqsMessage) -> Option<i64> {
    m.message_attributes
        .get(msg_attr::NOT_BEFORE)
        .and_then(|a| a.string_value.as_deref())
        .and_then(|s| s.parse().ok())
}

/// Extracts a usable job id from a body that failed validation, if it has one.
fn job_id_of(body: &str) -> Option<JobId> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    JobId::parse(v.get("job_id")?.as_str()?).ok()
}

/// Secrets are checked against the prefix when they are read, so that a spec naming a
/// parameter outside it fails as `secret_denied`, not as a malformed spec.
fn lenient() -> ValidationContext {
    ValidationContext {
        secrets_prefix: "/".into(),
    }
}

/// Reads a message body: inline, or an Extended Client pointer into the configured
/// bucket (bounded).
async fn resolve(deps: &Deps, raw: &str) -> Result<String, agentq_core::payload::PayloadError> {
    resolve_body_within(
        &deps.clients.s3,
        raw,
        deps.settings.bucket().ok(),
        MAX_PAYLOAD_BYTES,
    )
    .await
}

async fn process(
    deps: &Arc<Deps>,
    m: SqsMessage,
    inv: &Invocation,
    shutdown: &CancellationToken,
) -> Disposition {
    let message_id = m.message_id.clone().unwrap_or_default();
    let raw = m.body.clone().unwrap_or_default();
    let mut job_span =
        deps.obs
            .telemetry
            .span("agentq.job", SpanKind::Consumer, observe::parent_of(&m));
    job_span
        .set("messaging.system", "aws_sqs")
        .set("messaging.message.id", message_id.as_str());
    if let Some(t) = job_span.trace_id() {
        tracing::Span::current().record("trace_id", t.as_str());
    }

    if let Some(nb) = not_before(&m)
        && nb > now_ms() + 1000
    {
        if nb - now_ms() <= MAX_DEFERRAL_MS {
            return defer(deps, &m, &raw, nb).await;
        }
        tracing::warn!(
            not_before = nb,
            "agentq-not-before is more than 48 h away; running the message now"
        );
    }

    let body = match resolve(deps, &raw).await {
        Ok(b) => b,
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, "large payload not readable yet; will retry");
            return Disposition::Retry;
        }
        Err(e) => {
            return reject(
                deps,
                &message_id,
                &raw,
                None,
                e.to_string(),
                job_span.context(),
            )
            .await;
        }
    };

    let spec = match JobSpec::parse_valid(body.as_bytes(), &lenient()) {
        Ok(s) => s,
        Err(e) => {
            let job = job_id_of(&body);
            let trace = job_span.context();
            return reject(deps, &message_id, &body, job, e.to_string(), trace).await;
        }
    };
    tracing::Span::current().record("job_id", tracing::field::display(&spec.job_id));
    job_span.set("agentq.job_id", spec.job_id.as_str());

    // Bound the children of this process; the claim waits for a slot.
    let Ok(_permit) = deps.jobs.acquire().await else {
        return Disposition::Retry;
    };
    if Instant::now() + deps.config.reserve * 2 >= inv.deadline {
        tracing::warn!(
            "too little time left in this invocation to start a job; leaving it for later"
        );
        return Disposition::Retry;
    }
    let owner = format!("{}/{}", inv.request_id, message_id);
    // A DynamoDB item holds at most 400 KB: for a spec that came through an S3 pointer
    // and is too big to keep in the record, keep the pointer (re-sendable as it is).
    let mut spec_json = spec.to_json();
    if spec_json.len() > RECORD_SPEC_MAX
        && spec.spec.job_id.is_some()
        && agentq_core::payload::PayloadPointer::parse(&raw).is_some()
    {
        spec_json = raw.clone();
    }
    let claim_span = job_span.child("agentq.claim", SpanKind::Internal);
    let claim = deps
        .store
        .claim(&ClaimRequest {
            job_id: &spec.job_id,
            spec_json: &spec_json,
            tier: spec.spec.tier.as_deref(),
            labels: &spec.spec.labels,
            owner: &owner,
            stale_after_ms: deps.config.stale_after.as_millis() as i64,
            now: now_ms(),
            layout: deps.settings.layout(),
        })
        .await;
    claim_span.end();
    let visibility = match &m.event_source_arn {
        Some(arn) => deps.queue_url_for(arn).await.and_then(|queue_url| {
            m.receipt_handle
                .clone()
                .map(|receipt_handle| VisibilityLease {
                    queue_url,
                    receipt_handle,
                })
        }),
        None => None,
    };
    let (attempt, record, attempt_obs) = match claim {
        Ok(ClaimOutcome::Claimed {
            attempt,
            record,
            takeover,
        }) => {
            if let Some(prev) = takeover {
                tracing::warn!(%attempt, previous = %prev, "took over a stale lease");
            }
            let obs = AttemptObs::claimed(
                deps,
                job_span,
                &spec,
                &record,
                attempt,
                observe::queue_wait(&m),
            );
            (attempt, record, obs)
        }
        Ok(ClaimOutcome::LeaseLive { attempt, owner, .. }) => {
            tracing::info!(%attempt, ?owner, "job is running elsewhere; leaving the message for later");
            if let Some(v) = &visibility {
                set_visibility(deps, v, deps.config.stale_after.as_secs().max(1) as i32).await;
            }
            return Disposition::Retry;
        }
        Ok(ClaimOutcome::Finished { status }) => {
            tracing::info!(%status, "job already finished; acknowledging without running");
            if matches!(status, JobState::Failed | JobState::TimedOut) {
                let trace = job_span.context();
                return report_unreported(deps, &spec.job_id, &message_id, trace).await;
            }
            return Disposition::Ack;
        }
        Err(e) => {
            tracing::warn!(error = %e, retryable = e.is_retryable(), "claim failed; will retry");
            return Disposition::Retry;
        }
    };
    // The first visibility change happens at the claim: whatever the queue's visibility
    // timeout, a run that dies from here on has its message back within the horizon.
    if let Some(v) = &visibility {
        set_visibility(deps, v, deps.config.visibility_horizon as i32).await;
    }

    let input = |spec| RunInput {
        spec,
        attempt,
        record: &record,
        invocation_deadline: inv.deadline,
        visibility: visibility.clone(),
        shutdown: shutdown.clone(),
        message_id: message_id.clone(),
        obs: &attempt_obs,
    };
    // The recorded spec wins: a message that reuses the id of a recorded job only
    // triggers the run of the job's own spec.
    match recorded_spec(deps, &record, &spec).await {
        Ok(None) => job::run(deps, input(&spec)).await,
        Ok(Some(recorded)) => {
            tracing::warn!(
                "the message's spec differs from the job's recorded spec; running the recorded one"
            );
            job::run(deps, input(&recorded)).await
        }
        Err(why) => job::fail_claimed(deps, input(&spec), FailureCause::InfraTransient, why).await,
    }
}

/// The job's recorded spec when it differs from the message's (`None`: the same, or the
/// record has none).
async fn recorded_spec(
    deps: &Deps,
    record: &JobRecord,
    message_spec: &ValidSpec,
) -> Result<Option<ValidSpec>, String> {
    let Some(stored) = record.spec.as_deref() else {
        return Ok(None);
    };
    let ours = message_spec.to_json();
    if stored == ours {
        return Ok(None);
    }
    let body = resolve(deps, stored)
        .await
        .map_err(|e| format!("the job's recorded spec could not be read: {e}"))?;
    let recorded = JobSpec::parse_valid(body.as_bytes(), &lenient())
        .map_err(|e| format!("the job's recorded spec is not valid: {e}"))?;
    let same = serde_json::from_str::<serde_json::Value>(&recorded.to_json()).ok()
        == serde_json::from_str::<serde_json::Value>(&ours).ok();
    Ok((!same).then_some(recorded))
}

async fn set_visibility(deps: &Deps, v: &VisibilityLease, seconds: i32) {
    if let Err(e) = deps
        .clients
        .sqs
        .change_message_visibility()
        .queue_url(&v.queue_url)
        .receipt_handle(&v.receipt_handle)
        .visibility_timeout(seconds)
        .send()
        .await
    {
        tracing::warn!(error = %agentq_core::aws::display(&e), "could not change the message's visibility");
    }
}

/// A redelivered message of a FAILED/TIMED_OUT job: if the run that failed died before
/// its failure record reached the DLQ, send it now so the dispatcher can re-plan.
async fn report_unreported(
    deps: &Deps,
    job: &JobId,
    message_id: &str,
    trace: Option<TraceContext>,
) -> Disposition {
    let rec = match deps.store.get(job).await {
        Ok(Some(r)) => r,
        Ok(None) => return Disposition::Ack,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the record; will retry");
            return Disposition::Retry;
        }
    };
    if !matches!(rec.status, JobState::Failed | JobState::TimedOut)
        || rec.attempt == Attempt::NONE
        || rec.failure_reported == Some(rec.attempt.get())
    {
        return Disposition::Ack;
    }
    let Some(cause) = rec.cause.as_deref().and_then(|k| {
        FailureCause::from_record(k, rec.exit_code, rec.signal, rec.resume_session.is_some())
    }) else {
        return Disposition::Ack;
    };
    tracing::warn!(attempt = %rec.attempt, "the failure of this job was never reported; sending its failure record now");
    let failure = FailureRecord::attempt(
        job,
        rec.attempt,
        rec.status,
        cause,
        rec.reason.clone().unwrap_or_default(),
        rec.segment,
        rec.resume_session.clone(),
        rec.result_key.clone(),
        Some(message_id.to_owned()),
    );
    if !job::send_failure(deps, &failure, trace).await {
        return Disposition::Retry;
    }
    if let Err(e) = deps.store.mark_failure_reported(job, rec.attempt).await {
        tracing::warn!(error = %e, "could not note that the failure was reported");
    }
    Disposition::Ack
}

/// A message that can never run: record it (when it names a job that has no record yet),
/// send a classified failure record to the DLQ once, and acknowledge it so it is not
/// retried in a loop. A job that exists is never touched: a malformed message reusing its
/// id must not end it (the DLQ record then names no job).
async fn reject(
    deps: &Deps,
    message_id: &str,
    body: &str,
    job: Option<JobId>,
    reason: String,
    trace: Option<TraceContext>,
) -> Disposition {
    tracing::warn!(%reason, "malformed message; recording it and sending it to the DLQ");
    let mut recorded = None;
    if let Some(j) = &job {
        match deps.store.record_invalid(j, body, &reason, now_ms()).await {
            Ok(true) => {
                observe::rejected(deps, j.as_str(), &reason, trace);
                recorded = Some(j.clone());
            }
            Ok(false) => {
                tracing::warn!(job = %j, "a malformed message reuses the id of an existing job; the job is left alone")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record the invalid spec");
                if e.is_retryable() {
                    return Disposition::Retry;
                }
            }
        }
    }
    let rec = FailureRecord::invalid(recorded, reason, body, Some(message_id.to_owned()));
    if job::send_failure(deps, &rec, trace).await {
        Disposition::Ack
    } else {
        Disposition::Retry
    }
}

/// A message that must not start yet: send a copy with the remaining delay (SQS allows
/// 900 s per hop; longer waits are chained) and acknowledge this one. The message of a
/// job cancelled (or ended) meanwhile is dropped instead.
async fn defer(deps: &Deps, m: &SqsMessage, body: &str, not_before: i64) -> Disposition {
    let Some(arn) = &m.event_source_arn else {
        return Disposition::Retry;
    };
    let job = m
        .message_attributes
        .get(msg_attr::JOB_ID)
        .and_then(|a| a.string_value.as_deref())
        .and_then(|s| JobId::parse(s).ok())
        .or_else(|| job_id_of(body));
    if let Some(j) = &job {
        match deps.store.get(j).await {
            Ok(Some(rec)) if rec.cancel_requested || rec.status.is_terminal() => {
                tracing::info!(job = %j, status = %rec.status, "deferred message of a cancelled or finished job dropped");
                return Disposition::Ack;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read the record before deferring; will retry");
                return Disposition::Retry;
            }
        }
    }
    let Some(url) = deps.queue_url_for(arn).await else {
        return Disposition::Retry;
    };
    let delay = Duration::from_millis((not_before - now_ms()).max(0) as u64)
        .as_secs()
        .clamp(1, 900) as i32;
    let mut req = deps
        .clients
        .sqs
        .send_message()
        .queue_url(url)
        .message_body(body)
        .delay_seconds(delay);
    for (k, v) in &m.message_attributes {
        let Some(dt) = v.data_type.clone() else {
            continue;
        };
        if let Ok(attr) = MessageAttributeValue::builder()
            .data_type(dt)
            .set_string_value(v.string_value.clone())
            .build()
        {
            req = req.message_attributes(k, attr);
        }
    }
    match req.send().await {
        Ok(_) => {
            tracing::info!(delay, "not due yet; re-sent with the remaining delay");
            Disposition::Ack
        }
        Err(e) => {
            tracing::warn!(error = %agentq_core::aws::display(&e), "could not defer; will retry");
            Disposition::Retry
        }
    }
}
