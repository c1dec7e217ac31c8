//! Observability end to end across the three binaries, with every output on: a job is
//! submitted (`agentq`), times out in its first segment (`agentq-agent poll`), is re-planned
//! (`agentq-dispatcher replan`) and resumed to success. Checked:
//! - metrics: the agent's stdout is nothing but EMF lines, parsed back (starts, ends by
//!   state and cause, duration, queue wait, cost, tokens, turns, log bytes, finalize time,
//!   deadline margin); the dispatcher's `Replans` line (on stderr in `replan --once`);
//! - traces: one trace id over the producer's, agent's and dispatcher's spans as received
//!   by a local OTLP/HTTP collector stand-in, each hop the child of the previous one; the
//!   child (Claude Code stand-in) gets the telemetry variables and the trace context;
//! - notifications: every state change as a Standard Webhooks request whose signature an
//!   independent verifier accepts, retried after a refusal; and as an EventBridge event
//!   (moto's PutEvents, routed by a rule to an SQS queue).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::Duration;

use agentq_core::{Attempt, JobId, JobState, JobStore, Layout, Stream};
use agentq_testkit::http_sink::{HttpSink, Recorded, verify_standard_webhooks};
use agentq_testkit::{Resources, binary, create_queue, fixture, queue_arn, resources, unique};
use serde_json::Value;

/// `whsec_` + base64 of 32 bytes.
const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const COLLECTOR_TOKEN: &str = "collector-t0ken-42";

struct Obs {
    sink: HttpSink,
    bus: String,
}

impl Obs {
    fn env(&self) -> Vec<(String, String)> {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.sink.url("")),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                format!("x-collector-token={COLLECTOR_TOKEN}"),
            ),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test".into(),
            ),
            ("AGENTQ_WEBHOOK_URL", self.sink.url("/hooks/agentq")),
            ("AGENTQ_WEBHOOK_SECRET", SECRET.into()),
            ("AGENTQ_EVENT_BUS", self.bus.clone()),
            ("AGENTQ_TIER", "obs".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

async fn run(r: &Resources, obs: &Obs, bin: &str, args: &[&str], work: &std::path::Path) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(binary(bin))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(r.env())
            .envs(obs.env())
            .env("AGENTQ_CLAUDE_BIN", fixture("fake-agent"))
            .env("AGENTQ_WORK_ROOT", work)
            .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
            .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
            .env("AGENTQ_KILL_GRACE_SECONDS", "1")
            .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
            .env("RUST_LOG", "info")
            .current_dir(work)
            .output(),
    )
    .await
    .expect("finished in time")
    .expect("spawn");
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The EMF documents among `text`'s lines.
fn emf(text: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect()
}

/// Every metric a document declares, with its unit; checks the EMF rules CloudWatch
/// applies (declared metrics and dimensions are root members, dimension values strings).
fn declared(doc: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    assert!(doc["_aws"]["Timestamp"].is_i64(), "{doc}");
    for d in doc["_aws"]["CloudWatchMetrics"]
        .as_array()
        .expect("directives")
    {
        assert_eq!(d["Namespace"], "agentq", "{doc}");
        for set in d["Dimensions"].as_array().unwrap() {
            for k in set.as_array().unwrap() {
                let k = k.as_str().unwrap();
                assert!(
                    ["Service", "Tier", "State", "Cause", "Action"].contains(&k),
                    "a fixed dimension set, got {k}"
                );
                assert!(doc[k].is_string(), "dimension {k} in {doc}");
            }
        }
        for m in d["Metrics"].as_array().unwrap() {
            let n = m["Name"].as_str().unwrap();
            assert!(doc[n].is_number(), "metric {n} in {doc}");
            out.insert(n.to_owned(), m["Unit"].as_str().unwrap().to_owned());
        }
    }
    out
}

fn by_event<'a>(docs: &'a [Value], event: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["event"] == event).collect()
}

/// One received span.
#[derive(Debug, Clone)]
struct SpanRec {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: BTreeMap<String, Value>,
}

fn any_value(v: &Value) -> Value {
    for k in ["stringValue", "boolValue", "doubleValue"] {
        if let Some(x) = v.get(k) {
            return x.clone();
        }
    }
    if let Some(i) = v.get("intValue") {
        // OTLP/JSON writes 64-bit integers as strings.
        return i
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .map(Value::from)
            .unwrap_or_else(|| i.clone());
    }
    v.clone()
}

fn kv(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["key"].as_str().unwrap().to_owned(),
                        any_value(&e["value"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every span of every `/v1/traces` request, and the resources they came with.
fn spans(reqs: &[Recorded]) -> (Vec<SpanRec>, Vec<BTreeMap<String, Value>>) {
    let mut spans = Vec::new();
    let mut resources = Vec::new();
    for r in reqs
        .iter()
        .filter(|r| r.path == "/v1/traces" && r.status == 200)
    {
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.header("x-collector-token"),
            Some(COLLECTOR_TOKEN),
            "OTEL_EXPORTER_OTLP_HEADERS are sent"
        );
        let body = r.json();
        for rs in body["resourceSpans"].as_array().expect("resourceSpans") {
            let res = kv(&rs["resource"]["attributes"]);
            let service = res["service.name"].as_str().unwrap().to_owned();
            resources.push(res);
            for ss in rs["scopeSpans"].as_array().unwrap() {
                for s in ss["spans"].as_array().unwrap() {
                    let start: u64 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
                    let end: u64 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
                    assert!(start > 0 && end >= start, "{s}");
                    spans.push(SpanRec {
                        service: service.clone(),
                        name: s["name"].as_str().unwrap().to_owned(),
                        trace_id: s["traceId"].as_str().unwrap().to_owned(),
                        span_id: s["spanId"].as_str().unwrap().to_owned(),
                        parent: s["parentSpanId"].as_str().unwrap_or_default().to_owned(),
                        attrs: kv(&s["attributes"]),
                    });
                }
            }
        }
    }
    (spans, resources)
}

async fn event_bus_to_queue(r: &Resources) -> (String, String) {
    let eb = aws_sdk_eventbridge::Client::new(&r.sdk);
    let bus = unique("aq-bus");
    eb.create_event_bus().name(&bus).send().await.expect("bus");
    let sqs = aws_sdk_sqs::Client::new(&r.sdk);
    let q = create_queue(&sqs, &unique("aq-events"), &[]).await;
    let arn = queue_arn(&sqs, &q).await;
    let rule = unique("aq-rule");
    eb.put_rule()
        .name(&rule)
        .event_bus_name(&bus)
        .event_pattern(r#"{"source":["agentq"],"detail-type":["Job State Change"]}"#)
        .send()
        .await
        .expect("rule");
    eb.put_targets()
        .rule(&rule)
        .event_bus_name(&bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("queue")
                .arn(arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("target");
    (bus, q)
}

#[tokio::test]
async fn a_resumed_job_is_one_trace_with_metrics_and_signed_notifications() {
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    // The jobs run under their own uids when the tests run as root: let them through.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let (bus, events_queue) = event_bus_to_queue(&r).await;
    let obs = Obs {
        sink: HttpSink::start(),
        bus,
    };
    // The first request (a webhook or an export) is refused: it is retried.
    obs.sink.fail_next(&[503]);

    let job = JobId::parse(&unique("obs")).unwrap();
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "claude-code",
        "prompt": "sleep=8 turns=2 env-dump", "resume": "auto",
        "labels": {"team": "observers"},
    });
    std::fs::write(work.path().join("spec.json"), spec.to_string()).unwrap();

    // 1. Submit: the trace starts; QUEUED is notified before the CLI exits.
    let out = run(&r, &obs, "agentq", &["submit", "spec.json"], work.path()).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), job.as_str());
    assert!(emf(&out.stdout).is_empty(), "the CLI writes no metrics");

    // 2. Segment 1 times out (10 s invocation, 4 s reserve, an 8 s job).
    let seg1 = run(
        &r,
        &obs,
        "agentq-agent",
        &[
            "poll",
            "--once",
            "--wait-seconds",
            "1",
            "--function-timeout-seconds",
            "10",
        ],
        work.path(),
    )
    .await;
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    assert_eq!(
        store.require(&job).await.unwrap().status,
        JobState::TimedOut
    );

    // 3. The dispatcher plans the resume (its metrics on stderr: stdout has its stats).
    let disp = run(
        &r,
        &obs,
        "agentq-dispatcher",
        &["replan", "--once"],
        work.path(),
    )
    .await;
    assert_eq!(
        store.require(&job).await.unwrap().status,
        JobState::Resuming
    );

    // 4. Segment 2 resumes and succeeds.
    let seg2 = run(
        &r,
        &obs,
        "agentq-agent",
        &[
            "poll",
            "--once",
            "--wait-seconds",
            "1",
            "--function-timeout-seconds",
            "60",
        ],
        work.path(),
    )
    .await;
    let rec = store.require(&job).await.unwrap();
    assert_eq!(rec.status, JobState::Succeeded, "{rec:?}");

    // ---- Metrics: the agent's stdout is EMF lines, then `poll`'s final statistics line.
    for (name, out) in [("segment 1", &seg1), ("segment 2", &seg2)] {
        let text = String::from_utf8_lossy(&out.stdout);
        let others: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .is_none_or(|v| v.get("_aws").is_none())
            })
            .collect();
        assert_eq!(
            others.len(),
            1,
            "{name}: EMF lines and the statistics: {text}"
        );
        assert!(
            others[0].starts_with("received 1 deleted 1"),
            "{name}: {text}"
        );
        assert!(
            text.trim_end().ends_with(others[0]),
            "{name}: statistics last: {text}"
        );
    }
    let docs1 = emf(&seg1.stdout);
    let started = by_event(&docs1, "job_started");
    assert_eq!(started.len(), 1, "{docs1:?}");
    let s = started[0];
    let units = declared(s);
    assert_eq!(units["JobsStarted"], "Count");
    assert_eq!(units["QueueWait"], "Milliseconds");
    assert!(s["QueueWait"].as_f64().unwrap() >= 0.0);
    assert_eq!(s["Service"], "agent");
    assert_eq!(s["Tier"], "obs");
    assert_eq!(s["job_id"], job.as_str());
    let f1 = by_event(&docs1, "job_finished");
    assert_eq!(f1.len(), 1, "{docs1:?}");
    let f1 = f1[0];
    declared(f1);
    assert_eq!(
        (f1["State"].as_str(), f1["Cause"].as_str()),
        (Some("TIMED_OUT"), Some("timed_out"))
    );
    assert_eq!(f1["JobsFinished"], 1.0);
    let d1 = f1["Duration"].as_f64().unwrap();
    assert!((4000.0..10_000.0).contains(&d1), "stopped at ~6 s: {d1}");
    assert!(f1["DeadlineMargin"].as_f64().unwrap() > 0.0, "{f1}");

    let docs2 = emf(&seg2.stdout);
    let f2 = by_event(&docs2, "job_finished");
    assert_eq!(f2.len(), 1, "{docs2:?}");
    let f2 = f2[0];
    let units = declared(f2);
    for (m, u) in [
        ("JobsFinished", "Count"),
        ("Duration", "Milliseconds"),
        ("CostUSD", "None"),
        ("InputTokens", "Count"),
        ("OutputTokens", "Count"),
        ("Turns", "Count"),
        ("LogBytes", "Bytes"),
        ("FinalizeTime", "Milliseconds"),
        ("DeadlineMargin", "Milliseconds"),
    ] {
        assert_eq!(units.get(m).map(String::as_str), Some(u), "{m} in {f2}");
    }
    assert_eq!(
        (f2["State"].as_str(), f2["Cause"].as_str()),
        (Some("SUCCEEDED"), Some("none"))
    );
    assert_eq!(f2["Turns"].as_f64().unwrap(), f64::from(rec.progress.turns));
    assert_eq!(f2["CostUSD"].as_f64().unwrap(), rec.progress.cost_usd);
    assert_eq!(
        f2["InputTokens"].as_f64().unwrap(),
        rec.progress.input_tokens as f64
    );
    assert_eq!(
        f2["LogBytes"].as_f64().unwrap(),
        (rec.progress.stdout_bytes + rec.progress.stderr_bytes) as f64
    );
    assert!(f2["LogBytes"].as_f64().unwrap() > 0.0);
    assert_eq!(f2["segment"], 2);
    // The manifest's own numbers are what the metrics say.
    let layout = Layout::new(&r.prefix);
    let manifest: Value =
        serde_json::from_str(&r.object(&layout.result(&job, Attempt(2))).await).unwrap();
    assert!(
        (f2["DeadlineMargin"].as_f64().unwrap() - manifest["deadline_margin_ms"].as_f64().unwrap())
            .abs()
            < 1000.0,
        "{f2} vs {manifest}"
    );

    let ddocs = emf(&disp.stderr);
    assert!(
        emf(&disp.stdout).is_empty(),
        "replan --once keeps stdout for its stats"
    );
    let replans = by_event(&ddocs, "replanned");
    assert_eq!(replans.len(), 1, "{ddocs:?}");
    declared(replans[0]);
    assert_eq!(replans[0]["Service"], "dispatcher");
    assert_eq!(replans[0]["Action"], "resume");
    assert_eq!(replans[0]["Replans"], 1.0);

    // ---- Traces: one trace across the three binaries, each hop under the previous one.
    let want_names = [
        "agentq.submit",
        "agentq.job",
        "agentq.claim",
        "agentq.prepare",
        "agentq.child",
        "agentq.finalize",
        "agentq.replan",
    ];
    let reqs = obs.sink.wait_for(Duration::from_secs(20), |reqs| {
        let (s, _) = spans(reqs);
        let names: BTreeSet<&str> = s.iter().map(|s| s.name.as_str()).collect();
        want_names.iter().all(|n| names.contains(n))
            && s.iter().filter(|s| s.name == "agentq.job").count() == 2
    });
    let (spans, resources) = spans(&reqs);
    let trace = &spans[0].trace_id;
    assert_eq!(trace.len(), 32);
    for s in &spans {
        assert_eq!(&s.trace_id, trace, "one trace per job: {s:?}");
    }
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["agentq", "agentq-agent", "agentq-dispatcher"])
    );
    for res in &resources {
        assert_eq!(res["deployment.environment"], "test", "{res:?}");
    }
    let one = |name: &str| -> Vec<&SpanRec> { spans.iter().filter(|s| s.name == name).collect() };
    let submit = one("agentq.submit");
    assert_eq!(submit.len(), 1);
    assert_eq!(submit[0].parent, "", "the producer starts the trace");
    assert_eq!(submit[0].attrs["agentq.job_id"], job.as_str());
    let jobs = one("agentq.job");
    let job1 = jobs
        .iter()
        .find(|s| s.attrs.get("agentq.segment") == Some(&Value::from(1)))
        .expect("segment 1's job span");
    let job2 = jobs
        .iter()
        .find(|s| s.attrs.get("agentq.segment") == Some(&Value::from(2)))
        .expect("segment 2's job span");
    assert_eq!(
        job1.parent, submit[0].span_id,
        "the agent continues the producer's span"
    );
    assert_eq!(job1.attrs["agentq.state"], "TIMED_OUT");
    let replan = one("agentq.replan");
    assert_eq!(replan.len(), 1);
    assert_eq!(
        replan[0].parent, job1.span_id,
        "the dispatcher continues segment 1"
    );
    assert_eq!(replan[0].attrs["agentq.action"], "resume");
    assert_eq!(
        job2.parent, replan[0].span_id,
        "segment 2 continues the re-plan"
    );
    assert_eq!(job2.attrs["agentq.state"], "SUCCEEDED");
    for step in [
        "agentq.claim",
        "agentq.prepare",
        "agentq.child",
        "agentq.finalize",
    ] {
        let steps = one(step);
        assert_eq!(steps.len(), 2, "{step} in both segments");
        for s in steps {
            assert!(
                s.parent == job1.span_id || s.parent == job2.span_id,
                "{step} is a step of a job span: {s:?}"
            );
        }
    }

    // The child got Claude Code's telemetry variables, its parent the child span, and no
    // exporter headers (AGENTQ_CHILD_TELEMETRY=on).
    let child1 = one("agentq.child")
        .into_iter()
        .find(|s| s.parent == job1.span_id)
        .unwrap();
    // (Segment 1 ran the prompt with its env-dump directive; a resume sends another.)
    let stdout = r
        .object(&layout.segment(&job, Attempt(1), Stream::Stdout, 0))
        .await;
    assert!(
        stdout.contains("ENV CLAUDE_CODE_ENABLE_TELEMETRY=1"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("ENV TRACEPARENT=00-{trace}-{}-01", child1.span_id)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "ENV OTEL_EXPORTER_OTLP_TRACES_ENDPOINT={}",
            obs.sink.url("/v1/traces")
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{stdout}");
    assert!(!stdout.contains(COLLECTOR_TOKEN), "{stdout}");

    // ---- Webhooks: every state change, signed, in order, the refused one retried.
    let hooks: Vec<Recorded> = obs
        .sink
        .requests()
        .into_iter()
        .filter(|r| r.path == "/hooks/agentq")
        .collect();
    assert!(
        verify_standard_webhooks(SECRET, &hooks)
            .iter()
            .all(|ok| *ok),
        "every signature verifies"
    );
    assert!(
        !verify_standard_webhooks("whsec_b3RoZXItc2VjcmV0LW9mLTE2LWJ5dGVz", &hooks[..1])[0],
        "the check is real"
    );
    let mut delivered: Vec<&Recorded> = hooks.iter().filter(|r| r.status == 200).collect();
    let mut ids = BTreeSet::new();
    delivered.retain(|r| ids.insert(r.header("webhook-id").unwrap().to_owned()));
    let types: Vec<String> = delivered
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "job.queued",
            "job.running",
            "job.timed_out",
            "job.resuming",
            "job.running",
            "job.succeeded"
        ],
        "{hooks:?}"
    );
    let refused = obs
        .sink
        .requests()
        .into_iter()
        .find(|r| r.status == 503)
        .unwrap();
    if refused.path == "/hooks/agentq" {
        let id = refused.header("webhook-id").unwrap();
        assert!(
            delivered.iter().any(|d| d.header("webhook-id") == Some(id)),
            "the refused webhook was retried with its id"
        );
    }
    for d in &delivered {
        let ts: i64 = d.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!((agentq_core::record::now_ms() / 1000 - ts).abs() < 300);
        let data = &d.json()["data"];
        assert_eq!(data["job_id"], job.as_str());
        assert_eq!(data["trace_id"].as_str(), Some(trace.as_str()), "{data}");
        assert_eq!(data["labels"]["team"], "observers");
    }
    let last = delivered.last().unwrap().json();
    assert_eq!(last["data"]["by"], "agent");
    assert_eq!(last["data"]["segment"], 2);
    assert_eq!(last["data"]["progress"]["turns"], rec.progress.turns);
    let resuming = delivered[3].json();
    assert_eq!(resuming["data"]["by"], "dispatcher");
    assert_eq!(resuming["data"]["action"], "resume");
    assert_eq!(resuming["data"]["previous_state"], "TIMED_OUT");

    // ---- EventBridge: the same changes as events on the bus.
    let events: Vec<Value> = r
        .drain(&events_queue)
        .await
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    let mut seen: Vec<(i64, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["source"], "agentq");
            assert_eq!(e["detail-type"], "Job State Change");
            assert_eq!(e["detail"]["job_id"], job.as_str());
            (
                e["detail"]["at"].as_i64().unwrap(),
                e["detail"]["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let seen: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(seen, types, "{events:?}");
}

fn agent(r: &Resources, work: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(binary("agentq-agent"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_CLAUDE_BIN", fixture("fake-agent"))
        .env("AGENTQ_WORK_ROOT", work)
        .env("AGENTQ_HEARTBEAT_SECONDS", "0.5")
        .env("AGENTQ_DEADLINE_RESERVE_SECONDS", "4")
        .env("AGENTQ_KILL_GRACE_SECONDS", "1")
        .env("AGENTQ_LOG_FLUSH_SECONDS", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn work_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    d
}

/// The Lambda front end writes its EMF lines on stdout (CloudWatch Logs reads them) and
/// delivers the invocation's notifications before it answers (the environment freezes
/// after the response).
#[tokio::test]
async fn lambda_writes_emf_on_stdout_and_notifies_before_it_answers() {
    use agentq_testkit::runtime_api::{Answer, RuntimeApi, lambda_env};
    let r = resources().await;
    let work = work_root();
    let sink = HttpSink::start();
    let api = RuntimeApi::start().await;
    let mut child = agent(&r, work.path(), &[])
        .envs(lambda_env(&api))
        .env("AGENTQ_WEBHOOK_URL", sink.url("/hook"))
        .env("AGENTQ_WEBHOOK_SECRET", SECRET)
        .spawn()
        .unwrap();
    let event = std::fs::read_to_string(fixture("sqs-event.json")).unwrap();
    let id = api.invoke(&event, Duration::from_secs(60));
    let answer = api.answer(&id, Duration::from_secs(60)).await;
    // What had arrived when the invocation answered.
    let hooks = sink.requests();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        matches!(answer, Some(Answer::Response(_))),
        "{answer:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let text = String::from_utf8_lossy(&out.stdout);
    let docs = emf(&out.stdout);
    assert_eq!(
        docs.len(),
        text.lines().filter(|l| !l.trim().is_empty()).count(),
        "stdout is EMF only: {text}"
    );
    let started = by_event(&docs, "job_started");
    assert_eq!(started.len(), 2, "{docs:?}");
    for s in &started {
        declared(s);
        assert!(
            s["QueueWait"].as_f64().unwrap() > 0.0,
            "SentTimestamp → claim"
        );
    }
    let mut ends: Vec<(String, String, String)> = by_event(&docs, "job_finished")
        .iter()
        .map(|d| {
            declared(d);
            (
                d["job_id"].as_str().unwrap().to_owned(),
                d["State"].as_str().unwrap().to_owned(),
                d["Cause"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ends.sort();
    assert_eq!(
        ends,
        [
            ("fixture-fail".into(), "FAILED".into(), "agent_exit".into()),
            ("fixture-ok".into(), "SUCCEEDED".into(), "none".into()),
        ]
    );

    assert!(
        verify_standard_webhooks(SECRET, &hooks)
            .iter()
            .all(|ok| *ok)
    );
    let mut got: Vec<(String, String)> = hooks
        .iter()
        .map(|h| {
            let v = h.json();
            (
                v["data"]["job_id"].as_str().unwrap().to_owned(),
                v["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("fixture-fail".into(), "job.failed".into()),
            ("fixture-fail".into(), "job.running".into()),
            ("fixture-ok".into(), "job.running".into()),
            ("fixture-ok".into(), "job.succeeded".into()),
        ],
        "delivered before the answer"
    );
}

/// `run` prints its result on stdout: its metrics go to stderr by default, or to stdout
/// before the result with AGENTQ_METRICS=stdout (the result is the one line without
/// `_aws`); AGENTQ_METRICS=off writes none. A receiver that is down never holds
/// the job up: the notification is dropped, counted and logged.
#[tokio::test]
async fn run_keeps_its_response_parseable_and_a_dead_webhook_does_not_block() {
    let r = resources().await;
    let work = work_root();
    let spec = |id: &str| {
        let p = work.path().join(format!("{id}.json"));
        std::fs::write(
            &p,
            serde_json::json!({"spec_version": 1, "job_id": id, "agent": "claude-code", "prompt": "turns=1"})
                .to_string(),
        )
        .unwrap();
        p.to_str().unwrap().to_owned()
    };

    // Default: response alone on stdout, metrics on stderr.
    let id = unique("run-a");
    let out = agent(
        &r,
        work.path(),
        &["run", "--output", "json", "--job", &spec(&id)],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp: Value = serde_json::from_slice(&out.stdout).expect("stdout is the result");
    assert_eq!(resp["status"], "SUCCEEDED");
    let docs = emf(&out.stderr);
    assert_eq!(by_event(&docs, "job_finished").len(), 1, "{docs:?}");
    assert_eq!(by_event(&docs, "job_finished")[0]["State"], "SUCCEEDED");

    // AGENTQ_METRICS=stdout: EMF lines, then the response.
    let id = unique("run-b");
    let out = agent(
        &r,
        work.path(),
        &["run", "--output", "json", "--job", &spec(&id)],
    )
    .env("AGENTQ_METRICS", "stdout")
    .output()
    .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(emf(&out.stdout).len(), lines.len() - 1, "{text}");
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(
        last.get("_aws").is_none() && last["status"] == "SUCCEEDED",
        "{last}"
    );

    // AGENTQ_METRICS=off, and a webhook receiver that refuses connections.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let id = unique("run-c");
    let t = std::time::Instant::now();
    let out = agent(&r, work.path(), &["run", "--job", &spec(&id)])
        .env("AGENTQ_METRICS", "off")
        .env("AGENTQ_WEBHOOK_URL", &dead)
        .env("AGENTQ_WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    assert_eq!(
        store
            .require(&JobId::parse(&id).unwrap())
            .await
            .unwrap()
            .status,
        JobState::Succeeded
    );
    assert!(emf(&out.stdout).is_empty() && emf(&out.stderr).is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("webhook notification dropped"), "{stderr}");
    assert!(took < Duration::from_secs(60), "{took:?}");

    // Bad settings name the setting.
    let out = agent(&r, work.path(), &["run", "--job", &spec(&unique("run-d"))])
        .env("AGENTQ_WEBHOOK_URL", "http://127.0.0.1:9/hook")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AGENTQ_WEBHOOK_SECRET"), "{stderr}");
}
