//! `agentq-faultproxy`: the testkit's fault-injecting proxy as a program, for scripts.
//! Prints `listening on http://HOST:PORT` first, runs until SIGINT/SIGTERM, then prints
//! the counters as JSON (and writes them to `--stats-file`).

use std::net::SocketAddr;
use std::path::PathBuf;

use agentq_testkit::faultproxy::{Fault, FaultConfig, FaultProxy, Service};
use anyhow::Context;
use clap::Parser;

/// A fault-injecting HTTP proxy in front of an AWS emulator.
#[derive(Debug, Parser)]
#[command(
    name = "agentq-faultproxy",
    after_help = "Point clients at it with AWS_ENDPOINT_URL=http://HOST:PORT. Control while it runs: \
GET /__faultproxy/stats, GET|PUT /__faultproxy/config (JSON). Exit codes: 0 ok, 2 bad arguments, 1 other errors."
)]
struct Cli {
    /// The emulator, http://HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Where to listen (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Total fault probability per request, spread evenly over throttle, 429, 500, 503,
    /// drop-before and drop-after. The per-kind flags below override their share.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Probability of the service's throttling error.
    #[arg(long)]
    throttle: Option<f64>,
    /// Probability of HTTP 429.
    #[arg(long)]
    too_many_requests: Option<f64>,
    /// Probability of HTTP 500.
    #[arg(long)]
    internal: Option<f64>,
    /// Probability of HTTP 503.
    #[arg(long)]
    unavailable: Option<f64>,
    /// Probability of closing the connection before forwarding.
    #[arg(long)]
    drop_before: Option<f64>,
    /// Probability of closing the connection after forwarding (the call took effect).
    #[arg(long)]
    drop_after: Option<f64>,
    /// Only these services get faults (comma-separated: sqs,dynamodb,s3,ssm,other).
    #[arg(long, value_delimiter = ',')]
    fault_services: Vec<Service>,
    /// Added latency per request, milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Up to this much more latency, uniformly drawn, milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Only these services get latency (comma-separated).
    #[arg(long, value_delimiter = ',')]
    latency_services: Vec<Service>,
    /// Seed of the decision generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the counters here as JSON on exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
}

impl Cli {
    fn config(&self) -> FaultConfig {
        let mut c = FaultConfig::uniform(self.fault_rate, self.seed);
        for (fault, p) in [
            (Fault::Throttle, self.throttle),
            (Fault::TooManyRequests, self.too_many_requests),
            (Fault::Internal, self.internal),
            (Fault::Unavailable, self.unavailable),
            (Fault::DropBefore, self.drop_before),
            (Fault::DropAfter, self.drop_after),
        ] {
            if let Some(p) = p {
                c.faults.insert(fault, p);
            }
        }
        c.faults.retain(|_, p| *p > 0.0);
        c.fault_services = self.fault_services.clone();
        c.latency_ms = self.latency_ms;
        c.jitter_ms = self.jitter_ms;
        c.latency_services = self.latency_services.clone();
        c
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let proxy = FaultProxy::start(&cli.upstream, cli.listen, cli.config()).await?;
    println!("listening on {}", proxy.endpoint());
    eprintln!(
        "faultproxy: {} -> http://{}, config {}",
        proxy.endpoint(),
        proxy.upstream(),
        serde_json::to_string(&proxy.config())?
    );
    stop_signal().await;
    let stats = serde_json::to_string_pretty(&proxy.stats())?;
    println!("{stats}");
    if let Some(path) = &cli.stats_file {
        std::fs::write(path, &stats).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !(cli.fault_rate.is_finite() && (0.0..=1.0).contains(&cli.fault_rate)) {
        eprintln!(
            "agentq-faultproxy: --fault-rate {} is not a probability: use 0..=1",
            cli.fault_rate
        );
        return std::process::ExitCode::from(2);
    }
    if let Err(e) = cli.config().validate() {
        eprintln!("agentq-faultproxy: {e}");
        return std::process::ExitCode::from(2);
    }
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentq-faultproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
