//! Response bodies, streamed through the gateway and never buffered whole.
//!
//! [`GatewayBody`] is either a short message of the gateway's own or a back end's body
//! ([`Proxied`]), which holds everything the request holds in service — the service slot,
//! the back-end connection's lease, the agreement credit, the in-flight gauge — until its
//! last byte, so a slot is released when the response *body* ends. Every chunk passes
//! through the class's bandwidth group. A back end that pauses its body past
//! `body_timeout_ms`, or a request past its class's `request_timeout_ms`, is cut off; a
//! client that stops reading is cut off by its connection's send timeout; however the body
//! ends, dropping it releases what it holds and counts why.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::conn::ConnState;
use crate::access::{AccessLog, Entry};
use crate::runtime::{ClassCore, InFlight};
use crate::sched::Permit;
use crate::shape::BandwidthGroup;
use crate::stats::{AbortReason, BackendFailure, BackendStats};
use crate::upstream::h1::{ResponseBody, ResponseError};
use crate::upstream::{BodyFailure, Lease};

/// Why a response body ended early, as the client's connection sees it.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The back end paused its body past the body timeout.
    #[error("the back end paused its response body longer than {timeout_ms} ms")]
    BackendPaused {
        /// The timeout.
        timeout_ms: u64,
    },
    /// The request passed its class's whole-request limit.
    #[error("the request took longer than {timeout_ms} ms")]
    RequestTimeout {
        /// The limit.
        timeout_ms: u64,
    },
    /// The back end broke off.
    #[error(transparent)]
    Backend(#[from] ResponseError),
}

/// What a proxied response holds while it streams.
pub struct Held {
    /// The service slot.
    pub permit: Permit,
    /// The class's in-flight gauge, raised while the request is in service.
    pub in_flight: InFlight,
    /// The back end's sensors.
    pub backend_stats: Arc<BackendStats>,
    /// The back end's body timeout.
    pub body_timeout: Duration,
    /// When service started.
    pub started: Instant,
    /// The class's whole-request deadline, if it has one.
    pub deadline: Option<(Instant, Duration)>,
    /// The class's bandwidth group.
    pub shaper: Option<Arc<BandwidthGroup>>,
    /// Teaches the class queue the response's size, for `shortest-first`.
    pub learn: Option<(Arc<ClassCore>, String)>,
    /// The access log and the request's entry, written when the response ends.
    pub access: Option<(Arc<AccessLog>, Entry)>,
}

/// A back end's response body with everything its request holds until the last byte.
pub struct Proxied {
    inner: ResponseBody,
    lease: Option<Lease>,
    held: Option<Held>,
    /// Paces the body through the bandwidth group, and times pauses of the back end.
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame waiting for the bandwidth group's go.
    shaped: Option<Frame<Bytes>>,
    /// When the back end last sent a frame (set once a pause is being timed).
    last_frame: Option<Instant>,
    bytes: u64,
    conn: ConnState,
}

impl Proxied {
    /// A back end's response body, holding `held` and the connection's `lease`.
    pub fn new(inner: ResponseBody, lease: Lease, held: Held, conn: ConnState) -> Proxied {
        Proxied {
            inner,
            lease: Some(lease),
            held: Some(held),
            timer: None,
            shaped: None,
            last_frame: None,
            bytes: 0,
            conn,
        }
    }

    /// Records the service time and releases what the request holds; the connection goes
    /// back to the pool only when the body ended cleanly. `aborted` says why it did not.
    fn finish(&mut self, aborted: Option<AbortReason>) {
        let Some(held) = self.held.take() else {
            return;
        };
        let ended = Instant::now();
        let elapsed = ended.saturating_duration_since(held.started);
        let class = held.in_flight.class();
        class.stats.service_time.observe(elapsed);
        held.backend_stats.service_time.observe(elapsed);
        match aborted {
            None => {
                if let Some(lease) = self.lease.take() {
                    lease.release(self.inner.take_reusable(), crate::clock::to_nanos(ended));
                }
                if let Some((core, path)) = &held.learn {
                    core.scheduler.observe_size(&core.sched, path, self.bytes);
                }
            }
            Some(reason) => {
                class.stats.abort(reason);
                if reason == AbortReason::BackendBodyTimeout {
                    held.backend_stats.failures[BackendFailure::BodyTimeout as usize]
                        .fetch_add(1, Relaxed);
                }
                // Not reusable: whatever is left of the exchange is unread.
                self.lease = None;
            }
        }
        // The slot and the gauge go last, after the sensors saw the end.
        if let Some((log, mut e)) = held.access {
            e.bytes_out = self.bytes;
            e.service = elapsed;
            e.reason = aborted.map(AbortReason::as_str);
            log.log(&e);
        }
        drop((held.permit, held.in_flight));
    }

    /// Whether the pause since the back end's last frame, or the whole request, has run
    /// past its limit; arranges a wake-up at the nearer deadline otherwise.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> Option<ResponseBodyError> {
        let held = self.held.as_ref()?;
        let last = *self.last_frame.get_or_insert_with(Instant::now);
        let mut deadline = last + held.body_timeout;
        let mut which = ResponseBodyError::BackendPaused {
            timeout_ms: held.body_timeout.as_millis() as u64,
        };
        if let Some((whole, limit)) = held.deadline {
            if whole < deadline {
                deadline = whole;
                which = ResponseBodyError::RequestTimeout {
                    timeout_ms: limit.as_millis() as u64,
                };
            }
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready().then_some(which)
    }

    fn poll_proxied(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        if self.shaped.is_some() {
            if let Some(timer) = self.timer.as_mut() {
                ready!(timer.as_mut().poll(cx));
            }
            return Poll::Ready(self.shaped.take().map(Ok));
        }
        // The back-end connection has no task of its own: reading this body reads it.
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if let Some(e) = self.timed_out(cx) {
                    let reason = match e {
                        ResponseBodyError::RequestTimeout { .. } => AbortReason::RequestTimeout,
                        _ => AbortReason::BackendBodyTimeout,
                    };
                    self.finish(Some(reason));
                    return Poll::Ready(Some(Err(e)));
                }
                return Poll::Pending;
            }
        };
        match frame {
            Some(Ok(frame)) => {
                if self.timer.is_some() {
                    self.last_frame = Some(Instant::now());
                }
                let Some(data) = frame.data_ref() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                let n = data.len() as u64;
                self.bytes += n;
                if let Some(held) = &self.held {
                    held.in_flight.class().stats.bytes_out.fetch_add(n, Relaxed);
                    held.backend_stats.bytes_out.fetch_add(n, Relaxed);
                    if let Some(shaper) = &held.shaper {
                        let wait = shaper.reserve(n, crate::clock::now());
                        if !wait.is_zero() {
                            let at = Instant::now() + wait;
                            let timer = self
                                .timer
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                            timer.as_mut().reset(at);
                            if timer.as_mut().poll(cx).is_pending() {
                                self.shaped = Some(frame);
                                // The pause is the gateway's own, not the back end's.
                                self.last_frame = Some(at);
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let reason = match &e {
                    ResponseError::Server(_) => AbortReason::BackendBodyBroken,
                    // The client's upload, still going up beside the answer, failed.
                    ResponseError::Upload(Some(BodyFailure::Timeout)) => {
                        AbortReason::RequestBodyTimeout
                    }
                    ResponseError::Upload(_) => AbortReason::RequestBodyBroken,
                };
                self.finish(Some(reason));
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.finish(None);
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Proxied {
    fn drop(&mut self) {
        if self.held.is_none() {
            return;
        }
        // Either the connection saw the end from the size hint and never polled for it (clean), or
        // the client's connection ended mid-body: it stopped reading, or went away.
        if self.inner.is_end_stream() && self.shaped.is_none() {
            self.finish(None);
        } else if self.conn.send_timed_out() {
            self.finish(Some(AbortReason::ClientSendTimeout));
        } else {
            self.finish(Some(AbortReason::ClientGone));
        }
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
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Message(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Proxied(p) => p.poll_proxied(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Message(b) => b.is_none(),
            Kind::Proxied(p) => p.held.is_none() || p.inner.is_end_stream() && p.shaped.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Message(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Proxied(p) => p.inner.size_hint(),
        }
    }
}
