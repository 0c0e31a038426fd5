//! A request's target as the gateway judges it, and the request as the back end gets it.
//!
//! The gateway and the back end must read a request the same way, or one request could be
//! classified as one thing and served as another (RFC 9112 §3.2, §11.2): a request with
//! two `Host` headers, or an HTTP/1.1 request without one, is refused with 400; an
//! absolute-form target's authority replaces `Host` (classified and forwarded alike);
//! `Connection` cannot strip `Host`. Towards the back end: HTTP/1.1, hop-by-hop headers
//! removed, the client appended to `X-Forwarded-For` and `Forwarded`, origin-form target,
//! and a body of unknown length sent chunked whatever the method (hyper would otherwise
//! drop a GET's body).

use std::net::SocketAddr;
use std::sync::Mutex;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use http_body::Body;

use super::error::Answer;
use crate::upstream::RequestBody;

/// A client connection's addresses and their forms in the forwarding headers, formatted
/// once per connection rather than once per request.
#[derive(Debug)]
pub(crate) struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The gateway's address the client connected to (the `Host` of an HTTP/1.0 request
    /// that named none).
    local: HeaderValue,
    /// The address as `X-Forwarded-For` lists it.
    xff: HeaderValue,
    /// The address as a `Forwarded` node (`for=…`).
    forwarded_for: String,
    /// The last request's `Host` and the `Forwarded` element made with it: clients send
    /// the same `Host` on every request of a connection. Per connection, never shared.
    last_forwarded: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl Peer {
    /// The forms of `addr`, for every request of its connection to `local`.
    pub(crate) fn new(addr: SocketAddr, local: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let forwarded_for = if ip.is_ipv6() {
            format!("for=\"[{ip}]\"")
        } else {
            format!("for={ip}")
        };
        Peer {
            addr,
            local: HeaderValue::from_maybe_shared(bytes::Bytes::from(local.to_string()))
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            xff: HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            forwarded_for,
            last_forwarded: Mutex::new(None),
        }
    }

    /// This client's `Forwarded` element for a request with `host`.
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
            element.extend_from_slice(b";host=");
            quoted(h.as_bytes(), &mut element);
        }
        element.extend_from_slice(b";proto=http");
        let element = HeaderValue::from_maybe_shared(bytes::Bytes::from(element)).ok()?;
        if let Some(h) = host {
            *last = Some((h.clone(), element.clone()));
        }
        Some(element)
    }
}

/// `value` as a quoted-string (RFC 9110 §5.6.4): `"` and `\` escaped.
fn quoted(value: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// What the gateway judged of a request's target: the host it is for, as both the
/// classifier and the back end see it.
#[derive(Debug)]
pub(crate) struct Target {
    /// The host (`Host`, or the authority of an absolute-form target); `None` only for an
    /// HTTP/1.0 request that named none.
    pub host: Option<HeaderValue>,
    /// The host came from an absolute-form target, and replaces `Host` towards the back
    /// end.
    replaces_host: bool,
}

impl Target {
    /// The host as text, for the classifier.
    pub fn host_str(&self) -> Option<&str> {
        self.host.as_ref().and_then(|h| h.to_str().ok())
    }
}

/// Checks the request's method and target, and finds its host.
pub(crate) fn target<B>(req: &Request<B>) -> Result<Target, Answer> {
    if req.method() == Method::CONNECT {
        return Err(Answer::Connect);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Answer::BadRequest("more than one Host header"));
    }
    if let Some(authority) = req.uri().authority() {
        // Absolute form: the target's authority is the host, whatever `Host` says.
        let host = authority.as_str().rsplit('@').next().unwrap_or("");
        let host = HeaderValue::from_str(host)
            .map_err(|_| Answer::BadRequest("request target authority is not a valid host"))?;
        return Ok(Target {
            host: Some(host),
            replaces_host: true,
        });
    }
    match first {
        Some(h) if h.is_empty() => Err(Answer::BadRequest("empty Host header")),
        Some(h) => Ok(Target {
            host: Some(h.clone()),
            replaces_host: false,
        }),
        None if req.version() == Version::HTTP_11 => {
            Err(Answer::BadRequest("HTTP/1.1 request without Host"))
        }
        None => Ok(Target {
            host: None,
            replaces_host: false,
        }),
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and
/// `Expect`, which the gateway answers itself.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::EXPECT,
];

/// Removes hop-by-hop headers, and those `Connection` names, but never `Host`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than ten removals.
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
        .filter(|n| *n != header::HOST)
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // hyper frames the body itself (length or chunked) on each side.
    headers.remove(header::TRANSFER_ENCODING);
}

/// The request as the back end gets it.
pub(crate) fn upstream_request(
    mut parts: http::request::Parts,
    body: RequestBody,
    peer: &Peer,
    target: Target,
) -> Request<RequestBody> {
    strip_hop_by_hop(&mut parts.headers);
    // Room for the headers added below, in one step.
    parts.headers.reserve(3);
    match target.host {
        Some(host) if target.replaces_host => {
            parts.headers.insert(header::HOST, host);
        }
        Some(_) => {}
        None => {
            parts.headers.insert(header::HOST, peer.local.clone());
        }
    }
    let xff = match parts.headers.get(&X_FORWARDED_FOR) {
        Some(prev) => joined(prev.as_bytes(), peer.xff.as_bytes()),
        None => Some(peer.xff.clone()),
    };
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    if let Some(element) = peer.forwarded_element(parts.headers.get(header::HOST)) {
        let forwarded = match parts.headers.get(header::FORWARDED) {
            Some(prev) => joined(prev.as_bytes(), element.as_bytes()),
            None => Some(element),
        };
        if let Some(v) = forwarded {
            parts.headers.insert(header::FORWARDED, v);
        }
    }
    // A body of unknown length goes chunked, whatever the method.
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    // Origin form towards the back end, in HTTP/1.1.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = http::Uri::from(pq);
        }
    }
    parts.version = Version::HTTP_11;
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
    fn hop_by_hop_headers_go_including_those_named_in_connection_but_host_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, host"),
        );
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-kept"));
        assert_eq!(h[header::HOST], "example.com");
    }

    #[test]
    fn a_host_with_quotes_and_backslashes_is_escaped_in_forwarded() {
        let peer = Peer::new(
            "192.0.2.7:5000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        let e = peer
            .forwarded_element(Some(&HeaderValue::from_static(r#"a"b\c"#)))
            .unwrap();
        assert_eq!(e, r#"for=192.0.2.7;host="a\"b\\c";proto=http"#);
        let v6 = Peer::new(
            "[2001:db8::1]:5000".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
        );
        let e = v6.forwarded_element(None).unwrap();
        assert_eq!(e, r#"for="[2001:db8::1]";proto=http"#);
    }

    fn req(raw: &[(&str, &str)], uri: &str, version: Version) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(version);
        for (k, v) in raw {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn targets_are_judged_as_the_back_end_will_read_them() {
        let two = req(&[("host", "a"), ("host", "b")], "/", Version::HTTP_11);
        assert!(matches!(target(&two), Err(Answer::BadRequest(_))));
        let none = req(&[], "/", Version::HTTP_11);
        assert!(matches!(target(&none), Err(Answer::BadRequest(_))));
        let old = req(&[], "/", Version::HTTP_10);
        assert!(target(&old).unwrap().host.is_none());
        let absolute = req(
            &[("host", "evil")],
            "http://good.example:8080/x",
            Version::HTTP_11,
        );
        let t = target(&absolute).unwrap();
        assert_eq!(t.host_str(), Some("good.example:8080"));
        assert!(t.replaces_host);
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .unwrap();
        assert!(matches!(target(&connect), Err(Answer::Connect)));
    }
}
