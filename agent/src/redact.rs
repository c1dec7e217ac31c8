//! Streaming redaction of secret values in every form the tools of a job print them
//! (raw, line by line, JSON-escaped, URL-encoded, base64: [`forms`]). A secret split
//! across two writes or two chunks is still caught: the redactor holds back the shortest
//! tail that could be the start of a form until the next chunk (or the end of the stream)
//! decides. Streaming gives exactly what [`Redactor::redact_bytes`] gives on the whole
//! text, whatever the chunking.

mod forms;
mod tail;

use aho_corasick::{AhoCorasick, AhoCorasickKind, Input, MatchKind};

pub use forms::{MIN_FRAGMENT_LEN, MIN_LINE_LEN, base64, base64_core, forms, secret_lines};
use tail::{PrefixAutomaton, ROOT};

/// What replaces a secret value.
pub const MASK: &[u8] = b"[REDACTED]";

/// Secrets shorter than this are not redacted (they would mask ordinary text); the
/// agent refuses to start a job with such a secret instead (see `secrets`).
pub const MIN_SECRET_LEN: usize = 4;

/// A stream redactor; one per output stream. `Debug` shows counts, never a secret.
pub struct Redactor {
    matcher: Option<Matcher>,
    carry: Vec<u8>,
    /// The prefix automaton's state after everything pushed so far.
    state: u32,
}

/// Finds forms leftmost-longest, as one Aho–Corasick search over every form would, but
/// fast: a small DFA over the first [`PREFILTER_LEN`] bytes of every form finds where a
/// form may start, and a walk down the trie of whole forms decides there. (With hundreds
/// of long forms, one search over all of them runs an NFA over every byte, several times
/// slower, and takes longer to build than the job's child takes to start.)
struct Matcher {
    prefilter: AhoCorasick,
    tail: PrefixAutomaton,
    patterns: Vec<Vec<u8>>,
}

/// Where a form was found.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// How many leading bytes of each form the prefilter looks for.
const PREFILTER_LEN: usize = 8;

impl Matcher {
    fn new(patterns: Vec<Vec<u8>>) -> Self {
        let mut starts: Vec<&[u8]> = patterns
            .iter()
            .map(|p| &p[..p.len().min(PREFILTER_LEN)])
            .collect();
        starts.sort_unstable();
        starts.dedup();
        Self {
            prefilter: AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .kind(Some(AhoCorasickKind::DFA))
                .build(&starts)
                .expect("literal patterns always build"),
            tail: PrefixAutomaton::new(&patterns),
            patterns,
        }
    }

    /// The leftmost-longest form in `hay` starting at or after `from`.
    fn find(&self, hay: &[u8], mut from: usize) -> Option<Span> {
        while from < hay.len() {
            let start = self.prefilter.find(Input::new(hay).range(from..))?.start();
            if let Some(len) = self.tail.longest_at(&hay[start..]) {
                return Some(Span {
                    start,
                    end: start + len,
                });
            }
            from = start + 1;
        }
        None
    }

    fn find_iter<'a>(&'a self, hay: &'a [u8]) -> impl Iterator<Item = Span> + 'a {
        let mut from = 0;
        std::iter::from_fn(move || {
            let m = self.find(hay, from)?;
            // Forms are never empty, so this always moves on.
            from = m.end;
            Some(m)
        })
    }
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field(
                "patterns",
                &self.matcher.as_ref().map_or(0, |m| m.patterns.len()),
            )
            .field("held_back", &self.carry.len())
            .finish()
    }
}

impl Redactor {
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut patterns: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| s.as_ref().len() >= MIN_SECRET_LEN)
            .flat_map(|s| forms(s.as_ref()))
            .filter(|f| f.len() >= MIN_SECRET_LEN)
            .collect();
        patterns.sort();
        patterns.dedup();
        let matcher = (!patterns.is_empty()).then(|| Matcher::new(patterns));
        Self {
            matcher,
            carry: Vec::new(),
            state: ROOT,
        }
    }

    /// Every literal this redactor masks (the forms of every secret), sorted.
    pub fn patterns(&self) -> &[Vec<u8>] {
        self.matcher.as_ref().map_or(&[], |m| &m.patterns)
    }

    /// Bytes held back, waiting for the next chunk: always less than the longest form.
    pub fn held_back(&self) -> usize {
        self.carry.len()
    }

    /// Redacts `chunk`, returning what can be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(m) = &self.matcher else {
            return chunk.to_vec();
        };
        self.state = m.tail.advance(self.state, chunk);
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        // Hold back the longest suffix that could still grow into a form. (When that
        // suffix began inside a match already released, holding all of `buf` is merely
        // cautious: nothing is released that a longer view could change.)
        let hold = buf.len() - m.tail.pending(self.state).min(buf.len());
        if hold == 0 {
            // A secret being written piece by piece: nothing to decide yet, and no
            // rescan of what is held back.
            self.carry = buf;
            return Vec::new();
        }
        let mut out = Vec::with_capacity(buf.len());
        let mut at = 0;
        for mat in m.find_iter(&buf) {
            if mat.start >= hold {
                break;
            }
            // A match that starts before `hold` is final: no longer form starts there
            // (else `hold` would be at or before it), so it goes out whole even when it
            // ends past `hold`.
            out.extend_from_slice(&buf[at..mat.start]);
            out.extend_from_slice(MASK);
            at = mat.end;
        }
        let hold = hold.max(at);
        out.extend_from_slice(&buf[at..hold]);
        self.carry = buf.split_off(hold);
        out
    }

    /// The end of the stream: releases what was held back, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        self.state = ROOT;
        let carry = std::mem::take(&mut self.carry);
        self.redact_bytes(&carry)
    }

    /// Redacts a whole text at once.
    pub fn redact_bytes(&self, text: &[u8]) -> Vec<u8> {
        match &self.matcher {
            Some(m) => {
                let mut out = Vec::with_capacity(text.len());
                let mut at = 0;
                for mat in m.find_iter(text) {
                    out.extend_from_slice(&text[at..mat.start]);
                    out.extend_from_slice(MASK);
                    at = mat.end;
                }
                out.extend_from_slice(&text[at..]);
                out
            }
            None => text.to_vec(),
        }
    }

    /// Redacts a whole text at once (for reasons and messages).
    pub fn redact_str(&self, s: &str) -> String {
        if self.matcher.is_none() {
            return s.to_owned();
        }
        // Every form of a UTF-8 secret is UTF-8, so a match never splits a character;
        // the lossy path is for secrets that are not UTF-8.
        match String::from_utf8(self.redact_bytes(s.as_bytes())) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
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
