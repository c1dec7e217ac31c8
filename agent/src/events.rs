//! Reading the agent CLI's structured stream (Claude Code `stream-json`, Codex `--json`)
//! into [`Progress`]: turns, tokens, cost, last event, session id.

use agentq_core::Progress;
use serde_json::Value;

/// Folds one stdout line into `progress`. Returns true when the line was a JSON event.
pub fn observe_line(progress: &mut Progress, line: &[u8]) -> bool {
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
    progress.events += 1;
    let subtype = v.get("subtype").and_then(Value::as_str);
    progress.last_event = Some(match subtype {
        Some(s) => format!("{kind}/{s}"),
        None => kind.to_owned(),
    });
    let usage_in = |u: &Value, key: &str| u.get(key).and_then(Value::as_u64).unwrap_or(0);
    match kind {
        // Claude Code
        "system" => {
            if let Some(s) = v.get("session_id").and_then(Value::as_str) {
                progress.session_id = Some(s.to_owned());
            }
        }
        "assistant" => {
            progress.turns += 1;
            if let Some(u) = v.pointer("/message/usage") {
                progress.input_tokens += usage_in(u, "input_tokens");
                progress.output_tokens += usage_in(u, "output_tokens");
            }
        }
        "result" => {
            if let Some(s) = v.get("session_id").and_then(Value::as_str) {
                progress.session_id = Some(s.to_owned());
            }
            if let Some(c) = v.get("total_cost_usd").and_then(Value::as_f64) {
                progress.cost_usd = c;
            }
            if let Some(n) = v.get("num_turns").and_then(Value::as_u64) {
                progress.turns = n as u32;
            }
            if let Some(u) = v.get("usage") {
                // The final usage is the session's total.
                progress.input_tokens = progress.input_tokens.max(usage_in(u, "input_tokens"));
                progress.output_tokens = progress.output_tokens.max(usage_in(u, "output_tokens"));
            }
        }
        // Codex
        "thread.started" => {
            if let Some(s) = v.get("thread_id").and_then(Value::as_str) {
                progress.session_id = Some(s.to_owned());
            }
        }
        "turn.completed" => {
            progress.turns += 1;
            if let Some(u) = v.get("usage") {
                progress.input_tokens += usage_in(u, "input_tokens");
                progress.output_tokens += usage_in(u, "output_tokens");
            }
        }
        _ => {}
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claude_stream() {
        let mut p = Progress::default();
        let lines = [
            r#"{"type":"system","subtype":"init","session_id":"s-1"}"#,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            r#"{"type":"result","subtype":"success","session_id":"s-1","total_cost_usd":0.5,"num_turns":2,"usage":{"input_tokens":200,"output_tokens":40}}"#,
            "plain text",
        ];
        let n = lines
            .iter()
            .filter(|l| observe_line(&mut p, l.as_bytes()))
            .count();
        assert_eq!(n, 4);
        assert_eq!(p.session_id.as_deref(), Some("s-1"));
        assert_eq!((p.turns, p.input_tokens, p.output_tokens), (2, 200, 40));
        assert_eq!(p.cost_usd, 0.5);
        assert_eq!(p.last_event.as_deref(), Some("result/success"));
    }

    #[test]
    fn codex_stream() {
        let mut p = Progress::default();
        for l in [
            r#"{"type":"thread.started","thread_id":"t-9"}"#,
            r#"{"type":"turn.started"}"#,
            r#"{"type":"turn.completed","usage":{"input_tokens":7,"output_tokens":3}}"#,
        ] {
            observe_line(&mut p, l.as_bytes());
        }
        assert_eq!(p.session_id.as_deref(), Some("t-9"));
        assert_eq!((p.turns, p.input_tokens, p.output_tokens), (1, 7, 3));
    }
}
