//! A request's target as the gateway judges it, and the request as the back end gets it.
//!
//! The gateway and the back end must read a request the same way, or one request could be
//! classified as one thing and served as another (RFC 9112 §3.2, §11.2): a request with
//! two `Host` headers, or an HTTP/1.1 request without one, is refused with 400; an
//! absolute-form target's authority replaces `Host` (classified and forwarded alike);
//! `Connection` cannot strip `Host`. Towards the back end: HTTP/1.1, hop-by-hop headers
//! removed, the client appended to `X-Forwarded-For` and `Forwarded`, origin-form target;
//! a body of unknown length goes chunked whatever the method (`upstream::h1` frames it).

use std::net::SocketAddr;
use std::sync::Mutex;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

use super::error::Answer;
use crate::upstream::h1::Outgoing;

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

/// Checks the request's method, framing and target, and finds its host.
pub(crate) fn target<B>(req: &Request<B>) -> Result<Target, Answer> {
    if req.method() == Method::CONNECT {
        return Err(Answer::NotImplemented(
            "CONNECT is not supported: this is a reverse proxy",
        ));
    }
    framing(req.headers())?;
    let uri = req.uri();
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(Answer::BadRequest(
            "an authority-form target is only for CONNECT",
        ));
    }
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Err(Answer::BadRequest(
            "the asterisk-form target is only for OPTIONS",
        ));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Answer::BadRequest("more than one Host header"));
    }
    if let Some(h) = first {
        if h.is_empty() {
            return Err(Answer::BadRequest("empty Host header"));
        }
        if !h.as_bytes().iter().all(|&b| is_host_byte(b)) {
            return Err(Answer::BadRequest(
                "Host is not a host name or address with an optional port",
            ));
        }
    }
    if let Some(authority) = uri.authority() {
        // Absolute form: the target's authority is the host, whatever `Host` says; an
        // HTTP/1.1 client must still send `Host` (RFC 9112 §3.2).
        if first.is_none() && req.version() == Version::HTTP_11 {
            return Err(Answer::BadRequest("HTTP/1.1 request without Host"));
        }
        if authority.as_str().contains('@') {
            return Err(Answer::BadRequest("user information in the request target"));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| Answer::BadRequest("request target authority is not a valid host"))?;
        return Ok(Target {
            host: Some(host),
            replaces_host: true,
        });
    }
    match first {
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

/// A byte of `uri-host [ ":" port ]` (RFC 3986 §3.2.2: reg-name, IPv4, IP literal).
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b)
}

/// Refuses a body whose length the gateway and the back end could read differently
/// (RFC 9112 §6.1, §6.3): `chunked` applied twice or not last (400), or a transfer coding
/// other than `chunked` (501: the gateway would have to undo it to frame the body).
/// `Transfer-Encoding` with `Content-Length` never gets here: the parser keeps the
/// former, drops the latter and closes the connection after the response.
fn framing(headers: &HeaderMap) -> Result<(), Answer> {
    let mut codings = 0;
    let mut chunked_last = false;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| Answer::BadRequest("Transfer-Encoding is not text"))?;
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let chunked = coding.eq_ignore_ascii_case("chunked");
            if chunked && chunked_last {
                return Err(Answer::BadRequest("chunked applied twice"));
            }
            chunked_last = chunked;
            codings += 1;
        }
    }
    if codings == 0 {
        return Ok(());
    }
    if !chunked_last {
        return Err(Answer::BadRequest(
            "the last transfer coding is not chunked",
        ));
    }
    if codings > 1 {
        return Err(Answer::NotImplemented(
            "transfer codings other than chunked are not supported",
        ));
    }
    Ok(())
}

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
    // Each side frames the body itself (length or chunked).
    headers.remove(header::TRANSFER_ENCODING);
}

/// The request as the back end gets it: hop-by-hop headers gone, origin-form target, and
/// the headers the gateway adds (written with the head, never inserted into the map).
pub(crate) fn upstream_request(
    mut parts: http::request::Parts,
    peer: &Peer,
    target: Target,
) -> Outgoing {
    strip_hop_by_hop(&mut parts.headers);
    let host = match target.host {
        Some(host) if target.replaces_host => Some(host),
        Some(_) => None,
        None => Some(peer.local.clone()),
    };
    let forwarded = peer.forwarded_element(host.as_ref().or(parts.headers.get(header::HOST)));
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = http::Uri::from(pq);
        }
    }
    parts.version = Version::HTTP_11;
    Outgoing {
        parts,
        host,
        forwarded_for: peer.xff.clone(),
        forwarded,
    }
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
        assert!(matches!(target(&connect), Err(Answer::NotImplemented(_))));
    }

    fn refused(r: &Request<()>) -> &'static str {
        match target(r) {
            Err(Answer::BadRequest(_)) => "400",
            Err(Answer::NotImplemented(_)) => "501",
            Err(_) => "other",
            Ok(_) => "accepted",
        }
    }

    /// Headers, target, and the answer expected.
    type Case = (
        &'static [(&'static str, &'static str)],
        &'static str,
        &'static str,
    );

    #[test]
    fn requests_two_readers_could_read_differently_are_refused() {
        let h11 = Version::HTTP_11;
        let cases: [Case; 9] = [
            (
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                "/",
                "501",
            ),
            (
                &[("host", "a"), ("transfer-encoding", "chunked, chunked")],
                "/",
                "400",
            ),
            (
                &[
                    ("host", "a"),
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                "/",
                "400",
            ),
            (&[("host", "a b")], "/", "400"),
            (&[("host", "user@a")], "/", "400"),
            (&[], "http://a/x", "400"),
            (&[("host", "a")], "http://user@a/x", "400"),
            (&[("host", "a")], "a:80", "400"),
            (&[("host", "a")], "*", "400"),
        ];
        for (headers, uri, want) in cases {
            assert_eq!(refused(&req(headers, uri, h11)), want, "{headers:?} {uri}");
        }
        let options = Request::builder()
            .method(Method::OPTIONS)
            .uri("*")
            .header("host", "a")
            .body(())
            .unwrap();
        assert_eq!(refused(&options), "accepted");
        let chunked = req(
            &[("host", "a:8080"), ("transfer-encoding", "chunked")],
            "/",
            h11,
        );
        assert_eq!(refused(&chunked), "accepted");
        assert_eq!(refused(&req(&[("host", "[::1]:80")], "/", h11)), "accepted");
    }
}
