//! The child process: spawned in its own process group with a clean environment, under
//! the job's own uid when the agent is root, dying with the agent (`PR_SET_PDEATHSIG`),
//! stopped as a group (SIGTERM, a grace period, then SIGKILL). Everything it leaves behind
//! is killed by [`crate::isolation::sweep`] when the job ends.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::isolation::{self, JobIdentity};

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
    /// Run as this uid/gid (the agent must be root); `None` = the agent's own.
    pub identity: Option<JobIdentity>,
}

/// A running child and its process group.
#[derive(Debug)]
pub struct RunningChild {
    child: Child,
    pid: Option<u32>,
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

/// Makes the child die with the agent: `PR_SET_PDEATHSIG` = SIGKILL, set between fork and
/// exec. If the agent already died in between, the exec is refused instead.
///
/// This is the one place in the workspace that needs `unsafe`: `pre_exec` runs its
/// closure in the forked child, where only async-signal-safe calls are allowed.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the child after fork and before exec. It calls two raw
    // system calls through nix (prctl, getppid), which neither allocate nor take locks,
    // so they are async-signal-safe; it captures only a `Pid` (Copy) and builds the error
    // from a raw OS error code without allocating a message.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The agent died between fork and prctl: the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

impl RunningChild {
    /// Spawns `spec` in a new process group with piped stdout/stderr.
    ///
    /// Call it from an async task (a runtime worker thread): the parent-death signal fires
    /// when the spawning *thread* exits, and worker threads live as long as the runtime.
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
        if let Some(id) = spec.identity {
            // std drops the supplementary groups too when root changes the uid.
            cmd.uid(id.uid).gid(id.gid);
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        if let Some(p) = pid {
            isolation::register_spawned(p);
        }
        let pgid = pid.map(|id| Pid::from_raw(id as i32));
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
        Ok((Self { child, pid, pgid }, stdout, stderr))
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Waits for the child to exit by itself.
    pub async fn wait(&mut self) -> std::io::Result<Ended> {
        let s = self.child.wait().await?;
        self.kill_group();
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
                self.kill_group();
                Ok(Ended::from_status(s, false))
            }
            Err(_) => {
                self.kill_group();
                let s = self.child.wait().await?;
                Ok(Ended::from_status(s, true))
            }
        }
    }

    /// Kills whatever is left in the group (grandchildren that outlived the child).
    fn kill_group(&mut self) {
        if let Some(pg) = self.pgid.take() {
            // ESRCH (nothing left) is the normal case.
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}

impl Drop for RunningChild {
    fn drop(&mut self) {
        self.kill_group();
        if let Some(p) = self.pid {
            isolation::unregister_spawned(p);
        }
    }
}

/// Runs a helper command of the agent's own (e.g. `tar`) to completion, registered so the
/// orphan sweep leaves it alone. Output is discarded; returns whether it succeeded.
pub async fn run_helper(mut cmd: Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let pid = child.id();
    if let Some(p) = pid {
        isolation::register_spawned(p);
    }
    let ok = child.wait().await.is_ok_and(|s| s.success());
    if let Some(p) = pid {
        isolation::unregister_spawned(p);
    }
    ok
}
