//! Step 1: everything the child needs, settled before it starts — secrets, scoped AWS
//! credentials, the job's uid, the workspace (restored from a checkpoint when resuming),
//! the MCP config, and the command line with a clean environment. A failure here ends
//! the attempt without starting the child.

use agentq_core::spec::ResumePolicy;
use agentq_core::store::Finish;
use agentq_core::{AgentPreset, Attempt, FailureCause, Progress, ValidSpec};
use tokio::time::Instant;

use super::RunInput;
use crate::Deps;
use crate::child::ChildSpec;
use crate::credentials::{self, JobCredentials};
use crate::isolation::{IdentityLease, JobIdentity};
use crate::secrets::{self, Secrets};
use crate::workspace::{Workspace, WorkspaceError};
use crate::{checkpoint, isolation};

/// What [`prepare`] made; dropping it removes the workspace and stops the credentials.
#[derive(Debug)]
pub(super) struct Prepared {
    pub ws: Workspace,
    pub identity: Option<IdentityLease>,
    pub child: ChildSpec,
    /// Secret values to redact (job secrets; job credentials are added as they change).
    pub secret_values: Vec<String>,
    pub credentials: Option<JobCredentials>,
    /// The session being resumed, if any.
    pub resume: Option<String>,
    /// Whether a workspace archive was restored (`None`: not resuming).
    pub restored: Option<bool>,
}

impl Prepared {
    pub fn identity(&self) -> Option<JobIdentity> {
        self.identity.as_ref().map(|l| l.identity)
    }

    /// Everything to redact right now (credentials may have been refreshed).
    pub fn redact_values(&self) -> Vec<String> {
        let mut v = self.secret_values.clone();
        if let Some(c) = &self.credentials
            && let Ok(s) = c.secrets.lock()
        {
            v.extend(s.iter().cloned());
        }
        v
    }
}

fn fail(cause: FailureCause, reason: String) -> Box<Finish> {
    Box::new(Finish {
        state: cause.final_state(),
        cause: Some(cause),
        reason,
        exit_code: None,
        signal: None,
        result_key: None,
        progress: Progress::default(),
        runtime_ms: 0,
    })
}

/// Prepares the run; `Err` is the attempt's final outcome.
pub(super) async fn prepare(
    deps: &Deps,
    input: &RunInput<'_>,
    segment: u32,
) -> Result<Prepared, Box<Finish>> {
    let spec = input.spec;
    let job = &spec.job_id;
    let cfg = &deps.config;
    let wants_aws = spec.spec.aws_credentials == Some(true);
    if wants_aws && cfg.job_role_arn.is_none() {
        return Err(fail(
            FailureCause::SecretDenied,
            credentials::CredentialsError::NoRole.to_string(),
        ));
    }
    // The spend cap holds across segments: what earlier attempts spent counts.
    if let Some(budget) = spec.spec.max_budget_usd
        && input.record.cost_usd >= budget
    {
        return Err(fail(
            FailureCause::BudgetExceeded,
            format!(
                "the job already spent ${:.4} of its max_budget_usd ${budget}",
                input.record.cost_usd
            ),
        ));
    }
    let secrets = match secrets::resolve(
        &deps.clients.ssm,
        &spec.spec.secrets,
        deps.settings.secrets_prefix(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%job, error = %e, "secrets refused; child not started");
            return Err(fail(e.cause(), e.to_string()));
        }
    };
    let bucket = deps
        .settings
        .bucket()
        .map_err(|e| fail(FailureCause::InfraTransient, e.to_string()))?
        .to_owned();

    let identity = match &deps.identities {
        Some(pool) => Some(pool.lease().ok_or_else(|| {
            fail(
                FailureCause::InfraTransient,
                "no free job uid on this host (256 jobs run under agentq uids already)".into(),
            )
        })?),
        None => None,
    };
    let id = identity.as_ref().map(|l| l.identity);

    // Whatever a previous job left in the scratch directory goes before this one starts
    // (only on the Lambda service, or when told to; never beside another running job).
    if cfg.wipe_scratch.applies() && isolation::running_jobs() <= 1 {
        let (scratch, keep) = (cfg.scratch_dir.clone(), vec![cfg.work_root.clone()]);
        let removed = tokio::task::spawn_blocking(move || isolation::wipe_scratch(&scratch, &keep))
            .await
            .unwrap_or_default();
        if !removed.is_empty() {
            tracing::info!(%job, removed = removed.len(), "scratch directory emptied before the job");
        }
    }

    let ws = match Workspace::create(&cfg.work_root, job, id).await {
        Ok(ws) => ws,
        Err(e @ WorkspaceError::Busy(_)) => {
            return Err(fail(FailureCause::InfraTransient, e.to_string()));
        }
        Err(e) => {
            return Err(fail(
                FailureCause::InfraTransient,
                format!("{e} (work root {})", cfg.work_root.display()),
            ));
        }
    };

    let (resume, restored) = match (segment > 1, &input.record.resume_session) {
        (true, Some(s)) if spec.resume_policy() == ResumePolicy::Auto => {
            let store = checkpoint::Store {
                s3: &deps.clients.s3,
                bucket: &bucket,
                layout: deps.settings.layout(),
                kms_key: cfg.checkpoint_kms_key.as_deref(),
            };
            // The restore must leave the child most of the invocation.
            let budget = input
                .invocation_deadline
                .saturating_duration_since(Instant::now())
                / 3;
            let restored = match checkpoint::restore(store, job, &ws, id, Instant::now() + budget)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%job, error = %e, "checkpoint not restored; resuming without it");
                    false
                }
            };
            if let Some(i) = id
                && let Err(e) = ws.give_to(i)
            {
                tracing::warn!(%job, error = %e, "restored workspace not handed to the job's uid");
            }
            tracing::info!(%job, session = %s, restored, "resuming the session");
            (Some(s.clone()), Some(restored))
        }
        _ => (None, None),
    };

    let credentials = if wants_aws {
        let req = credentials::Request {
            sts: deps.clients.sts.clone(),
            role_arn: cfg.job_role_arn.clone().unwrap_or_default(),
            bucket: bucket.clone(),
            layout: deps.settings.layout().clone(),
            job: job.clone(),
            attempt: input.attempt,
            duration: cfg.job_credentials,
        };
        match JobCredentials::start(req).await {
            Ok(c) => Some(c),
            Err(e) => {
                let cause = if e.is_retryable() {
                    FailureCause::InfraTransient
                } else {
                    FailureCause::SecretDenied
                };
                return Err(fail(cause, e.to_string()));
            }
        }
    } else {
        None
    };

    if let Some(p) = spec.spec.prompt.as_deref()
        && let Err(e) = tokio::fs::write(prompt_file(&ws), p).await
    {
        tracing::warn!(%job, error = %e, "could not write the prompt file");
    }
    let mcp = match &cfg.mcp_config {
        Some(path) if spec.spec.agent == AgentPreset::ClaudeCode => {
            render_mcp_config(path, &ws).await
        }
        _ => None,
    };
    if let (Some(p), Some(i)) = (&mcp, id) {
        let _ = std::os::unix::fs::lchown(p, Some(i.uid), Some(i.gid));
    }
    if spec.spec.agent == AgentPreset::Codex
        && let Err(e) = write_codex_config(cfg.codex_config.as_deref(), &ws, id).await
    {
        return Err(fail(
            FailureCause::InfraTransient,
            format!("could not prepare the Codex config: {e}"),
        ));
    }
    let mut child = build_child(
        deps,
        spec,
        input.attempt,
        segment,
        &ws,
        &secrets,
        resume.as_deref(),
        mcp.as_deref(),
        id.is_none() && isolation::is_root(),
        input.record.cost_usd,
    );
    if let Some(c) = &credentials {
        child.env.extend(c.env.iter().cloned());
    }
    child.identity = id;
    Ok(Prepared {
        ws,
        identity,
        child,
        secret_values: secrets.values().map(str::to_owned).collect(),
        credentials,
        resume,
        restored,
    })
}

fn prompt_file(ws: &Workspace) -> std::path::PathBuf {
    ws.tmp.join("prompt.txt")
}

/// The operator's MCP config with the job's own paths filled in (`${AGENTQ_WORKSPACE}`,
/// `${HOME}`, `${TMPDIR}`, `${AGENTQ_OUT_DIR}`), written into the job's `tmp/`, so the
/// bundled servers keep their state inside the workspace. `None` when it cannot be read
/// (the job runs without MCP servers; logged).
async fn render_mcp_config(path: &std::path::Path, ws: &Workspace) -> Option<std::path::PathBuf> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "MCP config not readable; the job runs without MCP servers");
            return None;
        }
    };
    let json_path = |p: &std::path::Path| {
        // The value lands inside a JSON string: escape it as one.
        let s = serde_json::to_string(&p.display().to_string()).unwrap_or_default();
        s[1..s.len() - 1].to_owned()
    };
    let rendered = text
        .replace("${AGENTQ_WORKSPACE}", &json_path(&ws.work))
        .replace("${HOME}", &json_path(&ws.home))
        .replace("${TMPDIR}", &json_path(&ws.tmp))
        .replace("${AGENTQ_OUT_DIR}", &json_path(&ws.out));
    let out = ws.tmp.join("mcp.json");
    match tokio::fs::write(&out, rendered).await {
        Ok(()) => Some(out),
        Err(e) => {
            tracing::warn!(error = %e, "could not write the job's MCP config");
            None
        }
    }
}

/// What Codex runs with when the operator gives no config: no sandbox of its own (the
/// job's isolation is agentq's, and Codex's Linux sandbox refuses every write otherwise)
/// and no approval prompts (nobody is there to answer).
const DEFAULT_CODEX_CONFIG: &str = "# Written by agentq for this job (AGENTQ_CODEX_CONFIG replaces it).\nsandbox_mode = \"danger-full-access\"\napproval_policy = \"never\"\n";

/// `$HOME/.codex/config.toml` of a codex job: the operator's file, or the default. Codex
/// keeps its sessions next to it, inside the workspace's `home/`, so a checkpoint carries
/// them to the next segment.
async fn write_codex_config(
    template: Option<&std::path::Path>,
    ws: &Workspace,
    id: Option<JobIdentity>,
) -> std::io::Result<()> {
    let dir = ws.home.join(".codex");
    tokio::fs::create_dir_all(&dir).await?;
    let text = match template {
        Some(p) => tokio::fs::read_to_string(p).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("AGENTQ_CODEX_CONFIG {}: {e}", p.display()),
            )
        })?,
        None => DEFAULT_CODEX_CONFIG.to_owned(),
    };
    let file = dir.join("config.toml");
    tokio::fs::write(&file, text).await?;
    if let Some(i) = id {
        for p in [&dir, &file] {
            std::os::unix::fs::lchown(p, Some(i.uid), Some(i.gid))?;
        }
    }
    Ok(())
}

/// Longest prompt passed as an argument; longer ones go through stdin.
const PROMPT_ARG_MAX: usize = 64 * 1024;

/// What the agent CLI is told when a session continues in a new segment.
pub(crate) const RESUME_PROMPT: &str = "You were interrupted because your time slot ended; your session and workspace were restored exactly as they were. Continue the task from where you stopped. Do not redo work that is already done.";

#[allow(clippy::too_many_arguments)]
fn build_child(
    deps: &Deps,
    spec: &ValidSpec,
    attempt: Attempt,
    segment: u32,
    ws: &Workspace,
    secrets: &Secrets,
    resume: Option<&str>,
    mcp_config: Option<&std::path::Path>,
    child_runs_as_root: bool,
    spent_before: f64,
) -> ChildSpec {
    let cfg = &deps.config;
    let s = &spec.spec;
    let original = s.prompt.clone().unwrap_or_default();
    // A resumed CLI session already holds the task: it is told why it stopped instead.
    let prompt = match (resume, s.agent) {
        (Some(_), AgentPreset::ClaudeCode | AgentPreset::Codex) => RESUME_PROMPT.to_owned(),
        _ => original.clone(),
    };
    // One argv string is limited to 128 KiB on Linux: larger prompts go through stdin.
    let via_stdin = prompt.len() > PROMPT_ARG_MAX;
    let mut stdin = None;
    let (program, mut args) = match s.agent {
        AgentPreset::ClaudeCode => {
            let mut a = vec!["-p".to_owned()];
            if via_stdin {
                stdin = Some(prompt.clone().into_bytes());
            } else {
                a.push(prompt.clone());
            }
            a.extend([
                "--output-format".into(),
                "stream-json".into(),
                "--verbose".into(),
                "--permission-mode".into(),
                cfg.claude_permission_mode.clone(),
            ]);
            if let Some(m) = mcp_config {
                a.extend(["--mcp-config".into(), m.display().to_string()]);
            }
            if let Some(n) = s.max_turns {
                a.extend(["--max-turns".into(), n.to_string()]);
            }
            if let Some(b) = s.max_budget_usd {
                // What is left of the job's cap after earlier segments.
                let left = (b - spent_before).max(0.01);
                a.extend(["--max-budget-usd".into(), format!("{left:.4}")]);
            }
            if let Some(m) = &s.model {
                a.extend(["--model".into(), m.clone()]);
            }
            if let Some(r) = resume {
                a.extend(["--resume".into(), r.to_owned()]);
            }
            (cfg.claude_bin.clone(), a)
        }
        AgentPreset::Codex => {
            let mut a = vec![
                "exec".to_owned(),
                "--json".into(),
                "--skip-git-repo-check".into(),
            ];
            if let Some(m) = &s.model {
                a.extend(["--model".into(), m.clone()]);
            }
            if let Some(r) = resume {
                a.extend(["resume".into(), r.to_owned()]);
            }
            if via_stdin {
                stdin = Some(prompt.clone().into_bytes());
                a.push("-".into());
            } else {
                a.push(prompt.clone());
            }
            (cfg.codex_bin.clone(), a)
        }
        AgentPreset::Command => {
            let argv = s.command.clone().unwrap_or_default();
            let mut it = argv.into_iter();
            (it.next().unwrap_or_default(), it.collect())
        }
    };
    args.shrink_to_fit();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), cfg.child_path.clone()),
        ("HOME".into(), ws.home.display().to_string()),
        ("TMPDIR".into(), ws.tmp.display().to_string()),
        ("PWD".into(), ws.work.display().to_string()),
        ("LANG".into(), "C.UTF-8".into()),
        ("AGENTQ_JOB_ID".into(), spec.job_id.to_string()),
        ("AGENTQ_ATTEMPT".into(), attempt.to_string()),
        ("AGENTQ_SEGMENT".into(), segment.to_string()),
        ("AGENTQ_OUT_DIR".into(), ws.out.display().to_string()),
        ("AGENTQ_WORKSPACE".into(), ws.work.display().to_string()),
    ];
    if s.agent == AgentPreset::Command && !original.is_empty() {
        // Written by `prepare` before the child starts (see `prompt_file`).
        env.push((
            "AGENTQ_PROMPT_FILE".into(),
            prompt_file(ws).display().to_string(),
        ));
        if original.len() <= PROMPT_ARG_MAX {
            env.push(("AGENTQ_PROMPT".into(), original));
        }
    }
    if let Some(r) = resume {
        env.push(("AGENTQ_RESUME_SESSION".into(), r.to_owned()));
    }
    if s.agent == AgentPreset::ClaudeCode {
        // Headless: no update checks, telemetry or other calls besides the model API.
        env.push(("DISABLE_AUTOUPDATER".into(), "1".into()));
        env.push((
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
            "1".into(),
        ));
        // Claude Code refuses bypassPermissions as root unless told it is sandboxed; a
        // root child only exists when the operator turned uid isolation off.
        if cfg.claude_permission_mode == "bypassPermissions" && child_runs_as_root {
            env.push(("IS_SANDBOX".into(), "1".into()));
        }
    }
    env.extend(cfg.child_env.iter().cloned());
    env.extend(s.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(secrets.env().map(|(k, v)| (k.clone(), v.clone())));
    ChildSpec {
        program,
        args,
        env,
        cwd: ws.work.clone(),
        stdin,
        identity: None,
    }
}
