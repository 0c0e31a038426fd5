//! The client's request body on its way to the back end: read from its source (the
//! client's connection, behind [`BodySource`], so this module needs nothing of the
//! server side), streamed, counted, cut off past the size limit or a pause longer than
//! the body timeout. Why it failed is kept in it ([`RequestBody::failure`]) for the
//! request's handler to read after the exchange, so a client's broken or stalled upload
//! is answered as the client's fault (400, 408, 413) and never counted against the back
//! end.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::stats::ClassStats;

/// Where a client's request body is read from (its connection), as the back end takes
/// it.
pub trait BodySource: Send + Sync {
    /// The body's next bytes and whether they were its last; `None` at its end; or why
    /// it cannot be read.
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<Result<(Bytes, bool), String>>>;
}

/// The client's request body as it comes from its source.
pub struct ClientBody {
    source: Option<Arc<dyn BodySource>>,
    /// For a body of known length: bytes left; `None` for a chunked one.
    left_bytes: Option<u64>,
    done: bool,
}

impl std::fmt::Debug for ClientBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBody")
            .field("left_bytes", &self.left_bytes)
            .field("done", &self.done)
            .finish()
    }
}

impl ClientBody {
    /// A body that is empty.
    pub fn empty() -> ClientBody {
        ClientBody {
            source: None,
            left_bytes: Some(0),
            done: true,
        }
    }

    /// A body read from `source`, of `left_bytes` bytes when its length is known.
    pub fn new(source: Arc<dyn BodySource>, left_bytes: Option<u64>) -> ClientBody {
        ClientBody {
            source: Some(source),
            left_bytes,
            done: false,
        }
    }
}

/// Why the client's request body could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(String);

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        let Some(source) = this.source.as_ref().filter(|_| !this.done) else {
            return Poll::Ready(None);
        };
        match ready!(source.poll_data(cx)) {
            Some(Ok((data, last))) => {
                this.done = last;
                if let Some(left) = this.left_bytes.as_mut() {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(ClientBodyError(e))))
            }
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.left_bytes {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Errors of the client's body, as the back-end connection sees them.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent more than the limit.
    #[error("request body larger than {limit_bytes} bytes")]
    TooLarge {
        /// The limit.
        limit_bytes: u64,
    },
    /// The client paused longer than the body timeout.
    #[error("request body paused longer than {timeout_ms} ms")]
    Timeout {
        /// The timeout.
        timeout_ms: u64,
    },
    /// The client's body was malformed or cut short.
    #[error(transparent)]
    Broken(#[from] ClientBodyError),
}

/// How the client's body ended, when it did not end well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// Larger than the limit.
    TooLarge,
    /// Paused past the timeout.
    Timeout,
    /// Malformed or cut short.
    Broken,
}

/// The client's request body on its way to the back end.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<ClientBody>,
    limit_bytes: u64,
    seen_bytes: u64,
    stats: Arc<ClassStats>,
    idle: Duration,
    /// When the last frame came (or the body was first polled).
    last_frame: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    failure: Option<BodyFailure>,
}

impl RequestBody {
    /// Wraps the client's body with a size limit and a timeout on pauses.
    pub fn new(
        inner: ClientBody,
        limit_bytes: u64,
        idle: Duration,
        stats: Arc<ClassStats>,
    ) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            limit_bytes,
            seen_bytes: 0,
            stats,
            idle,
            last_frame: None,
            timer: None,
            failure: None,
        }
    }

    /// Why the body failed, if it did.
    pub fn failure(&self) -> Option<BodyFailure> {
        self.failure
    }

    fn fail(
        &mut self,
        f: BodyFailure,
        e: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.failure.get_or_insert(f);
        self.inner = None;
        self.timer = None;
        Poll::Ready(Some(Err(e)))
    }

    /// Whether the pause since the last frame has passed the timeout; arranges a wake-up
    /// at the deadline otherwise.
    fn paused_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let last = *self.last_frame.get_or_insert_with(Instant::now);
        let deadline = last + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
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
        let polled = Pin::new(inner).poll_frame(cx);
        let Poll::Ready(frame) = polled else {
            if self.paused_too_long(cx) {
                let timeout_ms = self.idle.as_millis() as u64;
                return self.fail(BodyFailure::Timeout, BodyError::Timeout { timeout_ms });
            }
            return Poll::Pending;
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    self.seen_bytes += n;
                    self.stats.bytes_in.fetch_add(n, Relaxed);
                    if self.seen_bytes > self.limit_bytes {
                        let limit_bytes = self.limit_bytes;
                        return self
                            .fail(BodyFailure::TooLarge, BodyError::TooLarge { limit_bytes });
                    }
                }
                if self.timer.is_some() {
                    self.last_frame = Some(Instant::now());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => self.fail(BodyFailure::Broken, BodyError::Broken(e)),
            None => {
                self.timer = None;
                Poll::Ready(None)
            }
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
