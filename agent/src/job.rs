//! Running one claimed job: secrets, workspace, the child, heartbeats, log streaming, the
//! deadline, artifacts, checkpoint and the result manifest. Returns the attempt's outcome;
//! the caller ([`crate::handler`]) makes the final write and acknowledges the message.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentq_core::record::{EpochMillis, now_ms};
use agentq_core::spec::ResumePolicy;
use agentq_core::store::{Finish, StoreError};
use agentq_core::{
    AgentPreset, Attempt, FailureCause, JobRecord, JobState, Progress, Stream, ValidSpec,
};
use bytes::Bytes;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Deps;
use crate::child::{ChildSpec, Ended, RunningChild};
use crate::logs::{StreamSink, StreamStats, spawn_uploader};
use crate::redact::Redactor;
use crate::secrets::{self, Secrets};
use crate::workspace::Workspace;

/// The SQS message a run keeps invisible while it works.
#[derive(Debug, Clone)]
pub struct VisibilityLease {
    pub queue_url: String,
    pub receipt_handle: String,
}

/// Inputs of one run.
#[derive(Debug)]
pub struct RunInput<'a> {
    pub spec: &'a ValidSpec,
    pub attempt: Attempt,
    pub record: &'a JobRecord,
    /// The hard end of the invocation (Lambda deadline, or simulated).
    pub invocation_deadline: Instant,
    pub visibility: Option<VisibilityLease>,
    pub shutdown: CancellationToken,
}

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub finish: Finish,
    /// The lease was taken by another attempt: do not write anything more.
    pub lease_lost: bool,
    pub segment: u32,
}

/// Why the child was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Deadline,
    Cancelled,
    LeaseLost,
    Shutdown,
}

#[derive(Debug, Serialize)]
struct ArtifactEntry {
    path: String,
    key: String,
    bytes: u64,
    sha256: String,
}

/// `result.json`.
#[derive(Debug, Serialize)]
struct Manifest<'a> {
    job_id: &'a str,
    attempt: u32,
    segment: u32,
    status: JobState,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<&'a FailureCause>,
    reason: &'a str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    killed: bool,
    stop_reason: Option<StopReason>,
    started_at: EpochMillis,
    finished_at: EpochMillis,
    duration_ms: u64,
    child_deadline_at: EpochMillis,
    invocation_deadline_at: EpochMillis,
    /// Time from the child's end to this manifest (log drain + artifacts + checkpoint).
    finalize_ms: u64,
    streams: BTreeMap<&'static str, StreamStats>,
    artifacts: Vec<ArtifactEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_key: Option<String>,
    progress: &'a Progress,
    agent_version: &'static str,
}

fn epoch_of(at: Instant) -> EpochMillis {
    let now = Instant::now();
    if at >= now {
        now_ms() + (at - now).as_millis() as i64
    } else {
        now_ms() - (now - at).as_millis() as i64
    }
}

fn fail(cause: FailureCause, reason: String, progress: Progress) -> Finish {
    Finish {
        state: cause.final_state(),
        cause: Some(cause),
        reason,
        exit_code: None,
        signal: None,
        result_key: None,
        progress,
        runtime_ms: 0,
    }
}

/// Runs a claimed job to its end and uploads everything it produced.
pub async fn run(deps: &Arc<Deps>, input: RunInput<'_>) -> RunOutcome {
    let started = Instant::now();
    let started_ms = now_ms();
    let spec = input.spec;
    let job = &spec.job_id;
    let layout = deps.settings.layout();
    let segment = input.record.segment.max(1);
    let outcome = |finish: Finish| RunOutcome {
        finish,
        lease_lost: false,
        segment,
    };

    // Secrets and AWS access are settled before anything starts.
    if spec.spec.aws_credentials == Some(true) && !deps.config.allow_job_aws_credentials {
        return outcome(fail(
            FailureCause::SecretDenied,
            "the job asks for aws_credentials but this agent does not allow it (AGENTQ_ALLOW_JOB_AWS_CREDENTIALS)".into(),
            Progress::default(),
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
            return outcome(fail(e.cause(), e.to_string(), Progress::default()));
        }
    };
    let redactor = Redactor::new(secrets.values());

    let ws = match Workspace::create(&deps.config.work_root, job, input.attempt).await {
        Ok(ws) => ws,
        Err(e) => {
            return outcome(fail(
                FailureCause::InfraTransient,
                format!(
                    "could not create the workspace under {}: {e}",
                    deps.config.work_root.display()
                ),
                Progress::default(),
            ));
        }
    };

    let resume_session = match (segment > 1, &input.record.resume_session) {
        (true, Some(s)) if spec.resume_policy() == ResumePolicy::Auto => {
            restore_checkpoint(deps, &input, &ws).await;
            Some(s.clone())
        }
        _ => None,
    };

    if let Some(p) = spec.spec.prompt.as_deref()
        && let Err(e) = tokio::fs::write(prompt_file(&ws), p).await
    {
        tracing::warn!(%job, error = %e, "could not write the prompt file");
    }
    let child_spec = build_child(
        deps,
        spec,
        input.attempt,
        segment,
        &ws,
        &secrets,
        resume_session.as_deref(),
    );
    let remaining_job = Duration::from_millis(
        (spec.timeout_seconds() * 1000).saturating_sub(input.record.runtime_ms),
    )
    .max(Duration::from_secs(1));
    let child_deadline = (started + remaining_job).min(
        input
            .invocation_deadline
            .checked_sub(deps.config.reserve)
            .unwrap_or(started),
    );

    let progress = Arc::new(Mutex::new(Progress::default()));
    let s3 = deps.clients.s3.clone();
    let bucket = match deps.settings.bucket() {
        Ok(b) => b.to_owned(),
        Err(e) => {
            return outcome(fail(
                FailureCause::InfraTransient,
                e.to_string(),
                Progress::default(),
            ));
        }
    };
    let mut uploaders = Vec::new();
    let mut sinks = BTreeMap::new();
    for stream in Stream::ALL {
        let (sink, handle) = spawn_uploader(
            s3.clone(),
            bucket.clone(),
            layout.clone(),
            job.clone(),
            input.attempt,
            stream,
            deps.config.flush,
        );
        sinks.insert(stream.as_str(), sink);
        uploaders.push((stream.as_str(), handle));
    }

    let spawned = RunningChild::spawn(&child_spec);
    let (mut child, stdout, stderr) = match spawned {
        Ok(c) => c,
        Err(e) => {
            drop(sinks);
            for (_, h) in uploaders {
                let _ = h.await;
            }
            ws.remove().await;
            return outcome(Finish {
                exit_code: Some(127),
                ..fail(
                    FailureCause::AgentExit {
                        code: Some(127),
                        signal: None,
                    },
                    format!("could not start {:?}: {e}", child_spec.program),
                    Progress::default(),
                )
            });
        }
    };
    tracing::info!(%job, attempt = %input.attempt, pid = ?child.pid(), program = %child_spec.program, "child started");

    let out_reader = tokio::spawn(pump(
        stdout,
        Redactor::new(secrets.values()),
        sinks["stdout"].clone(),
        Some((sinks["events"].clone(), progress.clone())),
        progress.clone(),
        true,
    ));
    let err_reader = tokio::spawn(pump(
        stderr,
        Redactor::new(secrets.values()),
        sinks["stderr"].clone(),
        None,
        progress.clone(),
        false,
    ));
    drop(sinks);

    // Heartbeats: DynamoDB progress + cancel flag, SQS visibility.
    let (stop_tx, mut stop_rx) = watch::channel::<Option<StopReason>>(None);
    let hb_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(
        deps.clone(),
        job.clone(),
        input.attempt,
        progress.clone(),
        input.visibility.clone(),
        stop_tx,
        hb_stop.clone(),
    ));

    let mut stop_reason = None;
    let ended: std::io::Result<Ended> = tokio::select! {
        r = child.wait() => r,
        _ = tokio::time::sleep_until(child_deadline) => {
            stop_reason = Some(StopReason::Deadline);
            child.stop(deps.config.grace).await
        }
        _ = input.shutdown.cancelled() => {
            stop_reason = Some(StopReason::Shutdown);
            child.stop(deps.config.grace).await
        }
        r = async {
            loop {
                if stop_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if let Some(r) = *stop_rx.borrow() { return r; }
            }
        } => {
            stop_reason = Some(r);
            child.stop(deps.config.grace).await
        }
    };
    let child_ended = Instant::now();
    let ended = ended.unwrap_or(Ended {
        code: None,
        signal: None,
        killed: false,
    });

    // Readers end at EOF; a grandchild that escaped the group could hold the pipe open.
    for r in [out_reader, err_reader] {
        let abort = r.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), r)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    // Stop heartbeats before anything final (a heartbeat after the ack would fail).
    hb_stop.cancel();
    let _ = heartbeat.await;

    let upload_deadline = input
        .invocation_deadline
        .checked_sub(Duration::from_millis(500))
        .unwrap_or_else(Instant::now);
    let mut streams = BTreeMap::new();
    for (name, h) in uploaders {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(upload_deadline, h).await {
            Ok(Ok(stats)) => {
                streams.insert(name, stats);
            }
            _ => {
                abort.abort();
                tracing::error!(%job, stream = name, "log upload did not finish before the deadline");
            }
        }
    }
    let final_progress = progress.lock().map(|p| p.clone()).unwrap_or_default();

    let (state, cause, reason) = classify(spec, &ended, stop_reason, &final_progress, &redactor);
    let artifacts = upload_artifacts(deps, &input, &ws, &bucket, upload_deadline).await;
    let checkpoint_key = match (&cause, &final_progress.session_id) {
        (Some(FailureCause::TimedOut { resumable: true }), Some(session)) => {
            save_checkpoint(deps, &input, &ws, &bucket, session, segment).await
        }
        _ => None,
    };
    let finished_ms = now_ms();
    let result_key = layout.result(job, input.attempt);
    let manifest = Manifest {
        job_id: job.as_str(),
        attempt: input.attempt.get(),
        segment,
        status: state,
        cause: cause.as_ref(),
        reason: &reason,
        exit_code: ended.code,
        signal: ended.signal,
        killed: ended.killed,
        stop_reason,
        started_at: started_ms,
        finished_at: finished_ms,
        duration_ms: (finished_ms - started_ms).max(0) as u64,
        child_deadline_at: epoch_of(child_deadline),
        invocation_deadline_at: epoch_of(input.invocation_deadline),
        finalize_ms: child_ended.elapsed().as_millis() as u64,
        streams,
        artifacts,
        checkpoint_key,
        progress: &final_progress,
        agent_version: env!("CARGO_PKG_VERSION"),
    };
    let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let put = s3
        .put_object()
        .bucket(&bucket)
        .key(&result_key)
        .content_type("application/json")
        .body(body.into())
        .send()
        .await;
    if let Err(e) = &put {
        tracing::error!(%job, %bucket, key = %result_key, error = %agentq_core::aws::display(e), "result manifest upload failed");
    }
    ws.remove().await;

    RunOutcome {
        finish: Finish {
            state,
            cause,
            reason,
            exit_code: ended.code,
            signal: ended.signal,
            result_key: put.is_ok().then_some(result_key),
            progress: final_progress,
            runtime_ms: child_ended.duration_since(started).as_millis() as u64,
        },
        lease_lost: stop_reason == Some(StopReason::LeaseLost),
        segment,
    }
}

fn classify(
    spec: &ValidSpec,
    ended: &Ended,
    stop: Option<StopReason>,
    progress: &Progress,
    redactor: &Redactor,
) -> (JobState, Option<FailureCause>, String) {
    let how = match (ended.code, ended.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    };
    let killed = if ended.killed {
        ", killed after the grace period"
    } else {
        ""
    };
    match stop {
        Some(StopReason::Cancelled) => (
            JobState::Cancelled,
            Some(FailureCause::Cancelled),
            format!("cancelled on request; child stopped ({how}{killed})"),
        ),
        Some(StopReason::Deadline) | Some(StopReason::Shutdown) | Some(StopReason::LeaseLost) => {
            let resumable =
                progress.session_id.is_some() && spec.resume_policy() == ResumePolicy::Auto;
            let why = match stop {
                Some(StopReason::Shutdown) => "the agent is shutting down",
                Some(StopReason::LeaseLost) => "another attempt took over the lease",
                _ => "the deadline was reached",
            };
            (
                JobState::TimedOut,
                Some(FailureCause::TimedOut { resumable }),
                format!("stopped because {why} ({how}{killed})"),
            )
        }
        None if ended.code == Some(0) => (JobState::Succeeded, None, "exit code 0".into()),
        None => {
            let last = progress
                .last_event
                .as_deref()
                .map(|e| format!("; last event {}", redactor.redact_str(e)))
                .unwrap_or_default();
            (
                JobState::Failed,
                Some(FailureCause::AgentExit {
                    code: ended.code,
                    signal: ended.signal,
                }),
                format!("the agent exited with {how}{last}"),
            )
        }
    }
}

fn prompt_file(ws: &Workspace) -> std::path::PathBuf {
    ws.tmp.join("prompt.txt")
}

/// Longest prompt passed as an argument; longer ones go through stdin.
const PROMPT_ARG_MAX: usize = 64 * 1024;

fn build_child(
    deps: &Deps,
    spec: &ValidSpec,
    attempt: Attempt,
    segment: u32,
    ws: &Workspace,
    secrets: &Secrets,
    resume: Option<&str>,
) -> ChildSpec {
    let cfg = &deps.config;
    let s = &spec.spec;
    let prompt = s.prompt.clone().unwrap_or_default();
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
            if let Some(m) = &cfg.mcp_config {
                a.extend(["--mcp-config".into(), m.display().to_string()]);
            }
            if let Some(n) = s.max_turns {
                a.extend(["--max-turns".into(), n.to_string()]);
            }
            if let Some(b) = s.max_budget_usd {
                a.extend(["--max-budget-usd".into(), b.to_string()]);
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
    if s.agent == AgentPreset::Command && !prompt.is_empty() {
        // Written by `run` before the child starts (see `prompt_file`).
        env.push((
            "AGENTQ_PROMPT_FILE".into(),
            prompt_file(ws).display().to_string(),
        ));
        if !via_stdin {
            env.push(("AGENTQ_PROMPT".into(), prompt));
        }
    }
    if let Some(r) = resume {
        env.push(("AGENTQ_RESUME_SESSION".into(), r.to_owned()));
    }
    if s.aws_credentials == Some(true) && cfg.allow_job_aws_credentials {
        for (k, v) in std::env::vars() {
            if k.starts_with("AWS_") {
                env.push((k, v));
            }
        }
    }
    env.extend(s.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(secrets.env().map(|(k, v)| (k.clone(), v.clone())));
    ChildSpec {
        program,
        args,
        env,
        cwd: ws.work.clone(),
        stdin,
    }
}

/// Reads a pipe in chunks, redacts, and feeds the stream's uploader (and, for stdout, the
/// event parser and the events stream).
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    mut pipe: R,
    mut redactor: Redactor,
    sink: StreamSink,
    events: Option<(StreamSink, Arc<Mutex<Progress>>)>,
    progress: Arc<Mutex<Progress>>,
    is_stdout: bool,
) {
    const MAX_EVENT_LINE: usize = 1024 * 1024;
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let mut overlong = false;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let clean = if n == 0 {
            redactor.finish()
        } else {
            redactor.push(&buf[..n])
        };
        if !clean.is_empty() {
            if let Ok(mut p) = progress.lock() {
                if is_stdout {
                    p.stdout_bytes += clean.len() as u64;
                } else {
                    p.stderr_bytes += clean.len() as u64;
                }
            }
            if let Some((ev_sink, prog)) = &events {
                let mut lines_out: Vec<u8> = Vec::new();
                for chunk in clean.split_inclusive(|b| *b == b'\n') {
                    if line.len() + chunk.len() > MAX_EVENT_LINE {
                        overlong = true;
                        line.clear();
                    } else {
                        line.extend_from_slice(chunk);
                    }
                    if chunk.ends_with(b"\n") {
                        // The std mutex is never held across an await.
                        if !overlong
                            && let Ok(mut p) = prog.lock()
                            && crate::events::observe_line(&mut p, &line)
                        {
                            lines_out.extend_from_slice(&line);
                        }
                        line.clear();
                        overlong = false;
                    }
                }
                if !lines_out.is_empty() {
                    ev_sink.send(Bytes::from(lines_out)).await;
                }
            }
            sink.send(Bytes::from(clean)).await;
        }
        if n == 0 {
            break;
        }
    }
    if let Some((ev_sink, prog)) = &events
        && !line.is_empty()
        && !overlong
        && prog
            .lock()
            .map(|mut p| crate::events::observe_line(&mut p, &line))
            .unwrap_or(false)
    {
        line.push(b'\n');
        ev_sink.send(Bytes::from(line)).await;
    }
}

async fn heartbeat_loop(
    deps: Arc<Deps>,
    job: agentq_core::JobId,
    attempt: Attempt,
    progress: Arc<Mutex<Progress>>,
    visibility: Option<VisibilityLease>,
    stop: watch::Sender<Option<StopReason>>,
    done: CancellationToken,
) {
    let mut tick = tokio::time::interval(deps.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = progress.lock().map(|p| p.clone()).unwrap_or_default();
        match deps
            .store
            .heartbeat(&job, attempt, &snapshot, now_ms())
            .await
        {
            Ok(ack) if ack.cancel_requested => {
                tracing::info!(%job, %attempt, "cancel requested; stopping the child");
                let _ = stop.send(Some(StopReason::Cancelled));
            }
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                tracing::warn!(%job, %attempt, "lease lost to another attempt; stopping the child");
                let _ = stop.send(Some(StopReason::LeaseLost));
                return;
            }
            Err(e) => {
                tracing::warn!(%job, %attempt, error = %e, retryable = e.is_retryable(), "heartbeat failed")
            }
        }
        if let Some(v) = &visibility
            && let Err(e) = deps
                .clients
                .sqs
                .change_message_visibility()
                .queue_url(&v.queue_url)
                .receipt_handle(&v.receipt_handle)
                .visibility_timeout(deps.config.visibility_horizon as i32)
                .send()
                .await
        {
            tracing::warn!(%job, error = %agentq_core::aws::display(&e), "visibility extension failed");
        }
    }
}

async fn upload_artifacts(
    deps: &Deps,
    input: &RunInput<'_>,
    ws: &Workspace,
    bucket: &str,
    deadline: Instant,
) -> Vec<ArtifactEntry> {
    use sha2::{Digest, Sha256};
    let layout = deps.settings.layout();
    let mut out = Vec::new();
    for (rel, path) in ws.artifacts(1000).await {
        if Instant::now() >= deadline {
            tracing::warn!(job = %input.spec.job_id, "artifact upload stopped at the deadline");
            break;
        }
        let Some(key) = layout.artifact(&input.spec.job_id, input.attempt, &rel) else {
            continue;
        };
        let Ok(data) = tokio::fs::read(&path).await else {
            continue;
        };
        let entry = ArtifactEntry {
            path: rel,
            key: key.clone(),
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
        };
        match deps
            .clients
            .s3
            .put_object()
            .bucket(bucket)
            .key(&key)
            .body(data.into())
            .send()
            .await
        {
            Ok(_) => out.push(entry),
            Err(e) => {
                tracing::error!(%bucket, %key, error = %agentq_core::aws::display(&e), "artifact upload failed")
            }
        }
    }
    out
}

fn checkpoint_archive_key(deps: &Deps, job: &agentq_core::JobId) -> String {
    deps.settings
        .layout()
        .checkpoint(job)
        .replace("session.json", "workspace.tar.gz")
}

/// Saves the session id and an archive of `home/` and `work/` so the next segment can
/// resume the agent's session where this one stopped.
async fn save_checkpoint(
    deps: &Deps,
    input: &RunInput<'_>,
    ws: &Workspace,
    bucket: &str,
    session: &str,
    segment: u32,
) -> Option<String> {
    let job = &input.spec.job_id;
    let key = deps.settings.layout().checkpoint(job);
    let archive = ws.tmp.join("checkpoint.tar.gz");
    let tar = tokio::process::Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&ws.root)
        .args(["home", "work"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    let archive_key = checkpoint_archive_key(deps, job);
    let mut has_archive = false;
    if matches!(tar, Ok(s) if s.success())
        && let Ok(body) = aws_sdk_s3::primitives::ByteStream::from_path(&archive).await
    {
        has_archive = deps
            .clients
            .s3
            .put_object()
            .bucket(bucket)
            .key(&archive_key)
            .body(body)
            .send()
            .await
            .is_ok();
    }
    let meta = serde_json::json!({
        "session_id": session,
        "attempt": input.attempt.get(),
        "segment": segment,
        "workspace_archive": has_archive.then_some(&archive_key),
        "at": now_ms(),
    });
    deps.clients
        .s3
        .put_object()
        .bucket(bucket)
        .key(&key)
        .body(meta.to_string().into_bytes().into())
        .send()
        .await
        .ok()
        .map(|_| key)
}

async fn restore_checkpoint(deps: &Deps, input: &RunInput<'_>, ws: &Workspace) {
    let Ok(bucket) = deps.settings.bucket() else {
        return;
    };
    let key = checkpoint_archive_key(deps, &input.spec.job_id);
    let Ok(obj) = deps
        .clients
        .s3
        .get_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
    else {
        tracing::info!(job = %input.spec.job_id, "no workspace archive to restore; resuming with a fresh workspace");
        return;
    };
    let Ok(data) = obj.body.collect().await else {
        return;
    };
    let archive = ws.tmp.join("restore.tar.gz");
    if tokio::fs::write(&archive, data.into_bytes()).await.is_err() {
        return;
    }
    let ok = tokio::process::Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&ws.root)
        .arg("--no-same-owner")
        .status()
        .await
        .is_ok_and(|s| s.success());
    let _ = tokio::fs::remove_file(&archive).await;
    tracing::info!(job = %input.spec.job_id, restored = ok, "workspace restored from checkpoint");
}
