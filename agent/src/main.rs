//! `agentq-agent`: parse the configuration, build the AWS clients once, run a front end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentq_agent::poll::{self, PollOptions};
use agentq_agent::serve::{self, ServeArgs, ServeOptions};
use agentq_agent::{AgentArgs, AgentConfig, Deps, Invocation, handle_batch};
use agentq_core::metrics::MetricsTarget;
use agentq_core::payload::PayloadPointer;
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::{
    AwsClients, ExitStatus, JobState, Observability, ObservabilityArgs, OutputFormat, Service,
    Settings, SettingsArgs,
};
use anyhow::Context;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Runs agentq jobs: one per SQS message.
#[derive(Debug, Parser)]
#[command(version, about, after_help = agentq_core::exit::HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Output format of `run` and `poll`: human-readable text, or JSON on stdout
    /// (diagnostics stay on stderr).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text, env = "AGENTQ_OUTPUT")]
    output: OutputFormat,
    #[command(flatten)]
    settings: SettingsArgs,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    observability: ObservabilityArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Lambda Runtime API (the default when AWS_LAMBDA_RUNTIME_API is set).
    #[command(after_help = agentq_core::exit::HELP)]
    Lambda,
    /// Poll an SQS queue and play the event source mapping locally (the mapping's
    /// settings have the names `agentq-dispatcher deploy` gives them).
    #[command(after_help = agentq_core::exit::HELP)]
    Poll {
        /// Messages per batch (1-10).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=10))]
        batch_size: i32,
        /// Seconds to wait to fill a batch.
        #[arg(long, default_value_t = 0.0)]
        batching_window_seconds: f64,
        /// Batches handled at once (the mapping's maximum concurrency).
        #[arg(long = "max-concurrency", alias = "concurrency", default_value_t = 2)]
        concurrency: usize,
        /// Simulated function timeout per batch, in seconds.
        #[arg(long, default_value_t = 900)]
        function_timeout_seconds: u64,
        /// Long-poll wait per receive, in seconds (0-20).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=20))]
        wait_seconds: u64,
        /// Exit when the queue is empty and nothing runs.
        #[arg(long)]
        once: bool,
    },
    /// Serve the Amazon Bedrock AgentCore Runtime HTTP contract: POST /invocations (an SQS
    /// event or a job spec), GET /ping.
    #[command(after_help = agentq_core::exit::HELP)]
    Serve(Box<ServeArgs>),
    /// Run one job spec file with a simulated deadline (local debugging); the exit code
    /// says whether the job SUCCEEDED.
    #[command(after_help = agentq_core::exit::HELP)]
    Run {
        /// The job spec (JSON), or - for stdin.
        #[arg(long)]
        job: PathBuf,
        /// Simulated invocation length.
        #[arg(long, default_value_t = 900)]
        deadline_seconds: u64,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = agentq_core::output::log_filter()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info,aws=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() {
        builder.json().init();
    } else {
        builder.compact().init();
    }
}

fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received; draining");
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    match real_main().await {
        Ok(status) => status.into(),
        Err(e) => {
            eprintln!("agentq-agent: {e:#}");
            exit_status(&e).into()
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
        if cause
            .downcast_ref::<agentq_agent::config::AgentConfigError>()
            .is_some()
        {
            return ExitStatus::Usage;
        }
        if let Some(e) = cause.downcast_ref::<agentq_core::SpecError>() {
            return e.exit_status();
        }
        if let Some(e) = cause.downcast_ref::<agentq_core::StoreError>() {
            return e.exit_status();
        }
    }
    ExitStatus::Other
}

/// `run`: the spec's job id (filled in when the spec has none, so that the outcome can be
/// read back), or a usage error naming every bad field. A pointer body is passed on as
/// it is (the handler resolves it).
fn prepare_run_body(body: String) -> anyhow::Result<(String, Option<agentq_core::JobId>)> {
    if PayloadPointer::parse(&body).is_some() {
        return Ok((body, None));
    }
    // Secrets are checked when they are read (as `secret_denied`), like the handler does.
    let lenient = ValidationContext {
        secrets_prefix: "/".into(),
    };
    let valid = JobSpec::parse_valid(body.as_bytes(), &lenient).context(ExitStatus::Usage)?;
    Ok((valid.to_json(), Some(valid.job_id)))
}

async fn real_main() -> anyhow::Result<ExitStatus> {
    let cli = Cli::parse();
    // Before any job: the agent's environment (its AWS keys on Lambda) becomes unreadable
    // to its children, and escaped descendants are re-parented to it.
    let hardening = agentq_agent::isolation::init_process();
    if !(hardening.non_dumpable && hardening.subreaper) {
        tracing::warn!(?hardening, "process hardening incomplete (prctl refused)");
    }
    let output = cli.output;
    let settings = Settings::from_args(&cli.settings)?;
    let config = AgentConfig::from_args(&cli.agent)?;
    let sdk = agentq_core::load_sdk_config().await?;
    let command = match cli.command {
        Some(c) => c,
        None if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() => Command::Lambda,
        None => anyhow::bail!("no command: use `lambda`, `poll`, `serve` or `run` (see --help)"),
    };
    // EMF lines go where the front end's output is a log stream; `run` prints its
    // response on stdout, so its metrics go to stderr unless AGENTQ_METRICS says.
    let metrics_default = match command {
        Command::Run { .. } => MetricsTarget::Stderr,
        _ => MetricsTarget::Stdout,
    };
    let obs = Observability::build(
        &cli.observability,
        Service::Agent,
        &config.tier,
        metrics_default,
        &sdk,
    )?;
    let deps =
        Arc::new(Deps::new(AwsClients::new(&sdk), settings, config)?.with_observability(obs));
    match command {
        Command::Lambda => {
            agentq_agent::lambda::run(deps)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        Command::Poll {
            batch_size,
            batching_window_seconds,
            concurrency,
            function_timeout_seconds,
            wait_seconds,
            once,
        } => {
            let queue_url = deps.settings.queue_url()?.to_owned();
            let opts = PollOptions {
                queue_url,
                batch_size,
                batching_window: Duration::from_secs_f64(batching_window_seconds.clamp(0.0, 300.0)),
                concurrency,
                function_timeout: Duration::from_secs(function_timeout_seconds),
                once,
                drain_timeout: deps.config.reserve + deps.config.grace + Duration::from_secs(5),
                wait_time: Duration::from_secs(wait_seconds),
            };
            // Every error of the poller is the queue being unreachable or refusing us.
            let stats = poll::run(deps, opts, shutdown_on_signals())
                .await
                .context(ExitStatus::Service)?;
            if output.is_json() {
                println!(
                    "{}",
                    serde_json::json!({
                        "received": stats.received,
                        "deleted": stats.deleted,
                        "failed": stats.failed,
                    })
                );
            } else {
                println!(
                    "received {} deleted {} left for retry {}",
                    stats.received, stats.deleted, stats.failed
                );
            }
        }
        Command::Serve(args) => {
            let opts = ServeOptions::from_args(&args, &deps.config)?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
            serve::run(deps, listener, opts, shutdown_on_signals()).await?;
        }
        Command::Run {
            job,
            deadline_seconds,
        } => {
            let body = if job.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&job)
                    .with_context(|| format!("reading {}", job.display()))
                    .context(ExitStatus::Usage)?
            };
            let (body, job_id) = prepare_run_body(body)?;
            let mut m = SqsMessage::default();
            m.message_id = Some(format!("local-{}", ulid::Ulid::new()));
            m.body = Some(body);
            let mut event = SqsEvent::default();
            event.records.push(m);
            let inv = Invocation {
                request_id: format!("run-{}", ulid::Ulid::new()),
                deadline: tokio::time::Instant::now() + Duration::from_secs(deadline_seconds),
            };
            let resp = handle_batch(&deps, event, &inv, &shutdown_on_signals()).await;
            // The outcome is the job's state: a failed job is acknowledged (its failure
            // went to the DLQ), so the batch response alone does not tell.
            let state = match &job_id {
                Some(id) => deps.store.get(id).await?.map(|r| r.status),
                None => None,
            };
            let status = match state {
                _ if !resp.batch_item_failures.is_empty() => ExitStatus::JobUnsuccessful,
                Some(s) => ExitStatus::of_job(s),
                // A pointer body whose job id we do not know: the batch response decides.
                None if job_id.is_none() => ExitStatus::Ok,
                None => ExitStatus::JobUnsuccessful,
            };
            if output.is_json() {
                println!(
                    "{}",
                    serde_json::json!({
                        "job_id": job_id,
                        "status": state,
                        "batch_item_failures": resp.batch_item_failures.len(),
                    })
                );
            } else {
                println!(
                    "{} {}",
                    job_id.as_ref().map_or("-", |j| j.as_str()),
                    state.map_or_else(|| "left for retry".to_owned(), |s: JobState| s.to_string())
                );
            }
            return Ok(status);
        }
    }
    Ok(ExitStatus::Ok)
}
