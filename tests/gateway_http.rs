//! HTTP/1.1 as the gateway and the back end must read it alike: the host a request is
//! classified by is the host the back end gets; what could be read two ways is refused;
//! what is the client's fault is never counted against the back end. Raw TCP, so the
//! bytes on the wire are exactly the ones under test.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{exchange, RawClient};
use common::*;

/// A gateway whose `api.example` requests go to class `api`, the rest to `web`, both on
/// one synthetic back end; `extra` goes in `[listener]`.
fn config(backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
{extra}
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "web"
backend = "app"
[[class]]
name = "api"
backend = "app"
[[chain]]
name = "main"
default = {{ class = "web" }}
[[chain.rule]]
id = "api"
host = "api.example"
target = {{ class = "api" }}
"#
    )
}

/// Sends `request` on a fresh connection; returns the status line and the body.
async fn raw(gw: SocketAddr, request: &[u8]) -> (String, String) {
    let mut c = RawClient::connect(gw).await;
    c.send(request).await;
    let bytes = c.read_all(Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The headers the back end saw, from its `/headers` answer.
fn seen(body: &str) -> serde_json::Value {
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn arrivals(s: &serde_json::Value, class: &str) -> f64 {
    class_field(s, class, "arrivals")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_classified_is_the_host_the_back_end_gets() {
    let (_b, backend) = backend(8, 0, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend, ""), &[], &[]);

    // Two Host headers: the gateway would read one, a back end the other.
    let (st, _) = raw(
        gw,
        b"GET / HTTP/1.1\r\nHost: web.example\r\nHost: api.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 400 "), "two Hosts: {st}");
    // HTTP/1.1 without Host.
    let (st, _) = raw(gw, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(st.contains(" 400 "), "no Host: {st}");

    // An absolute-form target still needs Host in HTTP/1.1 (RFC 9112 §3.2).
    let (st, _) = raw(
        gw,
        b"GET http://api.example/headers HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 400 "), "absolute form without Host: {st}");
    // With a Host that disagrees, the authority still wins, for both.
    let (st, body) = raw(
        gw,
        b"GET http://api.example/headers HTTP/1.1\r\nHost: web.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 200 "), "{st}");
    assert_eq!(seen(&body)["host"], "api.example", "{body}");
    let s = status(admin).await;
    assert_eq!(arrivals(&s, "api"), 1.0, "{s:#}");
    assert_eq!(arrivals(&s, "web"), 0.0, "{s:#}");

    // `Connection: host` cannot strip the Host the request was classified by.
    let (st, body) = raw(
        gw,
        b"GET /headers HTTP/1.1\r\nHost: api.example\r\nConnection: host, close\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 200 "), "{st}");
    assert_eq!(
        seen(&body)["host"],
        "api.example",
        "Host was stripped: {body}"
    );

    // A Host that is no host name (here with a quote and a backslash) is refused; one
    // with a port reaches `Forwarded` as a quoted-string (RFC 7239).
    let (st, _) = raw(
        gw,
        b"GET /headers HTTP/1.1\r\nHost: a\"b\\c\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 400 "), "{st}");
    let (st, body) = raw(
        gw,
        b"GET /headers HTTP/1.1\r\nHost: web.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 200 "), "{st}");
    let forwarded = seen(&body)["forwarded"].as_str().unwrap_or("").to_string();
    assert!(
        forwarded.contains(r#";host="web.example:8080";"#),
        "Forwarded does not quote the host: {forwarded}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_versions_and_bodies_are_served_or_refused_as_documented() {
    let (_b, backend) = backend(8, 0, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend, ""), &[], &[]);

    // CONNECT: a reverse proxy is not a tunnel. An answer, not a bare close.
    let st = exchange(
        gw,
        b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 501 "), "CONNECT: {st:?}");

    // HTTP/1.0 is served, with or without Host.
    let (st, body) = raw(gw, b"GET /hello HTTP/1.0\r\n\r\n").await;
    assert!(st.contains(" 200 "), "HTTP/1.0: {st}");
    assert!(body.contains("ok /hello"), "{body}");

    // A GET with a chunked body has it forwarded, not dropped.
    let (st, body) = raw(
        gw,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 200 "), "{st}");
    assert!(
        body.contains("hello"),
        "the GET's body was dropped: {body:?}"
    );

    // A broken chunked upload is the client's fault: 400, not a back-end failure. The
    // back end answers only after 2 s (`/sleep`), so the gateway meets the broken chunk
    // before any answer could begin (`/echo` answers its head at once, and on a busy
    // machine that head can reach the gateway first: the answer has begun, and the
    // gateway can only close the connection).
    let before = status(admin).await;
    let (st, _) = raw(
        gw,
        b"POST /sleep/2000 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(st.contains(" 400 "), "bad chunk size: {st}");
    let mut truncated = RawClient::connect(gw).await;
    truncated
        .send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        .await;
    truncated.stream.shutdown_write().await;
    let _ = truncated.read_all(Duration::from_secs(10)).await;
    let after = status(admin).await;
    for b in ["failures_protocol", "failures_timeout", "failures_connect"] {
        assert_eq!(
            before["backends"][0][b], after["backends"][0][b],
            "a client's broken body counted as a back-end failure ({b}): {after:#}"
        );
    }
    assert_eq!(class_field(&after, "web", "failed"), 0.0, "{after:#}");
}

trait ShutdownWrite {
    async fn shutdown_write(&mut self);
}

impl ShutdownWrite for tokio::net::TcpStream {
    async fn shutdown_write(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_of_headers_allowed_is_a_setting() {
    // A raw back end: it takes any number of headers.
    let (backend, _closed) = common::raw::raw_backend(common::raw::Raw::KeepAlive(0)).await;
    let (_g, gw, _, _) = gateway(&config(backend, "max_headers = 200"), &[], &[]);
    let request = |n: usize| {
        let mut r = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 0..n {
            r.push_str(&format!("X-H{i}: v\r\n"));
        }
        r.push_str("\r\n");
        r
    };
    let (st, _) = raw(gw, request(150).as_bytes()).await;
    assert!(
        st.contains(" 200 "),
        "150 headers under a limit of 200: {st}"
    );
    let (st, _) = raw(gw, request(250).as_bytes()).await;
    assert!(
        st.contains(" 431 "),
        "250 headers over a limit of 200: {st}"
    );
}
