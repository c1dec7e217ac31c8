//! [`Producer`]: submits jobs (record first, then the message; large specs through S3 in
//! the SQS Extended Client format), and reads, waits for, lists and cancels them.
//!
//! A submit writes the `QUEUED` record with a conditional put (a duplicate job id is
//! refused) before sending the message, so a job on the queue always has its record. When
//! the offload or the send fails after the record was written, the record is deleted again
//! (conditionally: only while still `QUEUED` with our `created_at`), so submitting the same
//! spec again works; the error says whether that removal succeeded.
//!
//! Specs of any size validation accepts ([`agentq_core::spec::MAX_SPEC_BYTES`]) are
//! submitted: above the offload threshold they travel through S3, and a spec too large
//! for a DynamoDB item ([`RECORD_SPEC_MAX_BYTES`]) is kept in its record as the pointer
//! (the rule of [`agentq_core::payload::record_spec`], which agent and dispatcher follow).
//!
//! Each submitted job starts its trace here (a `agentq.submit` span whose context travels
//! in the message's `traceparent` attribute) and notifies `QUEUED` once its message is
//! on the queue; a cancel that ends a job notifies `CANCELLED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentq_core::layout::{attr, msg_attr};
use agentq_core::notify::{Actor, JobEvent};
use agentq_core::payload::{
    DEFAULT_OFFLOAD_THRESHOLD, PayloadPointer, RECORD_SPEC_MAX_BYTES, SIZE_ATTRIBUTE,
};
use agentq_core::record::{EpochMillis, now_ms};
use agentq_core::spec::JobSpec;
use agentq_core::store::CancelOutcome;
use agentq_core::telemetry::{Span, SpanKind};
use agentq_core::{
    AwsClients, JobId, JobRecord, JobState, JobStore, Observability, Service, Settings, ValidSpec,
};
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;

use crate::error::{ProducerError, RecordFate};

/// SQS' largest `DelaySeconds`.
pub const MAX_DELAY_SECONDS: u32 = 900;
/// The label whose value becomes the `MessageGroupId` on FIFO queues (else the job id).
pub const DEFAULT_GROUP_LABEL: &str = "group";
/// Who a cancel is recorded as in the job's history.
pub const CANCELLED_BY: &str = "producer";

/// Tunables of a [`Producer`]; [`Default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Specs whose JSON is larger than this many bytes are stored in S3 and sent as an
    /// Extended Client pointer (default [`DEFAULT_OFFLOAD_THRESHOLD`]). Specs larger than
    /// [`RECORD_SPEC_MAX_BYTES`] always are, whatever the threshold: their record keeps
    /// the pointer.
    pub offload_threshold: usize,
    /// `SendMessageBatch` calls in flight at once during a batch submit (default 8).
    pub send_concurrency: usize,
    /// Conditional `PutItem` calls in flight at once during a batch submit (default 32).
    pub record_concurrency: usize,
    /// Retries of entries a `SendMessageBatch` reports as failed (default 6), with
    /// exponential backoff and jitter.
    pub send_retries: usize,
    /// Label giving the FIFO `MessageGroupId` (default [`DEFAULT_GROUP_LABEL`]).
    pub group_label: String,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            offload_threshold: DEFAULT_OFFLOAD_THRESHOLD,
            send_concurrency: 8,
            record_concurrency: 32,
            send_retries: 6,
            group_label: DEFAULT_GROUP_LABEL.to_owned(),
        }
    }
}

/// Per-submit choices.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Keep the message invisible this long (`DelaySeconds`, at most 900; standard
    /// queues only: FIFO queues only have a queue-wide delay).
    pub delay_seconds: Option<u32>,
    /// FIFO `MessageGroupId` for every job of this submit (overrides the label).
    pub message_group_id: Option<String>,
}

/// Where an offloaded spec was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offloaded {
    pub bucket: String,
    pub key: String,
    /// The spec's size in bytes (the `ExtendedPayloadSize` attribute).
    pub size: usize,
}

/// A job that is on the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub job_id: JobId,
    pub queue_url: String,
    /// The SQS message id.
    pub message_id: Option<String>,
    /// Set when the spec went through S3.
    pub offloaded: Option<Offloaded>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_group_id: Option<String>,
}

/// When [`Producer::wait`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitUntil {
    /// The run is over: `SUCCEEDED`, `FAILED`, `TIMED_OUT`, `CANCELLED` or `DEAD`
    /// (the dispatcher may still re-plan a `FAILED` or `TIMED_OUT` job).
    #[default]
    Finished,
    /// No transition is left: `SUCCEEDED`, `CANCELLED` or `DEAD` (needs the dispatcher).
    Terminal,
}

impl WaitUntil {
    pub fn reached(self, state: JobState) -> bool {
        match self {
            Self::Finished => state.is_finished(),
            Self::Terminal => state.is_terminal(),
        }
    }
}

/// One message, ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub job_id: JobId,
    pub body: String,
    pub attributes: HashMap<String, MessageAttributeValue>,
    pub group_id: Option<String>,
    pub dedup_id: Option<String>,
    pub delay_seconds: Option<i32>,
    pub offloaded: Option<Offloaded>,
    /// The job's `agentq.submit` span: it ends when the last copy of the message is
    /// dropped, after its send (and any rollback).
    pub span: Arc<Mutex<Span>>,
    /// The `QUEUED` notification, sent once the message is on the queue.
    pub queued: JobEvent,
}

impl Outgoing {
    pub fn submitted(&self, queue_url: &str, message_id: Option<String>) -> Submitted {
        Submitted {
            job_id: self.job_id.clone(),
            queue_url: queue_url.to_owned(),
            message_id,
            offloaded: self.offloaded.clone(),
            delay_seconds: self.delay_seconds.map(|d| d as u32),
            message_group_id: self.group_id.clone(),
        }
    }
}

/// A validated spec with its send plan, before anything is written.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub spec: ValidSpec,
    pub json: String,
    pub group_id: Option<String>,
    pub dedup_id: Option<String>,
    pub delay_seconds: Option<i32>,
    /// `Some(bucket)` when the spec goes through S3.
    pub offload_bucket: Option<String>,
}

/// Submits and inspects agentq jobs.
///
/// ```no_run
/// # async fn demo() -> Result<(), agentq_producer::ProducerError> {
/// use agentq_core::{JobSpec, Settings, SettingsArgs, AgentPreset};
/// use agentq_producer::{Producer, SubmitOptions};
///
/// let sdk = agentq_core::load_sdk_config().await?;
/// let settings = Settings::from_args(&SettingsArgs {
///     queue_url: Some("https://sqs.us-east-1.amazonaws.com/123456789012/agentq-jobs".into()),
///     table: Some("agentq-jobs".into()),
///     bucket: Some("my-agentq-bucket".into()),
///     ..Default::default()
/// })?;
/// let producer = Producer::from_sdk(&sdk, settings);
///
/// let mut spec = JobSpec::new(AgentPreset::Command);
/// spec.command = Some(vec!["echo".into(), "hello".into()]);
/// let submitted = producer.submit_spec(spec, &SubmitOptions::default()).await?;
/// let record = producer.status(&submitted.job_id).await?;
/// println!("{} is {}", record.job_id, record.status);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    pub(crate) clients: AwsClients,
    pub(crate) settings: Settings,
    pub(crate) opts: ProducerOptions,
    pub(crate) obs: Observability,
}

impl Producer {
    /// A producer over existing clients.
    pub fn new(clients: AwsClients, settings: Settings) -> Self {
        Self {
            clients,
            settings,
            opts: ProducerOptions::default(),
            obs: Observability::disabled(Service::Producer),
        }
    }

    /// Replaces the (default: disabled) tracer and notifier. Call
    /// [`Observability::flush`] before the program exits.
    pub fn with_observability(mut self, obs: Observability) -> Self {
        self.obs = obs;
        self
    }

    /// A producer with clients built from `sdk` (see [`agentq_core::load_sdk_config`]).
    pub fn from_sdk(sdk: &SdkConfig, settings: Settings) -> Self {
        Self::new(AwsClients::new(sdk), settings)
    }

    /// Replaces the tunables.
    pub fn with_options(mut self, opts: ProducerOptions) -> Self {
        self.opts = opts;
        self
    }

    pub fn options(&self) -> &ProducerOptions {
        &self.opts
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The jobs table (needs `AGENTQ_TABLE`).
    pub fn store(&self) -> Result<JobStore, ProducerError> {
        Ok(JobStore::new(
            self.clients.dynamodb.clone(),
            self.settings.table()?,
        ))
    }

    /// Validates a spec under these settings (secrets prefix); `origin` names where it
    /// came from in the error.
    pub fn validate(&self, spec: JobSpec, origin: &str) -> Result<ValidSpec, ProducerError> {
        spec.validate(&self.settings.validation())
            .map_err(|source| ProducerError::InvalidSpec {
                origin: origin.to_owned(),
                source,
            })
    }

    /// Parses and validates JSON bytes.
    pub fn parse(&self, bytes: &[u8], origin: &str) -> Result<ValidSpec, ProducerError> {
        let spec = JobSpec::from_json(bytes).map_err(|source| ProducerError::InvalidSpec {
            origin: origin.to_owned(),
            source,
        })?;
        self.validate(spec, origin)
    }

    /// Validates and submits one spec.
    pub async fn submit_spec(
        &self,
        spec: JobSpec,
        opts: &SubmitOptions,
    ) -> Result<Submitted, ProducerError> {
        let spec = self.validate(spec, "spec")?;
        self.submit(spec, opts).await
    }

    /// Submits one validated job: record, (offload), `SendMessage`.
    pub async fn submit(
        &self,
        spec: ValidSpec,
        opts: &SubmitOptions,
    ) -> Result<Submitted, ProducerError> {
        let queue_url = self.settings.queue_url()?.to_owned();
        let store = self.store()?;
        let planned = self.plan(spec, opts, &queue_url)?;
        let created_at = self.record(&store, &planned).await?;
        let out = self.offload(&store, planned, created_at).await?;
        let mut req = self
            .clients
            .sqs
            .send_message()
            .queue_url(&queue_url)
            .message_body(&out.body)
            .set_message_attributes(Some(out.attributes.clone()))
            .set_message_group_id(out.group_id.clone())
            .set_message_deduplication_id(out.dedup_id.clone());
        if let Some(d) = out.delay_seconds {
            req = req.delay_seconds(d);
        }
        match req.send().await {
            Ok(sent) => {
                self.queued(&out, sent.message_id.as_deref());
                Ok(out.submitted(&queue_url, sent.message_id))
            }
            Err(e) => {
                let transient = agentq_core::aws::is_transient(&e);
                let message = agentq_core::aws::display(&e);
                if let Ok(mut s) = out.span.lock() {
                    s.set_error(message.clone());
                }
                let record = self.unrecord(&store, &out, created_at).await;
                Err(ProducerError::Send {
                    job_id: out.job_id,
                    queue_url,
                    transient,
                    message,
                    record,
                })
            }
        }
    }

    /// Checks the options against the queue and the spec, and settles the FIFO ids,
    /// the delay and whether the spec goes through S3. Writes nothing.
    pub(crate) fn plan(
        &self,
        spec: ValidSpec,
        opts: &SubmitOptions,
        queue_url: &str,
    ) -> Result<Planned, ProducerError> {
        let fifo = queue_url.ends_with(".fifo");
        let delay_seconds = match opts.delay_seconds {
            None | Some(0) => None,
            Some(d) if d > MAX_DELAY_SECONDS => {
                return Err(ProducerError::Input(format!(
                    "--delay {d}s is longer than SQS allows ({MAX_DELAY_SECONDS} s): use at most 15 minutes"
                )));
            }
            Some(_) if fifo => {
                return Err(ProducerError::Input(
                    "--delay cannot be used with a FIFO queue (SQS only supports a queue-wide delay there): drop --delay or set DelaySeconds on the queue".into(),
                ));
            }
            Some(d) => Some(d as i32),
        };
        let (group_id, dedup_id) = if fifo {
            let (group, source) = match (
                &opts.message_group_id,
                spec.spec.labels.get(&self.opts.group_label),
            ) {
                (Some(g), _) => (g.clone(), "--message-group-id".to_owned()),
                (None, Some(g)) => (g.clone(), format!("labels.{}", self.opts.group_label)),
                (None, None) => (spec.job_id.to_string(), "job_id".to_owned()),
            };
            if group.is_empty() || group.len() > 128 || !group.chars().all(|c| c.is_ascii_graphic())
            {
                return Err(ProducerError::Input(format!(
                    "{source}: {group:?} cannot be a FIFO MessageGroupId: use 1-128 printable ASCII characters without spaces"
                )));
            }
            (Some(group), Some(spec.job_id.to_string()))
        } else {
            (None, None)
        };
        let json = spec.to_json();
        let offload_bucket =
            if json.len() > self.opts.offload_threshold || json.len() > RECORD_SPEC_MAX_BYTES {
                Some(self.settings.bucket()?.to_owned())
            } else {
                None
            };
        Ok(Planned {
            spec,
            json,
            group_id,
            dedup_id,
            delay_seconds,
            offload_bucket,
        })
    }

    /// Where a planned offload stores the spec (known before it is written).
    fn payload_pointer(&self, p: &Planned) -> Option<PayloadPointer> {
        p.offload_bucket.as_ref().map(|bucket| PayloadPointer {
            bucket: bucket.clone(),
            key: self.settings.layout().payload(p.spec.job_id.as_str()),
        })
    }

    /// Writes the `QUEUED` record; returns its `created_at` (for a later rollback). A spec
    /// too large for the record is kept there as its pointer (the object is written next,
    /// before the message is sent, and the record is removed again if that fails).
    pub(crate) async fn record(
        &self,
        store: &JobStore,
        p: &Planned,
    ) -> Result<EpochMillis, ProducerError> {
        let pointer = self.payload_pointer(p).map(|ptr| ptr.to_body());
        let stored = agentq_core::payload::record_spec(&p.json, pointer.as_deref());
        let created = if stored == p.json {
            store.create_queued(&p.spec, now_ms()).await
        } else {
            self.create_queued_as(store, &p.spec, stored, now_ms())
                .await
        };
        match created {
            Ok(rec) => Ok(rec.created_at),
            Err(agentq_core::StoreError::AlreadyExists { job_id }) => {
                Err(ProducerError::AlreadyExists {
                    job_id,
                    table: store.table().to_owned(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The item [`JobStore::create_queued`] writes, with `stored_spec` as the spec (here:
    /// the pointer of a spec too large for an item). The same conditional put: an
    /// existing job id is refused.
    async fn create_queued_as(
        &self,
        store: &JobStore,
        spec: &ValidSpec,
        stored_spec: &str,
        now: EpochMillis,
    ) -> Result<JobRecord, agentq_core::StoreError> {
        let mut rec = JobRecord::new(spec.job_id.clone(), JobState::Queued, now);
        rec.spec = Some(stored_spec.to_owned());
        rec.tier = spec.spec.tier.clone();
        rec.labels = spec.spec.labels.clone();
        rec.expires_at = Some(now / 1000 + agentq_core::store::DEFAULT_RETENTION_DAYS * 86_400);
        let item =
            serde_dynamo::to_item(&rec).map_err(|source| agentq_core::StoreError::Corrupt {
                job_id: rec.job_id.to_string(),
                table: store.table().to_owned(),
                source,
            })?;
        let res = self
            .clients
            .dynamodb
            .put_item()
            .table_name(store.table())
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", attr::JOB_ID)
            .send()
            .await;
        match res {
            Ok(_) => Ok(rec),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Err(agentq_core::StoreError::AlreadyExists {
                    job_id: rec.job_id.clone(),
                })
            }
            Err(e) => Err(agentq_core::StoreError::Aws {
                job_id: rec.job_id.to_string(),
                op: "PutItem",
                table: store.table().to_owned(),
                transient: agentq_core::aws::is_transient(&e),
                message: agentq_core::aws::display(&e),
                source: Box::new(e),
            }),
        }
    }

    /// Stores the spec in S3 when planned so, and builds the message.
    pub(crate) async fn offload(
        &self,
        store: &JobStore,
        p: Planned,
        created_at: EpochMillis,
    ) -> Result<Outgoing, ProducerError> {
        let job_id = p.spec.job_id.clone();
        let pointer = self.payload_pointer(&p);
        let mut attributes = HashMap::from([(
            msg_attr::JOB_ID.to_owned(),
            string_attr("String", job_id.as_str()),
        )]);
        // The job's trace starts here; the agent continues it from the attribute.
        let mut span = self
            .obs
            .telemetry
            .span("agentq.submit", SpanKind::Producer, None);
        span.set("agentq.job_id", job_id.as_str())
            .set("messaging.system", "aws_sqs")
            .set("messaging.operation", "publish");
        if let Some(ctx) = span.context() {
            attributes.insert(
                msg_attr::TRACEPARENT.to_owned(),
                string_attr("String", &ctx.traceparent()),
            );
        }
        let mut queued = JobEvent::new(job_id.as_str(), JobState::Queued, Actor::Producer);
        queued.at = created_at;
        queued.tier = p.spec.spec.tier.clone();
        queued.labels = p.spec.spec.labels.clone();
        queued.trace_id = span.trace_id();
        let mut out = Outgoing {
            job_id: job_id.clone(),
            body: String::new(),
            attributes: HashMap::new(),
            group_id: p.group_id,
            dedup_id: p.dedup_id,
            delay_seconds: p.delay_seconds,
            offloaded: None,
            span: Arc::new(Mutex::new(span)),
            queued,
        };
        let Some(PayloadPointer { bucket, key }) = pointer else {
            out.body = p.json;
            out.attributes = attributes;
            return Ok(out);
        };
        let size = p.json.len();
        let put = self
            .clients
            .s3
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .content_type("application/json")
            .body(aws_sdk_s3::primitives::ByteStream::from(
                p.json.into_bytes(),
            ))
            .send()
            .await;
        if let Err(e) = put {
            let transient = agentq_core::aws::is_transient(&e);
            let message = agentq_core::aws::display(&e);
            let record = self.unrecord(store, &out, created_at).await;
            return Err(ProducerError::Offload {
                job_id,
                bucket,
                key,
                transient,
                message,
                record,
            });
        }
        attributes.insert(
            SIZE_ATTRIBUTE.to_owned(),
            string_attr("Number", &size.to_string()),
        );
        out.body = PayloadPointer {
            bucket: bucket.clone(),
            key: key.clone(),
        }
        .to_body();
        out.attributes = attributes;
        out.offloaded = Some(Offloaded { bucket, key, size });
        Ok(out)
    }

    /// The message is on the queue: notify `QUEUED`, note the message id on the span.
    pub(crate) fn queued(&self, out: &Outgoing, message_id: Option<&str>) {
        if let (Ok(mut s), Some(id)) = (out.span.lock(), message_id) {
            s.set("messaging.message.id", id);
        }
        self.obs.notifier.notify(out.queued.clone());
    }

    /// Undoes a record (and an offloaded payload) whose message was never sent.
    pub(crate) async fn unrecord(
        &self,
        store: &JobStore,
        out: &Outgoing,
        created_at: EpochMillis,
    ) -> RecordFate {
        if let Some(o) = &out.offloaded {
            // Best effort: a leftover payload object is harmless (and overwritten by a
            // resubmit under the same job id).
            let _ = self
                .clients
                .s3
                .delete_object()
                .bucket(&o.bucket)
                .key(&o.key)
                .send()
                .await;
        }
        let res = self
            .clients
            .dynamodb
            .delete_item()
            .table_name(store.table())
            .key(attr::JOB_ID, AttributeValue::S(out.job_id.to_string()))
            .condition_expression("#s = :queued AND #c = :created")
            .expression_attribute_names("#s", attr::STATUS)
            .expression_attribute_names("#c", attr::CREATED_AT)
            .expression_attribute_values(":queued", AttributeValue::S(JobState::Queued.to_string()))
            .expression_attribute_values(":created", AttributeValue::N(created_at.to_string()))
            .send()
            .await;
        match res {
            Ok(_) => RecordFate::Removed,
            Err(e) => RecordFate::Kept {
                why: agentq_core::aws::display(&e),
            },
        }
    }

    /// The job's record.
    pub async fn status(&self, job: &JobId) -> Result<JobRecord, ProducerError> {
        Ok(self.store()?.require(job).await?)
    }

    /// Cancels a job: one that has not started becomes `CANCELLED` at once and never
    /// runs; a running one gets its cancel flag set and the agent stops it at its next
    /// heartbeat; a finished one is left alone.
    pub async fn cancel(&self, job: &JobId) -> Result<CancelOutcome, ProducerError> {
        let outcome = self
            .store()?
            .request_cancel(job, CANCELLED_BY, now_ms())
            .await?;
        if outcome == CancelOutcome::Cancelled {
            let mut ev = JobEvent::new(job.as_str(), JobState::Cancelled, Actor::Producer);
            ev.cause = Some(agentq_core::FailureCause::Cancelled.kind().to_owned());
            ev.reason = Some("cancelled before it started".into());
            self.obs.notifier.notify(ev);
        }
        Ok(outcome)
    }

    /// The newest `limit` jobs in any of `states` (every state when empty).
    pub async fn list(
        &self,
        states: &[JobState],
        limit: usize,
    ) -> Result<Vec<JobRecord>, ProducerError> {
        let states: Vec<JobState> = if states.is_empty() {
            agentq_core::state::ALL_STATES.to_vec()
        } else {
            states.to_vec()
        };
        Ok(self.store()?.list(&states, limit.max(1)).await?)
    }

    /// `s3://bucket/{prefix}/jobs/{id}/attempt-{n}/`: where an attempt's logs live.
    pub fn log_url(&self, job: &JobId, attempt: agentq_core::Attempt) -> Option<String> {
        let bucket = self.settings.bucket().ok()?;
        Some(format!(
            "s3://{bucket}/{}",
            self.settings.layout().attempt_prefix(job, attempt)
        ))
    }

    /// Polls the record every `interval` until `until` is reached; `on_poll` sees every
    /// record read (for progress displays). Returns the final record.
    pub async fn wait(
        &self,
        job: &JobId,
        interval: Duration,
        until: WaitUntil,
        mut on_poll: impl FnMut(&JobRecord),
    ) -> Result<JobRecord, ProducerError> {
        let store = self.store()?;
        loop {
            let rec = store.require(job).await?;
            on_poll(&rec);
            if until.reached(rec.status) {
                return Ok(rec);
            }
            tokio::time::sleep(interval).await;
        }
    }
}

fn string_attr(data_type: &str, value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .expect("data_type is set")
}
