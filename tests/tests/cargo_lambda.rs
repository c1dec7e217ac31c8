//! The agent and the dispatcher under `cargo lambda watch`, the Rust Lambda developers'
//! local Runtime API (PyPI `cargo-lambda`): each answers `cargo lambda invoke` with an SQS
//! event built from a real message, and the agent drives its job to `SUCCEEDED`.
//!
//! cargo-lambda's Runtime API sends `Lambda-Runtime-Deadline-Ms` as the function timeout
//! (a duration such as 600000), not as an epoch time; the agent reads it as a duration
//! and says so, instead of refusing every job for lack of time.
//!
//! `cargo lambda` is installed with `python3 -m pip install cargo-lambda` (a prebuilt
//! binary) when missing; the test fails when it cannot be had.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use agentq_core::{JobId, JobState, JobStore};
use agentq_testkit::{Resources, binary, fixture, queue_arn, repo_root, resources, unique};
use aws_sdk_sqs::types::MessageSystemAttributeName;
use serde_json::{Value, json};

/// `cargo lambda` works, installing it from PyPI when it does not.
fn cargo_lambda() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let works = || {
            Command::new("cargo")
                .args(["lambda", "--version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if works() {
            return;
        }
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "cargo-lambda"])
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .output()
            .expect("python3 -m pip");
        assert!(
            out.status.success() && works(),
            "cargo-lambda is needed and could not be installed with `python3 -m pip install cargo-lambda`: {}\n(is pip's script directory on PATH?)",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `cargo lambda watch --only-lambda-apis` on 127.0.0.1:`port`, once it listens.
fn watch(port: u16, log: &Path) -> Killer {
    let log = std::fs::File::create(log).expect("log");
    let mut child = Command::new("cargo")
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
        ])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("cargo lambda watch");
    let end = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("cargo lambda watch exited: {s}");
        }
        assert!(
            Instant::now() < end,
            "cargo lambda watch did not listen within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Killer(child)
}

/// A function process against cargo-lambda's Runtime API, with the environment
/// `cargo lambda watch --only-lambda-apis` says it must have.
fn function(bin: &str, r: &Resources, port: u16, extra: &[(&str, String)], log: &Path) -> Killer {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new(binary(bin))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "_")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096")
        .env("RUST_LOG", "info")
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("function binary");
    Killer(child)
}

/// `cargo lambda invoke` with `event`; the function's answer.
async fn invoke(port: u16, event: &str, dir: &Path) -> Value {
    let file = dir.join(format!("{}.json", unique("event")));
    std::fs::write(&file, event).expect("event file");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("cargo")
            .args(["lambda", "invoke", "_", "-A", "127.0.0.1", "-P"])
            .arg(port.to_string())
            .arg("--data-file")
            .arg(&file)
            .current_dir(repo_root())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cargo lambda invoke answered within 120 s")
    .expect("cargo lambda invoke");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo lambda invoke: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The message as the SQS event source mapping delivers it.
fn sqs_event(m: &aws_sdk_sqs::types::Message, arn: &str) -> String {
    let attrs: serde_json::Map<String, Value> = m
        .attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.as_str().to_owned(), Value::String(v.clone())))
                .collect()
        })
        .unwrap_or_default();
    json!({ "Records": [{
        "messageId": m.message_id(),
        "receiptHandle": m.receipt_handle(),
        "body": m.body(),
        "attributes": attrs,
        "messageAttributes": {},
        "md5OfBody": m.md5_of_body(),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": "us-east-1",
    }]})
    .to_string()
}

async fn receive_one(r: &Resources, queue: &str) -> aws_sdk_sqs::types::Message {
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    for _ in 0..10 {
        let got = sqs
            .receive_message()
            .queue_url(queue)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        if let Some(m) = got.messages.unwrap_or_default().into_iter().next() {
            return m;
        }
    }
    panic!("no message on {queue}");
}

#[tokio::test]
async fn agent_and_dispatcher_answer_cargo_lambda_invoke() {
    cargo_lambda();
    let r = resources().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("work");
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    let store = JobStore::new(aws_sdk_dynamodb::Client::new(&r.sdk), &r.table);
    let port = free_port();
    let _watch = watch(port, &dir.path().join("watch.log"));

    // The agent: a job from the queue, through cargo-lambda's Runtime API, to SUCCEEDED.
    let job = unique("cl-agent");
    let spec = json!({"spec_version": 1, "job_id": job, "agent": "claude-code", "prompt": "sleep=1 turns=2"});
    sqs.send_message()
        .queue_url(&r.queue_url)
        .message_body(spec.to_string())
        .send()
        .await
        .expect("send");
    let m = receive_one(&r, &r.queue_url).await;
    let agent_log = dir.path().join("agent.log");
    let agent = function(
        "agentq-agent",
        &r,
        port,
        &[
            (
                "AGENTQ_CLAUDE_BIN",
                fixture("fake-agent").display().to_string(),
            ),
            ("AGENTQ_WORK_ROOT", work.path().display().to_string()),
            ("AGENTQ_HEARTBEAT_SECONDS", "0.5".into()),
        ],
        &agent_log,
    );
    let started = Instant::now();
    let answer = invoke(
        port,
        &sqs_event(&m, &queue_arn(&sqs, &r.queue_url).await),
        dir.path(),
    )
    .await;
    drop(agent);
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert_eq!(answer["batchItemFailures"], json!([]), "{answer}\n{log}");
    let rec = store
        .require(&JobId::parse(&job).expect("id"))
        .await
        .expect("record");
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}\n{log}");
    assert!(
        log.contains("not an epoch time but a duration"),
        "the agent says how it read the deadline:\n{log}"
    );
    eprintln!("agent job through cargo-lambda in {:?}", started.elapsed());

    // The dispatcher, started without arguments: a redriven raw spec from the DLQ.
    let raw = unique("cl-dispatcher");
    let spec =
        json!({"spec_version": 1, "job_id": raw, "agent": "claude-code", "prompt": "turns=1"});
    sqs.send_message()
        .queue_url(&r.dlq_url)
        .message_body(spec.to_string())
        .send()
        .await
        .expect("send");
    let m = receive_one(&r, &r.dlq_url).await;
    let dispatcher_log = dir.path().join("dispatcher.log");
    let dispatcher = function("agentq-dispatcher", &r, port, &[], &dispatcher_log);
    let answer = invoke(
        port,
        &sqs_event(&m, &queue_arn(&sqs, &r.dlq_url).await),
        dir.path(),
    )
    .await;
    drop(dispatcher);
    let log = std::fs::read_to_string(&dispatcher_log).unwrap_or_default();
    assert_eq!(answer["batchItemFailures"], json!([]), "{answer}\n{log}");
    let rec = store
        .require(&JobId::parse(&raw).expect("id"))
        .await
        .expect("the dispatcher created the record");
    assert_eq!(
        rec.history.last().map(|d| d.action.as_str()),
        Some("enqueued"),
        "{rec:?}\n{log}"
    );
    assert!(rec.history.iter().any(|d| d.action == "retry"), "{rec:?}");
}
