//! The real Claude Code and Codex CLIs (npm, at the image's pins) run jobs through the
//! agent's handler against the emulator, talking to the scripted model server
//! (`tests/models/model-server`) instead of a model API. The CLIs are installed by
//! `tests/agent-clis/install` (cached in `.localdev/agent-clis/`); when that cannot be done
//! these tests fail with the installer's message — they are never skipped.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentq_agent::Deps;
use agentq_core::{Attempt, JobId, JobRecord, JobState, Layout, Stream};
use agentq_testkit::agent_clis::{AgentClis, agent_clis, claude_env};
use agentq_testkit::models::{ModelServer, Script, Turn, write_codex_home};
use agentq_testkit::{Resources, resources};
use common::*;
use serde_json::{Value, json};

/// Each job gets this long before the simulated invocation deadline.
const INVOCATION: Duration = Duration::from_secs(120);

/// One test's world: emulator resources, a work root, a model server, the agent's deps
/// with the real CLIs configured.
struct World {
    r: Resources,
    root: tempfile::TempDir,
    server: ModelServer,
    deps: Arc<Deps>,
}

impl World {
    async fn new(script: Script, with_mcp: bool) -> Self {
        let clis = agent_clis().await;
        let r = resources().await;
        let root = work_root();
        let server = ModelServer::start(&script).await;
        let claude = clis.claude.display().to_string();
        let codex = clis.codex.display().to_string();
        let path = clis.child_path();
        let mcp = if with_mcp {
            Some(
                clis.mcp_config(&root.path().join("mcp"))
                    .await
                    .display()
                    .to_string(),
            )
        } else {
            None
        };
        // Codex reads its provider from `$HOME/.codex/config.toml`, which the agent writes
        // into each job's workspace from this file.
        let codex_home = write_codex_home(&root.path().join("codex"), &server).await;
        let codex_config = codex_home.join("config.toml").display().to_string();
        let mut extra = vec![
            "--claude-bin",
            &claude,
            "--codex-bin",
            &codex,
            "--child-path",
            &path,
            "--codex-config",
            &codex_config,
        ];
        if let Some(m) = &mcp {
            extra.extend(["--mcp-config", m.as_str()]);
        }
        let deps = deps(&r, &root.path().join("ws"), &extra);
        Self {
            r,
            root,
            server,
            deps,
        }
    }

    /// A claude-code spec: the model server as the API, the API key as an SSM secret.
    async fn claude_spec(&self, job: &str, prompt: &str, extra: Value) -> (String, String) {
        let key = format!("sk-ant-test-{}", ulid::Ulid::new());
        let param = format!("{}anthropic-api-key", self.r.secrets_prefix);
        self.r.put_secret(&param, &key).await;
        let env: serde_json::Map<String, Value> = claude_env(&self.server.base_url())
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        let mut spec = json!({
            "spec_version": 1, "job_id": job, "agent": "claude-code", "prompt": prompt,
            "env": env,
            "secrets": {"ANTHROPIC_API_KEY": param},
        });
        merge(&mut spec, extra);
        (spec.to_string(), key)
    }

    /// A codex spec (the agent writes the config.toml that points Codex at the model
    /// server into the job's home), the API
    /// key as an SSM secret.
    async fn codex_spec(&self, job: &str, prompt: &str) -> (String, String) {
        let key = format!("sk-openai-test-{}", ulid::Ulid::new());
        let param = format!("{}openai-api-key", self.r.secrets_prefix);
        self.r.put_secret(&param, &key).await;
        let spec = json!({
            "spec_version": 1, "job_id": job, "agent": "codex", "prompt": prompt,
            "secrets": {"OPENAI_API_KEY": param},
        });
        (spec.to_string(), key)
    }

    async fn run(&self, job: &str, spec: &str) -> JobRecord {
        let started = std::time::Instant::now();
        let resp = handle(&self.deps, vec![message("m1", spec)], INVOCATION).await;
        let took = started.elapsed();
        assert!(
            resp.batch_item_failures.is_empty(),
            "{job}: the message was not acknowledged"
        );
        let rec = record(&self.r, job).await;
        eprintln!(
            "{job}: {} in {took:.1?} ({}) progress {:?}",
            rec.status,
            rec.reason.as_deref().unwrap_or(""),
            rec.progress
        );
        rec
    }

    /// All of one stream of attempt 1, in upload order.
    async fn stream(&self, job: &str, stream: Stream) -> String {
        let l = Layout::new(&self.r.prefix);
        let job = JobId::parse(job).unwrap();
        let mut keys = self
            .r
            .keys(&l.stream_prefix(&job, Attempt(1), stream))
            .await;
        keys.sort();
        let mut text = String::new();
        for k in keys {
            text.push_str(&self.r.object(&k).await);
        }
        text
    }

    /// The uploaded event stream, parsed.
    async fn events(&self, job: &str) -> Vec<Value> {
        self.stream(job, Stream::Events)
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l}: {e}")))
            .collect()
    }

    async fn artifact(&self, job: &str, rel: &str) -> String {
        let l = Layout::new(&self.r.prefix);
        let key = l
            .artifact(&JobId::parse(job).unwrap(), Attempt(1), rel)
            .unwrap();
        self.r.object(&key).await
    }

    async fn manifest(&self, job: &str) -> Value {
        let l = Layout::new(&self.r.prefix);
        let key = l.result(&JobId::parse(job).unwrap(), Attempt(1));
        serde_json::from_str(&self.r.object(&key).await).expect("result.json")
    }

    /// Explains a failed job: its stderr and the model server's record.
    async fn explain(&self, job: &str) -> String {
        let stderr = self.stream(job, Stream::Stderr).await;
        let stdout = self.stream(job, Stream::Stdout).await;
        let reqs = self.server.requests().await;
        let summary: Vec<String> = reqs
            .iter()
            .map(|r| {
                format!(
                    "{} {} -> {} ({:?}) tools {:?}",
                    r.method,
                    r.path,
                    r.status,
                    r.kind,
                    r.tool_names()
                )
            })
            .collect();
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\nmodel server saw:\n{}",
            summary.join("\n")
        )
    }
}

fn merge(spec: &mut Value, extra: Value) {
    if let (Some(s), Value::Object(e)) = (spec.as_object_mut(), extra) {
        s.extend(e);
    }
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn the_result(events: &[Value]) -> &Value {
    let results = of_type(events, "result");
    assert_eq!(results.len(), 1, "one result event: {events:?}");
    results[0]
}

async fn assert_workspace_gone(root: &Path) {
    assert!(
        is_empty_dir(&root.join("ws")),
        "the workspace was not removed"
    );
}

// --------------------------------------------------------------------------- Claude Code

#[tokio::test]
async fn claude_code_one_turn_job_succeeds() {
    let w = World::new(
        Script::new().turn(Turn::text("Hello from the scripted model.").usage(40, 8)),
        false,
    )
    .await;
    let job = "claude-one-turn";
    let (spec, key) = w.claude_spec(job, "Say hello.", json!({})).await;
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Succeeded, "{}", w.explain(job).await);

    let events = w.events(job).await;
    let init = of_type(&events, "system")
        .into_iter()
        .find(|e| e["subtype"] == "init")
        .expect("system/init event")
        .clone();
    let result = the_result(&events);
    assert_eq!(result["subtype"], "success");
    assert_eq!(result["result"], "Hello from the scripted model.");
    let session = init["session_id"].as_str().unwrap();
    assert_eq!(result["session_id"], session);
    assert_eq!(rec.progress.session_id.as_deref(), Some(session));
    assert_eq!(rec.progress.turns, 1);
    assert_eq!(
        (rec.progress.input_tokens, rec.progress.output_tokens),
        (40, 8)
    );

    // One conversation request: streamed, with the prompt, the key from SSM, in the job's
    // working directory.
    let turns = w.server.turn_requests().await;
    assert_eq!(turns.len(), 1, "{}", w.explain(job).await);
    let req = &turns[0];
    assert!(req.path.starts_with("/v1/messages"));
    assert_eq!(req.body["stream"], true);
    assert!(req.body_text().contains("Say hello."));
    assert_eq!(
        req.headers.get("x-api-key").map(String::as_str),
        Some(key.as_str())
    );
    assert!(req.tool_names().iter().any(|t| t == "Bash"));
    assert!(
        init["cwd"]
            .as_str()
            .unwrap()
            .starts_with(&w.root.path().join("ws").display().to_string()),
        "{init}"
    );
    assert_workspace_gone(w.root.path()).await;
}

#[tokio::test]
async fn claude_code_tool_job_leaves_an_artifact_and_records_turns_tokens_and_cost() {
    let script = Script::new()
        .turn(
            Turn::bash("mkdir -p \"$AGENTQ_OUT_DIR/reports\" && echo 'built by claude' > \"$AGENTQ_OUT_DIR/reports/summary.txt\" && ls \"$AGENTQ_OUT_DIR/reports\"")
                .saying("I will write the report.")
                .usage(1000, 50),
        )
        .turn(Turn::bash("wc -c < \"$AGENTQ_OUT_DIR/reports/summary.txt\"").usage(1200, 30))
        .turn(Turn::text("The report is in out/reports/summary.txt.").usage(1300, 20));
    let w = World::new(script, false).await;
    let job = "claude-tool";
    let (spec, _) = w.claude_spec(job, "Write the report.", json!({})).await;
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Succeeded, "{}", w.explain(job).await);

    // The real CLI ran the commands: the file is an artifact in S3.
    assert_eq!(
        w.artifact(job, "reports/summary.txt").await,
        "built by claude\n"
    );
    // Each tool result went back to the model.
    let turns = w.server.turn_requests().await;
    assert_eq!(turns.len(), 3, "{}", w.explain(job).await);
    assert!(turns[1].body_text().contains("summary.txt"), "ls output");
    assert!(turns[2].body_text().contains("16"), "wc output");

    // Turns, tokens and cost in the record are the session's, as the CLI reported them.
    let events = w.events(job).await;
    let result = the_result(&events);
    assert_eq!(result["num_turns"], 3);
    assert_eq!(rec.progress.turns, 3);
    let cost = result["total_cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0, "{result}");
    assert!((rec.progress.cost_usd - cost).abs() < 1e-9, "{result}");
    assert_eq!(
        (
            result["usage"]["input_tokens"].as_u64(),
            result["usage"]["output_tokens"].as_u64()
        ),
        (Some(3500), Some(100)),
        "the CLI's session usage is the sum of the scripted usage: {result}"
    );

    let manifest = w.manifest(job).await;
    assert_eq!(manifest["artifacts"][0]["path"], "reports/summary.txt");
    assert_workspace_gone(w.root.path()).await;
}

/// Claude Code prints one `assistant` event per content block, each carrying the usage of
/// the whole message; the record must hold the session's tokens (the `result` event's),
/// not a sum over blocks.
#[tokio::test]
async fn claude_code_record_holds_the_session_tokens_not_a_sum_over_content_blocks() {
    let script = Script::new()
        .turn(
            Turn::bash("true")
                .saying("Two blocks in one message.")
                .usage(1000, 50),
        )
        .turn(Turn::text("Finished.").usage(1200, 30));
    let w = World::new(script, false).await;
    let job = "claude-tokens";
    let (spec, _) = w.claude_spec(job, "Run true.", json!({})).await;
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Succeeded, "{}", w.explain(job).await);
    let events = w.events(job).await;
    let blocks = of_type(&events, "assistant").len();
    assert_eq!(blocks, 3, "text + tool_use, then text: {events:?}");
    let result = the_result(&events);
    assert_eq!(result["usage"]["input_tokens"], 2200);
    assert_eq!(result["usage"]["output_tokens"], 80);
    assert_eq!(
        (rec.progress.input_tokens, rec.progress.output_tokens),
        (2200, 80),
        "the record's tokens are the session's total"
    );
    assert_eq!(rec.progress.turns, 2);
}

#[tokio::test]
async fn claude_code_max_turns_stops_the_real_cli() {
    // The model never stops asking for tools; the spec allows two turns.
    let script = Script::new().then_always(Turn::bash("echo still working").usage(10, 5));
    let w = World::new(script, false).await;
    let job = "claude-max-turns";
    let (spec, _) = w
        .claude_spec(job, "Work forever.", json!({"max_turns": 2}))
        .await;
    let rec = w.run(job, &spec).await;

    assert_eq!(rec.status, JobState::Failed, "{}", w.explain(job).await);
    assert_eq!(rec.cause.as_deref(), Some("agent_exit"));
    assert_eq!(rec.exit_code, Some(1));
    assert!(
        rec.reason
            .as_deref()
            .unwrap_or("")
            .contains("error_max_turns"),
        "the reason names the CLI's stop: {:?}",
        rec.reason
    );
    let result = the_result(&w.events(job).await).clone();
    assert_eq!(result["subtype"], "error_max_turns");
    assert_eq!(result["is_error"], true);
    assert_eq!(
        w.server.turn_requests().await.len(),
        2,
        "the CLI stopped after two model turns"
    );
}

#[tokio::test]
async fn claude_code_max_budget_usd_stops_the_real_cli() {
    // Each model turn costs about $0.53 at the CLI's list price for its default model
    // (100k input + 1k output tokens); the spec allows $1.20.
    let script = Script::new().then_always(Turn::bash("echo still working").usage(100_000, 1_000));
    let w = World::new(script, false).await;
    let job = "claude-budget";
    let (spec, _) = w
        .claude_spec(job, "Spend.", json!({"max_budget_usd": 1.2}))
        .await;
    let rec = w.run(job, &spec).await;

    // The CLI stops itself at the cap (and the platform would, from the reported spend):
    // either way the attempt ends as a budget stop the dispatcher does not retry.
    assert_eq!(rec.status, JobState::Failed, "{}", w.explain(job).await);
    assert_eq!(rec.cause.as_deref(), Some("budget_exceeded"));
    assert!(
        rec.reason
            .as_deref()
            .unwrap_or("")
            .contains("max_budget_usd"),
        "the reason names the cap: {:?}",
        rec.reason
    );
    let result = the_result(&w.events(job).await).clone();
    assert_eq!(result["subtype"], "error_max_budget_usd");
    let cost = result["total_cost_usd"].as_f64().unwrap();
    // The CLI checks the budget after each turn, so it ends one turn past it.
    assert!(cost >= 1.2, "{result}");
    assert!((rec.progress.cost_usd - cost).abs() < 1e-9);
    let turns = w.server.turn_requests().await.len();
    assert!(
        (2..=4).contains(&turns),
        "the CLI stopped after a few turns, not {turns}"
    );
}

#[tokio::test]
async fn claude_code_starts_the_image_mcp_servers_and_lists_them_in_its_init_event() {
    let w = World::new(Script::new().turn(Turn::text("ok")), true).await;
    let job = "claude-mcp";
    let (spec, _) = w.claude_spec(job, "List your tools.", json!({})).await;
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Succeeded, "{}", w.explain(job).await);

    let events = w.events(job).await;
    let init = events
        .iter()
        .find(|e| e["type"] == "system" && e["subtype"] == "init")
        .expect("system/init in the uploaded events");
    let mut listed: Vec<(String, String)> = init["mcp_servers"]
        .as_array()
        .expect("mcp_servers")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    listed.sort();
    let expected: Vec<(String, String)> = AgentClis::mcp_server_names()
        .await
        .into_iter()
        .map(|n| (n, "connected".to_owned()))
        .collect();
    assert_eq!(listed, expected, "{init}");
    // Their tools are offered to the agent.
    let tools: Vec<&str> = init["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in AgentClis::mcp_server_names().await {
        assert!(
            tools
                .iter()
                .any(|t| t.starts_with(&format!("mcp__{name}__"))),
            "no tool of {name} in {tools:?}"
        );
    }
}

// --------------------------------------------------------------------------- Codex

#[tokio::test]
async fn codex_one_turn_job_succeeds() {
    let w = World::new(
        Script::new().turn(Turn::text("Hello from the scripted model.").usage(60, 9)),
        false,
    )
    .await;
    let job = "codex-one-turn";
    let (spec, key) = w.codex_spec(job, "Say hello.").await;
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Succeeded, "{}", w.explain(job).await);

    let events = w.events(job).await;
    let thread = of_type(&events, "thread.started")
        .first()
        .expect("thread.started")["thread_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(rec.progress.session_id.as_deref(), Some(thread.as_str()));
    assert!(
        events.iter().any(|e| e["type"] == "item.completed"
            && e["item"]["type"] == "agent_message"
            && e["item"]["text"] == "Hello from the scripted model."),
        "{events:?}"
    );
    assert_eq!(rec.progress.turns, 1);
    assert_eq!(
        (rec.progress.input_tokens, rec.progress.output_tokens),
        (60, 9)
    );
    let turns = w.server.turn_requests().await;
    assert_eq!(turns.len(), 1, "{}", w.explain(job).await);
    assert_eq!(turns[0].path, "/v1/responses");
    assert_eq!(turns[0].body["stream"], true);
    assert!(turns[0].body_text().contains("Say hello."));
    assert_eq!(
        turns[0].headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {key}").as_str())
    );
    assert_workspace_gone(w.root.path()).await;
}

#[tokio::test]
async fn codex_tool_job_leaves_an_artifact_and_records_turns_and_tokens() {
    let script = Script::new()
        .turn(
            Turn::bash("mkdir -p \"$AGENTQ_OUT_DIR\" && echo 'built by codex' > \"$AGENTQ_OUT_DIR/codex.txt\" && pwd")
                .saying("Writing the file.")
                .usage(500, 40),
        )
        .turn(Turn::text("Done: out/codex.txt.").usage(600, 30));
    let w = World::new(script, false).await;
    let job = "codex-tool";
    let (spec, _) = w.codex_spec(job, "Write the file.").await;
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Succeeded, "{}", w.explain(job).await);

    let manifest = w.manifest(job).await;
    assert_eq!(
        manifest["artifacts"][0]["path"],
        "codex.txt",
        "{manifest}\n{}",
        w.explain(job).await
    );
    assert_eq!(w.artifact(job, "codex.txt").await, "built by codex\n");
    let events = w.events(job).await;
    let commands: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "item.completed" && e["item"]["type"] == "command_execution")
        .collect();
    assert_eq!(commands.len(), 1, "{events:?}");
    assert_eq!(commands[0]["item"]["exit_code"], 0);
    // The command ran in the job's working directory, and its output went back.
    let turns = w.server.turn_requests().await;
    assert_eq!(turns.len(), 2, "{}", w.explain(job).await);
    let work = w.root.path().join("ws").display().to_string();
    assert!(turns[1].body_text().contains(&work), "pwd output");
    // One Codex turn (two model requests); tokens are the turn's total.
    let completed = of_type(&events, "turn.completed");
    assert_eq!(completed.len(), 1);
    assert_eq!(rec.progress.turns, 1);
    assert_eq!(
        (rec.progress.input_tokens, rec.progress.output_tokens),
        (1100, 70)
    );
    assert_workspace_gone(w.root.path()).await;
}

#[tokio::test]
async fn claude_code_rate_limited_to_the_end_is_a_rate_limit_not_a_failure() {
    // Every request is refused with a 429 (retry after 1 s, limits reset in 120 s): the
    // CLI retries on its own, gives up, and the attempt is classified `rate_limited` with
    // the reset time, for the dispatcher to pause the job rather than count a failure.
    let script = Script::new().then_always(Turn::rate_limit(1, 120));
    let w = World::new(script, false).await;
    let job = "claude-rate-limited";
    let (spec, _) = w.claude_spec(job, "Say hello.", json!({})).await;
    let before = agentq_core::record::now_ms();
    let rec = w.run(job, &spec).await;
    assert_eq!(rec.status, JobState::Failed, "{}", w.explain(job).await);
    assert_eq!(
        rec.cause.as_deref(),
        Some("rate_limited"),
        "{}",
        w.explain(job).await
    );
    let reason = rec.reason.as_deref().unwrap_or("");
    assert!(reason.contains("rate-limited"), "{reason}");
    // Stopped after a few refusals, not after the CLI's ten growing retries.
    let tries = w.server.turn_requests().await.len();
    assert!(tries <= 6, "{tries} requests: the job was not paused early");
    // The failure record carries when to try again.
    let dlq = w.r.drain(&w.r.dlq_url).await;
    let agentq_core::failure::DlqMessage::Failure(f) =
        agentq_core::failure::DlqMessage::parse(&dlq[0])
    else {
        panic!("{dlq:?}")
    };
    let agentq_core::FailureCause::RateLimited { reset_at } = f.cause else {
        panic!("{:?}", f.cause)
    };
    assert!(reset_at.is_some_and(|t| t > before), "{reset_at:?}");
}
