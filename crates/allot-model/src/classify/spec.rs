//! Rules and chains in the shape the configuration file and the admin API share.
//!
//! ```toml
//! [[chain]]
//! name = "main"
//! default = { class = "basic" }          # or { chain = "other" }
//! [[chain.rule]]
//! id = "premium-net"                     # unique in its chain
//! source = ["10.0.0.0/8", "::1"]         # optional; all present conditions must hold
//! host = "api.example.com"               # optional
//! path_prefix = "/api/"                  # optional
//! listener = "public"                    # optional; or a list of listener names
//! first_bytes = "SSH-"                   # optional; a connection's first bytes
//! header = { name = "User-Agent", contains = "curl" }   # optional; or a list of them
//! probability = 0.3                      # optional
//! target = { class = "premium" }         # or { chain = "sub" }
//! ```
//!
//! A spec's conditions are evaluated in the order source, listener, host, path prefix,
//! first bytes, headers, probability, so a probability is the fraction of the requests
//! that pass the others.

use super::{check_condition, Chain, Condition, Place, Rule, RuleError, Target};
use ipnet::IpNet;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::IpAddr;

/// A header condition: the header `name` has a value containing `contains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    /// The header's name, any case.
    pub name: String,
    /// The byte string looked for in its values (case-sensitive), not empty.
    pub contains: String,
}

/// A rule as configured: each present key is a condition, all must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique in its chain.
    pub id: String,
    /// Client addresses or networks; any of them matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Vec<String>>,
    /// A host pattern: `api.example.com` or `*.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A path prefix, starting with `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Listener names: the request or connection came in on any of them. One name, or a
    /// list.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "names_out",
        deserialize_with = "names_in"
    )]
    pub listener: Vec<String>,
    /// The first bytes a connection's client sends start with this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bytes: Option<String>,
    /// One header condition, or a list of them (all must hold).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "one_or_many_out",
        deserialize_with = "one_or_many_in"
    )]
    pub header: Vec<HeaderSpec>,
    /// Matches this fraction of the requests that reach it, from 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// Where a matching request goes.
    pub target: Target,
}

/// A chain as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSpec {
    /// Unique among chains.
    pub name: String,
    /// Taken when no rule matches.
    pub default: Target,
    /// The rules, in order (`[[chain.rule]]` in TOML).
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
}

fn one_or_many_out<S: Serializer>(v: &[HeaderSpec], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] => one.serialize(s),
        many => many.serialize(s),
    }
}

/// Accept `header = { … }` or `header = [{ … }, …]`, keeping the inner error messages
/// (an untagged enum would say only "did not match any variant").
fn one_or_many_in<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HeaderSpec>, D::Error> {
    struct OneOrMany;
    impl<'de> Visitor<'de> for OneOrMany {
        type Value = Vec<HeaderSpec>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table { name, contains } or a list of them")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            HeaderSpec::deserialize(de::value::MapAccessDeserializer::new(map)).map(|h| vec![h])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<HeaderSpec>::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(OneOrMany)
}

fn names_out<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] => one.serialize(s),
        many => many.serialize(s),
    }
}

/// Accept `listener = "a"` or `listener = ["a", "b"]`.
fn names_in<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Names;
    impl<'de> Visitor<'de> for Names {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a listener name or a list of them")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(Names)
}

/// `10.0.0.0/8`, or a bare address meaning just that host.
fn parse_source(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl TryFrom<RuleSpec> for Rule {
    type Error = RuleError;

    /// Parse and check the rule on its own (its target is checked when it joins a set).
    fn try_from(spec: RuleSpec) -> Result<Rule, RuleError> {
        let at = Place {
            chain: String::new(),
            rule: Some(spec.id.clone()),
        };
        let mut conditions = Vec::new();
        if let Some(sources) = spec.source {
            let nets = sources
                .iter()
                .map(|s| {
                    parse_source(s).ok_or_else(|| RuleError::BadSource {
                        at: at.clone(),
                        value: s.clone(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            conditions.push(Condition::Source(nets));
        }
        if !spec.listener.is_empty() {
            conditions.push(Condition::Listener(spec.listener));
        }
        if let Some(host) = spec.host {
            conditions.push(Condition::Host(host));
        }
        if let Some(prefix) = spec.path_prefix {
            conditions.push(Condition::PathPrefix(prefix));
        }
        if let Some(bytes) = spec.first_bytes {
            conditions.push(Condition::FirstBytes(bytes.into_bytes()));
        }
        for h in spec.header {
            conditions.push(Condition::HeaderContains {
                name: h.name,
                value: h.contains,
            });
        }
        if let Some(p) = spec.probability {
            conditions.push(Condition::Probability(p));
        }
        for c in &conditions {
            check_condition(c, &at)?;
        }
        Ok(Rule {
            id: spec.id,
            conditions,
            target: spec.target,
        })
    }
}

impl TryFrom<ChainSpec> for Chain {
    type Error = RuleError;

    fn try_from(spec: ChainSpec) -> Result<Chain, RuleError> {
        let rules = spec
            .rules
            .into_iter()
            .map(|r| Rule::try_from(r).map_err(|e| e.in_chain(&spec.name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Chain {
            name: spec.name,
            rules,
            default: spec.default,
        })
    }
}

/// The intersection of two host patterns, when one pattern can say it.
/// `Err(())` means they can never both match.
fn meet_hosts(a: &str, b: &str) -> Result<String, ()> {
    let wild = |p: &str| p.strip_prefix('*').map(str::to_ascii_lowercase);
    let (la, lb) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    match (wild(a), wild(b)) {
        (None, None) if la == lb => Ok(a.to_string()),
        (None, None) => Err(()),
        // Exact host against `*.suffix` (the suffix kept with its dot).
        (None, Some(s)) if la.len() > s.len() && la.ends_with(&s) => Ok(a.to_string()),
        (Some(s), None) if lb.len() > s.len() && lb.ends_with(&s) => Ok(b.to_string()),
        (None, Some(_)) | (Some(_), None) => Err(()),
        // Two wildcards: the more specific one, if it lies inside the other.
        (Some(sa), Some(sb)) if sa.ends_with(&sb) => Ok(a.to_string()),
        (Some(sa), Some(sb)) if sb.ends_with(&sa) => Ok(b.to_string()),
        (Some(_), Some(_)) => Err(()),
    }
}

/// The networks in both lists (CIDR networks are nested or disjoint, so this is exact).
fn meet_sources(a: &[IpNet], b: &[IpNet]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let inner = if x.contains(y) {
                *y
            } else if y.contains(x) {
                *x
            } else {
                continue;
            };
            if !out.contains(&inner) {
                out.push(inner);
            }
        }
    }
    out
}

impl From<Rule> for RuleSpec {
    /// The configuration shape of a rule. A rule with several conditions of one kind (which
    /// only code can build) is written as one equivalent condition per kind: networks and
    /// host patterns intersected, the longest path prefix, probabilities multiplied; if
    /// they can never all hold, the spec says `probability = 0`.
    fn from(rule: Rule) -> RuleSpec {
        let mut never = false;
        let mut source: Option<Vec<IpNet>> = None;
        let mut host: Option<String> = None;
        let mut path_prefix: Option<String> = None;
        let mut listener: Option<Vec<String>> = None;
        let mut first_bytes: Option<Vec<u8>> = None;
        let mut header = Vec::new();
        let mut probability: Option<f64> = None;
        for c in rule.conditions {
            match c {
                Condition::Source(nets) => {
                    source = Some(match source {
                        None => nets,
                        Some(prev) => meet_sources(&prev, &nets),
                    });
                    if source.as_ref().is_some_and(|s| s.is_empty()) {
                        never = true;
                        source = None;
                    }
                }
                Condition::Host(h) => match host.take() {
                    None => host = Some(h),
                    Some(prev) => match meet_hosts(&prev, &h) {
                        Ok(m) => host = Some(m),
                        Err(()) => never = true,
                    },
                },
                Condition::PathPrefix(p) => match path_prefix.take() {
                    None => path_prefix = Some(p),
                    Some(prev) if p.starts_with(&prev) => path_prefix = Some(p),
                    Some(prev) if prev.starts_with(&p) => path_prefix = Some(prev),
                    Some(_) => never = true,
                },
                Condition::Listener(names) => {
                    listener = Some(match listener.take() {
                        None => names,
                        Some(prev) => prev.into_iter().filter(|n| names.contains(n)).collect(),
                    });
                    if listener.as_ref().is_some_and(|l| l.is_empty()) {
                        never = true;
                        listener = None;
                    }
                }
                Condition::FirstBytes(b) => match first_bytes.take() {
                    None => first_bytes = Some(b),
                    Some(prev) if b.starts_with(&prev) => first_bytes = Some(b),
                    Some(prev) if prev.starts_with(&b) => first_bytes = Some(prev),
                    Some(_) => never = true,
                },
                Condition::HeaderContains { name, value } => header.push(HeaderSpec {
                    name,
                    contains: value,
                }),
                Condition::Probability(p) => probability = Some(probability.unwrap_or(1.0) * p),
            }
        }
        if never {
            probability = Some(0.0);
        }
        RuleSpec {
            id: rule.id,
            source: source.map(|nets| nets.iter().map(|n| n.to_string()).collect()),
            host,
            path_prefix,
            listener: listener.unwrap_or_default(),
            first_bytes: first_bytes.map(|b| String::from_utf8_lossy(&b).into_owned()),
            header,
            probability,
            target: rule.target,
        }
    }
}

impl From<Chain> for ChainSpec {
    fn from(chain: Chain) -> ChainSpec {
        ChainSpec {
            name: chain.name,
            default: chain.default,
            rules: chain.rules.into_iter().map(RuleSpec::from).collect(),
        }
    }
}
