//! The re-plan decision, as a pure function of what the DLQ message says, the job's
//! record, the policy and the clock: [`decide`] returns a [`Step`] and touches nothing.
//! [`crate::replan`] applies it (conditional write first, then the enqueue).
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
//! | any | a plan of this attempt not marked enqueued | re-send it once older than `resend_after`, else retry later |
//!
//! Plans by cause:
//!
//! | cause | plan |
//! |---|---|
//! | `invalid_spec`, `secret_denied`, `agent_exit` | `DEAD`, action `fail` (no retry) |
//! | `cancelled` | stays `CANCELLED`, action `fail` |
//! | any retryable, past a budget (cost, total runtime, attempts, segments) | `DEAD`, action `dead` |
//! | `crashed` for the `escalate_after_crashes`-th time on a tier with a bigger tier | `RETRY_SCHEDULED` on the next tier, action `escalate` |
//! | `infra_transient`, `crashed`, never ran | `RETRY_SCHEDULED` (never ran: state kept), backoff + jitter, action `retry` |
//! | `timed_out`, session known, `resume` ≠ never | `RESUMING`, segment + 1, action `resume` (on the next tier when `causes.timed_out.escalate_resumable`) |
//! | `timed_out` without a session | next tier if any (action `escalate`), else `DEAD` (action `fail`) |

use std::time::Duration;

use agentq_core::failure::FailureRecord;
use agentq_core::record::{Decision, EpochMillis, JobRecord};
use agentq_core::spec::{DEFAULT_TIMEOUT_SECONDS, JobSpec, ResumePolicy};
use agentq_core::store::Replan;
use agentq_core::{FailureCause, JobState};

use crate::policy::{DEFAULT_TIER, Policy, backoff};

/// Who the dispatcher's decisions are by.
pub const BY: &str = "dispatcher";

/// Decision actions the dispatcher writes.
pub mod action {
    pub const RETRY: &str = "retry";
    pub const RESUME: &str = "resume";
    pub const ESCALATE: &str = "escalate";
    pub const FAIL: &str = "fail";
    pub const DEAD: &str = "dead";
    /// Written after the SendMessage of a re-enqueue succeeded (see [`crate::replan`]).
    pub const ENQUEUED: &str = "enqueued";
    /// Written by an agent's claim that took over a stale lease.
    pub const TAKEOVER: &str = "takeover";
}

/// Actions that put the job on a queue again.
const REQUEUE: [&str; 3] = [action::RETRY, action::RESUME, action::ESCALATE];

/// What a DLQ message says, once parsed.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    /// An explicit, classified failure record from the agent.
    Failure(&'a FailureRecord),
    /// A job spec SQS redrove after `maxReceiveCount`; `plan_seq` is the plan number the
    /// message was sent under (0 for an upstream original).
    Redriven { plan_seq: u32 },
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
    /// Redriven without ever being claimed (e.g. the runtime died before the claim).
    NeverRan,
}

/// The cause recorded on a decision for a job that never ran.
pub const NEVER_RAN: &str = "never_ran";

impl Cause {
    /// The policy section that applies (a job that never ran is treated as a crash).
    fn kind(&self) -> &'static str {
        match self {
            Self::Failure(c) => c.kind(),
            Self::NeverRan => FailureCause::Crashed.kind(),
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
    actions: &'a [&str],
) -> impl Iterator<Item = &'a Decision> {
    rec.history
        .iter()
        .filter(move |d| d.by == BY && actions.contains(&d.action.as_str()))
}

/// How many re-enqueue plans the job has had: the plan number of its latest message.
pub fn plan_seq(rec: &JobRecord) -> u32 {
    by_dispatcher(rec, &REQUEUE).count() as u32
}

/// The latest re-enqueue plan of the current attempt when it is not marked enqueued and
/// the job has not been claimed since.
pub fn pending_enqueue(rec: &JobRecord) -> Option<&Decision> {
    if !rec.status.is_claimable() {
        return None;
    }
    let attempt = rec.attempt.get();
    let (i, d) = rec.history.iter().enumerate().rev().find(|(_, d)| {
        d.by == BY && d.attempt == attempt && REQUEUE.contains(&d.action.as_str())
    })?;
    let marked = rec.history[i + 1..]
        .iter()
        .any(|m| m.by == BY && m.action == action::ENQUEUED && m.attempt == attempt);
    (!marked).then_some(d)
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
/// record was lost).
fn cause_from_record(rec: &JobRecord) -> FailureCause {
    match rec.cause.as_deref() {
        Some("invalid_spec") => FailureCause::InvalidSpec,
        Some("secret_denied") => FailureCause::SecretDenied,
        Some("cancelled") => FailureCause::Cancelled,
        Some("infra_transient") => FailureCause::InfraTransient,
        Some("crashed") => FailureCause::Crashed,
        Some("timed_out") => FailureCause::TimedOut {
            resumable: rec.resume_session.is_some(),
        },
        _ if rec.status == JobState::TimedOut => FailureCause::TimedOut {
            resumable: rec.resume_session.is_some(),
        },
        _ => FailureCause::AgentExit {
            code: rec.exit_code,
            signal: rec.signal,
        },
    }
}

/// Decides what one DLQ message leads to. `rng` supplies the backoff jitter.
pub fn decide(
    input: &Input<'_>,
    rec: Option<&JobRecord>,
    policy: &Policy,
    now: EpochMillis,
    rng: &mut fastrand::Rng,
) -> Step {
    let Some(rec) = rec else {
        return match input {
            Input::Failure(_) => Step::Drop {
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
    let decision = |action: &str, why: String| Decision {
        at: now,
        action: action.to_owned(),
        by: BY.to_owned(),
        attempt: rec.attempt.get(),
        cause: Some(cause.label().to_owned()),
        reason: why,
        delay_seconds: None,
        queue: None,
    };
    let plan = |to: JobState, d: Decision, changes: Replan, enqueue: Option<Enqueue>| {
        Step::Plan(Box::new(Plan {
            expected_state: rec.status,
            expected_attempt: rec.attempt,
            to,
            decision: d,
            changes,
            enqueue,
        }))
    };
    let dead = |action: &str, why: String| {
        plan(
            JobState::Dead,
            decision(action, why),
            Replan::default(),
            None,
        )
    };

    // Not retryable: terminal with the reason.
    if let Cause::Failure(
        c @ (FailureCause::InvalidSpec
        | FailureCause::SecretDenied
        | FailureCause::AgentExit { .. }
        | FailureCause::Cancelled),
    ) = &cause
    {
        let why = format!("{c} is not retryable: {reason}");
        let to = if matches!(c, FailureCause::Cancelled)
            && (rec.status == JobState::Cancelled
                || JobState::Cancelled.allowed_from().contains(&rec.status))
        {
            JobState::Cancelled
        } else {
            JobState::Dead
        };
        return plan(to, decision(action::FAIL, why), Replan::default(), None);
    }

    // Budgets that bind every retryable cause.
    if let Some(b) = limits.max_budget_usd
        && rec.cost_usd >= b
    {
        return dead(
            action::DEAD,
            format!(
                "{cause_text}: cost budget spent (${:.4} of max_budget_usd ${b:.4})",
                rec.cost_usd
            ),
        );
    }
    if rec.runtime_ms >= limits.timeout_ms {
        return dead(
            action::DEAD,
            format!(
                "{cause_text}: total runtime {} s reached the job's timeout_seconds {}",
                rec.runtime_ms / 1000,
                limits.timeout_ms / 1000
            ),
        );
    }
    if rec.spec.as_ref().is_none_or(|s| s.is_empty()) {
        return dead(
            action::FAIL,
            format!("{cause_text}: the record holds no spec to enqueue again"),
        );
    }
    let max_attempts = cp
        .max_attempts
        .map_or(limits.max_attempts, |c| c.min(limits.max_attempts));
    let failures = 1
        + by_dispatcher(rec, &[action::RETRY, action::ESCALATE]).count() as u32
        + rec
            .history
            .iter()
            .filter(|d| d.action == action::TAKEOVER)
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
            action::DEAD,
            format!(
                "{cause_text}: {failures} of max_attempts {max_attempts} attempts failed; last: {reason}"
            ),
        )
    };
    let escalate = |to_tier: &crate::policy::Tier, why: String| {
        let mut d = decision(action::ESCALATE, why);
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
                if rec.segment >= policy.max_segments {
                    return dead(
                        action::DEAD,
                        format!(
                            "{cause_text}: {} of max_segments {} segments used",
                            rec.segment, policy.max_segments
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
                    action::RESUME,
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
                    action::FAIL,
                    format!(
                        "{cause_text} on tier {tier} without a checkpoint to resume, and no bigger tier is configured: {reason}"
                    ),
                ),
            }
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
            let n = by_dispatcher(rec, &[action::RETRY]).count() as u32 + 1;
            let delay = backoff(cp.base_delay, cp.max_delay, n, rng);
            let delay = Duration::from_secs(delay.as_millis().div_ceil(1000) as u64);
            let mut d = decision(
                action::RETRY,
                format!(
                    "{cause_text}: retry {n} (attempt {failures} of {max_attempts} failed) in {}: {reason}",
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
            plan(
                to,
                d,
                Replan::default(),
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
        .rposition(|d| d.by == BY && d.action == action::ESCALATE)
        .map_or(0, |i| i + 1);
    rec.history[since..]
        .iter()
        .filter(|d| {
            d.action == action::TAKEOVER
                || (d.by == BY
                    && d.action == action::RETRY
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
            action: action::RETRY.into(),
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
            action: action::ENQUEUED.into(),
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
                assert_eq!(pl.decision.action, action::RESUME);
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
            Step::Plan(pl) => assert_eq!(pl.decision.action, action::RETRY),
            other => panic!("{other:?}"),
        }
        // Second crash on the same tier (one takeover before): escalate.
        r.history.push(Decision {
            action: action::TAKEOVER.into(),
            by: "agent".into(),
            attempt: 2,
            ..Default::default()
        });
        match step(&Input::Failure(&f), &r, &p) {
            Step::Plan(pl) => {
                assert_eq!(pl.decision.action, action::ESCALATE);
                assert_eq!(pl.changes.tier.as_deref(), Some("large"));
                assert_eq!(pl.enqueue.unwrap().queue_url, "https://q/large");
            }
            other => panic!("{other:?}"),
        }
    }
}
