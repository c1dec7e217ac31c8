//! `agentq dashboard` in a real headless Chromium (Debian's package, driven by
//! playwright-core: `tests/browser/dashboard.mjs`), against the AWS emulator and a real
//! agent poller running a job that prints for a while: the list shows the submitted job
//! and updates itself, the job page shows log lines as the agent uploads them, hostile
//! job text stays text, cancel from the page ends the job CANCELLED.
//!
//! `tests/browser/install` installs Chromium and playwright-core when missing, and this
//! test fails when it cannot. Screenshots go to `$AGENTQ_DASHBOARD_SCREENSHOTS` when set
//! (the ones in `docs/` were taken that way).

use std::process::Stdio;
use std::time::Duration;

use agentq_core::layout::{Layout, Stream};
use agentq_core::record::now_ms;
use agentq_core::store::{ClaimOutcome, ClaimRequest, Finish};
use agentq_core::{
    AgentPreset, FailureCause, JobId, JobSpec, JobState, JobStore, Progress, Settings,
};
use agentq_producer::Producer;
use agentq_testkit::{binary, fixture, repo_root, resources, unique};
use tokio::io::AsyncBufReadExt;

const HOSTILE_LABEL: &str = r#"<b>bold</b> <img src=x onerror="window.__xss=3">"#;
const HOSTILE_LOG: &str =
    "<img src=x onerror=\"window.__xss=1\">\n</pre><script>window.__xss=2</script>\n";

fn install() {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("tests/browser/install"))
        .output()
        .expect("run tests/browser/install");
    assert!(
        out.status.success(),
        "the browser test needs Chromium and playwright-core, and installing them failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A failed job with hostile label, reason and logs, written straight to the table and
/// the bucket (no message: the poller must not see it).
async fn hostile_job(store: &JobStore, settings: &Settings, sdk: &aws_config::SdkConfig) -> JobId {
    let job = JobId::parse(&unique("xss")).unwrap();
    let mut spec = JobSpec::new(AgentPreset::Command);
    spec.job_id = Some(job.to_string());
    spec.command = Some(vec!["true".into()]);
    spec.labels.insert("suite".into(), "xss".into());
    spec.labels.insert("note".into(), HOSTILE_LABEL.into());
    let valid = spec.validate(&settings.validation()).unwrap();
    store.create_queued(&valid, now_ms()).await.unwrap();
    let layout = settings.layout();
    let ClaimOutcome::Claimed { attempt, .. } = store
        .claim(&ClaimRequest {
            job_id: &job,
            spec_json: "{}",
            tier: None,
            labels: &Default::default(),
            owner: "browser-test",
            stale_after_ms: 60_000,
            now: now_ms(),
            layout,
        })
        .await
        .unwrap()
    else {
        panic!("claim")
    };
    agentq_core::config::s3_client(sdk)
        .put_object()
        .bucket(settings.bucket().unwrap())
        .key(layout.segment(&job, attempt, Stream::Stdout, 0))
        .body(HOSTILE_LOG.as_bytes().to_vec().into())
        .send()
        .await
        .unwrap();
    store
        .finish(
            &job,
            attempt,
            &Finish {
                state: JobState::Failed,
                cause: Some(FailureCause::AgentExit {
                    code: Some(3),
                    signal: None,
                }),
                reason: HOSTILE_LABEL.into(),
                exit_code: Some(3),
                signal: None,
                result_key: None,
                progress: Progress::default(),
                runtime_ms: 5,
            },
            now_ms(),
        )
        .await
        .unwrap();
    job
}

#[tokio::test]
async fn the_dashboard_in_chromium() {
    tokio::task::spawn_blocking(install).await.unwrap();
    let r = resources().await;
    let settings = r.settings();
    let producer = Producer::from_sdk(&r.sdk, settings.clone());
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let xss = hostile_job(&store, &settings, &r.sdk).await;

    // The job the agent runs: a turn about every second for a minute (cancelled before).
    let mut spec = JobSpec::new(AgentPreset::ClaudeCode);
    spec.job_id = Some(unique("browser"));
    spec.prompt = Some("sleep=60 turns=60".into());
    spec.labels.insert("suite".into(), "browser".into());
    let job = producer
        .submit_spec(spec, &Default::default())
        .await
        .unwrap()
        .job_id;

    let mut dash = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentq"))
        .envs(r.env())
        .args(["dashboard", "--listen", "127.0.0.1:0", "--refresh", "500ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(dash.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the dashboard's address within 30 s")
        .unwrap()
        .unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .trim_end_matches('/')
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let work = tempfile::tempdir().unwrap();
    let agent = tokio::process::Command::new(binary("agentq-agent"))
        .args([
            "poll",
            "--once",
            "--wait-seconds",
            "5",
            "--function-timeout-seconds",
            "120",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_CLAUDE_BIN", fixture("fake-agent"))
        .env("AGENTQ_WORK_ROOT", work.path())
        .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
        .env("AGENTQ_KILL_GRACE_SECONDS", "1")
        .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut node = tokio::process::Command::new("node");
    node.arg(repo_root().join("tests/browser/dashboard.mjs"))
        .env("DASH_URL", &url)
        .env("JOB_ID", job.as_str())
        .env("XSS_JOB_ID", xss.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(dir) = std::env::var_os("AGENTQ_DASHBOARD_SCREENSHOTS") {
        node.env("SHOTS", dir);
    }
    // The script prints each step as it passes (visible with --nocapture).
    // About 25 s on an idle 2-core machine; the limit only guards against a hang.
    let browser = tokio::time::timeout(Duration::from_secs(120), node.status())
        .await
        .expect("the browser test finished within 120 s")
        .expect("run node");
    let agent_out = tokio::time::timeout(Duration::from_secs(60), agent.wait_with_output())
        .await
        .expect("the agent finished")
        .unwrap();
    assert!(
        browser.success(),
        "browser test failed (its steps are above); agent:\n{}",
        String::from_utf8_lossy(&agent_out.stderr),
    );

    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::Cancelled, "{rec:?}");
    assert!(rec.cancel_requested);
    assert!(
        rec.history
            .iter()
            .any(|d| d.action == "cancel" && d.by == "producer"),
        "{:?}",
        rec.history
    );
    assert!(
        !r.keys(&Layout::new(&r.prefix).job_prefix(&job))
            .await
            .is_empty(),
        "the job uploaded logs"
    );
    let _ = dash.start_kill();
}
