//! A client connection's I/O, timed: a new connection must send its first byte within the
//! first-byte timeout, a request head that has started must be complete within the head
//! timeout (else 408 and close), an idle keep-alive connection is closed after the idle
//! timeout, and a client that stops reading its response is cut off after the send
//! timeout (so a slot is never held by a client that does not read).
//!
//! Clients and operators expect nginx's 408 for a head that does not come in time, so
//! the timing lives here, around the socket, under the connection's codec (`http::h1`).
//!
//! The socket also reads the request line as it arrives: a request target longer than the
//! listener's limit gets 414 here, before the codec would have buffered the whole head (and
//! answered 431 for a head too large). The rest of what the client sends is then read and
//! dropped until it stops or the head timeout passes, so the 414 reaches it rather than
//! a reset.

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

#[derive(Clone, Copy)]
enum Phase {
    /// No byte of the next head yet since this instant; closes quietly after the idle timeout.
    Idle(Instant),
    /// Part of a head arrived; 408 at this deadline.
    Head(Instant),
    /// Serving a request.
    Busy,
    /// Answered 414 and shut the sending side; what the client still sends is dropped
    /// until it closes or this deadline passes.
    Linger(Instant),
}

/// Longest method the request-line reader follows, in bytes; past it the line is left to
/// the codec.
const MAX_METHOD: u8 = 20;

/// Where the reader is in the request line of the head being received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// In the method, after this many bytes (leading empty lines skipped).
    Method(u8),
    /// In the target, after this many bytes.
    Target(usize),
    /// Past the target, or not a request line this reader follows: the codec judges the rest.
    Done,
}

impl Line {
    /// Reads `bytes` on from this state; `Err` when the target passes `max` bytes.
    ///
    /// Only an upper-case method followed by a target starting with `/`, `*` or a
    /// letter is followed, so bytes that are not the start of a request line (a
    /// pipelined request's rest after a read boundary) are never taken for one.
    fn read(mut self, bytes: &[u8], max: usize) -> Result<Line, ()> {
        for &b in bytes {
            self = match self {
                Line::Method(0) if b == b'\r' || b == b'\n' => Line::Method(0),
                Line::Method(n) if n > 0 && b == b' ' => Line::Target(0),
                Line::Method(n) if n < MAX_METHOD && (b.is_ascii_uppercase() || b == b'-') => {
                    Line::Method(n + 1)
                }
                Line::Target(0) if !(b == b'/' || b == b'*' || b.is_ascii_alphabetic()) => {
                    Line::Done
                }
                Line::Target(_) if b == b' ' || b == b'\r' || b == b'\n' => Line::Done,
                Line::Target(n) if n + 1 > max => return Err(()),
                Line::Target(n) => Line::Target(n + 1),
                _ => Line::Done,
            };
            if self == Line::Done {
                break;
            }
        }
        Ok(self)
    }
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
    /// The request line of the head being received, as far as it has come.
    line: Line,
    /// The longest request target, in bytes.
    max_uri_bytes: usize,
}

impl<T> TimedIo<T> {
    /// Wraps `inner`; `state` is shared with the connection's service and bodies; a
    /// request target longer than `max_uri_bytes` gets 414.
    pub fn new(inner: T, state: ConnState, timeouts: Timeouts, max_uri_bytes: usize) -> Self {
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
            line: Line::Done,
            max_uri_bytes,
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
        if let Phase::Linger(deadline) = this.phase {
            return this.linger(cx, deadline);
        }
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
                    this.line = Line::Method(0);
                }
                if let (Phase::Head(deadline), false) = (this.phase, this.line == Line::Done) {
                    let new = &buf.filled()[before..];
                    match this.line.read(new, this.max_uri_bytes) {
                        Ok(line) => this.line = line,
                        Err(()) => {
                            // Nothing of this read goes to the codec: the answer is made here.
                            buf.set_filled(before);
                            this.line = Line::Done;
                            this.answer_uri_too_long(cx);
                            this.phase = Phase::Linger(deadline);
                            return this.linger(cx, deadline);
                        }
                    }
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
            // Untimed here: the connection reads its next head once the response is
            // over, and the idle timeout starts then.
            Phase::Busy => return Poll::Pending,
            Phase::Linger(_) => return Poll::Pending,
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

impl<T: AsyncRead + AsyncWrite + Unpin> TimedIo<T> {
    /// Writes the 414 and shuts the sending side (best effort: the answer is tiny and
    /// nothing else is being written while a head comes in).
    fn answer_uri_too_long(&mut self, cx: &mut Context<'_>) {
        let text = format!(
            "allot: request target longer than {} bytes (414)\n",
            self.max_uri_bytes
        );
        let answer = format!(
            "HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        let _ = Pin::new(&mut self.inner).poll_write(cx, answer.as_bytes());
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
        let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
    }

    /// After a 414: drops what the client still sends, and ends the connection (an error
    /// the codec does not answer) once it closes or `deadline` passes.
    fn linger(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<std::io::Result<()>> {
        let over = || {
            Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request target too long (answered 414)",
            )))
        };
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        loop {
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if !sink.filled().is_empty() => {
                    drained += 1;
                    if drained == 16 {
                        // A fast sender: let other tasks run, and come back.
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
                Poll::Ready(_) => return over(), // closed, or broken
                Poll::Pending => break,
            }
        }
        if !self.armed || self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
            self.armed = true;
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return over();
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

#[cfg(test)]
mod tests {
    use super::Line;

    fn read_all(parts: &[&[u8]], max: usize) -> Result<Line, ()> {
        parts
            .iter()
            .try_fold(Line::Method(0), |line, part| line.read(part, max))
    }

    #[test]
    fn a_target_over_the_limit_is_found_across_reads() {
        let long = vec![b'a'; 20];
        assert_eq!(
            read_all(&[b"GET /", &long, b" HTTP/1.1\r\n"], 64),
            Ok(Line::Done)
        );
        assert_eq!(read_all(&[b"\r\nGET /", &long], 10), Err(()));
        assert_eq!(
            read_all(&[b"GE", b"T /", &long[..9]], 10),
            Ok(Line::Target(10))
        );
        assert_eq!(read_all(&[b"GET /", &long[..9], b"x"], 10), Err(()));
        // Absolute form counts the whole target.
        assert_eq!(read_all(&[b"GET http://host/", &long], 20), Err(()));
    }

    #[test]
    fn what_is_not_a_request_line_start_is_left_to_the_codec() {
        let long = vec![b'a'; 100];
        // The rest of a header after a read boundary, a lower-case word, a binary start.
        assert_eq!(read_all(&[b"Bearer ", &long], 10), Ok(Line::Done));
        assert_eq!(read_all(&[b"get /", &long], 10), Ok(Line::Done));
        assert_eq!(read_all(&[b"\x16\x03\x01", &long], 10), Ok(Line::Done));
        assert_eq!(read_all(&[b"GET \"", &long], 10), Ok(Line::Done));
    }
}
