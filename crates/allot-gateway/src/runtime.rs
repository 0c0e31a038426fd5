//! The gateway's live state as one snapshot, [`Runtime`], built whole from a validated
//! configuration and swapped in with one store ([`Live::apply`]). A request loads the
//! snapshot once and uses it to the end, so it sees either the old configuration or the
//! new one, never a mix: a class renamed by a reload is not retired under a request that
//! was classified into it a moment before.
//!
//! What must outlive a snapshot — queues and requests waiting in them, counts in service,
//! sensors, token buckets, back-end pools and health, agreement credit — lives in cores
//! ([`ClassCore`], [`crate::upstream::BackendCore`], the bandwidth groups and the
//! enforcer's principals) that the next snapshot takes over by name. A class dropped from
//! the configuration keeps its core while requests still use it; its queue drains.
//!
//! The actuators that controllers move (a class's accept rate, its divert probability, a
//! back end's adaptive limit) are on the cores too, so a reload does not undo them; a
//! controller that goes away puts them back as configured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_model::bucket::TokenBucket;
use allot_model::classify::RuleSet;
use allot_model::dispatch::ClassWeights;
use allot_model::queue::QueueConfig;
use allot_model::Nanos;
use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::time::Instant;

use crate::access::AccessLog;
use crate::config::{ClassConfig, Config, ConfigError, ListenerConfig, Secret};
use crate::credit::Enforcer;
use crate::sched::{ClassLimits, SchedClass, Scheduler};
use crate::shape::BandwidthGroup;
use crate::stats::{ClassStats, RefuseReason, Status};
use crate::upstream::Backend;

/// What lasts of a class across reloads.
#[derive(Debug)]
pub struct ClassCore {
    /// Name, from the configuration.
    pub name: String,
    /// Its sensors.
    pub stats: Arc<ClassStats>,
    /// Its queue and counts in the scheduler.
    pub sched: Arc<SchedClass>,
    /// The scheduler it is in.
    pub scheduler: Arc<Scheduler>,
    accept: Mutex<Accept>,
    /// The divert-to-degraded actuator (`utilisation` controller).
    pub divert: Divert,
}

/// The accept-rate actuator: the configured rate, or a controller's while one holds it.
#[derive(Debug, Default)]
struct Accept {
    bucket: Option<TokenBucket>,
    configured: Option<(f64, f64)>,
    overridden: Option<(f64, f64)>,
}

impl Accept {
    fn set(&mut self, rate: Option<(f64, f64)>, now: Nanos) {
        match (self.bucket.as_mut(), rate) {
            (Some(bucket), Some((r, burst))) => bucket.set_rate(r, burst, now),
            (None, Some((r, burst))) => self.bucket = Some(TokenBucket::new(r, burst, now)),
            (_, None) => self.bucket = None,
        }
    }
}

impl ClassCore {
    /// Takes one admission from the accept-rate actuator at `now`; false when it has none.
    pub fn try_accept(&self, now: Nanos) -> bool {
        let mut a = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        a.bucket.as_mut().is_none_or(|b| b.try_take(1.0, now))
    }

    /// Actuator: a controller sets the class's accept rate (per second, with its burst);
    /// `None` puts back the configured one, if any.
    pub fn set_accept_rate(&self, rate: Option<(f64, f64)>, now: Nanos) {
        let mut a = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        a.overridden = rate;
        let effective = a.overridden.or(a.configured);
        a.set(effective, now);
    }

    fn configure_accept(&self, configured: Option<(f64, f64)>, now: Nanos) {
        let mut a = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        a.configured = configured;
        if a.overridden.is_none() {
            a.set(configured, now);
        }
    }
}

/// Holds a class's in-flight gauge raised while a request is in service.
#[derive(Debug)]
pub struct InFlight(Arc<ClassCore>);

impl InFlight {
    /// Raises `class`'s gauge until the guard is dropped.
    pub fn new(class: Arc<ClassCore>) -> InFlight {
        class.stats.in_flight.fetch_add(1, Relaxed);
        InFlight(class)
    }

    /// The class.
    pub fn class(&self) -> &Arc<ClassCore> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The divert actuator of a class: with probability `p`, a request goes to another back
/// end (the degraded variant) instead of the class's own.
#[derive(Debug, Default)]
pub struct Divert {
    to: Mutex<Option<Arc<str>>>,
    p_bits: AtomicU64,
    on: std::sync::atomic::AtomicBool,
}

impl Divert {
    /// Diverts to the back end named `to` with probability `p` (clamped to [0, 1]);
    /// `None` stops.
    pub fn set(&self, to: Option<&str>, p: f64) {
        let p = if p.is_finite() {
            p.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.p_bits.store(p.to_bits(), Relaxed);
        *self.to.lock().unwrap_or_else(|e| e.into_inner()) = to.map(Arc::from);
        self.on.store(to.is_some(), Relaxed);
    }

    /// The probability in force (0 when not diverting).
    pub fn probability(&self) -> f64 {
        if self.on.load(Relaxed) {
            f64::from_bits(self.p_bits.load(Relaxed))
        } else {
            0.0
        }
    }

    /// The back end for one request: `None` for the class's own, else the one to divert
    /// it to.
    pub fn pick(&self) -> Option<Arc<str>> {
        if !self.on.load(Relaxed) {
            return None;
        }
        let p = f64::from_bits(self.p_bits.load(Relaxed));
        if p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p) {
            self.to.lock().unwrap_or_else(|e| e.into_inner()).clone()
        } else {
            None
        }
    }
}

/// A class as one snapshot has it.
#[derive(Debug)]
pub struct ClassRt {
    /// What lasts across reloads.
    pub core: Arc<ClassCore>,
    /// Index of its back end in [`Runtime::backends`].
    pub backend: usize,
    /// Longest wait for service.
    pub max_wait: Duration,
    /// Its bandwidth group.
    pub bandwidth: Option<Arc<BandwidthGroup>>,
    /// Whether responses' sizes are learned (shortest-first).
    pub learn_sizes: bool,
    /// The whole-request limit, from service start to the end of the response.
    pub request_timeout: Option<Duration>,
    /// The principal its requests are charged to, under `[agreements]`.
    pub principal: Option<usize>,
    /// The 503 bodies, by [`RefuseReason`], made once.
    refusals: [Bytes; RefuseReason::ALL.len()],
}

impl ClassRt {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The one-line body of a 503 for `reason`.
    pub fn refusal_text(&self, reason: RefuseReason) -> Bytes {
        self.refusals[reason as usize].clone()
    }
}

/// A listener's settings as its connections and requests read them.
#[derive(Debug, Clone)]
pub struct ListenerRt {
    /// Its name, as rules and metrics see it.
    pub name: Arc<str>,
    /// Its configuration.
    pub config: ListenerConfig,
    /// The chain its classification starts in (an index into the rule set's chains).
    pub entry: usize,
    /// HTTP: largest request body.
    pub max_body_bytes: u64,
    /// HTTP: longest pause in a request body.
    pub request_body_timeout: Duration,
    /// Idle timeout: between requests (HTTP), or without a byte either way (TCP).
    pub idle_timeout: Duration,
    /// TCP: how long to wait for the client's first bytes.
    pub inspect: Duration,
}

/// One snapshot of the whole live state: what a request loads once and uses to the end.
#[derive(Debug)]
pub struct Runtime {
    /// Counts snapshots since start.
    pub generation: u64,
    /// The configuration in force (the file's, plus run-time changes).
    pub config: Config,
    /// The admin token, resolved.
    pub admin_token: Option<Secret>,
    /// The rule chains.
    pub rules: RuleSet,
    /// For each class of `rules.classes()`, its index in `classes`.
    rule_class: Vec<usize>,
    /// The classes, in configuration order.
    pub classes: Vec<ClassRt>,
    /// The back ends, in configuration order.
    pub backends: Vec<Arc<Backend>>,
    /// The bandwidth groups, by name.
    pub groups: HashMap<String, Arc<BandwidthGroup>>,
    /// The agreement enforcer, under `[agreements]`.
    pub enforcer: Option<Arc<Enforcer>>,
    /// The listeners, in configuration order (fixed at start).
    pub listeners: Vec<ListenerRt>,
    /// The access log, when `[access_log]` is set.
    pub access_log: Option<Arc<AccessLog>>,
}

impl Runtime {
    /// The class a request classified into rule-set class `picked` belongs to.
    pub fn class_of_rule(&self, picked: usize) -> Option<&ClassRt> {
        self.rule_class
            .get(picked)
            .and_then(|&i| self.classes.get(i))
    }

    /// The class named `name`.
    pub fn class(&self, name: &str) -> Option<&ClassRt> {
        self.classes.iter().find(|c| c.core.name == name)
    }

    /// The back end named `name`.
    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.name() == name)
    }

    /// The back end for one request of `class`: its own, or the one its divert actuator
    /// picks.
    pub fn backend_for(&self, class: &ClassRt) -> Option<&Arc<Backend>> {
        match class.core.divert.pick() {
            Some(to) => self.backend(&to),
            None => self.backends.get(class.backend),
        }
    }

    /// Builds the snapshot `config` describes, taking over the cores of `previous`. Only
    /// infallible steps touch shared state, after every fallible one has passed.
    fn build(
        config: Config,
        previous: Option<&Runtime>,
        scheduler: &Arc<Scheduler>,
        generation: u64,
    ) -> Result<Runtime, ConfigError> {
        let now = crate::clock::now();
        let rules = config
            .rule_set_or_single()
            .map_err(|e| invalid("chain", e.to_string()))?;
        let access_log = match &config.access_log {
            Some(a) => match previous
                .and_then(|p| p.access_log.as_ref())
                .filter(|l| l.is(a))
            {
                Some(same) => Some(Arc::clone(same)),
                None => Some(AccessLog::open(a).map_err(|e| {
                    invalid("access_log.path", format!("cannot open {:?}: {e}", a.path))
                })?),
            },
            None => None,
        };
        let enforcer = match &config.agreements {
            Some(a) => {
                let old = previous.and_then(|p| p.enforcer.as_deref());
                let e =
                    Enforcer::new(a.get_ref(), old, now).map_err(|e| invalid("agreements", e))?;
                Some(Arc::new(e))
            }
            None => None,
        };

        // Back ends, by name, keeping their cores.
        let backends: Vec<Arc<Backend>> = config
            .backends()
            .map(|b| {
                let old = previous
                    .and_then(|p| p.backend(&b.name))
                    .map(|a| a.as_ref());
                Arc::new(Backend::build(b, old))
            })
            .collect();
        let backend_index: HashMap<&str, usize> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name(), i))
            .collect();

        // Bandwidth groups, by name, keeping their buckets.
        let groups: HashMap<String, Arc<BandwidthGroup>> = config
            .bandwidth_groups()
            .map(|g| {
                let group = match previous.and_then(|p| p.groups.get(&g.name)) {
                    Some(existing) => {
                        existing.set_rate(g.bytes_per_sec, g.burst(), now);
                        Arc::clone(existing)
                    }
                    None => Arc::new(BandwidthGroup::new(g.bytes_per_sec, g.burst(), now)),
                };
                (g.name.clone(), group)
            })
            .collect();

        // Classes, by name, keeping their cores (and so their queues).
        let mut classes = Vec::with_capacity(config.class.len());
        for c in config.classes() {
            let backend = backend_index.get(c.backend.as_str()).copied().unwrap_or(0);
            let gate = backends
                .get(backend)
                .map(|b| Arc::clone(&b.core.gate))
                .unwrap_or_default();
            let core = match previous.and_then(|p| p.class(&c.name)) {
                Some(old) => {
                    let core = Arc::clone(&old.core);
                    scheduler.configure_class(&core.sched, limits(c), c.queue_limit, gate);
                    core
                }
                None => {
                    let stats = Arc::new(ClassStats::default());
                    let sched =
                        scheduler.add_class(limits(c), c.queue_limit, gate, Arc::clone(&stats));
                    Arc::new(ClassCore {
                        name: c.name.clone(),
                        stats,
                        sched,
                        scheduler: Arc::clone(scheduler),
                        accept: Mutex::new(Accept::default()),
                        divert: Divert::default(),
                    })
                }
            };
            core.configure_accept(c.accept_rate.map(|r| (r.rate_per_sec, r.burst)), now);
            let refusals = RefuseReason::ALL
                .map(|r| Bytes::from(format!("allot: class {} refused: {}\n", c.name, r.as_str())));
            classes.push(ClassRt {
                core,
                backend,
                max_wait: Duration::from_millis(c.max_wait_ms),
                bandwidth: c
                    .bandwidth_group
                    .as_ref()
                    .and_then(|g| groups.get(g).cloned()),
                learn_sizes: c.policy == allot_model::queue::Policy::ShortestFirst,
                request_timeout: c.request_timeout_ms.map(Duration::from_millis),
                principal: enforcer
                    .as_ref()
                    .and_then(|e| e.principal_of_class(&c.name)),
                refusals,
            });
        }
        let rule_class = rules
            .classes()
            .iter()
            .map(|name| {
                classes
                    .iter()
                    .position(|c| c.core.name == *name)
                    .unwrap_or(0)
            })
            .collect();
        scheduler.set_max_running(config.gateway.max_running);
        let listeners = config
            .listeners()
            .map(|l| ListenerRt {
                name: Arc::from(l.name()),
                entry: l
                    .entry_chain
                    .as_deref()
                    .and_then(|c| rules.chain_index(c))
                    .unwrap_or(usize::MAX),
                max_body_bytes: l.max_body_bytes,
                request_body_timeout: Duration::from_millis(l.request_body_timeout_ms),
                idle_timeout: Duration::from_millis(l.idle_timeout_ms()),
                inspect: Duration::from_millis(l.inspect_ms),
                config: l.clone(),
            })
            .collect();
        Ok(Runtime {
            generation,
            admin_token: config.admin.resolved_token(),
            rules,
            rule_class,
            classes,
            backends,
            groups,
            enforcer,
            listeners,
            access_log,
            config,
        })
    }
}

fn limits(c: &ClassConfig) -> ClassLimits {
    ClassLimits {
        max_running: c.max_running,
        weights: ClassWeights {
            priority: c.priority,
            ratio: c.ratio,
        },
        queue: QueueConfig {
            policy: c.policy,
            limit: c.queue_limit,
            age_bound: c.age_bound(),
        },
    }
}

fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: "configuration".into(),
        line: 0,
        key: key.into(),
        message,
    }
}

/// The snapshot in force, and the one way it changes.
pub struct Live {
    current: ArcSwap<Runtime>,
    scheduler: Arc<Scheduler>,
    /// Serialises changes so two writers cannot interleave.
    change: Mutex<()>,
    started: Instant,
    /// The generation in force, for loops that follow changes.
    changed: tokio::sync::watch::Sender<u64>,
    /// Client connections open now, all listeners.
    pub connections: AtomicI64,
    /// Client connections accepted since start.
    pub accepted: AtomicUsize,
    /// Shared with the cluster link: demand up, quota down (unused without `[cluster]`).
    pub cluster: Arc<crate::cluster::ClusterShared>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("generation", &self.current.load().generation)
            .finish()
    }
}

impl Live {
    /// The live state `config` describes (already validated by [`Config::parse`]).
    pub fn new(config: Config) -> Result<Arc<Live>, ConfigError> {
        let scheduler = Scheduler::new(config.gateway.max_running);
        let runtime = Runtime::build(config, None, &scheduler, 0)?;
        Ok(Arc::new(Live {
            current: ArcSwap::from_pointee(runtime),
            scheduler,
            change: Mutex::new(()),
            started: Instant::now(),
            changed: tokio::sync::watch::channel(0).0,
            connections: AtomicI64::new(0),
            accepted: AtomicUsize::new(0),
            cluster: Arc::default(),
        }))
    }

    /// The snapshot in force.
    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// Follows changes: the receiver sees each new generation.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Makes `config` the configuration in force, keeping waiting and running requests:
    /// builds the whole new snapshot, then swaps it in with one store. On error nothing
    /// changes. The listener and admin addresses are fixed at start; a change to them is
    /// logged and ignored.
    pub fn apply(&self, config: Config) -> Result<(), ConfigError> {
        let _one_at_a_time = self.change.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.load();
        let shape = |c: &Config| -> Vec<(String, std::net::SocketAddr, &'static str)> {
            c.listeners()
                .map(|l| (l.name(), l.address, l.protocol.as_str()))
                .collect()
        };
        if shape(&old.config) != shape(&config) {
            return Err(invalid(
                "listener",
                "the listeners (their names, addresses and protocols) are fixed at start; \
                 restart the gateway to change them"
                    .into(),
            ));
        }
        if old.config.admin.address != config.admin.address {
            tracing::warn!("the admin address is fixed at start; restart to change it");
        }
        let generation = old.generation + 1;
        let next = Runtime::build(config, Some(&old), &self.scheduler, generation)?;
        self.current.store(Arc::new(next));
        self.changed.send_replace(generation);
        Ok(())
    }

    /// Validates `edit` applied to a copy of the configuration in force, then applies it.
    /// On any error nothing changes.
    pub fn change(
        &self,
        edit: impl FnOnce(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let mut config = self.load().config.clone();
        edit(&mut config)?;
        config.revalidate()?;
        self.apply(config)
    }

    /// A snapshot of every sensor.
    pub fn status(&self) -> Status {
        let rt = self.load();
        let (running, max_running) = self.scheduler.running();
        let now = crate::clock::now();
        Status {
            uptime_s: self.started.elapsed().as_secs_f64(),
            running: running as u64,
            max_running: max_running as u64,
            connections: self.connections.load(Relaxed).max(0) as u64,
            classes: rt
                .classes
                .iter()
                .map(|c| c.core.stats.snapshot(c.name()))
                .collect(),
            backends: rt
                .backends
                .iter()
                .map(|b| {
                    let mut snap = b.stats().snapshot(b.name(), b.healthy_addresses(now));
                    snap.addresses = b.address_states(now);
                    snap
                })
                .collect(),
            principals: rt
                .enforcer
                .as_ref()
                .map(|e| e.snapshot())
                .unwrap_or_default(),
            cluster: self.cluster.snapshot(),
        }
    }
}
