//! Acceptance (a) of the QoS manager: the `delay` controller holds premium's mean
//! queueing delay at 50 ms ± 20% by moving basic's accept rate, and basic's rate
//! recovers when its load drops (open-QoS paper, section 4.1).
//!
//! The back end serves about 400 requests/s (8 workers, 20 ms each); the gateway runs
//! 8 at a time, premium and basic at the same priority and ratio, so basic's backlog
//! takes service slots from premium. Premium offers 220/s (more than its half when both
//! are backlogged), basic 540/s (3× the 180/s left to it). The plant then runs near 95%
//! utilisation, where the queue's own bursts last seconds; the loop ticks every 100 ms
//! with a large integral gain, so it answers a burst while it is small, and the mean
//! error over a window is bounded by the rate's movement over it divided by `ki` (see
//! docs/controllers.md).

mod common;
mod qos_util;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, class_field, gateway, status};
use qos_util::*;
use tokio::time::Instant;

const SETPOINT_MS: f64 = 50.0;

fn config(backend: std::net::SocketAddr) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
token = "qos-test"
[gateway]
max_running = 8
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "premium"
backend = "app"
queue_limit = 4096
max_wait_ms = 5000
[[class]]
name = "basic"
backend = "app"
queue_limit = 4096
max_wait_ms = 5000
[[chain]]
name = "main"
default = {{ class = "basic" }}
[[chain.rule]]
id = "premium"
path_prefix = "/premium"
target = {{ class = "premium" }}
[[controller]]
kind = "delay"
name = "premium-delay"
class = "premium"
setpoint_ms = {SETPOINT_MS}
throttle = ["basic"]
period_ms = 100
kp = 0.2
ki = 2
min_rate_per_sec = 1
max_rate_per_sec = 500
burst = 3
"#
    )
}

/// Mean queueing delay of `class` between two `/status` snapshots, ms.
fn window_delay_ms(before: &serde_json::Value, after: &serde_json::Value, class: &str) -> f64 {
    let get = |s: &serde_json::Value| {
        let c = s["classes"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == class))
            .expect("class in status")
            .clone();
        let count: f64 = c["queue_delay"]["counts"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_f64()).sum())
            .unwrap_or(0.0);
        (count, c["queue_delay"]["sum_ns"].as_f64().unwrap_or(0.0))
    };
    let ((n0, s0), (n1, s1)) = (get(before), get(after));
    if n1 > n0 {
        (s1 - s0) / (n1 - n0) / 1e6
    } else {
        f64::NAN
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_controller_holds_premium_delay_and_releases_basic() {
    let (_b, baddr) = backend(8, 20, &[]);
    let (g, gaddr, admin, _) = gateway(&config(baddr), &["--threads", "1"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let s = samples();
    let premium = Rate::new(220.0);
    let basic = Rate::new(540.0);
    let gens = [
        open_loop(
            gaddr,
            premium.clone(),
            "/premium/x",
            Arc::clone(&stop),
            Arc::clone(&s),
        ),
        open_loop(
            gaddr,
            basic.clone(),
            "/basic/x",
            Arc::clone(&stop),
            Arc::clone(&s),
        ),
    ];
    // The controller's input is one period's mean (100 ms, about 22 requests); the
    // series also records the mean since the previous sample (500 ms), easier to read.
    let mut series = Series::new(
        "delay",
        "t_s,setpoint_ms,premium_delay_ms,premium_delay_500ms,basic_rate_per_sec,basic_offered_per_sec",
    );
    let t0 = Instant::now();
    let mut last_status = None;
    let mut sample = async |series: &mut Series| {
        let all = controllers(admin).await;
        let now = status(admin).await;
        let r = readout(&all, "premium-delay");
        let rate = output(r, "rate_per_sec:basic").unwrap_or(f64::NAN);
        series.push(&[
            t0.elapsed().as_secs_f64(),
            SETPOINT_MS,
            r["input"].as_f64().unwrap_or(f64::NAN),
            last_status
                .replace(now.clone())
                .map_or(f64::NAN, |b| window_delay_ms(&b, &now, "premium")),
            rate,
            state(r, "offered_per_sec:basic").unwrap_or(f64::NAN),
        ]);
        (rate, now)
    };

    // 15 s to settle, then three 5 s windows judged on their mean.
    let mut windows = Vec::new();
    let mut settled_rates = Vec::new();
    let mut before = None;
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rate, now) = sample(&mut series).await;
        let t = t0.elapsed().as_secs_f64();
        if t >= 15.0 {
            settled_rates.push(rate);
        }
        // Window edges at 15, 20, 25, 30 s.
        let edge = (t / 5.0).floor() as u64;
        if t >= 15.0 && before.as_ref().is_none_or(|(e, _)| *e != edge) {
            if let Some((_, b)) = before.take() {
                windows.push(window_delay_ms(&b, &now, "premium"));
            }
            before = Some((edge, now));
        }
    }
    let settled = settled_rates.iter().sum::<f64>() / settled_rates.len().max(1) as f64;

    // Basic's load drops: its accept rate recovers.
    basic.set(40.0);
    let drop_at = t0.elapsed().as_secs_f64();
    let mut last_rate = settled;
    while t0.elapsed().as_secs_f64() < drop_at + 10.0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last_rate = sample(&mut series).await.0;
    }
    let refused_before = class_field(&status(admin).await, "basic", "refused_rate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_after = class_field(&status(admin).await, "basic", "refused_rate");
    series.write();
    stop.store(true, Relaxed);
    for t in gens {
        t.abort();
    }
    eprintln!(
        "premium mean delay per 5 s window: {windows:.1?} ms; basic rate settled {settled:.1}/s, after the drop {last_rate:.1}/s"
    );
    let lines = g.stderr();
    assert!(windows.len() >= 3, "windows: {windows:?}");
    for (i, w) in windows.iter().enumerate() {
        assert!(
            (w - SETPOINT_MS).abs() <= 0.2 * SETPOINT_MS,
            "window {i}: premium mean delay {w:.1} ms is outside 50 ms ± 20% ({windows:.1?}); gateway log:\n{lines}"
        );
    }
    assert!(
        settled < 180.0 && settled > 20.0,
        "basic's rate settled at {settled:.1}/s, expected below its 180/s share"
    );
    assert!(
        last_rate > settled * 1.5,
        "basic's rate did not recover: {last_rate:.1}/s after the drop, {settled:.1}/s before"
    );
    assert_eq!(
        refused_after, refused_before,
        "basic still refused after its load dropped"
    );
}
