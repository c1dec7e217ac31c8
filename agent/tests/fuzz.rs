//! Fuzzing the agent's parsers of child output, as properties (a short run in the default
//! test command; longer runs by hand, see docs/redaction.md):
//!
//! - the event-stream parser: arbitrary lines and arbitrary JSON events never panic, and
//!   the progress they fold into is always within the limits a DynamoDB write accepts;
//! - the redactor: arbitrary secrets (any bytes) × arbitrary output × arbitrary chunking
//!   never panic, never hold back more than the longest form, and stream exactly what
//!   redacting the whole output gives.
//!
//! `PROPTEST_CASES=100000 cargo test -p agentq-agent --test fuzz --release`

use agentq_agent::events::{MAX_EVENT_LINE, observe_line};
use agentq_agent::redact::Redactor;
use agentq_core::Progress;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---- event stream --------------------------------------------------------------------

/// Keys the parser looks at, and a few it does not.
const KEYS: &[&str] = &[
    "type",
    "subtype",
    "session_id",
    "thread_id",
    "message",
    "usage",
    "input_tokens",
    "output_tokens",
    "total_cost_usd",
    "num_turns",
    "content",
    "x",
];

const TYPES: &[&str] = &[
    "system",
    "assistant",
    "user",
    "result",
    "thread.started",
    "turn.started",
    "turn.completed",
    "item.completed",
    "error",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!(5e-324)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(TYPES).prop_map(str::to_owned),
        any::<String>(),
        "[a-z0-9-]{0,40}",
        (1usize..5000).prop_map(|n| "z".repeat(n)),
        Just("--resume".to_owned()),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// An event: an object with a `type` (usually a known one) and random fields.
fn event() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            3 => prop::sample::select(TYPES).prop_map(Value::from),
            1 => value(),
        ],
        prop::collection::vec((prop::sample::select(KEYS), value()), 0..6),
    )
        .prop_map(|(kind, fields)| {
            let mut m: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            m.insert("type".into(), kind);
            Value::Object(m)
        })
}

fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => event().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => "[{}\\[\\]\":, 0-9a-z.eE+-]{0,200}".prop_map(String::into_bytes),
        // deep nesting
        1 => (1usize..2000).prop_map(|n| format!("{}{}", "{\"a\":[".repeat(n), "1").into_bytes()),
    ]
}

/// Everything a progress write needs to succeed, whatever the child printed.
fn assert_in_range(p: &Progress) -> Result<(), TestCaseError> {
    prop_assert!(p.turns <= Progress::MAX_TURNS);
    prop_assert!(p.input_tokens <= Progress::MAX_TOKENS);
    prop_assert!(p.output_tokens <= Progress::MAX_TOKENS);
    prop_assert!(
        p.cost_usd == 0.0
            || (Progress::MIN_COST_USD..=Progress::MAX_COST_USD).contains(&p.cost_usd),
        "cost {}",
        p.cost_usd
    );
    if let Some(e) = &p.last_event {
        prop_assert!(e.len() <= Progress::MAX_LAST_EVENT_LEN);
        prop_assert!(!e.chars().any(char::is_control), "{e:?}");
    }
    if let Some(s) = &p.session_id {
        prop_assert!(Progress::session_id_ok(s), "{s:?}");
    }
    let mut again = p.clone();
    again.clamp();
    prop_assert_eq!(&again, p);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn event_parser_never_panics_and_progress_stays_in_range(
        lines in prop::collection::vec(line(), 0..24),
    ) {
        let mut p = Progress::default();
        let mut events = 0;
        for l in &lines {
            if observe_line(&mut p, l) {
                events += 1;
            }
            assert_in_range(&p)?;
        }
        prop_assert_eq!(p.events, events);
    }

    #[test]
    fn redactor_never_panics_and_streams_what_the_whole_text_gives(
        secrets in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                any::<String>().prop_map(String::into_bytes),
                "[ab\n]{1,24}".prop_map(String::into_bytes),
            ],
            0..4,
        ),
        output in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                "[ab\n]{0,64}".prop_map(String::into_bytes),
            ],
            0..8,
        ),
        embed in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..4),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let r0 = Redactor::new(&secrets);
        let mut input: Vec<u8> = output.concat();
        // Put some of the secrets' own forms into the output, at random places.
        for (form, at) in embed {
            if !r0.patterns().is_empty() {
                let f = form.get(r0.patterns()).clone();
                let at = at.index(input.len() + 1);
                input.splice(at..at, f);
            }
        }
        let longest = r0.patterns().iter().map(Vec::len).max().unwrap_or(0);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut r = Redactor::new(&secrets);
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            out.extend(r.push(&input[at..c]));
            at = c;
            prop_assert!(r.held_back() < longest.max(1), "{} held, longest {longest}", r.held_back());
        }
        out.extend(r.finish());
        prop_assert_eq!(r.held_back(), 0);
        prop_assert_eq!(&out, &r0.redact_bytes(&input));
        if r0.patterns().is_empty() {
            prop_assert_eq!(&out, &input);
        }
    }
}

#[test]
fn an_overlong_line_is_not_parsed() {
    let mut p = Progress::default();
    let mut line = br#"{"type":"system","session_id":"s-1","pad":""#.to_vec();
    line.resize(MAX_EVENT_LINE + 1, b'x');
    line.extend_from_slice(br#""}"#);
    assert!(!observe_line(&mut p, &line));
    assert_eq!(p, Progress::default());
}
