//! Back ends: addresses, pooled keep-alive connections, balancing and passive health.
//!
//! The pool is ours rather than hyper-util's legacy client because a request may be
//! retried on another address only when nothing of it was sent: we open (or reuse) the
//! connection first and hand the request over only then, so a connect failure leaves the
//! request, body and all, in our hands for the next address.
//!
//! A back-end connection has no task of its own: the request that holds it drives its I/O
//! (while waiting for the response head, then from the response body as the client's
//! connection pulls it), so a request never hops between tasks. An idle pooled connection
//! is not polled; one the server closed meanwhile is found closed when next used, before
//! anything is written, and the request goes on a fresh connection.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::RequestBody;
use crate::config::{BackendConfig, Balance};
use crate::stats::{BackendFailure, BackendStats};

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

/// How one exchange ended when it did not produce a response.
enum Exchange {
    /// Nothing was written: the request may go elsewhere.
    NotSent(Box<Request<RequestBody>>),
    /// The request was handed over and failed.
    Failed(ForwardError),
}

/// hyper's state machine of one back-end connection.
type Driver = hyper::client::conn::http1::Connection<TokioIo<TcpStream>, RequestBody>;

/// One keep-alive connection to an address: the handle requests are sent on and the
/// protocol state machine whose I/O the request holding the connection drives.
struct Conn {
    sender: SendRequest<RequestBody>,
    /// `None` once the connection has ended (dropping it hands back requests not sent).
    driver: Option<Pin<Box<Driver>>>,
    /// Times the wait for each response head. Armed once and moved only when it fires
    /// before the current deadline, so a busy connection keeps the timer wheel out of its
    /// per-request path.
    timer: Pin<Box<Sleep>>,
    /// When it last went back to the pool (`clock::now()`, ns).
    idle_since_ns: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("ended", &self.driver.is_none())
            .finish()
    }
}

impl Conn {
    /// Whether `deadline` has passed, making sure `cx` is woken by then if not.
    fn poll_deadline(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        if self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return true;
            }
            // Armed for an earlier exchange: move it to this one's deadline.
            self.timer.as_mut().reset(deadline);
        }
        false
    }

    /// Moves the connection's I/O on as far as it can go now; `cx` is woken when it can
    /// go further.
    fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = self.driver.as_mut() {
            if let Poll::Ready(result) = driver.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "back-end connection ended");
                }
                self.driver = None;
            }
        }
    }

    /// Whether another request can be sent on it, after letting it finish any work left
    /// from the last exchange.
    fn reusable(&mut self) -> bool {
        if !self.sender.is_ready() {
            self.poll_io(&mut Context::from_waker(std::task::Waker::noop()));
        }
        self.driver.is_some() && !self.sender.is_closed() && self.sender.is_ready()
    }
}

/// One address of a back end, with its idle connections and health.
#[derive(Debug)]
pub struct Address {
    addr: SocketAddr,
    /// Idle connections, oldest first; the newest is reused first.
    idle: Mutex<VecDeque<Conn>>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// While `clock::now()` is before this (ns), the address is out.
    ejected_until_ns: AtomicU64,
}

impl Address {
    fn new(addr: SocketAddr) -> Arc<Address> {
        Arc::new(Address {
            addr,
            idle: Mutex::new(VecDeque::new()),
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
        })
    }

    fn healthy(&self, now_ns: u64) -> bool {
        self.ejected_until_ns.load(Relaxed) <= now_ns
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop_back() {
            if !c.sender.is_closed() && c.sender.is_ready() {
                return Some(c);
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
struct Settings {
    addresses: Vec<Arc<Address>>,
    balance: Balance,
    connect_timeout: Duration,
    response_timeout: Duration,
    eject_after_failures: u32,
    eject_for: Duration,
    max_idle_per_address: usize,
    pool_idle_timeout_ns: u64,
}

/// A back end: a named set of addresses of one unmodified server.
#[derive(Debug)]
pub struct Backend {
    /// Name, from the configuration.
    pub name: String,
    /// Its sensors.
    pub stats: Arc<BackendStats>,
    settings: RwLock<Arc<Settings>>,
    next: AtomicUsize,
}

/// A connection lent to one exchange; returned to the pool if the response ends cleanly.
/// Its holder drives the connection's I/O with [`Lease::poll_io`] while the response body
/// is read.
#[derive(Debug)]
pub struct Lease {
    address: Arc<Address>,
    conn: Option<Conn>,
    max_idle: usize,
    pool_idle_timeout_ns: u64,
    stats: Arc<BackendStats>,
}

impl Lease {
    /// Moves the connection's I/O on (reads more of the response body); `cx` is woken
    /// when there is more to do.
    pub fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.as_mut() {
            conn.poll_io(cx);
        }
    }

    /// The response body ended cleanly: the connection can carry another request.
    /// Connections left unused in the pool past the idle timeout are closed here: an idle
    /// connection is not polled, so one the server closed would otherwise linger.
    pub fn release_clean(mut self) {
        if let Some(mut conn) = self.conn.take() {
            if conn.reusable() {
                let now = crate::clock::now().0;
                conn.idle_since_ns = now;
                let mut idle = self.address.idle.lock().unwrap_or_else(|p| p.into_inner());
                while idle.front().is_some_and(|c| {
                    now.saturating_sub(c.idle_since_ns) > self.pool_idle_timeout_ns
                }) {
                    idle.pop_front();
                }
                if idle.len() < self.max_idle {
                    idle.push_back(conn);
                }
            }
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
    /// A back end from its configuration.
    pub fn new(config: &BackendConfig) -> Arc<Backend> {
        Arc::new(Backend {
            name: config.name.clone(),
            stats: Arc::new(BackendStats::default()),
            settings: RwLock::new(Arc::new(Settings::from_config(config, &[]))),
            next: AtomicUsize::new(0),
        })
    }

    /// Applies a changed configuration, keeping the pools of addresses that stay.
    pub fn reconfigure(&self, config: &BackendConfig) {
        let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
        *s = Arc::new(Settings::from_config(config, &s.addresses));
    }

    /// Addresses not ejected now.
    pub fn healthy_addresses(&self) -> usize {
        let now = crate::clock::now().0;
        self.settings()
            .addresses
            .iter()
            .filter(|a| a.healthy(now))
            .count()
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends `req` to one of the addresses, trying the next while nothing was sent.
    /// Returns the response head and the lease of its connection.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), ForwardError> {
        let s = self.settings();
        let mut last = String::from("no addresses");
        let now = crate::clock::now().0;
        // Ejected addresses only as a last resort, so a back end whose every address was
        // ejected is still probed rather than failing forever.
        let mut ejected = Vec::new();
        for address in self.order(&s) {
            if !address.healthy(now) {
                ejected.push(address);
                continue;
            }
            req = match self.attempt(address, req, &s, &mut last).await {
                Ok(done) => return done,
                Err(back) => back,
            };
        }
        for address in ejected {
            req = match self.attempt(address, req, &s, &mut last).await {
                Ok(done) => return done,
                Err(back) => back,
            };
        }
        Err(ForwardError::Connect {
            backend: self.name.clone(),
            detail: last,
        })
    }

    /// The addresses in the balancing order for one request.
    fn order<'s>(&self, s: &'s Settings) -> impl Iterator<Item = &'s Arc<Address>> {
        let n = s.addresses.len();
        let start = self.next.fetch_add(1, Relaxed) % n.max(1);
        let mut by_load: Vec<usize> = Vec::new();
        if s.balance == Balance::LeastInFlight && n > 1 {
            by_load = (0..n).map(|i| (start + i) % n).collect(); // ties go round-robin
            by_load.sort_by_key(|&i| s.addresses[i].in_flight.load(Relaxed));
        }
        (0..n).map(move |i| match by_load.get(i) {
            Some(&k) => &s.addresses[k],
            None => &s.addresses[(start + i) % n],
        })
    }

    /// One address: a pooled connection, else a new one. `Ok` with the outcome once the
    /// request was handed over; `Err` with the request back when nothing of it was sent.
    async fn attempt(
        &self,
        address: &Arc<Address>,
        mut req: Request<RequestBody>,
        s: &Settings,
        last: &mut String,
    ) -> Result<Result<(Response<Incoming>, Lease), ForwardError>, Request<RequestBody>> {
        if let Some(conn) = address.take_idle() {
            match self.exchange(conn, address, req, s).await {
                Ok(done) => return Ok(Ok(done)),
                Err(Exchange::NotSent(back)) => req = *back,
                Err(Exchange::Failed(e)) => return Ok(Err(e)),
            }
        }
        match connect(address.addr, s.connect_timeout).await {
            Ok(conn) => match self.exchange(conn, address, req, s).await {
                Ok(done) => Ok(Ok(done)),
                Err(Exchange::NotSent(back)) => {
                    *last = format!("{}: connection closed before sending", address.addr);
                    Err(*back)
                }
                Err(Exchange::Failed(e)) => Ok(Err(e)),
            },
            Err(detail) => {
                self.connect_failed(address, s);
                *last = format!("{}: {detail}", address.addr);
                Err(req)
            }
        }
    }

    /// One exchange on one connection, driving its I/O until the response head is in. A
    /// connection found closed before anything was written hands the request back.
    async fn exchange(
        &self,
        mut conn: Conn,
        address: &Arc<Address>,
        req: Request<RequestBody>,
        s: &Settings,
    ) -> Result<(Response<Incoming>, Lease), Exchange> {
        address.consecutive_failures.store(0, Relaxed);
        address.ejected_until_ns.store(0, Relaxed);
        address.in_flight.fetch_add(1, Relaxed);
        self.stats.in_flight.fetch_add(1, Relaxed);
        let mut lease = Lease {
            address: Arc::clone(address),
            conn: None,
            max_idle: s.max_idle_per_address,
            pool_idle_timeout_ns: s.pool_idle_timeout_ns,
            stats: Arc::clone(&self.stats),
        };
        let deadline = Instant::now() + s.response_timeout;
        let mut response = std::pin::pin!(conn.sender.try_send_request(req));
        let driven = std::future::poll_fn(|cx| {
            conn.poll_io(cx);
            match response.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Ok(r)),
                Poll::Pending if conn.poll_deadline(deadline, cx) => Poll::Ready(Err(())),
                Poll::Pending => Poll::Pending,
            }
        });
        match driven.await {
            Ok(Ok(resp)) => {
                self.stats.requests.fetch_add(1, Relaxed);
                lease.conn = Some(conn);
                Ok((resp, lease))
            }
            Ok(Err(mut e)) => match e.take_message() {
                Some(back) => Err(Exchange::NotSent(Box::new(back))),
                None => {
                    self.stats.requests.fetch_add(1, Relaxed);
                    Err(Exchange::Failed(ForwardError::Protocol {
                        backend: self.name.clone(),
                        detail: e.into_error().to_string(),
                    }))
                }
            },
            Err(_) => {
                self.stats.requests.fetch_add(1, Relaxed);
                Err(Exchange::Failed(ForwardError::Timeout {
                    backend: self.name.clone(),
                    timeout_ms: s.response_timeout.as_millis() as u64,
                }))
            }
        }
    }

    fn connect_failed(&self, address: &Address, s: &Settings) {
        self.stats.failures[BackendFailure::Connect as usize].fetch_add(1, Relaxed);
        let n = address.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if n >= s.eject_after_failures {
            let until = crate::clock::now().after(s.eject_for);
            address.ejected_until_ns.store(until.0, Relaxed);
            tracing::warn!(backend = %self.name, address = %address.addr, failures = n,
                eject_for_ms = s.eject_for.as_millis() as u64, "address ejected");
        }
    }
}

impl Settings {
    fn from_config(config: &BackendConfig, old: &[Arc<Address>]) -> Settings {
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
        Settings {
            addresses,
            balance: config.balance,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
            eject_after_failures: config.eject_after_failures.max(1),
            eject_for: Duration::from_millis(config.eject_for_ms),
            max_idle_per_address: config.max_idle_per_address,
            pool_idle_timeout_ns: config.pool_idle_timeout_ms.saturating_mul(1_000_000),
        }
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
    let (sender, driver) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Conn {
        sender,
        driver: Some(Box::pin(driver)),
        timer: Box::pin(tokio::time::sleep(timeout)),
        idle_since_ns: 0,
    })
}
