#!/usr/bin/env bash
# The TCP gateway against HAProxy (mode tcp, nbthread 1) and nginx (stream, one worker),
# side by side in one run, each in front of the same two servers: a source (bytes as fast
# as they are read) and an echo (one byte back per connection). Two loads, alternating
# between proxies ROUNDS times: a bulk stream over CONNS connections (MB/s) and short
# connections (connect, one byte each way, close) from CLIENTS concurrent clients
# (connections/s). Each proxy's own CPU (user + system, from /proc) is divided by the MB
# or connections it carried. Medians, and ratios to HAProxy. allot is built with the
# `dist` profile, as installed.
#
#   bench/tcp.sh                      # ROUNDS=3 DURATION=5 CONNS=4 CLIENTS=50
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-4}
CLIENTS=${CLIENTS:-50}

need=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --profile dist --bin allot --example tcp_load --quiet
ALLOT=target/dist/allot
LOAD=target/dist/examples/tcp_load
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

SRC=$(free_port); ECHO=$(free_port)
$LOAD source "127.0.0.1:$SRC" >/dev/null & pids+=($!)
$LOAD echo "127.0.0.1:$ECHO" >/dev/null & pids+=($!)
wait_port "$SRC"; wait_port "$ECHO"

HB=$(free_port); HS=$(free_port); NB=$(free_port); NS=$(free_port); AB=$(free_port); AS=$(free_port); ADMIN=$(free_port)

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen bulk
  bind 127.0.0.1:$HB
  server s 127.0.0.1:$SRC
listen short
  bind 127.0.0.1:$HS
  server s 127.0.0.1:$ECHO
CONF
"$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!); HAPROXY_PID=$!

cat > "$work/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 20000; }
stream {
  server { listen 127.0.0.1:$NB; proxy_pass 127.0.0.1:$SRC; }
  server { listen 127.0.0.1:$NS; proxy_pass 127.0.0.1:$ECHO; }
}
CONF
"$NGINX" -c "$work/nginx.conf" -p "$work" -g 'daemon off;' 2>>"$work/nginx-error.log" & pids+=($!); NGINX_MASTER=$!

cat > "$work/allot.toml" <<CONF
[[listener]]
name = "bulk"
address = "127.0.0.1:$AB"
protocol = "tcp"
entry_chain = "main"
[[listener]]
name = "short"
address = "127.0.0.1:$AS"
protocol = "tcp"
entry_chain = "main"
[admin]
address = "127.0.0.1:$ADMIN"
[gateway]
max_running = 100000
[[backend]]
name = "source"
addresses = ["127.0.0.1:$SRC"]
[[backend]]
name = "echo"
addresses = ["127.0.0.1:$ECHO"]
[[class]]
name = "bulk"
backend = "source"
[[class]]
name = "short"
backend = "echo"
[[chain]]
name = "main"
default = { class = "bulk" }
[[chain.rule]]
id = "short"
listener = "short"
target = { class = "short" }
CONF
$ALLOT gateway --config "$work/allot.toml" --threads 1 >"$work/allot.out" 2>"$work/allot.err" & pids+=($!); ALLOT_PID=$!

for p in "$HB" "$HS" "$NB" "$NS" "$AB" "$AS"; do wait_port "$p"; done
NGINX_WORKERS=$(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')
declare -A proc=([haproxy]=$HAPROXY_PID [nginx]="${NGINX_WORKERS:-$NGINX_MASTER}" [allot]=$ALLOT_PID)
declare -A bulk_port=([haproxy]=$HB [nginx]=$NB [allot]=$AB)
declare -A short_port=([haproxy]=$HS [nginx]=$NS [allot]=$AS)
cpu_ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
TICK=$(getconf CLK_TCK)
order=(haproxy nginx allot)
declare -A mbs cpu_mb cps cpu_conn
for r in $(seq "$ROUNDS"); do
  for t in "${order[@]}"; do
    c0=$(cpu_ticks "${proc[$t]}")
    m=$($LOAD bulk "127.0.0.1:${bulk_port[$t]}" "$DURATION" "$CONNS")
    c1=$(cpu_ticks "${proc[$t]}")
    per_mb=$(awk -v a="$c0" -v b="$c1" -v m="$m" -v d="$DURATION" -v hz="$TICK" 'BEGIN{printf "%.1f", (b-a)*1e6/hz/(m*d)}')
    c0=$(cpu_ticks "${proc[$t]}")
    s=$($LOAD short "127.0.0.1:${short_port[$t]}" "$DURATION" "$CLIENTS")
    c1=$(cpu_ticks "${proc[$t]}")
    per_conn=$(awk -v a="$c0" -v b="$c1" -v s="$s" -v d="$DURATION" -v hz="$TICK" 'BEGIN{printf "%.1f", (b-a)*1e6/hz/(s*d)}')
    mbs[$t]+="$m "; cpu_mb[$t]+="$per_mb "; cps[$t]+="$s "; cpu_conn[$t]+="$per_conn "
    echo "round $r $t: bulk $m MB/s ($per_mb µs CPU per MB), short $s conn/s ($per_conn µs CPU per connection)" >&2
    sleep 1
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{print (b > 0 ? a/b : 0)}'; }
b_mbs=$(median <<<"${mbs[haproxy]}"); b_cps=$(median <<<"${cps[haproxy]}")
b_cmb=$(median <<<"${cpu_mb[haproxy]}"); b_ccn=$(median <<<"${cpu_conn[haproxy]}")
echo
echo "medians of $ROUNDS rounds of ${DURATION}s: bulk over $CONNS connections, short connections from $CLIENTS clients; one worker per proxy"
printf '| %-8s | %8s | %9s | %12s | %10s | %9s | %14s |\n' proxy "bulk MB/s" "÷ HAProxy" "CPU µs/MB ÷" "short c/s" "÷ HAProxy" "CPU µs/conn ÷"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ----------- ----------- -------------- ------------ ----------- ----------------
for t in "${order[@]}"; do
  m=$(median <<<"${mbs[$t]}"); s=$(median <<<"${cps[$t]}"); cm=$(median <<<"${cpu_mb[$t]}"); cc=$(median <<<"${cpu_conn[$t]}")
  printf '| %-8s | %8.0f | %9.2f | %6.0f (%4.2f) | %10.0f | %9.2f | %7.1f (%4.2f) |\n' "$t" "$m" "$(ratio "$m" "$b_mbs")" "$cm" "$(ratio "$cm" "$b_cmb")" "$s" "$(ratio "$s" "$b_cps")" "$cc" "$(ratio "$cc" "$b_ccn")"
done
