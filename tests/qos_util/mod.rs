//! Load generators and readers shared by the QoS tests (`tests/qos_*.rs`): closed-loop
//! clients, open-loop arrivals at a rate that can change while running, the gateway's
//! `/controllers` readouts, and CSV output for `bench/controllers.sh`.
#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::common::{get_once, Client};

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it finished.
    pub done: Instant,
    /// How long it took, as the client saw it.
    pub latency: Duration,
    /// HTTP status, 0 when the connection failed.
    pub status: u16,
}

/// Samples collected by generators, shared.
pub type Samples = Arc<Mutex<Vec<Sample>>>;

pub fn samples() -> Samples {
    Arc::new(Mutex::new(Vec::new()))
}

/// `clients` keep-alive clients, each sending the next GET as soon as the last ends,
/// until `stop` is set.
pub fn closed_loop(
    target: SocketAddr,
    clients: usize,
    path: &'static str,
    stop: Arc<AtomicBool>,
    out: Samples,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (stop, out) = (Arc::clone(&stop), Arc::clone(&out));
            tokio::spawn(async move {
                let mut client = None;
                while !stop.load(Relaxed) {
                    if client.is_none() {
                        client = Some(Client::connect(target, None).await);
                    }
                    let Some(c) = client.as_mut() else { continue };
                    let start = Instant::now();
                    let reply = c.get(path, &[]).await;
                    let status = reply.as_ref().map_or(0, |r| r.status);
                    if reply.is_none() || status == 503 {
                        client = None; // reconnect: the gateway may close on refusals
                    }
                    out.lock().unwrap().push(Sample {
                        done: Instant::now(),
                        latency: start.elapsed(),
                        status,
                    });
                    if status == 503 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect()
}

/// A rate in requests per second that a generator reads before each arrival.
#[derive(Clone)]
pub struct Rate(Arc<AtomicU64>);

impl Rate {
    pub fn new(per_sec: f64) -> Rate {
        Rate(Arc::new(AtomicU64::new(per_sec.to_bits())))
    }
    pub fn set(&self, per_sec: f64) {
        self.0.store(per_sec.to_bits(), Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Open-loop arrivals: one GET on a fresh connection every 1/rate seconds (evenly
/// spaced, with a little jitter), each in its own task, until `stop` is set.
pub fn open_loop(
    target: SocketAddr,
    rate: Rate,
    path: &'static str,
    stop: Arc<AtomicBool>,
    out: Samples,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = Instant::now();
        while !stop.load(Relaxed) {
            let r = rate.get().max(0.1);
            let jitter = 0.5 + rand::random::<f64>();
            next += Duration::from_secs_f64(jitter / r);
            tokio::time::sleep_until(next).await;
            let out = Arc::clone(&out);
            tokio::spawn(async move {
                let start = Instant::now();
                let status = tokio::time::timeout(Duration::from_secs(20), async {
                    let mut c = Client::connect(target, None).await;
                    c.get(path, &[]).await.map_or(0, |r| r.status)
                })
                .await
                .unwrap_or_default();
                out.lock().unwrap().push(Sample {
                    done: Instant::now(),
                    latency: start.elapsed(),
                    status,
                });
            });
        }
    })
}

/// Successful responses per second finishing in `[from, to)`.
pub fn goodput(s: &Samples, from: Instant, to: Instant) -> f64 {
    let n = s
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.status == 200 && x.done >= from && x.done < to)
        .count();
    n as f64 / (to - from).as_secs_f64()
}

/// The `q` quantile of successful requests' latency finishing in `[from, to)`, ms.
pub fn latency_quantile_ms(s: &Samples, from: Instant, to: Instant, q: f64) -> f64 {
    let mut v: Vec<f64> = s
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.status == 200 && x.done >= from && x.done < to)
        .map(|x| x.latency.as_secs_f64() * 1e3)
        .collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The gateway's `/controllers` readouts.
pub async fn controllers(admin: SocketAddr) -> serde_json::Value {
    let r = get_once(admin, "/controllers", &[]).await;
    serde_json::from_slice(&r.body).expect("controllers JSON")
}

fn pair(list: &serde_json::Value, key: &str) -> Option<f64> {
    list.as_array()?
        .iter()
        .find(|p| p[0] == key)
        .and_then(|p| p[1].as_f64())
}

/// One controller's readout.
pub fn readout<'a>(all: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    all.as_array()
        .and_then(|v| v.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no controller {name} in {all}"))
}

/// An output of a controller's readout (`limit`, `divert`, `rate_per_sec:basic`).
pub fn output(r: &serde_json::Value, knob: &str) -> Option<f64> {
    pair(&r["outputs"], knob)
}

/// A state variable of a controller's readout.
pub fn state(r: &serde_json::Value, var: &str) -> Option<f64> {
    pair(&r["state"], var)
}

/// A write to the admin API with the test token; returns (status, body).
pub async fn admin_write(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut c = Client::connect(admin, None).await;
    let r = c
        .send(
            method,
            path,
            &[
                ("authorization", "Bearer qos-test"),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        )
        .await
        .expect("admin reply");
    (r.status, r.text())
}

/// Rows of a time series, written as CSV into `$ALLOT_QOS_CSV_DIR/<name>.csv` when that
/// variable is set (by `bench/controllers.sh`); otherwise kept in memory only.
pub struct Series {
    name: String,
    header: String,
    rows: Vec<String>,
}

impl Series {
    pub fn new(name: &str, header: &str) -> Series {
        Series {
            name: name.into(),
            header: header.into(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, values: &[f64]) {
        self.rows.push(
            values
                .iter()
                .map(|v| {
                    if v.is_finite() {
                        format!("{v:.4}")
                    } else {
                        String::new()
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        );
    }

    pub fn write(&self) {
        if let Ok(dir) = std::env::var("ALLOT_QOS_CSV_DIR") {
            let _ = std::fs::create_dir_all(&dir);
            let text = format!("{}\n{}\n", self.header, self.rows.join("\n"));
            let path = std::path::Path::new(&dir).join(format!("{}.csv", self.name));
            std::fs::write(&path, text).expect("write CSV");
        }
    }
}
