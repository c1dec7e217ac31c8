//! The re-planner against the emulator: jobs are put in their states with `JobStore`
//! (create, claim, finish), failure records or raw specs are sent to the DLQ, the
//! poller drains it (`once`), and the outcome is read back from the queues and the table.

use std::time::Duration;

use agentq_core::failure::{FAILURE_RECORD_VERSION, FailureRecord};
use agentq_core::layout::{Layout, msg_attr};
use agentq_core::record::{Decision, now_ms};
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::{ClaimOutcome, ClaimRequest, Finish, Replan};
use agentq_core::{Action, Attempt, FailureCause, JobId, JobRecord, JobState, JobStore, Progress};
use agentq_dispatcher::plan::BY;
use agentq_dispatcher::poller::{self, PollOptions};
use agentq_dispatcher::replan::PLAN_ATTR;
use agentq_dispatcher::{Policy, RawPolicy, Replanner, StatsSnapshot};
use agentq_testkit::{Resources, create_queue, resources, unique};
use aws_sdk_sqs::types::QueueAttributeName;

struct Env {
    r: Resources,
    store: JobStore,
    sqs: aws_sdk_sqs::Client,
    large_url: String,
    replanner: Replanner,
}

/// Resources plus a `large` tier queue and a re-planner with `policy` (TOML).
async fn env(policy: &str) -> Env {
    let r = resources().await;
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    let large_url = create_queue(&sqs, &unique("aq-large"), &[]).await;
    let raw: RawPolicy = toml::from_str(policy).expect("policy");
    let policy = Policy::build(
        &raw,
        &[("large".to_owned(), large_url.clone())],
        &r.queue_url,
    )
    .expect("valid policy");
    let clients = r.clients();
    let store = JobStore::new(clients.dynamodb.clone(), &r.table);
    let replanner = Replanner::new(
        store.clone(),
        clients.sqs,
        clients.s3,
        policy,
        ValidationContext::default(),
    );
    Env {
        r,
        store,
        sqs,
        large_url,
        replanner,
    }
}

/// No backoff delay, so re-enqueued messages are visible at once.
const NO_DELAY: &str = r#"
[causes.infra_transient]
base_delay = "0s"
max_delay = "0s"
[causes.crashed]
base_delay = "0s"
max_delay = "0s"
"#;

fn spec(id: &str, extra: &str) -> agentq_core::ValidSpec {
    let json = format!(
        r#"{{"spec_version":1,"job_id":"{id}","agent":"command","command":["true"]{extra}}}"#
    );
    JobSpec::parse_valid(json.as_bytes(), &ValidationContext::default()).expect("spec")
}

impl Env {
    /// A job created, claimed at `at`, returning its attempt.
    async fn running(&self, s: &agentq_core::ValidSpec, at: i64) -> Attempt {
        self.store.create_queued(s, at).await.expect("create");
        let json = s.to_json();
        let layout = Layout::default();
        let req = ClaimRequest {
            job_id: &s.job_id,
            spec_json: &json,
            tier: s.spec.tier.as_deref(),
            labels: &s.spec.labels,
            owner: "test-agent",
            stale_after_ms: 60_000,
            now: at,
            layout: &layout,
        };
        match self.store.claim(&req).await.expect("claim") {
            ClaimOutcome::Claimed { attempt, .. } => attempt,
            other => panic!("claim: {other:?}"),
        }
    }

    /// Claims again (after a re-plan), returning the new attempt.
    async fn claim_again(&self, s: &agentq_core::ValidSpec) -> Attempt {
        let json = s.to_json();
        let layout = Layout::default();
        let req = ClaimRequest {
            job_id: &s.job_id,
            spec_json: &json,
            tier: None,
            labels: &s.spec.labels,
            owner: "test-agent-2",
            stale_after_ms: 60_000,
            now: now_ms(),
            layout: &layout,
        };
        match self.store.claim(&req).await.expect("claim") {
            ClaimOutcome::Claimed { attempt, .. } => attempt,
            other => panic!("claim: {other:?}"),
        }
    }

    /// Ends the attempt with `cause` and sends the agent's failure record to the DLQ.
    async fn fail(
        &self,
        job: &JobId,
        attempt: Attempt,
        cause: FailureCause,
        runtime_ms: u64,
        progress: Progress,
    ) -> FailureRecord {
        let state = cause.final_state();
        let session_id = progress.session_id.clone();
        let fin = Finish {
            state,
            cause: Some(cause.clone()),
            reason: format!("test: {cause}"),
            exit_code: None,
            signal: None,
            result_key: None,
            progress,
            runtime_ms,
        };
        self.store
            .finish(job, attempt, &fin, now_ms())
            .await
            .expect("finish");
        let rec = FailureRecord {
            agentq_failure: FAILURE_RECORD_VERSION,
            job_id: Some(job.clone()),
            attempt,
            state,
            cause,
            reason: "test failure".into(),
            at: now_ms(),
            segment: 1,
            session_id,
            result_key: None,
            raw_body: None,
            message_id: None,
        };
        self.send_dlq(&rec.to_json()).await;
        rec
    }

    async fn send_dlq(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.r.dlq_url)
            .message_body(body)
            .send()
            .await
            .expect("send to DLQ");
    }

    /// Runs the poller until the DLQ is drained; returns what this run counted.
    async fn replan(&self) -> StatsSnapshot {
        let before = self.replanner.stats();
        let opts = PollOptions::new(&self.r.dlq_url, 0, true);
        poller::run(
            &self.replanner,
            &self.sqs,
            &opts,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("poller");
        let after = self.replanner.stats();
        StatsSnapshot {
            planned: after.planned - before.planned,
            resent: after.resent - before.resent,
            dropped: after.dropped - before.dropped,
            unparseable: after.unparseable - before.unparseable,
            failed: after.failed - before.failed,
        }
    }

    async fn get(&self, job: &JobId) -> JobRecord {
        self.store.require(job).await.expect("record")
    }

    /// Visible messages of a queue: (body, job id attr, plan attr).
    async fn take(&self, queue: &str) -> Vec<(String, Option<String>, Option<String>)> {
        self.r
            .drain_messages(queue)
            .await
            .into_iter()
            .map(|m| {
                let attr = |k: &str| {
                    m.message_attributes()
                        .and_then(|a| a.get(k))
                        .and_then(|v| v.string_value().map(str::to_owned))
                };
                let (job, plan) = (attr(msg_attr::JOB_ID), attr(PLAN_ATTR));
                (m.body.unwrap_or_default(), job, plan)
            })
            .collect()
    }

    async fn delayed(&self, queue: &str) -> i64 {
        self.sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .expect("attributes")
            .attributes
            .and_then(|a| {
                a.get(&QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                    .cloned()
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn decisions(rec: &JobRecord, act: Action) -> Vec<&Decision> {
    rec.history
        .iter()
        .filter(|d| d.by == BY && d.action == act)
        .collect()
}

fn job_ids(msgs: &[(String, Option<String>, Option<String>)]) -> Vec<String> {
    let mut v: Vec<String> = msgs.iter().filter_map(|m| m.1.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn each_cause_gets_its_plan() {
    let e = env(NO_DELAY).await;
    let t0 = now_ms();
    let id = |s: &str| format!("{s}-{}", &unique("x")[2..]);

    let transient = spec(&id("transient"), "");
    let a = e.running(&transient, t0).await;
    e.fail(
        &transient.job_id,
        a,
        FailureCause::InfraTransient,
        1_000,
        Progress::default(),
    )
    .await;

    let crashed = spec(&id("crashed"), "");
    let a = e.running(&crashed, t0).await;
    e.fail(
        &crashed.job_id,
        a,
        FailureCause::Crashed,
        1_000,
        Progress::default(),
    )
    .await;

    let resume = spec(&id("resume"), r#","timeout_seconds":3600"#);
    let a = e.running(&resume, t0).await;
    let progress = Progress {
        session_id: Some("sess-1".into()),
        ..Default::default()
    };
    e.fail(
        &resume.job_id,
        a,
        FailureCause::TimedOut { resumable: true },
        600_000,
        progress,
    )
    .await;

    let escalate = spec(
        &id("escalate"),
        r#","timeout_seconds":3600,"resume":"never""#,
    );
    let a = e.running(&escalate, t0).await;
    e.fail(
        &escalate.job_id,
        a,
        FailureCause::TimedOut { resumable: false },
        900_000,
        Progress::default(),
    )
    .await;

    let top = spec(&id("top"), r#","timeout_seconds":3600,"tier":"large""#);
    let a = e.running(&top, t0).await;
    e.fail(
        &top.job_id,
        a,
        FailureCause::TimedOut { resumable: false },
        900_000,
        Progress::default(),
    )
    .await;

    let mut terminal = Vec::new();
    for (name, cause) in [
        ("invalid", FailureCause::InvalidSpec),
        ("secret", FailureCause::SecretDenied),
        (
            "exit",
            FailureCause::AgentExit {
                code: Some(2),
                signal: None,
            },
        ),
        ("cancel", FailureCause::Cancelled),
    ] {
        let s = spec(&id(name), "");
        let a = e.running(&s, t0).await;
        e.fail(&s.job_id, a, cause.clone(), 1_000, Progress::default())
            .await;
        terminal.push((s, cause));
    }
    e.send_dlq("not json at all").await;

    let stats = e.replan().await;
    assert_eq!(stats.planned, 9, "{stats:?}");
    assert_eq!(stats.unparseable, 1, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");

    // Retries and the resume go back on the jobs queue, the escalation on `large`.
    let jobs = e.take(&e.r.queue_url).await;
    let mut want = vec![
        transient.job_id.to_string(),
        crashed.job_id.to_string(),
        resume.job_id.to_string(),
    ];
    want.sort();
    assert_eq!(job_ids(&jobs), want);
    for (body, _, plan) in &jobs {
        assert_eq!(plan.as_deref(), Some("1"));
        JobSpec::from_json(body.as_bytes()).expect("the body is the spec");
    }
    let large = e.take(&e.large_url).await;
    assert_eq!(job_ids(&large), vec![escalate.job_id.to_string()]);
    assert!(e.take(&e.r.dlq_url).await.is_empty(), "DLQ drained");

    for s in [&transient, &crashed] {
        let rec = e.get(&s.job_id).await;
        assert_eq!(rec.status, JobState::RetryScheduled);
        assert_eq!(decisions(&rec, Action::Retry).len(), 1);
        assert_eq!(decisions(&rec, Action::Enqueued).len(), 1);
    }
    let rec = e.get(&resume.job_id).await;
    assert_eq!(rec.status, JobState::Resuming);
    assert_eq!(rec.segment, 2);
    assert_eq!(rec.resume_session.as_deref(), Some("sess-1"));
    assert_eq!(decisions(&rec, Action::Resume).len(), 1);

    let rec = e.get(&escalate.job_id).await;
    assert_eq!(rec.status, JobState::RetryScheduled);
    assert_eq!(rec.tier.as_deref(), Some("large"));
    let d = decisions(&rec, Action::Escalate);
    assert_eq!(d[0].queue.as_deref(), Some(e.large_url.as_str()));

    // Already on the biggest tier, nothing to resume: terminal.
    let rec = e.get(&top.job_id).await;
    assert_eq!(rec.status, JobState::Dead);
    assert_eq!(decisions(&rec, Action::Fail).len(), 1);
    assert!(
        rec.reason
            .as_deref()
            .unwrap_or("")
            .contains("no bigger tier"),
        "{:?}",
        rec.reason
    );

    for (s, cause) in &terminal {
        let rec = e.get(&s.job_id).await;
        let want = if *cause == FailureCause::Cancelled {
            JobState::Cancelled
        } else {
            JobState::Dead
        };
        assert_eq!(rec.status, want, "{cause}");
        let d = decisions(&rec, Action::Fail);
        assert_eq!(d.len(), 1, "{cause}");
        assert_eq!(d[0].cause.as_deref(), Some(cause.kind()));
        assert!(d[0].reason.contains("not retryable"), "{}", d[0].reason);
        assert_eq!(rec.cause.as_deref(), Some(cause.kind()));
    }
}

#[tokio::test]
async fn a_duplicated_dlq_message_enqueues_once() {
    let e = env(NO_DELAY).await;
    let s = spec(&unique("dup"), "");
    let a = e.running(&s, now_ms()).await;
    let rec = e
        .fail(
            &s.job_id,
            a,
            FailureCause::InfraTransient,
            10,
            Progress::default(),
        )
        .await;
    // Two copies in one batch, and a third handled in a later run.
    e.send_dlq(&rec.to_json()).await;
    let stats = e.replan().await;
    assert_eq!((stats.planned, stats.dropped), (1, 1), "{stats:?}");
    e.send_dlq(&rec.to_json()).await;
    let stats = e.replan().await;
    assert_eq!((stats.planned, stats.dropped), (0, 1), "{stats:?}");

    assert_eq!(e.take(&e.r.queue_url).await.len(), 1);
    let rec = e.get(&s.job_id).await;
    assert_eq!(decisions(&rec, Action::Retry).len(), 1);
    assert_eq!(decisions(&rec, Action::Enqueued).len(), 1);
}

#[tokio::test]
async fn budgets_end_in_dead_with_the_reason() {
    let e = env(NO_DELAY).await;
    let t0 = now_ms();

    let attempts = spec(&unique("attempts"), r#","max_attempts":2"#);
    let a = e.running(&attempts, t0).await;
    e.fail(
        &attempts.job_id,
        a,
        FailureCause::InfraTransient,
        10,
        Progress::default(),
    )
    .await;
    e.replan().await;
    assert_eq!(
        e.get(&attempts.job_id).await.status,
        JobState::RetryScheduled
    );
    e.take(&e.r.queue_url).await;
    let a = e.claim_again(&attempts).await;
    assert_eq!(a, Attempt(2));
    e.fail(
        &attempts.job_id,
        a,
        FailureCause::InfraTransient,
        10,
        Progress::default(),
    )
    .await;

    let runtime = spec(&unique("runtime"), r#","timeout_seconds":60"#);
    let a = e.running(&runtime, t0).await;
    e.fail(
        &runtime.job_id,
        a,
        FailureCause::TimedOut { resumable: true },
        61_000,
        Progress {
            session_id: Some("s".into()),
            ..Default::default()
        },
    )
    .await;

    let cost = spec(&unique("cost"), r#","max_budget_usd":1.5"#);
    let a = e.running(&cost, t0).await;
    e.fail(
        &cost.job_id,
        a,
        FailureCause::Crashed,
        10,
        Progress {
            cost_usd: 2.0,
            ..Default::default()
        },
    )
    .await;

    let stats = e.replan().await;
    assert_eq!(stats.planned, 3, "{stats:?}");
    assert!(
        e.take(&e.r.queue_url).await.is_empty(),
        "nothing re-enqueued"
    );
    for (s, needle) in [
        (&attempts, "max_attempts 2"),
        (&runtime, "timeout_seconds 60"),
        (&cost, "max_budget_usd"),
    ] {
        let rec = e.get(&s.job_id).await;
        assert_eq!(rec.status, JobState::Dead, "{needle}");
        let d = decisions(&rec, Action::Dead);
        assert_eq!(d.len(), 1, "{needle}");
        assert!(d[0].reason.contains(needle), "{}", d[0].reason);
        assert_eq!(rec.reason.as_deref(), Some(d[0].reason.as_str()));
    }
}

#[tokio::test]
async fn resumed_segments_are_bounded() {
    let e = env(&format!("max_segments = 2\n{NO_DELAY}")).await;
    let s = spec(&unique("segments"), r#","timeout_seconds":7200"#);
    let a = e.running(&s, now_ms()).await;
    let p = || Progress {
        session_id: Some("sess-a".into()),
        ..Default::default()
    };
    e.fail(
        &s.job_id,
        a,
        FailureCause::TimedOut { resumable: true },
        1_000,
        p(),
    )
    .await;
    e.replan().await;
    assert_eq!(e.get(&s.job_id).await.status, JobState::Resuming);
    assert_eq!(e.take(&e.r.queue_url).await.len(), 1);

    let a = e.claim_again(&s).await;
    e.fail(
        &s.job_id,
        a,
        FailureCause::TimedOut { resumable: true },
        1_000,
        p(),
    )
    .await;
    e.replan().await;
    let rec = e.get(&s.job_id).await;
    assert_eq!(rec.status, JobState::Dead);
    assert!(
        decisions(&rec, Action::Dead)[0]
            .reason
            .contains("max_segments 2"),
        "{:?}",
        rec.history
    );
    assert!(e.take(&e.r.queue_url).await.is_empty());
}

#[tokio::test]
async fn backoff_delays_are_recorded_and_long_ones_are_chained() {
    let e = env(r#"
[causes.infra_transient]
base_delay = "40m"
max_delay = "2h"
"#)
    .await;
    let s = spec(&unique("slow"), "");
    let a = e.running(&s, now_ms()).await;
    e.fail(
        &s.job_id,
        a,
        FailureCause::InfraTransient,
        10,
        Progress::default(),
    )
    .await;
    e.replan().await;
    let rec = e.get(&s.job_id).await;
    let d = decisions(&rec, Action::Retry);
    let delay = d[0].delay_seconds.expect("delay");
    assert!((1200..=2400).contains(&delay), "{delay}");
    // Longer than SQS allows: sent with DelaySeconds=900 (invisible now) plus not-before.
    assert!(e.take(&e.r.queue_url).await.is_empty());
    assert_eq!(e.delayed(&e.r.queue_url).await, 1);
}

#[tokio::test]
async fn a_redriven_spec_with_a_stale_lease_is_retried_and_a_live_one_dropped() {
    let e = env(NO_DELAY).await;
    // Claimed two hours ago, never heard of since: the runtime died.
    let stale = spec(&unique("stale"), "");
    e.running(&stale, now_ms() - 2 * 3600 * 1000).await;
    // Claimed just now: a duplicate delivery of a running job.
    let live = spec(&unique("live"), "");
    e.running(&live, now_ms()).await;
    // Never reached a claim at all (no record): crash before the claim.
    let never = spec(&unique("never"), "");
    // Finished: nothing to do.
    let done = spec(&unique("done"), "");
    let a = e.running(&done, now_ms()).await;
    e.store
        .finish(
            &done.job_id,
            a,
            &Finish {
                state: JobState::Succeeded,
                cause: None,
                reason: "ok".into(),
                exit_code: Some(0),
                signal: None,
                result_key: None,
                progress: Progress::default(),
                runtime_ms: 5,
            },
            now_ms(),
        )
        .await
        .expect("finish");
    for s in [&stale, &live, &never, &done] {
        e.send_dlq(&s.to_json()).await;
    }
    // A second copy of the stale job's message: must not enqueue twice.
    e.send_dlq(&stale.to_json()).await;

    let stats = e.replan().await;
    assert_eq!((stats.planned, stats.dropped), (2, 3), "{stats:?}");
    let mut want = vec![stale.job_id.to_string(), never.job_id.to_string()];
    want.sort();
    assert_eq!(job_ids(&e.take(&e.r.queue_url).await), want);

    let rec = e.get(&stale.job_id).await;
    assert_eq!(rec.status, JobState::RetryScheduled);
    assert_eq!(rec.cause.as_deref(), Some("crashed"));
    let d = decisions(&rec, Action::Retry);
    assert_eq!(d[0].cause.as_deref(), Some("crashed"));
    assert!(
        d[0].reason.contains("stopped heartbeating"),
        "{}",
        d[0].reason
    );

    assert_eq!(e.get(&live.job_id).await.status, JobState::Running);
    let rec = e.get(&never.job_id).await;
    assert_eq!(
        rec.status,
        JobState::Queued,
        "a job that never ran stays QUEUED"
    );
    assert_eq!(decisions(&rec, Action::Retry).len(), 1);
    assert_eq!(e.get(&done.job_id).await.status, JobState::Succeeded);

    // The re-enqueued message is redriven again later (plan 1): that is a new failure,
    // while the original copy (plan 0) is superseded.
    let sqs_send = |plan: Option<&str>| {
        let mut req = e
            .sqs
            .send_message()
            .queue_url(&e.r.dlq_url)
            .message_body(never.to_json());
        if let Some(p) = plan {
            req = req.message_attributes(
                PLAN_ATTR,
                aws_sdk_sqs::types::MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value(p)
                    .build()
                    .expect("attr"),
            );
        }
        req.send()
    };
    sqs_send(None).await.expect("send");
    let stats = e.replan().await;
    assert_eq!(
        (stats.planned, stats.dropped),
        (0, 1),
        "superseded copy dropped: {stats:?}"
    );
    sqs_send(Some("1")).await.expect("send");
    let stats = e.replan().await;
    assert_eq!(stats.planned, 1, "{stats:?}");
    let got = e.take(&e.r.queue_url).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2.as_deref(), Some("2"));
}

#[tokio::test]
async fn a_plan_whose_send_was_lost_is_resent_once_after_the_grace() {
    let e = env(&format!("resend_after = \"1m\"\n{NO_DELAY}")).await;
    let s = spec(&unique("window"), "");
    let a = e.running(&s, now_ms()).await;
    let fr = e
        .fail(
            &s.job_id,
            a,
            FailureCause::InfraTransient,
            10,
            Progress::default(),
        )
        .await;
    e.take(&e.r.dlq_url).await;

    // A dispatcher wrote its plan and died before the SendMessage: just now ...
    let decision = |at: i64| Decision {
        at,
        action: Action::Retry,
        by: BY.into(),
        attempt: a.get(),
        cause: Some("infra_transient".into()),
        reason: "test".into(),
        delay_seconds: Some(0),
        queue: Some(e.r.queue_url.clone()),
    };
    e.store
        .replan(
            &s.job_id,
            JobState::Failed,
            a,
            JobState::RetryScheduled,
            &decision(now_ms()),
            &Replan::default(),
            now_ms(),
        )
        .await
        .expect("plan");
    e.send_dlq(&fr.to_json()).await;
    let stats = e.replan().await;
    // ... so another dispatcher may still be sending: left for later.
    assert_eq!(stats.failed, 1, "{stats:?}");
    assert!(e.take(&e.r.queue_url).await.is_empty());

    // Ten minutes later (older than resend_after), the redelivery re-sends it.
    let s2 = spec(&unique("window2"), "");
    let a2 = e.running(&s2, now_ms()).await;
    let fr2 = e
        .fail(
            &s2.job_id,
            a2,
            FailureCause::InfraTransient,
            10,
            Progress::default(),
        )
        .await;
    e.take(&e.r.dlq_url).await;
    let old = now_ms() - 10 * 60 * 1000;
    let mut d = decision(old);
    d.attempt = a2.get();
    e.store
        .replan(
            &s2.job_id,
            JobState::Failed,
            a2,
            JobState::RetryScheduled,
            &d,
            &Replan::default(),
            old,
        )
        .await
        .expect("plan");
    e.send_dlq(&fr2.to_json()).await;
    e.send_dlq(&fr2.to_json()).await;
    let stats = e.replan().await;
    assert_eq!((stats.resent, stats.dropped), (1, 1), "{stats:?}");
    assert_eq!(
        job_ids(&e.take(&e.r.queue_url).await),
        vec![s2.job_id.to_string()]
    );
    let rec = e.get(&s2.job_id).await;
    assert_eq!(decisions(&rec, Action::Enqueued).len(), 1);
}

#[tokio::test]
async fn the_lambda_handler_reports_only_failures() {
    let e = env(NO_DELAY).await;
    let s = spec(&unique("lambda"), "");
    let a = e.running(&s, now_ms()).await;
    let fr = e
        .fail(
            &s.job_id,
            a,
            FailureCause::InfraTransient,
            10,
            Progress::default(),
        )
        .await;
    e.take(&e.r.dlq_url).await;
    let event: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_value(serde_json::json!({
        "Records": [
            {"messageId": "m1", "receiptHandle": "h1", "body": fr.to_json(), "eventSource": "aws:sqs", "attributes": {}, "messageAttributes": {}},
            {"messageId": "m2", "receiptHandle": "h2", "body": "garbage", "eventSource": "aws:sqs", "attributes": {}, "messageAttributes": {}}
        ]
    }))
    .expect("event");
    let resp = e.replanner.handle(event).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    assert_eq!(e.get(&s.job_id).await.status, JobState::RetryScheduled);
    assert_eq!(e.take(&e.r.queue_url).await.len(), 1);
}

#[tokio::test]
async fn the_binary_drains_the_dlq_with_a_policy_file() {
    let e = env(NO_DELAY).await;
    let s = spec(&unique("bin"), "");
    let a = e.running(&s, now_ms()).await;
    e.fail(&s.job_id, a, FailureCause::Crashed, 10, Progress::default())
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, NO_DELAY).expect("write policy");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq-dispatcher"))
        .args([
            "replan",
            "--once",
            "--wait-seconds",
            "0",
            "--output",
            "json",
            "--policy",
        ])
        .arg(&policy)
        .args(["--tier-queues", &format!("large={}", e.large_url)])
        .envs(e.r.env())
        .output()
        .await
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_str(stdout.trim()).expect("stats json");
    assert_eq!(stats["planned"], 1, "{stats}");
    assert_eq!(e.get(&s.job_id).await.status, JobState::RetryScheduled);
    assert_eq!(e.take(&e.r.queue_url).await.len(), 1);

    // A bad policy is refused at start, naming the field.
    std::fs::write(&policy, "[causes.crashed]\nbase_delay = \"soon\"\n").expect("write");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq-dispatcher"))
        .args(["replan", "--once", "--policy"])
        .arg(&policy)
        .envs(e.r.env())
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(agentq_core::exit::USAGE)),
        "{stderr}"
    );
    assert!(stderr.contains("causes.crashed.base_delay"), "{stderr}");
}

/// END TO END, needs the lead's `agentq-agent poll --once`: a job whose run crashed
/// (stale lease, message redriven) is re-planned and then picked up and finished by
/// the agent's poll mode.
#[tokio::test]
async fn a_job_replanned_after_a_crash_is_finished_by_the_agent() {
    let e = env(NO_DELAY).await;
    let s = spec(&unique("e2e"), "");
    e.running(&s, now_ms() - 2 * 3600 * 1000).await;
    e.send_dlq(&s.to_json()).await;
    let stats = e.replan().await;
    assert_eq!(stats.planned, 1, "{stats:?}");
    assert_eq!(e.get(&s.job_id).await.status, JobState::RetryScheduled);

    let agent = agentq_testkit::binary("agentq-agent");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(agent)
            .args(["poll", "--once", "--wait-seconds", "1"])
            .envs(e.r.env())
            .output(),
    )
    .await
    .expect("agent finished in time")
    .expect("run agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = e.get(&s.job_id).await;
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");
    assert!(rec.attempt.get() >= 2);
}
