//! Fuzzing the job-spec parser (`JobSpec::parse_valid`) as properties: arbitrary bytes
//! and arbitrary JSON objects over the spec's fields never panic; an accepted spec
//! round-trips through its stored form; a refusal has at least one violation, each with
//! a message; progress clamping holds for any input. A short run in the
//! default test command; longer runs by hand:
//!
//! `PROPTEST_CASES=100000 cargo test -p agentq-core --test fuzz_spec --release`

use agentq_core::Progress;
use agentq_core::record::clean_text;
use agentq_core::spec::{JobSpec, KNOWN_FIELDS, MAX_SPEC_BYTES, SpecError, ValidationContext};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..100).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(1)),
        Just(json!(4294967296u64)),
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_-]{0,70}",
        any::<String>(),
        prop::sample::select(vec![
            "claude-code",
            "codex",
            "command",
            "auto",
            "never",
            "default",
            "/agentq/secrets/x",
            "/agentq/secrets/../x",
            "PATH",
            "AWS_SECRET_ACCESS_KEY",
            "-m",
            "a\u{0}b",
        ])
        .prop_map(str::to_owned),
        (1usize..3000).prop_map(|n| "k".repeat(n)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((string(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Mostly the spec's own fields with values of the right type (so that validation is
/// reached), sometimes of any type, sometimes unknown or `x-` keys.
fn spec_object() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        8 => prop::sample::select(KNOWN_FIELDS).prop_map(str::to_owned),
        1 => string(),
        1 => "x-[a-z]{1,8}",
    ];
    let typed = |k: &str| -> BoxedStrategy<Value> {
        match k {
            "spec_version" | "timeout_seconds" | "max_turns" | "max_attempts" => number().boxed(),
            "max_budget_usd" => number().boxed(),
            "agent" => prop::sample::select(vec!["claude-code", "codex", "command", "other"])
                .prop_map(Value::from)
                .boxed(),
            "command" => prop::collection::vec(string(), 0..4)
                .prop_map(|v| json!(v))
                .boxed(),
            "env" | "secrets" | "labels" => prop::collection::btree_map(string(), string(), 0..6)
                .prop_map(|m| json!(m))
                .boxed(),
            "resume" => prop::sample::select(vec!["auto", "never", "sometimes"])
                .prop_map(Value::from)
                .boxed(),
            "aws_credentials" => any::<bool>().prop_map(Value::Bool).boxed(),
            _ => string().prop_map(Value::String).boxed(),
        }
    };
    (
        prop::collection::vec(
            field.prop_flat_map(move |k| {
                let v = prop_oneof![4 => typed(&k), 1 => value()];
                (Just(k), v)
            }),
            0..12,
        ),
        any::<bool>(),
    )
        .prop_map(|(fields, base)| {
            let mut m = Map::new();
            if base {
                m.insert("spec_version".into(), json!(1));
                m.insert("agent".into(), json!("command"));
                m.insert("command".into(), json!(["true"]));
            }
            m.extend(fields);
            Value::Object(m)
        })
}

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let ctx = ValidationContext::default();
    match JobSpec::parse_valid(bytes, &ctx) {
        Ok(valid) => {
            // What is stored parses back to the same spec.
            let stored = valid.to_json();
            let again = JobSpec::parse_valid(stored.as_bytes(), &ctx)
                .map_err(|e| TestCaseError::fail(format!("stored form refused: {e}")))?;
            prop_assert_eq!(&again.job_id, &valid.job_id);
            let mut expected = valid.spec.clone();
            expected.job_id = Some(valid.job_id.to_string());
            // serde_json (without `float_roundtrip`) may read a float back one unit in
            // the last place off; the budget is compared with that tolerance.
            let mut got = again.spec;
            if let (Some(a), Some(b)) = (got.max_budget_usd, expected.max_budget_usd) {
                prop_assert!((a - b).abs() <= b.abs() * 1e-15, "{a} vs {b}");
                got.max_budget_usd = expected.max_budget_usd;
            }
            prop_assert_eq!(got, expected);
        }
        Err(e) => {
            let violations = e.violations();
            prop_assert!(!violations.is_empty());
            for v in &violations {
                prop_assert!(!v.message.is_empty(), "{v:?}");
            }
            if let SpecError::Parse(_) = e {
                prop_assert_eq!(violations.len(), 1);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes)?;
    }

    #[test]
    fn arbitrary_spec_objects_never_panic_and_round_trip(spec in spec_object()) {
        check(spec.to_string().as_bytes())?;
    }

    #[test]
    fn progress_clamping_holds_for_any_values(
        turns in any::<u32>(),
        input in any::<u64>(),
        output in any::<u64>(),
        cost in any::<f64>(),
        last in any::<String>(),
        session in any::<String>(),
        max in 0usize..200,
    ) {
        let mut p = Progress {
            turns,
            input_tokens: input,
            output_tokens: output,
            cost_usd: cost,
            last_event: Some(last.repeat(20)),
            session_id: Some(session),
            ..Progress::default()
        };
        p.clamp();
        prop_assert!(p.turns <= Progress::MAX_TURNS);
        prop_assert!(p.input_tokens <= Progress::MAX_TOKENS && p.output_tokens <= Progress::MAX_TOKENS);
        prop_assert!(p.cost_usd == 0.0 || (Progress::MIN_COST_USD..=Progress::MAX_COST_USD).contains(&p.cost_usd));
        let e = p.last_event.clone().unwrap();
        prop_assert!(e.len() <= Progress::MAX_LAST_EVENT_LEN && !e.chars().any(char::is_control));
        prop_assert!(p.session_id.as_deref().is_none_or(Progress::session_id_ok));
        let mut again = p.clone();
        again.clamp();
        prop_assert_eq!(again, p);
        let c = clean_text(&last, max);
        prop_assert!(c.len() <= max && !c.chars().any(char::is_control));
    }
}

/// The largest inputs the parser accepts, in the shapes that cost it most.
#[test]
fn big_inputs_are_bounded() {
    let ctx = ValidationContext::default();
    let deep = format!(
        "{}{}",
        "[".repeat(MAX_SPEC_BYTES / 2),
        "]".repeat(MAX_SPEC_BYTES / 2)
    );
    assert!(JobSpec::parse_valid(deep.as_bytes(), &ctx).is_err());
    let too_big = vec![b' '; MAX_SPEC_BYTES + 1];
    assert!(JobSpec::parse_valid(&too_big, &ctx).is_err());
    // Thousands of bad entries, one unknown key of near-limit size: refused.
    let mut env = Map::new();
    for i in 0..20_000 {
        env.insert(format!("AWS_{i}"), json!("v"));
    }
    let many = json!({"spec_version": 1, "agent": "command", "command": ["true"], "env": env});
    let long_key = json!({ "k".repeat(MAX_SPEC_BYTES - 100): 1 });
    for spec in [many, long_key] {
        let e = JobSpec::parse_valid(spec.to_string().as_bytes(), &ctx).unwrap_err();
        assert!(!e.violations().is_empty());
    }
}
