//! HTTP/1.1 towards the back ends: one request at a time on a keep-alive connection,
//! written and read by the request that holds the connection, in its own task.
//!
//! Towards the back ends the gateway speaks HTTP/1.1 itself (as it does towards the
//! clients, in `http::h1`), because a proxy needs less than hyper's client does and pays for every step of it on
//! every request: the head is written straight from the request's header map into one
//! buffer, the response head is parsed with `httparse` into a header map whose values
//! share the read buffer, and the body is read from the same buffer, with no channel or
//! task between the request and its connection. What it does:
//!
//! - the request: `Content-Length` when the client's body has a known length, chunked
//!   otherwise; the body is streamed while the response is watched for, so a server that
//!   answers early (a 413 to a large upload) is heard;
//! - the response (RFC 9112 §6.3): no body for HEAD, 1xx, 204 and 304; chunked (the last
//!   coding); `Content-Length` (several different values are an error); else until the
//!   server closes. Informational answers (100, 103) are skipped; 101 is an error (the
//!   gateway never asks to switch protocols);
//! - keep-alive: unless either side said `close`, or the server spoke HTTP/1.0 without
//!   `keep-alive`, or the body ended other than cleanly;
//! - a pooled connection the server closed while idle is found closed before anything is
//!   written, and the request is handed back for another connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::body::RequestBody;

/// The largest response head read, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header fields in a response head.
const MAX_HEADERS: usize = 128;

/// The longest chunk-size line (size, extensions), in bytes.
const MAX_CHUNK_LINE: usize = 4096;

/// Bytes read from the server at once.
const READ_BYTES: usize = 16 * 1024;

/// A request as it goes to the back end: its head (hop-by-hop headers already gone,
/// origin-form target) and the headers the gateway adds, written with it.
#[derive(Debug)]
pub struct Outgoing {
    /// Method, target and the client's headers.
    pub parts: http::request::Parts,
    /// Replaces the client's `Host` when set.
    pub host: Option<HeaderValue>,
    /// The client, appended to `X-Forwarded-For`.
    pub forwarded_for: HeaderValue,
    /// This hop's element, appended to `Forwarded`.
    pub forwarded: Option<HeaderValue>,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// One keep-alive connection to a back-end address.
#[derive(Debug)]
pub struct H1Conn {
    io: TcpStream,
    /// Bytes read from the server and not yet used.
    buf: BytesMut,
    /// The request being written (kept for the next one: no allocation per request).
    out: BytesMut,
    /// When it last went back to the pool (`clock::now()`, ns).
    pub(crate) idle_since_ns: u64,
}

/// Why an exchange did not produce a response.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// The server broke the exchange (or spoke something else than HTTP/1.1).
    Broken(String),
    /// The client's body failed (its verdict says how).
    Body,
    /// The server did not answer, or did not take the request, in time.
    Timeout,
}

/// Whether `deadline` has passed; arranges a wake-up at it otherwise. The timer is armed
/// once per connection and moved only when it fires before the current deadline, so a
/// busy connection keeps the timer wheel out of its per-request path.
pub(crate) fn poll_deadline(
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> bool {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    while timer.as_mut().poll(cx).is_ready() {
        if Instant::now() >= deadline {
            return true;
        }
        // Armed for an earlier exchange: move it to this one's deadline.
        timer.as_mut().reset(deadline);
    }
    false
}

/// A response head as the back end sent it, and how its body is framed.
#[derive(Debug)]
pub(crate) struct Head {
    /// Status, version and headers.
    pub parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl H1Conn {
    /// A fresh connection.
    pub(crate) fn new(io: TcpStream) -> H1Conn {
        H1Conn {
            io,
            buf: BytesMut::new(),
            out: BytesMut::with_capacity(1024),
            idle_since_ns: 0,
        }
    }

    /// Whether the server closed it (or sent something nobody asked for) while it sat
    /// in the pool: then it must not carry a request.
    pub(crate) fn is_stale(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends `req` with `body` and reads the response head. The head may come before the
    /// body is all sent (a server that answers early, or streams its answer while it
    /// reads): then the rest of the body goes up as the response is read.
    ///
    /// The server has until `deadline` to answer a request without a body. With a body,
    /// it has `timeout` from the last byte of it, and while the body goes up, it must
    /// take bytes within `timeout` whenever the gateway has some for it; the client's
    /// pauses are the body's own timeout's business. `timer` is the connection's.
    pub(crate) async fn exchange(
        &mut self,
        req: &Outgoing,
        body: RequestBody,
        timer: &mut Pin<Box<Sleep>>,
        deadline: Instant,
        timeout: Duration,
    ) -> Outcome {
        let chunked = body_is_chunked(&body);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        encode_head(req, chunked, &mut out);
        let head_request = req.parts.method == Method::HEAD;
        // The head in one write. A connection that takes not one byte of it (the server
        // closed it) hands the request back.
        let mut written = 0;
        while written < out.len() {
            match write_some(&mut self.io, &out[written..]).await {
                Ok(0) | Err(_) if written == 0 => {
                    self.out = out;
                    return Outcome::NotSent(body);
                }
                Ok(0) => {
                    let e = ExchangeError::Broken("the connection took no more bytes".into());
                    return Outcome::Failed(e, body);
                }
                Ok(n) => written += n,
                Err(e) => return Outcome::Failed(ExchangeError::Broken(e.to_string()), body),
            }
        }
        out.clear();
        if body.is_end_stream() {
            self.out = out;
            return match self.read_head(head_request, timer, deadline).await {
                Ok(head) => Outcome::Head(head, None),
                Err(e) => Outcome::Failed(e, body),
            };
        }
        let mut up = Upload {
            body,
            out,
            written: 0,
            chunked,
            done: false,
            write_blocked: false,
        };
        match self
            .send_watching(&mut up, head_request, timer, timeout)
            .await
        {
            Ok(Some(head)) => Outcome::Head(head, Some(up)),
            Ok(None) => {
                self.out = std::mem::take(&mut up.out);
                let deadline = Instant::now() + timeout;
                match self.read_head(head_request, timer, deadline).await {
                    Ok(head) => Outcome::Head(head, None),
                    Err(e) => Outcome::Failed(e, up.body),
                }
            }
            Err(e) => Outcome::Failed(e, up.body),
        }
    }

    /// Streams the body while watching for the answer; `Some` when the answer came
    /// before the body was all sent.
    async fn send_watching(
        &mut self,
        up: &mut Upload,
        head_request: bool,
        timer: &mut Pin<Box<Sleep>>,
        timeout: Duration,
    ) -> Result<Option<Head>, ExchangeError> {
        let mut closed = false;
        // Since when the server has not taken the bytes the gateway has for it.
        let mut blocked_since: Option<Instant> = None;
        std::future::poll_fn(|cx| {
            // An answer first, if one came. Read until the socket has nothing more, so a
            // wake-up comes with the next bytes.
            while !closed {
                match self.poll_read_more(cx) {
                    Poll::Ready(Ok(0)) => closed = true,
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(ExchangeError::Broken(e.to_string())))
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match parse_head(&mut self.buf, head_request) {
                    Ok(Some(head)) if head.parts.status.is_informational() => continue,
                    Ok(Some(head)) => return Poll::Ready(Ok(Some(head))),
                    Ok(None) => break,
                    Err(e) => return Poll::Ready(Err(ExchangeError::Broken(e))),
                }
            }
            if closed {
                return Poll::Ready(Err(ExchangeError::Broken(
                    "the server closed the connection while the request was sent".into(),
                )));
            }
            match up.poll_send(&mut self.io, cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(None)),
                Poll::Ready(Err(SendFailure::Body)) => Poll::Ready(Err(ExchangeError::Body)),
                Poll::Ready(Err(SendFailure::Io(e))) => {
                    Poll::Ready(Err(ExchangeError::Broken(e.to_string())))
                }
                Poll::Pending if up.write_blocked => {
                    let since = *blocked_since.get_or_insert_with(Instant::now);
                    if poll_deadline(timer, since + timeout, cx) {
                        Poll::Ready(Err(ExchangeError::Timeout))
                    } else {
                        Poll::Pending
                    }
                }
                Poll::Pending => {
                    blocked_since = None;
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Reads until a whole final response head is in (skipping informational ones).
    async fn read_head(
        &mut self,
        head_request: bool,
        timer: &mut Pin<Box<Sleep>>,
        deadline: Instant,
    ) -> Result<Head, ExchangeError> {
        loop {
            match parse_head(&mut self.buf, head_request) {
                Ok(Some(head)) if head.parts.status.is_informational() => continue,
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(ExchangeError::Broken(e)),
            }
            let n = std::future::poll_fn(|cx| match self.poll_read_more(cx) {
                Poll::Ready(r) => Poll::Ready(r.map_err(|e| ExchangeError::Broken(e.to_string()))),
                Poll::Pending if poll_deadline(timer, deadline, cx) => {
                    Poll::Ready(Err(ExchangeError::Timeout))
                }
                Poll::Pending => Poll::Pending,
            })
            .await?;
            if n == 0 {
                return Err(ExchangeError::Broken(
                    "the server closed the connection before answering".into(),
                ));
            }
        }
    }

    /// Reads what the server has sent into the buffer.
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
}

/// Writes what the socket takes of `bytes`.
async fn write_some(io: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    tokio::io::AsyncWriteExt::write(io, bytes).await
}

enum SendFailure {
    Body,
    Io(io::Error),
}

/// The request's bytes on their way: the head (and each chunk as it comes), then the
/// body's frames. What is left of it after the response head came goes up as the
/// response is read.
#[derive(Debug)]
pub struct Upload {
    body: RequestBody,
    out: BytesMut,
    written: usize,
    chunked: bool,
    done: bool,
    /// The last write found the server not taking bytes.
    write_blocked: bool,
}

impl Upload {
    fn poll_send(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendFailure>> {
        loop {
            while self.written < self.out.len() {
                let poll = Pin::new(&mut *io).poll_write(cx, &self.out[self.written..]);
                self.write_blocked = poll.is_pending();
                let n = ready!(poll).map_err(SendFailure::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(SendFailure::Io(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
            }
            self.out.clear();
            self.written = 0;
            if self.done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if data.is_empty() {
                            continue;
                        }
                        if self.chunked {
                            // Writing to a BytesMut cannot fail.
                            let _ = std::fmt::Write::write_fmt(
                                &mut self.out,
                                format_args!("{:x}\r\n", data.len()),
                            );
                            self.out.extend_from_slice(&data);
                            self.out.extend_from_slice(b"\r\n");
                        } else {
                            self.out.extend_from_slice(&data);
                        }
                    }
                }
                Some(Err(_)) => return Poll::Ready(Err(SendFailure::Body)),
                None => {
                    self.done = true;
                    if self.chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                }
            }
        }
    }
}

/// How an exchange ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The response head came; the rest of the body, if any, goes up with the response.
    Head(Head, Option<Upload>),
    /// Nothing was written: the body comes back untouched, for another connection.
    NotSent(RequestBody),
    /// The exchange failed; the body comes back so its own failure can be read.
    Failed(ExchangeError, RequestBody),
}

/// Whether the request body goes chunked: its length is not known in advance.
fn body_is_chunked(body: &RequestBody) -> bool {
    !body.is_end_stream() && body.size_hint().exact().is_none()
}

/// The request head, in HTTP/1.1, into `out`: the client's headers, then the gateway's
/// (`Host` if it replaces the client's, `X-Forwarded-For` and `Forwarded` with this hop
/// appended, the framing).
fn encode_head(req: &Outgoing, chunked: bool, out: &mut BytesMut) {
    let parts = &req.parts;
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let line = |out: &mut BytesMut, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    let (mut xff, mut fwd) = (false, false);
    for (name, value) in &parts.headers {
        // Framing is the gateway's: the client's Transfer-Encoding went with the other
        // hop-by-hop headers, and a chunked body carries no Content-Length. The list
        // headers the gateway appends to are written once, below.
        if name == header::TRANSFER_ENCODING
            || (chunked && name == header::CONTENT_LENGTH)
            || (req.host.is_some() && name == header::HOST)
        {
            continue;
        }
        if name == X_FORWARDED_FOR {
            xff = true;
            continue;
        }
        if name == header::FORWARDED {
            fwd = true;
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(host) = &req.host {
        line(out, b"host", host.as_bytes());
    }
    let list = |out: &mut BytesMut, name: &HeaderName, had: bool, added: &[u8]| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        if had {
            for v in parts.headers.get_all(name) {
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(added);
        out.extend_from_slice(b"\r\n");
    };
    list(out, &X_FORWARDED_FOR, xff, req.forwarded_for.as_bytes());
    if let Some(element) = &req.forwarded {
        list(out, &header::FORWARDED, fwd, element.as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A whole response head at the start of `buf`, taken out of it; `None` when more bytes
/// are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(format!("response head larger than {MAX_HEAD_BYTES} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| "a response status out of range".to_string())?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let count = resp.headers.len();
    // Names and values point into the head's bytes; keep their offsets (on the stack),
    // then share the bytes.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    for (slot, h) in spans.iter_mut().zip(resp.headers.iter()) {
        let (n, v) = (
            h.name.as_ptr() as usize - base,
            h.value.as_ptr() as usize - base,
        );
        *slot = (
            n as u32,
            h.name.len() as u32,
            v as u32,
            h.value.len() as u32,
        );
    }
    let head_bytes: Bytes = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(count);
    for &(n, nl, v, vl) in &spans[..count] {
        let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
        let name = HeaderName::from_bytes(&head_bytes[n..n + nl])
            .map_err(|_| "an invalid header name in the response".to_string())?;
        let value = HeaderValue::from_maybe_shared(head_bytes.slice(v..v + vl))
            .map_err(|_| "an invalid header value in the response".to_string())?;
        map.append(name, value);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the server switched protocols, which the gateway never asks for".into());
    }
    let framing = framing(&map, status, head_request)?;
    let close = has_token(&map, header::CONNECTION, "close");
    let keep_alive = !close
        && framing != Framing::UntilClose
        && (version == Version::HTTP_11 || has_token(&map, header::CONNECTION, "keep-alive"));
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    Ok(Some(Head {
        parts,
        framing,
        keep_alive,
    }))
}

/// Whether a comma-separated header lists `token` (any case).
fn has_token(map: &HeaderMap, name: HeaderName, token: &str) -> bool {
    map.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// How the body of a response with `headers` and `status` is framed (RFC 9112 §6.3).
fn framing(headers: &HeaderMap, status: StatusCode, head_request: bool) -> Result<Framing, String> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !te.is_empty() {
        let last = te
            .last()
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.rsplit(',').next())
            .map(|s| s.trim().to_ascii_lowercase());
        return Ok(if last.as_deref() == Some("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v
            .to_str()
            .map_err(|_| "a Content-Length that is not text")?
            .split(',')
        {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| format!("a Content-Length that is not a number: {part:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("several different Content-Length values".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
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
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// A response body read from its connection; the connection goes back to the pool when
/// the body ended cleanly and both sides kept it alive.
#[derive(Debug)]
pub struct ResponseBody {
    conn: Option<H1Conn>,
    /// What is left of the request body, going up while the response comes down.
    upload: Option<Upload>,
    framing: Framing,
    /// For `Length`: bytes left.
    left: u64,
    chunk: Chunk,
    keep_alive: bool,
    done: bool,
}

impl ResponseBody {
    /// The body of `head`, read from `conn`.
    pub(crate) fn new(conn: H1Conn, head: &Head, upload: Option<Upload>) -> ResponseBody {
        let left = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        ResponseBody {
            done: head.framing == Framing::Empty,
            conn: Some(conn),
            upload,
            framing: head.framing,
            left,
            chunk: Chunk::Size,
            keep_alive: head.keep_alive,
        }
    }

    /// The connection, if the body ended cleanly and it can carry another request.
    pub(crate) fn take_reusable(&mut self) -> Option<H1Conn> {
        // A request body not all sent leaves the server mid-request: not reusable.
        if self.done && self.keep_alive && self.upload.is_none() {
            self.conn.take().filter(|c| c.buf.is_empty())
        } else {
            None
        }
    }

    fn broken(&mut self, why: &str) -> Poll<Option<Result<Frame<Bytes>, ResponseError>>> {
        self.keep_alive = false;
        self.done = true;
        Poll::Ready(Some(Err(ResponseError::Server(why.to_string()))))
    }

    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.chunk {
                Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                    let Some(end) = conn.buf.iter().position(|b| *b == b'\n') else {
                        if conn.buf.len() > MAX_CHUNK_LINE {
                            return self.broken("a chunk-size line too long");
                        }
                        match ready!(conn.poll_read_more(cx)) {
                            Ok(0) => {
                                return self.broken(
                                    "the server closed the connection inside a chunked body",
                                )
                            }
                            Ok(_) => continue,
                            Err(e) => return self.broken(&e.to_string()),
                        }
                    };
                    let line = conn.buf.split_to(end + 1);
                    let text = line
                        .strip_suffix(b"\r\n")
                        .or_else(|| line.strip_suffix(b"\n"))
                        .unwrap_or(&line);
                    match self.chunk {
                        Chunk::Size => {
                            let digits = text.split(|b| *b == b';').next().unwrap_or(&[]);
                            let digits = std::str::from_utf8(digits).unwrap_or("").trim();
                            let Ok(size) = u64::from_str_radix(digits, 16) else {
                                return self.broken("a malformed chunk size");
                            };
                            self.chunk = if size == 0 {
                                Chunk::Trailers
                            } else {
                                Chunk::Data(size)
                            };
                        }
                        Chunk::DataEnd if text.is_empty() => self.chunk = Chunk::Size,
                        Chunk::DataEnd => return self.broken("a chunk not followed by CRLF"),
                        Chunk::Trailers if text.is_empty() => {
                            self.done = true;
                            return Poll::Ready(None);
                        }
                        // Trailer fields are dropped: the client's response is framed anew.
                        Chunk::Trailers | Chunk::Data(_) => {}
                    }
                }
                Chunk::Data(left) => {
                    if conn.buf.is_empty() {
                        match ready!(conn.poll_read_more(cx)) {
                            Ok(0) => {
                                return self
                                    .broken("the server closed the connection inside a chunk")
                            }
                            Ok(_) => continue,
                            Err(e) => return self.broken(&e.to_string()),
                        }
                    }
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    let rest = left - n as u64;
                    self.chunk = if rest == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(rest)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }
}

/// Why a response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The back end broke it.
    #[error("the back end broke the response body: {0}")]
    Server(String),
    /// The client's request body, still going up, failed.
    #[error("the client's request body failed while the response was sent")]
    Upload(Option<super::BodyFailure>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // The rest of the request body goes up first, as far as it can now.
        if let (Some(up), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            match up.poll_send(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Ready(Err(SendFailure::Body)) => {
                    let failure = up.body.failure();
                    this.upload = None;
                    this.keep_alive = false;
                    this.done = true;
                    return Poll::Ready(Some(Err(ResponseError::Upload(failure))));
                }
                // The server stopped reading: its answer may still come.
                Poll::Ready(Err(SendFailure::Io(_))) => {
                    this.upload = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        match this.framing {
            Framing::Empty => {
                this.done = true;
                Poll::Ready(None)
            }
            Framing::Chunked => this.poll_chunked(cx),
            Framing::Length(_) | Framing::UntilClose => loop {
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                if !conn.buf.is_empty() {
                    let n = match this.framing {
                        Framing::Length(_) => (conn.buf.len() as u64).min(this.left) as usize,
                        _ => conn.buf.len(),
                    };
                    let data = conn.buf.split_to(n).freeze();
                    if let Framing::Length(_) = this.framing {
                        this.left -= n as u64;
                        if this.left == 0 {
                            this.done = true;
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                match ready!(conn.poll_read_more(cx)) {
                    Ok(0) if this.framing == Framing::UntilClose => {
                        this.done = true;
                        this.keep_alive = false;
                        return Poll::Ready(None);
                    }
                    Ok(0) => {
                        return this
                            .broken("the server closed the connection before the body's end")
                    }
                    Ok(_) => continue,
                    Err(e) => return this.broken(&e.to_string()),
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8], head_request: bool) -> Result<Option<Head>, String> {
        let mut b = BytesMut::from(raw);
        parse_head(&mut b, head_request)
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty, "HEAD has no body");
        let h = head(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 without keep-alive");
        let h = head(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        assert!(head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            false
        )
        .is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n", false).is_ok());
        assert!(head(b"HTTP/1.1 101 Switching\r\n\r\n", false).is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-le", false)
            .unwrap()
            .is_none());
        assert!(head(b"NOT HTTP\r\n\r\n", false).is_err());
    }

    #[test]
    fn header_values_share_the_read_buffer() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nx-a: one\r\nx-a: two\r\nserver: t\r\n\r\nrest"[..],
        );
        let h = parse_head(&mut b, false).unwrap().unwrap();
        let values: Vec<&str> = h
            .parts
            .headers
            .get_all("x-a")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(values, ["one", "two"]);
        assert_eq!(&b[..], b"rest", "the body's first bytes stay in the buffer");
    }

    #[test]
    fn request_heads_are_written_with_the_gateways_headers_and_framing() {
        let (parts, ()) = http::Request::builder()
            .method("POST")
            .uri("/up?x=1")
            .header("host", "h")
            .header("content-length", "3")
            .header("transfer-encoding", "chunked")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .body(())
            .unwrap()
            .into_parts();
        let mut req = Outgoing {
            parts,
            host: None,
            forwarded_for: HeaderValue::from_static("192.0.2.7"),
            forwarded: Some(HeaderValue::from_static("for=192.0.2.7")),
        };
        let mut out = BytesMut::new();
        encode_head(&req, false, &mut out);
        assert_eq!(
            &out[..],
            &b"POST /up?x=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\
               x-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\nforwarded: for=192.0.2.7\r\n\r\n"
                [..]
        );
        out.clear();
        req.host = Some(HeaderValue::from_static("other"));
        encode_head(&req, true, &mut out);
        assert_eq!(
            &out[..],
            &b"POST /up?x=1 HTTP/1.1\r\nhost: other\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\n\
               forwarded: for=192.0.2.7\r\ntransfer-encoding: chunked\r\n\r\n"[..]
        );
    }
}
