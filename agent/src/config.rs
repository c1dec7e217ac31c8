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
    /// Jobs run at once by one agent process. Keep 1 unless the agent runs as root (then
    /// each job has its own uid): same-uid children could see each other.
    #[arg(
        long,
        env = "AGENTQ_MAX_CONCURRENT_JOBS",
        default_value_t = 1,
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
    /// Codex `config.toml` copied into each codex job's `$HOME/.codex/` (model provider,
    /// sandbox, approvals). Default: a config with `sandbox_mode = "danger-full-access"`
    /// and `approval_policy = "never"` (the job's own isolation is agentq's).
    #[arg(long, env = "AGENTQ_CODEX_CONFIG", global = true)]
    pub codex_config: Option<PathBuf>,
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
    /// IAM role the agent assumes for jobs that set `aws_credentials: true`; the child
    /// gets short-lived credentials of it, limited by a session policy to the job's own S3
    /// prefix. Without it such jobs are refused (the function's own credentials are never
    /// given to a child).
    #[arg(long, env = "AGENTQ_JOB_ROLE_ARN", global = true)]
    pub job_role_arn: Option<String>,
    /// Lifetime of each set of job credentials (refreshed before they expire).
    #[arg(
        long,
        env = "AGENTQ_JOB_CREDENTIALS_SECONDS",
        default_value_t = 3600,
        global = true
    )]
    pub job_credentials_seconds: u32,
    /// When the agent runs as root: children run as this uid (+ the job slot, so
    /// concurrent jobs never share one). 0 keeps them root (not recommended).
    #[arg(long, env = "AGENTQ_CHILD_UID", default_value_t = 61000, global = true)]
    pub child_uid: u32,
    /// When the agent runs as root: children's gid (+ the job slot); default = the uid.
    #[arg(long, env = "AGENTQ_CHILD_GID", global = true)]
    pub child_gid: Option<u32>,
    /// Extra environment for every child, NAME=VALUE (repeat, or comma-separate in the
    /// env var), e.g. IS_SANDBOX=1. AWS_* and AGENTQ_* names are refused.
    #[arg(
        long = "child-env",
        env = "AGENTQ_CHILD_ENV",
        value_delimiter = ',',
        global = true
    )]
    pub child_env: Vec<String>,
    /// The scratch directory a job's child may write outside its workspace.
    #[arg(
        long,
        env = "AGENTQ_SCRATCH_DIR",
        default_value = "/tmp",
        global = true
    )]
    pub scratch_dir: PathBuf,
    /// Empty the scratch directory (all but the work root) before each job: `auto` does it
    /// only on the Lambda service itself (never on a host or under a local Runtime API).
    #[arg(
        long,
        env = "AGENTQ_WIPE_SCRATCH",
        value_enum,
        default_value_t = WipeScratch::Auto,
        global = true
    )]
    pub wipe_scratch: WipeScratch,
    /// KMS key (id or ARN) for checkpoint archives (they hold agent transcripts); empty =
    /// the bucket's default encryption.
    #[arg(long, env = "AGENTQ_CHECKPOINT_KMS_KEY", global = true)]
    pub checkpoint_kms_key: Option<String>,
    /// Upload throughput assumed when sizing the time kept for the final uploads (MB/s).
    #[arg(
        long,
        env = "AGENTQ_UPLOAD_MBPS",
        default_value_t = 40.0,
        global = true
    )]
    pub upload_mbps: f64,
    /// Upload a log segment once this many bytes are buffered.
    #[arg(long, env = "AGENTQ_LOG_FLUSH_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub log_flush_bytes: usize,
    /// Log bytes written but not yet uploaded (kept on local disk) before the child's
    /// output waits for S3.
    #[arg(long, env = "AGENTQ_LOG_BACKLOG_BYTES", default_value_t = 1024 * 1024 * 1024, global = true)]
    pub log_backlog_bytes: u64,
    /// Upload buffered log bytes at least this often.
    #[arg(
        long,
        env = "AGENTQ_LOG_FLUSH_SECONDS",
        default_value_t = 5.0,
        global = true
    )]
    pub log_flush_seconds: f64,
    /// The capacity tier this agent serves (the `Tier` dimension of its metrics).
    #[arg(long, env = "AGENTQ_TIER", default_value = "default", global = true)]
    pub tier: String,
    /// When traces are on (OTEL_*): let Claude Code export its own telemetry into the
    /// job's trace. `with-headers` also gives the child the exporter's headers (often a
    /// token; the child is untrusted code).
    #[arg(
        long,
        env = "AGENTQ_CHILD_TELEMETRY",
        value_enum,
        default_value_t = ChildTelemetry::On,
        global = true
    )]
    pub child_telemetry: ChildTelemetry,
}

/// Whether a job's child gets the variables that join its own telemetry to the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChildTelemetry {
    /// Endpoint, protocol, resource attributes and TRACEPARENT; no headers.
    On,
    /// As `on`, plus OTEL_EXPORTER_OTLP_HEADERS (their values are redacted from the logs).
    WithHeaders,
    Off,
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
    pub codex_config: Option<PathBuf>,
    pub claude_permission_mode: String,
    pub child_path: String,
    pub job_role_arn: Option<String>,
    pub job_credentials: Duration,
    /// Children's base uid/gid when the agent is root (`None`: children keep the agent's).
    pub child_identity: Option<(u32, u32)>,
    pub child_env: Vec<(String, String)>,
    pub scratch_dir: PathBuf,
    pub wipe_scratch: WipeScratch,
    pub checkpoint_kms_key: Option<String>,
    /// Bytes per second assumed for final uploads.
    pub upload_bytes_per_second: f64,
    pub flush: FlushPolicy,
    /// The `Tier` dimension of the metrics.
    pub tier: String,
    pub child_telemetry: ChildTelemetry,
}

/// When to empty the scratch directory before a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WipeScratch {
    /// Only on the Lambda service (`LAMBDA_TASK_ROOT` and `AWS_EXECUTION_ENV=AWS_Lambda_*`).
    Auto,
    Always,
    Never,
}

impl WipeScratch {
    /// Whether to wipe in this process's environment.
    pub fn applies(self) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => crate::isolation::on_lambda_service(|k| std::env::var(k).ok()),
        }
    }
}

/// A setting out of range.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {why}")]
pub struct AgentConfigError {
    pub setting: &'static str,
    pub why: String,
}

fn tier(t: &str) -> Result<String, AgentConfigError> {
    let t = t.trim();
    if t.is_empty()
        || t.len() > 64
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(AgentConfigError {
            setting: "AGENTQ_TIER",
            why: format!("{t:?}: use 1-64 letters, digits, '-' or '_' (e.g. default, large)"),
        });
    }
    Ok(t.to_owned())
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
        let mut child_env = Vec::new();
        for kv in a.child_env.iter().filter(|s| !s.trim().is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(AgentConfigError {
                    setting: "AGENTQ_CHILD_ENV",
                    why: format!("{kv:?} is not NAME=VALUE"),
                });
            };
            let k = k.trim();
            let valid = !k.is_empty()
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.starts_with(|c: char| c.is_ascii_digit());
            if !valid || k.starts_with("AWS_") || k.starts_with("AGENTQ_") {
                return Err(AgentConfigError {
                    setting: "AGENTQ_CHILD_ENV",
                    why: format!(
                        "{k:?} cannot be set for children: use a plain variable name, not AWS_* or AGENTQ_* (job credentials come from AGENTQ_JOB_ROLE_ARN)"
                    ),
                });
            }
            child_env.push((k.to_owned(), v.to_owned()));
        }
        if let Some(r) = &a.job_role_arn
            && !(r.starts_with("arn:") && r.contains(":role/"))
        {
            return Err(AgentConfigError {
                setting: "AGENTQ_JOB_ROLE_ARN",
                why: format!("{r:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
            });
        }
        if !(900..=43_200).contains(&a.job_credentials_seconds) {
            return Err(AgentConfigError {
                setting: "AGENTQ_JOB_CREDENTIALS_SECONDS",
                why: "use 900..=43200 (the STS limits)".into(),
            });
        }
        if !(a.upload_mbps.is_finite() && a.upload_mbps > 0.1) {
            return Err(AgentConfigError {
                setting: "AGENTQ_UPLOAD_MBPS",
                why: "use a positive number of megabytes per second".into(),
            });
        }
        let child_identity = (crate::isolation::is_root() && a.child_uid != 0)
            .then(|| (a.child_uid, a.child_gid.unwrap_or(a.child_uid)));
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
            codex_config: a.codex_config.clone(),
            claude_permission_mode: a.claude_permission_mode.clone(),
            child_path: a.child_path.clone(),
            job_role_arn: a.job_role_arn.clone().filter(|s| !s.is_empty()),
            job_credentials: Duration::from_secs(u64::from(a.job_credentials_seconds)),
            child_identity,
            child_env,
            scratch_dir: a.scratch_dir.clone(),
            wipe_scratch: a.wipe_scratch,
            checkpoint_kms_key: a.checkpoint_kms_key.clone().filter(|s| !s.is_empty()),
            upload_bytes_per_second: a.upload_mbps * 1_000_000.0,
            flush: FlushPolicy {
                flush_bytes: a.log_flush_bytes,
                flush_interval: secs("AGENTQ_LOG_FLUSH_SECONDS", a.log_flush_seconds, 0.1, 300.0)?,
                max_backlog_bytes: a.log_backlog_bytes.max(a.log_flush_bytes as u64),
            },
            tier: tier(&a.tier)?,
            child_telemetry: a.child_telemetry,
        })
    }
}
