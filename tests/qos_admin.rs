//! The QoS manager at run time: every example configuration passes `--check`, and
//! controllers are listed, paused, resumed, retuned, removed and added through
//! `allot ctl controllers …`, with the adaptive limit enforced by the dispatcher.

mod common;
mod qos_util;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::{backend, backend_stats, gateway, get_once, run_allot};
use qos_util::*;

#[test]
fn every_controller_example_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/controllers");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/controllers") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = path.to_string_lossy().to_string();
            let (code, out, err) = run_allot(&["gateway", "--check", "--config", &p], &[]);
            assert_eq!(code, 0, "{p}: {out}{err}");
            seen += 1;
        }
    }
    assert!(seen >= 4, "expected one example per scenario, found {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_are_listed_paused_retuned_removed_and_added_at_run_time() {
    let (_b, baddr) = backend(64, 20, &[]);
    let config = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
token = "qos-test"
[[backend]]
name = "app"
addresses = ["{baddr}"]
[[class]]
name = "all"
backend = "app"
[[controller]]
kind = "adaptive"
name = "adapt"
backend = "app"
period_ms = 50
min_limit = 3
max_limit = 3
initial_limit = 3
"#
    );
    let (_g, gaddr, admin, _) = gateway(&config, &[], &[]);
    let a = admin.to_string();
    let ctl = |args: &[&str]| {
        let mut full = vec!["ctl", "--admin", &a, "--token", "qos-test", "controllers"];
        full.extend_from_slice(args);
        run_allot(&full, &[])
    };

    // The limit of 3 holds against 12 concurrent clients.
    let stop = Arc::new(AtomicBool::new(false));
    let s = samples();
    let clients = closed_loop(gaddr, 12, "/x", Arc::clone(&stop), Arc::clone(&s));
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            backend_stats(baddr).await["max_concurrent"].as_u64() >= Some(3)
        })
        .await,
        "the back end never saw 3 at once"
    );
    let stats = backend_stats(baddr).await;
    assert_eq!(stats["max_concurrent"], 3, "{stats}");
    // The readout has outputs once the loop has ticked (the limit applies before that).
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            readout(&controllers(admin).await, "adapt")["ticks"].as_u64() > Some(0)
        })
        .await,
        "the controller never ticked"
    );

    let (code, out, err) = ctl(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON list");
    let r = readout(&list, "adapt");
    assert_eq!(r["kind"], "adaptive");
    assert_eq!(output(r, "limit"), Some(3.0));
    assert!(r["ticks"].as_u64().unwrap_or(0) > 0, "{r}");

    // Pause: ticks stop advancing; resume: they go on.
    assert_eq!(ctl(&["pause", "adapt"]).0, 0);
    // A tick that began before the pause may still finish: let it (three periods).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = readout(&controllers(admin).await, "adapt")["ticks"].as_u64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = controllers(admin).await;
    assert_eq!(readout(&paused, "adapt")["ticks"].as_u64(), before);
    assert_eq!(readout(&paused, "adapt")["paused"], true);
    assert_eq!(ctl(&["resume", "adapt"]).0, 0);
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            readout(&controllers(admin).await, "adapt")["ticks"].as_u64() > before
        })
        .await
    );

    // Retune: a bad value is refused with its key and changes nothing; a good one applies.
    let (code, out, _) = ctl(&["set", "adapt", "decrease=0.5"]);
    assert_ne!(code, 0);
    assert!(out.contains("`controller.adapt.decrease`"), "{out}");
    let (code, out, err) = ctl(&["set", "adapt", "min_limit=6", "max_limit=6"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            output(readout(&controllers(admin).await, "adapt"), "limit") == Some(6.0)
        })
        .await
    );
    let metrics = get_once(admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains(
            r#"allot_controller_output{controller="adapt",kind="adaptive",knob="limit"} 6.0"#
        ),
        "{metrics}"
    );

    // Remove: the limit goes with it. Add: a new one takes over.
    assert_eq!(ctl(&["remove", "adapt"]).0, 0);
    assert_eq!(controllers(admin).await, serde_json::json!([]));
    let (code, out, err) = ctl(&[
        "add",
        "kind=adaptive",
        "name=again",
        "backend=app",
        "rule=gradient",
        "period_ms=100",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, _) = ctl(&["add", "kind=adaptive", "name=again", "backend=app"]);
    assert_ne!(code, 0, "a duplicate name must be refused");
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            readout(&controllers(admin).await, "again")["ticks"].as_u64() > Some(2)
        })
        .await
    );
    stop.store(true, Relaxed);
    for c in clients {
        c.abort();
    }
    let failed = s.lock().unwrap().iter().filter(|x| x.status != 200).count();
    assert_eq!(failed, 0, "every request answered 200 across the changes");
}
