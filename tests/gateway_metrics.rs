//! `/metrics` as real tools read it: `promtool check metrics` finds nothing to say about
//! the classic text format, histograms are cumulative up to `+Inf`, and a real Prometheus
//! scraping the gateway (OpenMetrics) computes a p99 with `histogram_quantile` that falls
//! in the histogram's bucket of the true p99. Prometheus and promtool are installed by the
//! test when missing.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::time::Instant;

fn config(backend: SocketAddr) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "all"
backend = "app"
"#
    )
}

/// `le` bounds and cumulative counts of one histogram series in classic text.
fn buckets(text: &str, series: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{series}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
            let v = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, v))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_to_say_and_histograms_end_at_inf() {
    let promtool = tools::ensure("promtool", "prometheus");
    let (_b, backend) = backend(8, 1, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend), &[], &[]);
    let mut c = Client::connect(gw, None).await;
    for _ in 0..20 {
        assert_eq!(c.get("/x", &[]).await.map(|r| r.status), Some(200));
    }
    let classic = get_once(admin, "/metrics", &[]).await;
    assert!(
        classic.headers.get("content-type").is_some_and(|v| v
            .to_str()
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4")),
        "{:?}",
        classic.headers
    );
    let text = classic.text();
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool says:\n{said}"
    );

    let b = buckets(&text, "allot_class_service_time_seconds");
    assert!(!b.is_empty(), "{text}");
    assert_eq!(b.last().map(|(le, _)| le.as_str()), Some("+Inf"), "{b:?}");
    assert!(
        b.windows(2).all(|w| w[0].1 <= w[1].1),
        "not cumulative: {b:?}"
    );
    assert_eq!(b.last().map(|(_, n)| *n), Some(20), "{b:?}");
    assert!(
        text.contains("allot_class_service_time_seconds_count{class=\"all\"} 20"),
        "{text}"
    );

    // OpenMetrics for a scraper that asks for it.
    let open = get_once(
        admin,
        "/metrics",
        &[("accept", "application/openmetrics-text;version=1.0.0")],
    )
    .await;
    let open_text = open.text();
    assert!(open_text.trim_end().ends_with("# EOF"), "{open_text}");
    assert!(
        open_text.contains("# TYPE allot_class_arrivals counter"),
        "{open_text}"
    );
}

/// The `q` quantile of `xs` (nearest rank).
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

/// The upper bound of the gateway's bucket holding `seconds` (100 µs doubling).
fn bucket_of(seconds: f64) -> f64 {
    let mut bound = 0.0001;
    while seconds > bound {
        bound *= 2.0;
    }
    bound
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_computes_a_p99_in_the_right_bucket() {
    let (_b, backend) = backend(64, 0, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend), &[], &[]);
    let prom = prometheus::Prometheus::start("prometheus", admin).await;

    // 90% of requests take 5 ms, 10% take 150 ms: the true p99 is a slow one.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..10 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let mut times = Vec::new();
            let mut i = t;
            while started.elapsed() < Duration::from_secs(8) {
                let path = if i % 10 == 0 {
                    "/sleep/150"
                } else {
                    "/sleep/5"
                };
                i += 1;
                let t0 = Instant::now();
                assert_eq!(c.get(path, &[]).await.map(|r| r.status), Some(200));
                times.push(t0.elapsed().as_secs_f64());
            }
            times
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.expect("client"));
    }
    let true_p99 = quantile(&mut times, 0.99);
    // Two more scrapes after the load, so the last window is in.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let query = "histogram_quantile(0.99, sum by (le) (increase(allot_class_service_time_seconds_bucket[10s])))";
    let mut answer: serde_json::Value;
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        answer = prom.query(query).await;
        let finite = answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v.is_finite());
        if finite || Instant::now() >= deadline {
            break finite;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(got, "no p99 from prometheus: {answer:#}");
    let p99: f64 = answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert_eq!(
        bucket_of(p99),
        bucket_of(true_p99),
        "prometheus p99 {p99:.4} s is not in the bucket of the true p99 {true_p99:.4} s"
    );
}
