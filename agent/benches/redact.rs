//! Redaction throughput (a bench binary, not a timed test): 100 MB of agent-CLI-shaped
//! output through the redactor, side by side in one run with
//!
//! - a copy (no secrets: what the stream costs without redaction),
//! - the raw-value-only redactor this one replaced ("before", kept below as the peer),
//! - the redactor ("after": every form of every secret),
//!
//! with two short secrets (an API key, a password with symbols) and with those plus a 2 KB
//! PEM private key, in 64 KiB chunks (the agent's pipe reads) and 4 KiB chunks; plus the
//! build time of a redactor and a worst case: a child writing a secret's base64 prefix one
//! byte at a time. Speeds are per second of this thread's CPU time (wall time on a shared
//! machine says more about the neighbours than about the redactor).
//!
//! Run: `cargo bench -p agentq-agent --bench redact`

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentq_agent::redact::{Redactor, base64};

const TOTAL: usize = 100 * 1000 * 1000;

/// The redactor before redaction in every form: raw values only, its tail found by
/// checking every secret at every position of the last `max_len` bytes.
mod before {
    use aho_corasick::{AhoCorasick, MatchKind};

    pub struct Redactor {
        secrets: Vec<Vec<u8>>,
        matcher: Option<AhoCorasick>,
        carry: Vec<u8>,
        max_len: usize,
    }

    impl Redactor {
        pub fn new(secrets: &[&str]) -> Self {
            let mut secrets: Vec<Vec<u8>> = secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
            secrets.sort();
            secrets.dedup();
            let matcher = (!secrets.is_empty()).then(|| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&secrets)
                    .expect("literal patterns")
            });
            let max_len = secrets.iter().map(Vec::len).max().unwrap_or(0);
            Self {
                secrets,
                matcher,
                carry: Vec::new(),
                max_len,
            }
        }

        pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
            let Some(matcher) = &self.matcher else {
                return chunk.to_vec();
            };
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(chunk);
            let matches: Vec<(usize, usize)> = matcher
                .find_iter(&buf)
                .map(|m| (m.start(), m.end()))
                .collect();
            let start = buf.len().saturating_sub(self.max_len.saturating_sub(1));
            let mut hold = (start..buf.len())
                .find(|&i| {
                    let tail = &buf[i..];
                    self.secrets
                        .iter()
                        .any(|s| s.len() > tail.len() && s.starts_with(tail))
                })
                .unwrap_or(buf.len());
            for &(s, e) in matches.iter().rev() {
                if s < hold && hold < e {
                    hold = s;
                }
            }
            let mut out = Vec::with_capacity(hold);
            let mut at = 0;
            for &(s, e) in matches.iter().filter(|(_, e)| *e <= hold) {
                out.extend_from_slice(&buf[at..s]);
                out.extend_from_slice(b"[REDACTED]");
                at = e;
            }
            out.extend_from_slice(&buf[at..hold]);
            self.carry = buf.split_off(hold);
            out
        }
    }
}

/// Deterministic pseudo-random bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

fn pem() -> String {
    let mut rng = Rng(7);
    let body: Vec<u8> = (0..1200).map(|_| rng.next() as u8).collect();
    let b64 = String::from_utf8(base64(&body)).unwrap();
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
        lines.join("\n")
    )
}

/// ~100 MB of stream-json lines, tool output and log lines, with a secret every ~1 MB.
fn output(secrets: &[&str]) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let words = [
        "the",
        "file",
        "src/main.rs",
        "cargo",
        "build",
        "error",
        "warning:",
        "fn",
        "let",
        "=",
        "{",
        "}",
        "Compiling",
        "agentq",
        "0.1.0",
        "test",
        "ok",
        "passed",
        "/tmp/work",
        "import",
        "def",
        "return",
        "self",
        "None",
        "true",
        "false",
        "42",
        "https://example.com/a?b=c",
        "aGVsbG8gd29ybGQ=",
        "9f86d081884c7d65",
        "\\n",
        "\"",
        "tool_use",
        "assistant",
    ];
    let mut out = Vec::with_capacity(TOTAL + 4096);
    let mut n = 0u64;
    while out.len() < TOTAL {
        n += 1;
        let mut text = String::new();
        for _ in 0..(8 + rng.next() % 40) {
            text.push_str(rng.pick(&words));
            text.push(' ');
        }
        if n.is_multiple_of(5000) {
            text.push_str(secrets[(n / 5000) as usize % secrets.len()]);
        }
        let line = if n.is_multiple_of(3) {
            serde_json::json!({"type": "user", "message": {"content": [{"type": "tool_result", "content": text}]}})
                .to_string()
        } else {
            text
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// CPU time of this thread (user + system, 10 ms ticks), from /proc.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((tick(11) + tick(12)) * 10)
}

fn run(input: &[u8], chunk: usize, mut push: impl FnMut(&[u8]) -> Vec<u8>) -> (Duration, usize) {
    let t = cpu();
    let mut bytes = 0;
    for c in input.chunks(chunk) {
        bytes += black_box(push(c)).len();
    }
    (cpu() - t, bytes)
}

fn mbps(d: Duration, n: usize) -> String {
    format!("{:5.0} MB/s", n as f64 / 1e6 / d.as_secs_f64().max(0.01))
}

fn main() {
    let key = pem();
    let short = [
        "sk-ant-api03-Xq7dJ2kLmN9pQrS4tUvW6xYz8AbCdEfGh",
        "p@ss w0rd/with+symbols&=",
    ];
    let all = [short[0], short[1], key.as_str()];
    for secrets in [&short[..], &all[..]] {
        let input = output(secrets);
        let t = Instant::now();
        let r = Redactor::new(secrets);
        let built = t.elapsed();
        let longest = r.patterns().iter().map(Vec::len).max().unwrap_or(0);
        println!(
            "== {} secrets (longest {} bytes): {} forms (longest {longest} bytes), built in {:.1} ms; input {:.0} MB",
            secrets.len(),
            secrets.iter().map(|s| s.len()).max().unwrap_or(0),
            r.patterns().len(),
            built.as_secs_f64() * 1e3,
            input.len() as f64 / 1e6,
        );
        for chunk in [64 * 1024, 4 * 1024] {
            let mut none = Redactor::new(Vec::<&str>::new());
            let (copy, _) = run(&input, chunk, |c| none.push(c));
            let mut old = before::Redactor::new(secrets);
            let (d_old, n_old) = run(&input, chunk, |c| old.push(c));
            let mut new = Redactor::new(secrets);
            let (d_new, n_new) = run(&input, chunk, |c| new.push(c));
            assert_eq!(n_old, n_new, "both mask the raw values");
            println!(
                "{:2} KiB chunks: copy {} | before (raw values only) {} | after (every form) {}",
                chunk / 1024,
                mbps(copy, input.len()),
                mbps(d_old, input.len()),
                mbps(d_new, input.len()),
            );
        }
    }

    // Worst case: a child writing the start of the key's base64 over and over, one byte
    // per write, so that the redactor always holds back a long tail.
    let b64 = base64(key.as_bytes());
    let mut adversarial = Vec::new();
    while adversarial.len() < 2_000_000 {
        adversarial.extend_from_slice(&b64[..b64.len() - 2]);
        adversarial.push(b'\n');
    }
    let mut new = Redactor::new(all);
    let (d, _) = run(&adversarial, 1, |c| new.push(c));
    println!(
        "worst case (base64 prefixes, 1-byte writes): after {}",
        mbps(d, adversarial.len())
    );
}
