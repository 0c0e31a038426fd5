//! A client connection's I/O, timed: a new connection must send its first byte within the
//! first-byte timeout, a request head that has started must be complete within the head
//! timeout (else 408 and close), an idle keep-alive connection is closed after the idle
//! timeout, and a client that stops reading its response is cut off after the send
//! timeout (so a slot is never held by a client that does not read).
//!
//! hyper's own header timeout closes the connection without a word; clients and
//! operators expect nginx's 408, so the timing lives here, around the socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 47\r\n\r\nallot: request head not received in time (408)\n";

/// What the connection's service and bodies share with its socket.
#[derive(Debug, Clone, Default)]
pub struct ConnState(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Between a parsed head and the end of its response (awaiting a head otherwise).
    in_request: AtomicBool,
    /// Responses finished on this connection: tells the socket that a request began and
    /// ended between two of its reads (an answer made at once), so the head it was timing
    /// is over.
    responses_done: AtomicU32,
    /// The client left a response unread past the send timeout.
    send_timed_out: AtomicBool,
}

impl ConnState {
    /// A request head was parsed: body and response follow, untimed here.
    pub fn request_started(&self) {
        self.0.in_request.store(true, Relaxed);
    }

    /// The response is over: the next bytes start a new head.
    pub fn response_done(&self) {
        self.0.in_request.store(false, Relaxed);
        self.0.responses_done.fetch_add(1, Relaxed);
    }

    /// Whether the connection was cut off because the client stopped reading.
    pub fn send_timed_out(&self) -> bool {
        self.0.send_timed_out.load(Relaxed)
    }
}

/// The timeouts of one client connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a new connection's first byte.
    pub first_byte: Duration,
    /// For a whole request head once it has started.
    pub head: Duration,
    /// Between requests of a keep-alive connection.
    pub idle: Duration,
    /// For the client's socket to take another byte of a response.
    pub send: Duration,
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
    /// No byte of a head has come yet on this connection.
    fresh: bool,
    /// The service's count of finished responses when this socket last looked.
    responses_seen: u32,
    timeouts: Timeouts,
    /// Times a write the client's socket does not take; made on the first such write.
    send_timer: Option<Pin<Box<Sleep>>>,
    /// Since when writes have been waiting (None: the last write went through).
    send_waiting_since: Option<Instant>,
}

impl<T> TimedIo<T> {
    /// Wraps `inner`; `state` is shared with the connection's service and bodies.
    pub fn new(inner: T, state: ConnState, timeouts: Timeouts) -> Self {
        let now = Instant::now();
        TimedIo {
            inner,
            state,
            phase: Phase::Idle(now),
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.first_byte)),
            armed: false,
            fresh: true,
            responses_seen: 0,
            timeouts,
            send_timer: None,
            send_waiting_since: None,
        }
    }

    /// A write is waiting on the client: whether it has waited past the send timeout
    /// (then the connection is cut off); arranges a wake-up at the deadline otherwise.
    fn send_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let since = *self.send_waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + self.timeouts.send;
        let timer = self
            .send_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            self.state.0.send_timed_out.store(true, Relaxed);
            return true;
        }
        false
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
        let in_request = this.state.0.in_request.load(Relaxed);
        let done = this.state.0.responses_done.load(Relaxed);
        let answered = done != this.responses_seen;
        this.responses_seen = done;
        match (&this.phase, in_request) {
            (Phase::Busy, false) => this.phase = Phase::Idle(Instant::now()),
            // A request came and went between two reads: the head timed is long over.
            (Phase::Head(_), false) if answered => this.phase = Phase::Idle(Instant::now()),
            (Phase::Idle(_) | Phase::Head(_), true) => this.phase = Phase::Busy,
            _ => {}
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        if let Poll::Ready(Ok(())) = &result {
            if got_bytes {
                this.fresh = false;
                if let Phase::Idle(_) = this.phase {
                    this.phase = Phase::Head(Instant::now() + this.timeouts.head);
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
            Phase::Idle(since) if this.fresh => since + this.timeouts.first_byte,
            Phase::Idle(since) => since + this.timeouts.idle,
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

fn send_timeout() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the client did not read its response within the send timeout",
    )
}

impl<T> TimedIo<T> {
    /// A write's outcome, timed: pending past the send timeout becomes an error.
    fn timed<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match polled {
            Poll::Pending if self.send_stalled(cx) => Poll::Ready(Err(send_timeout())),
            Poll::Pending => Poll::Pending,
            ready => {
                self.send_waiting_since = None;
                ready
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.timed(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.timed(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
