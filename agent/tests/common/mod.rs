//! Shared helpers for the agent's tests: deps against unique emulator resources, events,
//! and the fake agent CLI.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentq_agent::{AgentArgs, AgentConfig, Deps, Invocation, handle_batch};
use agentq_core::{JobId, JobRecord, JobStore};
use agentq_testkit::Resources;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    a: AgentArgs,
}

pub fn fake_agent() -> String {
    agentq_testkit::fixture("fake-agent").display().to_string()
}

/// Agent deps for `r`, with fast timings and the fake agent as Claude/Codex; `extra`
/// flags override.
pub fn deps(r: &Resources, work_root: &std::path::Path, extra: &[&str]) -> Arc<Deps> {
    let fake = fake_agent();
    let root = work_root.display().to_string();
    let defaults: [(&str, &str); 9] = [
        ("--heartbeat-seconds", "0.5"),
        ("--stale-after-seconds", "3"),
        ("--deadline-reserve-seconds", "4"),
        ("--kill-grace-seconds", "1"),
        ("--log-flush-seconds", "1"),
        ("--claude-bin", &fake),
        ("--codex-bin", &fake),
        ("--work-root", &root),
        ("--max-concurrent-jobs", "4"),
    ];
    let mut args = vec!["agent"];
    for (k, v) in defaults {
        if !extra.contains(&k) {
            args.extend([k, v]);
        }
    }
    args.extend_from_slice(extra);
    let config = AgentConfig::from_args(&Wrap::parse_from(args).a).expect("config");
    Arc::new(Deps::new(r.clients(), r.settings(), config).expect("deps"))
}

pub fn message(id: &str, body: &str) -> SqsMessage {
    let mut m = SqsMessage::default();
    m.message_id = Some(id.to_owned());
    m.receipt_handle = Some(format!("rh-{id}"));
    m.body = Some(body.to_owned());
    m
}

pub fn event(msgs: Vec<SqsMessage>) -> SqsEvent {
    let mut e = SqsEvent::default();
    e.records = msgs;
    e
}

pub async fn handle(
    deps: &Arc<Deps>,
    msgs: Vec<SqsMessage>,
    deadline: Duration,
) -> SqsBatchResponse {
    let inv = Invocation {
        request_id: format!("test-{}", ulid::Ulid::new()),
        deadline: tokio::time::Instant::now() + deadline,
    };
    handle_batch(deps, event(msgs), &inv, &CancellationToken::new()).await
}

pub fn failed_ids(r: &SqsBatchResponse) -> Vec<String> {
    let mut v: Vec<String> = r
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    v.sort();
    v
}

pub async fn record(r: &Resources, job: &str) -> JobRecord {
    JobStore::new(r.clients().dynamodb, &r.table)
        .require(&JobId::parse(job).unwrap())
        .await
        .expect("record")
}

/// A claude-code spec whose prompt holds fake-agent directives.
pub fn claude(job: &str, prompt: &str) -> String {
    serde_json::json!({"spec_version": 1, "job_id": job, "agent": "claude-code", "prompt": prompt})
        .to_string()
}

/// A temporary directory the jobs' own uids may pass through (the agent runs their
/// children under other uids when the tests run as root).
pub fn work_root() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    d
}

pub fn is_empty_dir(p: &std::path::Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

pub fn fixture_dir() -> PathBuf {
    agentq_testkit::fixture("")
}
