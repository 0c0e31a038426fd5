//! The operator's commands against a running gateway under load: `allot stat` shows rates
//! per second next to totals (once, `--watch`, `--json`), `allot ctl rules list` and
//! `ctl controllers list` print tables (JSON with `--json`), `allot ctl backend` drains,
//! disables, enables, adds and removes an address, and `allot ctl diff` shows how the
//! configuration in force differs from a file.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const TOKEN: &str = "ops-token";

fn config(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
token = "{TOKEN}"
[[backend]]
name = "app"
addresses = ["{a}", "{b}"]
[[class]]
name = "basic"
backend = "app"
[[class]]
name = "limited"
backend = "app"
accept_rate = {{ rate_per_sec = 5, burst = 1 }}
[[chain]]
name = "main"
default = {{ class = "basic" }}
[[chain.rule]]
id = "slow-lane"
path_prefix = "/limited/"
target = {{ class = "limited" }}
[[controller]]
kind = "adaptive"
name = "app-limit"
backend = "app"
period_ms = 100
"#
    )
}

/// Clients in a closed loop on `path` until `stop`.
fn load(gw: SocketAddr, path: &'static str, n: usize, stop: Arc<AtomicBool>) {
    for _ in 0..n {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            while !stop.load(Relaxed) {
                match c.get(path, &[]).await {
                    None => c = Client::connect(gw, None).await,
                    // Refused at once: pause, or the loop spins on a 2-core machine.
                    Some(r) if r.status != 200 => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Some(_) => {}
                }
            }
        });
    }
}

/// `allot ARGS…` on a blocking thread, so the load keeps running meanwhile.
async fn allot(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_allot(&a, &[("ALLOT_ADMIN_TOKEN", TOKEN)])
    })
    .await
    .expect("allot ran")
}

fn args(admin: SocketAddr, rest: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    v.insert(1, admin.to_string());
    v.insert(1, "--admin".into());
    v
}

/// The number in `column` (0 = name) of the row that starts with `name`.
fn cell(table: &str, name: &str, column: usize) -> f64 {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} row in\n{table}"));
    line.split_whitespace()
        .nth(column)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("column {column} of {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_shows_rates_next_to_totals_once_watched_and_as_json() {
    let (_a, a) = backend(32, 2, &[]);
    let (_b, b) = backend(32, 2, &[]);
    let (_g, gw, admin, _) = gateway(&config(a, b), &[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    load(gw, "/x", 4, Arc::clone(&stop));
    load(gw, "/limited/x", 2, Arc::clone(&stop));

    let (code, table, err) = allot(args(admin, &["stat", "--interval-ms", "500"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("running "), "{table}");
    // class arrivals /s …: a total and a positive rate.
    assert!(cell(&table, "basic", 1) > 0.0, "{table}");
    assert!(cell(&table, "basic", 2) > 0.0, "{table}");
    assert!(
        cell(&table, "limited", 6) > 0.0,
        "refusals per second:\n{table}"
    );
    assert!(table.contains("refused: rate "), "{table}");
    assert!(
        cell(&table, "app", 2) > 0.0,
        "back-end requests per second:\n{table}"
    );
    assert!(table.contains("healthy"), "{table}");
    assert!(!table.contains("18446744073709551615"), "{table}");

    let (code, out, err) = allot(args(admin, &["stat", "--json", "--interval-ms", "300"])).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let basic = v["rates"]["classes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "basic"))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(basic["arrivals_per_s"].as_f64() > Some(0.0), "{basic}");
    assert!(basic["queue_delay_p99_ms"].is_number(), "{basic}");
    assert!(v["status"]["classes"][0]["queue_delay"]["bounds_s"]
        .as_array()
        .is_some_and(|b| !b.is_empty()));

    let (code, out, err) = allot(args(
        admin,
        &["stat", "--watch", "--count", "3", "--interval-ms", "200"],
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("running ").count(), 3, "{out}");
    assert!(!out.contains('\x1b'), "no escape codes when not a terminal");
    stop.store(true, Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_print_tables_backends_change_and_diff_names_the_changed_keys() {
    let (_a, a) = backend(32, 1, &[]);
    let (_b, b) = backend(32, 1, &[]);
    let (_g, gw, admin, path) = gateway(&config(a, b), &[], &[]);
    let p = path.to_string_lossy().to_string();

    let (code, out, err) = allot(args(admin, &["ctl", "rules", "list"])).await;
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.contains("slow-lane"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("path_prefix=/limited/") && row.ends_with("class limited"));
    assert!(out
        .lines()
        .any(|l| l.contains("(default)") && l.ends_with("class basic")));
    let (_, out, _) = allot(args(admin, &["ctl", "rules", "list", "--json"])).await;
    let v: serde_json::Value = serde_json::from_str(&out).expect("rules JSON");
    assert_eq!(v["chains"][0]["rule"][0]["id"], "slow-lane");

    let (code, out, err) = allot(args(admin, &["ctl", "controllers", "list"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("controller"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("app-limit")), "{out}");
    let (_, out, _) = allot(args(admin, &["ctl", "controllers", "list", "--json"])).await;
    let v: serde_json::Value = serde_json::from_str(&out).expect("controllers JSON");
    assert_eq!(v[0]["name"], "app-limit");

    // Drain, enable, remove and add an address; a wrong one is refused.
    let bs = b.to_string();
    let mode = |s: serde_json::Value| {
        s["backends"][0]["addresses"]
            .as_array()
            .and_then(|xs| xs.iter().find(|x| x["address"] == bs.as_str()).cloned())
            .map(|x| x["mode"].as_str().unwrap_or("").to_string())
    };
    for (action, want) in [
        ("drain", "draining"),
        ("disable", "disabled"),
        ("enable", "enabled"),
    ] {
        let (code, out, err) = allot(args(admin, &["ctl", "backend", "app", action, &bs])).await;
        assert_eq!(code, 0, "{action}: {out}{err}");
        assert_eq!(mode(status(admin).await).as_deref(), Some(want));
    }
    let (code, _, _) = allot(args(admin, &["ctl", "backend", "app", "remove", &bs])).await;
    assert_eq!(code, 0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            mode(status(admin).await).is_none()
        })
        .await
    );
    let (code, _, _) = allot(args(admin, &["ctl", "backend", "app", "add", &bs])).await;
    assert_eq!(code, 0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            mode(status(admin).await).is_some()
        })
        .await
    );
    let (code, _, err) = allot(args(
        admin,
        &["ctl", "backend", "app", "drain", "192.0.2.1:9"],
    ))
    .await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(get_once(gw, "/x", &[]).await.status, 200);

    // diff: the same, then one key changed at run time.
    let (code, out, err) = allot(args(admin, &["ctl", "diff", "--config", &p])).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, _) = allot(args(admin, &["ctl", "class", "basic", "max_running=4"])).await;
    assert_eq!(code, 0);
    let (code, out, err) = allot(args(admin, &["ctl", "diff", "--config", &p])).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("- class.basic.max_running = 4"), "{out}");
    assert!(
        out.contains("+ class.basic.max_running = (absent)"),
        "{out}"
    );
    let (code, _, err) = allot(args(
        admin,
        &["ctl", "diff", "--config", "/nonexistent.toml"],
    ))
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.toml"), "{err}");
}
