//! The gateway's live state, and the one way it changes: [`Gateway::apply`] a validated
//! configuration. SIGHUP reloads and admin writes both go through it, so a run-time change
//! is checked exactly like a file and either takes effect whole or changes nothing.
//!
//! Classes and back ends keep their index for the life of the process (a class dropped
//! from the configuration is retired: it drains and takes no new requests), so requests
//! in flight across a change keep valid references and their slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use allot_model::bucket::TokenBucket;
use allot_model::classify::RuleSet;
use allot_model::dispatch::ClassWeights;
use allot_model::queue::QueueConfig;
use tokio::time::Instant;

use crate::agreements::Enforcer;
use crate::body::BandwidthGroup;
use crate::config::{ClassConfig, Config, ConfigError};
use crate::sched::{ClassLimits, Scheduler};
use crate::stats::{ClassStats, Status};
use crate::upstream::Backend;

/// A class at run time.
#[derive(Debug)]
pub struct ClassRt {
    /// Name, from the configuration.
    pub name: String,
    /// Its sensors.
    pub stats: Arc<ClassStats>,
    /// The accept-rate actuator, if set.
    pub accept: Mutex<Option<TokenBucket>>,
    /// Settings read per request.
    pub cfg: RwLock<ClassCfg>,
    /// The divert-to-degraded actuator (`utilisation` controller).
    pub divert: crate::qos::Divert,
}

/// The per-request settings of a class.
#[derive(Debug, Clone)]
pub struct ClassCfg {
    /// Index of its back end.
    pub backend: usize,
    /// Longest wait for service.
    pub max_wait: Duration,
    /// Its bandwidth group.
    pub bandwidth: Option<BandwidthGroup>,
    /// Whether responses' sizes are learned (shortest-first).
    pub learn_sizes: bool,
    /// Retired: no longer in the configuration; takes no new requests.
    pub retired: bool,
}

/// The compiled rules and where their classes are at run time.
#[derive(Debug)]
pub struct Rules {
    /// The rule chains.
    pub set: RuleSet,
    /// Run-time class index of each of `set.classes()`.
    pub to_class: Vec<usize>,
}

/// Gateway-wide settings read per request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration in force (the file's, plus run-time changes).
    pub config: Config,
    /// The admin token, resolved.
    pub admin_token: Option<String>,
}

/// The gateway: shared by every connection, the admin API and the binary.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) sched: Arc<Scheduler>,
    pub(crate) classes: RwLock<Vec<Arc<ClassRt>>>,
    pub(crate) backends: RwLock<Vec<Arc<Backend>>>,
    groups: RwLock<HashMap<String, BandwidthGroup>>,
    pub(crate) rules: RwLock<Arc<Rules>>,
    pub(crate) settings: RwLock<Arc<Settings>>,
    enforcer: RwLock<Option<Arc<Enforcer>>>,
    /// Serialises changes so two writers cannot interleave.
    change: Mutex<()>,
    /// The QoS manager's loops.
    pub(crate) qos: crate::qos::Manager,
    started: Instant,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl Gateway {
    /// A gateway in the state `config` describes (already validated by [`Config::parse`]).
    pub fn new(config: Config) -> Result<Gateway, ConfigError> {
        let rules = config
            .rule_set_or_single()
            .map_err(|e| invalid("chain", e.to_string()))?;
        let gateway = Gateway {
            inner: Arc::new(Inner {
                sched: Scheduler::new(config.gateway.max_running),
                classes: RwLock::new(Vec::new()),
                backends: RwLock::new(Vec::new()),
                groups: RwLock::new(HashMap::new()),
                rules: RwLock::new(Arc::new(Rules {
                    set: rules,
                    to_class: Vec::new(),
                })),
                settings: RwLock::new(Arc::new(Settings {
                    admin_token: config.admin.resolved_token(),
                    config: config.clone(),
                })),
                enforcer: RwLock::new(None),
                change: Mutex::new(()),
                qos: crate::qos::Manager::default(),
                started: Instant::now(),
            }),
        };
        gateway.apply(config)?;
        Ok(gateway)
    }

    /// Makes `config` the configuration in force, keeping waiting and running requests.
    /// The listener and admin addresses are fixed at start; a change to them is logged and
    /// ignored.
    pub fn apply(&self, config: Config) -> Result<(), ConfigError> {
        let inner = &self.inner;
        let _one_at_a_time = inner.change.lock().unwrap_or_else(|p| p.into_inner());
        let rule_set = config
            .rule_set_or_single()
            .map_err(|e| invalid("chain", e.to_string()))?;

        // Back ends, by name.
        let backend_index: HashMap<String, usize> = {
            let mut backends = write(&inner.backends);
            for b in config.backends() {
                match backends.iter().find(|x| x.name == b.name) {
                    Some(existing) => existing.reconfigure(b),
                    None => backends.push(Backend::new(b)),
                }
            }
            backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.name.clone(), i))
                .collect()
        };

        // Bandwidth groups, by name.
        let groups: HashMap<String, BandwidthGroup> = {
            let mut groups = write(&inner.groups);
            let now = crate::clock::now();
            for g in config.bandwidth_groups() {
                match groups.get(&g.name) {
                    Some(existing) => existing.lock().unwrap_or_else(|p| p.into_inner()).set_rate(
                        g.bytes_per_sec,
                        g.burst(),
                        now,
                    ),
                    None => {
                        groups.insert(
                            g.name.clone(),
                            Arc::new(Mutex::new(TokenBucket::new(
                                g.bytes_per_sec,
                                g.burst(),
                                now,
                            ))),
                        );
                    }
                }
            }
            groups.clone()
        };

        // Classes, by name; absent ones retire.
        let class_index: HashMap<String, usize> = {
            let mut classes = write(&inner.classes);
            let now = crate::clock::now();
            for c in config.classes() {
                let cfg = ClassCfg {
                    backend: backend_index.get(&c.backend).copied().unwrap_or(0),
                    max_wait: Duration::from_millis(c.max_wait_ms),
                    bandwidth: c
                        .bandwidth_group
                        .as_ref()
                        .and_then(|g| groups.get(g).cloned()),
                    learn_sizes: c.policy == allot_model::queue::Policy::ShortestFirst,
                    retired: false,
                };
                let index = match classes.iter().position(|x| x.name == c.name) {
                    Some(i) => {
                        let rt = &classes[i];
                        *write(&rt.cfg) = cfg;
                        let mut accept = rt.accept.lock().unwrap_or_else(|p| p.into_inner());
                        match (accept.as_mut(), c.accept_rate) {
                            (Some(bucket), Some(r)) => {
                                bucket.set_rate(r.rate_per_sec, r.burst, now)
                            }
                            (None, Some(r)) => {
                                *accept = Some(TokenBucket::new(r.rate_per_sec, r.burst, now))
                            }
                            (_, None) => *accept = None,
                        }
                        i
                    }
                    None => {
                        classes.push(Arc::new(ClassRt {
                            name: c.name.clone(),
                            stats: Arc::new(ClassStats::default()),
                            accept: Mutex::new(
                                c.accept_rate
                                    .map(|r| TokenBucket::new(r.rate_per_sec, r.burst, now)),
                            ),
                            cfg: RwLock::new(cfg),
                            divert: Default::default(),
                        }));
                        classes.len() - 1
                    }
                };
                inner.sched.configure_class(
                    index,
                    limits(c),
                    queue_config(c),
                    Arc::clone(&classes[index].stats),
                );
                let backend = read(&classes[index].cfg).backend;
                inner.sched.set_class_backend(index, backend);
            }
            for rt in classes.iter() {
                if !config.classes().any(|c| c.name == rt.name) {
                    write(&rt.cfg).retired = true;
                }
            }
            classes
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect()
        };

        // Agreements, keeping the state of principals that stay.
        let enforcer = match &config.agreements {
            Some(a) => {
                let old = read(&inner.enforcer).clone();
                let e = Enforcer::new(
                    a.get_ref(),
                    &class_index,
                    old.as_deref(),
                    crate::clock::now(),
                )
                .map_err(|e| invalid("agreements", e))?;
                Some(Arc::new(e))
            }
            None => None,
        };
        *write(&inner.enforcer) = enforcer;

        let to_class = rule_set
            .classes()
            .iter()
            .map(|name| class_index.get(name).copied().unwrap_or(0))
            .collect();
        *write(&inner.rules) = Arc::new(Rules {
            set: rule_set,
            to_class,
        });
        inner.sched.set_max_running(config.gateway.max_running);

        let old = Arc::clone(&read(&inner.settings));
        if old.config.listener.address != config.listener.address
            || old.config.admin.address != config.admin.address
        {
            tracing::warn!(
                "listener and admin addresses are fixed at start; restart to change them"
            );
        }
        *write(&inner.settings) = Arc::new(Settings {
            admin_token: config.admin.resolved_token(),
            config,
        });
        crate::qos::reconcile(self);
        Ok(())
    }

    /// Run-time index of the class named `name`.
    pub(crate) fn class_index(&self, name: &str) -> Option<usize> {
        read(&self.inner.classes)
            .iter()
            .position(|c| c.name == name)
    }

    /// Run-time index of the back end named `name`.
    pub(crate) fn backend_index(&self, name: &str) -> Option<usize> {
        read(&self.inner.backends)
            .iter()
            .position(|b| b.name == name)
    }

    /// Actuator: sets `class`'s accept rate directly, without a configuration change (a
    /// controller's output); `None` puts back the configured accept rate, if any.
    pub(crate) fn set_accept_rate(&self, class: usize, rate: Option<(f64, f64)>) {
        let Some(rt) = self.class(class) else {
            return;
        };
        let rate = rate.or_else(|| {
            self.settings()
                .config
                .classes()
                .find(|c| c.name == rt.name)
                .and_then(|c| c.accept_rate)
                .map(|r| (r.rate_per_sec, r.burst))
        });
        let now = crate::clock::now();
        let mut accept = rt.accept.lock().unwrap_or_else(|p| p.into_inner());
        match (accept.as_mut(), rate) {
            (Some(bucket), Some((r, burst))) => bucket.set_rate(r, burst, now),
            (None, Some((r, burst))) => *accept = Some(TokenBucket::new(r, burst, now)),
            (_, None) => *accept = None,
        }
    }

    /// Validates `edit` applied to a copy of the configuration in force, then applies it.
    /// On any error nothing changes.
    pub fn change(
        &self,
        edit: impl FnOnce(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let mut config = self.settings().config.clone();
        edit(&mut config)?;
        config.revalidate()?;
        self.apply(config)
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&read(&self.inner.settings))
    }

    /// The compiled rules in force.
    pub fn rules(&self) -> Arc<Rules> {
        Arc::clone(&read(&self.inner.rules))
    }

    /// The agreement enforcer in force, if the configuration has `[agreements]`.
    pub(crate) fn enforcer(&self) -> Option<Arc<Enforcer>> {
        read(&self.inner.enforcer).clone()
    }

    /// A class by run-time index.
    pub(crate) fn class(&self, index: usize) -> Option<Arc<ClassRt>> {
        read(&self.inner.classes).get(index).cloned()
    }

    /// A back end by run-time index.
    pub(crate) fn backend(&self, index: usize) -> Option<Arc<Backend>> {
        read(&self.inner.backends).get(index).cloned()
    }

    /// A snapshot of every sensor.
    pub fn status(&self) -> Status {
        let (running, max_running) = self.inner.sched.running();
        Status {
            uptime_s: self.inner.started.elapsed().as_secs_f64(),
            running: running as u64,
            max_running: max_running as u64,
            classes: read(&self.inner.classes)
                .iter()
                .map(|c| c.stats.snapshot(&c.name))
                .collect(),
            backends: read(&self.inner.backends)
                .iter()
                .map(|b| b.stats.snapshot(&b.name, b.healthy_addresses()))
                .collect(),
            principals: self.enforcer().map(|e| e.snapshot()).unwrap_or_default(),
        }
    }
}

fn limits(c: &ClassConfig) -> ClassLimits {
    ClassLimits {
        max_running: c.max_running,
        weights: ClassWeights {
            priority: c.priority,
            ratio: c.ratio,
        },
    }
}

fn queue_config(c: &ClassConfig) -> QueueConfig {
    QueueConfig {
        policy: c.policy,
        limit: c.queue_limit,
        age_bound: c.age_bound(),
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
