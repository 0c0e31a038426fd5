//! The cap on running requests, priority between classes under overload, shortest-first
//! against fifo, and a shared bandwidth group. These measure time, so they run one at a
//! time. The CI tests check behaviour (the cap never exceeded, one answer each, premium
//! waiting far less than basic, the order shortest-first serves in, the group's rate never
//! above its budget); the figures (premium's wait against basic's, mean response times,
//! the group's rate within 10%) are the `experiment_*` tests run by `bench/acceptance.sh`.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn head(backend: SocketAddr, max_running: usize) -> String {
    format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n[gateway]\nmax_running = {max_running}\n[[backend]]\nname = \"app\"\naddresses = [\"{backend}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_caps_what_the_backend_sees_and_every_request_gets_one_answer() {
    let _serial = SERIAL.lock().await;
    let (_b, backend) = backend(64, 20, &[]);
    let cfg = head(backend, 4)
        + "[[class]]\nname = \"all\"\nbackend = \"app\"\nqueue_limit = 1000\nmax_wait_ms = 30000\n";
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let mut statuses = Vec::new();
            for _ in 0..10 {
                statuses.push(c.get("/work", &[]).await.map(|r| r.status));
            }
            statuses
        }));
    }
    let mut answers = 0;
    for t in tasks {
        for s in t.await.unwrap() {
            assert_eq!(s, Some(200));
            answers += 1;
        }
    }
    assert_eq!(answers, 400);
    let b = backend_stats(backend).await;
    assert_eq!(
        b["requests"], 400,
        "each request reached the back end exactly once"
    );
    let max = b["max_concurrent"].as_u64().unwrap();
    assert!(max <= 4, "the back end saw {max} at once");
    assert_eq!(max, 4, "the cap was used");
    let s = status(admin).await;
    assert_eq!(class_field(&s, "all", "admitted"), 400.0);
    assert_eq!(class_field(&s, "all", "queued"), 0.0);
    assert_eq!(class_field(&s, "all", "in_flight"), 0.0);
}

/// Premium (priority 10, 4 clients with 30 ms think time) and basic (32 clients, no
/// think time) on a back end of 4 workers for `run_for`; returns the mean queueing delays
/// (premium, basic) in ms.
async fn priority_delays_ms(run_for: Duration) -> (f64, f64) {
    let (_b, backend) = backend(4, 20, &[]);
    let cfg = head(backend, 4)
        + r#"
[[class]]
name = "premium"
backend = "app"
priority = 10
[[class]]
name = "basic"
backend = "app"
queue_limit = 500
max_wait_ms = 20000
[[chain]]
name = "main"
default = { class = "basic" }
[[chain.rule]]
id = "premium"
source = ["127.0.0.2/32"]
target = { class = "premium" }
"#;
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for i in 0..36 {
        let (source, think) = if i < 4 {
            ("127.0.0.2", Duration::from_millis(30))
        } else {
            ("127.0.0.1", Duration::ZERO)
        };
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, Some(source.parse().unwrap())).await;
            while Instant::now() < deadline {
                let r = c.get("/", &[]).await.expect("response");
                assert_eq!(r.status, 200);
                tokio::time::sleep(think).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = status(admin).await;
    let (p, b) = (
        class_mean_delay_ms(&s, "premium"),
        class_mean_delay_ms(&s, "basic"),
    );
    assert!(class_field(&s, "premium", "admitted") > 20.0, "{s:#}");
    (p, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_waits_far_less_than_basic_under_overload() {
    let _serial = SERIAL.lock().await;
    let (p, b) = priority_delays_ms(Duration::from_secs(3)).await;
    assert!(
        b > 0.0 && p * 2.0 <= b,
        "premium {p:.2} ms, basic {b:.2} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_premium_waits_at_most_a_fifth_of_basic() {
    let _serial = SERIAL.lock().await;
    let (p, b) = priority_delays_ms(Duration::from_secs(5)).await;
    let met = b > 0.0 && p * 5.0 <= b;
    println!(
        "| priority: premium's mean queueing delay against basic's | {p:.2} vs {b:.2} ms ({:.3}) | ≤ 0.2 | {} |",
        p / b,
        if met { "met" } else { "NOT met" }
    );
    assert!(met, "premium {p:.2} ms, basic {b:.2} ms");
}

async fn mean_response_ms(gw: SocketAddr) -> f64 {
    let small = "/bytes/1024";
    let large = "/bytes/65536";
    // Teach the gateway the sizes.
    let mut c = Client::connect(gw, None).await;
    for _ in 0..2 {
        c.get(small, &[]).await.expect("warm small");
        c.get(large, &[]).await.expect("warm large");
    }
    let mut times = Vec::new();
    for _round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let path = if i % 2 == 0 { large } else { small };
            let mut c = Client::connect(gw, None).await;
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = c.get(path, &[]).await.expect("response");
                assert_eq!(r.status, 200);
                t.elapsed().as_secs_f64() * 1e3
            }));
            // Keep arrival order interleaved, so fifo serves large and small alternately.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            times.push(t.await.unwrap());
        }
    }
    times.iter().sum::<f64>() / times.len() as f64
}

fn one_slot(backend: SocketAddr, policy: &str) -> String {
    head(backend, 1)
        + &format!("[[class]]\nname = \"all\"\nbackend = \"app\"\npolicy = \"{policy}\"\nmax_wait_ms = 60000\n")
}

/// A back end inside the test that records the path of every request in the order they
/// arrive (with one slot, the order the gateway dispatched them): `/hold` waits for a
/// permit of the returned semaphore; `…/bytes/N` answers N bytes.
async fn order_backend() -> (SocketAddr, Arc<Semaphore>, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (release, seen) = (Arc::new(Semaphore::new(0)), Arc::default());
    let (r, s) = (Arc::clone(&release), Arc::clone(&seen));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (release, seen): (Arc<Semaphore>, Arc<Mutex<Vec<String>>>) =
                (Arc::clone(&r), Arc::clone(&s));
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (release, seen) = (Arc::clone(&release), Arc::clone(&seen));
                    async move {
                        let path = req.uri().path().to_string();
                        seen.lock().unwrap().push(path.clone());
                        if path == "/hold" {
                            let _ = release.acquire().await;
                        }
                        let n = path
                            .rsplit_once("/bytes/")
                            .and_then(|(_, n)| n.parse().ok())
                            .unwrap_or(3);
                        let body = Full::new(Bytes::from(vec![b'x'; n]));
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, release, seen)
}

/// The order in which 5 large (64 KiB) and 5 small (1 KiB) requests, sent alternately
/// (large first) behind one that holds the only slot, were dispatched: `true` for large.
/// Each is sent once the previous one is seen queued, so the arrival order is known.
async fn dispatch_order(policy: &str) -> Vec<bool> {
    let (backend, release, seen) = order_backend().await;
    let (_g, gw, admin, _) = gateway(&one_slot(backend, policy), &[], &[]);
    let (small, large) = ("/bytes/1024", "/bytes/65536");
    // Teach the gateway the sizes.
    let mut c = Client::connect(gw, None).await;
    for _ in 0..2 {
        c.get(small, &[]).await.expect("warm small");
        c.get(large, &[]).await.expect("warm large");
    }
    let mut blocker = Client::connect(gw, None).await;
    let blocker = tokio::spawn(async move { blocker.get("/hold", &[]).await });
    assert!(
        eventually(Duration::from_secs(10), || async {
            class_field(&status(admin).await, "all", "in_flight") == 1.0
        })
        .await,
        "the holding request never started"
    );
    let mut tasks = Vec::new();
    for i in 0..10 {
        let path = if i % 2 == 0 { large } else { small };
        let mut c = Client::connect(gw, None).await;
        tasks.push(tokio::spawn(async move { c.get(path, &[]).await }));
        assert!(
            eventually(Duration::from_secs(10), || async {
                class_field(&status(admin).await, "all", "queued") == (i + 1) as f64
            })
            .await,
            "request {i} was not queued behind the holding one"
        );
    }
    release.add_permits(1);
    let answered = blocker.await.expect("blocker").map(|r| r.status);
    assert_eq!(answered, Some(200));
    for t in tasks {
        assert_eq!(t.await.expect("client").map(|r| r.status), Some(200));
    }
    let seen = seen.lock().unwrap();
    let after = seen.iter().position(|p| p == "/hold").expect("held") + 1;
    seen[after..].iter().map(|p| p == large).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shortest_first_serves_small_before_large_and_fifo_in_arrival_order() {
    let _serial = SERIAL.lock().await;
    assert_eq!(
        dispatch_order("fifo").await,
        [true, false, true, false, true, false, true, false, true, false],
        "fifo dispatched out of arrival order (true: large)"
    );
    assert_eq!(
        dispatch_order("shortest-first").await,
        [false, false, false, false, false, true, true, true, true, true],
        "shortest-first did not dispatch every small request first (true: large)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_shortest_first_beats_fifo_on_a_mixed_workload() {
    let _serial = SERIAL.lock().await;
    let (_b, backend) = backend(4, 2, &["--ms-per-kib", "1"]);
    let mut means = Vec::new();
    for policy in ["fifo", "shortest-first"] {
        let (_g, gw, _, _) = gateway(&one_slot(backend, policy), &[], &[]);
        means.push(mean_response_ms(gw).await);
    }
    let (fifo, sf) = (means[0], means[1]);
    let met = sf < fifo * 0.8;
    println!(
        "| shortest-first: mean response time against fifo, 64 KiB and 1 KiB mixed | {sf:.1} vs {fifo:.1} ms ({:.2}) | < 0.8 | {} |",
        sf / fifo,
        if met { "met" } else { "NOT met" }
    );
    assert!(met, "shortest-first {sf:.1} ms against fifo {fifo:.1} ms");
}

/// Four clients, two per class, fetch 64 KiB each in a loop for `run_for` through a group
/// of 1 MB/s; returns the rate they got, bytes per second.
async fn group_rate(run_for: Duration) -> f64 {
    let (_b, backend) = backend(16, 0, &[]);
    let cfg = head(backend, 64)
        + r#"
[[bandwidth_group]]
name = "shared"
bytes_per_sec = 1000000
[[class]]
name = "a"
backend = "app"
bandwidth_group = "shared"
[[class]]
name = "b"
backend = "app"
bandwidth_group = "shared"
[[chain]]
name = "main"
default = { class = "a" }
[[chain.rule]]
id = "b"
path_prefix = "/b/"
target = { class = "b" }
"#;
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let start = Instant::now();
    let deadline = start + run_for;
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let mut got = Vec::new();
            while Instant::now() < deadline {
                let p = if i % 2 == 0 {
                    "/a/bytes/65536"
                } else {
                    "/b/bytes/65536"
                };
                let r = c.get(p, &[]).await.expect("response");
                got.push((r.body.len() as u64, Instant::now()));
            }
            got
        }));
    }
    let mut total = 0u64;
    let mut last = start;
    for t in tasks {
        for (n, at) in t.await.unwrap() {
            if at <= deadline {
                total += n;
                last = last.max(at);
            }
        }
    }
    let rate = total as f64 / (last - start).as_secs_f64();
    let s = status(admin).await;
    let least = run_for.as_secs_f64() * 1e5;
    assert!(
        class_field(&s, "a", "bytes_out") > least && class_field(&s, "b", "bytes_out") > least,
        "one class was starved: {s:#}"
    );
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_group_caps_its_rate_across_two_classes() {
    let _serial = SERIAL.lock().await;
    let rate = group_rate(Duration::from_secs(3)).await;
    // The budget, plus its burst (0.1 s) spread over the run.
    assert!(rate <= 1.1e6, "group rate {rate:.0} B/s, above 1 MB/s");
    assert!(rate >= 0.5e6, "group rate {rate:.0} B/s, far below 1 MB/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "experiment: run by bench/acceptance.sh"]
async fn experiment_bandwidth_group_rate_within_ten_percent() {
    let _serial = SERIAL.lock().await;
    let rate = group_rate(Duration::from_secs(10)).await;
    let met = (rate - 1e6).abs() <= 1e5;
    println!(
        "| bandwidth group: two classes sharing 1 MB/s over 10 s | {rate:.0} B/s | 1 000 000 ± 10% | {} |",
        if met { "met" } else { "NOT met" }
    );
    assert!(met, "group rate {rate:.0} B/s");
}
