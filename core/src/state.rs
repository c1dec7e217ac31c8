//! The job state machine: the closed [`JobState`] enum, its allowed transitions, and the
//! classified [`FailureCause`] whose retryability is a property of the type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
            Cancelled => &[Queued, RetryScheduled, Resuming, Running],
            RetryScheduled => &[Failed, TimedOut, Running],
            Resuming => &[TimedOut],
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
    /// A timed-out session could not be resumed (the CLI no longer knows it): the next
    /// attempt starts afresh.
    ResumeFailed,
    /// The model API refused with a rate limit; `reset_at` (epoch millis) when it said
    /// when the limit resets.
    RateLimited {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reset_at: Option<crate::record::EpochMillis>,
    },
    /// The job's `max_budget_usd` was reached and the platform stopped the child.
    BudgetExceeded,
}

impl FailureCause {
    /// Short stable name, as stored in the `cause` attribute.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidSpec => "invalid_spec",
            Self::SecretDenied => "secret_denied",
            Self::AgentExit { .. } => "agent_exit",
            Self::TimedOut { .. } => "timed_out",
            Self::Cancelled => "cancelled",
            Self::InfraTransient => "infra_transient",
            Self::Crashed => "crashed",
            Self::ResumeFailed => "resume_failed",
            Self::RateLimited { .. } => "rate_limited",
            Self::BudgetExceeded => "budget_exceeded",
        }
    }

    /// Rebuilds a cause from what a job record keeps (`cause`, `exit_code`, `signal`,
    /// whether a session can be resumed).
    pub fn from_record(
        kind: &str,
        exit_code: Option<i32>,
        signal: Option<i32>,
        resumable: bool,
    ) -> Option<Self> {
        Some(match kind {
            "invalid_spec" => Self::InvalidSpec,
            "secret_denied" => Self::SecretDenied,
            "agent_exit" => Self::AgentExit {
                code: exit_code,
                signal,
            },
            "timed_out" => Self::TimedOut { resumable },
            "cancelled" => Self::Cancelled,
            "infra_transient" => Self::InfraTransient,
            "crashed" => Self::Crashed,
            "resume_failed" => Self::ResumeFailed,
            "rate_limited" => Self::RateLimited { reset_at: None },
            "budget_exceeded" => Self::BudgetExceeded,
            _ => return None,
        })
    }

    /// Whether running the same job again, unchanged, may succeed.
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
        assert!(!Failed.can_transition_to(Resuming));
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
        ] {
            assert_eq!(
                FailureCause::from_record(c.kind(), Some(3), None, true),
                Some(c)
            );
        }
        let json = serde_json::to_string(&FailureCause::TimedOut { resumable: true }).unwrap();
        assert_eq!(json, r#"{"kind":"timed_out","resumable":true}"#);
    }
}
