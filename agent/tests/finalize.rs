//! The finalize beats the deadline: a resumable segment whose workspace is hundreds of MB
//! is still recorded `TIMED_OUT` with its manifest before the invocation ends, because the
//! time kept back grows with what is left to upload.

mod common;

use std::time::Duration;

use agentq_core::record::now_ms;
use agentq_core::{Attempt, JobId, JobState, Layout};
use agentq_testkit::resources;
use common::*;
use serde_json::Value;

#[tokio::test]
async fn a_segment_ending_with_a_300_mb_workspace_is_recorded_before_its_deadline() {
    let r = resources().await;
    let root = work_root();
    // Configured reserve 6 s; 300 MB at the assumed 40 MB/s need ~7.5 s more.
    let deps = deps(
        &r,
        root.path(),
        &[
            "--deadline-reserve-seconds",
            "6",
            "--kill-grace-seconds",
            "2",
            "--heartbeat-seconds",
            "0.5",
        ],
    );
    let deadline_ms = now_ms() + 45_000;
    let resp = handle(
        &deps,
        vec![message(
            "m1",
            &claude("big-ws", "fill=314572800 sleep=600 ignore-term"),
        )],
        Duration::from_secs(45),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let rec = record(&r, "big-ws").await;
    assert_eq!(rec.status, JobState::TimedOut, "{rec:?}");
    let l = Layout::new(&r.prefix);
    let job = JobId::parse("big-ws").unwrap();
    let manifest: Value = serde_json::from_str(&r.object(&l.result(&job, Attempt(1))).await)
        .expect("manifest written");
    let finished = manifest["finished_at"].as_i64().unwrap();
    eprintln!(
        "manifest {} ms before the deadline; finalize {}; child stopped {} ms before the deadline",
        deadline_ms - finished,
        manifest["finalize"],
        manifest["invocation_deadline_at"].as_i64().unwrap()
            - manifest["child_deadline_at"].as_i64().unwrap()
    );
    assert!(finished < deadline_ms, "manifest after the deadline");
    // The time kept back grew with the workspace (6 s configured).
    let kept = manifest["invocation_deadline_at"].as_i64().unwrap()
        - manifest["child_deadline_at"].as_i64().unwrap();
    assert!(
        kept >= 10_000,
        "only {kept} ms kept for a 300 MB checkpoint"
    );
    // The checkpoint itself is best effort inside the same budget (its size is only
    // known as the job runs); the record and the manifest are not.
    eprintln!(
        "checkpoint saved: {}",
        manifest["checkpoint_key"].is_string()
    );
}
