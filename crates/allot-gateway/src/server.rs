//! Accept loops: the client listener and the admin listener, each with graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::conn::{ConnState, TimedIo};
use crate::state::Gateway;

/// How long connections get to finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves clients on `listener` until `shutdown` resolves, then stops accepting, lets
/// requests in flight finish (bounded by [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(gw: Gateway, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    let (stop_windows, windows_stopped) = tokio::sync::oneshot::channel::<()>();
    let windows = tokio::spawn(crate::agreements::run_loop(gw.clone(), async move {
        let _ = windows_stopped.await;
    }));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors or similar: back off briefly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let settings = gw.settings();
                let l = &settings.config.listener;
                let state = ConnState::default();
                let io = TokioIo::new(TimedIo::new(
                    stream,
                    state.clone(),
                    Duration::from_millis(l.head_timeout_ms),
                    Duration::from_millis(l.idle_timeout_ms),
                ));
                let gw = gw.clone();
                let client = std::sync::Arc::new(crate::service::Peer::new(peer));
                let svc = service_fn(move |req| {
                    crate::service::handle(gw.clone(), client.clone(), state.clone(), req)
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    // TimedIo times heads (with a 408); hyper's own timer would arm and
                    // drop a sleep on every request of a keep-alive connection.
                    .header_read_timeout(None)
                    // Heads and small bodies go out in one buffer and one write.
                    .writev(false)
                    .keep_alive(true)
                    // hyper answers 431 past this; it needs at least 8 KiB.
                    .max_buf_size(l.max_head_bytes.max(8192))
                    .serve_connection(io, svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "client connection ended");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drain(graceful, "gateway").await;
    let _ = stop_windows.send(());
    let _ = windows.await;
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve_admin(gw: Gateway, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let gw = gw.clone();
                let svc = service_fn(move |req| crate::admin::handle(gw.clone(), req));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "admin connection ended");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drain(graceful, "admin").await;
}

async fn drain(graceful: GracefulShutdown, what: &str) {
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!(listener = what, "all connections drained"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(listener = what, grace_s = SHUTDOWN_GRACE.as_secs(), "connections still open after the grace period; closing them")
        }
    }
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
