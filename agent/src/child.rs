//! The child process: spawned in its own process group with a clean environment, stopped
//! as a group (SIGTERM, a grace period, then SIGKILL), and any stragglers it leaves
//! behind are killed when it ends — a warm Lambda environment runs many jobs.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: String,
    pub args: Vec<String>,
    /// The whole environment: nothing is inherited.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Written to the child's stdin, which is then closed (large prompts go this way:
    /// one argv string is limited to 128 KiB on Linux).
    pub stdin: Option<Vec<u8>>,
}

/// A running child and its process group.
#[derive(Debug)]
pub struct RunningChild {
    child: Child,
    pgid: Option<Pid>,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// SIGKILL was needed after the grace period.
    pub killed: bool,
}

impl Ended {
    fn from_status(s: ExitStatus, killed: bool) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: s.code(),
            signal: s.signal(),
            killed,
        }
    }
}

impl RunningChild {
    /// Spawns `spec` in a new process group with piped stdout/stderr.
    pub fn spawn(spec: &ChildSpec) -> std::io::Result<(Self, ChildStdout, ChildStderr)> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        if let (Some(data), Some(mut pipe)) = (spec.stdin.clone(), child.stdin.take()) {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                // A child that exits without reading gives EPIPE: nothing to do then.
                let _ = pipe.write_all(&data).await;
                let _ = pipe.shutdown().await;
            });
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
        Ok((Self { child, pgid }, stdout, stderr))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the child to exit by itself.
    pub async fn wait(&mut self) -> std::io::Result<Ended> {
        let s = self.child.wait().await?;
        self.kill_stragglers();
        Ok(Ended::from_status(s, false))
    }

    /// SIGTERM to the group, up to `grace` to exit, then SIGKILL to the group.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<Ended> {
        if let Some(pg) = self.pgid {
            let _ = killpg(pg, Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => {
                let s = s?;
                self.kill_stragglers();
                Ok(Ended::from_status(s, false))
            }
            Err(_) => {
                if let Some(pg) = self.pgid {
                    let _ = killpg(pg, Signal::SIGKILL);
                }
                let s = self.child.wait().await?;
                Ok(Ended::from_status(s, true))
            }
        }
    }

    /// Kills whatever is left in the group (grandchildren that outlived the child).
    fn kill_stragglers(&mut self) {
        if let Some(pg) = self.pgid.take() {
            // ESRCH (nothing left) is the normal case.
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}
