#!/usr/bin/env bash
# Fuzz every target for FUZZ_SECS seconds (default 60) from the checked-in corpus.
#   bash fuzz/run.sh            # all targets, 60 s each
#   FUZZ_SECS=10 bash fuzz/run.sh
# cargo-fuzz wants a nightly compiler for its sanitizer flags; the machine has one stable
# toolchain, so RUSTC_BOOTSTRAP=1 lets stable accept them.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_SECS=${FUZZ_SECS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in config classify upstream_answer; do
  # Fuzz a scratch copy: new inputs found during the run are not committed by accident.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  echo "fuzz: $t for ${FUZZ_SECS}s"
  cargo fuzz run "$t" "$work" -- -max_total_time="$FUZZ_SECS" -max_len=65536 -rss_limit_mb=2048 2>&1 | tail -3
  rm -rf "$work"
done
