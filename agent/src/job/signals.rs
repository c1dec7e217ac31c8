//! What the agent CLI's output says about how it ended, beyond its exit code: a session
//! it could not resume, or a model API rate limit (with when it resets). Read from each
//! line of stdout and stderr, after redaction.

use agentq_core::record::EpochMillis;

/// A condition the CLI reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CliSignal {
    /// `--resume`/`exec resume` found no such session.
    ResumeFailed,
    /// The model API refused with a rate limit; when it resets, if it said.
    RateLimited { reset_at: Option<EpochMillis> },
}

/// Phrases the CLIs print when a session cannot be resumed.
const RESUME_FAILED: &[&str] = &[
    "No conversation found with session ID",
    "no rollout found for thread id",
    "No saved session found",
];

/// Looks at one output line (at most the first 64 KiB of it).
pub fn detect_signal(line: &[u8], now: EpochMillis) -> Option<CliSignal> {
    let line = &line[..line.len().min(64 * 1024)];
    let text = String::from_utf8_lossy(line);
    if RESUME_FAILED.iter().any(|p| text.contains(p)) {
        return Some(CliSignal::ResumeFailed);
    }
    // Claude Code retrying a rate-limited request itself: `system/api_retry` with 429.
    if text.contains("\"api_retry\"")
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim())
        && v.get("subtype").and_then(|s| s.as_str()) == Some("api_retry")
    {
        let status = v.get("error_status").and_then(|s| s.as_u64());
        let kind = v.get("error").and_then(|s| s.as_str());
        if status == Some(429) || kind == Some("rate_limit") {
            let delay = v.get("retry_delay_ms").and_then(|d| d.as_i64());
            return Some(CliSignal::RateLimited {
                reset_at: delay.map(|d| now + d.clamp(0, 86_400_000)),
            });
        }
        return None;
    }
    let lower = text.to_ascii_lowercase();
    let limited = lower.contains("rate_limit_error")
        || lower.contains("rate limit")
        || lower.contains("ratelimit")
        || lower.contains("429 too many requests")
        || lower.contains("\"status\":429")
        || lower.contains("api error: 429")
        || (lower.contains("reconnecting") && lower.contains("429"));
    if !limited {
        return None;
    }
    // An error event, not a model's text about rate limits: JSON events that carry an
    // error, or plain stderr lines.
    if text.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
        let is_error = v.get("is_error").and_then(|b| b.as_bool()) == Some(true)
            || matches!(
                v.get("type").and_then(|t| t.as_str()),
                Some("error" | "turn.failed" | "result")
            ) && (v.get("error").is_some()
                || v.get("message").is_some()
                || v.get("is_error").is_some());
        if !is_error {
            return None;
        }
    }
    Some(CliSignal::RateLimited {
        reset_at: reset_time(&lower, now),
    })
}

/// "retry after N seconds", "resets in N s", "reset at <epoch seconds>", `retry-after: N`.
fn reset_time(lower: &str, now: EpochMillis) -> Option<EpochMillis> {
    for key in [
        "retry-after",
        "retry after",
        "try again in",
        "resets in",
        "reset in",
    ] {
        if let Some(i) = lower.find(key) {
            let rest = &lower[i + key.len()..];
            let digits: String = rest
                .trim_start_matches([':', ' ', '"', '='])
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(n) = digits.parse::<i64>()
                && (0..=86_400).contains(&n)
            {
                return Some(now + n * 1000);
            }
        }
    }
    for key in ["reset at", "resets at", "reset_at"] {
        if let Some(i) = lower.find(key) {
            let rest = &lower[i + key.len()..];
            let digits: String = rest
                .trim_start_matches([':', ' ', '"', '='])
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(n) = digits.parse::<i64>() {
                // Epoch seconds or millis, within a day from now.
                let ms = if n < 100_000_000_000 { n * 1000 } else { n };
                if ms > now && ms - now <= 86_400_000 {
                    return Some(ms);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_failures_are_recognised() {
        assert_eq!(
            detect_signal(b"No conversation found with session ID: 8f0c-aa", 0),
            Some(CliSignal::ResumeFailed)
        );
        assert_eq!(detect_signal(b"all good", 0), None);
    }

    #[test]
    fn claude_retrying_a_429_is_a_rate_limit() {
        let line = br#"{"type":"system","subtype":"api_retry","attempt":3,"max_retries":10,"retry_delay_ms":2444,"error_status":429,"error":"rate_limit","session_id":"s"}"#;
        assert_eq!(
            detect_signal(line, 1000),
            Some(CliSignal::RateLimited {
                reset_at: Some(3444)
            })
        );
        let other = br#"{"type":"system","subtype":"api_retry","attempt":1,"error_status":529,"error":"overloaded"}"#;
        assert_eq!(detect_signal(other, 1000), None);
    }

    #[test]
    fn rate_limits_with_and_without_a_reset() {
        let now = 1_000_000;
        assert_eq!(
            detect_signal(
                br#"{"type":"result","subtype":"success","is_error":true,"result":"API Error: 429 rate_limit_error, retry after 30 seconds"}"#,
                now
            ),
            Some(CliSignal::RateLimited {
                reset_at: Some(now + 30_000)
            })
        );
        assert_eq!(
            detect_signal(br#"{"type":"error","message":"Rate limit reached"}"#, now),
            Some(CliSignal::RateLimited { reset_at: None })
        );
        // The model talking about rate limits is not one.
        assert_eq!(
            detect_signal(
                br#"{"type":"assistant","message":{"content":[{"type":"text","text":"add a rate limit"}]}}"#,
                now
            ),
            None
        );
    }
}
