//! The access log: one line per request, whatever its outcome (200, 503 for each reason,
//! 502, 504, 408), with its class, back end, address, times and reason, in nginx's
//! combined format or as JSON; SIGUSR1 reopens the file after it was moved away.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{raw_backend, Raw, RawClient};
use common::*;

fn config(
    live: SocketAddr,
    silent: SocketAddr,
    dead: SocketAddr,
    log: &std::path::Path,
    format: &str,
) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
request_body_timeout_ms = 300
[admin]
address = "127.0.0.1:0"
[access_log]
path = "{}"
format = "{format}"
[gateway]
max_running = 64
[[backend]]
name = "live"
addresses = ["{live}"]
[[backend]]
name = "silent"
addresses = ["{silent}"]
response_timeout_ms = 300
[[backend]]
name = "dead"
addresses = ["{dead}"]
[[class]]
name = "ok"
backend = "live"
[[class]]
name = "full"
backend = "silent"
max_running = 1
queue_limit = 0
[[class]]
name = "slow"
backend = "live"
max_running = 1
max_wait_ms = 200
[[class]]
name = "rated"
backend = "live"
accept_rate = {{ rate_per_sec = 0.001, burst = 1 }}
[[class]]
name = "timeout"
backend = "silent"
[[class]]
name = "gone"
backend = "dead"
[[class]]
name = "upload"
backend = "silent"
[[chain]]
name = "main"
default = {{ class = "ok" }}
[[chain.rule]]
id = "full"
path_prefix = "/full"
target = {{ class = "full" }}
[[chain.rule]]
id = "slow"
path_prefix = "/slow"
target = {{ class = "slow" }}
[[chain.rule]]
id = "rated"
path_prefix = "/rated"
target = {{ class = "rated" }}
[[chain.rule]]
id = "timeout"
path_prefix = "/timeout"
target = {{ class = "timeout" }}
[[chain.rule]]
id = "gone"
path_prefix = "/gone"
target = {{ class = "gone" }}
[[chain.rule]]
id = "upload"
path_prefix = "/upload"
target = {{ class = "upload" }}
"#,
        log.display()
    )
}

/// Drives one request of every outcome; returns the log's lines, the gateway and its
/// back end (both stop when dropped) and the log's path.
async fn every_outcome(format: &str) -> (Vec<String>, (Proc, Proc), std::path::PathBuf) {
    let (b, live) = backend(16, 0, &[]);
    let (silent, _c) = raw_backend(Raw::Silent).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let log = temp_path("access.log");
    let (g, gw, _admin, _) = gateway(&config(live, silent, dead, &log, format), &[], &[]);
    let get = |path: &'static str| async move {
        Client::connect(gw, None)
            .await
            .get(path, &[("user-agent", "test-agent")])
            .await
            .map(|r| r.status)
    };
    assert_eq!(get("/fine").await, Some(200));
    // queue_full: the only slot is held by a request the silent back end never answers.
    let holder = tokio::spawn(get("/full/hold"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(_admin).await, "full", "in_flight") == 1.0
        })
        .await
    );
    assert_eq!(get("/full/x").await, Some(503));
    // timeout: one slot, a long request in it, the next waits 200 ms.
    let long = tokio::spawn(get("/slow/sleep/1500"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(_admin).await, "slow", "in_flight") == 1.0
        })
        .await
    );
    assert_eq!(get("/slow/x").await, Some(503));
    // rate: the bucket's one token goes to the first.
    assert_eq!(get("/rated/a").await, Some(200));
    assert_eq!(get("/rated/b").await, Some(503));
    assert_eq!(get("/timeout/x").await, Some(504));
    assert_eq!(get("/gone/x").await, Some(502));
    let mut up = RawClient::connect(gw).await;
    up.send(b"POST /upload/x HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        .await;
    let answer = up.read_all(Duration::from_secs(10)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let _ = long.await;
    holder.abort();
    let want = 9;
    assert!(
        eventually(Duration::from_secs(10), || async {
            std::fs::read_to_string(&log)
                .map(|t| t.lines().count() >= want)
                .unwrap_or(false)
        })
        .await,
        "the log has {:?}",
        std::fs::read_to_string(&log)
    );
    let lines = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(String::from)
        .collect();
    (lines, (g, b), log)
}

fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_has_its_line_in_the_combined_format() {
    let (lines, (g, _b), log) = every_outcome("combined").await;
    let ok = line_with(&lines, "GET /fine HTTP/1.1");
    assert!(ok.starts_with("127.0.0.1 - - ["), "{ok}");
    assert!(
        ok.contains("\" 200 ") && ok.contains("\"test-agent\""),
        "{ok}"
    );
    assert!(
        ok.contains("class=ok backend=live address=127.0.0.1:"),
        "{ok}"
    );
    assert!(ok.contains("reason=-"), "{ok}");
    for (path, status, reason) in [
        ("/full/x", "503", "queue_full"),
        ("/slow/x", "503", "timeout"),
        ("/rated/b", "503", "rate"),
        ("/timeout/x", "504", "timeout"),
        ("/gone/x", "502", "connect"),
        ("/upload/x", "408", "request_body_timeout"),
    ] {
        let l = line_with(&lines, &format!(" {path} HTTP/1.1"));
        assert!(l.contains(&format!("\" {status} ")), "{path}: {l}");
        assert!(l.contains(&format!("reason={reason}")), "{path}: {l}");
    }
    // SIGUSR1 reopens the file after logrotate moved it.
    let moved = log.with_extension("1");
    std::fs::rename(&log, &moved).expect("rotate");
    g.signal("USR1");
    assert!(
        eventually(Duration::from_secs(5), || async {
            g.stderr().contains("access log reopened")
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gw = g.addr("gateway");
    assert_eq!(
        Client::connect(gw, None)
            .await
            .get("/after", &[])
            .await
            .map(|r| r.status),
        Some(200)
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("GET /after HTTP/1.1"))
        })
        .await,
        "the reopened log has no new line"
    );
    assert!(!std::fs::read_to_string(&moved)
        .expect("old log")
        .contains("/after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_has_its_line_as_json() {
    let (lines, _g, _log) = every_outcome("json").await;
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |target: &str| {
        parsed
            .iter()
            .find(|v| v["target"] == target)
            .unwrap_or_else(|| panic!("no line for {target}: {parsed:#?}"))
    };
    let ok = find("/fine");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["class"], "ok");
    assert_eq!(ok["backend"], "live");
    assert!(ok["address"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    assert!(ok["service_ms"].as_f64().is_some());
    assert_eq!(ok["user_agent"], "test-agent");
    assert_eq!(find("/full/x")["reason"], "queue_full");
    assert_eq!(find("/gone/x")["status"], 502);
    assert_eq!(find("/timeout/x")["status"], 504);
    assert_eq!(find("/upload/x")["status"], 408);
}
