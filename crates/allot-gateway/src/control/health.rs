//! Active health checks: one loop per back end with a `health_check`, which every period
//! checks each of its addresses (an HTTP GET of `path`, or a TCP connect) and feeds the
//! outcome to the back end, which takes an address out after `fall` failures in a row and
//! brings it back after `rise` successes (logging each change once). It follows the
//! configuration in force: the back end's addresses and settings are read each period.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::HealthCheckConfig;
use crate::runtime::Live;

/// Checks the back end named `backend` while it has a health check, every interval.
pub(crate) async fn run(live: Weak<Live>, backend: String) {
    loop {
        let Some(config) = live.upgrade().and_then(|l| {
            l.load()
                .config
                .backends()
                .find(|b| b.name == backend)
                .and_then(|b| b.health_check.clone())
        }) else {
            return; // gone, or no longer checked: the supervisor starts it again if needed
        };
        tokio::time::sleep(Duration::from_millis(config.interval_ms)).await;
        let Some(l) = live.upgrade() else {
            return;
        };
        let rt = l.load();
        let Some(b) = rt.backend(&backend) else {
            continue;
        };
        let addresses = b.checked_addresses();
        let mut checks = tokio::task::JoinSet::new();
        for (i, addr) in addresses.iter().enumerate() {
            let (addr, config) = (*addr, config.clone());
            checks.spawn(async move { (i, check(addr, &config).await) });
        }
        let mut outcomes: Vec<Result<(), String>> = addresses
            .iter()
            .map(|_| Err("not checked".into()))
            .collect();
        while let Some(done) = checks.join_next().await {
            if let Ok((i, outcome)) = done {
                outcomes[i] = outcome;
            }
        }
        for (addr, ok) in addresses.into_iter().zip(outcomes) {
            b.check_result(addr, ok, config.rise, config.fall);
        }
    }
}

/// One check of `addr`: a TCP connect, then with a `path` an HTTP GET whose status must
/// be 2xx or 3xx; all within the timeout.
async fn check(addr: SocketAddr, c: &HealthCheckConfig) -> Result<(), String> {
    let timeout = Duration::from_millis(c.timeout_ms);
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let Some(path) = &c.path else {
            return Ok(());
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: allot-health-check\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            let n = s.read(&mut head[got..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before answering".into());
            }
            got += n;
        }
        let line = String::from_utf8_lossy(&head[..got]);
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                format!(
                    "not an HTTP answer: {:?}",
                    line.lines().next().unwrap_or("")
                )
            })?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", c.timeout_ms)),
    }
}
