//! The trie of every form of every secret, with Aho–Corasick failure links and depths.
//! It answers two questions: how much of a stream's end the redactor must hold back (the
//! longest suffix of what it has seen that is a proper prefix of a form: it may still
//! grow into a match), stepped once over each chunk (at most over its last `max_len`
//! bytes), so the answer costs O(chunk) and never rescans what was held back; and which
//! is the longest form starting at a given place (an anchored walk down the trie).

/// A trie of every pattern with failure links.
pub(super) struct PrefixAutomaton {
    /// Transitions out of the root, dense (0 = stay at the root).
    root: Box<[u32; 256]>,
    /// Transitions of state `s` are `trans[first[s]..first[s + 1]]`, sorted by byte.
    first: Vec<u32>,
    trans: Vec<(u8, u32)>,
    fail: Vec<u32>,
    depth: Vec<u32>,
    /// Whether a pattern ends at the state.
    terminal: Vec<bool>,
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
    /// `patterns` must be sorted (as `Redactor::new` leaves them): the trie is then
    /// built in one pass, each pattern sharing its common prefix with the one before.
    pub(super) fn new(patterns: &[Vec<u8>]) -> Self {
        debug_assert!(patterns.is_sorted());
        // Edges (parent, byte, child), and the path of the previous pattern.
        let mut edges: Vec<(u32, u8, u32)> = Vec::new();
        let mut depth = vec![0u32];
        let mut terminal = vec![false];
        let mut path: Vec<u32> = vec![ROOT];
        let mut prev: &[u8] = &[];
        for p in patterns {
            let common = p.iter().zip(prev).take_while(|(a, b)| a == b).count();
            path.truncate(common + 1);
            for (i, &b) in p.iter().enumerate().skip(common) {
                let next = depth.len() as u32;
                edges.push((path[i], b, next));
                depth.push(i as u32 + 1);
                terminal.push(false);
                path.push(next);
            }
            terminal[path[p.len()] as usize] = true;
            prev = p;
        }
        let states = depth.len();
        // Sorted input gives each parent's edges in byte order; group them by parent.
        edges.sort_by_key(|&(parent, _, _)| parent);
        let mut first = vec![0u32; states + 1];
        for &(parent, _, _) in &edges {
            first[parent as usize + 1] += 1;
        }
        for s in 0..states {
            first[s + 1] += first[s];
        }
        let trans: Vec<(u8, u32)> = edges.iter().map(|&(_, b, c)| (b, c)).collect();
        let mut root = Box::new([ROOT; 256]);
        for &(b, t) in &trans[..first[1] as usize] {
            root[usize::from(b)] = t;
        }
        let mut this = Self {
            root,
            first,
            trans,
            fail: vec![ROOT; states],
            depth,
            terminal,
            max_len: patterns.iter().map(Vec::len).max().unwrap_or(0),
        };
        // Failure links, breadth first: a state's link is the longest proper suffix of
        // its string that is also in the trie.
        let mut queue = std::collections::VecDeque::new();
        queue.extend(this.edges(ROOT).iter().map(|&(_, t)| t));
        while let Some(s) = queue.pop_front() {
            let (lo, hi) = (this.first[s as usize], this.first[s as usize + 1]);
            for e in lo..hi {
                let (b, t) = this.trans[e as usize];
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

    fn edges(&self, s: u32) -> &[(u8, u32)] {
        let (lo, hi) = (self.first[s as usize], self.first[s as usize + 1]);
        &self.trans[lo as usize..hi as usize]
    }

    fn goto(&self, s: u32, b: u8) -> Option<u32> {
        if s == ROOT {
            let t = self.root[usize::from(b)];
            return (t != ROOT).then_some(t);
        }
        let edges = self.edges(s);
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
        while s != ROOT && self.edges(s).is_empty() {
            s = self.fail[s as usize];
        }
        self.depth[s as usize] as usize
    }

    /// Length of the longest pattern that `hay` starts with.
    pub(super) fn longest_at(&self, hay: &[u8]) -> Option<usize> {
        let mut s = ROOT;
        let mut best = None;
        for &b in hay {
            match self.goto(s, b) {
                Some(t) => s = t,
                None => break,
            }
            if self.terminal[s as usize] {
                best = Some(self.depth[s as usize] as usize);
            }
        }
        best
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
        let mut patterns: Vec<Vec<u8>> = ["abcab", "bca", "cab", "abcabcx", "zz", "ab"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        patterns.sort();
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
                let longest = (1..=input.len())
                    .rev()
                    .find(|&n| patterns.iter().any(|p| p[..] == input[..n]));
                assert_eq!(a.longest_at(&input), longest);
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
