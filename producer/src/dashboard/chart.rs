//! Cost, turns and tokens over time: folds the agent CLI's events stream (Claude Code
//! `stream-json`, Codex `--json`) into cumulative [`Usage`] points and draws them as an
//! inline SVG (three small step charts sharing one time axis), server-side.
//!
//! The fold follows the agent's own progress parser rule for rule (Claude `assistant`
//! adds a turn and its usage, `result` sets the session's totals and cost; Codex
//! `turn.completed` adds a turn and its usage), so the chart ends where the job record's
//! progress does. Events carry no timestamps: a point is placed at the upload time of the
//! segment that carried it, so the time resolution is the agent's log flush interval.
//! Attempts add up: a later attempt's values start from the totals of the ones before it,
//! as the record's `cost_usd` does.

use std::fmt::Write as _;

use agentq_core::record::EpochMillis;
use serde_json::Value;

/// Usage of one attempt (or cumulative over attempts).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub turns: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    fn plus(&self, o: &Usage) -> Usage {
        Usage {
            turns: self.turns + o.turns,
            input_tokens: self.input_tokens + o.input_tokens,
            output_tokens: self.output_tokens + o.output_tokens,
            cost_usd: self.cost_usd + o.cost_usd,
        }
    }

    /// Folds one event line; returns whether it changed anything.
    pub fn observe(&mut self, line: &[u8]) -> bool {
        let trimmed = line.trim_ascii();
        if trimmed.first() != Some(&b'{') {
            return false;
        }
        let Ok(v) = serde_json::from_slice::<Value>(trimmed) else {
            return false;
        };
        let before = *self;
        let n = |u: &Value, key: &str| u.get(key).and_then(Value::as_u64).unwrap_or(0);
        match v.get("type").and_then(Value::as_str) {
            Some("assistant") => {
                self.turns += 1;
                if let Some(u) = v.pointer("/message/usage") {
                    self.input_tokens += n(u, "input_tokens");
                    self.output_tokens += n(u, "output_tokens");
                }
            }
            Some("result") => {
                if let Some(c) = v.get("total_cost_usd").and_then(Value::as_f64) {
                    self.cost_usd = c;
                }
                if let Some(t) = v.get("num_turns").and_then(Value::as_u64) {
                    self.turns = t;
                }
                if let Some(u) = v.get("usage") {
                    self.input_tokens = self.input_tokens.max(n(u, "input_tokens"));
                    self.output_tokens = self.output_tokens.max(n(u, "output_tokens"));
                }
            }
            Some("turn.completed") => {
                self.turns += 1;
                if let Some(u) = v.get("usage") {
                    self.input_tokens += n(u, "input_tokens");
                    self.output_tokens += n(u, "output_tokens");
                }
            }
            _ => {}
        }
        *self != before
    }
}

/// One point: cumulative usage at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: EpochMillis,
    pub usage: Usage,
}

/// The series of a job, built attempt by attempt, segment by segment.
#[derive(Debug, Clone, Default)]
pub struct Series {
    points: Vec<Point>,
    /// Totals of the attempts before the current one.
    base: Usage,
    /// The current attempt's fold.
    current: Usage,
    attempt: u32,
    /// An incomplete last line of the previous segment.
    carry: Vec<u8>,
    /// Some events were not read (budget): the chart may miss steps.
    pub partial: bool,
}

/// Points kept before thinning (every other point is dropped when exceeded).
const MAX_POINTS: usize = 2_000;

impl Series {
    /// Starts attempt `n` (attempts must come in order).
    pub fn start_attempt(&mut self, n: u32) {
        if n != self.attempt {
            self.base = self.base.plus(&self.current);
            self.current = Usage::default();
            self.attempt = n;
            self.carry.clear();
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Folds one events segment of the current attempt, uploaded at `at`; returns whether
    /// a point was added.
    pub fn segment(&mut self, at: EpochMillis, data: &[u8]) -> bool {
        let mut changed = false;
        let mut rest = data;
        if !self.carry.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    let mut line = std::mem::take(&mut self.carry);
                    line.extend_from_slice(&rest[..i]);
                    changed |= self.current.observe(&line);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return false;
                }
            }
        }
        let mut lines = rest.split(|b| *b == b'\n').peekable();
        while let Some(line) = lines.next() {
            if lines.peek().is_none() {
                // No newline after it (yet): keep it for the next segment, unless it
                // is a whole event already (the last line of a finished stream).
                let whole = serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok();
                if line.is_empty() || whole {
                    changed |= self.current.observe(line);
                } else {
                    self.carry = line.to_vec();
                }
            } else {
                changed |= self.current.observe(line);
            }
        }
        if changed {
            self.push(at);
        }
        changed
    }

    /// The totals so far (previous attempts plus the current one).
    pub fn total(&self) -> Usage {
        self.base.plus(&self.current)
    }

    fn push(&mut self, at: EpochMillis) {
        let usage = self.total();
        match self.points.last_mut() {
            Some(last) if last.at == at => last.usage = usage,
            _ => self.points.push(Point { at, usage }),
        }
        if self.points.len() > MAX_POINTS {
            let last = self.points.last().copied();
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            if let Some(l) = last
                && self.points.last() != Some(&l)
            {
                self.points.push(l);
            }
        }
    }

    /// The points, plus (when given) a live sample of the current attempt from the job
    /// record's progress: the agent's heartbeat knows about events not uploaded yet.
    pub fn points_with(&self, live: Option<(EpochMillis, Usage)>) -> Vec<Point> {
        let mut pts = self.points.clone();
        if let Some((at, u)) = live {
            let usage = self.base.plus(&u);
            if pts.last().is_none_or(|l| l.at < at && l.usage != usage) {
                pts.push(Point { at, usage });
            }
        }
        pts
    }
}

/// Formats a duration in milliseconds as `45s`, `12m`, `3h05m`.
fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Draws the points as an SVG: turns, tokens and cost (USD) over time since `start`.
/// Everything in it is a number or a fixed word: no job text reaches the markup.
pub fn svg(points: &[Point], start: EpochMillis, now: EpochMillis, partial: bool) -> String {
    const W: f64 = 720.0;
    const PANEL: f64 = 64.0;
    const GAP: f64 = 18.0;
    const LEFT: f64 = 86.0;
    const RIGHT: f64 = 12.0;
    type Panel = (&'static str, fn(&Usage) -> f64, fn(f64) -> String);
    let panels: [Panel; 3] = [
        ("turns", |u| u.turns as f64, |v| format!("{v:.0}")),
        ("tokens", |u| u.tokens() as f64, |v| format!("{v:.0}")),
        ("cost $", |u| u.cost_usd, |v| format!("{v:.4}")),
    ];
    let height = GAP + panels.len() as f64 * (PANEL + GAP) + 8.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {height}" role="img" aria-label="turns, tokens and cost over time" xmlns="http://www.w3.org/2000/svg">"#
    );
    if points.is_empty() {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" class="empty" text-anchor="middle">no usage reported yet</text></svg>"#,
            W / 2.0,
            height / 2.0
        );
        return s;
    }
    let t0 = start.min(points[0].at);
    let t1 = now.max(points.last().map_or(t0, |p| p.at)).max(t0 + 1000);
    let x = |t: EpochMillis| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * (W - LEFT - RIGHT);
    for (i, (name, value, fmt)) in panels.iter().enumerate() {
        let top = GAP + i as f64 * (PANEL + GAP);
        let max = points.iter().map(|p| value(&p.usage)).fold(0.0, f64::max);
        let scale = if max > 0.0 { max } else { 1.0 };
        let y = |v: f64| top + PANEL - v / scale * PANEL;
        let _ = write!(
            s,
            r#"<g class="panel p{i}"><rect x="{LEFT}" y="{top}" width="{}" height="{PANEL}" class="frame"/><text x="{}" y="{}" class="name" text-anchor="end">{name}</text><text x="{}" y="{}" class="value" text-anchor="end">{}</text>"#,
            W - LEFT - RIGHT,
            LEFT - 8.0,
            top + 14.0,
            LEFT - 8.0,
            top + 32.0,
            fmt(value(&points.last().map(|p| p.usage).unwrap_or_default())),
        );
        // A step line: each value holds until the next point, the last one until now.
        let mut d = format!("M{:.1},{:.1}", x(t0), y(0.0));
        for p in points {
            let _ = write!(d, " H{:.1} V{:.1}", x(p.at), y(value(&p.usage)));
        }
        let _ = write!(d, " H{:.1}", x(t1));
        let _ = write!(s, r#"<path d="{d}" class="line"/></g>"#);
    }
    let axis_y = height - 4.0;
    for k in 0..=4 {
        let t = t0 + (t1 - t0) * k / 4;
        let anchor = match k {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{axis_y}" class="tick" text-anchor="{anchor}">{}</text>"#,
            x(t),
            span(t - t0)
        );
    }
    if partial {
        let _ = write!(
            s,
            r#"<text x="{}" y="12" class="note" text-anchor="end">partial: not every events segment was read</text>"#,
            W - RIGHT
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same stream as the agent's parser test: the chart must end where the record's
    /// progress does.
    #[test]
    fn claude_stream_matches_the_agents_progress() {
        let mut u = Usage::default();
        for l in [
            r#"{"type":"system","subtype":"init","session_id":"s-1"}"#,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            r#"{"type":"result","subtype":"success","session_id":"s-1","total_cost_usd":0.5,"num_turns":2,"usage":{"input_tokens":200,"output_tokens":40}}"#,
            "plain text",
        ] {
            u.observe(l.as_bytes());
        }
        assert_eq!((u.turns, u.input_tokens, u.output_tokens), (2, 200, 40));
        assert_eq!(u.cost_usd, 0.5);
    }

    #[test]
    fn codex_stream() {
        let mut u = Usage::default();
        for l in [
            r#"{"type":"thread.started","thread_id":"t-9"}"#,
            r#"{"type":"turn.started"}"#,
            r#"{"type":"turn.completed","usage":{"input_tokens":7,"output_tokens":3}}"#,
        ] {
            u.observe(l.as_bytes());
        }
        assert_eq!((u.turns, u.input_tokens, u.output_tokens), (1, 7, 3));
    }

    #[test]
    fn segments_split_lines_and_attempts_add_up() {
        let mut s = Series::default();
        s.start_attempt(1);
        let line = r#"{"type":"turn.completed","usage":{"input_tokens":7,"output_tokens":3}}"#;
        let (a, b) = line.split_at(20);
        assert!(!s.segment(1_000, a.as_bytes()), "half a line is kept");
        assert!(s.segment(2_000, format!("{b}\n{line}\n").as_bytes()));
        assert_eq!(s.total().turns, 2);
        s.start_attempt(2);
        assert!(s.segment(3_000, format!("{line}\n").as_bytes()));
        let pts = s.points_with(None);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[1].usage.turns, 3);
        assert_eq!(pts[1].usage.input_tokens, 21);
        // A live sample of attempt 2 adds to attempt 1's totals.
        let live = Usage {
            turns: 4,
            ..Default::default()
        };
        let pts = s.points_with(Some((4_000, live)));
        assert_eq!(pts.last().unwrap().usage.turns, 6);
    }

    #[test]
    fn svg_is_numbers_and_fixed_words() {
        let pts = [
            Point {
                at: 1_000,
                usage: Usage {
                    turns: 1,
                    input_tokens: 10,
                    output_tokens: 5,
                    cost_usd: 0.0,
                },
            },
            Point {
                at: 61_000,
                usage: Usage {
                    turns: 3,
                    input_tokens: 30,
                    output_tokens: 15,
                    cost_usd: 0.25,
                },
            },
        ];
        let s = svg(&pts, 0, 90_000, false);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains(">0.2500<") && s.contains(">45<") && s.contains(">90s<"));
        assert!(svg(&[], 0, 1, false).contains("no usage reported yet"));
    }
}
