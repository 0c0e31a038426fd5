//! Back-end health as an operator runs it: an address whose health check starts failing
//! is taken out after `fall` checks, before any client request fails on it, and comes
//! back after `rise` checks; an address drained at run time finishes its requests in
//! flight and gets no new ones; addresses are added and removed at run time.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::switch::switch_backend;
use common::*;

const TOKEN: &str = "health-token";

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
health_check = {{ path = "/health", interval_ms = 100, timeout_ms = 500, rise = 2, fall = 2 }}
[[class]]
name = "all"
backend = "app"
"#
    )
}

fn address_state(s: &serde_json::Value, addr: SocketAddr) -> serde_json::Value {
    s["backends"][0]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["address"] == addr.to_string()).cloned())
        .unwrap_or_else(|| panic!("no {addr} in {s:#}"))
}

async fn admin_write(admin: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    Client::connect(admin, None)
        .await
        .send(
            method,
            path,
            &[("authorization", &format!("Bearer {TOKEN}"))],
            body.as_bytes(),
        )
        .await
        .expect("an admin answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_failing_its_checks_is_taken_out_before_a_request_fails_on_it() {
    let (a, sa) = switch_backend().await;
    let (b, sb) = switch_backend().await;
    let (g, gw, admin, _) = gateway(&config(a, b), &[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            while !stop.load(SeqCst) {
                match c.get("/x", &[]).await {
                    Some(r) if r.status == 200 => {}
                    other => failures
                        .lock()
                        .expect("failures")
                        .push(other.map(|r| r.status)),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            sb.served.load(SeqCst) > 20
        })
        .await,
        "b takes its share at first"
    );
    // b's checks start failing (it is going down); its real requests still work.
    sb.health_ok.store(false, SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            address_state(&status(admin).await, b)["checked_down"] == true
        })
        .await,
        "b was not taken out"
    );
    // Now it fails for real (once nothing is in flight there): no client notices.
    assert!(
        eventually(Duration::from_secs(5), || async {
            address_state(&status(admin).await, b)["in_flight"] == 0
        })
        .await
    );
    sb.serve_ok.store(false, SeqCst);
    let served_before = sb.served.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        sb.served.load(SeqCst),
        served_before,
        "b got requests while down"
    );
    // Back: after `rise` passing checks it serves again.
    sb.serve_ok.store(true, SeqCst);
    sb.health_ok.store(true, SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sb.served.load(SeqCst) > served_before + 10
        })
        .await,
        "b did not come back"
    );
    stop.store(true, SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    assert!(
        failures.lock().expect("failures").is_empty(),
        "client requests failed: {:?}",
        failures.lock()
    );
    assert!(sa.served.load(SeqCst) > 0);
    let log = g.stderr();
    // Each change is logged once (a check that times out on a loaded machine may add a
    // pair, never one line per check).
    let (down, up) = (
        log.matches("address down").count(),
        log.matches("address up").count(),
    );
    assert!(down >= 1 && up >= 1 && down <= 3 && up <= 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_address_finishes_its_requests_and_gets_no_new_ones() {
    let (a, sa) = switch_backend().await;
    let (b, sb) = switch_backend().await;
    let (_g, gw, admin, _) = gateway(&config(a, b), &[], &[]);
    // Requests in flight on both.
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(tokio::spawn(async move {
            get_once(gw, "/slow/1500", &[]).await.status
        }));
    }
    // Every slow request has reached its back end, and some are on a.
    assert!(
        eventually(Duration::from_secs(5), || async {
            sa.served.load(SeqCst) + sb.served.load(SeqCst) == 4
                && address_state(&status(admin).await, a)["in_flight"].as_u64() >= Some(1)
        })
        .await
    );
    let r = admin_write(
        admin,
        "POST",
        &format!("/backends/app/addresses/{a}/drain"),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(address_state(&status(admin).await, a)["mode"], "draining");
    let a_before = sa.served.load(SeqCst);
    for _ in 0..20 {
        assert_eq!(get_once(gw, "/new", &[]).await.status, 200);
    }
    // The new requests all went to b; a's in flight finished.
    for s in slow {
        assert_eq!(
            s.await.expect("slow"),
            200,
            "a request in flight on the drained address failed"
        );
    }
    assert_eq!(
        sa.served.load(SeqCst),
        a_before,
        "the drained address got new requests"
    );
    assert!(sb.served.load(SeqCst) >= 20);
    assert!(
        eventually(Duration::from_secs(5), || async {
            address_state(&status(admin).await, a)["in_flight"] == 0
        })
        .await
    );
    // Enabled again, it takes requests.
    let r = admin_write(
        admin,
        "POST",
        &format!("/backends/app/addresses/{a}/enable"),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..10 {
        get_once(gw, "/again", &[]).await;
    }
    assert!(
        sa.served.load(SeqCst) > a_before,
        "a did not come back after enable"
    );

    // Addresses added and removed at run time, checked like the file.
    let (c, sc) = switch_backend().await;
    let r = admin_write(
        admin,
        "POST",
        "/backends/app/addresses",
        &format!("{{\"address\": \"{c}\"}}"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    for _ in 0..12 {
        get_once(gw, "/spread", &[]).await;
    }
    assert!(sc.served.load(SeqCst) > 0, "the added address got nothing");
    let r = admin_write(admin, "DELETE", &format!("/backends/app/addresses/{c}"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin_write(admin, "DELETE", &format!("/backends/app/addresses/{c}"), "").await;
    assert_eq!(r.status, 400, "removing it twice: {}", r.text());
    let r = admin_write(admin, "POST", "/backends/app/addresses/nonsense/drain", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = admin_write(
        admin,
        "POST",
        "/backends/none/addresses",
        &format!("{{\"address\": \"{c}\"}}"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
}
