//! FTP through the gateway (like OpenBSD's ftp-proxy): the control connection is relayed
//! line by line; each passive reply (`227`, `229`) is rewritten to a data port of the
//! gateway's own, taken from the listener's `data_ports`; the data connection that comes
//! to that port is accepted only from the control connection's client address, and is
//! relayed to the server's data port in the control connection's class and bandwidth
//! group, counted in its sensors. Active mode (`PORT`, `EPRT`) is refused with a clear
//! reply unless the listener allows it, in which case those commands pass unchanged.
//! Once the control connection turns to TLS (`AUTH TLS` answered `234`) it is relayed
//! as bytes: its replies can no longer be read.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::splice::{self, Counters, Limits};
use crate::config::PortRange;
use crate::runtime::{ClassCore, InFlight, Live};
use crate::stats::{BackendStats, CloseReason, RefuseReason};

/// How long a data port waits for its client after a passive reply.
const DATA_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest control line kept whole; longer ones are relayed as they come.
const MAX_LINE_BYTES: usize = 4096;

/// What the gateway answers a refused `PORT` or `EPRT`.
const ACTIVE_REFUSED: &[u8] =
    b"502 Active mode (PORT, EPRT) is not allowed through this gateway; use passive mode (PASV or EPSV).\r\n";

/// A listener's data ports, each lent to one passive reply at a time.
#[derive(Debug)]
pub(crate) struct DataPorts {
    range: PortRange,
    used: Mutex<Vec<bool>>,
    next: AtomicUsize,
}

/// A data port lent to one passive reply; back in the pool when dropped.
#[derive(Debug)]
struct PortLease {
    ports: Arc<DataPorts>,
    port: u16,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let i = usize::from(self.port - self.ports.range.first);
        if let Some(u) = self
            .ports
            .used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
        {
            *u = false;
        }
    }
}

impl DataPorts {
    /// The pool of `range`.
    pub(crate) fn new(range: PortRange) -> Arc<DataPorts> {
        Arc::new(DataPorts {
            range,
            used: Mutex::new(vec![false; range.len()]),
            next: AtomicUsize::new(0),
        })
    }

    /// A free port, round robin, or `None` when all are lent.
    fn take(self: &Arc<Self>, skip: usize) -> Option<PortLease> {
        let n = self.range.len();
        let start = self.next.fetch_add(1, Relaxed).wrapping_add(skip);
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for k in 0..n {
            let i = (start + k) % n;
            if !used[i] {
                used[i] = true;
                return Some(PortLease {
                    ports: Arc::clone(self),
                    port: self.range.first + i as u16,
                });
            }
        }
        None
    }
}

/// What a control connection's data connections share with it.
pub(crate) struct Session {
    /// The gateway (for the stop signal's lifetime only; data connections end with it).
    pub live: Arc<Live>,
    /// The control connection's class.
    pub class: Arc<ClassCore>,
    /// The control connection's client.
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The server the control connection went to.
    pub server: SocketAddr,
    /// The address written in passive replies, if configured.
    pub data_address: Option<IpAddr>,
    /// Whether active mode passes.
    pub active: bool,
    /// The listener's data ports.
    pub ports: Arc<DataPorts>,
    /// The bounds of the control connection, which its data connections share.
    pub limits: Limits,
    /// The back end's sensors (data connections go to its server).
    pub backend: Arc<BackendStats>,
}

/// Relays a control connection until it ends; says why it ended and what it carried.
pub(crate) async fn control(
    client: &mut TcpStream,
    server: &mut TcpStream,
    ctx: &Session,
    counters: Counters<'_>,
) -> splice::Ended {
    let (mut up, mut down) = (0u64, 0u64);
    let reason = relay(client, server, ctx, &counters, &mut up, &mut down).await;
    splice::Ended { reason, up, down }
}

async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    ctx: &Session,
    counters: &Counters<'_>,
    up: &mut u64,
    down: &mut u64,
) -> CloseReason {
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut from_client = Lines::default();
    let mut from_server = Lines::default();
    let (mut client_done, mut server_done) = (false, false);
    let mut first_eof = None;
    let mut tls = false;
    let mut cbuf = vec![0u8; 4096];
    let mut sbuf = vec![0u8; 4096];
    let mut last = Instant::now();
    loop {
        if client_done && server_done {
            return match first_eof {
                Some(CloseReason::ServerClosed) => CloseReason::ServerClosed,
                _ => CloseReason::ClientClosed,
            };
        }
        tokio::select! {
            r = cr.read(&mut cbuf), if !client_done => {
                let Ok(n) = r else { return CloseReason::Error };
                last = Instant::now();
                if n == 0 {
                    client_done = true;
                    first_eof.get_or_insert(CloseReason::ClientClosed);
                    let _ = sw.shutdown().await;
                    continue;
                }
                counters.up.iter().for_each(|c| { c.fetch_add(n as u64, Relaxed); });
                *up += n as u64;
                if tls {
                    if sw.write_all(&cbuf[..n]).await.is_err() { return CloseReason::Error; }
                    continue;
                }
                for line in from_client.push(&cbuf[..n]) {
                    let refused = !ctx.active && is_active_command(&line);
                    let w = if refused {
                        cw.write_all(ACTIVE_REFUSED).await
                    } else {
                        sw.write_all(&line).await
                    };
                    if w.is_err() { return CloseReason::Error; }
                }
            }
            r = sr.read(&mut sbuf), if !server_done => {
                let Ok(n) = r else { return CloseReason::Error };
                last = Instant::now();
                if n == 0 {
                    server_done = true;
                    first_eof.get_or_insert(CloseReason::ServerClosed);
                    let _ = cw.shutdown().await;
                    continue;
                }
                counters.down.iter().for_each(|c| { c.fetch_add(n as u64, Relaxed); });
                *down += n as u64;
                if tls {
                    if cw.write_all(&sbuf[..n]).await.is_err() { return CloseReason::Error; }
                    continue;
                }
                for line in from_server.push(&sbuf[..n]) {
                    let out = match passive_reply(&line, ctx.server.ip()) {
                        Some((extended, data)) => open_data_port(ctx, extended, data).await
                            .unwrap_or(line),
                        None => line,
                    };
                    if out.starts_with(b"234") {
                        // TLS from here on: bytes, not lines.
                        tls = true;
                    }
                    if cw.write_all(&out).await.is_err() { return CloseReason::Error; }
                }
            }
            () = tokio::time::sleep_until(last + ctx.limits.idle) => {
                return CloseReason::IdleTimeout;
            }
        }
    }
}

/// Splits a byte stream into lines (each with its `\n`); a line longer than
/// [`MAX_LINE_BYTES`] is passed on in pieces.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.partial.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            out.push(self.partial.drain(..=end).collect());
        }
        if self.partial.len() > MAX_LINE_BYTES {
            out.push(std::mem::take(&mut self.partial));
        }
        out
    }
}

/// Whether a client's line is an active-mode command.
fn is_active_command(line: &[u8]) -> bool {
    let word: Vec<u8> = line
        .iter()
        .take_while(|b| b.is_ascii_alphabetic())
        .map(|b| b.to_ascii_uppercase())
        .collect();
    word == b"PORT" || word == b"EPRT"
}

/// A server's passive reply: whether it is the extended one (`229`), and the server's
/// data address it names (a `229` names only a port: the address is the control
/// connection's server's).
fn passive_reply(line: &[u8], server_ip: IpAddr) -> Option<(bool, SocketAddr)> {
    let text = std::str::from_utf8(line).ok()?;
    if let Some(rest) = text.strip_prefix("227") {
        // RFC 1123 §4.1.2.6: the six numbers are the first digit run, wherever it is.
        let start = rest.find(|c: char| c.is_ascii_digit())?;
        let nums: Vec<u8> = rest[start..]
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(6)
            .map(|s| s.parse::<u8>())
            .collect::<Result<_, _>>()
            .ok()?;
        let [a, b, c, d, p1, p2] = nums[..] else {
            return None;
        };
        let mut ip = IpAddr::from([a, b, c, d]);
        if ip.is_unspecified() {
            ip = server_ip;
        }
        return Some((
            false,
            SocketAddr::new(ip, u16::from(p1) << 8 | u16::from(p2)),
        ));
    }
    if let Some(rest) = text.strip_prefix("229") {
        // `(|||port|)`, with any delimiter.
        let open = rest.find('(')?;
        let inner = &rest[open + 1..rest[open..].find(')')? + open];
        let delim = inner.chars().next()?;
        let port: u16 = inner.split(delim).nth(3)?.parse().ok()?;
        return Some((true, SocketAddr::new(server_ip, port)));
    }
    None
}

/// Opens a data port of the gateway's for the server's data address `data`, and returns
/// the passive reply that names it; `None` (the reply goes on unchanged) when no port is
/// free or none can be bound.
async fn open_data_port(ctx: &Session, extended: bool, data: SocketAddr) -> Option<Vec<u8>> {
    let ip = ctx.data_address.unwrap_or(ctx.local.ip());
    let mut bound = None;
    for attempt in 0..8 {
        let Some(lease) = ctx.ports.take(attempt) else {
            break;
        };
        if let Ok(l) = TcpListener::bind(SocketAddr::new(ip, lease.port)).await {
            bound = Some((l, lease));
            break;
        }
    }
    let Some((listener, lease)) = bound else {
        tracing::warn!(client = %ctx.client, "no FTP data port free; the passive reply goes on unchanged");
        return None;
    };
    let reply = match (extended, ip) {
        (true, _) => format!(
            "229 Entering Extended Passive Mode (|||{}|)\r\n",
            lease.port
        ),
        (false, IpAddr::V4(v4)) => {
            let [a, b, c, d] = v4.octets();
            format!(
                "227 Entering Passive Mode ({a},{b},{c},{d},{},{}).\r\n",
                lease.port >> 8,
                lease.port & 0xff
            )
        }
        // A 227 cannot name an IPv6 address: leave it as the server wrote it.
        (false, IpAddr::V6(_)) => return None,
    };
    let data_ctx = DataContext {
        class: Arc::clone(&ctx.class),
        client: ctx.client.ip(),
        server: data,
        limits: ctx.limits.clone(),
        backend: Arc::clone(&ctx.backend),
        _live: Arc::clone(&ctx.live),
    };
    tokio::spawn(data_connection(listener, lease, data_ctx));
    Some(reply.into_bytes())
}

struct DataContext {
    class: Arc<ClassCore>,
    client: IpAddr,
    server: SocketAddr,
    limits: Limits,
    backend: Arc<BackendStats>,
    _live: Arc<Live>,
}

/// Waits for the client's data connection (from the control connection's client address
/// only), then relays it to the server's data port.
async fn data_connection(listener: TcpListener, lease: PortLease, ctx: DataContext) {
    let stats = &ctx.class.stats;
    let deadline = Instant::now() + DATA_ACCEPT_TIMEOUT;
    let stream = loop {
        match tokio::time::timeout_at(deadline, listener.accept()).await {
            Ok(Ok((s, peer))) if peer.ip().to_canonical() == ctx.client.to_canonical() => break s,
            Ok(Ok((s, peer))) => {
                // Someone else: refused, as the control connection's client is the only one
                // this port is for.
                stats.refuse(RefuseReason::Address);
                tracing::debug!(%peer, expected = %ctx.client, "FTP data connection from another address refused");
                drop(s);
            }
            Ok(Err(_)) | Err(_) => return,
        }
    };
    drop((listener, lease));
    let _ = stream.set_nodelay(true);
    stats.arrivals.fetch_add(1, Relaxed);
    let server =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(ctx.server)).await {
            Ok(Ok(s)) => s,
            _ => {
                stats.close(CloseReason::ConnectFailed);
                return;
            }
        };
    let _ = server.set_nodelay(true);
    stats.admitted.fetch_add(1, Relaxed);
    let _in_flight = InFlight::new(Arc::clone(&ctx.class));
    let started = Instant::now();
    let counters = Counters {
        up: [&stats.bytes_in, &ctx.backend.bytes_in],
        down: [&stats.bytes_out, &ctx.backend.bytes_out],
    };
    let (mut stream, mut server) = (stream, server);
    let ended = splice::sockets(&mut stream, &mut server, &ctx.limits, counters).await;
    stats.close(ended.reason);
    stats.service_time.observe(started.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_replies_are_read_wherever_their_numbers_are() {
        let server: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            passive_reply(b"227 Entering Passive Mode (127,0,0,1,156,64).\r\n", server),
            Some((false, "127.0.0.1:40000".parse().unwrap()))
        );
        assert_eq!(
            passive_reply(b"227 =127,0,0,1,156,65\r\n", server),
            Some((false, "127.0.0.1:40001".parse().unwrap()))
        );
        assert_eq!(
            passive_reply(b"227 Entering Passive Mode (0,0,0,0,1,2)\r\n", server),
            Some((false, "10.0.0.9:258".parse().unwrap()))
        );
        assert_eq!(
            passive_reply(
                b"229 Entering Extended Passive Mode (|||40002|)\r\n",
                server
            ),
            Some((true, "10.0.0.9:40002".parse().unwrap()))
        );
        assert_eq!(passive_reply(b"227 garbage\r\n", server), None);
        assert_eq!(passive_reply(b"200 ok\r\n", server), None);
        assert_eq!(passive_reply(b"229 (|||x|)\r\n", server), None);
    }

    #[test]
    fn active_commands_are_recognised_in_any_case() {
        assert!(is_active_command(b"PORT 127,0,0,1,4,1\r\n"));
        assert!(is_active_command(b"eprt |1|127.0.0.1|1025|\r\n"));
        assert!(!is_active_command(b"PASV\r\n"));
        assert!(!is_active_command(b"PORTAL\r\n"));
    }

    #[test]
    fn lines_are_split_and_long_ones_passed_in_pieces() {
        let mut l = Lines::default();
        assert!(l.push(b"USER an").is_empty());
        assert_eq!(
            l.push(b"on\r\nPASS x\r\nPA"),
            vec![b"USER anon\r\n".to_vec(), b"PASS x\r\n".to_vec()]
        );
        let long = vec![b'a'; MAX_LINE_BYTES + 10];
        let out = l.push(&long);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE_BYTES + 12);
    }

    #[test]
    fn data_ports_are_lent_once_and_come_back() {
        let p = DataPorts::new(PortRange {
            first: 40000,
            last: 40001,
        });
        let a = p.take(0).expect("one");
        let b = p.take(0).expect("two");
        assert_ne!(a.port, b.port);
        assert!(p.take(0).is_none());
        drop(a);
        assert!(p.take(0).is_some());
    }
}
