//! A spec larger than a DynamoDB item (> 400 KB) end to end across the binaries: `agentq
//! submit` stores it in S3 and keeps the pointer in the job record, `agentq status` shows
//! where it is, the agent resolves it and runs the job to `SUCCEEDED`, and the dispatcher
//! plans such a record on the spec behind the pointer and re-sends the pointer.

use std::process::Output;
use std::time::Duration;

use agentq_core::payload::PayloadPointer;
use agentq_core::record::now_ms;
use agentq_core::store::{ClaimOutcome, ClaimRequest};
use agentq_core::{JobId, JobState, JobStore, Layout, Stream};
use agentq_testkit::{Resources, binary, fixture, resources, unique};

/// Bytes of the prompt: with the rest of the spec, well over DynamoDB's 400 KB item.
const PROMPT_BYTES: usize = 450 * 1024;

async fn run(r: &Resources, bin: &str, args: &[&str], work: &std::path::Path) -> Output {
    tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(binary(bin))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(r.env())
            .env("AGENTQ_CLAUDE_BIN", fixture("fake-agent"))
            .env("AGENTQ_WORK_ROOT", work.join("ws"))
            .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
            .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
            .env("AGENTQ_KILL_GRACE_SECONDS", "1")
            .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
            .current_dir(work)
            .output(),
    )
    .await
    .expect("finished in time")
    .expect("spawn")
}

fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_default()
}

/// A command job whose prompt is `PROMPT_BYTES` long; it prints the prompt file's size.
fn big_spec(id: &str, extra: serde_json::Value) -> String {
    let mut spec = serde_json::json!({
        "spec_version": 1,
        "job_id": id,
        "agent": "command",
        "command": ["sh", "-c", "wc -c < \"$AGENTQ_PROMPT_FILE\""],
        "prompt": "0123456789abcdef".repeat(PROMPT_BYTES / 16),
        "timeout_seconds": 600,
        "labels": {"size": "big"},
    });
    if let (Some(m), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        m.extend(extra);
    }
    let text = spec.to_string();
    assert!(text.len() > 400 * 1024, "{} bytes", text.len());
    text
}

/// `agentq submit` of a big spec; returns the record's pointer.
async fn submit(r: &Resources, work: &std::path::Path, id: &str, spec: &str) -> PayloadPointer {
    let file = work.join(format!("{id}.json"));
    std::fs::write(&file, spec).unwrap();
    let v = ok(
        &run(
            r,
            "agentq",
            &["submit", file.to_str().unwrap(), "--output", "json"],
            work,
        )
        .await,
        "submit",
    );
    assert_eq!(v["job_id"], id, "{v}");
    assert_eq!(v["offloaded"]["bucket"], r.bucket.as_str(), "{v}");
    let rec = store(r).require(&job(id)).await.unwrap();
    assert_eq!(rec.status, JobState::Queued);
    let kept = rec.spec.as_deref().expect("the record keeps something");
    let ptr = PayloadPointer::parse(kept).expect("the record keeps the S3 pointer");
    assert_eq!(ptr.key, Layout::new(&r.prefix).payload(id));
    assert_eq!(ptr.bucket, r.bucket);
    ptr
}

fn store(r: &Resources) -> JobStore {
    JobStore::new(r.clients().dynamodb, &r.table)
}

fn job(id: &str) -> JobId {
    JobId::parse(id).unwrap()
}

async fn poll_once(r: &Resources, work: &std::path::Path) {
    let out = run(
        r,
        "agentq-agent",
        &[
            "poll",
            "--once",
            "--wait-seconds",
            "2",
            "--function-timeout-seconds",
            "120",
        ],
        work,
    )
    .await;
    ok(&out, "agentq-agent poll --once");
}

#[tokio::test]
async fn a_spec_over_400_kb_is_submitted_through_s3_and_run_to_success() {
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    let id = unique("big");
    let ptr = submit(&r, work.path(), &id, &big_spec(&id, serde_json::json!({}))).await;

    // The message on the queue is the same pointer.
    let s3 = r.clients().s3;
    let stored = agentq_core::payload::resolve_body(&s3, &ptr.to_body())
        .await
        .unwrap();
    assert!(stored.len() > 400 * 1024);

    // `agentq status` reads such a record and says where the spec is.
    let v = ok(
        &run(
            &r,
            "agentq",
            &["status", &id, "--output", "json"],
            work.path(),
        )
        .await,
        "status",
    );
    assert_eq!(v["spec_location"], ptr.url(), "{v}");
    assert_eq!(v["labels"]["size"], "big");
    let out = run(&r, "agentq", &["status", &id], work.path()).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&ptr.url()),
        "{out:?}"
    );

    // The agent resolves the pointer and runs the job.
    poll_once(&r, work.path()).await;
    let rec = store(&r).require(&job(&id)).await.unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!(
        rec.spec.as_deref(),
        Some(ptr.to_body().as_str()),
        "the record still keeps the pointer"
    );
    let stdout = r
        .object(&Layout::new(&r.prefix).segment(&job(&id), rec.attempt, Stream::Stdout, 0))
        .await;
    assert_eq!(stdout.trim(), (PROMPT_BYTES / 16 * 16).to_string());
}

#[tokio::test]
async fn the_dispatcher_plans_a_pointer_record_on_its_spec_and_resends_the_pointer() {
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[causes.crashed]\nbase_delay = \"0s\"\nmax_delay = \"0s\"\n",
    )
    .unwrap();
    // One job may take one attempt, the other three: only the spec in S3 says so.
    let once = unique("big-once");
    let thrice = unique("big-thrice");
    let mut pointers = Vec::new();
    for (id, attempts) in [(&once, 1), (&thrice, 3)] {
        let spec = big_spec(id, serde_json::json!({ "max_attempts": attempts }));
        pointers.push(submit(&r, work.path(), id, &spec).await);
    }
    // Both runs crash after their claim (two hours ago, never a heartbeat since) and SQS
    // redrives the messages to the DLQ.
    let messages = r.drain(&r.queue_url).await;
    assert_eq!(messages.len(), 2);
    let layout = Layout::new(&r.prefix);
    for (id, ptr) in [(&once, &pointers[0]), (&thrice, &pointers[1])] {
        let body = ptr.to_body();
        assert!(messages.contains(&body), "{messages:?}");
        let claim = store(&r)
            .claim(&ClaimRequest {
                job_id: &job(id),
                spec_json: &body,
                tier: None,
                labels: &Default::default(),
                owner: "crashed-agent",
                stale_after_ms: 30_000,
                now: now_ms() - 2 * 3600 * 1000,
                layout: &layout,
            })
            .await
            .unwrap();
        assert!(matches!(claim, ClaimOutcome::Claimed { .. }), "{claim:?}");
        r.clients()
            .sqs
            .send_message()
            .queue_url(&r.dlq_url)
            .message_body(&body)
            .send()
            .await
            .unwrap();
    }

    let v = ok(
        &run(
            &r,
            "agentq-dispatcher",
            &[
                "replan",
                "--once",
                "--wait-seconds",
                "1",
                "--output",
                "json",
                "--policy",
                policy.to_str().unwrap(),
            ],
            work.path(),
        )
        .await,
        "replan",
    );
    assert_eq!(v["planned"], 2, "{v}");
    // max_attempts 1, read from S3: no retry left.
    let rec = store(&r).require(&job(&once)).await.unwrap();
    assert_eq!(rec.status, JobState::Dead, "{rec:?}");
    // max_attempts 3: retried, with the pointer re-sent as it is.
    let rec = store(&r).require(&job(&thrice)).await.unwrap();
    assert_eq!(rec.status, JobState::RetryScheduled, "{rec:?}");
    let sent = r.drain_messages(&r.queue_url).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body(), Some(pointers[1].to_body().as_str()));
    r.clients()
        .sqs
        .send_message()
        .queue_url(&r.queue_url)
        .message_body(pointers[1].to_body())
        .send()
        .await
        .unwrap();

    // The agent runs the retry from the pointer.
    poll_once(&r, work.path()).await;
    let rec = store(&r).require(&job(&thrice)).await.unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.attempt.get(), 2);
}
