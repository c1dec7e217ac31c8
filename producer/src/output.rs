//! What the CLI shows: serializable views of job records (the `--output json` shapes)
//! and their text renderings (status page, list table, watch line).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use agentq_core::payload::PayloadPointer;
use agentq_core::record::{EpochMillis, now_ms, rfc3339};
use agentq_core::{Attempt, JobRecord, JobState, Progress};
use serde::Serialize;

use crate::producer::Producer;

/// A timestamp, both ways.
#[derive(Debug, Clone, Serialize)]
pub struct Time {
    pub ms: EpochMillis,
    pub rfc3339: String,
}

impl Time {
    fn new(ms: EpochMillis) -> Self {
        Self {
            ms,
            rfc3339: rfc3339(ms),
        }
    }
}

/// Durations derived from the timestamps, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Durations {
    /// Created → first start (or now, while queued).
    pub queued_ms: Option<i64>,
    /// Start of the current attempt → finish (or now, while running).
    pub running_ms: Option<i64>,
    /// Created → finish (or now).
    pub total_ms: i64,
    /// Since the last heartbeat, while running.
    pub heartbeat_age_ms: Option<i64>,
}

/// One attempt.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub segment: u32,
    pub started_at: Time,
    pub finished_at: Option<Time>,
    pub status: Option<JobState>,
    pub cause: Option<String>,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub owner: Option<String>,
    /// `s3://bucket/{prefix}/jobs/{id}/attempt-{n}/`
    pub logs: Option<String>,
}

/// One decision of the job's history.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionView {
    pub at: Time,
    pub action: String,
    pub by: String,
    pub attempt: u32,
    pub cause: Option<String>,
    pub reason: String,
    pub delay_seconds: Option<u64>,
    pub queue: Option<String>,
}

/// `agentq status --output json`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub job_id: String,
    pub status: JobState,
    /// The run is over (for this attempt at least).
    pub finished: bool,
    /// No transition is left.
    pub terminal: bool,
    pub attempt: u32,
    pub segment: u32,
    pub cancel_requested: bool,
    pub lease_owner: Option<String>,
    pub created_at: Time,
    pub updated_at: Time,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
    pub heartbeat_at: Option<Time>,
    pub durations: Durations,
    pub progress: Progress,
    pub cause: Option<String>,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub tier: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub runtime_ms: u64,
    pub cost_usd: f64,
    /// Logs of the current attempt.
    pub logs: Option<String>,
    pub result_key: Option<String>,
    pub attempts: Vec<AttemptView>,
    pub history: Vec<DecisionView>,
    /// The stored spec, parsed (absent when the record has none, or keeps only a pointer).
    pub spec: Option<serde_json::Value>,
    /// `s3://bucket/key` of the spec when the record keeps a pointer to it instead (a
    /// spec too large for a DynamoDB item); read it with `aws s3 cp URL -`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_location: Option<String>,
}

impl StatusView {
    pub fn new(rec: &JobRecord, producer: &Producer) -> Self {
        let now = now_ms();
        let end = rec.finished_at.unwrap_or(now);
        let current_start = rec
            .current_attempt()
            .map(|a| a.started_at)
            .or(rec.started_at);
        let first_start = rec
            .attempts
            .values()
            .map(|a| a.started_at)
            .min()
            .or(rec.started_at);
        let durations = Durations {
            queued_ms: match first_start {
                Some(s) => Some(s - rec.created_at),
                None if !rec.status.is_finished() => Some(now - rec.created_at),
                None => None,
            },
            running_ms: current_start.map(|s| end - s),
            total_ms: end - rec.created_at,
            heartbeat_age_ms: (rec.status == JobState::Running)
                .then_some(rec.heartbeat_at)
                .flatten()
                .map(|h| now - h),
        };
        let mut attempts: Vec<AttemptView> = rec
            .attempts
            .iter()
            .filter_map(|(n, a)| Some((n.parse::<u32>().ok()?, a)))
            .map(|(n, a)| AttemptView {
                attempt: n,
                segment: a.segment,
                started_at: Time::new(a.started_at),
                finished_at: a.finished_at.map(Time::new),
                status: a.status,
                cause: a.cause.clone(),
                reason: a.reason.clone(),
                exit_code: a.exit_code,
                signal: a.signal,
                owner: a.owner.clone(),
                logs: producer.log_url(&rec.job_id, Attempt(n)),
            })
            .collect();
        attempts.sort_by_key(|a| a.attempt);
        Self {
            job_id: rec.job_id.to_string(),
            status: rec.status,
            finished: rec.status.is_finished(),
            terminal: rec.status.is_terminal(),
            attempt: rec.attempt.get(),
            segment: rec.segment,
            cancel_requested: rec.cancel_requested,
            lease_owner: rec.lease_owner.clone(),
            created_at: Time::new(rec.created_at),
            updated_at: Time::new(rec.updated_at),
            started_at: rec.started_at.map(Time::new),
            finished_at: rec.finished_at.map(Time::new),
            heartbeat_at: rec.heartbeat_at.map(Time::new),
            durations,
            progress: rec.progress.clone(),
            cause: rec.cause.clone(),
            reason: rec.reason.clone(),
            exit_code: rec.exit_code,
            signal: rec.signal,
            tier: rec.tier.clone(),
            labels: rec.labels.clone(),
            runtime_ms: rec.runtime_ms,
            cost_usd: rec.cost_usd,
            logs: (rec.attempt > Attempt::NONE)
                .then(|| producer.log_url(&rec.job_id, rec.attempt))
                .flatten(),
            result_key: rec.result_key.clone(),
            attempts,
            history: rec
                .history
                .iter()
                .map(|d| DecisionView {
                    at: Time::new(d.at),
                    action: d.action.to_string(),
                    by: d.by.clone(),
                    attempt: d.attempt,
                    cause: d.cause.clone(),
                    reason: d.reason.clone(),
                    delay_seconds: d.delay_seconds,
                    queue: d.queue.clone(),
                })
                .collect(),
            spec: rec
                .spec
                .as_deref()
                .filter(|s| PayloadPointer::parse(s).is_none())
                .and_then(|s| serde_json::from_str(s).ok()),
            spec_location: rec
                .spec
                .as_deref()
                .and_then(PayloadPointer::parse)
                .map(|p| p.url()),
        }
    }

    /// The status page.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "job        {}", self.job_id);
        let mut state = format!("{}", self.status);
        if self.attempt > 0 {
            let _ = write!(
                state,
                " (attempt {}, segment {})",
                self.attempt, self.segment
            );
        }
        if self.cancel_requested && !self.finished {
            state.push_str(" — cancel requested");
        }
        let _ = writeln!(s, "status     {state}");
        if self.attempt > 0 || self.progress != Progress::default() {
            let _ = writeln!(s, "progress   {}", progress_text(&self.progress));
        }
        let _ = writeln!(s, "created    {}", self.created_at.rfc3339);
        if let Some(t) = &self.started_at {
            let queued = self
                .durations
                .queued_ms
                .map(|q| format!(" (queued {})", duration(q)))
                .unwrap_or_default();
            let _ = writeln!(s, "started    {}{queued}", t.rfc3339);
        } else if let Some(q) = self.durations.queued_ms {
            let _ = writeln!(s, "waiting    {} in the queue", duration(q));
        }
        if let (Some(t), Some(age)) = (&self.heartbeat_at, self.durations.heartbeat_age_ms) {
            let _ = writeln!(s, "heartbeat  {} ({} ago)", t.rfc3339, duration(age));
        }
        if let Some(t) = &self.finished_at {
            let ran = self
                .durations
                .running_ms
                .map(|r| format!(" (ran {})", duration(r)))
                .unwrap_or_default();
            let _ = writeln!(s, "finished   {}{ran}", t.rfc3339);
        } else if let Some(r) = self.durations.running_ms {
            let _ = writeln!(s, "running    for {}", duration(r));
        }
        let _ = writeln!(s, "updated    {}", self.updated_at.rfc3339);
        if self.runtime_ms > 0 || self.cost_usd > 0.0 {
            let _ = writeln!(
                s,
                "spent      {} run time, ${:.4}",
                duration(self.runtime_ms as i64),
                self.cost_usd
            );
        }
        match (&self.cause, &self.reason) {
            (Some(c), Some(r)) => {
                let _ = writeln!(s, "cause      {c}: {r}");
            }
            (Some(c), None) => {
                let _ = writeln!(s, "cause      {c}");
            }
            (None, Some(r)) => {
                let _ = writeln!(s, "reason     {r}");
            }
            (None, None) => {}
        }
        if self.exit_code.is_some() || self.signal.is_some() {
            let _ = writeln!(s, "exit       {}", exit_text(self.exit_code, self.signal));
        }
        if let Some(t) = &self.tier {
            let _ = writeln!(s, "tier       {t}");
        }
        if !self.labels.is_empty() {
            let _ = writeln!(s, "labels     {}", labels_text(&self.labels));
        }
        if let Some(l) = &self.spec_location {
            let _ = writeln!(s, "spec       {l} (too large for the record)");
        }
        if let Some(l) = &self.logs {
            let _ = writeln!(s, "logs       {l}{{stdout,stderr,events}}/");
        }
        if let Some(k) = &self.result_key {
            let _ = writeln!(s, "result     {k}");
        }
        if !self.attempts.is_empty() {
            let _ = writeln!(s, "attempts");
            for a in &self.attempts {
                let status = a.status.map_or("RUNNING".to_owned(), |st| st.to_string());
                let ran = a
                    .finished_at
                    .as_ref()
                    .map(|f| format!(" ran {}", duration(f.ms - a.started_at.ms)))
                    .unwrap_or_default();
                let why = match (&a.cause, &a.reason) {
                    (Some(c), Some(r)) => format!(" {c}: {r}"),
                    (None, Some(r)) => format!(" {r}"),
                    (Some(c), None) => format!(" {c}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "  {:>3}  {status:<10} started {}{ran}{why}{}",
                    a.attempt,
                    a.started_at.rfc3339,
                    a.logs
                        .as_deref()
                        .map(|l| format!("  {l}"))
                        .unwrap_or_default()
                );
            }
        }
        if !self.history.is_empty() {
            let _ = writeln!(s, "history");
            for d in &self.history {
                let mut extra = String::new();
                if let Some(c) = &d.cause {
                    let _ = write!(extra, " [{c}]");
                }
                if let Some(delay) = d.delay_seconds {
                    let _ = write!(extra, " delay {delay}s");
                }
                if let Some(q) = &d.queue {
                    let _ = write!(extra, " → {q}");
                }
                let _ = writeln!(
                    s,
                    "  {}  {} by {} (attempt {}){extra}: {}",
                    d.at.rfc3339, d.action, d.by, d.attempt, d.reason
                );
            }
        }
        s
    }
}

/// One row of `agentq list --output json`.
#[derive(Debug, Clone, Serialize)]
pub struct ListRow {
    pub job_id: String,
    pub status: JobState,
    pub attempt: u32,
    pub created_at: Time,
    pub updated_at: Time,
    pub tier: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub cause: Option<String>,
    pub reason: Option<String>,
}

impl ListRow {
    pub fn new(rec: &JobRecord) -> Self {
        Self {
            job_id: rec.job_id.to_string(),
            status: rec.status,
            attempt: rec.attempt.get(),
            created_at: Time::new(rec.created_at),
            updated_at: Time::new(rec.updated_at),
            tier: rec.tier.clone(),
            labels: rec.labels.clone(),
            cause: rec.cause.clone(),
            reason: rec.reason.clone(),
        }
    }
}

/// The `agentq list` table.
pub fn list_table(rows: &[ListRow]) -> String {
    let now = now_ms();
    let id_w = rows
        .iter()
        .map(|r| r.job_id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = format!(
        "{:<id_w$}  {:<15}  {:>7}  {:<24}  {:>9}  {:<8}  {}\n",
        "JOB_ID", "STATUS", "ATTEMPT", "UPDATED", "AGE", "TIER", "LABELS / REASON"
    );
    for r in rows {
        let mut tail = labels_text(&r.labels);
        if let Some(reason) = &r.reason {
            if !tail.is_empty() {
                tail.push_str("  ");
            }
            tail.push_str(reason);
        }
        let _ = writeln!(
            s,
            "{:<id_w$}  {:<15}  {:>7}  {:<24}  {:>9}  {:<8}  {}",
            r.job_id,
            r.status.as_str(),
            r.attempt,
            r.updated_at.rfc3339,
            short_duration(now - r.created_at.ms),
            r.tier.as_deref().unwrap_or("-"),
            tail
        );
    }
    s
}

/// A one-line summary for `watch`.
pub fn watch_line(rec: &JobRecord) -> String {
    let now = now_ms();
    let mut s = format!("{} {}", rec.job_id, rec.status);
    if rec.attempt > Attempt::NONE {
        let _ = write!(s, " · attempt {}", rec.attempt);
    }
    match rec.status {
        JobState::Queued | JobState::RetryScheduled | JobState::Resuming => {
            let _ = write!(s, " · waiting {}", short_duration(now - rec.updated_at));
        }
        JobState::Running => {
            let _ = write!(s, " · {}", progress_text(&rec.progress));
            if let Some(start) = rec.started_at {
                let _ = write!(s, " · running {}", short_duration(now - start));
            }
            if let Some(hb) = rec.heartbeat_at {
                let _ = write!(s, " · heartbeat {} ago", short_duration(now - hb));
            }
            if rec.cancel_requested {
                s.push_str(" · cancel requested");
            }
        }
        _ => {
            if let Some(r) = &rec.reason {
                let _ = write!(s, " · {r}");
            }
        }
    }
    s
}

/// Turns, tokens, cost and last event.
pub fn progress_text(p: &Progress) -> String {
    let mut s = format!(
        "{} turns · {} in / {} out tokens · ${:.4}",
        p.turns,
        tokens(p.input_tokens),
        tokens(p.output_tokens),
        p.cost_usd
    );
    if let Some(e) = &p.last_event {
        let _ = write!(s, " · last event: {e}");
    }
    s
}

fn tokens(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), Some(sig)) => format!("code {c}, signal {sig}"),
        (Some(c), None) => format!("code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => String::new(),
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A duration in whole seconds (`1h 2m 3s`), or milliseconds under a second.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
}

/// The largest unit or two: `3s`, `5m 2s`, `2h 5m`, `3d 4h`.
pub fn short_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(250), "250ms");
        assert_eq!(duration(62_500), "1m 2s");
        assert_eq!(short_duration(3_725_000), "1h 2m");
        assert_eq!(tokens(12_345), "12.3k");
    }
}
