//! `[listener]` or `[[listener]]`: where clients connect, and what they speak there.
//!
//! One `[listener]` table (an HTTP listener, as before) or any number of `[[listener]]`
//! tables, each with its own address, protocol (`http`, `tcp`, `ftp`) and entry chain.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

/// What a listener's clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 requests, classified one by one.
    #[default]
    Http,
    /// Raw TCP connections, classified once each.
    Tcp,
    /// FTP: TCP control connections, with their passive data connections followed.
    Ftp,
}

impl Protocol {
    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::Ftp => "ftp",
        }
    }
}

/// An inclusive range of ports, written `"40000-40099"` (or one port, `"40000"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port (≥ `first`).
    pub last: u16,
}

impl PortRange {
    /// How many ports it holds.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never empty: a range holds at least its first port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || {
            de::Error::custom(format!(
                "expected a port range like \"40000-40099\" (ports 1 to 65535, first ≤ last), got {text:?}"
            ))
        };
        let (a, b) = text.split_once('-').unwrap_or((&text, &text));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// One listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Its name, in rules (`listener = "…"`), metrics and errors (default: its protocol
    /// and address, e.g. `tcp 127.0.0.1:5432`).
    pub name: Option<String>,
    /// Address to listen on.
    pub address: SocketAddr,
    /// What its clients speak.
    pub protocol: Protocol,
    /// The chain classification starts in for this listener (default:
    /// `gateway.entry_chain`).
    pub entry_chain: Option<String>,
    /// Most client connections open at once; past it the gateway stops accepting until
    /// one closes (they wait in the kernel's backlog). Default: half of the descriptors
    /// the process may open, less a reserve, at most 16384 (shared by every listener).
    pub max_connections: Option<usize>,
    /// Close a connection after this long without a request (HTTP, default 60 s) or
    /// without a byte either way (TCP and FTP, default 300 s), in milliseconds.
    pub idle_timeout_ms: Option<u64>,
    /// HTTP: largest request head accepted, in bytes; larger gets 431.
    pub max_head_bytes: usize,
    /// HTTP: most header fields in one request head; more get 431.
    pub max_headers: usize,
    /// HTTP: longest request target (the URI of the request line), in bytes; longer
    /// gets 414, however large the head limit is.
    pub max_uri_bytes: usize,
    /// HTTP: time allowed for a new connection's first byte, in milliseconds; then it is
    /// closed.
    pub first_byte_timeout_ms: u64,
    /// HTTP: time allowed to receive a whole request head once it has started, in
    /// milliseconds; then 408.
    pub head_timeout_ms: u64,
    /// HTTP: longest pause in a request body the client is sending, in milliseconds;
    /// then 408 (or, once the response has started, the exchange is cut off).
    pub request_body_timeout_ms: u64,
    /// HTTP: longest the client may leave a response unread (no byte accepted by its
    /// socket), in milliseconds; then the connection is closed.
    pub send_timeout_ms: u64,
    /// HTTP: largest request body accepted, in bytes; larger gets 413.
    pub max_body_bytes: u64,
    /// TCP: how long to wait for the client's first bytes (to classify by them or by the
    /// TLS server name), in milliseconds; 0 classifies at once by address and listener,
    /// as a server-speaks-first protocol needs.
    pub inspect_ms: u64,
    /// TCP: the most bytes read for classification before connecting.
    pub inspect_bytes: usize,
    /// FTP: the gateway's own ports for passive data connections.
    pub data_ports: Option<PortRange>,
    /// FTP: the address written in passive replies (default: the address the control
    /// connection came in on).
    pub data_address: Option<IpAddr>,
    /// FTP: allow active mode (PORT, EPRT); refused with a clear reply otherwise.
    pub active: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: None,
            address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            protocol: Protocol::Http,
            entry_chain: None,
            max_connections: None,
            idle_timeout_ms: None,
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            first_byte_timeout_ms: 10_000,
            head_timeout_ms: 10_000,
            request_body_timeout_ms: 30_000,
            send_timeout_ms: 30_000,
            max_body_bytes: 10 * 1024 * 1024,
            inspect_ms: 0,
            inspect_bytes: 16 * 1024,
            data_ports: None,
            data_address: None,
            active: false,
        }
    }
}

impl ListenerConfig {
    /// Its name: the configured one, or its protocol and address.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{} {}", self.protocol.as_str(), self.address))
    }

    /// The idle timeout in force, in milliseconds.
    pub fn idle_timeout_ms(&self) -> u64 {
        self.idle_timeout_ms.unwrap_or(match self.protocol {
            Protocol::Http => 60_000,
            Protocol::Tcp | Protocol::Ftp => 300_000,
        })
    }
}

/// The `listener` key: one table or a list of tables. A configuration without one has the
/// default HTTP listener.
#[derive(Debug, Clone)]
pub struct Listeners(pub Vec<Spanned<ListenerConfig>>);

impl Default for Listeners {
    fn default() -> Self {
        Listeners(vec![Spanned::new(0..0, ListenerConfig::default())])
    }
}

impl Serialize for Listeners {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let all: Vec<&ListenerConfig> = self.0.iter().map(|l| l.get_ref()).collect();
        all.serialize(s)
    }
}

/// Accept `[listener]` or `[[listener]]`, keeping the inner error messages (and, for the
/// list, each table's place in the file).
impl<'de> Deserialize<'de> for Listeners {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Listeners, D::Error> {
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Listeners;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [listener] table or [[listener]] tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Listeners, A::Error> {
                let one = ListenerConfig::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Listeners(vec![Spanned::new(0..0, one)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Listeners, A::Error> {
                Vec::<Spanned<ListenerConfig>>::deserialize(de::value::SeqAccessDeserializer::new(
                    seq,
                ))
                .map(Listeners)
            }
        }
        d.deserialize_any(OneOrMany)
    }
}
