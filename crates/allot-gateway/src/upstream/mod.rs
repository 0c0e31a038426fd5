//! Back ends: addresses, pooled keep-alive connections, balancing and passive health.
//!
//! The pool is ours, and so is the HTTP/1.1 spoken on it ([`h1`]): a request may be
//! retried on another address only when nothing of it was sent, so the connection is
//! opened (or taken from the pool) first and the request handed over only then; a connect
//! failure leaves the request, body and all, for the next address.
//!
//! A back-end connection has no task of its own: the request that holds it writes and
//! reads it (the response head, then the body as the client's connection pulls it), so a
//! request never hops between tasks. An idle pooled connection is not polled; one the
//! server closed meanwhile is found closed when next taken, before anything is written,
//! and the request goes on a fresh connection.
//!
//! What lasts across reloads (sensors, pools, health, the adaptive limit's gate) is in a
//! [`BackendCore`]; each configuration snapshot has its own [`Backend`] with that
//! snapshot's settings over the same core. Health is logged on changes only (an address
//! ejected, restored), and failed requests at most once per [`FAILURE_LOG_PERIOD`] with a
//! count, never once per request.

pub mod body;
pub mod h1;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Response;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use self::h1::{ExchangeError, H1Conn, Outcome, Outgoing, ResponseBody};

use crate::config::{BackendConfig, Balance};
use crate::sched::BackendGate;
use crate::stats::{BackendFailure, BackendStats};
pub use body::{BodyError, BodyFailure, BodySource, ClientBody, RequestBody};

/// Failed requests of one back end are logged at most this often, with their count.
pub const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Most clients remembered per back end for affinity.
const AFFINITY_ENTRIES: usize = 65_536;

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No address accepted a connection (every one failed or is ejected).
    #[error("no address of back end {backend} accepted a connection ({detail})")]
    Connect {
        /// Back-end name.
        backend: String,
        /// The last failure.
        detail: String,
    },
    /// No response head came within the response timeout.
    #[error("back end {backend} sent no response within {timeout_ms} ms")]
    Timeout {
        /// Back-end name.
        backend: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The exchange broke after the request was handed over.
    #[error("back end {backend} broke the exchange: {detail}")]
    Protocol {
        /// Back-end name.
        backend: String,
        /// What hyper said.
        detail: String,
    },
}

impl ForwardError {
    /// The sensor category.
    pub fn kind(&self) -> BackendFailure {
        match self {
            ForwardError::Connect { .. } => BackendFailure::Connect,
            ForwardError::Timeout { .. } => BackendFailure::Timeout,
            ForwardError::Protocol { .. } => BackendFailure::Protocol,
        }
    }
}

/// How one attempt at an address ended.
// Returned once per request and matched at once: boxing would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    /// The request was handed over: its response, or why it failed.
    Done(Result<(Response<ResponseBody>, Lease), (ForwardError, RequestBody)>),
    /// Nothing was written: the request may go elsewhere, with its body.
    NotSent(RequestBody),
}

/// One keep-alive connection to an address, with the timer of its response heads.
struct Conn {
    h1: H1Conn,
    /// Times the wait for each response head. Armed once and moved only when it fires
    /// before the current deadline, so a busy connection keeps the timer wheel out of its
    /// per-request path.
    timer: Pin<Box<Sleep>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

/// One address of a back end, with its idle connections and health.
#[derive(Debug)]
pub struct Address {
    addr: SocketAddr,
    /// Idle connections, oldest first; the newest is reused first.
    idle: Mutex<VecDeque<(H1Conn, Pin<Box<Sleep>>)>>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// While `clock::now()` is before this (ns), the address is out.
    ejected_until_ns: AtomicU64,
    /// Ejected and not yet seen working again: changes of it are what gets logged.
    out: AtomicBool,
    /// The active health check says it is down.
    checked_down: AtomicBool,
    /// Checks in a row with the same outcome, towards `rise` or `fall`.
    streak: AtomicU32,
    /// An operator's say: [`AddressMode`] as a number.
    mode: std::sync::atomic::AtomicU8,
}

/// What an operator set an address to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMode {
    /// In use as its health allows.
    Enabled,
    /// No new requests or connections; those in flight finish.
    Draining,
    /// Out: no new requests or connections, not checked.
    Disabled,
}

impl AddressMode {
    /// The word `/status` and the admin API use.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressMode::Enabled => "enabled",
            AddressMode::Draining => "draining",
            AddressMode::Disabled => "disabled",
        }
    }

    fn from_u8(v: u8) -> AddressMode {
        match v {
            1 => AddressMode::Draining,
            2 => AddressMode::Disabled,
            _ => AddressMode::Enabled,
        }
    }
}

impl Address {
    fn new(addr: SocketAddr) -> Arc<Address> {
        Arc::new(Address {
            addr,
            idle: Mutex::new(VecDeque::new()),
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            out: AtomicBool::new(false),
            checked_down: AtomicBool::new(false),
            streak: AtomicU32::new(0),
            mode: std::sync::atomic::AtomicU8::new(0),
        })
    }

    /// Not passively ejected at `now_ns`.
    fn healthy(&self, now_ns: u64) -> bool {
        self.ejected_until_ns.load(Relaxed) <= now_ns
    }

    /// May take new requests: enabled by the operator and not down by the active check.
    fn usable(&self) -> bool {
        self.mode() == AddressMode::Enabled && !self.checked_down.load(Relaxed)
    }

    fn mode(&self) -> AddressMode {
        AddressMode::from_u8(self.mode.load(Relaxed))
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((mut h1, timer)) = idle.pop_back() {
            // One the server closed while it sat here goes, before anything is written.
            if !h1.is_stale() {
                return Some(Conn { h1, timer });
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
struct Settings {
    balance: Balance,
    connect_timeout: Duration,
    response_timeout: Duration,
    body_timeout: Duration,
    eject_after_failures: u32,
    eject_for: Duration,
    max_idle_per_address: usize,
    pool_idle_timeout_ns: u64,
    proxy_protocol: Option<crate::config::ProxyProtocol>,
    affinity_ns: u64,
}

/// What lasts of a back end across reloads: its sensors, its addresses' pools and health,
/// the gate of its adaptive limit, and the turn of its balancing.
#[derive(Debug)]
pub struct BackendCore {
    /// Name, from the configuration.
    pub name: String,
    /// Its sensors.
    pub stats: Arc<BackendStats>,
    /// Its adaptive concurrency limit, as the scheduler counts it.
    pub gate: Arc<BackendGate>,
    next: AtomicUsize,
    failures: FailureLog,
    /// TCP clients and the address that served each last, until when (ns).
    affinity: Mutex<std::collections::HashMap<std::net::IpAddr, (SocketAddr, u64)>>,
}

/// A back end as one configuration snapshot has it: a named set of addresses of one
/// unmodified server, and how to reach them.
#[derive(Debug)]
pub struct Backend {
    /// What lasts across reloads.
    pub core: Arc<BackendCore>,
    addresses: Vec<Arc<Address>>,
    settings: Settings,
}

/// A TCP client's connection to one address of a back end; counted in flight there until
/// dropped.
#[derive(Debug)]
pub struct StreamLease {
    /// The connection.
    pub stream: TcpStream,
    /// The address it is connected to.
    pub addr: SocketAddr,
    address: Arc<Address>,
    stats: Arc<BackendStats>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.address.in_flight.fetch_sub(1, Relaxed);
        self.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A request's hold on an address while its response streams: counted in flight there
/// until dropped; the connection goes back to the pool if the response ended cleanly.
#[derive(Debug)]
pub struct Lease {
    address: Arc<Address>,
    timer: Option<Pin<Box<Sleep>>>,
    max_idle: usize,
    pool_idle_timeout_ns: u64,
    stats: Arc<BackendStats>,
}

impl Lease {
    /// The address it is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.address.addr
    }

    /// The response ended: its connection, if it can carry another request, goes back to
    /// the pool. Connections left unused in the pool past the idle timeout are closed
    /// here: an idle connection is not polled, so one the server closed would otherwise
    /// linger.
    pub(crate) fn release(mut self, conn: Option<H1Conn>, now: allot_model::Nanos) {
        let (Some(mut h1), Some(timer)) = (conn, self.timer.take()) else {
            return;
        };
        if self.address.mode() != AddressMode::Enabled {
            return;
        }
        let now = now.0;
        h1.idle_since_ns = now;
        let mut idle = self.address.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|(c, _)| now.saturating_sub(c.idle_since_ns) > self.pool_idle_timeout_ns)
        {
            idle.pop_front();
        }
        if idle.len() < self.max_idle {
            idle.push_back((h1, timer));
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.address.in_flight.fetch_sub(1, Relaxed);
        self.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Backend {
    /// The back end `config` describes, keeping what lasts (sensors, pools, health) from
    /// `previous`, the same back end in the configuration before.
    pub fn build(config: &BackendConfig, previous: Option<&Backend>) -> Backend {
        let core = match previous {
            Some(p) => Arc::clone(&p.core),
            None => Arc::new(BackendCore {
                name: config.name.clone(),
                stats: Arc::new(BackendStats::default()),
                gate: Arc::new(BackendGate::default()),
                next: AtomicUsize::new(0),
                failures: FailureLog::default(),
                affinity: Mutex::new(std::collections::HashMap::new()),
            }),
        };
        let old: &[Arc<Address>] = previous.map_or(&[], |p| &p.addresses);
        let addresses = config
            .addresses
            .iter()
            .map(|a| {
                old.iter()
                    .find(|o| o.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| Address::new(*a))
            })
            .collect();
        Backend {
            core,
            addresses,
            settings: Settings {
                balance: config.balance,
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                response_timeout: Duration::from_millis(config.response_timeout_ms),
                body_timeout: Duration::from_millis(config.body_timeout_ms),
                eject_after_failures: config.eject_after_failures.max(1),
                eject_for: Duration::from_millis(config.eject_for_ms),
                max_idle_per_address: config.max_idle_per_address,
                pool_idle_timeout_ns: config.pool_idle_timeout_ms.saturating_mul(1_000_000),
                proxy_protocol: config.proxy_protocol,
                affinity_ns: config.affinity_ms.saturating_mul(1_000_000),
            },
        }
    }

    /// The PROXY protocol header it is sent on connections, if any.
    pub fn proxy_protocol(&self) -> Option<crate::config::ProxyProtocol> {
        self.settings.proxy_protocol
    }

    /// Whether `addr` is one of its addresses.
    pub fn has_address(&self, addr: SocketAddr) -> bool {
        self.addresses.iter().any(|a| a.addr == addr)
    }

    /// TCP: the address that served `client` last, while its affinity lasts.
    pub fn affinity(
        &self,
        client: std::net::IpAddr,
        now: allot_model::Nanos,
    ) -> Option<SocketAddr> {
        if self.settings.affinity_ns == 0 {
            return None;
        }
        let table = self.core.affinity.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&client)
            .filter(|(_, until)| *until > now.0)
            .map(|(addr, _)| *addr)
    }

    fn remember(&self, client: std::net::IpAddr, addr: SocketAddr, now: allot_model::Nanos) {
        if self.settings.affinity_ns == 0 {
            return;
        }
        let mut table = self.core.affinity.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= AFFINITY_ENTRIES && !table.contains_key(&client) {
            // Full: forget the expired; if none are, forget one at random.
            table.retain(|_, (_, until)| *until > now.0);
            if table.len() >= AFFINITY_ENTRIES {
                if let Some(k) = table.keys().next().copied() {
                    table.remove(&k);
                }
            }
        }
        table.insert(
            client,
            (addr, now.0.saturating_add(self.settings.affinity_ns)),
        );
    }

    /// TCP: opens a connection for `client` to one of the addresses, `prefer` first
    /// (the agreements' placement, or the client's affinity) if it is one of them and
    /// healthy, then in balancing order, ejected addresses last.
    pub async fn connect_stream(
        &self,
        prefer: Option<SocketAddr>,
        client: std::net::IpAddr,
        now: allot_model::Nanos,
    ) -> Result<StreamLease, ForwardError> {
        // Made only on a failure: the path that succeeds allocates nothing for it.
        let mut last = String::new();
        let preferred =
            prefer.and_then(|p| self.addresses.iter().find(|a| a.addr == p && a.usable()));
        let mut ejected = Vec::new();
        let mut tried: Option<&Arc<Address>> = None;
        for address in preferred.into_iter().chain(self.order()) {
            if tried.is_some_and(|t| Arc::ptr_eq(t, address)) {
                continue;
            }
            if !address.healthy(now.0) {
                ejected.push(address);
                continue;
            }
            if tried.is_none() {
                tried = Some(address);
            }
            match self.open_stream(address, &mut last).await {
                Some(lease) => {
                    self.remember(client, address.addr, now);
                    return Ok(lease);
                }
                None => continue,
            }
        }
        for address in ejected {
            if let Some(lease) = self.open_stream(address, &mut last).await {
                self.remember(client, address.addr, now);
                return Ok(lease);
            }
        }
        Err(ForwardError::Connect {
            backend: self.core.name.clone(),
            detail: no_addresses_if_empty(last),
        })
    }

    async fn open_stream(&self, address: &Arc<Address>, last: &mut String) -> Option<StreamLease> {
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, TcpStream::connect(address.addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.connected(address);
                address.in_flight.fetch_add(1, Relaxed);
                let stats = &self.core.stats;
                stats.in_flight.fetch_add(1, Relaxed);
                stats.requests.fetch_add(1, Relaxed);
                Some(StreamLease {
                    stream,
                    addr: address.addr,
                    address: Arc::clone(address),
                    stats: Arc::clone(stats),
                })
            }
            Ok(Err(e)) => {
                let detail = e.to_string();
                self.connect_failed(address, &detail);
                *last = format!("{}: {detail}", address.addr);
                None
            }
            Err(_) => {
                let detail = format!("connect timed out after {} ms", timeout.as_millis());
                self.connect_failed(address, &detail);
                *last = format!("{}: {detail}", address.addr);
                None
            }
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// Its sensors.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.core.stats
    }

    /// Longest pause allowed in a response body it sends.
    pub fn body_timeout(&self) -> Duration {
        self.settings.body_timeout
    }

    /// Addresses in use at `now`: enabled, not down by the health check, not ejected.
    pub fn healthy_addresses(&self, now: allot_model::Nanos) -> usize {
        self.addresses
            .iter()
            .filter(|a| a.usable() && a.healthy(now.0))
            .count()
    }

    /// Each address and its state, for `/status`.
    pub fn address_states(&self, now: allot_model::Nanos) -> Vec<crate::stats::AddressSnapshot> {
        self.addresses
            .iter()
            .map(|a| crate::stats::AddressSnapshot {
                address: a.addr.to_string(),
                mode: a.mode().as_str().to_string(),
                checked_down: a.checked_down.load(Relaxed),
                ejected: !a.healthy(now.0),
                in_flight: a.in_flight.load(Relaxed) as u64,
            })
            .collect()
    }

    /// Sets an address's mode; false when it is not one of this back end's. Disabling or
    /// draining closes its idle pooled connections.
    pub fn set_mode(&self, addr: SocketAddr, mode: AddressMode) -> bool {
        let Some(a) = self.addresses.iter().find(|a| a.addr == addr) else {
            return false;
        };
        let was = AddressMode::from_u8(a.mode.swap(mode as u8, Relaxed));
        if mode != AddressMode::Enabled {
            a.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        if was != mode {
            tracing::info!(backend = %self.core.name, address = %addr, mode = mode.as_str(),
                in_flight = a.in_flight.load(Relaxed), "address mode changed");
        }
        true
    }

    /// The addresses an active health check should look at (not disabled).
    pub fn checked_addresses(&self) -> Vec<SocketAddr> {
        self.addresses
            .iter()
            .filter(|a| a.mode() != AddressMode::Disabled)
            .map(|a| a.addr)
            .collect()
    }

    /// One active check's outcome for `addr`: `fall` failures in a row take it out,
    /// `rise` successes in a row bring it back; each change is logged once.
    pub fn check_result(&self, addr: SocketAddr, ok: Result<(), String>, rise: u32, fall: u32) {
        let Some(a) = self.addresses.iter().find(|a| a.addr == addr) else {
            return;
        };
        let down = a.checked_down.load(Relaxed);
        match (ok, down) {
            (Ok(()), false) | (Err(_), true) => a.streak.store(0, Relaxed),
            (Ok(()), true) => {
                let n = a.streak.fetch_add(1, Relaxed) + 1;
                if n >= rise {
                    a.streak.store(0, Relaxed);
                    a.checked_down.store(false, Relaxed);
                    tracing::info!(backend = %self.core.name, address = %addr, checks = n,
                        "address up: health checks pass again");
                }
            }
            (Err(detail), false) => {
                let n = a.streak.fetch_add(1, Relaxed) + 1;
                if n >= fall {
                    a.streak.store(0, Relaxed);
                    a.checked_down.store(true, Relaxed);
                    // Its idle connections go: a request must not find a stale one.
                    a.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    tracing::warn!(backend = %self.core.name, address = %addr, checks = n,
                        error = %detail, "address down: health checks fail");
                }
            }
        }
    }

    /// Counts a request that failed here and logs the failures now and then, with their
    /// count, never once per request.
    pub fn note_failure(&self, err: &ForwardError, now: allot_model::Nanos) {
        // Connect failures were counted per address as they happened.
        if err.kind() != BackendFailure::Connect {
            self.core.stats.failures[err.kind() as usize].fetch_add(1, Relaxed);
        }
        if let Some(n) = self.core.failures.record(now) {
            tracing::warn!(backend = %self.core.name, failed = n, last_error = %err,
                period_s = FAILURE_LOG_PERIOD.as_secs(), "requests to the back end failed");
        }
    }

    /// Sends `req` with `body` to one of the addresses, trying the next while nothing
    /// was sent. The response head must come within the response timeout from `started`
    /// (from the body's last byte, for a request with one). Returns the response (its
    /// body read from its connection) and the lease of its address; on failure, the
    /// request body comes back when it still exists, so its own failure can be read.
    pub async fn send(
        &self,
        req: &Outgoing,
        body: RequestBody,
        started: Instant,
        now: allot_model::Nanos,
    ) -> Result<(Response<ResponseBody>, Lease), (ForwardError, RequestBody)> {
        let deadline = started + self.settings.response_timeout;
        // Made only on a failure: the path that succeeds allocates nothing for it.
        let mut last = String::new();
        let mut body = body;
        // Ejected addresses only as a last resort, so a back end whose every address was
        // ejected is still probed rather than failing forever.
        let mut ejected = Vec::new();
        for address in self.order() {
            if !address.healthy(now.0) {
                ejected.push(address);
                continue;
            }
            match self.attempt(address, req, body, deadline, &mut last).await {
                Attempt::Done(done) => return done,
                Attempt::NotSent(b) => body = b,
            }
        }
        for address in ejected {
            match self.attempt(address, req, body, deadline, &mut last).await {
                Attempt::Done(done) => return done,
                Attempt::NotSent(b) => body = b,
            }
        }
        let err = ForwardError::Connect {
            backend: self.core.name.clone(),
            detail: no_addresses_if_empty(last),
        };
        Err((err, body))
    }

    /// The addresses in the balancing order for one request.
    fn order(&self) -> impl Iterator<Item = &Arc<Address>> {
        let addresses = &self.addresses;
        let n = addresses.len();
        let start = if n > 1 {
            self.core.next.fetch_add(1, Relaxed) % n
        } else {
            0
        };
        let mut by_load: Vec<usize> = Vec::new();
        if self.settings.balance == Balance::LeastInFlight && n > 1 {
            by_load = (0..n).map(|i| (start + i) % n).collect(); // ties go round-robin
            by_load.sort_by_key(|&i| addresses[i].in_flight.load(Relaxed));
        }
        (0..n)
            .map(move |i| match by_load.get(i) {
                Some(&k) => &addresses[k],
                None => &addresses[(start + i) % n],
            })
            // Drained, disabled and checked-down addresses take nothing new.
            .filter(|a| a.usable())
    }

    /// One address: a pooled connection, else a new one. `NotSent` gives the body back
    /// when nothing of the request was sent.
    async fn attempt(
        &self,
        address: &Arc<Address>,
        req: &Outgoing,
        mut body: RequestBody,
        deadline: Instant,
        last: &mut String,
    ) -> Attempt {
        while let Some(conn) = address.take_idle() {
            match self.exchange(conn, address, req, body, deadline).await {
                // The server closed it just now: another, or a fresh one.
                Attempt::NotSent(b) => body = b,
                done => return done,
            }
        }
        match connect(address.addr, self.settings.connect_timeout).await {
            Ok(conn) => match self.exchange(conn, address, req, body, deadline).await {
                Attempt::NotSent(b) => {
                    *last = format!("{}: connection closed before sending", address.addr);
                    Attempt::NotSent(b)
                }
                done => done,
            },
            Err(detail) => {
                self.connect_failed(address, &detail);
                *last = format!("{}: {detail}", address.addr);
                Attempt::NotSent(body)
            }
        }
    }

    /// One exchange on one connection, until the response head is in. A connection found
    /// closed before anything was written hands the request back.
    async fn exchange(
        &self,
        conn: Conn,
        address: &Arc<Address>,
        req: &Outgoing,
        body: RequestBody,
        deadline: Instant,
    ) -> Attempt {
        self.connected(address);
        address.in_flight.fetch_add(1, Relaxed);
        let stats = &self.core.stats;
        stats.in_flight.fetch_add(1, Relaxed);
        let s = &self.settings;
        let mut lease = Lease {
            address: Arc::clone(address),
            timer: None,
            max_idle: s.max_idle_per_address,
            pool_idle_timeout_ns: s.pool_idle_timeout_ns,
            stats: Arc::clone(stats),
        };
        let Conn { mut h1, mut timer } = conn;
        let outcome = h1
            .exchange(req, body, &mut timer, deadline, s.response_timeout)
            .await;
        let backend = || self.core.name.clone();
        let failed = |e: ForwardError, body: RequestBody| {
            stats.requests.fetch_add(1, Relaxed);
            Attempt::Done(Err((e, body)))
        };
        match outcome {
            Outcome::Head(head, upload) => {
                stats.requests.fetch_add(1, Relaxed);
                let body = ResponseBody::new(h1, &head, upload);
                lease.timer = Some(timer);
                Attempt::Done(Ok((Response::from_parts(head.parts, body), lease)))
            }
            Outcome::NotSent(body) => Attempt::NotSent(body),
            Outcome::Failed(ExchangeError::Broken(detail), body) => failed(
                ForwardError::Protocol {
                    backend: backend(),
                    detail,
                },
                body,
            ),
            Outcome::Failed(ExchangeError::Body, body) => failed(
                ForwardError::Protocol {
                    backend: backend(),
                    detail: "the request body failed".into(),
                },
                body,
            ),
            Outcome::Failed(ExchangeError::Timeout, body) => failed(
                ForwardError::Timeout {
                    backend: backend(),
                    timeout_ms: s.response_timeout.as_millis() as u64,
                },
                body,
            ),
        }
    }

    /// A connection to `address` is open: it is healthy again, and if it was ejected that
    /// is worth one line.
    fn connected(&self, address: &Address) {
        let failures = address.consecutive_failures.swap(0, Relaxed);
        if failures == 0 && !address.out.load(Relaxed) {
            return;
        }
        address.ejected_until_ns.store(0, Relaxed);
        if address.out.swap(false, Relaxed) {
            tracing::info!(backend = %self.core.name, address = %address.addr,
                failures, "address restored");
        }
    }

    fn connect_failed(&self, address: &Address, detail: &str) {
        let s = &self.settings;
        self.core.stats.failures[BackendFailure::Connect as usize].fetch_add(1, Relaxed);
        let n = address.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if n >= s.eject_after_failures {
            let until = crate::clock::now().after(s.eject_for);
            address.ejected_until_ns.store(until.0, Relaxed);
            // Logged when it goes out, not at every failed probe while it is out.
            if !address.out.swap(true, Relaxed) {
                tracing::warn!(backend = %self.core.name, address = %address.addr, failures = n,
                    eject_for_ms = s.eject_for.as_millis() as u64, error = %detail,
                    "address ejected");
            }
        }
    }
}

/// Counts failures and says when it is time to log them (at most once a period).
#[derive(Debug, Default)]
struct FailureLog {
    count: AtomicU64,
    /// When the last line was logged (`clock::now()`, ns); 0: never.
    last_ns: AtomicU64,
}

impl FailureLog {
    /// Counts one failure at `now`; returns the count to log when a line is due.
    fn record(&self, now: allot_model::Nanos) -> Option<u64> {
        self.count.fetch_add(1, Relaxed);
        let last = self.last_ns.load(Relaxed);
        let period = FAILURE_LOG_PERIOD.as_nanos() as u64;
        if last != 0 && now.0.saturating_sub(last) < period {
            return None;
        }
        self.last_ns
            .compare_exchange(last, now.0.max(1), Relaxed, Relaxed)
            .ok()?;
        Some(self.count.swap(0, Relaxed))
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, String> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => {
            return Err(format!(
                "connect timed out after {} ms",
                timeout.as_millis()
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        h1: H1Conn::new(stream),
        timer: Box::pin(tokio::time::sleep(timeout)),
    })
}

/// The detail of a connect failure: the last address's error, or that there was none to
/// try.
fn no_addresses_if_empty(last: String) -> String {
    if last.is_empty() {
        String::from("no addresses")
    } else {
        last
    }
}
