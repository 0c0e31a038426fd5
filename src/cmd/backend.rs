//! `allot backend`: a synthetic HTTP back end for the demo, tests and benchmarks.
//!
//! It behaves like a server with a fixed number of workers: at most `--workers` requests
//! are served at once (the rest wait, as in a listen queue), each takes `--service-ms`
//! plus `--ms-per-kib` per KiB of response. It counts what it sees, so tests can check
//! from the outside what the gateway let through.
//!
//! Paths (any prefix allowed, so tests can classify by it): `…/bytes/<n>` answers n bytes;
//! `…/sleep/<ms>` waits that long first; `/echo`
//! streams the request body back; `/headers` answers the request headers as JSON;
//! `/__stats` answers `{"requests", "max_concurrent", "concurrent"}` and is not counted;
//! `/__windows` answers the requests served per window (below) and is not counted;
//! anything else answers `ok <path>`.
//!
//! Per-window counts: every request served is also counted in its window of
//! `--window-ms` (default 100 ms) of the wall clock, window number `unix_ms / window_ms`
//! (the numbering the gateways' agreement windows use), at the moment a worker starts
//! serving it. The counts live in a ring of [`WINDOW_RING`] windows (one atomic word
//! each: the window's number and its count), so the last 25.6 s (at 100 ms) can be read
//! back: `/__windows` answers `{"window_ms": 100, "current": W, "windows": [[w, n], …]}`,
//! the closed windows still in the ring with at least one request, oldest first (`w` the
//! window number, `n` requests served in it; `current` is still open and left out). An
//! experiment reads it every few seconds to measure what reached the back end per window,
//! rather than what the gateways say they admitted.
//!
//! Two overload modes for the QoS tests: `--overload-after N --overload-factor F` makes
//! the service time grow super-linearly past N concurrent requests
//! (`service_ms · (1 + F·((c − N)/N)²)` for `c > N` at the request's start), so goodput
//! collapses as concurrency grows; `--cpu-ms X` burns X ms of the serving thread's CPU
//! time per request (a CPU-bound server; run a second one with a smaller X as its cheap
//! "degraded" variant).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Flags of `allot backend`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks one; the line `listening backend=ADDR` says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Requests served at once; more wait.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Fixed time per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub service_ms: u64,
    /// Extra time per KiB of response, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub ms_per_kib: f64,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Concurrency past which the service time grows super-linearly (0: never).
    #[arg(long, default_value_t = 0)]
    pub overload_after: u64,
    /// How steeply it grows past `--overload-after`.
    #[arg(long, default_value_t = 2.0)]
    pub overload_factor: f64,
    /// CPU time burnt per request, in milliseconds of the serving thread's CPU.
    #[arg(long, default_value_t = 0.0)]
    pub cpu_ms: f64,
    /// Length of the windows requests are counted in for `/__windows`, in milliseconds
    /// (numbered `unix_ms / window_ms`).
    #[arg(long, default_value_t = 100)]
    pub window_ms: u64,
}

/// Windows kept by the per-window count (256: 25.6 s at 100 ms).
pub const WINDOW_RING: usize = 256;
/// Bits of a ring slot that hold the count; the window's number is in the bits above.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Requests served per window of the wall clock, the last [`WINDOW_RING`] windows: slot
/// `w % WINDOW_RING` holds window `w`'s number (above [`COUNT_BITS`] bits, modulo
/// 2^40) and its count (below, saturating at 2^24 − 1), in one word so that a slot is
/// reset and counted without a lock.
#[derive(Debug)]
pub struct WindowCounts {
    slots: Vec<AtomicU64>,
}

impl Default for WindowCounts {
    fn default() -> WindowCounts {
        WindowCounts {
            slots: (0..WINDOW_RING).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl WindowCounts {
    fn tag(window: u64) -> u64 {
        window & ((1 << (64 - COUNT_BITS)) - 1)
    }

    /// Counts one request in window `window` (a window number).
    pub fn count(&self, window: u64) {
        let slot = &self.slots[(window % WINDOW_RING as u64) as usize];
        let tag = Self::tag(window);
        let mut old = slot.load(SeqCst);
        loop {
            let new = if old >> COUNT_BITS == tag {
                if old & COUNT_MASK == COUNT_MASK {
                    return; // saturated
                }
                old + 1
            } else {
                (tag << COUNT_BITS) | 1
            };
            match slot.compare_exchange_weak(old, new, SeqCst, SeqCst) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }

    /// Requests counted in window `window`, if it is still in the ring (0 if none came).
    pub fn get(&self, window: u64) -> u64 {
        let v = self.slots[(window % WINDOW_RING as u64) as usize].load(SeqCst);
        if v >> COUNT_BITS == Self::tag(window) {
            v & COUNT_MASK
        } else {
            0
        }
    }

    /// The windows before `current` still in the ring that counted a request, oldest
    /// first: (window number, requests).
    pub fn closed(&self, current: u64) -> Vec<(u64, u64)> {
        let first = current.saturating_sub(WINDOW_RING as u64 - 1);
        (first..current)
            .map(|w| (w, self.get(w)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// The wall clock's window number for windows of `window_ms` milliseconds.
fn window_now(window_ms: u64) -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    ms / window_ms.max(1)
}

/// What the back end counts.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests served (excluding `/__stats`).
    pub requests: AtomicU64,
    /// Requests being served now.
    pub concurrent: AtomicU64,
    /// Most requests ever served at once.
    pub max_concurrent: AtomicU64,
    /// Requests served per window of the wall clock (`/__windows`).
    pub windows: WindowCounts,
}

/// Runs the back end until killed.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime(Some(args.threads))?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen).await?;
        println!("listening backend={}", listener.local_addr()?);
        serve(listener, args, Arc::new(Counters::default())).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Serves on `listener` forever (spawn it; drop the task to stop).
pub async fn serve(listener: TcpListener, args: Args, counters: Arc<Counters>) {
    let workers = Arc::new(Semaphore::new(args.workers.max(1)));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (workers, counters, args) = (Arc::clone(&workers), Arc::clone(&counters), args.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                handle(
                    req,
                    Arc::clone(&workers),
                    Arc::clone(&counters),
                    args.clone(),
                )
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn handle(
    req: Request<Incoming>,
    workers: Arc<Semaphore>,
    counters: Arc<Counters>,
    args: Args,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/__stats" {
        let body = format!(
            "{{\"requests\":{},\"max_concurrent\":{},\"concurrent\":{}}}",
            counters.requests.load(SeqCst),
            counters.max_concurrent.load(SeqCst),
            counters.concurrent.load(SeqCst)
        );
        return Ok(Response::new(full(body)));
    }
    if path == "/__windows" {
        let current = window_now(args.window_ms);
        let list = counters
            .windows
            .closed(current)
            .iter()
            .map(|(w, n)| format!("[{w},{n}]"))
            .collect::<Vec<_>>()
            .join(",");
        let body = format!(
            "{{\"window_ms\":{},\"current\":{current},\"windows\":[{list}]}}",
            args.window_ms.max(1)
        );
        return Ok(Response::new(full(body)));
    }
    let Ok(_worker) = workers.acquire().await else {
        return Ok(Response::new(full("closing")));
    };
    counters.requests.fetch_add(1, SeqCst);
    counters.windows.count(window_now(args.window_ms));
    let now = counters.concurrent.fetch_add(1, SeqCst) + 1;
    counters.max_concurrent.fetch_max(now, SeqCst);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (body, extra_ms): (Body, u64) = match segments.as_slice() {
        [.., "bytes", n] => {
            let n: usize = n.parse().unwrap_or(0).min(64 << 20);
            let ms = (n as f64 / 1024.0 * args.ms_per_kib) as u64;
            (full(vec![b'x'; n]), ms)
        }
        [.., "sleep", ms] => (full(format!("slept {ms}\n")), ms.parse().unwrap_or(0)),
        ["echo"] => (req.into_body().boxed(), 0),
        ["headers"] => {
            let map: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
                    )
                })
                .collect();
            (full(serde_json::Value::Object(map).to_string()), 0)
        }
        _ => (full(format!("ok {path}\n")), 0),
    };
    let mut wait_ms = (args.service_ms + extra_ms) as f64;
    if args.overload_after > 0 && now > args.overload_after {
        let knee = args.overload_after as f64;
        let excess = (now as f64 - knee) / knee;
        wait_ms *= 1.0 + args.overload_factor.max(0.0) * excess * excess;
    }
    if args.cpu_ms > 0.0 {
        burn_cpu(Duration::from_secs_f64(args.cpu_ms / 1e3));
    }
    if wait_ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait_ms / 1e3)).await;
    }
    counters.concurrent.fetch_sub(1, SeqCst);
    Ok(Response::new(body))
}

/// Spins until this thread has used `cpu` of CPU time (not wall time: on a busy machine
/// each request still costs the same CPU).
fn burn_cpu(cpu: Duration) {
    use nix::time::{clock_gettime, ClockId};
    let thread_ns = || {
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(|t| Duration::from(t).as_nanos())
            .ok()
    };
    let Some(start) = thread_ns() else {
        return;
    };
    let goal = start + cpu.as_nanos();
    let mut x = 0u64;
    while thread_ns().is_some_and(|now| now < goal) {
        for i in 0..1000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_window_counts_its_own_requests_and_a_reused_slot_starts_at_zero() {
        let c = WindowCounts::default();
        let w = 17_000_000_000u64;
        c.count(w);
        c.count(w);
        c.count(w + 1);
        assert_eq!(c.get(w), 2);
        assert_eq!(c.get(w + 1), 1);
        assert_eq!(c.closed(w + 2), vec![(w, 2), (w + 1, 1)]);
        // A whole ring later the slot is another window's: counted afresh.
        let later = w + WINDOW_RING as u64;
        c.count(later);
        assert_eq!(c.get(later), 1);
        assert_eq!(c.get(w), 0);
        assert_eq!(c.closed(later + 1), vec![(later, 1)]);
    }
}
