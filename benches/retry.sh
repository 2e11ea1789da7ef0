#!/usr/bin/env bash
# Credit truth under retries: a client that gives up after 0.3 s and retries the same
# `POST /v2/messages {"action":"send"}` against an upstream that takes 1 s, straight at the
# upstream (the emulator) and through the gateway with an Idempotency-Key. Prints how many
# sends reached the upstream and how many credits they cost, each way.
#
#   bash benches/retry.sh                 # builds the release binary if needed
#   LGW_BIN=path bash benches/retry.sh    # that binary instead
#
# Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${LGW_BIN:-target/release/linkup-gateway}
[ -x "$BIN" ] || cargo build --release --locked --quiet
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

KEY=retry-upstream-key
CALLER=lgw_retry_demo_key_0123456789
ATTEMPTS=${ATTEMPTS:-4}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
EMU_PORT=$(port); GW_PORT=$(port); ADMIN_PORT=$(port)
"$BIN" emulator --listen 127.0.0.1:$EMU_PORT --api-key $KEY --log-level warn >"$WORK/emu.log" 2>&1 & PIDS+=($!)
printf '%s\n' "$KEY" >"$WORK/key"
SHA=$(printf '%s' "$CALLER" | sha256sum | cut -d' ' -f1)
cat >"$WORK/gw.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
url = "http://127.0.0.1:$EMU_PORT"
api_key_file = "$WORK/key"
[ledger]
path = "$WORK/ledger.sqlite3"
[[clients]]
name = "retrier"
key_sha256 = "$SHA"
TOML
"$BIN" serve --config "$WORK/gw.toml" --log-level warn >"$WORK/gw.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break; sleep 0.1; done

EMU=http://127.0.0.1:$EMU_PORT
ACC=$(curl -sf -H "x-api-key: $KEY" -H 'content-type: application/json' \
  -d '{"platform":"linkedin","login_token":"tok-retry","country":"FR"}' "$EMU/v2/login" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["account_id"])')
curl -sf -X POST "$EMU/_emulator/faults" -H 'content-type: application/json' -d '{"latency_ms":1000}' >/dev/null
BODY="{\"account_id\":\"$ACC\",\"action\":\"send\",\"params\":{\"text\":\"hi\"}}"
balance() { curl -sf -H "x-api-key: $KEY" "$EMU/v2/credits" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["credits"])'; }
sends() { curl -sf "$EMU/_emulator/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["calls_by_path"].get("POST /v2/messages",0))'; }

# $1: URL, $2: key header value, $3: extra header (or empty). Retries with a 0.3 s timeout,
# then one last patient attempt: what a careful client does.
retrying() {
  local i
  for i in $(seq $((ATTEMPTS - 1))); do
    curl -s -m 0.3 -o /dev/null -H "x-api-key: $2" ${3:+-H "$3"} -H 'content-type: application/json' -d "$BODY" "$1" || true
  done
  curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $2" ${3:+-H "$3"} -H 'content-type: application/json' -d "$BODY" "$1"
}

b0=$(balance); s0=$(sends)
direct_status=$(retrying "$EMU/v2/messages" "$KEY" "")
sleep 1.2   # the abandoned calls finish upstream
b1=$(balance); s1=$(sends)
gw_status=$(retrying "http://127.0.0.1:$GW_PORT/v2/messages" "$CALLER" "Idempotency-Key: welcome-$RANDOM")
sleep 1.2
b2=$(balance); s2=$(sends)
printf '| %s attempts (0.3 s timeout, then a patient one) | sends upstream | credits | last answer |\n|---|---|---|---|\n' "$ATTEMPTS"
printf '| straight to the upstream | %s | %s | %s |\n' $((s1 - s0)) $((b0 - b1)) "$direct_status"
printf '| through the gateway, one Idempotency-Key | %s | %s | %s |\n' $((s2 - s1)) $((b1 - b2)) "$gw_status"
