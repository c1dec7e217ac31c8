//! End to end across the binaries: a job that runs out of time in one invocation is
//! re-planned by the dispatcher and resumed by the agent in a new segment, continuing the
//! same agent session from its checkpoint.

use std::process::Output;
use std::time::Duration;

use agentq_core::failure::DlqMessage;
use agentq_core::{Attempt, FailureCause, JobId, JobState, JobStore, Layout, Stream};
use agentq_testkit::{Resources, binary, fixture, resources};

async fn run(r: &Resources, bin: &str, args: &[&str], work: &std::path::Path) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(binary(bin))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(r.env())
            .env("AGENTQ_CLAUDE_BIN", fixture("fake-agent"))
            .env("AGENTQ_WORK_ROOT", work)
            .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
            .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
            .env("AGENTQ_KILL_GRACE_SECONDS", "1")
            .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
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

#[tokio::test]
async fn a_timed_out_session_is_resumed_in_a_new_segment() {
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    // The jobs run under their own uids when the tests run as root: let them through.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let job = JobId::parse(&agentq_testkit::unique("resume")).unwrap();
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "claude-code",
        "prompt": "sleep=8 turns=2", "resume": "auto",
    })
    .to_string();
    aws_sdk_sqs::Client::new(&r.sdk)
        .send_message()
        .queue_url(&r.queue_url)
        .message_body(&spec)
        .send()
        .await
        .unwrap();

    // Segment 1: a 10 s invocation with a 4 s reserve stops the 8 s job at ~6 s.
    run(
        &r,
        "agentq-agent",
        &[
            "poll",
            "--once",
            "--wait-seconds",
            "1",
            "--function-timeout-seconds",
            "10",
        ],
        work.path(),
    )
    .await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::TimedOut, "{rec:?}");
    let session = rec.resume_session.clone().expect("a session to resume");
    let layout = Layout::new(&r.prefix);
    assert_eq!(
        r.keys(&layout.checkpoint(&job)).await.len(),
        1,
        "checkpoint saved"
    );

    // The dispatcher reads the failure record and plans the next segment.
    let dlq = r.drain(&r.dlq_url).await;
    let DlqMessage::Failure(f) = DlqMessage::parse(&dlq[0]) else {
        panic!("{dlq:?}")
    };
    assert_eq!(f.cause, FailureCause::TimedOut { resumable: true });
    aws_sdk_sqs::Client::new(&r.sdk)
        .send_message()
        .queue_url(&r.dlq_url)
        .message_body(&dlq[0])
        .send()
        .await
        .unwrap();
    run(&r, "agentq-dispatcher", &["replan", "--once"], work.path()).await;
    let rec = store.require(&job).await.unwrap();
    assert_eq!(
        (rec.status, rec.segment),
        (JobState::Resuming, 2),
        "{rec:?}"
    );

    // Segment 2: enough time; the agent resumes the same session and finishes.
    run(
        &r,
        "agentq-agent",
        &[
            "poll",
            "--once",
            "--wait-seconds",
            "1",
            "--function-timeout-seconds",
            "60",
        ],
        work.path(),
    )
    .await;
    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!((rec.attempt, rec.segment), (Attempt(2), 2));
    assert_eq!(rec.progress.session_id.as_deref(), Some(session.as_str()));
    let events = r
        .object(&layout.segment(&job, Attempt(2), Stream::Events, 0))
        .await;
    assert!(
        events.contains(r#""resumed":true"#) || events.contains(r#""resumed": true"#),
        "{events}"
    );
    assert!(
        rec.runtime_ms >= 5000,
        "run time of both segments is counted: {}",
        rec.runtime_ms
    );
}
