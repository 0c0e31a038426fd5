#!/usr/bin/env bash
# Adaptive concurrency: AIMD (FVM slowdown signal) against Envoy's gradient rule, fixed
# limits and no limit, on one back end whose service time grows super-linearly past 8
# concurrent requests (40 ms · (1 + 2·((c − 8)/8)²)), with 64 closed-loop clients.
#
# The load generator and phases are the ignored test `bench_adaptive_rules` in
# tests/qos_adaptive.rs (the same harness as its goodput experiment); it prints one
# markdown row per setting, pasted into docs/benchmarks.md ("Controllers"). Its time
# series goes to $ALLOT_QOS_CSV_DIR/adaptive-bench.csv when that is set.
#
#   bench/adaptive.sh        # about two minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test qos_adaptive -- --ignored --nocapture --exact bench_adaptive_rules 2>&1 |
    tee target/adaptive-bench.log | grep '^|'
