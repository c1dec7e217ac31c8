//! The per-job workspace under the work root: `home/` (HOME), `tmp/` (TMPDIR), `work/`
//! (the child's working directory) and `out/` (artifacts). Made fresh for every run and
//! removed afterwards, so nothing leaks from one job to the next in a warm environment.

use std::path::{Path, PathBuf};

use agentq_core::{Attempt, JobId};

#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
    pub work: PathBuf,
    pub out: PathBuf,
}

impl Workspace {
    pub async fn create(work_root: &Path, job: &JobId, attempt: Attempt) -> std::io::Result<Self> {
        let root = work_root.join(format!(
            "{job}-a{attempt}-{}",
            ulid::Ulid::new().to_string().to_lowercase()
        ));
        let ws = Self {
            home: root.join("home"),
            tmp: root.join("tmp"),
            work: root.join("work"),
            out: root.join("out"),
            root,
        };
        for d in [&ws.home, &ws.tmp, &ws.work, &ws.out] {
            tokio::fs::create_dir_all(d).await?;
        }
        Ok(ws)
    }

    /// Removes everything; errors are logged, not fatal.
    pub async fn remove(self) {
        let root = self.root.clone();
        let res = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&root)).await;
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
