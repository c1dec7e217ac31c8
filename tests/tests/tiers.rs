//! End to end across the binaries, with a second capacity tier: a job on the default tier
//! runs out of time in its first segment; the dispatcher, told to escalate resumable
//! timeouts (`--escalate-timeouts true`, as the template sets it for a large tier on
//! Lambda Managed Instances), sends the next segment to the large tier's queue instead of
//! the jobs queue; an agent reading that queue with a longer invocation resumes the same
//! session and finishes it there.

use std::process::Output;
use std::time::Duration;

use agentq_core::{Attempt, JobId, JobState, JobStore};
use agentq_testkit::{Resources, binary, create_queue, fixture, resources, unique};

async fn run(
    r: &Resources,
    bin: &str,
    args: &[&str],
    env: &[(&str, &str)],
    work: &std::path::Path,
) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(binary(bin))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(r.env())
            .envs(env.iter().copied())
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
async fn a_timed_out_segment_resumes_on_the_large_tier_when_configured() {
    let r = resources().await;
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    let large = create_queue(&sqs, &unique("aq-large"), &[]).await;
    let work = tempfile::tempdir().unwrap();
    // The jobs run under their own uids when the tests run as root: let them through.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let job = JobId::parse(&unique("tiers")).unwrap();
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "claude-code",
        "prompt": "sleep=8 turns=2", "resume": "auto",
    })
    .to_string();
    sqs.send_message()
        .queue_url(&r.queue_url)
        .message_body(&spec)
        .send()
        .await
        .unwrap();

    // Segment 1 on the default tier: a 10 s invocation with a 4 s reserve stops the 8 s
    // job at ~6 s, with a checkpoint.
    let poll_once = ["poll", "--once", "--wait-seconds", "1"];
    let mut args = poll_once.to_vec();
    args.extend(["--function-timeout-seconds", "10"]);
    run(&r, "agentq-agent", &args, &[], work.path()).await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::TimedOut, "{rec:?}");
    let session = rec.resume_session.clone().expect("a session to resume");

    // The dispatcher, with the large tier and the escalation option, resumes it there.
    let tier = format!("large={large}");
    run(
        &r,
        "agentq-dispatcher",
        &["replan", "--once", "--wait-seconds", "0"],
        &[
            ("AGENTQ_TIER_QUEUES", tier.as_str()),
            ("AGENTQ_ESCALATE_TIMEOUTS", "true"),
        ],
        work.path(),
    )
    .await;
    let rec = store.require(&job).await.unwrap();
    assert_eq!(
        (rec.status, rec.segment, rec.tier.as_deref()),
        (JobState::Resuming, 2, Some("large")),
        "{rec:?}"
    );
    let resume = rec.history.last().expect("a decision");
    assert_eq!(resume.action, "resume", "{:?}", rec.history);
    assert_eq!(resume.queue.as_deref(), Some(large.as_str()));
    assert!(resume.reason.contains("on tier large"), "{}", resume.reason);
    assert!(
        r.drain(&r.queue_url).await.is_empty(),
        "nothing goes back to the default tier"
    );

    // Segment 2 on the large tier, whose invocations are longer (Managed Instances
    // allow 90 minutes): the same session finishes there.
    let mut args = poll_once.to_vec();
    args.extend(["--function-timeout-seconds", "60"]);
    run(
        &r,
        "agentq-agent",
        &args,
        &[("AGENTQ_QUEUE_URL", large.as_str())],
        work.path(),
    )
    .await;
    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert_eq!((rec.attempt, rec.segment), (Attempt(2), 2));
    assert_eq!(rec.tier.as_deref(), Some("large"));
    assert_eq!(rec.progress.session_id.as_deref(), Some(session.as_str()));
}
