//! The jobs table against the emulator: a claim costs one write when the job never ran,
//! a refused write says why (the record comes back with the refusal), a write retried
//! after its answer was lost is recognised as applied, and a request DynamoDB refuses
//! as invalid is a distinct, non-retryable error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use agentq_core::layout::Layout;
use agentq_core::record::{Decision, now_ms};
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::{CancelOutcome, ClaimOutcome, ClaimRequest, Finish, Replan, StoreError};
use agentq_core::{Action, Attempt, FailureCause, JobId, JobState, JobStore, Progress};
use agentq_testkit::{Resources, resources, unique};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Counts DynamoDB requests per operation.
#[derive(Debug, Clone, Default)]
struct Calls(Arc<Mutex<BTreeMap<String, u32>>>);

impl Intercept for Calls {
    fn name(&self) -> &'static str {
        "Calls"
    }
    fn read_before_transmit(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = cfg
            .load::<Metadata>()
            .map(|m| m.name().to_owned())
            .unwrap_or_default();
        if let Ok(mut m) = self.0.lock() {
            *m.entry(op).or_default() += 1;
        }
        Ok(())
    }
}

impl Calls {
    fn take(&self) -> BTreeMap<String, u32> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn counted_store(r: &Resources) -> (JobStore, Calls) {
    let calls = Calls::default();
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&r.sdk)
            .interceptor(calls.clone())
            .build(),
    );
    (JobStore::new(client, &r.table), calls)
}

fn ops(v: &[(&str, u32)]) -> BTreeMap<String, u32> {
    v.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
}

fn spec(id: &str) -> agentq_core::ValidSpec {
    JobSpec::parse_valid(
        format!(r#"{{"spec_version":1,"job_id":"{id}","agent":"command","command":["true"]}}"#)
            .as_bytes(),
        &ValidationContext::default(),
    )
    .unwrap()
}

struct Claim {
    spec: agentq_core::ValidSpec,
    json: String,
    layout: Layout,
}

impl Claim {
    fn new(id: &str) -> Self {
        let spec = spec(id);
        let json = spec.to_json();
        Self {
            spec,
            json,
            layout: Layout::default(),
        }
    }
    fn req<'a>(&'a self, owner: &'a str, now: i64) -> ClaimRequest<'a> {
        ClaimRequest {
            job_id: &self.spec.job_id,
            spec_json: &self.json,
            tier: None,
            labels: &self.spec.spec.labels,
            owner,
            stale_after_ms: 10_000,
            now,
            layout: &self.layout,
        }
    }
}

fn finish(state: JobState, cause: Option<FailureCause>, runtime_ms: u64) -> Finish {
    Finish {
        state,
        cause,
        reason: "done".into(),
        exit_code: Some(0),
        signal: None,
        result_key: None,
        progress: Progress::default(),
        runtime_ms,
    }
}

#[tokio::test]
async fn a_submitted_job_is_claimed_with_one_write_and_never_with_a_read() {
    let r = resources().await;
    let (store, calls) = counted_store(&r);
    let t0 = now_ms();

    // Published raw (no record): the claim's first write is refused without a record,
    // the second creates it.
    let raw = Claim::new(&unique("raw"));
    let ClaimOutcome::Claimed {
        attempt, record, ..
    } = store.claim(&raw.req("a", t0)).await.unwrap()
    else {
        panic!("claim")
    };
    assert_eq!(calls.take(), ops(&[("PutItem", 1), ("UpdateItem", 1)]));
    assert_eq!(attempt, Attempt(1));
    assert_eq!(record.status, JobState::Running);
    assert_eq!(record.created_at, t0);
    assert_eq!(record.spec.as_deref(), Some(raw.json.as_str()));
    assert_eq!(record.attempts["1"].owner.as_deref(), Some("a"));
    assert_eq!(record.segment, 1);

    // Submitted by the producer (QUEUED record first).
    let queued = Claim::new(&unique("queued"));
    store.create_queued(&queued.spec, t0 - 5).await.unwrap();
    calls.take();
    let ClaimOutcome::Claimed { record, .. } = store.claim(&queued.req("b", t0)).await.unwrap()
    else {
        panic!("claim")
    };
    assert_eq!(calls.take(), ops(&[("UpdateItem", 1)]));
    // The producer's record is kept, not overwritten.
    assert_eq!(record.created_at, t0 - 5);
    assert_eq!(record.attempt, Attempt(1));

    // A re-run (attempt 1 failed, re-planned): the first write is refused and says why,
    // the second claims attempt 2. No read.
    store
        .finish(
            &queued.spec.job_id,
            Attempt(1),
            &finish(JobState::Failed, Some(FailureCause::InfraTransient), 5),
            t0 + 1,
        )
        .await
        .unwrap();
    store
        .replan(
            &queued.spec.job_id,
            JobState::Failed,
            Attempt(1),
            JobState::RetryScheduled,
            &Decision {
                at: t0 + 2,
                action: Action::Retry,
                by: "test".into(),
                attempt: 1,
                reason: "again".into(),
                ..Default::default()
            },
            &Replan::default(),
            t0 + 2,
        )
        .await
        .unwrap();
    calls.take();
    let ClaimOutcome::Claimed { attempt, .. } =
        store.claim(&queued.req("c", t0 + 3)).await.unwrap()
    else {
        panic!("claim")
    };
    assert_eq!(attempt, Attempt(2));
    assert_eq!(calls.take(), ops(&[("UpdateItem", 2)]));

    // Live lease, finished job: one refused write tells the claim everything.
    assert!(matches!(
        store.claim(&queued.req("d", t0 + 4)).await.unwrap(),
        ClaimOutcome::LeaseLive {
            attempt: Attempt(2),
            ..
        }
    ));
    assert_eq!(calls.take(), ops(&[("UpdateItem", 1)]));
    store
        .finish(
            &queued.spec.job_id,
            Attempt(2),
            &finish(JobState::Succeeded, None, 5),
            t0 + 5,
        )
        .await
        .unwrap();
    calls.take();
    assert!(matches!(
        store.claim(&queued.req("e", t0 + 6)).await.unwrap(),
        ClaimOutcome::Finished {
            status: JobState::Succeeded
        }
    ));
    assert_eq!(calls.take(), ops(&[("UpdateItem", 1)]));
}

#[tokio::test]
async fn a_refused_write_returns_the_record_as_it_was() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let c = Claim::new(&unique("refused"));
    let t0 = now_ms();
    store.claim(&c.req("a", t0)).await.unwrap();
    store
        .finish(
            &c.spec.job_id,
            Attempt(1),
            &finish(JobState::Succeeded, None, 7),
            t0 + 1,
        )
        .await
        .unwrap();
    // A zombie's heartbeat and final write: refused, with the current record.
    let e = store
        .heartbeat(&c.spec.job_id, Attempt(0), &Progress::default(), t0 + 2)
        .await
        .unwrap_err();
    let current = e.current().expect("the record comes with the refusal");
    assert_eq!(current.status, JobState::Succeeded);
    assert!(e.to_string().contains("SUCCEEDED"), "{e}");
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn writes_retried_after_a_lost_answer_are_recognised_as_applied() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let c = Claim::new(&unique("lost"));
    let t0 = now_ms();
    // The same create twice (the SDK retrying a PutItem whose answer was lost).
    store.create_queued(&c.spec, t0).await.unwrap();
    store.create_queued(&c.spec, t0).await.unwrap();
    // A later, different submit of the same id is still refused.
    assert!(matches!(
        store.create_queued(&c.spec, t0 + 1).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    // The same claim twice: the second is the first one's success, not a live lease.
    let first = store.claim(&c.req("owner-1", t0 + 2)).await.unwrap();
    let again = store.claim(&c.req("owner-1", t0 + 2)).await.unwrap();
    assert!(
        matches!(
            &again,
            ClaimOutcome::Claimed {
                attempt: Attempt(1),
                ..
            }
        ),
        "{again:?}"
    );
    assert!(matches!(first, ClaimOutcome::Claimed { .. }));
    // The same final write twice: applied once (the runtime is added once).
    let fin = finish(JobState::Succeeded, None, 1_000);
    store
        .finish(&c.spec.job_id, Attempt(1), &fin, t0 + 3)
        .await
        .unwrap();
    let rec = store
        .finish(&c.spec.job_id, Attempt(1), &fin, t0 + 3)
        .await
        .unwrap();
    assert_eq!(rec.runtime_ms, 1_000);
    assert_eq!(
        store.require(&c.spec.job_id).await.unwrap().runtime_ms,
        1_000
    );
}

#[tokio::test]
async fn an_invalid_request_is_rejected_and_not_retryable() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let id = unique("huge");
    let huge = format!(
        r#"{{"spec_version":1,"job_id":"{id}","agent":"command","command":["true"],"env":{{"X":"{}"}}}}"#,
        "x".repeat(450 * 1024)
    );
    let job = JobId::parse(&id).unwrap();
    let layout = Layout::default();
    let labels = BTreeMap::new();
    let req = ClaimRequest {
        job_id: &job,
        spec_json: &huge,
        tier: None,
        labels: &labels,
        owner: "a",
        stale_after_ms: 10_000,
        now: now_ms(),
        layout: &layout,
    };
    // The item would be over DynamoDB's 400 KB.
    let e = store.claim(&req).await.unwrap_err();
    assert!(matches!(e, StoreError::Rejected { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("cannot help"), "{e}");
}

#[tokio::test]
async fn progress_the_table_cannot_hold_is_made_storable() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let c = Claim::new(&unique("nan"));
    store.claim(&c.req("a", now_ms())).await.unwrap();
    let mut fin = finish(JobState::Succeeded, None, 1);
    fin.progress.cost_usd = f64::NAN;
    fin.progress.last_event = Some("e".repeat(10_000));
    fin.reason = "r".repeat(100_000);
    let rec = store
        .finish(&c.spec.job_id, Attempt(1), &fin, now_ms())
        .await
        .unwrap();
    assert_eq!(rec.progress.cost_usd, 0.0);
    assert_eq!(rec.cost_usd, 0.0);
    assert!(rec.progress.last_event.unwrap().chars().count() <= 257);
    assert!(rec.reason.unwrap().chars().count() <= 4097);
}

#[tokio::test]
async fn cancel_stops_jobs_waiting_for_a_plan_and_crashed_runs() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let t0 = now_ms();

    // FAILED, waiting for the dispatcher: cancelled at once, no plan runs it again.
    let failed = Claim::new(&unique("failed"));
    store.claim(&failed.req("a", t0)).await.unwrap();
    store
        .finish(
            &failed.spec.job_id,
            Attempt(1),
            &finish(JobState::Failed, Some(FailureCause::Crashed), 1),
            t0 + 1,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .request_cancel(&failed.spec.job_id, "test", t0 + 2)
            .await
            .unwrap(),
        CancelOutcome::Cancelled
    );
    let retry = Decision {
        at: t0 + 3,
        action: Action::Retry,
        by: "dispatcher".into(),
        attempt: 1,
        reason: "retry".into(),
        ..Default::default()
    };
    let e = store
        .replan(
            &failed.spec.job_id,
            JobState::Failed,
            Attempt(1),
            JobState::RetryScheduled,
            &retry,
            &Replan::default(),
            t0 + 3,
        )
        .await
        .unwrap_err();
    assert_eq!(e.current().unwrap().status, JobState::Cancelled);

    // RUNNING, flagged, and its run died: the next claim ends it as cancelled instead
    // of taking the lease over.
    let crashed = Claim::new(&unique("flagged"));
    store.claim(&crashed.req("a", t0)).await.unwrap();
    assert_eq!(
        store
            .request_cancel(&crashed.spec.job_id, "test", t0 + 1)
            .await
            .unwrap(),
        CancelOutcome::Flagged
    );
    assert!(matches!(
        store.claim(&crashed.req("b", t0 + 60_000)).await.unwrap(),
        ClaimOutcome::Finished {
            status: JobState::Cancelled
        }
    ));
    let rec = store.require(&crashed.spec.job_id).await.unwrap();
    assert_eq!((rec.status, rec.attempt), (JobState::Cancelled, Attempt(1)));
}

#[tokio::test]
async fn replanning_a_crashed_run_records_the_attempt_and_is_fenced_on_its_heartbeat() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let c = Claim::new(&unique("crash"));
    let t0 = now_ms();
    store.claim(&c.req("a", t0)).await.unwrap();
    let d = Decision {
        at: t0 + 100_000,
        action: Action::Retry,
        by: "dispatcher".into(),
        attempt: 1,
        reason: "stranded".into(),
        ..Default::default()
    };
    // A heartbeat the decision did not see: refused.
    store
        .heartbeat(&c.spec.job_id, Attempt(1), &Progress::default(), t0 + 50)
        .await
        .unwrap();
    let stale = Replan {
        expected_heartbeat: Some(t0),
        ..Default::default()
    };
    let e = store
        .replan(
            &c.spec.job_id,
            JobState::Running,
            Attempt(1),
            JobState::RetryScheduled,
            &d,
            &stale,
            t0 + 100_000,
        )
        .await
        .unwrap_err();
    assert_eq!(e.current().unwrap().heartbeat_at, Some(t0 + 50));
    let seen = Replan {
        expected_heartbeat: Some(t0 + 50),
        ..Default::default()
    };
    let rec = store
        .replan(
            &c.spec.job_id,
            JobState::Running,
            Attempt(1),
            JobState::RetryScheduled,
            &d,
            &seen,
            t0 + 100_000,
        )
        .await
        .unwrap();
    assert_eq!(rec.status, JobState::RetryScheduled);
    assert_eq!(rec.cause.as_deref(), Some("crashed"));
    let a = &rec.attempts["1"];
    assert_eq!(a.status, Some(JobState::Failed));
    assert_eq!(a.cause.as_deref(), Some("crashed"));
    assert_eq!(a.finished_at, Some(t0 + 100_000));
    // The same decision again (a lost answer): applied already.
    let again = store
        .replan(
            &c.spec.job_id,
            JobState::Running,
            Attempt(1),
            JobState::RetryScheduled,
            &d,
            &seen,
            t0 + 100_000,
        )
        .await
        .unwrap();
    assert_eq!(again.history.len(), 1);
}

#[tokio::test]
async fn old_records_of_a_state_are_listed_oldest_first() {
    let r = resources().await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let t0 = now_ms();
    for (i, age) in [(0, 30_000), (1, 10_000), (2, 60_000), (3, 1_000)] {
        let s = spec(&format!("old-{i}"));
        store.create_queued(&s, t0 - age).await.unwrap();
    }
    let old = store
        .list_older_than(JobState::Queued, t0 - 5_000, 10)
        .await
        .unwrap();
    let ids: Vec<&str> = old.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(ids, ["old-2", "old-0", "old-1"]);
    let first = store
        .list_older_than(JobState::Queued, t0 - 5_000, 1)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        store
            .list_older_than(JobState::Running, t0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}
