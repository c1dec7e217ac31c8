//! The handler: a batch of SQS messages in, a partial batch response out. Each message is
//! processed in its own span; a bad message never poisons the others.

use std::sync::Arc;
use std::time::Duration;

use agentq_core::failure::{FAILURE_RECORD_VERSION, FailureRecord};
use agentq_core::layout::msg_attr;
use agentq_core::record::now_ms;
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::{ClaimOutcome, ClaimRequest, StoreError};
use agentq_core::{Attempt, FailureCause, JobId, JobState};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::MessageAttributeValue;
use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Deps;
use crate::job::{self, RunInput, VisibilityLease};

/// Largest spec kept whole in the job record.
const RECORD_SPEC_MAX: usize = 300 * 1024;

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

/// Handles a batch; the failed message ids go into `batchItemFailures`.
pub async fn handle_batch(
    deps: &Arc<Deps>,
    event: SqsEvent,
    inv: &Invocation,
    shutdown: &CancellationToken,
) -> SqsBatchResponse {
    let results = futures::future::join_all(event.records.into_iter().map(|m| {
        let id = m.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!("message", message_id = %id, job_id = tracing::field::Empty);
        async move { (id, process(deps, m, inv, shutdown).await) }.instrument(span)
    }))
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

async fn process(
    deps: &Arc<Deps>,
    m: SqsMessage,
    inv: &Invocation,
    shutdown: &CancellationToken,
) -> Disposition {
    let message_id = m.message_id.clone().unwrap_or_default();
    let raw = m.body.clone().unwrap_or_default();

    if let Some(nb) = not_before(&m)
        && nb > now_ms() + 1000
    {
        return defer(deps, &m, &raw, nb).await;
    }

    let body = match agentq_core::payload::resolve_body(&deps.clients.s3, &raw).await {
        Ok(b) => b,
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, "large payload not readable yet; will retry");
            return Disposition::Retry;
        }
        Err(e) => return reject(deps, &message_id, &raw, None, e.to_string()).await,
    };

    // Secrets are checked against the prefix when they are read, so that a spec naming a
    // parameter outside it fails as `secret_denied`, not as a malformed spec.
    let lenient = ValidationContext {
        secrets_prefix: "/".into(),
    };
    let spec = match JobSpec::parse_valid(body.as_bytes(), &lenient) {
        Ok(s) => s,
        Err(e) => return reject(deps, &message_id, &body, job_id_of(&body), e.to_string()).await,
    };
    tracing::Span::current().record("job_id", tracing::field::display(&spec.job_id));

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
    let (attempt, record) = match claim {
        Ok(ClaimOutcome::Claimed {
            attempt,
            record,
            takeover,
        }) => {
            if let Some(prev) = takeover {
                tracing::warn!(%attempt, previous = %prev, "took over a stale lease");
            }
            (attempt, record)
        }
        Ok(ClaimOutcome::LeaseLive { attempt, owner, .. }) => {
            tracing::info!(%attempt, ?owner, "job is running elsewhere; leaving the message for later");
            if let Some(v) = &visibility {
                let _ = deps
                    .clients
                    .sqs
                    .change_message_visibility()
                    .queue_url(&v.queue_url)
                    .receipt_handle(&v.receipt_handle)
                    .visibility_timeout(deps.config.stale_after.as_secs().max(1) as i32)
                    .send()
                    .await;
            }
            return Disposition::Retry;
        }
        Ok(ClaimOutcome::Finished { status }) => {
            tracing::info!(%status, "job already finished; acknowledging without running");
            if matches!(status, JobState::Failed | JobState::TimedOut) {
                return report_unreported(deps, &spec.job_id, &message_id).await;
            }
            return Disposition::Ack;
        }
        Err(e) => {
            tracing::warn!(error = %e, retryable = e.is_retryable(), "claim failed; will retry");
            return Disposition::Retry;
        }
    };

    let outcome = job::run(
        deps,
        RunInput {
            spec: &spec,
            attempt,
            record: &record,
            invocation_deadline: inv.deadline,
            visibility,
            shutdown: shutdown.clone(),
        },
    )
    .await;
    if outcome.lease_lost {
        return Disposition::Ack;
    }
    let fin = outcome.finish;
    let write = || async {
        deps.store
            .finish(&spec.job_id, attempt, &fin, now_ms())
            .await
    };
    match write
        .retry(
            ExponentialBuilder::default()
                .with_max_times(3)
                .with_jitter(),
        )
        .when(StoreError::is_retryable)
        .await
    {
        Ok(rec) => tracing::info!(status = %rec.status, reason = %fin.reason, "job finished"),
        Err(StoreError::Conflict { .. }) => {
            tracing::warn!("another attempt owns the job now; our result is not recorded");
            return Disposition::Ack;
        }
        Err(e) => {
            // The lease will go stale and a later delivery takes over.
            tracing::error!(error = %e, "final write failed; leaving the message for a later attempt");
            return Disposition::Retry;
        }
    }
    if matches!(fin.state, JobState::Failed | JobState::TimedOut)
        && let Some(cause) = fin.cause.clone()
    {
        let rec = FailureRecord {
            agentq_failure: FAILURE_RECORD_VERSION,
            job_id: Some(spec.job_id.clone()),
            attempt,
            state: fin.state,
            cause,
            reason: fin.reason.clone(),
            at: now_ms(),
            segment: outcome.segment,
            session_id: fin.progress.session_id.clone(),
            result_key: fin.result_key.clone(),
            raw_body: None,
            message_id: Some(message_id),
        };
        if send_failure(deps, &rec).await
            && let Err(e) = deps
                .store
                .mark_failure_reported(&spec.job_id, attempt)
                .await
        {
            tracing::warn!(error = %e, "could not note that the failure was reported");
        }
    }
    Disposition::Ack
}

/// A redelivered message of a FAILED/TIMED_OUT job: if the run that failed died before
/// its failure record reached the DLQ, send it now so the dispatcher can re-plan.
async fn report_unreported(deps: &Deps, job: &JobId, message_id: &str) -> Disposition {
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
    let failure = FailureRecord {
        agentq_failure: FAILURE_RECORD_VERSION,
        job_id: Some(job.clone()),
        attempt: rec.attempt,
        state: rec.status,
        cause,
        reason: rec.reason.clone().unwrap_or_default(),
        at: now_ms(),
        segment: rec.segment,
        session_id: rec.resume_session.clone(),
        result_key: rec.result_key.clone(),
        raw_body: None,
        message_id: Some(message_id.to_owned()),
    };
    if !send_failure(deps, &failure).await {
        return Disposition::Retry;
    }
    if let Err(e) = deps.store.mark_failure_reported(job, rec.attempt).await {
        tracing::warn!(error = %e, "could not note that the failure was reported");
    }
    Disposition::Ack
}

/// A message that can never run: record it (when it names a job), send a classified
/// failure record to the DLQ once, and acknowledge it so it is not retried in a loop.
async fn reject(
    deps: &Deps,
    message_id: &str,
    body: &str,
    job: Option<JobId>,
    reason: String,
) -> Disposition {
    tracing::warn!(%reason, "malformed message; recording it and sending it to the DLQ");
    if let Some(j) = &job
        && let Err(e) = deps.store.record_invalid(j, body, &reason, now_ms()).await
    {
        tracing::warn!(error = %e, "could not record the invalid spec");
        if e.is_retryable() {
            return Disposition::Retry;
        }
    }
    let rec = FailureRecord {
        agentq_failure: FAILURE_RECORD_VERSION,
        job_id: job,
        attempt: Attempt::NONE,
        state: JobState::Dead,
        cause: FailureCause::InvalidSpec,
        reason,
        at: now_ms(),
        segment: 1,
        session_id: None,
        result_key: None,
        raw_body: Some(body.chars().take(64 * 1024).collect()),
        message_id: Some(message_id.to_owned()),
    };
    if send_failure(deps, &rec).await {
        Disposition::Ack
    } else {
        Disposition::Retry
    }
}

async fn send_failure(deps: &Deps, rec: &FailureRecord) -> bool {
    let Ok(dlq) = deps.settings.dlq_url() else {
        tracing::error!("AGENTQ_DLQ_URL is not set: the failure record cannot be sent");
        return false;
    };
    let body = rec.to_json();
    let send = || async {
        deps.clients
            .sqs
            .send_message()
            .queue_url(dlq)
            .message_body(&body)
            .message_attributes(
                msg_attr::RECORD_TYPE,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("failure")
                    .build()
                    .expect("data type is set"),
            )
            .send()
            .await
    };
    match send
        .retry(
            ExponentialBuilder::default()
                .with_max_times(4)
                .with_jitter(),
        )
        .when(agentq_core::aws::is_transient)
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %agentq_core::aws::display(&e), "failure record not sent to the DLQ");
            false
        }
    }
}

/// A message that must not start yet: send a copy with the remaining delay (SQS allows
/// 900 s per hop; longer waits are chained) and acknowledge this one.
async fn defer(deps: &Deps, m: &SqsMessage, body: &str, not_before: i64) -> Disposition {
    let Some(arn) = &m.event_source_arn else {
        return Disposition::Retry;
    };
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
