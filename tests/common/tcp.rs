//! A TCP back end for the L4 tests: it counts connections (open now, the most at once,
//! in all) and each connection's first line, and serves one of a few behaviours.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the TCP back end does with each connection.
#[derive(Debug, Clone, Copy)]
pub enum Serve {
    /// Echoes what it reads until the client closes.
    Echo,
    /// Sends a banner line first (a server-speaks-first protocol), then echoes.
    Banner,
    /// Holds the connection for this many milliseconds, then answers `done\n` and closes.
    Hold(u64),
    /// Reads and discards everything, then answers the byte count and closes.
    Sink,
    /// Sends this many bytes, then closes.
    Source(u64),
    /// Accepts and never reads or writes.
    Silent,
}

/// What the TCP back end saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub open: AtomicU64,
    pub max_open: AtomicU64,
    pub total: AtomicU64,
    /// The first bytes each connection sent (up to 256), in arrival order.
    pub first: Mutex<Vec<Vec<u8>>>,
}

/// A TCP back end on 127.0.0.1.
pub async fn tcp_backend(serve: Serve) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp back end");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = Arc::clone(&s);
            tokio::spawn(async move {
                let now = seen.open.fetch_add(1, SeqCst) + 1;
                seen.max_open.fetch_max(now, SeqCst);
                seen.total.fetch_add(1, SeqCst);
                let mut buf = vec![0u8; 64 * 1024];
                let mut recorded = false;
                let mut record = |bytes: &[u8], seen: &Seen| {
                    if !recorded && !bytes.is_empty() {
                        recorded = true;
                        let n = bytes.len().min(256);
                        seen.first.lock().expect("first").push(bytes[..n].to_vec());
                    }
                };
                match serve {
                    Serve::Echo | Serve::Banner => {
                        if matches!(serve, Serve::Banner) {
                            let _ = stream.write_all(b"220 hello from the server\r\n").await;
                        }
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            record(&buf[..n], &seen);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Serve::Hold(ms) => {
                        if let Ok(Ok(n)) =
                            tokio::time::timeout(Duration::from_millis(ms), stream.read(&mut buf))
                                .await
                        {
                            record(&buf[..n], &seen);
                        }
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let _ = stream.write_all(b"done\n").await;
                    }
                    Serve::Sink => {
                        let mut total = 0u64;
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            record(&buf[..n], &seen);
                            total += n as u64;
                        }
                        let _ = stream.write_all(format!("{total}\n").as_bytes()).await;
                    }
                    Serve::Source(n) => {
                        let chunk = vec![b'x'; 64 * 1024];
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(chunk.len() as u64) as usize;
                            if stream.write_all(&chunk[..k]).await.is_err() {
                                break;
                            }
                            left -= k as u64;
                        }
                    }
                    Serve::Silent => {
                        // Hold the socket until the peer goes away.
                        let _ = stream.read(&mut buf).await;
                        let _ = stream.read(&mut buf).await;
                    }
                }
                // Closed from here on: counted before the FIN goes, so the count is never
                // behind what the gateway could see closed.
                seen.open.fetch_sub(1, SeqCst);
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, seen)
}
