#!/usr/bin/env bash
# Reverse-proxy overhead, side by side in one run: direct to the back end, through nginx,
# through HAProxy and through allot (rules and metrics on, no limits). Each proxy gets
# THREADS workers (nginx worker_processes, HAProxy nbthread, allot --threads; default 1);
# wrk uses as many threads and 50 connections. Runs alternate between targets, ROUNDS times, and the medians
# are printed with their ratios to nginx. allot is built with the `dist` profile.
# Besides req/s and p99, each proxy's own CPU time per request (user + system, from
# /proc/PID/stat) is printed: on a shared, noisy machine it varies far less than req/s.
#
#   bench/proxy.sh                 # ROUNDS=3 DURATION=10s THREADS=1 by default
#   ROUNDS=5 DURATION=20s bench/proxy.sh
#   THREADS=2 bench/proxy.sh       # two workers each (on a 2-core machine they share it
#                                  # with wrk and the back end)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

# The binary a user installs: the `dist` profile (fat LTO, one codegen unit), as nginx and
# HAProxy come from the distribution's optimised builds. About three minutes to build.
# ALLOT=path/to/allot measures another build instead.
if [ -z "${ALLOT:-}" ]; then
  cargo build --profile dist --bin allot --quiet
  ALLOT=target/dist/allot
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The back end: allot's synthetic server, one thread, answering a small body at once.
$ALLOT backend --listen 127.0.0.1:0 --workers 100000 --threads 1 > "$work/backend.out" &
pids+=($!)
BACKEND_PID=$!
for _ in $(seq 100); do grep -q listening "$work/backend.out" 2>/dev/null && break; sleep 0.05; done
BACKEND=$(sed -n 's/^listening backend=//p' "$work/backend.out")

NGINX_PORT=$(free_port); HAPROXY_PORT=$(free_port); ALLOT_PORT=$(free_port); ADMIN_PORT=$(free_port)

cat > "$work/nginx.conf" <<CONF
worker_processes $THREADS;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server $BACKEND; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
"$NGINX" -c "$work/nginx.conf" -p "$work" -g 'daemon off;' 2>>"$work/nginx-error.log" &
pids+=($!)
NGINX_MASTER=$!

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread $THREADS
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend be
backend be
  server s1 $BACKEND
CONF
"$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)
HAPROXY_PID=$!

# shellcheck source=bench/proxy_allot_config.sh
source "bench/proxy_allot_config.sh"
proxy_allot_config "$ALLOT_PORT" "$ADMIN_PORT" "$BACKEND" > "$work/allot.toml"
$ALLOT gateway --config "$work/allot.toml" --threads "$THREADS" > "$work/allot.out" 2>"$work/allot.err" &
pids+=($!)
ALLOT_PID=$!

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
for p in "${BACKEND##*:}" "$NGINX_PORT" "$HAPROXY_PORT" "$ALLOT_PORT"; do wait_port "$p"; done

declare -A url=(
  [direct]="http://$BACKEND/"
  [nginx]="http://127.0.0.1:$NGINX_PORT/"
  [haproxy]="http://127.0.0.1:$HAPROXY_PORT/"
  [allot]="http://127.0.0.1:$ALLOT_PORT/"
)
# The processes doing each proxy's work (nginx: its workers); direct: the back end.
NGINX_WORKERS=$(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')
declare -A proc=([direct]=$BACKEND_PID [nginx]="${NGINX_WORKERS:-$NGINX_MASTER}" [haproxy]=$HAPROXY_PID [allot]=$ALLOT_PID)
cpu_ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
TICK=$(getconf CLK_TCK)
order=(direct nginx haproxy allot)
declare -A rps p99 cpu
for t in "${order[@]}"; do wrk -t"$THREADS" -c"$CONNS" -d2s "${url[$t]}" >/dev/null; done   # warm up
for r in $(seq "$ROUNDS"); do
  for t in "${order[@]}"; do
    c0=$(cpu_ticks "${proc[$t]}")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "${url[$t]}")
    c1=$(cpu_ticks "${proc[$t]}")
    n=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    us=$(awk -v a="$c0" -v b="$c1" -v n="$total" -v hz="$TICK" 'BEGIN{printf "%.2f", (b-a)*1e6/hz/n}')
    l=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
    [ -n "$errs" ] && echo "round $r $t: $errs" >&2
    rps[$t]+="$n "; p99[$t]+="$l "; cpu[$t]+="$us "
    echo "round $r $t: $n req/s, p99 $l ms, $us µs CPU per request" >&2
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
base_rps=$(median <<<"${rps[nginx]}"); base_p99=$(median <<<"${p99[nginx]}"); base_cpu=$(median <<<"${cpu[nginx]}")
echo
echo "medians of $ROUNDS rounds, wrk -t$THREADS -c$CONNS -d$DURATION, $THREADS worker(s) per proxy"
echo "(CPU: the proxy's own user + system time per request; for direct, the back end's)"
printf '| %-8s | %10s | %8s | %10s | %13s | %13s | %13s |\n' target "req/s" "p99 ms" "CPU µs/req" "req/s ÷ nginx" "p99 ÷ nginx" "CPU ÷ nginx"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ------------ ---------- ------------ --------------- --------------- ---------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{print a/b}'; }
for t in "${order[@]}"; do
  m=$(median <<<"${rps[$t]}"); l=$(median <<<"${p99[$t]}"); c=$(median <<<"${cpu[$t]}")
  printf '| %-8s | %10.0f | %8.2f | %10.2f | %13.2f | %13.2f | %13.2f |\n' "$t" "$m" "$l" "$c" \
    "$(ratio "$m" "$base_rps")" "$(ratio "$l" "$base_p99")" "$(ratio "$c" "$base_cpu")"
done
