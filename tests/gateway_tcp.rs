//! The TCP gateway with real sockets on 127.0.0.1: connections classified by address,
//! listener and first bytes (and, with nothing sent in time, the default); `max_running`
//! caps the connections the back end sees, queued ones are served in order and none
//! hangs; a bandwidth group shared by two classes holds its rate in both directions; a
//! PROXY header tells the server who the client is; affinity keeps a client on its
//! server; garbage, half-open and silent clients and a server that never answers are each
//! closed by their timeout while others are served.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::tcp::{tcp_backend, Serve};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Connects, sends `hello`, and reads until the server closes or `limit` passes.
async fn talk(addr: SocketAddr, hello: &[u8], limit: Duration) -> (Vec<u8>, Duration) {
    let t0 = Instant::now();
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    if !hello.is_empty() {
        s.write_all(hello).await.expect("write");
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut got)).await;
    (got, t0.elapsed())
}

/// One echo round trip on a fresh connection: what came back.
async fn echo(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    got
}

fn class_closed(s: &serde_json::Value, class: &str, reason: &str) -> u64 {
    s["classes"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == class))
        .and_then(|c| c["closed"][reason].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_classified_by_address_listener_and_first_bytes() {
    let (echo_addr, _seen) = tcp_backend(Serve::Echo).await;
    let (banner_addr, _banner) = tcp_backend(Serve::Banner).await;
    let cfg = format!(
        r#"
[[listener]]
name = "front"
address = "127.0.0.1:0"
protocol = "tcp"
entry_chain = "tcp"
inspect_ms = 300
[[listener]]
name = "db"
address = "127.0.0.1:0"
protocol = "tcp"
entry_chain = "tcp"
[[listener]]
name = "mail"
address = "127.0.0.1:0"
protocol = "tcp"
entry_chain = "tcp"
inspect_ms = 200
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "echo"
addresses = ["{echo_addr}"]
[[backend]]
name = "banner"
addresses = ["{banner_addr}"]
[[class]]
name = "ssh"
backend = "echo"
[[class]]
name = "office"
backend = "echo"
[[class]]
name = "db"
backend = "echo"
[[class]]
name = "mail"
backend = "banner"
[[class]]
name = "other"
backend = "echo"
[[chain]]
name = "tcp"
default = {{ class = "other" }}
[[chain.rule]]
id = "mail"
listener = "mail"
target = {{ class = "mail" }}
[[chain.rule]]
id = "db"
listener = "db"
target = {{ class = "db" }}
[[chain.rule]]
id = "ssh"
first_bytes = "SSH-"
target = {{ class = "ssh" }}
[[chain.rule]]
id = "office"
source = ["127.0.0.2/32"]
target = {{ class = "office" }}
"#
    );
    let (g, _gw, admin, _) = gateway(&cfg, &[], &[]);
    let (front, db, mail) = (
        g.addr("listener.front"),
        g.addr("listener.db"),
        g.addr("listener.mail"),
    );

    assert_eq!(echo(front, b"SSH-2.0-test\r\n").await, b"SSH-2.0-test\r\n");
    assert_eq!(
        echo(front, b"GET / HTTP/1.1\r\n").await,
        b"GET / HTTP/1.1\r\n"
    );
    assert_eq!(echo(db, b"select 1").await, b"select 1");
    // From 127.0.0.2: the office class.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut s = socket.connect(front).await.expect("connect from 127.0.0.2");
    s.write_all(b"hi").await.expect("write");
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await.expect("echo");
    drop(s);
    // A server-speaks-first protocol: the client sends nothing, the gateway classifies
    // it after inspect_ms, and the server's banner comes through.
    let mut m = TcpStream::connect(mail).await.expect("connect mail");
    let mut banner = vec![0u8; 27];
    tokio::time::timeout(Duration::from_secs(5), m.read_exact(&mut banner))
        .await
        .expect("the banner came in time")
        .expect("banner");
    assert_eq!(banner, b"220 hello from the server\r\n");
    drop(m);

    let s = status(admin).await;
    for (class, n) in [
        ("ssh", 1.0),
        ("other", 1.0),
        ("db", 1.0),
        ("office", 1.0),
        ("mail", 1.0),
    ] {
        assert_eq!(class_field(&s, class, "arrivals"), n, "{class}: {s:#}");
    }
    assert!(class_field(&s, "ssh", "bytes_in") >= 14.0, "{s:#}");
    assert!(class_field(&s, "ssh", "bytes_out") >= 14.0, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_caps_open_connections_and_queued_ones_go_in_order() {
    let (backend, seen) = tcp_backend(Serve::Hold(100)).await;
    let cfg = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
protocol = "tcp"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "db"
addresses = ["{backend}"]
[[class]]
name = "db"
backend = "db"
max_running = 4
queue_limit = 100
max_wait_ms = 30000
"#
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        tasks.push(tokio::spawn(async move {
            // Staggered, so the queue order is the connect order.
            tokio::time::sleep(Duration::from_millis(i * 5)).await;
            let (got, _) = talk(gw, format!("c{i}").as_bytes(), Duration::from_secs(60)).await;
            (i, got)
        }));
    }
    for t in tasks {
        let (i, got) = t.await.expect("client");
        assert_eq!(got, b"done\n", "connection {i} was not served");
    }
    assert!(
        seen.max_open.load(SeqCst) <= 4,
        "the back end saw {} at once",
        seen.max_open.load(SeqCst)
    );
    assert_eq!(seen.max_open.load(SeqCst), 4, "the cap was used");
    assert_eq!(seen.total.load(SeqCst), 40);
    // Served in the order they came (the back end recorded each one's first bytes).
    let order: Vec<u64> = seen
        .first
        .lock()
        .expect("first")
        .iter()
        .filter_map(|b| std::str::from_utf8(b).ok()?.strip_prefix('c')?.parse().ok())
        .collect();
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(
        inversions <= 8,
        "queued connections out of order: {order:?}"
    );
    let s = status(admin).await;
    assert_eq!(class_field(&s, "db", "admitted"), 40.0);
    assert_eq!(class_field(&s, "db", "in_flight"), 0.0);
    assert_eq!(class_field(&s, "db", "queued"), 0.0);
    assert_eq!(class_closed(&s, "db", "server_closed"), 40, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_waits_too_long_is_closed_and_counted() {
    let (backend, _seen) = tcp_backend(Serve::Hold(3000)).await;
    let log = temp_path("tcp-access.log");
    let cfg = format!(
        r#"
[[listener]]
name = "db"
address = "127.0.0.1:0"
protocol = "tcp"
[admin]
address = "127.0.0.1:0"
[access_log]
path = "{}"
format = "json""#,
        log.display()
    ) + &format!(
        r#"
[[backend]]
name = "db"
addresses = ["{backend}"]
[[class]]
name = "db"
backend = "db"
max_running = 1
max_wait_ms = 300
"#
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let first = tokio::spawn(async move { talk(gw, b"x", Duration::from_secs(20)).await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(admin).await, "db", "in_flight") == 1.0
        })
        .await
    );
    let (got, took) = talk(gw, b"y", Duration::from_secs(10)).await;
    assert!(got.is_empty(), "the waiting connection was served: {got:?}");
    assert!(
        took < Duration::from_secs(5),
        "closed after {took:?}, max_wait_ms is 300"
    );
    let s = status(admin).await;
    assert_eq!(class_field(&s, "db", "refused_timeout"), 1.0, "{s:#}");
    assert_eq!(first.await.expect("first").0, b"done\n");
    // One access-log line per connection: the refused one and the served one.
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 2)
        })
        .await
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "tcp" && l["reason"] == "timeout"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["reason"] == "server_closed" && l["bytes_out"] == 5 && l["target"] == "db"),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_group_holds_its_rate_in_both_directions_across_two_classes() {
    let (sink, _s) = tcp_backend(Serve::Sink).await;
    let (source, _o) = tcp_backend(Serve::Source(40 << 20)).await;
    let cfg = format!(
        r#"
[[listener]]
name = "up"
address = "127.0.0.1:0"
protocol = "tcp"
entry_chain = "main"
[[listener]]
name = "down"
address = "127.0.0.1:0"
protocol = "tcp"
entry_chain = "main"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "sink"
addresses = ["{sink}"]
[[backend]]
name = "source"
addresses = ["{source}"]
[[bandwidth_group]]
name = "bulk"
bytes_per_sec = 2000000
[[class]]
name = "uploads"
backend = "sink"
bandwidth_group = "bulk"
[[class]]
name = "downloads"
backend = "source"
bandwidth_group = "bulk"
[[chain]]
name = "main"
default = {{ class = "uploads" }}
[[chain.rule]]
id = "down"
listener = "down"
target = {{ class = "downloads" }}
"#
    );
    let (g, _gw, admin, _) = gateway(&cfg, &[], &[]);
    let (up, down) = (g.addr("listener.up"), g.addr("listener.down"));
    let t0 = Instant::now();
    let run_for = Duration::from_secs(10);
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(if i % 2 == 0 { up } else { down })
                .await
                .expect("connect");
            let chunk = vec![b'u'; 64 * 1024];
            let mut buf = vec![0u8; 64 * 1024];
            while t0.elapsed() < run_for {
                if i % 2 == 0 {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk)).await;
                } else {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                }
            }
        }));
    }
    let before = status(admin).await;
    for t in tasks {
        t.await.expect("client");
    }
    let after = status(admin).await;
    let moved = |s: &serde_json::Value| {
        class_field(s, "uploads", "bytes_in")
            + class_field(s, "uploads", "bytes_out")
            + class_field(s, "downloads", "bytes_in")
            + class_field(s, "downloads", "bytes_out")
    };
    let rate = (moved(&after) - moved(&before)) / t0.elapsed().as_secs_f64();
    eprintln!("group rate over {:?}: {rate:.0} B/s", t0.elapsed());
    assert!(
        (rate - 2e6).abs() <= 0.1 * 2e6,
        "the group moved {rate:.0} B/s, expected 2 000 000 ± 10%"
    );
    assert!(
        class_field(&after, "uploads", "bytes_in") > 2e6,
        "{after:#}"
    );
    assert!(
        class_field(&after, "downloads", "bytes_out") > 2e6,
        "{after:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_learns_the_client_from_a_proxy_header_and_affinity_holds() {
    let (a, seen_a) = tcp_backend(Serve::Echo).await;
    let (b, seen_b) = tcp_backend(Serve::Echo).await;
    for (version, want) in [
        ("v1", &b"PROXY TCP4 127.0.0.1 127.0.0.1 "[..]),
        ("v2", &b"\r\n\r\n\0\r\nQUIT\n"[..]),
    ] {
        let cfg = format!(
            r#"
[[listener]]
address = "127.0.0.1:0"
protocol = "tcp"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{a}", "{b}"]
proxy_protocol = "{version}"
affinity_ms = 60000
[[class]]
name = "all"
backend = "app"
"#
        );
        let (_g, gw, _admin, _) = gateway(&cfg, &[], &[]);
        let before = (seen_a.total.load(SeqCst), seen_b.total.load(SeqCst));
        for _ in 0..6 {
            let mut s = TcpStream::connect(gw).await.expect("connect");
            s.write_all(b"ping").await.expect("write");
            // The echo sends back the PROXY header first, then the ping.
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                let mut buf = [0u8; 256];
                while !got.ends_with(b"ping") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            assert!(got.starts_with(want), "{version}: {got:?}");
            assert!(got.ends_with(b"ping"), "{version}: {got:?}");
        }
        let after = (seen_a.total.load(SeqCst), seen_b.total.load(SeqCst));
        let (da, db) = (after.0 - before.0, after.1 - before.1);
        assert!(
            da == 6 || db == 6,
            "{version}: affinity split the client: {da} and {db}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_silent_half_open_clients_and_a_mute_server_are_closed_by_their_timeouts() {
    let (echo_addr, _e) = tcp_backend(Serve::Echo).await;
    let (mute, _m) = tcp_backend(Serve::Silent).await;
    let cfg = format!(
        r#"
[[listener]]
name = "front"
address = "127.0.0.1:0"
protocol = "tcp"
inspect_ms = 200
idle_timeout_ms = 800
entry_chain = "main"
[[listener]]
name = "mute"
address = "127.0.0.1:0"
protocol = "tcp"
idle_timeout_ms = 800
entry_chain = "main"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "echo"
addresses = ["{echo_addr}"]
[[backend]]
name = "mute"
addresses = ["{mute}"]
[[class]]
name = "echo"
backend = "echo"
[[class]]
name = "mute"
backend = "mute"
[[chain]]
name = "main"
default = {{ class = "echo" }}
[[chain.rule]]
id = "mute"
listener = "mute"
target = {{ class = "mute" }}
"#
    );
    let (g, _gw, admin, _) = gateway(&cfg, &[], &[]);
    let (front, mute_l) = (g.addr("listener.front"), g.addr("listener.mute"));
    // A good client keeps being served throughout.
    let good = tokio::spawn(async move {
        let mut ok = 0;
        for i in 0..30u32 {
            if echo(front, format!("ping {i}").as_bytes()).await == format!("ping {i}").as_bytes() {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ok
    });
    let garbage = tokio::spawn(async move {
        talk(
            front,
            &[0xff, 0x00, 0x16, 0x03, 0x00],
            Duration::from_secs(10),
        )
        .await
    });
    let silent = tokio::spawn(async move { talk(front, b"", Duration::from_secs(10)).await });
    let half = tokio::spawn(async move {
        let mut s = TcpStream::connect(front).await.expect("connect");
        s.write_all(b"half").await.expect("write");
        let _ = s.shutdown().await; // the client is done sending, still reading
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
        got
    });
    let mute_server =
        tokio::spawn(async move { talk(mute_l, b"anyone?", Duration::from_secs(10)).await });
    let (garbage, silent, half, mute_server) = (
        garbage.await.expect("garbage"),
        silent.await.expect("silent"),
        half.await.expect("half"),
        mute_server.await.expect("mute"),
    );
    // Garbage is echoed like any bytes, then the idle timeout closes it.
    assert!(
        garbage.1 < Duration::from_secs(5),
        "garbage held {:?}",
        garbage.1
    );
    assert!(
        silent.1 < Duration::from_secs(5),
        "a silent client held {:?}",
        silent.1
    );
    assert_eq!(half, b"half", "a half-closed client still gets its answer");
    assert!(
        mute_server.0.is_empty() && mute_server.1 < Duration::from_secs(5),
        "a mute server held {:?}",
        mute_server.1
    );
    assert_eq!(
        good.await.expect("good"),
        30,
        "the good client was not always served"
    );
    let s = status(admin).await;
    assert!(class_closed(&s, "mute", "idle_timeout") >= 1, "{s:#}");
    assert_eq!(class_field(&s, "echo", "in_flight"), 0.0);
}
