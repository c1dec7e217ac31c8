//! Re-plan policy: the raw configuration (a TOML or JSON file plus flags), its validation
//! into [`Policy`] with parsed durations and an ordered list of capacity tiers, and the
//! backoff math.
//!
//! ```toml
//! stale_after_seconds = 30     # a RUNNING lease whose heartbeat is older is a crash
//!                              # (AGENTQ_STALE_AFTER_SECONDS; the agent's setting too)
//! resend_after = "2m"          # a decision not marked enqueued after this is re-sent
//! max_segments = 8             # resumed segments per job
//! escalate_after_crashes = 2   # crashes on one tier before moving to the next (OOM)
//! max_rate_limit_pauses = 10   # rate-limit pauses per job (not counted as attempts)
//!
//! [sweep]                      # see crate::sweep
//! visibility_horizon = "15s"   # the agents' AGENTQ_VISIBILITY_HORIZON_SECONDS
//! margin = "5m"                # RUNNING is stranded after stale_after + horizon + margin
//! queued_after = "30m"         # QUEUED this long (past any planned delay) with an idle queue
//! limit = 200                  # records per state per sweep
//!
//! [[tiers]]                    # escalation order; "default" is the jobs queue unless listed
//! name = "large"
//! queue_url = "https://sqs.us-east-1.amazonaws.com/123456789012/agentq-large"
//!
//! [causes.infra_transient]
//! base_delay = "10s"
//! max_delay = "5m"
//! max_attempts = 5             # optional cap; the spec's max_attempts (default 3) applies too
//!
//! [causes.crashed]
//! base_delay = "30s"
//! max_delay = "15m"
//!
//! [causes.timed_out]
//! escalate_to = "large"        # default: the tier after the job's current one
//! escalate_resumable = true    # a segment that could resume resumes on that tier instead
//!                              # (longer invocations, e.g. Lambda Managed Instances)
//!
//! [causes.rate_limited]
//! base_delay = "1m"            # pause when the API gave no reset time (doubling)
//! max_delay = "6h"             # a limit that resets later than this ends the job
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use agentq_core::CauseKind;
use serde::Deserialize;

use crate::error::PolicyError;

/// SQS' largest `DelaySeconds` (AWS).
pub const SQS_MAX_DELAY_SECONDS: u64 = agentq_core::delay::SQS_MAX_DELAY_SECONDS;
/// Longest backoff accepted (chained through `agentq-not-before`).
pub const MAX_BACKOFF: Duration = agentq_core::delay::MAX_DELAY;
/// The tier of a job that names none; its queue is the jobs queue unless listed.
pub const DEFAULT_TIER: &str = "default";

/// One cause's settings as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCausePolicy {
    /// First retry delay (humantime, e.g. `10s`).
    pub base_delay: Option<String>,
    /// Largest retry delay; above 15 min the delay is chained.
    pub max_delay: Option<String>,
    /// Cap on attempts for this cause (the spec's `max_attempts` applies as well).
    pub max_attempts: Option<u32>,
    /// Tier to escalate to instead of the next one in order.
    pub escalate_to: Option<String>,
    /// `timed_out` only: a segment that timed out with a session resumes on the
    /// escalation tier instead of its own (default false).
    pub escalate_resumable: Option<bool>,
}

/// A capacity tier as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub name: String,
    pub queue_url: String,
}

/// The sweep's settings as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSweep {
    pub visibility_horizon: Option<String>,
    pub margin: Option<String>,
    pub queued_after: Option<String>,
    pub limit: Option<usize>,
}

/// The policy file as written. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Seconds after which a `RUNNING` lease without a heartbeat is a crash: the same
    /// setting, unit and default as the agent's `AGENTQ_STALE_AFTER_SECONDS`
    /// ([`agentq_core::config::DEFAULT_STALE_AFTER_SECONDS`]).
    pub stale_after_seconds: Option<f64>,
    /// Deprecated spelling of `stale_after_seconds` as a duration (`"15m"`); accepted
    /// with a warning for one release.
    pub stale_after: Option<String>,
    pub resend_after: Option<String>,
    pub max_segments: Option<u32>,
    pub escalate_after_crashes: Option<u32>,
    pub max_rate_limit_pauses: Option<u32>,
    #[serde(default)]
    pub sweep: RawSweep,
    #[serde(default)]
    pub tiers: Vec<RawTier>,
    /// Keyed by cause name ([`CauseKind`]); checked when the policy is built, so an
    /// unknown cause is refused with the list of known ones.
    #[serde(default)]
    pub causes: BTreeMap<String, RawCausePolicy>,
}

impl RawPolicy {
    /// Reads a policy file: JSON when the name ends in `.json`, TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|why| PolicyError::Parse {
            path: path.to_path_buf(),
            why,
        })
    }
}

/// One cause's validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CausePolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_attempts: Option<u32>,
    pub escalate_to: Option<String>,
    /// A resumable timeout resumes on the escalation tier (`timed_out` only).
    pub escalate_resumable: bool,
}

impl CausePolicy {
    fn defaults(cause: CauseKind) -> Self {
        let (base, max) = match cause {
            CauseKind::InfraTransient => (10, 300),
            CauseKind::Crashed => (30, 900),
            CauseKind::RateLimited => (60, 6 * 3600),
            _ => (0, 0),
        };
        Self {
            base_delay: Duration::from_secs(base),
            max_delay: Duration::from_secs(max),
            max_attempts: None,
            escalate_to: None,
            escalate_resumable: false,
        }
    }
}

/// A capacity tier: a name and the queue its agents read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub queue_url: String,
}

/// The sweep's validated settings (see [`crate::sweep`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepPolicy {
    /// How far the agents push a message's visibility with each heartbeat
    /// (`AGENTQ_VISIBILITY_HORIZON_SECONDS`): a dead agent's message is back within it.
    pub visibility_horizon: Duration,
    /// Slack on top (receive latency, a busy mapping, clock skew).
    pub margin: Duration,
    /// A `QUEUED` job older than this (past any planned delay), while its queue has no
    /// backlog, has lost its message.
    pub queued_after: Duration,
    /// Records examined per state per sweep.
    pub limit: usize,
}

impl SweepPolicy {
    /// A `RUNNING` job whose heartbeat is older than this is stranded: had its message
    /// still existed, it would have come back within the horizon after the last
    /// heartbeat, and a claim would have taken the lease over once it was `stale_after`
    /// old (a claim that finds the lease still live hides the message for `stale_after`
    /// again, hence the limit counts it in full).
    pub fn strand_after(&self, stale_after: Duration) -> Duration {
        stale_after + self.visibility_horizon + self.margin
    }
}

/// The validated re-plan policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// A RUNNING lease whose heartbeat is older than this is a crash.
    pub stale_after: Duration,
    /// A plan not marked enqueued this long after it was written is re-sent.
    pub resend_after: Duration,
    pub max_segments: u32,
    pub escalate_after_crashes: u32,
    /// Rate-limit pauses per job before it is given up (`DEAD`).
    pub max_rate_limit_pauses: u32,
    pub sweep: SweepPolicy,
    /// Escalation order; always contains [`DEFAULT_TIER`].
    pub tiers: Vec<Tier>,
    causes: BTreeMap<CauseKind, CausePolicy>,
}

fn duration(field: String, v: &Option<String>, default: Duration) -> Result<Duration, PolicyError> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s).map_err(|e| PolicyError::Invalid {
            field,
            why: format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\""),
        }),
    }
}

fn check_url(field: String, url: &str) -> Result<(), PolicyError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(PolicyError::Invalid {
            field,
            why: format!("{url:?} is not a queue URL (see `aws sqs get-queue-url`)"),
        })
    }
}

impl Policy {
    /// Validates `raw`, adding `extra_tiers` (from `--tier-queues NAME=URL`, in order) and
    /// using `jobs_queue_url` for the `default` tier unless a tier of that name is given.
    pub fn build(
        raw: &RawPolicy,
        extra_tiers: &[(String, String)],
        jobs_queue_url: &str,
    ) -> Result<Self, PolicyError> {
        let stale_after = match (raw.stale_after_seconds, &raw.stale_after) {
            (Some(_), Some(_)) => {
                return Err(PolicyError::Invalid {
                    field: "stale_after".into(),
                    why: "is the deprecated spelling of stale_after_seconds: give only stale_after_seconds".into(),
                });
            }
            (None, Some(old)) => {
                let d = duration("stale_after".into(), &Some(old.clone()), Duration::ZERO)?;
                tracing::warn!(
                    "policy stale_after = {old:?} is deprecated: write stale_after_seconds = {} (the agent's AGENTQ_STALE_AFTER_SECONDS)",
                    d.as_secs_f64()
                );
                Some(d.as_secs_f64())
            }
            (seconds, None) => seconds,
        };
        let stale_after =
            agentq_core::config::stale_after(stale_after).map_err(|e| PolicyError::Invalid {
                field: "stale_after_seconds".into(),
                why: match e {
                    agentq_core::ConfigError::Invalid { value, why, .. } => {
                        format!("{value} is out of range: {why}")
                    }
                    other => other.to_string(),
                },
            })?;
        let resend_after = duration(
            "resend_after".into(),
            &raw.resend_after,
            Duration::from_secs(120),
        )?;
        let max_segments = raw.max_segments.unwrap_or(8);
        if !(1..=100).contains(&max_segments) {
            return Err(PolicyError::Invalid {
                field: "max_segments".into(),
                why: format!("{max_segments} is outside 1..=100"),
            });
        }
        let escalate_after_crashes = raw.escalate_after_crashes.unwrap_or(2);
        if escalate_after_crashes == 0 {
            return Err(PolicyError::Invalid {
                field: "escalate_after_crashes".into(),
                why: "must be at least 1".into(),
            });
        }
        let max_rate_limit_pauses = raw.max_rate_limit_pauses.unwrap_or(10);
        if !(1..=1000).contains(&max_rate_limit_pauses) {
            return Err(PolicyError::Invalid {
                field: "max_rate_limit_pauses".into(),
                why: format!("{max_rate_limit_pauses} is outside 1..=1000"),
            });
        }
        let sweep = SweepPolicy {
            visibility_horizon: duration(
                "sweep.visibility_horizon".into(),
                &raw.sweep.visibility_horizon,
                Duration::from_secs(15),
            )?,
            margin: duration(
                "sweep.margin".into(),
                &raw.sweep.margin,
                Duration::from_secs(300),
            )?,
            queued_after: duration(
                "sweep.queued_after".into(),
                &raw.sweep.queued_after,
                Duration::from_secs(1800),
            )?,
            limit: raw.sweep.limit.unwrap_or(200),
        };
        if sweep.visibility_horizon > Duration::from_secs(43_200) {
            return Err(PolicyError::Invalid {
                field: "sweep.visibility_horizon".into(),
                why: "must be at most 12h (the SQS maximum visibility)".into(),
            });
        }
        if sweep.queued_after < Duration::from_secs(SQS_MAX_DELAY_SECONDS + 60) {
            return Err(PolicyError::Invalid {
                field: "sweep.queued_after".into(),
                why: "must be longer than 16m: a producer may delay a message by up to 15 minutes"
                    .into(),
            });
        }
        if !(1..=10_000).contains(&sweep.limit) {
            return Err(PolicyError::Invalid {
                field: "sweep.limit".into(),
                why: format!("{} is outside 1..=10000", sweep.limit),
            });
        }

        let mut tiers: Vec<Tier> = Vec::new();
        let given = raw
            .tiers
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("tiers[{i}]"), t.name.clone(), t.queue_url.clone()))
            .chain(extra_tiers.iter().map(|(n, u)| {
                (
                    format!("--tier-queues {n}={u}"),
                    n.to_string(),
                    u.to_string(),
                )
            }));
        for (field, name, url) in given {
            if name.is_empty()
                || name.len() > 32
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(PolicyError::Invalid {
                    field,
                    why: format!("tier name {name:?} must be 1-32 characters of a-z 0-9 -"),
                });
            }
            check_url(field.clone(), &url)?;
            if tiers.iter().any(|t| t.name == name) {
                return Err(PolicyError::Invalid {
                    field,
                    why: format!("tier {name:?} is listed twice"),
                });
            }
            tiers.push(Tier {
                name,
                queue_url: url,
            });
        }
        if !tiers.iter().any(|t| t.name == DEFAULT_TIER) {
            tiers.insert(
                0,
                Tier {
                    name: DEFAULT_TIER.into(),
                    queue_url: jobs_queue_url.to_owned(),
                },
            );
        }

        let mut causes = BTreeMap::new();
        for name in raw.causes.keys() {
            if let Err(e) = name.parse::<CauseKind>() {
                return Err(PolicyError::Invalid {
                    field: format!("causes.{name}"),
                    why: e.to_string(),
                });
            }
        }
        for cause in CauseKind::ALL {
            let d = CausePolicy::defaults(cause);
            let Some(rc) = raw.causes.get(cause.as_str()) else {
                causes.insert(cause, d);
                continue;
            };
            let f = |k: &str| format!("causes.{cause}.{k}");
            let base_delay = duration(f("base_delay"), &rc.base_delay, d.base_delay)?;
            let max_delay = duration(f("max_delay"), &rc.max_delay, d.max_delay.max(base_delay))?;
            if base_delay > max_delay {
                return Err(PolicyError::Invalid {
                    field: f("base_delay"),
                    why: format!(
                        "{} is longer than max_delay {}",
                        humantime::format_duration(base_delay),
                        humantime::format_duration(max_delay)
                    ),
                });
            }
            if max_delay > MAX_BACKOFF {
                return Err(PolicyError::Invalid {
                    field: f("max_delay"),
                    why: "must be at most 12h".into(),
                });
            }
            if let Some(n) = rc.max_attempts
                && !(1..=agentq_core::spec::MAX_ATTEMPTS_LIMIT).contains(&n)
            {
                return Err(PolicyError::Invalid {
                    field: f("max_attempts"),
                    why: format!(
                        "{n} is outside 1..={}",
                        agentq_core::spec::MAX_ATTEMPTS_LIMIT
                    ),
                });
            }
            if let Some(t) = &rc.escalate_to
                && !tiers.iter().any(|x| &x.name == t)
            {
                return Err(PolicyError::Invalid {
                    field: f("escalate_to"),
                    why: format!(
                        "tier {t:?} is not configured; known tiers: {} (add it under [[tiers]] or with --tier-queues {t}=URL)",
                        tiers
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            if rc.escalate_resumable.is_some() && cause != "timed_out" {
                return Err(PolicyError::Invalid {
                    field: f("escalate_resumable"),
                    why: "only applies to timed_out (a segment that could resume); remove it here"
                        .into(),
                });
            }
            causes.insert(
                cause,
                CausePolicy {
                    base_delay,
                    max_delay,
                    max_attempts: rc.max_attempts,
                    escalate_to: rc.escalate_to.clone(),
                    escalate_resumable: rc.escalate_resumable.unwrap_or(false),
                },
            );
        }
        Ok(Self {
            stale_after,
            resend_after,
            max_segments,
            escalate_after_crashes,
            max_rate_limit_pauses,
            sweep,
            tiers,
            causes,
        })
    }

    /// The settings of a cause.
    pub fn cause(&self, kind: CauseKind) -> CausePolicy {
        self.causes
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| CausePolicy::defaults(kind))
    }

    /// A tier by name.
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// Where a job on `current` escalates to for `cause`: the cause's `escalate_to`, or
    /// the tier after `current` in order. `None` when there is no bigger tier.
    pub fn escalation(&self, current: &str, cause: CauseKind) -> Option<&Tier> {
        if let Some(t) = &self.cause(cause).escalate_to {
            return self.tier(t).filter(|t| t.name != current);
        }
        let i = self.tiers.iter().position(|t| t.name == current)?;
        self.tiers.get(i + 1)
    }
}

/// The delay before retry number `n` (1-based): `base * 2^(n-1)` capped at `max` (the
/// math of `backon`'s `ExponentialBuilder` with factor 2), then "equal jitter": a
/// uniformly random point in the upper half, `[d/2, d]`. The result never exceeds `max`,
/// and retry `n+1`'s smallest delay is retry `n`'s largest until the cap is reached, so
/// delays grow.
pub fn backoff(base: Duration, max: Duration, n: u32, rng: &mut fastrand::Rng) -> Duration {
    let base_ms = base.as_millis().min(u64::MAX as u128) as u64;
    let max_ms = max.as_millis().min(u64::MAX as u128) as u64;
    let shift = n.saturating_sub(1).min(63);
    let d = base_ms.saturating_mul(1u64 << shift).min(max_ms);
    let half = d / 2;
    Duration::from_millis(half + rng.u64(0..=d - half))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawPolicy {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn delays_grow_and_stay_within_the_cap() {
        let base = Duration::from_secs(10);
        let max = Duration::from_secs(3600);
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut prev = Duration::ZERO;
            for n in 1..=20 {
                let d = backoff(base, max, n, &mut rng);
                assert!(d <= max, "retry {n}: {d:?} > cap");
                assert!(d >= prev.min(max / 2), "retry {n}: {d:?} < {prev:?}");
                let uncapped = base * 2u32.pow(n - 1);
                if uncapped < max {
                    assert!(d >= uncapped / 2 && d <= uncapped, "retry {n}: {d:?}");
                }
                prev = d;
            }
        }
        // Past the cap, delays stay in [max/2, max].
        let mut rng = fastrand::Rng::with_seed(7);
        let d = backoff(base, max, 40, &mut rng);
        assert!(d >= max / 2 && d <= max);
        // No overflow for silly inputs.
        let d = backoff(Duration::from_secs(u64::MAX / 4), MAX_BACKOFF, 64, &mut rng);
        assert!(d <= MAX_BACKOFF);
    }

    #[test]
    fn defaults_and_file_values() {
        let p = Policy::build(&RawPolicy::default(), &[], "https://q/jobs").unwrap();
        assert_eq!(p.tiers.len(), 1);
        // The agent's default, from core.
        assert_eq!(
            p.stale_after.as_secs_f64(),
            agentq_core::config::DEFAULT_STALE_AFTER_SECONDS
        );
        assert_eq!(
            p.cause(CauseKind::Crashed).max_delay,
            Duration::from_secs(900)
        );
        assert_eq!(
            p.cause(CauseKind::RateLimited).max_delay,
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(p.max_rate_limit_pauses, 10);
        assert_eq!(
            p.sweep.strand_after(p.stale_after),
            Duration::from_secs(30 + 15 + 300)
        );
        assert!(p.escalation("default", CauseKind::TimedOut).is_none());

        let p = Policy::build(
            &raw(r#"
                stale_after_seconds = 300
                [causes.infra_transient]
                base_delay = "1s"
                max_delay = "1h"
                max_attempts = 7
            "#),
            &[("large".into(), "https://q/large".into())],
            "https://q/jobs",
        )
        .unwrap();
        assert_eq!(p.stale_after, Duration::from_secs(300));
        let c = p.cause(CauseKind::InfraTransient);
        assert_eq!(c.max_delay, Duration::from_secs(3600));
        assert_eq!(c.max_attempts, Some(7));
        assert_eq!(
            p.escalation("default", CauseKind::TimedOut)
                .unwrap()
                .queue_url,
            "https://q/large"
        );
        assert!(p.escalation("large", CauseKind::TimedOut).is_none());

        // The deprecated duration spelling still works.
        let p = Policy::build(&raw(r#"stale_after = "2m""#), &[], "https://q/jobs").unwrap();
        assert_eq!(p.stale_after, Duration::from_secs(120));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"stale_after = "soon""#, "stale_after"),
            ("stale_after_seconds = 0.1", "stale_after_seconds"),
            (
                "stale_after_seconds = 60\nstale_after = \"1m\"",
                "stale_after_seconds",
            ),
            (
                "[causes.crashed]\nbase_delay = \"1h\"\nmax_delay = \"1m\"",
                "causes.crashed.base_delay",
            ),
            (
                "[causes.crashed]\nmax_delay = \"2d\"",
                "causes.crashed.max_delay",
            ),
            ("[causes.oom]\nmax_attempts = 2", "causes.oom"),
            (
                "[causes.timed_out]\nescalate_to = \"huge\"",
                "causes.timed_out.escalate_to",
            ),
            (
                "[causes.agent_exit]\nmax_attempts = 0",
                "causes.agent_exit.max_attempts",
            ),
            (
                "[[tiers]]\nname = \"Big\"\nqueue_url = \"https://x\"",
                "tiers[0]",
            ),
            (
                "[[tiers]]\nname = \"big\"\nqueue_url = \"big-queue\"",
                "tiers[0]",
            ),
            ("max_segments = 0", "max_segments"),
            ("max_rate_limit_pauses = 0", "max_rate_limit_pauses"),
            ("[sweep]\nqueued_after = \"5m\"", "sweep.queued_after"),
            ("[sweep]\nmargin = \"a while\"", "sweep.margin"),
            (
                "[causes.rate_limited]\nmax_delay = \"3d\"",
                "causes.rate_limited.max_delay",
            ),
            (
                "[causes.crashed]\nescalate_resumable = true",
                "causes.crashed.escalate_resumable",
            ),
        ];
        for (text, field) in cases {
            let e = Policy::build(&raw(text), &[], "https://q/jobs").unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(field), "{text}: {msg}");
        }
        // Unknown keys in the file are refused by the parser, naming the key.
        let e = toml::from_str::<RawPolicy>("stale = \"1m\"").unwrap_err();
        assert!(e.to_string().contains("stale"), "{e}");
        let e = toml::from_str::<RawPolicy>("[sweep]\nlimits = 3").unwrap_err();
        assert!(e.to_string().contains("limits"), "{e}");
        // An unknown cause lists the known ones.
        let e = Policy::build(
            &raw("[causes.oom]\nmax_attempts = 2"),
            &[],
            "https://q/jobs",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resume_failed") && e.contains("rate_limited"),
            "{e}"
        );
    }
}
