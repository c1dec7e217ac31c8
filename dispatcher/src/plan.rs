//! The re-plan decision, as a pure function of what the DLQ message (or the sweep) says,
//! the job's record, the policy and the clock: [`decide`] returns a [`Step`] and touches
//! nothing. [`crate::replan`] applies it (conditional write first, then the enqueue).
//!
//! | input | record | step |
//! |---|---|---|
//! | failure record | attempt differs from the record's | drop (stale duplicate) |
//! | failure record | already re-planned / finished | drop (duplicate) |
//! | raw spec (redriven) | none | create it `QUEUED`, then decide again (invalid spec → `DEAD`) |
//! | raw spec | carries an older plan number than the record | drop (superseded copy) |
//! | raw spec | `QUEUED`/`RETRY_SCHEDULED`/`RESUMING` | never ran: retry in place |
//! | raw spec | `RUNNING`, heartbeat older than `stale_after` | crashed: retry |
//! | raw spec | `RUNNING`, live heartbeat | drop (duplicate delivery of a running job) |
//! | raw spec | `FAILED`/`TIMED_OUT` not re-planned | plan from the record's own cause |
//! | raw spec | `SUCCEEDED`/`CANCELLED`/`DEAD` | drop |
//! | sweep | `RUNNING`, heartbeat older than the strand limit | stranded: plan as `crashed` |
//! | sweep | `QUEUED` longer than `sweep.queued_after` (past any planned delay), its queue empty | message lost: retry (never ran) |
//! | sweep | anything else | drop |
//! | any | a plan of this attempt not marked enqueued | re-send it once older than `resend_after`, else retry later |
//!
//! Plans by cause:
//!
//! | cause | plan |
//! |---|---|
//! | `invalid_spec`, `secret_denied`, `agent_exit`, `budget_exceeded` | `DEAD`, action `fail` (no retry) |
//! | `cancelled` | stays `CANCELLED`, action `fail` |
//! | any retryable, the job was cancelled meanwhile | `CANCELLED`, action `fail` |
//! | any retryable, past a budget (cost, total runtime, attempts, segments, pauses) | `DEAD`, action `dead` |
//! | `rate_limited` | after the reset (or backoff): `RESUMING` the session, else `RETRY_SCHEDULED`; action `pause`, not an attempt |
//! | `resume_failed` | `RETRY_SCHEDULED` afresh (session dropped, segment + 1), action `retry` |
//! | `crashed` for the `escalate_after_crashes`-th time on a tier with a bigger tier | `RETRY_SCHEDULED` on the next tier, action `escalate` |
//! | `infra_transient`, `crashed`, never ran | `RETRY_SCHEDULED` (never ran: state kept), backoff + jitter, action `retry` |
//! | `timed_out`, session known, `resume` ≠ never | `RESUMING`, segment + 1, action `resume` (on the next tier when `causes.timed_out.escalate_resumable`) |
//! | `timed_out` without a session | next tier if any (action `escalate`), else `DEAD` (action `fail`) |

use std::time::Duration;

use agentq_core::failure::FailureRecord;
use agentq_core::record::{Decision, EpochMillis, JobRecord};
use agentq_core::spec::{DEFAULT_TIMEOUT_SECONDS, JobSpec, ResumePolicy};
use agentq_core::store::Replan;
use agentq_core::{Action, CauseKind, FailureCause, JobState};

use crate::policy::{DEFAULT_TIER, Policy, backoff};

/// Who the dispatcher's decisions are by.
pub const BY: &str = "dispatcher";

/// What a DLQ message (or the sweep) says, once parsed.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    /// An explicit, classified failure record from the agent.
    Failure(&'a FailureRecord),
    /// A job spec SQS redrove after `maxReceiveCount`; `plan_seq` is the plan number the
    /// message was sent under (0 for an upstream original).
    Redriven { plan_seq: u32 },
    /// The sweep found the job in a state that may be stranded (see [`crate::sweep`]);
    /// `queue_idle` when the job's queue held no message at all (visible, delayed or in
    /// flight) when it looked.
    Sweep { queue_idle: bool },
}

/// A re-enqueue of the job's spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueue {
    pub queue_url: String,
    /// Delay from now; above 900 s it is chained with `agentq-not-before`.
    pub delay: Duration,
    /// The plan number the message carries ([`crate::replan::PLAN_ATTR`]).
    pub plan_seq: u32,
}

/// A re-plan to write (conditional on state + attempt), then maybe enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub expected_state: JobState,
    pub expected_attempt: agentq_core::Attempt,
    pub to: JobState,
    pub decision: Decision,
    pub changes: Replan,
    pub enqueue: Option<Enqueue>,
}

/// What to do with one DLQ message.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to change: acknowledge the message.
    Drop { why: String },
    /// No record yet (a raw spec that never reached a claim): create it, then decide again.
    CreateRecord,
    /// Write this plan, then enqueue when it says so.
    Plan(Box<Plan>),
    /// A plan was written but not marked enqueued for longer than `resend_after`: the
    /// dispatcher that wrote it died before or during the SendMessage. Send it again.
    Resend(Enqueue),
    /// A plan was written moments ago and is not marked enqueued yet: another dispatcher
    /// is between its write and its send. Leave the message for later.
    InFlight { age_ms: i64 },
}

/// Why a job is being re-planned.
#[derive(Debug, Clone, PartialEq)]
enum Cause {
    Failure(FailureCause),
    /// Redriven without ever being claimed (e.g. the runtime died before the claim), or
    /// left `QUEUED` without a message.
    NeverRan,
}

/// The cause recorded on a decision for a job that never ran.
pub const NEVER_RAN: &str = "never_ran";

impl Cause {
    /// The policy section that applies (a job that never ran is treated as a crash).
    fn kind(&self) -> CauseKind {
        match self {
            Self::Failure(c) => c.cause_kind(),
            Self::NeverRan => CauseKind::Crashed,
        }
    }

    /// The cause written on the decision.
    fn label(&self) -> &'static str {
        match self {
            Self::Failure(c) => c.kind(),
            Self::NeverRan => NEVER_RAN,
        }
    }
}

fn by_dispatcher<'a>(
    rec: &'a JobRecord,
    actions: &'a [Action],
) -> impl Iterator<Item = &'a Decision> {
    rec.history
        .iter()
        .filter(move |d| d.by == BY && actions.contains(&d.action))
}

fn count(rec: &JobRecord, actions: &[Action]) -> u32 {
    by_dispatcher(rec, actions).count() as u32
}

/// How many re-enqueue plans the job has had: the plan number of its latest message.
pub fn plan_seq(rec: &JobRecord) -> u32 {
    rec.history
        .iter()
        .filter(|d| d.by == BY && d.action.requeues())
        .count() as u32
}

/// The latest re-enqueue plan of the current attempt when it is not marked enqueued and
/// the job has not been claimed since.
pub fn pending_enqueue(rec: &JobRecord) -> Option<&Decision> {
    if !rec.status.is_claimable() {
        return None;
    }
    let attempt = rec.attempt.get();
    let (i, d) = rec
        .history
        .iter()
        .enumerate()
        .rev()
        .find(|(_, d)| d.by == BY && d.attempt == attempt && d.action.requeues())?;
    let marked = rec.history[i + 1..]
        .iter()
        .any(|m| m.by == BY && m.action == Action::Enqueued && m.attempt == attempt);
    (!marked).then_some(d)
}

/// When the job's latest re-enqueue is due to reach an agent (its decision time plus
/// its delay), if it had one.
fn last_plan_due(rec: &JobRecord) -> Option<EpochMillis> {
    rec.history
        .iter()
        .rev()
        .find(|d| d.by == BY && d.action.requeues())
        .map(|d| d.at + d.delay_seconds.unwrap_or(0) as i64 * 1000)
}

/// Segments used by resuming timed-out sessions (the `max_segments` budget): the first
/// plus one per `resume`. Rate-limit pauses and fresh starts after a failed resume move
/// the segment counter too, but are bounded by their own budgets.
fn segments_used(rec: &JobRecord) -> u32 {
    1 + count(rec, &[Action::Resume])
}

/// Limits that come from the job's spec (defaults when it cannot be read).
struct Limits {
    max_attempts: u32,
    timeout_ms: u64,
    max_budget_usd: Option<f64>,
    resume: ResumePolicy,
    tier: Option<String>,
}

fn limits(rec: &JobRecord) -> Limits {
    let spec = rec
        .spec
        .as_deref()
        .and_then(|s| JobSpec::from_json(s.as_bytes()).ok());
    Limits {
        max_attempts: spec.as_ref().and_then(|s| s.max_attempts).unwrap_or(3),
        timeout_ms: spec
            .as_ref()
            .and_then(|s| s.timeout_seconds)
            .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
            * 1000,
        max_budget_usd: spec.as_ref().and_then(|s| s.max_budget_usd),
        resume: spec.as_ref().and_then(|s| s.resume).unwrap_or_default(),
        tier: spec.and_then(|s| s.tier),
    }
}

/// The cause a finished record carries (for a raw spec redriven after its failure
/// record was lost): its own, else a timeout for `TIMED_OUT` and an exit otherwise.
fn cause_from_record(rec: &JobRecord) -> FailureCause {
    let resumable = rec.resume_session.is_some();
    match FailureCause::of_record(rec) {
        Some(FailureCause::TimedOut { .. }) => FailureCause::TimedOut { resumable },
        Some(c) => c,
        None if rec.status == JobState::TimedOut => FailureCause::TimedOut { resumable },
        None => FailureCause::AgentExit {
            code: rec.exit_code,
            signal: rec.signal,
        },
    }
}

/// Decides what one DLQ message (or a sweep finding) leads to. `rng` supplies the
/// backoff jitter.
pub fn decide(
    input: &Input<'_>,
    rec: Option<&JobRecord>,
    policy: &Policy,
    now: EpochMillis,
    rng: &mut fastrand::Rng,
) -> Step {
    let Some(rec) = rec else {
        return match input {
            Input::Failure(_) | Input::Sweep { .. } => Step::Drop {
                why: "no job record: nothing to re-plan".into(),
            },
            Input::Redriven { .. } => Step::CreateRecord,
        };
    };

    // Repair first: a plan whose SendMessage may never have happened.
    if let Some(d) = pending_enqueue(rec) {
        let age_ms = now - d.at;
        if age_ms < policy.resend_after.as_millis() as i64 {
            return Step::InFlight { age_ms };
        }
        if rec.cancel_requested {
            return Step::Drop {
                why: "a plan was never sent, but the job was cancelled since: not sent".into(),
            };
        }
        let due = d.at + d.delay_seconds.unwrap_or(0) as i64 * 1000;
        return Step::Resend(Enqueue {
            queue_url: d.queue.clone().unwrap_or_else(|| tier_queue(policy, rec)),
            delay: Duration::from_millis((due - now).max(0) as u64),
            plan_seq: plan_seq(rec),
        });
    }

    match input {
        Input::Failure(fr) => {
            if fr.attempt != rec.attempt {
                return Step::Drop {
                    why: format!(
                        "failure record of attempt {} but the job is at attempt {}: stale duplicate",
                        fr.attempt, rec.attempt
                    ),
                };
            }
            // A cancelled attempt is terminal already; it still gets its `fail`
            // decision once.
            let decided = rec
                .history
                .iter()
                .any(|d| d.by == BY && d.attempt == fr.attempt.get());
            let done = match rec.status {
                JobState::Cancelled => decided,
                s => s.is_terminal() || s.is_claimable(),
            };
            if done {
                return Step::Drop {
                    why: format!("already re-planned: the job is {}", rec.status),
                };
            }
            let session = fr
                .session_id
                .clone()
                .or_else(|| rec.resume_session.clone())
                .or_else(|| rec.progress.session_id.clone());
            plan_failure(
                rec,
                Cause::Failure(fr.cause.clone()),
                &fr.reason,
                session,
                policy,
                now,
                rng,
            )
        }
        Input::Redriven { plan_seq: seq } => {
            let current = plan_seq(rec);
            if *seq < current {
                return Step::Drop {
                    why: format!(
                        "a copy sent under plan {seq}; the job has been re-planned since (plan {current})"
                    ),
                };
            }
            match rec.status {
                JobState::Queued | JobState::RetryScheduled | JobState::Resuming => plan_failure(
                    rec,
                    Cause::NeverRan,
                    "redriven to the DLQ without ever being claimed (the runtime failed before the claim)",
                    rec.resume_session.clone(),
                    policy,
                    now,
                    rng,
                ),
                JobState::Running => {
                    let hb = rec.heartbeat_at.unwrap_or(rec.updated_at);
                    let age = now - hb;
                    if age < policy.stale_after.as_millis() as i64 {
                        Step::Drop {
                            why: format!(
                                "attempt {} is running with a live lease (heartbeat {} s ago): duplicate delivery",
                                rec.attempt,
                                age / 1000
                            ),
                        }
                    } else {
                        plan_failure(
                            rec,
                            Cause::Failure(FailureCause::Crashed),
                            &format!(
                                "attempt {} stopped heartbeating {} s ago (runtime died, e.g. out of memory)",
                                rec.attempt,
                                age / 1000
                            ),
                            rec.resume_session.clone(),
                            policy,
                            now,
                            rng,
                        )
                    }
                }
                JobState::Failed | JobState::TimedOut => {
                    let reason = rec.reason.clone().unwrap_or_default();
                    plan_failure(
                        rec,
                        Cause::Failure(cause_from_record(rec)),
                        &reason,
                        rec.resume_session
                            .clone()
                            .or_else(|| rec.progress.session_id.clone()),
                        policy,
                        now,
                        rng,
                    )
                }
                JobState::Succeeded | JobState::Cancelled | JobState::Dead => Step::Drop {
                    why: format!("the job is {}: nothing to do", rec.status),
                },
            }
        }
        Input::Sweep { queue_idle } => match rec.status {
            JobState::Running => {
                let hb = rec.heartbeat_at.unwrap_or(rec.updated_at);
                let age = now - hb;
                let limit = policy.sweep.strand_after(policy.stale_after);
                if age < limit.as_millis() as i64 {
                    return Step::Drop {
                        why: format!(
                            "attempt {} heartbeat {} s ago: not stranded (limit {} s)",
                            rec.attempt,
                            age / 1000,
                            limit.as_secs()
                        ),
                    };
                }
                plan_failure(
                    rec,
                    Cause::Failure(FailureCause::Crashed),
                    &format!(
                        "attempt {} stopped heartbeating {} s ago and its message did not come back within the agents' visibility horizon: stranded, found by the sweep",
                        rec.attempt,
                        age / 1000
                    ),
                    rec.resume_session.clone(),
                    policy,
                    now,
                    rng,
                )
            }
            JobState::Queued => {
                if !queue_idle {
                    return Step::Drop {
                        why: "its queue holds messages: a QUEUED job may still be waiting its turn"
                            .into(),
                    };
                }
                let since = last_plan_due(rec)
                    .unwrap_or(rec.updated_at)
                    .max(rec.updated_at);
                let age = now - since;
                if age < policy.sweep.queued_after.as_millis() as i64 {
                    return Step::Drop {
                        why: format!("queued {} s ago: not stranded", age / 1000),
                    };
                }
                plan_failure(
                    rec,
                    Cause::NeverRan,
                    &format!(
                        "QUEUED for {} s and its message never reached an agent (the send after the record was written was lost): re-enqueued by the sweep",
                        age / 1000
                    ),
                    None,
                    policy,
                    now,
                    rng,
                )
            }
            s => Step::Drop {
                why: format!("the job is {s}: nothing stranded"),
            },
        },
    }
}

fn current_tier(rec: &JobRecord, limits: &Limits) -> String {
    rec.tier
        .clone()
        .or_else(|| limits.tier.clone())
        .unwrap_or_else(|| DEFAULT_TIER.to_owned())
}

fn tier_queue(policy: &Policy, rec: &JobRecord) -> String {
    let l = limits(rec);
    let t = current_tier(rec, &l);
    policy
        .tier(&t)
        .or_else(|| policy.tier(DEFAULT_TIER))
        .map(|t| t.queue_url.clone())
        .unwrap_or_default()
}

/// The queue a job's next run goes to (its tier's).
pub fn queue_for(policy: &Policy, rec: &JobRecord) -> String {
    tier_queue(policy, rec)
}

fn secs_ceil(d: Duration) -> Duration {
    Duration::from_secs(d.as_millis().div_ceil(1000) as u64)
}

fn plan_failure(
    rec: &JobRecord,
    cause: Cause,
    reason: &str,
    session: Option<String>,
    policy: &Policy,
    now: EpochMillis,
    rng: &mut fastrand::Rng,
) -> Step {
    let limits = limits(rec);
    let kind = cause.kind();
    let cp = policy.cause(kind);
    let cause_text = match &cause {
        Cause::Failure(c) => c.to_string(),
        Cause::NeverRan => "never ran".to_owned(),
    };
    let decision = |action: Action, why: String| Decision {
        at: now,
        action,
        by: BY.to_owned(),
        attempt: rec.attempt.get(),
        cause: Some(cause.label().to_owned()),
        reason: why,
        delay_seconds: None,
        queue: None,
    };
    let plan = |to: JobState, d: Decision, mut changes: Replan, enqueue: Option<Enqueue>| {
        if rec.status == JobState::Running {
            // A crash: fenced on the heartbeat seen too, not only state + attempt.
            changes.expected_heartbeat = rec.heartbeat_at;
        }
        Step::Plan(Box::new(Plan {
            expected_state: rec.status,
            expected_attempt: rec.attempt,
            to,
            decision: d,
            changes,
            enqueue,
        }))
    };
    let dead = |action: Action, why: String| {
        plan(
            JobState::Dead,
            decision(action, why),
            Replan::default(),
            None,
        )
    };
    let cancelled_or_dead = || {
        if rec.status == JobState::Cancelled
            || JobState::Cancelled.allowed_from().contains(&rec.status)
        {
            JobState::Cancelled
        } else {
            JobState::Dead
        }
    };

    // Not retryable: terminal with the reason.
    if let Cause::Failure(
        c @ (FailureCause::InvalidSpec
        | FailureCause::SecretDenied
        | FailureCause::AgentExit { .. }
        | FailureCause::BudgetExceeded
        | FailureCause::Cancelled),
    ) = &cause
    {
        let why = format!("{c} is not retryable: {reason}");
        let to = if matches!(c, FailureCause::Cancelled) {
            cancelled_or_dead()
        } else {
            JobState::Dead
        };
        return plan(to, decision(Action::Fail, why), Replan::default(), None);
    }

    // Cancelled while it waited for this plan: nothing runs again.
    if rec.cancel_requested || rec.status == JobState::Cancelled {
        return plan(
            cancelled_or_dead(),
            decision(
                Action::Fail,
                format!("{cause_text}: not re-planned, the job was cancelled ({reason})"),
            ),
            Replan::default(),
            None,
        );
    }

    // Budgets that bind every retryable cause.
    if let Some(b) = limits.max_budget_usd
        && rec.cost_usd >= b
    {
        return dead(
            Action::Dead,
            format!(
                "{cause_text}: cost budget spent (${:.4} of max_budget_usd ${b:.4})",
                rec.cost_usd
            ),
        );
    }
    if rec.runtime_ms >= limits.timeout_ms {
        return dead(
            Action::Dead,
            format!(
                "{cause_text}: total runtime {} s reached the job's timeout_seconds {}",
                rec.runtime_ms / 1000,
                limits.timeout_ms / 1000
            ),
        );
    }
    if rec.spec.as_ref().is_none_or(|s| s.is_empty()) {
        return dead(
            Action::Fail,
            format!("{cause_text}: the record holds no spec to enqueue again"),
        );
    }
    let max_attempts = cp
        .max_attempts
        .map_or(limits.max_attempts, |c| c.min(limits.max_attempts));
    let failures = 1
        + count(rec, &[Action::Retry, Action::Escalate])
        + rec
            .history
            .iter()
            .filter(|d| d.action == Action::Takeover)
            .count() as u32;
    let tier = current_tier(rec, &limits);
    let next_seq = plan_seq(rec) + 1;
    let here = policy
        .tier(&tier)
        .or_else(|| policy.tier(DEFAULT_TIER))
        .map(|t| t.queue_url.clone())
        .unwrap_or_default();
    let over_attempts = || {
        dead(
            Action::Dead,
            format!(
                "{cause_text}: {failures} of max_attempts {max_attempts} attempts failed; last: {reason}"
            ),
        )
    };
    let escalate = |to_tier: &crate::policy::Tier, why: String| {
        let mut d = decision(Action::Escalate, why);
        d.delay_seconds = Some(0);
        d.queue = Some(to_tier.queue_url.clone());
        plan(
            JobState::RetryScheduled,
            d,
            Replan {
                tier: Some(to_tier.name.clone()),
                ..Default::default()
            },
            Some(Enqueue {
                queue_url: to_tier.queue_url.clone(),
                delay: Duration::ZERO,
                plan_seq: next_seq,
            }),
        )
    };
    let can_schedule = JobState::RetryScheduled
        .allowed_from()
        .contains(&rec.status);

    match &cause {
        Cause::Failure(FailureCause::TimedOut { resumable }) => {
            let session = session.filter(|_| *resumable || rec.resume_session.is_some());
            if let Some(session) = session
                && limits.resume != ResumePolicy::Never
                && JobState::Resuming.allowed_from().contains(&rec.status)
            {
                let used = segments_used(rec);
                if used >= policy.max_segments {
                    return dead(
                        Action::Dead,
                        format!(
                            "{cause_text}: {used} of max_segments {} segments used",
                            policy.max_segments
                        ),
                    );
                }
                // `escalate_resumable`: the next segment runs on the escalation tier
                // (longer invocations) instead of this one.
                let moved = cp
                    .escalate_resumable
                    .then(|| policy.escalation(&tier, kind))
                    .flatten();
                let (queue, on) = match moved {
                    Some(t) => (
                        t.queue_url.clone(),
                        format!(" on tier {} (escalated from tier {tier})", t.name),
                    ),
                    None => (here, String::new()),
                };
                let mut d = decision(
                    Action::Resume,
                    format!(
                        "segment {} timed out after {} s of {} s in total; resuming session {session} as segment {}{on}",
                        rec.segment,
                        rec.runtime_ms / 1000,
                        limits.timeout_ms / 1000,
                        rec.segment + 1
                    ),
                );
                d.delay_seconds = Some(0);
                d.queue = Some(queue.clone());
                return plan(
                    JobState::Resuming,
                    d,
                    Replan {
                        resume_session: Some(session),
                        next_segment: true,
                        tier: moved.map(|t| t.name.clone()),
                        ..Default::default()
                    },
                    Some(Enqueue {
                        queue_url: queue,
                        delay: Duration::ZERO,
                        plan_seq: next_seq,
                    }),
                );
            }
            match policy.escalation(&tier, kind) {
                Some(next) if can_schedule => {
                    if failures >= max_attempts {
                        return over_attempts();
                    }
                    escalate(
                        next,
                        format!(
                            "timed out on tier {tier} without a checkpoint to resume; escalating to tier {}",
                            next.name
                        ),
                    )
                }
                _ => dead(
                    Action::Fail,
                    format!(
                        "{cause_text} on tier {tier} without a checkpoint to resume, and no bigger tier is configured: {reason}"
                    ),
                ),
            }
        }
        Cause::Failure(FailureCause::RateLimited { reset_at }) => {
            // Not the job's fault: not an attempt. Bounded by its own budget.
            let pauses = count(rec, &[Action::Pause]);
            if pauses >= policy.max_rate_limit_pauses {
                return dead(
                    Action::Dead,
                    format!(
                        "{cause_text}: {pauses} of max_rate_limit_pauses {} pauses used; last: {reason}",
                        policy.max_rate_limit_pauses
                    ),
                );
            }
            let (delay, when) = match reset_at {
                Some(at) => {
                    // Just after the reset; a little jitter so paused jobs do not all
                    // start in the same second.
                    let wait = Duration::from_millis((at - now).max(0) as u64)
                        + Duration::from_secs(rng.u64(1..=5));
                    (secs_ceil(wait), "after the limit resets")
                }
                None => (
                    secs_ceil(backoff(cp.base_delay, cp.max_delay, pauses + 1, rng)),
                    "(the API gave no reset time)",
                ),
            };
            if delay > cp.max_delay + Duration::from_secs(5) {
                return dead(
                    Action::Dead,
                    format!(
                        "{cause_text}: the limit resets in {}, later than causes.rate_limited.max_delay {}: {reason}",
                        humantime::format_duration(delay),
                        humantime::format_duration(cp.max_delay)
                    ),
                );
            }
            let resume = session.filter(|_| {
                limits.resume != ResumePolicy::Never
                    && JobState::Resuming.allowed_from().contains(&rec.status)
            });
            let (to, changes, what) = match resume {
                Some(s) => (
                    JobState::Resuming,
                    Replan {
                        resume_session: Some(s.clone()),
                        next_segment: true,
                        ..Default::default()
                    },
                    format!("resuming session {s} as segment {}", rec.segment + 1),
                ),
                None if can_schedule => (
                    JobState::RetryScheduled,
                    Replan::default(),
                    "running it again".to_owned(),
                ),
                None => (rec.status, Replan::default(), "running it again".to_owned()),
            };
            let mut d = decision(
                Action::Pause,
                format!(
                    "{cause_text}: pause {} of {}; {what} in {} {when} (not counted as a failed attempt): {reason}",
                    pauses + 1,
                    policy.max_rate_limit_pauses,
                    humantime::format_duration(delay)
                ),
            );
            d.delay_seconds = Some(delay.as_secs());
            d.queue = Some(here.clone());
            plan(
                to,
                d,
                changes,
                Some(Enqueue {
                    queue_url: here,
                    delay,
                    plan_seq: next_seq,
                }),
            )
        }
        _ => {
            if failures >= max_attempts {
                return over_attempts();
            }
            if cause == Cause::Failure(FailureCause::Crashed) && can_schedule {
                let crashes = 1 + crashes_on_tier(rec);
                if crashes >= policy.escalate_after_crashes
                    && let Some(next) = policy.escalation(&tier, kind)
                {
                    return escalate(
                        next,
                        format!(
                            "crashed {crashes} times on tier {tier} (likely out of memory); escalating to tier {}",
                            next.name
                        ),
                    );
                }
            }
            let n = count(rec, &[Action::Retry]) + 1;
            let delay = secs_ceil(backoff(cp.base_delay, cp.max_delay, n, rng));
            let fresh = cause == Cause::Failure(FailureCause::ResumeFailed);
            let what = if fresh {
                format!(
                    "the session could not be resumed; starting afresh as segment {} ",
                    rec.segment + 1
                )
            } else {
                String::new()
            };
            let mut d = decision(
                Action::Retry,
                format!(
                    "{cause_text}: {what}retry {n} (attempt {failures} of {max_attempts} failed) in {}: {reason}",
                    humantime::format_duration(delay)
                ),
            );
            d.delay_seconds = Some(delay.as_secs());
            d.queue = Some(here.clone());
            // A job that never ran keeps its state (QUEUED stays QUEUED); anything
            // else is scheduled.
            let to = if can_schedule {
                JobState::RetryScheduled
            } else {
                rec.status
            };
            let changes = if fresh {
                Replan {
                    drop_session: true,
                    next_segment: true,
                    ..Default::default()
                }
            } else {
                Replan::default()
            };
            plan(
                to,
                d,
                changes,
                Some(Enqueue {
                    queue_url: here,
                    delay,
                    plan_seq: next_seq,
                }),
            )
        }
    }
}

/// Crashes since the job last moved tier: takeovers of stale leases and crash retries.
fn crashes_on_tier(rec: &JobRecord) -> u32 {
    let since = rec
        .history
        .iter()
        .rposition(|d| d.by == BY && d.action == Action::Escalate)
        .map_or(0, |i| i + 1);
    rec.history[since..]
        .iter()
        .filter(|d| {
            d.action == Action::Takeover
                || (d.by == BY
                    && d.action == Action::Retry
                    && d.cause.as_deref() == Some(FailureCause::Crashed.kind()))
        })
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentq_core::failure::FAILURE_RECORD_VERSION;
    use agentq_core::{Attempt, JobId};

    fn policy(tiers: &[(&str, &str)]) -> Policy {
        let t: Vec<(String, String)> = tiers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Policy::build(&Default::default(), &t, "https://q/jobs").unwrap()
    }

    fn rec(status: JobState, attempt: u32, spec: &str) -> JobRecord {
        let mut r = JobRecord::new(JobId::parse("j").unwrap(), status, 1_000);
        r.attempt = Attempt(attempt);
        r.spec = Some(spec.into());
        r
    }

    fn failure(cause: FailureCause, attempt: u32) -> FailureRecord {
        FailureRecord {
            agentq_failure: FAILURE_RECORD_VERSION,
            job_id: Some(JobId::parse("j").unwrap()),
            attempt: Attempt(attempt),
            state: cause.final_state(),
            cause,
            reason: "boom".into(),
            at: 1,
            segment: 1,
            session_id: None,
            result_key: None,
            raw_body: None,
            message_id: None,
        }
    }

    const SPEC: &str = r#"{"spec_version":1,"job_id":"j","agent":"command","command":["true"]}"#;

    fn step(input: &Input<'_>, r: &JobRecord, p: &Policy) -> Step {
        decide(
            input,
            Some(r),
            p,
            10_000_000,
            &mut fastrand::Rng::with_seed(1),
        )
    }

    #[test]
    fn pending_enqueue_is_resent_only_after_the_grace() {
        let p = policy(&[]);
        let mut r = rec(JobState::RetryScheduled, 1, SPEC);
        r.history.push(Decision {
            at: 10_000_000 - 1_000,
            action: Action::Retry,
            by: BY.into(),
            attempt: 1,
            delay_seconds: Some(30),
            queue: Some("https://q/jobs".into()),
            ..Default::default()
        });
        let f = failure(FailureCause::InfraTransient, 1);
        assert!(matches!(
            step(&Input::Failure(&f), &r, &p),
            Step::InFlight { .. }
        ));
        r.history[0].at = 10_000_000 - 600_000;
        match step(&Input::Failure(&f), &r, &p) {
            Step::Resend(e) => {
                assert_eq!(e.delay, Duration::ZERO);
                assert_eq!(e.plan_seq, 1);
            }
            other => panic!("{other:?}"),
        }
        r.history.push(Decision {
            action: Action::Enqueued,
            by: BY.into(),
            attempt: 1,
            ..Default::default()
        });
        assert!(matches!(
            step(&Input::Failure(&f), &r, &p),
            Step::Drop { .. }
        ));
    }

    #[test]
    fn a_resumable_timeout_resumes_on_the_next_tier_only_when_configured() {
        let mut r = rec(JobState::TimedOut, 1, SPEC);
        r.segment = 1;
        r.runtime_ms = 60_000;
        let mut f = failure(FailureCause::TimedOut { resumable: true }, 1);
        f.session_id = Some("s-1".into());
        let tiers = [("large".to_owned(), "https://q/large".to_owned())];
        let resume = |p: &Policy, r: &JobRecord| match step(&Input::Failure(&f), r, p) {
            Step::Plan(pl) => {
                assert_eq!(pl.decision.action, agentq_core::Action::Resume);
                assert_eq!(pl.to, JobState::Resuming);
                assert_eq!(pl.changes.resume_session.as_deref(), Some("s-1"));
                assert!(pl.changes.next_segment);
                (pl.changes.tier.clone(), pl.enqueue.unwrap().queue_url)
            }
            other => panic!("{other:?}"),
        };
        // Default: resume on the same tier, even with a bigger one configured.
        let same = Policy::build(&Default::default(), &tiers, "https://q/jobs").unwrap();
        assert_eq!(resume(&same, &r), (None, "https://q/jobs".to_owned()));
        // escalate_resumable: the next segment goes to the large tier's queue.
        let raw: crate::policy::RawPolicy =
            toml::from_str("[causes.timed_out]\nescalate_resumable = true").unwrap();
        let moved = Policy::build(&raw, &tiers, "https://q/jobs").unwrap();
        assert_eq!(
            resume(&moved, &r),
            (Some("large".to_owned()), "https://q/large".to_owned())
        );
        // Already on the largest tier: resumes where it is.
        r.tier = Some("large".into());
        assert_eq!(resume(&moved, &r), (None, "https://q/large".to_owned()));
        // No bigger tier configured at all: resumes in place.
        r.tier = None;
        let alone = Policy::build(&raw, &[], "https://q/jobs").unwrap();
        assert_eq!(resume(&alone, &r), (None, "https://q/jobs".to_owned()));
    }

    #[test]
    fn crashes_escalate_after_the_threshold() {
        let p = policy(&[("large", "https://q/large")]);
        let mut r = rec(JobState::Failed, 2, SPEC);
        let f = failure(FailureCause::Crashed, 2);
        // First crash: plain retry.
        match step(&Input::Failure(&f), &r, &p) {
            Step::Plan(pl) => assert_eq!(pl.decision.action, Action::Retry),
            other => panic!("{other:?}"),
        }
        // Second crash on the same tier (one takeover before): escalate.
        r.history.push(Decision {
            action: Action::Takeover,
            by: "agent".into(),
            attempt: 2,
            ..Default::default()
        });
        match step(&Input::Failure(&f), &r, &p) {
            Step::Plan(pl) => {
                assert_eq!(pl.decision.action, Action::Escalate);
                assert_eq!(pl.changes.tier.as_deref(), Some("large"));
                assert_eq!(pl.enqueue.unwrap().queue_url, "https://q/large");
            }
            other => panic!("{other:?}"),
        }
    }

    const NOW: EpochMillis = 10_000_000;

    fn the_plan(step: Step) -> Plan {
        match step {
            Step::Plan(p) => *p,
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    fn with_retries(mut r: JobRecord, n: u32) -> JobRecord {
        for _ in 0..n {
            r.history.push(Decision {
                action: Action::Retry,
                by: BY.into(),
                attempt: r.attempt.get(),
                ..Default::default()
            });
            r.history.push(Decision {
                action: Action::Enqueued,
                by: BY.into(),
                attempt: r.attempt.get(),
                ..Default::default()
            });
        }
        r
    }

    #[test]
    fn a_rate_limit_pauses_until_the_reset_and_is_not_an_attempt() {
        let p = policy(&[]);
        // Two failed attempts already: a third failure would be the last of 3.
        let mut r = with_retries(rec(JobState::Failed, 3, SPEC), 2);
        r.progress.session_id = Some("sess".into());
        let reset = NOW + 2 * 3600 * 1000;
        let f = failure(
            FailureCause::RateLimited {
                reset_at: Some(reset),
            },
            3,
        );
        let pl = the_plan(step(&Input::Failure(&f), &r, &p));
        assert_eq!(pl.decision.action, Action::Pause);
        assert_eq!(pl.to, JobState::Resuming);
        assert_eq!(pl.changes.resume_session.as_deref(), Some("sess"));
        assert!(pl.changes.next_segment);
        let delay = pl.enqueue.unwrap().delay;
        assert!(
            (7201..=7205).contains(&delay.as_secs()),
            "just after the reset: {delay:?}"
        );
        assert!(
            pl.decision.reason.contains("not counted"),
            "{}",
            pl.decision.reason
        );

        // Without a session (or with resume: never) it runs again afresh.
        let r2 = with_retries(rec(JobState::Failed, 1, SPEC), 0);
        let f = failure(FailureCause::RateLimited { reset_at: None }, 1);
        let pl = the_plan(step(&Input::Failure(&f), &r2, &p));
        assert_eq!(
            (pl.to, pl.decision.action),
            (JobState::RetryScheduled, Action::Pause)
        );
        let d = pl.enqueue.unwrap().delay;
        assert!((30..=60).contains(&d.as_secs()), "backoff from 1m: {d:?}");

        // Pauses have their own budget ...
        let mut many = rec(JobState::Failed, 1, SPEC);
        for _ in 0..p.max_rate_limit_pauses {
            many.history.push(Decision {
                action: Action::Pause,
                by: BY.into(),
                attempt: 1,
                ..Default::default()
            });
        }
        let pl = the_plan(step(&Input::Failure(&f), &many, &p));
        assert_eq!((pl.to, pl.decision.action), (JobState::Dead, Action::Dead));
        assert!(pl.decision.reason.contains("max_rate_limit_pauses"));
        // ... and a limit that resets too far away ends the job.
        let f = failure(
            FailureCause::RateLimited {
                reset_at: Some(NOW + 3 * 86_400_000),
            },
            1,
        );
        let pl = the_plan(step(&Input::Failure(&f), &r2, &p));
        assert_eq!(pl.to, JobState::Dead);
        assert!(
            pl.decision.reason.contains("max_delay"),
            "{}",
            pl.decision.reason
        );
    }

    #[test]
    fn a_failed_resume_starts_afresh_within_the_attempt_budget() {
        let p = policy(&[]);
        let mut r = rec(JobState::Failed, 2, SPEC);
        r.segment = 2;
        r.resume_session = Some("gone".into());
        let f = failure(FailureCause::ResumeFailed, 2);
        let pl = the_plan(step(&Input::Failure(&f), &r, &p));
        assert_eq!(
            (pl.to, pl.decision.action),
            (JobState::RetryScheduled, Action::Retry)
        );
        assert!(pl.changes.drop_session && pl.changes.next_segment);
        assert_eq!(pl.changes.resume_session, None);
        assert_eq!(pl.enqueue.unwrap().delay, Duration::ZERO);
        assert!(
            pl.decision.reason.contains("afresh as segment 3"),
            "{}",
            pl.decision.reason
        );
        // Only spent attempts end it.
        let r = with_retries(r, 2);
        let pl = the_plan(step(&Input::Failure(&f), &r, &p));
        assert_eq!((pl.to, pl.decision.action), (JobState::Dead, Action::Dead));
    }

    #[test]
    fn a_spent_budget_and_a_cancel_end_the_job() {
        let p = policy(&[]);
        let r = rec(JobState::Failed, 1, SPEC);
        let f = failure(FailureCause::BudgetExceeded, 1);
        let pl = the_plan(step(&Input::Failure(&f), &r, &p));
        assert_eq!((pl.to, pl.decision.action), (JobState::Dead, Action::Fail));
        assert_eq!(pl.enqueue, None);

        let mut r = rec(JobState::Failed, 1, SPEC);
        r.cancel_requested = true;
        let f = failure(FailureCause::InfraTransient, 1);
        let pl = the_plan(step(&Input::Failure(&f), &r, &p));
        assert_eq!(
            (pl.to, pl.decision.action),
            (JobState::Cancelled, Action::Fail)
        );
        assert_eq!(pl.enqueue, None);
    }

    #[test]
    fn the_sweep_replans_stranded_jobs_only() {
        let p = policy(&[]);
        let strand = p.sweep.strand_after(p.stale_after).as_millis() as i64;
        let mut r = rec(JobState::Running, 1, SPEC);
        r.heartbeat_at = Some(NOW - strand + 1_000);
        let sweep = Input::Sweep { queue_idle: true };
        assert!(matches!(step(&sweep, &r, &p), Step::Drop { .. }));
        r.heartbeat_at = Some(NOW - strand - 1_000);
        let pl = the_plan(step(&sweep, &r, &p));
        assert_eq!(
            (pl.expected_state, pl.to),
            (JobState::Running, JobState::RetryScheduled)
        );
        assert_eq!(pl.decision.cause.as_deref(), Some("crashed"));
        assert!(
            pl.decision.reason.contains("stranded"),
            "{}",
            pl.decision.reason
        );
        // Fenced on the heartbeat it saw.
        assert_eq!(pl.changes.expected_heartbeat, r.heartbeat_at);

        let mut q = rec(JobState::Queued, 0, SPEC);
        q.updated_at = NOW - p.sweep.queued_after.as_millis() as i64 - 1_000;
        // A busy queue: it may be waiting its turn.
        assert!(matches!(
            step(&Input::Sweep { queue_idle: false }, &q, &p),
            Step::Drop { .. }
        ));
        let pl = the_plan(step(&sweep, &q, &p));
        assert_eq!(
            (pl.to, pl.decision.action),
            (JobState::Queued, Action::Retry)
        );
        assert_eq!(pl.decision.cause.as_deref(), Some(NEVER_RAN));
        assert!(pl.enqueue.is_some());
        // A planned delay that has not run out yet counts as waiting.
        q.history.push(Decision {
            at: q.updated_at,
            action: Action::Retry,
            by: BY.into(),
            delay_seconds: Some(3600),
            ..Default::default()
        });
        q.history.push(Decision {
            at: q.updated_at,
            action: Action::Enqueued,
            by: BY.into(),
            ..Default::default()
        });
        assert!(matches!(step(&sweep, &q, &p), Step::Drop { .. }));
        // Nothing else is the sweep's business.
        for s in [JobState::Failed, JobState::Succeeded, JobState::Dead] {
            assert!(matches!(
                step(&sweep, &rec(s, 1, SPEC), &p),
                Step::Drop { .. }
            ));
        }
    }
}
