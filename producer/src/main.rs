//! `agentq`: parses the command line, loads the AWS configuration, runs the command
//! (see `agentq_producer::cli`), and maps the outcome or the error to an exit code.

use std::process::ExitCode;

use agentq_core::ExitStatus;
use agentq_producer::cli::{Cli, Deps, OutputFormat, exit_code, run};
use agentq_producer::{ErrorClass, ProducerError};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::from(exit_code::OK);
            }
            if wants_json() {
                println!(
                    "{}",
                    serde_json::json!({"error": {
                        "message": e.render().to_string().trim_end(),
                        "exit_code": exit_code::USAGE,
                        "retryable": false,
                        "violations": [],
                    }})
                );
            }
            return ExitCode::from(exit_code::USAGE);
        }
    };
    init_tracing(cli.verbose);
    let json = cli.output == OutputFormat::Json;
    let result: anyhow::Result<_> = match agentq_core::load_sdk_config().await {
        Ok(sdk) => run(cli, &Deps { sdk }).await.map_err(anyhow::Error::from),
        Err(e) => Err(ProducerError::from(e).into()),
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        // A reader that went away (`agentq logs JOB | head`) is not an error.
        Err(err) if matches!(err.downcast_ref::<ProducerError>(), Some(ProducerError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe) => {
            ExitCode::from(exit_code::OK)
        }
        Err(err) => {
            let code = code_for(&err);
            let producer_err = err.downcast_ref::<ProducerError>();
            let hint = match producer_err {
                Some(e) if e.class() == ErrorClass::Service && e.is_retryable() => {
                    " (transient: retrying may help)"
                }
                Some(e) if e.class() == ErrorClass::Service => {
                    " (retrying will not help until the cause is fixed)"
                }
                _ => "",
            };
            eprintln!("error: {err}{hint}");
            // A batch already printed its per-job JSON report; anything else prints an
            // error document so JSON consumers always get valid JSON on stdout.
            if json && !matches!(producer_err, Some(ProducerError::Batch { .. })) {
                let violations: Vec<_> = producer_err
                    .map(ProducerError::violations)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(origin, v)| {
                        serde_json::json!({"origin": origin, "field": v.field, "message": v.message})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"error": {
                        "message": err.to_string(),
                        "exit_code": code,
                        "retryable": producer_err.is_some_and(ProducerError::is_retryable),
                        "violations": violations,
                    }})
                );
            }
            ExitCode::from(code)
        }
    }
}

/// Whether JSON output was asked for, judged from the raw arguments (for errors found
/// while parsing them).
fn wants_json() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| (w[0] == "--output" || w[0] == "-o") && w[1] == "json")
        || args.iter().any(|a| a == "--output=json" || a == "-ojson")
        || std::env::var(agentq_core::output::OUTPUT_ENV).is_ok_and(|v| v == "json")
}

/// The exit code of an error (see `agentq --help`).
fn code_for(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<ProducerError>()
        .map_or(ExitStatus::Other, ProducerError::class)
        .code()
}

/// Diagnostics to stderr: `AGENTQ_LOG` (a tracing filter; `RUST_LOG` when unset) or
/// -v/-vv; warnings by default (but not the SDK's notes about probing instance metadata
/// for a region).
fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,aws_config=error",
        1 => "info",
        _ => "debug",
    };
    let filter = agentq_core::output::log_filter()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
