#!/usr/bin/env bash
# The load harness: linkup-gateway against nginx on this machine, in one run.
#
#   bash benches/load.sh            # full run (~4 minutes)
#   bash benches/load.sh --quick    # shorter runs, fewer scenarios (~1 minute)
#   bash benches/load.sh --soak     # adds a 5-minute constant-load soak (RSS drift)
#   bash benches/load.sh --fleet    # adds fleet mode (Redis + PostgreSQL) against embedded
#   bash benches/load.sh --profile  # also records `perf record -g` of the gateway at 64
#                                   # connections (target/load/perf.data, perf-report.txt)
#   bash benches/load.sh --syscalls # also counts syscalls per request (strace -c -f, 5 s at 64
#                                   # connections) of nginx and the gateway: target/load/syscalls-*.txt
#   BARE=1 bash benches/load.sh     # adds ../shared/calibration/bare-hyper (the floor of a
#                                   # plain hyper proxy) as a target, where that folder exists
#   LGW_BIN=path bash benches/load.sh       # measure that binary instead of building one
#   GW_B=path bash benches/load.sh          # A/B: adds target `gatewayb`, another build of the
#                                           # gateway with the same config, in the same run
#   LGW_SYNC=power_safe, GW_B_SYNC=async    # ledger.sync of the gateway / of gatewayb (default:
#                                           # the gateway's default, crash_safe)
#
# Targets, all on 127.0.0.1:
#   (a) direct   nginx `return 200` with a LinkupAPI-shaped JSON answer (the fixed upstream)
#   (b) nginx    nginx as a reverse proxy setting x-api-key, keepalive pool to (a)
#   (c) gateway  linkup-gateway with every feature on (auth, classify, client and account
#                limits, status cache, coalescing, credits with the durable SQLite ledger,
#                key injection, one JSON log line per request), upstream (a)
# Scenarios: POST /v2/profiles with a JSON body over 10,000 distinct account_ids at 16, 64 and
# 256 connections; then a slow upstream (the emulator at 200 ms) with 10,000 connections
# through the gateway and through nginx (same proxy config), side by side. CPU per request is
# user+sys of the proxy's processes (nginx: master and workers) over the requests served. Every process is started here, every run is bounded in time, and
# everything started is stopped by PID on exit. Results: a table on stdout and in
# target/load/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
SOAK=0
FLEET=0
PROFILE=0
SYSCALLS=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --soak) SOAK=1 ;;
    --fleet) FLEET=1 ;;
    --profile) PROFILE=1 ;;
    --syscalls) SYSCALLS=1 ;;
    *) echo "usage: bash benches/load.sh [--quick] [--soak] [--fleet] [--profile] [--syscalls]" >&2; exit 2 ;;
  esac
done
DUR=${DUR:-$([ "$QUICK" = 1 ] && echo 5 || echo 15)}
CONNS=${CONNS:-$([ "$QUICK" = 1 ] && echo "64" || echo "16 64 256")}
SLOW_CONNS=${SLOW_CONNS:-10000}
SLOW=${SLOW:-1}          # SLOW=0 skips the slow-upstream scenario
FAST=${FAST:-1}          # FAST=0 skips the scenarios against nginx (only the slow one runs)
# How the slow scenario's gateway speaks to the emulator: http2 (h2c, as the gateway speaks to
# an https upstream that offers h2) and/or http1; several: one fresh gateway each.
SLOW_PROTOCOLS=${SLOW_PROTOCOLS:-http2}
GW_LOG=${GW_LOG:-info}   # the gateway's --log-level (info: one line per request)

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || { [ "$PROFILE" = 1 ] && ! need perf; } || { [ "$SYSCALLS" = 1 ] && ! need strace; }; then
  echo "installing nginx, wrk, perf and strace (Debian packages)..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nginx wrk linux-perf strace >/dev/null
fi
if [ -n "${LGW_BIN:-}" ]; then
  BIN=$LGW_BIN
else
  cargo build --release --quiet
  BIN=$PWD/target/release/linkup-gateway
fi
GW_B=${GW_B:-}
BARE=${BARE:-0}
BARE_DIR=$PWD/../shared/calibration/bare-hyper
if [ "$BARE" = 1 ] && [ -f "$BARE_DIR/Cargo.toml" ]; then
  cargo build --release --quiet --manifest-path "$BARE_DIR/Cargo.toml" --target-dir "$PWD/target/bare-hyper"
  BARE_BIN=$PWD/target/bare-hyper/release/bare-hyper
else
  BARE=0
fi

WORK=$(mktemp -d /tmp/lgw-load.XXXXXX)
OUT=$PWD/target/load
mkdir -p "$OUT"
PIDS=()
PG_STOP=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$PG_STOP" ]; then eval "$PG_STOP" >/dev/null 2>&1 || true; fi
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

P_UP=18081 P_NGX=18082 P_GW=18083 P_GWA=18093 P_EMU=18084 P_GWS=18085 P_GWSA=18095
P_REDIS=18086 P_PG=18087 P_GWF=18088 P_GWFA=18098 P_NGXS=18089 P_BARE=18090 P_GWB=18091 P_GWBA=18092
UPSTREAM_KEY=load-upstream-key
VKEY=lgw_load_test_key
VSHA=$(printf '%s' "$VKEY" | sha256sum | cut -d' ' -f1)
ANSWER='{"success":true,"data":{"account_id":"acc","profile":{"name":"Ada Lovelace","headline":"Analyst"}},"metadata":{"action":"get","credits_consumed":1,"timestamp":"2026-11-25T10:32:00Z"}}'

# (a) the fixed upstream
cat > "$WORK/upstream.conf" <<EOF
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream-error.log warn;
events { worker_connections 65536; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path $WORK/ub; proxy_temp_path $WORK/up; fastcgi_temp_path $WORK/uf;
  uwsgi_temp_path $WORK/uu; scgi_temp_path $WORK/us;
  server {
    listen 127.0.0.1:$P_UP reuseport backlog=65535;
    location / { default_type application/json; return 200 '$ANSWER'; }
  }
}
EOF
# (b) nginx as the header-injecting reverse proxy
cat > "$WORK/proxy.conf" <<EOF
worker_processes auto;
pid $WORK/proxy.pid;
error_log $WORK/proxy-error.log warn;
events { worker_connections 65536; }
http {
  access_log $WORK/proxy-access.log combined buffer=64k;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path $WORK/pb; proxy_temp_path $WORK/pp; fastcgi_temp_path $WORK/pf;
  uwsgi_temp_path $WORK/pu; scgi_temp_path $WORK/ps;
  upstream linkup { server 127.0.0.1:$P_UP; keepalive 512; }
  server {
    listen 127.0.0.1:$P_NGX reuseport backlog=65535;
    location /v2/ {
      proxy_pass http://linkup;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header x-api-key "$UPSTREAM_KEY";
      proxy_set_header Authorization "";
    }
  }
}
EOF
# (b') the same nginx proxy in front of the slow upstream (the emulator), for the RSS side by side
sed -e "s/127.0.0.1:$P_NGX/127.0.0.1:$P_NGXS/" -e "s/server 127.0.0.1:$P_UP;/server 127.0.0.1:$P_EMU;/" \
  -e "s#$WORK/proxy#$WORK/proxy-slow#g" -e "s#$WORK/p\([bpfus]\);#$WORK/s\1;#g" \
  "$WORK/proxy.conf" > "$WORK/proxy-slow.conf"
gateway_conf() { # listen admin upstream ledger
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
max_in_flight = 20000
request_timeout = "30s"
shutdown_grace = "5s"
[upstream]
url = "$3"
api_key_env = "LGW_UPSTREAM_KEY"
${LGW_UPSTREAM_PROTOCOL:+protocol = \"$LGW_UPSTREAM_PROTOCOL\"}
[[clients]]
name = "load"
key_sha256 = "$VSHA"
daily_credit_budget = 1000000000000
requests_per_second = 1000000
[rate_limit]
per_account = "1000000/min"
burst = 100000
[[rate_limit.rules]]
name = "invites"
path = "/v2/network"
action = "invite"
per_account = "100/week"
burst = 5
[checkpoint]
coalesce = true
[status_cache]
ttl = "10m"
[ledger]
$4
${LGW_SYNC:+sync = \"$LGW_SYNC\"}
[costs]
default = 1
${5:-}
EOF
}
gateway_conf $P_GW $P_GWA "http://127.0.0.1:$P_UP" "path = \"$WORK/ledger.sqlite3\"" > "$WORK/gateway.toml"
LGW_SYNC=${GW_B_SYNC:-${LGW_SYNC:-}} gateway_conf $P_GWB $P_GWBA "http://127.0.0.1:$P_UP" "path = \"$WORK/ledger-b.sqlite3\"" > "$WORK/gateway-b.toml"
for proto in $SLOW_PROTOCOLS; do
  LGW_UPSTREAM_PROTOCOL=$proto gateway_conf $P_GWS $P_GWSA "http://127.0.0.1:$P_EMU" "path = \"$WORK/ledger-slow-$proto.sqlite3\"" > "$WORK/gateway-slow-$proto.toml"
done
gateway_conf $P_GWF $P_GWFA "http://127.0.0.1:$P_UP" "postgres_url = \"postgres://postgres@127.0.0.1:$P_PG/postgres\"" \
  "[fleet]
redis_url = \"redis://127.0.0.1:$P_REDIS/0\"" > "$WORK/gateway-fleet.toml"

cat > "$WORK/post.lua" <<'EOF'
local key = os.getenv("LGW_KEY") or "none"
local path = os.getenv("LGW_PATH") or "/v2/profiles"
local n = tonumber(os.getenv("LGW_ACCOUNTS") or "10000")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = key
local counter = 0
function setup(thread) thread:set("id", counter); counter = counter + 1 end
function init(args) math.randomseed(os.time() + id * 7919) end
function request()
  local acc = string.format("acc%021d", math.random(0, n - 1))
  local body
  if path == "/v2/enrich" then
    body = '{"action":"validate_email","params":{"email":"' .. acc .. '@example.com"}}'
  else
    body = '{"account_id":"' .. acc .. '","action":"get","params":{"profile_url":"https://www.linkedin.com/in/' .. acc .. '"}}'
  end
  return wrk.format(nil, path, nil, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %.3f %d %d %d %d %d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.timeout + e.status, e.status))
end
EOF

wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
# A process and its children (nginx: the master and its workers).
procs() { echo "$1"; pgrep -P "$1" 2>/dev/null || true; }
cpu_ticks() { local t=0 p; for p in $(procs "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
peak_rss_mb() { local k=0 p; for p in $(procs "$1"); do k=$((k + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; awk -v k="$k" 'BEGIN {printf "%.1f", k / 1024}'; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)
# CPU ticks of a process's threads by name (lgw-worker-N counted as one), as "name ticks" lines.
thread_ticks() {
  for t in /proc/"$1"/task/*; do
    awk -v c="$(cat "$t/comm" 2>/dev/null)" '{sub(/-[0-9]+$/, "", c); print c, $14 + $15}' "$t/stat" 2>/dev/null
  done | awk '{t[$1] += $2} END {for (c in t) print c, t[c]}'
}
# "name µs/req ..." of the threads that took at least 1 µs per request between two snapshots.
thread_split() { # before after requests
  awk -v tck="$TCK" -v r="$3" 'NR == FNR {b[$1] = $2; next} {d = ($2 - b[$1]) / tck * 1e6 / (r > 0 ? r : 1); if (d >= 0.05) printf "%s %.1f ", $1, d}' \
    <(echo "$1") <(echo "$2")
}

nginx -p "$WORK" -c "$WORK/upstream.conf" -g 'daemon off;' & UP=$!; PIDS+=($UP)
nginx -p "$WORK" -c "$WORK/proxy.conf" -g 'daemon off;' & NGX=$!; PIDS+=($NGX)
if [ "$BARE" = 1 ]; then
  "$BARE_BIN" "127.0.0.1:$P_BARE" "http://127.0.0.1:$P_UP" percore & BAREPID=$!; PIDS+=($BAREPID)
  wait_port $P_BARE
fi
LGW_UPSTREAM_KEY=$UPSTREAM_KEY "$BIN" --log-format json --log-level "$GW_LOG" serve --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 & GW=$!; PIDS+=($GW)
wait_port $P_UP; wait_port $P_NGX; wait_port $P_GW
if [ -n "$GW_B" ]; then
  LGW_UPSTREAM_KEY=$UPSTREAM_KEY "$GW_B" --log-format json --log-level "$GW_LOG" serve --config "$WORK/gateway-b.toml" > "$WORK/gateway-b.log" 2>&1 & GWB=$!; PIDS+=($GWB)
  wait_port $P_GWB
  LGW_KEY=$VKEY wrk -t2 -c64 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$P_GWB" >/dev/null
fi

ROWS=()
SPLITS=()
run() { # name url conns duration pid(optional) path
  local name=$1 url=$2 c=$3 d=$4 pid=${5:-} path=${6:-/v2/profiles}
  local t=$(( c < 2 ? 1 : 2 ))
  local before=0 threads0=""; [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  case "$name" in gateway*|slow*|fleet) threads0=$(thread_ticks "$pid") ;; esac
  local line
  line=$(LGW_KEY=$VKEY LGW_PATH=$path wrk -t"$t" -c"$c" -d"${d}s" --timeout 10s -s "$WORK/post.lua" "$url" | grep '^RESULT')
  read -r _ reqs secs p50 p99 p999 errs status <<<"$line"
  local rps; rps=$(awk -v r="$reqs" -v s="$secs" 'BEGIN {printf "%.0f", r / s}')
  local rss="-" cpu="-"
  if [ -n "$pid" ]; then
    rss=$(peak_rss_mb "$pid")
    cpu=$(awk -v a="$before" -v b="$(cpu_ticks "$pid")" -v t="$TCK" -v r="$reqs" 'BEGIN {printf "%.1f", (b - a) / t * 1e6 / (r > 0 ? r : 1)}')
  fi
  if [ -n "$threads0" ]; then
    SPLITS+=("$name c=$c CPU µs/req by thread: $(thread_split "$threads0" "$(thread_ticks "$pid")" "$reqs")")
    echo "    ${SPLITS[-1]}"
  fi
  ROWS+=("$name|$c|$rps|$(awk -v u="$p50" 'BEGIN{printf "%.3f", u/1000}')|$(awk -v u="$p99" 'BEGIN{printf "%.3f", u/1000}')|$(awk -v u="$p999" 'BEGIN{printf "%.3f", u/1000}')|$errs|$rss|$cpu")
  eval "RPS_${name}_${c}=$rps; P99_${name}_${c}=$p99; CPU_${name}_${c}=$cpu; RSS_${name}_${c}=$rss"
  printf '  %-8s c=%-5s %8s req/s  p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  errors %s\n' "$name" "$c" "$rps" \
    "$(awk -v u="$p50" 'BEGIN{print u/1000}')" "$(awk -v u="$p99" 'BEGIN{print u/1000}')" "$(awk -v u="$p999" 'BEGIN{print u/1000}')" "$errs"
}

if [ "$FAST" = 1 ]; then
echo "warming up..."
LGW_KEY=$VKEY wrk -t2 -c64 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$P_GW" >/dev/null
LGW_KEY=$VKEY wrk -t2 -c64 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$P_NGX" >/dev/null
fi
[ "$FAST" = 1 ] || CONNS=""
for c in $CONNS; do
  echo "POST /v2/profiles, $c connections, ${DUR}s each:"
  run direct "http://127.0.0.1:$P_UP" "$c" "$DUR" "$UP"
  run nginx "http://127.0.0.1:$P_NGX" "$c" "$DUR" "$NGX"
  [ "$BARE" = 1 ] && run barehyper "http://127.0.0.1:$P_BARE" "$c" "$DUR" "$BAREPID"
  run gateway "http://127.0.0.1:$P_GW" "$c" "$DUR" "$GW"
  [ -n "$GW_B" ] && run gatewayb "http://127.0.0.1:$P_GWB" "$c" "$DUR" "$GWB"
done

# A CPU profile of the gateway under the 64-connection load, with call graphs.
if [ "$PROFILE" = 1 ]; then
  echo "profiling the gateway at 64 connections (perf record -g, ${DUR}s)..."
  perf record -g -F 999 -p "$GW" -o "$OUT/perf.data" -- sleep "$DUR" >/dev/null 2>&1 &
  PERF=$!
  LGW_KEY=$VKEY wrk -t2 -c64 -d"${DUR}s" -s "$WORK/post.lua" "http://127.0.0.1:$P_GW" >/dev/null
  wait "$PERF" || true
  perf report -i "$OUT/perf.data" --no-children --sort comm,dso,symbol --stdio 2>/dev/null | head -200 > "$OUT/perf-report.txt" || true
  echo "  $OUT/perf.data, top of the report in $OUT/perf-report.txt"
fi

# Syscalls per request (strace slows the target down; the counts per request are what matter).
if [ "$SYSCALLS" = 1 ]; then
  for t in "nginx $NGX $P_NGX" "gateway $GW $P_GW"; do
    read -r name pid port <<<"$t"
    args=(); for p in $(procs "$pid"); do args+=(-p "$p"); done
    strace -c -f -o "$OUT/syscalls-$name.raw" "${args[@]}" & ST=$!
    sleep 0.5
    n=$(LGW_KEY=$VKEY wrk -t2 -c64 -d5s -s "$WORK/post.lua" "http://127.0.0.1:$port" | awk '/^RESULT/ {print $2}')
    kill -INT "$ST" 2>/dev/null; wait "$ST" 2>/dev/null || true
    awk -v n="$n" -v name="$name" 'BEGIN {printf "%s: %d requests under strace; syscalls per request:\n", name, n}
      $NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {printf "  %-16s %6.2f\n", $NF, $4 / n; t += $4}
      END {printf "  %-16s %6.2f\n", "all", t / n}' "$OUT/syscalls-$name.raw" | tee "$OUT/syscalls-$name.txt"
  done
fi

if [ "$SOAK" = 1 ]; then
  echo "soak: 5 minutes at 64 connections through the gateway..."
  rss0=$(rss_mb "$GW")
  LGW_KEY=$VKEY wrk -t2 -c64 -d300s -s "$WORK/post.lua" "http://127.0.0.1:$P_GW" >/dev/null
  rss1=$(rss_mb "$GW")
  SOAK_LINE="soak 5 min @64: gateway RSS ${rss0} MB -> ${rss1} MB"
  echo "  $SOAK_LINE"
fi

# Fleet mode: the same gateway with its limits, budgets, cache and leases in Redis and its
# ledger in PostgreSQL (private servers from Debian's packages, started here), against the
# embedded gateway above, at 64 connections; and Redis round trips per request.
if [ "$FLEET" = 1 ]; then
  if ! need redis-server || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "installing redis-server and postgresql (Debian packages)..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq redis-server postgresql >/dev/null
  fi
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  AS=(); [ "$(id -u)" = 0 ] && AS=(runuser -u postgres --)
  redis-server --bind 127.0.0.1 --port $P_REDIS --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 & PIDS+=($!)
  mkdir -p "$WORK/pg"; [ "$(id -u)" = 0 ] && chown postgres: "$WORK" "$WORK/pg"
  "${AS[@]}" "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust -N >/dev/null
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
    -o "-p $P_PG -k $WORK/pg -c listen_addresses=127.0.0.1" start >/dev/null
  PG_STOP="${AS[*]} $PGBIN/pg_ctl -D $WORK/pg/data -m immediate stop"
  wait_port $P_REDIS; wait_port $P_PG
  LGW_UPSTREAM_KEY=$UPSTREAM_KEY "$BIN" --log-format json --log-level "$GW_LOG" serve --config "$WORK/gateway-fleet.toml" > "$WORK/gateway-fleet.log" 2>&1 & GWF=$!; PIDS+=($GWF)
  wait_port $P_GWF
  LGW_KEY=$VKEY wrk -t2 -c64 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$P_GWF" >/dev/null
  fleet_counts() { # requests, store round trips other than the probe, of them on the caller's path (admit)
    curl -s "http://127.0.0.1:$P_GWFA/metrics" | awk '
      /^linkup_gateway_requests_total\{/ {r += $NF}
      /^linkup_gateway_fleet_round_trips_total\{/ && !/op="probe"/ {t += $NF}
      /^linkup_gateway_fleet_round_trips_total\{/ && /op="admit"/ {a += $NF}
      END {printf "%d %d %d\n", r, t, a}'
  }
  read -r r0 t0 a0 <<<"$(fleet_counts)"
  echo "fleet mode (Redis + PostgreSQL), 64 connections, ${DUR}s:"
  run fleet "http://127.0.0.1:$P_GWF" 64 "$DUR" "$GWF"
  read -r r1 t1 a1 <<<"$(fleet_counts)"
  FLEET_RT=$(awk -v r=$((r1 - r0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.2f", (r > 0 ? t / r : 0)}')
  FLEET_HOT=$(awk -v r=$((r1 - r0)) -v t=$((a1 - a0)) 'BEGIN {printf "%.2f", (r > 0 ? t / r : 0)}')
  echo "  Redis round trips per request: $FLEET_HOT on the caller's path (admit), $FLEET_RT in all (probe excluded)"
fi

# The slow upstream: the emulator answering after 200 ms, 10,000 connections.
if [ "$SLOW" = 1 ]; then
"$BIN" --log-format json --log-level warn emulator --listen "127.0.0.1:$P_EMU" --api-key "$UPSTREAM_KEY" --credits 1000000000000 > "$WORK/emulator.log" 2>&1 & PIDS+=($!)
wait_port $P_EMU
curl -s -X POST "http://127.0.0.1:$P_EMU/_emulator/faults" -H 'content-type: application/json' -d '{"latency_ms":200}' >/dev/null
nginx -p "$WORK" -c "$WORK/proxy-slow.conf" -g 'daemon off;' & NGXS=$!; PIDS+=($NGXS)
wait_port $P_NGXS
echo "slow upstream (200 ms), $SLOW_CONNS connections through nginx, then the gateway ($SLOW_PROTOCOLS upstream), ${DUR}s each:"
run slownginx "http://127.0.0.1:$P_NGXS" "$SLOW_CONNS" "$DUR" "$NGXS" /v2/enrich
for proto in $SLOW_PROTOCOLS; do
  LGW_UPSTREAM_KEY=$UPSTREAM_KEY "$BIN" --log-format json serve --config "$WORK/gateway-slow-$proto.toml" > "$WORK/gateway-slow-$proto.log" 2>&1 & GWS=$!; PIDS+=($GWS)
  wait_port $P_GWS
  name=slow; [ "$proto" = http2 ] || name=slow$proto
  run "$name" "http://127.0.0.1:$P_GWS" "$SLOW_CONNS" "$DUR" "$GWS" /v2/enrich
  kill "$GWS" 2>/dev/null; wait "$GWS" 2>/dev/null || true
  while (exec 3<>"/dev/tcp/127.0.0.1/$P_GWS") 2>/dev/null; do sleep 0.2; done
done
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
{
  echo "# linkup-gateway load run — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk -t2, ${DUR}s per run; 10,000 distinct account_ids."
  echo "RSS is the target's peak (VmHWM, summed over nginx's processes) so far; CPU is user+sys of the target's processes per request served."
  echo
  echo "| target | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | peak RSS MB | CPU µs/req |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for r in "${ROWS[@]}"; do echo "|${r//|/ | }|"; done
  echo
  echo "| conns | gateway/nginx throughput | gateway/direct throughput | p99 added by gateway (ms) | p99 added by nginx (ms) | CPU µs/req gateway | CPU µs/req nginx |"
  echo "|---|---|---|---|---|---|---|"
  for c in $CONNS; do
    g=RPS_gateway_$c n=RPS_nginx_$c d=RPS_direct_$c
    gp=P99_gateway_$c np=P99_nginx_$c dp=P99_direct_$c gc=CPU_gateway_$c nc=CPU_nginx_$c
    echo "| $c | $(ratio "${!g}" "${!n}") | $(ratio "${!g}" "${!d}") | $(awk -v a="${!gp}" -v b="${!dp}" 'BEGIN{printf "%.3f", (a-b)/1000}') | $(awk -v a="${!np}" -v b="${!dp}" 'BEGIN{printf "%.3f", (a-b)/1000}') | ${!gc} | ${!nc} |"
  done
  if [ "$SLOW" = 1 ]; then
    sn=RSS_slownginx_$SLOW_CONNS
    echo
    for proto in $SLOW_PROTOCOLS; do
      name=slow; [ "$proto" = http2 ] || name=slow$proto
      sg=RSS_${name}_$SLOW_CONNS
      echo "Slow upstream (200 ms), $SLOW_CONNS connections: peak RSS gateway ($proto upstream) ${!sg:-?} MB, nginx ${!sn:-?} MB (errors in the table above)."
    done
  fi
  if [ ${#SPLITS[@]} -gt 0 ]; then
    echo
    for l in "${SPLITS[@]}"; do echo "- $l"; done
  fi
  [ -n "${SOAK_LINE:-}" ] && { echo; echo "$SOAK_LINE"; }
  if [ "$FLEET" = 1 ]; then
    echo
    echo "Fleet mode at 64 connections: fleet/embedded throughput $(ratio "$RPS_fleet_64" "${RPS_gateway_64:-0}"), Redis round trips per request: $FLEET_HOT on the caller's path (the admit script), $FLEET_RT in all (the settle after the answer included; probe excluded)."
  fi
  echo
  echo "Ledger rows written by the gateway: $(sqlite3 "$WORK/ledger.sqlite3" 'select count(*) from ledger_rows' 2>/dev/null || echo '?')"
} | tee "$OUT/results.md"
