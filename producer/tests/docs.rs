//! The job spec reference stays complete and correct: every field of the checked-in JSON
//! Schema is documented in `docs/job-spec.md`, every ```json example there is a valid
//! spec, and the exit codes there are the binary's.

use std::path::PathBuf;

use agentq_core::spec::{JobSpec, ValidationContext};

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn reference() -> String {
    std::fs::read_to_string(docs().join("job-spec.md")).expect("docs/job-spec.md")
}

/// The contents of every fenced block tagged `lang`.
fn blocks(doc: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in doc.lines() {
        let fence = line.trim_start();
        match &mut cur {
            None if fence.starts_with("```") && fence.trim_start_matches('`').trim() == lang => {
                cur = Some(String::new());
            }
            Some(body) if fence.starts_with("```") => {
                out.push(std::mem::take(body));
                cur = None;
            }
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn every_schema_field_is_documented() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("job-spec.schema.json")).expect("schema"),
    )
    .expect("schema is JSON");
    let doc = reference();
    let props = schema["properties"].as_object().expect("properties");
    assert!(props.len() >= 15);
    for field in props.keys() {
        assert!(
            doc.contains(&format!("| `{field}` |")),
            "docs/job-spec.md has no row for `{field}` in its field table"
        );
    }
}

#[test]
fn json_examples_are_valid_specs_and_cover_every_preset() {
    let doc = reference();
    let examples = blocks(&doc, "json");
    assert!(examples.len() >= 4, "{} examples", examples.len());
    let mut presets = std::collections::BTreeSet::new();
    for ex in &examples {
        let valid = JobSpec::parse_valid(ex.as_bytes(), &ValidationContext::default())
            .unwrap_or_else(|e| panic!("example is not a valid spec: {e}\n{ex}"));
        presets.insert(valid.spec.agent.as_str());
    }
    assert_eq!(
        presets.into_iter().collect::<Vec<_>>(),
        ["claude-code", "codex", "command"]
    );
}

#[test]
fn exit_codes_match_the_binary() {
    use agentq_producer::cli::{EXIT_CODES_HELP, exit_code};
    let doc = reference();
    for code in [
        exit_code::OK,
        exit_code::OTHER,
        exit_code::USAGE,
        exit_code::NOT_FOUND,
        exit_code::JOB_UNSUCCESSFUL,
        exit_code::SERVICE,
        exit_code::ALREADY_EXISTS,
    ] {
        assert!(
            doc.contains(&format!("\n| {code} | ")),
            "code {code} not in the doc"
        );
        assert!(
            EXIT_CODES_HELP.contains(&format!("\n  {code}  ")),
            "code {code} not in --help"
        );
    }
}
