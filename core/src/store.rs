//! The jobs table: every state transition as a conditional DynamoDB write. A claim takes
//! the lease with `attempt + 1`; heartbeats and final writes are conditional on the
//! attempt (fencing), so a zombie run can never overwrite a newer one.
//!
//! Writes do not read first. Each conditional write asks DynamoDB to return the item as
//! it was when the condition failed (`ReturnValuesOnConditionCheckFailure=ALL_OLD`), so
//! a refused write says why (the `current` record of [`StoreError::Conflict`]) and the
//! next try is decided from that, without a GetItem. A claim is one UpdateItem for a
//! job the producer recorded `QUEUED`; a re-run (attempt ≥ 1), a raw spec without a
//! record (then a PutItem creates it) or a lost race costs a second write. A write that
//! was applied but whose answer was lost (the SDK retries it, and the retry's condition
//! fails) is recognised from the returned item and reported as the success it was.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::ids::{Attempt, JobId};
use crate::layout::{STATUS_INDEX, attr};
use crate::record::{AttemptRecord, Decision, EpochMillis, JobRecord, Progress};
use crate::spec::ValidSpec;
use crate::state::{Action, FailureCause, JobState};

/// How long records are kept after their last change (the table's TTL).
pub const DEFAULT_RETENTION_DAYS: i64 = 30;

/// Longest reason kept in a record (the rest is cut, marked with `…`).
pub const REASON_MAX_CHARS: usize = 4096;
/// Longest `last_event` / `session_id` kept in a record's progress.
pub const PROGRESS_TEXT_MAX_CHARS: usize = 256;
/// Largest cost a record keeps; DynamoDB numbers have 38 significant digits and
/// magnitudes below 1e126, and a child's event stream is not trusted to stay inside.
pub const COST_USD_MAX: f64 = 1e9;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A jobs-table operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {job_id} already exists: pick another job_id, or omit it to have one generated")]
    AlreadyExists { job_id: JobId },
    #[error("job {job_id} not found in table {table}")]
    NotFound { job_id: JobId, table: String },
    /// The conditional write lost: the job moved on, or another attempt holds the lease.
    /// `current` is the record as DynamoDB returned it with the refusal (absent when the
    /// item does not exist), so the caller can decide again without reading it.
    #[error("job {job_id}: {what}")]
    Conflict {
        job_id: JobId,
        what: String,
        current: Option<Box<JobRecord>>,
    },
    /// DynamoDB refused the request as invalid (`ValidationException`: the item would
    /// exceed 400 KB, a number is out of range, …). The same write fails again, so it is
    /// never retried; the agent ends the attempt with a smaller write instead.
    #[error(
        "job {job_id}: DynamoDB {op} on table {table} refused the write as invalid (retrying the same write cannot help): {message}"
    )]
    Rejected {
        job_id: String,
        op: &'static str,
        table: String,
        message: String,
        #[source]
        source: BoxError,
    },
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
    /// Whether the same call could succeed later. `Rejected`, `Conflict`, `NotFound`,
    /// `AlreadyExists` and `Corrupt` never do as they are.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Aws {
                transient: true,
                ..
            }
        )
    }

    /// The record as it was when a conditional write was refused.
    pub fn current(&self) -> Option<&JobRecord> {
        match self {
            Self::Conflict { current, .. } => current.as_deref(),
            _ => None,
        }
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
    /// The job was not running (not started, or waiting for a re-plan): it is
    /// `CANCELLED` now and will never run (again).
    Cancelled,
    /// The job runs: the flag is set and the agent stops it at its next heartbeat.
    Flagged,
    /// Already finished in this state; nothing changed.
    AlreadyFinished(JobState),
}

/// Changes a re-plan makes besides the state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replan {
    /// Resume this session in the next run.
    pub resume_session: Option<String>,
    /// Forget the session to resume: the next run starts afresh.
    pub drop_session: bool,
    pub next_segment: bool,
    pub tier: Option<String>,
    /// Re-planning a `RUNNING` job (a crash): also conditional on the heartbeat the
    /// decision saw, so a run that heartbeated since is never re-planned under it.
    pub expected_heartbeat: Option<EpochMillis>,
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
    /// The boolean `attr` is not `true` (a missing attribute counts as not true).
    fn cond_not_true(&mut self, attr: &str) -> &mut Self {
        let n = self.name(attr);
        let v = self.val(AttributeValue::Bool(true));
        self.conds.push(format!("NOT ({n} = {v})"));
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

/// A Query reads a page of up to 1 MB: it gets longer timeouts than item calls.
fn query_timeouts() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::config::Builder::default()
        .timeout_config(crate::config::ServiceTimeouts::QUERY.config())
}

/// `s` cut to `max` characters (marked with `…`).
fn cap(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Progress as the table can hold it: text capped, the cost a finite number in range.
/// The agent clamps what a child reports; this is the last line, so that a value the
/// table refuses can never cost a job its final write.
fn storable(p: &Progress) -> Progress {
    let mut p = p.clone();
    p.cost_usd = if p.cost_usd.is_finite() {
        p.cost_usd.clamp(0.0, COST_USD_MAX)
    } else {
        0.0
    };
    p.last_event = p.last_event.map(|e| cap(&e, PROGRESS_TEXT_MAX_CHARS));
    p.session_id = p.session_id.map(|e| cap(&e, PROGRESS_TEXT_MAX_CHARS));
    p
}

/// What a refused conditional write says: whether the condition failed, and the item
/// as it was then (DynamoDB returns it with `ReturnValuesOnConditionCheckFailure`).
fn refused<E>(e: &SdkError<E, HttpResponse>) -> Option<Option<HashMap<String, AttributeValue>>>
where
    E: ProvideErrorMetadata + ConditionFailure,
{
    let se = e.as_service_error()?;
    (se.code() == Some("ConditionalCheckFailedException")).then(|| se.old_item())
}

/// The item a `ConditionalCheckFailedException` carries.
trait ConditionFailure {
    fn old_item(&self) -> Option<HashMap<String, AttributeValue>>;
}

impl ConditionFailure for aws_sdk_dynamodb::operation::update_item::UpdateItemError {
    fn old_item(&self) -> Option<HashMap<String, AttributeValue>> {
        match self {
            Self::ConditionalCheckFailedException(c) => c.item().cloned(),
            _ => None,
        }
    }
}

impl ConditionFailure for aws_sdk_dynamodb::operation::put_item::PutItemError {
    fn old_item(&self) -> Option<HashMap<String, AttributeValue>> {
        match self {
            Self::ConditionalCheckFailedException(c) => c.item().cloned(),
            _ => None,
        }
    }
}

/// What the claim does next with the record it was last told about.
enum ClaimStep {
    Done(ClaimOutcome),
    /// Cancel was asked for and nothing runs: end the job as `CANCELLED`.
    Cancel(&'static str),
    Take {
        next: Attempt,
        takeover: Option<Attempt>,
    },
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
        if crate::aws::is_invalid_request(&e) {
            return StoreError::Rejected {
                job_id: job.to_owned(),
                op,
                table: self.table.clone(),
                message: crate::aws::display(&e),
                source: Box::new(e),
            };
        }
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
        match self.put_if_absent(rec).await? {
            None => Ok(()),
            Some(old) => {
                // Our own write, retried by the SDK after its answer was lost: the item
                // is exactly what we wrote and nothing has touched it since.
                let ours = old.is_some_and(|o| {
                    o.status == rec.status
                        && o.created_at == rec.created_at
                        && o.updated_at == rec.updated_at
                        && o.spec == rec.spec
                        && o.attempt == rec.attempt
                });
                if ours {
                    Ok(())
                } else {
                    Err(StoreError::AlreadyExists {
                        job_id: rec.job_id.clone(),
                    })
                }
            }
        }
    }

    /// Writes `rec` unless its job has a record: `None` when written, else the record
    /// that was there (when DynamoDB returned it).
    async fn put_if_absent(
        &self,
        rec: &JobRecord,
    ) -> Result<Option<Option<JobRecord>>, StoreError> {
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
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await
        {
            Ok(_) => Ok(None),
            Err(e) => match refused(&e) {
                Some(old) => {
                    let old = old
                        .filter(|i| !i.is_empty())
                        .map(|i| self.parse(rec.job_id.as_str(), i))
                        .transpose()?;
                    Ok(Some(old))
                }
                None => Err(self.aws_err(rec.job_id.as_str(), "PutItem", e)),
            },
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

    /// One conditional UpdateItem. When the condition fails, the record as it was comes
    /// back in the `Conflict` — unless `applied` finds this very write in it (a retry
    /// of a write whose answer was lost), which is then the success it was.
    async fn update(
        &self,
        job: &JobId,
        op: &'static str,
        expr: Expr,
        applied: impl FnOnce(&JobRecord) -> bool,
        conflict: impl FnOnce(Option<&JobRecord>) -> String,
    ) -> Result<JobRecord, StoreError> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(job)))
            .update_expression(expr.update_expression())
            .set_expression_attribute_names(Some(expr.names.clone()))
            .set_expression_attribute_values(Some(expr.values.clone()))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(c) = expr.condition() {
            req = req.condition_expression(c);
        }
        match req.send().await {
            Ok(out) => self.parse(job.as_str(), out.attributes.unwrap_or_default()),
            Err(e) => match refused(&e) {
                Some(old) => {
                    let current = match old {
                        Some(item) if !item.is_empty() => Some(self.parse(job.as_str(), item)?),
                        _ => None,
                    };
                    if let Some(c) = current.as_ref().filter(|c| applied(c)) {
                        return Ok(c.clone());
                    }
                    Err(StoreError::Conflict {
                        job_id: job.clone(),
                        what: conflict(current.as_ref()),
                        current: current.map(Box::new),
                    })
                }
                None => Err(self.aws_err(job.as_str(), op, e)),
            },
        }
    }

    /// Takes the lease for a run, creating the record when an upstream system published
    /// the job straight to the queue.
    ///
    /// The first write assumes a job the producer recorded and that never ran: one
    /// UpdateItem claims it. When that is refused, the refusal carries the record, and
    /// the next write is decided from it (finished, live lease, stale lease to take
    /// over, cancelled before it started, or a re-run at attempt n + 1); without a
    /// record (a raw spec) the next write creates it. Lost races are retried from what
    /// each refusal returned (bounded).
    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let mut seen: Option<JobRecord> = None;
        let mut queued_first = true;
        for _ in 0..5 {
            let result = match &seen {
                None => {
                    // First as the producer's QUEUED record; without a record, create it.
                    let first = if std::mem::take(&mut queued_first) {
                        self.claim_queued(req).await
                    } else {
                        self.claim_new(req).await
                    };
                    first.map(|record| ClaimOutcome::Claimed {
                        attempt: Attempt(1),
                        record: Box::new(record),
                        takeover: None,
                    })
                }
                Some(rec) => match Self::claim_step(rec, req) {
                    ClaimStep::Done(outcome) => return Ok(outcome),
                    ClaimStep::Cancel(reason) => match self.cancel_idle(rec, reason, req.now).await
                    {
                        Ok(()) => {
                            return Ok(ClaimOutcome::Finished {
                                status: JobState::Cancelled,
                            });
                        }
                        Err(e) => Err(e),
                    },
                    ClaimStep::Take { next, takeover } => self
                        .claim_run(rec, next, takeover, req)
                        .await
                        .map(|record| ClaimOutcome::Claimed {
                            attempt: next,
                            record: Box::new(record),
                            takeover,
                        }),
                },
            };
            match result {
                Ok(outcome) => return Ok(outcome),
                Err(StoreError::Conflict { current, .. }) => seen = current.map(|c| *c),
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            job_id: req.job_id.clone(),
            what: "claim kept losing races; leaving the message for later".into(),
            current: seen.map(Box::new),
        })
    }

    /// What a claim does with the record a refusal returned.
    fn claim_step(rec: &JobRecord, req: &ClaimRequest<'_>) -> ClaimStep {
        if rec.status.is_finished() {
            return ClaimStep::Done(ClaimOutcome::Finished { status: rec.status });
        }
        if rec.cancel_requested && rec.status.is_claimable() {
            return ClaimStep::Cancel("cancelled before it started");
        }
        let takeover = match rec.status {
            JobState::Running => {
                let hb = rec.heartbeat_at.unwrap_or(rec.updated_at);
                if req.now - hb < req.stale_after_ms {
                    return ClaimStep::Done(ClaimOutcome::LeaseLive {
                        attempt: rec.attempt,
                        owner: rec.lease_owner.clone(),
                        heartbeat_at: rec.heartbeat_at,
                    });
                }
                if rec.cancel_requested {
                    return ClaimStep::Cancel(
                        "cancelled; the run had stopped heartbeating before it saw the request",
                    );
                }
                Some(rec.attempt)
            }
            _ => None,
        };
        ClaimStep::Take {
            next: rec.attempt.next(),
            takeover,
        }
    }

    /// Whether `rec` is the result of this very claim (retried after a lost answer).
    fn claimed_by(rec: &JobRecord, req: &ClaimRequest<'_>, attempt: Attempt) -> bool {
        rec.status == JobState::Running
            && rec.attempt == attempt
            && rec.lease_owner.as_deref() == Some(req.owner)
            && rec.started_at == Some(req.now)
    }

    fn attempt_record(req: &ClaimRequest<'_>, attempt: Attempt, segment: u32) -> AttemptRecord {
        AttemptRecord {
            started_at: req.now,
            owner: Some(req.owner.to_owned()),
            log_prefix: Some(req.layout.attempt_prefix(req.job_id, attempt)),
            segment,
            ..Default::default()
        }
    }

    /// The lease fields every claim sets.
    fn lease(e: &mut Expr, req: &ClaimRequest<'_>, attempt: Attempt) {
        e.set(attr::STATUS, s_attr(JobState::Running.as_str()))
            .set(attr::ATTEMPT, n_attr(attempt.get()))
            .set(attr::LEASE_OWNER, s_attr(req.owner))
            .set(attr::HEARTBEAT_AT, n_attr(req.now))
            .set(attr::STARTED_AT, n_attr(req.now))
            .set(attr::UPDATED_AT, n_attr(req.now))
            .set(attr::PROGRESS, to_av(&Progress::default()));
    }

    /// Attempt 1 of a job the producer recorded `QUEUED` and that never ran, in one
    /// write. Refused without a record when there is none (a raw spec).
    async fn claim_queued(&self, req: &ClaimRequest<'_>) -> Result<JobRecord, StoreError> {
        let first = Attempt(1);
        let mut e = Expr::default();
        let id = e.name(attr::JOB_ID);
        e.conds.push(format!("attribute_exists({id})"));
        e.cond_state_in(&[
            JobState::Queued,
            JobState::RetryScheduled,
            JobState::Resuming,
        ])
        .cond_eq(attr::ATTEMPT, n_attr(0))
        .cond_not_true(attr::CANCEL_REQUESTED);
        Self::lease(&mut e, req, first);
        // At attempt 0 the attempts map is empty (only claims add to it): set it whole.
        e.set(
            attr::ATTEMPTS,
            AttributeValue::M(HashMap::from([(
                first.to_string(),
                to_av(&Self::attempt_record(req, first, 1)),
            )])),
        )
        .set(attr::EXPIRES_AT, self.expires_at(req.now));
        self.update(
            req.job_id,
            "UpdateItem(claim)",
            e,
            |c| Self::claimed_by(c, req, first),
            |c| match c {
                Some(c) => format!("the job is {} at attempt {}", c.status, c.attempt),
                None => "no record yet".into(),
            },
        )
        .await
    }

    /// Attempt 1 of a job published raw: creates its record, `RUNNING`. Refused with the
    /// record when one appeared meanwhile.
    ///
    /// A PutItem and not a create-or-update UpdateItem: both are atomic on DynamoDB,
    /// but the emulator applies an UpdateItem on a missing item in steps (so two
    /// concurrent claims of the same raw job could both pass there), a PutItem at once.
    async fn claim_new(&self, req: &ClaimRequest<'_>) -> Result<JobRecord, StoreError> {
        let first = Attempt(1);
        let mut rec = JobRecord::new(req.job_id.clone(), JobState::Running, req.now);
        rec.spec = Some(req.spec_json.to_owned());
        rec.tier = req.tier.map(str::to_owned);
        rec.labels = req.labels.clone();
        rec.attempt = first;
        rec.started_at = Some(req.now);
        rec.lease_owner = Some(req.owner.to_owned());
        rec.heartbeat_at = Some(req.now);
        rec.expires_at = Some(req.now / 1000 + self.retention_days * 86_400);
        rec.attempts
            .insert(first.to_string(), Self::attempt_record(req, first, 1));
        match self.put_if_absent(&rec).await? {
            None => Ok(rec),
            Some(Some(old)) if Self::claimed_by(&old, req, first) => Ok(old),
            Some(current) => Err(StoreError::Conflict {
                job_id: req.job_id.clone(),
                what: "the job was recorded meanwhile".into(),
                current: current.map(Box::new),
            }),
        }
    }

    /// Attempt `next` of a job whose record is `rec`, conditional on it being unchanged.
    async fn claim_run(
        &self,
        rec: &JobRecord,
        next: Attempt,
        takeover: Option<Attempt>,
        req: &ClaimRequest<'_>,
    ) -> Result<JobRecord, StoreError> {
        let mut e = Expr::default();
        e.cond_state_in(&[rec.status])
            .cond_eq(attr::ATTEMPT, n_attr(rec.attempt.get()))
            .cond_not_true(attr::CANCEL_REQUESTED);
        if let (Some(_), Some(hb)) = (takeover, rec.heartbeat_at) {
            e.cond_eq(attr::HEARTBEAT_AT, n_attr(hb));
        }
        Self::lease(&mut e, req, next);
        e.set_path(
            attr::ATTEMPTS,
            &next.to_string(),
            to_av(&Self::attempt_record(req, next, rec.segment)),
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
                    action: Action::Takeover,
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
        self.update(
            req.job_id,
            "UpdateItem(claim)",
            e,
            |c| Self::claimed_by(c, req, next),
            |_| "lost claim race".into(),
        )
        .await
    }

    /// Ends a job nothing runs (not started, or its run stopped heartbeating) as
    /// `CANCELLED`, conditional on the record being unchanged.
    async fn cancel_idle(
        &self,
        rec: &JobRecord,
        reason: &str,
        now: EpochMillis,
    ) -> Result<(), StoreError> {
        let mut e = Expr::default();
        e.cond_state_in(&[rec.status])
            .cond_eq(attr::ATTEMPT, n_attr(rec.attempt.get()));
        if let (JobState::Running, Some(hb)) = (rec.status, rec.heartbeat_at) {
            e.cond_eq(attr::HEARTBEAT_AT, n_attr(hb));
        }
        e.set(attr::STATUS, s_attr(JobState::Cancelled.as_str()))
            .set(attr::CAUSE, s_attr(FailureCause::Cancelled.kind()))
            .set(attr::REASON, s_attr(reason))
            .set(attr::FINISHED_AT, n_attr(now))
            .set(attr::UPDATED_AT, n_attr(now));
        self.update(
            &rec.job_id,
            "UpdateItem(cancel)",
            e,
            |c| c.status == JobState::Cancelled,
            |_| "state changed".into(),
        )
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
            .set(attr::PROGRESS, to_av(&storable(progress)));
        let rec = self
            .update(
                job,
                "UpdateItem(heartbeat)",
                e,
                |_| false,
                |c| match c {
                    Some(c) => format!(
                        "lease of attempt {attempt} lost: the job is {} at attempt {}",
                        c.status, c.attempt
                    ),
                    None => format!("lease of attempt {attempt} lost: the record is gone"),
                },
            )
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
        let progress = storable(&fin.progress);
        let reason = cap(&fin.reason, REASON_MAX_CHARS);
        let mut e = Expr::default();
        e.cond_state_in(fin.state.allowed_from())
            .cond_eq(attr::ATTEMPT, n_attr(attempt.get()))
            .set(attr::STATUS, s_attr(fin.state.as_str()))
            .set(attr::REASON, s_attr(&reason))
            .set(attr::FINISHED_AT, n_attr(now))
            .set(attr::UPDATED_AT, n_attr(now))
            .set(attr::PROGRESS, to_av(&progress))
            .set(attr::EXPIRES_AT, self.expires_at(now))
            .add(attr::RUNTIME_MS, n_attr(fin.runtime_ms))
            .add(attr::COST_USD, n_attr(progress.cost_usd));
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
        match &fin.cause {
            Some(FailureCause::RateLimited { reset_at: Some(at) }) => {
                e.set(attr::RATE_LIMIT_RESET_AT, n_attr(at))
            }
            _ => e.remove(attr::RATE_LIMIT_RESET_AT),
        };
        if let Some(k) = &fin.result_key {
            e.set(attr::RESULT_KEY, s_attr(k));
        }
        if let Some(s) = &progress.session_id {
            e.set(attr::RESUME_SESSION, s_attr(s));
        }
        let n = attempt.to_string();
        let at = |field: &'static str| [attr::ATTEMPTS, n.as_str(), field];
        e.set_at(&at(attr::attempt::FINISHED_AT), n_attr(now))
            .set_at(&at(attr::attempt::STATUS), s_attr(fin.state.as_str()))
            .set_at(&at(attr::attempt::REASON), s_attr(&reason));
        if let Some(c) = &fin.cause {
            e.set_at(&at(attr::attempt::CAUSE), s_attr(c.kind()));
        }
        if let Some(c) = fin.exit_code {
            e.set_at(&at(attr::attempt::EXIT_CODE), n_attr(c));
        }
        if let Some(sig) = fin.signal {
            e.set_at(&at(attr::attempt::SIGNAL), n_attr(sig));
        }
        self.update(
            job,
            "UpdateItem(finish)",
            e,
            // Applied already (the answer was lost and the SDK retried): the totals were
            // added once; report that record.
            |c| c.attempt == attempt && c.status == fin.state && c.finished_at == Some(now),
            |c| match c {
                Some(c) => format!(
                    "attempt {attempt} no longer holds the job (it is {} at attempt {}); final write refused",
                    c.status, c.attempt
                ),
                None => format!("attempt {attempt}: the record is gone; final write refused"),
            },
        )
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
        self.update(
            job,
            "UpdateItem(reported)",
            e,
            |c| c.failure_reported == Some(attempt.get()),
            |_| format!("attempt {attempt} no longer holds the job"),
        )
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
        let reason = cap(reason, REASON_MAX_CHARS);
        let mut rec = JobRecord::new(job.clone(), JobState::Dead, now);
        rec.spec = Some(raw_spec.chars().take(64 * 1024).collect());
        rec.cause = Some(FailureCause::InvalidSpec.kind().into());
        rec.reason = Some(reason.clone());
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
        let mut rec = self.require(job).await?;
        for _ in 0..5 {
            // FAILED and TIMED_OUT wait for the dispatcher's plan: cancelled at once, so
            // no plan runs them again.
            if rec.status.is_terminal() {
                return Ok(CancelOutcome::AlreadyFinished(rec.status));
            }
            let decision = Decision {
                at: now,
                action: Action::Cancel,
                by: by.to_owned(),
                attempt: rec.attempt.get(),
                reason: "cancel requested".into(),
                ..Default::default()
            };
            let mut e = Expr::default();
            e.cond_state_in(&[rec.status])
                .cond_eq(attr::ATTEMPT, n_attr(rec.attempt.get()))
                .set(attr::CANCEL_REQUESTED, AttributeValue::Bool(true))
                .set(attr::UPDATED_AT, n_attr(now))
                .append(attr::HISTORY, to_av(&decision));
            let running = rec.status == JobState::Running;
            if !running {
                let reason = if rec.status.is_finished() {
                    "cancelled after its last attempt ended, before it was re-planned"
                } else {
                    "cancelled before it started"
                };
                e.set(attr::STATUS, s_attr(JobState::Cancelled.as_str()))
                    .set(attr::CAUSE, s_attr(FailureCause::Cancelled.kind()))
                    .set(attr::REASON, s_attr(reason))
                    .set(attr::FINISHED_AT, n_attr(now));
            }
            match self
                .update(
                    job,
                    "UpdateItem(cancel)",
                    e,
                    |c| c.history.last() == Some(&decision),
                    |_| String::new(),
                )
                .await
            {
                Ok(_) if running => return Ok(CancelOutcome::Flagged),
                Ok(_) => return Ok(CancelOutcome::Cancelled),
                Err(StoreError::Conflict {
                    current: Some(c), ..
                }) => rec = *c,
                Err(StoreError::Conflict { current: None, .. }) => rec = self.require(job).await?,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            job_id: job.clone(),
            what: "the job kept changing while cancelling; try again".into(),
            current: Some(Box::new(rec)),
        })
    }

    /// A dispatcher decision: moves `expected_state`/`expected_attempt` to `to`,
    /// conditionally, so a duplicate DLQ message cannot apply twice. Re-planning a
    /// `RUNNING` job (a crash found by the dispatcher) records that attempt as crashed.
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
        let mut decision = decision.clone();
        decision.reason = cap(&decision.reason, REASON_MAX_CHARS);
        let mut e = Expr::default();
        e.cond_state_in(&[expected_state])
            .cond_eq(attr::ATTEMPT, n_attr(expected_attempt.get()));
        if matches!(to, JobState::RetryScheduled | JobState::Resuming) {
            // A plan that runs the job again never overrides a cancel request.
            e.cond_not_true(attr::CANCEL_REQUESTED);
        }
        if let Some(hb) = changes.expected_heartbeat {
            e.cond_eq(attr::HEARTBEAT_AT, n_attr(hb));
        }
        e.set(attr::STATUS, s_attr(to.as_str()))
            .set(attr::UPDATED_AT, n_attr(now))
            .set(attr::EXPIRES_AT, self.expires_at(now))
            .append(attr::HISTORY, to_av(&decision));
        if to.is_terminal() {
            e.set(attr::FINISHED_AT, n_attr(now))
                .set(attr::REASON, s_attr(&decision.reason));
        }
        if let Some(s) = &changes.resume_session {
            e.set(attr::RESUME_SESSION, s_attr(s));
        } else if changes.drop_session {
            e.remove(attr::RESUME_SESSION);
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
            // A crashed run: the job and the attempt's own record say so.
            let crashed = FailureCause::Crashed.kind();
            e.set(attr::CAUSE, s_attr(crashed));
            if expected_attempt != Attempt::NONE {
                let n = expected_attempt.to_string();
                let at = |field: &'static str| [attr::ATTEMPTS, n.as_str(), field];
                e.set_at(&at(attr::attempt::FINISHED_AT), n_attr(now))
                    .set_at(
                        &at(attr::attempt::STATUS),
                        s_attr(JobState::Failed.as_str()),
                    )
                    .set_at(&at(attr::attempt::CAUSE), s_attr(crashed))
                    .set_at(&at(attr::attempt::REASON), s_attr(&decision.reason));
            }
        }
        self.update(
            job,
            "UpdateItem(replan)",
            e,
            |c| c.history.last() == Some(&decision),
            |c| match c {
                Some(c) => format!(
                    "already re-planned or moved on from {expected_state}/attempt {expected_attempt}: the job is {} at attempt {}",
                    c.status, c.attempt
                ),
                None => format!("no record to re-plan from {expected_state}/attempt {expected_attempt}"),
            },
        )
        .await
    }

    /// Ends a job `DEAD` with `reason` and nothing else: no history entry, so that a
    /// record too big to take a re-plan (DynamoDB refused it as invalid) still ends.
    /// Conditional on the state and attempt the plan was made from.
    pub async fn give_up(
        &self,
        job: &JobId,
        expected_state: JobState,
        expected_attempt: Attempt,
        reason: &str,
        now: EpochMillis,
    ) -> Result<JobRecord, StoreError> {
        let reason = cap(reason, 1024);
        let mut e = Expr::default();
        e.cond_state_in(&[expected_state])
            .cond_eq(attr::ATTEMPT, n_attr(expected_attempt.get()))
            .set(attr::STATUS, s_attr(JobState::Dead.as_str()))
            .set(attr::REASON, s_attr(&reason))
            .set(attr::FINISHED_AT, n_attr(now))
            .set(attr::UPDATED_AT, n_attr(now));
        self.update(
            job,
            "UpdateItem(give up)",
            e,
            |c| c.status == JobState::Dead && c.finished_at == Some(now),
            |c| match c {
                Some(c) => format!("moved on: the job is {} at attempt {}", c.status, c.attempt),
                None => "no record".into(),
            },
        )
        .await
    }

    /// Jobs in `status` whose last change is older than `before`, oldest first, at most
    /// `limit` (pages of up to 100). The sweep's query: `updated_at` is the GSI's sort
    /// key and every heartbeat moves it, so a stale lease is an old `updated_at`.
    pub async fn list_older_than(
        &self,
        status: JobState,
        before: EpochMillis,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        let mut cursor = None;
        while out.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(STATUS_INDEX)
                .key_condition_expression("#s = :s AND #u < :u")
                .expression_attribute_names("#s", attr::STATUS)
                .expression_attribute_names("#u", attr::UPDATED_AT)
                .expression_attribute_values(":s", s_attr(status.as_str()))
                .expression_attribute_values(":u", n_attr(before))
                .scan_index_forward(true)
                .limit((limit - out.len()).min(100) as i32)
                .set_exclusive_start_key(cursor)
                .customize()
                .config_override(query_timeouts())
                .send()
                .await
                .map_err(|e| self.aws_err("-", "Query", e))?;
            for item in page.items.unwrap_or_default() {
                out.push(self.parse("-", item)?);
            }
            cursor = page.last_evaluated_key;
            if cursor.is_none() {
                break;
            }
        }
        Ok(out)
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
            .customize()
            .config_override(query_timeouts())
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
