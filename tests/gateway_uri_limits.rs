//! A request target longer than the listener's `max_uri_bytes` gets 414 over raw TCP,
//! however long it is (a head too large for `max_head_bytes` because of its target is
//! still a target too long), while a head too large for its headers still gets 431, a
//! target at the limit is served, and the back end sees only the requests served.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes` (a write cut short by the gateway's answer is not an error here) and
/// returns every status line of what comes back before the connection closes.
async fn statuses(gw: SocketAddr, bytes: &[u8]) -> Vec<String> {
    let mut s = TcpStream::connect(gw).await.expect("connect");
    let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(bytes)).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .map(str::to_string)
        .collect()
}

fn get(target: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {target} HTTP/1.1\r\nHost: x\r\n{connection}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_past_the_limit_gets_414_and_a_head_past_its_limit_431() {
    let (_b, backend) = backend(4, 0, &[]);
    let cfg = format!(
        r#"
[listener]
address = "127.0.0.1:0"
max_head_bytes = 16384
max_uri_bytes = 1000
head_timeout_ms = 2000
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "all"
backend = "app"
"#
    );
    let (_g, gw, _, _) = gateway(&cfg, &[], &[]);
    // A target of exactly `n` bytes.
    let target = |n: usize| format!("/{}", "a".repeat(n - 1));

    let at_limit = statuses(gw, get(&target(1000), true).as_bytes()).await;
    assert_eq!(at_limit, ["HTTP/1.1 200 OK"], "a target at the limit");

    let over = statuses(gw, get(&target(1001), false).as_bytes()).await;
    assert_eq!(
        over,
        ["HTTP/1.1 414 URI Too Long"],
        "one byte over the limit"
    );

    // Far past the head limit too: still the target's fault, so 414, not 431.
    let huge = statuses(gw, get(&target(100_000), false).as_bytes()).await;
    assert_eq!(huge, ["HTTP/1.1 414 URI Too Long"], "a 100 KB target");

    let absolute = format!("http://x{}", target(1001));
    let absolute = statuses(gw, get(&absolute, false).as_bytes()).await;
    assert_eq!(absolute, ["HTTP/1.1 414 URI Too Long"], "absolute form");

    // A short target with headers past the head limit: 431 as before.
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let big_head = statuses(gw, big_head.as_bytes()).await;
    assert!(
        big_head.len() == 1 && big_head[0].starts_with("HTTP/1.1 431"),
        "a head too large: {big_head:?}"
    );

    // Pipelined behind a good request: the first is served, the long one refused.
    let pipelined = format!("{}{}", get("/first", false), get(&target(2000), false));
    let pipelined = statuses(gw, pipelined.as_bytes()).await;
    assert_eq!(
        pipelined,
        ["HTTP/1.1 200 OK", "HTTP/1.1 414 URI Too Long"],
        "pipelined"
    );

    // The gateway serves on, and the back end saw only the two requests served.
    assert_eq!(get_once(gw, "/after", &[]).await.status, 200);
    let seen = backend_stats(backend).await["requests"].as_u64();
    assert_eq!(seen, Some(3), "back-end requests: the served ones only");
}
