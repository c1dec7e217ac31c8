//! The job spec reference stays complete and correct: every field of the checked-in JSON
//! Schema is documented in `docs/job-spec.md`, every ```json example there is a valid
//! spec, and the exit codes are documented once, in the README.

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
fn exit_codes_are_documented_once_in_the_readme() {
    use agentq_core::ExitStatus;
    let readme = std::fs::read_to_string(docs().join("../README.md")).expect("README.md");
    for status in ExitStatus::ALL {
        let code = status.code();
        assert!(
            readme.contains(&format!("\n| {code} | ")),
            "README.md has no row for exit code {code}"
        );
    }
    // The other pages point there instead of repeating the table.
    for page in ["job-spec.md", "producer.md", "dispatcher.md"] {
        let text = std::fs::read_to_string(docs().join(page)).expect(page);
        assert!(
            !text.contains("\n| 6 | "),
            "{page} repeats the exit-code table; link to README.md#exit-codes"
        );
    }
}
