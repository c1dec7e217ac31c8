//! The producer's errors: one enum whose variants carry their context (job id, queue,
//! bucket, key), say what to do next, and decide their own retryability and class
//! ([`ErrorClass`]), which the binary turns into an exit code.

use agentq_core::spec::SpecViolation;
use agentq_core::{ConfigError, JobId, SpecError, StoreError};

/// What kind of failure an error is: the exit status it ends the `agentq` binary with
/// (the codes shared by all agentq binaries, [`agentq_core::exit`]). Errors are
/// `Usage` (2), `NotFound` (3), `Service` (5), `AlreadyExists` (6) or `Other` (1).
pub type ErrorClass = agentq_core::ExitStatus;

/// What became of the `QUEUED` record when a submit failed after writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordFate {
    /// The record was deleted again: submitting the same spec (same job id) is safe.
    Removed,
    /// Deleting it failed too; the job id stays taken.
    Kept { why: String },
}

impl std::fmt::Display for RecordFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Removed => f.write_str(
                "its QUEUED record was removed again, so submitting the same spec is safe",
            ),
            Self::Kept { why } => write!(
                f,
                "removing its QUEUED record failed too ({why}): run `agentq cancel` on the job and submit with a new job_id"
            ),
        }
    }
}

/// An operation of the producer failed.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// A setting is missing or malformed; the message names the flag and the variable.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A job spec was refused; every violation names its field.
    #[error("{origin}: {source}")]
    InvalidSpec {
        /// Where the spec came from: a file name, `stdin`, `FILE line N`, `--prompt`.
        origin: String,
        #[source]
        source: SpecError,
    },

    /// Some lines of a JSON Lines batch are not valid specs; nothing was submitted.
    #[error("{origin}: {} of {total} specs are not valid; nothing was submitted:{}", invalid.len(), list_invalid(invalid))]
    InvalidBatch {
        origin: String,
        total: usize,
        /// Line number (1-based) and why.
        invalid: Vec<(usize, SpecError)>,
    },

    /// Other bad input (a flag combination, an unreadable file); says what to do.
    #[error("{0}")]
    Input(String),

    /// The job id is taken.
    #[error(
        "job {job_id} already exists in table {table}: it was submitted before (see `agentq status {job_id}`); pick another job_id, or omit it to have one generated"
    )]
    AlreadyExists { job_id: JobId, table: String },

    /// No record for the job.
    #[error(
        "job {job_id} not found in table {table}: check the id (`agentq list`) and AGENTQ_TABLE; a job published straight to the queue gets its record when an agent first claims it"
    )]
    NotFound { job_id: JobId, table: String },

    /// Sending the job's message failed after its record was written.
    #[error("job {job_id}: sending to {queue_url} failed: {message}; {record}")]
    Send {
        job_id: JobId,
        queue_url: String,
        transient: bool,
        message: String,
        record: RecordFate,
    },

    /// Storing a large spec in S3 failed after its record was written.
    #[error(
        "job {job_id}: storing the large spec at s3://{bucket}/{key} failed: {message}; {record}"
    )]
    Offload {
        job_id: JobId,
        bucket: String,
        key: String,
        transient: bool,
        message: String,
        record: RecordFate,
    },

    /// Reading or listing S3 objects (logs) failed.
    #[error("S3 {op} s3://{bucket}/{key} failed: {message}")]
    S3 {
        op: &'static str,
        bucket: String,
        key: String,
        transient: bool,
        message: String,
    },

    /// Any other jobs-table failure.
    #[error(transparent)]
    Store(StoreError),

    /// Some entries of a batch were not submitted (each reported on its own).
    #[error("{failed} of {total} jobs were not submitted; the first failure: {first}")]
    Batch {
        failed: usize,
        total: usize,
        first: Box<ProducerError>,
    },

    /// Writing to stdout failed (e.g. a closed pipe).
    #[error("writing output failed: {0}")]
    Output(#[from] std::io::Error),
}

/// At most this many invalid lines are spelled out in a message.
const MAX_LISTED: usize = 20;

fn list_invalid(invalid: &[(usize, SpecError)]) -> String {
    let mut s: String = invalid
        .iter()
        .take(MAX_LISTED)
        .map(|(line, e)| format!("\n  line {line}: {e}"))
        .collect();
    if invalid.len() > MAX_LISTED {
        s.push_str(&format!("\n  … and {} more", invalid.len() - MAX_LISTED));
    }
    s
}

impl From<agentq_core::ids::JobIdError> for ProducerError {
    fn from(e: agentq_core::ids::JobIdError) -> Self {
        Self::Input(e.to_string())
    }
}

impl From<StoreError> for ProducerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { job_id, table } => Self::NotFound { job_id, table },
            // The store's message has no table; the producer fills it where it knows it.
            StoreError::AlreadyExists { job_id } => Self::AlreadyExists {
                job_id,
                table: String::from("(jobs table)"),
            },
            other => Self::Store(other),
        }
    }
}

impl ProducerError {
    /// Whether the same call could succeed later without changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Send { transient, .. }
            | Self::Offload { transient, .. }
            | Self::S3 { transient, .. } => *transient,
            Self::Store(e) => e.is_retryable(),
            Self::Batch { first, .. } => first.is_retryable(),
            _ => false,
        }
    }

    /// The class of failure (and so the exit code of the `agentq` binary).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Config(_)
            | Self::InvalidSpec { .. }
            | Self::InvalidBatch { .. }
            | Self::Input(_) => ErrorClass::Usage,
            Self::NotFound { .. } => ErrorClass::NotFound,
            Self::AlreadyExists { .. } => ErrorClass::AlreadyExists,
            Self::Send { .. } | Self::Offload { .. } | Self::S3 { .. } => ErrorClass::Service,
            Self::Store(e) => e.exit_status(),
            Self::Output(_) => ErrorClass::Other,
            Self::Batch { first, .. } => first.class(),
        }
    }

    /// Every spec violation this error carries, with where the spec came from.
    pub fn violations(&self) -> Vec<(String, SpecViolation)> {
        match self {
            Self::InvalidSpec { origin, source } => source
                .violations()
                .into_iter()
                .map(|v| (origin.clone(), v))
                .collect(),
            Self::InvalidBatch {
                origin, invalid, ..
            } => invalid
                .iter()
                .flat_map(|(line, e)| {
                    e.violations()
                        .into_iter()
                        .map(move |v| (format!("{origin} line {line}"), v))
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_retryability() {
        let job_id = JobId::parse("j").unwrap();
        let e = ProducerError::Send {
            job_id: job_id.clone(),
            queue_url: "q".into(),
            transient: true,
            message: "throttled".into(),
            record: RecordFate::Removed,
        };
        assert!(e.is_retryable());
        assert_eq!(e.class(), ErrorClass::Service);
        assert!(e.to_string().contains("submitting the same spec is safe"));
        let e: ProducerError = StoreError::NotFound {
            job_id,
            table: "t".into(),
        }
        .into();
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert!(!e.is_retryable());
    }
}
