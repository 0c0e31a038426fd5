//! The gateway's configuration file: TOML, validated at load. The leaf of the crate: it
//! imports nothing else of it.
//!
//! Parsing works from a string so it is testable; [`Config::load`] adds the path. Every
//! error names the file, the line and the key, and says what is allowed.

pub mod controller;
pub mod diff;
pub mod listener;
mod secret;

pub use controller::ControllerConfig;
pub use listener::{ListenerConfig, Listeners, PortRange, Protocol};
pub use secret::Secret;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use allot_model::classify::{Chain, ChainSpec, RuleSet, Target};
use allot_model::queue::Policy;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The largest `max_uri_bytes` a listener may set, in bytes: the HTTP parser answers 414
/// past this itself.
pub const MAX_URI_BYTES: usize = 65_534;

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key has the wrong type or is unknown.
    #[error("{path}{}: {message}", at_line(*line))]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line, 0 when unknown.
        line: usize,
        /// What toml said.
        message: String,
    },
    /// A value is out of range or refers to something that does not exist.
    #[error("{path}{}: `{key}`: {message}", at_line(*line))]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line of the table holding the key.
        line: usize,
        /// Dotted key, naming the table by its `name` where it has one.
        key: String,
        /// What is allowed, and what was found.
        message: String,
    },
}

fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect, what they speak, and the bounds on what they send:
    /// `[listener]` or `[[listener]]` tables.
    #[serde(default)]
    pub listener: Listeners,
    /// The admin API (metrics, status, run-time changes).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Gateway-wide settings.
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// Back ends: named groups of addresses.
    #[serde(default)]
    pub backend: Vec<Spanned<BackendConfig>>,
    /// Classes: each with its queue, caps and actuators.
    #[serde(default)]
    pub class: Vec<Spanned<ClassConfig>>,
    /// Output-bandwidth groups shared by the responses of their classes.
    #[serde(default)]
    pub bandwidth_group: Vec<Spanned<BandwidthGroupConfig>>,
    /// Rule chains that classify requests; the entry chain is `gateway.entry_chain`.
    #[serde(default)]
    pub chain: Vec<Spanned<ChainSpec>>,
    /// Feedback loops of the QoS manager.
    #[serde(default)]
    pub controller: Vec<Spanned<ControllerConfig>>,
    /// Sharing agreements enforced on the classes mapped to principals.
    pub agreements: Option<Spanned<AgreementsConfig>>,
    /// The access log: one line per request and per connection (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogConfig>,
    /// `[cluster]`: enforce the agreements together with other gateways over NATS (see
    /// docs/cluster.md). Without it the gateway plans alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<allot_cluster::ClusterConfig>,
}

/// How the log's lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    /// nginx's `combined`, then `class=… backend=… address=… queue_ms=… service_ms=…
    /// reason=…`.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// `[access_log]`: where the lines go and how they look. Off when absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file (appended to, created if missing), or `-` for standard output.
    pub path: String,
    /// `combined` (default) or `json`.
    #[serde(default)]
    pub format: AccessFormat,
}

/// How requests within their principal's quota are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AgreementMode {
    /// Forward to the back end (the class's), as any request.
    #[default]
    Proxy,
    /// Answer 307 with `Location` on the server whose capacity serves it; over quota, 307
    /// back to the gateway with `Retry-After` (the paper's layer-7 redirector).
    Redirect,
}

/// A per-request cost: requests whose path starts with `path_prefix` cost `units`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CostRule {
    /// Requests whose path starts with this (a connection has no path, so never matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Requests or connections that came in on this listener (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// Requests or connections of this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Cost units of one such request or connection (> 0).
    pub units: f64,
}

impl CostRule {
    fn matches(&self, unit: &CostOf<'_>) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|p| unit.path.is_some_and(|path| path.starts_with(p)))
            && self.listener.as_deref().is_none_or(|l| l == unit.listener)
            && self.class.as_deref().is_none_or(|c| c == unit.class)
    }
}

/// What a cost rule looks at: a request's path (none for a connection), its listener and
/// its class.
#[derive(Debug, Clone, Copy)]
pub struct CostOf<'a> {
    /// The request's path; `None` for a connection.
    pub path: Option<&'a str>,
    /// The listener's name.
    pub listener: &'a str,
    /// The class's name.
    pub class: &'a str,
}

/// Where a principal's capacity is reached, for redirect mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerLocation {
    /// The principal owning the capacity.
    pub principal: String,
    /// Redirect mode: base URL the request's path is appended to, e.g.
    /// `http://10.0.0.5:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Connections: the back-end address (one of the class's back end's) whose server is
    /// this principal's capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
}

fn default_agreement_window_ms() -> u64 {
    100
}
/// The newest window's weight in the demand estimate of a gateway planning alone.
pub const DEFAULT_DEMAND_SMOOTHING: f64 = 0.5;
/// The same under `[cluster]`: each gateway reports its last window's demand as it was.
/// The tree's quotas already come two windows after the demand they answer, and the sum
/// over many gateways is smoother than any one of them; smoothing again would only add
/// lag (a principal that stops would hold its part for windows more).
pub const CLUSTER_DEMAND_SMOOTHING: f64 = 1.0;
fn default_deferral_ms() -> u64 {
    1000
}

/// `[agreements]`: tickets and currencies enforced per window (see docs/agreements.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgreementsConfig {
    /// `proxy` (default) or `redirect`.
    #[serde(default)]
    pub mode: AgreementMode,
    /// The planner's objective.
    #[serde(default)]
    pub objective: allot_model::agreements::Objective,
    /// Planning window, in milliseconds.
    #[serde(default = "default_agreement_window_ms")]
    pub window_ms: u64,
    /// Weight of the newest window in the demand estimate, in (0, 1]; when not given,
    /// [`DEFAULT_DEMAND_SMOOTHING`] alone and [`CLUSTER_DEMAND_SMOOTHING`] under
    /// `[cluster]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_smoothing: Option<f64>,
    /// Longest a request over its principal's credit waits for a later window; then 503.
    #[serde(default = "default_deferral_ms")]
    pub max_wait_ms: u64,
    /// Which principal each class's requests are charged to (`class = "principal"`).
    pub classes: std::collections::BTreeMap<String, String>,
    /// Costs by path prefix, listener or class (first match); others cost 1 unit.
    #[serde(default)]
    pub cost: Vec<CostRule>,
    /// The principals (`[[agreements.principal]]`, as in `allot plan`).
    #[serde(default)]
    pub principal: Vec<allot_model::agreements::PrincipalSpec>,
    /// The agreements (`[[agreements.agreement]]`, as in `allot plan`).
    #[serde(default)]
    pub agreement: Vec<allot_model::agreements::AgreementSpec>,
    /// Redirect mode: where each owning principal's capacity is.
    #[serde(default)]
    pub server: Vec<ServerLocation>,
}

impl AgreementsConfig {
    /// The newest window's weight in the demand estimate, in (0, 1].
    pub fn demand_weight(&self) -> f64 {
        self.demand_smoothing.unwrap_or(DEFAULT_DEMAND_SMOOTHING)
    }

    /// The agreement set as `allot plan` reads it.
    pub fn spec(&self) -> allot_model::agreements::AgreementsSpec {
        allot_model::agreements::AgreementsSpec {
            objective: self.objective,
            window_ms: self.window_ms,
            principals: self.principal.clone(),
            agreements: self.agreement.clone(),
        }
    }

    /// The cost of a request or connection, in units: the first matching cost rule's,
    /// else 1.
    pub fn cost_of(&self, unit: &CostOf<'_>) -> f64 {
        self.cost
            .iter()
            .find(|c| c.matches(unit))
            .map_or(1.0, |c| c.units)
    }
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API; loopback unless you mean otherwise.
    pub address: SocketAddr,
    /// Bearer token for write endpoints. Without a token (here or in `token_env`) the
    /// write endpoints are disabled. Never shown in any output.
    pub token: Option<Secret>,
    /// Name of an environment variable holding the token (used when `token` is unset).
    pub token_env: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token: None,
            token_env: Some("ALLOT_ADMIN_TOKEN".into()),
        }
    }
}

impl AdminConfig {
    /// The effective token: `token`, else the variable named by `token_env`.
    pub fn resolved_token(&self) -> Option<Secret> {
        self.token.clone().filter(|t| !t.is_empty()).or_else(|| {
            self.token_env
                .as_deref()
                .and_then(|name| std::env::var(name).ok())
                .filter(|t| !t.is_empty())
                .map(Secret::from)
        })
    }
}

/// Gateway-wide settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Cap on requests in service across all classes.
    pub max_running: usize,
    /// The chain classification starts from (default: the first `[[chain]]`).
    pub entry_chain: Option<String>,
    /// Seconds put in `Retry-After` on a 503.
    pub retry_after_s: u64,
    /// On SIGTERM or SIGINT, how long requests in flight get to finish, in milliseconds.
    pub shutdown_grace_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_running: 256,
            entry_chain: None,
            retry_after_s: 1,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// How a back end spreads requests over its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each address in turn.
    #[default]
    RoundRobin,
    /// The address with the fewest requests in flight.
    LeastInFlight,
}

/// One back end: an unmodified server reachable at one or more addresses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name used by classes and in metrics.
    pub name: String,
    /// `host:port` addresses (IP literals).
    pub addresses: Vec<SocketAddr>,
    /// How requests are spread over the addresses.
    #[serde(default)]
    pub balance: Balance,
    /// Time allowed to open a connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for the response head once the request is sent, in milliseconds;
    /// then 504.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Longest pause in a response body the back end is sending, in milliseconds; then
    /// the exchange is cut off and counted as a `body_timeout` failure.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Consecutive connect failures after which an address is taken out.
    #[serde(default = "default_eject_after_failures")]
    pub eject_after_failures: u32,
    /// How long an ejected address stays out before it is tried again.
    #[serde(default = "default_eject_for_ms")]
    pub eject_for_ms: u64,
    /// Idle pooled connections kept per address.
    #[serde(default = "default_max_idle_per_address")]
    pub max_idle_per_address: usize,
    /// A pooled connection unused this long is closed (checked as connections return).
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// TCP: send a PROXY protocol header (`"v1"` or `"v2"`) first on every connection, so
    /// the server sees the client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// TCP: a client's connections go to the address that served it last, for this long
    /// after its last connection, in milliseconds (0: no affinity).
    #[serde(default)]
    pub affinity_ms: u64,
    /// Active health checks of every address, next to the passive ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
}

/// `health_check = { … }`: each address is checked on a period; `fall` failures in a row
/// take it out, `rise` successes in a row bring it back (HAProxy's semantics).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// An HTTP path to GET (a 2xx or 3xx answer is healthy); without it, the check is a
    /// TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Between checks, in milliseconds.
    #[serde(default = "default_check_interval_ms")]
    pub interval_ms: u64,
    /// Time allowed for one check, in milliseconds.
    #[serde(default = "default_check_timeout_ms")]
    pub timeout_ms: u64,
    /// Successes in a row that bring a down address back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that take an address out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_check_interval_ms() -> u64 {
    2_000
}
fn default_check_timeout_ms() -> u64 {
    1_000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// The PROXY protocol version a back end is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 client server cport sport\r\n`.
    V1,
    /// The binary header.
    V2,
}

fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_response_timeout_ms() -> u64 {
    30_000
}
fn default_body_timeout_ms() -> u64 {
    30_000
}
fn default_eject_after_failures() -> u32 {
    3
}
fn default_eject_for_ms() -> u64 {
    5_000
}
fn default_max_idle_per_address() -> usize {
    256
}
fn default_pool_idle_timeout_ms() -> u64 {
    60_000
}

/// An accept-rate actuator: a token bucket on admissions.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptRate {
    /// Admissions per second.
    pub rate_per_sec: f64,
    /// Admissions allowed at once after a quiet spell.
    #[serde(default = "default_burst")]
    pub burst: f64,
}

fn default_burst() -> f64 {
    1.0
}

/// One class of requests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    /// Name used by rules and in metrics.
    pub name: String,
    /// The back end this class is forwarded to.
    pub backend: String,
    /// Strict priority between classes when a service slot frees (higher first).
    #[serde(default)]
    pub priority: i32,
    /// Relative admission rate among classes of equal priority (the accept-ratio group).
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Cap on this class's requests in service (absent: unlimited).
    #[serde(
        default = "default_class_max_running",
        skip_serializing_if = "is_unlimited"
    )]
    pub max_running: usize,
    /// Cap on this class's waiting requests; more get 503.
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
    /// Longest a request may wait for service; then 503.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Order of service inside the class.
    #[serde(default = "default_policy")]
    pub policy: Policy,
    /// A request waiting this long is served first whatever the policy (default: half of
    /// `max_wait_ms`).
    pub age_bound_ms: Option<u64>,
    /// Optional accept-rate actuator.
    pub accept_rate: Option<AcceptRate>,
    /// Optional output-bandwidth group.
    pub bandwidth_group: Option<String>,
    /// Longest a request may take from the start of its service to the last byte of its
    /// response, in milliseconds; then it is cut off. None: no whole-request limit (each
    /// phase still has its own timeout).
    pub request_timeout_ms: Option<u64>,
}

fn default_ratio() -> f64 {
    1.0
}
fn default_class_max_running() -> usize {
    usize::MAX
}

/// "No cap": written out by leaving the key out.
fn is_unlimited(v: &usize) -> bool {
    *v == usize::MAX
}
fn default_queue_limit() -> usize {
    1024
}
fn default_max_wait_ms() -> u64 {
    10_000
}
fn default_policy() -> Policy {
    Policy::Fifo
}

impl ClassConfig {
    /// The age past which a waiting request goes first.
    pub fn age_bound(&self) -> Duration {
        Duration::from_millis(self.age_bound_ms.unwrap_or(self.max_wait_ms / 2))
    }
}

/// An output-bandwidth group: bytes per second shared by all responses of its classes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthGroupConfig {
    /// Name used by classes.
    pub name: String,
    /// Response bytes per second, all responses together.
    pub bytes_per_sec: f64,
    /// Bytes allowed at once after a quiet spell (default: a tenth of a second's worth,
    /// at least 16 KiB).
    pub burst_bytes: Option<f64>,
}

impl BandwidthGroupConfig {
    /// The effective burst.
    pub fn burst(&self) -> f64 {
        self.burst_bytes
            .unwrap_or((self.bytes_per_sec / 10.0).max(16.0 * 1024.0))
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Config::parse(&text, &display)
    }

    /// Parses and validates `text`; `origin` names it in errors (a file path).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
            message: e.message().trim().to_string(),
        })?;
        let clustered = config.cluster.is_some();
        if let Some(a) = config.agreements.as_mut() {
            a.get_mut().demand_smoothing.get_or_insert(if clustered {
                CLUSTER_DEMAND_SMOOTHING
            } else {
                DEFAULT_DEMAND_SMOOTHING
            });
        }
        config.validate(text, origin)?;
        Ok(config)
    }

    /// The configuration as TOML, every default written out and secrets shown as
    /// `<redacted>` (what `--check --print` and `GET /config?format=toml` show).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Syntax {
            path: "configuration".into(),
            line: 0,
            message: format!("cannot write as TOML: {e}"),
        })
    }

    /// Validates a configuration changed at run time (no file, so no lines).
    pub fn revalidate(&self) -> Result<(), ConfigError> {
        self.validate("", "run-time change")
    }

    /// The classes, without their spans.
    pub fn classes(&self) -> impl Iterator<Item = &ClassConfig> {
        self.class.iter().map(|c| c.get_ref())
    }

    /// The back ends, without their spans.
    pub fn backends(&self) -> impl Iterator<Item = &BackendConfig> {
        self.backend.iter().map(|c| c.get_ref())
    }

    /// The bandwidth groups, without their spans.
    pub fn bandwidth_groups(&self) -> impl Iterator<Item = &BandwidthGroupConfig> {
        self.bandwidth_group.iter().map(|c| c.get_ref())
    }

    /// Compiles the rule chains against the classes.
    pub fn rule_set(&self) -> Result<RuleSet, allot_model::classify::RuleError> {
        let chains = self
            .chain
            .iter()
            .map(|c| c.get_ref().clone().try_into())
            .collect::<Result<Vec<_>, _>>()?;
        let entry = self.entry_chain().unwrap_or_default();
        RuleSet::new(
            chains,
            &entry,
            self.classes().map(|c| c.name.clone()).collect(),
        )
    }

    /// The chain classification starts from.
    pub fn entry_chain(&self) -> Option<String> {
        self.gateway
            .entry_chain
            .clone()
            .or_else(|| self.chain.first().map(|c| c.get_ref().name.clone()))
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let invalid =
            |span: std::ops::Range<usize>, key: String, message: String| ConfigError::Invalid {
                path: origin.to_string(),
                line: if text.is_empty() {
                    0
                } else {
                    line_of(text, key_offset(text, span, &key))
                },
                key,
                message,
            };
        if self.gateway.max_running == 0 {
            return Err(invalid(
                find_key(text, "max_running"),
                "gateway.max_running".into(),
                "expected an integer ≥ 1, got 0".into(),
            ));
        }
        self.validate_listeners(text, origin)?;
        if self.admin.token.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(invalid(
                find_key(text, "token"),
                "admin.token".into(),
                "expected a non-empty token (or leave it out to use admin.token_env)".into(),
            ));
        }
        if self.class.is_empty() {
            return Err(invalid(
                0..0,
                "class".into(),
                "at least one [[class]] is required".into(),
            ));
        }
        let mut backend_names = HashSet::new();
        for b in &self.backend {
            let (span, b) = (b.span(), b.get_ref());
            if !backend_names.insert(b.name.as_str()) {
                return Err(invalid(
                    span,
                    format!("backend.{}.name", b.name),
                    "back-end names must be unique".into(),
                ));
            }
            if b.addresses.is_empty() {
                return Err(invalid(
                    span,
                    format!("backend.{}.addresses", b.name),
                    "expected at least one `ip:port` address".into(),
                ));
            }
            if let Some(h) = &b.health_check {
                let bad = |key: &str, message: String| {
                    invalid(
                        span.clone(),
                        format!("backend.{}.health_check.{key}", b.name),
                        message,
                    )
                };
                if h.interval_ms == 0 || h.timeout_ms == 0 {
                    return Err(bad(
                        "interval_ms",
                        "expected interval_ms and timeout_ms ≥ 1".into(),
                    ));
                }
                if h.rise == 0 || h.fall == 0 {
                    return Err(bad("rise", "expected rise and fall ≥ 1".into()));
                }
                if h.path.as_ref().is_some_and(|p| !p.starts_with('/')) {
                    return Err(bad(
                        "path",
                        format!("expected a path starting with /, got {:?}", h.path),
                    ));
                }
            }
            for (key, v) in [
                ("connect_timeout_ms", b.connect_timeout_ms),
                ("response_timeout_ms", b.response_timeout_ms),
                ("body_timeout_ms", b.body_timeout_ms),
            ] {
                if v == 0 {
                    return Err(invalid(
                        span.clone(),
                        format!("backend.{}.{key}", b.name),
                        "expected a timeout ≥ 1 ms, got 0".into(),
                    ));
                }
            }
        }
        let mut group_names = HashSet::new();
        for g in &self.bandwidth_group {
            let (span, g) = (g.span(), g.get_ref());
            if !group_names.insert(g.name.as_str()) {
                return Err(invalid(
                    span,
                    format!("bandwidth_group.{}.name", g.name),
                    "group names must be unique".into(),
                ));
            }
            if !(g.bytes_per_sec.is_finite() && g.bytes_per_sec > 0.0) {
                return Err(invalid(
                    span,
                    format!("bandwidth_group.{}.bytes_per_sec", g.name),
                    format!("expected a number > 0, got {}", g.bytes_per_sec),
                ));
            }
            if g.burst() < 1.0 || !g.burst().is_finite() {
                return Err(invalid(
                    span,
                    format!("bandwidth_group.{}.burst_bytes", g.name),
                    format!("expected a number ≥ 1, got {}", g.burst()),
                ));
            }
        }
        let mut class_names = HashSet::new();
        for c in &self.class {
            let (span, c) = (c.span(), c.get_ref());
            let key = |k: &str| format!("class.{}.{k}", c.name);
            if !class_names.insert(c.name.as_str()) {
                return Err(invalid(
                    span,
                    key("name"),
                    "class names must be unique".into(),
                ));
            }
            if !backend_names.contains(c.backend.as_str()) {
                return Err(invalid(
                    span,
                    key("backend"),
                    format!(
                        "no [[backend]] is named {:?}; known: {}",
                        c.backend,
                        join(&backend_names)
                    ),
                ));
            }
            if c.max_running == 0 {
                return Err(invalid(
                    span,
                    key("max_running"),
                    "expected an integer ≥ 1, got 0".into(),
                ));
            }
            if c.request_timeout_ms == Some(0) {
                return Err(invalid(
                    span,
                    key("request_timeout_ms"),
                    "expected a timeout ≥ 1 ms, got 0 (leave it out for no limit)".into(),
                ));
            }
            if !(c.ratio.is_finite() && c.ratio > 0.0) {
                return Err(invalid(
                    span,
                    key("ratio"),
                    format!("expected a number > 0, got {}", c.ratio),
                ));
            }
            if let Some(rate) = c.accept_rate {
                if !(rate.rate_per_sec.is_finite() && rate.rate_per_sec >= 0.0) {
                    return Err(invalid(
                        span,
                        key("accept_rate.rate_per_sec"),
                        format!("expected a number ≥ 0, got {}", rate.rate_per_sec),
                    ));
                }
                if !(rate.burst.is_finite() && rate.burst >= 1.0) {
                    return Err(invalid(
                        span,
                        key("accept_rate.burst"),
                        format!("expected a number ≥ 1, got {}", rate.burst),
                    ));
                }
            }
            if let Some(g) = &c.bandwidth_group {
                if !group_names.contains(g.as_str()) {
                    return Err(invalid(
                        span,
                        key("bandwidth_group"),
                        format!(
                            "no [[bandwidth_group]] is named {g:?}; known: {}",
                            join(&group_names)
                        ),
                    ));
                }
            }
        }
        if self.chain.is_empty() && self.class.len() > 1 {
            return Err(invalid(
                0..0,
                "chain".into(),
                "with more than one class, a [[chain]] must say which requests go where".into(),
            ));
        }
        if let Some(a) = &self.agreements {
            self.validate_agreements(a.get_ref(), &class_names)
                .map_err(|(key, message)| invalid(a.span(), key, message))?;
        }
        if let Err(e) = self.rule_set_or_single() {
            let span = self.chain.first().map(|c| c.span()).unwrap_or(0..0);
            return Err(invalid(span, "chain".into(), e.to_string()));
        }
        controller::validate(self, &invalid)?;
        if let Some(c) = &self.cluster {
            if let Err(e) = c.validate() {
                return Err(invalid(0..0, format!("cluster.{}", e.key), e.problem));
            }
            if self.agreements.is_none() {
                return Err(invalid(
                    0..0,
                    "cluster".into(),
                    "a cluster enforces an agreement set together: [cluster] needs [agreements]"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_listeners(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        let chain_names: HashSet<&str> = self
            .chain
            .iter()
            .map(|c| c.get_ref().name.as_str())
            .collect();
        for l in &self.listener.0 {
            let (span, l) = (l.span(), l.get_ref());
            let name = l.name();
            let invalid = |key: &str, message: String| ConfigError::Invalid {
                path: origin.to_string(),
                line: if text.is_empty() {
                    0
                } else if span.is_empty() {
                    // The single `[listener]` table carries no span of its own.
                    line_of(text, find_key(text, key).start)
                } else {
                    line_of(text, key_offset(text, span.clone(), key))
                },
                key: format!("listener.{name}.{key}"),
                message,
            };
            if !names.insert(name.clone()) {
                return Err(invalid(
                    "name",
                    "listener names must be unique (give each listener a `name`)".into(),
                ));
            }
            // Port 0 asks the system for a free port each time: never a clash.
            if l.address.port() != 0 && !addresses.insert(l.address) {
                return Err(invalid(
                    "address",
                    format!("{} is already the address of another listener", l.address),
                ));
            }
            let mut timeouts = vec![("idle_timeout_ms", l.idle_timeout_ms())];
            if l.protocol == Protocol::Http {
                timeouts.extend([
                    ("first_byte_timeout_ms", l.first_byte_timeout_ms),
                    ("head_timeout_ms", l.head_timeout_ms),
                    ("request_body_timeout_ms", l.request_body_timeout_ms),
                    ("send_timeout_ms", l.send_timeout_ms),
                ]);
            }
            for (key, v) in timeouts {
                if v == 0 {
                    return Err(invalid(key, "expected a timeout ≥ 1 ms, got 0".into()));
                }
            }
            if l.max_headers == 0 {
                return Err(invalid(
                    "max_headers",
                    "expected an integer ≥ 1, got 0".into(),
                ));
            }
            if !(1..=MAX_URI_BYTES).contains(&l.max_uri_bytes) {
                return Err(invalid(
                    "max_uri_bytes",
                    format!(
                        "expected a request-target limit from 1 to {MAX_URI_BYTES} bytes (the HTTP parser's own ceiling), got {}",
                        l.max_uri_bytes
                    ),
                ));
            }
            if l.max_connections == Some(0) {
                return Err(invalid(
                    "max_connections",
                    "expected an integer ≥ 1, got 0".into(),
                ));
            }
            if let Some(entry) = &l.entry_chain {
                if !chain_names.contains(entry.as_str()) {
                    return Err(invalid(
                        "entry_chain",
                        format!("no [[chain]] is named {entry:?}"),
                    ));
                }
            }
            let ftp = l.protocol == Protocol::Ftp;
            if !ftp && (l.data_ports.is_some() || l.data_address.is_some() || l.active) {
                return Err(invalid(
                    "data_ports",
                    format!(
                        "`data_ports`, `data_address` and `active` are for protocol = \"ftp\" listeners, not {:?}",
                        l.protocol.as_str()
                    ),
                ));
            }
            if ftp && l.data_ports.is_none() {
                return Err(invalid(
                    "data_ports",
                    "an FTP listener needs `data_ports = \"FIRST-LAST\"`: the gateway's ports for passive data connections".into(),
                ));
            }
            if l.protocol != Protocol::Http && l.inspect_ms > 0 && l.inspect_bytes == 0 {
                return Err(invalid(
                    "inspect_bytes",
                    "expected an integer ≥ 1 when `inspect_ms` is set".into(),
                ));
            }
        }
        Ok(())
    }

    /// The listeners, without their spans.
    pub fn listeners(&self) -> impl Iterator<Item = &ListenerConfig> {
        self.listener.0.iter().map(|l| l.get_ref())
    }

    fn validate_agreements(
        &self,
        a: &AgreementsConfig,
        class_names: &HashSet<&str>,
    ) -> Result<(), (String, String)> {
        let set = allot_model::agreements::AgreementSet::from_spec(&a.spec())
            .map_err(|e| ("agreements".to_string(), e.to_string()))?;
        let weight = a.demand_weight();
        if !(weight > 0.0 && weight <= 1.0) {
            return Err((
                "agreements.demand_smoothing".into(),
                format!("expected a number in (0, 1], got {weight}"),
            ));
        }
        if a.max_wait_ms == 0 {
            return Err(("agreements.max_wait_ms".into(), "expected ≥ 1".into()));
        }
        for (class, principal) in &a.classes {
            if !class_names.contains(class.as_str()) {
                return Err((
                    format!("agreements.classes.{class}"),
                    format!("no [[class]] is named {class:?}"),
                ));
            }
            if set.index_of(principal).is_none() {
                return Err((
                    format!("agreements.classes.{class}"),
                    format!("no [[agreements.principal]] is named {principal:?}"),
                ));
            }
        }
        for (i, c) in a.cost.iter().enumerate() {
            if !(c.units.is_finite() && c.units > 0.0) {
                return Err((
                    format!("agreements.cost.{i}.units"),
                    format!("expected a number > 0, got {}", c.units),
                ));
            }
            if let Some(class) = &c.class {
                if !class_names.contains(class.as_str()) {
                    return Err((
                        format!("agreements.cost.{i}.class"),
                        format!("no [[class]] is named {class:?}"),
                    ));
                }
            }
            if let Some(l) = &c.listener {
                if !self.listeners().any(|x| x.name() == *l) {
                    return Err((
                        format!("agreements.cost.{i}.listener"),
                        format!("no listener is named {l:?}"),
                    ));
                }
            }
        }
        for s in &a.server {
            if set.index_of(&s.principal).is_none() {
                return Err((
                    "agreements.server.principal".into(),
                    format!("no [[agreements.principal]] is named {:?}", s.principal),
                ));
            }
            if let Some(addr) = s.address {
                if !self.backends().any(|b| b.addresses.contains(&addr)) {
                    return Err((
                        "agreements.server.address".into(),
                        format!("{addr} is not an address of any [[backend]]"),
                    ));
                }
            }
        }
        if a.mode == AgreementMode::Redirect {
            for s in &a.server {
                let location = s.location.as_deref().unwrap_or("");
                if !(location.starts_with("http://") || location.starts_with("https://")) {
                    return Err((
                        "agreements.server.location".into(),
                        format!("expected an http:// or https:// URL, got {location:?}"),
                    ));
                }
            }
            for p in &a.principal {
                if p.capacity_units_per_s > 0.0
                    && !a
                        .server
                        .iter()
                        .any(|s| s.principal == p.name && s.location.is_some())
                {
                    return Err((
                        "agreements.server".into(),
                        format!(
                            "redirect mode needs a server location for {:?}, which owns capacity",
                            p.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The rule set, or with no chains (one class) a rule set sending everything to it.
    pub fn rule_set_or_single(&self) -> Result<RuleSet, allot_model::classify::RuleError> {
        if self.chain.is_empty() {
            let only = self.classes().next().map(|c| c.name.clone());
            let chain = Chain {
                name: "main".into(),
                rules: Vec::new(),
                default: Target::Class(only.unwrap_or_default()),
            };
            return RuleSet::new(
                vec![chain],
                "main",
                self.classes().map(|c| c.name.clone()).collect(),
            );
        }
        self.rule_set()
    }
}

fn join(names: &HashSet<&str>) -> String {
    let mut v: Vec<&str> = names.iter().copied().collect();
    v.sort_unstable();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at.min(text.len()))
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1)
}

/// Where `key` is set in the table starting at `span` (the line that writes the key's last
/// part), else the table's start.
fn key_offset(text: &str, span: std::ops::Range<usize>, key: &str) -> usize {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let Some(rest) = text.get(span.start..) else {
        return span.start;
    };
    // The table runs from its header to the next header.
    let mut offset = span.start;
    for (i, line) in rest.split_inclusive('\n').enumerate() {
        let code = line.split('#').next().unwrap_or("");
        if i > 0 && code.trim_start().starts_with('[') {
            break;
        }
        if let Some(at) = code.find(leaf) {
            if code[at + leaf.len()..].trim_start().starts_with('=') {
                return offset;
            }
        }
        offset += line.len();
    }
    span.start
}

/// The span of the first line that sets `key`, for keys outside arrays of tables.
fn find_key(text: &str, key: &str) -> std::ops::Range<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with(key) && trimmed[key.len()..].trim_start().starts_with('=') {
            return offset..offset + line.len();
        }
        offset += line.len();
    }
    0..0
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[listener]
address = "127.0.0.1:0"

[[backend]]
name = "app"
addresses = ["127.0.0.1:9000"]

[[class]]
name = "premium"
backend = "app"
priority = 10

[[class]]
name = "basic"
backend = "app"
max_running = 4

[[chain]]
name = "main"
default = { class = "basic" }
[[chain.rule]]
id = "net"
source = ["10.0.0.0/8"]
target = { class = "premium" }
"#;

    #[test]
    fn demand_is_smoothed_alone_and_reported_as_it_was_under_a_cluster() {
        let agreements = "\n[agreements]\nclasses = { basic = \"p\" }\n\
                          [[agreements.principal]]\nname = \"p\"\ncapacity = 100\n";
        let weight = |text: &str| {
            let c = Config::parse(text, "t.toml").expect("valid");
            c.agreements.expect("agreements").get_ref().demand_weight()
        };
        let alone = format!("{GOOD}{agreements}");
        assert_eq!(weight(&alone), DEFAULT_DEMAND_SMOOTHING);
        let clustered =
            format!("{alone}\n[cluster]\nservers = [\"nats://127.0.0.1:4222\"]\nname = \"edge\"\n");
        assert_eq!(weight(&clustered), CLUSTER_DEMAND_SMOOTHING);
        let chosen = clustered.replace("[agreements]\n", "[agreements]\ndemand_smoothing = 0.25\n");
        assert_eq!(weight(&chosen), 0.25);
    }

    #[test]
    fn good_config_loads() {
        let c = Config::parse(GOOD, "t.toml").expect("valid");
        assert_eq!(c.class.len(), 2);
        assert_eq!(c.entry_chain().as_deref(), Some("main"));
        assert!(c.rule_set().is_ok());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let bad = GOOD.replace("max_running = 4", "max_running = 0");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("t.toml:17: `class.basic.max_running`"),
            "{err}"
        );

        let bad = GOOD.replace("backend = \"app\"\nmax", "backend = \"nope\"\nmax");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("`class.basic.backend`"), "{err}");
        assert!(err.contains("known: app"), "{err}");

        let bad = GOOD.replace("priority = 10", "priority = \"high\"");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.starts_with("t.toml:12:"), "{err}");

        let bad = GOOD.replace("priority = 10", "priorty = 10");
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("priorty"), "{err}");
    }

    #[test]
    fn a_request_target_limit_outside_what_the_parser_reads_is_refused() {
        let c = Config::parse(GOOD, "t.toml").expect("valid");
        assert_eq!(c.listeners().next().map(|l| l.max_uri_bytes), Some(8192));
        for bad in ["0", "65535"] {
            let text = GOOD.replace(
                "address = \"127.0.0.1:0\"\n",
                &format!("address = \"127.0.0.1:0\"\nmax_uri_bytes = {bad}\n"),
            );
            let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains("max_uri_bytes"), "{err}");
            assert!(err.contains("1 to 65534 bytes"), "{err}");
            assert!(err.contains(&format!("got {bad}")), "{err}");
        }
    }

    #[test]
    fn the_effective_configuration_is_written_whole_and_read_back_the_same() {
        let c = Config::parse(GOOD, "t.toml").expect("valid");
        let text = c.to_toml().expect("toml");
        assert!(
            text.contains("max_headers = 100"),
            "defaults written: {text}"
        );
        let again = Config::parse(&text, "printed").expect("the printed file loads");
        assert!(
            diff::diff(&c, &again).is_empty(),
            "{:?}",
            diff::diff(&c, &again)
        );
    }

    #[test]
    fn rule_errors_are_config_errors() {
        let bad = GOOD.replace(
            "target = { class = \"premium\" }",
            "target = { class = \"gold\" }",
        );
        let err = Config::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("gold"), "{err}");
    }
}
