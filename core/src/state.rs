//! The job state machine and the closed vocabularies the agent and the dispatcher share:
//! [`JobState`] and its allowed transitions, the classified [`FailureCause`] (whose
//! retryability is a property of the type) and its [`CauseKind`] (the stored name, and the
//! key of a cause's section in the re-plan policy), and the [`Action`] a decision in a
//! job's history records.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::record::{EpochMillis, JobRecord};

/// Where a job is. Stored as the SCREAMING_SNAKE string in the `status` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Submitted, waiting for an agent.
    Queued,
    /// An agent holds the lease (attempt, owner, heartbeat).
    Running,
    /// The agent exited 0.
    Succeeded,
    /// The attempt failed; the dispatcher may re-plan it.
    Failed,
    /// The attempt ran out of time; the dispatcher may resume or escalate it.
    TimedOut,
    /// Cancelled by a user. Terminal.
    Cancelled,
    /// The dispatcher re-enqueued it after a failure (with a delay).
    RetryScheduled,
    /// The dispatcher enqueued the next segment of a timed-out session.
    Resuming,
    /// A re-plan budget is spent, or the failure cannot be retried. Terminal.
    Dead,
}

/// Every state, for listing and docs.
pub const ALL_STATES: [JobState; 9] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::TimedOut,
    JobState::Cancelled,
    JobState::RetryScheduled,
    JobState::Resuming,
    JobState::Dead,
];

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::TimedOut => "TIMED_OUT",
            Self::Cancelled => "CANCELLED",
            Self::RetryScheduled => "RETRY_SCHEDULED",
            Self::Resuming => "RESUMING",
            Self::Dead => "DEAD",
        }
    }

    /// No transition leaves this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Cancelled | Self::Dead)
    }

    /// The run is over (for this attempt at least): an agent never runs a job in this
    /// state again; only the dispatcher can move it on.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled | Self::Dead
        )
    }

    /// An agent may claim a job in this state (a live `Running` lease excepted, which is
    /// checked against its heartbeat).
    pub fn is_claimable(self) -> bool {
        matches!(self, Self::Queued | Self::RetryScheduled | Self::Resuming)
    }

    /// The states a transition into `self` may start from. Every write to the table is
    /// conditional on the current state being one of these.
    pub fn allowed_from(self) -> &'static [JobState] {
        use JobState::*;
        match self {
            Queued => &[],
            // Running → Running is the takeover of a stale lease (attempt + 1).
            Running => &[Queued, RetryScheduled, Resuming, Running],
            Succeeded | Failed | TimedOut => &[Running],
            // Failed/TimedOut → Cancelled: cancelled while waiting for a re-plan.
            Cancelled => &[Queued, RetryScheduled, Resuming, Running, Failed, TimedOut],
            RetryScheduled => &[Failed, TimedOut, Running],
            // Failed → Resuming: a rate-limited session resumes after the reset.
            Resuming => &[TimedOut, Failed],
            Dead => &[Failed, TimedOut, Running, Queued, RetryScheduled, Resuming],
        }
    }

    /// Whether `self → to` is an allowed transition.
    pub fn can_transition_to(self, to: JobState) -> bool {
        to.allowed_from().contains(&self)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown state name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown job state {0:?}: use one of QUEUED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, RETRY_SCHEDULED, RESUMING, DEAD"
)]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.to_ascii_uppercase().replace('-', "_");
        ALL_STATES
            .into_iter()
            .find(|st| st.as_str() == up)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Why an attempt failed, as classified where the failure happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailureCause {
    /// The message or spec is malformed. Retrying the same bytes cannot help.
    InvalidSpec,
    /// A secret is outside the allowed prefix, missing, or access was denied.
    SecretDenied,
    /// The agent CLI exited non-zero (or was killed by a signal it raised itself).
    AgentExit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// The child was stopped at its deadline. `resumable` when a session id was seen.
    TimedOut { resumable: bool },
    /// Stopped on a user's request.
    Cancelled,
    /// Throttling, 5xx, network: the same attempt could succeed later.
    InfraTransient,
    /// The run vanished (runtime died, OOM): found later by a stale lease.
    Crashed,
    /// A timed-out session could not be resumed: the agent CLI did not find it (Claude
    /// Code: "No conversation found with session ID"). The next attempt starts afresh.
    ResumeFailed,
    /// The model API refused with a rate limit. `reset_at` is when it said the limit
    /// resets, when it said so. Not the job's fault: the job continues after the reset.
    RateLimited {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reset_at: Option<EpochMillis>,
    },
    /// The job's `max_budget_usd` was reached and the platform stopped the child.
    BudgetExceeded,
}

impl FailureCause {
    /// The cause's kind, without its details.
    pub fn cause_kind(&self) -> CauseKind {
        match self {
            Self::InvalidSpec => CauseKind::InvalidSpec,
            Self::SecretDenied => CauseKind::SecretDenied,
            Self::AgentExit { .. } => CauseKind::AgentExit,
            Self::TimedOut { .. } => CauseKind::TimedOut,
            Self::Cancelled => CauseKind::Cancelled,
            Self::InfraTransient => CauseKind::InfraTransient,
            Self::Crashed => CauseKind::Crashed,
            Self::ResumeFailed => CauseKind::ResumeFailed,
            Self::RateLimited { .. } => CauseKind::RateLimited,
            Self::BudgetExceeded => CauseKind::BudgetExceeded,
        }
    }

    /// Short stable name, as stored in the `cause` attribute.
    pub fn kind(&self) -> &'static str {
        self.cause_kind().as_str()
    }

    /// Rebuilds a cause from what a job record keeps (`cause`, `exit_code`, `signal`,
    /// whether a session can be resumed). A rate limit's reset time is not among these:
    /// [`FailureCause::of_record`] reads it too.
    pub fn from_record(
        kind: &str,
        exit_code: Option<i32>,
        signal: Option<i32>,
        resumable: bool,
    ) -> Option<Self> {
        Some(match kind.parse::<CauseKind>().ok()? {
            CauseKind::InvalidSpec => Self::InvalidSpec,
            CauseKind::SecretDenied => Self::SecretDenied,
            CauseKind::AgentExit => Self::AgentExit {
                code: exit_code,
                signal,
            },
            CauseKind::TimedOut => Self::TimedOut { resumable },
            CauseKind::Cancelled => Self::Cancelled,
            CauseKind::InfraTransient => Self::InfraTransient,
            CauseKind::Crashed => Self::Crashed,
            CauseKind::ResumeFailed => Self::ResumeFailed,
            CauseKind::RateLimited => Self::RateLimited { reset_at: None },
            CauseKind::BudgetExceeded => Self::BudgetExceeded,
        })
    }

    /// The cause a job record carries (its `cause`, `exit_code`, `signal`, resume
    /// session and `rate_limit_reset_at`), or `None` when it has no known cause.
    pub fn of_record(rec: &JobRecord) -> Option<Self> {
        let resumable = rec.resume_session.is_some() || rec.progress.session_id.is_some();
        let cause = Self::from_record(rec.cause.as_deref()?, rec.exit_code, rec.signal, resumable)?;
        Some(match cause {
            Self::RateLimited { .. } => Self::RateLimited {
                reset_at: rec.rate_limit_reset_at,
            },
            other => other,
        })
    }

    /// Whether running the job again may succeed: unchanged (`infra_transient`,
    /// `crashed`), after the limit resets (`rate_limited`), or afresh instead of resumed
    /// (`resume_failed`).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::InfraTransient | Self::Crashed | Self::ResumeFailed | Self::RateLimited { .. }
        )
    }

    /// The state an attempt with this cause ends in.
    pub fn final_state(&self) -> JobState {
        match self {
            Self::TimedOut { .. } => JobState::TimedOut,
            Self::Cancelled => JobState::Cancelled,
            _ => JobState::Failed,
        }
    }
}

/// The kind of a [`FailureCause`], without its details: the string stored in the
/// `cause` attribute, and the key of a cause's section in the re-plan policy
/// (`[causes.crashed]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    InvalidSpec,
    SecretDenied,
    AgentExit,
    TimedOut,
    Cancelled,
    InfraTransient,
    Crashed,
    ResumeFailed,
    RateLimited,
    BudgetExceeded,
}

impl CauseKind {
    pub const ALL: [CauseKind; 10] = [
        CauseKind::InvalidSpec,
        CauseKind::SecretDenied,
        CauseKind::AgentExit,
        CauseKind::TimedOut,
        CauseKind::Cancelled,
        CauseKind::InfraTransient,
        CauseKind::Crashed,
        CauseKind::ResumeFailed,
        CauseKind::RateLimited,
        CauseKind::BudgetExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidSpec => "invalid_spec",
            Self::SecretDenied => "secret_denied",
            Self::AgentExit => "agent_exit",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::InfraTransient => "infra_transient",
            Self::Crashed => "crashed",
            Self::ResumeFailed => "resume_failed",
            Self::RateLimited => "rate_limited",
            Self::BudgetExceeded => "budget_exceeded",
        }
    }
}

impl fmt::Display for CauseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for CauseKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// An unknown cause name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cause {0:?}: use one of {list}", list = CauseKind::ALL.map(CauseKind::as_str).join(", "))]
pub struct UnknownCause(pub String);

impl FromStr for CauseKind {
    type Err = UnknownCause;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownCause(s.to_owned()))
    }
}

/// What a decision in a job's `history` did. Stored as the snake_case name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The dispatcher re-enqueued the job after a retryable failure (with backoff).
    Retry,
    /// The dispatcher enqueued the next segment of a timed-out (or rate-limited) session.
    Resume,
    /// The dispatcher moved the job to a bigger tier's queue.
    Escalate,
    /// The dispatcher ended the job: the failure cannot be retried.
    Fail,
    /// The dispatcher ended the job: a budget (attempts, segments, time, cost) is spent.
    Dead,
    /// The dispatcher re-enqueued a rate-limited job to run after the limit resets; not
    /// counted as a failed attempt.
    Pause,
    /// The SendMessage of the previous plan succeeded.
    Enqueued,
    /// An agent took over a stale lease.
    Takeover,
    /// Someone asked for the job to stop.
    Cancel,
    /// Written by a newer version of agentq; this one never writes it.
    #[default]
    #[serde(other)]
    Unknown,
}

impl Action {
    pub const ALL: [Action; 9] = [
        Action::Retry,
        Action::Resume,
        Action::Escalate,
        Action::Fail,
        Action::Dead,
        Action::Pause,
        Action::Enqueued,
        Action::Takeover,
        Action::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Resume => "resume",
            Self::Escalate => "escalate",
            Self::Fail => "fail",
            Self::Dead => "dead",
            Self::Pause => "pause",
            Self::Enqueued => "enqueued",
            Self::Takeover => "takeover",
            Self::Cancel => "cancel",
            Self::Unknown => "unknown",
        }
    }

    /// The actions that put the job on a queue again.
    pub fn requeues(self) -> bool {
        matches!(
            self,
            Self::Retry | Self::Resume | Self::Escalate | Self::Pause
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Action {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// An unknown action name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?}: use one of {list}", list = Action::ALL.map(Action::as_str).join(", "))]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AgentExit {
                code: Some(c),
                signal: _,
            } => write!(f, "agent_exit({c})"),
            Self::AgentExit {
                code: None,
                signal: Some(s),
            } => write!(f, "agent_exit(signal {s})"),
            Self::TimedOut { resumable: true } => f.write_str("timed_out(resumable)"),
            Self::RateLimited { reset_at: Some(at) } => {
                write!(f, "rate_limited(until {})", crate::record::rfc3339(*at))
            }
            other => f.write_str(other.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in ALL_STATES {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!("timed-out".parse::<JobState>().unwrap(), JobState::TimedOut);
        assert!("DONE".parse::<JobState>().is_err());
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in ALL_STATES.into_iter().filter(|s| s.is_terminal()) {
            for to in ALL_STATES {
                assert!(!from.can_transition_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn agent_and_dispatcher_paths() {
        use JobState::*;
        assert!(Queued.can_transition_to(Running));
        assert!(Running.can_transition_to(Succeeded));
        assert!(!Queued.can_transition_to(Succeeded));
        assert!(TimedOut.can_transition_to(Resuming));
        // A rate-limited session resumes after the reset.
        assert!(Failed.can_transition_to(Resuming));
        assert!(!Queued.can_transition_to(Resuming));
        assert!(Failed.can_transition_to(RetryScheduled));
        assert!(RetryScheduled.can_transition_to(Running));
        assert!(!Succeeded.can_transition_to(Running));
    }

    #[test]
    fn retryability_is_in_the_type() {
        assert!(FailureCause::InfraTransient.is_retryable());
        assert!(FailureCause::Crashed.is_retryable());
        assert!(!FailureCause::InvalidSpec.is_retryable());
        assert!(
            !FailureCause::AgentExit {
                code: Some(2),
                signal: None
            }
            .is_retryable()
        );
        assert!(FailureCause::ResumeFailed.is_retryable());
        assert!(FailureCause::RateLimited { reset_at: None }.is_retryable());
        assert!(!FailureCause::BudgetExceeded.is_retryable());
        for c in [
            FailureCause::InvalidSpec,
            FailureCause::SecretDenied,
            FailureCause::AgentExit {
                code: Some(3),
                signal: None,
            },
            FailureCause::TimedOut { resumable: true },
            FailureCause::Cancelled,
            FailureCause::InfraTransient,
            FailureCause::Crashed,
            FailureCause::ResumeFailed,
            FailureCause::RateLimited { reset_at: None },
            FailureCause::BudgetExceeded,
        ] {
            assert_eq!(
                FailureCause::from_record(c.kind(), Some(3), None, true),
                Some(c.clone())
            );
            assert_eq!(c.kind().parse::<CauseKind>().unwrap(), c.cause_kind());
            // The failure record's JSON tag is the same name.
            let json = serde_json::to_value(&c).unwrap();
            assert_eq!(json["kind"], c.kind());
        }
        let json = serde_json::to_string(&FailureCause::TimedOut { resumable: true }).unwrap();
        assert_eq!(json, r#"{"kind":"timed_out","resumable":true}"#);
        let json = serde_json::to_string(&FailureCause::RateLimited {
            reset_at: Some(1_700_000_000_000),
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"rate_limited","reset_at":1700000000000}"#);
        assert_eq!(
            serde_json::from_str::<FailureCause>(r#"{"kind":"rate_limited"}"#).unwrap(),
            FailureCause::RateLimited { reset_at: None }
        );
    }

    #[test]
    fn the_record_carries_every_detail_of_a_cause() {
        let mut r = JobRecord::new(crate::JobId::parse("j").unwrap(), JobState::Failed, 1);
        assert_eq!(FailureCause::of_record(&r), None);
        r.cause = Some("rate_limited".into());
        r.rate_limit_reset_at = Some(42);
        assert_eq!(
            FailureCause::of_record(&r),
            Some(FailureCause::RateLimited { reset_at: Some(42) })
        );
        r.cause = Some("timed_out".into());
        r.progress.session_id = Some("s".into());
        assert_eq!(
            FailureCause::of_record(&r),
            Some(FailureCause::TimedOut { resumable: true })
        );
        r.cause = Some("exploded".into());
        assert_eq!(FailureCause::of_record(&r), None);
    }

    #[test]
    fn kinds_and_actions_round_trip_and_unknown_names_are_refused() {
        for k in CauseKind::ALL {
            assert_eq!(k.as_str().parse::<CauseKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        let e = "oom".parse::<CauseKind>().unwrap_err().to_string();
        assert!(e.contains("\"oom\"") && e.contains("rate_limited"), "{e}");
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>().unwrap(), a);
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
            assert_eq!(
                serde_json::from_value::<Action>(a.as_str().into()).unwrap(),
                a
            );
        }
        assert!("nap".parse::<Action>().is_err());
        // A newer version's action still reads (the record stays readable).
        assert_eq!(
            serde_json::from_str::<Action>("\"hibernate\"").unwrap(),
            Action::Unknown
        );
        assert!(Action::Pause.requeues() && !Action::Enqueued.requeues());
    }
}
