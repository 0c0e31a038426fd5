//! Nothing is held forever and nothing leaks: a request in service that stalls (a back
//! end pausing its body, a client not reading, a client uploading too slowly) is cut off
//! by its phase's timeout and gives its slot back; every gauge comes back to zero however
//! a request ends; credit waiters count against the queue limit; silent connections
//! cannot lock out clients or the admin API; a dead back end does not flood the log.
//! Real binary, raw TCP where the misbehaviour must be exact, bounds that hold on a
//! loaded machine.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{raw_backend, status_line, Raw, RawClient};
use common::*;
use tokio::time::Instant;

/// One class in front of one back end, with `max_running` slots in all and the given
/// extra listener and back-end keys.
fn config(backend: SocketAddr, max_running: usize, listener: &str, backend_keys: &str) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
{listener}
[admin]
address = "127.0.0.1:0"
[gateway]
max_running = {max_running}
[[backend]]
name = "app"
addresses = ["{backend}"]
{backend_keys}
[[class]]
name = "all"
backend = "app"
max_wait_ms = 20000
"#
    )
}

/// A GET on a fresh connection, answered (status) within `limit`, else `None`.
async fn get_within(gw: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    tokio::time::timeout(limit, async {
        let mut c = Client::connect(gw, None).await;
        c.get(path, &[]).await.map(|r| r.status)
    })
    .await
    .ok()
    .flatten()
}

/// Waits until the gateway's gauges are all back at zero (bounded); returns the last
/// status read.
async fn gauges_at_zero(admin: SocketAddr, limit: Duration) -> (bool, serde_json::Value) {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(admin).await;
        let zero = s["running"] == 0
            && s["classes"]
                .as_array()
                .is_some_and(|cs| cs.iter().all(|c| c["in_flight"] == 0 && c["queued"] == 0))
            && s["backends"]
                .as_array()
                .is_some_and(|bs| bs.iter().all(|b| b["in_flight"] == 0));
        if zero || Instant::now() >= deadline {
            return (zero, s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn aborted(status: &serde_json::Value, reason: &str) -> u64 {
    status["classes"][0]["aborted"][reason]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_that_stalls_its_body_loses_the_slot_at_the_body_timeout() {
    let (backend, _closed) = raw_backend(Raw::StallBody).await;
    let cfg = config(backend, 1, "", "body_timeout_ms = 300");
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    // The first request takes the only slot and gets a head and ten bytes of body.
    let mut stalled = RawClient::connect(gw).await;
    stalled.send(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = stalled.read_head(Duration::from_secs(5)).await;
    assert!(status_line(&head).contains("200"), "{head:?}");
    // Then the gateway cuts it off and serves the next request with the freed slot.
    let started = Instant::now();
    let cut = stalled.read_all(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the stalled response was not cut off"
    );
    assert!(
        cut.len() < 1000,
        "the client got more than the back end sent"
    );
    let (zero, s) = gauges_at_zero(admin, Duration::from_secs(5)).await;
    assert!(zero, "gauges after the cut: {s:#}");
    assert_eq!(aborted(&s, "backend_body_timeout"), 1, "{s:#}");
    assert_eq!(s["backends"][0]["failures_body_timeout"], 1, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_loses_the_slot_at_the_send_timeout() {
    // Far more than the socket buffers on both sides hold.
    let (backend, _closed) = raw_backend(Raw::Big(512 << 20)).await;
    let cfg = config(backend, 1, "send_timeout_ms = 500", "");
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut lazy = RawClient::connect(gw).await;
    lazy.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(admin).await["running"] == 1
        })
        .await,
        "the request never reached service"
    );
    // It never reads. The slot comes back within the timeout (plus slack for a loaded
    // machine), and the next client is served.
    let (zero, s) = gauges_at_zero(admin, Duration::from_secs(10)).await;
    assert!(zero, "the unread response still holds its slot: {s:#}");
    assert_eq!(aborted(&s, "client_send_timeout"), 1, "{s:#}");
    drop(lazy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_uploads_too_slowly_gets_408_and_loses_the_slot() {
    let (backend, _closed) = raw_backend(Raw::Silent).await;
    let cfg = config(backend, 1, "request_body_timeout_ms = 300", "");
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut slow = RawClient::connect(gw).await;
    slow.send(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await;
    let answer = slow.read_all(Duration::from_secs(10)).await;
    assert!(
        status_line(&answer).contains("408"),
        "{:?}",
        status_line(&answer)
    );
    let (zero, s) = gauges_at_zero(admin, Duration::from_secs(5)).await;
    assert!(zero, "{s:#}");
    assert_eq!(aborted(&s, "request_body_timeout"), 1, "{s:#}");
    // The client's fault, not the back end's.
    assert_eq!(s["backends"][0]["failures_protocol"], 0, "{s:#}");
    assert_eq!(s["classes"][0]["failed"], 0, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_come_back_to_zero_whichever_phase_a_client_leaves_in() {
    // Waiting for the head: a back end that reads and never answers. Queued: two slots,
    // eight clients. Each client leaves after a moment.
    let (silent, _c1) = raw_backend(Raw::Silent).await;
    let cfg = config(silent, 2, "", "");
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut c = RawClient::connect(gw).await;
        c.send(format!("GET /wait{i} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await;
        clients.push(c);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = status(admin).await;
            s["running"] == 2 && s["classes"][0]["queued"] == 6
        })
        .await,
        "the requests did not reach service and the queue"
    );
    drop(clients);
    let (zero, s) = gauges_at_zero(admin, Duration::from_secs(5)).await;
    assert!(zero, "after clients left while waiting: {s:#}");

    // Streaming: a back end that stalls its body; the client leaves mid-body.
    let (stall, _c2) = raw_backend(Raw::StallBody).await;
    let cfg = config(stall, 2, "", "");
    let (_g2, gw2, admin2, _) = gateway(&cfg, &[], &[]);
    let mut c = RawClient::connect(gw2).await;
    c.send(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let _ = c.read_head(Duration::from_secs(5)).await;
    drop(c);
    let (zero, s) = gauges_at_zero(admin2, Duration::from_secs(5)).await;
    assert!(zero, "after a client left mid-body: {s:#}");
    assert_eq!(aborted(&s, "client_gone"), 1, "{s:#}");

    // Connecting: a back end whose listen queue is full, so connects hang.
    let blackhole = tokio::net::TcpSocket::new_v4().expect("socket");
    blackhole
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let hole = blackhole.local_addr().expect("addr");
    let _listener = blackhole.listen(0).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        // Fill the accept queue; later connects get no answer to their SYN.
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(hole),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let cfg = config(hole, 2, "", "connect_timeout_ms = 30000");
    let (_g3, gw3, admin3, _) = gateway(&cfg, &[], &[]);
    let mut c = RawClient::connect(gw3).await;
    c.send(b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(admin3).await["running"] == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(c);
    let (zero, s) = gauges_at_zero(admin3, Duration::from_secs(5)).await;
    assert!(zero, "after a client left while connecting: {s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_credit_count_against_the_queue_limit() {
    let (_b, backend) = backend(8, 0, &[]);
    // One unit a second: almost every request has to wait for credit.
    let cfg = format!(
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
queue_limit = 2
[agreements]
max_wait_ms = 3000
classes = {{ all = "a" }}
[[agreements.principal]]
name = "a"
capacity = 1
"#
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let r = c.get(&format!("/r{i}"), &[]).await;
            (r.map(|r| (r.status, r.text())), Instant::now())
        }));
    }
    let mut queue_full_fast = 0;
    for t in tasks {
        let (r, at) = t.await.expect("client task");
        let (status, text) = r.expect("an answer");
        if status == 503
            && text.contains("queue_full")
            && at.duration_since(started) < Duration::from_secs(2)
        {
            queue_full_fast += 1;
        }
    }
    let s = status(admin).await;
    // At most the queue limit waited (and perhaps one went through on the initial
    // credit); the rest were refused at once rather than waiting for credit.
    assert!(
        queue_full_fast >= 16,
        "only {queue_full_fast} of 20 were refused at once: {s:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_lock_out_neither_clients_nor_the_admin_api() {
    let (_b, backend) = backend(8, 0, &[]);
    let cfg = config(backend, 64, "first_byte_timeout_ms = 500", "");
    let path = temp_path("gateway.toml");
    std::fs::write(&path, &cfg).expect("write config");
    let bin = allot_bin();
    // 256 descriptors: the gateway takes at most 64 clients, keeping the rest for the
    // admin API and its back ends.
    let script = format!(
        "ulimit -n 256 && exec {} gateway --config {}",
        bin.display(),
        path.display()
    );
    let g = spawn_shell(&script);
    let (gw, admin) = (g.addr("gateway"), g.addr("admin"));
    let mut silent = Vec::new();
    for _ in 0..400 {
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(gw)).await
        {
            Ok(Ok(s)) => silent.push(s),
            _ => break,
        }
    }
    assert!(
        silent.len() >= 300,
        "only {} connections opened",
        silent.len()
    );
    // The admin API answers at once.
    let t = Instant::now();
    let s = tokio::time::timeout(Duration::from_secs(3), status(admin)).await;
    assert!(
        s.is_ok(),
        "the admin API did not answer with the client listener full"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    // A real client is served once the silent ones time out: 400 / 64 rounds of 0.5 s.
    let served = get_within(gw, "/fine", Duration::from_secs(20)).await;
    assert_eq!(
        served,
        Some(200),
        "a client behind the silent connections was not served"
    );
    drop(silent);
    let warns = g.stderr().lines().filter(|l| l.contains("WARN")).count();
    assert!(warns <= 5, "{warns} warnings:\n{}", g.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_back_end_does_not_flood_the_log() {
    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let cfg = config(dead, 64, "", "eject_for_ms = 200");
    let (g, gw, _admin, _) = gateway(&cfg, &[], &[]);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let mut n = 0;
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                if c.get("/x", &[]).await.map(|r| r.status) == Some(502) {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.expect("client task");
    }
    assert!(failed > 100, "only {failed} requests were tried");
    let log = g.stderr();
    let lines = log.lines().count();
    assert!(
        lines <= 20,
        "{lines} log lines for {failed} failed requests:\n{log}"
    );
    assert!(log.contains("address ejected"), "{log}");
}
