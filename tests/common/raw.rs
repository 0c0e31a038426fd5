//! Raw TCP peers for the tests that need a back end or a client to misbehave: a back end
//! that never answers, stalls its body, closes after one answer, or floods; a client that
//! writes exact bytes and reads what comes back.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How the raw back end answers each request head it reads.
#[derive(Debug, Clone, Copy)]
pub enum Raw {
    /// Reads heads, never answers.
    Silent,
    /// Answers one request, then closes the connection.
    CloseAfterOne,
    /// Answers every request after this many milliseconds, keeping the connection.
    KeepAlive(u64),
    /// Sends a head announcing 1000 bytes, then 10 of them, then nothing.
    StallBody,
    /// Sends a body of this many bytes as fast as the gateway takes it.
    Big(u64),
}

/// A raw back end; the receiver gets one message per connection that ended.
pub async fn raw_backend(mode: Raw) -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind raw back end");
    let addr = listener.local_addr().expect("local addr");
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    head.drain(..end + 4);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                    match mode {
                        Raw::Silent => continue,
                        Raw::CloseAfterOne => {
                            let _ = s.write_all(reply).await;
                            break;
                        }
                        Raw::KeepAlive(delay_ms) => {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            if s.write_all(reply).await.is_err() {
                                break;
                            }
                        }
                        Raw::StallBody => {
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789",
                                )
                                .await;
                            // Hold the connection open, sending nothing more, until the
                            // other side closes it.
                            while let Ok(n) = s.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                            }
                            break;
                        }
                        Raw::Big(n) => {
                            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                            if s.write_all(head.as_bytes()).await.is_err() {
                                break;
                            }
                            let chunk = vec![b'x'; 64 * 1024];
                            let mut left = n;
                            while left > 0 {
                                let k = left.min(chunk.len() as u64) as usize;
                                if s.write_all(&chunk[..k]).await.is_err() {
                                    break;
                                }
                                left -= k as u64;
                            }
                        }
                    }
                }
                drop(s);
                let _ = closed_tx.send(());
            });
        }
    });
    (addr, closed_rx)
}

/// A raw client connection.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub async fn connect(target: SocketAddr) -> RawClient {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
            .await
            .expect("connect in time")
            .expect("connect");
        RawClient { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads until the peer closes or `limit` passes; returns what came.
    pub async fn read_all(&mut self, limit: Duration) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(limit, self.stream.read_to_end(&mut buf)).await;
        buf
    }

    /// Reads until a whole response head has come (or `limit`); returns the bytes read.
    pub async fn read_head(&mut self, limit: Duration) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            buf.extend_from_slice(&chunk[..n]);
        }
        buf
    }
}

/// The status line of a response, or "" if none came.
pub fn status_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Writes `bytes` on a fresh connection and returns the status line of the answer.
pub async fn exchange(target: SocketAddr, bytes: &[u8]) -> String {
    let mut c = RawClient::connect(target).await;
    c.send(bytes).await;
    status_line(&c.read_all(Duration::from_secs(10)).await)
}
