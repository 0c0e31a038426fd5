//! The shipped Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), and every query of the shipped Grafana dashboard returns data
//! from a real Prometheus that scraped a gateway under load (classes, refusals, back ends,
//! principals, controllers), except the cluster's (see `CLUSTER_METRICS`).

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::time::Instant;

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The prefix of the cluster's metrics. A gateway exports them only with `[cluster]` in
/// its configuration (alone it has no role, epoch, parent or fallback to report), and the
/// gateway these tests scrape runs alone: the queries over them cannot return data here,
/// so they are left out of "every query returns data", by name, and nothing else is.
const CLUSTER_METRICS: &str = "allot_cluster_";

/// The gauge the fallback alert and the dashboard's cluster panel read: 1 while the
/// gateway enforces its local fallback share, 0 otherwise.
const CLUSTER_FALLBACK: &str = "allot_cluster_fallback";

#[test]
fn the_alert_rules_pass_promtool() {
    let promtool = tools::ensure("promtool", "prometheus");
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(repo().join("packaging/prometheus/alerts.yml"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(repo().join("packaging/prometheus/alerts.yml"))
        .expect("alerts.yml");
    for alert in [
        "AllotBackendDown",
        "AllotRefusalsHigh",
        "AllotQueueDelayAboveTarget",
        "AllotClusterFallback",
    ] {
        assert!(text.contains(alert), "{alert} missing");
    }
    let fallback = text
        .split("- alert: ")
        .find(|rule| rule.starts_with("AllotClusterFallback"))
        .expect("the fallback rule");
    assert!(fallback.contains(CLUSTER_FALLBACK), "{fallback}");
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let promtool = tools::ensure("promtool", "prometheus");
    let out = Command::new(promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(repo().join("packaging/prometheus"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn only_the_cluster_panels_read_cluster_metrics_and_they_read_the_fallback_gauge() {
    let (cluster, alone): (Vec<_>, Vec<_>) = dashboard_queries()
        .into_iter()
        .partition(|(_, q)| q.contains(CLUSTER_METRICS));
    assert!(!cluster.is_empty(), "no cluster panel");
    for (title, q) in &cluster {
        assert!(title.starts_with("Cluster"), "{title}: {q}");
    }
    assert!(
        cluster.iter().any(|(_, q)| q.contains(CLUSTER_FALLBACK)),
        "{cluster:?}"
    );
    assert!(
        alone.iter().all(|(title, _)| !title.starts_with("Cluster")),
        "{alone:?}"
    );
}

fn config(backend: std::net::SocketAddr) -> String {
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
name = "tenant-a"
backend = "server"
[[class]]
name = "tenant-b"
backend = "server"
accept_rate = {{ rate_per_sec = 20, burst = 2 }}
[[chain]]
name = "main"
default = {{ class = "tenant-a" }}
[[chain.rule]]
id = "tenant-b"
path_prefix = "/b/"
target = {{ class = "tenant-b" }}
[agreements]
window_ms = 100
max_wait_ms = 200
classes = {{ tenant-a = "A", tenant-b = "B" }}
[[agreements.principal]]
name = "server"
capacity = 2000
[[agreements.principal]]
name = "A"
capacity = 0
[[agreements.principal]]
name = "B"
capacity = 0
[[agreements.agreement]]
from = "server"
to = "A"
share = [0.2, 1.0]
[[agreements.agreement]]
from = "server"
to = "B"
share = [0.8, 1.0]
[[controller]]
kind = "adaptive"
name = "server-limit"
backend = "server"
period_ms = 100
"#
    )
}

/// Every `expr` of the dashboard's panels, with Grafana's `$__rate_interval` made a
/// window that holds several scrapes.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("packaging/grafana/allot.json"))
        .expect("packaging/grafana/allot.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            out.push((
                panel["title"].as_str().unwrap_or("?").to_string(),
                expr.replace("$__rate_interval", "10s"),
            ));
        }
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let prometheus = tools::ensure("prometheus", "prometheus");
    let (_b, backend_addr) = backend(32, 3, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend_addr), &[], &[]);

    let dir = temp_path("prometheus-dash");
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: allot\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(dir.join("log")).expect("log");
    let prom = Command::new(&prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(prom);
    assert!(
        eventually(Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(web).await.is_ok()
        })
        .await,
        "prometheus did not start: {}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );

    let stop = Arc::new(AtomicBool::new(false));
    for path in ["/a", "/a", "/b/x", "/b/x"] {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            while !stop.load(Relaxed) {
                match c.get(path, &[]).await {
                    None => c = Client::connect(gw, None).await,
                    Some(r) if r.status != 200 => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Some(_) => {}
                }
            }
        });
    }

    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    // The gateway alone exports no cluster metric, which is why their queries are left
    // out below (see CLUSTER_METRICS).
    let metrics = match Client::connect(admin, None)
        .await
        .get("/metrics", &[])
        .await
    {
        Some(r) if r.status == 200 => r.text(),
        other => panic!("GET /metrics: {other:?}"),
    };
    assert!(
        !metrics.contains(CLUSTER_METRICS),
        "a gateway without [cluster] exports cluster metrics"
    );
    // Wait until each query answers with at least one series, all within one bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<(String, String)> = queries
        .into_iter()
        .filter(|(_, q)| !q.contains(CLUSTER_METRICS))
        .collect();
    while !missing.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (title, q) in missing {
            let url = format!("/api/v1/query?query={}", urlencode(&q));
            let answered = match Client::connect(web, None).await.get(&url, &[]).await {
                Some(r) if r.status == 200 => {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                    v["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                }
                _ => false,
            };
            if !answered {
                still.push((title, q));
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    stop.store(true, Relaxed);
    assert!(
        missing.is_empty(),
        "dashboard queries without data: {missing:#?}\nprometheus log:\n{}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
