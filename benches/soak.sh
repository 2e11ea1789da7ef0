#!/usr/bin/env bash
# A bounded soak: mixed traffic through the gateway to the emulator, with faults injected,
# for SOAK_SECS (default 600 s). Reports errors by status, the gateway's RSS at the start and
# the end, and the ledger's total against what the emulator charged.
#
#   bash benches/soak.sh                 # 10 minutes
#   SOAK_SECS=60 bash benches/soak.sh    # a short one
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECS=${SOAK_SECS:-600}
CONNS=${CONNS:-32}

command -v wrk >/dev/null 2>&1 && command -v sqlite3 >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq wrk sqlite3 >/dev/null
}
cargo build --release --quiet
BIN=$PWD/target/release/linkup-gateway
WORK=$(mktemp -d /tmp/lgw-soak.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

P_EMU=18284 P_GW=18283 P_ADMIN=18293
KEY=soak-upstream-key
VKEY=lgw_soak_key
VSHA=$(printf '%s' "$VKEY" | sha256sum | cut -d' ' -f1)
cat > "$WORK/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:$P_GW"
admin_listen = "127.0.0.1:$P_ADMIN"
request_timeout = "2s"
[upstream]
url = "http://127.0.0.1:$P_EMU"
api_key_env = "SOAK_KEY"
[[clients]]
name = "soak"
key_sha256 = "$VSHA"
daily_credit_budget = 1000000000
[rate_limit]
per_account = "100000/sec"
burst = 100000
[ledger]
path = "$WORK/ledger.sqlite3"
[costs]
default = 1
search_people = 2   # what the emulator charges: an ambiguous call reserves what it may cost
EOF

"$BIN" --log-level warn emulator --listen "127.0.0.1:$P_EMU" --api-key "$KEY" --credits 1000000000 > "$WORK/emu.log" 2>&1 & PIDS+=($!)
SOAK_KEY=$KEY "$BIN" --log-format json --log-level warn serve --config "$WORK/gateway.toml" > "$WORK/gw.log" 2>&1 & GW=$!; PIDS+=($GW)
for p in $P_EMU $P_GW; do for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.05; done; done

# 200 connected accounts (login_token logins are free and idempotent).
ACCOUNTS=()
for i in $(seq 1 200); do
  ACCOUNTS+=("$(curl -s -X POST "http://127.0.0.1:$P_GW/v2/login" -H "x-api-key: $VKEY" \
    -d "{\"login_token\":\"soak-$i\"}" | sed -E 's/.*"account_id":"([^"]+)".*/\1/')")
done
printf '%s\n' "${ACCOUNTS[@]}" > "$WORK/accounts.txt"

cat > "$WORK/mix.lua" <<'EOF'
local accounts = {}
for line in io.lines(os.getenv("ACCOUNTS_FILE")) do accounts[#accounts + 1] = line end
wrk.headers["x-api-key"] = os.getenv("VKEY")
wrk.headers["Content-Type"] = "application/json"
local statuses = {}
local actions = {
  {"/v2/profiles", "get"}, {"/v2/profiles", "search_people"}, {"/v2/network", "invite"},
  {"/v2/messages", "send"}, {"/v2/content", "react"},
}
function request()
  local r = math.random(100)
  local acc = accounts[math.random(#accounts)]
  if r <= 10 then return wrk.format("GET", "/v2/credits", nil, nil) end
  if r <= 20 then return wrk.format("GET", "/v2/accounts/" .. acc, nil, nil) end
  if r <= 30 then return wrk.format("POST", "/v2/checkpoint", nil, '{"account_id":"' .. acc .. '","code":"123456"}') end
  if r <= 33 then return wrk.format("POST", "/v2/profiles", nil, "not json") end
  local a = actions[math.random(#actions)]
  return wrk.format("POST", a[1], nil, '{"account_id":"' .. acc .. '","action":"' .. a[2] .. '","params":{}}')
end
function response(status) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary)
  local e = summary.errors
  io.write(string.format("SOCKET_ERRORS connect=%d read=%d write=%d timeout=%d\n", e.connect, e.read, e.write, e.timeout))
end
EOF

rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$GW/status"; }
# RSS split: anonymous (heap) and file-backed (SQLite's mapped WAL index, the binary).
rss_split() { awk '/RssAnon/ {a=$2} /RssFile/ {f=$2} /RssShmem/ {s=$2} END {printf "anon %.1f file %.1f shmem %.1f", a/1024, f/1024, s/1024}' "/proc/$GW/status"; }
RSS0=$(rss)
echo "soak: ${SOAK_SECS}s, $CONNS connections, faults every 20 s (resets, 5xx, slow, rate limited)"
# Faults on a timer: each lasts a few requests, then the emulator is healthy again.
(
  while true; do
    sleep 20
    for f in '{"mode":"reset","count":20}' '{"mode":"error_5xx","count":20}' \
             '{"latency_ms":3000,"count":10,"mode":"slow_headers","slow_ms":3000}' '{"mode":"rate_limited","count":5}'; do
      curl -s -X POST "http://127.0.0.1:$P_EMU/_emulator/faults" -d "$f" >/dev/null || true
      sleep 5
      curl -s -X POST "http://127.0.0.1:$P_EMU/_emulator/faults" -d '{}' >/dev/null || true
    done
  done
) & PIDS+=($!)
# RSS every SAMPLE_SECS, to tell growth from warm-up.
SAMPLE_SECS=${SAMPLE_SECS:-30}
(
  t=0
  while true; do
    echo "t=${t}s rss $(rss) MB ($(rss_split) MB)" >> "$WORK/rss.txt"
    sleep "$SAMPLE_SECS"; t=$((t + SAMPLE_SECS))
  done
) & PIDS+=($!)
ACCOUNTS_FILE=$WORK/accounts.txt VKEY=$VKEY wrk -t2 -c"$CONNS" -d"${SOAK_SECS}s" --timeout 10s -s "$WORK/mix.lua" \
  "http://127.0.0.1:$P_GW" | tee "$WORK/wrk.out" | grep -E "requests in|Requests/sec|Non-2xx|SOCKET_ERRORS|Latency"
RSS1=$(rss)
curl -s -X POST "http://127.0.0.1:$P_EMU/_emulator/faults" -d '{}' >/dev/null
sleep 3 # let calls that outlived their callers finish and be recorded

CHARGED=$(curl -s "http://127.0.0.1:$P_EMU/_emulator/stats" | sed -E 's/.*"credits_charged":([0-9-]+).*/\1/')
read -r SETTLED AMBIGUOUS ROWS < <(sqlite3 "$WORK/ledger.sqlite3" \
  "select coalesce(sum(case when outcome<>'ambiguous' then credits end),0), coalesce(sum(case when outcome='ambiguous' then credits end),0), count(*) from ledger_rows" | tr '|' ' ')
echo
echo "gateway RSS: start ${RSS0} MB, end ${RSS1} MB; every ${SAMPLE_SECS} s:"
sed 's/^/  /' "$WORK/rss.txt"
echo "ledger: $ROWS rows; settled/cached/coalesced credits $SETTLED; ambiguous (reserved) $AMBIGUOUS"
echo "emulator charged: $CHARGED"
if [ "$SETTLED" -le "$CHARGED" ] && [ "$CHARGED" -le $((SETTLED + AMBIGUOUS)) ]; then
  echo "OK: every charge is in the ledger (settled <= charged <= settled + ambiguous)"
else
  echo "MISMATCH: the ledger and the upstream disagree"; exit 1
fi
