#!/usr/bin/env bash
# Acceptance experiments: the figures that move with the machine's load (how tightly a
# set point is held, shares and fairness within a few percent, rates, ratios), which CI
# does not judge. Each is an ignored test named `experiment_*`; it prints one markdown
# row per figure (what, measured, bound, met / NOT met) and fails when a bound is missed.
# This runs them all, one at a time, and prints the rows as one table; record them in
# docs/benchmarks.md ("Acceptance experiments").
#
#   bench/acceptance.sh                 # every experiment, about 8 minutes on 2 cores
#   bench/acceptance.sh qos_delay       # the experiments of one test binary
#
# Set ALLOT_QOS_CSV_DIR to keep the controllers' time series (as bench/controllers.sh).
# Exit status: 0 when every experiment met its bounds.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log=target/acceptance.log
if [ $# -gt 0 ]; then
    tests=()
    for t in "$@"; do tests+=(--test "$t"); done
else
    tests=(--workspace)
fi
start=$(date +%s)
cargo test --release --no-fail-fast "${tests[@]}" -- --ignored --nocapture --test-threads=1 experiment_ \
    >"$log" 2>&1
status=$?
echo "| experiment | measured | bound | |"
echo "|---|---|---|---|"
# A row may follow "test NAME ... " on the same line (output is not captured).
grep -aoE '\| [^|]+ \| [^|]+ \| [^|]+ \| (met|NOT met) \|$' "$log"
echo
grep -a '^test result' "$log" | grep -av ' 0 passed; 0 failed' || true
grep -a 'panicked at' "$log" || true
echo "$(($(date +%s) - start)) s; full output in $log"
exit $status
