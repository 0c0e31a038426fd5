//! A small HTTP/1.1 client for the admin API, shared by `allot ctl` and `allot stat`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Where the admin API is and how to authenticate, from flags or the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminTarget {
    /// Address of the gateway's admin listener.
    #[arg(long, env = "ALLOT_ADMIN", default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// Bearer token for write endpoints.
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Sends one request to the admin API and returns the status and body text.
pub async fn call(
    target: &AdminTarget,
    method: Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(StatusCode, String)> {
    let addr = target.admin;
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to the admin API at {addr}: timed out"))?
        .with_context(|| {
            format!("connecting to the admin API at {addr} (is the gateway running? --admin)")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("admin API at {addr}: handshake"))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if let Some(token) = &target.token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .with_context(|| format!("admin API at {addr}: no answer within 10 s"))?
        .with_context(|| format!("admin API at {addr}: {path}"))?;
    let status = resp.status();
    let text = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("admin API at {addr}: reading the answer to {path}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// Runs `call` on a fresh single-thread runtime, for the synchronous subcommands.
pub fn call_blocking(
    target: &AdminTarget,
    method: Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(StatusCode, String)> {
    super::runtime(Some(1))?.block_on(call(target, method, path, body))
}
