//! Every form a secret value takes in what the tools of a job print: the raw value, each
//! line of a multi-line value, the value JSON-escaped the way common JSON writers escape
//! strings, URL-encoded the way common URL encoders do, and base64 (both alphabets, with
//! and without padding, wrapped, and embedded in a longer base64 text). The redactor
//! matches every form as a literal; see `docs/redaction.md` for the rules and their limits.

use std::collections::BTreeSet;

/// Lines of a multi-line value shorter than this (after trimming) are not redacted on
/// their own: they would mask ordinary text, and a few characters of a long value say
/// little about it. They are still redacted as part of the whole value.
pub const MIN_LINE_LEN: usize = 8;

/// Base64 fragments (a value embedded at an offset, a wrapped line) shorter than this
/// are not redacted on their own, for the same reason.
pub const MIN_FRAGMENT_LEN: usize = 8;

/// Every literal the redactor looks for to catch `secret`, longest forms included,
/// sorted and without duplicates. Empty for an empty value.
pub fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = BTreeSet::new();
    if secret.is_empty() {
        return Vec::new();
    }
    let text = std::str::from_utf8(secret).ok();
    text_forms(secret, text, &mut out);
    base64_forms(secret, &mut out);
    for line in secret_lines(secret) {
        text_forms(line, std::str::from_utf8(line).ok(), &mut out);
    }
    out.into_iter().filter(|f| !f.is_empty()).collect()
}

/// The lines of a multi-line value that are redacted on their own: trimmed, at least
/// [`MIN_LINE_LEN`] bytes, and not PEM armour (`-----BEGIN …-----` / `-----END …-----`,
/// which every PEM file of that kind shares and which is not secret). A value without a
/// line break has no lines of its own.
pub fn secret_lines(secret: &[u8]) -> impl Iterator<Item = &[u8]> {
    // Lines end at LF (a CR before it is trimmed with the line's whitespace); a value
    // with CRs alone (classic Mac) is split at those.
    let sep = if secret.contains(&b'\n') {
        b'\n'
    } else {
        b'\r'
    };
    let multi = secret.contains(&sep);
    secret
        .split(move |b| *b == sep)
        .filter(move |_| multi)
        .map(<[u8]>::trim_ascii)
        .filter(|l| l.len() >= MIN_LINE_LEN && !is_pem_armour(l))
}

fn is_pem_armour(line: &[u8]) -> bool {
    (line.starts_with(b"-----BEGIN ") || line.starts_with(b"-----END ")) && line.ends_with(b"-----")
}

/// Raw, JSON-escaped and URL-encoded forms of one value (the whole secret or one line).
fn text_forms(value: &[u8], text: Option<&str>, out: &mut BTreeSet<Vec<u8>>) {
    out.insert(value.to_vec());
    let Some(text) = text else {
        // Not UTF-8: no JSON writer emits it; percent-encoding works on bytes.
        url_forms(value, out);
        return;
    };
    for style in JsonStyle::ALL {
        let once = json_escape(text, style);
        out.insert(once.clone().into_bytes());
        // A JSON document carried inside a JSON string (a tool's JSON output inside a
        // stream-json event) escapes the escapes.
        if style == JsonStyle::MINIMAL {
            out.insert(json_escape(&once, style).into_bytes());
        }
    }
    url_forms(value, out);
}

/// How one JSON writer escapes a string. The combinations cover serde_json,
/// `JSON.stringify`, Python's `json.dumps` (ASCII-only by default), Go's
/// `encoding/json` (HTML-safe), PHP's `json_encode` (`\/`) and writers that use upper-case
/// hex or `\u00XX` for every control character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JsonStyle {
    /// `/` as `\/`.
    slash: bool,
    /// Non-ASCII as `\uXXXX` (UTF-16, surrogate pairs above U+FFFF).
    ascii_only: bool,
    /// `\b \f \n \r \t` rather than `\u00XX` for those five.
    short_controls: bool,
    /// Upper-case hex digits in `\uXXXX`.
    upper_hex: bool,
    /// `<`, `>`, `&`, U+2028, U+2029 as `\uXXXX` (Go).
    html_safe: bool,
}

impl JsonStyle {
    const MINIMAL: Self = Self {
        slash: false,
        ascii_only: false,
        short_controls: true,
        upper_hex: false,
        html_safe: false,
    };

    const ALL: [Self; 32] = {
        let mut all = [Self::MINIMAL; 32];
        let mut i = 0;
        while i < 32 {
            all[i] = Self {
                slash: i & 1 != 0,
                ascii_only: i & 2 != 0,
                short_controls: i & 4 == 0,
                upper_hex: i & 8 != 0,
                html_safe: i & 16 != 0,
            };
            i += 1;
        }
        all
    };
}

fn json_escape(s: &str, style: JsonStyle) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() + 8);
    let unit = |out: &mut String, u: u16| {
        // Writing to a String cannot fail.
        let _ = if style.upper_hex {
            write!(out, "\\u{u:04X}")
        } else {
            write!(out, "\\u{u:04x}")
        };
    };
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if style.slash => out.push_str("\\/"),
            '\n' if style.short_controls => out.push_str("\\n"),
            '\r' if style.short_controls => out.push_str("\\r"),
            '\t' if style.short_controls => out.push_str("\\t"),
            '\u{8}' if style.short_controls => out.push_str("\\b"),
            '\u{c}' if style.short_controls => out.push_str("\\f"),
            c if (c as u32) < 0x20 => unit(&mut out, c as u16),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if style.html_safe => {
                unit(&mut out, c as u16)
            }
            c if !c.is_ascii() && style.ascii_only => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    unit(&mut out, *u);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Characters each common URL encoder leaves as they are (besides ASCII letters and
/// digits): RFC 3986 unreserved (Go `QueryEscape`, Python `quote_plus`, curl), Python's
/// `quote` (keeps `/`), `encodeURIComponent`, WHATWG form encoding (Java `URLEncoder`,
/// Rust `form_urlencoded`), and `encodeURI`.
const URL_KEPT: [&[u8]; 5] = [
    b"-._~",
    b"-._~/",
    b"-_.!~*'()",
    b"-._*",
    b"-_.!~*'();,/?:@&=+$#",
];

fn url_forms(value: &[u8], out: &mut BTreeSet<Vec<u8>>) {
    for kept in URL_KEPT {
        for plus_for_space in [false, true] {
            for upper in [true, false] {
                out.insert(percent_encode(value, kept, plus_for_space, upper));
            }
        }
    }
}

fn percent_encode(value: &[u8], kept: &[u8], plus_for_space: bool, upper: bool) -> Vec<u8> {
    let hex: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || kept.contains(&b) {
            out.push(b);
        } else if b == b' ' && plus_for_space {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = [n >> 18, n >> 12, n >> 6, n].map(|i| STD[(i & 63) as usize]);
        let keep = group.len() + 1;
        out.extend_from_slice(&chars[..keep]);
        out.extend(std::iter::repeat_n(b'=', 4 - keep));
    }
    out
}

/// The URL-safe alphabet (`-` and `_` for `+` and `/`).
pub fn to_url_safe(b64: &[u8]) -> Vec<u8> {
    b64.iter()
        .map(|&c| match c {
            b'+' => b'-',
            b'/' => b'_',
            c => c,
        })
        .collect()
}

/// The base64 characters that depend on `secret` alone when it starts `offset` bytes
/// (0, 1 or 2) into a 3-byte group of a longer text and more bytes follow it: what any
/// base64 of `prefix + secret + suffix` contains, whatever the prefix and suffix.
pub fn base64_core(secret: &[u8], offset: usize) -> Vec<u8> {
    let mut padded = vec![0u8; offset];
    padded.extend_from_slice(secret);
    let enc = base64(&padded);
    let bits_before = 8 * offset;
    let bits_end = 8 * (offset + secret.len());
    let first = bits_before.div_ceil(6);
    let end = bits_end / 6;
    enc.get(first..end.max(first)).unwrap_or_default().to_vec()
}

/// Widths base64 tools wrap at: 76 (MIME, coreutils `base64`) and 64 (PEM, `openssl base64`).
const WRAP_WIDTHS: [usize; 2] = [76, 64];

fn base64_forms(secret: &[u8], out: &mut BTreeSet<Vec<u8>>) {
    let own = base64(secret);
    let unpadded: Vec<u8> = own.iter().copied().filter(|&c| c != b'=').collect();
    let mut std_forms = vec![own.clone(), unpadded.clone()];
    for offset in 0..3 {
        let core = base64_core(secret, offset);
        if core.len() >= MIN_FRAGMENT_LEN {
            std_forms.push(core);
        }
    }
    for width in WRAP_WIDTHS {
        if own.len() > width {
            std_forms.extend(
                own.chunks(width)
                    .filter(|l| l.len() >= MIN_FRAGMENT_LEN)
                    .map(<[u8]>::to_vec),
            );
        }
    }
    for f in std_forms {
        out.insert(to_url_safe(&f));
        out.insert(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(forms: &[Vec<u8>], s: &str) -> bool {
        forms.iter().any(|f| f == s.as_bytes())
    }

    #[test]
    fn base64_matches_the_reference_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc.as_bytes(), "{plain}");
        }
        assert_eq!(to_url_safe(b"+/+/"), b"-_-_");
    }

    #[test]
    fn base64_cores_are_inside_every_embedding() {
        let secret = b"s3cr3t-value-0123";
        for prefix_len in 0..9 {
            let mut text = vec![b'x'; prefix_len];
            text.extend_from_slice(secret);
            text.extend_from_slice(b"tail!");
            let enc = base64(&text);
            let core = base64_core(secret, prefix_len % 3);
            assert!(core.len() >= 20, "{core:?}");
            assert!(
                enc.windows(core.len()).any(|w| w == core),
                "prefix {prefix_len}: {:?} not in {:?}",
                String::from_utf8_lossy(&core),
                String::from_utf8_lossy(&enc)
            );
        }
    }

    #[test]
    fn json_forms_cover_the_common_writers() {
        let f = forms("a/b\"c\\d\ne\u{e9}<\u{1F600}".as_bytes());
        // serde_json, JSON.stringify, Python with ensure_ascii=False
        assert!(has(&f, "a/b\\\"c\\\\d\\ne\u{e9}<\u{1F600}"));
        // Python json.dumps (ASCII-only)
        assert!(has(&f, r#"a/b\"c\\d\ne\u00e9<\ud83d\ude00"#));
        // PHP json_encode
        assert!(has(&f, r#"a\/b\"c\\d\ne\u00e9<\ud83d\ude00"#));
        // Go encoding/json (HTML-safe)
        assert!(has(&f, "a/b\\\"c\\\\d\\ne\u{e9}\\u003c\u{1F600}"));
        // control characters as \u000A, upper-case hex
        assert!(has(&f, r#"a/b\"c\\d\u000Ae\u00E9<\uD83D\uDE00"#));
        // JSON inside a JSON string
        assert!(has(&f, "a/b\\\\\\\"c\\\\\\\\d\\\\ne\u{e9}<\u{1F600}"));
    }

    #[test]
    fn url_forms_cover_the_common_encoders() {
        let f = forms(b"a b/c+d~e*f");
        assert!(has(&f, "a%20b%2Fc%2Bd~e%2Af")); // RFC 3986
        assert!(has(&f, "a+b%2Fc%2Bd~e%2Af")); // quote_plus, QueryEscape
        assert!(has(&f, "a%20b/c%2Bd~e%2Af")); // Python quote
        assert!(has(&f, "a%20b%2Fc%2Bd~e*f")); // encodeURIComponent
        assert!(has(&f, "a+b%2Fc%2Bd%7Ee*f")); // form encoding
        assert!(has(&f, "a%20b%2fc%2bd~e%2af")); // lower-case hex
    }

    #[test]
    fn pem_lines_are_forms_but_armour_and_short_lines_are_not() {
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7/+x\nab=\n-----END PRIVATE KEY-----\n";
        let f = forms(pem.as_bytes());
        assert!(has(&f, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"));
        assert!(has(&f, "BKcwggSjAgEAAoIBAQC7/+x"));
        assert!(has(&f, "BKcwggSjAgEAAoIBAQC7\\/+x"));
        assert!(has(&f, "BKcwggSjAgEAAoIBAQC7%2F%2Bx"));
        assert!(!has(&f, "ab="));
        assert!(!has(&f, "-----BEGIN PRIVATE KEY-----"));
        assert!(!has(&f, "-----END PRIVATE KEY-----"));
        assert!(has(&f, &pem.replace('\n', "\\n")));
        // A value without line breaks has no separate lines.
        assert_eq!(secret_lines(b"one-line-value-123").count(), 0);
    }

    #[test]
    fn wrapped_base64_lines_are_forms() {
        let secret: Vec<u8> = (0..200u8).collect();
        let f = forms(&secret);
        let enc = base64(&secret);
        for w in WRAP_WIDTHS {
            for line in enc.chunks(w) {
                assert!(f.contains(&line.to_vec()));
            }
        }
    }
}
