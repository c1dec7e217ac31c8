//! Delays longer than SQS allows. A message can be delayed 900 s at most, so a longer
//! wait travels as the `agentq-not-before` message attribute (epoch ms): the dispatcher
//! sends the message with `DelaySeconds = 900` and the attribute, and a consumer that
//! receives it early sends it on with what is left (chained hops of ≤ 900 s).
//!
//! Bounded: no plan waits longer than [`MAX_DELAY`], so a `not-before` further away
//! than that (plus clock slack) is malformed — a consumer runs such a message instead
//! of chaining it for ever. A deferred copy of a job that was cancelled (or finished)
//! meanwhile is dropped at its next hop: the consumer checks the job's record before it
//! sends the copy on.

use std::time::Duration;

use crate::record::EpochMillis;

/// SQS' largest `DelaySeconds`.
pub const SQS_MAX_DELAY_SECONDS: u64 = 900;
/// The longest delay any plan may carry (retry backoff, rate-limit pause).
pub const MAX_DELAY: Duration = Duration::from_secs(12 * 3600);
/// Clock difference tolerated between the machine that set `not-before` and the one
/// that reads it.
pub const CLOCK_SLACK: Duration = Duration::from_secs(60);
/// A message due within this much is run now rather than sent on.
pub const DUE_WITHIN: Duration = Duration::from_secs(1);

/// `DelaySeconds` for a delay, and the `agentq-not-before` epoch millis when the delay
/// is longer than SQS allows (a consumer sends such a message on with the rest).
pub fn delay_parts(delay: Duration, now: EpochMillis) -> (i32, Option<EpochMillis>) {
    let delay = delay.min(MAX_DELAY);
    let secs = delay.as_secs();
    let not_before = (secs > SQS_MAX_DELAY_SECONDS).then(|| now + delay.as_millis() as i64);
    (secs.min(SQS_MAX_DELAY_SECONDS) as i32, not_before)
}

/// What a consumer does with a message carrying `agentq-not-before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// Run it now.
    Due,
    /// Send it on with this `DelaySeconds` (1..=900) and acknowledge this copy.
    Wait { delay_seconds: i32 },
    /// Further away than any plan can ask for: malformed; run it now.
    TooFar { ahead: Duration },
}

/// Decides what to do with a message that must not start before `not_before`.
pub fn deferral(not_before: EpochMillis, now: EpochMillis) -> Deferral {
    let ahead = Duration::from_millis((not_before - now).max(0) as u64);
    if ahead <= DUE_WITHIN {
        Deferral::Due
    } else if ahead > MAX_DELAY + CLOCK_SLACK {
        Deferral::TooFar { ahead }
    } else {
        Deferral::Wait {
            delay_seconds: ahead
                .as_secs_f64()
                .ceil()
                .clamp(1.0, SQS_MAX_DELAY_SECONDS as f64) as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_delays_are_chained_with_not_before_and_capped() {
        assert_eq!(delay_parts(Duration::from_secs(0), 5), (0, None));
        assert_eq!(delay_parts(Duration::from_secs(900), 5), (900, None));
        assert_eq!(
            delay_parts(Duration::from_secs(3600), 1_000),
            (900, Some(1_000 + 3_600_000))
        );
        assert_eq!(
            delay_parts(Duration::from_secs(30 * 86_400), 0),
            (900, Some(MAX_DELAY.as_millis() as i64))
        );
    }

    #[test]
    fn a_deferred_message_is_due_sent_on_or_refused_as_too_far() {
        let now = 1_000_000;
        assert_eq!(deferral(now - 5_000, now), Deferral::Due);
        assert_eq!(deferral(now + 500, now), Deferral::Due);
        assert_eq!(
            deferral(now + 1_500, now),
            Deferral::Wait { delay_seconds: 2 }
        );
        assert_eq!(
            deferral(now + 3_600_000, now),
            Deferral::Wait { delay_seconds: 900 }
        );
        // Every hop of a maximal plan is still accepted.
        let (_, nb) = delay_parts(MAX_DELAY, now);
        assert!(matches!(deferral(nb.unwrap(), now), Deferral::Wait { .. }));
        assert!(matches!(
            deferral(now + 365 * 86_400_000, now),
            Deferral::TooFar { .. }
        ));
    }
}
