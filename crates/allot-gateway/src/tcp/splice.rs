//! Both directions of a proxied connection, copied in one task: each chunk passes through
//! the class's bandwidth group (one budget for both directions), is counted, and resets
//! the idle timer. A side that finishes sending half-closes the other; the connection ends
//! when both have, when nothing moves for the idle timeout, at the class's
//! whole-connection deadline, or on an error.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::shape::BandwidthGroup;
use crate::stats::CloseReason;

/// Bytes read at once from either side of a connection that moves much: the size nginx
/// and HAProxy use by default.
const CHUNK_BYTES: usize = 16 * 1024;

/// Bytes of a direction's first buffer. Most connections of a busy TCP service carry a
/// few bytes each way; a small buffer comes from the allocator's fast path, a 16 KiB one
/// does not. A read that fills it moves the direction to `CHUNK_BYTES`.
const FIRST_CHUNK_BYTES: usize = 2 * 1024;

/// What bounds a connection in service.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Longest time with no byte either way.
    pub idle: Duration,
    /// When the whole connection must end, if its class says.
    pub deadline: Option<Instant>,
    /// The class's bandwidth group.
    pub shaper: Option<Arc<BandwidthGroup>>,
}

/// Where each direction's bytes are counted.
pub(crate) struct Counters<'a> {
    /// Client to server.
    pub up: [&'a AtomicU64; 2],
    /// Server to client.
    pub down: [&'a AtomicU64; 2],
}

/// Which side sent its end first: none yet, the client, the server.
const NO_END: u8 = 0;
const CLIENT: u8 = 1;
const SERVER: u8 = 2;

/// How a connection ended, and what it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended {
    /// Why it ended.
    pub reason: CloseReason,
    /// Bytes from the client to the server.
    pub up: u64,
    /// Bytes from the server to the client.
    pub down: u64,
}

/// Copies both ways between two sockets until the connection ends (their halves borrowed,
/// with no lock between them).
pub(crate) async fn sockets(
    client: &mut tokio::net::TcpStream,
    server: &mut tokio::net::TcpStream,
    limits: &Limits,
    counters: Counters<'_>,
) -> Ended {
    let (cr, cw) = client.split();
    let (sr, sw) = server.split();
    both_ways((cr, cw), (sr, sw), limits, counters).await
}

/// Copies both ways until the connection ends; says why it ended and what it carried.
/// `client` and `server` are each a (read half, write half).
pub(crate) async fn both_ways<CR, CW, SR, SW>(
    client: (CR, CW),
    server: (SR, SW),
    limits: &Limits,
    counters: Counters<'_>,
) -> Ended
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = client;
    let (mut sr, mut sw) = server;
    // Shared by the two directions of this one task (atomics only so the task is Send).
    let last = AtomicU64::new(crate::clock::now().0);
    let first_eof = AtomicU8::new(NO_END);
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let up_counters = [counters.up[0], counters.up[1], &up_bytes];
    let down_counters = [counters.down[0], counters.down[1], &down_bytes];
    let up = pump(
        &mut cr,
        &mut sw,
        CLIENT,
        limits,
        &up_counters,
        &last,
        &first_eof,
    );
    let down = pump(
        &mut sr,
        &mut cw,
        SERVER,
        limits,
        &down_counters,
        &last,
        &first_eof,
    );
    let both = async {
        let (a, b) = tokio::join!(up, down);
        a.and(b)
    };
    let idle = async {
        loop {
            let at = crate::clock::to_instant(allot_model::Nanos(last.load(Relaxed))) + limits.idle;
            tokio::time::sleep_until(at).await;
            let again =
                crate::clock::to_instant(allot_model::Nanos(last.load(Relaxed))) + limits.idle;
            if again <= Instant::now() {
                return;
            }
        }
    };
    let deadline = async {
        match limits.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let reason = tokio::select! {
        ended = both => match (ended, first_eof.load(Relaxed)) {
            (Err(_), _) => CloseReason::Error,
            (Ok(()), SERVER) => CloseReason::ServerClosed,
            (Ok(()), _) => CloseReason::ClientClosed,
        },
        () = idle => CloseReason::IdleTimeout,
        () = deadline => CloseReason::Timeout,
    };
    Ended {
        reason,
        up: up_bytes.load(Relaxed),
        down: down_bytes.load(Relaxed),
    }
}

/// One direction: read, shape, write, count, until the reader's end; then half-close the
/// writer.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    side: u8,
    limits: &Limits,
    counters: &[&AtomicU64; 3],
    last: &AtomicU64,
    first_eof: &AtomicU8,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Not zeroed: reads fill it.
    let mut buf = bytes::BytesMut::with_capacity(FIRST_CHUNK_BYTES);
    loop {
        if buf.len() == buf.capacity() && buf.capacity() < CHUNK_BYTES {
            buf = bytes::BytesMut::with_capacity(CHUNK_BYTES);
        }
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        let now = Instant::now();
        let now_ns = crate::clock::to_nanos(now);
        last.store(now_ns.0, Relaxed);
        if n == 0 {
            // The first end is passed on and the rest kept open, as the other side may
            // still send. At the second end both sides have sent everything: the
            // connection is closed next, and closing sends the end itself (nothing is
            // left unread on either socket), so a shutdown would only cost a system call.
            if first_eof
                .compare_exchange(NO_END, side, Relaxed, Relaxed)
                .is_ok()
            {
                let _ = to.shutdown().await;
            }
            return Ok(());
        }
        if let Some(group) = &limits.shaper {
            let wait = group.reserve(n as u64, now_ns);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        to.write_all(&buf[..n]).await?;
        last.store(crate::clock::now().0, Relaxed);
        for c in counters {
            c.fetch_add(n as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn counters<'a>(c: &'a [AtomicU64; 4]) -> Counters<'a> {
        Counters {
            up: [&c[0], &c[1]],
            down: [&c[2], &c[3]],
        }
    }

    /// Limits of an unshaped connection with no deadline, closed after `idle`.
    fn unshaped(idle: Duration) -> Limits {
        Limits {
            idle,
            deadline: None,
            shaper: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_go_both_ways_and_the_first_to_finish_is_named() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (server, mut server_peer) = duplex(1 << 16);
        let c = Default::default();
        let limits = unshaped(Duration::from_secs(5));
        let run = tokio::spawn(async move {
            let c: [AtomicU64; 4] = c;
            let ended = both_ways(
                tokio::io::split(client),
                tokio::io::split(server),
                &limits,
                counters(&c),
            )
            .await;
            (ended, c.map(|x| x.load(Relaxed)))
        });
        client_peer.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        server_peer.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        client_peer.read_exact(&mut got).await.unwrap();
        // The server finishes first; then the client.
        server_peer.shutdown().await.unwrap();
        let mut end = Vec::new();
        client_peer.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
        client_peer.shutdown().await.unwrap();
        let (ended, counts) = run.await.unwrap();
        assert_eq!(ended.reason, CloseReason::ServerClosed);
        assert_eq!((ended.up, ended.down), (5, 2));
        assert_eq!(counts, [5, 5, 2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_larger_than_the_first_buffer_arrives_whole_and_in_order() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (server, mut server_peer) = duplex(1 << 16);
        let c: [AtomicU64; 4] = Default::default();
        let limits = unshaped(Duration::from_secs(5));
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = sent.clone();
        let run = tokio::spawn(async move {
            both_ways(
                tokio::io::split(client),
                tokio::io::split(server),
                &limits,
                counters(&c),
            )
            .await
        });
        let writer = tokio::spawn(async move {
            client_peer.write_all(&sent).await.unwrap();
            client_peer.shutdown().await.unwrap();
            client_peer
        });
        let mut got = Vec::new();
        // The client's end reaches the server once everything before it has.
        server_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes arrive changed or out of order");
        // The second end: the connection ends with both sides done.
        server_peer.shutdown().await.unwrap();
        let ended = run.await.unwrap();
        assert_eq!(ended.reason, CloseReason::ClientClosed);
        assert_eq!(ended.up, 300_000);
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_nothing_moving_ends_at_the_idle_timeout() {
        let (client, _client_peer) = duplex(1024);
        let (server, _server_peer) = duplex(1024);
        let c: [AtomicU64; 4] = Default::default();
        let limits = unshaped(Duration::from_secs(30));
        let t0 = Instant::now();
        let ended = both_ways(
            tokio::io::split(client),
            tokio::io::split(server),
            &limits,
            counters(&c),
        )
        .await;
        assert_eq!(ended.reason, CloseReason::IdleTimeout);
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shaped_transfer_takes_as_long_as_its_group_allows() {
        let (client, mut client_peer) = duplex(1 << 20);
        let (server, mut server_peer) = duplex(1 << 20);
        let c: [AtomicU64; 4] = Default::default();
        let limits = Limits {
            idle: Duration::from_secs(60),
            deadline: None,
            // 100 kB/s, 10 kB of burst.
            shaper: Some(Arc::new(BandwidthGroup::new(
                100_000.0,
                10_000.0,
                crate::clock::now(),
            ))),
        };
        let t0 = Instant::now();
        let sender = tokio::spawn(async move {
            client_peer.write_all(&vec![1u8; 510_000]).await.unwrap();
            client_peer.shutdown().await.unwrap();
            client_peer
        });
        let receiver = tokio::spawn(async move {
            let mut all = Vec::new();
            server_peer.read_to_end(&mut all).await.unwrap();
            server_peer.shutdown().await.unwrap();
            (all.len(), Instant::now())
        });
        let ended = both_ways(
            tokio::io::split(client),
            tokio::io::split(server),
            &limits,
            counters(&c),
        )
        .await;
        let (n, done) = receiver.await.unwrap();
        drop(sender.await.unwrap());
        assert_eq!(n, 510_000);
        assert_eq!(ended.reason, CloseReason::ClientClosed);
        // 10 kB at once, the other 500 kB at 100 kB/s.
        let took = done - t0;
        assert!(
            took >= Duration::from_millis(4_900) && took <= Duration::from_millis(5_200),
            "{took:?}"
        );
    }
}
