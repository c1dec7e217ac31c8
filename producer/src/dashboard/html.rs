//! The dashboard's markup: every page and every live fragment is built here. A job's
//! content is untrusted (its id is validated, but labels, reasons, specs, log lines and
//! decisions come from the job or its agent), so every value from a record goes through
//! [`esc`]; numbers and fixed words are the only things written raw. The pages carry no
//! inline script or style, so the Content-Security-Policy can forbid both.

use std::fmt::{self, Write as _};

use agentq_core::record::{EpochMillis, rfc3339};
use agentq_core::state::ALL_STATES;
use agentq_core::{JobRecord, JobState};

use super::filter::{AGE_CHOICES, ListFilter};

/// HTML-escapes text for element content and quoted attribute values.
#[derive(Debug, Clone, Copy)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        for (i, c) in self.0.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(rep)?;
            last = i + 1;
        }
        f.write_str(&self.0[last..])
    }
}

/// Shorthand for [`Esc`].
pub fn esc(s: &str) -> Esc<'_> {
    Esc(s)
}

/// Which page the navigation marks as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Jobs,
    Failures,
    None,
}

/// The frame around every page.
pub fn layout(title: &str, nav: Nav, body: &str) -> String {
    let cur = |n: Nav| {
        if n == nav {
            r#" aria-current="page""#
        } else {
            ""
        }
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · agentq</title><link rel="icon" href="/assets/icon.svg" type="image/svg+xml"><link rel="stylesheet" href="/assets/style.css"><script src="/assets/app.js" defer></script></head>
<body><header class="top"><a class="brand" href="/">agentq</a><nav><a href="/"{}>Jobs</a><a href="/failures"{}>Failures &amp; DLQ</a></nav><span id="conn" class="conn" title="live updates">●</span></header>
<main>{body}</main></body></html>
"#,
        esc(title),
        cur(Nav::Jobs),
        cur(Nav::Failures),
    )
}

/// An error page (the message is escaped).
pub fn error_page(status: u16, message: &str) -> String {
    layout(
        "error",
        Nav::None,
        &format!(
            r#"<h1>Error {status}</h1><p class="error">{}</p><p><a href="/">Back to the jobs</a></p>"#,
            esc(message)
        ),
    )
}

/// A timestamp: absolute in the markup, made relative ("3m ago") by the page script.
pub fn time(ms: EpochMillis) -> String {
    let t = rfc3339(ms);
    format!(r#"<time datetime="{t}" data-ms="{ms}" title="{t}">{t}</time>"#)
}

fn opt_time(ms: Option<EpochMillis>) -> String {
    ms.map(time).unwrap_or_else(|| "–".into())
}

/// `1.2s`, `3m04s`, `2h05m`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 10_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn state_badge(s: JobState) -> String {
    format!(
        r#"<span class="state s-{}">{}</span>"#,
        s.as_str().to_ascii_lowercase(),
        s.as_str()
    )
}

fn cost(v: f64) -> String {
    if v == 0.0 {
        "–".into()
    } else {
        format!("${v:.4}")
    }
}

fn labels(rec: &JobRecord) -> String {
    let mut s = String::new();
    for (k, v) in &rec.labels {
        let _ = write!(
            s,
            r#"<span class="label"><span class="k">{}</span>=<span class="v">{}</span></span> "#,
            esc(k),
            esc(v)
        );
    }
    s
}

/// The agent preset from the stored spec.
fn agent_of(rec: &JobRecord) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        agent: Option<String>,
    }
    let spec = rec.spec.as_deref()?;
    serde_json::from_str::<Head>(spec).ok()?.agent
}

/// What the last column of the jobs table says: why it ended, or what it is doing.
fn note(rec: &JobRecord) -> String {
    if rec.cancel_requested && !rec.status.is_finished() {
        return "cancel requested".into();
    }
    match (&rec.reason, &rec.progress.last_event) {
        (Some(r), _) if rec.status.is_finished() || rec.status != JobState::Running => {
            match &rec.cause {
                Some(c) => format!("{}: {}", esc(c), esc(r)),
                None => esc(r).to_string(),
            }
        }
        (_, Some(e)) if rec.status == JobState::Running => format!("last event {}", esc(e)),
        _ => String::new(),
    }
}

/// The list page: filter form and the live table.
pub fn jobs_page(filter: &ListFilter, table: &str, refresh_ms: u128) -> String {
    let mut f = String::new();
    f.push_str(r#"<form class="filters" method="get" action="/"><fieldset><legend>State</legend>"#);
    for s in ALL_STATES {
        let checked = if filter.states.contains(&s) {
            " checked"
        } else {
            ""
        };
        let _ = write!(
            f,
            r#"<label><input type="checkbox" name="state" value="{0}"{checked}> {0}</label>"#,
            s.as_str()
        );
    }
    f.push_str("</fieldset>");
    let _ = write!(
        f,
        r#"<label>Label <input name="label" placeholder="key=value or key" value="{}" size="18"></label>"#,
        esc(filter.label_text().as_deref().unwrap_or(""))
    );
    f.push_str(r#"<label>Changed within <select name="age"><option value="">any time</option>"#);
    for (text, _) in AGE_CHOICES {
        let sel = if filter.age_text.as_deref() == Some(*text) {
            " selected"
        } else {
            ""
        };
        let _ = write!(f, r#"<option value="{text}"{sel}>{text}</option>"#);
    }
    f.push_str("</select></label>");
    let _ = write!(
        f,
        r#"<label>Show <input name="limit" type="number" min="1" max="{}" value="{}" size="4"></label><button type="submit">Filter</button> <a href="/">clear</a></form>"#,
        super::filter::MAX_LIMIT,
        filter.limit
    );
    layout(
        "jobs",
        Nav::Jobs,
        &format!(
            r#"<h1>Jobs</h1>{f}<div id="live" data-fragment="/fragments/jobs" data-refresh="{refresh_ms}">{table}</div>"#
        ),
    )
}

/// The jobs table (the live fragment of the list page).
pub fn jobs_table(rows: &[JobRecord], filter: &ListFilter, scanned: usize) -> String {
    let mut s = String::from(
        r#"<table class="jobs"><thead><tr><th>Job</th><th>State</th><th>Agent</th><th>Attempt</th><th>Labels</th><th>Created</th><th>Changed</th><th class="num">Turns</th><th class="num">Cost</th><th>Note</th></tr></thead><tbody>"#,
    );
    for r in rows {
        let id = r.job_id.as_str();
        let _ = write!(
            s,
            r#"<tr data-job="{id}"><td><a href="/jobs/{id}">{id}</a></td><td>{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="note">{}</td></tr>"#,
            state_badge(r.status),
            esc(agent_of(r).as_deref().unwrap_or("–")),
            r.attempt,
            labels(r),
            time(r.created_at),
            time(r.updated_at),
            r.progress.turns,
            cost(r.cost_usd.max(r.progress.cost_usd)),
            note(r),
        );
    }
    if rows.is_empty() {
        s.push_str(r#"<tr><td colspan="10" class="empty">no jobs match</td></tr>"#);
    }
    s.push_str("</tbody></table>");
    let _ = write!(
        s,
        r#"<p class="meta">{} shown{}.</p>"#,
        rows.len(),
        if filter.narrows() {
            format!(
                " (label and time filters look at the {scanned} most recently changed jobs of the chosen states)"
            )
        } else {
            String::new()
        }
    );
    s
}

/// What a cancel did, shown once on the job page after the redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelNotice {
    Cancelled,
    Flagged,
    AlreadyFinished,
}

impl CancelNotice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Flagged => "flagged",
            Self::AlreadyFinished => "finished",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Cancelled, Self::Flagged, Self::AlreadyFinished]
            .into_iter()
            .find(|n| n.as_str() == s)
    }

    fn text(self) -> &'static str {
        match self {
            Self::Cancelled => "Cancelled: the job had not started and will never run.",
            Self::Flagged => {
                "Cancel requested: the agent stops the job at its next heartbeat, then it ends CANCELLED."
            }
            Self::AlreadyFinished => "The job had already finished; nothing was changed.",
        }
    }
}

/// A job's page: the live summary and the log tail panes.
pub fn job_page(rec: &JobRecord, summary: &str, notice: Option<CancelNotice>) -> String {
    let id = rec.job_id.as_str();
    let notice = notice
        .map(|n| format!(r#"<p class="notice" role="status">{}</p>"#, n.text()))
        .unwrap_or_default();
    let mut tabs = String::new();
    let mut panes = String::new();
    for (i, st) in ["stdout", "stderr", "events"].iter().enumerate() {
        let sel = if i == 0 { "true" } else { "false" };
        let hidden = if i == 0 { "" } else { " hidden" };
        let _ = write!(
            tabs,
            r#"<button type="button" role="tab" data-tab="{st}" aria-selected="{sel}">{st} <span class="count" id="count-{st}">0</span></button>"#
        );
        let _ = write!(
            panes,
            r#"<pre class="log" id="log-{st}" role="tabpanel" data-stream="{st}"{hidden}></pre>"#
        );
    }
    let spec = rec
        .spec
        .as_deref()
        .map(|s| {
            let pretty = serde_json::from_str::<serde_json::Value>(s)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| s.to_owned());
            format!(
                r#"<details class="spec"><summary>Spec</summary><pre>{}</pre></details>"#,
                esc(&pretty)
            )
        })
        .unwrap_or_default();
    layout(
        id,
        Nav::None,
        &format!(
            r#"<h1 class="job-title">Job <span class="id">{id}</span></h1>{notice}
<div id="summary" data-job="{id}" data-live="/jobs/{id}/live">{summary}</div>
{spec}
<section class="logs"><h2>Logs <span class="live-note" id="log-note"></span></h2><div class="tabs" role="tablist">{tabs}</div>{panes}</section>"#
        ),
    )
}

/// The live part of a job's page: state, cancel, progress, chart, attempts, decisions.
pub fn job_summary(rec: &JobRecord, chart_svg: &str, token: &str, now: EpochMillis) -> String {
    let id = rec.job_id.as_str();
    let mut s = String::new();
    let _ = write!(s, r#"<div class="head">{}"#, state_badge(rec.status));
    if rec.cancel_requested && !rec.status.is_finished() {
        s.push_str(r#" <span class="flag">cancel requested</span>"#);
    }
    if !rec.status.is_finished() && !rec.cancel_requested {
        let _ = write!(
            s,
            r#"<form class="cancel" method="post" action="/jobs/{id}/cancel"><input type="hidden" name="token" value="{}"><button type="submit" class="danger" id="cancel">Cancel job</button></form>"#,
            esc(token)
        );
    }
    s.push_str("</div>");

    let p = &rec.progress;
    let running_for = rec
        .current_attempt()
        .map(|a| a.started_at)
        .or(rec.started_at)
        .map(|st| duration(rec.finished_at.unwrap_or(now) - st));
    let heartbeat = opt_time(rec.heartbeat_at);
    let mut facts: Vec<(&str, String)> = vec![
        (
            "agent",
            esc(agent_of(rec).as_deref().unwrap_or("–")).to_string(),
        ),
        (
            "attempt",
            format!("{} (segment {})", rec.attempt, rec.segment),
        ),
        ("created", time(rec.created_at)),
        ("started", opt_time(rec.started_at)),
        ("finished", opt_time(rec.finished_at)),
        ("running for", running_for.unwrap_or_else(|| "–".into())),
        ("heartbeat", heartbeat),
        (
            "lease owner",
            esc(rec.lease_owner.as_deref().unwrap_or("–")).to_string(),
        ),
        ("turns", p.turns.to_string()),
        (
            "tokens",
            format!("{} in / {} out", p.input_tokens, p.output_tokens),
        ),
        ("cost (this attempt)", cost(p.cost_usd)),
        ("cost (all attempts)", cost(rec.cost_usd)),
        ("run time (all attempts)", duration(rec.runtime_ms as i64)),
        (
            "last event",
            esc(p.last_event.as_deref().unwrap_or("–")).to_string(),
        ),
        (
            "session",
            esc(p.session_id.as_deref().unwrap_or("–")).to_string(),
        ),
        (
            "output",
            format!(
                "{} B stdout, {} B stderr, {} events",
                p.stdout_bytes, p.stderr_bytes, p.events
            ),
        ),
    ];
    if let Some(c) = &rec.cause {
        facts.push(("cause", esc(c).to_string()));
    }
    if let Some(r) = &rec.reason {
        facts.push(("reason", esc(r).to_string()));
    }
    if let Some(c) = rec.exit_code {
        facts.push(("exit code", c.to_string()));
    }
    if let Some(sig) = rec.signal {
        facts.push(("signal", sig.to_string()));
    }
    if let Some(t) = &rec.tier {
        facts.push(("tier", esc(t).to_string()));
    }
    if !rec.labels.is_empty() {
        facts.push(("labels", labels(rec)));
    }
    s.push_str(r#"<dl class="facts">"#);
    for (k, v) in facts {
        let _ = write!(s, "<div><dt>{k}</dt><dd>{v}</dd></div>");
    }
    s.push_str("</dl>");

    let _ = write!(
        s,
        r#"<section class="chart-box"><h2>Turns, tokens and cost over time</h2>{chart_svg}</section>"#
    );

    s.push_str(r#"<section><h2>Attempts</h2><table class="attempts"><thead><tr><th>#</th><th>Segment</th><th>Started</th><th>Finished</th><th>Took</th><th>State</th><th>Cause</th><th>Reason</th><th>Exit</th><th>Owner</th><th>Logs</th></tr></thead><tbody>"#);
    let mut attempts: Vec<(u32, &agentq_core::record::AttemptRecord)> = rec
        .attempts
        .iter()
        .filter_map(|(n, a)| Some((n.parse().ok()?, a)))
        .collect();
    attempts.sort_by_key(|(n, _)| *n);
    for (n, a) in &attempts {
        let took = duration(a.finished_at.unwrap_or(now) - a.started_at);
        let logs: String = ["stdout", "stderr", "events"]
            .iter()
            .map(|st| format!(r#"<a href="/jobs/{id}/logs/{n}/{st}">{st}</a>"#))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = write!(
            s,
            r#"<tr><td>{n}</td><td>{}</td><td>{}</td><td>{}</td><td>{took}</td><td>{}</td><td>{}</td><td class="note">{}</td><td>{}</td><td>{}</td><td>{logs}</td></tr>"#,
            a.segment,
            time(a.started_at),
            opt_time(a.finished_at),
            a.status.map(state_badge).unwrap_or_else(|| "–".into()),
            esc(a.cause.as_deref().unwrap_or("–")),
            esc(a.reason.as_deref().unwrap_or("")),
            match (a.exit_code, a.signal) {
                (Some(c), _) => c.to_string(),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "–".into(),
            },
            esc(a.owner.as_deref().unwrap_or("–")),
        );
    }
    if attempts.is_empty() {
        s.push_str(r#"<tr><td colspan="11" class="empty">not started yet</td></tr>"#);
    }
    s.push_str("</tbody></table></section>");

    s.push_str(r#"<section><h2>Decisions</h2><table class="history"><thead><tr><th>When</th><th>Action</th><th>By</th><th>Attempt</th><th>Cause</th><th>Reason</th><th>Delay</th><th>Queue</th></tr></thead><tbody>"#);
    for d in &rec.history {
        let _ = write!(
            s,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="note">{}</td><td>{}</td><td>{}</td></tr>"#,
            time(d.at),
            esc(d.action.as_str()),
            esc(&d.by),
            d.attempt,
            esc(d.cause.as_deref().unwrap_or("–")),
            esc(&d.reason),
            d.delay_seconds
                .map(|v| format!("{v}s"))
                .unwrap_or_else(|| "–".into()),
            esc(d.queue.as_deref().unwrap_or("–")),
        );
    }
    if rec.history.is_empty() {
        s.push_str(r#"<tr><td colspan="8" class="empty">no decisions</td></tr>"#);
    }
    s.push_str("</tbody></table></section>");
    s
}

/// Depths of one queue (`GetQueueAttributes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// `jobs` or `dlq`.
    pub key: &'static str,
    pub url: String,
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

/// The failures page: queue depths, jobs waiting for a re-plan, DEAD jobs.
pub fn failures_page(fragment: &str, refresh_ms: u128) -> String {
    layout(
        "failures",
        Nav::Failures,
        &format!(
            r#"<h1>Failures &amp; dead-letter queue</h1>
<p class="meta">The DLQ is not read here: receiving a message, even to peek, hides it from the dispatcher and counts as a receive. Its depth comes from GetQueueAttributes; every failure it carries is also in the jobs table, shown below with its reason.</p>
<div id="live" data-fragment="/fragments/failures" data-refresh="{refresh_ms}">{fragment}</div>"#
        ),
    )
}

/// The live part of the failures page.
pub fn failures_fragment(
    depths: &[Result<QueueDepth, String>],
    waiting: &[JobRecord],
    dead: &[JobRecord],
    limit: usize,
) -> String {
    let mut s = String::from(r#"<section><h2>Queues</h2><div class="depths">"#);
    for d in depths {
        match d {
            Ok(d) => {
                let title = match d.key {
                    "dlq" => "Dead-letter queue",
                    _ => "Jobs queue",
                };
                let _ = write!(
                    s,
                    r#"<div class="depth" data-queue="{}"><h3>{title}</h3><p><span class="big">{}</span> waiting</p><p>{} in flight · {} delayed</p><p class="url">{}</p></div>"#,
                    d.key,
                    d.visible,
                    d.in_flight,
                    d.delayed,
                    esc(&d.url)
                );
            }
            Err(e) => {
                let _ = write!(s, r#"<div class="depth error">{}</div>"#, esc(e));
            }
        }
    }
    s.push_str("</div></section>");
    let table = |title: &str, id: &str, rows: &[JobRecord], empty: &str| {
        let mut t = format!(
            r#"<section><h2>{title}</h2><table class="jobs" id="{id}"><thead><tr><th>Job</th><th>State</th><th>Attempts</th><th>Finished</th><th>Cause</th><th>Reason</th><th>Last decision</th><th class="num">Cost</th></tr></thead><tbody>"#
        );
        for r in rows {
            let rid = r.job_id.as_str();
            let last = r
                .history
                .last()
                .map(|d| {
                    format!(
                        "{} by {}: {}",
                        esc(d.action.as_str()),
                        esc(&d.by),
                        esc(&d.reason)
                    )
                })
                .unwrap_or_else(|| "–".into());
            let _ = write!(
                t,
                r#"<tr data-job="{rid}"><td><a href="/jobs/{rid}">{rid}</a></td><td>{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td class="note">{}</td><td class="note">{last}</td><td class="num">{}</td></tr>"#,
                state_badge(r.status),
                r.attempt,
                opt_time(r.finished_at),
                esc(r.cause.as_deref().unwrap_or("–")),
                esc(r.reason.as_deref().unwrap_or("")),
                cost(r.cost_usd),
            );
        }
        if rows.is_empty() {
            let _ = write!(t, r#"<tr><td colspan="8" class="empty">{empty}</td></tr>"#);
        }
        t.push_str("</tbody></table>");
        if rows.len() >= limit {
            let _ = write!(t, r#"<p class="meta">the {limit} most recent shown</p>"#);
        }
        t.push_str("</section>");
        t
    };
    s.push_str(&table(
        "Waiting for the dispatcher (FAILED, TIMED_OUT)",
        "waiting",
        waiting,
        "none",
    ));
    s.push_str(&table("DEAD", "dead", dead, "no dead jobs"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentq_core::JobId;

    const HOSTILE: &str = r#"<img src=x onerror="alert(1)">'&</script>"#;

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            esc(HOSTILE).to_string(),
            "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&#39;&amp;&lt;/script&gt;"
        );
        assert_eq!(esc("plain ü").to_string(), "plain ü");
    }

    #[test]
    fn job_text_is_escaped_everywhere() {
        let mut rec = JobRecord::new(JobId::parse("j-1").unwrap(), JobState::Dead, 1_000);
        rec.labels.insert(HOSTILE.into(), HOSTILE.into());
        rec.reason = Some(HOSTILE.into());
        rec.cause = Some(HOSTILE.into());
        rec.lease_owner = Some(HOSTILE.into());
        rec.progress.last_event = Some(HOSTILE.into());
        rec.progress.session_id = Some(HOSTILE.into());
        rec.spec = Some(format!(r#"{{"agent":{}}}"#, serde_json::json!(HOSTILE)));
        rec.history.push(agentq_core::Decision {
            action: agentq_core::Action::Retry,
            by: HOSTILE.into(),
            reason: HOSTILE.into(),
            cause: Some(HOSTILE.into()),
            queue: Some(HOSTILE.into()),
            ..Default::default()
        });
        rec.attempts.insert(
            "1".into(),
            agentq_core::record::AttemptRecord {
                reason: Some(HOSTILE.into()),
                cause: Some(HOSTILE.into()),
                owner: Some(HOSTILE.into()),
                ..Default::default()
            },
        );
        let filter = ListFilter::default();
        let pages = [
            jobs_table(std::slice::from_ref(&rec), &filter, 1),
            job_page(&rec, &job_summary(&rec, "", "tok", 2_000), None),
            failures_fragment(
                &[Err(HOSTILE.into())],
                std::slice::from_ref(&rec),
                std::slice::from_ref(&rec),
                10,
            ),
            error_page(400, HOSTILE),
        ];
        for p in pages {
            assert!(!p.contains("<img"), "{p}");
            // Only the page's own script tag (in the head) closes a script.
            assert!(p.matches("</script>").count() <= 1, "{p}");
            assert!(p.contains("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"));
        }
    }

    #[test]
    fn cancel_button_only_while_cancellable() {
        let mut rec = JobRecord::new(JobId::parse("j-1").unwrap(), JobState::Running, 1_000);
        assert!(job_summary(&rec, "", "tok", 2_000).contains(r#"name="token" value="tok""#));
        rec.cancel_requested = true;
        let s = job_summary(&rec, "", "tok", 2_000);
        assert!(!s.contains("<form") && s.contains("cancel requested"));
        rec.status = JobState::Succeeded;
        assert!(!job_summary(&rec, "", "tok", 2_000).contains("<form"));
    }
}
