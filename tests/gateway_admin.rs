//! Run-time changes and the gateway's life: rules and actuators changed at run time take
//! effect without a restart and writes need the token (which no output ever shows);
//! SIGHUP with a changed configuration takes effect as one swap, without dropping
//! requests in flight or refusing any, and a broken one is refused, logged, and the old
//! one kept; signals are handled from the moment the gateway says it listens, and
//! SIGTERM's grace is a setting.

mod common;

use common::*;
use std::time::Duration;

const TOKEN: &str = "s3cret-token";

fn config(backend: std::net::SocketAddr, slow_class: &str) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
token_env = "TEST_ALLOT_TOKEN"
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "one"
backend = "app"
[[class]]
name = "two"
backend = "app"
[[chain]]
name = "main"
default = {{ class = "one" }}
[[chain.rule]]
id = "slow"
path_prefix = "/slow/"
target = {{ class = "{slow_class}" }}
"#
    )
}

fn ctl(admin: std::net::SocketAddr, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let a = admin.to_string();
    let mut all = vec!["ctl", "--admin", &a];
    if let Some(t) = token {
        all.extend_from_slice(&["--token", t]);
    }
    all.extend_from_slice(args);
    run_allot(&all, &[("ALLOT_ADMIN_TOKEN", "")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_actuators_change_at_run_time_and_writes_need_the_token() {
    let (_b, backend) = backend(16, 0, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend, "one"), &[], &[("TEST_ALLOT_TOKEN", TOKEN)]);

    // Without the token, or with a wrong one: 401 and nothing changes.
    let (code, _, err) = ctl(
        admin,
        None,
        &[
            "rules",
            "add",
            "main",
            "--id",
            "api",
            "--path-prefix",
            "/api/",
            "--class",
            "two",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, _) = ctl(admin, Some("wrong"), &["class", "two", "max_running=1"]);
    assert_eq!(code, 1);

    // Add a rule: /api/ goes to class two from now on.
    let (code, out, err) = ctl(
        admin,
        Some(TOKEN),
        &[
            "rules",
            "add",
            "main",
            "--id",
            "api",
            "--path-prefix",
            "/api/",
            "--class",
            "two",
            "--position",
            "0",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let before = status(admin).await;
    assert_eq!(get_once(gw, "/api/x", &[]).await.status, 200);
    let after = status(admin).await;
    assert_eq!(
        class_field(&after, "two", "arrivals") - class_field(&before, "two", "arrivals"),
        1.0
    );
    let (_, listed, _) = ctl(admin, None, &["rules", "list", "--json"]);
    assert!(listed.contains("\"api\""), "{listed}");

    // A bad rule is refused and changes nothing.
    let (code, _, err) = ctl(
        admin,
        Some(TOKEN),
        &["rules", "add", "main", "--id", "x", "--class", "nope"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("400"), "{err}");

    // Accept rate on class two: 1 per second, burst 1 → the second quick request is refused.
    let (code, out, err) = ctl(
        admin,
        Some(TOKEN),
        &[
            "class",
            "two",
            r#"accept_rate={"rate_per_sec":1,"burst":1}"#,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut c = Client::connect(gw, None).await;
    let mut refused = 0;
    for _ in 0..5 {
        let r = c.get("/api/y", &[]).await.expect("response");
        if r.status == 503 {
            refused += 1;
            assert!(r.headers.contains_key("retry-after"));
            assert_eq!(r.text(), "allot: class two refused: rate\n");
        }
    }
    assert!(refused >= 3, "only {refused} refused by a 1/s accept rate");

    // Remove the actuator and the rule again.
    assert_eq!(
        ctl(admin, Some(TOKEN), &["class", "two", "accept_rate=null"]).0,
        0
    );
    assert_eq!(c.get("/api/y", &[]).await.expect("response").status, 200);
    assert_eq!(
        ctl(admin, Some(TOKEN), &["rules", "remove", "main", "api"]).0,
        0
    );
    let before = status(admin).await;
    get_once(gw, "/api/z", &[]).await;
    let after = status(admin).await;
    assert_eq!(
        class_field(&after, "one", "arrivals") - class_field(&before, "one", "arrivals"),
        1.0
    );

    // A typo in a key is refused with its name.
    let (code, _, err) = ctl(admin, Some(TOKEN), &["class", "two", "max_runing=3"]);
    assert_eq!(code, 1);
    let (_, out, _) = ctl(admin, Some(TOKEN), &["class", "two", "max_runing=3"]);
    assert!(out.contains("max_runing"), "{out}{err}");

    // The bandwidth and gateway endpoints exist and validate.
    let (code, out, _) = ctl(admin, Some(TOKEN), &["gateway", "max_running=0"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("max_running"), "{out}");
    assert_eq!(ctl(admin, Some(TOKEN), &["gateway", "max_running=32"]).0, 0);
    let s = status(admin).await;
    assert_eq!(s["max_running"], 32);

    // `allot stat` prints the sensors as a table.
    let a = admin.to_string();
    let (code, table, err) = run_allot(&["stat", "--admin", &a], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("running 0/32"), "{table}");
    for line in ["one ", "two ", "app "] {
        assert!(
            table.lines().any(|l| l.starts_with(line)),
            "{line:?} row missing:\n{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_dropping_in_flight_and_keeps_the_old_on_error() {
    let (_b, backend) = backend(16, 0, &[]);
    let (g, gw, admin, path) = gateway(&config(backend, "one"), &[], &[]);

    // A slow request in flight across the reload.
    let slow = tokio::spawn(async move { get_once(gw, "/slow/sleep/1500", &[]).await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(admin).await, "one", "in_flight") == 1.0
        })
        .await
    );
    std::fs::write(&path, config(backend, "two")).unwrap();
    g.signal("HUP");
    let reloaded = eventually(Duration::from_secs(10), || async {
        get_once(admin, "/rules", &[])
            .await
            .text()
            .contains("\"two\"")
    })
    .await;
    assert!(reloaded, "the new configuration took effect");
    let r = slow.await.unwrap();
    assert_eq!(
        r.status,
        200,
        "the request in flight finished: {}",
        r.text()
    );
    let before = status(admin).await;
    get_once(gw, "/slow/x", &[]).await;
    let after = status(admin).await;
    assert_eq!(
        class_field(&after, "two", "arrivals") - class_field(&before, "two", "arrivals"),
        1.0
    );

    // A broken file is refused, logged, and the configuration in force kept.
    std::fs::write(&path, "[[class]]\nname = 3\n").unwrap();
    g.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || async {
            g.stderr().contains("reload refused")
        })
        .await,
        "stderr: {}",
        g.stderr()
    );
    assert!(
        g.stderr().contains("gateway.toml:2"),
        "the error names the file and line: {}",
        g.stderr()
    );
    let before = status(admin).await;
    assert_eq!(get_once(gw, "/slow/y", &[]).await.status, 200);
    let after = status(admin).await;
    assert_eq!(
        class_field(&after, "two", "arrivals") - class_field(&before, "two", "arrivals"),
        1.0
    );
}

#[test]
fn check_validates_and_names_file_line_and_key() {
    let path = temp_path("check.toml");
    std::fs::write(&path, "[[backend]]\nname = \"app\"\naddresses = [\"127.0.0.1:1\"]\n[[class]]\nname = \"a\"\nbackend = \"app\"\nmax_running = 0\n").unwrap();
    let p = path.to_string_lossy().to_string();
    let (code, _, err) = run_allot(&["gateway", "--config", &p, "--check"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "{p}:7: `class.a.max_running`: expected an integer ≥ 1, got 0"
        )),
        "{err}"
    );
    let ok = "[[backend]]\nname = \"app\"\naddresses = [\"127.0.0.1:1\"]\n[[class]]\nname = \"a\"\nbackend = \"app\"\n";
    std::fs::write(&path, ok).unwrap();
    let (code, out, err) = run_allot(&["gateway", "--config", &p, "--check"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn every_example_configuration_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = path.to_string_lossy().to_string();
            let (code, out, err) = run_allot(&["gateway", "--config", &p, "--check"], &[]);
            assert_eq!(code, 0, "{p}: {out}{err}");
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} examples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_requests_in_flight_finish() {
    let (_b, backend) = backend(16, 0, &[]);
    let (mut g, gw, admin, _) = gateway(&config(backend, "one"), &[], &[]);
    let slow = tokio::spawn(async move { get_once(gw, "/slow/sleep/1000", &[]).await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(admin).await, "one", "in_flight") == 1.0
        })
        .await
    );
    g.signal("TERM");
    let r = slow.await.unwrap();
    assert_eq!(
        r.status,
        200,
        "the request in flight finished: {}",
        r.text()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = g.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        tokio::net::TcpStream::connect(gw).await.is_err(),
        "no longer accepting"
    );
}

/// Waits (bounded) for the process to exit; returns its status and how long it took.
async fn exit_within(
    g: &mut Proc,
    limit: Duration,
) -> Option<(std::process::ExitStatus, Duration)> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Some(s) = g.child.try_wait().expect("wait") {
            return Some((s, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_never_appears_in_any_output() {
    let (_b, backend) = backend(4, 0, &[]);
    let in_file = "file-token-7f3a9c";
    let cfg = config(backend, "one").replace(
        "token_env = \"TEST_ALLOT_TOKEN\"",
        &format!("token = \"{in_file}\""),
    );
    let (g, gw, admin, path) = gateway(&cfg, &[], &[]);
    let config_json = get_once(admin, "/config", &[]).await.text();
    assert!(
        !config_json.contains(in_file),
        "GET /config shows the token: {config_json}"
    );
    assert!(config_json.contains("<redacted>"), "{config_json}");
    for endpoint in ["/status", "/metrics", "/rules", "/controllers"] {
        let text = get_once(admin, endpoint, &[]).await.text();
        assert!(!text.contains(in_file), "{endpoint} shows the token");
    }
    let a = admin.to_string();
    let (_, out, err) = run_allot(&["stat", "--admin", &a], &[]);
    assert!(
        !out.contains(in_file) && !err.contains(in_file),
        "allot stat shows it"
    );
    let p = path.to_string_lossy().to_string();
    let (_, out, err) = run_allot(&["gateway", "--config", &p, "--check"], &[]);
    assert!(
        !out.contains(in_file) && !err.contains(in_file),
        "--check shows it"
    );
    get_once(gw, "/x", &[]).await;
    g.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !g.stderr().contains(in_file),
        "the log shows it:\n{}",
        g.stderr()
    );

    // A missing token and a wrong one are told apart.
    let said = |(_, out, err): (i32, String, String)| format!("{out}{err}");
    let missing = said(ctl(admin, None, &["class", "one", "max_running=2"]));
    let wrong = said(ctl(
        admin,
        Some("guess"),
        &["class", "one", "max_running=2"],
    ));
    assert!(
        missing.contains("401") && wrong.contains("401"),
        "{missing} / {wrong}"
    );
    assert_ne!(
        missing, wrong,
        "the same message for a missing and a wrong token"
    );
    assert!(!wrong.contains(in_file) && !missing.contains(in_file));
    let (code, _, err) = ctl(admin, Some(in_file), &["class", "one", "max_running=2"]);
    assert_eq!(code, 0, "the right token is taken: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_renames_a_class_refuses_no_request() {
    let (_b, backend) = backend(64, 0, &[]);
    let named = |class: &str| {
        format!(
            "[listener]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
             [[backend]]\nname = \"app\"\naddresses = [\"{backend}\"]\n\
             [[class]]\nname = \"{class}\"\nbackend = \"app\"\n"
        )
    };
    let (g, gw, _admin, path) = gateway(&named("x0"), &[], &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let stop = std::sync::Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            let mut statuses = std::collections::BTreeMap::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = c.get("/r", &[]).await.map_or(0, |r| r.status);
                *statuses.entry(s).or_insert(0u64) += 1;
            }
            statuses
        }));
    }
    for i in 1..=40 {
        std::fs::write(&path, named(&format!("x{i}"))).expect("write config");
        g.signal("HUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = std::collections::BTreeMap::new();
    for c in clients {
        for (s, n) in c.await.expect("client") {
            *all.entry(s).or_insert(0u64) += n;
        }
    }
    assert!(all.get(&200).copied().unwrap_or(0) > 100, "{all:?}");
    assert_eq!(
        all.len(),
        1,
        "answers other than 200 across 40 reloads: {all:?}"
    );
    assert_eq!(
        g.stderr().matches("configuration reloaded").count(),
        40,
        "{}",
        g.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_right_after_the_listening_line_reloads_rather_than_kills() {
    let (_b, backend) = backend(4, 0, &[]);
    for _ in 0..10 {
        let (mut g, gw, _admin, _) = gateway(&config(backend, "one"), &[], &[]);
        g.signal("HUP");
        assert!(
            exit_within(&mut g, Duration::from_millis(300))
                .await
                .is_none(),
            "the gateway died of an early SIGHUP:\n{}",
            g.stderr()
        );
        assert_eq!(get_once(gw, "/x", &[]).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_the_configured_grace_then_says_it_stopped() {
    let (_b, backend) = backend(4, 0, &[]);
    let cfg =
        config(backend, "one").replace("[admin]", "[gateway]\nshutdown_grace_ms = 500\n[admin]");
    let (mut g, gw, admin, _) = gateway(&cfg, &[], &[]);
    // A request that would take 20 s: the grace cuts it short.
    let slow = tokio::spawn(async move {
        Client::connect(gw, None)
            .await
            .get("/slow/sleep/20000", &[])
            .await
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(admin).await, "one", "in_flight") == 1.0
        })
        .await
    );
    g.signal("TERM");
    let (exit, took) = exit_within(&mut g, Duration::from_secs(8))
        .await
        .expect("the gateway exits soon after its grace");
    assert!(exit.success(), "{exit:?}");
    assert!(
        took < Duration::from_secs(5),
        "it took {took:?} with a 500 ms grace"
    );
    assert!(
        g.stderr().contains("gateway stopped"),
        "no line says it stopped:\n{}",
        g.stderr()
    );
    let _ = slow.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_in_force_reads_as_toml_and_a_reload_names_what_it_replaces() {
    let (_b, backend) = backend(4, 0, &[]);
    let cfg = config(backend, "one").replace(
        "token_env = \"TEST_ALLOT_TOKEN\"",
        "token = \"toml-secret-1234\"",
    );
    let (g, _gw, admin, path) = gateway(&cfg, &[], &[]);
    let toml_text = get_once(admin, "/config?format=toml", &[]).await.text();
    assert!(!toml_text.contains("toml-secret-1234"), "{toml_text}");
    assert!(
        toml_text.contains("max_headers = 100"),
        "defaults are written out: {toml_text}"
    );
    // It is a valid configuration again (the secret aside).
    let reread = temp_path("reread.toml");
    std::fs::write(&reread, &toml_text).expect("write");
    let p = reread.to_string_lossy().to_string();
    let (code, _, err) = run_allot(&["gateway", "--config", &p, "--check"], &[]);
    assert_eq!(code, 0, "{err}");
    // --check --print shows the same, never the secret.
    let f = path.to_string_lossy().to_string();
    let (code, out, _) = run_allot(&["gateway", "--config", &f, "--check", "--print"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("[[class]]") && out.contains("max_wait_ms = 10000"),
        "{out}"
    );
    assert!(!out.contains("toml-secret-1234"), "{out}");

    // A run-time change, then a reload of the unchanged file: the log names the change
    // the file replaces.
    let (code, _, err) = ctl(
        admin,
        Some("toml-secret-1234"),
        &["class", "one", "max_running=3"],
    );
    assert_eq!(code, 0, "{err}");
    g.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || async {
            g.stderr()
                .contains("a run-time change is replaced by the file")
        })
        .await,
        "{}",
        g.stderr()
    );
    assert!(
        g.stderr().contains("class.one.max_running"),
        "{}",
        g.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_admin_flags_override_the_files_addresses() {
    let (_b, backend) = backend(4, 0, &[]);
    let path = temp_path("fixed.toml");
    std::fs::write(
        &path,
        config(backend, "one").replace("address = \"127.0.0.1:0\"", "address = \"127.0.0.1:1\""),
    )
    .expect("write");
    let p = path.to_string_lossy().to_string();
    let g = spawn_allot(
        &[
            "gateway",
            "--config",
            &p,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &[],
    );
    let (gw, admin) = (g.addr("gateway"), g.addr("admin"));
    assert_ne!(gw.port(), 1);
    assert_ne!(admin.port(), 1);
    assert_eq!(get_once(gw, "/x", &[]).await.status, 200);
    assert_eq!(get_once(admin, "/status", &[]).await.status, 200);
}
