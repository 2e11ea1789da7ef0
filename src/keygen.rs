//! `keygen`: a fresh virtual key, printed once, and the `[[clients]]` block holding only its
//! SHA-256.

use rand::RngCore;

/// A new virtual key: `lgw_` and 192 random bits in hex.
pub fn new_key() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("lgw_{}", hex::encode(b))
}

pub fn key_sha256_hex(key: &str) -> String {
    hex::encode(crate::layers::authenticate::sha256(key.as_bytes()))
}

pub fn render(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(format!(
            "`{name}`: a client name is 1-64 characters of letters, digits, '-', '_' or '.'"
        ));
    }
    let key = new_key();
    Ok(format!(
        "# Virtual key for `{name}` (shown once; the gateway stores only its SHA-256):\n\
         #   {key}\n\
         # Give it to the service as its x-api-key (or Authorization: Bearer), then add:\n\
         \n\
         [[clients]]\n\
         name = \"{name}\"\n\
         key_sha256 = \"{sha}\"\n\
         accounts = [\"*\"]\n\
         paths = [\"/v2/*\"]\n\
         # daily_credit_budget = 1000\n\
         # requests_per_second = 50\n",
        sha = key_sha256_hex(&key)
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn block_holds_the_hash_of_the_printed_key_and_parses() {
        let out = render("crm-sync").unwrap();
        let key = out
            .lines()
            .find_map(|l| l.trim_start_matches('#').trim().strip_prefix("lgw_"))
            .map(|k| format!("lgw_{k}"))
            .unwrap();
        assert_eq!(key.len(), 4 + 48);
        let toml_part: String = out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let text =
            format!("[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n{toml_part}");
        let s = crate::config::load_str(&text, &[("K".into(), "k".into())], None).unwrap();
        assert_eq!(hex::encode(s.clients[0].key_sha256), key_sha256_hex(&key));
        assert!(!toml_part.contains(&key));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(render("").is_err());
        assert!(render("a b").is_err());
        assert!(render("x\"y").is_err());
    }
}
