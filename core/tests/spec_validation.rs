//! Every way a spec can be bad (not JSON, not an object, unknown, missing and wrongly
//! typed fields, nested entries, broken rules) is refused with a message that names the
//! field and the fix; the checked-in JSON Schema matches the Rust type.

use agentq_core::spec::{
    JobSpec, MAX_PROMPT_BYTES, MAX_SPEC_BYTES, ValidationContext, expected, json_schema,
};

fn ctx() -> ValidationContext {
    ValidationContext {
        secrets_prefix: "/agentq/secrets/".into(),
    }
}

/// (case, spec JSON, field that must be named, a word the message must contain)
const BAD: &[(&str, &str, &str, &str)] = &[
    // The spec as a whole.
    ("not json", "{nope", "(spec)", "line 1, column 2"),
    (
        "not json, later line",
        "{\n  \"spec_version\": 1,\n  \"agent\": }",
        "(spec)",
        "line 3",
    ),
    ("truncated json", r#"{"spec_version":1"#, "(spec)", "ends"),
    ("empty body", "  ", "(spec)", "empty"),
    ("not an object", "[1,2]", "(spec)", "object"),
    ("a string", r#""hello""#, "(spec)", "not a JSON object"),
    // Field names.
    (
        "unknown field",
        r#"{"spec_version":1,"agent":"command","command":["true"],"colour":"red"}"#,
        "colour",
        "x-",
    ),
    (
        "second unknown field",
        r#"{"spec_version":1,"agent":"command","command":["true"],"colour":"red","size":3}"#,
        "size",
        "unknown field",
    ),
    (
        "missing agent",
        r#"{"spec_version":1,"command":["true"]}"#,
        "agent",
        "missing",
    ),
    (
        "missing spec_version",
        r#"{"agent":"command","command":["true"]}"#,
        "spec_version",
        "missing",
    ),
    // Wrong types, named by the path of the serde error.
    (
        "command not an array",
        r#"{"spec_version":1,"agent":"command","command":"not-an-array"}"#,
        "command",
        "an array of strings",
    ),
    (
        "argv entry not a string",
        r#"{"spec_version":1,"agent":"command","command":["echo",1]}"#,
        "command[1]",
        "got 1",
    ),
    (
        "argv entry an array",
        r#"{"spec_version":1,"agent":"command","command":[["echo"]]}"#,
        "command[0]",
        "got an array",
    ),
    (
        "env not an object",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":"A=B"}"#,
        "env",
        "an object",
    ),
    (
        "env value a number",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"FOO":1}}"#,
        "env.FOO",
        "in quotes",
    ),
    (
        "secret value a boolean",
        r#"{"spec_version":1,"agent":"command","command":["true"],"secrets":{"X":true}}"#,
        "secrets.X",
        "SSM parameter name",
    ),
    (
        "label value a number",
        r#"{"spec_version":1,"agent":"command","command":["true"],"labels":{"n":7}}"#,
        "labels.n",
        "got 7",
    ),
    (
        "timeout a string",
        r#"{"spec_version":1,"agent":"command","command":["true"],"timeout_seconds":"600"}"#,
        "timeout_seconds",
        "whole number of seconds",
    ),
    (
        "max_turns negative",
        r#"{"spec_version":1,"agent":"claude-code","prompt":"p","max_turns":-1}"#,
        "max_turns",
        "got -1",
    ),
    (
        "max_attempts fractional",
        r#"{"spec_version":1,"agent":"command","command":["true"],"max_attempts":1.5}"#,
        "max_attempts",
        "whole number",
    ),
    (
        "budget a string",
        r#"{"spec_version":1,"agent":"claude-code","prompt":"p","max_budget_usd":"5"}"#,
        "max_budget_usd",
        "US dollars",
    ),
    (
        "aws_credentials a string",
        r#"{"spec_version":1,"agent":"command","command":["true"],"aws_credentials":"yes"}"#,
        "aws_credentials",
        "true or false",
    ),
    (
        "unknown resume policy",
        r#"{"spec_version":1,"agent":"command","command":["true"],"resume":"sometimes"}"#,
        "resume",
        "\"never\"",
    ),
    (
        "agent null",
        r#"{"spec_version":1,"agent":null,"command":["true"]}"#,
        "agent",
        "got null",
    ),
    (
        "spec_version a string",
        r#"{"spec_version":"1","agent":"command","command":["true"]}"#,
        "spec_version",
        "the number 1",
    ),
    (
        "job_id a number",
        r#"{"spec_version":1,"job_id":42,"agent":"command","command":["true"]}"#,
        "job_id",
        "got 42",
    ),
    (
        "unknown preset",
        r#"{"spec_version":1,"agent":"gpt","command":["true"]}"#,
        "agent",
        "claude-code",
    ),
    // Rules.
    (
        "wrong version",
        r#"{"spec_version":2,"agent":"command","command":["true"]}"#,
        "spec_version",
        "1",
    ),
    (
        "job id path",
        r#"{"spec_version":1,"job_id":"../etc","agent":"command","command":["true"]}"#,
        "job_id",
        "A-Z",
    ),
    (
        "job id too long",
        r#"{"spec_version":1,"job_id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","agent":"command","command":["true"]}"#,
        "job_id",
        "64",
    ),
    (
        "command without argv",
        r#"{"spec_version":1,"agent":"command"}"#,
        "command",
        "argv",
    ),
    (
        "empty argv",
        r#"{"spec_version":1,"agent":"command","command":[]}"#,
        "command",
        "program",
    ),
    (
        "claude without prompt",
        r#"{"spec_version":1,"agent":"claude-code"}"#,
        "prompt",
        "required",
    ),
    (
        "codex blank prompt",
        r#"{"spec_version":1,"agent":"codex","prompt":"  "}"#,
        "prompt",
        "non-empty",
    ),
    (
        "argv with claude",
        r#"{"spec_version":1,"agent":"claude-code","prompt":"hi","command":["x"]}"#,
        "command",
        "agent",
    ),
    (
        "env AWS_ override",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"AWS_SECRET_ACCESS_KEY":"x"}}"#,
        "env.AWS_SECRET_ACCESS_KEY",
        "reserved",
    ),
    (
        "env LD_PRELOAD",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"LD_PRELOAD":"/x.so"}}"#,
        "env.LD_PRELOAD",
        "reserved",
    ),
    (
        "env PATH",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"PATH":"/evil"}}"#,
        "env.PATH",
        "cannot be overridden",
    ),
    (
        "env HOME",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"HOME":"/root"}}"#,
        "env.HOME",
        "cannot be overridden",
    ),
    (
        "env bad name",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"1X":"y"}}"#,
        "env.1X",
        "variable name",
    ),
    (
        "secret outside prefix",
        r#"{"spec_version":1,"agent":"command","command":["true"],"secrets":{"TOKEN":"/prod/db/password"}}"#,
        "secrets.TOKEN",
        "outside the allowed prefix",
    ),
    (
        "secret dot-dot escape",
        r#"{"spec_version":1,"agent":"command","command":["true"],"secrets":{"TOKEN":"/agentq/secrets/../prod"}}"#,
        "secrets.TOKEN",
        "prefix",
    ),
    (
        "secret also env",
        r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"TOKEN":"a"},"secrets":{"TOKEN":"/agentq/secrets/t"}}"#,
        "secrets.TOKEN",
        "both",
    ),
    (
        "timeout too small",
        r#"{"spec_version":1,"agent":"command","command":["true"],"timeout_seconds":1}"#,
        "timeout_seconds",
        "5..=",
    ),
    (
        "timeout too large",
        r#"{"spec_version":1,"agent":"command","command":["true"],"timeout_seconds":999999}"#,
        "timeout_seconds",
        "segments",
    ),
    (
        "max_turns zero",
        r#"{"spec_version":1,"agent":"claude-code","prompt":"p","max_turns":0}"#,
        "max_turns",
        "1..=",
    ),
    (
        "negative budget",
        r#"{"spec_version":1,"agent":"claude-code","prompt":"p","max_budget_usd":-1}"#,
        "max_budget_usd",
        "positive",
    ),
    (
        "max_attempts too many",
        r#"{"spec_version":1,"agent":"command","command":["true"],"max_attempts":99}"#,
        "max_attempts",
        "1..=20",
    ),
    (
        "bad tier",
        r#"{"spec_version":1,"agent":"command","command":["true"],"tier":"Big Tier"}"#,
        "tier",
        "a-z",
    ),
];

#[test]
fn every_rule_names_the_field_and_the_fix() {
    assert!(BAD.len() >= 12);
    for (case, json, field, word) in BAD {
        let err =
            JobSpec::parse_valid(json.as_bytes(), &ctx()).expect_err(&format!("{case}: accepted"));
        assert!(
            err.names_field(field),
            "{case}: expected field {field:?}, got {err}"
        );
        let text = err.to_string();
        assert!(text.contains(word), "{case}: {text:?} lacks {word:?}");
    }
}

#[test]
fn all_violations_are_reported_at_once() {
    let json = r#"{"spec_version":1,"agent":"command","command":["true"],"env":{"PATH":"x","LD_X":"y"},"timeout_seconds":1}"#;
    let err = JobSpec::parse_valid(json.as_bytes(), &ctx()).unwrap_err();
    assert_eq!(err.violations().len(), 3, "{err}");
}

#[test]
fn every_shape_problem_is_reported_at_once() {
    // Unknown, missing and wrongly typed fields, all in one spec.
    let json = r#"{"spec_version":1,"command":"x","env":{"A":1},"timeout_seconds":"9","colour":1}"#;
    let err = JobSpec::from_json(json.as_bytes()).unwrap_err();
    let fields: Vec<String> = err.violations().into_iter().map(|v| v.field).collect();
    assert_eq!(
        fields,
        ["colour", "agent", "command", "env.A", "timeout_seconds"],
        "{err}"
    );
}

#[test]
fn every_field_has_a_type_description() {
    for f in agentq_core::spec::KNOWN_FIELDS {
        assert!(
            !expected(f, false).contains("another type"),
            "no description of {f}"
        );
    }
    for f in ["command", "env", "secrets", "labels"] {
        assert_ne!(expected(f, true), expected(f, false), "{f} entries");
    }
}

#[test]
fn size_limit_accepts_whatever_the_field_limits_accept() {
    // A maximal prompt whose JSON escaping doubles it is still a valid spec.
    let prompt = "\"".repeat(MAX_PROMPT_BYTES);
    let json =
        serde_json::json!({"spec_version": 1, "agent": "codex", "prompt": prompt}).to_string();
    assert!(json.len() > 2 * MAX_PROMPT_BYTES);
    JobSpec::parse_valid(json.as_bytes(), &ctx()).expect("a maximal prompt is accepted");
    // Above the whole-spec limit: named against the spec.
    let json = serde_json::json!({"spec_version": 1, "agent": "command", "command": ["true"],
        "x-blob": "b".repeat(MAX_SPEC_BYTES)})
    .to_string();
    let err = JobSpec::from_json(json.as_bytes()).unwrap_err();
    assert!(
        err.names_field("(spec)") && err.to_string().contains("2 MiB"),
        "{err}"
    );
}

#[test]
fn good_specs_pass_and_get_an_id() {
    let good = [
        r#"{"spec_version":1,"agent":"command","command":["true"]}"#,
        r#"{"spec_version":1,"job_id":"fix-bug-42","agent":"claude-code","prompt":"fix the bug","max_turns":20,"max_budget_usd":2.5,"secrets":{"GITHUB_TOKEN":"/agentq/secrets/github/token"},"labels":{"team":"core"},"timeout_seconds":3600,"resume":"auto","tier":"large"}"#,
        r#"{"spec_version":1,"agent":"codex","prompt":"write tests","env":{"RUST_LOG":"debug"},"x-upstream":{"ticket":42}}"#,
    ];
    for g in good {
        let v = JobSpec::parse_valid(g.as_bytes(), &ctx()).unwrap_or_else(|e| panic!("{g}: {e}"));
        assert!(!v.job_id.as_str().is_empty());
        // Round trip keeps extensions and the id.
        let again = JobSpec::parse_valid(v.to_json().as_bytes(), &ctx()).unwrap();
        assert_eq!(again.job_id, v.job_id);
        assert_eq!(again.spec.extensions, v.spec.extensions);
    }
}

#[test]
fn checked_in_schema_matches_the_rust_type() {
    let path = agentq_testkit::repo_root().join("docs/job-spec.schema.json");
    let generated = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
    if std::env::var_os("AGENTQ_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/job-spec.schema.json is out of date with core/src/spec.rs: run `AGENTQ_BLESS=1 cargo test -p agentq-core --test spec_validation` and commit the file"
    );
}

#[test]
fn schema_knows_every_field_the_parser_knows() {
    let schema = json_schema();
    let props = schema["properties"].as_object().unwrap();
    for f in agentq_core::spec::KNOWN_FIELDS {
        assert!(props.contains_key(*f), "schema lacks {f}");
    }
    assert_eq!(props.len(), agentq_core::spec::KNOWN_FIELDS.len());
}
