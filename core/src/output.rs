//! The `--output` flag every binary shares: human-readable text, or JSON on stdout
//! (messages and progress always go to stderr). Set it with `--output` / `-o` or
//! `AGENTQ_OUTPUT`.

/// `--output text|json` (`AGENTQ_OUTPUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text (default).
    #[default]
    // `human` was `agentq-dispatcher deploy`'s name for it; still accepted.
    #[value(alias = "human")]
    Text,
    /// JSON on stdout: one document, or JSON Lines for streams.
    Json,
}

impl OutputFormat {
    pub fn is_json(self) -> bool {
        self == Self::Json
    }
}

/// The environment variable behind `--output`.
pub const OUTPUT_ENV: &str = "AGENTQ_OUTPUT";

/// The environment variable holding the diagnostics filter (a `tracing` filter such as
/// `info` or `agentq_agent=debug`) of every binary; `RUST_LOG` is read when it is unset.
pub const LOG_ENV: &str = "AGENTQ_LOG";

/// The diagnostics filter from [`LOG_ENV`], else `RUST_LOG`, else `None`.
pub fn log_filter() -> Option<String> {
    [LOG_ENV, "RUST_LOG"]
        .into_iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn text_json_and_the_old_human_spelling_parse() {
        assert_eq!(
            OutputFormat::from_str("text", false),
            Ok(OutputFormat::Text)
        );
        assert_eq!(
            OutputFormat::from_str("human", false),
            Ok(OutputFormat::Text)
        );
        assert_eq!(
            OutputFormat::from_str("json", false),
            Ok(OutputFormat::Json)
        );
        assert!(OutputFormat::from_str("yaml", false).is_err());
    }
}
