//! Core behaviour against the AWS emulator: real SQS redrive, conditional state
//! transitions, lease fencing, and S3 keys that cannot escape a job's prefix.

use agentq_core::layout::{Layout, Stream};
use agentq_core::record::now_ms;
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::{CancelOutcome, ClaimOutcome, ClaimRequest, Finish, StoreError};
use agentq_core::{Attempt, JobId, JobState, JobStore, Progress};
use agentq_testkit::{ResourceOptions, resources, resources_with};

#[tokio::test]
async fn message_received_max_receive_count_times_lands_in_the_dlq() {
    let r = resources_with(ResourceOptions {
        max_receive_count: 2,
        visibility_timeout: 30,
    })
    .await;
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    sqs.send_message()
        .queue_url(&r.queue_url)
        .message_body("poison")
        .send()
        .await
        .unwrap();
    // Receive without deleting, making it visible again each time.
    for _ in 0..2 {
        let got = sqs
            .receive_message()
            .queue_url(&r.queue_url)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        let m = &got.messages()[0];
        sqs.change_message_visibility()
            .queue_url(&r.queue_url)
            .receipt_handle(m.receipt_handle().unwrap())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
    // The next receive moves it to the DLQ instead of returning it.
    let got = sqs
        .receive_message()
        .queue_url(&r.queue_url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    assert!(got.messages().is_empty());
    assert_eq!(r.drain(&r.dlq_url).await, vec!["poison".to_string()]);
}

fn spec(id: &str) -> agentq_core::ValidSpec {
    JobSpec::parse_valid(
        format!(r#"{{"spec_version":1,"job_id":"{id}","agent":"command","command":["true"]}}"#)
            .as_bytes(),
        &ValidationContext::default(),
    )
    .unwrap()
}

#[tokio::test]
async fn transition_from_a_wrong_state_is_refused_by_dynamodb() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let s = spec("wrong-state");
    store.create_queued(&s, now_ms()).await.unwrap();
    // QUEUED → SUCCEEDED is not allowed: finish() requires RUNNING and our attempt.
    let fin = Finish {
        state: JobState::Succeeded,
        cause: None,
        reason: "ok".into(),
        exit_code: Some(0),
        signal: None,
        result_key: None,
        progress: Progress::default(),
        runtime_ms: 1,
    };
    let err = store
        .finish(&s.job_id, Attempt(0), &fin, now_ms())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(
        store.require(&s.job_id).await.unwrap().status,
        JobState::Queued
    );
    // A duplicate submit is refused, not silently duplicated.
    assert!(matches!(
        store.create_queued(&s, now_ms()).await,
        Err(StoreError::AlreadyExists { .. })
    ));
}

#[tokio::test]
async fn claim_fences_zombies_and_takes_over_stale_leases() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let layout = Layout::default();
    let s = spec("lease");
    store.create_queued(&s, now_ms()).await.unwrap();
    let spec_json = s.to_json();
    let claim = |owner: &'static str, now: i64| ClaimRequest {
        job_id: &s.job_id,
        spec_json: &spec_json,
        tier: None,
        labels: &s.spec.labels,
        owner,
        stale_after_ms: 10_000,
        now,
        layout: &layout,
    };
    let t0 = now_ms();
    let ClaimOutcome::Claimed { attempt, .. } = store.claim(&claim("a", t0)).await.unwrap() else {
        panic!("first claim")
    };
    assert_eq!(attempt, Attempt(1));
    // A second claim while the lease is live is refused.
    assert!(matches!(
        store.claim(&claim("b", t0 + 1000)).await.unwrap(),
        ClaimOutcome::LeaseLive { .. }
    ));
    // After the stale limit it is taken over with attempt 2.
    let ClaimOutcome::Claimed {
        attempt: a2,
        takeover,
        ..
    } = store.claim(&claim("b", t0 + 20_000)).await.unwrap()
    else {
        panic!("takeover")
    };
    assert_eq!((a2, takeover), (Attempt(2), Some(Attempt(1))));
    // The zombie's heartbeat and final write are refused.
    assert!(matches!(
        store
            .heartbeat(&s.job_id, Attempt(1), &Progress::default(), t0 + 21_000)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    let fin = Finish {
        state: JobState::Succeeded,
        cause: None,
        reason: "zombie".into(),
        exit_code: Some(0),
        signal: None,
        result_key: None,
        progress: Progress::default(),
        runtime_ms: 1,
    };
    assert!(
        store
            .finish(&s.job_id, Attempt(1), &fin, t0 + 22_000)
            .await
            .is_err()
    );
    // The live attempt finishes; a redelivery after that is acknowledged, not run.
    store
        .heartbeat(&s.job_id, a2, &Progress::default(), t0 + 21_000)
        .await
        .unwrap();
    let rec = store
        .finish(&s.job_id, a2, &fin, t0 + 23_000)
        .await
        .unwrap();
    assert_eq!(rec.status, JobState::Succeeded);
    assert_eq!(rec.history[0].action, "takeover");
    assert_eq!(rec.attempts["1"].cause.as_deref(), Some("crashed"));
    assert!(matches!(
        store.claim(&claim("c", t0 + 60_000)).await.unwrap(),
        ClaimOutcome::Finished {
            status: JobState::Succeeded
        }
    ));
}

#[tokio::test]
async fn raw_published_job_gets_its_record_on_first_claim_and_cancel_works() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let layout = Layout::default();
    let s = spec("raw");
    let spec_json = s.to_json();
    let req = ClaimRequest {
        job_id: &s.job_id,
        spec_json: &spec_json,
        tier: None,
        labels: &s.spec.labels,
        owner: "x",
        stale_after_ms: 10_000,
        now: now_ms(),
        layout: &layout,
    };
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Claimed {
            attempt: Attempt(1),
            ..
        }
    ));
    assert_eq!(
        store
            .request_cancel(&s.job_id, "test", now_ms())
            .await
            .unwrap(),
        CancelOutcome::Flagged
    );
    let ack = store
        .heartbeat(&s.job_id, Attempt(1), &Progress::default(), now_ms())
        .await
        .unwrap();
    assert!(ack.cancel_requested);

    // A queued job is cancelled at once and never claimed.
    let q = spec("queued-cancel");
    store.create_queued(&q, now_ms()).await.unwrap();
    assert_eq!(
        store
            .request_cancel(&q.job_id, "test", now_ms())
            .await
            .unwrap(),
        CancelOutcome::Cancelled
    );
    let qj = q.to_json();
    let req = ClaimRequest {
        job_id: &q.job_id,
        spec_json: &qj,
        ..req
    };
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Finished {
            status: JobState::Cancelled
        }
    ));
    // Listing by status uses the GSI.
    let listed = store.list(&[JobState::Cancelled], 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].job_id, q.job_id);
}

#[tokio::test]
async fn s3_keys_cannot_escape_the_job_prefix() {
    let r = resources().await;
    let layout = Layout::new(&r.prefix);
    let s3 = r.clients().s3;
    for hostile in [
        "../other",
        "a/../../b",
        "..",
        "x/y",
        "%2e%2e",
        "job\0id",
        "",
    ] {
        assert!(
            JobId::parse(hostile).is_err(),
            "{hostile:?} accepted as a job id"
        );
    }
    let job = JobId::parse("victim").unwrap();
    for rel in ["../../other/result.json", "/abs", "a/./b", "..", "a\\b"] {
        assert!(layout.artifact(&job, Attempt(1), rel).is_none(), "{rel:?}");
    }
    // Everything the layout builds for a job sits under its prefix, in the real bucket.
    let keys = [
        layout.segment(&job, Attempt(1), Stream::Stdout, 0),
        layout.result(&job, Attempt(1)),
        layout
            .artifact(&job, Attempt(1), "deep/dir/file.txt")
            .unwrap(),
        layout.checkpoint(&job),
    ];
    for k in &keys {
        s3.put_object()
            .bucket(&r.bucket)
            .key(k)
            .body(Vec::from(&b"x"[..]).into())
            .send()
            .await
            .unwrap();
    }
    let listed = r.keys(&layout.job_prefix(&job)).await;
    assert_eq!(listed.len(), keys.len());
    assert!(
        r.keys(&format!("{}/", r.prefix))
            .await
            .iter()
            .all(|k| k.starts_with(&layout.job_prefix(&job)))
    );
}
