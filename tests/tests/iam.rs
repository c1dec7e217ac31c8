//! The IAM-enforced suite: every component runs under the credentials the template gives
//! it, against an emulator that checks permissions, and any denial fails the test.
//!
//! One moto server of its own (enforcement is process-wide; `tests/iam/moto_server.py`
//! fixes its S3 signature check for queries with `/`), one stack from
//! `infra/template.yaml` (provisioned by `localdev/provision.py`), then
//! `tests/iam/enforce.py setup`: inline policies re-written, emulator-only statements for
//! what moto cannot judge (DynamoDB/SSM/KMS resources, SQS batch action names), the
//! agent's and dispatcher's roles assumed, the producer an IAM user with the stack's
//! `ProducerPolicy`, enforcement on. Then the real binaries, each with only its own
//! credentials:
//!
//! - producer: submit inline, offloaded to S3, a batch, cancel, a failed send rolled back
//!   (record and payload), `status`/`logs`/`list`;
//! - agent in Lambda mode (a Runtime API server, an event built from a message received
//!   from the queue as the event source mapping does): its message's visibility stays
//!   short while it runs, so a killed run's message is back in seconds; the next
//!   invocation takes the job over to `SUCCEEDED`;
//! - agent in poll mode: secrets, an offloaded spec, failures reported to the DLQ, a
//!   timed-out session checkpointed, a deferred message, a cancelled job;
//! - dispatcher: fail, resume, escalate, and a redriven offloaded spec (retry); then the
//!   resumed segment runs from its checkpoint;
//! - and the check that the suite bites: without the agent's `ReportFailures` statement
//!   the same flow is denied, and the denial detector names it.
//!
//! Statements moto cannot judge by resource (DynamoDB, SSM, KMS) are checked against the
//! template by `template_policies_grant_exactly_what_each_flow_needs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentq_core::layout::msg_attr;
use agentq_core::{JobId, JobRecord, JobState, JobStore};
use agentq_testkit::runtime_api::{Answer, RuntimeApi, lambda_env};
use agentq_testkit::{binary, fixture, repo_root, unique};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use serde_json::{Value, json};

// ------------------------------------------------------------------ denial detector

/// What a denial looks like in a binary's output. moto answers JSON-protocol services
/// (DynamoDB, SSM, SQS JSON) with an XML 403, which the SDK reports as a parse failure of
/// the XML, so those count as denials too.
const DENIAL_MARKERS: [&str; 9] = [
    "AccessDenied",
    "SignatureDoesNotMatch",
    "Access Denied",
    "not authorized to perform",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "<ErrorResponse",
    "unexpected token '<'",
    "status: 403",
];

/// The lines of `text` that report a denial.
fn denials(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            DENIAL_MARKERS.iter().any(|m| l.contains(m))
                || (l.contains("403") && (l.contains("Forbidden") || l.contains("<?xml")))
        })
        .map(|l| l.chars().take(400).collect())
        .collect()
}

#[test]
fn the_denial_detector_knows_each_shape() {
    for line in [
        "WARN failure record not sent to the DLQ error=service error: AccessDenied: User: arn:aws:sts::123456789012:assumed-role/x is not authorized to perform: sqs:SendMessage",
        "error: unexpected token '<' at line 1 (DynamoDB GetItem)",
        r#"unhandled error (Unhandled): <?xml version="1.0" encoding="utf-8"?><ErrorResponse><Errors><Error><Code>AccessDenied"#,
        "S3 GetObject: Access Denied",
    ] {
        assert_eq!(denials(line).len(), 1, "{line}");
    }
    assert!(denials("INFO job succeeded\nWARN throttled, retrying").is_empty());
}

// ------------------------------------------------------------------ the emulator

/// Our own moto server, stopped by its pid when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start_moto(log: &Path) -> Moto {
    let port = free_port();
    let log = std::fs::File::create(log).expect("moto log");
    // moto's server, with its S3 signature check fixed for queries with '/' in them.
    let server = repo_root().join("tests/iam/moto_server.py");
    let child = Command::new("python3")
        .arg(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("python3 -m moto.server (install: python3 -m pip install 'moto[server]==5.2.1')");
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut moto = Moto { child, endpoint };
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import urllib.request; urllib.request.urlopen('{}/moto-api/', timeout=2)",
                    moto.endpoint
                ),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return moto;
        }
        if let Ok(Some(status)) = moto.child.try_wait() {
            panic!("moto exited during startup ({status})");
        }
        assert!(Instant::now() < end, "moto did not answer within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn python(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("python3")
        .args(args)
        .envs(env.iter().copied())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python3 {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

// ------------------------------------------------------------------ the stack

#[derive(Debug, Clone)]
struct Key {
    id: String,
    secret: String,
    token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Producer,
    Agent,
    Dispatcher,
}

struct Stack {
    endpoint: String,
    out: Value,
    keys: BTreeMap<String, Key>,
    dir: tempfile::TempDir,
    admin: SdkConfig,
}

impl Stack {
    fn o(&self, k: &str) -> String {
        self.out[k]
            .as_str()
            .unwrap_or_else(|| panic!("stack output {k} missing: {}", self.out))
            .to_owned()
    }

    fn key(&self, who: Who) -> &Key {
        &self.keys[match who {
            Who::Producer => "producer",
            Who::Agent => "agent",
            Who::Dispatcher => "dispatcher",
        }]
    }

    /// The environment of a binary running as `who`: its credentials and the stack's
    /// settings, nothing else from this process.
    fn env(&self, who: Who) -> Vec<(String, String)> {
        let k = self.key(who);
        let mut env = vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), k.id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), k.secret.clone()),
            ("AGENTQ_QUEUE_URL".into(), self.o("QueueUrl")),
            ("AGENTQ_DLQ_URL".into(), self.o("DlqUrl")),
            ("AGENTQ_TABLE".into(), self.o("TableName")),
            ("AGENTQ_BUCKET".into(), self.o("BucketName")),
            ("AGENTQ_PREFIX".into(), self.o("KeyPrefix")),
            ("AGENTQ_SECRETS_PREFIX".into(), self.o("SecretsPrefix")),
            ("RUST_LOG".into(), "info".into()),
        ];
        if let Some(t) = &k.token {
            env.push(("AWS_SESSION_TOKEN".into(), t.clone()));
        }
        if who == Who::Agent {
            // As the template configures the functions: checkpoints under the stack's key,
            // jobs with aws_credentials under the job role.
            env.push(("AGENTQ_JOB_ROLE_ARN".into(), self.o("JobRoleArn")));
            env.push((
                "AGENTQ_CHECKPOINT_KMS_KEY".into(),
                self.o("CheckpointKeyArn"),
            ));
        }
        if who == Who::Dispatcher {
            env.push((
                "AGENTQ_TIER_QUEUES".into(),
                format!("large={}", self.o("LargeQueueUrl")),
            ));
        }
        env
    }

    fn store(&self) -> JobStore {
        JobStore::new(
            aws_sdk_dynamodb::Client::new(&self.admin),
            self.o("TableName"),
        )
    }

    async fn record(&self, job: &str) -> Option<JobRecord> {
        self.store()
            .get(&JobId::parse(job).expect("job id"))
            .await
            .expect("get record (admin)")
    }

    fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.admin)
    }

    fn s3(&self) -> aws_sdk_s3::Client {
        agentq_core::config::s3_client(&self.admin)
    }
}

async fn admin_sdk(endpoint: &str, k: &Key) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            &k.id,
            &k.secret,
            k.token.clone(),
            None,
            "iam-suite-admin",
        ))
        .load()
        .await
}

/// Provisions the stack on `moto` and switches enforcement on.
async fn stack(moto: &Moto) -> Stack {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique("iam");
    let creds_env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    let root = repo_root();
    let out = python(
        &[
            root.join("localdev/provision.py").to_str().expect("path"),
            "--endpoint",
            &moto.endpoint,
            "--stack-name",
            &name,
            "--no-functions",
            "--json",
        ],
        &creds_env,
    );
    // The suite is about the template's own IAM: a stack the emulator refused (and the
    // provisioner's boto3 fallback) would test nothing.
    let provisioned: Value = serde_json::from_str(&out).expect("outputs json");
    assert_eq!(
        provisioned["ProvisionedBy"], "cloudformation",
        "infra/template.yaml did not deploy on the emulator (see the provisioner's log above)"
    );
    let outputs = dir.path().join("outputs.json");
    std::fs::write(&outputs, &out).expect("write outputs");
    let creds = python(
        &[
            root.join("tests/iam/enforce.py").to_str().expect("path"),
            "setup",
            "--endpoint",
            &moto.endpoint,
            "--outputs",
            outputs.to_str().expect("path"),
        ],
        &creds_env,
    );
    std::fs::write(dir.path().join("creds.json"), &creds).expect("write creds");
    let creds: Value = serde_json::from_str(&creds).expect("creds json");
    let keys: BTreeMap<String, Key> = creds
        .as_object()
        .expect("object")
        .iter()
        .map(|(who, c)| {
            (
                who.clone(),
                Key {
                    id: c["AccessKeyId"].as_str().expect("id").to_owned(),
                    secret: c["SecretAccessKey"].as_str().expect("secret").to_owned(),
                    token: c["SessionToken"].as_str().map(str::to_owned),
                },
            )
        })
        .collect();
    let admin = admin_sdk(&moto.endpoint, &keys["admin"]).await;
    Stack {
        endpoint: moto.endpoint.clone(),
        out: serde_json::from_str(&out).expect("outputs json"),
        keys,
        dir,
        admin,
    }
}

// ------------------------------------------------------------------ running binaries

struct Ran {
    what: String,
    out: Output,
}

impl Ran {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn text(&self) -> String {
        format!("{}\n{}", self.stdout(), self.stderr())
    }
    /// Exit 0 and no denial anywhere in its output.
    fn ok(self) -> Self {
        let d = denials(&self.text());
        assert!(
            d.is_empty(),
            "{}: denied under the template's IAM:\n{}",
            self.what,
            d.join("\n")
        );
        assert!(
            self.out.status.success(),
            "{} failed ({}):\n{}",
            self.what,
            self.out.status,
            self.text()
        );
        self
    }
}

/// Runs a workspace binary as `who`, to completion (bounded).
async fn run(st: &Stack, who: Who, bin: &str, args: &[&str], extra: &[(&str, &str)]) -> Ran {
    let what = format!("{bin} {} (as {who:?})", args.join(" "));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(binary(bin))
            .args(args)
            .env_clear()
            .envs(st.env(who))
            .envs(extra.iter().copied())
            .current_dir(st.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: no exit within 120 s"))
    .expect("spawn");
    Ran { what, out }
}

fn agent_env(work: &Path) -> Vec<(String, String)> {
    let fake = fixture("fake-agent").display().to_string();
    [
        ("AGENTQ_CLAUDE_BIN", fake.as_str()),
        ("AGENTQ_CODEX_BIN", fake.as_str()),
        ("AGENTQ_WORK_ROOT", &work.display().to_string()),
        ("AGENTQ_HEARTBEAT_SECONDS", "0.5"),
        ("AGENTQ_VISIBILITY_HORIZON_SECONDS", "3"),
        ("AGENTQ_STALE_AFTER_SECONDS", "3"),
        ("AGENTQ_DEADLINE_RESERVE_SECONDS", "4"),
        ("AGENTQ_KILL_GRACE_SECONDS", "1"),
        ("AGENTQ_LOG_FLUSH_SECONDS", "1"),
        ("AGENTQ_MAX_CONCURRENT_JOBS", "8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn agent_poll(st: &Stack, work: &Path, extra: &[(&str, &str)]) -> Ran {
    let env = agent_env(work);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    run(
        st,
        Who::Agent,
        "agentq-agent",
        &[
            "poll",
            "--once",
            "--batch-size",
            "10",
            "--max-concurrency",
            "2",
            "--wait-seconds",
            "1",
            "--function-timeout-seconds",
            "12",
        ],
        &all,
    )
    .await
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

fn spec(job: &str, fields: Value) -> String {
    let mut v = json!({ "spec_version": 1, "job_id": job });
    for (k, x) in fields.as_object().expect("fields") {
        v[k] = x.clone();
    }
    v.to_string()
}

/// The message as the SQS event source mapping hands it to the function.
fn sqs_event(m: &aws_sdk_sqs::types::Message, queue_arn: &str) -> String {
    let attrs: serde_json::Map<String, Value> = m
        .attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.as_str().to_owned(), Value::String(v.clone())))
                .collect()
        })
        .unwrap_or_default();
    let mattrs: serde_json::Map<String, Value> = m
        .message_attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!({
                            "stringValue": v.string_value(),
                            "dataType": v.data_type(),
                            "stringListValues": [],
                            "binaryListValues": [],
                        }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({ "Records": [{
        "messageId": m.message_id(),
        "receiptHandle": m.receipt_handle(),
        "body": m.body(),
        "attributes": attrs,
        "messageAttributes": mattrs,
        "md5OfBody": m.md5_of_body(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": "us-east-1",
    }]})
    .to_string()
}

/// Receives (as the event source mapping would, not with the agent's credentials) until
/// the message with `body_contains` shows up, or `within` passes.
async fn receive_job(
    st: &Stack,
    queue: &str,
    body_contains: &str,
    within: Duration,
) -> Option<aws_sdk_sqs::types::Message> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        let got = st
            .sqs()
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive (admin)");
        let mut found = None;
        for m in got.messages.unwrap_or_default() {
            if found.is_none() && m.body().is_some_and(|b| b.contains(body_contains)) {
                found = Some(m);
            } else if let Some(h) = m.receipt_handle() {
                // Not ours: make it visible again at once.
                let _ = st
                    .sqs()
                    .change_message_visibility()
                    .queue_url(queue)
                    .receipt_handle(h)
                    .visibility_timeout(0)
                    .send()
                    .await;
            }
        }
        if found.is_some() {
            return found;
        }
    }
    None
}

async fn wait_state(st: &Stack, job: &str, want: JobState, within: Duration) -> JobRecord {
    let end = Instant::now() + within;
    loop {
        let rec = st.record(job).await;
        if let Some(r) = &rec
            && r.status == want
        {
            return r.clone();
        }
        assert!(
            Instant::now() < end,
            "{job}: not {want} within {within:?}: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn object_exists(st: &Stack, key: &str) -> bool {
    st.s3()
        .head_object()
        .bucket(st.o("BucketName"))
        .key(key)
        .send()
        .await
        .is_ok()
}

fn last_action(r: &JobRecord) -> String {
    r.history
        .iter()
        .rev()
        .find(|d| d.by == "dispatcher" && d.action != agentq_core::Action::Enqueued)
        .map(|d| d.action.as_str().to_owned())
        .unwrap_or_default()
}

// ------------------------------------------------------------------ the suite

#[tokio::test]
async fn every_flow_runs_under_the_templates_own_iam() {
    let started = Instant::now();
    let logs = tempfile::tempdir().expect("tempdir");
    let moto = start_moto(&logs.path().join("moto.log"));
    let st = stack(&moto).await;
    eprintln!("stack with enforcement on in {:?}", started.elapsed());
    let dir = st.dir.path().to_owned();
    let work = tempfile::tempdir().expect("work root");
    let prefix = st.o("KeyPrefix");
    let jobs_q = st.o("QueueUrl");
    let dlq = st.o("DlqUrl");
    let id = |s: &str| unique(&format!("iam-{s}"));

    // The emulator's own keys are no IAM identity: enforcement is on.
    let test_keys = agentq_testkit::sdk_config(&st.endpoint).await;
    let denied = aws_sdk_sqs::Client::new(&test_keys)
        .list_queues()
        .send()
        .await
        .expect_err("enforcement is on");
    assert!(
        !denials(&format!("{denied:?}")).is_empty(),
        "a denial the detector knows: {denied:?}"
    );

    // ---- redrive first (a receive counts for every message it returns): an offloaded
    // spec that no agent ever deletes moves to the DLQ after MaxReceiveCount receives.
    let redriven = id("redriven");
    let big = "x".repeat(4096);
    let f = write(
        &dir,
        "redriven.json",
        &spec(
            &redriven,
            json!({"agent": "claude-code", "prompt": format!("turns=1 {big}")}),
        ),
    );
    run(
        &st,
        Who::Producer,
        "agentq",
        &[
            "submit",
            f.to_str().expect("path"),
            "--offload-threshold",
            "1024",
        ],
        &[],
    )
    .await
    .ok();
    // And a raw spec an upstream system published without a record.
    let raw = id("raw");
    st.sqs()
        .send_message()
        .queue_url(&jobs_q)
        .message_body(spec(
            &raw,
            json!({"agent": "claude-code", "prompt": "turns=1"}),
        ))
        .send()
        .await
        .expect("send raw spec");
    let receive_count: u32 = 3; // localdev/provision.py's default MaxReceiveCount
    for _ in 0..receive_count {
        let got = st
            .sqs()
            .receive_message()
            .queue_url(&jobs_q)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        assert_eq!(
            got.messages().len(),
            2,
            "only the two redriven jobs are queued"
        );
    }
    let got = st
        .sqs()
        .receive_message()
        .queue_url(&jobs_q)
        .send()
        .await
        .expect("receive");
    assert!(
        got.messages().is_empty(),
        "moved to the DLQ on this receive"
    );

    // ---- agent, Lambda mode, under the agent role. First, while its job is the only
    // message: the test's receives count towards every returned message's redrive.
    let lambda_job = id("lambda");
    let f = write(
        &dir,
        "lambda.json",
        &spec(
            &lambda_job,
            json!({"agent": "claude-code", "prompt": "sleep=5 turns=2"}),
        ),
    );
    run(
        &st,
        Who::Producer,
        "agentq",
        &["submit", f.to_str().expect("path")],
        &[],
    )
    .await
    .ok();
    let queue_arn = st.o("QueueArn");
    let m = receive_job(&st, &jobs_q, &lambda_job, Duration::from_secs(10))
        .await
        .expect("the Lambda job's message");
    let first = lambda_agent(&st, work.path(), &dir.join("lambda-1.log")).await;
    let _inv = first
        .api
        .invoke(&sqs_event(&m, &queue_arn), Duration::from_secs(60));
    let rec = wait_state(&st, &lambda_job, JobState::Running, Duration::from_secs(20)).await;
    assert_eq!(rec.attempt.get(), 1);
    // Two heartbeats, then the runtime dies (no final write, no answer).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log1 = first.kill();
    let d = denials(&log1);
    assert!(d.is_empty(), "Lambda-mode agent denied:\n{}", d.join("\n"));
    let killed = Instant::now();
    // The queue's visibility timeout is 5400 s; the agent's heartbeat set it to 3 s.
    let back = receive_job(&st, &jobs_q, &lambda_job, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| {
            panic!("the killed run's message did not come back within 15 s: its visibility was not kept short\n{log1}")
        });
    let returned_after = killed.elapsed();
    assert!(
        returned_after < Duration::from_secs(12),
        "back after {returned_after:?}"
    );
    eprintln!("killed Lambda run's message back after {returned_after:?}");
    // The next invocation takes the lease over once it is stale (3 s after the last
    // heartbeat; the message may be back a moment before that) and finishes the job.
    let last = st
        .record(&lambda_job)
        .await
        .and_then(|r| r.heartbeat_at)
        .expect("heartbeat");
    let stale_at = last + 3_500;
    let wait = stale_at - agentq_core::record::now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let second = lambda_agent(&st, work.path(), &dir.join("lambda-2.log")).await;
    let inv = second
        .api
        .invoke(&sqs_event(&back, &queue_arn), Duration::from_secs(60));
    let answer = second
        .api
        .answer(&inv, Duration::from_secs(60))
        .await
        .expect("an answer");
    let log2 = second.kill();
    let d = denials(&log2);
    assert!(d.is_empty(), "Lambda-mode agent denied:\n{}", d.join("\n"));
    let Answer::Response(body) = answer else {
        panic!("error answer: {answer:?}\n{log2}")
    };
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["batchItemFailures"],
        json!([]),
        "{log2}"
    );
    // What the mapping does with a success: delete the message.
    st.sqs()
        .delete_message()
        .queue_url(&jobs_q)
        .receipt_handle(back.receipt_handle().expect("handle"))
        .send()
        .await
        .expect("delete");
    let rec = st.record(&lambda_job).await.expect("record");
    assert_eq!(rec.status, JobState::Succeeded, "{log2}");
    assert_eq!(rec.attempt.get(), 2, "taken over from the killed run");

    // ---- producer: inline, offloaded, batch, cancel, rollback.
    let with_secret = id("secret");
    let offloaded = id("offloaded");
    let f = write(
        &dir,
        "secret.json",
        &spec(
            &with_secret,
            json!({"agent": "claude-code", "prompt": "turns=1 print-secret=API_TOKEN",
                   "secrets": {"API_TOKEN": st.o("DemoSecretName")}}),
        ),
    );
    let submitted = run(
        &st,
        Who::Producer,
        "agentq",
        &["submit", f.to_str().expect("path")],
        &[],
    )
    .await
    .ok();
    assert!(
        submitted.stdout().contains(&with_secret),
        "{}",
        submitted.text()
    );
    let f = write(
        &dir,
        "offloaded.json",
        &spec(
            &offloaded,
            json!({"agent": "claude-code", "prompt": format!("turns=1 {big}")}),
        ),
    );
    run(
        &st,
        Who::Producer,
        "agentq",
        &[
            "submit",
            f.to_str().expect("path"),
            "--offload-threshold",
            "1024",
        ],
        &[],
    )
    .await
    .ok();
    assert!(object_exists(&st, &format!("{prefix}/payloads/{offloaded}.json")).await);

    let (ok, fails, session, no_session, denied_secret) = (
        id("ok"),
        id("fails"),
        id("session"),
        id("nosession"),
        id("denied"),
    );
    let batch = [
        spec(
            &ok,
            json!({"agent": "claude-code", "prompt": "turns=1 files=1"}),
        ),
        spec(&fails, json!({"agent": "claude-code", "prompt": "exit=3"})),
        spec(
            &session,
            json!({"agent": "claude-code", "prompt": "sleep=30 turns=2", "resume": "auto"}),
        ),
        spec(
            &no_session,
            json!({"agent": "command", "command": ["sleep", "30"]}),
        ),
    ]
    .join("\n");
    let f = write(&dir, "batch.jsonl", &batch);
    run(
        &st,
        Who::Producer,
        "agentq",
        &["submit", "--batch", f.to_str().expect("path")],
        &[],
    )
    .await
    .ok();

    // A secret outside the prefix: the producer refuses it, an upstream system may not.
    st.sqs()
        .send_message()
        .queue_url(&jobs_q)
        .message_body(spec(
            &denied_secret,
            json!({"agent": "claude-code", "prompt": "turns=1",
                   "secrets": {"T": "/outside/the/prefix"}}),
        ))
        .send()
        .await
        .expect("send raw spec");

    let cancelled = id("cancelled");
    let f = write(
        &dir,
        "cancel.json",
        &spec(
            &cancelled,
            json!({"agent": "claude-code", "prompt": "turns=1"}),
        ),
    );
    run(
        &st,
        Who::Producer,
        "agentq",
        &["submit", f.to_str().expect("path")],
        &[],
    )
    .await
    .ok();
    run(&st, Who::Producer, "agentq", &["cancel", &cancelled], &[])
        .await
        .ok();
    assert_eq!(
        st.record(&cancelled).await.expect("record").status,
        JobState::Cancelled
    );

    // A send the producer may not make (to the DLQ): the record and the offloaded
    // payload are removed again, with the producer's own rights (DeleteItem, DeleteObject).
    for (job, extra) in [
        (id("rollback"), vec![]),
        (id("rollback-big"), vec!["--offload-threshold", "1024"]),
    ] {
        let f = write(
            &dir,
            "rollback.json",
            &spec(
                &job,
                json!({"agent": "claude-code", "prompt": format!("turns=1 {big}")}),
            ),
        );
        let mut args = vec!["submit", f.to_str().expect("path"), "--queue-url", &dlq];
        args.extend(extra.iter().copied());
        let r = run(&st, Who::Producer, "agentq", &args, &[]).await;
        assert!(!r.out.status.success(), "the send is denied: {}", r.text());
        let d = denials(&r.text());
        assert!(
            !d.is_empty()
                && d.iter()
                    .all(|l| l.contains("SendMessage") || l.contains("send")),
            "only the send is denied: {}",
            r.text()
        );
        assert!(
            r.stderr().contains("removed again"),
            "the rollback worked: {}",
            r.stderr()
        );
        assert!(st.record(&job).await.is_none(), "{job}: record removed");
        assert!(
            !object_exists(&st, &format!("{prefix}/payloads/{job}.json")).await,
            "{job}: payload removed"
        );
    }

    // ---- agent, poll mode: a message that must wait is deferred with its own queue.
    let deferred = id("deferred");
    st.sqs()
        .send_message()
        .queue_url(&jobs_q)
        .message_body(spec(
            &deferred,
            json!({"agent": "claude-code", "prompt": "turns=1"}),
        ))
        .message_attributes(
            msg_attr::NOT_BEFORE,
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value((agentq_core::record::now_ms() + 60_000).to_string())
                .build()
                .expect("attribute"),
        )
        .send()
        .await
        .expect("send deferred");
    let polled = agent_poll(&st, work.path(), &[]).await.ok();
    let text = polled.text();
    for (job, want) in [
        (&with_secret, JobState::Succeeded),
        (&offloaded, JobState::Succeeded),
        (&ok, JobState::Succeeded),
        (&fails, JobState::Failed),
        (&session, JobState::TimedOut),
        (&no_session, JobState::TimedOut),
        (&denied_secret, JobState::Failed),
        (&cancelled, JobState::Cancelled),
    ] {
        let rec = st.record(job).await.expect("record");
        assert_eq!(rec.status, want, "{job}: {rec:?}\n{text}");
    }
    assert!(
        st.record(&deferred).await.is_none(),
        "deferred, not run: {text}"
    );
    let stdout_key = format!("{prefix}/jobs/{with_secret}/attempt-1/stdout/");
    let keys = list(&st, &stdout_key).await;
    assert!(!keys.is_empty(), "logs uploaded under the agent role");
    assert!(
        !list(&st, &format!("{prefix}/jobs/{session}/checkpoint/"))
            .await
            .is_empty(),
        "checkpoint saved"
    );

    // ---- dispatcher, under the dispatcher role: each failure kind.
    let replanned = run(
        &st,
        Who::Dispatcher,
        "agentq-dispatcher",
        &["replan", "--once"],
        &[],
    )
    .await
    .ok();
    let text = replanned.text();
    for (job, state, action) in [
        (&fails, JobState::Dead, "fail"),
        (&denied_secret, JobState::Dead, "fail"),
        (&session, JobState::Resuming, "resume"),
        (&no_session, JobState::RetryScheduled, "escalate"),
        // Never ran: the state stays QUEUED, the copy is re-sent with a backoff.
        (&redriven, JobState::Queued, "retry"),
        (&raw, JobState::Queued, "retry"),
    ] {
        let rec = st.record(job).await.expect("record");
        assert_eq!(
            (rec.status, last_action(&rec).as_str()),
            (state, action),
            "{job}: {rec:?}\n{text}"
        );
    }
    assert!(
        receive_job(
            &st,
            &st.o("LargeQueueUrl"),
            &no_session,
            Duration::from_secs(5)
        )
        .await
        .is_some(),
        "escalated to the large tier's queue"
    );

    // ---- the resumed segment restores its checkpoint under the agent role.
    agent_poll(&st, work.path(), &[]).await.ok();
    let rec = st.record(&session).await.expect("record");
    assert_eq!(rec.segment, 2, "{rec:?}");

    // ---- the producer's read commands.
    run(&st, Who::Producer, "agentq", &["status", &with_secret], &[])
        .await
        .ok();
    let logs_out = run(&st, Who::Producer, "agentq", &["logs", &with_secret], &[])
        .await
        .ok();
    assert!(
        logs_out.stdout().contains("secret is") && !logs_out.stdout().contains("demo-secret-value"),
        "{}",
        logs_out.text()
    );
    let listed = run(
        &st,
        Who::Producer,
        "agentq",
        &["list", "--status", "SUCCEEDED"],
        &[],
    )
    .await
    .ok();
    assert!(listed.stdout().contains(&ok), "{}", listed.text());

    // ---- the suite bites: without ReportFailures the agent's failure records are denied.
    python(
        &[
            repo_root()
                .join("tests/iam/enforce.py")
                .to_str()
                .expect("path"),
            "drop-statement",
            "--endpoint",
            &st.endpoint,
            "--outputs",
            dir.join("outputs.json").to_str().expect("path"),
            "--creds",
            dir.join("creds.json").to_str().expect("path"),
            "--principal",
            "agent",
            "--sid",
            "ReportFailures",
        ],
        &[],
    );
    let unreported = id("unreported");
    let f = write(
        &dir,
        "unreported.json",
        &spec(
            &unreported,
            json!({"agent": "claude-code", "prompt": "exit=3"}),
        ),
    );
    run(
        &st,
        Who::Producer,
        "agentq",
        &["submit", f.to_str().expect("path")],
        &[],
    )
    .await
    .ok();
    let without = agent_poll(&st, work.path(), &[]).await;
    let d = denials(&without.text());
    assert!(
        d.iter()
            .any(|l| l.contains("DLQ") || l.contains("SendMessage")),
        "removing ReportFailures must show as a denial the suite catches:\n{}",
        without.text()
    );
    eprintln!("IAM suite done in {:?}", started.elapsed());
}

/// Keys under `prefix`.
async fn list(st: &Stack, prefix: &str) -> Vec<String> {
    st.s3()
        .list_objects_v2()
        .bucket(st.o("BucketName"))
        .prefix(prefix)
        .send()
        .await
        .expect("list (admin)")
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

/// An `agentq-agent` in Lambda mode (no command, `AWS_LAMBDA_RUNTIME_API` set) under the
/// agent role, logging to a file.
struct LambdaAgent {
    api: RuntimeApi,
    child: Child,
    log: PathBuf,
}

impl LambdaAgent {
    /// Stops it (SIGKILL: a runtime that dies) and returns its log.
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn lambda_agent(st: &Stack, work: &Path, log: &Path) -> LambdaAgent {
    // A Runtime API of its own per agent process.
    let api = RuntimeApi::start().await;
    let file = std::fs::File::create(log).expect("log");
    let child = Command::new(binary("agentq-agent"))
        .env_clear()
        .envs(st.env(Who::Agent))
        .envs(agent_env(work))
        .envs(lambda_env(&api))
        .current_dir(st.dir.path())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("agentq-agent");
    LambdaAgent {
        api,
        child,
        log: log.to_owned(),
    }
}

// ------------------------------------------------------------------ the template, statically

/// The template as JSON (intrinsic functions as `{"!Sub": …}`), via PyYAML.
fn template_json() -> Value {
    let script = r#"
import json, sys, yaml
class L(yaml.SafeLoader): pass
def tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode): v = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode): v = loader.construct_sequence(node, deep=True)
    else: v = loader.construct_mapping(node, deep=True)
    return {"!" + suffix: v}
L.add_multi_constructor("!", tag)
print(json.dumps(yaml.load(open(sys.argv[1]), Loader=L)))
"#;
    let out = python(
        &[
            "-c",
            script,
            repo_root()
                .join("infra/template.yaml")
                .to_str()
                .expect("path"),
        ],
        &[],
    );
    serde_json::from_str(&out).expect("template json")
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().flat_map(strings).collect(),
        other => vec![other.to_string()],
    }
}

/// `(actions, resources, condition)` of every Allow statement in a policy document,
/// resources rendered as the template writes them.
fn statements(doc: &Value) -> Vec<(BTreeSet<String>, BTreeSet<String>, Value)> {
    doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .map(|s| {
            let res = match &s["Resource"] {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            (
                strings(&s["Action"]).into_iter().collect(),
                res.iter().map(Value::to_string).collect(),
                s.get("Condition").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// The statements of `doc` for one service (`dynamodb:` …): action → resources.
fn grants(doc: &Value, service: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (actions, resources, _) in statements(doc) {
        for a in actions.iter().filter(|a| a.starts_with(service)) {
            m.entry(a.clone()).or_default().extend(resources.clone());
        }
    }
    m
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// moto cannot judge DynamoDB, SSM and KMS resources (only `"*"` passes), so the
/// enforced suite opens them to the template's own actions on any resource. Here the
/// resources (and the exact actions) of those statements are checked against what each
/// flow calls.
#[test]
fn template_policies_grant_exactly_what_each_flow_needs() {
    let t = template_json();
    let r = &t["Resources"];
    let role_doc = |role: &str| r[role]["Properties"]["Policies"][0]["PolicyDocument"].clone();
    let agent = role_doc("AgentRole");
    let dispatcher = role_doc("DispatcherRole");
    let producer = r["ProducerPolicy"]["Properties"]["PolicyDocument"].clone();

    let table = set(&[
        r#"{"!GetAtt":"JobsTable.Arn"}"#,
        r#"{"!Sub":"${JobsTable.Arn}/index/*"}"#,
    ]);
    let expect = |doc: &Value, service: &str, actions: &[&str], resources: &BTreeSet<String>| {
        let g = grants(doc, service);
        assert_eq!(
            g.keys().cloned().collect::<BTreeSet<_>>(),
            set(actions),
            "{service} actions"
        );
        for (a, res) in g {
            assert_eq!(&res, resources, "{a}: resources");
        }
    };
    // The agent: claim (PutItem for a raw spec's first record, UpdateItem), heartbeat and
    // finish (UpdateItem), reads (GetItem), the status index (Query).
    expect(
        &agent,
        "dynamodb:",
        &[
            "dynamodb:GetItem",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:Query",
        ],
        &table,
    );
    // Re-plans are conditional updates; a redriven raw spec's record is created too.
    expect(
        &dispatcher,
        "dynamodb:",
        &[
            "dynamodb:GetItem",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:Query",
        ],
        &table,
    );
    // Submit (PutItem), rollback (DeleteItem), status (GetItem), cancel (UpdateItem),
    // list (Query on the index).
    expect(
        &producer,
        "dynamodb:",
        &[
            "dynamodb:PutItem",
            "dynamodb:DeleteItem",
            "dynamodb:GetItem",
            "dynamodb:UpdateItem",
            "dynamodb:Query",
        ],
        &table,
    );

    // Secrets: one GetParameters call, only under the prefix; decryption only via SSM.
    expect(
        &agent,
        "ssm:",
        &["ssm:GetParameters"],
        &set(&[
            r#"{"!Sub":"arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${SecretsPrefix}*"}"#,
        ]),
    );
    let kms: Vec<_> = statements(&agent)
        .into_iter()
        .filter(|(a, _, _)| a.iter().any(|x| x.starts_with("kms:")))
        .collect();
    assert_eq!(kms.len(), 1, "{kms:?}");
    assert_eq!(kms[0].0, set(&["kms:Decrypt"]));
    assert_eq!(
        kms[0].2["StringEquals"]["kms:ViaService"],
        json!({"!Sub": "ssm.${AWS::Region}.amazonaws.com"}),
        "decryption only through SSM"
    );
    for (who, doc) in [("dispatcher", &dispatcher), ("producer", &producer)] {
        assert!(grants(doc, "ssm:").is_empty(), "{who} reads no secrets");
        assert!(grants(doc, "kms:").is_empty(), "{who} decrypts nothing");
    }
    // Jobs with aws_credentials: the agent may assume the job role (nothing else in STS)
    // and use the checkpoint key; the job role reaches job data prefixes only, and the
    // agent narrows it to one job with a session policy (agent/src/credentials.rs).
    let access = r["AgentJobAccess"]["Properties"].clone();
    assert_eq!(access["Roles"], json!([{"!Ref": "AgentRole"}]));
    let access = access["PolicyDocument"].clone();
    expect(
        &access,
        "sts:",
        &["sts:AssumeRole"],
        &set(&[r#"{"!GetAtt":"JobRole.Arn"}"#]),
    );
    expect(
        &access,
        "kms:",
        &["kms:GenerateDataKey", "kms:Decrypt"],
        &set(&[r#"{"!GetAtt":"CheckpointKey.Arn"}"#]),
    );
    let job = role_doc("JobRole");
    let data = set(&[r#"{"!Sub":"${DataBucket.Arn}/${KeyPrefix}/jobs/*/data/*"}"#]);
    let g = grants(&job, "s3:");
    for a in [
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    ] {
        assert_eq!(g.get(a), Some(&data), "job role {a}");
    }
    assert_eq!(
        g.get("s3:ListBucket"),
        Some(&set(&[r#"{"!GetAtt":"DataBucket.Arn"}"#]))
    );
    assert_eq!(g.len(), 5, "the job role has nothing else in S3: {g:?}");
    for svc in ["dynamodb:", "sqs:", "ssm:", "kms:", "sts:", "iam:"] {
        assert!(grants(&job, svc).is_empty(), "job role: no {svc}");
    }
    assert_eq!(
        r["JobRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"],
        json!({"AWS": {"!GetAtt": "AgentRole.Arn"}}),
        "only the agent assumes the job role"
    );
    // Checkpoints (agent transcripts) are readable by the agent role alone.
    let deny = r["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_array()
        .expect("bucket statements")
        .iter()
        .find(|s| s["Sid"] == "CheckpointsForTheAgentOnly")
        .expect("checkpoint deny statement")
        .clone();
    assert_eq!(deny["Effect"], "Deny");
    assert_eq!(
        deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"],
        json!({"!GetAtt": "AgentRole.Arn"})
    );

    // The agent never looks a queue URL up: they are configuration.
    for (who, doc) in [
        ("agent", &agent),
        ("dispatcher", &dispatcher),
        ("producer", &producer),
    ] {
        assert!(
            !grants(doc, "sqs:").contains_key("sqs:GetQueueUrl"),
            "{who}: sqs:GetQueueUrl is not needed"
        );
        for (actions, resources, _) in statements(doc) {
            assert!(
                !actions.iter().any(|a| a.ends_with(":*") || a == "*"),
                "{who}: no wildcard actions: {actions:?}"
            );
            assert!(
                !resources.contains("\"*\""),
                "{who}: no \"*\" resource: {actions:?}"
            );
        }
    }
}
