//! `agentq-dispatcher`: the DLQ re-planner (Lambda or poller) and `deploy`.

use std::path::PathBuf;
use std::process::ExitCode;

use agentq_core::{ExitStatus, JobStore, OutputFormat, Settings, SettingsArgs};
use agentq_dispatcher::deploy::{self, DeployArgs, DeployClients};
use agentq_dispatcher::poller::{self, PollError, PollOptions};
use agentq_dispatcher::{DeployError, Policy, PolicyError, RawPolicy, ReplanError, Replanner};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentq-dispatcher",
    version,
    about = "Re-plans agentq's dead-letter queue and deploys the agent image",
    after_help = agentq_core::exit::HELP
)]
struct Cli {
    /// Output format: human-readable text, or JSON on stdout (messages stay on stderr).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text, env = "AGENTQ_OUTPUT")]
    output: OutputFormat,
    #[command(flatten)]
    settings: SettingsArgs,
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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as the Lambda function behind the DLQ's event source mapping.
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
    let policy = Policy::build(&raw, &args.tier_queues, settings.queue_url()?)?;
    let clients = agentq_core::AwsClients::new(sdk);
    Ok(Replanner::new(
        JobStore::new(clients.dynamodb, settings.table()?),
        clients.sqs,
        clients.s3,
        policy,
        settings.validation(),
    ))
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
    let output = cli.output;
    let settings = Settings::from_args(&cli.settings)?;
    let sdk = agentq_core::load_sdk_config().await;
    match cli.command {
        Command::Lambda { policy } => {
            let r = replanner(&settings, &policy, &sdk).await?;
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
            let r = replanner(&settings, &policy, &sdk).await?;
            let opts = PollOptions {
                dlq_url: settings.dlq_url()?.to_owned(),
                wait_seconds: wait_seconds.unwrap_or(if once { 1 } else { 20 }),
                once,
            };
            let sqs = aws_sdk_sqs::Client::new(&sdk);
            let stats = poller::run(&r, &sqs, &opts, shutdown_signal()).await?;
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
            let report = deploy::run(&clients, &args, settings.queue_url()?, &root, &env).await?;
            match output {
                OutputFormat::Text => print!("{}", report.render()),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
    }
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
    let cli = Cli::parse();
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
        });
        assert_eq!(exit_status(&poll.context("polling")), ExitStatus::Service);
        let tagged = anyhow::anyhow!("bad").context(ExitStatus::Usage);
        assert_eq!(exit_status(&tagged), ExitStatus::Usage);
        assert_eq!(exit_status(&anyhow::anyhow!("other")), ExitStatus::Other);
    }
}
