//! The headline promise with the real agent CLIs: a session that outlives its invocation
//! is checkpointed, re-planned by the dispatcher, and continued by the same CLI session in
//! the next segment — Claude Code (`--resume`, whose session store depends on the working
//! directory) and Codex (`exec resume`). Binaries end to end: `agentq-agent poll`,
//! `agentq-dispatcher replan`, against the emulator and the scripted model server.

use std::process::Output;
use std::time::{Duration, Instant};

use agentq_core::{Attempt, JobId, JobState, JobStore};
use agentq_testkit::agent_clis::{agent_clis, claude_env};
use agentq_testkit::models::{ModelServer, Script, Turn, write_codex_home};
use agentq_testkit::{Resources, binary, resources};

struct Env {
    r: Resources,
    work: tempfile::TempDir,
    extra: Vec<(String, String)>,
}

impl Env {
    async fn new(server: &ModelServer) -> Self {
        let clis = agent_clis().await;
        let r = resources().await;
        let work = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            work.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let codex_home = write_codex_home(&work.path().join("codex"), server).await;
        let extra = vec![
            ("AGENTQ_CLAUDE_BIN", clis.claude.display().to_string()),
            ("AGENTQ_CODEX_BIN", clis.codex.display().to_string()),
            ("AGENTQ_CHILD_PATH", clis.child_path()),
            (
                "AGENTQ_CODEX_CONFIG",
                codex_home.join("config.toml").display().to_string(),
            ),
            (
                "AGENTQ_WORK_ROOT",
                work.path().join("ws").display().to_string(),
            ),
            ("AGENTQ_HEARTBEAT_SECONDS", "1".into()),
            ("AGENTQ_DEADLINE_RESERVE_SECONDS", "8".into()),
            ("AGENTQ_KILL_GRACE_SECONDS", "2".into()),
            ("AGENTQ_LOG_FLUSH_SECONDS", "1".into()),
            ("RUST_LOG", "info".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Self { r, work, extra }
    }

    async fn run(&self, bin: &str, args: &[&str]) -> Output {
        let out = tokio::time::timeout(
            Duration::from_secs(240),
            tokio::process::Command::new(binary(bin))
                .args(args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(self.r.env())
                .envs(self.extra.iter().map(|(k, v)| (k, v)))
                .output(),
        )
        .await
        .expect("finished in time")
        .expect("spawn");
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn send(&self, queue: &str, body: &str) {
        aws_sdk_sqs::Client::new(&self.r.sdk)
            .send_message()
            .queue_url(queue)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// One segment of `timeout` seconds through the poller.
    async fn segment(&self, timeout: u64) {
        let t = timeout.to_string();
        let out = self
            .run(
                "agentq-agent",
                &[
                    "poll",
                    "--once",
                    "--wait-seconds",
                    "2",
                    "--function-timeout-seconds",
                    &t,
                ],
            )
            .await;
        // Shown when a test fails: what the agent logged.
        eprintln!("--- agent ---\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Hands the DLQ to the dispatcher once.
    async fn replan(&self) {
        self.run("agentq-dispatcher", &["replan", "--once"]).await;
    }
}

/// Runs segment 1 (cut by its deadline inside a long tool call), the dispatcher's re-plan,
/// and segment 2; returns the record after each.
async fn across_segments(env: &Env, job: &JobId, spec: &str) -> (String, agentq_core::JobRecord) {
    env.send(&env.r.queue_url, spec).await;
    env.segment(40).await;
    let store = JobStore::new(env.r.clients().dynamodb, &env.r.table);
    let rec = store.require(job).await.unwrap();
    assert_eq!(rec.status, JobState::TimedOut, "segment 1: {rec:?}");
    let session = rec
        .resume_session
        .clone()
        .expect("segment 1 saw the CLI's session id");
    env.replan().await;
    let rec = store.require(job).await.unwrap();
    assert_eq!(
        (rec.status, rec.segment),
        (JobState::Resuming, 2),
        "{rec:?}"
    );
    let t = Instant::now();
    env.segment(120).await;
    eprintln!("segment 2 took {:.1?}", t.elapsed());
    (session, store.require(job).await.unwrap())
}

#[tokio::test]
async fn claude_code_resumes_its_session_in_segment_two_and_succeeds() {
    // Turn 1 starts a tool call that outlives segment 1 (Claude Code refuses a bare
    // `sleep`, so the build is a Python one); whatever comes after is answered "All done."
    // (the interrupted CLI's last request in segment 1, the resumed one in segment 2).
    let script = Script::new()
        .turn(
            Turn::bash("python3 -c 'import time; time.sleep(600)'")
                .saying("Starting the long build."),
        )
        .then_always(Turn::text("All done."));
    let server = ModelServer::start(&script).await;
    let env = Env::new(&server).await;
    let job = JobId::parse(&agentq_testkit::unique("claude-resume")).unwrap();
    let key = format!("{}anthropic-api-key", env.r.secrets_prefix);
    env.r.put_secret(&key, "sk-ant-test-resume-0000").await;
    let spec_env: serde_json::Map<String, serde_json::Value> = claude_env(&server.base_url())
        .into_iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
        .collect();
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "claude-code",
        "prompt": "Run the long build.", "resume": "auto",
        "env": spec_env, "secrets": {"ANTHROPIC_API_KEY": key},
    });
    let (session, rec) = across_segments(&env, &job, &spec.to_string()).await;
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!((rec.attempt, rec.segment), (Attempt(2), 2));
    assert_eq!(
        rec.progress.session_id.as_deref(),
        Some(session.as_str()),
        "the same session continued"
    );
    // The resumed CLI sent the earlier conversation (the interrupted tool call) and was
    // told why it stopped.
    let last = server
        .turn_requests()
        .await
        .last()
        .cloned()
        .expect("requests");
    let body = last.body_text();
    assert!(
        body.contains("time.sleep(600)"),
        "earlier conversation resent: {body}"
    );
    assert!(body.contains("interrupted"), "resume prompt sent: {body}");
    let _ = &env.work;
}

#[tokio::test]
async fn codex_resumes_its_thread_in_segment_two_and_succeeds() {
    // Codex bounds its own shell calls, so here the model's first answer outlives the
    // segment instead; the resumed thread's request gets "All done.".
    let script = Script::new()
        .turn(Turn::text("Still thinking.").after_sleep(600.0))
        .then_always(Turn::text("All done."));
    let server = ModelServer::start(&script).await;
    let env = Env::new(&server).await;
    let job = JobId::parse(&agentq_testkit::unique("codex-resume")).unwrap();
    let key = format!("{}openai-api-key", env.r.secrets_prefix);
    env.r.put_secret(&key, "sk-openai-test-resume-0000").await;
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "codex",
        "prompt": "Run the long build.", "resume": "auto",
        "secrets": {"OPENAI_API_KEY": key},
    });
    let (session, rec) = across_segments(&env, &job, &spec.to_string()).await;
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!((rec.attempt, rec.segment), (Attempt(2), 2));
    assert_eq!(rec.progress.session_id.as_deref(), Some(session.as_str()));
    let last = server
        .turn_requests()
        .await
        .last()
        .cloned()
        .expect("requests");
    let body = last.body_text();
    assert!(
        body.contains("Run the long build."),
        "earlier conversation resent: {body}"
    );
    assert!(body.contains("interrupted"), "resume prompt sent: {body}");
}
