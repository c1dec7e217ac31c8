//! The job record as stored in DynamoDB: [`JobRecord`] and the maps inside it
//! ([`Progress`], [`AttemptRecord`], [`Decision`]). Field names are the attribute names of
//! [`crate::layout::attr`]; a test keeps the two in step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, JobId};
use crate::state::{Action, JobState};

/// Milliseconds since the Unix epoch.
pub type EpochMillis = i64;

/// Now, in epoch millis.
pub fn now_ms() -> EpochMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// RFC 3339 rendering of an epoch-millis timestamp, for people.
pub fn rfc3339(ms: EpochMillis) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// What the agent knows about a running job, written with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    pub turns: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub events: u64,
}

impl Progress {
    /// Most turns recorded (a child's `num_turns` beyond this is not believed).
    pub const MAX_TURNS: u32 = 1_000_000;
    /// Most input or output tokens recorded: 10^12, far past any real session, far
    /// inside DynamoDB's and JSON consumers' number range.
    pub const MAX_TOKENS: u64 = 1_000_000_000_000;
    /// Largest cost recorded, in USD.
    pub const MAX_COST_USD: f64 = 1_000_000.0;
    /// Smallest positive cost recorded; below it a cost counts as 0 (DynamoDB refuses
    /// numbers under 1e-130, and sub-nanodollar amounts mean nothing).
    pub const MIN_COST_USD: f64 = 1e-9;
    /// Longest `last_event`, in bytes.
    pub const MAX_LAST_EVENT_LEN: usize = 128;
    /// Longest `session_id`, in bytes.
    pub const MAX_SESSION_ID_LEN: usize = 128;

    /// Brings every field a child's events set into range, so that a hostile or broken
    /// child cannot make a progress write fail (`ValidationException`) or bloat the
    /// item: counts capped, cost finite and within range, `last_event` without control
    /// characters and capped, a `session_id` that is not [a session id](Self::session_id_ok)
    /// dropped. Idempotent.
    pub fn clamp(&mut self) {
        self.turns = self.turns.min(Self::MAX_TURNS);
        self.input_tokens = self.input_tokens.min(Self::MAX_TOKENS);
        self.output_tokens = self.output_tokens.min(Self::MAX_TOKENS);
        self.cost_usd = Self::clamp_cost(self.cost_usd);
        if let Some(e) = &self.last_event {
            self.last_event = Some(clean_text(e, Self::MAX_LAST_EVENT_LEN));
        }
        if self
            .session_id
            .as_deref()
            .is_some_and(|s| !Self::session_id_ok(s))
        {
            self.session_id = None;
        }
    }

    /// A cost as recorded: NaN, infinite, negative or below [`Self::MIN_COST_USD`] → 0;
    /// above [`Self::MAX_COST_USD`] → that maximum.
    pub fn clamp_cost(c: f64) -> f64 {
        if !c.is_finite() || c < Self::MIN_COST_USD {
            0.0
        } else {
            c.min(Self::MAX_COST_USD)
        }
    }

    /// Whether `s` can be kept as a session id (and later passed to the agent CLI as
    /// `--resume ID`): 1–[`Self::MAX_SESSION_ID_LEN`] characters of `A-Z a-z 0-9 . _ : -`,
    /// not starting with `-` (it would read as an option). Claude Code's and Codex' ids
    /// are UUIDs. A truncated or cleaned-up id would name another session, so an id
    /// that fails this is dropped rather than repaired.
    pub fn session_id_ok(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= Self::MAX_SESSION_ID_LEN
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    }
}

/// `s` without control characters, cut to at most `max` bytes on a character boundary
/// (ending in `…` when cut).
pub fn clean_text(s: &str, max: usize) -> String {
    const ELLIPSIS: char = '…';
    let cleaned: String = s.chars().filter(|c| !c.is_control()).collect();
    if cleaned.len() <= max {
        return cleaned;
    }
    let (mut end, tail) = match max.checked_sub(ELLIPSIS.len_utf8()) {
        Some(room) => (room, Some(ELLIPSIS)),
        None => (max, None),
    };
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = cleaned[..end].to_owned();
    out.extend(tail);
    out
}

/// One attempt's summary, kept under `attempts.{n}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttemptRecord {
    pub started_at: EpochMillis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<EpochMillis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<JobState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `{prefix}/jobs/{id}/attempt-{n}/`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_prefix: Option<String>,
    pub segment: u32,
}

/// One re-planning (or takeover) decision, appended to `history`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Decision {
    pub at: EpochMillis,
    pub action: Action,
    /// Who decided: `dispatcher`, an agent's lease owner, `producer`.
    pub by: String,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// A job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: JobId,
    pub status: JobState,
    #[serde(default)]
    pub attempt: Attempt,
    pub created_at: EpochMillis,
    pub updated_at: EpochMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<EpochMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<EpochMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_at: Option<EpochMillis>,
    /// The spec as JSON, job id filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub attempts: BTreeMap<String, AttemptRecord>,
    #[serde(default)]
    pub history: Vec<Decision>,
    #[serde(default = "one")]
    pub segment: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_key: Option<String>,
    #[serde(default)]
    pub runtime_ms: u64,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reported: Option<u32>,
    /// When the rate limit that stopped the last attempt resets (cause `rate_limited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_reset_at: Option<EpochMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

fn one() -> u32 {
    1
}

impl JobRecord {
    /// A fresh record in `status`.
    pub fn new(job_id: JobId, status: JobState, now: EpochMillis) -> Self {
        Self {
            job_id,
            status,
            attempt: Attempt::NONE,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            lease_owner: None,
            heartbeat_at: None,
            spec: None,
            cancel_requested: false,
            cause: None,
            reason: None,
            exit_code: None,
            signal: None,
            progress: Progress::default(),
            attempts: BTreeMap::new(),
            history: Vec::new(),
            segment: 1,
            resume_session: None,
            tier: None,
            labels: BTreeMap::new(),
            result_key: None,
            runtime_ms: 0,
            cost_usd: 0.0,
            failure_reported: None,
            rate_limit_reset_at: None,
            expires_at: None,
        }
    }

    /// The record of the current attempt, if any.
    pub fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.get(&self.attempt.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::attr;

    #[test]
    fn field_names_are_the_layout_attribute_names() {
        let mut r = JobRecord::new(JobId::parse("j").unwrap(), JobState::Queued, 1);
        r.started_at = Some(1);
        r.finished_at = Some(1);
        r.lease_owner = Some("o".into());
        r.heartbeat_at = Some(1);
        r.spec = Some("{}".into());
        r.cause = Some("c".into());
        r.reason = Some("r".into());
        r.exit_code = Some(1);
        r.signal = Some(9);
        r.resume_session = Some("s".into());
        r.tier = Some("t".into());
        r.labels.insert("k".into(), "v".into());
        r.result_key = Some("k".into());
        r.expires_at = Some(1);
        r.failure_reported = Some(1);
        r.rate_limit_reset_at = Some(1);
        let v = serde_json::to_value(&r).unwrap();
        let keys: std::collections::BTreeSet<_> = v.as_object().unwrap().keys().cloned().collect();
        let expected: std::collections::BTreeSet<String> = [
            attr::JOB_ID,
            attr::STATUS,
            attr::UPDATED_AT,
            attr::CREATED_AT,
            attr::STARTED_AT,
            attr::FINISHED_AT,
            attr::ATTEMPT,
            attr::LEASE_OWNER,
            attr::HEARTBEAT_AT,
            attr::SPEC,
            attr::CANCEL_REQUESTED,
            attr::CAUSE,
            attr::REASON,
            attr::EXIT_CODE,
            attr::SIGNAL,
            attr::PROGRESS,
            attr::ATTEMPTS,
            attr::HISTORY,
            attr::SEGMENT,
            attr::RESUME_SESSION,
            attr::TIER,
            attr::LABELS,
            attr::RESULT_KEY,
            attr::RUNTIME_MS,
            attr::COST_USD,
            attr::FAILURE_REPORTED,
            attr::RATE_LIMIT_RESET_AT,
            attr::EXPIRES_AT,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(keys, expected);

        let a = AttemptRecord {
            finished_at: Some(1),
            status: Some(JobState::Failed),
            cause: Some("c".into()),
            reason: Some("r".into()),
            exit_code: Some(1),
            signal: Some(9),
            ..Default::default()
        };
        let v = serde_json::to_value(&a).unwrap();
        for k in [
            attr::attempt::FINISHED_AT,
            attr::attempt::STATUS,
            attr::attempt::CAUSE,
            attr::attempt::REASON,
            attr::attempt::EXIT_CODE,
            attr::attempt::SIGNAL,
        ] {
            assert!(v.get(k).is_some(), "AttemptRecord has no field {k}");
        }
    }
}
