//! One request's path: classify, admit, wait for a slot, forward, stream the response.
//! Every outcome the gateway produces itself is made in [`reply`], in one place.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use allot_model::classify::{Headers, RequestFacts};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::agreements::Credit;
use crate::body::{GatewayBody, Proxied, RequestBody};
use crate::conn::ConnState;
use crate::sched::{Admission, Permit};
use crate::state::{ClassRt, Gateway};
use crate::stats::{BackendFailure, RefuseReason};

/// hyper's entry point for one request on one client connection.
pub(crate) async fn handle(
    gw: Gateway,
    peer: Arc<Peer>,
    conn: ConnState,
    req: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    conn.request_started();
    let resp = serve(&gw, &peer, req).await;
    Ok(resp.map(|b| b.with_conn(conn)))
}

/// A client connection's address and its forms in the forwarding headers, formatted
/// once per connection rather than once per request.
#[derive(Debug)]
pub(crate) struct Peer {
    addr: SocketAddr,
    /// The address as `X-Forwarded-For` lists it.
    xff: HeaderValue,
    /// The address as a `Forwarded` node (`for=…`).
    forwarded_for: String,
    /// The last request's `Host` and the `Forwarded` element made with it: clients send
    /// the same `Host` on every request of a connection.
    last_forwarded: std::sync::Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl Peer {
    /// The forms of `addr`, for every request of its connection.
    pub(crate) fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let forwarded_for = if ip.is_ipv6() {
            format!("for=\"[{ip}]\"")
        } else {
            format!("for={ip}")
        };
        Peer {
            addr,
            xff: HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            forwarded_for,
            last_forwarded: std::sync::Mutex::new(None),
        }
    }

    /// This client's `Forwarded` element for a request with `host` (already checked to be
    /// usable in a quoted string).
    fn forwarded_element(&self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        let mut last = self
            .last_forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let (Some((h, element)), Some(host)) = (last.as_ref(), host) {
            if h == host {
                return Some(element.clone());
            }
        }
        let mut element = Vec::with_capacity(self.forwarded_for.len() + 64);
        element.extend_from_slice(self.forwarded_for.as_bytes());
        if let Some(h) = host {
            element.extend_from_slice(b";host=\"");
            element.extend_from_slice(h.as_bytes());
            element.push(b'"');
        }
        element.extend_from_slice(b";proto=http");
        let element = HeaderValue::from_maybe_shared(bytes::Bytes::from(element)).ok()?;
        if let Some(h) = host {
            *last = Some((h.clone(), element.clone()));
        }
        Some(element)
    }
}

/// The classifier's view of an `http::HeaderMap`.
struct HeaderView<'a>(&'a HeaderMap);

impl Headers for HeaderView<'_> {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for v in self.0.get_all(name) {
            f(v.as_bytes());
        }
    }
}

async fn serve(gw: &Gateway, peer: &Peer, req: Request<Incoming>) -> Response<GatewayBody> {
    let client = peer.addr.ip();
    let arrived = Instant::now();
    let settings = gw.settings();
    let config = &settings.config;
    let retry_after = config.gateway.retry_after_s;

    // Classification.
    let rules = gw.rules();
    let picked = {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host());
        let facts = RequestFacts {
            client,
            host,
            path: req.uri().path(),
            headers: &HeaderView(req.headers()),
        };
        rules.set.classify(&facts, &mut || rand::random::<f64>())
    };
    let index = rules.to_class.get(picked).copied().unwrap_or(0);
    let Some(class) = gw.class(index) else {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "allot: no such class\n",
            None,
        );
    };
    class.stats.arrivals.fetch_add(1, Relaxed);
    let cfg = class.cfg.read().unwrap_or_else(|p| p.into_inner()).clone();

    // Bounds on what the client sends.
    let max_body = config.listener.max_body_bytes;
    if content_length(req.headers()).is_some_and(|n| n > max_body) {
        return too_large(max_body);
    }

    // Admission: the accept-rate actuator, then a slot or a place in the queue.
    let now = crate::clock::to_nanos(arrived);
    if let Some(bucket) = class
        .accept
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
    {
        if !bucket.try_take(1.0, now) {
            return refused(&class, RefuseReason::Rate, retry_after);
        }
    }
    if cfg.retired {
        return refused(&class, RefuseReason::QueueFull, retry_after);
    }

    // Agreements: within the principal's credit, or wait for a later window's.
    if let Some(enforcer) = gw.enforcer() {
        if let Some(principal) = enforcer.principal_of(index) {
            let credit = enforcer.arrive(principal, req.uri().path(), now);
            if enforcer.redirect() {
                return match credit {
                    Credit::Now => match enforcer.location(principal, rand::random::<f64>()) {
                        Some(base) => redirect(format!("{base}{}", path_and_query(&req)), None),
                        None => reply(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "allot: no server location\n",
                            None,
                        ),
                    },
                    // Back to the gateway itself, later (the paper's layer-7 redirector).
                    Credit::Wait(_) => {
                        let host = req
                            .headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("localhost");
                        redirect(
                            format!("http://{host}{}", path_and_query(&req)),
                            Some(retry_after),
                        )
                    }
                };
            }
            if let Credit::Wait(rx) = credit {
                let granted = matches!(
                    tokio::time::timeout(enforcer.max_wait(), rx).await,
                    Ok(Ok(()))
                );
                enforcer.settle(principal, granted);
                if !granted {
                    return refused(&class, RefuseReason::Quota, retry_after);
                }
            }
        }
    }
    let permit = match gw.inner.sched.admit(index, req.uri().path(), client, now) {
        Admission::Now(p) => p,
        Admission::Refused(reason) => return refused(&class, reason, retry_after),
        Admission::Wait(rx, ticket) => {
            let mut waiting = Waiting {
                gw,
                class: index,
                ticket: Some(ticket),
            };
            match waiting.wait(rx, cfg.max_wait).await {
                Some(p) => p,
                None => return refused(&class, RefuseReason::Timeout, retry_after),
            }
        }
    };
    class.stats.queue_delay.observe(arrived.elapsed());
    class.stats.admitted.fetch_add(1, Relaxed);
    class.stats.in_flight.fetch_add(1, Relaxed);

    // Service.
    // The `utilisation` controller may divert a share of the class to a degraded variant.
    let Some(backend) = gw.backend(class.divert.pick(cfg.backend)) else {
        class.stats.in_flight.fetch_sub(1, Relaxed);
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "allot: no such back end\n",
            None,
        );
    };
    let path = cfg.learn_sizes.then(|| req.uri().path().to_string());
    let (parts, body) = req.into_parts();
    let body = RequestBody::new(body, max_body, Arc::clone(&class.stats));
    let too_big = Arc::clone(&body.too_large);
    let upstream = upstream_request(parts, body, peer);
    let started = Instant::now();
    match backend.send(upstream).await {
        Ok((resp, lease)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let on_end = path.map(|path| {
                let sched = Arc::clone(&gw.inner.sched);
                Box::new(move |bytes: u64| sched.observe_size(index, &path, bytes))
                    as Box<dyn FnOnce(u64) + Send + Sync>
            });
            let body = Proxied::new(
                body,
                permit,
                lease,
                cfg.bandwidth,
                Arc::clone(&class.stats),
                Arc::clone(&backend.stats),
                started,
                on_end,
            );
            Response::from_parts(parts, GatewayBody::proxied(body))
        }
        Err(err) => {
            class.stats.in_flight.fetch_sub(1, Relaxed);
            class.stats.service_time.observe(started.elapsed());
            drop(permit);
            if too_big.load(Relaxed) {
                return too_large(max_body);
            }
            class.stats.failed.fetch_add(1, Relaxed);
            backend.stats.failures[err.kind() as usize].fetch_add(1, Relaxed);
            tracing::warn!(class = %class.name, error = %err, "forwarding failed");
            let status = match err.kind() {
                BackendFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            reply(status, format!("allot: {err}\n"), None)
        }
    }
}

/// A request waiting in its class queue; giving up (timeout, or the client leaving and
/// the future being dropped) takes it out of the queue.
struct Waiting<'a> {
    gw: &'a Gateway,
    class: usize,
    ticket: Option<allot_model::queue::Ticket>,
}

impl Waiting<'_> {
    async fn wait(
        &mut self,
        mut rx: tokio::sync::oneshot::Receiver<Permit>,
        max_wait: std::time::Duration,
    ) -> Option<Permit> {
        match tokio::time::timeout(max_wait, &mut rx).await {
            Ok(Ok(permit)) => {
                self.ticket = None;
                Some(permit)
            }
            Ok(Err(_)) => {
                self.ticket = None;
                None
            }
            Err(_) => {
                let ticket = self.ticket.take()?;
                if self.gw.inner.sched.give_up(self.class, ticket) {
                    None
                } else {
                    // Granted just as time ran out: serve it rather than waste the slot.
                    rx.try_recv().ok()
                }
            }
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.gw.inner.sched.give_up(self.class, ticket);
        }
    }
}

fn path_and_query<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |pq| pq.as_str())
}

fn redirect(location: String, retry_after_s: Option<u64>) -> Response<GatewayBody> {
    let mut resp = reply(StatusCode::TEMPORARY_REDIRECT, "", retry_after_s);
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => reply(
            StatusCode::BAD_REQUEST,
            "allot: request target not usable in a redirect\n",
            None,
        ),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn refused(class: &ClassRt, reason: RefuseReason, retry_after_s: u64) -> Response<GatewayBody> {
    class.stats.refuse(reason);
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("allot: class {} refused: {}\n", class.name, reason.as_str()),
        Some(retry_after_s),
    )
}

fn too_large(limit: u64) -> Response<GatewayBody> {
    let mut resp = reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("allot: request body larger than {limit} bytes\n"),
        None,
    );
    // The rest of the body is unread: the connection cannot carry another request.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Every response the gateway makes itself: a status and a one-line body.
pub(crate) fn reply(
    status: StatusCode,
    text: impl Into<bytes::Bytes>,
    retry_after_s: Option<u64>,
) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::message(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(s) = retry_after_s {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than nine removals.
    if !headers
        .keys()
        .any(|k| k == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // hyper frames the body itself (length or chunked) on each side.
    headers.remove(header::TRANSFER_ENCODING);
}

fn upstream_request(
    mut parts: http::request::Parts,
    body: RequestBody,
    peer: &Peer,
) -> Request<RequestBody> {
    strip_hop_by_hop(&mut parts.headers);
    // Room for the two headers added below, in one step.
    parts.headers.reserve(2);
    let xff = match parts.headers.get(&X_FORWARDED_FOR) {
        Some(prev) => joined(prev.as_bytes(), peer.xff.as_bytes()),
        None => Some(peer.xff.clone()),
    };
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    let host = parts.headers.get(header::HOST).filter(|h| {
        h.as_bytes()
            .iter()
            .all(|b| b.is_ascii_graphic() && *b != b'"')
    });
    if let Some(element) = peer.forwarded_element(host) {
        let forwarded = match parts.headers.get(header::FORWARDED) {
            Some(prev) => joined(prev.as_bytes(), element.as_bytes()),
            None => Some(element),
        };
        if let Some(v) = forwarded {
            parts.headers.insert(header::FORWARDED, v);
        }
    }
    // Origin form towards the back end.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = http::Uri::from(pq);
        }
    }
    Request::from_parts(parts, body)
}

/// `prev, next`: a list header with one more element; `None` if `prev` is not a valid value.
fn joined(prev: &[u8], next: &[u8]) -> Option<HeaderValue> {
    let mut v = Vec::with_capacity(prev.len() + 2 + next.len());
    v.extend_from_slice(prev);
    v.extend_from_slice(b", ");
    v.extend_from_slice(next);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn content_length_parses_or_is_absent() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        assert_eq!(content_length(&h), Some(42));
    }
}
