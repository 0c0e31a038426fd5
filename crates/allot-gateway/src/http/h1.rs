//! HTTP/1.x towards the clients: one task per connection reads request heads into one
//! buffer, parses them with `httparse`, hands each request to [`super::handle`] and
//! writes its response, head and first body bytes in one write.
//!
//! A proxy needs less of a server than hyper's, and pays for every step on every
//! request; what it does:
//!
//! - the head (RFC 9112 §2–§5): at most the listener's `max_head_bytes` and `max_headers`
//!   (431 past either), a method, target and version `httparse` accepts (400 otherwise:
//!   no obs-fold, no bare CR, no NUL in a field). Leading empty lines are skipped;
//! - the body (RFC 9112 §6.3): `Transfer-Encoding` whose last coding is `chunked` (any
//!   other: 400; in HTTP/1.0: 400), then `Content-Length` (digits only, several values
//!   only if equal: 400 otherwise); with both, `Content-Length` is dropped and the
//!   connection closes after the response; neither: no body. Chunked bodies are read
//!   strictly: hex sizes of at most 16 digits, CRLF line ends, trailers dropped;
//! - `Expect: 100-continue`: `100 Continue` goes out when the body is first read, so a
//!   request answered before its body is needed never gets one;
//! - keep-alive: HTTP/1.1 unless either side says `close`; HTTP/1.0 only with
//!   `Connection: keep-alive`, answered in HTTP/1.0 with the same header. A connection
//!   whose request body was not all read by the end of its response (and is not all in
//!   the buffer) closes; pipelined requests are answered in order, one at a time;
//! - the response: `Content-Length` as declared, or from the body's exact size, else
//!   chunked (HTTP/1.1) or until close (HTTP/1.0); no body for HEAD, 1xx, 204 and 304;
//!   a `Date` when the response has none (formatted once a second per thread). A body
//!   that breaks off or does not match its length ends the connection: never a
//!   response that looks complete and is not;
//! - shutdown: once the gateway stops, a connection waiting for a head closes, and one
//!   serving a request closes after its response.
//!
//! Timing (first byte, head, idle, send) stays with [`TimedIo`], around the socket.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use http_body::{Body, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::body::GatewayBody;
use super::conn::{ConnState, TimedIo};
use super::error::{self, Answer};
use super::forward::Peer;
use crate::runtime::Live;
use crate::upstream::{BodySource, ClientBody};

/// The client's socket, timed.
type Io = TimedIo<TcpStream>;

/// Limits on one connection's request heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The largest head, in bytes: 431 past it.
    pub max_head_bytes: usize,
    /// The most header fields in a head: 431 past it.
    pub max_headers: usize,
}

/// Header slots parsed on the stack; a larger `max_headers` takes them from the heap.
const STACK_HEADERS: usize = 128;

/// The longest chunk-size line (size and extensions), in bytes.
const MAX_CHUNK_LINE: usize = 4096;

/// The most bytes of trailer fields after a chunked body.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Bytes read from the client at once.
const READ_BYTES: usize = 8 * 1024;

/// Response bytes gathered before they are written; a frame larger than this is written
/// from its own buffer rather than copied.
const WRITE_BATCH: usize = 16 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How far the request body has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbody {
    /// No body, or all of it read.
    Done,
    /// A `Content-Length` body with this many bytes left.
    Length(u64),
    /// A chunked body, here.
    Chunked(Chunk),
    /// Malformed or cut short: the connection cannot carry another request.
    Broken,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one, this many bytes so far.
    Trailers(usize),
}

/// What one step of the chunked decoder found in the buffer.
enum Step {
    Data(Bytes),
    End,
    More,
}

/// The connection's reading side, shared by its task and the request body being read.
struct Inbound {
    io: Io,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    body: Inbody,
    /// `100 Continue` is owed: how many of its bytes are written.
    continue_owed: Option<usize>,
}

fn lock(shared: &Mutex<Inbound>) -> MutexGuard<'_, Inbound> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inbound {
    /// Reads what the client has sent into the buffer.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BYTES);
        }
        let spare = self.buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Writes what is left of an owed `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(at) = self.continue_owed {
            if at == CONTINUE.len() {
                self.continue_owed = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.continue_owed = Some(at + n);
        }
        Poll::Ready(Ok(()))
    }

    /// The next piece of the request body, reading the socket as needed.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        loop {
            match self.body {
                Inbody::Done => return Poll::Ready(None),
                Inbody::Broken => {
                    return Poll::Ready(Some(Err("the request body is broken".into())))
                }
                Inbody::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = (self.buf.len() as u64).min(left) as usize;
                        let rest = left - n as u64;
                        self.body = if rest == 0 {
                            Inbody::Done
                        } else {
                            Inbody::Length(rest)
                        };
                        return Poll::Ready(Some(Ok(self.buf.split_to(n).freeze())));
                    }
                }
                Inbody::Chunked(_) => match self.step_chunked() {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Step::End) => return Poll::Ready(None),
                    Ok(Step::More) => {}
                    Err(why) => {
                        self.body = Inbody::Broken;
                        return Poll::Ready(Some(Err(why.into())));
                    }
                },
            }
            match ready!(self.poll_read_more(cx)) {
                Ok(0) => {
                    self.body = Inbody::Broken;
                    return Poll::Ready(Some(Err(
                        "the client closed the connection inside its request body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    self.body = Inbody::Broken;
                    return Poll::Ready(Some(Err(e.to_string())));
                }
            }
        }
    }

    /// Decodes what the buffer holds of a chunked body, without reading.
    fn step_chunked(&mut self) -> Result<Step, &'static str> {
        step_chunked(&mut self.buf, &mut self.body)
    }

    /// Reads past what is left of the request body in the buffer; whether the body is
    /// now all read (then the connection can carry the next request).
    fn drain_buffered(&mut self) -> bool {
        loop {
            match self.body {
                Inbody::Done => return true,
                Inbody::Broken => return false,
                Inbody::Length(left) => {
                    if (self.buf.len() as u64) < left {
                        return false;
                    }
                    let _ = self.buf.split_to(left as usize);
                    self.body = Inbody::Done;
                }
                Inbody::Chunked(_) => match self.step_chunked() {
                    Ok(Step::Data(_)) => {}
                    Ok(Step::End) => return true,
                    Ok(Step::More) | Err(_) => return false,
                },
            }
        }
    }
}

/// Decodes what `buf` holds of a chunked body at `body`, without reading.
fn step_chunked(buf: &mut BytesMut, body: &mut Inbody) -> Result<Step, &'static str> {
    loop {
        let Inbody::Chunked(chunk) = *body else {
            return Ok(Step::End);
        };
        match chunk {
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (buf.len() as u64).min(left) as usize;
                let rest = left - n as u64;
                *body = Inbody::Chunked(if rest == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rest)
                });
                return Ok(Step::Data(buf.split_to(n).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    if buf.first().is_some_and(|&b| b != b'\r') {
                        return Err("a chunk not followed by CRLF");
                    }
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("a chunk not followed by CRLF");
                }
                let _ = buf.split_to(2);
                *body = Inbody::Chunked(Chunk::Size);
            }
            Chunk::Size | Chunk::Trailers(_) => {
                let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                    let too_long = match chunk {
                        Chunk::Trailers(seen) => seen + buf.len() > MAX_TRAILER_BYTES,
                        _ => buf.len() > MAX_CHUNK_LINE,
                    };
                    if too_long {
                        return Err("a chunk-size or trailer line too long");
                    }
                    return Ok(Step::More);
                };
                if end == 0 || buf[end - 1] != b'\r' {
                    return Err("a chunked-body line not ended by CRLF");
                }
                let line = &buf[..end - 1];
                *body = Inbody::Chunked(match chunk {
                    Chunk::Size => match chunk_size(line)? {
                        0 => Chunk::Trailers(0),
                        n => Chunk::Data(n),
                    },
                    Chunk::Trailers(_) if line.is_empty() => {
                        let _ = buf.split_to(end + 1);
                        *body = Inbody::Done;
                        return Ok(Step::End);
                    }
                    Chunk::Trailers(seen) => {
                        if !line.contains(&b':') || line.iter().any(|&b| is_ctl(b)) {
                            return Err("a malformed trailer field");
                        }
                        let seen = seen + end + 1;
                        if seen > MAX_TRAILER_BYTES {
                            return Err("trailer fields too large");
                        }
                        Chunk::Trailers(seen)
                    }
                    _ => chunk,
                });
                let _ = buf.split_to(end + 1);
            }
        }
    }
}

/// A byte no field line may hold: controls other than tab, and DEL.
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// A chunk-size line's size (RFC 9112 §7.1): 1 to 16 hex digits, then optional
/// whitespace and extensions.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("a malformed chunk size");
    }
    if digits > 16 {
        return Err("a chunk size too large");
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        // At most 16 hex digits: never overflows.
        size = (size << 4) | u64::from((b as char).to_digit(16).unwrap_or(0));
    }
    let rest = &line[digits..];
    let ext = rest.trim_ascii_start();
    if !(ext.is_empty() || ext[0] == b';') || rest.iter().any(|&b| is_ctl(b)) {
        return Err("a malformed chunk size");
    }
    Ok(size)
}

/// The client's connection is where its request bodies are read from, as the back end
/// takes them.
impl BodySource for Mutex<Inbound> {
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<Result<(Bytes, bool), String>>> {
        let mut inb = lock(self);
        if let Err(e) = ready!(inb.poll_continue(cx)) {
            inb.body = Inbody::Broken;
            return Poll::Ready(Some(Err(e.to_string())));
        }
        let polled = ready!(inb.poll_body(cx));
        let ended = inb.body == Inbody::Done;
        Poll::Ready(polled.map(|r| r.map(|data| (data, ended))))
    }
}

/// A request head the connection cannot serve: the gateway's answer, and the connection
/// closes after it.
#[derive(Debug)]
enum HeadError {
    Refuse(Answer),
    Io(io::Error),
}

/// A parsed request head and what it says about its connection.
struct Parsed {
    req: Request<()>,
    body: Inbody,
    keep_alive: bool,
    expect_continue: bool,
}

/// Whether a comma-separated header value lists `token` (any case).
fn lists(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: digits only.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A header field's name and value, as offsets into its head: `(name start, name end,
/// value start, value end)`. Heads are far smaller than 4 GiB.
type Span = (u32, u32, u32, u32);

/// A whole request head at the start of `buf`, taken out of it; `None` when more bytes
/// are needed.
fn parse_head(buf: &mut BytesMut, limits: Limits) -> Result<Option<Parsed>, HeadError> {
    let bad = |why| HeadError::Refuse(Answer::BadRequest(why));
    let too_large = |why| HeadError::Refuse(Answer::HeadTooLarge(why));
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap = Vec::with_capacity(limits.max_headers);
        heap.resize_with(limits.max_headers, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(too_large("request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large("too many header fields")),
        Err(_) => return Err(bad("malformed request head")),
    };
    if len > limits.max_head_bytes {
        return Err(too_large("request head too large"));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("malformed method"))?;
    let http11 = req.version == Some(1);
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or("");
    let path_at = path.as_ptr() as usize - base;
    let path_span = (path_at, path_at + path.len());
    let count = req.headers.len();
    // Names and values point into the head's bytes: keep their offsets, then share the
    // bytes.
    let mut stack_spans = [const { MaybeUninit::<Span>::uninit() }; STACK_HEADERS];
    let mut heap_spans;
    let spans: &mut [MaybeUninit<Span>] = if count <= STACK_HEADERS {
        &mut stack_spans[..count]
    } else {
        heap_spans = Vec::with_capacity(count);
        heap_spans.resize_with(count, MaybeUninit::uninit);
        &mut heap_spans[..]
    };
    for (slot, h) in spans.iter_mut().zip(req.headers.iter()) {
        let n = (h.name.as_ptr() as usize - base) as u32;
        let v = (h.value.as_ptr() as usize - base) as u32;
        slot.write((n, n + h.name.len() as u32, v, v + h.value.len() as u32));
    }
    // SAFETY: every one of the `count` slots was written just above.
    let spans: &[Span] = unsafe { &*(spans as *const [MaybeUninit<Span>] as *const [Span]) };
    let head = buf.split_to(len).freeze();
    let uri = http::Uri::from_maybe_shared(head.slice(path_span.0..path_span.1))
        .map_err(|_| bad("malformed request target"))?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut keep_alive = http11;
    let mut closed = false;
    let mut expect_continue = false;
    let (mut length, mut chunked, mut te, mut cl) = (None, false, false, false);
    for &(n0, n1, v0, v1) in spans {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let name =
            HeaderName::from_bytes(&head[n0..n1]).map_err(|_| bad("malformed header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| bad("malformed header value"))?;
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
                }
                te = true;
                if length.take().is_some() {
                    headers.remove(header::CONTENT_LENGTH);
                }
                chunked = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            header::CONTENT_LENGTH => {
                cl = true;
                if te {
                    continue;
                }
                let n = content_length(value.as_bytes())
                    .ok_or(bad("a Content-Length that is not a number"))?;
                match length {
                    Some(prev) if prev != n => {
                        return Err(bad("several different Content-Length values"))
                    }
                    Some(_) => continue,
                    None => length = Some(n),
                }
            }
            header::CONNECTION => {
                if closed || lists(value.as_bytes(), b"close") {
                    closed = true;
                    keep_alive = false;
                } else if !http11 && lists(value.as_bytes(), b"keep-alive") {
                    keep_alive = true;
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        headers.append(name, value);
    }
    if te && !chunked {
        return Err(bad("the last transfer coding is not chunked"));
    }
    if te && cl {
        keep_alive = false;
    }
    let body = if te {
        Inbody::Chunked(Chunk::Size)
    } else {
        match length {
            Some(0) | None => Inbody::Done,
            Some(n) => Inbody::Length(n),
        }
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *req.headers_mut() = headers;
    Ok(Some(Parsed {
        req,
        body,
        keep_alive,
        expect_continue,
    }))
}

/// Reads until a whole request head is in; `None` when the connection should close
/// quietly (the client left, or the gateway stops between requests).
fn poll_head(
    inb: &mut Inbound,
    cx: &mut Context<'_>,
    limits: Limits,
    stopped: bool,
) -> Poll<Result<Option<Parsed>, HeadError>> {
    loop {
        if !inb.buf.is_empty() {
            if let Some(parsed) = parse_head(&mut inb.buf, limits)? {
                return Poll::Ready(Ok(Some(parsed)));
            }
        } else if stopped {
            return Poll::Ready(Ok(None));
        }
        match ready!(inb.poll_read_more(cx)) {
            // The client left, between requests or inside a head: nothing to answer.
            Ok(0) => return Poll::Ready(Ok(None)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(HeadError::Io(e))),
        }
    }
}

/// Whether the client has gone (closed its connection, or it broke) while its request
/// is served; arranges a wake-up when it does otherwise. Only once the request body is
/// all read: until then a close is the body reader's to find. What a client sends
/// meanwhile (a pipelined request) waits in the buffer, up to `limit` bytes.
fn poll_gone(shared: &Mutex<Inbound>, cx: &mut Context<'_>, limit: usize) -> bool {
    let mut inb = lock(shared);
    if inb.body != Inbody::Done {
        return false;
    }
    while inb.buf.len() < limit {
        match inb.poll_read_more(cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return false,
        }
    }
    false
}

/// Writes all of `bytes` to the client (after what is left of an owed `100 Continue`).
async fn write_all(shared: &Mutex<Inbound>, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    std::future::poll_fn(|cx| {
        let mut inb = lock(shared);
        match inb.continue_owed {
            Some(0) => inb.continue_owed = None,
            Some(_) => ready!(inb.poll_continue(cx))?,
            None => {}
        }
        while written < bytes.len() {
            let n = ready!(Pin::new(&mut inb.io).poll_write(cx, &bytes[written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            written += n;
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// Shuts the sending side, so the client reads what was written before the close.
async fn shutdown(shared: &Mutex<Inbound>) {
    let _ = std::future::poll_fn(|cx| Pin::new(&mut lock(shared).io).poll_shutdown(cx)).await;
}

/// Serves one client connection of listener `listener` until it closes, fails, or the
/// gateway stops (`stop` turns true): requests one after another, each handed to
/// [`super::handle`].
pub(crate) async fn serve(
    io: Io,
    state: ConnState,
    live: Arc<Live>,
    listener: usize,
    peer: Arc<Peer>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let shared = Arc::new(Mutex::new(Inbound {
        io,
        buf: BytesMut::with_capacity(READ_BYTES),
        body: Inbody::Done,
        continue_owed: None,
    }));
    let mut stopping = Box::pin(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let mut stopped = false;
    let mut out = BytesMut::with_capacity(READ_BYTES);
    loop {
        let parsed = std::future::poll_fn(|cx| {
            if !stopped && stopping.as_mut().poll(cx).is_ready() {
                stopped = true;
            }
            poll_head(&mut lock(&shared), cx, limits, stopped)
        })
        .await;
        let parsed = match parsed {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(HeadError::Io(e)) => return Err(e),
            Err(HeadError::Refuse(answer)) => {
                let retry_after_s = live.load().config.gateway.retry_after_s;
                let reply = Reply {
                    head_request: false,
                    http10: false,
                    keep_alive: false,
                };
                let resp = error::respond(answer, retry_after_s);
                respond(&shared, &mut out, reply, resp, limits.max_head_bytes).await?;
                shutdown(&shared).await;
                return Ok(());
            }
        };
        let Parsed {
            req,
            body,
            keep_alive,
            expect_continue,
        } = parsed;
        let client_body = {
            let mut inb = lock(&shared);
            inb.body = body;
            inb.continue_owed = None;
            match body {
                Inbody::Done => ClientBody::empty(),
                _ => {
                    if expect_continue && req.version() == Version::HTTP_11 {
                        inb.continue_owed = Some(0);
                    }
                    let left = match body {
                        Inbody::Length(n) => Some(n),
                        _ => None,
                    };
                    ClientBody::new(Arc::clone(&shared) as Arc<dyn BodySource>, left)
                }
            }
        };
        let head_request = req.method() == Method::HEAD;
        let version = req.version();
        let req = req.map(|()| client_body);
        let handling = super::handle(
            Arc::clone(&live),
            listener,
            Arc::clone(&peer),
            state.clone(),
            req,
        );
        let mut handling = std::pin::pin!(handling);
        // A client that leaves while its request waits or is served ends it, and
        // everything it holds goes back.
        let handled = std::future::poll_fn(|cx| match handling.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if poll_gone(&shared, cx, limits.max_head_bytes) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        let resp = match handled {
            Some(Ok(resp)) => resp,
            Some(Err(never)) => match never {},
            None => return Ok(()),
        };
        if !stopped && stopping.as_mut().poll(&mut noop_cx()).is_ready() {
            stopped = true;
        }
        let reply = Reply {
            head_request,
            http10: version == Version::HTTP_10,
            keep_alive: keep_alive && !stopped,
        };
        let clean = respond(&shared, &mut out, reply, resp, limits.max_head_bytes).await?;
        if !clean {
            shutdown(&shared).await;
            return Ok(());
        }
        // The request body is dropped with the response: what is left of it in the
        // buffer is skipped, and a body not all here closes the connection.
        let reusable = {
            let mut inb = lock(&shared);
            inb.continue_owed = None;
            inb.drain_buffered()
        };
        if !reusable {
            shutdown(&shared).await;
            return Ok(());
        }
    }
}

/// A context whose waker does nothing, to look at a future without waiting for it.
fn noop_cx() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

/// What the response must say about its request and connection.
#[derive(Debug, Clone, Copy)]
struct Reply {
    head_request: bool,
    http10: bool,
    keep_alive: bool,
}

/// How the response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outbody {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes the response; whether the connection can carry another request.
async fn respond(
    shared: &Mutex<Inbound>,
    out: &mut BytesMut,
    reply: Reply,
    resp: http::Response<GatewayBody>,
    limit: usize,
) -> io::Result<bool> {
    let (parts, body) = resp.into_parts();
    out.clear();
    let (framing, keep_alive) = encode_head(&parts, reply, body.size_hint(), out);
    if framing == Outbody::None {
        drop(body);
        write_all(shared, out).await?;
        return Ok(keep_alive);
    }
    let mut body = std::pin::pin!(body);
    let mut left = match framing {
        Outbody::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        if body.is_end_stream() {
            break;
        }
        // Whatever the body has now goes out with the head; wait for more only once
        // that is written.
        let polled = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    write_all(shared, out).await?;
                    out.clear();
                }
                let waited = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                    Poll::Ready(f) => Poll::Ready(Some(f)),
                    Poll::Pending if poll_gone(shared, cx, limit) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                })
                .await;
                match waited {
                    Some(f) => f,
                    // The client left mid-body.
                    None => return Ok(false),
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body ended early");
                // What came goes out, then the connection ends.
                write_all(shared, out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: dropped
            },
        };
        if data.is_empty() {
            continue;
        }
        let n = data.len() as u64;
        if framing == Outbody::Length(0) || n > left {
            // Longer than it said: cut off.
            write_all(shared, out).await?;
            return Ok(false);
        }
        left = left.saturating_sub(n);
        if framing == Outbody::Chunked {
            // Writing to a BytesMut cannot fail.
            let _ = std::fmt::Write::write_fmt(out, format_args!("{:x}\r\n", data.len()));
        }
        if data.len() > WRITE_BATCH {
            write_all(shared, out).await?;
            out.clear();
            write_all(shared, &data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if framing == Outbody::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_BATCH {
            write_all(shared, out).await?;
            out.clear();
        }
    }
    let complete = match framing {
        Outbody::Length(_) => left == 0,
        Outbody::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            true
        }
        _ => false,
    };
    write_all(shared, out).await?;
    out.clear();
    Ok(complete && keep_alive)
}

/// The response head into `out`; how its body goes, and whether the connection stays
/// open after it.
fn encode_head(
    parts: &http::response::Parts,
    reply: Reply,
    hint: SizeHint,
    out: &mut BytesMut,
) -> (Outbody, bool) {
    let status = parts.status;
    let mut keep_alive = reply.keep_alive
        && !parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| lists(v.as_bytes(), b"close"));
    let bodiless_status = status.is_informational()
        || status.as_u16() == 204 // No Content
        || status.as_u16() == 304; // Not Modified
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| content_length(v.as_bytes()));
    let mut add_length = None;
    let framing = if bodiless_status {
        Outbody::None
    } else if reply.head_request {
        if declared.is_none() {
            add_length = hint.exact().filter(|&n| n > 0);
        }
        Outbody::None
    } else if let Some(n) = declared {
        Outbody::Length(n)
    } else if let Some(n) = hint.exact() {
        add_length = Some(n);
        Outbody::Length(n)
    } else if reply.http10 {
        keep_alive = false;
        Outbody::UntilClose
    } else {
        Outbody::Chunked
    };
    if reply.http10 {
        out.extend_from_slice(b"HTTP/1.0 ");
    } else if status.as_u16() == 200 {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
    }
    if reply.http10 || status.as_u16() != 200 {
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut dated = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || (name == header::CONTENT_LENGTH && bodiless_status)
        {
            continue;
        }
        if name == header::DATE {
            dated = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = add_length {
        let _ = std::fmt::Write::write_fmt(out, format_args!("content-length: {n}\r\n"));
    }
    if framing == Outbody::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive && !reply.http10 {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive && reply.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date::now(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// The `Date` header's value (RFC 9110 §5.6.7), made once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// An IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub(super) type Text = [u8; 29];

    thread_local! {
        static CACHED: RefCell<(u64, Text)> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    /// Hands `f` the date of now.
    pub(super) fn now(f: impl FnOnce(&[u8])) {
        let secs = coarse_secs();
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, format(secs));
            }
            f(&c.1);
        });
    }

    /// Seconds since the epoch from the coarse clock: the date needs no finer, and the
    /// coarse clock is the cheaper read.
    fn coarse_secs() -> u64 {
        match nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE) {
            Ok(t) => u64::try_from(t.tv_sec()).unwrap_or(0),
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// `secs` since the epoch as an IMF-fixdate.
    pub(super) fn format(secs: u64) -> Text {
        const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
        const MONTHS: [&[u8; 3]; 12] = [
            b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
            b"Dec",
        ];
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
        // Civil from days (proleptic Gregorian), from 1970-01-01.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut t = *b"Thu, 01 Jan 1970 00:00:00 GMT";
        t[..3].copy_from_slice(DAYS[(days % 7) as usize]);
        let two = |t: &mut Text, at: usize, v: u64| {
            t[at] = b'0' + (v / 10 % 10) as u8;
            t[at + 1] = b'0' + (v % 10) as u8;
        };
        two(&mut t, 5, day as u64);
        t[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
        let y = year.clamp(0, 9999) as u64;
        two(&mut t, 12, y / 100);
        two(&mut t, 14, y % 100);
        two(&mut t, 17, h);
        two(&mut t, 20, m);
        two(&mut t, 23, s);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head_bytes: 8192,
        max_headers: 100,
    };

    fn parse(raw: &[u8]) -> Result<Option<Parsed>, HeadError> {
        let mut b = BytesMut::from(raw);
        parse_head(&mut b, LIMITS)
    }

    fn status(raw: &[u8]) -> Option<u16> {
        match parse(raw) {
            Err(HeadError::Refuse(a)) => Some(error::respond(a, 0).status().as_u16()),
            _ => None,
        }
    }

    #[test]
    fn dates_are_imf_fixdates() {
        for secs in [0u64, 784_111_777, 951_782_400, 1_700_000_000, 4_102_444_799] {
            let want = httpdate::fmt_http_date(UNIX_EPOCH_PLUS(secs));
            assert_eq!(std::str::from_utf8(&date::format(secs)).unwrap(), want);
        }
    }

    #[allow(non_snake_case)]
    fn UNIX_EPOCH_PLUS(secs: u64) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    #[test]
    fn request_framing_is_judged_strictly() {
        let p = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(p.body, Inbody::Length(5));
        assert!(p.keep_alive);
        // Both: chunked wins, Content-Length goes, the connection closes after.
        let p = parse(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.body, Inbody::Chunked(Chunk::Size));
        assert!(!p.keep_alive);
        assert!(p.req.headers().get(header::CONTENT_LENGTH).is_none());
        let cases: [(&[u8], u16); 9] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nX : a\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
        ];
        for (raw, want) in cases {
            assert_eq!(
                status(raw),
                Some(want),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let p = parse(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.body, Inbody::Length(3));
        assert_eq!(
            p.req
                .headers()
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .count(),
            1
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let ka = |raw: &[u8]| parse(raw).unwrap().unwrap().keep_alive;
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(ka(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"));
    }

    #[test]
    fn heads_past_the_limits_get_431() {
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(raw.as_bytes()), Some(431));
        let big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(9000));
        assert_eq!(status(big.as_bytes()), Some(431));
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    fn decode(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
        let mut buf = BytesMut::from(raw);
        let mut body = Inbody::Chunked(Chunk::Size);
        let mut got = Vec::new();
        loop {
            match step_chunked(&mut buf, &mut body)? {
                Step::Data(d) => got.extend_from_slice(&d),
                Step::End => return Ok(got),
                Step::More => return Err("more"),
            }
        }
    }

    #[test]
    fn chunked_bodies_are_read_strictly() {
        assert_eq!(
            decode(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n").unwrap(),
            b"hello world"
        );
        assert_eq!(decode(b"0\r\n\r\n").unwrap(), b"");
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"-1\r\n",
            b" 5\r\nhello\r\n",
            b"5 x\r\nhello\r\n",
            b"0\r\nno colon\r\n\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            decode(b"ffffffffffffffff\r\nab"),
            Err("more"),
            "16 digits are taken"
        );
    }
}
