//! Shared pieces of the end-to-end tests: start the real binary (gateway, synthetic back
//! ends) on ports chosen at run time, talk HTTP to it, read its admin API.
#![allow(dead_code)] // each test file uses a different subset

pub mod nats;
pub mod prometheus;
pub mod raw;
pub mod switch;
pub mod tcp;
pub mod tools;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    /// Addresses from its `listening k=v …` line.
    pub addrs: Vec<(String, SocketAddr)>,
    /// Where its standard error goes.
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {key} address in {:?}", self.addrs))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh path under the system temporary directory.
pub fn temp_path(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("allot-test-{}-{n}-{name}", std::process::id()))
}

/// The binary under test: this build's, or the one `ALLOT_BIN` names (to check that a
/// regression test fails on an older build).
pub fn allot_bin() -> PathBuf {
    std::env::var_os("ALLOT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_allot")))
}

/// Starts `allot ARGS…` and waits (bounded) for its `listening` line on stdout.
pub fn spawn_allot(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(allot_bin());
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    spawn_listening(cmd, &format!("allot {args:?}"))
}

/// Runs `sh -c SCRIPT` (which must exec allot) and waits for its `listening` line.
pub fn spawn_shell(script: &str) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    spawn_listening(cmd, script)
}

/// Starts `cmd` and waits (bounded) for its `listening k=v …` line on stdout.
pub fn spawn_listening(mut cmd: Command, what: &str) -> Proc {
    let stderr_path = temp_path("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("create stderr log");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = cmd.spawn().expect("start allot");
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {} // keep draining so the child never blocks on stdout
    });
    let mut proc = Proc {
        child,
        addrs: Vec::new(),
        stderr_path,
    };
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => panic!(
            "{what} did not say where it listens; stderr:\n{}",
            proc.stderr()
        ),
    };
    let rest = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    proc.addrs = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().expect("address")))
        .collect();
    proc
}

/// A synthetic back end: `allot backend --workers W --service-ms S [extra…]`.
pub fn backend(workers: usize, service_ms: u64, extra: &[&str]) -> (Proc, SocketAddr) {
    let w = workers.to_string();
    let s = service_ms.to_string();
    let mut args = vec!["backend", "--workers", &w, "--service-ms", &s];
    args.extend_from_slice(extra);
    let p = spawn_allot(&args, &[]);
    let a = p.addr("backend");
    (p, a)
}

/// A gateway on `config` (written to a temporary file). Returns it, its client address,
/// its admin address and the config path.
pub fn gateway(
    config: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, SocketAddr, SocketAddr, PathBuf) {
    let path = temp_path("gateway.toml");
    std::fs::write(&path, config).expect("write config");
    let p = path.to_string_lossy().to_string();
    let mut args = vec!["gateway", "--config", &p];
    args.extend_from_slice(extra);
    let proc = spawn_allot(&args, envs);
    let (g, a) = (proc.addr("gateway"), proc.addr("admin"));
    (proc, g, a, path)
}

/// One response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client connection, optionally from a chosen source address.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(target: SocketAddr, source: Option<IpAddr>) -> Client {
        Client::try_connect(target, source)
            .await
            .expect("connect in time")
    }

    /// [`Client::connect`], or `None` when the target refuses or does not answer in 5 s
    /// (a load generator's client to a gateway that was killed).
    pub async fn try_connect(target: SocketAddr, source: Option<IpAddr>) -> Option<Client> {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("socket");
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
        }
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
            .await
            .ok()?
            .ok()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(Client { sender })
    }

    /// Sends one request and reads the whole answer; `None` if the connection broke.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<Reply> {
        self.sender.ready().await.ok()?;
        let mut req = http::Request::builder().method(method).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", "test");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.sender.send_request(req))
            .await
            .ok()?
            .ok()?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Option<Reply> {
        self.send("GET", path, headers, b"").await
    }
}

/// One GET on a fresh connection.
pub async fn get_once(target: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    Client::connect(target, None)
        .await
        .get(path, headers)
        .await
        .expect("a response")
}

/// The one-server agreement set (the paper's check) as `[agreements]` tables, to put in
/// a configuration after `[agreements]`: `owner` owns `capacity` units per second and
/// guarantees principal A 20% and B 80% of them; either may use all of what the other
/// leaves.
pub fn one_server_agreements(owner: &str, capacity: u32) -> String {
    format!(
        r#"[[agreements.principal]]
name = "{owner}"
capacity = {capacity}
[[agreements.principal]]
name = "A"
capacity = 0
[[agreements.principal]]
name = "B"
capacity = 0
[[agreements.agreement]]
from = "{owner}"
to = "A"
share = [0.2, 1.0]
[[agreements.agreement]]
from = "{owner}"
to = "B"
share = [0.8, 1.0]"#
    )
}

/// The gateway's `/status` as JSON.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let r = get_once(admin, "/status", &[]).await;
    serde_json::from_slice(&r.body).expect("status JSON")
}

/// A class's counter from `/status`.
pub fn class_field(status: &serde_json::Value, class: &str, field: &str) -> f64 {
    status["classes"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == class))
        .and_then(|c| c[field].as_f64())
        .unwrap_or_else(|| panic!("no {class}.{field} in status"))
}

/// Mean queueing delay of a class, in ms, from `/status`.
pub fn class_mean_delay_ms(status: &serde_json::Value, class: &str) -> f64 {
    let c = status["classes"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == class))
        .expect("class in status");
    let count: f64 = c["queue_delay"]["counts"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_f64()).sum())
        .unwrap_or(0.0);
    let sum_ns = c["queue_delay"]["sum_ns"].as_f64().unwrap_or(0.0);
    if count == 0.0 {
        0.0
    } else {
        sum_ns / count / 1e6
    }
}

/// The synthetic back end's counters.
pub async fn backend_stats(backend: SocketAddr) -> serde_json::Value {
    let r = get_once(backend, "/__stats", &[]).await;
    serde_json::from_slice(&r.body).expect("backend stats JSON")
}

/// The synthetic back end's requests per closed window of the wall clock (its
/// `/__windows`): (window number `unix_ms / window_ms`, requests served in it), oldest
/// first, windows with none left out.
pub async fn backend_windows(backend: SocketAddr) -> Vec<(u64, u64)> {
    let r = get_once(backend, "/__windows", &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("backend windows JSON");
    v["windows"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|p| Some((p[0].as_u64()?, p[1].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Runs `allot ARGS…` to completion and returns (exit code, stdout, stderr).
pub fn run_allot(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(allot_bin());
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run allot");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
