//! Identifier newtypes: [`JobId`] (validated, never usable as a path) and [`Attempt`]
//! (the fencing token of a run).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest job id accepted.
pub const JOB_ID_MAX_LEN: usize = 64;

/// A job identifier: 1–64 characters of `[A-Za-z0-9_-]`.
///
/// The charset excludes `/`, `.` and whitespace, so a job id can never name a parent
/// directory or escape an S3 prefix. Generated ids are ULIDs (sortable by creation time).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

/// Why a string is not a valid [`JobId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobIdError {
    #[error(
        "job_id is empty: use 1 to {JOB_ID_MAX_LEN} characters of A-Z a-z 0-9 _ -, or omit it to have one generated"
    )]
    Empty,
    #[error("job_id is {0} characters long: the limit is {JOB_ID_MAX_LEN}")]
    TooLong(usize),
    #[error(
        "job_id contains {0:?}: only A-Z a-z 0-9 _ - are allowed (job ids become S3 key segments)"
    )]
    BadChar(char),
}

impl JobId {
    /// Parses and validates a job id.
    pub fn parse(s: &str) -> Result<Self, JobIdError> {
        if s.is_empty() {
            return Err(JobIdError::Empty);
        }
        let len = s.chars().count();
        if len > JOB_ID_MAX_LEN {
            return Err(JobIdError::TooLong(len));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(JobIdError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    /// A new, time-ordered id (ULID, 26 characters).
    pub fn generate() -> Self {
        Self(ulid::Ulid::new().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for JobId {
    type Err = JobIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The attempt number of a run: 1 for the first claim, +1 for every new claim or takeover.
///
/// It is the fencing token: heartbeats and final writes are conditional on it, so a zombie
/// run cannot overwrite the record of a newer one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl Attempt {
    /// The attempt before any claim.
    pub const NONE: Attempt = Attempt(0);

    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ulids_and_simple_ids() {
        assert!(JobId::parse("job-1_A").is_ok());
        assert_eq!(JobId::generate().as_str().len(), 26);
        assert!(JobId::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_paths_and_oddities() {
        for bad in ["", "../x", "a/b", ".", "..", "a b", "ü", "a\0b", "x.json"] {
            assert!(JobId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(JobId::parse(&"a".repeat(65)), Err(JobIdError::TooLong(65)));
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<JobId>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<JobId>("\"ok-1\"").is_ok());
    }
}
