//! The AgentCore Runtime HTTP front end, through its contract: real HTTP/1.1 requests to
//! the server (in-process on a free port, and the `agentq-agent serve` binary) against
//! the emulator. `/ping` idle and busy, `/invocations` with a bare spec and with an SQS
//! event (partial batch response), `async` mode, bad payloads, limits, SIGTERM.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq_agent::Deps;
use agentq_agent::serve::{self, InvocationMode, ServeOptions};
use agentq_core::layout::Layout;
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::store::{ClaimOutcome, ClaimRequest};
use agentq_core::{JobState, JobStore};
use agentq_testkit::{Resources, binary, resources};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// One HTTP/1.1 request on its own connection; the status and the JSON body (`Null`
/// when empty or not JSON).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write head");
    s.write_all(body).await.expect("write body");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn ping(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/ping", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    body
}

fn options(mode: InvocationMode) -> ServeOptions {
    ServeOptions {
        mode,
        invocation_timeout: Duration::from_secs(60),
        max_invocations: 1,
        max_request_bytes: 64 * 1024,
        read_timeout: Duration::from_secs(5),
        max_connections: 16,
        drain_timeout: Duration::from_secs(15),
    }
}

/// A server on a free local port; cancelling the token stops it.
struct Served {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn serve(deps: Arc<Deps>, opts: ServeOptions) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve::run(deps, listener, opts, stop.clone()));
    Served { addr, stop, task }
}

impl Served {
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stopped in time")
            .expect("join")
            .expect("served");
    }
}

async fn wait_for_ping(addr: SocketAddr, status: &str) -> Value {
    let t = Instant::now();
    loop {
        let p = ping(addr).await;
        if p["status"] == status {
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "/ping never said {status}: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_spec_runs_to_succeeded_and_ping_is_busy_meanwhile() {
    let r = resources().await;
    let work = work_root();
    let s = serve(deps(&r, work.path(), &[]), options(InvocationMode::Sync)).await;

    let idle = ping(s.addr).await;
    assert_eq!(idle["status"], "Healthy", "{idle}");
    let since = idle["time_of_last_update"].as_u64().expect("epoch seconds");

    let job = agentq_testkit::unique("http");
    let spec = claude(&job, "sleep=3 turns=2");
    let session = "s".repeat(40);
    let addr = s.addr;
    let call = tokio::spawn(async move {
        http(
            addr,
            "POST",
            "/invocations",
            &[
                ("Content-Type", "application/json"),
                ("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id", &session),
            ],
            spec.as_bytes(),
        )
        .await
    });

    let busy = wait_for_ping(s.addr, "HealthyBusy").await;
    assert!(busy["time_of_last_update"].as_u64().unwrap() >= since);
    // One invocation at a time: another is refused while this one runs.
    let (status, body) = http(
        s.addr,
        "POST",
        "/invocations",
        &[],
        claude(&agentq_testkit::unique("second"), "turns=1").as_bytes(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("busy"), "{body}");

    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["batchItemFailures"], json!([]), "{body}");
    assert_eq!(body["jobs"][0]["job_id"], job.as_str(), "{body}");
    assert_eq!(body["jobs"][0]["status"], "SUCCEEDED", "{body}");
    assert_eq!(body["session_id"], "s".repeat(40));
    assert_eq!(record(&r, &job).await.status, JobState::Succeeded);
    wait_for_ping(s.addr, "Healthy").await;

    // A spec without a job id gets one, and the answer names it.
    let (status, body) = http(
        s.addr,
        "POST",
        "/invocations",
        &[],
        br#"{"spec_version":1,"agent":"claude-code","prompt":"turns=1"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["jobs"][0]["job_id"].as_str().expect("a job id");
    assert_eq!(record(&r, id).await.status, JobState::Succeeded);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let r = resources().await;
    let work = work_root();
    let s = serve(deps(&r, work.path(), &[]), options(InvocationMode::Sync)).await;

    let cases: [(&[u8], &str); 4] = [
        (
            br#"{"spec_version":1,"agent":"nope","prompt":"x"}"#,
            "agent",
        ),
        // AgentCore's example payload is not a job spec.
        (
            br#"{"prompt": "What's the weather today?"}"#,
            "spec_version",
        ),
        (b"{not json", "body"),
        (br#"{"Records":[{"messageId":"m1"}]}"#, "Records[0].body"),
    ];
    for (payload, field) in cases {
        let (status, body) = http(s.addr, "POST", "/invocations", &[], payload).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["field"], field, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains(field),
            "the message names the field: {body}"
        );
    }
    // The spec's own rules, every violation listed.
    let (status, body) = http(
        s.addr,
        "POST",
        "/invocations",
        &[],
        br#"{"spec_version":1,"agent":"command","command":["true"],"env":{"PATH":"/x"},"timeout_seconds":1}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let fields: Vec<&str> = body["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"env.PATH") && fields.contains(&"timeout_seconds"),
        "{body}"
    );

    // Size, method and path.
    let big = vec![b' '; 65 * 1024];
    let (status, body) = http(s.addr, "POST", "/invocations", &[], &big).await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = http(s.addr, "GET", "/invocations", &[], b"").await;
    assert_eq!(status, 405);
    let (status, body) = http(s.addr, "GET", "/nope", &[], b"").await;
    assert_eq!(status, 404, "{body}");
    // Nothing was recorded or run.
    assert_eq!(ping(s.addr).await["status"], "Healthy");
    s.shutdown().await;
}

/// An SQS event as the mapping would deliver it: one record runs, one whose job is
/// running elsewhere (a live lease) is left for later, named in `batchItemFailures`.
#[tokio::test]
async fn an_sqs_event_gets_its_partial_batch_response() {
    let r = resources().await;
    let work = work_root();
    let s = serve(deps(&r, work.path(), &[]), options(InvocationMode::Sync)).await;

    let busy = agentq_testkit::unique("leased");
    let busy_spec = claude(&busy, "turns=1");
    let valid = JobSpec::parse_valid(busy_spec.as_bytes(), &ValidationContext::default()).unwrap();
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    let layout = Layout::new(&r.prefix);
    let json = valid.to_json();
    let claim = store
        .claim(&ClaimRequest {
            job_id: &valid.job_id,
            spec_json: &json,
            tier: None,
            labels: &valid.spec.labels,
            owner: "someone-else",
            stale_after_ms: 600_000,
            now: agentq_core::record::now_ms(),
            layout: &layout,
        })
        .await
        .unwrap();
    assert!(matches!(claim, ClaimOutcome::Claimed { .. }));

    let ok = agentq_testkit::unique("event");
    let event = json!({"Records": [
        {"messageId": "m-ok", "body": claude(&ok, "turns=1"), "attributes": {}, "messageAttributes": {}},
        {"messageId": "m-busy", "body": busy_spec, "attributes": {}, "messageAttributes": {}},
    ]});
    let (status, body) = http(
        s.addr,
        "POST",
        "/invocations",
        &[("Content-Type", "application/json")],
        event.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["batchItemFailures"],
        json!([{"itemIdentifier": "m-busy"}]),
        "{body}"
    );
    assert_eq!(body["jobs"][0]["message_id"], "m-ok");
    assert_eq!(body["jobs"][0]["status"], "SUCCEEDED", "{body}");
    assert_eq!(body["jobs"][1]["job_id"], busy.as_str());
    assert_eq!(body["jobs"][1]["status"], "RUNNING", "{body}");
    assert_eq!(record(&r, &ok).await.status, JobState::Succeeded);
    s.shutdown().await;
}

/// `async` mode answers at once; the job runs in the background (`HealthyBusy`), and the
/// SQS message it came in is deleted by the agent once the job is acknowledged.
#[tokio::test]
async fn async_mode_answers_at_once_and_deletes_the_acknowledged_message() {
    let r = resources().await;
    let work = work_root();
    let s = serve(deps(&r, work.path(), &[]), options(InvocationMode::Async)).await;

    let job = agentq_testkit::unique("async");
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    sqs.send_message()
        .queue_url(&r.queue_url)
        .message_body(claude(&job, "sleep=2 turns=2"))
        .send()
        .await
        .unwrap();
    let got = sqs
        .receive_message()
        .queue_url(&r.queue_url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let m = &got.messages()[0];
    let arn = agentq_testkit::queue_arn(&sqs, &r.queue_url).await;
    let event = json!({"Records": [{
        "messageId": m.message_id(), "receiptHandle": m.receipt_handle(), "body": m.body(),
        "attributes": {}, "messageAttributes": {}, "eventSource": "aws:sqs",
        "eventSourceARN": arn, "awsRegion": "us-east-1",
    }]});

    let t = Instant::now();
    let (status, body) = http(
        s.addr,
        "POST",
        "/invocations",
        &[],
        event.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered before the job ran"
    );
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["jobs"][0]["job_id"], job.as_str(), "{body}");
    wait_for_ping(s.addr, "HealthyBusy").await;
    wait_for_ping(s.addr, "Healthy").await;
    assert_eq!(record(&r, &job).await.status, JobState::Succeeded);

    // Deleted, not merely hidden: nothing visible or in flight is left.
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&r.queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .send()
        .await
        .unwrap();
    let n = |k| {
        attrs
            .attributes()
            .and_then(|a| a.get(&k))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        (
            n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages),
            n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        ),
        ("0".to_owned(), "0".to_owned())
    );
    s.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary: `serve` answers `/ping`; SIGTERM during a job stops the child like a
/// deadline does, the caller still gets its answer, and the process exits cleanly.
#[tokio::test]
async fn the_binary_serves_and_sigterm_stops_the_running_job() {
    let r: Resources = resources().await;
    let work = work_root();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(binary("agentq-agent"))
        .args(["serve", "--listen", &addr.to_string()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_CLAUDE_BIN", fake_agent())
        .env("AGENTQ_WORK_ROOT", work.path())
        .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
        .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
        .env("AGENTQ_KILL_GRACE_SECONDS", "1")
        .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
        .env("AGENTQ_INVOCATION_TIMEOUT_SECONDS", "120")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");

    let t = Instant::now();
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s.shutdown().await;
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ping(addr).await["status"], "Healthy");

    let job = agentq_testkit::unique("sigterm");
    let spec = claude(&job, "sleep=60");
    let call =
        tokio::spawn(async move { http(addr, "POST", "/invocations", &[], spec.as_bytes()).await });
    wait_for_ping(addr, "HealthyBusy").await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");

    let (status, body) = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("answered after SIGTERM")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exited after SIGTERM")
        .unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert!(exit.success(), "{exit:?}\n{stderr}");
    let rec = record(&r, &job).await;
    assert_ne!(rec.status, JobState::Running, "{rec:?}");
    assert_ne!(rec.status, JobState::Succeeded, "stopped early: {rec:?}");
    assert_eq!(body["jobs"][0]["status"], json!(rec.status), "{body}");
}
