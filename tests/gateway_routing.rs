//! Address, Host, path, header and probability rules route correctly,
//! including a chain two deep; a 30/70 probability split lands within ±3 points over
//! 10 000 requests. Also: back-end failures get 502 with a clear body, and a dead address
//! is skipped for a live one without the client noticing; a back end that does not answer
//! in time gets 504, and a pooled connection the server closed is replaced unseen.

mod common;

use common::raw::{raw_backend, Raw};
use common::*;
use std::net::IpAddr;

fn config(backend: std::net::SocketAddr) -> String {
    let mut c = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{backend}"]
"#
    );
    for class in ["net", "host", "path", "hdr", "deep", "p30", "p70", "other"] {
        c += &format!("[[class]]\nname = \"{class}\"\nbackend = \"app\"\n");
    }
    c += r#"
[[chain]]
name = "main"
default = { class = "other" }
[[chain.rule]]
id = "by-net"
source = ["127.0.0.2/32", "10.0.0.0/8"]
target = { class = "net" }
[[chain.rule]]
id = "by-host"
host = "api.example.com"
target = { class = "host" }
[[chain.rule]]
id = "by-path"
path_prefix = "/static/"
target = { class = "path" }
[[chain.rule]]
id = "by-header"
header = { name = "User-Agent", contains = "curl" }
target = { class = "hdr" }
[[chain.rule]]
id = "to-sub"
path_prefix = "/deep/"
target = { chain = "sub" }
[[chain.rule]]
id = "to-split"
path_prefix = "/split"
target = { chain = "split" }

[[chain]]
name = "sub"
default = { class = "other" }
[[chain.rule]]
id = "gold"
header = { name = "X-Tier", contains = "gold" }
target = { chain = "sub2" }

[[chain]]
name = "sub2"
default = { class = "deep" }

[[chain]]
name = "split"
default = { class = "p70" }
[[chain.rule]]
id = "thirty"
probability = 0.3
target = { class = "p30" }
"#;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_rule_routes_and_a_split_holds() {
    let (_b, backend) = backend(64, 0, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend), &[], &[]);

    // (path, headers, source address, expected class)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>, &'a str);
    let cases: &[Case] = &[
        ("/x", &[], Some("127.0.0.2"), "net"),
        ("/x", &[("host", "API.example.com:8080")], None, "host"),
        ("/static/app.js", &[], None, "path"),
        ("/x", &[("user-agent", "curl/8.1")], None, "hdr"),
        ("/deep/a", &[("x-tier", "silver-gold")], None, "deep"),
        ("/deep/a", &[("x-tier", "silver")], None, "other"),
        ("/x", &[], None, "other"),
    ];
    for (path, headers, source, class) in cases {
        let before = status(admin).await;
        let mut c = Client::connect(gw, source.map(|s| s.parse::<IpAddr>().unwrap())).await;
        let r = c.get(path, headers).await.expect("response");
        assert_eq!(r.status, 200, "{path} {headers:?}: {}", r.text());
        let after = status(admin).await;
        let grew = class_field(&after, class, "arrivals") - class_field(&before, class, "arrivals");
        assert_eq!(
            grew, 1.0,
            "{path} {headers:?} from {source:?} should be class {class}"
        );
    }

    // 10 000 requests through the probability rule, on 8 keep-alive connections.
    let n_per = 1250;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let mut ok = 0;
            for _ in 0..n_per {
                if c.get("/split", &[]).await.map(|r| r.status) == Some(200) {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 10_000);
    let s = status(admin).await;
    let p30 = class_field(&s, "p30", "arrivals");
    let p70 = class_field(&s, "p70", "arrivals");
    assert_eq!(p30 + p70, 10_000.0);
    let share = p30 / 10_000.0;
    assert!((share - 0.30).abs() <= 0.03, "30/70 split gave {share:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_address_is_skipped_and_a_dead_backend_gets_502() {
    let (_b, live) = backend(8, 0, &[]);
    // A port nobody listens on: bind, note, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{dead}", "{live}"]
eject_after_failures = 2
[[backend]]
name = "gone"
addresses = ["{dead}"]
[[class]]
name = "ok"
backend = "app"
[[class]]
name = "broken"
backend = "gone"
[[chain]]
name = "main"
default = {{ class = "ok" }}
[[chain.rule]]
id = "b"
path_prefix = "/broken"
target = {{ class = "broken" }}
"#
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut c = Client::connect(gw, None).await;
    for i in 0..20 {
        let r = c
            .send("POST", "/echo", &[], format!("body {i}").as_bytes())
            .await
            .expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("body {i}"), "the body survives a retry");
    }
    let r = c.get("/broken", &[]).await.expect("response");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("gone"), "{}", r.text());
    let s = status(admin).await;
    let app = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "app")
        .unwrap()
        .clone();
    assert_eq!(app["healthy_addresses"], 1, "the dead address was ejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_added_and_hop_by_hop_removed() {
    let (_b, backend) = backend(8, 0, &[]);
    let cfg = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n[[backend]]\nname = \"app\"\naddresses = [\"{backend}\"]\n[[class]]\nname = \"all\"\nbackend = \"app\"\n"
    );
    let (_g, gw, _, _) = gateway(&cfg, &[], &[]);
    let r = get_once(
        gw,
        "/headers",
        &[
            ("x-forwarded-for", "192.0.2.1"),
            ("connection", "x-drop"),
            ("x-drop", "1"),
            ("host", "site.test"),
        ],
    )
    .await;
    let h: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;host=\"site.test\";proto=http"
    );
    assert_eq!(h["host"], "site.test");
    assert!(
        h.get("x-drop").is_none(),
        "headers named in Connection are hop-by-hop"
    );
}

fn one_backend_config(backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n[[backend]]\nname = \"app\"\naddresses = [\"{backend}\"]\n{extra}\n[[class]]\nname = \"all\"\nbackend = \"app\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_is_replaced_unseen() {
    let (backend, mut closed) = raw_backend(Raw::CloseAfterOne).await;
    let (_g, gw, admin, _) = gateway(&one_backend_config(backend, ""), &[], &[]);
    let mut c = Client::connect(gw, None).await;
    for i in 0..5 {
        let r = c.get(&format!("/r{i}"), &[]).await.expect("response");
        assert_eq!(
            (r.status, r.text()),
            (200, "ok\n".to_string()),
            "request {i}"
        );
        // The server has closed the connection the gateway pooled before the next request.
        tokio::time::timeout(std::time::Duration::from_secs(5), closed.recv())
            .await
            .expect("the back end closed its connection");
    }
    let s = status(admin).await;
    let app = &s["backends"][0];
    assert_eq!(app["failures_protocol"], 0, "{app}");
    assert_eq!(app["failures_connect"], 0, "{app}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_that_does_not_answer_in_time_gets_504() {
    let (backend, _closed) = raw_backend(Raw::Silent).await;
    let cfg = one_backend_config(backend, "response_timeout_ms = 300");
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let mut c = Client::connect(gw, None).await;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let r = c.get("/slow", &[]).await.expect("response");
        let waited = started.elapsed();
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(
            r.text().contains("app") && r.text().contains("300 ms"),
            "{}",
            r.text()
        );
        assert!(
            waited >= std::time::Duration::from_millis(290)
                && waited < std::time::Duration::from_secs(3),
            "{waited:?}"
        );
    }
    let s = status(admin).await;
    assert_eq!(
        s["backends"][0]["failures_timeout"], 2,
        "{}",
        s["backends"][0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_idle_past_the_timeout_is_closed() {
    let (backend, mut closed) = raw_backend(Raw::KeepAlive(200)).await;
    let cfg = one_backend_config(backend, "pool_idle_timeout_ms = 300");
    let (_g, gw, _, _) = gateway(&cfg, &[], &[]);
    // Two requests at once: two back-end connections, both pooled afterwards.
    let (a, b) = tokio::join!(get_once(gw, "/a", &[]), get_once(gw, "/b", &[]));
    assert_eq!((a.status, b.status), (200, 200));
    let pooled_at = std::time::Instant::now();
    // One of them carries requests until the other has been idle past the timeout; the
    // pool then closes the idle one (the back end sees it go) and keeps the busy one.
    let mut c = Client::connect(gw, None).await;
    while pooled_at.elapsed() < std::time::Duration::from_millis(700) {
        assert_eq!(c.get("/again", &[]).await.expect("response").status, 200);
    }
    tokio::time::timeout(std::time::Duration::from_secs(5), closed.recv())
        .await
        .expect("the idle connection was closed");
    assert!(
        closed.try_recv().is_err(),
        "only the idle connection was closed"
    );
}
