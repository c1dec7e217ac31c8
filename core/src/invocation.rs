//! How much time a Lambda invocation has. The deadline (`Lambda-Runtime-Deadline-Ms`)
//! is an epoch time in milliseconds on AWS; local Runtime API emulators do not all
//! agree: `cargo lambda watch` sends the function's timeout as a plain duration.
//! [`budget`] reads either, and falls back to the function timeout for anything else.
//! The agent and the dispatcher both read their deadline through it.

use std::time::{Duration, SystemTime};

/// Lambda's longest function timeout, the fallback budget when none is known.
pub const MAX_FUNCTION_TIMEOUT: Duration = Duration::from_secs(900);

/// A deadline further in the past than this is not an epoch time: no runtime hands out
/// an invocation that ended a day ago, while any duration (in ms) reads as 1970.
const PLAUSIBLE_PAST: Duration = Duration::from_secs(24 * 3600);

/// The function's configured timeout: `AWS_LAMBDA_FUNCTION_TIMEOUT` (seconds; set by
/// local emulators, not by Lambda itself) or [`MAX_FUNCTION_TIMEOUT`].
pub fn function_timeout() -> Duration {
    std::env::var("AWS_LAMBDA_FUNCTION_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(MAX_FUNCTION_TIMEOUT, Duration::from_secs)
}

/// How much time an invocation has, and how that was read from its deadline header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// An epoch-milliseconds deadline (AWS): the time until then (zero when passed).
    Deadline(Duration),
    /// A deadline that is a plain duration in milliseconds (`cargo lambda watch`).
    Duration(Duration),
    /// Neither (zero, or too large for a duration): the function timeout.
    FunctionTimeout(Duration),
}

impl Budget {
    pub fn duration(self) -> Duration {
        match self {
            Self::Deadline(d) | Self::Duration(d) | Self::FunctionTimeout(d) => d,
        }
    }

    /// Why the deadline was not read as an epoch time, when it was not.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Deadline(_) => None,
            Self::Duration(_) => Some(
                "Lambda-Runtime-Deadline-Ms is not an epoch time but a duration (a local Runtime API such as `cargo lambda watch`); using it as the time left",
            ),
            Self::FunctionTimeout(_) => Some(
                "Lambda-Runtime-Deadline-Ms is neither an epoch time nor a plausible duration; using the function timeout (AWS_LAMBDA_FUNCTION_TIMEOUT, else 900 s) as the time left",
            ),
        }
    }
}

/// Reads the `Lambda-Runtime-Deadline-Ms` value `deadline_ms` at `now`.
///
/// An epoch time no more than a day in the past is a deadline (one already passed
/// leaves no time). Anything older cannot be one: a value up to a day is taken as a
/// duration from now, anything else (zero, or longer than a day) gives `fallback`.
pub fn budget(deadline_ms: u64, now: SystemTime, fallback: Duration) -> Budget {
    let deadline = SystemTime::UNIX_EPOCH + Duration::from_millis(deadline_ms);
    let plausible_epoch = now
        .checked_sub(PLAUSIBLE_PAST)
        .is_none_or(|earliest| deadline >= earliest);
    if plausible_epoch {
        return Budget::Deadline(deadline.duration_since(now).unwrap_or(Duration::ZERO));
    }
    let as_duration = Duration::from_millis(deadline_ms);
    if !as_duration.is_zero() && as_duration <= PLAUSIBLE_PAST {
        Budget::Duration(as_duration)
    } else {
        Budget::FunctionTimeout(fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    const NOW: u64 = 1_790_000_000_000; // an epoch time in 2026
    const FALLBACK: Duration = Duration::from_secs(900);

    #[test]
    fn an_epoch_deadline_gives_the_time_until_then() {
        assert_eq!(
            budget(NOW + 42_000, at(NOW), FALLBACK),
            Budget::Deadline(Duration::from_secs(42))
        );
        // Passed a moment ago (a slow start, clock skew): no time left, not a duration.
        assert_eq!(
            budget(NOW - 5_000, at(NOW), FALLBACK),
            Budget::Deadline(Duration::ZERO)
        );
        assert_eq!(
            budget(NOW - 23 * 3600 * 1000, at(NOW), FALLBACK),
            Budget::Deadline(Duration::ZERO)
        );
        assert!(budget(NOW + 1, at(NOW), FALLBACK).reason().is_none());
    }

    #[test]
    fn a_plain_duration_as_cargo_lambda_sends_it_is_read_as_one() {
        // `cargo lambda watch` sends `lambda-runtime-deadline-ms: 600000`.
        let b = budget(600_000, at(NOW), FALLBACK);
        assert_eq!(b, Budget::Duration(Duration::from_secs(600)));
        assert!(b.reason().is_some_and(|r| r.contains("duration")));
        assert_eq!(
            budget(86_400_000, at(NOW), FALLBACK),
            Budget::Duration(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn anything_else_falls_back_to_the_function_timeout() {
        let b = budget(0, at(NOW), FALLBACK);
        assert_eq!(b, Budget::FunctionTimeout(FALLBACK));
        assert!(b.reason().is_some_and(|r| r.contains("function timeout")));
        // Older than a day, but too long to be a duration.
        assert_eq!(
            budget(NOW - 2 * 86_400_000, at(NOW), Duration::from_secs(60)),
            Budget::FunctionTimeout(Duration::from_secs(60))
        );
    }
}
