#!/usr/bin/env bash
# The combining tree at scale: `allot sim cluster` (the gateways' own model code, simulated
# time) at 10 000 gateways, fan-out 32, 1% message loss, with the root killed mid-run,
# then the same without loss and at other fan-outs for comparison.
#
#   bench/sim_cluster.sh            # the runs below, summaries printed
#   SEED=3 bench/sim_cluster.sh     # another seed
#
# Figures (peak and mean overshoot, capacity used under excess demand, windows to
# converge after each demand step, fallback windows after the kill, messages per second
# at the root) are recorded in docs/benchmarks.md ("Cluster"). Simulated time: the
# figures do not move with the machine's load, only with the seed.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLOT=${ALLOT:-target/release/allot}
SEED=${SEED:-1}
[ -x "$ALLOT" ] || cargo build --release --bin allot >/dev/null
run() {
  echo "== allot sim cluster $*"
  /usr/bin/time -f "(%e s wall, %M KiB)" "$ALLOT" sim cluster --quiet --seed "$SEED" "$@"
  echo
}
run --gateways 10000 --fanout 32 --loss 0.01 --lag 1 --kill root@7050
run --gateways 10000 --fanout 32 --loss 0.01 --lag 5 --kill root@7050
run --gateways 10000 --fanout 32 --loss 0 --lag 1
run --gateways 10000 --fanout 8 --loss 0.01 --lag 1 --kill root@7050
run --gateways 1000 --fanout 32 --loss 0.05 --lag 2 --kill root@7050 --kill root@13050
