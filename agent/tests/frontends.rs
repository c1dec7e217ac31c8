//! The agent binary's front ends: `poll` (killed mid-job and taken over), `lambda`
//! through a Lambda Runtime API server with a real SQS event, and `run` with a flood of
//! output in bounded memory.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq_core::{JobId, JobState, JobStore};
use agentq_testkit::runtime_api::{Answer, RuntimeApi, lambda_env};
use agentq_testkit::{ResourceOptions, Resources, binary, fixture, resources, resources_with};
use common::*;

fn agent_cmd(r: &Resources, work: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(binary("agentq-agent"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_CLAUDE_BIN", fake_agent())
        .env("AGENTQ_CODEX_BIN", fake_agent())
        .env("AGENTQ_WORK_ROOT", work)
        .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
        .env("AGENTQ_VISIBILITY_HORIZON_SECONDS", "3")
        .env("AGENTQ_STALE_AFTER_SECONDS", "3")
        .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
        .env("AGENTQ_KILL_GRACE_SECONDS", "1")
        .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn send(r: &Resources, body: &str) {
    aws_sdk_sqs::Client::new(&r.sdk)
        .send_message()
        .queue_url(&r.queue_url)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn poller_killed_mid_job_the_message_returns_and_the_next_claim_takes_over() {
    let r = resources_with(ResourceOptions {
        max_receive_count: 10,
        visibility_timeout: 30,
    })
    .await;
    let work = work_root();
    send(&r, &claude("crashy", "sleep=5")).await;
    let first = agent_cmd(&r, work.path(), &["poll", "--wait-seconds", "1"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = Killer(first);
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let job = JobId::parse("crashy").unwrap();
    let t = Instant::now();
    loop {
        let rec = store.get(&job).await.unwrap();
        if rec
            .as_ref()
            .is_some_and(|r| r.status == JobState::Running && r.progress.events > 0)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never started: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a heartbeat shorten the visibility to the 3 s horizon, then kill -9.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    first.0.kill().unwrap();
    let _ = first.0.wait();
    let killed = Instant::now();

    // The message is back within the horizon (not the queue's 30 s visibility timeout).
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    loop {
        let got = sqs
            .receive_message()
            .queue_url(&r.queue_url)
            .visibility_timeout(0)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if !got.messages().is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "message did not come back"
        );
    }
    let back_after = killed.elapsed();
    // The heartbeat horizon is 3 s; the queue's own visibility timeout is 30 s.
    assert!(
        back_after <= Duration::from_secs(8),
        "came back after {back_after:?}"
    );

    // The lease may still look live for a moment (stale after 3 s): the message is then
    // left for 3 s, and a 5 s long poll picks it up again for the takeover.
    let status = agent_cmd(&r, work.path(), &["poll", "--once", "--wait-seconds", "5"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.attempt.get(), 2);
    assert_eq!(rec.attempts["1"].cause.as_deref(), Some("crashed"));
    assert!(rec.history.iter().any(|d| d.action == "takeover"));
    assert!(
        r.drain(&r.queue_url).await.is_empty(),
        "the message was acknowledged"
    );
}

#[tokio::test]
async fn poll_once_runs_a_queue_and_deletes_only_what_succeeded() {
    let r = resources().await;
    let work = work_root();
    send(&r, &claude("p-ok", "turns=1")).await;
    send(&r, &claude("p-fail", "exit=4")).await;
    send(&r, "{ not json").await;
    let status = agent_cmd(
        &r,
        work.path(),
        &[
            "poll",
            "--once",
            "--wait-seconds",
            "1",
            "--batch-size",
            "10",
            "--batching-window-seconds",
            "1",
        ],
    )
    .stderr(Stdio::null())
    .status()
    .unwrap();
    assert!(status.success());
    assert_eq!(record(&r, "p-ok").await.status, JobState::Succeeded);
    assert_eq!(record(&r, "p-fail").await.status, JobState::Failed);
    assert!(r.drain(&r.queue_url).await.is_empty());
    assert_eq!(r.drain(&r.dlq_url).await.len(), 2);
}

#[tokio::test]
async fn lambda_mode_through_the_runtime_api_with_a_real_sqs_event() {
    let r = resources().await;
    let work = work_root();
    let api = RuntimeApi::start().await;
    let child = agent_cmd(&r, work.path(), &[])
        .envs(lambda_env(&api))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Killer(child);
    let event = std::fs::read_to_string(fixture("sqs-event.json")).unwrap();
    let id = api.invoke(&event, Duration::from_secs(60));
    let answer = api
        .answer(&id, Duration::from_secs(60))
        .await
        .expect("an answer");
    let Answer::Response(body) = answer else {
        panic!("error answer: {answer:?}")
    };
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["batchItemFailures"], serde_json::json!([]));
    assert_eq!(record(&r, "fixture-ok").await.status, JobState::Succeeded);
    assert_eq!(record(&r, "fixture-fail").await.status, JobState::Failed);
    assert_eq!(
        r.drain(&r.dlq_url).await.len(),
        2,
        "failing job + malformed message"
    );
    assert!(api.init_error().is_none());
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs one flood job through `agentq-agent run`; returns the agent's peak RSS in KiB.
async fn flood_peak(r: &Resources, work: &std::path::Path, job: &str, bytes: u64) -> u64 {
    let spec = work.join(format!("{job}.json"));
    std::fs::write(&spec, claude(job, &format!("flood={bytes}"))).unwrap();
    let child = agent_cmd(
        r,
        &work.join("ws"),
        &[
            "run",
            "--job",
            spec.to_str().unwrap(),
            "--deadline-seconds",
            "120",
        ],
    )
    .env("AGENTQ_LOG_FLUSH_BYTES", (1024 * 1024).to_string())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let pid = child.id();
    let mut child = Killer(child);
    let mut peak = 0;
    let status = loop {
        if let Some(hwm) = rss_kib(pid, "VmHWM:") {
            peak = peak.max(hwm);
        }
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success());
    let rec = record(r, job).await;
    assert_eq!(rec.status, JobState::Succeeded);
    assert!(rec.progress.stdout_bytes >= bytes);
    let mut uploaded = 0u64;
    for k in r
        .keys(&format!("{}/jobs/{job}/attempt-1/stdout/", r.prefix))
        .await
    {
        uploaded += r.object(&k).await.len() as u64;
    }
    assert!(
        uploaded >= bytes,
        "only {uploaded} of {bytes} bytes reached S3"
    );
    peak
}

#[tokio::test]
async fn a_flood_of_output_keeps_memory_bounded() {
    let r = resources().await;
    let work = work_root();
    // Eight times the output must not mean more memory: the pipe is read into bounded
    // buffers and the child waits while they upload.
    let small = flood_peak(&r, work.path(), "flood-small", 8 << 20).await;
    let large = flood_peak(&r, work.path(), "flood-large", 64 << 20).await;
    eprintln!(
        "peak RSS {} MiB for 8 MiB of output, {} MiB for 64 MiB",
        small / 1024,
        large / 1024
    );
    assert!(
        large < small + 16 * 1024,
        "peak RSS grew with the output: {small} KiB -> {large} KiB"
    );
}
