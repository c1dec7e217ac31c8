//! The explicit failure record the agent sends to the DLQ for a deterministic failure,
//! and how the dispatcher tells it apart from a raw job spec that SQS redrove.

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, JobId};
use crate::record::EpochMillis;
use crate::state::{FailureCause, JobState};

/// Version of the failure record format; also the marker key's value.
pub const FAILURE_RECORD_VERSION: u32 = 1;

/// A classified failure, as the body of a DLQ message. The `agentq_failure` key marks
/// it (a job spec never has that key: unknown fields are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// Always [`FAILURE_RECORD_VERSION`].
    pub agentq_failure: u32,
    /// `None` when the message was too malformed to name a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    #[serde(default)]
    pub attempt: Attempt,
    /// The state the attempt ended in.
    pub state: JobState,
    pub cause: FailureCause,
    pub reason: String,
    pub at: EpochMillis,
    #[serde(default = "one")]
    pub segment: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_key: Option<String>,
    /// The original message body, when it could not be parsed (truncated to 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body: Option<String>,
    /// The SQS message id the failure came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

fn one() -> u32 {
    1
}

/// What a DLQ message holds.
#[derive(Debug, Clone, PartialEq)]
pub enum DlqMessage {
    /// An explicit, classified failure from the agent.
    Failure(Box<FailureRecord>),
    /// Anything else: a job spec (or garbage) that SQS redrove after `maxReceiveCount`.
    Redriven(String),
}

impl DlqMessage {
    pub fn parse(body: &str) -> Self {
        let looks_like_record = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .is_some_and(|v| v.get("agentq_failure").is_some());
        if looks_like_record && let Ok(rec) = serde_json::from_str::<FailureRecord>(body) {
            return Self::Failure(Box::new(rec));
        }
        Self::Redriven(body.to_owned())
    }
}

impl FailureRecord {
    /// The record of an attempt that ended in `state` for `cause`.
    #[allow(clippy::too_many_arguments)]
    pub fn attempt(
        job: &JobId,
        attempt: Attempt,
        state: JobState,
        cause: FailureCause,
        reason: impl Into<String>,
        segment: u32,
        session_id: Option<String>,
        result_key: Option<String>,
        message_id: Option<String>,
    ) -> Self {
        Self {
            agentq_failure: FAILURE_RECORD_VERSION,
            job_id: Some(job.clone()),
            attempt,
            state,
            cause,
            reason: reason.into(),
            at: crate::record::now_ms(),
            segment,
            session_id,
            result_key,
            raw_body: None,
            message_id,
        }
    }

    /// The record of a message that could not be run at all.
    pub fn invalid(
        job: Option<JobId>,
        reason: impl Into<String>,
        raw_body: &str,
        message_id: Option<String>,
    ) -> Self {
        Self {
            agentq_failure: FAILURE_RECORD_VERSION,
            job_id: job,
            attempt: Attempt::NONE,
            state: JobState::Dead,
            cause: FailureCause::InvalidSpec,
            reason: reason.into(),
            at: crate::record::now_ms(),
            segment: 1,
            session_id: None,
            result_key: None,
            raw_body: Some(raw_body.chars().take(64 * 1024).collect()),
            message_id,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tell_apart() {
        let rec = FailureRecord {
            agentq_failure: FAILURE_RECORD_VERSION,
            job_id: Some(JobId::parse("j1").unwrap()),
            attempt: Attempt(2),
            state: JobState::Failed,
            cause: FailureCause::AgentExit {
                code: Some(3),
                signal: None,
            },
            reason: "exit 3".into(),
            at: 5,
            segment: 1,
            session_id: None,
            result_key: None,
            raw_body: None,
            message_id: Some("m".into()),
        };
        match DlqMessage::parse(&rec.to_json()) {
            DlqMessage::Failure(r) => assert_eq!(*r, rec),
            other => panic!("{other:?}"),
        }
        let spec = r#"{"spec_version":1,"agent":"command","command":["true"]}"#;
        assert_eq!(DlqMessage::parse(spec), DlqMessage::Redriven(spec.into()));
        assert_eq!(
            DlqMessage::parse("garbage"),
            DlqMessage::Redriven("garbage".into())
        );
    }
}
