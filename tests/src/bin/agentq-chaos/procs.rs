//! The processes of a chaos run: the emulator, the agent pollers and the dispatcher
//! (spawned, SIGKILLed and restarted, stopped at the end), and the watcher that finds job
//! children by the run's marker in their argv or environment and tells which outlived
//! the agent that started them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Which long-running program a process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Poller(usize),
    Dispatcher,
    /// `agentq-dispatcher sweep --every`: re-plans the jobs whose message is gone.
    Sweeper,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Poller(i) => write!(f, "poller-{i}"),
            Self::Dispatcher => f.write_str("dispatcher"),
            Self::Sweeper => f.write_str("sweeper"),
        }
    }
}

/// How to start one role.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A running program of the run.
#[derive(Debug)]
struct Running {
    child: Child,
    pid: u32,
    generation: u32,
}

/// The pollers and the dispatcher: start, kill -9 and restart, stop.
#[derive(Debug)]
pub struct Fleet {
    launches: BTreeMap<Role, Launch>,
    running: BTreeMap<Role, Running>,
    logs: PathBuf,
    /// Pids of the live agents (pollers), read by the [`Watcher`].
    pub live_agents: Arc<Mutex<HashSet<u32>>>,
    /// Agent pid → epoch ms of its SIGKILL.
    pub killed: HashMap<u32, i64>,
    pub restarts: u32,
}

impl Fleet {
    pub fn new(launches: BTreeMap<Role, Launch>, logs: PathBuf) -> Self {
        Self {
            launches,
            running: BTreeMap::new(),
            logs,
            live_agents: Arc::default(),
            killed: HashMap::new(),
            restarts: 0,
        }
    }

    pub fn roles(&self) -> Vec<Role> {
        self.launches.keys().copied().collect()
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for role in self.roles() {
            self.start(role, 0)?;
        }
        Ok(())
    }

    fn start(&mut self, role: Role, generation: u32) -> anyhow::Result<()> {
        let l = self
            .launches
            .get(&role)
            .with_context(|| format!("no launch for {role}"))?;
        let log_path = self.logs.join(format!("{role}.{generation}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(&l.program)
            .args(&l.args)
            .env_clear()
            .envs(l.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", l.program.display()))?;
        let pid = child.id().context("child has no pid")?;
        if matches!(role, Role::Poller(_))
            && let Ok(mut live) = self.live_agents.lock()
        {
            live.insert(pid);
        }
        self.running.insert(
            role,
            Running {
                child,
                pid,
                generation,
            },
        );
        Ok(())
    }

    /// SIGKILL `role` and start it again. Returns the pid that was killed.
    pub async fn kill_and_restart(&mut self, role: Role) -> anyhow::Result<Option<u32>> {
        let mut killed = None;
        let mut generation = 0;
        if let Some(mut r) = self.running.remove(&role) {
            // Reaped right away so the pid is not reused while the watcher still knows it.
            let _ = r.child.start_kill();
            self.killed.insert(r.pid, agentq_core::record::now_ms());
            let _ = r.child.wait().await;
            if let Ok(mut live) = self.live_agents.lock() {
                live.remove(&r.pid);
            }
            killed = Some(r.pid);
            generation = r.generation + 1;
        }
        self.restarts += 1;
        self.start(role, generation)?;
        Ok(killed)
    }

    /// Processes that exited on their own (a crash of ours, not a kill): restarted, and
    /// reported.
    pub async fn restart_exited(&mut self) -> anyhow::Result<Vec<(Role, String)>> {
        let mut exited = Vec::new();
        for role in self.roles() {
            let Some(r) = self.running.get_mut(&role) else {
                continue;
            };
            if let Ok(Some(status)) = r.child.try_wait() {
                let pid = r.pid;
                let generation = r.generation + 1;
                self.running.remove(&role);
                if let Ok(mut live) = self.live_agents.lock() {
                    live.remove(&pid);
                }
                exited.push((role, status.to_string()));
                self.restarts += 1;
                self.start(role, generation)?;
            }
        }
        Ok(exited)
    }

    /// SIGTERM to everything, up to `grace` to drain, then SIGKILL.
    pub async fn stop_all(&mut self, grace: Duration) {
        for r in self.running.values() {
            let _ = kill(Pid::from_raw(r.pid as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        for (_, mut r) in std::mem::take(&mut self.running) {
            if tokio::time::timeout_at(deadline, r.child.wait())
                .await
                .is_err()
            {
                let _ = r.child.start_kill();
                let _ = r.child.wait().await;
            }
            if let Ok(mut live) = self.live_agents.lock() {
                live.remove(&r.pid);
            }
        }
    }
}

/// moto's server on its own port, stopped (and waited for) on [`Emulator::stop`] or drop.
#[derive(Debug)]
pub struct Emulator {
    child: Child,
    pub endpoint: String,
}

impl Emulator {
    pub async fn start(log: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(log)?;
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("python3 -m moto.server (install it with: python3 -m pip install 'moto[server]==5.2.1')")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if tokio::task::spawn_blocking(move || agentq_testkit::emulator_answers(port))
                .await
                .unwrap_or(false)
            {
                return Ok(Self { child, endpoint });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("moto did not answer on {endpoint} within 30 s")
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// A job child seen outliving its agent.
#[derive(Debug, Clone, Serialize)]
pub struct Orphan {
    pub pid: u32,
    /// How long it went on after its agent was killed (or, when its agent is unknown, how
    /// long it was seen without a live agent as parent), in ms.
    pub orphaned_ms: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// The live agent it was first seen under.
    agent: Option<u32>,
    /// Epoch ms of the first and last sample without a live agent as parent.
    orphan_since: Option<i64>,
    last_orphan: Option<i64>,
    last_seen: i64,
}

/// Samples `/proc` every 100 ms, in a task of its own, for job children of this run:
/// processes whose argv carries `marker`. Remembers the agent each child was started by.
#[derive(Debug, Default)]
pub struct Watcher {
    /// Key: pid and its start time (so a reused pid is a new process).
    seen: HashMap<(u32, u64), Seen>,
}

/// The watcher's task; [`WatcherTask::finish`] stops it and returns what it saw.
#[derive(Debug)]
pub struct WatcherTask {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Watcher>,
}

impl WatcherTask {
    pub fn start(marker: String, live_agents: Arc<Mutex<HashSet<u32>>>) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut w = Watcher::default();
            loop {
                w.sample(&marker, &live_agents).await;
                tokio::select! {
                    _ = &mut stopped => return w,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Watcher {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// One process from `/proc`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub start_ticks: u64,
    pub cmdline: String,
}

/// Processes whose argv (or, with `env`, environment) contains `needle`. Blocking: call
/// from `spawn_blocking`.
pub fn find_processes(needle: &str, env: bool) -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let mut hit = cmd.contains(needle);
        if !hit && env {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            hit = String::from_utf8_lossy(&environ).contains(needle);
        }
        if !hit {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the last ')' (the command name may contain spaces and parens).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest: state(0) ppid(1) ... starttime is field 22 of stat, index 19 here.
        if f.first() == Some(&"Z") {
            continue;
        }
        let ppid = f.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let start_ticks = f.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push(ProcInfo {
            pid,
            ppid,
            start_ticks,
            cmdline: cmd,
        });
    }
    out
}

impl Watcher {
    async fn sample(&mut self, marker: &str, live_agents: &Mutex<HashSet<u32>>) {
        let m = marker.to_owned();
        let procs = tokio::task::spawn_blocking(move || find_processes(&m, false))
            .await
            .unwrap_or_default();
        let live = live_agents.lock().map(|l| l.clone()).unwrap_or_default();
        let now = agentq_core::record::now_ms();
        for p in procs {
            let s = self.seen.entry((p.pid, p.start_ticks)).or_default();
            s.last_seen = now;
            if live.contains(&p.ppid) {
                s.agent.get_or_insert(p.ppid);
            } else {
                s.orphan_since.get_or_insert(now);
                s.last_orphan = Some(now);
            }
        }
    }

    /// Children that went on for at least `min_ms` after their agent was killed
    /// (`killed`: agent pid → epoch ms of the SIGKILL), or that were seen without a live
    /// agent parent that long. `ran_until` adds evidence from the marker files: child pid →
    /// epoch ms of its last line.
    pub fn orphans(
        &self,
        min_ms: u64,
        killed: &HashMap<u32, i64>,
        ran_until: &HashMap<u32, i64>,
    ) -> Vec<Orphan> {
        let mut by_pid: HashMap<u32, u64> = HashMap::new();
        for ((pid, _), s) in &self.seen {
            let mut ms = match (s.orphan_since, s.last_orphan) {
                (Some(a), Some(b)) => (b - a).max(0) as u64,
                _ => 0,
            };
            if let Some(k) = s.agent.and_then(|a| killed.get(&a)) {
                let last = s.last_seen.max(ran_until.get(pid).copied().unwrap_or(0));
                ms = ms.max((last - k).max(0) as u64);
            }
            let e = by_pid.entry(*pid).or_default();
            *e = (*e).max(ms);
        }
        let mut v: Vec<Orphan> = by_pid
            .into_iter()
            .filter(|(_, ms)| *ms >= min_ms)
            .map(|(pid, orphaned_ms)| Orphan { pid, orphaned_ms })
            .collect();
        v.sort_by_key(|o| std::cmp::Reverse(o.orphaned_ms));
        v
    }

    /// Every job child seen at all.
    pub fn children_seen(&self) -> usize {
        self.seen.len()
    }
}
