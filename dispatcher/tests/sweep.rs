//! The sweep and the new causes against the emulator: stranded `RUNNING` jobs and
//! `QUEUED` jobs without a message are re-planned (and live ones left alone), the
//! Lambda front end runs the sweep on a scheduled event, `agentq-dispatcher sweep`
//! prints its report, and rate-limited / failed-resume jobs get their plans.

use std::time::Duration;

use agentq_core::failure::{FAILURE_RECORD_VERSION, FailureRecord};
use agentq_core::layout::{Layout, msg_attr};
use agentq_core::record::now_ms;
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::{ClaimOutcome, ClaimRequest, Finish};
use agentq_core::{Action, Attempt, FailureCause, JobId, JobRecord, JobState, JobStore, Progress};
use agentq_dispatcher::plan::BY;
use agentq_dispatcher::poller::{self, PollOptions};
use agentq_dispatcher::{Policy, RawPolicy, Replanner};
use agentq_testkit::{Resources, resources, unique};
use aws_sdk_sqs::types::QueueAttributeName;

const POLICY: &str = r#"
stale_after = "1m"
[sweep]
visibility_horizon = "10s"
margin = "1m"
queued_after = "20m"
[causes.crashed]
base_delay = "0s"
max_delay = "0s"
"#;

struct Env {
    r: Resources,
    store: JobStore,
    sqs: aws_sdk_sqs::Client,
    replanner: Replanner,
}

async fn env() -> Env {
    let r = resources().await;
    let raw: RawPolicy = toml::from_str(POLICY).expect("policy");
    let policy = Policy::build(&raw, &[], &r.queue_url).expect("valid policy");
    let clients = r.clients();
    let store = JobStore::new(clients.dynamodb.clone(), &r.table);
    let replanner = Replanner::new(
        store.clone(),
        clients.sqs.clone(),
        clients.s3,
        policy,
        ValidationContext::default(),
    );
    Env {
        sqs: clients.sqs,
        r,
        store,
        replanner,
    }
}

fn spec(id: &str) -> agentq_core::ValidSpec {
    let json = format!(
        r#"{{"spec_version":1,"job_id":"{id}","agent":"command","command":["true"],"timeout_seconds":7200}}"#
    );
    JobSpec::parse_valid(json.as_bytes(), &ValidationContext::default()).expect("spec")
}

impl Env {
    /// A job claimed at `at` (its heartbeat is that old).
    async fn running(&self, s: &agentq_core::ValidSpec, at: i64) -> Attempt {
        self.store.create_queued(s, at).await.expect("create");
        let json = s.to_json();
        let layout = Layout::default();
        let req = ClaimRequest {
            job_id: &s.job_id,
            spec_json: &json,
            tier: None,
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

    async fn fail(&self, job: &JobId, attempt: Attempt, cause: FailureCause, progress: Progress) {
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
            runtime_ms: 1_000,
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
        self.sqs
            .send_message()
            .queue_url(&self.r.dlq_url)
            .message_body(rec.to_json())
            .send()
            .await
            .expect("send to DLQ");
        poller::run(
            &self.replanner,
            &self.sqs,
            &PollOptions::new(&self.r.dlq_url, 0, true),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("poller");
    }

    async fn get(&self, job: &JobId) -> JobRecord {
        self.store.require(job).await.expect("record")
    }

    /// Job ids of the visible messages on the jobs queue (received and deleted).
    async fn enqueued(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .r
            .drain_messages(&self.r.queue_url)
            .await
            .into_iter()
            .filter_map(|m| {
                m.message_attributes()
                    .and_then(|a| a.get(msg_attr::JOB_ID))
                    .and_then(|v| v.string_value().map(str::to_owned))
            })
            .collect();
        ids.sort();
        ids
    }

    async fn delayed(&self) -> u64 {
        self.sqs
            .get_queue_attributes()
            .queue_url(&self.r.queue_url)
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

fn actions(rec: &JobRecord) -> Vec<Action> {
    rec.history
        .iter()
        .filter(|d| d.by == BY)
        .map(|d| d.action)
        .collect()
}

#[tokio::test]
async fn the_sweep_replans_stranded_running_jobs_and_leaves_live_ones() {
    let e = env().await;
    let now = now_ms();
    // stale_after 1m + horizon 10s + margin 1m: stranded after 2m10s without a heartbeat.
    let stranded = spec(&unique("stranded"));
    let a = e.running(&stranded, now - 3 * 60_000).await;
    let stale_only = spec(&unique("stale"));
    e.running(&stale_only, now - 90_000).await;
    let live = spec(&unique("live"));
    e.running(&live, now).await;

    let report = e.replanner.sweep(None).await.expect("sweep");
    assert_eq!(report.running.examined, 1, "{report:?}");
    assert_eq!(report.running.replanned, 1, "{report:?}");
    assert_eq!(e.enqueued().await, vec![stranded.job_id.to_string()]);

    let rec = e.get(&stranded.job_id).await;
    assert_eq!(rec.status, JobState::RetryScheduled);
    assert_eq!(actions(&rec), vec![Action::Retry, Action::Enqueued]);
    let attempt = &rec.attempts[&a.to_string()];
    assert_eq!(
        (attempt.status, attempt.cause.as_deref()),
        (Some(JobState::Failed), Some("crashed"))
    );
    assert!(
        rec.history[0].reason.contains("stranded"),
        "{}",
        rec.history[0].reason
    );
    // Stale but within the horizon and margin: a message may still bring an agent.
    assert_eq!(e.get(&stale_only.job_id).await.status, JobState::Running);
    assert_eq!(e.get(&live.job_id).await.status, JobState::Running);

    // A second sweep finds nothing more to do.
    let report = e.replanner.sweep(None).await.expect("sweep");
    assert_eq!(
        report.running.replanned + report.queued.replanned,
        0,
        "{report:?}"
    );
    assert!(e.enqueued().await.is_empty());
}

#[tokio::test]
async fn a_queued_job_without_a_message_is_reenqueued_once_its_queue_is_empty() {
    let e = env().await;
    let now = now_ms();
    let lost = spec(&unique("lost"));
    e.store
        .create_queued(&lost, now - 3600 * 1000)
        .await
        .expect("create");
    let fresh = spec(&unique("fresh"));
    e.store.create_queued(&fresh, now).await.expect("create");

    // Something waits on the queue: a QUEUED job may be behind it; not judged.
    e.sqs
        .send_message()
        .queue_url(&e.r.queue_url)
        .message_body("someone else's job")
        .send()
        .await
        .expect("send");
    let report = e.replanner.sweep(None).await.expect("sweep");
    assert_eq!(report.busy_queues, vec![e.r.queue_url.clone()]);
    assert_eq!(report.queued.replanned, 0, "{report:?}");
    assert_eq!(e.r.drain(&e.r.queue_url).await.len(), 1);

    // The queue is empty: the old QUEUED job has no message anywhere.
    let report = e.replanner.sweep(None).await.expect("sweep");
    assert_eq!(report.queued.replanned, 1, "{report:?}");
    assert_eq!(e.enqueued().await, vec![lost.job_id.to_string()]);
    let rec = e.get(&lost.job_id).await;
    assert_eq!(rec.status, JobState::Queued);
    let d = &rec.history[0];
    assert_eq!(
        (d.action, d.cause.as_deref()),
        (Action::Retry, Some("never_ran"))
    );
    assert_eq!(e.get(&fresh.job_id).await.history.len(), 0);
}

#[tokio::test]
async fn the_lambda_front_end_sweeps_on_a_schedule_and_the_binary_prints_a_report() {
    let e = env().await;
    let stranded = spec(&unique("sched"));
    e.running(&stranded, now_ms() - 10 * 60_000).await;
    let scheduled = serde_json::json!({
        "version": "0", "id": "1", "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {}
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let out = agentq_dispatcher::lambda::handle(&e.replanner, scheduled, deadline)
        .await
        .expect("sweep");
    assert_eq!(out["running"]["replanned"], 1, "{out}");
    assert_eq!(
        e.get(&stranded.job_id).await.status,
        JobState::RetryScheduled
    );

    // The same through the binary, with the policy from a file.
    let other = spec(&unique("bin"));
    e.running(&other, now_ms() - 10 * 60_000).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("write policy");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq-dispatcher"))
        .args(["sweep", "--policy"])
        .arg(&policy)
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
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("report json");
    assert_eq!(report["running"]["replanned"], 1, "{report}");
    assert_eq!(e.get(&other.job_id).await.status, JobState::RetryScheduled);
}

#[tokio::test]
async fn a_rate_limited_session_resumes_after_the_reset_and_a_failed_resume_starts_afresh() {
    let e = env().await;
    let limited = spec(&unique("limited"));
    let a = e.running(&limited, now_ms()).await;
    let reset = now_ms() + 60_000;
    e.fail(
        &limited.job_id,
        a,
        FailureCause::RateLimited {
            reset_at: Some(reset),
        },
        Progress {
            session_id: Some("sess-1".into()),
            ..Default::default()
        },
    )
    .await;
    let rec = e.get(&limited.job_id).await;
    assert_eq!(rec.rate_limit_reset_at, Some(reset));
    assert_eq!(rec.status, JobState::Resuming);
    assert_eq!(rec.resume_session.as_deref(), Some("sess-1"));
    assert_eq!(rec.segment, 2);
    assert_eq!(actions(&rec), vec![Action::Pause, Action::Enqueued]);
    let delay = rec.history[0].delay_seconds.unwrap();
    assert!((55..=66).contains(&delay), "{delay}");
    // Sent delayed until the reset.
    assert!(e.enqueued().await.is_empty());
    assert_eq!(e.delayed().await, 1);

    let fresh = spec(&unique("fresh"));
    let a = e.running(&fresh, now_ms()).await;
    e.fail(
        &fresh.job_id,
        a,
        FailureCause::ResumeFailed,
        Progress {
            session_id: Some("vanished".into()),
            ..Default::default()
        },
    )
    .await;
    let rec = e.get(&fresh.job_id).await;
    assert_eq!(rec.status, JobState::RetryScheduled);
    assert_eq!(rec.resume_session, None, "the next run starts afresh");
    assert_eq!(rec.segment, 2);
    assert_eq!(actions(&rec), vec![Action::Retry, Action::Enqueued]);
    assert_eq!(e.enqueued().await, vec![fresh.job_id.to_string()]);
}

/// The template's schedule invokes the dispatcher with an event its Lambda front end
/// recognises as the sweep, and lets EventBridge invoke it. (The emulator's
/// CloudFormation cannot create the functions, so this reads the template, with
/// cfn-lint's YAML loader as the infra test does.)
#[test]
fn the_template_schedules_the_sweep_on_the_dispatcher() {
    let script = r#"
import json, sys
from cfnlint.decode.cfn_yaml import load
t = load(sys.argv[1])
print(json.dumps({k: v for k, v in t["Resources"].items()
                  if v["Type"] in ("AWS::Events::Rule", "AWS::Lambda::Permission")}))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(agentq_testkit::repo_root().join("infra/template.yaml"))
        .output()
        .expect("python3 with cfn-lint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rule = &res["SweepSchedule"];
    assert_eq!(rule["Condition"], "HasFunctions");
    let p = &rule["Properties"];
    assert_eq!(p["State"], "ENABLED");
    assert!(
        p["ScheduleExpression"]["Fn::Sub"]
            .as_str()
            .is_some_and(|s| s.starts_with("rate(")),
        "{p}"
    );
    let target = &p["Targets"][0];
    assert_eq!(
        target["Arn"]["Fn::GetAtt"],
        serde_json::json!(["DispatcherFunction", "Arn"])
    );
    let input: serde_json::Value =
        serde_json::from_str(target["Input"].as_str().expect("input")).expect("input json");
    assert_eq!(
        agentq_dispatcher::lambda::trigger(input).expect("recognised"),
        agentq_dispatcher::lambda::Trigger::Sweep
    );
    let perm = &res["SweepPermission"]["Properties"];
    assert_eq!(perm["Principal"], "events.amazonaws.com");
    assert_eq!(
        perm["SourceArn"]["Fn::GetAtt"],
        serde_json::json!(["SweepSchedule", "Arn"])
    );
}
