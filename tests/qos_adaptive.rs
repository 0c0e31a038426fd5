//! The `adaptive` controller: it keeps an overloaded back end near its best goodput, and
//! two gateways sharing one back end converge to equal limits (the friendly property).
//! Also the AIMD / gradient comparison that `bench/adaptive.sh` runs (an ignored test: a
//! benchmark, not a check).
//!
//! The back end's service time grows super-linearly past 8 concurrent requests:
//! `40 ms · (1 + 2·((c − 8)/8)²)`, so goodput peaks near 10 in service and collapses
//! with 64. The CI tests check which way the limits move and that the controlled back end
//! beats the uncontrolled one by far; how close to the best fixed limit it gets, and how
//! equal two gateways' limits end, are the experiments `experiment_*` run by
//! `bench/acceptance.sh`.

mod common;
mod qos_util;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, gateway};
use qos_util::*;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Timing-sensitive: one test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn overloaded_backend() -> (common::Proc, std::net::SocketAddr) {
    backend(
        10_000,
        40,
        &["--overload-after", "8", "--overload-factor", "2"],
    )
}

/// The AIMD settings under test (also in examples/controllers/adaptive.toml).
fn aimd(name: &str, initial_limit: f64) -> Value {
    json!({
        "kind": "adaptive", "name": name, "backend": "app", "rule": "aimd",
        "period_ms": 200, "initial_limit": initial_limit, "increase": 1, "decrease": 1.3,
        "threshold": 1.3, "gamma": 0.5, "window_periods": 25
    })
}

/// Envoy's gradient rule with its defaults (buffer 0.25, min_concurrency 3).
fn gradient(name: &str) -> Value {
    json!({
        "kind": "adaptive", "name": name, "backend": "app", "rule": "gradient",
        "period_ms": 200, "initial_limit": 4, "recalc_every": 100
    })
}

/// A controller's JSON as a `[[controller]]` table.
fn toml_table(c: &Value) -> String {
    let mut out = String::from("[[controller]]\n");
    if let Value::Object(m) = c {
        for (k, v) in m {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

fn config(backend: std::net::SocketAddr, class_max_running: usize, controller: &str) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
token = "qos-test"
[gateway]
max_running = 1000
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "all"
backend = "app"
max_running = {class_max_running}
queue_limit = 4096
max_wait_ms = 30000
{controller}
"#
    )
}

/// What one phase measured.
#[derive(Debug, Clone, Copy)]
struct Phase {
    goodput: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_limit: f64,
}

fn measured(s: &Samples, from: Instant, mean_limit: f64) -> Phase {
    let to = Instant::now();
    Phase {
        goodput: goodput(s, from, to),
        p50_ms: latency_quantile_ms(s, from, to, 0.5),
        p99_ms: latency_quantile_ms(s, from, to, 0.99),
        mean_limit,
    }
}

async fn set_class_cap(admin: std::net::SocketAddr, cap: usize) {
    let body = format!("{{\"max_running\":{cap}}}");
    let (st, text) = admin_write(admin, "PATCH", "/classes/all", &body).await;
    assert_eq!(st, 200, "{text}");
}

/// A fixed limit through the class cap (the same dispatcher gate an adaptive limit uses).
async fn fixed(
    admin: std::net::SocketAddr,
    s: &Samples,
    limit: usize,
    warm: Duration,
    measure: Duration,
) -> Phase {
    set_class_cap(admin, limit).await;
    tokio::time::sleep(warm).await;
    let from = Instant::now();
    tokio::time::sleep(measure).await;
    measured(s, from, limit as f64)
}

/// A controller added at run time with the class cap lifted; sampled every 250 ms into
/// `series`; removed at the end.
async fn controlled(
    admin: std::net::SocketAddr,
    s: &Samples,
    controller: &Value,
    warm: Duration,
    measure: Duration,
    series: &mut Series,
    t0: Instant,
) -> Phase {
    set_class_cap(admin, 100_000).await;
    let name = controller["name"].as_str().expect("name").to_string();
    let (st, body) = admin_write(admin, "POST", "/controllers", &controller.to_string()).await;
    assert_eq!(st, 201, "{body}");
    let measure_from = Instant::now() + warm;
    let end = measure_from + measure;
    let mut limits = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let all = controllers(admin).await;
        let r = readout(&all, &name);
        let limit = output(r, "limit").unwrap_or(f64::NAN);
        let now = Instant::now();
        series.push(&[
            t0.elapsed().as_secs_f64(),
            f64::NAN,
            limit,
            r["input"].as_f64().unwrap_or(f64::NAN),
            r["setpoint"].as_f64().unwrap_or(f64::NAN),
            goodput(s, now - Duration::from_secs(1), now),
        ]);
        if now >= measure_from && limit.is_finite() {
            limits.push(limit);
        }
    }
    let p = measured(
        s,
        end - measure,
        limits.iter().sum::<f64>() / limits.len().max(1) as f64,
    );
    // Cap first, then remove: no unlimited flood between phases.
    set_class_cap(admin, 4).await;
    let (st, body) = admin_write(admin, "DELETE", &format!("/controllers/{name}"), "").await;
    assert_eq!(st, 200, "{body}");
    p
}

struct Bench {
    _backend: common::Proc,
    _gateway: common::Proc,
    admin: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    samples: Samples,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Bench {
    fn start(first_limit: usize) -> Bench {
        let (b, baddr) = overloaded_backend();
        let (g, gaddr, admin, _) =
            gateway(&config(baddr, first_limit, ""), &["--threads", "1"], &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let samples = samples();
        let clients = closed_loop(gaddr, 64, "/work", Arc::clone(&stop), Arc::clone(&samples));
        Bench {
            _backend: b,
            _gateway: g,
            admin,
            stop,
            samples,
            clients,
        }
    }

    fn stop(self) {
        self.stop.store(true, Relaxed);
        for c in self.clients {
            c.abort();
        }
    }
}

/// No limit: what 64 clients get with all of them in service.
async fn uncontrolled(admin: std::net::SocketAddr, s: &Samples, measure: Duration) -> Phase {
    set_class_cap(admin, 100_000).await;
    // Every request admitted now takes about 4 s; the first ones finish after that.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let from = Instant::now();
    tokio::time::sleep(measure).await;
    measured(s, from, 64.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_raises_a_low_limit_and_beats_no_limit_by_far() {
    let _one = SERIAL.lock().await;
    let b = Bench::start(4);
    let (admin, s) = (b.admin, Arc::clone(&b.samples));
    let mut series = Series::new(
        "adaptive-ci",
        "t_s,phase_limit,limit,slowdown,threshold,goodput_per_sec",
    );
    let t0 = Instant::now();
    let adaptive = controlled(
        admin,
        &s,
        &aimd("adapt", 4.0),
        Duration::from_secs(4),
        Duration::from_secs(4),
        &mut series,
        t0,
    )
    .await;
    let none = uncontrolled(admin, &s, Duration::from_secs(4)).await;
    b.stop();
    eprintln!("adaptive {adaptive:.1?}; no limit {none:.1?}");
    assert!(
        adaptive.mean_limit > 5.0 && adaptive.mean_limit < 32.0,
        "the limit did not move from 4 towards the knee at 10: {adaptive:.1?}"
    );
    assert!(
        adaptive.goodput >= 3.0 * none.goodput,
        "adaptive goodput {:.1}/s is not far above no limit's {:.1}/s",
        adaptive.goodput,
        none.goodput
    );
    // The median, not the tail: a busy machine stretches the tail of either.
    assert!(
        adaptive.p50_ms <= none.p50_ms / 2.0,
        "adaptive p50 {:.0} ms is not far below no limit's {:.0} ms",
        adaptive.p50_ms,
        none.p50_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_adaptive_goodput_near_the_best_fixed_limit() {
    let _one = SERIAL.lock().await;
    let b = Bench::start(6);
    let (admin, s) = (b.admin, Arc::clone(&b.samples));
    let mut series = Series::new(
        "adaptive",
        "t_s,phase_limit,limit,slowdown,threshold,goodput_per_sec",
    );
    let t0 = Instant::now();

    let mut best = (0usize, 0.0f64);
    for limit in [6usize, 8, 10, 12] {
        let p = fixed(
            admin,
            &s,
            limit,
            Duration::from_millis(1000),
            Duration::from_millis(3500),
        )
        .await;
        eprintln!("fixed limit {limit}: goodput {:.1}/s", p.goodput);
        series.push(&[
            t0.elapsed().as_secs_f64(),
            limit as f64,
            f64::NAN,
            f64::NAN,
            f64::NAN,
            p.goodput,
        ]);
        if p.goodput > best.1 {
            best = (limit, p.goodput);
        }
    }
    let adaptive = controlled(
        admin,
        &s,
        &aimd("adapt", 4.0),
        Duration::from_secs(6),
        Duration::from_secs(10),
        &mut series,
        t0,
    )
    .await;
    let none = uncontrolled(admin, &s, Duration::from_secs(6)).await;
    series.push(&[
        t0.elapsed().as_secs_f64(),
        64.0,
        f64::NAN,
        f64::NAN,
        f64::NAN,
        none.goodput,
    ]);
    series.write();
    b.stop();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let near = adaptive.goodput >= 0.9 * best.1;
    println!(
        "| adaptive: goodput against the best fixed limit ({}) | {:.1} vs {:.1} req/s ({:.0}%) | ≥ 90% | {} |",
        best.0,
        adaptive.goodput,
        best.1,
        100.0 * adaptive.goodput / best.1,
        met(near)
    );
    let tail = adaptive.p99_ms <= none.p99_ms / 3.0;
    println!(
        "| adaptive: p99 against no limit | {:.0} vs {:.0} ms | ≤ ⅓ | {} |",
        adaptive.p99_ms,
        none.p99_ms,
        met(tail)
    );
    let collapsed = none.goodput < best.1 * 0.5;
    println!(
        "| adaptive: no limit collapses | {:.1} req/s | < 50% of the best | {} |",
        none.goodput,
        met(collapsed)
    );
    assert!(near && tail && collapsed, "{adaptive:.1?} {none:.1?}");
}

/// Two gateways with AIMD from limits 1 and 40, 32 clients each, for `total`; returns
/// the mean limits from `settle` to the end and the number of samples.
async fn two_gateways(settle: Duration, total: Duration, series_name: &str) -> (f64, f64, usize) {
    let (_b, baddr) = overloaded_backend();
    // Start far apart: one low, one high.
    let low = toml_table(&aimd("adapt", 1.0));
    let high = toml_table(&aimd("adapt", 40.0));
    let (_g1, g1, a1, _) = gateway(&config(baddr, 100_000, &low), &["--threads", "1"], &[]);
    let (_g2, g2, a2, _) = gateway(&config(baddr, 100_000, &high), &["--threads", "1"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let s = samples();
    let mut tasks = closed_loop(g1, 32, "/work", Arc::clone(&stop), Arc::clone(&s));
    tasks.extend(closed_loop(
        g2,
        32,
        "/work",
        Arc::clone(&stop),
        Arc::clone(&s),
    ));
    let mut series = Series::new(
        series_name,
        "t_s,limit_a,limit_b,slowdown_a,slowdown_b,ewma_ms_a,ewma_ms_b,baseline_ms_a,baseline_ms_b",
    );
    let t0 = Instant::now();
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    while t0.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (r1, r2) = (controllers(a1).await, controllers(a2).await);
        let (x1, x2) = (readout(&r1, "adapt"), readout(&r2, "adapt"));
        let l1 = output(x1, "limit").unwrap_or(f64::NAN);
        let l2 = output(x2, "limit").unwrap_or(f64::NAN);
        let input = |r: &Value| r["input"].as_f64().unwrap_or(f64::NAN);
        let var = |r: &Value, v: &str| state(r, v).unwrap_or(f64::NAN);
        series.push(&[
            t0.elapsed().as_secs_f64(),
            l1,
            l2,
            input(x1),
            input(x2),
            var(x1, "ewma_ms"),
            var(x2, "ewma_ms"),
            var(x1, "baseline_ms"),
            var(x2, "baseline_ms"),
        ]);
        if t0.elapsed() >= settle && l1.is_finite() && l2.is_finite() {
            la.push(l1);
            lb.push(l2);
        }
    }
    series.write();
    stop.store(true, Relaxed);
    for t in tasks {
        t.abort();
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (ma, mb) = (mean(&la), mean(&lb));
    eprintln!(
        "mean limits after {settle:?}: {ma:.2} and {mb:.2} ({} samples)",
        la.len()
    );
    (ma, mb, la.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_limits_move_towards_each_other() {
    let _one = SERIAL.lock().await;
    let (ma, mb, n) = two_gateways(
        Duration::from_secs(7),
        Duration::from_secs(10),
        "friendly-ci",
    )
    .await;
    assert!(n >= 4, "too few samples: {n}");
    // From 1 and 40 (39 apart): the low one rose, the high one fell well below 40.
    assert!(
        ma > 1.5,
        "the limit that started at 1 did not rise: {ma:.2}"
    );
    assert!(
        mb < 25.0,
        "the limit that started at 40 did not fall: {mb:.2}"
    );
    assert!(
        (ma - mb).abs() < 15.0,
        "limits {ma:.2} and {mb:.2} did not come together"
    );
}

/// Limits compared over 60 s, after 15 s to settle from 1 and 40.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_two_gateways_converge_to_equal_limits() {
    let _one = SERIAL.lock().await;
    let (ma, mb, n) =
        two_gateways(Duration::from_secs(15), Duration::from_secs(75), "friendly").await;
    let (lo, hi) = (ma.min(mb), ma.max(mb));
    let equal = n > 40 && hi <= lo * 1.25;
    println!(
        "| adaptive: two gateways' mean limits over 60 s, from 1 and 40 | {ma:.2} / {mb:.2} ({:.0}% apart) | within 25% | {} |",
        100.0 * (hi / lo - 1.0),
        if equal { "met" } else { "NOT met" }
    );
    assert!(equal, "limits {ma:.2} and {mb:.2} ({n} samples)");
}

/// `bench/adaptive.sh`: fixed limits, AIMD, Envoy's gradient rule and no limit on the
/// same back end and load, one markdown row each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark, run by bench/adaptive.sh"]
async fn bench_adaptive_rules() {
    let _one = SERIAL.lock().await;
    let b = Bench::start(4);
    let (admin, s) = (b.admin, Arc::clone(&b.samples));
    let mut series = Series::new(
        "adaptive-bench",
        "t_s,phase_limit,limit,input,setpoint,goodput_per_sec",
    );
    let t0 = Instant::now();
    let mut rows = Vec::new();
    for limit in [4usize, 6, 8, 10, 12, 16] {
        let p = fixed(
            admin,
            &s,
            limit,
            Duration::from_millis(1500),
            Duration::from_secs(5),
        )
        .await;
        rows.push((format!("fixed limit {limit}"), p));
    }
    let p = controlled(
        admin,
        &s,
        &aimd("aimd", 4.0),
        Duration::from_secs(8),
        Duration::from_secs(15),
        &mut series,
        t0,
    )
    .await;
    rows.push(("adaptive, AIMD (H 1.3, a 1, b 1.3)".into(), p));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = controlled(
        admin,
        &s,
        &gradient("gradient"),
        Duration::from_secs(8),
        Duration::from_secs(15),
        &mut series,
        t0,
    )
    .await;
    rows.push(("adaptive, gradient (Envoy defaults)".into(), p));
    set_class_cap(admin, 100_000).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    rows.push(("no limit (64 in service)".into(), measured(&s, from, 64.0)));
    series.write();
    b.stop();
    println!("| setting | goodput (req/s) | p50 (ms) | p99 (ms) | mean limit |");
    println!("|---|---:|---:|---:|---:|");
    for (name, p) in rows {
        println!(
            "| {name} | {:.1} | {:.0} | {:.0} | {:.1} |",
            p.goodput, p.p50_ms, p.p99_ms, p.mean_limit
        );
    }
}
