//! The L4 path: one TCP connection, in small steps — inspect (the client's first bytes and
//! TLS server name, within the listener's `inspect_ms`), classify (the same rule chains as
//! HTTP, from the listener's entry chain), admit ([`crate::admission`]: accept rate,
//! agreement credit, a slot or a place in the class queue — `max_running` counts open
//! connections), connect (the agreements' placement or the client's affinity first, then
//! balancing; a PROXY protocol header if the back end wants one), and copy both ways
//! through the class's bandwidth group ([`splice`]) until either side ends, the idle
//! timeout, or the class's whole-connection limit. FTP control connections go through
//! [`ftp`], which follows their passive data connections.
//!
//! A connection refused or not served is closed (an FTP client is told why with a `421`
//! first). What it holds — a place, credit, a slot, the in-flight gauge, the back-end
//! connection — is held by guards, as for HTTP; sensors count it opened, refused by
//! reason, its bytes each way, its time, and why it closed.

pub(crate) mod ftp;
pub(crate) mod inspect;
pub(crate) mod proxy;
pub(crate) mod splice;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use allot_model::classify::{NoHeaders, RequestFacts};
use allot_model::Nanos;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::access;
use crate::admission::{self, Admitted, Unit};
use crate::config::Protocol;
use crate::runtime::{ClassRt, InFlight, ListenerRt, Live, Runtime};
use crate::stats::CloseReason;
use crate::upstream::Backend;

/// What an FTP client is told when its control connection is not served.
const FTP_UNAVAILABLE: &[u8] = b"421 Service not available, try again later.\r\n";

/// One accepted connection of TCP or FTP listener `listener`, from `peer` to `local`.
/// `stop` turns true when the gateway's grace is over.
pub(crate) async fn serve(
    live: Arc<Live>,
    listener: usize,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ftp: Option<Arc<ftp::DataPorts>>,
    stop: watch::Receiver<bool>,
) {
    let rt = live.load();
    let Some(l) = rt.listeners.get(listener) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let first = if l.config.protocol == Protocol::Tcp && !l.inspect.is_zero() {
        inspect::first_bytes(&mut stream, l.inspect, l.config.inspect_bytes).await
    } else {
        Vec::new()
    };
    let arrived = Instant::now();
    let now = crate::clock::to_nanos(arrived);
    let Some(class) = classify(&rt, l, peer.ip(), &first) else {
        return;
    };
    let stats = &class.core.stats;
    stats.arrivals.fetch_add(1, Relaxed);
    let unit = Unit {
        client: peer.ip(),
        path: "",
        listener: &l.name,
        redirectable: false,
        now,
    };
    let refused_entry = |reason: &'static str| access::Entry {
        at: Some(std::time::SystemTime::now() - arrived.elapsed()),
        client: Some(peer.ip()),
        target: l.name.to_string(),
        class: Some(class.name().to_string()),
        queue: arrived.elapsed(),
        reason: Some(reason),
        ..access::Entry::default()
    };
    let (permit, charge) = match admission::admit(&rt, &live, class, unit).await {
        Ok(Admitted::Serve(permit, charge)) => (permit, charge),
        // Connections are never redirected; anything else is a refusal, counted.
        other => {
            if let Some(log) = &rt.access_log {
                log.log(&refused_entry(match other {
                    Err(reason) => reason.as_str(),
                    _ => "quota",
                }));
            }
            refuse(&mut stream, l).await;
            return;
        }
    };
    let started = Instant::now();
    stats
        .queue_delay
        .observe(started.saturating_duration_since(arrived));
    stats.admitted.fetch_add(1, Relaxed);
    if let Some(charge) = charge {
        charge.keep();
    }
    let in_flight = InFlight::new(Arc::clone(&class.core));
    let Some(backend) = rt.backend_for(class) else {
        refuse(&mut stream, l).await;
        return;
    };
    let started_ns = crate::clock::to_nanos(started);
    let prefer = preferred_server(&rt, class, backend, peer.ip(), started_ns);
    let mut upstream = match backend.connect_stream(prefer, peer.ip(), started_ns).await {
        Ok(lease) => lease,
        Err(err) => {
            stats.failed.fetch_add(1, Relaxed);
            stats.close(CloseReason::ConnectFailed);
            if let Some(log) = &rt.access_log {
                let mut e = refused_entry(CloseReason::ConnectFailed.as_str());
                e.backend = Some(backend.name().to_string());
                log.log(&e);
            }
            backend.note_failure(&err, crate::clock::now());
            tracing::debug!(class = %class.name(), error = %err, "connecting failed");
            refuse(&mut stream, l).await;
            return;
        }
    };
    // What the back end must see first: whose connection this is, then what the client
    // already sent.
    let mut opening = match backend.proxy_protocol() {
        Some(version) => proxy::header(version, peer, local),
        None => Vec::new(),
    };
    opening.extend_from_slice(&first);
    if !opening.is_empty() && upstream.stream.write_all(&opening).await.is_err() {
        stats.close(CloseReason::Error);
        return;
    }
    let first_len = first.len() as u64;
    stats.bytes_in.fetch_add(first_len, Relaxed);
    backend.stats().bytes_in.fetch_add(first_len, Relaxed);
    let limits = splice::Limits {
        idle: l.idle_timeout,
        deadline: class.request_timeout.map(|t| started + t),
        shaper: class.bandwidth.clone(),
    };
    let backend_stats = Arc::clone(backend.stats());
    let counters = splice::Counters {
        up: [&stats.bytes_in, &backend_stats.bytes_in],
        down: [&stats.bytes_out, &backend_stats.bytes_out],
    };
    let server_addr = upstream.addr;
    let serve = async {
        match (l.config.protocol, ftp) {
            (Protocol::Ftp, Some(ports)) => {
                let ctx = ftp::Session {
                    live: Arc::clone(&live),
                    class: Arc::clone(&class.core),
                    client: peer,
                    local,
                    server: server_addr,
                    data_address: l.config.data_address,
                    active: l.config.active,
                    ports,
                    limits: limits.clone(),
                    backend: Arc::clone(&backend_stats),
                };
                ftp::control(&mut stream, &mut upstream.stream, &ctx, counters).await
            }
            _ => splice::sockets(&mut stream, &mut upstream.stream, &limits, counters).await,
        }
    };
    let ended = tokio::select! {
        ended = serve => ended,
        () = stopped(stop) => splice::Ended { reason: CloseReason::Shutdown, up: 0, down: 0 },
    };
    stats.close(ended.reason);
    let took = started.elapsed();
    stats.service_time.observe(took);
    backend_stats.service_time.observe(took);
    if let Some(log) = &rt.access_log {
        log.log(&access::Entry {
            at: Some(
                std::time::SystemTime::now() - took - started.saturating_duration_since(arrived),
            ),
            client: Some(peer.ip()),
            target: l.name.to_string(),
            bytes_out: ended.down,
            bytes_in: ended.up + first_len,
            class: Some(class.name().to_string()),
            backend: Some(backend.name().to_string()),
            address: Some(server_addr),
            queue: started.saturating_duration_since(arrived),
            service: took,
            reason: Some(ended.reason.as_str()),
            ..access::Entry::default()
        });
    }
    drop((upstream, in_flight, permit));
}

/// Resolves when the gateway's grace is over.
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        // The gateway is gone without saying: stop too.
    }
}

fn classify<'r>(
    rt: &'r Runtime,
    l: &ListenerRt,
    client: IpAddr,
    first: &[u8],
) -> Option<&'r ClassRt> {
    let facts = RequestFacts {
        client,
        host: inspect::server_name(first),
        path: "",
        headers: &NoHeaders,
        listener: Some(&l.name),
        first_bytes: first,
    };
    let picked = rt
        .rules
        .classify_from(l.entry, &facts, &mut || rand::random::<f64>());
    rt.class_of_rule(picked)
}

/// The server a connection should go to first: under agreements that tie principals'
/// capacity to back-end addresses, the client's last server while the placement allows
/// it, else one drawn by this window's placement; otherwise the client's last server
/// while its affinity lasts.
fn preferred_server(
    rt: &Runtime,
    class: &ClassRt,
    backend: &Backend,
    client: IpAddr,
    now: Nanos,
) -> Option<SocketAddr> {
    let last = backend.affinity(client, now);
    match (&rt.enforcer, class.principal) {
        (Some(e), Some(p)) if e.places_connections() => last
            .filter(|a| e.allows(p, *a))
            .or_else(|| e.server_address(p, rand::random::<f64>()))
            .filter(|a| backend.has_address(*a)),
        _ => last,
    }
}

/// Closes a connection that will not be served; an FTP client first hears why.
async fn refuse(stream: &mut TcpStream, l: &ListenerRt) {
    if l.config.protocol == Protocol::Ftp {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            stream.write_all(FTP_UNAVAILABLE),
        )
        .await;
    }
    let _ = stream.shutdown().await;
}
