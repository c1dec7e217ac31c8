//! Exit codes shared by the three binaries (`agentq`, `agentq-agent`,
//! `agentq-dispatcher`): one closed enum, its numbers, the `--help` table, and the class
//! of every core error. Binaries map their errors to an [`ExitStatus`] in `main`; the
//! libraries' error enums say which status they are.

use std::fmt;

/// How a process ends. The numbers are part of the interface: scripts branch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// Success (for a job that was waited on or run: it `SUCCEEDED`).
    Ok,
    /// Anything not covered below.
    Other,
    /// Usage, configuration or invalid input: a bad flag or setting, a bad job spec or
    /// policy file.
    Usage,
    /// The job (or an AWS resource the command needs, such as the function) does not exist.
    NotFound,
    /// The job finished unsuccessfully: `FAILED`, `TIMED_OUT`, `CANCELLED` or `DEAD`.
    JobUnsuccessful,
    /// AWS answered with an error or could not be reached.
    Service,
    /// A job with this job id already exists.
    AlreadyExists,
}

/// Success.
pub const OK: u8 = ExitStatus::Ok.code();
/// Any other error.
pub const OTHER: u8 = ExitStatus::Other.code();
/// Usage, configuration or invalid input.
pub const USAGE: u8 = ExitStatus::Usage.code();
/// Not found.
pub const NOT_FOUND: u8 = ExitStatus::NotFound.code();
/// The job did not succeed.
pub const JOB_UNSUCCESSFUL: u8 = ExitStatus::JobUnsuccessful.code();
/// AWS service error.
pub const SERVICE: u8 = ExitStatus::Service.code();
/// Already exists.
pub const ALREADY_EXISTS: u8 = ExitStatus::AlreadyExists.code();

impl ExitStatus {
    /// Every status, in code order.
    pub const ALL: [ExitStatus; 7] = [
        Self::Ok,
        Self::Other,
        Self::Usage,
        Self::NotFound,
        Self::JobUnsuccessful,
        Self::Service,
        Self::AlreadyExists,
    ];

    /// The process exit code.
    pub const fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Other => 1,
            Self::Usage => 2,
            Self::NotFound => 3,
            Self::JobUnsuccessful => 4,
            Self::Service => 5,
            Self::AlreadyExists => 6,
        }
    }

    /// What the code means, as the `--help` table and the docs say it.
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::Ok => "success (a job that was waited on or run: it SUCCEEDED)",
            Self::Other => "any other error",
            Self::Usage => {
                "usage, configuration or invalid input: a bad flag or setting (the flag and variable are named), a bad job spec or policy file (the field is named)"
            }
            Self::NotFound => {
                "not found: the job, or an AWS resource the command needs (function, image)"
            }
            Self::JobUnsuccessful => {
                "the job did not succeed: FAILED, TIMED_OUT, CANCELLED or DEAD (agentq submit --wait, agentq watch, agentq-agent run)"
            }
            Self::Service => {
                "AWS service error or AWS unreachable; the message says whether retrying may help"
            }
            Self::AlreadyExists => "a job with this job_id already exists",
        }
    }

    /// The status of a job's final state: `Ok` for `SUCCEEDED`, else `JobUnsuccessful`.
    pub fn of_job(state: crate::JobState) -> Self {
        if state == crate::JobState::Succeeded {
            Self::Ok
        } else {
            Self::JobUnsuccessful
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "success",
            Self::Other => "error",
            Self::Usage => "invalid usage, configuration or input",
            Self::NotFound => "not found",
            Self::JobUnsuccessful => "the job did not succeed",
            Self::Service => "AWS service error",
            Self::AlreadyExists => "already exists",
        })
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(s: ExitStatus) -> Self {
        std::process::ExitCode::from(s.code())
    }
}

/// The table every binary prints at the end of `--help` (kept equal to
/// [`ExitStatus::meaning`] by a test).
pub const HELP: &str = "\
Exit codes (the same for agentq, agentq-agent and agentq-dispatcher):
  0  success (a job that was waited on or run: it SUCCEEDED)
  1  any other error
  2  usage, configuration or invalid input: a bad flag or setting (the flag and variable are named), a bad job spec or policy file (the field is named)
  3  not found: the job, or an AWS resource the command needs (function, image)
  4  the job did not succeed: FAILED, TIMED_OUT, CANCELLED or DEAD (agentq submit --wait, agentq watch, agentq-agent run)
  5  AWS service error or AWS unreachable; the message says whether retrying may help
  6  a job with this job_id already exists";

impl crate::ConfigError {
    /// Always [`ExitStatus::Usage`]: a setting is missing or malformed.
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Usage
    }
}

impl crate::SpecError {
    /// Always [`ExitStatus::Usage`]: the spec is invalid.
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Usage
    }
}

impl crate::StoreError {
    /// Not found, already exists, AWS errors as such; a record that cannot be read or a
    /// lost conditional write is "other".
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::AlreadyExists { .. } => ExitStatus::AlreadyExists,
            Self::NotFound { .. } => ExitStatus::NotFound,
            Self::Aws { .. } | Self::Rejected { .. } => ExitStatus::Service,
            Self::Conflict { .. } | Self::Corrupt { .. } => ExitStatus::Other,
        }
    }
}

impl crate::payload::PayloadError {
    /// Reading an offloaded spec from S3 failed: an AWS error; a payload that is not text,
    /// too large or in another bucket is bad input.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Fetch { .. } => ExitStatus::Service,
            Self::NotText { .. } | Self::Refused { .. } => ExitStatus::Usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order() {
        for (i, s) in ExitStatus::ALL.iter().enumerate() {
            assert_eq!(usize::from(s.code()), i, "{s:?}");
        }
        assert_eq!(
            (
                OK,
                OTHER,
                USAGE,
                NOT_FOUND,
                JOB_UNSUCCESSFUL,
                SERVICE,
                ALREADY_EXISTS
            ),
            (0, 1, 2, 3, 4, 5, 6)
        );
    }

    #[test]
    fn help_table_is_the_meanings() {
        let mut expected =
            String::from("Exit codes (the same for agentq, agentq-agent and agentq-dispatcher):");
        for s in ExitStatus::ALL {
            expected.push_str(&format!("\n  {}  {}", s.code(), s.meaning()));
        }
        assert_eq!(HELP, expected);
    }

    #[test]
    fn job_states_map_to_ok_or_unsuccessful() {
        use crate::JobState;
        assert_eq!(ExitStatus::of_job(JobState::Succeeded), ExitStatus::Ok);
        for s in [
            JobState::Failed,
            JobState::TimedOut,
            JobState::Cancelled,
            JobState::Dead,
        ] {
            assert_eq!(ExitStatus::of_job(s), ExitStatus::JobUnsuccessful);
        }
    }
}
