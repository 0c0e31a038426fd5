//! An HTTP back end the test can switch: its health check can be made to fail, and then
//! its real requests too. It counts what it served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The switches and counters of one back end.
#[derive(Debug)]
pub struct Switch {
    /// `/health` answers 200 while true, 503 otherwise.
    pub health_ok: AtomicBool,
    /// Other paths answer 200 while true, 500 otherwise.
    pub serve_ok: AtomicBool,
    /// Requests that arrived, `/health` excepted.
    pub served: AtomicU64,
    /// Health checks answered.
    pub checks: AtomicU64,
}

/// A switchable back end on 127.0.0.1; its answers name its port. `/slow/MS` waits MS
/// milliseconds first.
pub async fn switch_backend() -> (SocketAddr, Arc<Switch>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sw = Arc::new(Switch {
        health_ok: AtomicBool::new(true),
        serve_ok: AtomicBool::new(true),
        served: AtomicU64::new(0),
        checks: AtomicU64::new(0),
    });
    let state = Arc::clone(&sw);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let state = Arc::clone(&state);
                    async move {
                        let path = req.uri().path().to_string();
                        let (status, body) = if path == "/health" {
                            state.checks.fetch_add(1, SeqCst);
                            if state.health_ok.load(SeqCst) {
                                (200, "healthy\n".to_string())
                            } else {
                                (503, "unhealthy\n".to_string())
                            }
                        } else {
                            // Counted on arrival, so a slow request counts when it starts.
                            state.served.fetch_add(1, SeqCst);
                            if let Some(ms) =
                                path.strip_prefix("/slow/").and_then(|m| m.parse().ok())
                            {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            if state.serve_ok.load(SeqCst) {
                                (200, format!("ok {}\n", addr.port()))
                            } else {
                                (500, "broken\n".to_string())
                            }
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, sw)
}
