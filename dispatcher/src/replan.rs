//! The re-plan handler: one plain async function over a batch of DLQ messages
//! ([`Replanner::handle`], `SqsEvent` → `SqsBatchResponse`), called by both front ends
//! (the Lambda runtime and the poller).
//!
//! Per message: parse it (explicit failure record, or a raw spec SQS redrove), read the
//! job's record, [`decide`](crate::plan::decide), then apply: the conditional write
//! (`JobStore::replan`, on expected state + attempt) comes BEFORE the SendMessage, so a
//! DLQ message delivered twice enqueues once — the second delivery's write loses, and it
//! reads the plan back instead.
//!
//! The crash window between the write and the SendMessage is closed with a marker:
//! after the send succeeds the dispatcher appends an `enqueued` decision for the same
//! attempt. A later delivery (the same message coming back because it was never
//! acknowledged, or any other DLQ message for the job) that finds the job still
//! claimable at that attempt with the plan unmarked re-sends it once the plan is older
//! than `resend_after` (before that, another dispatcher may be mid-send: the message is
//! left for later). A crash between the send and the marker therefore sends twice at
//! most; the second copy is absorbed by the claim's fencing (it finds the job running or
//! finished). Messages re-enqueued by the dispatcher carry their plan number
//! ([`PLAN_ATTR`]), so a redriven copy of a message that an earlier plan has replaced is
//! recognised and dropped.
//!
//! Messages of one batch that concern the same job are handled in order; different jobs
//! concurrently (a batch is at most 10 messages).
//!
//! Observability: each message is a span continuing the trace its `traceparent` attribute
//! carries; a re-enqueued message carries the context of that span on; every plan counts
//! as a `Replans` metric and notifies the job's new state. A batch ends by flushing them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use agentq_core::failure::DlqMessage;
use agentq_core::layout::msg_attr;
use agentq_core::notify::{Actor, JobEvent};
use agentq_core::payload::PayloadPointer;
use agentq_core::record::{Decision, EpochMillis, now_ms};
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::Replan;
use agentq_core::telemetry::{SpanKind, TraceContext};
use agentq_core::{
    Action, JobId, JobRecord, JobState, JobStore, Observability, Service, StoreError,
};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;
use tracing::{Instrument, info, info_span, warn};

use crate::error::ReplanError;
use crate::plan::{self, BY, Enqueue, Input, Step};
use crate::policy::Policy;

/// Message attribute (Number) on every message the dispatcher enqueues: the plan number
/// it was sent under (how many re-enqueue plans the job had by then). Agents that send a
/// message on (chained delays) keep it.
pub const PLAN_ATTR: &str = agentq_core::layout::msg_attr::PLAN;

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A plan was written (and enqueued when it re-runs the job).
    Planned {
        job_id: String,
        action: Action,
        state: JobState,
        #[serde(skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        delay_seconds: Option<u64>,
    },
    /// A plan whose enqueue was lost was sent again.
    Resent { job_id: String, queue: String },
    /// Nothing to do (duplicate, stale, finished, running).
    Dropped { job_id: String, why: String },
    /// The body names no job: logged, counted and acknowledged.
    Unparseable { why: String },
}

/// Counters over the life of a [`Replanner`].
#[derive(Debug, Default)]
pub struct Stats {
    pub planned: AtomicU64,
    pub resent: AtomicU64,
    pub dropped: AtomicU64,
    pub unparseable: AtomicU64,
    /// Messages left on the DLQ to come back (errors, in-flight plans).
    pub failed: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub planned: u64,
    pub resent: u64,
    pub dropped: u64,
    pub unparseable: u64,
    pub failed: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            planned: self.planned.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            unparseable: self.unparseable.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// The re-planner: clients built once, the validated policy, counters.
#[derive(Debug, Clone)]
pub struct Replanner {
    store: JobStore,
    sqs: aws_sdk_sqs::Client,
    s3: aws_sdk_s3::Client,
    policy: Arc<Policy>,
    validation: ValidationContext,
    stats: Arc<Stats>,
    obs: Observability,
}

tokio::task_local! {
    /// The trace context of the DLQ message being handled: what its re-enqueue carries on.
    static TRACE: Option<TraceContext>;
}

/// How long a batch may take to export its spans and deliver its notifications.
const FLUSH_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// What the body of a redriven message names.
pub(crate) struct Redriven {
    job_id: JobId,
    spec_json: String,
}

impl Replanner {
    pub fn new(
        store: JobStore,
        sqs: aws_sdk_sqs::Client,
        s3: aws_sdk_s3::Client,
        policy: Policy,
        validation: ValidationContext,
    ) -> Self {
        Self {
            store,
            sqs,
            s3,
            policy: Arc::new(policy),
            validation,
            stats: Arc::new(Stats::default()),
            obs: Observability::disabled(Service::Dispatcher),
        }
    }

    /// Replaces the (default: disabled) metrics, tracer and notifier.
    pub fn with_observability(mut self, obs: Observability) -> Self {
        self.obs = obs;
        self
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Handles a batch; the response lists the messages to leave on the DLQ.
    pub async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        // Same job → same group, handled in order; groups run concurrently.
        let mut groups: BTreeMap<String, Vec<SqsMessage>> = BTreeMap::new();
        for (i, m) in event.records.into_iter().enumerate() {
            let key = group_key(&m).unwrap_or_else(|| format!("#{i}"));
            groups.entry(key).or_default().push(m);
        }
        let results = futures::future::join_all(groups.into_values().map(|msgs| async move {
            let mut failed = Vec::new();
            for m in msgs {
                let id = m.message_id.clone().unwrap_or_default();
                let span =
                    info_span!("dlq_message", message_id = %id, job_id = tracing::field::Empty);
                match self.handle_message(&m).instrument(span).await {
                    Ok(_) => {}
                    Err(e) => {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        warn!(message_id = %id, error = %e, retryable = e.is_retryable(), "left on the DLQ for later");
                        failed.push(id);
                    }
                }
            }
            failed
        }))
        .await;
        self.obs
            .flush(tokio::time::Instant::now() + FLUSH_BUDGET)
            .await;
        let mut resp = SqsBatchResponse::default();
        for id in results.into_iter().flatten() {
            let mut f = BatchItemFailure::default();
            f.item_identifier = id;
            resp.batch_item_failures.push(f);
        }
        resp
    }

    /// Handles one DLQ message, in a span that continues the message's trace.
    pub async fn handle_message(&self, msg: &SqsMessage) -> Result<Outcome, ReplanError> {
        let parent = msg
            .message_attributes
            .get(msg_attr::TRACEPARENT)
            .and_then(|a| a.string_value.as_deref())
            .and_then(TraceContext::parse);
        let mut span = self
            .obs
            .telemetry
            .span("agentq.replan", SpanKind::Consumer, parent);
        span.set("messaging.system", "aws_sqs").set(
            "messaging.message.id",
            msg.message_id.as_deref().unwrap_or_default(),
        );
        let res = TRACE
            .scope(span.context(), self.handle_message_in_trace(msg))
            .await;
        match &res {
            Ok(Outcome::Planned {
                job_id,
                action,
                state,
                ..
            }) => {
                span.set("agentq.job_id", job_id.as_str())
                    .set("agentq.action", action.to_string())
                    .set("agentq.state", state.as_str());
            }
            Ok(other) => {
                span.set("agentq.outcome", format!("{other:?}"));
            }
            Err(e) => {
                span.set_error(e.to_string());
            }
        }
        res
    }

    async fn handle_message_in_trace(&self, msg: &SqsMessage) -> Result<Outcome, ReplanError> {
        let body = msg.body.as_deref().unwrap_or_default();
        let outcome = match DlqMessage::parse(body) {
            DlqMessage::Failure(fr) => match fr.job_id.clone() {
                None => Outcome::Unparseable {
                    why: format!("failure record names no job: {}", fr.reason),
                },
                Some(job_id) => {
                    tracing::Span::current().record("job_id", job_id.as_str());
                    self.replan(&job_id, &Input::Failure(&fr), None, None)
                        .await?
                }
            },
            DlqMessage::Redriven(raw) => match self.redriven(&raw).await? {
                Err(why) => Outcome::Unparseable { why },
                Ok(r) => {
                    tracing::Span::current().record("job_id", r.job_id.as_str());
                    let plan_seq = msg
                        .message_attributes
                        .get(PLAN_ATTR)
                        .and_then(|a| a.string_value.as_deref())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    self.replan(&r.job_id, &Input::Redriven { plan_seq }, Some(&r), None)
                        .await?
                }
            },
        };
        self.count(&outcome);
        match &outcome {
            Outcome::Unparseable { why } => {
                warn!(body = %truncate(body, 512), why = %why, "unparseable DLQ message acknowledged")
            }
            other => {
                info!(outcome = %serde_json::to_string(other).unwrap_or_default(), "re-planned")
            }
        }
        Ok(outcome)
    }

    pub(crate) fn count(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Planned { .. } => self.stats.planned.fetch_add(1, Ordering::Relaxed),
            Outcome::Resent { .. } => self.stats.resent.fetch_add(1, Ordering::Relaxed),
            Outcome::Dropped { .. } => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
            Outcome::Unparseable { .. } => self.stats.unparseable.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub(crate) fn store(&self) -> &JobStore {
        &self.store
    }

    pub(crate) fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.sqs
    }

    /// The job a redriven body names (resolving an Extended Client pointer), or why not.
    async fn redriven(&self, raw: &str) -> Result<Result<Redriven, String>, ReplanError> {
        let spec_json = if PayloadPointer::parse(raw).is_some() {
            agentq_core::payload::resolve_body(&self.s3, raw).await?
        } else {
            raw.to_owned()
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&spec_json) else {
            return Ok(Err("the body is not JSON".into()));
        };
        let Some(id) = value.get("job_id").and_then(|v| v.as_str()) else {
            return Ok(Err("the body is JSON but has no job_id".into()));
        };
        match JobId::parse(id) {
            Ok(job_id) => Ok(Ok(Redriven { job_id, spec_json })),
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    /// Decides and applies the plan for one job. `known` is a record the caller already
    /// holds (the sweep's query): it saves the first read; a stale one only costs a
    /// refused write, whose answer carries the current record.
    pub(crate) async fn replan(
        &self,
        job: &JobId,
        input: &Input<'_>,
        redriven: Option<&Redriven>,
        known: Option<JobRecord>,
    ) -> Result<Outcome, ReplanError> {
        let mut rng = fastrand::Rng::new();
        let mut rec = match known {
            Some(r) => Some(r),
            None => self.store.get(job).await?,
        };
        let mut resolved = None;
        for _ in 0..4 {
            // Decide on the spec itself (its max_attempts, timeout, budget, resume, tier),
            // also when the record keeps only its pointer; re-send what the record keeps.
            let readable = match &rec {
                Some(r) => Some(self.readable(r, &mut resolved).await?),
                None => None,
            };
            let now = now_ms();
            match plan::decide(input, readable.as_ref(), &self.policy, now, &mut rng) {
                Step::Drop { why } => {
                    return Ok(Outcome::Dropped {
                        job_id: job.to_string(),
                        why,
                    });
                }
                Step::InFlight { age_ms } => {
                    return Err(ReplanError::InFlight {
                        job_id: job.to_string(),
                        age_ms,
                    });
                }
                Step::CreateRecord => {
                    let Some(r) = redriven else {
                        rec = self.store.get(job).await?;
                        continue;
                    };
                    match JobSpec::parse_valid(r.spec_json.as_bytes(), &self.validation) {
                        Ok(spec) => match self.store.create_queued(&spec, now).await {
                            Ok(created) => rec = Some(created),
                            Err(StoreError::AlreadyExists { .. }) => {
                                rec = self.store.get(job).await?;
                            }
                            Err(e) => return Err(e.into()),
                        },
                        Err(e) => {
                            // The agent would have refused it too: terminal, recorded.
                            let why = format!("invalid_spec is not retryable: {e}");
                            self.store
                                .record_invalid(job, &r.spec_json, &why, now)
                                .await?;
                            let mut ev =
                                JobEvent::new(job.as_str(), JobState::Dead, Actor::Dispatcher);
                            ev.action = Some(Action::Fail.to_string());
                            ev.cause = Some("invalid_spec".into());
                            ev.reason = Some(why);
                            self.observe_plan(ev, rec.as_ref());
                            return Ok(Outcome::Planned {
                                job_id: job.to_string(),
                                action: Action::Fail,
                                state: JobState::Dead,
                                queue: None,
                                delay_seconds: None,
                            });
                        }
                    }
                }
                Step::Resend(enq) => {
                    let Some(r) = rec else { continue };
                    let spec = r.spec.clone().unwrap_or_default();
                    self.enqueue(job, &spec, &enq, now).await?;
                    self.mark_enqueued(job, r.status, r.attempt, &enq, "re-sent", now)
                        .await?;
                    return Ok(Outcome::Resent {
                        job_id: job.to_string(),
                        queue: enq.queue_url,
                    });
                }
                Step::Plan(p) => {
                    let written = match self
                        .store
                        .replan(
                            job,
                            p.expected_state,
                            p.expected_attempt,
                            p.to,
                            &p.decision,
                            &p.changes,
                            now,
                        )
                        .await
                    {
                        Ok(r) => r,
                        // Lost to a concurrent delivery or a claim: decide again from the
                        // record the refusal returned.
                        Err(StoreError::Conflict { current, .. }) => {
                            rec = match current {
                                Some(c) => Some(*c),
                                None => self.store.get(job).await?,
                            };
                            continue;
                        }
                        Err(e @ StoreError::Rejected { .. }) => {
                            return self.give_up(job, &p, e, now).await;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    if let Some(enq) = &p.enqueue {
                        let spec = written.spec.clone().unwrap_or_default();
                        self.enqueue(job, &spec, enq, now).await?;
                        self.mark_enqueued(job, p.to, p.expected_attempt, enq, "sent", now)
                            .await?;
                    }
                    let mut ev = JobEvent::new(job.as_str(), p.to, Actor::Dispatcher);
                    ev.previous_state = Some(p.expected_state);
                    ev.attempt = p.expected_attempt.get();
                    ev.segment = written.segment;
                    ev.action = Some(p.decision.action.to_string());
                    ev.cause = p.decision.cause.clone();
                    ev.reason = Some(p.decision.reason.clone());
                    ev.delay_seconds = p.decision.delay_seconds;
                    self.observe_plan(ev, Some(&written));
                    return Ok(Outcome::Planned {
                        job_id: job.to_string(),
                        action: p.decision.action,
                        state: p.to,
                        queue: p.enqueue.as_ref().map(|e| e.queue_url.clone()),
                        delay_seconds: p.decision.delay_seconds,
                    });
                }
            }
        }
        Err(ReplanError::Contended {
            job_id: job.to_string(),
        })
    }

    /// DynamoDB refused the plan's write as invalid (e.g. the record would pass 400 KB):
    /// the same write can never succeed, so the job ends `DEAD` with a write that adds
    /// nothing to its history. When even that is refused the error stands (the message
    /// stays on the DLQ, and is parked after `DlqMaxReceiveCount` receives).
    async fn give_up(
        &self,
        job: &JobId,
        p: &plan::Plan,
        e: StoreError,
        now: EpochMillis,
    ) -> Result<Outcome, ReplanError> {
        tracing::error!(error = %e, "the plan's write was refused as invalid; ending the job");
        let reason = format!(
            "the job record cannot take the re-plan ({}): {e}",
            p.decision.action
        );
        self.store
            .give_up(job, p.expected_state, p.expected_attempt, &reason, now)
            .await?;
        Ok(Outcome::Planned {
            job_id: job.to_string(),
            action: Action::Dead,
            state: JobState::Dead,
            queue: None,
            delay_seconds: None,
        })
    }

    /// The record with its spec readable: a record that keeps a pointer (a spec too large
    /// for a DynamoDB item, see [`agentq_core::payload::record_spec`]) gets the spec from
    /// S3, once per re-plan (`cache`). A payload that cannot be read for good (expired,
    /// deleted) leaves the record as it is: the plan then uses the default limits.
    async fn readable(
        &self,
        rec: &agentq_core::JobRecord,
        cache: &mut Option<(String, String)>,
    ) -> Result<agentq_core::JobRecord, ReplanError> {
        let Some(body) = rec
            .spec
            .as_deref()
            .filter(|s| PayloadPointer::parse(s).is_some())
        else {
            return Ok(rec.clone());
        };
        let spec = match cache {
            Some((ptr, spec)) if ptr == body => spec.clone(),
            _ => match agentq_core::payload::resolve_body(&self.s3, body).await {
                Ok(spec) => {
                    *cache = Some((body.to_owned(), spec.clone()));
                    spec
                }
                Err(e) if e.is_retryable() => return Err(e.into()),
                Err(e) => {
                    warn!(error = %e, "the record's spec is a pointer that cannot be read; planning with default limits");
                    return Ok(rec.clone());
                }
            },
        };
        let mut readable = rec.clone();
        readable.spec = Some(spec);
        Ok(readable)
    }

    /// Sends the spec to `enq.queue_url`, delayed; above SQS' 900 s the rest of the
    /// delay travels in `agentq-not-before` and the agent sends it on (chained).
    async fn enqueue(
        &self,
        job: &JobId,
        spec: &str,
        enq: &Enqueue,
        now: EpochMillis,
    ) -> Result<(), ReplanError> {
        let (delay_seconds, not_before) = agentq_core::delay::delay_parts(enq.delay, now);
        let mut req = self
            .sqs
            .send_message()
            .queue_url(&enq.queue_url)
            .message_body(spec)
            .delay_seconds(delay_seconds)
            .message_attributes(msg_attr::JOB_ID, string_attr(job.as_str()))
            .message_attributes(PLAN_ATTR, number_attr(enq.plan_seq));
        if let Some(nb) = not_before {
            req = req.message_attributes(msg_attr::NOT_BEFORE, number_attr(nb));
        }
        if let Ok(Some(trace)) = TRACE.try_with(|t| *t) {
            req = req.message_attributes(msg_attr::TRACEPARENT, string_attr(&trace.traceparent()));
        }
        req.send().await.map_err(|e| ReplanError::Sqs {
            job_id: job.to_string(),
            op: "SendMessage",
            queue: enq.queue_url.clone(),
            transient: agentq_core::aws::is_transient(&e),
            message: agentq_core::aws::display(&e),
        })?;
        Ok(())
    }

    /// Exports the spans and delivers the notifications of what was handled so far, until
    /// `until` at the latest (at most [`FLUSH_BUDGET`] from now). A batch does it itself;
    /// callers of [`Replanner::sweep`] call it after each sweep.
    pub async fn flush_observability(&self, until: tokio::time::Instant) {
        let until = until.min(tokio::time::Instant::now() + FLUSH_BUDGET);
        self.obs.flush(until).await;
    }

    /// A plan was written: its `Replans` metric and the job's state-change notification.
    fn observe_plan(&self, mut ev: JobEvent, rec: Option<&agentq_core::JobRecord>) {
        let trace = TRACE.try_with(|t| *t).ok().flatten();
        ev.trace_id = trace.map(|t| t.trace_id_hex());
        if let Some(r) = rec {
            ev.tier = r.tier.clone();
            ev.labels = r.labels.clone();
        }
        self.obs
            .metrics
            .replanned(&agentq_core::metrics::Replanned {
                job_id: &ev.job_id,
                attempt: ev.attempt,
                action: ev.action.as_deref().unwrap_or_default(),
                state: ev.state.unwrap_or(JobState::Dead),
                cause: ev.cause.as_deref(),
                delay_seconds: ev.delay_seconds,
                trace_id: ev.trace_id.clone(),
            });
        self.obs.notifier.notify(ev);
    }

    /// Appends the `enqueued` marker. A conflict means the job was claimed (or moved on)
    /// already, which proves the message arrived: nothing left to mark.
    async fn mark_enqueued(
        &self,
        job: &JobId,
        state: JobState,
        attempt: agentq_core::Attempt,
        enq: &Enqueue,
        verb: &str,
        now: EpochMillis,
    ) -> Result<(), ReplanError> {
        let d = Decision {
            at: now,
            action: Action::Enqueued,
            by: BY.into(),
            attempt: attempt.get(),
            cause: None,
            reason: format!(
                "{verb} to {} as plan {} (delay {} s)",
                enq.queue_url,
                enq.plan_seq,
                enq.delay.as_secs()
            ),
            delay_seconds: Some(enq.delay.as_secs()),
            queue: Some(enq.queue_url.clone()),
        };
        match self
            .store
            .replan(job, state, attempt, state, &d, &Replan::default(), now)
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data type is set")
}

fn number_attr(v: impl ToString) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(v.to_string())
        .build()
        .expect("data type is set")
}

/// The job a message concerns, when cheaply visible.
fn group_key(m: &SqsMessage) -> Option<String> {
    if let Some(id) = m
        .message_attributes
        .get(msg_attr::JOB_ID)
        .and_then(|a| a.string_value.clone())
    {
        return Some(id);
    }
    let v: serde_json::Value = serde_json::from_str(m.body.as_deref()?).ok()?;
    v.get("job_id")?.as_str().map(str::to_owned)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
