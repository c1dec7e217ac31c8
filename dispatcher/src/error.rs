//! The dispatcher's errors. Each message says what failed, on which resource, and what
//! to do next; retryability of a re-plan error and the exit status of each error (the
//! codes every agentq binary shares) are decided here, from typed causes.

use std::path::PathBuf;

use agentq_core::payload::PayloadError;
use agentq_core::{ExitStatus, StoreError};

/// A re-plan policy that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {path}: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("policy {field}: {why}")]
    Invalid { field: String, why: String },
}

/// Re-planning one DLQ message failed; the message is left on the DLQ and comes back.
#[derive(Debug, thiserror::Error)]
pub enum ReplanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("job {job_id}: SQS {op} on {queue} failed: {message}")]
    Sqs {
        job_id: String,
        op: &'static str,
        queue: String,
        transient: bool,
        message: String,
    },
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Another dispatcher wrote a plan for this job moments ago and has not marked it
    /// enqueued yet; decided again when the message comes back.
    #[error(
        "job {job_id}: a plan written {age_ms} ms ago is not marked enqueued yet; retrying later"
    )]
    InFlight { job_id: String, age_ms: i64 },
    #[error("job {job_id}: the record kept changing while re-planning; retrying later")]
    Contended { job_id: String },
}

impl ReplanError {
    /// Whether handling the same message later may succeed (it is left on the DLQ
    /// either way; this is for logs and counters).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Sqs { transient, .. } => *transient,
            Self::Payload(e) => e.is_retryable(),
            Self::InFlight { .. } | Self::Contended { .. } => true,
        }
    }
}

/// `deploy` failed. Messages name the resource and the next step.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("deploy: {0}")]
    Invalid(String),
    #[error(
        "no container builder found: {detail}. Start a Docker engine (or install podman), or deploy an image that is already in ECR with --image-uri REPO@sha256:DIGEST (or --image-tag TAG)"
    )]
    NoBuilder { detail: String },
    #[error("{what}: {path}: {source}")]
    File {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{service} {op} on {resource} failed: {message}")]
    Aws {
        service: &'static str,
        op: &'static str,
        resource: String,
        message: String,
    },
    #[error(
        "queue {queue}: visibility timeout {visibility}s is shorter than the function timeout {timeout}s, so a message would come back while its job still runs (AWS also refuses such a mapping). Raise the queue's VisibilityTimeout to at least {timeout} (AWS recommends 6x: {recommended}), or lower the function timeout"
    )]
    VisibilityTooShort {
        queue: String,
        visibility: i64,
        timeout: i64,
        recommended: i64,
    },
    #[error(
        "function {function} does not exist: create it first (infra template), or pass --create-function --role-arn ARN to create it from the image"
    )]
    NoFunction { function: String },
    #[error("function {function}: {what} did not finish within {secs}s (last status {status})")]
    Timeout {
        function: String,
        what: &'static str,
        secs: u64,
        status: String,
    },
    #[error(
        "ECR repository {repository} has no image {reference}: push it first, or omit --image-tag to build and push"
    )]
    NoImage {
        repository: String,
        reference: String,
    },
}

impl PolicyError {
    /// Always [`ExitStatus::Usage`]: the policy (file or flags) must be fixed.
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Usage
    }
}

impl ReplanError {
    /// AWS errors as such; a plan in flight elsewhere or a contended record is "other".
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Store(e) => e.exit_status(),
            Self::Payload(e) => e.exit_status(),
            Self::Sqs { .. } => ExitStatus::Service,
            Self::InFlight { .. } | Self::Contended { .. } => ExitStatus::Other,
        }
    }
}

impl DeployError {
    /// Bad options, files or queue settings are usage errors; a missing function or
    /// image is "not found"; AWS failures and updates that never finish are AWS errors; a
    /// failing build command is "other".
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Invalid(_)
            | Self::NoBuilder { .. }
            | Self::File { .. }
            | Self::VisibilityTooShort { .. } => ExitStatus::Usage,
            Self::NoFunction { .. } | Self::NoImage { .. } => ExitStatus::NotFound,
            Self::Aws { .. } | Self::Timeout { .. } => ExitStatus::Service,
            Self::Command { .. } => ExitStatus::Other,
        }
    }
}
