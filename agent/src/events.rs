//! Reading the agent CLI's structured stream (Claude Code `stream-json`, Codex `--json`)
//! into [`Progress`]: turns, tokens, cost, last event, session id. The child writes these
//! lines, so nothing in them is trusted: lines past [`MAX_EVENT_LINE`] are not parsed,
//! counts add without overflow, and every field is clamped ([`Progress::clamp`]) after
//! each event, so a progress write can never fail on what a child printed.

use agentq_core::Progress;
use serde_json::Value;

/// Longest line read as an event (a longer one is still logged, not parsed).
pub const MAX_EVENT_LINE: usize = 1024 * 1024;

/// What a stream's parser remembers between lines: Claude Code prints one `assistant`
/// event per content block of a message, each repeating the whole message's usage, so a
/// message is counted once, by its id.
#[derive(Debug, Default, Clone)]
pub struct EventStream {
    last_message_id: Option<String>,
}

impl EventStream {
    /// Folds one stdout line into `progress`. Returns true when the line was a JSON event.
    pub fn observe(&mut self, progress: &mut Progress, line: &[u8]) -> bool {
        observe(Some(self), progress, line)
    }
}

/// Folds one line with no memory of earlier lines (every `assistant` event counts).
pub fn observe_line(progress: &mut Progress, line: &[u8]) -> bool {
    observe(None, progress, line)
}

fn observe(state: Option<&mut EventStream>, progress: &mut Progress, line: &[u8]) -> bool {
    if line.len() > MAX_EVENT_LINE {
        return false;
    }
    let trimmed = line.trim_ascii();
    if trimmed.first() != Some(&b'{') {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(trimmed) else {
        return false;
    };
    let Some(kind) = v.get("type").and_then(Value::as_str) else {
        return false;
    };
    progress.events = progress.events.saturating_add(1);
    let subtype = v.get("subtype").and_then(Value::as_str);
    progress.last_event = Some(match subtype {
        Some(s) => format!("{kind}/{s}"),
        None => kind.to_owned(),
    });
    fold(state, progress, kind, &v);
    progress.clamp();
    true
}

/// A token count from a usage object: a non-negative integer, else 0.
fn tokens(usage: &Value, key: &str) -> u64 {
    usage
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(Progress::MAX_TOKENS)
}

fn add_usage(progress: &mut Progress, usage: Option<&Value>) {
    if let Some(u) = usage {
        progress.input_tokens = progress
            .input_tokens
            .saturating_add(tokens(u, "input_tokens"));
        progress.output_tokens = progress
            .output_tokens
            .saturating_add(tokens(u, "output_tokens"));
    }
}

fn set_session(progress: &mut Progress, id: Option<&Value>) {
    // An id that is not one (see `Progress::session_id_ok`) leaves the last good one.
    if let Some(s) = id.and_then(Value::as_str)
        && Progress::session_id_ok(s)
    {
        progress.session_id = Some(s.to_owned());
    }
}

fn fold(state: Option<&mut EventStream>, progress: &mut Progress, kind: &str, v: &Value) {
    match kind {
        // Claude Code
        "system" => set_session(progress, v.get("session_id")),
        "assistant" => {
            let id = v.pointer("/message/id").and_then(Value::as_str);
            if let (Some(st), Some(id)) = (state, id) {
                if st.last_message_id.as_deref() == Some(id) {
                    // Another content block of the message already counted.
                    return;
                }
                st.last_message_id = Some(id.chars().take(128).collect());
            }
            progress.turns = progress.turns.saturating_add(1);
            add_usage(progress, v.pointer("/message/usage"));
        }
        "result" => {
            set_session(progress, v.get("session_id"));
            if let Some(c) = v.get("total_cost_usd").and_then(Value::as_f64) {
                progress.cost_usd = Progress::clamp_cost(c);
            }
            if let Some(n) = v.get("num_turns").and_then(Value::as_u64) {
                progress.turns = u32::try_from(n).unwrap_or(u32::MAX);
            }
            if let Some(u) = v.get("usage") {
                // The final usage is the run's total: it replaces what was counted (a
                // field that is not a count leaves the running figure alone).
                let total = |key: &str| {
                    u.get(key)
                        .and_then(Value::as_u64)
                        .map(|n| n.min(Progress::MAX_TOKENS))
                };
                if let Some(n) = total("input_tokens") {
                    progress.input_tokens = n;
                }
                if let Some(n) = total("output_tokens") {
                    progress.output_tokens = n;
                }
            }
        }
        // Codex
        "thread.started" => set_session(progress, v.get("thread_id")),
        "turn.completed" => {
            progress.turns = progress.turns.saturating_add(1);
            add_usage(progress, v.get("usage"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold_all(lines: &[&str]) -> (Progress, usize) {
        let mut p = Progress::default();
        let n = lines
            .iter()
            .filter(|l| observe_line(&mut p, l.as_bytes()))
            .count();
        (p, n)
    }

    #[test]
    fn claude_stream() {
        let (p, n) = fold_all(&[
            r#"{"type":"system","subtype":"init","session_id":"s-1"}"#,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            r#"{"type":"result","subtype":"success","session_id":"s-1","total_cost_usd":0.5,"num_turns":2,"usage":{"input_tokens":200,"output_tokens":40}}"#,
            "plain text",
        ]);
        assert_eq!(n, 4);
        assert_eq!(p.session_id.as_deref(), Some("s-1"));
        assert_eq!((p.turns, p.input_tokens, p.output_tokens), (2, 200, 40));
        assert_eq!(p.cost_usd, 0.5);
        assert_eq!(p.last_event.as_deref(), Some("result/success"));
    }

    #[test]
    fn claude_content_blocks_of_one_message_count_once() {
        let mut st = EventStream::default();
        let mut p = Progress::default();
        for l in [
            r#"{"type":"assistant","message":{"id":"m1","usage":{"input_tokens":100,"output_tokens":1}}}"#,
            r#"{"type":"assistant","message":{"id":"m1","usage":{"input_tokens":100,"output_tokens":1}}}"#,
            r#"{"type":"assistant","message":{"id":"m2","usage":{"input_tokens":300,"output_tokens":5}}}"#,
        ] {
            st.observe(&mut p, l.as_bytes());
        }
        assert_eq!((p.turns, p.input_tokens, p.output_tokens), (2, 400, 6));
        st.observe(
            &mut p,
            br#"{"type":"result","subtype":"success","num_turns":2,"usage":{"input_tokens":350,"output_tokens":40}}"#,
        );
        assert_eq!((p.input_tokens, p.output_tokens), (350, 40));
    }

    #[test]
    fn codex_stream() {
        let (p, _) = fold_all(&[
            r#"{"type":"thread.started","thread_id":"t-9"}"#,
            r#"{"type":"turn.started"}"#,
            r#"{"type":"turn.completed","usage":{"input_tokens":7,"output_tokens":3}}"#,
        ]);
        assert_eq!(p.session_id.as_deref(), Some("t-9"));
        assert_eq!((p.turns, p.input_tokens, p.output_tokens), (1, 7, 3));
    }

    /// One hostile or broken event after a good session: what the progress holds.
    #[test]
    fn child_values_are_clamped() {
        const MAXT: u64 = Progress::MAX_TOKENS;
        let long = "x".repeat(10_000);
        let ctl = "a\u{0}b\u{1b}[31mc\u{7f}\u{85}d\ne";
        type Check = fn(&Progress) -> bool;
        let table: Vec<(String, Check)> = vec![
            // costs
            (r#"{"type":"result","total_cost_usd":-3.5}"#.into(), |p| p.cost_usd == 0.0),
            (r#"{"type":"result","total_cost_usd":1e300}"#.into(), |p| {
                p.cost_usd == Progress::MAX_COST_USD
            }),
            (r#"{"type":"result","total_cost_usd":1e-200}"#.into(), |p| p.cost_usd == 0.0),
            (r#"{"type":"result","total_cost_usd":"NaN"}"#.into(), |p| p.cost_usd == 0.25),
            (r#"{"type":"result","total_cost_usd":0.75}"#.into(), |p| p.cost_usd == 0.75),
            // counts
            (r#"{"type":"result","num_turns":18446744073709551615}"#.into(), |p| {
                p.turns == Progress::MAX_TURNS
            }),
            (r#"{"type":"result","num_turns":-1}"#.into(), |p| p.turns == 3),
            (
                r#"{"type":"result","usage":{"input_tokens":18446744073709551615,"output_tokens":1e30}}"#.into(),
                |p| p.input_tokens == MAXT && p.output_tokens == 40,
            ),
            (
                r#"{"type":"assistant","message":{"usage":{"input_tokens":18446744073709551615,"output_tokens":-7}}}"#.into(),
                |p| p.input_tokens == MAXT && p.output_tokens == 40 && p.turns == 4,
            ),
            (
                r#"{"type":"turn.completed","usage":{"input_tokens":999999999999999,"output_tokens":3.5}}"#.into(),
                |p| p.input_tokens == MAXT && p.output_tokens == 40,
            ),
            // strings
            (format!(r#"{{"type":"{long}","subtype":"{long}"}}"#), |p| {
                let e = p.last_event.as_deref().unwrap();
                e.len() <= Progress::MAX_LAST_EVENT_LEN && e.ends_with('…')
            }),
            (
                format!(r#"{{"type":{}}}"#, serde_json::to_string(ctl).unwrap()),
                |p| p.last_event.as_deref() == Some("ab[31mcde"),
            ),
            (format!(r#"{{"type":"system","session_id":"{long}"}}"#), |p| {
                p.session_id.as_deref() == Some("s-1")
            }),
            (r#"{"type":"system","session_id":"--dangerously-skip-permissions"}"#.into(), |p| {
                p.session_id.as_deref() == Some("s-1")
            }),
            (r#"{"type":"system","session_id":"a b\n"}"#.into(), |p| {
                p.session_id.as_deref() == Some("s-1")
            }),
            (r#"{"type":"thread.started","thread_id":""}"#.into(), |p| {
                p.session_id.as_deref() == Some("s-1")
            }),
            (r#"{"type":"thread.started","thread_id":"0199a213-81c0-7800-8aa1-bbab2a035a53"}"#.into(), |p| {
                p.session_id.as_deref() == Some("0199a213-81c0-7800-8aa1-bbab2a035a53")
            }),
            // not events
            (format!("{{\"type\":\"x\",\"pad\":\"{}\"}}", "y".repeat(MAX_EVENT_LINE)), |p| {
                p.last_event.as_deref() == Some("result/success")
            }),
            ("[".repeat(100_000), |p| p.events == 3),
            (format!("{}{}", "{\"a\":".repeat(50_000), "1"), |p| p.events == 3),
        ];
        for (line, check) in table {
            let (mut p, _) = fold_all(&[
                r#"{"type":"system","session_id":"s-1"}"#,
                r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
                r#"{"type":"result","subtype":"success","total_cost_usd":0.25,"num_turns":3,"usage":{"output_tokens":40}}"#,
            ]);
            observe_line(&mut p, line.as_bytes());
            let shown: String = line.chars().take(120).collect();
            assert!(check(&p), "{shown}: {p:?}");
            // Whatever came in, the result is in range and clamping changes nothing.
            let mut again = p.clone();
            again.clamp();
            assert_eq!(again, p, "{shown}");
        }
    }
}
