//! The gateway enforces agreements with real load. One back end declared at 320 units/s,
//! shared by A [0.2, 1] and B [0.8, 1]; B offers 130/s (below its guarantee) and A
//! floods. The plan gives B its 130 and A the 190 left; when B stops, A gets all 320. The
//! same in redirect mode.
//!
//! The CI test checks the order of the shares with margins that hold on a busy machine
//! (B served nearly in full, A held to what B leaves, the capacity never exceeded, A
//! gaining when B stops); the figures within 5% are the experiment
//! `experiment_agreements_shares_within_five_percent`, run by `bench/acceptance.sh`.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

fn config(backend: SocketAddr, mode: &str) -> String {
    let agreements = one_server_agreements("S", 320);
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "server"
addresses = ["{backend}"]
[[class]]
name = "a"
backend = "server"
[[class]]
name = "b"
backend = "server"
[[chain]]
name = "main"
default = {{ class = "a" }}
[[chain.rule]]
id = "b"
path_prefix = "/b/"
target = {{ class = "b" }}

[agreements]
mode = "{mode}"
window_ms = 100
max_wait_ms = 300
classes = {{ a = "A", b = "B" }}
{agreements}
[[agreements.server]]
principal = "S"
location = "http://{backend}"
"#
    )
}

/// Times at which requests were served, from the test's start.
type Served = Arc<Mutex<Vec<Duration>>>;

/// One request as a client of the mode would make it; true when it was served. In
/// redirect mode a 307 back to the gateway is followed after 50 ms on the same
/// connection, up to 300 ms in all.
async fn one(gw: SocketAddr, backend: SocketAddr, path: &str, redirect: bool) -> bool {
    let server = format!("http://{backend}");
    let Ok(mut c) = tokio::time::timeout(Duration::from_secs(2), Client::connect(gw, None)).await
    else {
        return false;
    };
    for _ in 0..6 {
        let Some(r) = c.get(path, &[("host", &gw.to_string())]).await else {
            return false;
        };
        if !redirect {
            return r.status == 200;
        }
        if r.status != 307 {
            return false;
        }
        let location = r
            .headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if location.starts_with(&server) {
            assert!(location.ends_with(path), "{location}");
            return true;
        }
        assert!(r.headers.contains_key("retry-after"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Where load goes and how its answers are read.
#[derive(Clone, Copy)]
struct Target {
    gw: SocketAddr,
    backend: SocketAddr,
    redirect: bool,
    start: Instant,
}

/// An open-loop client: `rate` requests per second for `path`, from `from` to `until`.
fn offer(
    t: Target,
    path: &'static str,
    rate: f64,
    from: Duration,
    until: Duration,
    served: Served,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval_at(t.start + from, Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inflight = Vec::new();
        while t.start.elapsed() < until {
            tick.tick().await;
            let served = Arc::clone(&served);
            inflight.push(tokio::spawn(async move {
                if one(t.gw, t.backend, path, t.redirect).await {
                    served.lock().unwrap().push(t.start.elapsed());
                }
            }));
        }
        for task in inflight {
            let _ = task.await;
        }
    })
}

fn rate_between(served: &Served, from: Duration, to: Duration) -> f64 {
    let n = served
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= from && **t < to)
        .count();
    n as f64 / (to - from).as_secs_f64()
}

/// Phases of a run, in seconds from its start: B offers until `b_until`, A until
/// `a_until`; shared rates are measured over `[settle, b_until)` and A alone over
/// `[alone_from, a_until)`.
#[derive(Clone, Copy)]
struct Phases {
    settle: f64,
    b_until: f64,
    alone_from: f64,
    a_until: f64,
}

/// Served rates per second: (B, A while B offers, A alone).
async fn scenario(mode: &str, p: Phases) -> (f64, f64, f64) {
    let (_b, backend) = backend(2000, 0, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend, mode), &[], &[]);
    let redirect = mode == "redirect";
    let (a, b): (Served, Served) = Default::default();
    let target = Target {
        gw,
        backend,
        redirect,
        start: Instant::now(),
    };
    let s = Duration::from_secs_f64;
    let la = offer(target, "/a/x", 400.0, s(0.0), s(p.a_until), Arc::clone(&a));
    let lb = offer(target, "/b/x", 130.0, s(0.0), s(p.b_until), Arc::clone(&b));
    lb.await.unwrap();
    la.await.unwrap();

    let shared = (s(p.settle), s(p.b_until));
    let (ra, rb) = (
        rate_between(&a, shared.0, shared.1),
        rate_between(&b, shared.0, shared.1),
    );
    let ra_alone = rate_between(&a, s(p.alone_from), s(p.a_until));
    let st = status(admin).await;
    eprintln!("{mode}: B {rb:.1}/s, A {ra:.1}/s while B offers 130/s; A alone {ra_alone:.1}/s; principals {}", st["principals"]);
    let principals = st["principals"].as_array().expect("principals in status");
    let a_status = principals.iter().find(|p| p["name"] == "A").expect("A");
    assert!(
        a_status["deferred"].as_u64().unwrap_or(0) > 0,
        "{mode}: A was not held back"
    );
    assert_eq!(a_status["mandatory"].as_f64().map(f64::round), Some(64.0));
    let metrics = get_once(admin, "/metrics", &[]).await.text();
    for name in [
        "allocation_units_per_second",
        "demand_units_per_second",
        "deferred_total",
        "refused_total",
    ] {
        assert!(
            metrics.contains(&format!("allot_principal_{name}{{principal=\"A\"}}")),
            "{name} missing from /metrics"
        );
    }
    (rb, ra, ra_alone)
}

const CI: Phases = Phases {
    settle: 1.5,
    b_until: 4.0,
    alone_from: 5.0,
    a_until: 6.5,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreements_share_one_backend_in_proxy_and_redirect_mode() {
    for mode in ["proxy", "redirect"] {
        let (rb, ra, ra_alone) = scenario(mode, CI).await;
        assert!(
            rb >= 0.8 * 130.0,
            "{mode}: B, below its guarantee, was served {rb:.1} of its 130/s"
        );
        assert!(
            ra <= 1.15 * 190.0,
            "{mode}: A took {ra:.1}/s while B offered, more than the 190/s B leaves"
        );
        assert!(
            ra + rb <= 1.1 * 320.0,
            "{mode}: {:.1}/s served, above the server's 320/s",
            ra + rb
        );
        assert!(
            ra_alone <= 1.1 * 320.0,
            "{mode}: A alone served {ra_alone:.1}/s, above the server's 320/s"
        );
        assert!(
            ra_alone >= 1.2 * ra,
            "{mode}: A got {ra_alone:.1}/s alone, not more than {ra:.1}/s beside B"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_agreements_shares_within_five_percent() {
    let phases = Phases {
        settle: 3.0,
        b_until: 8.0,
        alone_from: 10.0,
        a_until: 14.0,
    };
    let mut all_met = true;
    for mode in ["proxy", "redirect"] {
        let (rb, ra, ra_alone) = scenario(mode, phases).await;
        let within = |x: f64, want: f64| (x - want).abs() <= 0.05 * want;
        let met = within(rb, 130.0) && within(ra, 190.0) && within(ra_alone, 320.0);
        all_met &= met;
        println!(
            "| agreements ({mode}): B, A beside B, A alone | {rb:.1}, {ra:.1}, {ra_alone:.1}/s | 130, 190, 320 ± 5% | {} |",
            if met { "met" } else { "NOT met" }
        );
    }
    assert!(all_met, "a share was outside 5%");
}
