//! The `delay` controller: it holds premium's mean queueing delay at 50 ms by moving
//! basic's accept rate, and basic's rate recovers when its load drops (open-QoS paper,
//! section 4.1).
//!
//! The back end serves about 400 requests/s (8 workers, 20 ms each); the gateway runs
//! 8 at a time, premium and basic at the same priority and ratio, so basic's backlog
//! takes service slots from premium. Premium offers 220/s (more than its half when both
//! are backlogged), basic 540/s (3× the 180/s left to it). The plant then runs near 95%
//! utilisation, where the queue's own bursts last seconds; the loop ticks every 100 ms
//! with a large integral gain, so it answers a burst while it is small, and the mean
//! error over a window is bounded by the rate's movement over it divided by `ki` (see
//! docs/controllers.md).
//!
//! The CI test checks what the loop does (basic cut well below what it offers, premium's
//! delay far below the uncontrolled backlog, basic released when its load drops); how
//! tightly the set point is held is the experiment `experiment_delay_holds_premium_near_its_setpoint`,
//! run by `bench/acceptance.sh`.

mod common;
mod qos_util;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, class_field, gateway, status};
use qos_util::*;
use tokio::time::Instant;

const SETPOINT_MS: f64 = 50.0;

fn config(backend: SocketAddr) -> String {
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

/// Reads the controller every 500 ms into a series, and keeps basic's rate.
struct Probe {
    admin: SocketAddr,
    t0: Instant,
    series: Series,
    last_status: Option<serde_json::Value>,
    /// (seconds since the start, basic's accept rate per second).
    rates: Vec<(f64, f64)>,
}

impl Probe {
    async fn sample(&mut self) {
        let all = controllers(self.admin).await;
        let now = status(self.admin).await;
        let r = readout(&all, "premium-delay");
        let rate = output(r, "rate_per_sec:basic").unwrap_or(f64::NAN);
        let t = self.t0.elapsed().as_secs_f64();
        self.series.push(&[
            t,
            SETPOINT_MS,
            r["input"].as_f64().unwrap_or(f64::NAN),
            self.last_status
                .replace(now.clone())
                .map_or(f64::NAN, |b| window_delay_ms(&b, &now, "premium")),
            rate,
            state(r, "offered_per_sec:basic").unwrap_or(f64::NAN),
        ]);
        self.rates.push((t, rate));
    }

    /// Samples every 500 ms until `t_s` seconds after the start.
    async fn until(&mut self, t_s: f64) {
        let end = self.t0 + Duration::from_secs_f64(t_s);
        while Instant::now() + Duration::from_millis(500) <= end {
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.sample().await;
        }
        tokio::time::sleep_until(end).await;
    }

    fn mean_rate_after(&self, t_s: f64) -> f64 {
        let v: Vec<f64> = self
            .rates
            .iter()
            .filter(|(t, r)| *t >= t_s && r.is_finite())
            .map(|(_, r)| *r)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    fn last_rate(&self) -> f64 {
        self.rates.last().map_or(f64::NAN, |(_, r)| *r)
    }
}

/// How one run went.
#[derive(Debug)]
struct Run {
    /// Premium's mean queueing delay per window after settling, ms.
    windows_ms: Vec<f64>,
    /// Basic's mean accept rate after settling, per second.
    settled_rate: f64,
    /// Basic's accept rate `after_drop_s` after its load fell to 40/s, per second.
    recovered_rate: f64,
    /// Basic's requests refused in the 2 s after that.
    refused_late: f64,
}

/// Premium at 220/s and basic at 540/s; `settle_s` to settle, then `windows` windows of
/// `window_s` judged on their mean; then basic drops to 40/s for `after_drop_s`, and its
/// refusals are counted over 2 s more. The time series goes to `series`.csv.
async fn run(settle_s: f64, window_s: f64, windows: usize, after_drop_s: f64, series: &str) -> Run {
    let (_b, baddr) = backend(8, 20, &[]);
    let (_g, gaddr, admin, _) = gateway(&config(baddr), &["--threads", "1"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let s = samples();
    let basic = Rate::new(540.0);
    let gens = [
        open_loop(
            gaddr,
            Rate::new(220.0),
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
    let mut probe = Probe {
        admin,
        t0: Instant::now(),
        series: Series::new(
            series,
            "t_s,setpoint_ms,premium_delay_ms,premium_delay_500ms,basic_rate_per_sec,basic_offered_per_sec",
        ),
        last_status: None,
        rates: Vec::new(),
    };
    probe.until(settle_s).await;
    let mut before = status(admin).await;
    let mut windows_ms = Vec::new();
    for i in 1..=windows {
        probe.until(settle_s + i as f64 * window_s).await;
        let now = status(admin).await;
        windows_ms.push(window_delay_ms(&before, &now, "premium"));
        before = now;
    }
    let settled_rate = probe.mean_rate_after(settle_s);

    // Basic's load drops: its accept rate recovers.
    basic.set(40.0);
    let drop_at = probe.t0.elapsed().as_secs_f64();
    probe.until(drop_at + after_drop_s).await;
    let recovered_rate = probe.last_rate();
    let refused_before = class_field(&status(admin).await, "basic", "refused_rate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_after = class_field(&status(admin).await, "basic", "refused_rate");
    probe.series.write();
    stop.store(true, Relaxed);
    for t in gens {
        t.abort();
    }
    let run = Run {
        windows_ms,
        settled_rate,
        recovered_rate,
        refused_late: refused_after - refused_before,
    };
    eprintln!("{run:.1?}");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_controller_cuts_basic_for_premium_and_releases_it_when_basic_drops() {
    let r = run(4.0, 4.0, 1, 5.0, "delay-ci").await;
    let delay = r.windows_ms[0];
    // Uncontrolled, basic's backlog would grow to its 5 s max_wait_ms within seconds.
    assert!(
        delay < 4.0 * SETPOINT_MS,
        "premium's mean delay {delay:.1} ms is not held near {SETPOINT_MS} ms: {r:.1?}"
    );
    assert!(
        r.settled_rate < 300.0,
        "basic's rate stayed at {:.1}/s, it offers 540/s and leaves premium too little",
        r.settled_rate
    );
    assert!(
        r.recovered_rate > 1.5 * r.settled_rate,
        "basic's rate did not recover after its load dropped: {r:.1?}"
    );
    assert!(
        r.refused_late <= 5.0,
        "basic still refused after its load dropped: {r:.1?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_delay_holds_premium_near_its_setpoint() {
    let r = run(15.0, 5.0, 3, 10.0, "delay").await;
    let held = r.windows_ms.len() == 3
        && r.windows_ms
            .iter()
            .all(|w| (w - SETPOINT_MS).abs() <= 0.2 * SETPOINT_MS);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "| delay: premium mean queueing delay per 5 s window after 15 s | {} ms | 50 ± 10 ms | {} |",
        r.windows_ms
            .iter()
            .map(|w| format!("{w:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        met(held)
    );
    let settled = r.settled_rate > 20.0 && r.settled_rate < 180.0;
    println!(
        "| delay: basic's settled accept rate | {:.1}/s | 20–180/s (below its share) | {} |",
        r.settled_rate,
        met(settled)
    );
    let recovered = r.recovered_rate > 1.5 * r.settled_rate && r.refused_late == 0.0;
    println!(
        "| delay: basic's rate 10 s after its load drops to 40/s | {:.1}/s, {} refused after | > 1.5 × settled, none refused | {} |",
        r.recovered_rate,
        r.refused_late,
        met(recovered)
    );
    assert!(held && settled && recovered, "{r:.1?}");
}
