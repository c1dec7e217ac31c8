//! The local container builder: which engine answers (`docker info` / `podman info`:
//! the engine, not just the client), the build context in a temp dir, the build, the
//! registry login (`--password-stdin`) and the push. Every command runs through
//! `tokio::process` with a timeout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::DeployError;

/// A container engine that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    pub fn program(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }

    /// The build command line (without the context path).
    pub fn build_args(self, image: &str) -> Vec<String> {
        let mut v: Vec<String> = match self {
            // --provenance=false: Lambda wants a single-platform image manifest, not an
            // index with attestations.
            Self::Docker => ["buildx", "build", "--platform", "linux/amd64"]
                .map(String::from)
                .to_vec(),
            Self::Podman => ["build", "--platform", "linux/amd64"]
                .map(String::from)
                .to_vec(),
        };
        if self == Self::Docker {
            v.push("--provenance=false".into());
            v.push("--load".into());
        }
        v.push("-t".into());
        v.push(image.into());
        v
    }
}

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BuilderChoice {
    /// Docker when its engine answers, else podman.
    #[default]
    Auto,
    Docker,
    Podman,
}

/// Runs `program args` with a timeout; `Ok(stdout)` on exit 0, `Err(reason)` otherwise.
async fn probe(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{program} is not installed"));
        }
        Err(e) => return Err(format!("{program}: {e}")),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "`{program} {}` did not answer within {}s",
            args.join(" "),
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .trim()
                .to_owned();
            Err(format!("`{program} {}` failed: {line}", args.join(" ")))
        }
    }
}

/// Finds an engine that answers. The error says what was tried and why each failed.
pub async fn detect(choice: BuilderChoice) -> Result<Engine, DeployError> {
    let timeout = Duration::from_secs(8);
    let mut tried = Vec::new();
    if matches!(choice, BuilderChoice::Auto | BuilderChoice::Docker) {
        match probe(
            "docker",
            &["info", "--format", "{{.ServerVersion}}"],
            timeout,
        )
        .await
        {
            Ok(v) if !v.trim().is_empty() => return Ok(Engine::Docker),
            Ok(_) => tried.push("docker: the client answers but no engine is running".into()),
            Err(e) => tried.push(format!("docker: {e}")),
        }
    }
    if matches!(choice, BuilderChoice::Auto | BuilderChoice::Podman) {
        match probe(
            "podman",
            &["info", "--format", "{{.Version.Version}}"],
            timeout,
        )
        .await
        {
            Ok(_) => return Ok(Engine::Podman),
            Err(e) => tried.push(format!("podman: {e}")),
        }
    }
    Err(DeployError::NoBuilder {
        detail: tried.join("; "),
    })
}

/// Files of the build context, taken from the agent directory.
const CONTEXT_FILES: [(&str, bool); 5] = [
    ("Dockerfile", true),
    (".dockerignore", false),
    ("mcp.json", true),
    ("package.json", true),
    ("package-lock.json", false),
];

/// The default agent binary: release if built, else debug.
pub fn default_agent_binary(root: &Path) -> PathBuf {
    let release = root.join("target/release/agentq-agent");
    if release.exists() {
        release
    } else {
        root.join("target/debug/agentq-agent")
    }
}

/// The default dispatcher binary: release if built, else debug.
pub fn default_dispatcher_binary(root: &Path) -> PathBuf {
    let release = root.join("target/release/agentq-dispatcher");
    if release.exists() {
        release
    } else {
        root.join("target/debug/agentq-dispatcher")
    }
}

/// Copies the build context into `dir`: the agent directory's Dockerfile, MCP config
/// and npm manifest, and the agent binary as `bootstrap`. Returns the files written.
pub async fn prepare_context(
    agent_dir: &Path,
    agent_binary: &Path,
    dir: &Path,
) -> Result<Vec<String>, DeployError> {
    prepare_context_with(agent_dir, agent_binary, None, dir).await
}

/// [`prepare_context`], plus `agentq-dispatcher` (installed in the image under
/// `/opt/agentq/bin/`, where the dispatcher function's entrypoint starts it). `deploy`
/// always ships it; `None` is for building an agent-only image by hand.
pub async fn prepare_context_with(
    agent_dir: &Path,
    agent_binary: &Path,
    dispatcher_binary: Option<&Path>,
    dir: &Path,
) -> Result<Vec<String>, DeployError> {
    let mut written = Vec::new();
    for (name, required) in CONTEXT_FILES {
        let src = agent_dir.join(name);
        match tokio::fs::copy(&src, dir.join(name)).await {
            Ok(_) => written.push(name.to_owned()),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DeployError::File {
                    what: format!("build context file {name} (pass --agent-dir DIR)"),
                    path: src,
                    source,
                });
            }
        }
    }
    tokio::fs::copy(agent_binary, dir.join("bootstrap"))
        .await
        .map_err(|source| DeployError::File {
            what: "agent binary (build it with `cargo build --release -p agentq-agent`, or pass --agent-binary PATH)".into(),
            path: agent_binary.to_path_buf(),
            source,
        })?;
    written.push("bootstrap".into());
    if let Some(d) = dispatcher_binary {
        tokio::fs::copy(d, dir.join("agentq-dispatcher"))
            .await
            .map_err(|source| DeployError::File {
                what: "dispatcher binary (build it with `cargo build --release -p agentq-dispatcher`, or pass --dispatcher-binary PATH)".into(),
                path: d.to_path_buf(),
                source,
            })?;
        written.push("agentq-dispatcher".into());
    }
    Ok(written)
}

async fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<(), DeployError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DeployError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| DeployError::Command {
                command: command.clone(),
                detail: e.to_string(),
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| DeployError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        Err(DeployError::Command {
            command,
            detail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        })
    }
}

/// Builds `image` from `context` for linux/amd64.
pub async fn build(engine: Engine, image: &str, context: &Path) -> Result<(), DeployError> {
    let mut args = engine.build_args(image);
    args.push(context.display().to_string());
    run(engine.program(), &args, None).await
}

/// Logs in to the registry with the password on stdin (never on the command line).
pub async fn login(
    engine: Engine,
    registry: &str,
    user: &str,
    password: &str,
) -> Result<(), DeployError> {
    let args = [
        "login".to_owned(),
        "--username".into(),
        user.into(),
        "--password-stdin".into(),
        registry.into(),
    ];
    run(engine.program(), &args, Some(password)).await
}

/// Pushes `image`.
pub async fn push(engine: Engine, image: &str) -> Result<(), DeployError> {
    run(
        engine.program(),
        &["push".to_owned(), image.to_owned()],
        None,
    )
    .await
}
