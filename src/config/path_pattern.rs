//! Path patterns of `[[clients]] paths`, `[[rate_limit.rules]] path`, `idempotency.require`
//! and `[costs]` keys: `*` matches any run of characters, slashes included.

/// A path pattern: `*` matches any run of characters (slashes included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(String);

/// As the file spells it.
impl serde::Serialize for PathPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl PathPattern {
    pub fn new(p: &str) -> PathPattern {
        PathPattern(p.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, path: &str) -> bool {
        glob_match(self.0.as_bytes(), path.as_bytes())
    }
}

pub(super) fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point: linear in practice.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns_glob() {
        assert!(PathPattern::new("/v2/*").matches("/v2/checkpoint"));
        assert!(PathPattern::new("/v2/accounts/*").matches("/v2/accounts/abc"));
        assert!(!PathPattern::new("/v2/accounts/*").matches("/v2/accounts"));
        assert!(PathPattern::new("/v2/checkpoint").matches("/v2/checkpoint"));
        assert!(!PathPattern::new("/v2/checkpoint").matches("/v2/checkpoints"));
        assert!(PathPattern::new("/v2/*/stop").matches("/v2/webhooks/w1/stop"));
    }
}
