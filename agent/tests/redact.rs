//! Redaction in every encoding, as properties: random secrets × random encodings (made by
//! reference encoders, not the redactor's own) × random chunking never leak, streaming
//! equals redacting the whole text, and text without a secret passes through unchanged.
//! Plus real-CLI-shaped stream-json lines carrying a multi-line secret.
//!
//! Longer runs: `PROPTEST_CASES=20000 cargo test -p agentq-agent --test redact --release`.

use agentq_agent::redact::{MASK, Redactor};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Streams `input` through a redactor in pieces cut at `cuts`.
fn stream(r: &mut Redactor, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([input.len()]) {
        out.extend(r.push(&input[at..c]));
        at = c;
    }
    out.extend(r.finish());
    out
}

// ---- secrets -------------------------------------------------------------------------

/// A PEM block with random base64 body lines (the last one short and padded at times).
fn pem() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "PRIVATE KEY",
            "RSA PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
        ]),
        prop::collection::vec("[A-Za-z0-9+/]{8,64}", 1..6),
        "[A-Za-z0-9+/]{1,6}={0,2}",
        any::<bool>(),
    )
        .prop_map(|(label, body, last, nl)| {
            let mut s = format!("-----BEGIN {label}-----\n");
            for l in body {
                s.push_str(&l);
                s.push('\n');
            }
            s.push_str(&last);
            s.push_str(&format!("\n-----END {label}-----"));
            if nl {
                s.push('\n');
            }
            s
        })
}

/// Secrets of every kind; never `[` or `]`, the mask's own characters (so that "no form
/// of a secret is left in the output" can be checked exactly).
fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        // API keys and tokens
        "[A-Za-z0-9_-]{8,48}",
        // passwords: printable ASCII, including what every encoder escapes
        "[ -Z\\\\^-~]{6,40}",
        // any Unicode, control characters included
        prop::collection::vec(
            any::<char>().prop_filter("mask chars", |c| *c != '[' && *c != ']'),
            4..20
        )
        .prop_map(String::from_iter),
        pem(),
    ]
    .prop_filter("long enough to redact", |s| s.len() >= 4)
}

// ---- reference encoders --------------------------------------------------------------

/// How a secret reaches the output.
#[derive(Debug, Clone)]
enum Encoding {
    Raw,
    /// Printed line by line, maybe with CRLF and indentation.
    Lines {
        crlf: bool,
        indent: usize,
    },
    /// serde_json (also JSON.stringify's form).
    Json,
    /// Python `json.dumps` (ASCII only).
    JsonAscii,
    /// PHP `json_encode` (`\/`).
    JsonSlash,
    /// A JSON document inside a JSON string.
    JsonTwice,
    /// `encodeURIComponent`-style percent-encoding.
    UrlComponent,
    /// `application/x-www-form-urlencoded` (`+` for space).
    UrlForm,
    /// base64 of `prefix + secret + suffix`.
    Base64 {
        url_safe: bool,
        pad: bool,
        prefix: Vec<u8>,
        suffix: Vec<u8>,
    },
    /// base64 wrapped at `width` (coreutils `base64`, `openssl base64`).
    Base64Wrapped {
        width: usize,
    },
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::Raw),
        (any::<bool>(), 0..4usize).prop_map(|(crlf, indent)| Encoding::Lines { crlf, indent }),
        Just(Encoding::Json),
        Just(Encoding::JsonAscii),
        Just(Encoding::JsonSlash),
        Just(Encoding::JsonTwice),
        Just(Encoding::UrlComponent),
        Just(Encoding::UrlForm),
        (
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..7),
            prop::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(|(url_safe, pad, prefix, suffix)| Encoding::Base64 {
                url_safe,
                pad,
                prefix,
                suffix
            }),
        prop::sample::select(vec![64usize, 76]).prop_map(|width| Encoding::Base64Wrapped { width }),
    ]
}

fn json(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap();
    q[1..q.len() - 1].to_owned()
}

fn json_ascii(s: &str) -> String {
    let mut out = String::new();
    for c in json(s).chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            for u in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// The secret as the encoding prints it, and what must never appear in the output.
fn encode(secret: &str, enc: &Encoding) -> (Vec<u8>, Vec<Vec<u8>>) {
    let whole = |s: String| (s.clone().into_bytes(), vec![s.into_bytes()]);
    match enc {
        Encoding::Raw => whole(secret.to_owned()),
        Encoding::Lines { crlf, indent } => {
            if !secret.contains('\n') {
                return (
                    format!("{}{secret}\n", " ".repeat(*indent)).into_bytes(),
                    vec![secret.as_bytes().to_vec()],
                );
            }
            let lines: Vec<&str> = secret.lines().collect();
            let text: String = lines
                .iter()
                .map(|l| {
                    format!(
                        "{}{l}{}",
                        " ".repeat(*indent),
                        if *crlf { "\r\n" } else { "\n" }
                    )
                })
                .collect();
            let never: Vec<Vec<u8>> = lines
                .iter()
                .map(|l| l.trim())
                .filter(|l| l.len() >= 8 && !l.starts_with("-----"))
                .map(|l| l.as_bytes().to_vec())
                .collect();
            (text.into_bytes(), never)
        }
        Encoding::Json => whole(json(secret)),
        Encoding::JsonAscii => whole(json_ascii(secret)),
        Encoding::JsonSlash => whole(json(secret).replace('/', "\\/")),
        Encoding::JsonTwice => whole(json(&json(secret))),
        Encoding::UrlComponent => whole(utf8_percent_encode(secret, COMPONENT).to_string()),
        Encoding::UrlForm => whole(form_urlencoded::byte_serialize(secret.as_bytes()).collect()),
        Encoding::Base64 {
            url_safe,
            pad,
            prefix,
            suffix,
        } => {
            let engine = match (url_safe, pad) {
                (false, true) => &STANDARD,
                (false, false) => &STANDARD_NO_PAD,
                (true, true) => &URL_SAFE,
                (true, false) => &URL_SAFE_NO_PAD,
            };
            let mut data = prefix.clone();
            data.extend_from_slice(secret.as_bytes());
            data.extend_from_slice(suffix);
            let text = engine.encode(&data);
            // The characters that depend on the secret alone; with nothing after it,
            // the final character and padding are the secret's too.
            let bits_before = 8 * prefix.len();
            let bits_end = 8 * (prefix.len() + secret.len());
            let first = bits_before.div_ceil(6);
            let end = if suffix.is_empty() && prefix.len() % 3 == 0 {
                text.len()
            } else {
                bits_end / 6
            };
            let never = text.as_bytes()[first..end.max(first)].to_vec();
            let never = if never.len() >= 8 || (prefix.is_empty() && suffix.is_empty()) {
                vec![never]
            } else {
                // Too short to redact on its own (see docs/redaction.md).
                vec![]
            };
            (text.into_bytes(), never)
        }
        Encoding::Base64Wrapped { width } => {
            let text = STANDARD.encode(secret.as_bytes());
            let lines: Vec<Vec<u8>> = text.as_bytes().chunks(*width).map(<[u8]>::to_vec).collect();
            let never: Vec<Vec<u8>> = if lines.len() > 1 {
                lines.iter().filter(|l| l.len() >= 8).cloned().collect()
            } else {
                lines.clone()
            };
            (lines.join(&b"\n"[..]), never)
        }
    }
}

/// Text around the secret: ordinary log-ish characters and, at times, the start of the
/// encoded secret (a near miss the redactor must release intact).
fn context() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 +/=\n\"{}:,%\\\\_-]{0,40}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn no_secret_leaks_in_any_encoding_or_chunking(
        secrets in prop::collection::vec(secret(), 1..3),
        which in any::<prop::sample::Index>(),
        enc in encoding(),
        before in context(),
        after in context(),
        near_miss in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let secret = which.get(&secrets);
        let (encoded, never) = encode(secret, &enc);
        let mut input = before.into_bytes();
        if near_miss {
            input.extend_from_slice(&encoded[..encoded.len() / 2]);
            input.push(b' ');
        }
        input.extend_from_slice(&encoded);
        input.extend_from_slice(after.as_bytes());

        let mut r = Redactor::new(&secrets);
        let out = stream(&mut r, &input, &cuts);
        for n in &never {
            prop_assert!(
                !contains(&out, n),
                "{enc:?} leaked {:?} in {:?}",
                String::from_utf8_lossy(n),
                String::from_utf8_lossy(&out)
            );
        }
        if !never.is_empty() {
            prop_assert!(contains(&out, MASK));
        }
        // No form of any secret is left, whatever else the text held: redacting the
        // output again changes nothing.
        prop_assert_eq!(&r.redact_bytes(&out), &out);
        // Streaming gives what redacting the whole text gives.
        prop_assert_eq!(&out, &r.redact_bytes(&input));
    }

    #[test]
    fn text_without_a_secret_passes_through_unchanged(
        secrets in prop::collection::vec(secret(), 0..3),
        text in prop_oneof![
            "[a-zA-Z0-9 +/=\n\"{}:,%\\\\_-]{0,400}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..400),
        ],
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut r = Redactor::new(&secrets);
        let clean = r.redact_bytes(&text) == text
            && !r.patterns().iter().any(|p| contains(&text, p));
        let out = stream(&mut r, &text, &cuts);
        if clean {
            prop_assert_eq!(&out, &text);
        }
        prop_assert_eq!(&out, &r.redact_bytes(&text));
    }
}

// ---- real-CLI-shaped lines -------------------------------------------------------------

/// A PEM private key shaped like a real PKCS#8 RSA key (random body).
fn private_key() -> String {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut body = Vec::new();
    for _ in 0..1190 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        body.push(rng as u8);
    }
    let b64 = STANDARD.encode(&body);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\nMIIE{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn body_lines(pem: &str) -> Vec<&str> {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

fn assert_no_key_line(out: &[u8], pem: &str) {
    let text = String::from_utf8_lossy(out);
    for l in body_lines(pem) {
        if l.len() >= 8 {
            assert!(!text.contains(l), "line {l:?} leaked in {text}");
            assert!(!text.contains(&l.replace('/', "\\/")), "line {l:?} leaked");
        }
    }
}

fn redact_in_pieces(secrets: &[&str], line: &str, piece: usize) -> Vec<u8> {
    let mut r = Redactor::new(secrets);
    let mut out = Vec::new();
    for c in line.as_bytes().chunks(piece) {
        out.extend(r.push(c));
    }
    out.extend(r.finish());
    out
}

#[test]
fn claude_stream_json_tool_result_with_a_private_key() {
    let pem = private_key();
    // The key as stored in SSM is often without its final newline.
    let stored = pem.trim_end();
    let line = serde_json::json!({
        "type": "user",
        "message": {"role": "user", "content": [{
            "tool_use_id": "toolu_01",
            "type": "tool_result",
            "content": pem,
        }]},
        "session_id": "0b5c7bd2-5d8e-4c3f-9f43-0e8f8f0c4a10",
    })
    .to_string()
        + "\n";
    assert!(line.contains("-----BEGIN PRIVATE KEY-----\\nMIIE"));
    for piece in [1, 7, 64, 4096, line.len()] {
        let out = redact_in_pieces(&[stored], &line, piece);
        assert_no_key_line(&out, &pem);
        // Still one JSON event the progress parser reads.
        let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        let content = v["message"]["content"][0]["content"].as_str().unwrap();
        assert!(content.contains("[REDACTED]"), "{content}");
        let mut p = agentq_core::Progress::default();
        assert!(agentq_agent::events::observe_line(&mut p, &out));
        assert_eq!(p.last_event.as_deref(), Some("user"));
    }
}

#[test]
fn codex_and_ascii_json_and_cat_line_by_line() {
    let pem = private_key();
    let stored = pem.trim_end();
    // Codex `--json`: command output aggregated into one string.
    let codex = serde_json::json!({
        "type": "item.completed",
        "item": {"id": "item_3", "type": "command_execution", "command": "cat key.pem",
                 "aggregated_output": format!("$ cat key.pem\n{pem}"), "exit_code": 0},
    })
    .to_string();
    // A Python tool's json.dumps (ASCII, and `\/` as PHP writes it).
    let python = format!("{{\"out\": \"{}\"}}", json_ascii(&pem).replace('/', "\\/"));
    // The key printed as is, CRLF.
    let plain = format!("key:\r\n{}", pem.replace('\n', "\r\n"));
    for text in [codex, python, plain] {
        for piece in [3, 100, text.len()] {
            let out = redact_in_pieces(&[stored], &text, piece);
            assert_no_key_line(&out, &pem);
        }
    }
}

#[test]
fn a_long_secret_base64_wrapped_by_coreutils() {
    let pem = private_key();
    let b64 = STANDARD.encode(pem.as_bytes());
    let wrapped: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let text = format!("$ base64 key.pem\n{}\n", wrapped.join("\n"));
    let out = String::from_utf8(redact_in_pieces(&[&pem], &text, 513)).unwrap();
    for l in wrapped {
        assert!(!out.contains(l), "{l} leaked");
    }
    assert!(out.starts_with("$ base64 key.pem\n[REDACTED]\n"));
}
