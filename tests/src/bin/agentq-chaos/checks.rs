//! The invariants of a chaos run, judged from what the run left behind: the marker file
//! each job child appends to (start, a tick every interval, end; with its pid, attempt and
//! body tag), the job records, the S3 keys and log segments of every attempt, and the
//! messages still on the queues. Pure functions over that evidence, unit-tested below.

use std::collections::{BTreeMap, BTreeSet};

use agentq_core::{JobRecord, JobState};
use serde::Serialize;

/// One run of a job's child, from its marker lines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub attempt: u32,
    pub pid: u32,
    pub body: String,
    /// Epoch ms of the start line and of the last line written.
    pub start_ms: i64,
    pub last_ms: i64,
    pub ticks: u32,
    /// The end line was written: the child ran to completion.
    pub completed: bool,
}

impl Run {
    pub fn overlaps(&self, other: &Run) -> bool {
        self.start_ms < other.last_ms && other.start_ms < self.last_ms
    }
}

/// Parses a marker file: `start|tick|end EPOCH_MS PID ATTEMPT BODY` per line, in any
/// interleaving of runs. Unparseable lines (a torn write of a killed child) are skipped.
pub fn parse_marks(text: &str) -> Vec<Run> {
    let mut runs: BTreeMap<(u32, u32), Run> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [kind, ms, pid, attempt, body] = f[..] else {
            continue;
        };
        let (Ok(ms), Ok(pid), Ok(attempt)) = (
            ms.parse::<i64>(),
            pid.parse::<u32>(),
            attempt.parse::<u32>(),
        ) else {
            continue;
        };
        let r = runs.entry((attempt, pid)).or_insert_with(|| Run {
            attempt,
            pid,
            body: body.to_owned(),
            start_ms: ms,
            last_ms: ms,
            ticks: 0,
            completed: false,
        });
        r.start_ms = r.start_ms.min(ms);
        r.last_ms = r.last_ms.max(ms);
        match kind {
            "tick" => r.ticks += 1,
            "end" => r.completed = true,
            _ => {}
        }
    }
    let mut v: Vec<Run> = runs.into_values().collect();
    v.sort_by_key(|r| r.start_ms);
    v
}

/// Pairs of runs of one job that were alive at the same time.
pub fn overlapping(runs: &[Run]) -> Vec<(Run, Run)> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.overlaps(b) {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

/// What S3 holds for one attempt.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AttemptObjects {
    pub result: bool,
    pub stdout_segments: u32,
    pub artifact: bool,
    /// `tick` lines found in the uploaded stdout.
    pub stdout_ticks: u32,
}

/// Timing the judgement depends on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub tick_ms: u64,
    pub flush_ms: u64,
    /// The agents' stale-lease limit.
    pub stale_after_ms: i64,
}

/// An attempt whose logs are missing, and why that counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissingLogs {
    pub attempt: u32,
    pub why: String,
}

/// An attempt that lost more of its output than one flush interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostOutput {
    pub attempt: u32,
    pub printed_ticks: u32,
    pub uploaded_ticks: u32,
}

/// Everything judged about one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobVerdict {
    pub job_id: String,
    pub state: Option<JobState>,
    pub attempts: u32,
    pub runs: usize,
    pub overlaps: Vec<(Run, Run)>,
    pub missing_logs: Vec<MissingLogs>,
    /// Attempts that ended (not crashed) without a `result.json`.
    pub missing_manifest: Vec<u32>,
    pub lost_output: Vec<LostOutput>,
    /// Runs of a body other than the one submitted under this id.
    pub foreign_runs: usize,
    /// Child runs whose attempt the record does not know.
    pub unrecorded_runs: usize,
    pub stranded: bool,
    pub succeeded_without_artifact: bool,
    pub takeovers: usize,
}

/// What is known about one job at the end of a run.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    pub job_id: &'a str,
    /// The body tag the job was submitted with.
    pub submitted_body: &'a str,
    pub record: Option<&'a JobRecord>,
    /// Its child's runs, from the marker file.
    pub runs: &'a [Run],
    /// What S3 holds, by attempt.
    pub objects: &'a BTreeMap<u32, AttemptObjects>,
    /// A message naming the job is visible on the jobs queue or the DLQ.
    pub queued: bool,
    /// When the evidence was read, epoch ms.
    pub now_ms: i64,
}

/// Judges one job.
pub fn judge(e: Evidence<'_>, t: Timing) -> JobVerdict {
    let Evidence {
        job_id,
        submitted_body,
        record,
        runs,
        objects,
        queued,
        now_ms,
    } = e;
    let recorded: BTreeSet<u32> = record
        .map(|r| r.attempts.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    let mut missing_logs = Vec::new();
    let mut missing_manifest = Vec::new();
    let mut lost_output = Vec::new();
    // A run shorter than this may legitimately have uploaded nothing: it was killed
    // before its first flush.
    let long_enough_ms = (t.flush_ms + 1000) as i64;
    for &a in &recorded {
        let Some(att) = record.and_then(|r| r.attempts.get(&a.to_string())) else {
            continue;
        };
        let o = objects.get(&a).cloned().unwrap_or_default();
        let printed: u32 = runs
            .iter()
            .filter(|r| r.attempt == a)
            .map(|r| r.ticks)
            .sum();
        let longest = runs
            .iter()
            .filter(|r| r.attempt == a)
            .map(|r| r.last_ms - r.start_ms)
            .max();
        let crashed = att.cause.as_deref() == Some("crashed");
        let finished = att.status.is_some() && !crashed;
        if finished && !o.result {
            missing_manifest.push(a);
        }
        if o.stdout_segments == 0
            && printed > 0
            && (finished || longest.unwrap_or(0) >= long_enough_ms)
        {
            missing_logs.push(MissingLogs {
                attempt: a,
                why: format!(
                    "its child printed {printed} lines over {} ms; no stdout segment reached S3",
                    longest.unwrap_or(0)
                ),
            });
        }
        // One flush interval of output (plus the line being printed) may be lost on a
        // hard kill; more than that is reported.
        let allowed = (t.flush_ms / t.tick_ms.max(1)) as u32 + 1;
        if printed > o.stdout_ticks + allowed {
            lost_output.push(LostOutput {
                attempt: a,
                printed_ticks: printed,
                uploaded_ticks: o.stdout_ticks,
            });
        }
    }
    let state = record.map(|r| r.status);
    let live_lease = record.is_some_and(|r| {
        r.status == JobState::Running
            && now_ms - r.heartbeat_at.unwrap_or(r.updated_at) < t.stale_after_ms
    });
    let scheduled_later = record.is_some_and(|r| {
        matches!(r.status, JobState::RetryScheduled | JobState::Resuming)
            && r.history
                .last()
                .is_some_and(|d| d.at + d.delay_seconds.unwrap_or(0) as i64 * 1000 > now_ms)
    });
    let terminal = state.is_some_and(JobState::is_terminal);
    let stranded = !terminal && !live_lease && !queued && !scheduled_later;
    let succeeded_without_artifact = state == Some(JobState::Succeeded)
        && !record
            .map(|r| r.attempt.get())
            .and_then(|a| objects.get(&a))
            .is_some_and(|o| o.artifact);
    JobVerdict {
        job_id: job_id.to_owned(),
        state,
        attempts: record.map(|r| r.attempt.get()).unwrap_or(0),
        runs: runs.len(),
        overlaps: overlapping(runs),
        missing_logs,
        missing_manifest,
        lost_output,
        foreign_runs: runs.iter().filter(|r| r.body != submitted_body).count(),
        unrecorded_runs: runs
            .iter()
            .filter(|r| !recorded.contains(&r.attempt))
            .count(),
        stranded,
        succeeded_without_artifact,
        takeovers: record
            .map(|r| r.history.iter().filter(|d| d.action == "takeover").count())
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentq_core::record::{AttemptRecord, Decision};
    use agentq_core::{Attempt, JobId};

    const T: Timing = Timing {
        tick_ms: 200,
        flush_ms: 1000,
        stale_after_ms: 4000,
    };

    #[test]
    fn marker_lines_become_runs_and_overlaps_are_found() {
        let text = "start 1000 11 1 orig\ntick 1000 11 1 orig\nstart 1100 22 2 orig\n\
                    tick 1200 11 1 orig\ntick 1300 22 2 orig\nend 1400 22 2 orig\ntick 12\n\
                    start 5000 33 3 orig\nend 5100 33 3 orig\n";
        let runs = parse_marks(text);
        assert_eq!(runs.len(), 3);
        assert_eq!(
            (runs[0].pid, runs[0].start_ms, runs[0].last_ms),
            (11, 1000, 1200)
        );
        assert!(!runs[0].completed && runs[1].completed);
        assert_eq!(runs[0].ticks, 2);
        let o = overlapping(&runs);
        assert_eq!(o.len(), 1);
        assert_eq!((o[0].0.pid, o[0].1.pid), (11, 22));
        // Back to back is not at once.
        let runs = parse_marks("start 0 1 1 a\nend 100 1 1 a\nstart 100 2 2 a\nend 200 2 2 a\n");
        assert!(overlapping(&runs).is_empty());
    }

    fn record(status: JobState, attempts: &[(u32, Option<JobState>, Option<&str>)]) -> JobRecord {
        let mut r = JobRecord::new(JobId::parse("j").unwrap(), status, 0);
        for (a, s, cause) in attempts {
            r.attempts.insert(
                a.to_string(),
                AttemptRecord {
                    status: *s,
                    cause: cause.map(str::to_owned),
                    ..Default::default()
                },
            );
            r.attempt = Attempt(*a);
        }
        r
    }

    fn ev<'a>(
        record: Option<&'a JobRecord>,
        runs: &'a [Run],
        objects: &'a BTreeMap<u32, AttemptObjects>,
        queued: bool,
        now_ms: i64,
    ) -> Evidence<'a> {
        Evidence {
            job_id: "j",
            submitted_body: "orig",
            record,
            runs,
            objects,
            queued,
            now_ms,
        }
    }

    fn run(attempt: u32, start: i64, last: i64, ticks: u32) -> Run {
        Run {
            attempt,
            pid: attempt * 10,
            body: "orig".into(),
            start_ms: start,
            last_ms: last,
            ticks,
            completed: false,
        }
    }

    #[test]
    fn logs_are_required_where_output_had_time_to_be_uploaded() {
        let rec = record(
            JobState::Succeeded,
            &[
                (1, Some(JobState::Failed), Some("crashed")),
                (2, Some(JobState::Failed), Some("crashed")),
                (3, Some(JobState::Succeeded), None),
            ],
        );
        // Attempt 1 was killed after 0.5 s (nothing uploaded is fine); attempt 2 printed
        // for 2.5 s and uploaded nothing; attempt 3 finished with its logs but left no
        // result.json.
        let runs = vec![
            run(1, 0, 500, 2),
            run(2, 1000, 3500, 12),
            run(3, 4000, 6000, 10),
        ];
        let mut objects = BTreeMap::new();
        objects.insert(
            3,
            AttemptObjects {
                result: false,
                stdout_segments: 2,
                artifact: true,
                stdout_ticks: 10,
            },
        );
        let v = judge(ev(Some(&rec), &runs, &objects, false, 10_000), T);
        let missing: Vec<u32> = v.missing_logs.iter().map(|m| m.attempt).collect();
        assert_eq!(missing, vec![2], "{v:?}");
        assert_eq!(v.missing_manifest, vec![3]);
        assert_eq!(v.lost_output.len(), 1);
        assert_eq!(v.lost_output[0].attempt, 2);
        assert!(!v.stranded);
        assert!(v.overlaps.is_empty());
        assert!(!v.succeeded_without_artifact);
    }

    #[test]
    fn stranded_means_not_terminal_with_nothing_that_will_move_it() {
        let mut rec = record(JobState::Running, &[(1, None, None)]);
        rec.heartbeat_at = Some(9_000);
        let none = BTreeMap::new();
        // Live lease.
        assert!(!judge(ev(Some(&rec), &[], &none, false, 10_000), T).stranded);
        // Stale lease, no message anywhere.
        assert!(judge(ev(Some(&rec), &[], &none, false, 20_000), T).stranded);
        // Stale lease, but a message will bring it back.
        assert!(!judge(ev(Some(&rec), &[], &none, true, 20_000), T).stranded);
        // A retry due later.
        let mut rec = record(JobState::RetryScheduled, &[(1, None, None)]);
        rec.history.push(Decision {
            at: 15_000,
            action: agentq_core::Action::Retry,
            delay_seconds: Some(10),
            ..Default::default()
        });
        assert!(!judge(ev(Some(&rec), &[], &none, false, 20_000), T).stranded);
        assert!(judge(ev(Some(&rec), &[], &none, false, 30_000), T).stranded);
        // Terminal is never stranded; a foreign body is counted.
        let rec = record(JobState::Dead, &[(1, None, None)]);
        let mut foreign = run(1, 0, 10, 0);
        foreign.body = "imposter".into();
        let v = judge(ev(Some(&rec), &[foreign], &none, false, 30_000), T);
        assert!(!v.stranded);
        assert_eq!(v.foreign_runs, 1);
    }
}
