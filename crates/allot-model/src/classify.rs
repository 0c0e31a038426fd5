//! Ordered rule chains: which class a request belongs to.
//!
//! After kernel-support-open-qos, section 2.2 ("classifier and forwarding rules",
//! *tcpchains*): a chain is an ordered list of rules and a default target; the first rule
//! whose conditions all hold decides; a target is a class or another chain, so chains
//! compose ("forwarding chains"). The paper's three kinds of condition are here:
//! address-based ([`Condition::Source`], [`Condition::Listener`]), content-based
//! ([`Condition::Host`], [`Condition::PathPrefix`], [`Condition::HeaderContains`],
//! [`Condition::FirstBytes`]) and probabilistic ([`Condition::Probability`]). The same
//! rules classify HTTP requests and TCP connections: a connection has a client address, a
//! listener, perhaps the first bytes its client sent and a TLS server name (its host), and
//! no path or headers, so rules on those never hold for it.
//!
//! All header strings of a chain are compiled into one Aho-Corasick automaton; a header's
//! values are scanned once, the first time a rule of the chain needs that header, and the
//! scan answers every rule of the chain that tests the same header.
//!
//! A [`RuleSet`] is compiled and validated once and then immutable; run-time changes build
//! a new one ([`RuleSet::with_rule_added`], [`RuleSet::with_rule_removed`]) that the
//! gateway swaps in behind an `Arc`.

mod spec;

pub use spec::{ChainSpec, HeaderSpec, RuleSpec};

use aho_corasick::AhoCorasick;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

/// One test on a request; a rule holds when all of its conditions do.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The client address is in any of these networks (v4 and v6; a v4-mapped v6 client
    /// address matches v4 networks).
    Source(Vec<IpNet>),
    /// The request's host, case-insensitive, any port in the Host value ignored. A pattern
    /// `*.example.com` matches every subdomain of `example.com` (at any depth) but not
    /// `example.com` itself. An IPv6 literal is written in brackets: `[2001:db8::1]`.
    Host(String),
    /// The request path starts with this (bytewise; must start with `/`).
    PathPrefix(String),
    /// The request or connection came in on one of these listeners (by name).
    Listener(Vec<String>),
    /// The first bytes the client sent start with these (a connection's; never an HTTP
    /// request's). Not empty.
    FirstBytes(Vec<u8>),
    /// A header `name` (case-insensitive) has a value containing `value` as a byte
    /// substring (case-sensitive). Any of the header's values may contain it.
    HeaderContains {
        /// The header's name.
        name: String,
        /// The byte string looked for in its values; not empty.
        value: String,
    },
    /// Holds with this probability, in `[0, 1]`: a fresh draw `d` in `[0, 1)` is taken
    /// each time the condition is evaluated, and the condition holds when `d < p`.
    Probability(f64),
}

/// Where a rule (or a chain's default) sends a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// The request belongs to this class.
    Class(String),
    /// Evaluation continues in this chain (whose own default ends it).
    Chain(String),
}

/// A condition list and the target taken when all conditions hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique within its chain; names the rule in listings, removals and errors.
    pub id: String,
    /// All must hold; empty means always.
    pub conditions: Vec<Condition>,
    /// Where a matching request goes.
    pub target: Target,
}

/// An ordered list of rules and the target taken when none matches.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// Unique among chains.
    pub name: String,
    /// Tried in order; the first match wins.
    pub rules: Vec<Rule>,
    /// Taken when no rule matches.
    pub default: Target,
}

/// How the classifier sees a request's headers (the gateway implements it over
/// `http::HeaderMap`).
pub trait Headers {
    /// Call `f` with each value of the header `name` (given in lowercase ASCII), in order;
    /// not at all if the request has no such header.
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8]));
}

/// Headers as a list of `(name, value)` pairs, names compared case-insensitively. For
/// tests and tools; the gateway implements [`Headers`] over its own header map.
#[derive(Debug, Clone, Copy)]
pub struct HeaderList<'a>(pub &'a [(&'a str, &'a str)]);

impl Headers for HeaderList<'_> {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for (n, v) in self.0 {
            if n.eq_ignore_ascii_case(name) {
                f(v.as_bytes());
            }
        }
    }
}

/// What the classifier looks at in a request or a connection.
pub struct RequestFacts<'a> {
    /// The client's address (the TCP peer, or a trusted forwarded-for address).
    pub client: IpAddr,
    /// The host: an HTTP request's (Host header or absolute-form authority, port
    /// allowed), or a TLS connection's server name.
    pub host: Option<&'a str>,
    /// The request path (as in the request line); empty for a connection.
    pub path: &'a str,
    /// The request's headers (none for a connection).
    pub headers: &'a dyn Headers,
    /// The name of the listener it came in on.
    pub listener: Option<&'a str>,
    /// The first bytes a connection's client sent (empty for an HTTP request, or when
    /// the client sent nothing in time).
    pub first_bytes: &'a [u8],
}

/// No headers at all: what a connection has.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHeaders;

impl Headers for NoHeaders {
    fn for_each_value(&self, _name: &str, _f: &mut dyn FnMut(&[u8])) {}
}

/// Where in the rules an error is: a chain, and a rule id or the chain's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The chain's name; empty when a rule is checked on its own (before it is placed).
    pub chain: String,
    /// The rule's id; `None` for the chain's default.
    pub rule: Option<String>,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.rule, self.chain.is_empty()) {
            (Some(rule), true) => write!(f, "rule `{rule}`"),
            (Some(rule), false) => write!(f, "chain `{}`, rule `{rule}`", self.chain),
            (None, _) => write!(f, "chain `{}`, default", self.chain),
        }
    }
}

/// A rule set that cannot be built, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A target names a class that does not exist.
    #[error("{at}: target class `{class}` is not defined (classes: {known})")]
    UnknownClass {
        /// Where.
        at: Place,
        /// The unknown class.
        class: String,
        /// The defined classes, comma-separated.
        known: String,
    },
    /// A target names a chain that does not exist.
    #[error("{at}: target chain `{target}` is not defined (chains: {known})")]
    UnknownChain {
        /// Where.
        at: Place,
        /// The unknown chain.
        target: String,
        /// The defined chains, comma-separated.
        known: String,
    },
    /// The entry chain does not exist.
    #[error("entry chain `{entry}` is not defined (chains: {known})")]
    UnknownEntry {
        /// The unknown entry.
        entry: String,
        /// The defined chains, comma-separated.
        known: String,
    },
    /// Chains jump to each other in a loop.
    #[error(
        "chains form a cycle: {cycle}; a chain may only jump to chains that never lead back to it"
    )]
    Cycle {
        /// The loop, as `a -> b -> a`.
        cycle: String,
    },
    /// Two chains share a name.
    #[error("chain `{chain}` is defined twice; chain names must be unique")]
    DuplicateChain {
        /// The name.
        chain: String,
    },
    /// Two rules of a chain share an id.
    #[error(
        "chain `{chain}`: rule id `{rule}` is used twice; rule ids must be unique in their chain"
    )]
    DuplicateRule {
        /// The chain.
        chain: String,
        /// The id.
        rule: String,
    },
    /// A rule has an empty id.
    #[error("chain `{chain}`: a rule has an empty `id`; every rule needs a non-empty id")]
    EmptyRuleId {
        /// The chain.
        chain: String,
    },
    /// A probability outside `[0, 1]` (or NaN).
    #[error("{at}: `probability` must be a number from 0 to 1, got {value}")]
    BadProbability {
        /// Where.
        at: Place,
        /// The value given.
        value: f64,
    },
    /// A header condition looks for the empty string.
    #[error("{at}: `header.contains` must not be empty")]
    EmptyNeedle {
        /// Where.
        at: Place,
    },
    /// A header condition names something that cannot be a header.
    #[error("{at}: `header.name` {name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~, not empty)")]
    BadHeaderName {
        /// Where.
        at: Place,
        /// The name given.
        name: String,
    },
    /// A host pattern that cannot match a host.
    #[error("{at}: `host` {pattern:?} is not a host pattern ({why}); allowed: `api.example.com`, `*.example.com`, `192.0.2.1`, `[2001:db8::1]`")]
    BadHost {
        /// Where.
        at: Place,
        /// The pattern given.
        pattern: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A source entry that is neither an address nor a network.
    #[error("{at}: `source` {value:?} is not an address or network (allowed: `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`, `::1`)")]
    BadSource {
        /// Where.
        at: Place,
        /// The value given.
        value: String,
    },
    /// A source condition with no networks (it could never match).
    #[error("{at}: `source` must list at least one address or network")]
    EmptySource {
        /// Where.
        at: Place,
    },
    /// A path prefix that does not start with `/`.
    #[error("{at}: `path_prefix` {prefix:?} must start with `/`")]
    BadPathPrefix {
        /// Where.
        at: Place,
        /// The prefix given.
        prefix: String,
    },
    /// A listener condition with no names, or an empty name.
    #[error("{at}: `listener` must name at least one listener, and no name may be empty")]
    EmptyListener {
        /// Where.
        at: Place,
    },
    /// A first-bytes condition that looks for nothing.
    #[error("{at}: `first_bytes` must not be empty")]
    EmptyFirstBytes {
        /// Where.
        at: Place,
    },
    /// A change names a chain that does not exist.
    #[error("no chain named `{chain}` (chains: {known})")]
    NoSuchChain {
        /// The chain asked for.
        chain: String,
        /// The defined chains, comma-separated.
        known: String,
    },
    /// A removal names a rule that is not in the chain.
    #[error("chain `{chain}` has no rule `{rule}`")]
    NoSuchRule {
        /// The chain.
        chain: String,
        /// The rule asked for.
        rule: String,
    },
    /// An insertion position past the end of the chain.
    #[error("chain `{chain}`: position {position} is past the end (the chain has {len} rules; positions 0 to {len} are allowed)")]
    BadPosition {
        /// The chain.
        chain: String,
        /// The position asked for.
        position: usize,
        /// The chain's rule count.
        len: usize,
    },
    /// The header strings of a chain could not be compiled (too large).
    #[error("chain `{chain}`: header strings could not be compiled: {why}")]
    Automaton {
        /// The chain.
        chain: String,
        /// The matcher's reason.
        why: String,
    },
}

impl RuleError {
    /// The same error, placed in `chain` if it was found in a rule checked on its own.
    fn in_chain(mut self, chain: &str) -> RuleError {
        match &mut self {
            RuleError::BadProbability { at, .. }
            | RuleError::EmptyNeedle { at }
            | RuleError::BadHeaderName { at, .. }
            | RuleError::BadHost { at, .. }
            | RuleError::BadSource { at, .. }
            | RuleError::EmptySource { at }
            | RuleError::BadPathPrefix { at, .. }
            | RuleError::EmptyListener { at }
            | RuleError::EmptyFirstBytes { at }
            | RuleError::UnknownClass { at, .. }
            | RuleError::UnknownChain { at, .. }
                if at.chain.is_empty() =>
            {
                at.chain = chain.to_string();
            }
            _ => {}
        }
        self
    }
}

/// A compiled host pattern: lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com` kept as `.example.com`.
    Suffix(String),
}

impl HostPattern {
    fn parse(pattern: &str) -> Result<HostPattern, &'static str> {
        let p = pattern.strip_suffix('.').unwrap_or(pattern);
        if p.is_empty() {
            return Err("it is empty");
        }
        if let Some(inner) = p.strip_prefix('[') {
            let Some(addr) = inner.strip_suffix(']') else {
                return Err("a `[` IPv6 literal must end with `]`, without a port");
            };
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("the bracketed part is not an IPv6 address");
            }
            return Ok(HostPattern::Exact(p.to_ascii_lowercase()));
        }
        let (wild, rest) = match p.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, p),
        };
        if rest.is_empty() {
            return Err("nothing follows `*.`");
        }
        if rest.contains('*') {
            return Err("`*` is only allowed as a leading `*.`");
        }
        if rest.contains(':') {
            return Err("a port is not part of a host pattern");
        }
        if !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if rest.starts_with('.') || rest.contains("..") {
            return Err("it has an empty label");
        }
        let rest = rest.to_ascii_lowercase();
        Ok(if wild {
            HostPattern::Suffix(format!(".{rest}"))
        } else {
            HostPattern::Exact(rest)
        })
    }

    fn matches(&self, host: &str) -> bool {
        let host = host_without_port(host);
        let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
        match self {
            HostPattern::Exact(p) => host.eq_ignore_ascii_case(p.as_bytes()),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`; a bare IPv6 address (not
/// valid in Host, but seen) is kept whole.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if !host[..i].contains(':') => &host[..i],
        _ => host,
    }
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Check one condition on its own (targets and ids are checked with the whole set).
fn check_condition(c: &Condition, at: &Place) -> Result<(), RuleError> {
    match c {
        Condition::Source(nets) if nets.is_empty() => {
            Err(RuleError::EmptySource { at: at.clone() })
        }
        Condition::Source(_) => Ok(()),
        Condition::Host(p) => HostPattern::parse(p)
            .map(|_| ())
            .map_err(|why| RuleError::BadHost {
                at: at.clone(),
                pattern: p.clone(),
                why,
            }),
        Condition::PathPrefix(p) if !p.starts_with('/') => Err(RuleError::BadPathPrefix {
            at: at.clone(),
            prefix: p.clone(),
        }),
        Condition::PathPrefix(_) => Ok(()),
        Condition::Listener(names) if names.is_empty() || names.iter().any(|n| n.is_empty()) => {
            Err(RuleError::EmptyListener { at: at.clone() })
        }
        Condition::Listener(_) => Ok(()),
        Condition::FirstBytes(b) if b.is_empty() => {
            Err(RuleError::EmptyFirstBytes { at: at.clone() })
        }
        Condition::FirstBytes(_) => Ok(()),
        Condition::HeaderContains { name, .. } if !is_header_name(name) => {
            Err(RuleError::BadHeaderName {
                at: at.clone(),
                name: name.clone(),
            })
        }
        Condition::HeaderContains { value, .. } if value.is_empty() => {
            Err(RuleError::EmptyNeedle { at: at.clone() })
        }
        Condition::HeaderContains { .. } => Ok(()),
        Condition::Probability(p) if !(0.0..=1.0).contains(p) => Err(RuleError::BadProbability {
            at: at.clone(),
            value: *p,
        }),
        Condition::Probability(_) => Ok(()),
    }
}

/// Where a compiled target leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goto {
    Class(usize),
    Chain(usize),
}

#[derive(Debug, Clone)]
enum Test {
    Source(Vec<IpNet>),
    Host(HostPattern),
    PathPrefix(String),
    Listener(Vec<String>),
    FirstBytes(Vec<u8>),
    /// Needle `needle` of the chain's automaton occurs in a value of header `header`.
    Header {
        header: usize,
        needle: usize,
    },
    Probability(f64),
}

#[derive(Debug, Clone)]
struct CompiledRule {
    tests: Vec<Test>,
    goto: Goto,
}

#[derive(Debug, Clone)]
struct CompiledChain {
    rules: Vec<CompiledRule>,
    default: Goto,
    /// One automaton over every header string of the chain, if it has any.
    matcher: Option<AhoCorasick>,
    /// The lowercase names of the headers the chain's rules test.
    headers: Vec<String>,
}

/// Which needles occur in which headers, filled one header at a time, on first need.
/// Per header, one word saying whether it was scanned, then a bit per needle.
struct HeaderScan {
    stride: usize,
    bits: Bits,
}

/// Word storage that stays on the stack for the usual few headers and strings.
enum Bits {
    Inline([u64; 8]),
    Heap(Vec<u64>),
}

impl HeaderScan {
    fn new(chain: &CompiledChain) -> HeaderScan {
        let words = chain
            .matcher
            .as_ref()
            .map_or(0, |m| m.patterns_len().div_ceil(64));
        let stride = words + 1;
        let total = stride * chain.headers.len();
        HeaderScan {
            stride,
            bits: if total <= 8 {
                Bits::Inline([0; 8])
            } else {
                Bits::Heap(vec![0; total])
            },
        }
    }

    fn has(
        &mut self,
        chain: &CompiledChain,
        headers: &dyn Headers,
        header: usize,
        needle: usize,
    ) -> bool {
        let Some(matcher) = &chain.matcher else {
            return false;
        };
        let bits = match &mut self.bits {
            Bits::Inline(a) => &mut a[..],
            Bits::Heap(v) => &mut v[..],
        };
        let row = &mut bits[header * self.stride..(header + 1) * self.stride];
        if row[0] == 0 {
            row[0] = 1;
            let found = &mut row[1..];
            headers.for_each_value(&chain.headers[header], &mut |value: &[u8]| {
                for m in matcher.find_overlapping_iter(value) {
                    let n = m.pattern().as_usize();
                    found[n / 64] |= 1 << (n % 64);
                }
            });
        }
        row[1 + needle / 64] & (1 << (needle % 64)) != 0
    }
}

/// Compiled, validated rule chains: immutable, `Send + Sync`, cheap to share behind `Arc`.
#[derive(Debug, Clone)]
pub struct RuleSet {
    chains: Vec<Chain>,
    entry: String,
    classes: Vec<String>,
    compiled: Vec<CompiledChain>,
    entry_index: usize,
}

fn known(names: impl Iterator<Item = impl AsRef<str>>) -> String {
    let list: Vec<String> = names.map(|n| format!("`{}`", n.as_ref())).collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

impl RuleSet {
    /// Validate and compile `chains`, evaluation starting at the chain named `entry`.
    /// `classes` are the known class names; classify returns an index into it.
    pub fn new(
        chains: Vec<Chain>,
        entry: &str,
        classes: Vec<String>,
    ) -> Result<RuleSet, RuleError> {
        let mut chain_index: HashMap<&str, usize> = HashMap::new();
        for (i, c) in chains.iter().enumerate() {
            if chain_index.insert(c.name.as_str(), i).is_some() {
                return Err(RuleError::DuplicateChain {
                    chain: c.name.clone(),
                });
            }
        }
        let class_index: HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let Some(&entry_index) = chain_index.get(entry) else {
            return Err(RuleError::UnknownEntry {
                entry: entry.to_string(),
                known: known(chains.iter().map(|c| &c.name)),
            });
        };
        let resolve = |target: &Target, at: Place| -> Result<Goto, RuleError> {
            match target {
                Target::Class(c) => class_index
                    .get(c.as_str())
                    .map(|&i| Goto::Class(i))
                    .ok_or_else(|| RuleError::UnknownClass {
                        at,
                        class: c.clone(),
                        known: known(classes.iter()),
                    }),
                Target::Chain(c) => chain_index
                    .get(c.as_str())
                    .map(|&i| Goto::Chain(i))
                    .ok_or_else(|| RuleError::UnknownChain {
                        at,
                        target: c.clone(),
                        known: known(chains.iter().map(|c| &c.name)),
                    }),
            }
        };

        let mut compiled = Vec::with_capacity(chains.len());
        for chain in &chains {
            let mut ids = HashSet::new();
            let mut needles: Vec<&str> = Vec::new();
            let mut needle_ids: HashMap<&str, usize> = HashMap::new();
            let mut headers: Vec<String> = Vec::new();
            let mut rules = Vec::with_capacity(chain.rules.len());
            for rule in &chain.rules {
                if rule.id.is_empty() {
                    return Err(RuleError::EmptyRuleId {
                        chain: chain.name.clone(),
                    });
                }
                if !ids.insert(rule.id.as_str()) {
                    return Err(RuleError::DuplicateRule {
                        chain: chain.name.clone(),
                        rule: rule.id.clone(),
                    });
                }
                let at = Place {
                    chain: chain.name.clone(),
                    rule: Some(rule.id.clone()),
                };
                let mut tests = Vec::with_capacity(rule.conditions.len());
                for cond in &rule.conditions {
                    check_condition(cond, &at)?;
                    tests.push(match cond {
                        Condition::Source(nets) => Test::Source(nets.clone()),
                        Condition::Host(p) => {
                            Test::Host(HostPattern::parse(p).map_err(|why| RuleError::BadHost {
                                at: at.clone(),
                                pattern: p.clone(),
                                why,
                            })?)
                        }
                        Condition::PathPrefix(p) => Test::PathPrefix(p.clone()),
                        Condition::Listener(names) => Test::Listener(names.clone()),
                        Condition::FirstBytes(b) => Test::FirstBytes(b.clone()),
                        Condition::HeaderContains { name, value } => {
                            let name = name.to_ascii_lowercase();
                            let header = match headers.iter().position(|h| *h == name) {
                                Some(h) => h,
                                None => {
                                    headers.push(name);
                                    headers.len() - 1
                                }
                            };
                            let next = needles.len();
                            let needle = *needle_ids.entry(value.as_str()).or_insert(next);
                            if needle == next {
                                needles.push(value.as_str());
                            }
                            Test::Header { header, needle }
                        }
                        Condition::Probability(p) => Test::Probability(*p),
                    });
                }
                rules.push(CompiledRule {
                    tests,
                    goto: resolve(&rule.target, at)?,
                });
            }
            let default = resolve(
                &chain.default,
                Place {
                    chain: chain.name.clone(),
                    rule: None,
                },
            )?;
            let matcher = if needles.is_empty() {
                None
            } else {
                Some(
                    AhoCorasick::new(&needles).map_err(|e| RuleError::Automaton {
                        chain: chain.name.clone(),
                        why: e.to_string(),
                    })?,
                )
            };
            compiled.push(CompiledChain {
                rules,
                default,
                matcher,
                headers,
            });
        }
        check_acyclic(&chains, &compiled)?;
        Ok(RuleSet {
            entry: entry.to_string(),
            chains,
            classes,
            compiled,
            entry_index,
        })
    }

    /// Validate and compile chains given in their configuration shape.
    pub fn from_specs(
        chains: Vec<ChainSpec>,
        entry: &str,
        classes: Vec<String>,
    ) -> Result<RuleSet, RuleError> {
        let chains = chains
            .into_iter()
            .map(Chain::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        RuleSet::new(chains, entry, classes)
    }

    /// The chains in their configuration shape, for listing.
    pub fn to_specs(&self) -> Vec<ChainSpec> {
        self.chains.iter().cloned().map(ChainSpec::from).collect()
    }

    /// The class of `req`: the target of the first matching rule, following chain targets
    /// (at most as deep as the chains go: they are acyclic), starting in the entry chain.
    /// Each probability condition evaluated calls `draw` once for a number in `[0, 1)`.
    pub fn classify(&self, req: &RequestFacts<'_>, draw: &mut dyn FnMut() -> f64) -> usize {
        self.classify_from(self.entry_index, req, draw)
    }

    /// The index of the chain named `name`, to start classification in (a listener's own
    /// entry chain).
    pub fn chain_index(&self, name: &str) -> Option<usize> {
        self.chains.iter().position(|c| c.name == name)
    }

    /// As [`RuleSet::classify`], starting in chain `entry` (from
    /// [`RuleSet::chain_index`]); an index out of range starts in the entry chain.
    pub fn classify_from(
        &self,
        entry: usize,
        req: &RequestFacts<'_>,
        draw: &mut dyn FnMut() -> f64,
    ) -> usize {
        let client = req.client.to_canonical();
        let mut chain = if entry < self.compiled.len() {
            entry
        } else {
            self.entry_index
        };
        loop {
            let c = &self.compiled[chain];
            let mut scan: Option<HeaderScan> = None;
            let mut goto = c.default;
            for rule in &c.rules {
                let holds = rule.tests.iter().all(|t| match t {
                    Test::Source(nets) => nets.iter().any(|n| n.contains(&client)),
                    Test::Host(p) => req.host.is_some_and(|h| p.matches(h)),
                    Test::PathPrefix(p) => req.path.as_bytes().starts_with(p.as_bytes()),
                    Test::Listener(names) => {
                        req.listener.is_some_and(|l| names.iter().any(|n| n == l))
                    }
                    Test::FirstBytes(b) => req.first_bytes.starts_with(b),
                    Test::Header { header, needle } => {
                        let scan = scan.get_or_insert_with(|| HeaderScan::new(c));
                        scan.has(c, req.headers, *header, *needle)
                    }
                    Test::Probability(p) => draw() < *p,
                });
                if holds {
                    goto = rule.goto;
                    break;
                }
            }
            match goto {
                Goto::Class(i) => return i,
                Goto::Chain(next) => chain = next,
            }
        }
    }

    /// The known class names; [`RuleSet::classify`] returns an index into this.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The chains as given, for listing.
    pub fn chains(&self) -> &[Chain] {
        &self.chains
    }

    /// The name of the chain evaluation starts in.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// A new rule set with `rule` inserted in `chain` at `position` (None = end, before the
    /// default).
    pub fn with_rule_added(
        &self,
        chain: &str,
        position: Option<usize>,
        rule: Rule,
    ) -> Result<RuleSet, RuleError> {
        let mut chains = self.chains.clone();
        let i = self.chain_position(chain)?;
        let len = chains[i].rules.len();
        let position = position.unwrap_or(len);
        if position > len {
            return Err(RuleError::BadPosition {
                chain: chain.to_string(),
                position,
                len,
            });
        }
        chains[i].rules.insert(position, rule);
        RuleSet::new(chains, &self.entry, self.classes.clone())
    }

    /// A new rule set without the rule `rule_id` of `chain`.
    pub fn with_rule_removed(&self, chain: &str, rule_id: &str) -> Result<RuleSet, RuleError> {
        let mut chains = self.chains.clone();
        let i = self.chain_position(chain)?;
        let Some(r) = chains[i].rules.iter().position(|r| r.id == rule_id) else {
            return Err(RuleError::NoSuchRule {
                chain: chain.to_string(),
                rule: rule_id.to_string(),
            });
        };
        chains[i].rules.remove(r);
        RuleSet::new(chains, &self.entry, self.classes.clone())
    }

    fn chain_position(&self, chain: &str) -> Result<usize, RuleError> {
        self.chains
            .iter()
            .position(|c| c.name == chain)
            .ok_or_else(|| RuleError::NoSuchChain {
                chain: chain.to_string(),
                known: known(self.chains.iter().map(|c| &c.name)),
            })
    }
}

/// Reject a cycle among chain jumps (depth-first search, three colours), naming it.
fn check_acyclic(chains: &[Chain], compiled: &[CompiledChain]) -> Result<(), RuleError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let edges = |c: usize| -> Vec<usize> {
        let mut out: Vec<usize> = compiled[c]
            .rules
            .iter()
            .map(|r| r.goto)
            .chain(std::iter::once(compiled[c].default))
            .filter_map(|g| match g {
                Goto::Chain(n) => Some(n),
                Goto::Class(_) => None,
            })
            .collect();
        out.dedup();
        out
    };
    let mut mark = vec![Mark::New; compiled.len()];
    for root in 0..compiled.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // Explicit stack of (chain, its successors, next successor to visit).
        let mut path: Vec<(usize, Vec<usize>, usize)> = vec![(root, edges(root), 0)];
        mark[root] = Mark::OnPath;
        while let Some((node, succ, next)) = path.last_mut() {
            if let Some(&s) = succ.get(*next) {
                *next += 1;
                match mark[s] {
                    Mark::OnPath => {
                        let start = path.iter().position(|(n, _, _)| *n == s).unwrap_or(0);
                        let mut names: Vec<&str> = path[start..]
                            .iter()
                            .map(|(n, _, _)| chains[*n].name.as_str())
                            .collect();
                        names.push(chains[s].name.as_str());
                        return Err(RuleError::Cycle {
                            cycle: names.join(" -> "),
                        });
                    }
                    Mark::New => {
                        mark[s] = Mark::OnPath;
                        path.push((s, edges(s), 0));
                    }
                    Mark::Done => {}
                }
            } else {
                mark[*node] = Mark::Done;
                path.pop();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
