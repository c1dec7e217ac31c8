//! The job spec (v1): what upstream systems put on the queue, how it is parsed
//! (unknown fields refused unless they start with `x-`), and every validation rule, each
//! of which names the field and the fix.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::JobId;

/// The only spec version this build understands.
pub const SPEC_VERSION: u32 = 1;
/// Largest serialized spec accepted anywhere. Specs above the producer's offload
/// threshold travel through S3 (SQS Extended Client pointer), so this is not SQS' limit:
/// it bounds what an agent reads per message, with room for a maximal prompt
/// ([`MAX_PROMPT_BYTES`]) even when JSON escaping doubles it.
pub const MAX_SPEC_BYTES: usize = 2 * 1024 * 1024;
/// Largest prompt.
pub const MAX_PROMPT_BYTES: usize = 512 * 1024;
/// Default per-job timeout when the spec gives none.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 900;
/// Shortest timeout accepted.
pub const MIN_TIMEOUT_SECONDS: u64 = 5;
/// Longest total run time (across resumed segments) accepted.
pub const MAX_TIMEOUT_SECONDS: u64 = 12 * 3600;
/// Largest `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;
/// Largest total of `env` names and values (Lambda itself allows 4 KB of function env;
/// a child's env is ours, but a spec is not the place for data).
pub const MAX_ENV_BYTES: usize = 32 * 1024;
/// Most labels.
pub const MAX_LABELS: usize = 32;

/// Which agent CLI runs the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AgentPreset {
    /// Claude Code, headless: `claude -p PROMPT --output-format stream-json --verbose`.
    ClaudeCode,
    /// Codex CLI, headless: `codex exec --json PROMPT`.
    Codex,
    /// Any program: `command` is the argv, run as given.
    Command,
}

impl AgentPreset {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClaudeCode => "claude-code",
            Self::Codex => "codex",
            Self::Command => "command",
        }
    }
}

impl fmt::Display for AgentPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do when a job runs out of time in one Lambda invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ResumePolicy {
    /// Resume the agent session in a new segment while the total timeout allows (default).
    #[default]
    Auto,
    /// Never resume: a timed-out segment ends the job (or escalates to a bigger tier).
    Never,
}

/// A job spec, version 1. See `docs/job-spec.md` and `docs/job-spec.schema.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "agentq job spec v1")]
pub struct JobSpec {
    /// Always 1.
    pub spec_version: u32,
    /// 1–64 characters of `A-Z a-z 0-9 _ -`. Generated (ULID) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub job_id: Option<String>,
    /// The agent CLI preset.
    pub agent: AgentPreset,
    /// The task for `claude-code` and `codex` (required there); optional for `command`,
    /// where it is passed to the child as `AGENTQ_PROMPT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// argv for the `command` preset (required there, refused elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Non-secret environment for the child. `AWS_*`, `LD_*`, `AGENTQ_*`, `PATH`, `HOME`,
    /// `TMPDIR` and `PWD` cannot be overridden.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Secrets: child env var name → SSM parameter name, which must sit under the
    /// configured secrets prefix. Values are read with decryption and redacted from logs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Total run time allowed, across resumed segments (default 900, 5..=43200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Passed to the agent CLI (`--max-turns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    /// Passed to the agent CLI as a budget cap; also a re-plan budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Model name passed to the agent CLI (`--model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Free-form labels, stored on the job record.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How many attempts re-planning may spend on this job (default 3, 1..=20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// What to do when a segment times out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumePolicy>,
    /// The capacity tier to run on (e.g. `default`, `large`); the dispatcher may escalate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,32}$"))]
    pub tier: Option<String>,
    /// Ask for short-lived AWS credentials in the child's environment: the agent's job
    /// role (`AGENTQ_JOB_ROLE_ARN`), narrowed to the job's own data prefix in the bucket.
    /// Refused (as `secret_denied`) where the agent has no job role. Default false: the
    /// child gets no AWS credentials at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_credentials: Option<bool>,
    /// Extension fields: any key starting with `x-`, kept and passed through untouched.
    /// (Kept out of the derived serde impls so that `deny_unknown_fields` holds for the
    /// rest; [`JobSpec::from_json`] and [`JobSpec::to_json`] handle them.)
    #[serde(skip)]
    pub extensions: BTreeMap<String, Value>,
}

/// One broken rule: the field, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecViolation {
    /// JSON path of the field, e.g. `env.PATH` or `command`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for SpecViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a spec was refused. Never retryable: the same bytes fail the same way.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The spec as a whole is unusable: not JSON (with line and column), not a JSON
    /// object, or too large. The field is [`SPEC_FIELD`].
    #[error("job spec is not valid: {0}")]
    Parse(SpecViolation),
    /// Fields are wrong: unknown, missing, of the wrong type, or breaking a rule. Every
    /// violation names its field.
    #[error("job spec is not valid: {}", join(.0))]
    Invalid(Vec<SpecViolation>),
}

fn join(v: &[SpecViolation]) -> String {
    v.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl SpecError {
    /// Every violation, for display or for a failure record.
    pub fn violations(&self) -> Vec<SpecViolation> {
        match self {
            Self::Parse(v) => vec![v.clone()],
            Self::Invalid(v) => v.clone(),
        }
    }

    /// True when any violation names `field` (test helper and for callers that branch).
    pub fn names_field(&self, field: &str) -> bool {
        self.violations().iter().any(|v| v.field == field)
    }
}

/// Limits that depend on deployment settings rather than on the spec itself.
#[derive(Debug, Clone)]
pub struct ValidationContext {
    /// SSM path prefix every secret must sit under, e.g. `/agentq/secrets/`.
    pub secrets_prefix: String,
}

impl Default for ValidationContext {
    fn default() -> Self {
        Self {
            secrets_prefix: crate::config::DEFAULT_SECRETS_PREFIX.to_owned(),
        }
    }
}

/// A spec that passed validation, with its job id settled.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    pub job_id: JobId,
    pub spec: JobSpec,
}

impl ValidSpec {
    pub fn timeout_seconds(&self) -> u64 {
        self.spec.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS)
    }
    pub fn max_attempts(&self) -> u32 {
        self.spec.max_attempts.unwrap_or(3)
    }
    pub fn resume_policy(&self) -> ResumePolicy {
        self.spec.resume.unwrap_or_default()
    }
    pub fn tier(&self) -> &str {
        self.spec.tier.as_deref().unwrap_or("default")
    }
    /// The spec as stored and sent, with the job id filled in.
    pub fn to_json(&self) -> String {
        let mut spec = self.spec.clone();
        spec.job_id = Some(self.job_id.to_string());
        spec.to_json()
    }
}

impl JobSpec {
    /// A minimal spec for a preset; fill in the rest with struct update syntax.
    pub fn new(agent: AgentPreset) -> Self {
        Self {
            spec_version: SPEC_VERSION,
            job_id: None,
            agent,
            prompt: None,
            command: None,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            timeout_seconds: None,
            max_turns: None,
            max_budget_usd: None,
            model: None,
            labels: BTreeMap::new(),
            max_attempts: None,
            resume: None,
            tier: None,
            aws_credentials: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Parses JSON bytes. Every problem names its field: unknown fields (except `x-…`),
    /// missing required fields and wrong types (by the path of the serde error, e.g.
    /// `command`, `env.FOO`, `command[1]`) are all reported at once; bytes that are not
    /// JSON are reported with their line and column.
    pub fn from_json(bytes: &[u8]) -> Result<JobSpec, SpecError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(whole(format!(
                "is {} bytes; the limit is {MAX_SPEC_BYTES} (2 MiB): put large inputs in S3 and have the job fetch them",
                bytes.len()
            )));
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| not_json(&e, bytes))?;
        let Value::Object(mut map) = value else {
            return Err(whole(format!(
                "is {}, not a JSON object: a spec is an object like {{\"spec_version\":1,\"agent\":\"command\",\"command\":[\"true\"]}}",
                describe(&value)
            )));
        };
        let mut extensions = BTreeMap::new();
        let mut violations = Vec::new();
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            if k.starts_with("x-") {
                if let Some(v) = map.remove(&k) {
                    extensions.insert(k, v);
                }
            } else if !KNOWN_FIELDS.contains(&k.as_str()) {
                map.remove(&k);
                violations.push(SpecViolation {
                    message: format!(
                        "unknown field; known fields are {}; put your own data under a key starting with `x-`",
                        KNOWN_FIELDS.join(", ")
                    ),
                    field: k,
                });
            }
        }
        for required in REQUIRED_FIELDS {
            if !map.contains_key(*required) {
                violations.push(SpecViolation {
                    field: (*required).to_owned(),
                    message: format!(
                        "is missing; every spec needs it: give {}",
                        expected(required, false)
                    ),
                });
            }
        }
        let map = Value::Object(map);
        let parsed = serde_path_to_error::deserialize::<_, JobSpec>(&map);
        if violations.is_empty()
            && let Ok(mut spec) = parsed
        {
            spec.extensions = extensions;
            return Ok(spec);
        }
        if let Err(e) = parsed {
            violations.extend(type_violations(&map, &e));
            if violations.is_empty() {
                // Not expected (every field is described); never leave the list empty.
                violations.push(SpecViolation {
                    field: SPEC_FIELD.into(),
                    message: format!("{}: see docs/job-spec.md", e.inner()),
                });
            }
        }
        Err(SpecError::Invalid(violations))
    }

    /// Serializes the spec, `x-` extensions included.
    pub fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            for (k, v) in &self.extensions {
                map.insert(k.clone(), v.clone());
            }
        }
        value.to_string()
    }

    /// Parses and validates in one step.
    pub fn parse_valid(bytes: &[u8], ctx: &ValidationContext) -> Result<ValidSpec, SpecError> {
        Self::from_json(bytes)?.validate(ctx)
    }

    /// Checks every rule; returns all violations, not just the first.
    pub fn validate(self, ctx: &ValidationContext) -> Result<ValidSpec, SpecError> {
        let mut v = Vec::new();
        let mut bad = |field: &str, message: String| {
            v.push(SpecViolation {
                field: field.to_owned(),
                message,
            })
        };

        if self.spec_version != SPEC_VERSION {
            bad(
                "spec_version",
                format!(
                    "version {} is not supported: set \"spec_version\": {SPEC_VERSION}",
                    self.spec_version
                ),
            );
        }
        let job_id = match &self.job_id {
            None => Some(JobId::generate()),
            Some(s) => match JobId::parse(s) {
                Ok(id) => Some(id),
                Err(e) => {
                    bad("job_id", e.to_string());
                    None
                }
            },
        };

        let prompt_len = self.prompt.as_deref().map(str::len);
        match self.agent {
            AgentPreset::ClaudeCode | AgentPreset::Codex => {
                if self.prompt.as_deref().is_none_or(|p| p.trim().is_empty()) {
                    bad(
                        "prompt",
                        format!(
                            "required for agent \"{}\": give the task as a non-empty string",
                            self.agent
                        ),
                    );
                }
                if self.command.is_some() {
                    bad(
                        "command",
                        format!(
                            "only allowed with agent \"command\"; remove it, or set \"agent\": \"command\" (agent \"{}\" builds its own argv)",
                            self.agent
                        ),
                    );
                }
            }
            AgentPreset::Command => match &self.command {
                None => bad(
                    "command",
                    "required for agent \"command\": give the argv as an array, e.g. [\"python3\", \"task.py\"]".into(),
                ),
                Some(argv) if argv.is_empty() => bad(
                    "command",
                    "is empty: give at least the program, e.g. [\"./run.sh\"]".into(),
                ),
                Some(argv) => {
                    for (i, a) in argv.iter().enumerate() {
                        if a.contains('\0') {
                            bad(
                                &format!("command[{i}]"),
                                "contains a NUL byte, which no argv can carry: remove it".into(),
                            );
                        }
                    }
                    if argv[0].is_empty() {
                        bad(
                            "command[0]",
                            "the program name is empty: name a program on PATH or an absolute path"
                                .into(),
                        );
                    }
                }
            },
        }
        if let Some(n) = prompt_len
            && n > MAX_PROMPT_BYTES
        {
            bad(
                "prompt",
                format!(
                    "is {n} bytes; the limit is {MAX_PROMPT_BYTES}: put large context in a file the job fetches"
                ),
            );
        }

        let mut env_bytes = 0usize;
        for (k, val) in &self.env {
            env_bytes += k.len() + val.len();
            let field = format!("env.{k}");
            if !is_env_name(k) {
                bad(
                    &field,
                    "is not a valid variable name: use letters, digits and _ and do not start with a digit".into(),
                );
            } else if let Some(why) = forbidden_env(k) {
                bad(&field, why);
            }
            if val.contains('\0') {
                bad(&field, "value contains a NUL byte: remove it".into());
            }
        }
        if env_bytes > MAX_ENV_BYTES {
            bad(
                "env",
                format!(
                    "names and values total {env_bytes} bytes; the limit is {MAX_ENV_BYTES}: pass data in the prompt or a file"
                ),
            );
        }

        for (k, param) in &self.secrets {
            let field = format!("secrets.{k}");
            if !is_env_name(k) {
                bad(
                    &field,
                    "is not a valid variable name: use letters, digits and _ and do not start with a digit".into(),
                );
            } else if let Some(why) = forbidden_env(k) {
                bad(&field, why);
            } else if self.env.contains_key(k) {
                bad(
                    &field,
                    format!(
                        "also set in env.{k}: a variable is either plain env or a secret, not both"
                    ),
                );
            }
            if !secret_name_allowed(param, &ctx.secrets_prefix) {
                bad(
                    &field,
                    format!(
                        "parameter {param:?} is outside the allowed prefix {:?}: store it under that path",
                        ctx.secrets_prefix
                    ),
                );
            }
        }

        if let Some(t) = self.timeout_seconds
            && !(MIN_TIMEOUT_SECONDS..=MAX_TIMEOUT_SECONDS).contains(&t)
        {
            bad(
                "timeout_seconds",
                format!(
                    "{t} is out of range: use {MIN_TIMEOUT_SECONDS}..={MAX_TIMEOUT_SECONDS} (longer than one Lambda run is done by resuming in segments)"
                ),
            );
        }
        if let Some(n) = self.max_turns
            && !(1..=10_000).contains(&n)
        {
            bad(
                "max_turns",
                format!("{n} is out of range: use 1..=10000, or omit it"),
            );
        }
        if let Some(b) = self.max_budget_usd
            && !(b.is_finite() && b > 0.0 && b <= 10_000.0)
        {
            bad(
                "max_budget_usd",
                format!("{b} is out of range: use a positive amount up to 10000, or omit it"),
            );
        }
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS_LIMIT).contains(&n)
        {
            bad(
                "max_attempts",
                format!("{n} is out of range: use 1..={MAX_ATTEMPTS_LIMIT}"),
            );
        }
        if let Some(t) = &self.tier
            && (t.is_empty()
                || t.len() > 32
                || !t
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        {
            bad(
                "tier",
                format!("{t:?} is not a tier name: use 1-32 characters of a-z 0-9 -"),
            );
        }
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > 128 || m.starts_with('-'))
        {
            bad(
                "model",
                "must be 1-128 characters and not start with '-'".into(),
            );
        }
        if self.labels.len() > MAX_LABELS {
            bad(
                "labels",
                format!(
                    "{} labels; the limit is {MAX_LABELS}: keep labels for filtering, data elsewhere",
                    self.labels.len()
                ),
            );
        }
        for (k, val) in &self.labels {
            if k.is_empty() || k.len() > 64 || val.len() > 256 {
                bad(
                    &format!("labels.{k}"),
                    "keys must be 1-64 bytes and values at most 256 bytes".into(),
                );
            }
        }

        match (v.is_empty(), job_id) {
            (true, Some(job_id)) => Ok(ValidSpec { job_id, spec: self }),
            _ => Err(SpecError::Invalid(v)),
        }
    }
}

/// Field names of spec v1, in documentation order.
pub const KNOWN_FIELDS: &[&str] = &[
    "spec_version",
    "job_id",
    "agent",
    "prompt",
    "command",
    "env",
    "secrets",
    "timeout_seconds",
    "max_turns",
    "max_budget_usd",
    "model",
    "labels",
    "max_attempts",
    "resume",
    "tier",
    "aws_credentials",
];

/// Fields every spec must have.
pub const REQUIRED_FIELDS: &[&str] = &["spec_version", "agent"];

/// What a field holds, for "expected …, got …" messages; `nested` for the entries of an
/// array or object field (`command[0]`, `env.NAME`).
pub fn expected(field: &str, nested: bool) -> &'static str {
    match (field, nested) {
        ("spec_version", _) => "the number 1",
        ("job_id", _) => "a string of 1-64 characters A-Z a-z 0-9 _ - (or leave it out)",
        ("agent", _) => r#"one of "claude-code", "codex", "command""#,
        ("prompt", _) | ("model", _) => "a string",
        ("command", false) => r#"an array of strings, e.g. ["python3", "task.py"]"#,
        ("command", true) => "a string (every argv entry is a string)",
        ("env", false) => r#"an object of "NAME": "value" strings"#,
        ("secrets", false) => r#"an object of "NAME": "/ssm/parameter/name" strings"#,
        ("secrets", true) => r#"an SSM parameter name as a string, e.g. "/agentq/secrets/token""#,
        ("labels", false) => r#"an object of "key": "value" strings"#,
        ("env", true) | ("labels", true) => "a string (write numbers and booleans in quotes)",
        ("timeout_seconds", _) => "a whole number of seconds, 5..=43200",
        ("max_turns", _) => "a whole number, 1..=10000",
        ("max_budget_usd", _) => "a number of US dollars, e.g. 2.5",
        ("max_attempts", _) => "a whole number, 1..=20",
        ("resume", _) => r#""auto" or "never""#,
        ("tier", _) => "a string of a-z 0-9 - (1-32 characters)",
        ("aws_credentials", _) => "true or false",
        _ => "another type (see docs/job-spec.md)",
    }
}

/// A violation of the spec as a whole.
fn whole(message: String) -> SpecError {
    SpecError::Parse(SpecViolation {
        field: SPEC_FIELD.into(),
        message,
    })
}

/// The field name used for problems of the spec as a whole.
pub const SPEC_FIELD: &str = "(spec)";

/// Bytes that are not JSON: where (line, column) and what the parser expected there.
fn not_json(e: &serde_json::Error, bytes: &[u8]) -> SpecError {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return whole("is empty: send one JSON object per message".into());
    }
    // serde_json's own text ends with " at line L column C"; the position is given
    // separately, from the typed accessors.
    let text = e.to_string();
    let detail = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(d, _)| d);
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the text ends before the JSON does",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data | serde_json::error::Category::Io => "invalid JSON",
    };
    whole(format!(
        "not JSON: {what} at line {}, column {} ({detail}): send one JSON object per message",
        e.line(),
        e.column()
    ))
}

/// A JSON value as a message shows it.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if short.len() < s.len() { "…" } else { "" };
            format!("a string ({short:?}{more})")
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// The path of a serde error as a field name (`env.FOO`, `command[1]`), and the value
/// found there.
fn locate<'a>(
    root: &'a Value,
    path: &serde_path_to_error::Path,
) -> (String, bool, Option<&'a Value>) {
    use serde_path_to_error::Segment;
    let mut field = String::new();
    let mut nested = false;
    let mut at = Some(root);
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => {
                field.push_str(&format!("[{index}]"));
                at = at.and_then(|v| v.get(*index));
                nested = true;
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !field.is_empty() {
                    field.push('.');
                    nested = true;
                }
                field.push_str(key);
                at = at.and_then(|v| v.get(key));
            }
            Segment::Unknown => {
                field.push_str(if field.is_empty() { "?" } else { ".?" });
                at = None;
            }
        }
    }
    (field, nested, at)
}

/// One violation per field whose value has the wrong type. The first is where serde
/// stopped (`first`); the rest are found by deserializing each remaining field on its own
/// (next to placeholders for the required fields), so one pass reports them all.
fn type_violations(
    root: &Value,
    first: &serde_path_to_error::Error<serde_json::Error>,
) -> Vec<SpecViolation> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut push = |path: &serde_path_to_error::Path, out: &mut Vec<SpecViolation>| {
        let (field, nested, value) = locate(root, path);
        if field.is_empty() || field == "?" {
            return;
        }
        let top = field.split(['.', '[']).next().unwrap_or(&field).to_owned();
        if !seen.insert(top.clone()) {
            return;
        }
        let message = match value {
            Some(v) => format!("expected {}, got {}", expected(&top, nested), describe(v)),
            None => format!("expected {}", expected(&top, nested)),
        };
        out.push(SpecViolation { field, message });
    };
    push(first.path(), &mut out);
    if let Value::Object(map) = root {
        for (k, v) in map {
            let mut probe = serde_json::Map::new();
            probe.insert("spec_version".into(), Value::from(SPEC_VERSION));
            probe.insert("agent".into(), Value::from(AgentPreset::Command.as_str()));
            probe.insert(k.clone(), v.clone());
            if let Err(e) = serde_path_to_error::deserialize::<_, JobSpec>(&Value::Object(probe)) {
                push(e.path(), &mut out);
            }
        }
    }
    out
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && k.len() <= 256
}

fn forbidden_env(k: &str) -> Option<String> {
    let upper = k.to_ascii_uppercase();
    for p in ["AWS_", "LD_", "AGENTQ_", "DYLD_"] {
        if upper.starts_with(p) {
            return Some(format!(
                "variables starting with {p} are reserved: the agent sets them (AWS access is given by the operator, not the job); rename it"
            ));
        }
    }
    for n in ["PATH", "HOME", "TMPDIR", "PWD", "SHELL", "NODE_OPTIONS"] {
        if upper == n {
            return Some(format!(
                "{n} is set by the agent for the job's workspace and cannot be overridden; remove it"
            ));
        }
    }
    None
}

/// A secret parameter must be an absolute SSM name under `prefix` with no `..` segment.
pub fn secret_name_allowed(param: &str, prefix: &str) -> bool {
    let prefix = if prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    };
    param.starts_with(&prefix)
        && param.len() > prefix.len()
        && !param.split('/').any(|seg| seg == ".." || seg == ".")
        && param
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
}

/// The JSON Schema of spec v1, as checked in at `docs/job-spec.schema.json`.
pub fn json_schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(JobSpec)).unwrap_or_default();
    if let Value::Object(map) = &mut schema {
        // `x-` extension keys are allowed; anything else unknown is refused.
        map.insert("additionalProperties".into(), Value::Bool(false));
        map.insert("patternProperties".into(), serde_json::json!({ "^x-": {} }));
    }
    schema
}
