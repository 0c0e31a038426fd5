//! Acceptance (b)–(e): the cap on running requests, priority between classes under
//! overload, shortest-first against fifo, and a shared bandwidth group. These measure
//! time, so they run one at a time.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_waits_at_most_a_fifth_of_basic_under_overload() {
    let _serial = SERIAL.lock().await;
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
    let deadline = Instant::now() + Duration::from_secs(5);
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
    assert!(class_field(&s, "premium", "admitted") > 50.0);
    assert!(
        b > 0.0 && p * 5.0 <= b,
        "premium {p:.2} ms, basic {b:.2} ms"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shortest_first_beats_fifo_on_a_mixed_workload() {
    let _serial = SERIAL.lock().await;
    let (_b, backend) = backend(4, 2, &["--ms-per-kib", "1"]);
    let mut means = Vec::new();
    for policy in ["fifo", "shortest-first"] {
        let cfg = head(backend, 1)
            + &format!("[[class]]\nname = \"all\"\nbackend = \"app\"\npolicy = \"{policy}\"\nmax_wait_ms = 60000\n");
        let (_g, gw, _, _) = gateway(&cfg, &[], &[]);
        means.push(mean_response_ms(gw).await);
    }
    let (fifo, sf) = (means[0], means[1]);
    assert!(
        sf < fifo * 0.8,
        "shortest-first {sf:.1} ms against fifo {fifo:.1} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_group_holds_its_rate_across_two_classes() {
    let _serial = SERIAL.lock().await;
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
    let deadline = start + Duration::from_secs(10);
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
    assert!((rate - 1e6).abs() <= 1e5, "group rate {rate:.0} B/s");
    let s = status(admin).await;
    assert!(class_field(&s, "a", "bytes_out") > 1e6 && class_field(&s, "b", "bytes_out") > 1e6);
}
