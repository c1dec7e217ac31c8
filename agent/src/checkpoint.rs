//! Checkpoints of a resumable session: `session.json` (the session id, attempt, segment)
//! and `workspace.tar.gz` (the workspace's `home/` and `work/`, where the agent CLIs keep
//! their session stores and the job keeps its files), under the job's `checkpoint/`
//! prefix. Both directions stream (tar ⇄ S3 multipart) with bounded memory, run `tar` as
//! the job's own uid (a hostile workspace cannot make a root `tar` follow its links), and
//! write with the checkpoint KMS key when one is configured.

use std::process::Stdio;

use agentq_core::record::now_ms;
use agentq_core::{Attempt, JobId, Layout};
use tokio::process::Command;
use tokio::time::Instant;

use crate::isolation::{self, JobIdentity};
use crate::upload::{ObjectTarget, UploadError, stream_object};
use crate::workspace::Workspace;

/// Where checkpoints live and how they are written.
#[derive(Debug, Clone, Copy)]
pub struct Store<'a> {
    pub s3: &'a aws_sdk_s3::Client,
    pub bucket: &'a str,
    pub layout: &'a Layout,
    pub kms_key: Option<&'a str>,
}

/// Why a checkpoint could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("tar failed: {0}")]
    Tar(String),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("reading the checkpoint failed: {0}")]
    Download(String),
}

/// The first 2 KiB of what tar said (after it ended).
async fn tar_stderr(err: &mut Option<tokio::process::ChildStderr>) -> String {
    use tokio::io::AsyncReadExt;
    let Some(e) = err.as_mut() else {
        return String::new();
    };
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        e.take(2048).read_to_end(&mut buf),
    )
    .await;
    String::from_utf8_lossy(&buf).trim().to_owned()
}

fn tar(identity: Option<JobIdentity>) -> Command {
    let mut c = Command::new("tar");
    if let Some(id) = identity {
        c.uid(id.uid).gid(id.gid);
    }
    c.kill_on_drop(true);
    c
}

/// Archives the workspace and records the session; returns the `session.json` key.
#[allow(clippy::too_many_arguments)]
pub async fn save(
    store: Store<'_>,
    job: &JobId,
    ws: &Workspace,
    identity: Option<JobIdentity>,
    session: &str,
    attempt: Attempt,
    segment: u32,
    deadline: Instant,
) -> Result<String, CheckpointError> {
    let archive_key = store.layout.checkpoint_archive(job);
    let mut cmd = tar(identity);
    // current_dir, not `-C`: tar opens a `-C` directory for reading, and the workspace
    // root is only passable (0711) for the job's uid.
    // gzip -1: a big workspace must be archived within the finalize's budget; the
    // fastest level still shrinks text and transcripts several times.
    cmd.current_dir(&ws.root)
        .args(["-I", "gzip -1", "-cf", "-"])
        .args(["home", "work"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| CheckpointError::Tar(e.to_string()))?;
    let pid = child.id();
    if let Some(p) = pid {
        isolation::register_spawned(p);
    }
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| CheckpointError::Tar("no stdout".into()))?;
    let target = ObjectTarget {
        s3: store.s3,
        bucket: store.bucket,
        key: &archive_key,
        content_type: "application/gzip",
        kms_key: store.kms_key,
    };
    let mut err = child.stderr.take();
    let uploaded = stream_object(&target, &mut out, deadline).await;
    drop(out);
    let status = tokio::time::timeout_at(deadline, child.wait()).await;
    let why = tar_stderr(&mut err).await;
    if let Some(p) = pid {
        isolation::unregister_spawned(p);
    }
    let bytes = uploaded?;
    match status {
        Ok(Ok(s)) if s.success() => {}
        Ok(Ok(s)) => return Err(CheckpointError::Tar(format!("tar ended with {s}: {why}"))),
        _ => return Err(CheckpointError::Tar("tar did not finish in time".into())),
    }
    let key = store.layout.checkpoint(job);
    let meta = serde_json::json!({
        "session_id": session,
        "attempt": attempt.get(),
        "segment": segment,
        "workspace_archive": archive_key,
        "workspace_archive_bytes": bytes,
        "at": now_ms(),
    })
    .to_string();
    let target = ObjectTarget {
        key: &key,
        content_type: "application/json",
        ..target
    };
    stream_object(&target, &mut meta.as_bytes(), deadline).await?;
    Ok(key)
}

/// Restores the workspace archive into `ws` (same absolute path as when it was saved).
/// `Ok(false)` when the job has no archive.
pub async fn restore(
    store: Store<'_>,
    job: &JobId,
    ws: &Workspace,
    identity: Option<JobIdentity>,
    deadline: Instant,
) -> Result<bool, CheckpointError> {
    let key = store.layout.checkpoint_archive(job);
    let obj = match store
        .s3
        .get_object()
        .bucket(store.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
            return Ok(false);
        }
        Err(e) => return Err(CheckpointError::Download(agentq_core::aws::display(&e))),
    };
    let mut cmd = tar(identity);
    cmd.current_dir(&ws.root)
        .arg("-xzf")
        .arg("-")
        .arg("--no-same-owner")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| CheckpointError::Tar(e.to_string()))?;
    let pid = child.id();
    if let Some(p) = pid {
        isolation::register_spawned(p);
    }
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| CheckpointError::Tar("no stdin".into()))?;
    let mut body = obj.body.into_async_read();
    let mut err = child.stderr.take();
    let copied = tokio::time::timeout_at(deadline, tokio::io::copy(&mut body, &mut stdin)).await;
    drop(stdin);
    let status = tokio::time::timeout_at(deadline, child.wait()).await;
    let why = tar_stderr(&mut err).await;
    if let Some(p) = pid {
        isolation::unregister_spawned(p);
    }
    match copied {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(CheckpointError::Download(e.to_string())),
        Err(_) => return Err(CheckpointError::Download("restore ran out of time".into())),
    }
    match status {
        Ok(Ok(s)) if s.success() => Ok(true),
        Ok(Ok(s)) => Err(CheckpointError::Tar(format!("tar ended with {s}: {why}"))),
        _ => Err(CheckpointError::Tar("tar did not finish in time".into())),
    }
}
