//! Storage layout: every S3 key and every DynamoDB attribute name agentq uses. Nothing
//! else in the workspace spells them out.
//!
//! S3, under the configured prefix (default `agentq`):
//! ```text
//! {prefix}/jobs/{job_id}/attempt-{n}/stdout/{seq:06}.log      stdout, in segments
//! {prefix}/jobs/{job_id}/attempt-{n}/stderr/{seq:06}.log      stderr, in segments
//! {prefix}/jobs/{job_id}/attempt-{n}/events/{seq:06}.jsonl    the agent CLI's structured stream
//! {prefix}/jobs/{job_id}/attempt-{n}/result.json              the result manifest
//! {prefix}/jobs/{job_id}/attempt-{n}/artifacts/{path}          files left in the out dir
//! {prefix}/jobs/{job_id}/checkpoint/session.json               session id for resuming
//! {prefix}/payloads/{ulid}.json                               specs too large for SQS
//! ```
//! Job ids are validated ([`JobId`]) so a key can never leave `{prefix}/jobs/{job_id}/`;
//! artifact paths are checked component by component.

use crate::ids::{Attempt, JobId};

/// DynamoDB attribute names of the jobs table.
pub mod attr {
    /// Partition key (S).
    pub const JOB_ID: &str = "job_id";
    /// Job state (S), GSI partition key.
    pub const STATUS: &str = "status";
    /// Last change, epoch millis (N), GSI sort key.
    pub const UPDATED_AT: &str = "updated_at";
    pub const CREATED_AT: &str = "created_at";
    pub const STARTED_AT: &str = "started_at";
    pub const FINISHED_AT: &str = "finished_at";
    /// Current attempt (N): the fencing token.
    pub const ATTEMPT: &str = "attempt";
    pub const LEASE_OWNER: &str = "lease_owner";
    /// Last heartbeat of the lease holder, epoch millis (N).
    pub const HEARTBEAT_AT: &str = "heartbeat_at";
    /// The job spec as JSON (S).
    pub const SPEC: &str = "spec";
    pub const CANCEL_REQUESTED: &str = "cancel_requested";
    /// Failure cause kind (S), e.g. `agent_exit`.
    pub const CAUSE: &str = "cause";
    /// Human-readable reason (S).
    pub const REASON: &str = "reason";
    pub const EXIT_CODE: &str = "exit_code";
    pub const SIGNAL: &str = "signal";
    /// Progress map (M): turns, tokens, cost, last event, session id, byte counts.
    pub const PROGRESS: &str = "progress";
    /// Per-attempt records (M): attempt number → map.
    pub const ATTEMPTS: &str = "attempts";
    /// Re-plan decisions (L of M).
    pub const HISTORY: &str = "history";
    /// Resume segment number (N), 1 for the first.
    pub const SEGMENT: &str = "segment";
    /// Session to resume in the next segment (S).
    pub const RESUME_SESSION: &str = "resume_session";
    pub const TIER: &str = "tier";
    pub const LABELS: &str = "labels";
    /// Result manifest key of the last attempt (S).
    pub const RESULT_KEY: &str = "result_key";
    /// Run time spent so far across attempts, millis (N).
    pub const RUNTIME_MS: &str = "runtime_ms";
    /// Cost spent so far across attempts (N).
    pub const COST_USD: &str = "cost_usd";
    /// The attempt (N) whose failure record reached the DLQ; a redelivered message of a
    /// FAILED/TIMED_OUT job whose failure was not reported sends it then.
    pub const FAILURE_REPORTED: &str = "failure_reported";
    /// When the rate limit that stopped the last attempt resets, epoch millis (N); set
    /// with cause `rate_limited` when the model API said so.
    pub const RATE_LIMIT_RESET_AT: &str = "rate_limit_reset_at";
    /// Expiry, epoch seconds (N): the table's TTL attribute.
    pub const EXPIRES_AT: &str = "expires_at";

    /// Fields of one attempt's map under `attempts.{n}`.
    pub mod attempt {
        pub const FINISHED_AT: &str = "finished_at";
        pub const STATUS: &str = "status";
        pub const CAUSE: &str = "cause";
        pub const REASON: &str = "reason";
        pub const EXIT_CODE: &str = "exit_code";
        pub const SIGNAL: &str = "signal";
    }
}

/// The GSI for listing jobs by state, newest first.
pub const STATUS_INDEX: &str = "by-status";

/// Default S3 key prefix.
pub const DEFAULT_PREFIX: &str = "agentq";

/// Which output stream a log segment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
    Events,
}

impl Stream {
    pub const ALL: [Stream; 3] = [Stream::Stdout, Stream::Stderr, Stream::Events];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Events => "events",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Events => "jsonl",
            _ => "log",
        }
    }
}

impl std::str::FromStr for Stream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "stderr" => Ok(Self::Stderr),
            "events" => Ok(Self::Events),
            other => Err(format!(
                "unknown stream {other:?}: use stdout, stderr or events"
            )),
        }
    }
}

/// Builds S3 keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Default for Layout {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Layout {
    /// `prefix` without leading or trailing slashes; empty means the bucket root.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_matches('/').to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn root(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }

    /// `{prefix}/jobs/{job_id}/`: everything of one job.
    pub fn job_prefix(&self, job: &JobId) -> String {
        format!("{}jobs/{job}/", self.root())
    }

    /// `{prefix}/jobs/{job_id}/attempt-{n}/`.
    pub fn attempt_prefix(&self, job: &JobId, attempt: Attempt) -> String {
        format!("{}attempt-{attempt}/", self.job_prefix(job))
    }

    /// Prefix of one stream's segments.
    pub fn stream_prefix(&self, job: &JobId, attempt: Attempt, stream: Stream) -> String {
        format!("{}{}/", self.attempt_prefix(job, attempt), stream.as_str())
    }

    /// One segment of a stream; `seq` sorts lexically up to a million segments.
    pub fn segment(&self, job: &JobId, attempt: Attempt, stream: Stream, seq: u32) -> String {
        format!(
            "{}{seq:06}.{}",
            self.stream_prefix(job, attempt, stream),
            stream.extension()
        )
    }

    pub fn result(&self, job: &JobId, attempt: Attempt) -> String {
        format!("{}result.json", self.attempt_prefix(job, attempt))
    }

    /// An artifact's key, or `None` when `rel` could leave the artifacts prefix
    /// (absolute, `..`, empty components, backslashes, control characters).
    pub fn artifact(&self, job: &JobId, attempt: Attempt, rel: &str) -> Option<String> {
        let ok = !rel.is_empty()
            && !rel.starts_with('/')
            && !rel.contains('\\')
            && !rel.chars().any(char::is_control)
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        ok.then(|| format!("{}artifacts/{rel}", self.attempt_prefix(job, attempt)))
    }

    pub fn checkpoint(&self, job: &JobId) -> String {
        format!("{}checkpoint/session.json", self.job_prefix(job))
    }

    /// The archive of the workspace (`home/` and `work/`) saved with a checkpoint.
    pub fn checkpoint_archive(&self, job: &JobId) -> String {
        format!("{}checkpoint/workspace.tar.gz", self.job_prefix(job))
    }

    /// Prefix of every checkpoint object of a job (readable by the agent role only).
    pub fn checkpoint_prefix(&self, job: &JobId) -> String {
        format!("{}checkpoint/", self.job_prefix(job))
    }

    /// Where an oversized spec is stored.
    pub fn payload(&self, name: &str) -> String {
        format!("{}payloads/{name}.json", self.root())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let l = Layout::new("/agentq/");
        let j = JobId::parse("job-1").unwrap();
        let a = Attempt(2);
        assert_eq!(l.job_prefix(&j), "agentq/jobs/job-1/");
        assert_eq!(
            l.segment(&j, a, Stream::Stdout, 3),
            "agentq/jobs/job-1/attempt-2/stdout/000003.log"
        );
        assert_eq!(
            l.segment(&j, a, Stream::Events, 0),
            "agentq/jobs/job-1/attempt-2/events/000000.jsonl"
        );
        assert_eq!(l.result(&j, a), "agentq/jobs/job-1/attempt-2/result.json");
        assert_eq!(
            l.checkpoint(&j),
            "agentq/jobs/job-1/checkpoint/session.json"
        );
        assert_eq!(Layout::new("").job_prefix(&j), "jobs/job-1/");
        assert_eq!(l.payload("X"), "agentq/payloads/X.json");
    }

    #[test]
    fn hostile_artifact_paths_are_refused() {
        let l = Layout::default();
        let j = JobId::parse("j").unwrap();
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "./a",
            "a\\..\\b",
            "a\nb",
        ] {
            assert_eq!(l.artifact(&j, Attempt(1), bad), None, "{bad:?}");
        }
        assert_eq!(
            l.artifact(&j, Attempt(1), "dir/out.txt").unwrap(),
            "agentq/jobs/j/attempt-1/artifacts/dir/out.txt"
        );
    }
}

/// SQS message attributes agentq reads or writes.
pub mod msg_attr {
    /// Number: epoch millis before which the job must not start. The dispatcher sets it
    /// for backoffs longer than SQS' 900 s `DelaySeconds` cap; an agent that receives the
    /// message early sends it again with the remaining delay (chained) and acknowledges
    /// the early copy.
    pub const NOT_BEFORE: &str = "agentq-not-before";
    /// String: the job id, so tools can route or inspect without parsing the body.
    pub const JOB_ID: &str = "agentq-job-id";
    /// Number: the re-plan number of a message the dispatcher enqueued; a redriven copy
    /// older than the job's latest plan is dropped as superseded.
    pub const PLAN: &str = "agentq-plan";
    /// String: `failure` on explicit failure records sent to the DLQ.
    pub const RECORD_TYPE: &str = "agentq-record-type";
    /// String: the W3C trace context (`00-{trace id}-{span id}-{flags}`) of the job's
    /// trace. Every hop (producer, agent, dispatcher) sends the context of its own span,
    /// so the next one continues the same trace. The name is the W3C header's, the one
    /// OpenTelemetry's SQS instrumentations write: an instrumented upstream system's
    /// trace continues into the job.
    pub const TRACEPARENT: &str = "traceparent";
}
