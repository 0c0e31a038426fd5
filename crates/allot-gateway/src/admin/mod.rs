//! The admin API, on its own listener (loopback by default).
//!
//! Reads: `GET /metrics` (Prometheus text, in the format the scraper asks for),
//! `GET /status` (JSON sensors), `GET /config` (secrets shown as `<redacted>`),
//! `GET /config?format=toml`, `GET /rules`, and `GET /`: a status page (no external
//! assets) drawing `/status` live. Writes, which need `Authorization: Bearer <token>`:
//! `POST /rules` (`{"chain", "position"?, "rule"}`), `DELETE /rules/<chain>/<id>`,
//! `PATCH /classes/<name>`, `PATCH /bandwidth_groups/<name>`, `PATCH /gateway` (a JSON
//! object of the keys to change, as in the configuration file),
//! `POST /backends/<name>/addresses` (`{"address"}`), `DELETE
//! /backends/<name>/addresses/<ip:port>`. Every such write is validated like a
//! configuration file and either applies whole or changes nothing.
//! `POST /backends/<name>/addresses/<ip:port>/{drain,disable,enable}` sets an address's
//! mode at run time (kept across reloads).
//! `/controllers` (the QoS manager's loops) is routed to [`controllers`].
//! Every failure is an [`AdminError`], turned into its response in one place.

pub(crate) mod controller_metrics;
pub(crate) mod controllers;
pub(crate) mod metrics;
mod page;

use std::convert::Infallible;

use allot_model::classify::{ChainSpec, Rule, RuleSpec};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;

/// Largest admin request body.
const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

type AdminResponse = Response<Full<Bytes>>;

/// Why an admin request failed.
#[derive(Debug)]
pub(crate) enum AdminError {
    /// No such endpoint or object (404).
    NotFound(String),
    /// The request or the change it asks for is invalid (400); nothing changed.
    BadRequest(String),
    /// No `Authorization: Bearer` header (401).
    MissingToken,
    /// A bearer token that is not the admin token (401).
    WrongToken,
    /// Writes are disabled: no token is configured (403).
    WritesDisabled,
    /// The gateway could not produce the answer (500).
    Internal(String),
}

impl From<ConfigError> for AdminError {
    fn from(e: ConfigError) -> AdminError {
        AdminError::BadRequest(format!("allot: {e}"))
    }
}

/// The one map from admin errors to responses.
fn error_response(e: AdminError) -> AdminResponse {
    let (status, msg) = match e {
        AdminError::NotFound(m) => (StatusCode::NOT_FOUND, m),
        AdminError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
        AdminError::MissingToken => (
            StatusCode::UNAUTHORIZED,
            "allot: write endpoints need `Authorization: Bearer <token>`".into(),
        ),
        AdminError::WrongToken => (
            StatusCode::UNAUTHORIZED,
            "allot: the bearer token given is not the admin token".into(),
        ),
        AdminError::WritesDisabled => (
            StatusCode::FORBIDDEN,
            "allot: write endpoints are disabled: set admin.token or admin.token_env".into(),
        ),
        AdminError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
    };
    let mut resp = text(status, msg);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// hyper's entry point for one admin request.
pub(crate) async fn handle(
    gw: Gateway,
    req: Request<Incoming>,
) -> Result<AdminResponse, Infallible> {
    Ok(route(&gw, req).await.unwrap_or_else(error_response))
}

type Routed = Result<AdminResponse, AdminError>;

fn no_such_endpoint() -> AdminError {
    AdminError::NotFound("allot: no such admin endpoint".into())
}

async fn route(gw: &Gateway, req: Request<Incoming>) -> Routed {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    if method == Method::GET {
        return match segments.as_slice() {
            ["metrics"] => {
                let format = metrics::Format::for_accept(
                    req.headers()
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok()),
                );
                Ok(Response::builder()
                    .header(header::CONTENT_TYPE, format.content_type())
                    .body(Full::new(Bytes::from(metrics::render(gw, format))))
                    .unwrap_or_default())
            }
            ["status"] => json(&gw.status()),
            ["controllers"] => json(&gw.readouts()),
            ["config"]
                if req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "format=toml")) =>
            {
                let text = gw
                    .runtime()
                    .config
                    .to_toml()
                    .map_err(|e| AdminError::Internal(e.to_string()))?;
                Ok(Response::builder()
                    .header(header::CONTENT_TYPE, "application/toml")
                    .body(Full::new(Bytes::from(text)))
                    .unwrap_or_default())
            }
            ["config"] => json(&gw.runtime().config),
            [] => Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                .body(Full::new(Bytes::from_static(page::PAGE.as_bytes())))
                .unwrap_or_default()),
            ["rules"] => {
                let rt = gw.runtime();
                let chains: Vec<ChainSpec> = rt
                    .rules
                    .chains()
                    .iter()
                    .cloned()
                    .map(ChainSpec::from)
                    .collect();
                json(&serde_json::json!({ "entry": rt.rules.entry(), "chains": chains }))
            }
            _ => Err(no_such_endpoint()),
        };
    }
    authorize(gw, &req)?;
    let body = read_body(req).await?;
    if let ["controllers", rest @ ..] = segments.as_slice() {
        let (status, msg) = controllers::write(gw, &method, rest, &body)?;
        return Ok(text(status, msg));
    }
    match (method, segments.as_slice()) {
        (Method::POST, ["rules"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct AddRule {
                chain: String,
                position: Option<usize>,
                rule: RuleSpec,
            }
            let add: AddRule = parse_json(&body)?;
            let rule = Rule::try_from(add.rule).map_err(bad)?;
            let set = gw
                .runtime()
                .rules
                .with_rule_added(&add.chain, add.position, rule)
                .map_err(bad)?;
            set_chains(gw, &set)?;
            Ok(text(StatusCode::CREATED, "rule added".into()))
        }
        (Method::DELETE, ["rules", chain, id]) => {
            let set = gw
                .runtime()
                .rules
                .with_rule_removed(chain, id)
                .map_err(|e| AdminError::NotFound(format!("allot: {e}")))?;
            set_chains(gw, &set)?;
            Ok(text(StatusCode::OK, "rule removed".into()))
        }
        (Method::PATCH, ["classes", name]) => {
            let patch = parse_json::<Value>(&body)?;
            gw.change(|c| patch_named(&mut c.class, name, &patch, "class"))?;
            Ok(text(StatusCode::OK, format!("class {name} changed")))
        }
        (Method::PATCH, ["bandwidth_groups", name]) => {
            let patch = parse_json::<Value>(&body)?;
            gw.change(|c| patch_named(&mut c.bandwidth_group, name, &patch, "bandwidth_group"))?;
            Ok(text(
                StatusCode::OK,
                format!("bandwidth group {name} changed"),
            ))
        }
        (Method::POST, ["backends", name, "addresses", addr, action]) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| bad(format!("{addr:?} is not an ip:port address")))?;
            let mode = match *action {
                "drain" => crate::upstream::AddressMode::Draining,
                "disable" => crate::upstream::AddressMode::Disabled,
                "enable" => crate::upstream::AddressMode::Enabled,
                other => {
                    return Err(bad(format!(
                        "{other:?} is not an action: drain, disable or enable"
                    )))
                }
            };
            let rt = gw.runtime();
            let backend = rt.backend(name).ok_or_else(|| {
                AdminError::NotFound(format!("allot: no back end is named {name:?}"))
            })?;
            if !backend.set_mode(addr, mode) {
                return Err(AdminError::NotFound(format!(
                    "allot: back end {name} has no address {addr}"
                )));
            }
            Ok(text(
                StatusCode::OK,
                format!("{name} {addr}: {}", mode.as_str()),
            ))
        }
        (Method::POST, ["backends", name, "addresses"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Add {
                address: std::net::SocketAddr,
            }
            let add: Add = parse_json(&body)?;
            gw.change(|c| {
                let b = backend_mut(c, name)?;
                if b.addresses.contains(&add.address) {
                    return Err(run_time_error(
                        format!("backend.{name}.addresses"),
                        format!("{} is already an address of {name}", add.address),
                    ));
                }
                b.addresses.push(add.address);
                Ok(())
            })?;
            Ok(text(
                StatusCode::CREATED,
                format!("{name}: {} added", add.address),
            ))
        }
        (Method::DELETE, ["backends", name, "addresses", addr]) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| bad(format!("{addr:?} is not an ip:port address")))?;
            gw.change(|c| {
                let b = backend_mut(c, name)?;
                let before = b.addresses.len();
                b.addresses.retain(|a| *a != addr);
                if b.addresses.len() == before {
                    return Err(run_time_error(
                        format!("backend.{name}.addresses"),
                        format!("{addr} is not an address of {name}"),
                    ));
                }
                Ok(())
            })?;
            Ok(text(StatusCode::OK, format!("{name}: {addr} removed")))
        }
        (Method::PATCH, ["gateway"]) => {
            let patch = parse_json::<Value>(&body)?;
            gw.change(|c| {
                c.gateway = merged(&c.gateway, &patch, "gateway")?;
                Ok(())
            })?;
            Ok(text(StatusCode::OK, "gateway changed".into()))
        }
        _ => Err(no_such_endpoint()),
    }
}

fn authorize(gw: &Gateway, req: &Request<Incoming>) -> Result<(), AdminError> {
    let rt = gw.runtime();
    let Some(token) = rt.admin_token.as_ref() else {
        return Err(AdminError::WritesDisabled);
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .ok_or(AdminError::MissingToken)?;
    if token.matches(given) {
        Ok(())
    } else {
        Err(AdminError::WrongToken)
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, AdminError> {
    Limited::new(req.into_body(), MAX_ADMIN_BODY_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| AdminError::BadRequest(format!("allot: cannot read body: {e}")))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body)
        .map_err(|e| AdminError::BadRequest(format!("allot: bad JSON: {e}")))
}

fn bad(e: impl std::fmt::Display) -> AdminError {
    AdminError::BadRequest(format!("allot: {e}"))
}

fn set_chains(gw: &Gateway, set: &allot_model::classify::RuleSet) -> Result<(), AdminError> {
    let chains: Vec<Spanned<ChainSpec>> = set
        .chains()
        .iter()
        .cloned()
        .map(|c| Spanned::new(0..0, ChainSpec::from(c)))
        .collect();
    gw.change(|c: &mut Config| {
        c.chain = chains;
        Ok(())
    })?;
    Ok(())
}

/// `current` with the keys of `patch` replaced, re-read through serde so unknown keys and
/// wrong types are refused exactly as in the file.
fn merged<T: serde::Serialize + serde::de::DeserializeOwned>(
    current: &T,
    patch: &Value,
    what: &str,
) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: "run-time change".into(),
        line: 0,
        key: what.to_string(),
        message,
    };
    let mut value = serde_json::to_value(current).map_err(|e| invalid(e.to_string()))?;
    let (Value::Object(target), Value::Object(changes)) = (&mut value, patch) else {
        return Err(invalid("expected a JSON object of keys to change".into()));
    };
    for (k, v) in changes {
        target.insert(k.clone(), v.clone());
    }
    serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
}

fn run_time_error(key: String, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: "run-time change".into(),
        line: 0,
        key,
        message,
    }
}

fn backend_mut<'c>(
    c: &'c mut Config,
    name: &str,
) -> Result<&'c mut crate::config::BackendConfig, ConfigError> {
    c.backend
        .iter_mut()
        .map(|b| b.get_mut())
        .find(|b| b.name == name)
        .ok_or_else(|| {
            run_time_error(
                format!("backend.{name}"),
                format!("no back end is named {name:?}"),
            )
        })
}

trait Named {
    fn name(&self) -> &str;
}

impl Named for crate::config::ClassConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for crate::config::BandwidthGroupConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

fn patch_named<T>(
    items: &mut [Spanned<T>],
    name: &str,
    patch: &Value,
    what: &str,
) -> Result<(), ConfigError>
where
    T: Named + serde::Serialize + serde::de::DeserializeOwned,
{
    let Some(item) = items.iter_mut().find(|i| i.get_ref().name() == name) else {
        return Err(ConfigError::Invalid {
            path: "run-time change".into(),
            line: 0,
            key: format!("{what}.{name}"),
            message: format!("no {what} is named {name:?}"),
        });
    };
    if patch.get("name").is_some_and(|n| n != name) {
        return Err(ConfigError::Invalid {
            path: "run-time change".into(),
            line: 0,
            key: format!("{what}.{name}.name"),
            message: "a name cannot be changed at run time".into(),
        });
    }
    *item.get_mut() = merged(item.get_ref(), patch, &format!("{what}.{name}"))?;
    Ok(())
}

fn json(v: &impl serde::Serialize) -> Routed {
    let body = serde_json::to_vec_pretty(v).map_err(|e| AdminError::Internal(e.to_string()))?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default())
}

fn text(status: StatusCode, msg: String) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
