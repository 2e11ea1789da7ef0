//! The house's layering, checked on the sources so it stays true: layers never reach up into
//! the server, the admin listener or the emulator; the upstream client, the ledger and the
//! config never depend on the layers; the fleet store never on the server or admin.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every place under `under` (a file or a folder of `src/`) that names one of `forbidden`
/// (`crate::<module>`), comments left out.
fn violations(under: &str, forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let start = root.join(under);
    let mut files = Vec::new();
    if start.is_dir() {
        rust_files(&start, &mut files);
    } else {
        files.push(start);
    }
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for m in forbidden {
                let needle = format!("crate::{m}");
                let hit = code.match_indices(&needle).any(|(i, _)| {
                    let next = code[i + needle.len()..].chars().next();
                    !matches!(next, Some(c) if c.is_alphanumeric() || c == '_')
                });
                if hit {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn layers_never_reach_up_into_the_server_admin_or_emulator() {
    let v = violations("layers", &["server", "admin", "emulator", "stack"]);
    assert!(v.is_empty(), "{}", v.join("\n"));
}

#[test]
fn the_upstream_client_ledger_config_and_fleet_never_depend_on_the_layers() {
    for under in [
        "upstream",
        "ledger",
        "config",
        "idempotency.rs",
        "limits.rs",
    ] {
        let v = violations(under, &["layers", "server", "admin", "stack"]);
        assert!(v.is_empty(), "{under}:\n{}", v.join("\n"));
    }
    let v = violations("fleet", &["server", "admin", "stack"]);
    assert!(v.is_empty(), "{}", v.join("\n"));
}
