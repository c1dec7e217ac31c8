//! A long job across segments with the real Claude Code CLI: how much each segment
//! boundary costs. The job keeps Claude busy in a tool call, every segment is cut by its
//! (short, scaled-down) invocation deadline, the dispatcher re-plans it, the next segment
//! restores the checkpoint and resumes the same session; after `AGENTQ_BENCH_SEGMENTS`
//! segments (default 5) the model lets it finish.
//!
//! Overhead per boundary = from the child's end in segment k to the resumed CLI's first
//! model request in segment k+1: the finalize (record, checkpoint, failure record), the
//! dispatcher's re-plan, the next receive and claim, the checkpoint's restore, the CLI's
//! start-up and session load. Reported with its parts from the manifests.
//!
//!     cargo bench -p agentq-testkit --bench segments
//!
//! Needs the emulator (started on demand) and the agent CLIs (installed on demand).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq_core::{Attempt, JobId, JobState, JobStore, Layout};
use agentq_testkit::agent_clis::{agent_clis, claude_env};
use agentq_testkit::models::{ModelServer, Script, Turn};
use agentq_testkit::{binary, resources};
use serde_json::Value;

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let segments: u32 = std::env::var("AGENTQ_BENCH_SEGMENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let function_timeout = 25u64;
    let clis = agent_clis().await;
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let busy = Script::new().then_always(
        Turn::bash("python3 -c 'import time; time.sleep(600)'").saying("Working on it."),
    );
    let server = ModelServer::start(&busy).await;
    let key = format!("{}anthropic-api-key", r.secrets_prefix);
    r.put_secret(&key, "sk-ant-bench-0000000000").await;
    let env: serde_json::Map<String, Value> = claude_env(&server.base_url())
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    let job = JobId::parse(&agentq_testkit::unique("segments")).unwrap();
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "claude-code",
        "prompt": "Run the long build.", "resume": "auto", "timeout_seconds": 3600,
        "max_attempts": 20,
        "env": env, "secrets": {"ANTHROPIC_API_KEY": key},
    });

    let common = |c: &mut Command| {
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(r.env())
            .env("AGENTQ_CLAUDE_BIN", &clis.claude)
            .env("AGENTQ_CHILD_PATH", clis.child_path())
            .env("AGENTQ_WORK_ROOT", work.path().join("ws"))
            .env("AGENTQ_HEARTBEAT_SECONDS", "1")
            .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "8")
            .env("AGENTQ_KILL_GRACE_SECONDS", "2")
            .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut agent = Command::new(binary("agentq-agent"));
    agent.args([
        "poll",
        "--wait-seconds",
        "1",
        "--function-timeout-seconds",
        &function_timeout.to_string(),
    ]);
    common(&mut agent);
    let _agent = Killer(agent.spawn().unwrap());
    let mut dispatcher = Command::new(binary("agentq-dispatcher"));
    dispatcher.args(["replan", "--wait-seconds", "1"]);
    common(&mut dispatcher);
    let _dispatcher = Killer(dispatcher.spawn().unwrap());

    aws_sdk_sqs::Client::new(&r.sdk)
        .send_message()
        .queue_url(&r.queue_url)
        .message_body(spec.to_string())
        .send()
        .await
        .unwrap();
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let started = Instant::now();
    let mut switched = false;
    let rec = loop {
        let rec = store.get(&job).await.unwrap();
        if let Some(rec) = &rec {
            if !switched && rec.status == JobState::Resuming && rec.segment >= segments {
                server
                    .set_script(&Script::new().then_always(Turn::text("All done.")))
                    .await;
                switched = true;
            }
            if rec.status.is_terminal() {
                break rec.clone();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(u64::from(segments) * 120),
            "the job did not finish: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let wall = started.elapsed();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");

    // Per attempt: the manifest's timestamps.
    let layout = Layout::new(&r.prefix);
    let mut manifests = Vec::new();
    for n in 1..=rec.attempt.get() {
        let text = r.object(&layout.result(&job, Attempt(n))).await;
        manifests.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    let turns = server.turn_requests().await;
    let ms = |v: &Value, k: &str| v[k].as_i64().unwrap_or_default();
    println!(
        "job of {} segments: {:.1} s wall, {} attempts, session {}",
        rec.segment,
        wall.as_secs_f64(),
        rec.attempt,
        rec.progress.session_id.as_deref().unwrap_or("?")
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "boundary", "finalize", "replan+rx", "prepare", "cli-start", "TOTAL"
    );
    let mut totals = Vec::new();
    for w in manifests.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let ended = ms(a, "child_ended_at");
        let finalize = ms(a, "finished_at") - ended;
        let gap = ms(b, "started_at") - ms(a, "finished_at");
        let prepare = ms(b, "child_started_at") - ms(b, "started_at");
        let child_start = ms(b, "child_started_at");
        let first_request = turns
            .iter()
            .map(|t| (t.at * 1000.0) as i64)
            .find(|t| *t >= child_start)
            .unwrap_or(child_start);
        let cli = first_request - child_start;
        let total = first_request - ended;
        totals.push(total);
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
            format!("{}->{}", ms(a, "segment"), ms(b, "segment")),
            finalize,
            gap,
            prepare,
            cli,
            total
        );
    }
    let mean = totals.iter().sum::<i64>() as f64 / totals.len().max(1) as f64;
    let max = totals.iter().max().copied().unwrap_or_default();
    println!("overhead per segment boundary (ms): mean {mean:.0}, max {max}");
}
