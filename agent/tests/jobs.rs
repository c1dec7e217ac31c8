//! The agent's handler end to end against the emulator, with the fake agent CLI.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use agentq_core::failure::DlqMessage;
use agentq_core::record::now_ms;
use agentq_core::{FailureCause, JobState, Layout, Stream};
use agentq_testkit::resources;
use common::*;
use serde_json::Value;

#[tokio::test]
async fn success_records_logs_events_manifest_and_artifacts() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let resp = handle(
        &deps,
        vec![message(
            "m1",
            &claude("ok-1", "turns=3 files=2 stderr=hello"),
        )],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let rec = record(&r, "ok-1").await;
    assert_eq!(rec.status, JobState::Succeeded);
    assert_eq!(rec.attempt.get(), 1);
    assert_eq!(rec.progress.turns, 3);
    assert!(rec.progress.session_id.is_some());
    assert!(rec.progress.cost_usd > 0.0);

    let l = Layout::new(&r.prefix);
    let job = agentq_core::JobId::parse("ok-1").unwrap();
    let a = agentq_core::Attempt(1);
    let stdout = r.object(&l.segment(&job, a, Stream::Stdout, 0)).await;
    assert!(stdout.contains(r#""type":"result""#), "{stdout}");
    let events = r.object(&l.segment(&job, a, Stream::Events, 0)).await;
    assert!(
        events
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok())
    );
    assert!(events.lines().count() >= 5);
    assert!(
        r.object(&l.segment(&job, a, Stream::Stderr, 0))
            .await
            .contains("hello")
    );
    let manifest: Value = serde_json::from_str(&r.object(&l.result(&job, a)).await).unwrap();
    assert_eq!(manifest["status"], "SUCCEEDED");
    assert_eq!(manifest["exit_code"], 0);
    assert_eq!(manifest["artifacts"].as_array().unwrap().len(), 2);
    assert_eq!(
        manifest["streams"]["stdout"]["sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    assert!(
        !r.object(&l.artifact(&job, a, "out-0.txt").unwrap())
            .await
            .is_empty()
    );
    assert_eq!(rec.result_key.as_deref(), Some(l.result(&job, a).as_str()));
    // The workspace is gone; nothing is left on the queue for the DLQ.
    assert!(is_empty_dir(root.path()));
    assert!(r.drain(&r.dlq_url).await.is_empty());
}

#[tokio::test]
async fn non_zero_exit_fails_with_the_code_and_a_failure_record() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let resp = handle(
        &deps,
        vec![message("m1", &claude("bad-exit", "exit=3"))],
        Duration::from_secs(60),
    )
    .await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "deterministic failures are acknowledged"
    );
    let rec = record(&r, "bad-exit").await;
    assert_eq!(rec.status, JobState::Failed);
    assert_eq!(rec.exit_code, Some(3));
    assert_eq!(rec.cause.as_deref(), Some("agent_exit"));
    let dlq = r.drain(&r.dlq_url).await;
    assert_eq!(dlq.len(), 1);
    let DlqMessage::Failure(f) = DlqMessage::parse(&dlq[0]) else {
        panic!("{}", dlq[0])
    };
    assert_eq!(
        f.cause,
        FailureCause::AgentExit {
            code: Some(3),
            signal: None
        }
    );
    assert_eq!(f.job_id.unwrap().as_str(), "bad-exit");
}

#[tokio::test]
async fn a_child_that_never_ends_times_out_with_everything_in_s3_before_the_deadline() {
    let r = resources().await;
    let root = work_root();
    // Reserve 6 s, grace 2 s: the child is stopped at ~14 s of a 20 s invocation.
    let deps = deps(
        &r,
        root.path(),
        &[
            "--deadline-reserve-seconds",
            "6",
            "--kill-grace-seconds",
            "2",
        ],
    );
    let started = Instant::now();
    let deadline_ms = now_ms() + 20_000;
    let resp = handle(
        &deps,
        vec![message("m1", &claude("forever", "sleep=600 ignore-term"))],
        Duration::from_secs(20),
    )
    .await;
    let took = started.elapsed();
    assert!(resp.batch_item_failures.is_empty());
    assert!(
        took < Duration::from_secs(20),
        "handler returned after the deadline: {took:?}"
    );
    let rec = record(&r, "forever").await;
    assert_eq!(rec.status, JobState::TimedOut);
    assert_eq!(rec.cause.as_deref(), Some("timed_out"));
    let l = Layout::new(&r.prefix);
    let job = agentq_core::JobId::parse("forever").unwrap();
    let manifest: Value =
        serde_json::from_str(&r.object(&l.result(&job, agentq_core::Attempt(1))).await).unwrap();
    // It ignored SIGTERM, so it was killed; and it all landed before the deadline.
    assert_eq!(manifest["killed"], true);
    assert_eq!(manifest["signal"], 9);
    assert_eq!(manifest["stop_reason"], "deadline");
    let finished = manifest["finished_at"].as_i64().unwrap();
    let margin = deadline_ms - finished;
    eprintln!("result.json written {margin} ms before the deadline");
    assert!(
        margin > 0,
        "manifest written {margin} ms after the deadline"
    );
    // The 6 s reserve covered the 2 s grace plus the final uploads.
    assert!(manifest["finalize_ms"].as_u64().unwrap() < 6000);
    assert!(
        !r.keys(&l.stream_prefix(&job, agentq_core::Attempt(1), Stream::Stdout))
            .await
            .is_empty()
    );
    // A session was seen, so the failure record says the segment can be resumed.
    let dlq = r.drain(&r.dlq_url).await;
    let DlqMessage::Failure(f) = DlqMessage::parse(&dlq[0]) else {
        panic!()
    };
    assert_eq!(f.cause, FailureCause::TimedOut { resumable: true });
    assert!(r.keys(&l.checkpoint(&job)).await.len() == 1);
}

#[tokio::test]
async fn secrets_are_redacted_even_when_split_across_writes() {
    let r = resources().await;
    let root = work_root();
    let secret = "s3cr3t-VALUE-0123456789";
    r.put_secret(&format!("{}api/token", r.secrets_prefix), secret)
        .await;
    let deps = deps(&r, root.path(), &[]);
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": "redact", "agent": "claude-code",
        "prompt": "print-secret=TOKEN split-secret=TOKEN env-dump",
        "secrets": {"TOKEN": format!("{}api/token", r.secrets_prefix)},
    });
    let resp = handle(
        &deps,
        vec![message("m1", &spec.to_string())],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(record(&r, "redact").await.status, JobState::Succeeded);
    let mut everything = String::new();
    for k in r.keys(&format!("{}/jobs/redact/", r.prefix)).await {
        everything.push_str(&r.object(&k).await);
    }
    assert!(everything.contains("[REDACTED]"));
    assert!(!everything.contains(secret), "secret leaked");
    assert!(
        !everything.contains(&secret[..12]) || !everything.contains(&secret[12..]),
        "halves leaked"
    );
    // The child saw no AWS credentials, and HOME/TMPDIR were in its workspace.
    assert!(
        !everything.contains("ENV AWS_"),
        "AWS env leaked to the child"
    );
    let root_s = root.path().display().to_string();
    assert!(everything.contains(&format!("ENV HOME={root_s}")));
    assert!(everything.contains(&format!("ENV TMPDIR={root_s}")));
}

#[tokio::test]
async fn a_secret_outside_the_prefix_is_denied_and_the_child_never_starts() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": "denied", "agent": "claude-code", "prompt": "touch=started",
        "secrets": {"DB": "/prod/db/password"},
    });
    let resp = handle(
        &deps,
        vec![message("m1", &spec.to_string())],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let rec = record(&r, "denied").await;
    assert_eq!(rec.status, JobState::Failed);
    assert_eq!(rec.cause.as_deref(), Some("secret_denied"));
    assert!(rec.reason.unwrap().contains("outside the allowed prefix"));
    assert!(
        r.keys(&format!("{}/jobs/denied/attempt-1/stdout/", r.prefix))
            .await
            .is_empty()
    );
    assert!(
        is_empty_dir(root.path()),
        "a workspace was made: the child may have started"
    );
    let dlq = r.drain(&r.dlq_url).await;
    let DlqMessage::Failure(f) = DlqMessage::parse(&dlq[0]) else {
        panic!()
    };
    assert_eq!(f.cause, FailureCause::SecretDenied);
}

#[tokio::test]
async fn the_same_message_twice_at_once_runs_the_child_once_and_redelivery_after_finish_is_acknowledged()
 {
    let r = resources().await;
    let root = work_root();
    // The child runs under its own unprivileged uid when the tests run as root: give it a
    // directory outside its workspace that it may write to.
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let counter = shared.join("runs.txt");
    let deps = deps(&r, &root.path().join("ws"), &[]);
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": "twice", "agent": "command",
        "command": ["sh", "-c", format!("echo run >> {}; sleep 2", counter.display())],
    })
    .to_string();
    let (a, b) = tokio::join!(
        handle(
            &deps,
            vec![message("copy-a", &spec)],
            Duration::from_secs(60)
        ),
        handle(
            &deps,
            vec![message("copy-b", &spec)],
            Duration::from_secs(60)
        ),
    );
    let failed: Vec<String> = [failed_ids(&a), failed_ids(&b)].concat();
    assert_eq!(
        failed.len(),
        1,
        "exactly one copy is left for later: {failed:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        1
    );
    assert_eq!(record(&r, "twice").await.status, JobState::Succeeded);
    // Delivered again after it finished: acknowledged, not run.
    let c = handle(
        &deps,
        vec![message("copy-c", &spec)],
        Duration::from_secs(60),
    )
    .await;
    assert!(c.batch_item_failures.is_empty());
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        1
    );
    assert_eq!(record(&r, "twice").await.attempt.get(), 1);
}

#[tokio::test]
async fn cancel_while_running_stops_the_child() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let d = deps.clone();
    let run = tokio::spawn(async move {
        handle(
            &d,
            vec![message("m1", &claude("cancel-me", "sleep=60"))],
            Duration::from_secs(90),
        )
        .await
    });
    let store = agentq_core::JobStore::new(r.clients().dynamodb, &r.table);
    let job = agentq_core::JobId::parse("cancel-me").unwrap();
    let t = Instant::now();
    while store.get(&job).await.unwrap().map(|r| r.status) != Some(JobState::Running) {
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.request_cancel(&job, "test", now_ms()).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("stopped in time")
        .unwrap();
    assert!(resp.batch_item_failures.is_empty());
    let rec = record(&r, "cancel-me").await;
    assert_eq!(rec.status, JobState::Cancelled);
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(
        r.drain(&r.dlq_url).await.is_empty(),
        "a cancel is not a failure to re-plan"
    );
}

#[tokio::test]
async fn a_mixed_batch_reports_exactly_the_retryable_ids() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    // "busy" is held by a live lease elsewhere, so its message must come back later.
    let store = agentq_core::JobStore::new(r.clients().dynamodb, &r.table);
    let busy = agentq_core::JobId::parse("busy").unwrap();
    let busy_spec = claude("busy", "turns=1");
    let layout = Layout::new(&r.prefix);
    let labels = Default::default();
    store
        .claim(&agentq_core::store::ClaimRequest {
            job_id: &busy,
            spec_json: &busy_spec,
            tier: None,
            labels: &labels,
            owner: "elsewhere",
            stale_after_ms: 60_000,
            now: now_ms(),
            layout: &layout,
        })
        .await
        .unwrap();
    let resp = handle(
        &deps,
        vec![
            message("good", &claude("good", "turns=1")),
            message("garbage", "this is not json"),
            message(
                "invalid",
                r#"{"spec_version":1,"job_id":"invalid","agent":"command"}"#,
            ),
            message("failing", &claude("failing", "exit=2")),
            message("busy", &busy_spec),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(failed_ids(&resp), vec!["busy".to_string()]);
    assert_eq!(record(&r, "good").await.status, JobState::Succeeded);
    assert_eq!(record(&r, "failing").await.status, JobState::Failed);
    let invalid = record(&r, "invalid").await;
    assert_eq!(
        (invalid.status, invalid.cause.as_deref()),
        (JobState::Dead, Some("invalid_spec"))
    );
    assert!(invalid.reason.unwrap().contains("command"));
    // Failure records: the two malformed messages and the failing job, once each.
    let mut causes: Vec<String> = r
        .drain(&r.dlq_url)
        .await
        .iter()
        .map(|b| match DlqMessage::parse(b) {
            DlqMessage::Failure(f) => f.cause.kind().to_owned(),
            DlqMessage::Redriven(b) => panic!("unexpected {b}"),
        })
        .collect();
    causes.sort();
    assert_eq!(causes, vec!["agent_exit", "invalid_spec", "invalid_spec"]);
}

#[tokio::test]
async fn an_offloaded_spec_is_resolved_from_s3() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let key = format!("{}/payloads/big.json", r.prefix);
    let prompt = format!("turns=1 {}", "x".repeat(300 * 1024));
    r.clients()
        .s3
        .put_object()
        .bucket(&r.bucket)
        .key(&key)
        .body(claude("big", &prompt).into_bytes().into())
        .send()
        .await
        .unwrap();
    let ptr = agentq_core::payload::PayloadPointer {
        bucket: r.bucket.clone(),
        key,
    };
    let resp = handle(
        &deps,
        vec![message("m1", &ptr.to_body())],
        Duration::from_secs(60),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(record(&r, "big").await.status, JobState::Succeeded);
}

#[tokio::test]
async fn a_failure_whose_record_never_reached_the_dlq_is_reported_on_redelivery() {
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let spec = claude("lost-report", "exit=5");
    let resp = handle(&deps, vec![message("m1", &spec)], Duration::from_secs(60)).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(record(&r, "lost-report").await.failure_reported, Some(1));
    // Simulate a runtime that died after the final write, before the DLQ send.
    assert_eq!(r.drain(&r.dlq_url).await.len(), 1);
    let store = agentq_core::JobStore::new(r.clients().dynamodb, &r.table);
    r.clients()
        .dynamodb
        .update_item()
        .table_name(&r.table)
        .key(
            "job_id",
            aws_sdk_dynamodb::types::AttributeValue::S("lost-report".into()),
        )
        .update_expression("REMOVE failure_reported")
        .send()
        .await
        .unwrap();
    // The message comes back: the job is not run again, but its failure is reported.
    let resp = handle(&deps, vec![message("m1", &spec)], Duration::from_secs(60)).await;
    assert!(resp.batch_item_failures.is_empty());
    let dlq = r.drain(&r.dlq_url).await;
    assert_eq!(dlq.len(), 1);
    let DlqMessage::Failure(f) = DlqMessage::parse(&dlq[0]) else {
        panic!()
    };
    assert_eq!(
        f.cause,
        FailureCause::AgentExit {
            code: Some(5),
            signal: None
        }
    );
    let rec = store
        .require(&agentq_core::JobId::parse("lost-report").unwrap())
        .await
        .unwrap();
    assert_eq!((rec.attempt.get(), rec.failure_reported), (1, Some(1)));
    // A third delivery sends nothing more.
    handle(&deps, vec![message("m1", &spec)], Duration::from_secs(60)).await;
    assert!(r.drain(&r.dlq_url).await.is_empty());
}

#[tokio::test]
async fn the_lambda_handler_runs_without_the_runtime_on_the_fixture_event() {
    use aws_lambda_events::event::sqs::SqsEvent;
    let r = resources().await;
    let root = work_root();
    let deps = deps(&r, root.path(), &[]);
    let json = std::fs::read_to_string(agentq_testkit::fixture("sqs-event.json")).unwrap();
    let event: SqsEvent = serde_json::from_str(&json).unwrap();
    // The fixture round-trips through the event type unchanged.
    let back: Value = serde_json::to_value(&event).unwrap();
    let orig: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(back["Records"][0]["body"], orig["Records"][0]["body"]);
    assert_eq!(back["Records"].as_array().unwrap().len(), 3);

    let mut ctx = lambda_runtime::Context::default();
    ctx.request_id = "fixture-request".into();
    ctx.deadline = (now_ms() + 60_000) as u64;
    let resp = agentq_agent::lambda::handle(
        &deps,
        lambda_runtime::LambdaEvent::new(event.clone(), ctx),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(record(&r, "fixture-ok").await.status, JobState::Succeeded);
    assert_eq!(record(&r, "fixture-fail").await.status, JobState::Failed);

    // With no time left, a job is not started: its message is left for later.
    let mut late = lambda_runtime::Context::default();
    late.deadline = now_ms() as u64;
    let mut again = event;
    again.records.truncate(1);
    again.records[0].body = Some(claude("too-late", "turns=1"));
    let resp = agentq_agent::lambda::handle(
        &deps,
        lambda_runtime::LambdaEvent::new(again, late),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await;
    assert_eq!(resp.batch_item_failures.len(), 1);
}
