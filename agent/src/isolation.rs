//! Keeping a job's child away from the agent and from other jobs.
//!
//! - [`init_process`] (called once by the binary): the agent's memory and
//!   `/proc/<pid>/environ` become unreadable to same-uid processes (`PR_SET_DUMPABLE` 0; on
//!   Lambda the function's AWS keys live there), and the agent becomes a child subreaper, so a
//!   descendant that escapes its process group (`setsid`, double fork) is re-parented to the
//!   agent instead of init and can still be found and killed.
//! - [`JobIdentity`]: when the agent runs as root (a local `docker run`, a poller on a host),
//!   each concurrent job slot runs under its own unprivileged uid/gid, so a child can neither
//!   read the agent's environment nor signal or inspect another job.
//! - [`sweep`]: after a job, every process that belongs to it is killed and reaped: its
//!   process group, every descendant of its child, every process of its uid, and (in the
//!   subreaper agent) every re-parented orphan the agent did not start itself.
//!
//! Processes are read from `/proc` (Linux only, like Lambda).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Set by [`init_process`]: orphans of jobs are re-parented to this process.
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// Children this process started itself (jobs' children, `tar`): never treated as orphans
/// and never reaped behind tokio's back. A std mutex, held only for an insert or a lookup.
static SPAWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Jobs whose children run right now in this process.
static RUNNING_JOBS: AtomicUsize = AtomicUsize::new(0);

/// What [`init_process`] managed to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessHardening {
    pub non_dumpable: bool,
    pub subreaper: bool,
}

/// Hardens the agent process; call once at start, before any job runs. Failures are
/// reported, not fatal (a kernel without prctl is not Lambda).
pub fn init_process() -> ProcessHardening {
    let non_dumpable = nix::sys::prctl::set_dumpable(false).is_ok();
    let subreaper = nix::sys::prctl::set_child_subreaper(true).is_ok();
    SUBREAPER.store(subreaper, Ordering::SeqCst);
    ProcessHardening {
        non_dumpable,
        subreaper,
    }
}

/// Whether this process adopts its descendants' orphans.
pub fn is_subreaper() -> bool {
    SUBREAPER.load(Ordering::SeqCst)
}

/// Remembers a child this process started (see [`SPAWNED`]).
pub fn register_spawned(pid: u32) {
    if let Ok(mut s) = SPAWNED.lock() {
        s.insert(pid as i32);
    }
}

/// Forgets a child once it has been waited for.
pub fn unregister_spawned(pid: u32) {
    if let Ok(mut s) = SPAWNED.lock() {
        s.remove(&(pid as i32));
    }
}

fn spawned_snapshot() -> HashSet<i32> {
    SPAWNED
        .lock()
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default()
}

/// Counts a running job for as long as it lives (orphans are only attributed to a job
/// when no other job runs in this process).
#[derive(Debug)]
pub struct RunningJob(());

impl RunningJob {
    pub fn enter() -> Self {
        RUNNING_JOBS.fetch_add(1, Ordering::SeqCst);
        Self(())
    }
    /// Other jobs running beside this one.
    pub fn others(&self) -> usize {
        RUNNING_JOBS.load(Ordering::SeqCst).saturating_sub(1)
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        RUNNING_JOBS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Jobs running in this process now.
pub fn running_jobs() -> usize {
    RUNNING_JOBS.load(Ordering::SeqCst)
}

/// The uid/gid a job's child runs under when the agent is root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobIdentity {
    pub uid: u32,
    pub gid: u32,
}

/// Whether this process can give its children another uid.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Job identities: uid/gid `base + i` for a free `i`. A slot is held with an exclusive
/// lock on a file under the system temp directory, so every agent process on the host
/// (several pollers, tests) hands out distinct uids: the sweep that kills "every process
/// of the job's uid" must never reach another job.
#[derive(Debug)]
pub struct IdentityPool {
    base_uid: u32,
    base_gid: u32,
    lock_dir: std::path::PathBuf,
}

/// A job identity, given back when dropped.
#[derive(Debug)]
pub struct IdentityLease {
    _lock: nix::fcntl::Flock<std::fs::File>,
    pub identity: JobIdentity,
}

/// Distinct job uids per host.
const IDENTITY_SLOTS: u32 = 256;

impl IdentityPool {
    pub fn new(base_uid: u32, base_gid: u32) -> Self {
        Self {
            base_uid,
            base_gid,
            lock_dir: std::env::temp_dir().join("agentq-job-uids"),
        }
    }

    /// A free identity, or `None` when every slot on this host is taken.
    pub fn lease(&self) -> Option<IdentityLease> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !self.lock_dir.exists() {
            let _ = std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(&self.lock_dir);
        }
        let _ = std::fs::set_permissions(&self.lock_dir, std::fs::Permissions::from_mode(0o700));
        for i in 0..IDENTITY_SLOTS {
            let uid = self.base_uid + i;
            let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.lock_dir.join(format!("{uid}.lock")))
            else {
                continue;
            };
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return Some(IdentityLease {
                    _lock: lock,
                    identity: JobIdentity {
                        uid,
                        gid: self.base_gid + i,
                    },
                });
            }
        }
        None
    }
}

/// One process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub state: char,
    pub uid: u32,
    /// Clock ticks after boot; with the pid, identifies a process across pid reuse.
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat` (the command name may hold spaces and parentheses).
pub fn parse_stat(pid: i32, stat: &str) -> Option<(char, i32, i32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) pgrp(2) session(3) tty(4) tpgid(5) flags(6)
    // minflt(7) cminflt(8) majflt(9) cmajflt(10) utime(11) stime(12) cutime(13)
    // cstime(14) priority(15) nice(16) threads(17) itrealvalue(18) starttime(19)
    let _ = pid;
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(2)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

fn read_proc(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (state, ppid, pgrp, start_time) = parse_stat(pid, &stat)?;
    // The real uid from `status`: the owner of /proc/<pid> turns to root when a process
    // makes itself non-dumpable, which a hostile child could use to hide.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())?;
    Some(ProcInfo {
        pid,
        ppid,
        pgrp,
        state,
        uid,
        start_time,
    })
}

/// Every process visible in `/proc`.
pub fn processes() -> BTreeMap<i32, ProcInfo> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
            && let Some(p) = read_proc(pid)
        {
            out.insert(pid, p);
        }
    }
    out
}

/// The descendants of `roots` (not the roots themselves) in a process table.
pub fn descendants(procs: &BTreeMap<i32, ProcInfo>, roots: &[i32]) -> BTreeSet<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in procs.values() {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut out = BTreeSet::new();
    let mut stack: Vec<i32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if out.insert(*c) {
                stack.push(*c);
            }
        }
    }
    out
}

/// What belongs to one job, for [`sweep`].
#[derive(Debug, Clone, Default)]
pub struct JobProcesses {
    /// The job's child (its process group has the same id).
    pub child_pid: Option<i32>,
    /// The job's own uid when the agent gave it one: every process of that uid is the job's.
    pub uid: Option<u32>,
    /// Descendants seen while the job ran, with their start times.
    pub seen: BTreeMap<i32, u64>,
}

impl JobProcesses {
    /// Notes the child's current descendants (called at each heartbeat), so those that
    /// escape later are still known.
    pub fn observe(&mut self) {
        let Some(child) = self.child_pid else { return };
        let procs = processes();
        for pid in descendants(&procs, &[child]) {
            if let Some(p) = procs.get(&pid) {
                self.seen.insert(pid, p.start_time);
            }
        }
    }
}

/// What [`sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub killed: usize,
    pub reaped: usize,
}

/// The processes of a job still alive, by the rules in the module docs.
fn targets(job: &JobProcesses, include_orphans: bool) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let procs = processes();
    let spawned = spawned_snapshot();
    let mut roots: Vec<i32> = Vec::new();
    for p in procs.values() {
        if p.pid == me || p.state == 'Z' && p.ppid != me {
            continue;
        }
        let of_job = job.child_pid.is_some_and(|c| p.pgrp == c)
            || job.uid.is_some_and(|u| p.uid == u)
            || job.seen.get(&p.pid) == Some(&p.start_time)
            || (include_orphans && p.ppid == me && !spawned.contains(&p.pid));
        if of_job {
            roots.push(p.pid);
        }
    }
    if let Some(c) = job.child_pid {
        roots.push(c);
    }
    let mut all: BTreeSet<i32> = roots.iter().copied().collect();
    all.extend(descendants(&procs, &roots));
    all.retain(|pid| *pid != me && procs.contains_key(pid) && !spawned.contains(pid));
    all
}

/// Kills and reaps every process of `job` (blocking; run it off the async threads).
/// Repeats until nothing is left, since a process may fork while it is being killed.
pub fn sweep(job: &JobProcesses, include_orphans: bool) -> SweepReport {
    let me = std::process::id() as i32;
    let mut report = SweepReport::default();
    for round in 0..50 {
        let found = targets(job, include_orphans && is_subreaper());
        let mut alive = 0;
        for pid in &found {
            let info = read_proc(*pid);
            if info.as_ref().is_some_and(|p| p.state != 'Z') {
                alive += 1;
                if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                    report.killed += 1;
                }
            }
            // Our own children (re-parented orphans) must be reaped, or they stay zombies.
            if info.is_some_and(|p| p.ppid == me)
                && let Ok(s) = waitpid(Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG))
                && s.pid().is_some()
            {
                report.reaped += 1;
            }
        }
        if alive == 0 && found.iter().all(|p| read_proc(*p).is_none()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(if round < 5 { 10 } else { 50 }));
    }
    report
}

/// Reaps exited orphans this process adopted but did not start (zombies otherwise pile up
/// in a subreaper). Never touches the children tokio waits for.
pub fn reap_orphans() -> usize {
    if !is_subreaper() {
        return 0;
    }
    let me = std::process::id() as i32;
    let spawned = spawned_snapshot();
    let mut n = 0;
    for p in processes().values() {
        if p.ppid == me
            && p.state == 'Z'
            && !spawned.contains(&p.pid)
            && waitpid(Pid::from_raw(p.pid), Some(WaitPidFlag::WNOHANG))
                .is_ok_and(|s| s.pid().is_some())
        {
            n += 1;
        }
    }
    n
}

/// Whether the Lambda service (not a local Runtime API emulator) runs this process:
/// only the service sets `LAMBDA_TASK_ROOT` together with an `AWS_EXECUTION_ENV` of
/// `AWS_Lambda_*`. cargo-lambda and test servers set `AWS_LAMBDA_RUNTIME_API` only.
pub fn on_lambda_service(env: impl Fn(&str) -> Option<String>) -> bool {
    env("LAMBDA_TASK_ROOT").is_some_and(|v| !v.is_empty())
        && env("AWS_EXECUTION_ENV").is_some_and(|v| v.starts_with("AWS_Lambda_"))
}

/// Removes everything under `scratch` except the entries named in `keep` (the work root,
/// and what the image's own environment keeps there). Returns the entries removed.
pub fn wipe_scratch(scratch: &std::path::Path, keep: &[std::path::PathBuf]) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return removed;
    };
    for e in entries.flatten() {
        let p = e.path();
        if keep.iter().any(|k| k == &p || k.starts_with(&p)) {
            continue;
        }
        let res = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        if res.is_ok() {
            removed.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(4242, line), Some(('S', 1, 4242, 98765)));
        assert_eq!(parse_stat(1, "garbage"), None);
    }

    #[test]
    fn descendants_follow_parents() {
        let mk = |pid, ppid| ProcInfo {
            pid,
            ppid,
            pgrp: pid,
            state: 'S',
            uid: 0,
            start_time: 1,
        };
        let procs: BTreeMap<i32, ProcInfo> = [mk(10, 1), mk(11, 10), mk(12, 11), mk(13, 1)]
            .into_iter()
            .map(|p| (p.pid, p))
            .collect();
        assert_eq!(
            descendants(&procs, &[10]),
            [11, 12].into_iter().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn identities_are_unique_per_running_job_across_pools() {
        // Two pools stand for two agent processes on one host.
        let (p1, p2) = (
            IdentityPool::new(71000, 71000),
            IdentityPool::new(71000, 71000),
        );
        let a = p1.lease().unwrap();
        let b = p2.lease().unwrap();
        let c = p1.lease().unwrap();
        assert_ne!(a.identity, b.identity);
        assert_ne!(b.identity, c.identity);
        assert_ne!(a.identity, c.identity);
        let freed = a.identity;
        drop(a);
        assert_eq!(p2.lease().unwrap().identity, freed);
    }

    #[test]
    fn only_the_lambda_service_counts_as_lambda() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(on_lambda_service(env(&[
            ("LAMBDA_TASK_ROOT", "/var/task"),
            ("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023")
        ])));
        // cargo lambda watch / a test Runtime API: only AWS_LAMBDA_RUNTIME_API.
        assert!(!on_lambda_service(env(&[(
            "AWS_LAMBDA_RUNTIME_API",
            "127.0.0.1:9001"
        )])));
        assert!(!on_lambda_service(env(&[(
            "LAMBDA_TASK_ROOT",
            "/var/task"
        )])));
    }

    #[test]
    fn wipe_keeps_what_it_is_told_to() {
        let d = tempfile::tempdir().unwrap();
        for n in ["agentq", "left-by-job", ".hidden"] {
            std::fs::create_dir_all(d.path().join(n).join("x")).unwrap();
        }
        std::fs::write(d.path().join("loose.txt"), "x").unwrap();
        let mut removed = wipe_scratch(d.path(), &[d.path().join("agentq")]);
        removed.sort();
        assert_eq!(removed, [".hidden", "left-by-job", "loose.txt"]);
        assert!(d.path().join("agentq/x").exists());
    }
}
