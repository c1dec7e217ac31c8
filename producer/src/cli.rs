//! The `agentq` command line: clap definitions (one doc comment per subcommand) and
//! [`run`], which executes a parsed command against injected AWS configuration and
//! returns an [`Outcome`] or a typed error; the binary only maps those to exit codes.
//!
//! Output rules: results go to stdout (text, or one JSON document with `--output json`;
//! `logs` and `watch` stream JSON Lines), human messages and progress go to stderr.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentq_core::payload::DEFAULT_OFFLOAD_THRESHOLD;
use agentq_core::spec::JobSpec;
use agentq_core::store::CancelOutcome;
use agentq_core::{AgentPreset, JobId, JobRecord, JobState, Settings, SettingsArgs, Stream};
use aws_config::SdkConfig;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::error::ProducerError;
use crate::logs::LogRequest;
use crate::output::{ListRow, StatusView, list_table, watch_line};
use crate::producer::{Producer, ProducerOptions, SubmitOptions, WaitUntil};

/// Exit codes of the `agentq` binary: the codes every agentq binary uses
/// ([`agentq_core::exit`]).
pub mod exit_code {
    pub use agentq_core::exit::{
        ALREADY_EXISTS, JOB_UNSUCCESSFUL, NOT_FOUND, OK, OTHER, SERVICE, USAGE,
    };
}

/// What every `--help` ends with: the shared exit-code table, then where settings come
/// from.
pub fn after_help() -> String {
    format!("{}\n\n{SETTINGS_HELP}", agentq_core::exit::HELP)
}

const SETTINGS_HELP: &str = "\
Settings come from flags or their variables (AGENTQ_ + the flag's name in upper case,
shown next to each flag); AWS access from the standard AWS environment (AWS_REGION,
AWS_PROFILE, credentials; AWS_ENDPOINT_URL for an emulator). JSON output (--output json)
is valid JSON on stdout; messages go to stderr.";

/// Run agent CLI jobs (Claude Code, Codex, any command) on AWS Lambda through SQS.
///
/// Submit job specs to the jobs queue, follow their progress and logs, list and cancel them.
#[derive(Debug, Parser)]
#[command(name = "agentq", version, after_help = after_help(), propagate_version = true)]
pub struct Cli {
    /// Output format: human-readable text, or JSON on stdout (messages stay on stderr).
    #[arg(
        long,
        short = 'o',
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value_t = OutputFormat::Text,
        env = "AGENTQ_OUTPUT"
    )]
    pub output: OutputFormat,
    /// More diagnostics on stderr (-v info, -vv debug); AGENTQ_LOG takes a tracing filter.
    #[arg(short, long, global = true, help_heading = "Global options", action = ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten, next_help_heading = "Settings (flags or AGENTQ_* variables)")]
    pub settings: SettingsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// `--output` (the same flag on every agentq binary).
pub use agentq_core::OutputFormat;

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job spec (a JSON file, `-` for stdin, JSON Lines with --batch) or a quick
    /// job from --prompt / --preset / `-- ARGV`. Prints the job id(s) on stdout.
    #[command(after_help = after_help())]
    Submit(SubmitArgs),
    /// Show a job: state, attempt, progress, timings, cause, decisions and log locations.
    #[command(after_help = after_help())]
    Status(StatusArgs),
    /// Follow a job live until it finishes; the exit code reflects its outcome.
    #[command(after_help = after_help())]
    Watch(WatchArgs),
    /// Print a job's logs (default: the latest attempt's stdout); --follow waits for more.
    #[command(after_help = after_help())]
    Logs(LogsArgs),
    /// List jobs, newest change first, optionally by state.
    #[command(after_help = after_help())]
    List(ListArgs),
    /// Cancel a job: a queued job is CANCELLED at once and never runs; a running job is
    /// flagged and its agent stops it at the next heartbeat.
    #[command(after_help = after_help())]
    Cancel(CancelArgs),
    /// Serve a local web dashboard until Ctrl-C: jobs with filters and live updates, a
    /// job's progress, attempts, decisions, cost chart and live logs, failures and the
    /// DLQ, and cancel. Open the address it prints.
    #[command(after_help = after_help())]
    Dashboard(DashboardArgs),
}

/// `agentq dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Address to listen on. The dashboard has no login: keep it on loopback (use an SSH
    /// tunnel to reach it from elsewhere). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = crate::dashboard::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// How often pages and live log streams poll AWS, e.g. 2s or 500ms (200ms to 60s).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub refresh: Duration,
    /// Also answer to this Host name (`name` or `name:port`), e.g. behind a reverse proxy
    /// or a tunnel that rewrites Host (repeatable). Other names are refused, which stops
    /// DNS-rebinding pages.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// Job pages that can stream live logs at once.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_streams: u16,
}

/// `agentq submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job spec as a JSON file, or `-` to read stdin. With --batch: JSON Lines, one
    /// spec per line (blank lines are skipped).
    #[arg(
        value_name = "FILE",
        conflicts_with_all = ["prompt", "preset", "argv", "labels", "timeout_seconds", "model"]
    )]
    pub file: Option<PathBuf>,
    /// FILE holds JSON Lines; every line is validated before anything is submitted.
    #[arg(long, requires = "file")]
    pub batch: bool,
    /// Quick job: the task for claude-code or codex (for command: passed as AGENTQ_PROMPT).
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Quick job: the agent preset [default: command when ARGV is given, else claude-code].
    #[arg(long, value_enum)]
    pub preset: Option<PresetArg>,
    /// Quick job: a label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Quick job: total run time allowed, in seconds (5..=43200; default 900).
    #[arg(long, value_name = "SECONDS")]
    pub timeout_seconds: Option<u64>,
    /// Quick job: model name passed to the agent CLI.
    #[arg(long)]
    pub model: Option<String>,
    /// The job id (replaces the spec's job_id); 1-64 of A-Z a-z 0-9 _ -.
    #[arg(long, conflicts_with = "batch")]
    pub job_id: Option<String>,
    /// Keep the message invisible this long first: seconds or a duration such as 90s or
    /// 5m, at most 15m (SQS DelaySeconds). Standard queues only.
    #[arg(long, value_name = "DURATION", value_parser = parse_delay)]
    pub delay: Option<u32>,
    /// FIFO queues: the MessageGroupId [default: the spec's `group` label, else the job id].
    #[arg(long, value_name = "ID")]
    pub message_group_id: Option<String>,
    /// Specs whose JSON is larger than this many bytes are stored in S3 and sent as an
    /// SQS Extended Client pointer.
    #[arg(
        long,
        env = "AGENTQ_OFFLOAD_THRESHOLD",
        value_name = "BYTES",
        default_value_t = DEFAULT_OFFLOAD_THRESHOLD
    )]
    pub offload_threshold: usize,
    /// --batch: SendMessageBatch calls in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Wait until the job finishes (see `agentq watch`), then exit with its outcome:
    /// 0 when it SUCCEEDED, 4 otherwise.
    #[arg(long, conflicts_with = "batch")]
    pub wait: bool,
    #[command(flatten)]
    pub wait_opts: WaitArgs,
    /// Quick job with the command preset: the program and its arguments, after `--`.
    #[arg(last = true, value_name = "ARGV")]
    pub argv: Vec<String>,
}

/// How to wait for a job (`submit --wait`, `watch`).
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Pause between polls of the job's record, e.g. 2s or 500ms.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Stop when the run is over (finished: SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, DEAD),
    /// or only when no re-plan can follow (terminal: SUCCEEDED, CANCELLED, DEAD; needs the
    /// dispatcher to settle FAILED and TIMED_OUT jobs).
    #[arg(long, value_enum, default_value_t = UntilArg::Finished)]
    pub until: UntilArg,
}

/// `--until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UntilArg {
    Finished,
    Terminal,
}

/// `--preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    ClaudeCode,
    Codex,
    Command,
}

impl From<PresetArg> for AgentPreset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::ClaudeCode => AgentPreset::ClaudeCode,
            PresetArg::Codex => AgentPreset::Codex,
            PresetArg::Command => AgentPreset::Command,
        }
    }
}

/// `agentq status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job id.
    pub job: JobId,
}

/// `agentq watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job id.
    pub job: JobId,
    #[command(flatten)]
    pub wait_opts: WaitArgs,
}

/// `agentq logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The job id.
    pub job: JobId,
    /// The attempt to read [default: the latest; with --follow, later ones too].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: Option<u32>,
    /// Keep printing new segments until the job finishes.
    #[arg(long, short)]
    pub follow: bool,
    /// Which stream: the program's stdout or stderr, or the agent CLI's events (JSONL).
    #[arg(long, value_enum, default_value_t = StreamArg::Stdout)]
    pub stream: StreamArg,
    /// Pause between polls with --follow, e.g. 2s.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

/// `--stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamArg {
    Stdout,
    Stderr,
    Events,
}

impl From<StreamArg> for Stream {
    fn from(s: StreamArg) -> Self {
        match s {
            StreamArg::Stdout => Stream::Stdout,
            StreamArg::Stderr => Stream::Stderr,
            StreamArg::Events => Stream::Events,
        }
    }
}

/// `agentq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only jobs in these states (repeatable or comma-separated): QUEUED, RUNNING,
    /// SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, RETRY_SCHEDULED, RESUMING, DEAD.
    #[arg(long, value_name = "STATE", value_delimiter = ',')]
    pub status: Vec<JobState>,
    /// Show at most this many jobs.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
}

/// `agentq cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    pub job: JobId,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Seconds (`90`) or a duration (`90s`, `5m`), at most 900 s.
pub fn parse_delay(s: &str) -> Result<u32, String> {
    let secs = match s.parse::<u64>() {
        Ok(n) => n,
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}): use seconds or e.g. 90s, 5m"))?
            .as_secs(),
    };
    if secs > u64::from(crate::producer::MAX_DELAY_SECONDS) {
        return Err(format!(
            "{secs} s is longer than SQS allows: at most {} s (15m)",
            crate::producer::MAX_DELAY_SECONDS
        ));
    }
    Ok(secs as u32)
}

/// What [`run`] needs from outside: the AWS configuration.
#[derive(Debug, Clone)]
pub struct Deps {
    pub sdk: SdkConfig,
}

/// How a command ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `--wait` / `watch`: the job ended in this state.
    Job(JobState),
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Done => exit_code::OK,
            Self::Job(state) => agentq_core::ExitStatus::of_job(state).code(),
        }
    }
}

/// Longest the CLI waits at exit to export its spans and deliver its notifications.
const OBSERVABILITY_FLUSH: Duration = Duration::from_secs(10);

/// Traces (`OTEL_*`) and notifications (`AGENTQ_WEBHOOK_URL`, `AGENTQ_EVENT_BUS`) from
/// the environment; the CLI writes no metrics.
fn observability(deps: &Deps) -> Result<agentq_core::Observability, ProducerError> {
    Ok(agentq_core::Observability::build(
        &agentq_core::ObservabilityArgs::from_env(),
        agentq_core::Service::Producer,
        "default",
        agentq_core::metrics::MetricsTarget::Off,
        &deps.sdk,
    )?)
}

/// Runs one parsed command.
pub async fn run(cli: Cli, deps: &Deps) -> Result<Outcome, ProducerError> {
    let settings = Settings::from_args(&cli.settings)?;
    let json = cli.output == OutputFormat::Json;
    let base = Producer::from_sdk(&deps.sdk, settings);
    match cli.command {
        Command::Submit(args) => {
            let obs = observability(deps)?;
            let producer = base
                .with_options(ProducerOptions {
                    offload_threshold: args.offload_threshold,
                    send_concurrency: args.concurrency.into(),
                    ..ProducerOptions::default()
                })
                .with_observability(obs.clone());
            let res = submit(&producer, args, json).await;
            obs.flush(tokio::time::Instant::now() + OBSERVABILITY_FLUSH)
                .await;
            res
        }
        Command::Status(a) => {
            let rec = base.status(&a.job).await?;
            let view = StatusView::new(&rec, &base);
            if json {
                print_json(&view)?;
            } else {
                print_text(&view.text())?;
            }
            Ok(Outcome::Done)
        }
        Command::Watch(a) => {
            let rec = watch(&base, &a.job, &a.wait_opts, json).await?;
            if !json {
                print_text(&format!("{}\n", watch_line(&rec)))?;
            }
            Ok(Outcome::Job(rec.status))
        }
        Command::Logs(a) => logs(&base, a, json).await,
        Command::Dashboard(a) => dashboard(base, a).await,
        Command::List(a) => {
            let recs = base.list(&a.status, a.limit as usize).await?;
            let rows: Vec<ListRow> = recs.iter().map(ListRow::new).collect();
            if json {
                print_json(&rows)?;
            } else {
                if rows.is_empty() {
                    eprintln!("no jobs found");
                }
                print_text(&list_table(&rows))?;
            }
            Ok(Outcome::Done)
        }
        Command::Cancel(a) => {
            let obs = observability(deps)?;
            let outcome = base.with_observability(obs.clone()).cancel(&a.job).await;
            obs.flush(tokio::time::Instant::now() + OBSERVABILITY_FLUSH)
                .await;
            let outcome = outcome?;
            let (word, status, msg) = match outcome {
                CancelOutcome::Cancelled => (
                    "cancelled",
                    JobState::Cancelled,
                    format!(
                        "job {} cancelled: it had not started and will not run",
                        a.job
                    ),
                ),
                CancelOutcome::Flagged => (
                    "flagged",
                    JobState::Running,
                    format!(
                        "job {}: cancel requested; its agent stops it at the next heartbeat (follow with `agentq watch {}`)",
                        a.job, a.job
                    ),
                ),
                CancelOutcome::AlreadyFinished(s) => (
                    "already_finished",
                    s,
                    format!("job {} already finished as {s}; nothing to cancel", a.job),
                ),
            };
            if json {
                print_json(&serde_json::json!({
                    "job_id": a.job,
                    "outcome": word,
                    "status": status,
                }))?;
                eprintln!("{msg}");
            } else {
                print_text(&format!("{msg}\n"))?;
            }
            Ok(Outcome::Done)
        }
    }
}

/// Binds, prints the address, serves until Ctrl-C or SIGTERM.
async fn dashboard(producer: Producer, a: DashboardArgs) -> Result<Outcome, ProducerError> {
    let opts = crate::dashboard::DashboardOptions {
        refresh: a.refresh,
        allow_hosts: a.allow_hosts,
        max_streams: a.max_streams.into(),
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| {
        ProducerError::Input(format!(
            "cannot listen on {}: {e}: pick a free port with --listen 127.0.0.1:PORT",
            a.listen
        ))
    })?;
    let addr = listener.local_addr()?;
    let dash = crate::dashboard::Dashboard::new(producer, opts, addr)?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {addr}, beyond this machine; the dashboard has no login and anyone who can reach it can cancel jobs"
        );
    }
    eprintln!("agentq dashboard on http://{addr}/ (Ctrl-C to stop)");
    dash.serve(listener, shutdown_signal()).await?;
    eprintln!("agentq dashboard stopped");
    Ok(Outcome::Done)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn submit(
    producer: &Producer,
    args: SubmitArgs,
    json: bool,
) -> Result<Outcome, ProducerError> {
    let opts = SubmitOptions {
        delay_seconds: args.delay,
        message_group_id: args.message_group_id.clone(),
    };
    if args.batch {
        let path = args.file.as_deref().unwrap_or(Path::new("-"));
        return submit_batch(producer, path, &opts, json).await;
    }
    let spec = match &args.file {
        Some(path) => {
            let origin = origin_of(path);
            let bytes = read_input(path).await?;
            let mut spec =
                JobSpec::from_json(&bytes).map_err(|source| ProducerError::InvalidSpec {
                    origin: origin.clone(),
                    source,
                })?;
            if let Some(id) = &args.job_id {
                spec.job_id = Some(id.clone());
            }
            producer.validate(spec, &origin)?
        }
        None => producer.validate(quick_spec(&args)?, "command line")?,
    };
    let submitted = producer.submit(spec, &opts).await?;
    let where_ = match &submitted.offloaded {
        Some(o) => format!(
            " (spec of {} bytes stored at s3://{}/{})",
            o.size, o.bucket, o.key
        ),
        None => String::new(),
    };
    eprintln!(
        "submitted job {} to {}{where_}",
        submitted.job_id, submitted.queue_url
    );
    if !args.wait {
        if json {
            print_json(&submitted)?;
        } else {
            print_text(&format!("{}\n", submitted.job_id))?;
        }
        return Ok(Outcome::Done);
    }
    if !json {
        print_text(&format!("{}\n", submitted.job_id))?;
    }
    let rec = watch(producer, &submitted.job_id, &args.wait_opts, false).await?;
    if json {
        print_json(&serde_json::json!({
            "submission": submitted,
            "final": StatusView::new(&rec, producer),
        }))?;
    }
    eprintln!("{}", watch_line(&rec));
    Ok(Outcome::Job(rec.status))
}

fn quick_spec(args: &SubmitArgs) -> Result<JobSpec, ProducerError> {
    if args.prompt.is_none() && args.preset.is_none() && args.argv.is_empty() {
        return Err(ProducerError::Input(
            "nothing to submit: give a spec FILE (or - for stdin), or a quick job with --prompt TEXT [--preset claude-code|codex] or --preset command -- ARGV...".into(),
        ));
    }
    let preset = match args.preset {
        Some(p) => p.into(),
        None if !args.argv.is_empty() => AgentPreset::Command,
        None => AgentPreset::ClaudeCode,
    };
    let mut spec = JobSpec::new(preset);
    spec.prompt = args.prompt.clone();
    spec.command = (!args.argv.is_empty()).then(|| args.argv.clone());
    spec.job_id = args.job_id.clone();
    spec.timeout_seconds = args.timeout_seconds;
    spec.model = args.model.clone();
    spec.labels = args.labels.iter().cloned().collect();
    Ok(spec)
}

async fn submit_batch(
    producer: &Producer,
    path: &Path,
    opts: &SubmitOptions,
    json: bool,
) -> Result<Outcome, ProducerError> {
    let origin = origin_of(path);
    let bytes = read_input(path).await?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ProducerError::Input(format!("{origin}: not UTF-8 text: JSON Lines are UTF-8"))
    })?;
    let mut specs = Vec::new();
    let mut lines = Vec::new();
    let mut invalid = Vec::new();
    let ctx = producer.settings().validation();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match JobSpec::parse_valid(line.as_bytes(), &ctx) {
            Ok(s) => {
                specs.push(s);
                lines.push(n + 1);
            }
            Err(e) => invalid.push((n + 1, e)),
        }
    }
    if !invalid.is_empty() {
        return Err(ProducerError::InvalidBatch {
            origin,
            total: specs.len() + invalid.len(),
            invalid,
        });
    }
    if specs.is_empty() {
        return Err(ProducerError::Input(format!(
            "{origin}: no specs found: write one JSON spec per line"
        )));
    }
    let total = specs.len();
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} submitting [{bar:30}] {pos}/{len} jobs, {per_sec}, eta {eta}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    };
    let started = Instant::now();
    let report = producer.submit_batch(specs, opts, &|n| bar.inc(n)).await?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let queue_url = producer.settings().queue_url()?.to_owned();
    let offloaded = report
        .entries
        .iter()
        .filter(|e| matches!(&e.result, Ok(s) if s.offloaded.is_some()))
        .count();
    if json {
        #[derive(Serialize)]
        struct Line<'a> {
            line: usize,
            #[serde(flatten)]
            entry: crate::batch::BatchEntryView<'a>,
        }
        let jobs: Vec<Line<'_>> = report
            .entries
            .iter()
            .map(|e| Line {
                line: lines[e.index],
                entry: e.view(),
            })
            .collect();
        print_json(&serde_json::json!({
            "queue_url": queue_url,
            "total": total,
            "submitted": report.submitted(),
            "failed": report.failed(),
            "offloaded": offloaded,
            "elapsed_ms": elapsed.as_millis() as u64,
            "jobs": jobs,
        }))?;
    } else {
        let ids: String = report
            .entries
            .iter()
            .filter(|e| e.result.is_ok())
            .map(|e| format!("{}\n", e.job_id))
            .collect();
        print_text(&ids)?;
        for e in &report.entries {
            if let Err(err) = &e.result {
                eprintln!("{origin} line {} (job {}): {err}", lines[e.index], e.job_id);
            }
        }
    }
    eprintln!(
        "submitted {} of {total} jobs to {queue_url} in {:.1}s ({offloaded} through S3){}",
        report.submitted(),
        elapsed.as_secs_f64(),
        if report.failed() > 0 {
            format!("; {} failed (listed above)", report.failed())
        } else {
            String::new()
        }
    );
    report.into_result().map(|_| Outcome::Done)
}

/// Polls until the job is done, showing a spinner (TTY) or a line per state change.
/// With `json_lines`, every change is also printed as one JSON status line on stdout.
async fn watch(
    producer: &Producer,
    job: &JobId,
    wait: &WaitArgs,
    json_lines: bool,
) -> Result<JobRecord, ProducerError> {
    let tty = std::io::stderr().is_terminal();
    let spinner = if tty {
        let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
            s.set_style(style);
        }
        s.enable_steady_tick(Duration::from_millis(120));
        s
    } else {
        ProgressBar::hidden()
    };
    let until = match wait.until {
        UntilArg::Finished => WaitUntil::Finished,
        UntilArg::Terminal => WaitUntil::Terminal,
    };
    let mut last: Option<(JobState, u32, i64)> = None;
    let mut last_state: Option<(JobState, u32)> = None;
    let mut write_err = None;
    let rec = producer
        .wait(job, wait.interval, until, |rec| {
            let line = watch_line(rec);
            spinner.set_message(line.clone());
            let key = (rec.status, rec.attempt.get(), rec.updated_at);
            if json_lines
                && last != Some(key)
                && let Err(e) = print_json(&StatusView::new(rec, producer))
            {
                write_err.get_or_insert(e);
            }
            last = Some(key);
            let state = (rec.status, rec.attempt.get());
            if !tty && last_state != Some(state) {
                eprintln!("{line}");
            }
            last_state = Some(state);
        })
        .await;
    spinner.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e);
    }
    rec
}

async fn logs(producer: &Producer, a: LogsArgs, json: bool) -> Result<Outcome, ProducerError> {
    let req = LogRequest {
        job: a.job.clone(),
        attempt: a.attempt.map(agentq_core::Attempt),
        stream: a.stream.into(),
        follow: a.follow,
        interval: a.interval,
    };
    let mut shown = None;
    let end = producer
        .logs(&req, |seg| {
            if shown.is_some_and(|s| s != seg.attempt) {
                eprintln!("--- attempt {} ---", seg.attempt);
            }
            shown = Some(seg.attempt);
            if json {
                print_json(&serde_json::json!({
                    "job_id": req.job,
                    "attempt": seg.attempt,
                    "stream": seg.stream.as_str(),
                    "key": seg.key,
                    "text": String::from_utf8_lossy(&seg.data),
                }))
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&seg.data)?;
                out.flush()?;
                Ok(())
            }
        })
        .await?;
    match end.attempt {
        None => eprintln!(
            "job {} has not started yet ({}): no logs",
            a.job, end.status
        ),
        Some(n) if end.segments == 0 => eprintln!(
            "no {} logs for job {} attempt {n} yet{}",
            req.stream.as_str(),
            a.job,
            producer
                .log_url(&a.job, n)
                .map(|u| format!(" (under {u}{}/)", req.stream.as_str()))
                .unwrap_or_default()
        ),
        Some(_) => {}
    }
    Ok(Outcome::Done)
}

fn origin_of(path: &Path) -> String {
    if path == Path::new("-") {
        "stdin".into()
    } else {
        path.display().to_string()
    }
}

async fn read_input(path: &Path) -> Result<Vec<u8>, ProducerError> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buf)
            .await
            .map_err(|e| ProducerError::Input(format!("cannot read stdin: {e}")))?;
        return Ok(buf);
    }
    tokio::fs::read(path).await.map_err(|e| {
        ProducerError::Input(format!(
            "cannot read spec file {}: {e}: check the path (use - to read stdin)",
            path.display()
        ))
    })
}

/// Prints one JSON document on its own line on stdout.
pub fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<(), ProducerError> {
    let s =
        serde_json::to_string(v).map_err(|e| ProducerError::Output(std::io::Error::other(e)))?;
    print_text(&format!("{s}\n"))
}

fn print_text(s: &str) -> Result<(), ProducerError> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
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
    fn delays_parse_and_are_capped() {
        assert_eq!(parse_delay("90"), Ok(90));
        assert_eq!(parse_delay("5m"), Ok(300));
        assert!(parse_delay("16m").unwrap_err().contains("900"));
        assert!(parse_delay("soon").is_err());
    }

    #[test]
    fn every_command_documents_exit_codes() {
        let mut cmd = Cli::command();
        for sub in cmd.get_subcommands_mut() {
            let help = sub.render_long_help().to_string();
            assert!(help.contains(agentq_core::exit::HELP), "{}", sub.get_name());
        }
    }
}
