//! Every validation rule rejects a bad spec with a message that names the field, and the
//! checked-in JSON Schema matches the Rust type.

use agentq_core::spec::{JobSpec, ValidationContext, json_schema};

fn ctx() -> ValidationContext {
    ValidationContext {
        secrets_prefix: "/agentq/secrets/".into(),
    }
}

/// (case, spec JSON, field that must be named, a word the message must contain)
const BAD: &[(&str, &str, &str, &str)] = &[
    ("not json", "{nope", "(spec)", "JSON"),
    ("not an object", "[1,2]", "(spec)", "object"),
    (
        "unknown field",
        r#"{"spec_version":1,"agent":"command","command":["true"],"colour":"red"}"#,
        "colour",
        "x-",
    ),
    (
        "missing agent",
        r#"{"spec_version":1,"command":["true"]}"#,
        "agent",
        "missing",
    ),
    (
        "unknown preset",
        r#"{"spec_version":1,"agent":"gpt","command":["true"]}"#,
        "agent",
        "claude-code",
    ),
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
    (
        "wrong type",
        r#"{"spec_version":1,"agent":"command","command":"true"}"#,
        "(spec)",
        "sequence",
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
