//! The agent's own settings (flags with `AGENTQ_*` environment fallbacks), validated once
//! into [`AgentConfig`] with parsed durations.

use std::path::PathBuf;
use std::time::Duration;

use crate::logs::FlushPolicy;

/// Agent tuning as given on the command line or in the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Seconds between heartbeats (DynamoDB progress + SQS visibility extension).
    #[arg(
        long,
        env = "AGENTQ_HEARTBEAT_SECONDS",
        default_value_t = 5.0,
        global = true
    )]
    pub heartbeat_seconds: f64,
    /// How far each heartbeat pushes the message's visibility (default: 3 heartbeats, at
    /// least 10 s). If the agent dies, the message is back after at most this long.
    #[arg(long, env = "AGENTQ_VISIBILITY_HORIZON_SECONDS", global = true)]
    pub visibility_horizon_seconds: Option<u32>,
    /// A RUNNING lease whose heartbeat is older than this may be taken over. The
    /// dispatcher's setting too (it treats such a lease as crashed): give both the same value.
    #[arg(
        long,
        env = "AGENTQ_STALE_AFTER_SECONDS",
        default_value = agentq_core::config::DEFAULT_STALE_AFTER_SECONDS_ARG,
        global = true
    )]
    pub stale_after_seconds: Option<f64>,
    /// Time kept back before the invocation deadline for stopping the child, uploading
    /// logs and the manifest, and the final write.
    #[arg(
        long = "deadline-reserve-seconds",
        alias = "reserve-seconds",
        env = "AGENTQ_DEADLINE_RESERVE_SECONDS",
        default_value_t = 10.0,
        global = true
    )]
    pub reserve_seconds: f64,
    /// Time between SIGTERM and SIGKILL when stopping a child.
    #[arg(
        long = "kill-grace-seconds",
        alias = "grace-seconds",
        env = "AGENTQ_KILL_GRACE_SECONDS",
        default_value_t = 3.0,
        global = true
    )]
    pub grace_seconds: f64,
    /// Jobs run at once by one agent process.
    #[arg(
        long,
        env = "AGENTQ_MAX_CONCURRENT_JOBS",
        default_value_t = 2,
        global = true
    )]
    pub max_concurrent_jobs: usize,
    /// Where per-job workspaces are made (HOME and TMPDIR of the child live there too).
    #[arg(
        long,
        env = "AGENTQ_WORK_ROOT",
        default_value = "/tmp/agentq",
        global = true
    )]
    pub work_root: PathBuf,
    /// The Claude Code CLI.
    #[arg(
        long,
        env = "AGENTQ_CLAUDE_BIN",
        default_value = "claude",
        global = true
    )]
    pub claude_bin: String,
    /// The Codex CLI.
    #[arg(long, env = "AGENTQ_CODEX_BIN", default_value = "codex", global = true)]
    pub codex_bin: String,
    /// MCP servers config (`.mcp.json` shape) passed to Claude Code with --mcp-config.
    #[arg(long, env = "AGENTQ_MCP_CONFIG", global = true)]
    pub mcp_config: Option<PathBuf>,
    /// Claude Code --permission-mode for headless runs.
    #[arg(
        long,
        env = "AGENTQ_CLAUDE_PERMISSION_MODE",
        default_value = "bypassPermissions",
        global = true
    )]
    pub claude_permission_mode: String,
    /// PATH given to the child.
    #[arg(
        long,
        env = "AGENTQ_CHILD_PATH",
        default_value = "/usr/local/bin:/usr/bin:/bin",
        global = true
    )]
    pub child_path: String,
    /// Let jobs that set `aws_credentials: true` receive this function's AWS credentials.
    #[arg(
        long,
        env = "AGENTQ_ALLOW_JOB_AWS_CREDENTIALS",
        default_value_t = false,
        global = true
    )]
    pub allow_job_aws_credentials: bool,
    /// Upload a log segment once this many bytes are buffered.
    #[arg(long, env = "AGENTQ_LOG_FLUSH_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub log_flush_bytes: usize,
    /// Upload buffered log bytes at least this often.
    #[arg(
        long,
        env = "AGENTQ_LOG_FLUSH_SECONDS",
        default_value_t = 5.0,
        global = true
    )]
    pub log_flush_seconds: f64,
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub heartbeat: Duration,
    pub visibility_horizon: u32,
    pub stale_after: Duration,
    pub reserve: Duration,
    pub grace: Duration,
    pub max_concurrent_jobs: usize,
    pub work_root: PathBuf,
    pub claude_bin: String,
    pub codex_bin: String,
    pub mcp_config: Option<PathBuf>,
    pub claude_permission_mode: String,
    pub child_path: String,
    pub allow_job_aws_credentials: bool,
    pub flush: FlushPolicy,
}

/// A setting out of range.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {why}")]
pub struct AgentConfigError {
    pub setting: &'static str,
    pub why: String,
}

fn secs(setting: &'static str, v: f64, min: f64, max: f64) -> Result<Duration, AgentConfigError> {
    if !(v.is_finite() && v >= min && v <= max) {
        return Err(AgentConfigError {
            setting,
            why: format!("{v} is out of range: use {min}..={max} seconds"),
        });
    }
    Ok(Duration::from_secs_f64(v))
}

impl AgentConfig {
    pub fn from_args(a: &AgentArgs) -> Result<Self, AgentConfigError> {
        let heartbeat = secs("AGENTQ_HEARTBEAT_SECONDS", a.heartbeat_seconds, 0.2, 300.0)?;
        let horizon = a
            .visibility_horizon_seconds
            .unwrap_or_else(|| ((heartbeat.as_secs_f64() * 3.0).ceil() as u32).max(10));
        if !(1..=43_200).contains(&horizon) || f64::from(horizon) <= heartbeat.as_secs_f64() {
            return Err(AgentConfigError {
                setting: "AGENTQ_VISIBILITY_HORIZON_SECONDS",
                why: format!(
                    "{horizon} must exceed the heartbeat interval and be at most 43200 (the SQS maximum)"
                ),
            });
        }
        let stale_after = match a.stale_after_seconds {
            Some(s) => secs("AGENTQ_STALE_AFTER_SECONDS", s, 0.5, 86_400.0)?,
            None => (heartbeat * 4).max(Duration::from_secs(10)),
        };
        if stale_after <= heartbeat {
            return Err(AgentConfigError {
                setting: "AGENTQ_STALE_AFTER_SECONDS",
                why: "must be longer than the heartbeat interval, or live leases look stale".into(),
            });
        }
        let grace = secs("AGENTQ_KILL_GRACE_SECONDS", a.grace_seconds, 0.0, 60.0)?;
        let reserve = secs(
            "AGENTQ_DEADLINE_RESERVE_SECONDS",
            a.reserve_seconds,
            0.5,
            300.0,
        )?;
        if reserve <= grace {
            return Err(AgentConfigError {
                setting: "AGENTQ_DEADLINE_RESERVE_SECONDS",
                why: "must exceed the kill grace: the reserve covers the grace plus the final uploads".into(),
            });
        }
        if a.max_concurrent_jobs == 0 || a.max_concurrent_jobs > 64 {
            return Err(AgentConfigError {
                setting: "AGENTQ_MAX_CONCURRENT_JOBS",
                why: "use 1..=64".into(),
            });
        }
        if a.log_flush_bytes < 1024 || a.log_flush_bytes > 64 * 1024 * 1024 {
            return Err(AgentConfigError {
                setting: "AGENTQ_LOG_FLUSH_BYTES",
                why: "use 1024..=67108864".into(),
            });
        }
        Ok(Self {
            heartbeat,
            visibility_horizon: horizon,
            stale_after,
            reserve,
            grace,
            max_concurrent_jobs: a.max_concurrent_jobs,
            work_root: a.work_root.clone(),
            claude_bin: a.claude_bin.clone(),
            codex_bin: a.codex_bin.clone(),
            mcp_config: a.mcp_config.clone(),
            claude_permission_mode: a.claude_permission_mode.clone(),
            child_path: a.child_path.clone(),
            allow_job_aws_credentials: a.allow_job_aws_credentials,
            flush: FlushPolicy {
                flush_bytes: a.log_flush_bytes,
                flush_interval: secs("AGENTQ_LOG_FLUSH_SECONDS", a.log_flush_seconds, 0.1, 300.0)?,
                channel_capacity: 16,
            },
        })
    }
}
