//! A client connection's I/O, timed: a request head that has started must be complete
//! within the head timeout (else 408 and close), and an idle keep-alive connection is
//! closed after the idle timeout.
//!
//! hyper's own header timeout closes the connection without a word; clients and
//! operators expect nginx's 408, so the timing lives here, around the socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 47\r\n\r\nallot: request head not received in time (408)\n";

/// Whether the connection is between requests (awaiting a head) or serving one.
#[derive(Debug, Clone, Default)]
pub struct ConnState {
    in_request: Arc<AtomicBool>,
}

impl ConnState {
    /// A request head was parsed: body and response follow, untimed here.
    pub fn request_started(&self) {
        self.in_request.store(true, Relaxed);
    }

    /// The response is over: the next bytes start a new head.
    pub fn response_done(&self) {
        self.in_request.store(false, Relaxed);
    }
}

enum Phase {
    /// No byte of the next head yet since this instant; closes quietly after the idle timeout.
    Idle(Instant),
    /// Part of a head arrived; 408 at this deadline.
    Head(Instant),
    /// Serving a request.
    Busy,
}

/// The client socket with head and idle timeouts.
///
/// One timer per connection, armed only when a read would wait, and not moved later on
/// every request: when it fires before the phase's real deadline it is simply re-armed.
/// That keeps the timer wheel out of the per-request path of busy keep-alive connections.
pub struct TimedIo<T> {
    inner: T,
    state: ConnState,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
    armed: bool,
    head_timeout: Duration,
    idle_timeout: Duration,
}

impl<T> TimedIo<T> {
    /// Wraps `inner`; `state` is shared with the connection's service and bodies.
    pub fn new(inner: T, state: ConnState, head_timeout: Duration, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        TimedIo {
            inner,
            state,
            phase: Phase::Idle(now),
            timer: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            armed: false,
            head_timeout,
            idle_timeout,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // Follow the service's view of the connection.
        let in_request = this.state.in_request.load(Relaxed);
        match (&this.phase, in_request) {
            (Phase::Busy, false) => this.phase = Phase::Idle(Instant::now()),
            (Phase::Idle(_) | Phase::Head(_), true) => this.phase = Phase::Busy,
            _ => {}
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        if let Poll::Ready(Ok(())) = &result {
            if got_bytes {
                if let Phase::Idle(_) = this.phase {
                    this.phase = Phase::Head(Instant::now() + this.head_timeout);
                }
            }
            if got_bytes || buf.remaining() == 0 {
                return result;
            }
        }
        if result.is_ready() {
            return result; // EOF or error
        }
        // Pending: make sure the timer wakes us by the phase's deadline, then check it.
        let deadline = match this.phase {
            Phase::Idle(since) => since + this.idle_timeout,
            Phase::Head(deadline) => deadline,
            Phase::Busy => return Poll::Pending,
        };
        if !this.armed || this.timer.deadline() > deadline {
            this.timer.as_mut().reset(deadline);
            this.armed = true;
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() < deadline {
                // Fired for an earlier phase's deadline: re-arm for this one.
                this.timer.as_mut().reset(deadline);
                continue;
            }
            this.armed = false;
            return match this.phase {
                Phase::Head(_) => {
                    // Best effort: the response is tiny and the socket buffer empty.
                    let _ = Pin::new(&mut this.inner).poll_write(cx, REQUEST_TIMEOUT);
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request head timeout",
                    )))
                }
                // Quiet close: EOF between requests.
                _ => Poll::Ready(Ok(())),
            };
        }
        Poll::Pending
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
