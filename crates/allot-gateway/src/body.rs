//! Bodies streamed through the gateway, never buffered whole.
//!
//! [`RequestBody`] carries the client's body to the back end, counting bytes and cutting
//! it off past the size limit. [`GatewayBody`] carries a response to the client: either a
//! short message of the gateway's own or the back end's body, which holds the service
//! slot and the connection lease until its last byte (so a slot is released when the
//! response *body* ends) and passes every chunk through the class's bandwidth group.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use allot_model::bucket::TokenBucket;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::conn::ConnState;
use crate::sched::Permit;
use crate::stats::{BackendStats, ClassStats};
use crate::upstream::Lease;

/// Errors of a streamed body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent more than the limit.
    #[error("request body larger than {limit_bytes} bytes")]
    TooLarge {
        /// The limit.
        limit_bytes: u64,
    },
    /// The other side broke off.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// The client's request body on its way to the back end.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit_bytes: u64,
    seen_bytes: u64,
    stats: Arc<ClassStats>,
    /// Set when the limit was passed, so the handler answers 413.
    pub too_large: Arc<AtomicBool>,
}

impl RequestBody {
    /// Wraps the client's body with a size limit.
    pub fn new(inner: Incoming, limit_bytes: u64, stats: Arc<ClassStats>) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            limit_bytes,
            seen_bytes: 0,
            stats,
            too_large: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    self.seen_bytes += n;
                    self.stats.bytes_in.fetch_add(n, Relaxed);
                    if self.seen_bytes > self.limit_bytes {
                        self.too_large.store(true, Relaxed);
                        self.inner = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge {
                            limit_bytes: self.limit_bytes,
                        })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

/// A shared output-bandwidth group.
pub type BandwidthGroup = Arc<Mutex<TokenBucket>>;

/// What a proxied response holds until its last byte.
pub struct Proxied {
    inner: Incoming,
    permit: Option<Permit>,
    lease: Option<Lease>,
    shaper: Option<BandwidthGroup>,
    delay: Option<Pin<Box<Sleep>>>,
    held: Option<Frame<Bytes>>,
    class_stats: Arc<ClassStats>,
    backend_stats: Arc<BackendStats>,
    started: Instant,
    bytes: u64,
    /// Called once at the end with the bytes sent (to learn response sizes).
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl Proxied {
    /// A back end's response body with everything it must hold.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: Incoming,
        permit: Permit,
        lease: Lease,
        shaper: Option<BandwidthGroup>,
        class_stats: Arc<ClassStats>,
        backend_stats: Arc<BackendStats>,
        started: Instant,
        on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
    ) -> Proxied {
        Proxied {
            inner,
            permit: Some(permit),
            lease: Some(lease),
            shaper,
            delay: None,
            held: None,
            class_stats,
            backend_stats,
            started,
            bytes: 0,
            on_end,
        }
    }

    /// Records the service time and releases the slot; the connection goes back to the
    /// pool only when the body ended cleanly.
    fn finish(&mut self, clean: bool) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        self.class_stats.service_time.observe(elapsed);
        self.backend_stats.service_time.observe(elapsed);
        self.class_stats
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(lease) = self.lease.take() {
            if clean {
                lease.release_clean();
            }
        }
        if clean {
            if let Some(f) = self.on_end.take() {
                f(self.bytes);
            }
        }
        drop(permit);
    }

    fn poll_proxied(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(delay) = self.delay.as_mut() {
            ready!(delay.as_mut().poll(cx));
            self.delay = None;
            if let Some(frame) = self.held.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        // The back-end connection has no task of its own: reading this body drives it,
        // when what it already read is used up.
        let mut frame = Pin::new(&mut self.inner).poll_frame(cx);
        if frame.is_pending() {
            if let Some(lease) = self.lease.as_mut() {
                lease.poll_io(cx);
                frame = Pin::new(&mut self.inner).poll_frame(cx);
            }
        }
        match ready!(frame) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    self.bytes += n;
                    self.class_stats.bytes_out.fetch_add(n, Relaxed);
                    self.backend_stats.bytes_out.fetch_add(n, Relaxed);
                    if let Some(shaper) = &self.shaper {
                        let wait = shaper
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .reserve(n as f64, crate::clock::now());
                        if !wait.is_zero() {
                            let mut delay = Box::pin(tokio::time::sleep(wait));
                            if delay.as_mut().poll(cx).is_pending() {
                                self.delay = Some(delay);
                                self.held = Some(frame);
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.finish(true);
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Proxied {
    fn drop(&mut self) {
        // Either hyper saw the end from the size hint and never polled for it (clean), or
        // the client went away mid-body and the back-end connection is not reusable.
        let clean = self.inner.is_end_stream() && self.held.is_none();
        self.finish(clean);
    }
}

enum Kind {
    Message(Option<Bytes>),
    Proxied(Box<Proxied>),
}

/// Every response body the gateway sends.
pub struct GatewayBody {
    kind: Kind,
    conn: Option<ConnState>,
}

impl GatewayBody {
    /// A short body of the gateway's own.
    pub fn message(text: impl Into<Bytes>) -> GatewayBody {
        GatewayBody {
            kind: Kind::Message(Some(text.into())),
            conn: None,
        }
    }

    /// A back end's body.
    pub fn proxied(p: Proxied) -> GatewayBody {
        GatewayBody {
            kind: Kind::Proxied(Box::new(p)),
            conn: None,
        }
    }

    /// Tells `conn` when this response is over, so the next request head is timed.
    pub fn with_conn(mut self, conn: ConnState) -> GatewayBody {
        self.conn = Some(conn);
        self
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.response_done();
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Message(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Proxied(p) => p.poll_proxied(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Message(b) => b.is_none(),
            Kind::Proxied(p) => p.permit.is_none() || p.inner.is_end_stream() && p.held.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Message(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Proxied(p) => p.inner.size_hint(),
        }
    }
}
