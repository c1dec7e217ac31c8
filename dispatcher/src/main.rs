//! `agentq-dispatcher`: the DLQ re-planner (Lambda or poller) and `deploy`.

use std::path::PathBuf;
use std::process::ExitCode;

use agentq_core::metrics::MetricsTarget;
use agentq_core::{JobStore, Observability, ObservabilityArgs, Service, Settings, SettingsArgs};
use agentq_dispatcher::deploy::{self, DeployArgs, DeployClients, OutputFormat};
use agentq_dispatcher::poller::{self, PollOptions};
use agentq_dispatcher::{Policy, RawPolicy, Replanner};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentq-dispatcher",
    version,
    about = "Re-plans agentq's dead-letter queue and deploys the agent image"
)]
struct Cli {
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
    /// A capacity tier and its queue, NAME=URL, in escalation order (repeat, or comma-separate in the env var).
    #[arg(long = "tier-queue", env = "AGENTQ_TIER_QUEUES", value_delimiter = ',', value_parser = parse_tier)]
    tier_queues: Vec<(String, String)>,
    /// A RUNNING lease whose heartbeat is older than this is a crash (overrides the file).
    #[arg(long, env = "AGENTQ_STALE_AFTER")]
    stale_after: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as the Lambda function behind the DLQ's event source mapping (the default
    /// when AWS_LAMBDA_RUNTIME_API is set and no command is given).
    Lambda {
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Poll the DLQ and re-plan each message (the same handler as `lambda`).
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
    /// Build, push and launch the agent image on Lambda (see --dry-run).
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
    if let Some(s) = &args.stale_after {
        raw.stale_after = Some(s.clone());
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

async fn shutdown_signal() {
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
    let settings = Settings::from_args(&cli.settings)?;
    let sdk = agentq_core::load_sdk_config().await;
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
                move |ev: lambda_runtime::LambdaEvent<aws_lambda_events::event::sqs::SqsEvent>| async move {
                    Ok::<_, lambda_runtime::Error>(r.handle(ev.payload).await)
                },
            ))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
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
            let opts = PollOptions {
                dlq_url: settings.dlq_url()?.to_owned(),
                wait_seconds: wait_seconds.unwrap_or(if once { 1 } else { 20 }),
                once,
            };
            let sqs = aws_sdk_sqs::Client::new(&sdk);
            let stats = poller::run(&r, &sqs, &opts, shutdown_signal()).await?;
            println!("{}", serde_json::to_string(&stats)?);
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
            match args.output {
                OutputFormat::Human => print!("{}", report.render()),
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_from(command_line());
    init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentq-dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}
