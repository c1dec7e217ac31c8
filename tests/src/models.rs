//! Scripted model servers for the real agent CLIs: starts `tests/models/model-server` (a
//! stand-in for the Anthropic Messages API and the OpenAI Responses API) with a [`Script`]
//! of turns, hands out its base URL, reads back every request it recorded, and stops it
//! when dropped. The script format is described in `tests/models/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// One scripted answer. Build with the constructors, refine with the builder methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn(Map<String, Value>);

impl Turn {
    fn with(key: &str, v: Value) -> Self {
        let mut m = Map::new();
        m.insert(key.to_owned(), v);
        Self(m)
    }

    /// Assistant text, ending the turn (`end_turn`).
    pub fn text(text: &str) -> Self {
        Self::with("text", json!(text))
    }

    /// A shell command for the CLI to run: Claude Code's `Bash` tool, Codex's shell tool.
    pub fn bash(command: &str) -> Self {
        Self::with("bash", json!(command))
    }

    /// Write a file: Claude Code's `Write` tool (absolute path), a shell command for Codex.
    pub fn write(path: &str, content: &str) -> Self {
        Self::with("write", json!({"path": path, "content": content}))
    }

    /// An HTTP error answer (e.g. 500, 529).
    pub fn error(status: u16) -> Self {
        Self::with("error", json!({"status": status}))
    }

    /// A 429 rate-limit answer with `retry-after: retry_after_s` and reset headers
    /// (`anthropic-ratelimit-*-reset` / `x-ratelimit-reset-*`) `reset_in_s` from now.
    pub fn rate_limit(retry_after_s: u64, reset_in_s: u64) -> Self {
        Self::with(
            "error",
            json!({"status": 429, "retry_after": retry_after_s, "reset_in": reset_in_s}),
        )
    }

    /// Also say `text` before the tool call (for `bash`/`write` turns).
    pub fn saying(mut self, text: &str) -> Self {
        self.0.insert("text".into(), json!(text));
        self
    }

    /// Token usage reported for this turn.
    pub fn usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.0.insert(
            "usage".into(),
            json!({"input_tokens": input_tokens, "output_tokens": output_tokens}),
        );
        self
    }

    /// Wait this long before answering (to outlive a deadline).
    pub fn after_sleep(mut self, seconds: f64) -> Self {
        self.0.insert("sleep".into(), json!(seconds));
        self
    }

    /// Give the same answer to this many requests in a row (e.g. a rate limit that lasts).
    pub fn times(mut self, n: u32) -> Self {
        self.0.insert("times".into(), json!(n));
        self
    }

    /// Any other key of the script format (e.g. `stop_reason`, or `error.in_stream`).
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.to_owned(), value);
        self
    }

    pub fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

/// The turns a server answers in order, and the answer once they are used up.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Script {
    turns: Vec<Turn>,
    after: Option<Turn>,
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn turn(mut self, t: Turn) -> Self {
        self.turns.push(t);
        self
    }

    /// The answer to every request after the scripted turns (default: text "done").
    pub fn then_always(mut self, t: Turn) -> Self {
        self.after = Some(t);
        self
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({"turns": self.turns.iter().map(Turn::to_json).collect::<Vec<_>>()});
        if let Some(a) = &self.after {
            v["after"] = a.to_json();
        }
        v
    }
}

/// One request the server received.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordedRequest {
    /// Order of arrival (0-based; the record is written when the answer is complete).
    pub seq: u64,
    /// Unix time (seconds) it arrived.
    pub at: f64,
    pub method: String,
    /// Path with the query (`/v1/messages?beta=true`).
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (or the raw text, or null).
    pub body: Value,
    /// HTTP status of the answer (499: the client went away first).
    pub status: u16,
    /// Which scripted turn answered (None: a side request or the `after` answer).
    #[serde(default)]
    pub turn_index: Option<usize>,
    /// Not part of the conversation: token counting, model listing, a request without
    /// tools (titles, summaries).
    #[serde(default)]
    pub side: bool,
    /// `text`, `bash`, `write`, `error`, `count_tokens`, `models`, `unknown`.
    #[serde(default)]
    pub kind: Option<String>,
}

impl RecordedRequest {
    /// A conversation request (`/v1/messages` or `/v1/responses` that consumed the script).
    pub fn is_turn(&self) -> bool {
        !self.side && (self.path.contains("/v1/messages") || self.path.contains("/v1/responses"))
    }

    /// Names of the tools the CLI offered the model: the top-level `tools`, and those in
    /// the namespaces of `additional_tools` input items (Codex's code mode).
    pub fn tool_names(&self) -> Vec<String> {
        fn walk(tools: &Value, out: &mut Vec<String>) {
            for t in tools.as_array().into_iter().flatten() {
                if t["type"] == "namespace" {
                    walk(&t["tools"], out);
                } else if let Some(n) = t["name"].as_str().or_else(|| t["type"].as_str()) {
                    out.push(n.to_owned());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.body["tools"], &mut out);
        for item in self.body["input"].as_array().into_iter().flatten() {
            if item["type"] == "additional_tools" {
                walk(&item["tools"], &mut out);
            }
        }
        out
    }

    /// The body as JSON text (for `contains` checks on the conversation).
    pub fn body_text(&self) -> String {
        self.body.to_string()
    }
}

/// A running model server; stopped when dropped.
#[derive(Debug)]
pub struct ModelServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn server_path() -> PathBuf {
    crate::repo_root()
        .join("tests")
        .join("models")
        .join("model-server")
}

impl ModelServer {
    /// Starts a server answering `script`. Panics with the server's own message when it
    /// cannot start (no python3, a bad script).
    pub async fn start(script: &Script) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("agentq-model-server-")
            .tempdir()
            .expect("tempdir for the model server");
        let script_path = dir.path().join("script.json");
        let record = dir.path().join("requests.jsonl");
        tokio::fs::write(&script_path, script.to_json().to_string())
            .await
            .expect("write the script");
        let mut child = Command::new("python3")
            .arg(server_path())
            .arg("--script")
            .arg(&script_path)
            .arg("--record")
            .arg(&record)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 tests/models/model-server (Python 3 must be on PATH)");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            BufReader::new(stdout).read_line(&mut first),
        )
        .await;
        let port = match (read, first.trim().parse::<u16>()) {
            (Ok(Ok(_)), Ok(p)) => p,
            _ => {
                let _ = child.start_kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err))
                            .await;
                }
                panic!("the model server did not start (first line {first:?}): {err}");
            }
        };
        Self { child, port, dir }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`: Claude Code's `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/v1`: the `base_url` of a Codex model provider.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// The file every request is appended to (JSON Lines).
    pub fn record_path(&self) -> PathBuf {
        self.dir.path().join("requests.jsonl")
    }

    /// Every request recorded so far, in order of completion.
    pub async fn requests(&self) -> Vec<RecordedRequest> {
        let text = tokio::fs::read_to_string(self.record_path())
            .await
            .unwrap_or_default();
        let mut all: Vec<RecordedRequest> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record line {l}: {e}")))
            .collect();
        all.sort_by_key(|r| r.seq);
        all
    }

    /// The conversation requests only (see [`RecordedRequest::is_turn`]).
    pub async fn turn_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .await
            .into_iter()
            .filter(RecordedRequest::is_turn)
            .collect()
    }

    /// Replaces the script; the next conversation request gets its first turn.
    pub async fn set_script(&self, script: &Script) {
        let (status, body) = self
            .post("/_control/script", &script.to_json().to_string())
            .await;
        assert_eq!(status, 200, "set_script: {body}");
    }

    /// A raw POST to the server (for tests of the server itself). Returns status and body.
    pub async fn post(&self, path: &str, body: &str) -> (u16, String) {
        http(self.port, "POST", path, &[], body).await
    }

    /// A raw request with extra headers. Returns status and body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http(self.port, method, path, headers, body).await
    }

    /// A raw request returning the status, the headers (lower-case names) and the body.
    pub async fn request_full(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, BTreeMap<String, String>, String) {
        http_full(self.port, method, path, headers, body).await
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let (s, _, b) = http_full(port, method, path, headers, body).await;
    (s, b)
}

/// One HTTP/1.1 request with `Connection: close`, read to the end.
async fn http_full(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, BTreeMap<String, String>, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the model server");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw))
        .await
        .expect("model server answered within 60 s")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let hdrs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, hdrs, rest.to_owned())
}

/// Writes a `CODEX_HOME` with a `config.toml` that points Codex at `server` (a model
/// provider `local` on the Responses API, API key from `OPENAI_API_KEY`) and runs every
/// command without Codex's own sandbox (the job's sandbox is the Lambda environment).
pub async fn write_codex_home(dir: &Path, server: &ModelServer) -> PathBuf {
    tokio::fs::create_dir_all(dir)
        .await
        .expect("create CODEX_HOME");
    let config = format!(
        r#"# Written by the agentq tests: Codex against the scripted model server.
model_provider = "local"
sandbox_mode = "danger-full-access"
approval_policy = "never"

[model_providers.local]
name = "local"
base_url = "{}"
env_key = "OPENAI_API_KEY"
wire_api = "responses"
"#,
        server.openai_base_url()
    );
    tokio::fs::write(dir.join("config.toml"), config)
        .await
        .expect("write config.toml");
    dir.to_path_buf()
}
