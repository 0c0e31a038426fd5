//! Back ends: addresses, pooled keep-alive connections, balancing and passive health.
//!
//! The pool is ours rather than hyper-util's legacy client because a request may be
//! retried on another address only when nothing of it was sent: we open (or reuse) the
//! connection first and hand the request over only then, so a connect failure leaves the
//! request, body and all, in our hands for the next address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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

/// One address of a back end, with its idle connections and health.
#[derive(Debug)]
pub struct Address {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<RequestBody>>>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// While `clock::now()` is before this (ns), the address is out.
    ejected_until_ns: AtomicU64,
}

impl Address {
    fn new(addr: SocketAddr) -> Arc<Address> {
        Arc::new(Address {
            addr,
            idle: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
        })
    }

    fn healthy(&self, now_ns: u64) -> bool {
        self.ejected_until_ns.load(Relaxed) <= now_ns
    }

    fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() && s.is_ready() {
                return Some(s);
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
#[derive(Debug)]
pub struct Lease {
    address: Arc<Address>,
    sender: Option<SendRequest<RequestBody>>,
    max_idle: usize,
    stats: Arc<BackendStats>,
}

impl Lease {
    /// The response body ended cleanly: the connection can carry another request.
    pub fn release_clean(mut self) {
        if let Some(sender) = self.sender.take() {
            let mut idle = self.address.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.max_idle && !sender.is_closed() {
                idle.push(sender);
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

    /// The addresses in the order to try them for one request.
    fn candidates(&self, s: &Settings) -> Vec<Arc<Address>> {
        let now = crate::clock::now().0;
        let n = s.addresses.len();
        let mut order: Vec<Arc<Address>> = match s.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Relaxed) % n.max(1);
                (0..n)
                    .map(|i| Arc::clone(&s.addresses[(start + i) % n]))
                    .collect()
            }
            Balance::LeastInFlight => {
                let mut v: Vec<_> = s.addresses.to_vec();
                let start = self.next.fetch_add(1, Relaxed) % n.max(1);
                v.rotate_left(start); // ties go round-robin
                v.sort_by_key(|a| a.in_flight.load(Relaxed));
                v
            }
        };
        // Healthy first; ejected ones only as a last resort, so a back end whose every
        // address was ejected is still probed rather than failing forever.
        order.sort_by_key(|a| !a.healthy(now));
        order
    }

    /// Sends `req` to one of the addresses, trying the next while nothing was sent.
    /// Returns the response head and the lease of its connection.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), ForwardError> {
        let s = self.settings();
        let mut last = String::from("no addresses");
        for address in self.candidates(&s) {
            if let Some(sender) = address.take_idle() {
                match self.exchange(sender, &address, req, &s).await {
                    Ok(done) => return Ok(done),
                    Err(Exchange::NotSent(back)) => req = *back,
                    Err(Exchange::Failed(e)) => return Err(e),
                }
            }
            match connect(address.addr, s.connect_timeout).await {
                Ok(sender) => match self.exchange(sender, &address, req, &s).await {
                    Ok(done) => return Ok(done),
                    Err(Exchange::NotSent(back)) => {
                        req = *back;
                        last = format!("{}: connection closed before sending", address.addr);
                    }
                    Err(Exchange::Failed(e)) => return Err(e),
                },
                Err(detail) => {
                    self.connect_failed(&address, &s);
                    last = format!("{}: {detail}", address.addr);
                }
            }
        }
        Err(ForwardError::Connect {
            backend: self.name.clone(),
            detail: last,
        })
    }

    /// One exchange on one connection. A connection found closed before anything was
    /// written hands the request back.
    async fn exchange(
        &self,
        mut sender: SendRequest<RequestBody>,
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
            sender: None,
            max_idle: s.max_idle_per_address,
            stats: Arc::clone(&self.stats),
        };
        let sent = tokio::time::timeout(s.response_timeout, sender.try_send_request(req)).await;
        match sent {
            Ok(Ok(resp)) => {
                self.stats.requests.fetch_add(1, Relaxed);
                lease.sender = Some(sender);
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
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<RequestBody>, String> {
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
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "back-end connection ended");
        }
    });
    Ok(sender)
}
