//! The `utilisation` controller: it holds the CPU use of a back end's processes at its
//! set point through a load that doubles and then halves, diverting to the degraded
//! variant first and throttling only when everything is diverted, and undoing in the
//! reverse order (open-QoS paper, section 4.3).
//!
//! The full variant burns 10 ms of CPU per request, the degraded one 2.5 ms (a quarter).
//! At 70/s, diverting about 76% holds 30%; at 140/s even all-degraded costs 35%, so the
//! accept rate must fall to about 120/s.
//!
//! The CI test checks the rule between the two knobs and which way each phase moves them,
//! over three 8 s phases. The order within each phase and how closely the CPU is held
//! are the experiment `experiment_utilisation_holds_cpu_near_its_setpoint` (20 s phases),
//! run by `bench/acceptance.sh`.

mod common;
mod qos_util;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, gateway, get_once};
use qos_util::*;
use tokio::time::Instant;

const SETPOINT: f64 = 30.0;
const MAX_RATE: f64 = 1000.0;

fn cpu_ns(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|p| allot_proc::procfs::cpu_ns(*p).expect("back end alive"))
        .sum()
}

/// What one run saw.
struct Run {
    /// Every 500 ms: (seconds since the start, divert probability, accept rate per second).
    trace: Vec<(f64, f64, f64)>,
    /// 5 s windows of the back ends' CPU: (window end in seconds, percent of one CPU).
    windows: Vec<(f64, f64)>,
    metrics: String,
    log: String,
}

/// Load 70/s for `phase_s`, then 140/s, then 70/s again; the time series goes to
/// `series`.csv.
async fn run(phase_s: f64, series: &str) -> Run {
    let (full, faddr) = backend(64, 0, &["--cpu-ms", "10"]);
    let (lite, laddr) = backend(64, 0, &["--cpu-ms", "2.5"]);
    let pids = [full.child.id() as i32, lite.child.id() as i32];
    let config = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
token = "qos-test"
[[backend]]
name = "full"
addresses = ["{faddr}"]
[[backend]]
name = "lite"
addresses = ["{laddr}"]
[[class]]
name = "web"
backend = "full"
queue_limit = 4096
max_wait_ms = 5000
[[controller]]
kind = "utilisation"
name = "cpu"
class = "web"
degraded_backend = "lite"
pids = [{}, {}]
setpoint_percent = {SETPOINT}
period_ms = 500
divert_kp = 0.005
divert_ki = 0.01
rate_kp = 1.0
rate_ki = 2.0
min_rate_per_sec = 5
max_rate_per_sec = {MAX_RATE}
burst = 3
"#,
        pids[0], pids[1]
    );
    let (g, gaddr, admin, _) = gateway(&config, &["--threads", "1"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let s = samples();
    let rate = Rate::new(70.0);
    let generator = open_loop(
        gaddr,
        rate.clone(),
        "/page",
        Arc::clone(&stop),
        Arc::clone(&s),
    );
    let mut series = Series::new(
        series,
        "t_s,setpoint_percent,cpu_percent,divert,throttle_rate_per_sec,offered_per_sec",
    );
    let t0 = Instant::now();
    let mut trace = Vec::new();
    let mut windows = Vec::new();
    let mut window_start = (t0, cpu_ns(&pids));
    while t0.elapsed() < Duration::from_secs_f64(3.0 * phase_s) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = t0.elapsed().as_secs_f64();
        if t >= 2.0 * phase_s {
            rate.set(70.0);
        } else if t >= phase_s {
            rate.set(140.0);
        }
        let all = controllers(admin).await;
        let r = readout(&all, "cpu");
        let (d, rt) = (
            output(r, "divert").unwrap_or(f64::NAN),
            output(r, "rate_per_sec").unwrap_or(f64::NAN),
        );
        trace.push((t, d, rt));
        series.push(&[
            t,
            SETPOINT,
            r["input"].as_f64().unwrap_or(f64::NAN),
            d,
            // The rate only while it throttles (at its maximum it limits nothing).
            if rt < MAX_RATE { rt } else { f64::NAN },
            state(r, "offered_per_sec").unwrap_or(f64::NAN),
        ]);
        // 5 s windows of the back end's CPU, read from /proc by the test itself.
        let now = Instant::now();
        if now - window_start.0 >= Duration::from_secs(5) {
            let used = cpu_ns(&pids);
            let wall = (now - window_start.0).as_nanos() as f64;
            windows.push((
                (now - t0).as_secs_f64(),
                (used - window_start.1) as f64 / wall * 100.0,
            ));
            window_start = (now, used);
        }
    }
    series.write();
    let metrics = get_once(admin, "/metrics", &[]).await.text();
    stop.store(true, Relaxed);
    generator.abort();
    eprintln!("5 s windows (end s, cpu %): {windows:.1?}");
    Run {
        trace,
        windows,
        metrics,
        log: g.stderr(),
    }
}

/// Phase 1 diverts without throttling; phase 2 throttles only with everything diverted;
/// phase 3 releases the rate before diverting less. `settle_s` after each step is not
/// judged.
fn check_order(r: &Run, phase_s: f64, settle_s: f64) {
    let trace = &r.trace;
    let (p2, p3, end) = (phase_s, 2.0 * phase_s, 3.0 * phase_s);
    let phase = |a: f64, b: f64| trace.iter().filter(move |(t, _, _)| *t >= a && *t < b);
    assert!(
        phase(settle_s, p2).all(|(_, d, r)| *r >= MAX_RATE && *d > 0.3 && *d < 1.0),
        "phase 1 should divert part, throttle nothing: {trace:?}\n{}",
        r.log
    );
    let first_throttle = trace
        .iter()
        .find(|(t, _, r)| *t >= p2 && *r < MAX_RATE)
        .unwrap_or_else(|| panic!("phase 2 throttles: {trace:?}"));
    assert!(
        trace
            .iter()
            .any(|(t, d, _)| *t >= p2 && *t <= first_throttle.0 && *d >= 1.0),
        "phase 2 throttled before everything was diverted: {trace:?}"
    );
    assert!(
        phase(p2, p3).all(|(_, d, r)| *r >= MAX_RATE || *d >= 1.0),
        "throttling with less than everything diverted: {trace:?}"
    );
    let released = trace
        .iter()
        .find(|(t, _, r)| *t >= p3 && *r >= MAX_RATE)
        .unwrap_or_else(|| panic!("phase 3 releases the rate: {trace:?}"));
    assert!(
        phase(p3, released.0).all(|(_, d, _)| *d >= 1.0),
        "diverting less before the rate was released: {trace:?}"
    );
    assert!(
        phase(p3 + settle_s, end).all(|(_, d, _)| *d < 1.0),
        "phase 3 should divert part: {trace:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utilisation_diverts_then_throttles_and_undoes_in_reverse() {
    let r = run(8.0, "utilisation-ci").await;
    let (trace, log) = (&r.trace, &r.log);
    // The rule, at every sample with a readout: the rate throttles only with everything
    // diverted (so it is released before the divert probability comes down).
    assert!(
        trace
            .iter()
            .all(|(_, d, r)| r.is_nan() || d.is_nan() || *r >= MAX_RATE || *d >= 1.0),
        "throttling with less than everything diverted: {trace:?}\n{log}"
    );
    // Each phase moves the right knob the right way (a busy machine makes the back end's
    // CPU bursty, so when within the phase is not judged).
    let phase = |a: f64, b: f64| trace.iter().filter(move |(t, _, _)| *t >= a && *t < b);
    assert!(
        phase(0.0, 8.0).any(|(_, d, _)| *d > 0.3),
        "70/s at 10 ms each did not divert: {trace:?}\n{log}"
    );
    assert!(
        phase(8.0, 16.0).any(|(_, _, r)| *r < MAX_RATE),
        "140/s did not throttle: {trace:?}\n{log}"
    );
    assert!(
        phase(16.0, 24.0).any(|(_, d, r)| *r >= MAX_RATE && *d < 1.0),
        "back at 70/s the rate was not released and the divert lowered: {trace:?}\n{log}"
    );
    assert!(
        r.metrics.contains(
            "allot_controller_output{controller=\"cpu\",kind=\"utilisation\",knob=\"divert\"}"
        ),
        "{}",
        r.metrics
    );
    assert!(r
        .metrics
        .contains("allot_controller_state{controller=\"cpu\",kind=\"utilisation\",var=\"level\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_utilisation_holds_cpu_near_its_setpoint() {
    let r = run(20.0, "utilisation").await;
    // Judged: 5 s windows that do not overlap the 5 s after a step (0, 20, 40 s).
    let judged: Vec<f64> = r
        .windows
        .iter()
        .filter(|(end, _)| {
            let start = end - 5.0;
            [0.0, 20.0, 40.0]
                .iter()
                .all(|step| !(start < step + 5.0 - 0.3 && *end > *step))
        })
        .map(|(_, u)| *u)
        .collect();
    let held = judged.len() >= 6 && judged.iter().all(|u| (u - SETPOINT).abs() <= 5.0);
    let (lo, hi) = judged
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), u| {
            (lo.min(*u), hi.max(*u))
        });
    println!(
        "| utilisation: CPU per judged 5 s window ({} windows) | {lo:.1}–{hi:.1}% | 30 ± 5% | {} |",
        judged.len(),
        if held { "met" } else { "NOT met" }
    );
    assert!(held, "windows (end s, cpu %): {:.1?}\n{}", r.windows, r.log);
    check_order(&r, 20.0, 5.0);
}
