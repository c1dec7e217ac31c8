//! The figures of a chaos run, the invariants they are judged by, and their two forms:
//! human text and the JSON summary (the same data, for docs and scripts).

use std::collections::BTreeMap;

use agentq_core::JobRecord;
use agentq_testkit::faultproxy::Stats;
use serde::Serialize;

use crate::Settings;
use crate::checks::JobVerdict;
use crate::procs::Orphan;

/// One SIGKILL.
#[derive(Debug, Clone, Serialize)]
pub struct KillEvent {
    /// Seconds after the jobs were submitted.
    pub at_s: f64,
    pub role: String,
    pub pid: Option<u32>,
}

/// The numbers a run is judged by.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub jobs: usize,
    /// Jobs in a terminal state (SUCCEEDED, CANCELLED, DEAD) at the end of the calm phase.
    pub terminal: usize,
    /// State → jobs, at the end of the calm phase.
    pub states: BTreeMap<String, usize>,
    /// Jobs with two runs of their child alive at the same time.
    pub run_twice_at_once: usize,
    /// Jobs whose child ran more than once (in sequence or not).
    pub run_more_than_once: usize,
    /// Child runs seen in the marker files.
    pub child_runs: usize,
    /// Attempts the table records whose output or manifest is missing from S3.
    pub attempts_without_logs: usize,
    /// Attempts that ended (any status but crashed) without their `result.json`.
    pub attempts_without_manifest: usize,
    /// Attempts that lost more than one flush interval of output.
    pub attempts_losing_output: usize,
    /// Job children that went on for 1 s or more after their agent was killed.
    pub orphaned_children: usize,
    pub longest_orphan_ms: u64,
    /// Job processes still alive after every poller was stopped (argv or environment
    /// carries the run's marker).
    pub processes_left_at_end: usize,
    pub leftovers: Vec<(u32, String)>,
    /// Seconds from the last kill until every job was terminal; null when they never were.
    pub time_to_recover_s: Option<f64>,
    /// Not terminal, no live lease, no message naming it on the jobs queue or the DLQ,
    /// no retry due later: nothing will ever move it.
    pub stranded: usize,
    /// Messages still invisible after waiting out the agents' visibility horizon
    /// (jobs queue, DLQ).
    pub invisible_messages: BTreeMap<String, i64>,
    /// Jobs that ran a body other than the one submitted under their id.
    pub ran_foreign_body: usize,
    /// Child runs whose attempt number the table does not record.
    pub unrecorded_runs: usize,
    pub succeeded_without_artifact: usize,
    /// Stale leases taken over by an agent's claim.
    pub takeovers: usize,
    /// Re-plan decisions by action (retry, resume, dead, ...), over every job.
    pub decisions: BTreeMap<String, usize>,
    pub kills: BTreeMap<String, usize>,
    /// Job children seen by the process watcher.
    pub children_seen: usize,
}

impl Figures {
    #[allow(clippy::too_many_arguments)]
    pub fn from_verdicts(
        verdicts: &[JobVerdict],
        at_calm_end: &BTreeMap<String, JobRecord>,
        kills: &[KillEvent],
        orphans: Vec<Orphan>,
        leftovers: Vec<(u32, String)>,
        time_to_recover_s: Option<f64>,
        invisible_messages: BTreeMap<String, i64>,
        children_seen: usize,
    ) -> Self {
        let mut states = BTreeMap::new();
        let mut decisions = BTreeMap::new();
        for v in verdicts {
            let rec = at_calm_end.get(&v.job_id);
            let st = rec
                .map(|r| r.status.to_string())
                .unwrap_or_else(|| "MISSING".into());
            *states.entry(st).or_insert(0) += 1;
            for d in rec.map(|r| r.history.as_slice()).unwrap_or_default() {
                *decisions.entry(d.action.as_str().to_owned()).or_insert(0) += 1;
            }
        }
        let mut kill_count = BTreeMap::new();
        for k in kills {
            let role = if k.role.starts_with("poller") {
                "poller"
            } else {
                "dispatcher"
            };
            *kill_count.entry(role.to_owned()).or_insert(0) += 1;
        }
        Self {
            jobs: verdicts.len(),
            terminal: at_calm_end
                .values()
                .filter(|r| r.status.is_terminal())
                .count(),
            states,
            run_twice_at_once: verdicts.iter().filter(|v| !v.overlaps.is_empty()).count(),
            run_more_than_once: verdicts.iter().filter(|v| v.runs > 1).count(),
            child_runs: verdicts.iter().map(|v| v.runs).sum(),
            attempts_without_logs: verdicts.iter().map(|v| v.missing_logs.len()).sum(),
            attempts_without_manifest: verdicts.iter().map(|v| v.missing_manifest.len()).sum(),
            attempts_losing_output: verdicts.iter().map(|v| v.lost_output.len()).sum(),
            orphaned_children: orphans.len(),
            longest_orphan_ms: orphans.iter().map(|o| o.orphaned_ms).max().unwrap_or(0),
            processes_left_at_end: leftovers.len(),
            leftovers,
            time_to_recover_s,
            stranded: verdicts.iter().filter(|v| v.stranded).count(),
            invisible_messages,
            ran_foreign_body: verdicts.iter().filter(|v| v.foreign_runs > 0).count(),
            unrecorded_runs: verdicts.iter().map(|v| v.unrecorded_runs).sum(),
            succeeded_without_artifact: verdicts
                .iter()
                .filter(|v| v.succeeded_without_artifact)
                .count(),
            takeovers: verdicts.iter().map(|v| v.takeovers).sum(),
            decisions,
            kills: kill_count,
            children_seen,
        }
    }
}

/// One invariant and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    pub name: &'static str,
    pub holds: bool,
    pub detail: String,
}

impl Invariant {
    /// The invariants of issue 11: every job terminal, none run twice at once, logs for
    /// every attempt, no orphaned process, nothing stranded.
    pub fn judge(f: &Figures, jobs: usize) -> Vec<Invariant> {
        vec![
            Invariant {
                name: "every job terminal",
                holds: f.terminal == jobs,
                detail: format!("{} of {jobs}", f.terminal),
            },
            Invariant {
                name: "no job run twice at once",
                holds: f.run_twice_at_once == 0,
                detail: format!("{} jobs", f.run_twice_at_once),
            },
            Invariant {
                name: "logs for every attempt",
                holds: f.attempts_without_logs == 0,
                detail: format!("{} attempts without logs", f.attempts_without_logs),
            },
            Invariant {
                name: "no orphaned process",
                holds: f.orphaned_children == 0 && f.processes_left_at_end == 0,
                detail: format!(
                    "{} children outlived their agent by 1 s or more (longest {:.1} s); {} processes left at the end",
                    f.orphaned_children,
                    f.longest_orphan_ms as f64 / 1000.0,
                    f.processes_left_at_end
                ),
            },
            Invariant {
                name: "nothing stranded",
                holds: f.stranded == 0,
                detail: format!("{} jobs", f.stranded),
            },
        ]
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run: String,
    pub settings: Settings,
    pub passed: bool,
    pub invariants: Vec<Invariant>,
    pub figures: Figures,
    pub states_at_calm_end: BTreeMap<String, usize>,
    pub duplicates_sent: u32,
    pub calm_seconds_used: f64,
    pub total_seconds: f64,
    pub restarts: u32,
    pub unexpected_exits: Vec<String>,
    pub proxy: Stats,
    pub kills: Vec<KillEvent>,
    pub jobs: Vec<JobVerdict>,
    pub out_dir: String,
}

fn kv(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human form.
pub fn render(s: &Summary) -> String {
    let f = &s.figures;
    let st = &s.settings;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!(
        "agentq chaos run {}: {} jobs of {:.1} s, {} pollers x {}, {:.0} s of SIGKILL every {}-{} s, faults {:.0} %, seed {}",
        s.run,
        st.jobs,
        st.job_seconds,
        st.pollers,
        st.concurrency,
        st.chaos_seconds as f64,
        st.kill_min_seconds,
        st.kill_max_seconds,
        st.faults * 100.0,
        st.seed
    ));
    line(format!(
        "kills: {} ({}); restarts {}; duplicate/imposter messages sent {}; calm phase {:.0} s; total {:.0} s",
        s.kills.len(),
        kv(&f.kills),
        s.restarts,
        s.duplicates_sent,
        s.calm_seconds_used,
        s.total_seconds
    ));
    if s.proxy.total_requests() > 0 {
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for m in s.proxy.faults.values() {
            for (k, n) in m {
                *by_kind.entry(k.as_str().to_owned()).or_default() += *n as usize;
            }
        }
        line(format!(
            "fault proxy: {} requests, {} faults injected ({}), {} upstream errors",
            s.proxy.total_requests(),
            s.proxy.total_faults(),
            kv(&by_kind),
            s.proxy.upstream_errors
        ));
    }
    line(String::new());
    line(format!("{:<44} {}", "figure", "value"));
    let rows: Vec<(&str, String)> = vec![
        ("jobs terminal", format!("{} of {}", f.terminal, f.jobs)),
        ("states at the end of the calm phase", kv(&f.states)),
        ("jobs run twice at once", f.run_twice_at_once.to_string()),
        (
            "jobs run more than once (in sequence)",
            f.run_more_than_once.to_string(),
        ),
        ("attempts without logs", f.attempts_without_logs.to_string()),
        (
            "attempts ended without result.json",
            f.attempts_without_manifest.to_string(),
        ),
        (
            "attempts losing > 1 flush interval of output",
            f.attempts_losing_output.to_string(),
        ),
        (
            "children outliving their agent (>= 1 s)",
            format!(
                "{} (longest {:.1} s)",
                f.orphaned_children,
                f.longest_orphan_ms as f64 / 1000.0
            ),
        ),
        (
            "processes left after pollers stopped",
            f.processes_left_at_end.to_string(),
        ),
        (
            "time to recover (last kill -> all terminal)",
            f.time_to_recover_s
                .map(|t| format!("{t:.1} s"))
                .unwrap_or_else(|| "never (within the calm phase)".into()),
        ),
        ("stranded jobs", f.stranded.to_string()),
        (
            "messages still invisible (jobs, dlq)",
            format!(
                "{}, {}",
                f.invisible_messages.get("jobs").unwrap_or(&0),
                f.invisible_messages.get("dlq").unwrap_or(&0)
            ),
        ),
        (
            "jobs that ran an imposter body",
            f.ran_foreign_body.to_string(),
        ),
        (
            "child runs the table does not record",
            f.unrecorded_runs.to_string(),
        ),
        (
            "succeeded without artifact",
            f.succeeded_without_artifact.to_string(),
        ),
        ("stale-lease takeovers", f.takeovers.to_string()),
        ("re-plan decisions", kv(&f.decisions)),
    ];
    for (k, v) in rows {
        line(format!("{k:<44} {v}"));
    }
    line(String::new());
    for i in &s.invariants {
        line(format!(
            "{} {:<28} {}",
            if i.holds { "PASS" } else { "FAIL" },
            i.name,
            i.detail
        ));
    }
    let mut details = Vec::new();
    for j in &s.jobs {
        let mut why = Vec::new();
        if j.stranded {
            why.push(format!(
                "stranded in {}",
                j.state.map(|s| s.to_string()).unwrap_or_default()
            ));
        }
        for (a, b) in &j.overlaps {
            why.push(format!(
                "attempt {} (pid {}) and attempt {} (pid {}) overlapped",
                a.attempt, a.pid, b.attempt, b.pid
            ));
        }
        for m in &j.missing_logs {
            why.push(format!("attempt {}: {}", m.attempt, m.why));
        }
        for a in &j.missing_manifest {
            why.push(format!("attempt {a} ended without result.json"));
        }
        if !why.is_empty() {
            details.push(format!("  {}: {}", j.job_id, why.join("; ")));
        }
    }
    if !details.is_empty() {
        line(String::new());
        line("jobs with findings:".into());
        for d in details.iter().take(40) {
            line(d.clone());
        }
        if details.len() > 40 {
            line(format!("  ... {} more in summary.json", details.len() - 40));
        }
    }
    for e in &s.unexpected_exits {
        line(format!("note: {e}"));
    }
    line(String::new());
    line(format!(
        "{}; files (logs per process, markers, summary.json) in {}",
        if s.passed {
            "every invariant holds"
        } else {
            "INVARIANTS FAILED"
        },
        s.out_dir
    ));
    out
}
