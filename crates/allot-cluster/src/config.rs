//! `[cluster]`: where the coordination engine is, how to log in, and this node's name.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

fn default_fanout() -> usize {
    32
}
fn default_root_lease_windows() -> u32 {
    2
}
fn default_member_lease_ms() -> u64 {
    3_000
}
fn default_replicas() -> usize {
    3
}

/// Serialises a secret as `<redacted>`: shown configurations never carry it.
fn redacted<S: Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

/// The cluster link's settings, as written in the gateway's `[cluster]` table. Serialised
/// (a configuration shown by the admin API), the token is `<redacted>`.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers, e.g. `["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]`; the client
    /// moves to another when one fails.
    pub servers: Vec<String>,
    /// The cluster's name: gateways with the same name enforce one agreement set. Letters,
    /// digits, `-` and `_`.
    pub name: String,
    /// This gateway's name in the cluster (default: host name and listener port). Letters,
    /// digits, `-` and `_`; unique in the cluster.
    #[serde(default)]
    pub node: Option<String>,
    /// Most children per node of the combining tree (≥ 2).
    #[serde(default = "default_fanout")]
    pub fanout: usize,
    /// A token to log in to NATS with (never printed).
    #[serde(default, serialize_with = "redacted")]
    pub token: Option<String>,
    /// A file holding an NKey seed (`SU…`) to log in with.
    #[serde(default)]
    pub nkey_file: Option<PathBuf>,
    /// Require TLS (implied by `tls_ca_file`).
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the certificate authorities to trust for the servers' certificates.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The root's lease, in windows: a dead root is replaced this long after its last
    /// renewal.
    #[serde(default = "default_root_lease_windows")]
    pub root_lease_windows: u32,
    /// A member's key expires this long after its last renewal (milliseconds).
    #[serde(default = "default_member_lease_ms")]
    pub member_lease_ms: u64,
    /// JetStream replicas of the cluster's buckets (1 for a single NATS server).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Where the highest fencing epoch seen is kept across restarts (default: none kept).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("servers", &self.servers)
            .field("name", &self.name)
            .field("node", &self.node)
            .field("fanout", &self.fanout)
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("nkey_file", &self.nkey_file)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("root_lease_windows", &self.root_lease_windows)
            .field("member_lease_ms", &self.member_lease_ms)
            .field("replicas", &self.replicas)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

/// A `[cluster]` value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`cluster.{key}`: {problem}")]
pub struct ConfigError {
    /// The key at fault.
    pub key: &'static str,
    /// What is wrong and what is allowed.
    pub problem: String,
}

/// True for a name usable as one token of a NATS subject and a KV key.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl ClusterConfig {
    /// Checks every value; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, problem: String| Err(ConfigError { key, problem });
        if self.servers.is_empty() {
            return err("servers", "expected at least one NATS server URL".into());
        }
        if let Some(bad) = self.servers.iter().find(|s| s.trim().is_empty()) {
            return err("servers", format!("`{bad}` is not a server URL"));
        }
        if !valid_name(&self.name) {
            return err(
                "name",
                format!("`{}`: expected letters, digits, `-` and `_`", self.name),
            );
        }
        if let Some(node) = &self.node {
            if !valid_name(node) {
                return err(
                    "node",
                    format!("`{node}`: expected letters, digits, `-` and `_`"),
                );
            }
        }
        if self.fanout < 2 {
            return err(
                "fanout",
                format!("expected an integer ≥ 2, got {}", self.fanout),
            );
        }
        if self.root_lease_windows == 0 {
            return err(
                "root_lease_windows",
                "expected an integer ≥ 1, got 0".into(),
            );
        }
        if self.member_lease_ms < 100 {
            return err(
                "member_lease_ms",
                format!("expected at least 100, got {}", self.member_lease_ms),
            );
        }
        if self.replicas == 0 || self.replicas > 5 {
            return err(
                "replicas",
                format!("expected 1 to 5, got {}", self.replicas),
            );
        }
        if self.token.is_some() && self.nkey_file.is_some() {
            return err("token", "give a token or an nkey_file, not both".into());
        }
        Ok(())
    }

    /// This node's name: `node`, or the host name and `port` with anything outside
    /// letters, digits, `-` and `_` replaced by `-`.
    pub fn node_name(&self, host: &str, port: u16) -> String {
        self.node.clone().unwrap_or_else(|| {
            let host: String = host
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("{host}-{port}")
        })
    }

    /// The member key's lifetime.
    pub fn member_lease(&self) -> Duration {
        Duration::from_millis(self.member_lease_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ClusterConfig {
        toml::from_str(text).expect("valid TOML")
    }

    #[test]
    fn defaults_and_the_node_name_from_host_and_port() {
        let c = parse("servers = [\"nats://127.0.0.1:4222\"]\nname = \"edge\"\n");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.fanout, 32);
        assert_eq!(c.node_name("gw1.example.org", 8080), "gw1-example-org-8080");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("servers = []\nname = \"edge\"", "servers"),
            ("servers = [\"x\"]\nname = \"a.b\"", "name"),
            ("servers = [\"x\"]\nname = \"e\"\nnode = \"n*\"", "node"),
            ("servers = [\"x\"]\nname = \"e\"\nfanout = 1", "fanout"),
            (
                "servers = [\"x\"]\nname = \"e\"\ntoken = \"t\"\nnkey_file = \"k\"",
                "token",
            ),
        ] {
            let e = parse(text).validate().expect_err(text);
            assert_eq!(e.key, key, "{text}");
        }
    }

    #[test]
    fn the_token_is_never_printed() {
        let c = parse("servers = [\"x\"]\nname = \"e\"\ntoken = \"s3cret\"");
        assert!(!format!("{c:?}").contains("s3cret"));
        let shown = serde_json::to_string(&c).expect("serialisable");
        assert!(
            !shown.contains("s3cret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
