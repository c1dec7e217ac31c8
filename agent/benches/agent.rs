//! Agent benchmarks (a bench binary, not timed tests), against the local emulator:
//!
//! 1. exec → first Runtime API `/next` (cold start of the `lambda` front end);
//! 2. per-job overhead around a child that exits at once — submitted (the producer's
//!    `QUEUED` record first) and published raw — with the AWS calls it makes (counted by
//!    an SDK interceptor on every client, per operation) and the same round trips made
//!    raw against the emulator next to it;
//! 3. log throughput and peak RSS for 100 MB of child output;
//! 4. the agent binary's size.
//!
//! Run: `cargo bench -p agentq-agent --bench agent` (starts the emulator if needed).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq_agent::{AgentArgs, AgentConfig, Deps, Invocation, handle_batch};
use agentq_core::AwsClients;
use agentq_core::record::now_ms;
use agentq_testkit::runtime_api::{RuntimeApi, lambda_env};
use agentq_testkit::{Resources, fixture, resources};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    a: AgentArgs,
}

const AGENT: &str = env!("CARGO_BIN_EXE_agentq-agent");

/// Counts HTTP requests (every attempt, retries included) per `Service.Operation`.
#[derive(Debug, Clone, Default)]
struct CallCounter(Arc<Mutex<BTreeMap<String, u64>>>);

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "CallCounter"
    }
    fn read_before_transmit(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = cfg
            .load::<Metadata>()
            .map(|m| format!("{}.{}", m.service(), m.name()))
            .unwrap_or_else(|| "?".into());
        if let Ok(mut m) = self.0.lock() {
            *m.entry(op).or_default() += 1;
        }
        Ok(())
    }
}

impl CallCounter {
    fn take(&self) -> BTreeMap<String, u64> {
        self.0
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// The agent's clients, each with the counter.
fn counted_clients(sdk: &aws_config::SdkConfig, c: &CallCounter) -> AwsClients {
    let s3 = agentq_core::config::s3_client(sdk);
    AwsClients {
        sqs: aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(sdk)
                .interceptor(c.clone())
                .build(),
        ),
        dynamodb: aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(sdk)
                .interceptor(c.clone())
                .build(),
        ),
        s3: aws_sdk_s3::Client::from_conf(s3.config().to_builder().interceptor(c.clone()).build()),
        ssm: aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::config::Builder::from(sdk)
                .interceptor(c.clone())
                .build(),
        ),
        sts: aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::config::Builder::from(sdk)
                .interceptor(c.clone())
                .build(),
        ),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn cold_start(r: &Resources) -> Duration {
    let mut samples = Vec::new();
    for _ in 0..10 {
        let api = RuntimeApi::start().await;
        let t = Instant::now();
        let mut child = Command::new(AGENT)
            .env_clear()
            .envs(r.env())
            .envs(lambda_env(&api))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent");
        while api.first_next().is_none() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        samples.push(api.first_next().unwrap() - t);
        let _ = child.kill();
        let _ = child.wait();
    }
    median(samples)
}

/// What one kind of job cost: mean wall time, the AWS calls it made, and the same
/// round trips made raw against the emulator (its floor).
struct JobCost {
    job: Duration,
    raw: Duration,
    calls: BTreeMap<String, u64>,
    n: u32,
}

/// Trivial jobs (child `true`) through the handler. `submitted`: the producer wrote the
/// `QUEUED` record first (as `agentq submit` does; not counted); otherwise the spec is
/// published raw and the claim creates the record.
async fn per_job(r: &Resources, work: &std::path::Path, submitted: bool) -> JobCost {
    let root = work.display().to_string();
    let cfg = AgentConfig::from_args(&Wrap::parse_from(["b", "--work-root", &root]).a).unwrap();
    let counter = CallCounter::default();
    let deps = Arc::new(Deps::new(counted_clients(&r.sdk, &counter), r.settings(), cfg).unwrap());
    let store = agentq_core::JobStore::new(r.clients().dynamodb, &r.table);
    let n = 20;
    let kind = if submitted { "sub" } else { "raw" };
    let body = |i: u32| {
        format!(
            r#"{{"spec_version":1,"job_id":"bench-{kind}-{i}","agent":"command","command":["true"]}}"#
        )
    };
    if submitted {
        for i in 0..n {
            let spec = agentq_core::JobSpec::parse_valid(
                body(i).as_bytes(),
                &agentq_core::spec::ValidationContext::default(),
            )
            .unwrap();
            store.create_queued(&spec, now_ms()).await.unwrap();
        }
    }
    let t = Instant::now();
    for i in 0..n {
        let mut m = SqsMessage::default();
        m.message_id = Some(format!("m{i}"));
        m.body = Some(body(i));
        let mut e = SqsEvent::default();
        e.records.push(m);
        let inv = Invocation {
            request_id: "bench".into(),
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        };
        let resp = handle_batch(&deps, e, &inv, &CancellationToken::new()).await;
        assert!(resp.batch_item_failures.is_empty());
    }
    let job = t.elapsed() / n;
    let calls = counter.take();

    // The same round trips, raw: as many single-item calls of each kind as the jobs made.
    let ddb = r.clients().dynamodb;
    let s3 = r.clients().s3;
    let t = Instant::now();
    for (op, count) in &calls {
        for i in 0..*count {
            let key = AttributeValue::S(format!("raw-{kind}-{i}"));
            match op.as_str() {
                "DynamoDB.GetItem" => {
                    ddb.get_item()
                        .table_name(&r.table)
                        .key("job_id", key)
                        .consistent_read(true)
                        .send()
                        .await
                        .unwrap();
                }
                "DynamoDB.PutItem" => {
                    ddb.put_item()
                        .table_name(&r.table)
                        .item("job_id", key)
                        .item("status", AttributeValue::S("RUNNING".into()))
                        .item("updated_at", AttributeValue::N(now_ms().to_string()))
                        .send()
                        .await
                        .unwrap();
                }
                "DynamoDB.UpdateItem" => {
                    ddb.update_item()
                        .table_name(&r.table)
                        .key("job_id", key)
                        .update_expression("SET #s = :s")
                        .expression_attribute_names("#s", "status")
                        .expression_attribute_values(":s", AttributeValue::S("SUCCEEDED".into()))
                        .send()
                        .await
                        .unwrap();
                }
                "S3.PutObject" => {
                    s3.put_object()
                        .bucket(&r.bucket)
                        .key(format!("raw/{kind}-{i}.json"))
                        .body(b"{}".to_vec().into())
                        .send()
                        .await
                        .unwrap();
                }
                other => panic!("no raw stand-in for {other}"),
            }
        }
    }
    JobCost {
        job,
        raw: t.elapsed() / n,
        calls,
        n,
    }
}

fn report(what: &str, c: &JobCost) {
    println!("per job, {what} (mean of {}): {}", c.n, ms(c.job));
    let total: u64 = c.calls.values().sum();
    println!(
        "  AWS calls per job: {:.1} ({})",
        total as f64 / f64::from(c.n),
        c.calls
            .iter()
            .map(|(op, k)| format!("{op} {:.1}", *k as f64 / f64::from(c.n)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  the same round trips, raw:             {}", ms(c.raw));
    println!(
        "  agent overhead beyond them:            {}",
        ms(c.job.saturating_sub(c.raw))
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn flood(r: &Resources, work: &std::path::Path) -> (Duration, u64, u64) {
    const BYTES: u64 = 100 * 1000 * 1000;
    let spec = work.join("flood.json");
    std::fs::write(
        &spec,
        serde_json::json!({"spec_version":1,"job_id":"bench-flood","agent":"command",
            "command":[fixture("fake-agent").display().to_string(), "--fake-flood", BYTES.to_string()]})
        .to_string(),
    )
    .unwrap();
    let t = Instant::now();
    let mut child = Command::new(AGENT)
        .args([
            "run",
            "--job",
            spec.to_str().unwrap(),
            "--deadline-seconds",
            "600",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AGENTQ_WORK_ROOT", work.join("ws"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Some(p) = rss_kib(pid) {
            peak = peak.max(p);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (t.elapsed(), BYTES, peak)
}

#[tokio::main]
async fn main() {
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    println!("agentq-agent benchmarks (emulator at {})", r.endpoint);
    let cold = cold_start(&r).await;
    println!("exec -> first /next (median of 10):     {}", ms(cold));
    report(
        "child `true`, submitted (QUEUED record)",
        &per_job(&r, work.path(), true).await,
    );
    report(
        "child `true`, published raw (no record)",
        &per_job(&r, work.path(), false).await,
    );
    let (took, bytes, peak) = flood(&r, work.path()).await;
    println!(
        "100 MB of child output: {:.1} s wall, {:.1} MB/s, peak RSS {:.1} MiB",
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64(),
        peak as f64 / 1024.0
    );
    let size = std::fs::metadata(AGENT).map(|m| m.len()).unwrap_or(0);
    println!("agent binary ({AGENT}): {:.1} MB", size as f64 / 1e6);
}
