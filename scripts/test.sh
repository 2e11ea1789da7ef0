#!/usr/bin/env bash
# The whole test suite: formatting, lints (warnings are errors), unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
