//! How much of a stream's end the redactor must hold back: the longest suffix of what it
//! has seen that is a proper prefix of some form of a secret (it may still grow into a
//! match). An Aho–Corasick trie with failure links and depths, stepped over each chunk
//! once (at most the last `max_len` bytes of it), so the answer costs O(chunk) and never
//! rescans what was held back.

/// A trie of every pattern with failure links.
pub(super) struct PrefixAutomaton {
    /// Transitions out of the root, dense (0 = stay at the root).
    root: Box<[u32; 256]>,
    /// Transitions of state `s` are `trans[first[s]..first[s + 1]]`, sorted by byte.
    first: Vec<u32>,
    trans: Vec<(u8, u32)>,
    fail: Vec<u32>,
    depth: Vec<u32>,
    max_len: usize,
}

impl std::fmt::Debug for PrefixAutomaton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the patterns: they are secrets.
        f.debug_struct("PrefixAutomaton")
            .field("states", &self.fail.len())
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// The root state.
pub(super) const ROOT: u32 = 0;

impl PrefixAutomaton {
    pub(super) fn new(patterns: &[Vec<u8>]) -> Self {
        // The trie, built with sorted child lists.
        let mut children: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut depth = vec![0u32];
        for p in patterns {
            let mut s = 0usize;
            for &b in p {
                s = match children[s].binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => children[s][i].1 as usize,
                    Err(i) => {
                        let next = children.len();
                        children[s].insert(i, (b, next as u32));
                        children.push(Vec::new());
                        depth.push(depth[s] + 1);
                        next
                    }
                };
            }
        }
        let mut first = Vec::with_capacity(children.len() + 1);
        let mut trans = Vec::new();
        for c in &children {
            first.push(trans.len() as u32);
            trans.extend_from_slice(c);
        }
        first.push(trans.len() as u32);
        let mut root = Box::new([ROOT; 256]);
        for &(b, t) in &children[0] {
            root[usize::from(b)] = t;
        }
        let mut this = Self {
            root,
            first,
            trans,
            fail: vec![ROOT; children.len()],
            depth,
            max_len: patterns.iter().map(Vec::len).max().unwrap_or(0),
        };
        // Failure links, breadth first: a state's link is the longest proper suffix of
        // its string that is also in the trie.
        let mut queue = std::collections::VecDeque::new();
        queue.extend(children[0].iter().map(|&(_, t)| t));
        while let Some(s) = queue.pop_front() {
            for &(b, t) in &children[s as usize] {
                let mut f = this.fail[s as usize];
                let link = loop {
                    if let Some(n) = this.goto(f, b) {
                        break n;
                    }
                    if f == ROOT {
                        break ROOT;
                    }
                    f = this.fail[f as usize];
                };
                this.fail[t as usize] = link;
                queue.push_back(t);
            }
        }
        this
    }

    fn goto(&self, s: u32, b: u8) -> Option<u32> {
        if s == ROOT {
            let t = self.root[usize::from(b)];
            return (t != ROOT).then_some(t);
        }
        let (lo, hi) = (self.first[s as usize], self.first[s as usize + 1]);
        let edges = &self.trans[lo as usize..hi as usize];
        edges
            .binary_search_by_key(&b, |&(c, _)| c)
            .ok()
            .map(|i| edges[i].1)
    }

    fn step(&self, mut s: u32, b: u8) -> u32 {
        loop {
            if let Some(t) = self.goto(s, b) {
                return t;
            }
            if s == ROOT {
                return ROOT;
            }
            s = self.fail[s as usize];
        }
    }

    /// The state after `bytes`, from state `s`. Only the last `max_len` bytes can reach
    /// into the answer, so a long chunk is stepped from the root over its end alone.
    pub(super) fn advance(&self, s: u32, bytes: &[u8]) -> u32 {
        let (mut s, bytes) = if bytes.len() >= self.max_len {
            (ROOT, &bytes[bytes.len() - self.max_len..])
        } else {
            (s, bytes)
        };
        for &b in bytes {
            s = self.step(s, b);
        }
        s
    }

    /// Length of the longest suffix of the input seen up to state `s` that is a proper
    /// prefix of a pattern (could still grow into one).
    pub(super) fn pending(&self, mut s: u32) -> usize {
        // A leaf is a whole pattern that no longer one extends; its shorter suffixes in
        // the trie may still be proper prefixes.
        while s != ROOT && self.first[s as usize] == self.first[s as usize + 1] {
            s = self.fail[s as usize];
        }
        self.depth[s as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer by brute force.
    fn pending_naive(patterns: &[Vec<u8>], input: &[u8]) -> usize {
        (0..=input.len())
            .map(|i| &input[i..])
            .find(|t| {
                patterns
                    .iter()
                    .any(|p| p.len() > t.len() && p.starts_with(t))
            })
            .map_or(0, <[u8]>::len)
    }

    #[test]
    fn pending_matches_brute_force() {
        let patterns: Vec<Vec<u8>> = ["abcab", "bca", "cab", "abcabcx", "zz"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let a = PrefixAutomaton::new(&patterns);
        let alphabet = b"abcxz";
        // Every input up to length 7 over the alphabet, fed in two pieces.
        for len in 0..=7u32 {
            for n in 0..alphabet.len().pow(len) {
                let mut k = n;
                let input: Vec<u8> = (0..len)
                    .map(|_| {
                        let c = alphabet[k % alphabet.len()];
                        k /= alphabet.len();
                        c
                    })
                    .collect();
                let cut = n % (input.len() + 1);
                let s = a.advance(ROOT, &input[..cut]);
                let s = a.advance(s, &input[cut..]);
                assert_eq!(
                    a.pending(s),
                    pending_naive(&patterns, &input),
                    "{:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
}
