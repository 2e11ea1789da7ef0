//! Path patterns of `[[clients]] paths`, `[[rate_limit.rules]] path`, `idempotency.require`
//! and `[costs]` keys: `*` matches any run of characters, slashes included.

/// A path pattern: `*` matches any run of characters (slashes included); every other
/// character stands for itself. Compiled into a `globset` matcher once, when the config loads.
#[derive(Debug, Clone)]
pub struct PathPattern {
    text: String,
    matcher: globset::GlobMatcher,
}

impl PathPattern {
    pub fn new(p: &str) -> Result<PathPattern, String> {
        // The file's patterns know one wildcard; globset knows more (`?`, `[..]`, `{a,b}`, `\`,
        // and `**` as "any folders"). So everything but `*` is escaped, and a run of `*` is one.
        let mut glob = String::with_capacity(p.len() + 8);
        for (i, part) in p.split('*').enumerate() {
            if i > 0 && !glob.ends_with('*') {
                glob.push('*');
            }
            glob.push_str(&globset::escape(part));
        }
        let matcher = globset::GlobBuilder::new(&glob)
            .literal_separator(false)
            .backslash_escape(false)
            .build()
            .map_err(|e| format!("`{p}` is not a path pattern: {e}"))?
            .compile_matcher();
        Ok(PathPattern {
            text: p.to_owned(),
            matcher,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, path: &str) -> bool {
        self.matcher.is_match(path)
    }
}

impl PartialEq for PathPattern {
    fn eq(&self, other: &PathPattern) -> bool {
        self.text == other.text
    }
}

impl Eq for PathPattern {}

/// As the file spells it.
impl serde::Serialize for PathPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> PathPattern {
        PathPattern::new(p).unwrap()
    }

    #[test]
    fn path_patterns_glob() {
        assert!(pattern("/v2/*").matches("/v2/checkpoint"));
        assert!(pattern("/v2/accounts/*").matches("/v2/accounts/abc"));
        assert!(!pattern("/v2/accounts/*").matches("/v2/accounts"));
        assert!(pattern("/v2/checkpoint").matches("/v2/checkpoint"));
        assert!(!pattern("/v2/checkpoint").matches("/v2/checkpoints"));
        assert!(pattern("/v2/*/stop").matches("/v2/webhooks/w1/stop"));
    }

    /// The hand-written matcher globset replaced, kept as the oracle.
    fn hand_written(pat: &[u8], s: &[u8]) -> bool {
        let (mut p, mut i) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while i < s.len() {
            if p < pat.len() && pat[p] == b'*' {
                star = Some((p, i));
                p += 1;
            } else if p < pat.len() && pat[p] == s[i] {
                p += 1;
                i += 1;
            } else if let Some((sp, si)) = star {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            } else {
                return false;
            }
        }
        pat[p..].iter().all(|&c| c == b'*')
    }

    /// Every string up to `len` characters over `alphabet`.
    fn strings(alphabet: &[char], len: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..len {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn globset_matches_exactly_what_the_hand_written_matcher_did() {
        // globset's own metacharacters among them: they must stand for themselves.
        let meta = ['*', '?', '[', ']', '{', '}', ',', '\\', '!', '-'];
        let mut pats = strings(&['a', '/', '*', '?', '[', ']', '{', '}', ',', '\\', '!'], 3);
        pats.extend(
            [
                "/v2/*",
                "/v2/accounts/*",
                "/v2/*/stop",
                "/v2/**",
                "**/x",
                "*a*",
                "/v2/[ab]",
            ]
            .map(String::from),
        );
        let mut paths = strings(
            &['a', '/', 'x', meta[0], meta[1], meta[2], meta[4], meta[7]],
            3,
        );
        paths.extend(
            [
                "/v2/accounts",
                "/v2/accounts/abc",
                "/v2/webhooks/w1/stop",
                "/v2/a",
                "x",
                "/x",
                "a/x",
                "/v2/",
                "/v2/[ab]",
            ]
            .map(String::from),
        );
        for p in &pats {
            let compiled = pattern(p);
            for s in &paths {
                assert_eq!(
                    compiled.matches(s),
                    hand_written(p.as_bytes(), s.as_bytes()),
                    "pattern {p:?} on {s:?}"
                );
            }
        }
    }
}
