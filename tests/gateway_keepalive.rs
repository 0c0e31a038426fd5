//! A keep-alive connection is closed after the idle timeout however long its last request
//! took: the idle time starts when the response ends, not at some later wake-up.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_after_a_slow_request_is_closed_at_the_idle_timeout() {
    let (_b, backend) = backend(4, 0, &[]);
    let cfg = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\nhead_timeout_ms = 200\nidle_timeout_ms = 300\n[admin]\naddress = \"127.0.0.1:0\"\n[[backend]]\nname = \"app\"\naddresses = [\"{backend}\"]\n[[class]]\nname = \"all\"\nbackend = \"app\"\n"
    );
    let (_g, gw, _, _) = gateway(&cfg, &[], &[]);
    let mut s = TcpStream::connect(gw).await.expect("connect");
    // Served for longer than the head timeout: the head's timer has fired and is gone.
    s.write_all(b"GET /sleep/600 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Idle from here: closed after 300 ms (the bound leaves room for a loaded machine;
    // without a wake-up at the response's end the connection stayed open for ever).
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by the idle timeout");
    assert_eq!(n.unwrap_or(0), 0, "closed quietly");
}
