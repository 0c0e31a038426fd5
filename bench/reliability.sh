#!/usr/bin/env bash
# Reliability under abuse, against the release binary in front of allot's synthetic back
# end (4 workers, 50 ms a request: about 80 requests/s), with wrk, httperf, curl and
# raw-socket Python clients (bench/reliability_clients.py). Each check prints its figure
# next to its bound and PASS or FAIL:
#
#   overload     10× the back end's capacity from httperf: goodput ≥ 90% of capacity,
#                every request exactly one answer, RSS before and after
#   slowloris    5 000 connections sending a head a header a second: all get 408, and
#                other clients' p99 stays < 2× its value without them
#   stalled      uploads that stop, clients gone mid-wait, responses never read: every
#                gauge (queue, in flight, running, back end) back to 0 within the timeout
#   backend kill the back end killed and restarted under load: 502s, then recovery,
#                no request hangs
#   reload       20 SIGHUPs under wrk load: 0 errors
#   corpus       malformed and smuggling inputs: each gets its status, and the back end
#                sees exactly what the gateway forwarded
#   fuzz         FUZZ_MINUTES of random mutation of valid requests: 0 crashes, 0 hangs,
#                0 leaked gauges, the back end sees exactly what the gateway forwarded
#
#   bench/reliability.sh            # FUZZ_MINUTES=5; about 8 minutes in all
#   FUZZ_MINUTES=1 bench/reliability.sh
#   ALLOT=path/to/allot bench/reliability.sh
#
# Exit status: 0 when every check passed. Record the figures in docs/reliability.md.
set -uo pipefail
cd "$(dirname "$0")/.."
FUZZ_MINUTES=${FUZZ_MINUTES:-5}
OVERLOAD=${OVERLOAD:-10}
SLOWLORIS=${SLOWLORIS:-5000}
WORKERS=4
SERVICE_MS=50

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v httperf >/dev/null || need+=(httperf)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The slowloris clients and the gateway each need thousands of descriptors.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((SLOWLORIS + 2000)) ]; then
  echo "ulimit -n is $(ulimit -n): too few descriptors for $SLOWLORIS connections" >&2
  exit 2
fi

if [ -z "${ALLOT:-}" ]; then
  cargo build --release --bin allot --quiet
  ALLOT=target/release/allot
fi
CLIENTS="python3 bench/reliability_clients.py"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

failures=0
# check NAME FIGURE BOUND OK(0/1): one line of the result table.
check() {
  local verdict=PASS
  [ "$4" = 1 ] || { verdict=FAIL; failures=$((failures + 1)); }
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$verdict"
}
ge() { awk -v a="$1" -v b="$2" 'BEGIN{print (a >= b) ? 1 : 0}'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN{print (a < b) ? 1 : 0}'; }
# wrk's p99 in ms.
p99_ms() { awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}'; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

BPORT=$(free_port); GPORT=$(free_port); APORT=$(free_port)
BACKEND=127.0.0.1:$BPORT; GW=127.0.0.1:$GPORT; ADMIN=127.0.0.1:$APORT
start_backend() {
  $ALLOT backend --listen "$BACKEND" --workers $WORKERS --service-ms $SERVICE_MS --threads 1 >/dev/null &
  BACKEND_PID=$!
  pids+=($BACKEND_PID)
  wait_port "$BPORT"
}
start_backend

# The gateway: one class as wide as the back end, a short queue. `gateway_config SHORT`
# writes it; SHORT=1 shortens every client timeout to 1–2 s (stalled clients, corpus,
# fuzz), SHORT=0 keeps the defaults (a 10 s head timeout for the slowloris). PRIORITY
# changes between reloads so each reload builds a different runtime.
gateway_config() {
  local timeouts=""
  [ "$1" = 1 ] && timeouts='first_byte_timeout_ms = 2000
head_timeout_ms = 2000
request_body_timeout_ms = 2000
send_timeout_ms = 2000
idle_timeout_ms = 1000
max_body_bytes = 1048576'
  cat <<CONF
[listener]
address = "$GW"
$timeouts
[admin]
address = "$ADMIN"
[[backend]]
name = "app"
addresses = ["$BACKEND"]
[[class]]
name = "all"
backend = "app"
priority = ${2:-1}
max_running = $WORKERS
queue_limit = 64
max_wait_ms = 1000
CONF
}
gateway_config 0 > "$work/allot.toml"
$ALLOT gateway --config "$work/allot.toml" > "$work/allot.out" 2>"$work/allot.err" &
GW_PID=$!
pids+=($GW_PID)
wait_port "$GPORT"
alive() { kill -0 "$GW_PID" 2>/dev/null && echo 1 || echo 0; }
held_now() { $CLIENTS gauges "$ADMIN" | cut -d' ' -f1; }

echo "allot $($ALLOT --version 2>/dev/null | head -1), back end $WORKERS workers × $SERVICE_MS ms; $(nproc) cores; $(date -u +%FT%TZ)"
echo
echo "| check | measured | bound | |"
echo "|---|---|---|---|"

# --- capacity, then 10× overload --------------------------------------------------------
capacity=$(wrk -t1 -c$WORKERS -d5s "http://$BACKEND/cap" | awk '/Requests\/sec/ {printf "%.0f", $2}')
rate=$((capacity * OVERLOAD))
conns=$((rate * 20))
rss0=$(rss_kb "$GW_PID")
perfs=()
# Two httperf processes, each with half the rate: one is limited to 1 024 open sockets.
for i in 1 2; do
  timeout 90 httperf --hog --server 127.0.0.1 --port "$GPORT" --uri /overload --rate $((rate / 2)) \
    --num-conns $((conns / 2)) --num-calls 1 --timeout 5 > "$work/httperf$i.out" 2>&1 &
  perfs+=($!)
done
wait "${perfs[@]}"
conns=$((conns / 2 * 2))
rss1=$(rss_kb "$GW_PID")
cat "$work"/httperf[12].out > "$work/httperf.out"
# Sums over both: requests, replies, 2xx, errors; the longer test duration.
read -r requests replies duration < <(awk '/^Total:/ {r += $5; p += $7; if ($9 > d) d = $9} END {print r, p, d}' "$work/httperf.out")
ok2xx=$(sed -n 's/.*2xx=\([0-9]*\).*/\1/p' "$work/httperf.out" | awk '{n += $1} END {print n}')
errors=$(awk '/^Errors: total/ {n += $3} END {print n}' "$work/httperf.out")
error_kinds=$(grep '^Errors: total' "$work/httperf.out" | tr -s ' ' | cut -d' ' -f3- | tr '\n' ';')
offered=$(awk -v n="$requests" -v d="$duration" -v c="$capacity" 'BEGIN{printf "%.1f", n/d/c}')
goodput=$(awk -v n="$ok2xx" -v d="$duration" 'BEGIN{printf "%.0f", n/d}')
check "overload: offered load, × capacity ($capacity req/s direct)" "$offered×" "≥ $((OVERLOAD * 9 / 10))×" "$(ge "$offered" $((OVERLOAD * 9 / 10)))"
check "overload: goodput (2xx/s)" "$goodput" "≥ 90% of $capacity" "$(ge "$goodput" "$(awk -v c="$capacity" 'BEGIN{print c*0.9}')")"
check "overload: answers / requests sent ($conns connections)" "$replies / $requests; $error_kinds" "every request one answer" "$([ "$replies" = "$conns" ] && [ "$requests" = "$conns" ] && [ "$errors" = 0 ] && echo 1 || echo 0)"
check "overload: gateway RSS before → after" "$((rss0 / 1024)) → $((rss1 / 1024)) MB" "< 64 MB after" "$(lt "$rss1" 65536)"

# --- slowloris --------------------------------------------------------------------------
normal=$(wrk -t1 -c$WORKERS -d5s --latency "http://$GW/normal" | p99_ms)
$CLIENTS slowloris "$GW" "$SLOWLORIS" 24 > "$work/slowloris.out" &
loris=$!
sleep 3
during_out=$(wrk -t1 -c$WORKERS -d5s --latency "http://$GW/during")
during=$(p99_ms <<<"$during_out")
during_errs=$(grep -cE 'Non-2xx|Socket errors' <<<"$during_out")
wait $loris
connected=$(sed -n 's/^slowloris_connected=\([0-9]*\).*/\1/p' "$work/slowloris.out")
got408=$(sed -n 's/^slowloris_408=//p' "$work/slowloris.out")
check "slowloris: connections held open, then answered 408" "$connected open, $got408 × 408" "all $SLOWLORIS, all 408" "$([ "$connected" = "$SLOWLORIS" ] && [ "$got408" = "$SLOWLORIS" ] && echo 1 || echo 0)"
check "slowloris: others' p99 (ms), without → with" "$normal → $during, errors: $during_errs" "< 2× ($(awk -v n="$normal" 'BEGIN{print 2*n}'))" "$([ "$during_errs" = 0 ] && [ "$(lt "$during" "$(awk -v n="$normal" 'BEGIN{print 2*n}')")" = 1 ] && echo 1 || echo 0)"

# --- back end killed and restarted under load -------------------------------------------
$CLIENTS record "$GW" 14 4 "$work/record.csv" &
rec=$!
sleep 3; kill_at=$(date +%s.%N); kill -9 "$BACKEND_PID"; wait "$BACKEND_PID" 2>/dev/null
sleep 4; restart_at=$(date +%s.%N); start_backend
wait $rec
read -r before during_502 other first_ok after_ok after_all slowest < <(awk -F, -v k="$kill_at" -v r="$restart_at" '
  { t=$1; d=$2; s=$3; if (d > slow) slow = d
    if (t + d < k) { if (s == 200) b++ }
    else if (t < r) { if (s == 502) f++; else if (s != 200) o++ }
    else { if (s == 200 && first == "") first = t + d - r
           if (first != "" && t > r + first) { all++; if (s == 200) ok++ } } }
  END { printf "%d %d %d %s %d %d %.2f\n", b, f, o, (first == "" ? "never" : sprintf("%.2f", first)), ok, all, slow }' "$work/record.csv")
check "back end down: 200s before, 502s while down, other" "$before, $during_502, $other" "502 while down" "$([ "$during_502" -gt 0 ] && [ "$other" = 0 ] && echo 1 || echo 0)"
check "back end back: first 200 after restart (s), then 200s" "$first_ok s, $after_ok / $after_all" "< 5 s, all" "$([ "$first_ok" != never ] && [ "$(lt "$first_ok" 5)" = 1 ] && [ "$after_ok" = "$after_all" ] && echo 1 || echo 0)"
check "back end kill: slowest answer (s)" "$slowest" "< 5 (no hang)" "$(lt "$slowest" 5)"

# --- 20 reloads under load --------------------------------------------------------------
reloads0=$(grep -c "configuration reloaded" "$work/allot.err")
wrk -t1 -c$WORKERS -d14s "http://$GW/reload" > "$work/wrk-reload.out" &
w=$!
sleep 1
for i in $(seq 20); do gateway_config 0 $((i % 2 + 1)) > "$work/allot.toml"; kill -HUP "$GW_PID"; sleep 0.5; done
wait $w
reloads=$(($(grep -c "configuration reloaded" "$work/allot.err") - reloads0))
served=$(awk '/requests in/ {print $1}' "$work/wrk-reload.out")
errs=$(grep -E 'Non-2xx|Socket errors' "$work/wrk-reload.out" | tr -s ' ' | tr '\n' ' ')
check "reload: SIGHUPs taken under wrk load, requests, errors" "$reloads, $served, ${errs:-0 errors}" "20, 0 errors" "$([ "$reloads" = 20 ] && [ -z "$errs" ] && [ "$(alive)" = 1 ] && echo 1 || echo 0)"

# Short client timeouts from here on (new connections read them).
gateway_config 1 > "$work/allot.toml"; kill -HUP "$GW_PID"; sleep 1

# --- stalled bodies and clients that go away --------------------------------------------
# Each kind on its own, 20 clients: uploads stopped midway (the 2 s body timeout), large
# responses never read (the 2 s send timeout), clients gone while their request waits
# for a slow answer (3 s).
for kind in body:2 unread:2 gone:3; do
  bound=$(awk -v t="${kind#*:}" 'BEGIN{print t + 1.5}')
  $CLIENTS stalled "$GW" "$ADMIN" "${kind%:*}" 20 > "$work/stalled.out"
  held=$(sed -n 's/^stalled_held_at_end=//p' "$work/stalled.out")
  peak=$(sed -n 's/^stalled_peak_held=//p' "$work/stalled.out")
  secs=$(sed -n 's/^stalled_seconds_to_zero=//p' "$work/stalled.out")
  open=$(sed -n 's/^stalled_connections_at_end=//p' "$work/stalled.out")
  secs_conn=$(sed -n 's/^stalled_seconds_to_no_connection=//p' "$work/stalled.out")
  check "stalled ${kind%:*}: sum of the held gauges, peak → end" "$peak → $held after $secs s" "0 within $bound s" "$([ "$held" = 0 ] && [ "$(lt "$secs" "$bound")" = 1 ] && echo 1 || echo 0)"
  check "stalled ${kind%:*}: client connections open at end" "$open after $secs_conn s" "0 within $bound s" "$([ "$open" = 0 ] && [ "$(lt "$secs_conn" "$bound")" = 1 ] && echo 1 || echo 0)"
done

# --- malformed and smuggling corpus -----------------------------------------------------
$CLIENTS corpus "$GW" "$BACKEND" "$ADMIN" > "$work/corpus.out"
cfail=$(sed -n 's/^corpus_failed=//p' "$work/corpus.out")
ccount=$(grep -c '^corpus |' "$work/corpus.out")
check "corpus: cases with their status and back-end count" "$((ccount - cfail)) / $ccount" "all" "$([ "$cfail" = 0 ] && echo 1 || echo 0)"

# --- random mutation --------------------------------------------------------------------
read -r b0 f0 < <($CLIENTS counts "$BACKEND" "$ADMIN")
$CLIENTS fuzz "$GW" $((FUZZ_MINUTES * 60)) 32 > "$work/fuzz.out"
for _ in $(seq 50); do [ "$(held_now)" = 0 ] && break; sleep 0.1; done
read -r b1 f1 < <($CLIENTS counts "$BACKEND" "$ADMIN")
cases=$(sed -n 's/^fuzz_cases=//p' "$work/fuzz.out")
hangs=$(sed -n 's/^fuzz_hangs=//p' "$work/fuzz.out")
check "fuzz ($FUZZ_MINUTES min): cases, crashes, hangs" "$cases, $((1 - $(alive))), $hangs" "0 crashes, 0 hangs" "$([ "$(alive)" = 1 ] && [ "$hangs" = 0 ] && echo 1 || echo 0)"
check "fuzz: gauges held 5 s after" "$(held_now)" "0" "$([ "$(held_now)" = 0 ] && echo 1 || echo 0)"
check "fuzz: back-end requests / forwarded by the gateway" "$((b1 - b0)) / $((f1 - f0))" "equal" "$([ $((b1 - b0)) = $((f1 - f0)) ] && echo 1 || echo 0)"
check "gateway still serving (curl)" "$(curl -s -o /dev/null -w '%{http_code}' "http://$GW/end")" "200" "$([ "$(curl -s -o /dev/null -w '%{http_code}' "http://$GW/end")" = 200 ] && echo 1 || echo 0)"

echo
echo "corpus:"
echo "| case | statuses | expected | back end | |"
echo "|---|---|---|---|---|"
sed -n 's/^corpus | /| /p' "$work/corpus.out" | sed 's/$/ |/'
echo
grep '^fuzz_statuses\|^fuzz_hang_example\|^fuzz_connect' "$work/fuzz.out"
grep -c ' ERROR \|"level":"ERROR"' "$work/allot.err" | sed 's/^/gateway error lines: /'
echo "$failures check(s) failed"
exit $((failures > 0))
