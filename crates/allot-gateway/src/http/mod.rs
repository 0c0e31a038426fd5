//! The L7 path: one request, in small steps — registration checks ([`forward::target`]),
//! classification, admission ([`crate::admission`]: accept rate, agreement credit, a
//! place and a slot from the scheduler), service (forward, stream the response back). Each step either goes on or
//! stops with an [`error::Answer`], which [`error::respond`] turns into the response.
//!
//! Everything a request holds is held by a guard that releases it however the request
//! ends (refused, timed out, client gone mid-wait or mid-body): its place in the waiting
//! room, its credit until service starts, its slot, the in-flight gauge, the back-end
//! connection. A request reads the clock three times: on arrival, when service starts,
//! when its response ends.

pub(crate) mod body;
pub(crate) mod conn;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod h1;

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use allot_model::classify::{Headers, RequestFacts};
use http::header::{self, HeaderMap};
use http::{Request, Response};
use http_body::Body as _;
use tokio::time::Instant;

use self::body::{GatewayBody, Held, Proxied};
use self::conn::ConnState;
use self::error::Answer;
use self::forward::{Peer, Target};
use crate::access;
use crate::admission::{self, Admitted, Unit};
use crate::runtime::{ClassRt, InFlight, ListenerRt, Live, Runtime};
use crate::sched::Permit;
use crate::stats::{AbortReason, RefuseReason};
use crate::upstream::{BodyFailure, ClientBody, RequestBody};

/// The entry point of one request on one client connection of listener `listener`
/// (its index in the configuration).
pub(crate) async fn handle(
    live: Arc<Live>,
    listener: usize,
    peer: Arc<Peer>,
    conn: ConnState,
    req: Request<ClientBody>,
) -> Result<Response<GatewayBody>, Infallible> {
    conn.request_started();
    let rt = live.load();
    // The access log's entry, filled as the request goes (only when the log is on).
    let mut entry = rt.access_log.as_ref().map(|_| entry_for(&req, &peer));
    let served = match rt.listeners.get(listener) {
        Some(l) => serve(&rt, l, &live, &peer, &conn, req, &mut entry).await,
        None => Err(Answer::Internal("the connection's listener is gone")),
    };
    let resp = match served {
        Ok(resp) => resp,
        Err(answer) => {
            let resp = error::respond(answer, rt.config.gateway.retry_after_s);
            if let (Some(log), Some(mut e)) = (&rt.access_log, entry) {
                e.status = Some(resp.status().as_u16());
                e.bytes_out = resp.body().size_hint().exact().unwrap_or(0);
                log.log(&e);
            }
            resp
        }
    };
    Ok(resp.map(|b| b.with_conn(conn)))
}

/// The access log's entry of a request, as far as its head tells.
fn entry_for(req: &Request<ClientBody>, peer: &Peer) -> access::Entry {
    let header = |h: header::HeaderName| {
        req.headers()
            .get(h)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    access::Entry {
        at: Some(std::time::SystemTime::now()),
        client: Some(peer.addr.ip()),
        method: Some(req.method().to_string()),
        target: path_and_query(req).to_string(),
        referer: header(header::REFERER),
        user_agent: header(header::USER_AGENT),
        ..access::Entry::default()
    }
}

/// The request target's length as it was on the request line, in bytes.
fn target_len(uri: &http::Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + "://".len());
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let path = uri.path_and_query().map_or(0, |p| p.as_str().len());
    scheme + authority + path
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

#[allow(clippy::too_many_arguments)]
async fn serve(
    rt: &Runtime,
    listener: &ListenerRt,
    live: &Live,
    peer: &Peer,
    conn: &ConnState,
    req: Request<ClientBody>,
    entry: &mut Option<access::Entry>,
) -> Result<Response<GatewayBody>, Answer> {
    let arrived = Instant::now();
    let now = crate::clock::to_nanos(arrived);
    let max_uri = listener.config.max_uri_bytes;
    if target_len(req.uri()) > max_uri {
        return Err(Answer::UriTooLong {
            limit_bytes: max_uri,
        });
    }
    // Registration: a target the gateway and the back end read alike.
    let target = forward::target(&req)?;
    let class = classify(rt, listener, peer, &req, &target)?;
    class.core.stats.arrivals.fetch_add(1, Relaxed);
    if let Some(e) = entry.as_mut() {
        e.class = Some(class.name().to_string());
    }
    let max_body = listener.max_body_bytes;
    if content_length(req.headers()).is_some_and(|n| n > max_body) {
        return Err(Answer::TooLarge {
            limit_bytes: max_body,
        });
    }
    let unit = Unit {
        client: peer.addr.ip(),
        path: req.uri().path(),
        listener: &listener.name,
        redirectable: true,
        now,
    };
    let (permit, charge) = match admission::admit(rt, live, class, unit).await {
        Ok(Admitted::Serve(permit, charge)) => (permit, charge),
        Ok(Admitted::RedirectTo(base)) => {
            return Err(Answer::Redirect {
                location: format!("{base}{}", path_and_query(&req)),
                wait_s: None,
            })
        }
        // Back to the gateway itself, later (the paper's layer-7 redirector).
        Ok(Admitted::TryLater) => {
            let host = target.host_str().unwrap_or("localhost");
            return Err(Answer::Redirect {
                location: format!("http://{host}{}", path_and_query(&req)),
                wait_s: Some(rt.config.gateway.retry_after_s),
            });
        }
        Err(reason) => {
            if let Some(e) = entry.as_mut() {
                e.reason = Some(reason.as_str());
                e.queue = arrived.elapsed();
            }
            return Err(refused(class, reason));
        }
    };
    // Service.
    let started = Instant::now();
    class
        .core
        .stats
        .queue_delay
        .observe(started.saturating_duration_since(arrived));
    class.core.stats.admitted.fetch_add(1, Relaxed);
    if let Some(charge) = charge {
        charge.keep();
    }
    if let Some(e) = entry.as_mut() {
        e.queue = started.saturating_duration_since(arrived);
    }
    forward(
        rt, listener, class, peer, conn, req, target, permit, started, entry,
    )
    .await
}

fn classify<'r>(
    rt: &'r Runtime,
    listener: &ListenerRt,
    peer: &Peer,
    req: &Request<ClientBody>,
    target: &Target,
) -> Result<&'r ClassRt, Answer> {
    let facts = RequestFacts {
        client: peer.addr.ip(),
        host: target.host_str(),
        path: req.uri().path(),
        headers: &HeaderView(req.headers()),
        listener: Some(&listener.name),
        first_bytes: b"",
    };
    let picked = rt
        .rules
        .classify_from(listener.entry, &facts, &mut || rand::random::<f64>());
    rt.class_of_rule(picked)
        .ok_or(Answer::Internal("the rules name no class"))
}

fn refused(class: &ClassRt, reason: RefuseReason) -> Answer {
    Answer::Refused {
        text: class.refusal_text(reason),
    }
}

/// Service: hand the request to a back end and stream its response back, holding the slot
/// in the response body.
#[allow(clippy::too_many_arguments)]
async fn forward(
    rt: &Runtime,
    listener: &ListenerRt,
    class: &ClassRt,
    peer: &Peer,
    conn: &ConnState,
    req: Request<ClientBody>,
    target: Target,
    permit: Permit,
    started: Instant,
    entry: &mut Option<access::Entry>,
) -> Result<Response<GatewayBody>, Answer> {
    let backend = rt
        .backend_for(class)
        .ok_or(Answer::Internal("the class's back end is not configured"))?;
    if let Some(e) = entry.as_mut() {
        e.backend = Some(backend.name().to_string());
    }
    let in_flight = InFlight::new(Arc::clone(&class.core));
    let learn = class
        .learn_sizes
        .then(|| (Arc::clone(&class.core), req.uri().path().to_string()));
    let (parts, body) = req.into_parts();
    let body = RequestBody::new(
        body,
        listener.max_body_bytes,
        listener.request_body_timeout,
        Arc::clone(&class.core.stats),
    );
    let upstream = forward::upstream_request(parts, peer, target);
    let started_ns = crate::clock::to_nanos(started);
    let sending = backend.send(&upstream, body, started, started_ns);
    // The class's whole-request limit covers the wait for the response head too.
    let sent = match class.request_timeout {
        Some(limit) => match tokio::time::timeout_at(started + limit, sending).await {
            Ok(sent) => sent,
            Err(_) => {
                let stats = &class.core.stats;
                stats.service_time.observe(started.elapsed());
                stats.abort(AbortReason::RequestTimeout);
                drop((permit, in_flight));
                if let Some(e) = entry.as_mut() {
                    e.service = started.elapsed();
                    e.reason = Some(AbortReason::RequestTimeout.as_str());
                }
                return Err(Answer::RequestTimeout {
                    timeout_ms: limit.as_millis() as u64,
                });
            }
        },
        None => sending.await,
    };
    match sent {
        Ok((resp, lease)) => {
            let (mut parts, body) = resp.into_parts();
            forward::strip_hop_by_hop(&mut parts.headers);
            let access = match (&rt.access_log, entry.take()) {
                (Some(log), Some(mut e)) => {
                    e.status = Some(parts.status.as_u16());
                    e.address = Some(lease.addr());
                    Some((Arc::clone(log), e))
                }
                _ => None,
            };
            let held = Held {
                permit,
                in_flight,
                backend_stats: Arc::clone(backend.stats()),
                body_timeout: backend.body_timeout(),
                started,
                deadline: class.request_timeout.map(|t| (started + t, t)),
                shaper: class.bandwidth.clone(),
                learn,
                access,
            };
            let body = Proxied::new(body, lease, held, conn.clone());
            Ok(Response::from_parts(parts, GatewayBody::proxied(body)))
        }
        Err((err, body)) => {
            let stats = &class.core.stats;
            stats.service_time.observe(started.elapsed());
            drop((permit, in_flight));
            let failure = body.failure();
            drop(body);
            if let Some(e) = entry.as_mut() {
                e.service = started.elapsed();
                e.reason = Some(match failure {
                    Some(BodyFailure::TooLarge) => "request_body_too_large",
                    Some(BodyFailure::Timeout) => AbortReason::RequestBodyTimeout.as_str(),
                    Some(BodyFailure::Broken) => AbortReason::RequestBodyBroken.as_str(),
                    None => err.kind().as_str(),
                });
            }
            match failure {
                // The client's body failed, not the back end.
                Some(BodyFailure::TooLarge) => Err(Answer::TooLarge {
                    limit_bytes: listener.max_body_bytes,
                }),
                Some(BodyFailure::Timeout) => {
                    stats.abort(AbortReason::RequestBodyTimeout);
                    Err(Answer::BodyTimeout)
                }
                Some(BodyFailure::Broken) => {
                    stats.abort(AbortReason::RequestBodyBroken);
                    Err(Answer::BodyBroken)
                }
                None => {
                    stats.failed.fetch_add(1, Relaxed);
                    backend.note_failure(&err, crate::clock::now());
                    tracing::debug!(class = %class.name(), error = %err, "forwarding failed");
                    Err(Answer::Forward(err))
                }
            }
        }
    }
}

fn path_and_query<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |pq| pq.as_str())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn content_length_parses_or_is_absent() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        assert_eq!(content_length(&h), Some(42));
    }
}
