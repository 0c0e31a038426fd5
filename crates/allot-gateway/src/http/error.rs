//! Every answer the gateway makes itself, and the one function that turns each into a
//! response. The request path returns an [`Answer`] wherever it stops; nothing else
//! builds a status line.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::GatewayBody;
use crate::upstream::ForwardError;

/// Why the gateway answers a request itself.
#[derive(Debug)]
pub(crate) enum Answer {
    /// A class refused the request (503 with `Retry-After`); `text` names the class and
    /// the reason.
    Refused {
        /// The one-line body.
        text: Bytes,
    },
    /// The declared or received body passed the limit (413, and the connection closes:
    /// the rest of the body is unread).
    TooLarge {
        /// The limit.
        limit_bytes: u64,
    },
    /// The request target is longer than the listener's limit (414, and the connection
    /// closes). Most are answered by the socket before the head is parsed; this is for
    /// a pipelined one the socket did not see begin.
    UriTooLong {
        /// The limit.
        limit_bytes: usize,
    },
    /// The request is malformed in a way the gateway and the back end could read
    /// differently (400, and the connection closes).
    BadRequest(&'static str),
    /// The request head has more or longer header fields than the listener allows (431,
    /// and the connection closes).
    HeadTooLarge(&'static str),
    /// The client paused its body past the body timeout (408, and the connection closes).
    BodyTimeout,
    /// The client's body was malformed or cut short (400, and the connection closes).
    BodyBroken,
    /// The request passed its class's whole-request limit before the back end answered
    /// (504).
    RequestTimeout {
        /// The limit.
        timeout_ms: u64,
    },
    /// Something the gateway does not do: CONNECT (a reverse proxy, not a tunnel), a
    /// transfer coding other than chunked (501, and the connection closes).
    NotImplemented(&'static str),
    /// A configuration names something that is not there (500).
    Internal(&'static str),
    /// The back end could not be reached (502) or did not answer in time (504).
    Forward(ForwardError),
    /// Agreements in redirect mode: 307 to `location`, with `Retry-After` when it sends
    /// the client back to the gateway to try later.
    Redirect {
        /// Where.
        location: String,
        /// `Retry-After` seconds, when the client should wait.
        wait_s: Option<u64>,
    },
}

/// The response for `answer`; `retry_after_s` goes with every 503.
pub(crate) fn respond(answer: Answer, retry_after_s: u64) -> Response<GatewayBody> {
    let (status, text, retry, close): (StatusCode, Bytes, Option<u64>, bool) = match answer {
        Answer::Refused { text, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            Some(retry_after_s),
            false,
        ),
        Answer::TooLarge { limit_bytes } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("allot: request body larger than {limit_bytes} bytes\n").into(),
            None,
            true,
        ),
        Answer::UriTooLong { limit_bytes } => (
            StatusCode::URI_TOO_LONG,
            format!("allot: request target longer than {limit_bytes} bytes (414)\n").into(),
            None,
            true,
        ),
        Answer::BadRequest(why) => (
            StatusCode::BAD_REQUEST,
            format!("allot: bad request: {why}\n").into(),
            None,
            true,
        ),
        Answer::HeadTooLarge(why) => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("allot: {why} (431)\n").into(),
            None,
            true,
        ),
        Answer::BodyTimeout => (
            StatusCode::REQUEST_TIMEOUT,
            Bytes::from_static(b"allot: request body not received in time (408)\n"),
            None,
            true,
        ),
        Answer::BodyBroken => (
            StatusCode::BAD_REQUEST,
            Bytes::from_static(b"allot: bad request: malformed or truncated request body\n"),
            None,
            true,
        ),
        Answer::RequestTimeout { timeout_ms } => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("allot: the request took longer than its class's {timeout_ms} ms\n").into(),
            None,
            false,
        ),
        Answer::NotImplemented(what) => (
            StatusCode::NOT_IMPLEMENTED,
            format!("allot: {what}\n").into(),
            None,
            true,
        ),
        Answer::Internal(why) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("allot: {why}\n").into(),
            None,
            false,
        ),
        Answer::Forward(err) => {
            let status = match err {
                ForwardError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            (status, format!("allot: {err}\n").into(), None, false)
        }
        Answer::Redirect { location, wait_s } => {
            return match HeaderValue::from_str(&location) {
                Ok(v) => {
                    let mut resp = plain(StatusCode::TEMPORARY_REDIRECT, Bytes::new(), wait_s);
                    resp.headers_mut().insert(header::LOCATION, v);
                    resp
                }
                Err(_) => respond(
                    Answer::BadRequest("request target not usable in a redirect"),
                    retry_after_s,
                ),
            };
        }
    };
    let mut resp = plain(status, text, retry);
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn plain(status: StatusCode, text: Bytes, retry_after_s: Option<u64>) -> Response<GatewayBody> {
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
