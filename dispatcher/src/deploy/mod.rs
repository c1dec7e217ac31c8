//! `deploy`: prepares and launches the agentq image on Lambda.
//!
//! One image runs every function: its entrypoint starts the agent, and the dispatcher
//! function starts `/opt/agentq/bin/agentq-dispatcher` from it (the template's
//! `ImageConfig`). `deploy` builds that image once and moves each function it is given
//! to it: the agent (`--function`, event source: the jobs queue) and the dispatcher
//! (`--dispatcher-function`, event source: the DLQ).
//!
//! Reads and refuses early (queue visibility timeout shorter than the function timeout;
//! no builder when one is needed; no function without `--create-function`), then walks
//! the steps, skipping each that is already in place, so re-running with nothing
//! changed changes nothing:
//!
//! 1. ECR repository (created when missing: scan on push, immutable tags);
//! 2. image: `--image-uri` / `--image-tag` of an image already in ECR, or build the
//!    context (agent Dockerfile, MCP config, npm manifest, the agent binary as
//!    `bootstrap`, the dispatcher binary) with docker buildx / podman, log in with
//!    `GetAuthorizationToken`, push;
//! 3. per function: update it to `repo@sha256:…` (or create it), then wait for
//!    `LastUpdateStatus=Successful`;
//! 4. per function: publish a version and create/move the alias (skipped when the alias
//!    already runs that image);
//! 5. per function: create or update its SQS event source mapping on the alias (batch
//!    size, `ReportBatchItemFailures`, `MaximumConcurrency`, enabled).
//!
//! `--push-only` stops after step 2 (a first deployment: the functions do not exist
//! before the image does). `--dry-run` does the reads and prints the same plan without
//! changing anything; what it cannot check here (no container engine, a binary not built
//! yet) is marked as not checked instead of failing the plan.

pub mod builder;

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_lambda::types::{
    Architecture, Environment, FunctionCode, FunctionResponseType, LastUpdateStatus, PackageType,
    ScalingConfig, State,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Serialize;

use crate::error::DeployError;
use builder::{BuilderChoice, Engine};

/// How `deploy` prints its report: the global `--output text|json` of every agentq
/// binary (`human` is still accepted for `text`).
pub use agentq_core::OutputFormat;

/// Which of the configured functions to deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The agent function (`--function`) only.
    Agent,
    /// The dispatcher function (`--dispatcher-function`) only.
    Dispatcher,
}

/// `deploy` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// Lambda function that runs the agent; its event source is the jobs queue
    /// (--queue-url / AGENTQ_QUEUE_URL). The stack output AgentFunctionName.
    #[arg(long, env = "AGENTQ_FUNCTION", default_value = "agentq-agent")]
    pub function: String,
    /// Lambda function that runs the dispatcher from the same image; its event source is
    /// the DLQ (--dlq-url / AGENTQ_DLQ_URL). The stack output DispatcherFunctionName.
    /// Unset: only the agent function is deployed.
    #[arg(long, env = "AGENTQ_DISPATCHER_FUNCTION")]
    pub dispatcher_function: Option<String>,
    /// Deploy only one of the two functions.
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// Build (or resolve) and push the image, then stop: no function is touched. The
    /// first deployment, before the stack's functions exist.
    #[arg(long, conflicts_with_all = ["only", "create_function"])]
    pub push_only: bool,
    /// Alias the event source mappings invoke.
    #[arg(long, default_value = "live")]
    pub alias: String,
    /// ECR repository of the image (created when missing). The stack output RepositoryName.
    #[arg(long, env = "AGENTQ_REPOSITORY", default_value = "agentq-agent")]
    pub repository: String,
    /// Deploy an image already in ECR (`REPO_URI@sha256:…` or `REPO_URI:TAG`); skips build and push.
    #[arg(long, conflicts_with = "image_tag")]
    pub image_uri: Option<String>,
    /// Deploy the image with this tag in `--repository`; skips build and push.
    #[arg(long)]
    pub image_tag: Option<String>,
    /// Tag for a new build (tags are immutable; default `agentq-<unix time>`).
    #[arg(long)]
    pub tag: Option<String>,
    /// The agent binary to ship as `bootstrap` (default target/release/agentq-agent, else debug).
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
    /// The dispatcher binary to ship as /opt/agentq/bin/agentq-dispatcher (default
    /// target/release/agentq-dispatcher, else debug).
    #[arg(long)]
    pub dispatcher_binary: Option<PathBuf>,
    /// Directory with the Dockerfile, mcp.json, package.json and package-lock.json.
    #[arg(long, default_value = "agent")]
    pub agent_dir: PathBuf,
    /// Container engine for the build.
    #[arg(long, value_enum, default_value_t = BuilderChoice::Auto)]
    pub builder: BuilderChoice,
    /// Messages per agent invocation (1..=10000; above 10 needs --batching-window-seconds).
    #[arg(long, default_value_t = 1)]
    pub batch_size: i32,
    /// Seconds the agent's mapping may wait to fill a batch (0..=300).
    #[arg(
        long = "batching-window-seconds",
        alias = "batching-window",
        default_value_t = 0
    )]
    pub batching_window: i32,
    /// Most concurrent agent invocations the mapping starts (2..=1000).
    #[arg(long)]
    pub max_concurrency: Option<i32>,
    /// Whether the mappings deliver messages (`false` to stage them, e.g. on an emulator).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Create the function when it does not exist (needs --role-arn).
    #[arg(long)]
    pub create_function: bool,
    /// Execution role of a function created by --create-function.
    #[arg(long)]
    pub role_arn: Option<String>,
    /// Timeout in seconds of a function created by --create-function (1..=900).
    #[arg(
        long = "function-timeout-seconds",
        alias = "timeout",
        default_value_t = 900
    )]
    pub timeout: i32,
    /// Memory (MB) of a function created by --create-function (128..=10240).
    #[arg(long, default_value_t = 2048)]
    pub memory: i32,
    /// How long to wait for a function update to finish.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub wait_timeout: Duration,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The dispatcher's mapping on the DLQ, as the template creates it: re-plans are cheap,
/// so big batches and few concurrent dispatchers keep DynamoDB writes calm.
pub const DISPATCHER_BATCH_SIZE: i32 = 10;
pub const DISPATCHER_MAX_CONCURRENCY: i32 = 2;

/// The queues the functions' event sources are on.
#[derive(Debug, Clone, Default)]
pub struct Queues {
    /// The jobs queue (the agent's event source).
    pub jobs: Option<String>,
    /// The dead-letter queue (the dispatcher's event source).
    pub dlq: Option<String>,
}

/// What a step did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Build,
    Publish,
    Unchanged,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Build => "build",
            Self::Publish => "publish",
            Self::Unchanged => "ok",
        }
    }
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    pub step: &'static str,
    /// The function the step is about (none for the repository and the image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    pub action: Action,
    pub detail: String,
    /// Dry run: what could not be checked here, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_checked: Option<String>,
}

/// What a function is in agentq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Dispatcher,
}

/// One function's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionReport {
    pub role: Role,
    pub function: String,
    pub alias: String,
    /// The queue its event source mapping reads.
    pub queue_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_uuid: Option<String>,
}

/// What `deploy` did or would do.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeployReport {
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_uri: Option<String>,
    pub functions: Vec<FunctionReport>,
    pub steps: Vec<StepReport>,
    pub warnings: Vec<String>,
}

impl DeployReport {
    fn step(&mut self, step: &'static str, action: Action, detail: impl Into<String>) {
        self.steps.push(StepReport {
            step,
            function: None,
            action,
            detail: detail.into(),
            not_checked: None,
        });
    }

    fn fn_step(
        &mut self,
        function: &str,
        step: &'static str,
        action: Action,
        detail: impl Into<String>,
    ) {
        self.steps.push(StepReport {
            step,
            function: Some(function.to_owned()),
            action,
            detail: detail.into(),
            not_checked: None,
        });
    }

    /// Whether any step changes something.
    pub fn changes(&self) -> bool {
        self.steps.iter().any(|s| s.action != Action::Unchanged)
    }

    /// Whether a dry run left something unchecked.
    pub fn unchecked(&self) -> bool {
        self.steps.iter().any(|s| s.not_checked.is_some())
    }

    /// The human form.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{}\n",
            if self.dry_run {
                "deploy plan (dry run, nothing changed)"
            } else {
                "deploy"
            }
        );
        for f in &self.functions {
            out.push_str(&format!(
                "  {:?} function {} (alias {}), event source {}\n",
                f.role, f.function, f.alias, f.queue_url
            ));
        }
        if self.functions.is_empty() {
            out.push_str("  image only (--push-only): no function is touched\n");
        }
        for s in &self.steps {
            let step = match &s.function {
                Some(f) => format!("{f}: {}", s.step),
                None => s.step.to_owned(),
            };
            out.push_str(&format!(
                "  [{:<9}] {:<15} {}\n",
                s.action.label(),
                step,
                s.detail
            ));
            if let Some(why) = &s.not_checked {
                out.push_str(&format!("  {:<11} {:<15} not checked: {why}\n", "", ""));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("  warning: {w}\n"));
        }
        if let Some(uri) = &self.image_uri {
            out.push_str(&format!("  image: {uri}\n"));
        }
        if !self.changes() {
            out.push_str("  everything is already in place\n");
        }
        out
    }
}

/// The AWS clients `deploy` uses.
#[derive(Debug, Clone)]
pub struct DeployClients {
    pub lambda: aws_sdk_lambda::Client,
    pub ecr: aws_sdk_ecr::Client,
    pub sqs: aws_sdk_sqs::Client,
}

impl DeployClients {
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        Self {
            lambda: aws_sdk_lambda::Client::new(sdk),
            ecr: aws_sdk_ecr::Client::new(sdk),
            sqs: aws_sdk_sqs::Client::new(sdk),
        }
    }
}
/// Extra environment for a function created by `--create-function`.
pub type FunctionEnv = Vec<(String, String)>;

fn aws_err<E>(service: &'static str, op: &'static str, resource: &str, e: E) -> DeployError
where
    E: std::error::Error,
{
    DeployError::Aws {
        service,
        op,
        resource: resource.to_owned(),
        message: agentq_core::aws::display(&e),
    }
}

fn check_args(a: &DeployArgs) -> Result<(), DeployError> {
    let bad = |m: String| Err(DeployError::Invalid(m));
    if !(1..=10_000).contains(&a.batch_size) {
        return bad(format!(
            "--batch-size {} is outside 1..=10000",
            a.batch_size
        ));
    }
    if !(0..=300).contains(&a.batching_window) {
        return bad(format!(
            "--batching-window-seconds {} is outside 0..=300",
            a.batching_window
        ));
    }
    if a.batch_size > 10 && a.batching_window < 1 {
        return bad(format!(
            "--batch-size {} needs --batching-window-seconds of at least 1 (AWS)",
            a.batch_size
        ));
    }
    if let Some(c) = a.max_concurrency
        && !(2..=1000).contains(&c)
    {
        return bad(format!("--max-concurrency {c} is outside 2..=1000 (AWS)"));
    }
    if !(1..=900).contains(&a.timeout) {
        return bad(format!(
            "--function-timeout-seconds {} is outside 1..=900 (AWS)",
            a.timeout
        ));
    }
    if !(128..=10_240).contains(&a.memory) {
        return bad(format!(
            "--memory {} is outside 128..=10240 (AWS)",
            a.memory
        ));
    }
    if a.create_function && a.role_arn.is_none() {
        return bad(
            "--create-function needs --role-arn ARN (the function's execution role)".into(),
        );
    }
    if a.alias.is_empty() || a.alias.chars().all(|c| c.is_ascii_digit()) {
        return bad(format!(
            "--alias {:?} must be a name, not a version number",
            a.alias
        ));
    }
    if let Some(u) = &a.image_uri
        && !u.contains('/')
    {
        return bad(format!(
            "--image-uri {u:?} is not an ECR image URI (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO@sha256:… or …:TAG)"
        ));
    }
    Ok(())
}

/// The function name inside a function ARN (`…:function:NAME[:QUALIFIER]`).
fn arn_function_name(arn: &str) -> Option<&str> {
    arn.split(":function:").nth(1)?.split(':').next()
}

fn arn_qualifier(arn: &str) -> Option<&str> {
    arn.split(":function:").nth(1)?.split(':').nth(1)
}

/// Current state of the function.
struct FunctionState {
    timeout: i64,
    /// For images, the image digest (AWS) or a hash of the URI (moto): compared between
    /// `$LATEST` and the alias' version to tell whether the alias runs the same code.
    code_sha256: Option<String>,
    image_uri: Option<String>,
    function_arn: String,
}

async fn get_function(
    c: &DeployClients,
    name: &str,
    qualifier: Option<&str>,
) -> Result<Option<FunctionState>, DeployError> {
    match c
        .lambda
        .get_function()
        .function_name(name)
        .set_qualifier(qualifier.map(str::to_owned))
        .send()
        .await
    {
        Ok(out) => {
            let conf = out.configuration();
            Ok(Some(FunctionState {
                timeout: conf.and_then(|c| c.timeout()).unwrap_or(3) as i64,
                code_sha256: conf.and_then(|c| c.code_sha256()).map(str::to_owned),
                image_uri: out.code().and_then(|c| c.image_uri()).map(str::to_owned),
                function_arn: conf
                    .and_then(|c| c.function_arn())
                    .unwrap_or_default()
                    .to_owned(),
            }))
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(aws_err("Lambda", "GetFunction", name, e)),
    }
}

/// The repository's URI, or `None` when it does not exist.
async fn repository_uri(c: &DeployClients, name: &str) -> Result<Option<String>, DeployError> {
    match c
        .ecr
        .describe_repositories()
        .repository_names(name)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .repositories()
            .first()
            .and_then(|r| r.repository_uri())
            .map(str::to_owned)),
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_repository_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(aws_err("ECR", "DescribeRepositories", name, e)),
    }
}

/// The digest of `repository:tag`, or `None` when there is no such image.
async fn image_digest(
    c: &DeployClients,
    repository: &str,
    tag: &str,
) -> Result<Option<String>, DeployError> {
    let id = aws_sdk_ecr::types::ImageIdentifier::builder()
        .image_tag(tag)
        .build();
    match c
        .ecr
        .describe_images()
        .repository_name(repository)
        .image_ids(id)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .image_details()
            .first()
            .and_then(|d| d.image_digest())
            .map(str::to_owned)),
        Err(e)
            if e.as_service_error().is_some_and(|se| {
                se.is_image_not_found_exception() || se.is_repository_not_found_exception()
            }) =>
        {
            Ok(None)
        }
        Err(e) => Err(aws_err(
            "ECR",
            "DescribeImages",
            &format!("{repository}:{tag}"),
            e,
        )),
    }
}

/// `(repository URI, reference)` of an image URI: `repo@sha256:…` or `repo:tag`.
fn split_image_uri(uri: &str) -> (&str, Option<&str>, Option<&str>) {
    if let Some((repo, digest)) = uri.split_once('@') {
        return (repo, None, Some(digest));
    }
    let slash = uri.rfind('/').unwrap_or(0);
    match uri[slash..].rfind(':') {
        Some(i) => (&uri[..slash + i], Some(&uri[slash + i + 1..]), None),
        None => (uri, None, None),
    }
}

/// A function to move to the image, with its event source.
struct Target {
    role: Role,
    function: String,
    queue_url: String,
    queue_arn: String,
    batch_size: i32,
    batching_window: i32,
    max_concurrency: Option<i32>,
    current: Option<FunctionState>,
}

fn targets_wanted(
    a: &DeployArgs,
    queues: &Queues,
) -> Result<Vec<(Role, String, String)>, DeployError> {
    if a.push_only {
        return Ok(Vec::new());
    }
    let missing = |what: &str, flag: &str, env: &str| {
        DeployError::Invalid(format!(
            "{what} is not set: pass --{flag} or export {env} (the stack outputs have it; locally `eval \"$(localdev/up)\"`)"
        ))
    };
    let mut out = Vec::new();
    if a.only != Some(Only::Dispatcher) {
        let q = queues.jobs.clone().ok_or_else(|| {
            missing(
                "the jobs queue URL (the agent's event source)",
                "queue-url",
                "AGENTQ_QUEUE_URL",
            )
        })?;
        out.push((Role::Agent, a.function.clone(), q));
    }
    if a.only == Some(Only::Dispatcher) || (a.only.is_none() && a.dispatcher_function.is_some()) {
        let f = a.dispatcher_function.clone().ok_or_else(|| {
            missing(
                "the dispatcher function",
                "dispatcher-function",
                "AGENTQ_DISPATCHER_FUNCTION",
            )
        })?;
        let q = queues.dlq.clone().ok_or_else(|| {
            missing(
                "the dead-letter queue URL (the dispatcher's event source)",
                "dlq-url",
                "AGENTQ_DLQ_URL",
            )
        })?;
        out.push((Role::Dispatcher, f, q));
    }
    Ok(out)
}

/// Reads a target's queue and function, and refuses what cannot work.
async fn read_target(
    c: &DeployClients,
    a: &DeployArgs,
    (role, function, queue_url): (Role, String, String),
    report: &mut DeployReport,
) -> Result<Target, DeployError> {
    let attrs = c
        .sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| aws_err("SQS", "GetQueueAttributes", &queue_url, e))?;
    let attrs = attrs.attributes.unwrap_or_default();
    let visibility: i64 = attrs
        .get(&QueueAttributeName::VisibilityTimeout)
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let queue_arn = attrs
        .get(&QueueAttributeName::QueueArn)
        .cloned()
        .unwrap_or_default();
    let current = get_function(c, &function, None).await?;
    if current.is_none() && !a.create_function {
        return Err(DeployError::NoFunction { function });
    }
    let timeout = current.as_ref().map_or(a.timeout as i64, |f| f.timeout);
    if visibility < timeout {
        return Err(DeployError::VisibilityTooShort {
            queue: queue_url,
            visibility,
            timeout,
            recommended: 6 * timeout,
        });
    }
    if visibility < 6 * timeout {
        report.warnings.push(format!(
            "{function}: queue visibility timeout {visibility}s is less than 6x the function timeout {timeout}s ({}s), as AWS recommends for event source mappings",
            6 * timeout
        ));
    }
    let (batch_size, batching_window, max_concurrency) = match role {
        Role::Agent => (a.batch_size, a.batching_window, a.max_concurrency),
        Role::Dispatcher => (DISPATCHER_BATCH_SIZE, 0, Some(DISPATCHER_MAX_CONCURRENCY)),
    };
    Ok(Target {
        role,
        function,
        queue_url,
        queue_arn,
        batch_size,
        batching_window,
        max_concurrency,
        current,
    })
}

/// Runs `deploy`. `root` is the repository root (for the default binaries);
/// `function_env` goes onto a function created by `--create-function`.
pub async fn run(
    c: &DeployClients,
    a: &DeployArgs,
    queues: &Queues,
    root: &std::path::Path,
    function_env: &FunctionEnv,
) -> Result<DeployReport, DeployError> {
    check_args(a)?;
    let mut report = DeployReport {
        dry_run: a.dry_run,
        ..Default::default()
    };

    // ---- reads and refusals, before anything changes
    let mut targets = Vec::new();
    for wanted in targets_wanted(a, queues)? {
        targets.push(read_target(c, a, wanted, &mut report).await?);
    }

    // The image to deploy: given, or to be built (in a dry run without an engine, the
    // build is planned and marked as not checked).
    enum Source {
        Given {
            repo_uri: String,
            reference: String,
        },
        Build {
            engine: Option<Engine>,
            no_engine: Option<String>,
            tag: String,
        },
    }
    let source = if let Some(uri) = &a.image_uri {
        let (repo, tag, digest) = split_image_uri(uri);
        Source::Given {
            repo_uri: repo.to_owned(),
            reference: digest.map_or_else(
                || format!(":{}", tag.unwrap_or("latest")),
                |d| format!("@{d}"),
            ),
        }
    } else if let Some(tag) = &a.image_tag {
        Source::Given {
            repo_uri: String::new(),
            reference: format!(":{tag}"),
        }
    } else {
        let (engine, no_engine) = match builder::detect(a.builder).await {
            Ok(e) => (Some(e), None),
            Err(DeployError::NoBuilder { detail }) if a.dry_run => (
                None,
                Some(format!(
                    "no container engine answers here ({detail}); a real run needs docker or podman, or --image-uri/--image-tag"
                )),
            ),
            Err(e) => return Err(e),
        };
        let tag = a
            .tag
            .clone()
            .unwrap_or_else(|| format!("agentq-{}", agentq_core::record::now_ms() / 1000));
        Source::Build {
            engine,
            no_engine,
            tag,
        }
    };

    // ---- 1. repository
    let repo_uri = match repository_uri(c, &a.repository).await? {
        Some(u) => {
            report.step(
                "ecr-repository",
                Action::Unchanged,
                format!("{} exists", a.repository),
            );
            Some(u)
        }
        None if a.dry_run => {
            report.step(
                "ecr-repository",
                Action::Create,
                format!("{} (scan on push, immutable tags)", a.repository),
            );
            None
        }
        None => {
            let out = c
                .ecr
                .create_repository()
                .repository_name(&a.repository)
                .image_tag_mutability(aws_sdk_ecr::types::ImageTagMutability::Immutable)
                .image_scanning_configuration(
                    aws_sdk_ecr::types::ImageScanningConfiguration::builder()
                        .scan_on_push(true)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| aws_err("ECR", "CreateRepository", &a.repository, e))?;
            report.step(
                "ecr-repository",
                Action::Create,
                format!("{} (scan on push, immutable tags)", a.repository),
            );
            out.repository()
                .and_then(|r| r.repository_uri())
                .map(str::to_owned)
        }
    };
    let repo_uri_or_planned = repo_uri
        .clone()
        .unwrap_or_else(|| format!("<new repository {}>", a.repository));

    // ---- 2. image
    let image_uri: Option<String> = match source {
        Source::Given {
            repo_uri: given,
            reference,
        } => {
            let repo = if given.is_empty() {
                repo_uri_or_planned.clone()
            } else {
                given
            };
            let resolved = if let Some(digest) = reference.strip_prefix('@') {
                Some(format!("{repo}@{digest}"))
            } else {
                let tag = reference.trim_start_matches(':');
                let repo_name = repo.rsplit('/').next().unwrap_or(&a.repository);
                match image_digest(c, repo_name, tag).await? {
                    Some(d) => Some(format!("{repo}@{d}")),
                    None if a.dry_run && repo_uri.is_none() => None,
                    None => {
                        return Err(DeployError::NoImage {
                            repository: repo_name.to_owned(),
                            reference: tag.to_owned(),
                        });
                    }
                }
            };
            report.step(
                "image",
                Action::Unchanged,
                format!(
                    "use {} (already in ECR; no build)",
                    resolved.as_deref().unwrap_or(&format!("{repo}{reference}"))
                ),
            );
            resolved
        }
        Source::Build {
            engine,
            no_engine,
            tag,
        } => {
            let image = format!("{repo_uri_or_planned}:{tag}");
            let agent_bin = a
                .agent_binary
                .clone()
                .unwrap_or_else(|| builder::default_agent_binary(root));
            let dispatcher_bin = a
                .dispatcher_binary
                .clone()
                .unwrap_or_else(|| builder::default_dispatcher_binary(root));
            let detail = format!(
                "{image} with {} (linux/amd64) from {}, {} as bootstrap and {} as /opt/agentq/bin/agentq-dispatcher, then log in to ECR and push",
                engine.map_or("docker or podman", Engine::program),
                a.agent_dir.display(),
                agent_bin.display(),
                dispatcher_bin.display()
            );
            match engine {
                Some(engine) if !a.dry_run => {
                    let dir = tempfile::Builder::new()
                        .prefix("agentq-image-")
                        .tempdir()
                        .map_err(|source| DeployError::File {
                            what: "temporary build context".into(),
                            path: std::env::temp_dir(),
                            source,
                        })?;
                    builder::prepare_context_with(
                        &a.agent_dir,
                        &agent_bin,
                        Some(&dispatcher_bin),
                        dir.path(),
                    )
                    .await?;
                    builder::build(engine, &image, dir.path()).await?;
                    let (registry, user, password) = ecr_login(c, &repo_uri_or_planned).await?;
                    builder::login(engine, &registry, &user, &password).await?;
                    builder::push(engine, &image).await?;
                    let digest = image_digest(c, &a.repository, &tag).await?.ok_or_else(|| {
                        DeployError::NoImage {
                            repository: a.repository.clone(),
                            reference: tag.clone(),
                        }
                    })?;
                    report.step("image", Action::Build, detail);
                    Some(format!("{repo_uri_or_planned}@{digest}"))
                }
                _ => {
                    // Dry run (or no engine, which only a dry run gets here with).
                    let mut not_checked: Vec<String> = no_engine.into_iter().collect();
                    for (what, path, build) in [
                        ("agent binary", &agent_bin, "agentq-agent"),
                        ("dispatcher binary", &dispatcher_bin, "agentq-dispatcher"),
                    ] {
                        if tokio::fs::metadata(path).await.is_err() {
                            not_checked.push(format!(
                                "the {what} {} does not exist yet (cargo build --release -p {build})",
                                path.display()
                            ));
                        }
                    }
                    report.step("image", Action::Build, detail);
                    if !not_checked.is_empty()
                        && let Some(last) = report.steps.last_mut()
                    {
                        last.not_checked = Some(not_checked.join("; "));
                    }
                    None
                }
            }
        }
    };
    report.image_uri = image_uri.clone();
    let target_uri = image_uri
        .clone()
        .unwrap_or_else(|| format!("{repo_uri_or_planned}@<digest of the new image>"));

    // ---- 3-5, per function
    for t in &targets {
        let f = deploy_function(
            c,
            a,
            t,
            image_uri.as_deref(),
            &target_uri,
            function_env,
            &mut report,
        )
        .await?;
        report.functions.push(f);
    }
    Ok(report)
}

/// Steps 3 to 5 for one function: code, version and alias, event source mapping.
async fn deploy_function(
    c: &DeployClients,
    a: &DeployArgs,
    t: &Target,
    image_uri: Option<&str>,
    target: &str,
    function_env: &FunctionEnv,
    report: &mut DeployReport,
) -> Result<FunctionReport, DeployError> {
    let name = t.function.as_str();
    let mut out = FunctionReport {
        role: t.role,
        function: t.function.clone(),
        alias: a.alias.clone(),
        queue_url: t.queue_url.clone(),
        version: None,
        mapping_uuid: None,
    };

    // ---- 3. function code
    let code_current = t
        .current
        .as_ref()
        .is_some_and(|f| image_uri.is_some() && f.image_uri.as_deref() == image_uri);
    match &t.current {
        Some(_) if code_current => {
            report.fn_step(
                name,
                "function-code",
                Action::Unchanged,
                format!("runs {target}"),
            );
        }
        Some(f) => {
            if !a.dry_run {
                c.lambda
                    .update_function_code()
                    .function_name(name)
                    .image_uri(target)
                    .send()
                    .await
                    .map_err(|e| aws_err("Lambda", "UpdateFunctionCode", name, e))?;
                wait_updated(c, name, a.wait_timeout).await?;
            }
            report.fn_step(
                name,
                "function-code",
                Action::Update,
                format!(
                    "{} → {target}, then wait for LastUpdateStatus=Successful",
                    f.image_uri.as_deref().unwrap_or("(no image)")
                ),
            );
        }
        None => {
            if !a.dry_run {
                let mut env = Environment::builder();
                for (k, v) in function_env {
                    env = env.variables(k, v);
                }
                let mut req = c
                    .lambda
                    .create_function()
                    .function_name(name)
                    .package_type(PackageType::Image)
                    .code(FunctionCode::builder().image_uri(target).build())
                    .role(a.role_arn.clone().unwrap_or_default())
                    .timeout(a.timeout)
                    .memory_size(a.memory)
                    .architectures(Architecture::X8664)
                    .environment(env.build());
                if t.role == Role::Dispatcher {
                    req = req.image_config(
                        aws_sdk_lambda::types::ImageConfig::builder()
                            .entry_point("/opt/agentq/bin/agentq-dispatcher")
                            .command("lambda")
                            .build(),
                    );
                }
                req.send()
                    .await
                    .map_err(|e| aws_err("Lambda", "CreateFunction", name, e))?;
                wait_updated(c, name, a.wait_timeout).await?;
            }
            report.fn_step(
                name,
                "function",
                Action::Create,
                format!(
                    "{name} from {target} (timeout {}s, memory {} MB)",
                    a.timeout, a.memory
                ),
            );
        }
    }

    // ---- 4. version + alias
    let alias_version = match c
        .lambda
        .get_alias()
        .function_name(name)
        .name(&a.alias)
        .send()
        .await
    {
        Ok(out) => out.function_version().map(str::to_owned),
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_resource_not_found_exception()) =>
        {
            None
        }
        Err(e) => return Err(aws_err("Lambda", "GetAlias", name, e)),
    };
    // The code $LATEST runs now (after step 3), against the alias' version. In a dry
    // run with a pending code update the alias is behind by definition.
    let latest_sha = if a.dry_run {
        code_current
            .then(|| t.current.as_ref().and_then(|f| f.code_sha256.clone()))
            .flatten()
    } else {
        get_function(c, name, None)
            .await?
            .and_then(|f| f.code_sha256)
    };
    let alias_sha = match &alias_version {
        Some(v) => get_function(c, name, Some(v))
            .await?
            .and_then(|f| f.code_sha256),
        None => None,
    };
    let alias_current = latest_sha.is_some() && alias_sha == latest_sha;
    let version = if alias_current {
        let v = alias_version.as_deref().unwrap_or("?");
        report.fn_step(
            name,
            "version",
            Action::Unchanged,
            format!("version {v} runs {target}"),
        );
        report.fn_step(
            name,
            "alias",
            Action::Unchanged,
            format!("{} → version {v}", a.alias),
        );
        alias_version.clone()
    } else if a.dry_run {
        report.fn_step(
            name,
            "version",
            Action::Publish,
            format!("a version of {target}"),
        );
        report.fn_step(
            name,
            "alias",
            if alias_version.is_some() {
                Action::Update
            } else {
                Action::Create
            },
            format!(
                "{} {} → the new version",
                a.alias,
                alias_version
                    .as_deref()
                    .map(|v| format!("(now version {v})"))
                    .unwrap_or_default()
            ),
        );
        None
    } else {
        let v = c
            .lambda
            .publish_version()
            .function_name(name)
            .description(format!("agentq deploy of {target}"))
            .send()
            .await
            .map_err(|e| aws_err("Lambda", "PublishVersion", name, e))?
            .version()
            .unwrap_or_default()
            .to_owned();
        report.fn_step(
            name,
            "version",
            Action::Publish,
            format!("version {v} of {target}"),
        );
        if alias_version.is_some() {
            c.lambda
                .update_alias()
                .function_name(name)
                .name(&a.alias)
                .function_version(&v)
                .send()
                .await
                .map_err(|e| aws_err("Lambda", "UpdateAlias", name, e))?;
            report.fn_step(
                name,
                "alias",
                Action::Update,
                format!(
                    "{} → version {v} (was {})",
                    a.alias,
                    alias_version.as_deref().unwrap_or("?")
                ),
            );
        } else {
            c.lambda
                .create_alias()
                .function_name(name)
                .name(&a.alias)
                .function_version(&v)
                .send()
                .await
                .map_err(|e| aws_err("Lambda", "CreateAlias", name, e))?;
            report.fn_step(
                name,
                "alias",
                Action::Create,
                format!("{} → version {v}", a.alias),
            );
        }
        Some(v)
    };
    out.version = version.clone();

    // ---- 5. event source mapping on the alias
    let function_arn = match t.current.as_ref().map(|f| f.function_arn.clone()) {
        Some(arn) if !arn.is_empty() => arn,
        _ if a.dry_run => name.to_owned(),
        _ => get_function(c, name, None)
            .await?
            .map(|f| f.function_arn)
            .unwrap_or_else(|| name.to_owned()),
    };
    // The unqualified ARN plus the alias: what the mapping invokes.
    let alias_target = format!("{function_arn}:{}", a.alias);
    let queue_arn = &t.queue_arn;
    let mappings = c
        .lambda
        .list_event_source_mappings()
        .event_source_arn(queue_arn)
        .send()
        .await
        .map_err(|e| aws_err("Lambda", "ListEventSourceMappings", queue_arn, e))?;
    let existing = mappings
        .event_source_mappings()
        .iter()
        .find(|m| {
            m.function_arn()
                .and_then(arn_function_name)
                .is_some_and(|n| n == name)
        })
        .cloned();
    let settings = format!(
        "batch {}{}, ReportBatchItemFailures, max concurrency {}, {}",
        t.batch_size,
        if t.batching_window > 0 {
            format!(" (window {}s)", t.batching_window)
        } else {
            String::new()
        },
        t.max_concurrency
            .map_or_else(|| "unset".to_owned(), |n| n.to_string()),
        if a.enabled { "enabled" } else { "disabled" }
    );
    let scaling = t
        .max_concurrency
        .map(|n| ScalingConfig::builder().maximum_concurrency(n).build());
    match existing {
        None => {
            if !a.dry_run {
                let created = c
                    .lambda
                    .create_event_source_mapping()
                    .function_name(&alias_target)
                    .event_source_arn(queue_arn)
                    .batch_size(t.batch_size)
                    .maximum_batching_window_in_seconds(t.batching_window)
                    .function_response_types(FunctionResponseType::ReportBatchItemFailures)
                    .set_scaling_config(scaling)
                    .enabled(a.enabled)
                    .send()
                    .await
                    .map_err(|e| aws_err("Lambda", "CreateEventSourceMapping", queue_arn, e))?;
                out.mapping_uuid = created.uuid().map(str::to_owned);
            }
            report.fn_step(
                name,
                "event-source",
                Action::Create,
                format!("{queue_arn} → {name}:{} ({settings})", a.alias),
            );
        }
        Some(m) => {
            out.mapping_uuid = m.uuid().map(str::to_owned);
            let mut diffs = Vec::new();
            // An alias mapping reads back as the alias ARN (AWS) or the version ARN it
            // resolves to (moto): either is "on the alias".
            let q = m.function_arn().and_then(arn_qualifier);
            let on_alias = q == Some(a.alias.as_str())
                || (q.is_some() && q == version.as_deref() && alias_current);
            if !on_alias {
                diffs.push(format!(
                    "target {} → {name}:{}",
                    m.function_arn().unwrap_or("?"),
                    a.alias
                ));
            }
            if m.batch_size() != Some(t.batch_size) {
                diffs.push(format!(
                    "batch size {} → {}",
                    m.batch_size().unwrap_or_default(),
                    t.batch_size
                ));
            }
            if m.maximum_batching_window_in_seconds().unwrap_or(0) != t.batching_window {
                diffs.push(format!(
                    "batching window {} → {}",
                    m.maximum_batching_window_in_seconds().unwrap_or(0),
                    t.batching_window
                ));
            }
            if !m
                .function_response_types()
                .contains(&FunctionResponseType::ReportBatchItemFailures)
            {
                diffs.push("add ReportBatchItemFailures".into());
            }
            let conc = m.scaling_config().and_then(|s| s.maximum_concurrency());
            if t.max_concurrency.is_some() && conc != t.max_concurrency {
                diffs.push(format!(
                    "max concurrency {} → {}",
                    conc.map_or_else(|| "unset".into(), |n| n.to_string()),
                    t.max_concurrency.unwrap_or_default()
                ));
            }
            let enabled = matches!(m.state(), Some("Enabled" | "Enabling" | "Updating"));
            if enabled != a.enabled {
                diffs.push(format!(
                    "{} → {}",
                    if enabled { "enabled" } else { "disabled" },
                    if a.enabled { "enabled" } else { "disabled" }
                ));
            }
            let uuid = m.uuid().unwrap_or_default().to_owned();
            if diffs.is_empty() {
                report.fn_step(
                    name,
                    "event-source",
                    Action::Unchanged,
                    format!("{uuid}: {settings}"),
                );
            } else {
                if !a.dry_run {
                    let mut req = c
                        .lambda
                        .update_event_source_mapping()
                        .uuid(&uuid)
                        .batch_size(t.batch_size)
                        .maximum_batching_window_in_seconds(t.batching_window)
                        .function_response_types(FunctionResponseType::ReportBatchItemFailures)
                        .set_scaling_config(scaling)
                        .enabled(a.enabled);
                    if !on_alias {
                        req = req.function_name(&alias_target);
                    }
                    req.send()
                        .await
                        .map_err(|e| aws_err("Lambda", "UpdateEventSourceMapping", &uuid, e))?;
                }
                report.fn_step(
                    name,
                    "event-source",
                    Action::Update,
                    format!("{uuid}: {}", diffs.join(", ")),
                );
            }
        }
    }
    Ok(out)
}

/// Registry host, user and password from `GetAuthorizationToken`.
async fn ecr_login(
    c: &DeployClients,
    repo_uri: &str,
) -> Result<(String, String, String), DeployError> {
    let out = c
        .ecr
        .get_authorization_token()
        .send()
        .await
        .map_err(|e| aws_err("ECR", "GetAuthorizationToken", repo_uri, e))?;
    let data = out
        .authorization_data()
        .first()
        .ok_or_else(|| DeployError::Aws {
            service: "ECR",
            op: "GetAuthorizationToken",
            resource: repo_uri.to_owned(),
            message: "no authorization data returned".into(),
        })?;
    let token = data.authorization_token().unwrap_or_default();
    let decoded = aws_smithy_types::base64::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    let (user, password) = decoded.split_once(':').ok_or_else(|| DeployError::Aws {
        service: "ECR",
        op: "GetAuthorizationToken",
        resource: repo_uri.to_owned(),
        message: "the token is not base64 of USER:PASSWORD".into(),
    })?;
    let registry = data
        .proxy_endpoint()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("https://{}", repo_uri.split('/').next().unwrap_or(repo_uri)));
    Ok((registry, user.to_owned(), password.to_owned()))
}

/// Waits until the function's last update (or creation) finished, with backoff.
async fn wait_updated(
    c: &DeployClients,
    function: &str,
    timeout: Duration,
) -> Result<(), DeployError> {
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        let conf = c
            .lambda
            .get_function_configuration()
            .function_name(function)
            .send()
            .await
            .map_err(|e| aws_err("Lambda", "GetFunctionConfiguration", function, e))?;
        let state = conf.state().cloned();
        let status = conf.last_update_status().cloned();
        match (&state, &status) {
            (Some(State::Failed), _) | (_, Some(LastUpdateStatus::Failed)) => {
                return Err(DeployError::Aws {
                    service: "Lambda",
                    op: "UpdateFunctionCode",
                    resource: function.to_owned(),
                    message: format!(
                        "the update failed: {}",
                        conf.last_update_status_reason()
                            .or(conf.state_reason())
                            .unwrap_or("no reason given")
                    ),
                });
            }
            (Some(State::Pending), _) | (_, Some(LastUpdateStatus::InProgress)) => {}
            _ => return Ok(()),
        }
        if start.elapsed() >= timeout {
            return Err(DeployError::Timeout {
                function: function.to_owned(),
                what: "the code update",
                secs: timeout.as_secs(),
                status: format!("{state:?}/{status:?}"),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_uris_split() {
        let r = "1.dkr.ecr.us-east-1.amazonaws.com/agentq";
        assert_eq!(
            split_image_uri(&format!("{r}@sha256:ab")),
            (r, None, Some("sha256:ab"))
        );
        assert_eq!(split_image_uri(&format!("{r}:v1")), (r, Some("v1"), None));
        assert_eq!(split_image_uri(r), (r, None, None));
        assert_eq!(
            split_image_uri("localhost:5000/agentq:v2"),
            ("localhost:5000/agentq", Some("v2"), None)
        );
    }

    #[test]
    fn arns() {
        let arn = "arn:aws:lambda:us-east-1:1:function:agentq-agent:live";
        assert_eq!(arn_function_name(arn), Some("agentq-agent"));
        assert_eq!(arn_qualifier(arn), Some("live"));
        assert_eq!(
            arn_qualifier("arn:aws:lambda:us-east-1:1:function:agentq-agent"),
            None
        );
    }
}
