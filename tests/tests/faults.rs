//! AWS faults end to end: two agent pollers and the dispatcher talk to the emulator
//! through the fault proxy (10 % of requests throttled, 429, 500, 503, or dropped before
//! or after forwarding); every one of 20 short jobs still succeeds. (Whether every attempt
//! also kept its manifest and logs is judged by the chaos suite, `scripts/chaos`.)

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentq_core::{JobId, JobState, JobStore};
use agentq_testkit::faultproxy::{FaultConfig, FaultProxy};
use agentq_testkit::{ResourceOptions, binary, repo_root, resources_with, unique};

/// Kills the process on drop, so a failing test leaves nothing running.
struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn ten_percent_aws_faults_every_job_succeeds() {
    let r = resources_with(ResourceOptions {
        max_receive_count: 5,
        // A receive whose answer is dropped leaves its messages invisible this long.
        visibility_timeout: 30,
    })
    .await;
    let proxy = FaultProxy::start(
        &r.endpoint,
        "127.0.0.1:0".parse().unwrap(),
        FaultConfig::uniform(0.1, 11),
    )
    .await
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let prefix = unique("faulty");
    let jobs: Vec<JobId> = (0..20)
        .map(|i| JobId::parse(&format!("{prefix}-{i:02}")).unwrap())
        .collect();
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    for j in &jobs {
        let spec = serde_json::json!({
            "spec_version": 1, "job_id": j.as_str(), "agent": "command",
            "command": ["sh", "-c", "echo working; sleep 0.3; echo ok > \"$AGENTQ_OUT_DIR/out.txt\"; echo done"],
            "max_attempts": 10,
        });
        sqs.send_message()
            .queue_url(&r.queue_url)
            .message_body(spec.to_string())
            .send()
            .await
            .unwrap();
    }

    let env = |c: &mut Command| {
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(r.env())
            .env("AWS_ENDPOINT_URL", proxy.endpoint())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut procs = Vec::new();
    for _ in 0..2 {
        let mut c = Command::new(binary("agentq-agent"));
        c.args(["poll", "--wait-seconds", "1", "--max-concurrency", "2"]);
        env(&mut c);
        c.env("AGENTQ_WORK_ROOT", work.path())
            .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
            .env("AGENTQ_VISIBILITY_HORIZON_SECONDS", "3")
            .env("AGENTQ_STALE_AFTER_SECONDS", "3")
            .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
            .env("AGENTQ_KILL_GRACE_SECONDS", "1")
            .env("AGENTQ_LOG_FLUSH_SECONDS", "1");
        procs.push(Killer(c.spawn().unwrap()));
    }
    let mut c = Command::new(binary("agentq-dispatcher"));
    c.args(["replan", "--wait-seconds", "1", "--policy"])
        .arg(repo_root().join("tests/chaos/policy.toml"));
    env(&mut c);
    procs.push(Killer(c.spawn().unwrap()));

    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let t = tokio::time::Instant::now();
    let mut states = Vec::new();
    while t.elapsed() < Duration::from_secs(180) {
        states.clear();
        for j in &jobs {
            states.push(store.get(j).await.unwrap().map(|rec| rec.status));
        }
        if states.iter().all(|s| s.is_some_and(|s| s.is_terminal())) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(procs);
    let stats = proxy.stats();
    eprintln!(
        "{} AWS requests, {} faults injected: {}",
        stats.total_requests(),
        stats.total_faults(),
        serde_json::to_string(&stats.faults).unwrap()
    );
    assert!(
        states.iter().all(|s| *s == Some(JobState::Succeeded)),
        "every job succeeds: {:?}",
        jobs.iter().zip(&states).collect::<Vec<_>>()
    );
    // About 200 requests at 10 %: fewer than 5 faults would mean the proxy was bypassed.
    assert!(stats.total_faults() >= 5, "faults were injected: {stats:?}");
}
