//! The real agent CLIs for tests: runs `tests/agent-clis/install` once per test process
//! (`npm ci` of `agent/package.json` at its pins into `.localdev/agent-clis/<hash>/`, reused
//! across runs) and hands out the paths of `claude`, `codex`, `node`, a test copy of
//! `agent/mcp.json` that points at the installed MCP servers, and the environment the CLIs
//! need to talk to a [`crate::models::ModelServer`]. An install that fails (no registry,
//! no Node.js) panics with the installer's message: these tests are never skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use tokio::sync::OnceCell;

/// Where the pinned CLIs and MCP servers are installed.
#[derive(Debug, Clone)]
pub struct AgentClis {
    /// The install directory (holds `node_modules/`).
    pub dir: PathBuf,
    pub claude: PathBuf,
    pub codex: PathBuf,
    /// The `node` that runs Codex's launcher and the MCP servers.
    pub node: PathBuf,
}

static CLIS: OnceCell<AgentClis> = OnceCell::const_new();

/// The installed CLIs, installing them on first use (the first run downloads ~300 MB).
pub async fn agent_clis() -> &'static AgentClis {
    CLIS.get_or_init(|| async {
        tokio::task::spawn_blocking(install)
            .await
            .expect("install task")
    })
    .await
}

fn install() -> AgentClis {
    let script = crate::repo_root().join("tests/agent-clis/install");
    // stderr is inherited: the first run's progress and any failure are shown as is.
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "tests/agent-clis/install failed ({}); its message is above. The real-CLI tests need \
         the npm registry once (then the cache in .localdev/agent-clis/ is used).",
        out.status
    );
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    let bin = dir.join("node_modules/.bin");
    let node = which("node").expect("node on PATH (the installer checked it)");
    AgentClis {
        claude: bin.join("claude"),
        codex: bin.join("codex"),
        node,
        dir,
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Where the image installs the tools and node (see agent/Dockerfile); rewritten for tests.
const IMAGE_TOOLS: &str = "/opt/agentq/tools/";
const IMAGE_NODE: &str = "/usr/local/bin/node";

impl AgentClis {
    /// PATH for the job's child: the directory of `node` first (Codex's launcher is a Node
    /// script), then the usual system directories.
    pub fn child_path(&self) -> String {
        let node_dir = self
            .node
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        format!("{node_dir}:/usr/local/bin:/usr/bin:/bin")
    }

    /// Writes a copy of `agent/mcp.json` into `dir` with the image's paths replaced by the
    /// installed ones (`/opt/agentq/tools/` → this install, `/usr/local/bin/node` → the
    /// `node` on PATH) and memory files kept under `dir`. Returns its path.
    pub async fn mcp_config(&self, dir: &Path) -> PathBuf {
        let src = crate::repo_root().join("agent/mcp.json");
        let text = tokio::fs::read_to_string(&src)
            .await
            .unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
        let mut cfg: Value = serde_json::from_str(&text).expect("agent/mcp.json is JSON");
        let tools = format!("{}/", self.dir.display());
        let node = self.node.display().to_string();
        let rewrite = |s: &str| -> String {
            if s == IMAGE_NODE {
                node.clone()
            } else if let Some(rest) = s.strip_prefix(IMAGE_TOOLS) {
                format!("{tools}{rest}")
            } else if s.starts_with("/tmp/") && s.ends_with(".jsonl") {
                dir.join(Path::new(s).file_name().unwrap_or_default())
                    .display()
                    .to_string()
            } else {
                s.to_owned()
            }
        };
        let servers = cfg["mcpServers"]
            .as_object_mut()
            .expect("agent/mcp.json has mcpServers");
        for (name, server) in servers.iter_mut() {
            let cmd = server["command"].as_str().unwrap_or_default().to_owned();
            server["command"] = Value::String(rewrite(&cmd));
            if let Some(args) = server["args"].as_array_mut() {
                for a in args.iter_mut() {
                    if let Some(s) = a.as_str() {
                        *a = Value::String(rewrite(s));
                    }
                }
            }
            if let Some(env) = server["env"].as_object_mut() {
                for v in env.values_mut() {
                    if let Some(s) = v.as_str() {
                        *v = Value::String(rewrite(s));
                    }
                }
            }
            let flat = server.to_string();
            assert!(
                !flat.contains("/opt/agentq"),
                "agent/mcp.json server {name} uses an image path the tests cannot map: {flat}"
            );
        }
        tokio::fs::create_dir_all(dir).await.expect("mcp dir");
        let dest = dir.join("mcp.json");
        tokio::fs::write(&dest, serde_json::to_vec_pretty(&cfg).expect("json"))
            .await
            .expect("write the test mcp.json");
        dest
    }

    /// The names of the MCP servers in `agent/mcp.json`, sorted.
    pub async fn mcp_server_names() -> Vec<String> {
        let text = tokio::fs::read_to_string(crate::repo_root().join("agent/mcp.json"))
            .await
            .expect("agent/mcp.json");
        let cfg: Value = serde_json::from_str(&text).expect("agent/mcp.json is JSON");
        let mut names: Vec<String> = cfg["mcpServers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Non-secret environment Claude Code needs to run headless against `base_url` (the API
/// key is passed separately, as a job secret). `IS_SANDBOX=1` lets
/// `--permission-mode bypassPermissions` work as root.
pub fn claude_env(base_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_BASE_URL", base_url.to_owned()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
        ("DISABLE_AUTOUPDATER", "1".into()),
        ("IS_SANDBOX", "1".into()),
    ]
}
