//! The jobs table: every state transition as a conditional DynamoDB write. A claim takes
//! the lease with `attempt + 1`; heartbeats and final writes are conditional on the
//! attempt (fencing), so a zombie run can never overwrite a newer one.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::ids::{Attempt, JobId};
use crate::layout::{STATUS_INDEX, attr};
use crate::record::{AttemptRecord, Decision, EpochMillis, JobRecord, Progress};
use crate::spec::ValidSpec;
use crate::state::{FailureCause, JobState};

/// How long records are kept after their last change (the table's TTL).
pub const DEFAULT_RETENTION_DAYS: i64 = 30;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A jobs-table operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {job_id} already exists: pick another job_id, or omit it to have one generated")]
    AlreadyExists { job_id: JobId },
    #[error("job {job_id} not found in table {table}")]
    NotFound { job_id: JobId, table: String },
    /// The conditional write lost: the job moved on, or another attempt holds the lease.
    #[error("job {job_id}: {what}")]
    Conflict { job_id: JobId, what: String },
    #[error("job {job_id}: DynamoDB {op} on table {table} failed: {message}")]
    Aws {
        job_id: String,
        op: &'static str,
        table: String,
        transient: bool,
        message: String,
        #[source]
        source: BoxError,
    },
    #[error("job {job_id}: the record in table {table} cannot be read: {source}")]
    Corrupt {
        job_id: String,
        table: String,
        #[source]
        source: serde_dynamo::Error,
    },
}

impl StoreError {
    /// Whether the same call could succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Aws {
                transient: true,
                ..
            }
        )
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// The lease is ours under this attempt. `takeover` is the previous attempt whose
    /// lease was stale; `resume_session` is set when the dispatcher asked to resume.
    Claimed {
        attempt: Attempt,
        record: Box<JobRecord>,
        takeover: Option<Attempt>,
    },
    /// Another run holds a live lease: leave the message for later.
    LeaseLive {
        attempt: Attempt,
        owner: Option<String>,
        heartbeat_at: Option<EpochMillis>,
    },
    /// The job is finished (for this attempt at least): acknowledge without running.
    Finished { status: JobState },
}

/// Inputs of a claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub job_id: &'a JobId,
    /// The spec JSON, stored when the record is created by this claim.
    pub spec_json: &'a str,
    pub tier: Option<&'a str>,
    pub labels: &'a std::collections::BTreeMap<String, String>,
    /// Lease owner: Lambda request id or poller id.
    pub owner: &'a str,
    /// A RUNNING lease whose heartbeat is older than this may be taken over.
    pub stale_after_ms: i64,
    pub now: EpochMillis,
    /// The S3 layout, to record each attempt's log prefix.
    pub layout: &'a crate::layout::Layout,
}

/// Final outcome of an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub state: JobState,
    pub cause: Option<FailureCause>,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub result_key: Option<String>,
    pub progress: Progress,
    pub runtime_ms: u64,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub cancel_requested: bool,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job had not started: it is `CANCELLED` now and will never run.
    Cancelled,
    /// The job runs: the flag is set and the agent stops it at its next heartbeat.
    Flagged,
    /// Already finished in this state; nothing changed.
    AlreadyFinished(JobState),
}

/// Changes a re-plan makes besides the state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replan {
    pub resume_session: Option<String>,
    pub next_segment: bool,
    pub tier: Option<String>,
}

/// The jobs table.
#[derive(Debug, Clone)]
pub struct JobStore {
    client: Client,
    table: String,
    retention_days: i64,
}

/// Builds one UpdateItem's expressions without retyping attribute names.
#[derive(Default)]
struct Expr {
    sets: Vec<String>,
    adds: Vec<String>,
    removes: Vec<String>,
    conds: Vec<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Expr {
    fn name(&mut self, attr: &str) -> String {
        let key = format!(
            "#{}",
            attr.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        self.names.insert(key.clone(), attr.to_owned());
        key
    }
    fn val(&mut self, v: AttributeValue) -> String {
        let key = format!(":v{}", self.values.len());
        self.values.insert(key.clone(), v);
        key
    }
    fn set(&mut self, attr: &str, v: AttributeValue) -> &mut Self {
        let n = self.name(attr);
        let v = self.val(v);
        self.sets.push(format!("{n} = {v}"));
        self
    }
    /// `SET a.b.c = v` (every segment goes through a name placeholder).
    fn set_at(&mut self, path: &[&str], v: AttributeValue) -> &mut Self {
        let p: Vec<String> = path.iter().map(|seg| self.name(seg)).collect();
        let v = self.val(v);
        self.sets.push(format!("{} = {v}", p.join(".")));
        self
    }
    fn set_path(&mut self, parent: &str, child: &str, v: AttributeValue) -> &mut Self {
        self.set_at(&[parent, child], v)
    }
    /// `ADD attr v`: atomic increment of a number (a missing attribute counts as 0).
    fn add(&mut self, attr: &str, v: AttributeValue) -> &mut Self {
        let n = self.name(attr);
        let v = self.val(v);
        self.adds.push(format!("{n} {v}"));
        self
    }
    fn remove(&mut self, attr: &str) -> &mut Self {
        let n = self.name(attr);
        self.removes.push(n);
        self
    }
    fn append(&mut self, attr: &str, item: AttributeValue) -> &mut Self {
        let n = self.name(attr);
        let empty = self.val(AttributeValue::L(vec![]));
        let v = self.val(AttributeValue::L(vec![item]));
        self.sets.push(format!(
            "{n} = list_append(if_not_exists({n}, {empty}), {v})"
        ));
        self
    }
    fn cond_eq(&mut self, attr: &str, v: AttributeValue) -> &mut Self {
        let n = self.name(attr);
        let v = self.val(v);
        self.conds.push(format!("{n} = {v}"));
        self
    }
    fn cond_state_in(&mut self, states: &[JobState]) -> &mut Self {
        let n = self.name(attr::STATUS);
        let vals: Vec<String> = states
            .iter()
            .map(|s| self.val(s_attr(s.as_str())))
            .collect();
        self.conds.push(format!("{n} IN ({})", vals.join(", ")));
        self
    }
    fn update_expression(&self) -> String {
        let mut out = String::new();
        if !self.sets.is_empty() {
            out.push_str("SET ");
            out.push_str(&self.sets.join(", "));
        }
        if !self.removes.is_empty() {
            out.push_str(" REMOVE ");
            out.push_str(&self.removes.join(", "));
        }
        if !self.adds.is_empty() {
            out.push_str(" ADD ");
            out.push_str(&self.adds.join(", "));
        }
        out
    }
    fn condition(&self) -> Option<String> {
        (!self.conds.is_empty()).then(|| self.conds.join(" AND "))
    }
}

fn s_attr(s: &str) -> AttributeValue {
    AttributeValue::S(s.to_owned())
}
fn n_attr(n: impl ToString) -> AttributeValue {
    AttributeValue::N(n.to_string())
}
fn to_av<T: serde::Serialize>(v: &T) -> AttributeValue {
    serde_dynamo::to_attribute_value(v).unwrap_or(AttributeValue::Null(true))
}

fn is_conditional<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    e.as_service_error()
        .and_then(|se| se.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

impl JobStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn expires_at(&self, now: EpochMillis) -> AttributeValue {
        n_attr(now / 1000 + self.retention_days * 86_400)
    }

    fn aws_err<E>(&self, job: &str, op: &'static str, e: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        StoreError::Aws {
            job_id: job.to_owned(),
            op,
            table: self.table.clone(),
            transient: crate::aws::is_transient(&e),
            message: crate::aws::display(&e),
            source: Box::new(e),
        }
    }

    fn key(job: &JobId) -> HashMap<String, AttributeValue> {
        HashMap::from([(attr::JOB_ID.to_owned(), s_attr(job.as_str()))])
    }

    fn parse(
        &self,
        job: &str,
        item: HashMap<String, AttributeValue>,
    ) -> Result<JobRecord, StoreError> {
        serde_dynamo::from_item(item).map_err(|source| StoreError::Corrupt {
            job_id: job.to_owned(),
            table: self.table.clone(),
            source,
        })
    }

    /// Writes a new `QUEUED` record; refuses an existing job id.
    pub async fn create_queued(
        &self,
        spec: &ValidSpec,
        now: EpochMillis,
    ) -> Result<JobRecord, StoreError> {
        let mut rec = JobRecord::new(spec.job_id.clone(), JobState::Queued, now);
        rec.spec = Some(spec.to_json());
        rec.tier = spec.spec.tier.clone();
        rec.labels = spec.spec.labels.clone();
        rec.expires_at = Some(now / 1000 + self.retention_days * 86_400);
        self.put_new(&rec).await?;
        Ok(rec)
    }

    async fn put_new(&self, rec: &JobRecord) -> Result<(), StoreError> {
        let item = serde_dynamo::to_item(rec).map_err(|source| StoreError::Corrupt {
            job_id: rec.job_id.to_string(),
            table: self.table.clone(),
            source,
        })?;
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", attr::JOB_ID)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional(&e) => Err(StoreError::AlreadyExists {
                job_id: rec.job_id.clone(),
            }),
            Err(e) => Err(self.aws_err(rec.job_id.as_str(), "PutItem", e)),
        }
    }

    /// Reads a record (strongly consistent).
    pub async fn get(&self, job: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(job)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.aws_err(job.as_str(), "GetItem", e))?;
        out.item
            .map(|item| self.parse(job.as_str(), item))
            .transpose()
    }

    /// Like [`get`](Self::get), but a missing record is an error.
    pub async fn require(&self, job: &JobId) -> Result<JobRecord, StoreError> {
        self.get(job).await?.ok_or_else(|| StoreError::NotFound {
            job_id: job.clone(),
            table: self.table.clone(),
        })
    }

    async fn update(
        &self,
        job: &JobId,
        op: &'static str,
        expr: Expr,
        conflict: impl FnOnce() -> String,
    ) -> Result<JobRecord, StoreError> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(job)))
            .update_expression(expr.update_expression())
            .set_expression_attribute_names(Some(expr.names.clone()))
            .set_expression_attribute_values(Some(expr.values.clone()))
            .return_values(ReturnValue::AllNew);
        if let Some(c) = expr.condition() {
            req = req.condition_expression(c);
        }
        match req.send().await {
            Ok(out) => self.parse(job.as_str(), out.attributes.unwrap_or_default()),
            Err(e) if is_conditional(&e) => Err(StoreError::Conflict {
                job_id: job.clone(),
                what: conflict(),
            }),
            Err(e) => Err(self.aws_err(job.as_str(), op, e)),
        }
    }

    /// Takes the lease for a run, creating the record when an upstream system published
    /// the job straight to the queue. Loops on lost races (bounded).
    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..5 {
            let Some(rec) = self.get(req.job_id).await? else {
                let mut rec = JobRecord::new(req.job_id.clone(), JobState::Running, req.now);
                rec.spec = Some(req.spec_json.to_owned());
                rec.tier = req.tier.map(str::to_owned);
                rec.labels = req.labels.clone();
                rec.attempt = Attempt(1);
                rec.started_at = Some(req.now);
                rec.lease_owner = Some(req.owner.to_owned());
                rec.heartbeat_at = Some(req.now);
                rec.expires_at = Some(req.now / 1000 + self.retention_days * 86_400);
                rec.attempts.insert(
                    "1".into(),
                    AttemptRecord {
                        started_at: req.now,
                        owner: Some(req.owner.to_owned()),
                        log_prefix: Some(req.layout.attempt_prefix(req.job_id, Attempt(1))),
                        segment: 1,
                        ..Default::default()
                    },
                );
                match self.put_new(&rec).await {
                    Ok(()) => {
                        return Ok(ClaimOutcome::Claimed {
                            attempt: Attempt(1),
                            record: Box::new(rec),
                            takeover: None,
                        });
                    }
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e),
                }
            };

            if rec.status.is_finished() {
                return Ok(ClaimOutcome::Finished { status: rec.status });
            }
            if rec.cancel_requested && rec.status.is_claimable() {
                match self.cancel_unstarted(&rec, req.now).await {
                    Ok(()) => {
                        return Ok(ClaimOutcome::Finished {
                            status: JobState::Cancelled,
                        });
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let takeover = match rec.status {
                JobState::Running => {
                    let hb = rec.heartbeat_at.unwrap_or(rec.updated_at);
                    if req.now - hb < req.stale_after_ms {
                        return Ok(ClaimOutcome::LeaseLive {
                            attempt: rec.attempt,
                            owner: rec.lease_owner.clone(),
                            heartbeat_at: rec.heartbeat_at,
                        });
                    }
                    Some(rec.attempt)
                }
                _ => None,
            };
            let next = rec.attempt.next();
            let mut e = Expr::default();
            e.cond_state_in(&[rec.status])
                .cond_eq(attr::ATTEMPT, n_attr(rec.attempt.get()));
            if let (Some(_), Some(hb)) = (takeover, rec.heartbeat_at) {
                e.cond_eq(attr::HEARTBEAT_AT, n_attr(hb));
            }
            e.set(attr::STATUS, s_attr(JobState::Running.as_str()))
                .set(attr::ATTEMPT, n_attr(next.get()))
                .set(attr::LEASE_OWNER, s_attr(req.owner))
                .set(attr::HEARTBEAT_AT, n_attr(req.now))
                .set(attr::STARTED_AT, n_attr(req.now))
                .set(attr::UPDATED_AT, n_attr(req.now))
                .set(attr::PROGRESS, to_av(&Progress::default()))
                .set_path(
                    attr::ATTEMPTS,
                    &next.to_string(),
                    to_av(&AttemptRecord {
                        started_at: req.now,
                        owner: Some(req.owner.to_owned()),
                        log_prefix: Some(req.layout.attempt_prefix(req.job_id, next)),
                        segment: rec.segment,
                        ..Default::default()
                    }),
                );
            if let Some(prev) = takeover {
                // The old attempt vanished without a final write: record it as crashed.
                let mut old = rec
                    .attempts
                    .get(&prev.to_string())
                    .cloned()
                    .unwrap_or_default();
                old.finished_at = Some(req.now);
                old.status = Some(JobState::Failed);
                old.cause = Some(FailureCause::Crashed.kind().into());
                old.reason = Some("lease went stale: the run stopped heartbeating".into());
                e.set_path(attr::ATTEMPTS, &prev.to_string(), to_av(&old));
                e.append(
                    attr::HISTORY,
                    to_av(&Decision {
                        at: req.now,
                        action: "takeover".into(),
                        by: req.owner.to_owned(),
                        attempt: next.get(),
                        cause: Some(FailureCause::Crashed.kind().into()),
                        reason: format!(
                            "attempt {prev} stopped heartbeating; attempt {next} takes over"
                        ),
                        ..Default::default()
                    }),
                );
            }
            match self
                .update(req.job_id, "UpdateItem(claim)", e, || {
                    "lost claim race".into()
                })
                .await
            {
                Ok(record) => {
                    return Ok(ClaimOutcome::Claimed {
                        attempt: next,
                        record: Box::new(record),
                        takeover,
                    });
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            job_id: req.job_id.clone(),
            what: "claim kept losing races; leaving the message for later".into(),
        })
    }

    async fn cancel_unstarted(&self, rec: &JobRecord, now: EpochMillis) -> Result<(), StoreError> {
        let mut e = Expr::default();
        e.cond_state_in(&[rec.status])
            .set(attr::STATUS, s_attr(JobState::Cancelled.as_str()))
            .set(attr::CAUSE, s_attr(FailureCause::Cancelled.kind()))
            .set(attr::REASON, s_attr("cancelled before it started"))
            .set(attr::FINISHED_AT, n_attr(now))
            .set(attr::UPDATED_AT, n_attr(now));
        self.update(&rec.job_id, "UpdateItem(cancel)", e, || {
            "state changed".into()
        })
        .await
        .map(|_| ())
    }

    /// Records liveness and progress; fails with `Conflict` once the lease is lost.
    pub async fn heartbeat(
        &self,
        job: &JobId,
        attempt: Attempt,
        progress: &Progress,
        now: EpochMillis,
    ) -> Result<HeartbeatAck, StoreError> {
        let mut e = Expr::default();
        e.cond_state_in(&[JobState::Running])
            .cond_eq(attr::ATTEMPT, n_attr(attempt.get()))
            .set(attr::HEARTBEAT_AT, n_attr(now))
            .set(attr::UPDATED_AT, n_attr(now))
            .set(attr::PROGRESS, to_av(progress));
        let rec = self
            .update(job, "UpdateItem(heartbeat)", e, || {
                format!("lease of attempt {attempt} lost")
            })
            .await?;
        Ok(HeartbeatAck {
            cancel_requested: rec.cancel_requested,
        })
    }

    /// The final write of an attempt, fenced by the attempt number.
    pub async fn finish(
        &self,
        job: &JobId,
        attempt: Attempt,
        fin: &Finish,
        now: EpochMillis,
    ) -> Result<JobRecord, StoreError> {
        // One write, no read: totals are ADDed, and the attempt's map (made by the claim)
        // is completed field by field.
        let mut e = Expr::default();
        e.cond_state_in(fin.state.allowed_from())
            .cond_eq(attr::ATTEMPT, n_attr(attempt.get()))
            .set(attr::STATUS, s_attr(fin.state.as_str()))
            .set(attr::REASON, s_attr(&fin.reason))
            .set(attr::FINISHED_AT, n_attr(now))
            .set(attr::UPDATED_AT, n_attr(now))
            .set(attr::PROGRESS, to_av(&fin.progress))
            .set(attr::EXPIRES_AT, self.expires_at(now))
            .add(attr::RUNTIME_MS, n_attr(fin.runtime_ms))
            .add(attr::COST_USD, n_attr(fin.progress.cost_usd));
        match &fin.cause {
            Some(c) => e.set(attr::CAUSE, s_attr(c.kind())),
            None => e.remove(attr::CAUSE),
        };
        match fin.exit_code {
            Some(c) => e.set(attr::EXIT_CODE, n_attr(c)),
            None => e.remove(attr::EXIT_CODE),
        };
        match fin.signal {
            Some(s) => e.set(attr::SIGNAL, n_attr(s)),
            None => e.remove(attr::SIGNAL),
        };
        if let Some(k) = &fin.result_key {
            e.set(attr::RESULT_KEY, s_attr(k));
        }
        if let Some(s) = &fin.progress.session_id {
            e.set(attr::RESUME_SESSION, s_attr(s));
        }
        let n = attempt.to_string();
        let at = |field: &'static str| [attr::ATTEMPTS, n.as_str(), field];
        e.set_at(&at(attr::attempt::FINISHED_AT), n_attr(now))
            .set_at(&at(attr::attempt::STATUS), s_attr(fin.state.as_str()))
            .set_at(&at(attr::attempt::REASON), s_attr(&fin.reason));
        if let Some(c) = &fin.cause {
            e.set_at(&at(attr::attempt::CAUSE), s_attr(c.kind()));
        }
        if let Some(c) = fin.exit_code {
            e.set_at(&at(attr::attempt::EXIT_CODE), n_attr(c));
        }
        if let Some(sig) = fin.signal {
            e.set_at(&at(attr::attempt::SIGNAL), n_attr(sig));
        }
        self.update(job, "UpdateItem(finish)", e, || {
            format!("attempt {attempt} no longer holds the job; final write refused")
        })
        .await
    }

    /// Notes that the failure record of `attempt` reached the DLQ.
    pub async fn mark_failure_reported(
        &self,
        job: &JobId,
        attempt: Attempt,
    ) -> Result<(), StoreError> {
        let mut e = Expr::default();
        e.cond_eq(attr::ATTEMPT, n_attr(attempt.get()))
            .set(attr::FAILURE_REPORTED, n_attr(attempt.get()));
        self.update(job, "UpdateItem(reported)", e, || {
            format!("attempt {attempt} no longer holds the job")
        })
        .await
        .map(|_| ())
    }

    /// Records a job whose message could not be run at all (malformed spec), when no
    /// record of that id exists. Returns whether it made one: an existing job is never
    /// touched (a malformed message that reuses its id must not end it).
    pub async fn record_invalid(
        &self,
        job: &JobId,
        raw_spec: &str,
        reason: &str,
        now: EpochMillis,
    ) -> Result<bool, StoreError> {
        let mut rec = JobRecord::new(job.clone(), JobState::Dead, now);
        rec.spec = Some(raw_spec.chars().take(64 * 1024).collect());
        rec.cause = Some(FailureCause::InvalidSpec.kind().into());
        rec.reason = Some(reason.to_owned());
        rec.finished_at = Some(now);
        rec.expires_at = Some(now / 1000 + self.retention_days * 86_400);
        match self.put_new(&rec).await {
            Ok(()) => Ok(true),
            Err(StoreError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks for a job to stop. A job that has not started is cancelled at once.
    pub async fn request_cancel(
        &self,
        job: &JobId,
        by: &str,
        now: EpochMillis,
    ) -> Result<CancelOutcome, StoreError> {
        for _ in 0..5 {
            let rec = self.require(job).await?;
            if rec.status.is_finished() {
                return Ok(CancelOutcome::AlreadyFinished(rec.status));
            }
            let mut e = Expr::default();
            e.cond_state_in(&[rec.status])
                .cond_eq(attr::ATTEMPT, n_attr(rec.attempt.get()))
                .set(attr::CANCEL_REQUESTED, AttributeValue::Bool(true))
                .set(attr::UPDATED_AT, n_attr(now))
                .append(
                    attr::HISTORY,
                    to_av(&Decision {
                        at: now,
                        action: "cancel".into(),
                        by: by.to_owned(),
                        attempt: rec.attempt.get(),
                        reason: "cancel requested".into(),
                        ..Default::default()
                    }),
                );
            let running = rec.status == JobState::Running;
            if !running {
                e.set(attr::STATUS, s_attr(JobState::Cancelled.as_str()))
                    .set(attr::CAUSE, s_attr(FailureCause::Cancelled.kind()))
                    .set(attr::REASON, s_attr("cancelled before it started"))
                    .set(attr::FINISHED_AT, n_attr(now));
            }
            match self.update(job, "UpdateItem(cancel)", e, String::new).await {
                Ok(_) if running => return Ok(CancelOutcome::Flagged),
                Ok(_) => return Ok(CancelOutcome::Cancelled),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            job_id: job.clone(),
            what: "the job kept changing while cancelling; try again".into(),
        })
    }

    /// A dispatcher decision: moves `expected_state`/`expected_attempt` to `to`,
    /// conditionally, so a duplicate DLQ message cannot apply twice.
    // The fence (expected state + attempt) and the change are deliberately explicit.
    #[allow(clippy::too_many_arguments)]
    pub async fn replan(
        &self,
        job: &JobId,
        expected_state: JobState,
        expected_attempt: Attempt,
        to: JobState,
        decision: &Decision,
        changes: &Replan,
        now: EpochMillis,
    ) -> Result<JobRecord, StoreError> {
        let mut e = Expr::default();
        e.cond_state_in(&[expected_state])
            .cond_eq(attr::ATTEMPT, n_attr(expected_attempt.get()))
            .set(attr::STATUS, s_attr(to.as_str()))
            .set(attr::UPDATED_AT, n_attr(now))
            .set(attr::EXPIRES_AT, self.expires_at(now))
            .append(attr::HISTORY, to_av(decision));
        if to.is_terminal() {
            e.set(attr::FINISHED_AT, n_attr(now))
                .set(attr::REASON, s_attr(&decision.reason));
        }
        if let Some(s) = &changes.resume_session {
            e.set(attr::RESUME_SESSION, s_attr(s));
        }
        if changes.next_segment {
            let n = e.name(attr::SEGMENT);
            let one = e.val(n_attr(1));
            e.sets
                .push(format!("{n} = if_not_exists({n}, {one}) + {one}"));
        }
        if let Some(t) = &changes.tier {
            e.set(attr::TIER, s_attr(t));
        }
        if expected_state == JobState::Running {
            // A crashed run: the attempt record says so.
            e.set(attr::CAUSE, s_attr(FailureCause::Crashed.kind()));
        }
        self.update(job, "UpdateItem(replan)", e, || {
            format!(
                "already re-planned or moved on from {expected_state}/attempt {expected_attempt}"
            )
        })
        .await
    }

    /// Lists jobs in one state, newest change first, `limit` per page.
    pub async fn list_by_status(
        &self,
        status: JobState,
        limit: i32,
        cursor: Option<HashMap<String, AttributeValue>>,
    ) -> Result<(Vec<JobRecord>, Option<HashMap<String, AttributeValue>>), StoreError> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(STATUS_INDEX)
            .key_condition_expression("#s = :s")
            .expression_attribute_names("#s", attr::STATUS)
            .expression_attribute_values(":s", s_attr(status.as_str()))
            .scan_index_forward(false)
            .limit(limit.max(1))
            .set_exclusive_start_key(cursor)
            .send()
            .await
            .map_err(|e| self.aws_err("-", "Query", e))?;
        let records = out
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|item| self.parse("-", item))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((records, out.last_evaluated_key))
    }

    /// Lists the newest `limit` jobs in any of `states` (one query per state, merged).
    pub async fn list(
        &self,
        states: &[JobState],
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut all = Vec::new();
        for s in states {
            let mut cursor = None;
            let mut got = 0usize;
            loop {
                let (page, next) = self
                    .list_by_status(*s, (limit - got).clamp(1, 1000) as i32, cursor)
                    .await?;
                got += page.len();
                all.extend(page);
                if got >= limit || next.is_none() {
                    break;
                }
                cursor = next;
            }
        }
        all.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
        all.truncate(limit);
        Ok(all)
    }
}
