//! The listeners: accept loops for clients and for the admin API, under caps on open
//! connections, with graceful shutdown.
//!
//! [`run`] serves until its `shutdown` future resolves or a listener fails for good, then
//! stops accepting, gives requests in flight the configured grace, stops the loops, and
//! says whether everything drained. A listener that runs out of descriptors (EMFILE)
//! backs off and accepts again when some free, logging once per episode; the client
//! listener never takes the last descriptors, so the admin API keeps answering.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::Protocol;
use crate::gateway::Gateway;
use crate::http::conn::{ConnState, TimedIo, Timeouts};
use crate::http::forward::Peer;

/// Most admin connections open at once.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Descriptors kept back from client connections: back-end connections, the admin
/// listener and its connections, files.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Longest pause between accept attempts while descriptors are short.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Why the gateway stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed in a way retrying cannot mend.
    #[error("the {listener} listener failed: {source}")]
    Listener {
        /// Which listener.
        listener: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A listener's task panicked.
    #[error("the {listener} listener stopped unexpectedly: {detail}")]
    Panicked {
        /// Which listener.
        listener: &'static str,
        /// What the panic said.
        detail: String,
    },
}

/// Binds every listener of `config`, in configuration order, naming the address of any
/// that cannot be bound.
pub async fn bind_all(config: &crate::Config) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for l in config.listeners() {
        out.push(bind(l.address).await?);
    }
    Ok(out)
}

/// Connections the kernel completes and holds for a listener before the gateway accepts
/// them (the system's `net.core.somaxconn` caps it). The standard library's 128 drops the
/// SYNs of a burst past it, and those clients wait a second or more for a retransmission.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(named)?;
    // As the standard library does: a restarted gateway binds past old TIME_WAIT sockets.
    socket.set_reuseaddr(true).map_err(named)?;
    socket.bind(addr).map_err(named)?;
    socket.listen(LISTEN_BACKLOG).map_err(named)
}

/// Raises the soft limit on open descriptors to the hard limit (as nginx's
/// `worker_rlimit_nofile` or Go's runtime do) and returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// The default cap on client connections for a process that may open `descriptors`:
/// half of what is left after a reserve (each client may hold a back-end connection), at
/// most 16384.
pub fn default_max_connections(descriptors: u64) -> usize {
    let usable = descriptors.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    usable.clamp(16, 16_384) as usize
}

/// Serves every listener of the configuration (`listeners`, bound in configuration
/// order) and the admin API on `admin` until `shutdown` resolves or a listener fails for
/// good; then stops accepting and lets requests and connections in flight finish within
/// the configured grace.
pub async fn run(
    gw: Gateway,
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (force_tx, force_rx) = watch::channel(false);
    let http_drain = Arc::new(TcpDrain::default());
    let admin_graceful = Arc::new(GracefulShutdown::new());
    let tcp = Arc::new(TcpDrain::default());
    // One budget of descriptors for every listener's clients.
    let global = Arc::new(Semaphore::new(default_max_connections(
        raise_descriptor_limit(),
    )));
    let mut tasks = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    let rt = gw.runtime();
    for (index, listener) in listeners.into_iter().enumerate() {
        let Some(l) = rt.listeners.get(index) else {
            continue;
        };
        let name: &'static str = Box::leak(l.name.to_string().into_boxed_str());
        let slots = Slots {
            global: Arc::clone(&global),
            own: l
                .config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n))),
        };
        let (gw, stop) = (gw.clone(), stop_rx.clone());
        let task = match l.config.protocol {
            Protocol::Http => {
                let drain = Arc::clone(&http_drain);
                tasks.spawn(async move {
                    serve_http(gw, index, name, listener, slots, drain, stop).await
                })
            }
            Protocol::Tcp | Protocol::Ftp => {
                let ports = l.config.data_ports.map(crate::tcp::ftp::DataPorts::new);
                let (drain, force) = (Arc::clone(&tcp), force_rx.clone());
                tasks.spawn(async move {
                    serve_tcp(gw, index, name, listener, slots, ports, drain, force, stop).await
                })
            }
        };
        names.push((task.id(), name));
    }
    if let Some(admin) = admin {
        let gw = gw.clone();
        let graceful = Arc::clone(&admin_graceful);
        let stop = stop_rx.clone();
        let task = tasks.spawn(async move { serve_admin(gw, admin, graceful, stop).await });
        names.push((task.id(), "admin"));
    }
    drop(rt);
    let name_of = |id| {
        names
            .iter()
            .find(|(i, _)| *i == id)
            .map_or("a", |(_, n)| *n)
    };
    tokio::pin!(shutdown);
    let mut failure = None;
    tokio::select! {
        () = &mut shutdown => {}
        Some(ended) = tasks.join_next_with_id() => {
            failure = listener_failure(ended, name_of).err();
            if let Some(e) = &failure {
                tracing::error!(error = %e, "stopping the gateway");
            }
        }
    }
    let _ = stop_tx.send(true);
    // The accept loops end at once; wait for them so no new connection slips in.
    while let Some(ended) = tasks.join_next_with_id().await {
        if let Err(e) = listener_failure(ended, name_of) {
            tracing::error!(error = %e, "stopping the gateway");
            failure.get_or_insert(e);
        }
    }
    let grace = gw.shutdown_grace();
    let drained = tokio::time::timeout(grace, async {
        let admin = Arc::try_unwrap(admin_graceful).ok();
        tokio::join!(
            http_drain.idle(),
            async {
                if let Some(g) = admin {
                    g.shutdown().await
                }
            },
            tcp.idle(),
        );
    })
    .await
    .is_ok();
    // Connections still open past the grace are closed now.
    let _ = force_tx.send(true);
    gw.supervisor().stop();
    let open = gw.live().connections.load(Relaxed);
    if drained {
        tracing::info!("gateway stopped: every request in flight finished");
    } else {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            connections_open = open,
            "gateway stopped: connections still open after the grace period were closed"
        );
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The connection caps a listener accepts under: the process's budget of descriptors,
/// and its own `max_connections` if set.
struct Slots {
    global: Arc<Semaphore>,
    own: Option<Arc<Semaphore>>,
}

/// Held while a connection is open: its places under both caps.
struct Slot {
    _global: tokio::sync::OwnedSemaphorePermit,
    _own: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Slots {
    /// Waits for room under both caps; `None` when the gateway stops.
    async fn acquire(&self) -> Option<Slot> {
        let own = match &self.own {
            Some(s) => Some(Arc::clone(s).acquire_owned().await.ok()?),
            None => None,
        };
        let global = Arc::clone(&self.global).acquire_owned().await.ok()?;
        Some(Slot {
            _global: global,
            _own: own,
        })
    }
}

/// Client connections in service (of the HTTP or of the TCP listeners), for the shutdown
/// to wait on.
#[derive(Default)]
struct TcpDrain {
    active: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl TcpDrain {
    async fn idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.active.load(Relaxed) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts one client connection in service while alive.
struct Draining(Arc<TcpDrain>);

impl Draining {
    fn new(d: &Arc<TcpDrain>) -> Draining {
        d.active.fetch_add(1, Relaxed);
        Draining(Arc::clone(d))
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Relaxed) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// What a finished listener task means: its error, or its panic as an error.
fn listener_failure(
    ended: Result<(tokio::task::Id, io::Result<()>), tokio::task::JoinError>,
    name_of: impl Fn(tokio::task::Id) -> &'static str,
) -> Result<(), ServeError> {
    match ended {
        Ok((_, Ok(()))) => Ok(()),
        Ok((id, Err(source))) => Err(ServeError::Listener {
            listener: name_of(id),
            source,
        }),
        Err(e) => {
            let listener = name_of(e.id());
            let detail = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into()),
                Err(e) => e.to_string(),
            };
            Err(ServeError::Panicked { listener, detail })
        }
    }
}

/// Accepts until `stop`, one connection slot from `slots` per connection; back-end
/// descriptor shortages back off and retry. Returns an error only for failures retrying
/// cannot mend.
async fn accept_loop<P: Send + 'static>(
    listener: TcpListener,
    what: &'static str,
    acquire: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Option<P>> + Send>>,
    mut stop: watch::Receiver<bool>,
    mut serve: impl FnMut(TcpStream, SocketAddr, P),
) -> io::Result<()> {
    let mut backoff = Duration::ZERO;
    let mut short_since: Option<tokio::time::Instant> = None;
    loop {
        let slot = tokio::select! {
            slot = acquire() => match slot {
                Some(s) => s,
                None => return Ok(()),
            },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(since) = short_since.take() {
                    tracing::info!(
                        listener = what,
                        short_ms = since.elapsed().as_millis() as u64,
                        "accepting again"
                    );
                }
                backoff = Duration::ZERO;
                serve(stream, peer, slot);
            }
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => {
                // Out of descriptors or memory, or one connection failed: serve what is
                // open, try again shortly. One line per episode, not per attempt.
                if short_since.is_none() {
                    short_since = Some(tokio::time::Instant::now());
                    tracing::warn!(listener = what, error = %e,
                        "cannot accept connections; backing off until descriptors free");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
    }
}

/// Accept errors that retrying cannot mend (the socket itself is broken).
fn fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EBADF) | Some(nix::libc::EINVAL) | Some(nix::libc::ENOTSOCK)
    )
}

/// Counts a client connection open while alive.
struct OpenConnection(Gateway);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.live().connections.fetch_sub(1, Relaxed);
    }
}

async fn serve_http(
    gw: Gateway,
    index: usize,
    name: &'static str,
    listener: TcpListener,
    slots: Slots,
    drain: Arc<TcpDrain>,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let slots = Arc::new(slots);
    let acquire = move || {
        let slots = Arc::clone(&slots);
        Box::pin(async move { slots.acquire().await })
            as std::pin::Pin<Box<dyn Future<Output = _> + Send>>
    };
    let connections_stop = stop.clone();
    accept_loop(listener, name, acquire, stop, move |stream, peer, slot| {
        let stop = &connections_stop;
        let _ = stream.set_nodelay(true);
        let live = Arc::clone(gw.live());
        live.connections.fetch_add(1, Relaxed);
        live.accepted.fetch_add(1, Relaxed);
        let open = OpenConnection(gw.clone());
        // Read per connection: a reload changes the settings of new connections.
        let rt = live.load();
        let Some(l) = rt.listeners.get(index).map(|l| &l.config) else {
            return;
        };
        let timeouts = Timeouts {
            first_byte: Duration::from_millis(l.first_byte_timeout_ms),
            head: Duration::from_millis(l.head_timeout_ms),
            idle: Duration::from_millis(l.idle_timeout_ms()),
            send: Duration::from_millis(l.send_timeout_ms),
        };
        let limits = crate::http::h1::Limits {
            // At least 8 KiB, as hyper, which served clients before, took.
            max_head_bytes: l.max_head_bytes.max(8192),
            max_headers: l.max_headers,
        };
        let max_uri = l.max_uri_bytes;
        drop(rt);
        let state = ConnState::default();
        let io = TimedIo::new(stream, state.clone(), timeouts, max_uri);
        let client = Arc::new(Peer::new(peer, local));
        let draining = Draining::new(&drain);
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = crate::http::h1::serve(io, state, live, index, client, limits, stop).await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
            drop((slot, open, draining));
        });
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve_tcp(
    gw: Gateway,
    index: usize,
    name: &'static str,
    listener: TcpListener,
    slots: Slots,
    ports: Option<Arc<crate::tcp::ftp::DataPorts>>,
    drain: Arc<TcpDrain>,
    force: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let slots = Arc::new(slots);
    let acquire = move || {
        let slots = Arc::clone(&slots);
        Box::pin(async move { slots.acquire().await })
            as std::pin::Pin<Box<dyn Future<Output = _> + Send>>
    };
    accept_loop(listener, name, acquire, stop, move |stream, peer, slot| {
        let live = Arc::clone(gw.live());
        live.connections.fetch_add(1, Relaxed);
        live.accepted.fetch_add(1, Relaxed);
        let open = OpenConnection(gw.clone());
        let draining = Draining::new(&drain);
        let (ports, force) = (ports.clone(), force.clone());
        tokio::spawn(async move {
            crate::tcp::serve(live, index, stream, peer, local, ports, force).await;
            drop((slot, open, draining));
        });
    })
    .await
}

async fn serve_admin(
    gw: Gateway,
    listener: TcpListener,
    graceful: Arc<GracefulShutdown>,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let acquire = move || {
        let slots = Arc::clone(&slots);
        Box::pin(async move { slots.acquire_owned().await.ok() })
            as std::pin::Pin<Box<dyn Future<Output = _> + Send>>
    };
    accept_loop(
        listener,
        "admin",
        acquire,
        stop,
        move |stream, peer, slot| {
            let gw = gw.clone();
            let svc = service_fn(move |req| crate::admin::handle(gw.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "admin connection ended");
                }
                drop(slot);
            });
        },
    )
    .await
}
