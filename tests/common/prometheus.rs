//! A real Prometheus of the test's own, scraping one target every second, and its query
//! API. Killed (and its data removed) when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, temp_path, tools, Client};

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    /// Its web (query API) address.
    pub web: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts one that scrapes `target`'s `/metrics` every second, and waits (up to 30 s)
    /// until its web address answers.
    pub async fn start(tag: &str, target: SocketAddr) -> Prometheus {
        let binary = tools::ensure("prometheus", "prometheus");
        let dir = temp_path(tag);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let web = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: allot\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("log")).expect("log");
        let child = Command::new(&binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, web, dir };
        assert!(
            eventually(Duration::from_secs(30), || async {
                tokio::net::TcpStream::connect(web).await.is_ok()
            })
            .await,
            "prometheus did not start: {}",
            p.log()
        );
        p
    }

    /// What it wrote to standard error.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The answer to an instant query: the whole JSON document, `Null` when there was no
    /// 200 answer or it was not JSON.
    pub async fn query(&self, query: &str) -> serde_json::Value {
        let url = format!("/api/v1/query?query={}", urlencode(query));
        let mut c = Client::connect(self.web, None).await;
        match c.get(&url, &[("host", "prometheus")]).await {
            Some(r) if r.status == 200 => serde_json::from_slice(&r.body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
