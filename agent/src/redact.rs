//! Streaming redaction of secret values. A secret split across two writes or two chunks
//! is still caught: the redactor holds back the shortest tail that could be the start of
//! a secret until the next chunk (or the end of the stream) decides.

use aho_corasick::{AhoCorasick, MatchKind};

/// What replaces a secret value.
pub const MASK: &[u8] = b"[REDACTED]";

/// Secrets shorter than this are not redacted (they would mask ordinary text); the
/// agent refuses to start a job with such a secret instead (see `secrets`).
pub const MIN_SECRET_LEN: usize = 4;

/// A stream redactor; one per output stream.
#[derive(Debug)]
pub struct Redactor {
    secrets: Vec<Vec<u8>>,
    matcher: Option<AhoCorasick>,
    carry: Vec<u8>,
    max_len: usize,
}

impl Redactor {
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort();
        secrets.dedup();
        let matcher = (!secrets.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&secrets)
                .expect("literal patterns always build")
        });
        let max_len = secrets.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            secrets,
            matcher,
            carry: Vec::new(),
            max_len,
        }
    }

    /// Redacts `chunk`, returning what can be released now.
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
        // Hold back the earliest suffix that could still grow into a (longer) secret...
        let start = buf.len().saturating_sub(self.max_len.saturating_sub(1));
        let mut hold = (start..buf.len())
            .find(|&i| {
                let tail = &buf[i..];
                self.secrets
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(buf.len());
        // ...and any match that straddles that point, so it is judged whole next time.
        for &(s, e) in matches.iter().rev() {
            if s < hold && hold < e {
                hold = s;
            }
        }
        let mut out = Vec::with_capacity(hold);
        let mut at = 0;
        for &(s, e) in matches.iter().filter(|(_, e)| *e <= hold) {
            out.extend_from_slice(&buf[at..s]);
            out.extend_from_slice(MASK);
            at = e;
        }
        out.extend_from_slice(&buf[at..hold]);
        self.carry = buf.split_off(hold);
        out
    }

    /// The end of the stream: releases what was held back, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        match &self.matcher {
            Some(m) => m.replace_all_bytes(&carry, &vec![MASK; self.secrets.len()]),
            None => carry,
        }
    }

    /// Redacts a whole text at once (for reasons and messages).
    pub fn redact_str(&self, s: &str) -> String {
        match &self.matcher {
            Some(m) => {
                let mask = String::from_utf8_lossy(MASK).into_owned();
                m.replace_all(s, &vec![mask; self.secrets.len()])
            }
            None => s.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], chunks: &[&str]) -> String {
        let mut r = Redactor::new(secrets);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.push(c.as_bytes()));
        }
        out.extend(r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn whole_and_split_secrets_are_masked() {
        assert_eq!(run(&["hunter22"], &["pw=hunter22!"]), "pw=[REDACTED]!");
        assert_eq!(run(&["hunter22"], &["pw=hun", "ter22!"]), "pw=[REDACTED]!");
        assert_eq!(
            run(&["hunter22"], &["h", "u", "n", "t", "e", "r", "2", "2"]),
            "[REDACTED]"
        );
        assert_eq!(
            run(&["abcd", "abcdefgh"], &["xxabcdef", "ghyy abcd"]),
            "xx[REDACTED]yy [REDACTED]"
        );
    }

    #[test]
    fn near_misses_are_released_intact() {
        assert_eq!(run(&["hunter22"], &["hunter2", "3"]), "hunter23");
        assert_eq!(run(&["hunter22"], &["hunt"]), "hunt");
        assert_eq!(run(&[], &["plain"]), "plain");
        // Short values are not redacted (they would mask ordinary text).
        assert_eq!(run(&["ab"], &["abab"]), "abab");
    }

    #[test]
    fn nothing_is_lost_or_duplicated_on_long_streams() {
        let text: String = (0..5000)
            .map(|i| format!("line {i} token-XYZ-{i}\n"))
            .collect();
        let mut r = Redactor::new(["token-XYZ-4999-secret"]);
        let mut out = Vec::new();
        for c in text.as_bytes().chunks(7) {
            out.extend(r.push(c));
        }
        out.extend(r.finish());
        assert_eq!(out, text.as_bytes());
    }
}
