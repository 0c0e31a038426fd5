#!/usr/bin/env bash
# Time series of the QoS manager's controllers, as CSV and SVG plots.
#
# Runs the experiments (ignored `experiment_*` tests) of the delay, utilisation and
# adaptive controllers with ALLOT_QOS_CSV_DIR set, so each writes its series (set point,
# measured value, actuator) as it runs, then draws them with bench/plot_series.rs
# (plotters, SVG backend) into docs/img/. The experiments still check their bounds
# while doing so: a failed run leaves no plot behind.
#
#   bench/controllers.sh            # about three and a half minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
csv=${ALLOT_QOS_CSV_DIR:-docs/data}
img=docs/img
mkdir -p "$csv" "$img"
export ALLOT_QOS_CSV_DIR="$PWD/$csv"

cargo build --release --example plot_series
for t in qos_delay qos_utilisation qos_adaptive; do
    cargo test --release --test "$t" -- --ignored --nocapture experiment_ 2>&1 | grep -E '^(premium|5 s|fixed|adaptive|uncontrolled|mean limits|test result)' || true
done

plot() { target/release/examples/plot_series "$@"; echo "wrote $2"; }
plot "$csv/delay.csv" "$img/delay.svg" \
    "delay: premium's mean queueing delay held at 50 ms by basic's accept rate" \
    setpoint_ms,premium_delay_500ms basic_rate_per_sec,basic_offered_per_sec
plot "$csv/utilisation.csv" "$img/utilisation.svg" \
    "utilisation: CPU held at 30% (load x2 at 20 s, /2 at 40 s)" \
    setpoint_percent,cpu_percent divert
cut -d, -f1,5,6 "$csv/utilisation.csv" > "$csv/utilisation-rate.csv"
plot "$csv/utilisation-rate.csv" "$img/utilisation-rate.svg" \
    "utilisation: accept rate (throttled only once everything is diverted)" \
    throttle_rate_per_sec,offered_per_sec
plot "$csv/adaptive.csv" "$img/adaptive.svg" \
    "adaptive (AIMD): concurrency limit and goodput, 64 clients" \
    limit,phase_limit goodput_per_sec
plot "$csv/friendly.csv" "$img/friendly.svg" \
    "two gateways, one back end: AIMD limits converge" \
    limit_a,limit_b
