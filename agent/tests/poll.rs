//! The `poll` front end on core's mapping, against the emulator: a poller killed with
//! SIGKILL between the receive and the claim gives the message back within the
//! visibility horizon, not after the queue's own (long) visibility timeout.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq_core::{JobId, JobState, JobStore};
use agentq_testkit::{ResourceOptions, Resources, binary, resources_with};
use aws_sdk_sqs::types::QueueAttributeName;
use common::*;

/// The horizon the pollers below run with.
const HORIZON_SECONDS: u64 = 3;

fn poller(r: &Resources, work: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(binary("agentq-agent"));
    c.arg("poll")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_CLAUDE_BIN", fake_agent())
        .env("AGENTQ_CODEX_BIN", fake_agent())
        .env("AGENTQ_WORK_ROOT", work)
        .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
        .env(
            "AGENTQ_VISIBILITY_HORIZON_SECONDS",
            HORIZON_SECONDS.to_string(),
        )
        .env("AGENTQ_STALE_AFTER_SECONDS", "3")
        .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
        .env("AGENTQ_KILL_GRACE_SECONDS", "1")
        .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (visible, in flight).
async fn depth(r: &Resources) -> (u64, u64) {
    let a = aws_sdk_sqs::Client::new(&r.sdk)
        .get_queue_attributes()
        .queue_url(&r.queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    let n = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        n(QueueAttributeName::ApproximateNumberOfMessages),
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

#[tokio::test]
async fn sigkill_between_receive_and_claim_gives_the_message_back_within_the_horizon() {
    // The queue's own visibility is 5 minutes.
    let r = resources_with(ResourceOptions {
        max_receive_count: 10,
        visibility_timeout: 300,
    })
    .await;
    let work = work_root();
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    let suffix = &agentq_testkit::unique("k")[2..];
    let (first, second) = (format!("first-{suffix}"), format!("second-{suffix}"));
    for (job, prompt) in [(&first, "sleep=6"), (&second, "turns=1")] {
        sqs.send_message()
            .queue_url(&r.queue_url)
            .message_body(claude(job, prompt))
            .send()
            .await
            .unwrap();
    }
    // One job slot, a batch of two: one job runs, the other waits in the batch,
    // received but not claimed.
    let mut p = Killer(
        poller(
            &r,
            work.path(),
            &[
                "--batch-size",
                "2",
                "--batching-window-seconds",
                "1",
                "--wait-seconds",
                "1",
                "--max-concurrent-jobs",
                "1",
            ],
        )
        .spawn()
        .unwrap(),
    );
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let ids = [
        JobId::parse(&first).unwrap(),
        JobId::parse(&second).unwrap(),
    ];
    let t = Instant::now();
    let waiting = loop {
        // The emulator applies the claim's create-or-update in steps, so a read in
        // between can see the key alone (DynamoDB applies it atomically): not yet.
        let (Ok(a), Ok(b)) = (store.get(&ids[0]).await, store.get(&ids[1]).await) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let running = |r: &Option<agentq_core::JobRecord>| {
            r.as_ref()
                .is_some_and(|r| r.status == JobState::Running && r.progress.events > 0)
        };
        match (running(&a), running(&b), a.is_none(), b.is_none()) {
            (true, _, _, true) => break 1,
            (_, true, true, _) => break 0,
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never got one job running and one waiting: {a:?} {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Both received: nothing visible. Past one horizon, still hidden (kept so).
    tokio::time::sleep(Duration::from_secs(HORIZON_SECONDS + 1)).await;
    assert_eq!(depth(&r).await, (0, 2));
    assert!(
        store.get(&ids[waiting]).await.unwrap().is_none(),
        "the waiting job was not claimed"
    );

    p.0.kill().unwrap();
    let _ = p.0.wait();
    let killed = Instant::now();
    // Both messages are back within the horizon (plus the emulator's and the last
    // extension's slack), far from the queue's 300 s.
    while depth(&r).await != (2, 0) {
        assert!(
            killed.elapsed() < Duration::from_secs(3 * HORIZON_SECONDS + 5),
            "messages not back: {:?}",
            depth(&r).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back_after = killed.elapsed();
    assert!(
        back_after <= Duration::from_secs(2 * HORIZON_SECONDS + 2),
        "back after {back_after:?}"
    );

    // A new poller runs the unclaimed job and takes the stale lease of the other over.
    let status = poller(&r, work.path(), &["--once", "--wait-seconds", "5"])
        .status()
        .unwrap();
    assert!(status.success());
    for id in &ids {
        let rec = store.require(id).await.unwrap();
        assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    }
    assert_eq!(store.require(&ids[waiting]).await.unwrap().attempt.get(), 1);
    assert_eq!(
        store
            .require(&ids[1 - waiting])
            .await
            .unwrap()
            .attempt
            .get(),
        2
    );
    assert!(r.drain(&r.queue_url).await.is_empty());
}
