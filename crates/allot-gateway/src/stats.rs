//! Sensors: counters, gauges and latency histograms per class and per back end.
//!
//! One source of truth read three ways: `/metrics` (Prometheus text, through a
//! [`prometheus_client`] collector), `/status` (JSON snapshots) and the demo's table
//! (differences of snapshots).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the latency buckets, in seconds: 100 µs doubling up to about 105 s.
pub fn bucket_bounds_s() -> [f64; BUCKETS] {
    let mut b = [0.0; BUCKETS];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = bound_ns(i) as f64 / 1e9;
    }
    b
}

/// Upper bound of bucket `i`, in nanoseconds.
fn bound_ns(i: usize) -> u64 {
    FIRST_BOUND_NS << i
}

/// Number of finite latency buckets.
pub const BUCKETS: usize = 21;

/// The first bucket's upper bound, in nanoseconds.
const FIRST_BOUND_NS: u64 = 100_000;

/// The bucket of an observation of `ns` nanoseconds: the smallest `i` with
/// `ns ≤ 100 µs · 2^i`, or [`BUCKETS`] (+Inf) past the last bound. No float, no search.
fn bucket_of(ns: u64) -> usize {
    let q = ns.div_ceil(FIRST_BOUND_NS).max(1);
    let i = (u64::BITS - (q - 1).leading_zeros()) as usize;
    i.min(BUCKETS)
}

/// A latency histogram updated without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// A copy of the current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Relaxed),
            bounds_s: bucket_bounds_s().to_vec(),
        }
    }
}

/// Counts of a [`Histogram`] at one moment; differences give a window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramSnapshot {
    /// Per-bucket counts (not cumulative); the last bucket is +Inf.
    pub counts: Vec<u64>,
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: u64,
    /// The buckets' upper bounds, in seconds (the last bucket, past them, is +Inf).
    #[serde(default)]
    pub bounds_s: Vec<f64>,
}

impl HistogramSnapshot {
    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Mean, in milliseconds (0 when empty).
    pub fn mean_ms(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum_ns as f64 / n as f64 / 1e6,
        }
    }

    /// The `q` quantile in milliseconds, interpolated inside its bucket (0 when empty).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let bounds = bucket_bounds_s();
        let rank = (q.clamp(0.0, 1.0) * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            if seen + c >= rank {
                let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
                let hi = bounds.get(i).copied().unwrap_or(lo * 2.0);
                let within = (rank - seen) as f64 / c as f64;
                return (lo + (hi - lo) * within) * 1e3;
            }
            seen += c;
        }
        bounds[BUCKETS - 1] * 1e3
    }

    /// `self − earlier`, bucket by bucket.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            bounds_s: self.bounds_s.clone(),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The class queue was at its limit.
    QueueFull,
    /// The request waited `max_wait` without being served.
    Timeout,
    /// The accept-rate actuator had no token.
    Rate,
    /// The principal's agreement quota was spent.
    Quota,
    /// An FTP data connection came from another address than its control connection's
    /// client.
    Address,
}

impl RefuseReason {
    /// All reasons, in metric order.
    pub const ALL: [RefuseReason; 5] = [
        RefuseReason::QueueFull,
        RefuseReason::Timeout,
        RefuseReason::Rate,
        RefuseReason::Quota,
        RefuseReason::Address,
    ];

    /// The label value and the word in a 503 body.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::QueueFull => "queue_full",
            RefuseReason::Timeout => "timeout",
            RefuseReason::Rate => "rate",
            RefuseReason::Quota => "quota",
            RefuseReason::Address => "address",
        }
    }
}

/// Why a request in service was cut off before its response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The client paused its request body past `listener.request_body_timeout_ms`.
    RequestBodyTimeout,
    /// The client's request body was malformed or cut short.
    RequestBodyBroken,
    /// The client left the response unread past `listener.send_timeout_ms`.
    ClientSendTimeout,
    /// The back end paused its response body past `backend.body_timeout_ms`.
    BackendBodyTimeout,
    /// The back end broke off its response body.
    BackendBodyBroken,
    /// The request took longer than its class's `request_timeout_ms`.
    RequestTimeout,
    /// The client went away before the response ended.
    ClientGone,
}

impl AbortReason {
    /// All reasons, in metric order.
    pub const ALL: [AbortReason; 7] = [
        AbortReason::RequestBodyTimeout,
        AbortReason::RequestBodyBroken,
        AbortReason::ClientSendTimeout,
        AbortReason::BackendBodyTimeout,
        AbortReason::BackendBodyBroken,
        AbortReason::RequestTimeout,
        AbortReason::ClientGone,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AbortReason::RequestBodyTimeout => "request_body_timeout",
            AbortReason::RequestBodyBroken => "request_body_broken",
            AbortReason::ClientSendTimeout => "client_send_timeout",
            AbortReason::BackendBodyTimeout => "backend_body_timeout",
            AbortReason::BackendBodyBroken => "backend_body_broken",
            AbortReason::RequestTimeout => "request_timeout",
            AbortReason::ClientGone => "client_gone",
        }
    }
}

/// How a TCP connection in service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished; the client closed first.
    ClientClosed,
    /// Both sides finished; the server closed first.
    ServerClosed,
    /// No byte either way for the listener's `idle_timeout_ms`.
    IdleTimeout,
    /// The class's `request_timeout_ms` passed.
    Timeout,
    /// No back-end address accepted the connection.
    ConnectFailed,
    /// A socket error (a reset) on either side.
    Error,
    /// The gateway stopped.
    Shutdown,
}

impl CloseReason {
    /// All reasons, in metric order.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::ClientClosed,
        CloseReason::ServerClosed,
        CloseReason::IdleTimeout,
        CloseReason::Timeout,
        CloseReason::ConnectFailed,
        CloseReason::Error,
        CloseReason::Shutdown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ServerClosed => "server_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Timeout => "timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Sensors of one class.
#[derive(Debug, Default)]
pub struct ClassStats {
    /// Requests classified into the class.
    pub arrivals: AtomicU64,
    /// Requests sent on to service.
    pub admitted: AtomicU64,
    /// Requests refused, by [`RefuseReason`] (indexed as [`RefuseReason::ALL`]).
    pub refused: [AtomicU64; 5],
    /// Requests waiting now.
    pub queued: AtomicI64,
    /// Requests in service now.
    pub in_flight: AtomicI64,
    /// Time from classification to service.
    pub queue_delay: Histogram,
    /// Time from service start to the end of the response body.
    pub service_time: Histogram,
    /// Request body bytes received.
    pub bytes_in: AtomicU64,
    /// Response body bytes sent.
    pub bytes_out: AtomicU64,
    /// Responses with status ≥ 500 produced by the gateway for back-end failures.
    pub failed: AtomicU64,
    /// Requests cut off in service, by [`AbortReason`] (indexed as [`AbortReason::ALL`]).
    pub aborted: [AtomicU64; 7],
    /// TCP connections that ended after admission, by [`CloseReason`] (indexed as
    /// [`CloseReason::ALL`]).
    pub closed: [AtomicU64; 7],
}

impl ClassStats {
    /// Counts one refusal.
    pub fn refuse(&self, reason: RefuseReason) {
        self.refused[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one request cut off in service.
    pub fn abort(&self, reason: AbortReason) {
        self.aborted[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one TCP connection that ended.
    pub fn close(&self, reason: CloseReason) {
        self.closed[reason as usize].fetch_add(1, Relaxed);
    }

    /// A serialisable copy.
    pub fn snapshot(&self, name: &str) -> ClassSnapshot {
        ClassSnapshot {
            name: name.to_string(),
            arrivals: self.arrivals.load(Relaxed),
            admitted: self.admitted.load(Relaxed),
            refused_queue_full: self.refused[0].load(Relaxed),
            refused_timeout: self.refused[1].load(Relaxed),
            refused_rate: self.refused[2].load(Relaxed),
            refused_quota: self.refused[3].load(Relaxed),
            refused_address: self.refused[4].load(Relaxed),
            queued: self.queued.load(Relaxed).max(0) as u64,
            in_flight: self.in_flight.load(Relaxed).max(0) as u64,
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            failed: self.failed.load(Relaxed),
            aborted: AbortReason::ALL
                .iter()
                .map(|r| {
                    (
                        r.as_str().to_string(),
                        self.aborted[*r as usize].load(Relaxed),
                    )
                })
                .collect(),
            closed: CloseReason::ALL
                .iter()
                .map(|r| {
                    (
                        r.as_str().to_string(),
                        self.closed[*r as usize].load(Relaxed),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            queue_delay: self.queue_delay.snapshot(),
            service_time: self.service_time.snapshot(),
        }
    }
}

/// A class's sensors at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClassSnapshot {
    /// Class name.
    pub name: String,
    /// Requests classified into the class.
    pub arrivals: u64,
    /// Requests sent on to service.
    pub admitted: u64,
    /// Refused: queue at its limit.
    pub refused_queue_full: u64,
    /// Refused: waited `max_wait`.
    pub refused_timeout: u64,
    /// Refused: accept rate.
    pub refused_rate: u64,
    /// Refused: agreement quota.
    pub refused_quota: u64,
    /// Refused: an FTP data connection from another address.
    #[serde(default)]
    pub refused_address: u64,
    /// Waiting now.
    pub queued: u64,
    /// In service now.
    pub in_flight: u64,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// 502/504 answers for back-end failures.
    pub failed: u64,
    /// Requests cut off in service, by reason (`request_body_timeout`, …).
    #[serde(default)]
    pub aborted: std::collections::BTreeMap<String, u64>,
    /// TCP connections that ended, by reason (`client_closed`, …); reasons never seen are
    /// left out.
    #[serde(default)]
    pub closed: std::collections::BTreeMap<String, u64>,
    /// Queueing delay histogram.
    pub queue_delay: HistogramSnapshot,
    /// Service time histogram.
    pub service_time: HistogramSnapshot,
}

impl ClassSnapshot {
    /// All refusals together.
    pub fn refused(&self) -> u64 {
        self.refused_queue_full
            + self.refused_timeout
            + self.refused_rate
            + self.refused_quota
            + self.refused_address
    }
}

/// Why a back end failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendFailure {
    /// No connection could be opened.
    Connect,
    /// No response head within the response timeout.
    Timeout,
    /// The connection broke during the exchange.
    Protocol,
    /// The response body paused past `body_timeout_ms`.
    BodyTimeout,
}

impl BackendFailure {
    /// All kinds, in metric order.
    pub const ALL: [BackendFailure; 4] = [
        BackendFailure::Connect,
        BackendFailure::Timeout,
        BackendFailure::Protocol,
        BackendFailure::BodyTimeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendFailure::Connect => "connect",
            BackendFailure::Timeout => "timeout",
            BackendFailure::Protocol => "protocol",
            BackendFailure::BodyTimeout => "body_timeout",
        }
    }
}

/// Sensors of one back end.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests in flight now.
    pub in_flight: AtomicI64,
    /// Failures by [`BackendFailure`] (indexed as [`BackendFailure::ALL`]).
    pub failures: [AtomicU64; 4],
    /// Time from sending to the end of the response body.
    pub service_time: Histogram,
    /// Response body bytes received from it (for a connection: bytes from the server).
    pub bytes_out: AtomicU64,
    /// Bytes sent to it on connections (request bodies are counted per class).
    pub bytes_in: AtomicU64,
}

impl BackendStats {
    /// A serialisable copy.
    pub fn snapshot(&self, name: &str, healthy_addresses: usize) -> BackendSnapshot {
        BackendSnapshot {
            name: name.to_string(),
            requests: self.requests.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed).max(0) as u64,
            failures_connect: self.failures[0].load(Relaxed),
            failures_timeout: self.failures[1].load(Relaxed),
            failures_protocol: self.failures[2].load(Relaxed),
            failures_body_timeout: self.failures[3].load(Relaxed),
            healthy_addresses,
            addresses: Vec::new(),
            bytes_out: self.bytes_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            service_time: self.service_time.snapshot(),
        }
    }
}

/// A back end's sensors at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackendSnapshot {
    /// Back-end name.
    pub name: String,
    /// Requests sent.
    pub requests: u64,
    /// In flight now.
    pub in_flight: u64,
    /// Connect failures.
    pub failures_connect: u64,
    /// Response timeouts.
    pub failures_timeout: u64,
    /// Broken exchanges.
    pub failures_protocol: u64,
    /// Response bodies that paused past `body_timeout_ms`.
    #[serde(default)]
    pub failures_body_timeout: u64,
    /// Addresses in use now (enabled, passing their checks, not ejected).
    pub healthy_addresses: usize,
    /// Each address and its state.
    #[serde(default)]
    pub addresses: Vec<AddressSnapshot>,
    /// Response body bytes received (for connections: bytes from the server).
    pub bytes_out: u64,
    /// Bytes sent to it on connections.
    #[serde(default)]
    pub bytes_in: u64,
    /// Service time histogram.
    pub service_time: HistogramSnapshot,
}

/// One back-end address's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressSnapshot {
    /// `ip:port`.
    pub address: String,
    /// `enabled`, `draining` or `disabled` (the operator's say).
    pub mode: String,
    /// The active health check says it is down.
    pub checked_down: bool,
    /// Passively ejected after connect failures.
    pub ejected: bool,
    /// Requests or connections in flight there now.
    pub in_flight: u64,
}

/// The whole gateway's sensors at one moment, as `/status` serves them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// Seconds since the gateway started.
    pub uptime_s: f64,
    /// Requests in service now, all classes.
    pub running: u64,
    /// The overall cap on requests in service.
    pub max_running: u64,
    /// Client connections open now.
    #[serde(default)]
    pub connections: u64,
    /// Per class.
    pub classes: Vec<ClassSnapshot>,
    /// Per back end.
    pub backends: Vec<BackendSnapshot>,
    /// Per principal under `[agreements]` (empty without).
    #[serde(default)]
    pub principals: Vec<PrincipalSnapshot>,
    /// The cluster link, under `[cluster]` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterSnapshot>,
}

/// A principal's sensors and plan, as `/status` and `/metrics` show them (units per second).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrincipalSnapshot {
    /// Principal name.
    pub name: String,
    /// `MC`: guaranteed units per second.
    pub mandatory: f64,
    /// `OC`: units per second it may use beyond that when others leave them.
    pub optional: f64,
    /// Smoothed demand, units per second.
    pub demand: f64,
    /// This window's allocation, units per second.
    pub allocation: f64,
    /// Requests admitted within credit (at once or after waiting).
    pub admitted: u64,
    /// Requests that had to wait for credit (or, in redirect mode, were sent back).
    pub deferred: u64,
    /// Requests refused: no credit within `max_wait_ms`.
    pub refused: u64,
    /// Under `[cluster]`: the units admitted in each of the last wall-clock windows that
    /// ended, as (window = Unix time ÷ window length, units), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<(u64, f64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_means_come_from_buckets() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.observe(Duration::from_micros(50));
        }
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert!((s.mean_ms() - (99.0 * 0.05 + 1000.0) / 100.0).abs() < 1e-9);
        assert!(s.quantile_ms(0.5) <= 0.1);
        assert!(s.quantile_ms(1.0) > 500.0 && s.quantile_ms(1.0) <= 1638.4);
        let later = h.snapshot();
        assert_eq!(later.since(&s).count(), 0);
    }

    #[test]
    fn observations_land_in_the_bucket_whose_bound_they_do_not_pass() {
        for i in 0..BUCKETS {
            let b = bound_ns(i);
            assert_eq!(bucket_of(b), i, "at the bound {b} ns");
            assert_eq!(bucket_of(b + 1), i + 1, "past the bound {b} ns");
        }
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS);
    }

    #[test]
    fn empty_histogram_reads_zero() {
        let s = HistogramSnapshot::default();
        assert_eq!(s.mean_ms(), 0.0);
        assert_eq!(s.quantile_ms(0.99), 0.0);
    }
}
