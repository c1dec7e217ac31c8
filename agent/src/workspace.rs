//! The per-job workspace: `{work_root}/{job_id}/` with `home/` (HOME), `tmp/` (TMPDIR),
//! `work/` (the child's working directory), `out/` (artifacts) and `.agentq/` (the agent's
//! own files: log spill, archives; not the child's).
//!
//! The path is the same for every attempt and segment of a job, on every host with the
//! same work root: the agent CLIs keep their sessions under a directory named after the
//! working directory (Claude Code: `~/.claude/projects/<cwd with / as ->/`), so a session
//! resumed from a checkpoint must find itself at the same absolute path. One run of a job
//! per host holds the workspace at a time (an exclusive lock next to it); a leftover from
//! a run that died is cleared first. The [`Workspace`] is a drop guard: it is removed
//! when dropped, whatever path the job took.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use agentq_core::JobId;
use nix::fcntl::{Flock, FlockArg};

use crate::isolation::JobIdentity;

#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
    pub work: PathBuf,
    pub out: PathBuf,
    /// Agent-only: spill files, archives.
    pub state: PathBuf,
    lock_path: PathBuf,
    lock: Option<Flock<File>>,
    removed: bool,
}

/// Why a workspace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("another run of this job holds its workspace on this host ({0})")]
    Busy(PathBuf),
    #[error("could not prepare the workspace {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |source| WorkspaceError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Workspace {
    /// The workspace directory of `job` under `work_root` (stable across attempts).
    pub fn path_for(work_root: &Path, job: &JobId) -> PathBuf {
        work_root.join(job.as_str())
    }

    /// Locks and makes a fresh workspace. With an `identity`, the child's directories
    /// belong to it (0700) and the agent's do not.
    pub async fn create(
        work_root: &Path,
        job: &JobId,
        identity: Option<JobIdentity>,
    ) -> Result<Self, WorkspaceError> {
        let work_root = work_root.to_owned();
        let job = job.clone();
        tokio::task::spawn_blocking(move || Self::create_blocking(&work_root, &job, identity))
            .await
            .map_err(|e| WorkspaceError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })?
    }

    fn create_blocking(
        work_root: &Path,
        job: &JobId,
        identity: Option<JobIdentity>,
    ) -> Result<Self, WorkspaceError> {
        std::fs::create_dir_all(work_root).map_err(io(work_root))?;
        if identity.is_some() {
            // The job's uid must be able to walk down to its workspace.
            for dir in work_root.ancestors().skip(1) {
                let mode = std::fs::metadata(dir)
                    .map_err(io(dir))?
                    .permissions()
                    .mode();
                if mode & 0o001 == 0 {
                    return Err(WorkspaceError::Io {
                        path: dir.to_owned(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            "the job's uid cannot pass through this directory: allow it (chmod o+x) or choose another AGENTQ_WORK_ROOT",
                        ),
                    });
                }
            }
            // Others may pass through the work root (to their own workspace) but not list it.
            std::fs::set_permissions(work_root, std::fs::Permissions::from_mode(0o711))
                .map_err(io(work_root))?;
        }
        let lock_path = work_root.join(format!(".{}.lock", job.as_str()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| WorkspaceError::Busy(lock_path.clone()))?;
        let root = Self::path_for(work_root, job);
        if root.exists() {
            // A run that died on this host left it; the checkpoint restores what matters.
            std::fs::remove_dir_all(&root).map_err(io(&root))?;
        }
        let ws = Self {
            home: root.join("home"),
            tmp: root.join("tmp"),
            work: root.join("work"),
            out: root.join("out"),
            state: root.join(".agentq"),
            root,
            lock_path,
            lock: Some(lock),
            removed: false,
        };
        std::fs::create_dir(&ws.root).map_err(io(&ws.root))?;
        std::fs::set_permissions(&ws.root, std::fs::Permissions::from_mode(0o711))
            .map_err(io(&ws.root))?;
        std::fs::create_dir(&ws.state).map_err(io(&ws.state))?;
        std::fs::set_permissions(&ws.state, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&ws.state))?;
        for d in [&ws.home, &ws.tmp, &ws.work, &ws.out] {
            std::fs::create_dir(d).map_err(io(d))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(io(d))?;
        }
        if let Some(id) = identity {
            ws.give_to(id).map_err(io(&ws.root))?;
        }
        Ok(ws)
    }

    /// Makes the child's directories (recursively: e.g. after a restore) belong to `id`.
    pub fn give_to(&self, id: JobIdentity) -> std::io::Result<()> {
        let mut stack: Vec<PathBuf> = vec![
            self.home.clone(),
            self.tmp.clone(),
            self.work.clone(),
            self.out.clone(),
        ];
        while let Some(p) = stack.pop() {
            // lchown: a symlink is re-owned itself, its target never followed.
            std::os::unix::fs::lchown(&p, Some(id.uid), Some(id.gid))?;
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                for e in std::fs::read_dir(&p)? {
                    stack.push(e?.path());
                }
            }
        }
        Ok(())
    }

    /// Removes everything (off the async threads). Errors are logged, not fatal.
    pub async fn remove(mut self) {
        let root = self.root.clone();
        let lock_path = self.lock_path.clone();
        let lock = self.lock.take();
        self.removed = true;
        let res = tokio::task::spawn_blocking(move || {
            let r = remove_tree(&root);
            let _ = std::fs::remove_file(&lock_path);
            drop(lock);
            r
        })
        .await;
        if let Ok(Err(e)) = res {
            tracing::warn!(root = %self.root.display(), error = %e, "workspace cleanup failed");
        }
    }

    /// Files under `out/` (regular files only, no symlinks), relative paths, at most `max`.
    pub async fn artifacts(&self, max: usize) -> Vec<(String, PathBuf)> {
        let out = self.out.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let mut stack = vec![out.clone()];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let Ok(ft) = e.file_type() else { continue };
                    let p = e.path();
                    if ft.is_dir() {
                        stack.push(p);
                    } else if ft.is_file() {
                        if let Ok(rel) = p.strip_prefix(&out) {
                            found.push((rel.to_string_lossy().into_owned(), p.clone()));
                        }
                        if found.len() >= max {
                            return found;
                        }
                    }
                }
            }
            found.sort();
            found
        })
        .await
        .unwrap_or_default()
    }
}

/// Bytes of the files under `roots`, symlinks not followed (blocking).
pub fn tree_bytes(roots: &[PathBuf]) -> u64 {
    let mut total = 0u64;
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else {
            total += meta.len();
        }
    }
    total
}

/// Removes a tree the child may have made hostile: directories without write or execute
/// permission for the owner are opened up first (root can remove them anyway; an
/// unprivileged agent cannot).
fn remove_tree(root: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let mut stack = vec![root.to_owned()];
            while let Some(p) = stack.pop() {
                let Ok(meta) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if meta.is_dir() {
                    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700));
                    if let Ok(rd) = std::fs::read_dir(&p) {
                        stack.extend(rd.flatten().map(|e| e.path()));
                    }
                }
            }
            std::fs::remove_dir_all(root)
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !self.removed {
            // An early return or a panic: clean up here (blocking, rare).
            let _ = remove_tree(&self.root);
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}
