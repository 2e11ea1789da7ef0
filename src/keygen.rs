//! `keygen`: a fresh virtual key, printed once, and the `[[clients]]` block holding only its
//! SHA-256. The key goes to stderr and the TOML to stdout, so `keygen ... >> gateway.toml`
//! never writes the key into a config file.

use rand::RngCore;

/// A new virtual key: `lgw_` and 192 random bits in hex.
pub fn new_key() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("lgw_{}", hex::encode(b))
}

pub fn key_sha256_hex(key: &str) -> String {
    hex::encode(crate::util::sha256(key.as_bytes()))
}

fn check_name(name: &str) -> Result<(), String> {
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
    Ok(())
}

/// A new key and what to add to the config: `key` is for the operator's eyes (stderr), `toml`
/// holds only its hash (stdout).
pub struct Generated {
    pub key: String,
    pub notice: String,
    pub toml: String,
}

pub fn render(name: &str) -> Result<Generated, String> {
    check_name(name)?;
    let key = new_key();
    let notice = format!(
        "Virtual key for `{name}` (shown once; the gateway stores only its SHA-256):\n  {key}\n\
         Give it to the service as its x-api-key (or Authorization: Bearer); the [[clients]] block\n\
         for the config is on stdout.\n"
    );
    let toml = format!(
        "[[clients]]\n\
         name = \"{name}\"\n\
         key_sha256 = \"{sha}\"\n\
         accounts = [\"*\"]\n\
         paths = [\"/v2/*\"]\n\
         # daily_credit_budget = 1000\n\
         # requests_per_second = 50\n",
        sha = key_sha256_hex(&key)
    );
    Ok(Generated { key, notice, toml })
}

/// `keygen --rotate NAME`: a new key for an existing client, printed once, and the one TOML
/// line that adds it next to the old key; comments say how to give the old key a `not_after`
/// so both work during the overlap and the old one stops on its own.
pub fn render_rotation(name: &str) -> Result<Generated, String> {
    check_name(name)?;
    let key = new_key();
    let sha = key_sha256_hex(&key);
    let week = time::OffsetDateTime::now_utc() + time::Duration::days(7);
    let until = week
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "2026-12-31T00:00:00Z".into());
    let notice = format!(
        "New virtual key for `{name}` (shown once; the gateway stores only its SHA-256):\n  {key}\n"
    );
    let toml = format!(
        "# Add the next line to the existing [[clients]] block named \"{name}\" (if it already has\n\
         # `keys = [...]`, add the {{ sha256 = ... }} entry to that list instead), reload (SIGHUP),\n\
         # then give the new key to the service. Both keys work until the old one expires.\n\
         \n\
         keys = [{{ sha256 = \"{sha}\" }}]\n\
         \n\
         # To retire the old key, move it into the list with a not_after (RFC 3339 UTC date-time,\n\
         # or a date: it then works through that whole day), and remove its key_sha256 line:\n\
         #   keys = [{{ sha256 = \"<old key_sha256>\", not_after = \"{until}\" }}, {{ sha256 = \"{sha}\" }}]\n\
         # After not_after the old key is refused (403 INVALID_API_KEY, \"has expired\").\n"
    );
    Ok(Generated { key, notice, toml })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn block_holds_the_hash_of_the_printed_key_and_parses() {
        let g = render("crm-sync").unwrap();
        let key = g.key.clone();
        assert_eq!(key.len(), 4 + 48);
        assert!(g.notice.contains(&key));
        assert!(!g.toml.contains(&key), "the key never goes to stdout");
        let toml_part = g.toml.clone();
        let text =
            format!("[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n{toml_part}");
        let s = crate::config::load_str(&text, &[("K".into(), "k".into())], None).unwrap();
        assert_eq!(
            hex::encode(s.clients[0].keys[0].sha256),
            key_sha256_hex(&key)
        );
        assert!(!toml_part.contains(&key));
    }

    #[test]
    fn rotation_line_adds_a_second_key_to_an_existing_client() {
        let g = render_rotation("crm-sync").unwrap();
        let key = g.key.clone();
        assert!(g.notice.contains(&key));
        let out = g.toml.clone();
        let toml_part: String = out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!toml_part.contains(&key));
        let old = key_sha256_hex("lgw_old");
        let text = format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n[[clients]]\nname = \"crm-sync\"\nkey_sha256 = \"{old}\"\n{toml_part}"
        );
        let s = crate::config::load_str(&text, &[("K".into(), "k".into())], None).unwrap();
        let keys: Vec<String> = s.clients[0]
            .keys
            .iter()
            .map(|k| hex::encode(k.sha256))
            .collect();
        assert_eq!(keys, vec![old, key_sha256_hex(&key)]);
        // The suggested retirement line parses too.
        let retire = out
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .find_map(|l| l.trim().strip_prefix("keys = "))
            .unwrap()
            .replace("<old key_sha256>", &key_sha256_hex("lgw_old"));
        let text = format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n[[clients]]\nname = \"crm-sync\"\nkeys = {retire}\n"
        );
        let s = crate::config::load_str(&text, &[("K".into(), "k".into())], None).unwrap();
        assert!(s.clients[0].keys[0].not_after.is_some());
        assert!(render_rotation("a b").is_err());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(render("").is_err());
        assert!(render("a b").is_err());
        assert!(render("x\"y").is_err());
    }
}
