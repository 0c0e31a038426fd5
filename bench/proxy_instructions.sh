#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure that does
# not move with the load of a shared machine, for comparing two builds of the gateway.
# allot (--threads 1, the configuration of bench/proxy.sh) runs under callgrind in front of
# allot's synthetic back end; wrk (-t1 -c50) warms it up, counting is switched on for
# DURATION, and the count is divided by the requests wrk completed meanwhile.
#
#   bench/proxy_instructions.sh                    # builds and measures --release
#   ALLOT=path/to/allot bench/proxy_instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8s}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v valgrind >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -z "${ALLOT:-}" ]; then
  cargo build --release --bin allot --quiet
  ALLOT=target/release/allot
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$ALLOT" backend --listen 127.0.0.1:0 --workers 100000 --threads 1 > "$work/backend.out" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/backend.out" 2>/dev/null && break; sleep 0.05; done
BACKEND=$(sed -n 's/^listening backend=//p' "$work/backend.out")
PORT=$(free_port); ADMIN=$(free_port)
# shellcheck source=bench/proxy_allot_config.sh
source "bench/proxy_allot_config.sh"
proxy_allot_config "$PORT" "$ADMIN" "$BACKEND" > "$work/allot.toml"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" \
  "$ALLOT" gateway --config "$work/allot.toml" --threads 1 >/dev/null 2>"$work/valgrind.err" &
VG=$!
pids+=($VG)
for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done
wrk -t1 -c50 -d2s "http://127.0.0.1:$PORT/" >/dev/null
callgrind_control -i on "$VG" >/dev/null 2>&1
requests=$(wrk -t1 -c50 -d"$DURATION" "http://127.0.0.1:$PORT/" | awk '/requests in/ {print $1}')
callgrind_control -i off "$VG" >/dev/null 2>&1
callgrind_control -d "$VG" >/dev/null 2>&1
for _ in $(seq 100); do ls "$work"/callgrind.out* >/dev/null 2>&1 && break; sleep 0.1; done
sleep 0.5
out=$(ls -t "$work"/callgrind.out* | head -1)
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$ALLOT: $requests requests, $((total / requests)) user instructions per request"
if [ -n "${KEEP:-}" ]; then cp "$out" "$KEEP"; echo "callgrind profile kept in $KEEP (callgrind_annotate --inclusive=yes $KEEP)"; fi
