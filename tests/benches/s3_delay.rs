//! A slow S3 must not slow the child: the same job (a child writing 40 MB to stdout) run by
//! `agentq-agent run` straight against the emulator, and through the fault proxy adding
//! 500 ms to every S3 request, side by side. The child's time comes from the manifest
//! (`child_started_at` → `child_ended_at`); the job's from the agent's wall clock.
//!
//!     cargo bench -p agentq-testkit --bench s3_delay
//!
//! `AGENTQ_BENCH_MB` (default 40) and `AGENTQ_BENCH_S3_DELAY_MS` (default 500) change
//! the output size and the delay. Needs the emulator (started on demand).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentq_core::{Attempt, JobId, Layout};
use agentq_testkit::faultproxy::{FaultConfig, FaultProxy, Service};
use agentq_testkit::{Resources, binary, resources, unique};
use serde_json::Value;

const RUNS: usize = 3;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One job through `agentq-agent run` with `endpoint` as its AWS endpoint: (child, job).
async fn one(r: &Resources, endpoint: &str, bytes: u64, work: &std::path::Path) -> (f64, f64) {
    let job = JobId::parse(&unique("s3delay")).unwrap();
    let spec = serde_json::json!({
        "spec_version": 1, "job_id": job.as_str(), "agent": "command",
        "command": ["sh", "-c", format!("yes 'the quick brown fox jumps over the lazy dog 0123456789' | head -c {bytes}")],
    });
    let spec_file = work.join(format!("{}.json", job.as_str()));
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let started = Instant::now();
    let out = Command::new(binary("agentq-agent"))
        .args(["run", "--deadline-seconds", "600", "--job"])
        .arg(&spec_file)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(r.env())
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AGENTQ_WORK_ROOT", work.join("ws"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let job_s = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "the job failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value = serde_json::from_str(
        &r.object(&Layout::new(&r.prefix).result(&job, Attempt(1)))
            .await,
    )
    .unwrap();
    let at = |k: &str| {
        manifest[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {manifest}"))
    };
    let child_s = (at("child_ended_at") - at("child_started_at")) / 1000.0;
    (child_s, job_s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mb = env_u64("AGENTQ_BENCH_MB", 40);
    let delay = env_u64("AGENTQ_BENCH_S3_DELAY_MS", 500);
    let r = resources().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let proxy = FaultProxy::start(
        &r.endpoint,
        "127.0.0.1:0".parse().unwrap(),
        FaultConfig {
            latency_ms: delay,
            latency_services: vec![Service::S3],
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap();
    println!(
        "a child writing {mb} MB to stdout, median of {RUNS} (emulator at {})",
        r.endpoint
    );
    println!("{:<22} {:>10} {:>10}", "S3", "child s", "job s");
    for (label, endpoint) in [
        ("direct".to_owned(), r.endpoint.clone()),
        (format!("+{delay} ms per request"), proxy.endpoint()),
    ] {
        let mut child = Vec::new();
        let mut job = Vec::new();
        for _ in 0..RUNS {
            let (c, j) = one(&r, &endpoint, mb * 1_000_000, work.path()).await;
            child.push(c);
            job.push(j);
        }
        println!("{label:<22} {:>10.2} {:>10.2}", median(child), median(job));
    }
    // Keep the proxy up until both rows are measured.
    tokio::time::sleep(Duration::from_millis(1)).await;
    drop(proxy);
}
