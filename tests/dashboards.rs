//! The shipped Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), and every query of the shipped Grafana dashboard returns data
//! from a real Prometheus that scraped a gateway under load (classes, refusals, back ends,
//! principals, controllers), except the cluster's (see `CLUSTER_METRICS`).

mod common;

use std::process::Command;
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

/// Runs `promtool ARGS` in packaging/prometheus and fails with its output unless it passes.
fn promtool(args: &[&str]) {
    let promtool = tools::ensure("promtool", "prometheus");
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo().join("packaging/prometheus"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    promtool(&["check", "rules", "alerts.yml"]);
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
    promtool(&["test", "rules", "alerts_test.yml"]);
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
    let agreements = one_server_agreements("server", 2000);
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
{agreements}
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let (_b, backend_addr) = backend(32, 3, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend_addr), &[], &[]);

    let prom = prometheus::Prometheus::start("prometheus-dash", admin).await;

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
            let answered = prom.query(&q).await["data"]["result"]
                .as_array()
                .is_some_and(|a| !a.is_empty());
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
        prom.log()
    );
}
