//! `agentq-dispatcher`: the DLQ re-planner (Lambda or poller), the sweep, and `deploy`.

use std::path::PathBuf;
use std::process::ExitCode;

use agentq_core::metrics::MetricsTarget;
use agentq_core::{
    ExitStatus, JobStore, Observability, ObservabilityArgs, OutputFormat, Service, Settings,
    SettingsArgs,
};
use agentq_dispatcher::deploy::{self, DeployArgs, DeployClients};
use agentq_dispatcher::poller::{self, PollError, PollOptions};
use agentq_dispatcher::{DeployError, Policy, PolicyError, RawPolicy, ReplanError, Replanner};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "agentq-dispatcher",
    version,
    about = "Re-plans agentq's dead-letter queue, sweeps stranded jobs, and deploys the agent image",
    after_help = agentq_core::exit::HELP
)]
struct Cli {
    /// Output format: human-readable text, or JSON on stdout (messages stay on stderr).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text, env = "AGENTQ_OUTPUT")]
    output: OutputFormat,
    #[command(flatten)]
    settings: SettingsArgs,
    #[command(flatten)]
    observability: ObservabilityArgs,
    #[command(subcommand)]
    command: Command,
}

/// Re-plan policy options (both re-planner front ends).
#[derive(Debug, Clone, clap::Args)]
struct PolicyArgs {
    /// Re-plan policy file (TOML, or JSON when it ends in .json); see docs/dispatcher.md.
    #[arg(long, env = "AGENTQ_POLICY")]
    policy: Option<PathBuf>,
    /// Capacity tiers and their queues, NAME=URL, in escalation order (repeat, or comma-separate).
    #[arg(long, alias = "tier-queue", env = "AGENTQ_TIER_QUEUES", value_delimiter = ',', value_parser = parse_tier)]
    tier_queues: Vec<(String, String)>,
    /// Seconds after which a RUNNING lease without a heartbeat is a crash (overrides the
    /// policy file). The agent's setting too: give both the same value [default: 30].
    #[arg(long, env = "AGENTQ_STALE_AFTER_SECONDS")]
    stale_after_seconds: Option<f64>,
    /// Deprecated: `AGENTQ_STALE_AFTER` as a duration (e.g. 15m); use --stale-after-seconds.
    #[arg(long = "stale-after", env = "AGENTQ_STALE_AFTER", hide = true)]
    stale_after_deprecated: Option<String>,
    /// true: a segment that timed out and could resume resumes on the next tier (longer
    /// invocations, e.g. Lambda Managed Instances) instead of its own; overrides the
    /// file's causes.timed_out.escalate_resumable.
    #[arg(long, env = "AGENTQ_ESCALATE_TIMEOUTS", action = clap::ArgAction::Set)]
    escalate_timeouts: Option<bool>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as the Lambda function behind the DLQ's event source mapping and the sweep's
    /// schedule (the default when AWS_LAMBDA_RUNTIME_API is set and no command is given).
    #[command(after_help = agentq_core::exit::HELP)]
    Lambda {
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Poll the DLQ and re-plan each message (the same handler as `lambda`); prints the
    /// counters when it stops.
    #[command(after_help = agentq_core::exit::HELP)]
    Replan {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Drain the DLQ and exit at the first empty receive.
        #[arg(long)]
        once: bool,
        /// Long-poll wait per receive, seconds (default 20; 1 with --once).
        #[arg(long)]
        wait_seconds: Option<i32>,
    },
    /// Find jobs whose message is gone (stranded RUNNING, lost QUEUED, unsent plans) and re-plan them; prints a report as JSON.
    #[command(after_help = agentq_core::exit::HELP)]
    Sweep {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Sweep again after this long until SIGINT/SIGTERM (e.g. 5m); default: once.
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Option<std::time::Duration>,
    },
    /// Build, push and launch the agent image on Lambda (see --dry-run).
    #[command(after_help = agentq_core::exit::HELP)]
    Deploy(Box<DeployArgs>),
}

fn parse_tier(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, u)| (n.trim().to_owned(), u.trim().to_owned()))
        .filter(|(n, u)| !n.is_empty() && !u.is_empty())
        .ok_or_else(|| format!("{s:?} is not NAME=QUEUE_URL"))
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = agentq_core::output::log_filter()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() {
        builder.json().with_ansi(false).init();
    } else {
        builder.init();
    }
}

async fn replanner(
    settings: &Settings,
    args: &PolicyArgs,
    sdk: &aws_config::SdkConfig,
    obs: Observability,
) -> anyhow::Result<Replanner> {
    let mut raw = match &args.policy {
        Some(p) => RawPolicy::from_file(p)?,
        None => RawPolicy::default(),
    };
    if let Some(s) = args.stale_after_seconds {
        raw.stale_after_seconds = Some(s);
        raw.stale_after = None;
    } else if let Some(old) = &args.stale_after_deprecated {
        let d = humantime::parse_duration(old).map_err(|e| {
            anyhow::anyhow!(
                "AGENTQ_STALE_AFTER={old:?} is not a duration ({e}); it is deprecated anyway: set AGENTQ_STALE_AFTER_SECONDS"
            )
            .context(ExitStatus::Usage)
        })?;
        tracing::warn!(
            "AGENTQ_STALE_AFTER / --stale-after is deprecated: set AGENTQ_STALE_AFTER_SECONDS={} (the agent reads the same variable)",
            d.as_secs_f64()
        );
        raw.stale_after_seconds = Some(d.as_secs_f64());
        raw.stale_after = None;
    }
    if let Some(on) = args.escalate_timeouts {
        raw.causes
            .entry("timed_out".into())
            .or_default()
            .escalate_resumable = Some(on);
    }
    let policy = Policy::build(&raw, &args.tier_queues, settings.queue_url()?)?;
    let clients = agentq_core::AwsClients::new(sdk);
    Ok(Replanner::new(
        JobStore::new(clients.dynamodb, settings.table()?),
        clients.sqs,
        clients.s3,
        policy,
        settings.validation(),
    )
    .with_observability(obs))
}

/// A token cancelled at SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
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
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    let settings = Settings::from_args(&cli.settings)?;
    let sdk = agentq_core::load_sdk_config().await?;
    match cli.command {
        Command::Lambda { policy } => {
            let obs = Observability::build(
                &cli.observability,
                Service::Dispatcher,
                "default",
                MetricsTarget::Stdout,
                &sdk,
            )?;
            let r = replanner(&settings, &policy, &sdk, obs).await?;
            let r = &r;
            lambda_runtime::run(lambda_runtime::service_fn(
                move |ev: lambda_runtime::LambdaEvent<serde_json::Value>| async move {
                    // An epoch time on AWS; a duration under `cargo lambda watch`.
                    let left = agentq_core::invocation::budget(
                        ev.context.deadline,
                        std::time::SystemTime::now(),
                        agentq_core::invocation::function_timeout(),
                    );
                    if let Some(why) = left.reason() {
                        tracing::warn!(deadline_ms = ev.context.deadline, "{why}");
                    }
                    let deadline = tokio::time::Instant::now() + left.duration();
                    agentq_dispatcher::lambda::handle(r, ev.payload, deadline)
                        .await
                        .map_err(lambda_runtime::Error::from)
                },
            ))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
        }
        Command::Sweep { policy, every } => {
            // stdout carries the reports: metrics go to stderr unless told otherwise.
            let obs = Observability::build(
                &cli.observability,
                Service::Dispatcher,
                "default",
                MetricsTarget::Stderr,
                &sdk,
            )?;
            let r = replanner(&settings, &policy, &sdk, obs).await?;
            let shutdown = shutdown_on_signals();
            loop {
                let report = r.sweep(None).await;
                r.flush_observability(
                    tokio::time::Instant::now() + std::time::Duration::from_secs(5),
                )
                .await;
                let report = report?;
                println!("{}", serde_json::to_string(&report)?);
                let Some(every) = every else { break };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            Ok(())
        }
        Command::Replan {
            policy,
            once,
            wait_seconds,
        } => {
            // stdout carries the final stats: metrics go to stderr unless told otherwise.
            let obs = Observability::build(
                &cli.observability,
                Service::Dispatcher,
                "default",
                MetricsTarget::Stderr,
                &sdk,
            )?;
            let r = replanner(&settings, &policy, &sdk, obs).await?;
            let opts = PollOptions::new(
                settings.dlq_url()?,
                wait_seconds.unwrap_or(if once { 1 } else { 20 }),
                once,
            );
            let sqs = agentq_core::config::sqs_client(&sdk);
            let stats = poller::run(&r, &sqs, &opts, shutdown_on_signals()).await?;
            if output.is_json() {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "planned {} resent {} dropped {} unparseable {} left for retry {}",
                    stats.planned, stats.resent, stats.dropped, stats.unparseable, stats.failed
                );
            }
            Ok(())
        }
        Command::Deploy(args) => {
            let clients = DeployClients::new(&sdk);
            let root = std::env::current_dir().context("current directory")?;
            let env: Vec<(String, String)> = [
                ("AGENTQ_QUEUE_URL", cli.settings.queue_url.clone()),
                ("AGENTQ_DLQ_URL", cli.settings.dlq_url.clone()),
                ("AGENTQ_TABLE", cli.settings.table.clone()),
                ("AGENTQ_BUCKET", cli.settings.bucket.clone()),
                ("AGENTQ_PREFIX", cli.settings.prefix.clone()),
                ("AGENTQ_SECRETS_PREFIX", cli.settings.secrets_prefix.clone()),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect();
            let queues = deploy::Queues {
                jobs: settings.queue_url().ok().map(str::to_owned),
                dlq: settings.dlq_url().ok().map(str::to_owned),
            };
            let report = deploy::run(&clients, &args, &queues, &root, &env).await?;
            match output {
                OutputFormat::Text => print!("{}", report.render()),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
    }
}

/// The command line, with `lambda` as the command when there is none and the Lambda
/// Runtime API is set: the function's image starts the binary without arguments.
fn command_line() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    if args.len() == 1 && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        args.push("lambda".into());
    }
    args
}

/// The exit status of an error (the codes every agentq binary uses; see `--help`).
fn exit_status(err: &anyhow::Error) -> ExitStatus {
    if let Some(s) = err.downcast_ref::<ExitStatus>() {
        return *s;
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<agentq_core::ConfigError>() {
            return e.exit_status();
        }
        if let Some(e) = cause.downcast_ref::<PolicyError>() {
            return e.exit_status();
        }
        if let Some(e) = cause.downcast_ref::<DeployError>() {
            return e.exit_status();
        }
        if let Some(e) = cause.downcast_ref::<ReplanError>() {
            return e.exit_status();
        }
        if cause.downcast_ref::<PollError>().is_some() {
            return ExitStatus::Service;
        }
    }
    ExitStatus::Other
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_from(command_line());
    init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentq-dispatcher: {e:#}");
            exit_status(&e).into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn errors_map_to_the_shared_exit_codes() {
        let policy = anyhow::Error::new(PolicyError::Invalid {
            field: "stale_after_seconds".into(),
            why: "x".into(),
        });
        assert_eq!(exit_status(&policy), ExitStatus::Usage);
        let missing = anyhow::Error::new(DeployError::NoFunction {
            function: "f".into(),
        });
        assert_eq!(exit_status(&missing), ExitStatus::NotFound);
        let poll = anyhow::Error::new(PollError {
            op: "ReceiveMessage",
            queue: "q".into(),
            message: "denied".into(),
            transient: false,
        });
        assert_eq!(exit_status(&poll.context("polling")), ExitStatus::Service);
        let tagged = anyhow::anyhow!("bad").context(ExitStatus::Usage);
        assert_eq!(exit_status(&tagged), ExitStatus::Usage);
        assert_eq!(exit_status(&anyhow::anyhow!("other")), ExitStatus::Other);
    }
}
