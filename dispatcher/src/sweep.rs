//! The sweep: finds jobs whose SQS message is gone, which no DLQ message will ever bring
//! back, and re-plans them through the same path as a DLQ message ([`Input::Sweep`]).
//! Run by `agentq-dispatcher sweep` and, on Lambda, by a schedule (see
//! [`crate::lambda`]).
//!
//! ## Stranded `RUNNING` jobs
//!
//! While a job runs, its agent keeps the message invisible for one *visibility horizon*
//! (`AGENTQ_VISIBILITY_HORIZON_SECONDS`) past every heartbeat. When the agent dies, the
//! message is visible again within that horizon after the last heartbeat; the next
//! agent's claim takes the lease over once the heartbeat is `stale_after` old (a claim
//! that finds the lease still live hides the message for `stale_after` and tries again).
//! There is no SQS call that says whether one particular message still exists, so the
//! sweep reasons from time: a message that still existed would have brought an agent to
//! the job by `stale_after + horizon` after the last heartbeat. A `RUNNING` job whose
//! heartbeat is older than
//!
//! ```text
//! stale_after + sweep.visibility_horizon + sweep.margin
//! ```
//!
//! has lost its message (deleted by an agent that acknowledged without its final write,
//! expired, or hidden for the queue's whole visibility timeout because its receiver died
//! before the first visibility change) and is re-planned as `crashed`: the attempt is
//! recorded as crashed, the job retried with backoff, conditional on state, attempt and
//! the heartbeat seen. The margin absorbs receive latency and a busy mapping. Should the
//! message surface after all, its claim finds the job re-planned (or running again) and
//! the usual fencing makes the copy harmless: one run at a time, at most an extra
//! acknowledged delivery.
//!
//! `updated_at` is the `by-status` index's sort key and every heartbeat moves it, so the
//! candidates are one indexed query: `status = RUNNING AND updated_at < now − limit`.
//!
//! ## Stranded `QUEUED` jobs
//!
//! The producer writes the `QUEUED` record, then sends the message, and deletes the
//! record again when the send fails. When the delete fails too, the record stays
//! without a message. Waiting time alone cannot tell such a job from one behind a
//! backlog, so the sweep judges `QUEUED` records older than `sweep.queued_after` (and
//! past any delay the dispatcher planned for them) only while their queue holds no
//! message at all — none visible, delayed or in flight. Then no message exists for them,
//! and they are re-enqueued from the record's spec (a `retry`, cause `never_ran`).
//!
//! ## Plans whose send was lost
//!
//! `RETRY_SCHEDULED` and `RESUMING` (and `QUEUED`) jobs whose latest plan was written
//! but never marked enqueued for longer than `resend_after` are re-sent, as a DLQ
//! message for them would do.
//!
//! Each state is examined up to `sweep.limit` records, oldest first, a few jobs at once;
//! on Lambda no new job is started within [`DEADLINE_RESERVE`] of the deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use agentq_core::record::now_ms;
use agentq_core::{JobRecord, JobState};
use aws_sdk_sqs::types::QueueAttributeName;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::ReplanError;
use crate::plan::{self, Input};
use crate::replan::{Outcome, Replanner};

/// Jobs re-planned at once by a sweep.
pub const SWEEP_CONCURRENCY: usize = 4;
/// No job is started when less than this is left before the deadline.
pub const DEADLINE_RESERVE: Duration = Duration::from_secs(5);

/// What one state's pass found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Found {
    /// Candidates the query returned.
    pub examined: u64,
    /// Re-planned (retry, escalate, dead, …).
    pub replanned: u64,
    /// A lost send re-sent.
    pub resent: u64,
    /// Not stranded after all, or left for the next sweep (a plan in flight).
    pub left: u64,
    /// Re-planning failed (logged); tried again at the next sweep.
    pub errors: u64,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub running: Found,
    pub queued: Found,
    pub scheduled: Found,
    /// Queues that held messages, so their `QUEUED` jobs were not judged.
    pub busy_queues: Vec<String>,
    /// The deadline came before every candidate was examined.
    pub truncated: bool,
}

impl Replanner {
    /// One sweep (see the module docs). `deadline`: stop starting jobs near it.
    pub async fn sweep(&self, deadline: Option<Instant>) -> Result<SweepReport, ReplanError> {
        let policy = self.policy();
        let now = now_ms();
        let limit = policy.sweep.limit;
        let mut report = SweepReport::default();

        let strand = policy.sweep.strand_after(policy.stale_after);
        let running = self
            .store()
            .list_older_than(JobState::Running, now - strand.as_millis() as i64, limit)
            .await?;
        report.running = self
            .sweep_jobs(running, |_| true, deadline, &mut report.truncated)
            .await;

        let resend = policy.resend_after.as_millis() as i64;
        let mut scheduled = Vec::new();
        for state in [JobState::RetryScheduled, JobState::Resuming] {
            scheduled.extend(
                self.store()
                    .list_older_than(state, now - resend, limit)
                    .await?,
            );
        }
        report.scheduled = self
            .sweep_jobs(scheduled, |_| true, deadline, &mut report.truncated)
            .await;

        let queued_after = policy.sweep.queued_after.as_millis() as i64;
        let queued = self
            .store()
            .list_older_than(JobState::Queued, now - resend.min(queued_after), limit)
            .await?;
        let mut idle: BTreeMap<String, bool> = BTreeMap::new();
        for rec in &queued {
            let q = plan::queue_for(policy, rec);
            if let std::collections::btree_map::Entry::Vacant(slot) = idle.entry(q) {
                let empty = self.queue_is_empty(slot.key()).await;
                if !empty {
                    report.busy_queues.push(slot.key().clone());
                }
                slot.insert(empty);
            }
        }
        report.queued = self
            .sweep_jobs(
                queued,
                |rec| {
                    idle.get(&plan::queue_for(policy, rec))
                        .copied()
                        .unwrap_or(false)
                },
                deadline,
                &mut report.truncated,
            )
            .await;
        tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "sweep done");
        Ok(report)
    }

    /// Re-plans `jobs` a few at a time; `queue_idle` says whether a job's queue was empty.
    async fn sweep_jobs(
        &self,
        jobs: Vec<JobRecord>,
        queue_idle: impl Fn(&JobRecord) -> bool,
        deadline: Option<Instant>,
        truncated: &mut bool,
    ) -> Found {
        let mut found = Found {
            examined: jobs.len() as u64,
            ..Default::default()
        };
        let late = || deadline.is_some_and(|d| Instant::now() + DEADLINE_RESERVE >= d);
        let work: Vec<_> = jobs
            .into_iter()
            .map(|rec| {
                (
                    Input::Sweep {
                        queue_idle: queue_idle(&rec),
                    },
                    rec,
                )
            })
            .collect();
        let results: Vec<Option<Result<Outcome, ReplanError>>> =
            futures::stream::iter(work.into_iter().map(|(input, rec)| async move {
                if late() {
                    return None;
                }
                let job = rec.job_id.clone();
                let span = tracing::info_span!("sweep", job_id = %job);
                let r = tracing::Instrument::instrument(
                    self.replan(&job, &input, None, Some(rec)),
                    span,
                )
                .await;
                Some(r)
            }))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .collect()
            .await;
        for r in results {
            match r {
                None => {
                    *truncated = true;
                    found.left += 1;
                }
                Some(Ok(o)) => {
                    match &o {
                        Outcome::Planned { .. } => found.replanned += 1,
                        Outcome::Resent { .. } => found.resent += 1,
                        Outcome::Dropped { .. } | Outcome::Unparseable { .. } => found.left += 1,
                    }
                    if !matches!(o, Outcome::Dropped { .. }) {
                        tracing::warn!(outcome = %serde_json::to_string(&o).unwrap_or_default(), "sweep re-planned a stranded job");
                    }
                }
                Some(Err(ReplanError::InFlight { .. })) => found.left += 1,
                Some(Err(e)) => {
                    found.errors += 1;
                    tracing::warn!(error = %e, "sweep could not re-plan a job; the next sweep tries again");
                }
            }
        }
        found
    }

    /// Whether the queue holds no message at all (visible, delayed or in flight). An
    /// unreadable queue counts as busy: the sweep then judges nothing on it.
    async fn queue_is_empty(&self, queue_url: &str) -> bool {
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ];
        match self
            .sqs()
            .get_queue_attributes()
            .queue_url(queue_url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
        {
            Ok(out) => {
                let attrs = out.attributes.unwrap_or_default();
                names.iter().all(|n| {
                    attrs
                        .get(n)
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v == 0)
                })
            }
            Err(e) => {
                tracing::warn!(queue = %queue_url, error = %agentq_core::aws::display(&e), "cannot read the queue's depth; its QUEUED jobs are not judged");
                false
            }
        }
    }
}
