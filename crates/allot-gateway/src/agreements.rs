//! Sharing agreements at the gateway: every window, estimate each principal's demand,
//! solve the planner, and turn allocations into credits spread across the next window.
//!
//! After distributed-sharing-agreements §3–4: a request within its principal's credit goes
//! straight on (implicit queuing); the rest wait for credit in a later window, up to
//! `max_wait_ms`, then get 503. In redirect mode the answer is a 307 instead of a proxied
//! response. The loop has the one shape every loop here has: sensor (cost units arriving,
//! and waiting, per principal) → controller (smoothed demand, the model's planner) →
//! actuator (each principal's credit rate).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_model::agreements::AgreementSet;
use allot_model::bucket::TokenBucket;
use allot_model::ewma::Ewma;
use allot_model::planner::Planner;
use allot_model::Nanos;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{AgreementMode, AgreementsConfig};

/// How many times per window waiting requests are offered the credit that accrued.
const PUMPS_PER_WINDOW: u32 = 10;

/// How many pump steps of credit a principal's bucket holds (plus one request): a pump
/// that runs up to two steps late (a busy gateway, a loaded machine) still hands out
/// everything that accrued, and an idle principal saves at most this much.
const CREDIT_ROOM_STEPS: f64 = 3.0;

/// A principal's sensors and plan, as `/status` and `/metrics` show them (units per second).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrincipalSnapshot {
    /// Principal name.
    pub name: String,
    /// `MC`: guaranteed units per second.
    pub mandatory: f64,
    /// `OC`: units per second it may use beyond that when others leave them.
    pub optional: f64,
    /// Smoothed demand, units per second.
    pub demand: f64,
    /// This window's allocation, units per second.
    pub allocation: f64,
    /// Requests admitted within credit (at once or after waiting).
    pub admitted: u64,
    /// Requests that had to wait for credit (or, in redirect mode, were sent back).
    pub deferred: u64,
    /// Requests refused: no credit within `max_wait_ms`.
    pub refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    deferred: AtomicU64,
    refused: AtomicU64,
}

struct Waiter {
    cost: f64,
    tx: oneshot::Sender<()>,
}

struct PrincipalState {
    /// Cost units that arrived in the current window.
    arrived: f64,
    demand: Ewma,
    credit: TokenBucket,
    waiting: VecDeque<Waiter>,
    /// Units per window, last plan.
    allocation: f64,
    /// Owners whose capacity serves this principal, with units (redirect targets).
    owners: Vec<(usize, f64)>,
}

struct Principal {
    name: String,
    state: Mutex<PrincipalState>,
    counters: Counters,
}

/// The outcome of asking for credit.
pub enum Credit {
    /// Within credit: go on.
    Now,
    /// Wait for the receiver (credit granted) up to `max_wait`.
    Wait(oneshot::Receiver<()>),
}

/// The enforcer of one agreement set.
pub struct Enforcer {
    config: AgreementsConfig,
    planner: Planner,
    principals: Vec<Arc<Principal>>,
    /// Principal of each run-time class index (None: not under an agreement).
    class_principal: Vec<Option<usize>>,
    /// Redirect mode: location of each principal's capacity.
    locations: Vec<Option<String>>,
    window: Duration,
}

impl Enforcer {
    /// Builds an enforcer; `class_index` maps class names to run-time indices. State of
    /// principals with the same names in `previous` is kept (demand, credit, waiters).
    pub fn new(
        config: &AgreementsConfig,
        class_index: &std::collections::HashMap<String, usize>,
        previous: Option<&Enforcer>,
        now: Nanos,
    ) -> Result<Enforcer, String> {
        let set = AgreementSet::from_spec(&config.spec()).map_err(|e| e.to_string())?;
        let planner = Planner::per_window(&set);
        let principals = set
            .principals()
            .iter()
            .map(|p| {
                previous
                    .and_then(|old| old.principals.iter().find(|o| o.name == p.name).cloned())
                    .unwrap_or_else(|| {
                        Arc::new(Principal {
                            name: p.name.clone(),
                            state: Mutex::new(PrincipalState {
                                arrived: 0.0,
                                demand: Ewma::new(config.demand_smoothing).unwrap_or_else(|_| {
                                    Ewma::new(0.5).expect("0.5 is a valid weight")
                                }),
                                credit: TokenBucket::new(0.0, 1.0, now),
                                waiting: VecDeque::new(),
                                allocation: 0.0,
                                owners: Vec::new(),
                            }),
                            counters: Counters::default(),
                        })
                    })
            })
            .collect();
        let mut class_principal = vec![None; class_index.values().max().map_or(0, |m| m + 1)];
        for (class, principal) in &config.classes {
            if let (Some(&ci), Some(pi)) = (class_index.get(class), set.index_of(principal)) {
                class_principal[ci] = Some(pi);
            }
        }
        let locations = set
            .principals()
            .iter()
            .map(|p| {
                config
                    .server
                    .iter()
                    .find(|s| s.principal == p.name)
                    .map(|s| s.location.trim_end_matches('/').to_string())
            })
            .collect();
        let enforcer = Enforcer {
            config: config.clone(),
            planner,
            principals,
            class_principal,
            locations,
            window: Duration::from_millis(config.window_ms),
        };
        if previous.is_none() {
            // Until demand is known, the guarantees alone: the conservative plan.
            enforcer.plan(None, now);
        }
        Ok(enforcer)
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether answers are redirects.
    pub fn redirect(&self) -> bool {
        self.config.mode == AgreementMode::Redirect
    }

    /// Longest wait for credit.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.config.max_wait_ms)
    }

    /// The principal a class is charged to, if any.
    pub fn principal_of(&self, class: usize) -> Option<usize> {
        self.class_principal.get(class).copied().flatten()
    }

    /// A request of `principal` for `path` arrives: count its cost as demand and take
    /// credit if there is some and nobody of the same principal waits before it.
    pub fn arrive(&self, principal: usize, path: &str, now: Nanos) -> Credit {
        let cost = self.config.cost_of(path);
        let Some(p) = self.principals.get(principal) else {
            return Credit::Now;
        };
        let mut s = lock(&p.state);
        s.arrived += cost;
        if s.waiting.is_empty() && s.credit.try_take(cost, now) {
            p.counters.admitted.fetch_add(1, Relaxed);
            return Credit::Now;
        }
        p.counters.deferred.fetch_add(1, Relaxed);
        if self.redirect() {
            return Credit::Wait(oneshot::channel().1);
        }
        let (tx, rx) = oneshot::channel();
        s.waiting.push_back(Waiter { cost, tx });
        Credit::Wait(rx)
    }

    /// A waiting request got its credit (counted) or gave up (counted as refused).
    pub fn settle(&self, principal: usize, granted: bool) {
        if let Some(p) = self.principals.get(principal) {
            let c = if granted {
                &p.counters.admitted
            } else {
                &p.counters.refused
            };
            c.fetch_add(1, Relaxed);
        }
    }

    /// Redirect mode: where a request of `principal` goes, drawing among the owners whose
    /// capacity serves it in proportion to their part (`draw` in [0, 1)).
    pub fn location(&self, principal: usize, draw: f64) -> Option<&str> {
        let p = self.principals.get(principal)?;
        let s = lock(&p.state);
        let total: f64 = s.owners.iter().map(|(_, u)| u).sum();
        let mut at = draw * total;
        let owner = s
            .owners
            .iter()
            .find(|(_, u)| {
                at -= u;
                at < 0.0
            })
            .or(s.owners.last())
            .map(|(o, _)| *o)
            .unwrap_or(principal);
        self.locations.get(owner)?.as_deref()
    }

    /// End of a window: fold arrivals (and the backlog still waiting) into the demand
    /// estimates, plan, and set every principal's credit rate for the next window.
    pub fn end_window(&self, now: Nanos) {
        let demand: Vec<f64> = self
            .principals
            .iter()
            .map(|p| {
                let mut s = lock(&p.state);
                let backlog: f64 = s
                    .waiting
                    .iter()
                    .filter(|w| !w.tx.is_closed())
                    .map(|w| w.cost)
                    .sum();
                let sample = s.arrived.max(backlog);
                s.arrived = 0.0;
                s.demand.observe(sample).unwrap_or(0.0)
            })
            .collect();
        self.plan(Some(&demand), now);
    }

    fn plan(&self, demand: Option<&[f64]>, now: Nanos) {
        let window_s = self.window.as_secs_f64();
        let (units, placement) = match demand.map(|d| self.planner.solve(d)) {
            Some(Ok(a)) => (a.units, a.placement),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "agreement plan failed; falling back to the guarantees");
                (self.planner.mandatory().to_vec(), Vec::new())
            }
            None => (self.planner.mandatory().to_vec(), Vec::new()),
        };
        let max_cost = self.config.cost.iter().map(|c| c.units).fold(1.0, f64::max);
        for (i, p) in self.principals.iter().enumerate() {
            let alloc = units.get(i).copied().unwrap_or(0.0).max(0.0);
            let mut s = lock(&p.state);
            s.allocation = alloc;
            s.owners = placement
                .iter()
                .filter(|pl| pl.user == i && pl.units > 0.0)
                .map(|pl| (pl.owner, pl.units))
                .collect();
            // Spread over the window: a rate, with room for what accrues over a few pump
            // steps plus one request, so credit is neither released at once nor lost when
            // a pump is late.
            let burst = alloc * CREDIT_ROOM_STEPS / PUMPS_PER_WINDOW as f64 + max_cost;
            s.credit.set_rate(alloc / window_s, burst, now);
        }
    }

    /// Offers the credit accrued since the last call to the requests waiting, in order.
    pub fn pump(&self, now: Nanos) {
        for p in &self.principals {
            let mut s = lock(&p.state);
            while let Some(front) = s.waiting.front() {
                if front.tx.is_closed() {
                    s.waiting.pop_front();
                    continue;
                }
                let cost = front.cost;
                if !s.credit.try_take(cost, now) {
                    break;
                }
                if let Some(w) = s.waiting.pop_front() {
                    let _ = w.tx.send(());
                }
            }
        }
    }

    /// Every principal's figures, in units per second.
    pub fn snapshot(&self) -> Vec<PrincipalSnapshot> {
        let per_s = 1.0 / self.window.as_secs_f64();
        self.principals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = lock(&p.state);
                PrincipalSnapshot {
                    name: p.name.clone(),
                    mandatory: self.planner.mandatory().get(i).copied().unwrap_or(0.0) * per_s,
                    optional: self.planner.optional().get(i).copied().unwrap_or(0.0) * per_s,
                    demand: s.demand.value().unwrap_or(0.0) * per_s,
                    allocation: s.allocation * per_s,
                    admitted: p.counters.admitted.load(Relaxed),
                    deferred: p.counters.deferred.load(Relaxed),
                    refused: p.counters.refused.load(Relaxed),
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The window loop: plans at every window's end and hands out credit in between. Runs
/// until the gateway is dropped or `shutdown` resolves.
pub async fn run_loop(gw: crate::Gateway, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut pumps = 0u32;
    let mut ticks: Option<(Duration, tokio::time::Interval)> = None;
    loop {
        let Some(enforcer) = gw.enforcer() else {
            // No agreements now; look again later (a reload may add them).
            ticks = None;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                () = &mut shutdown => return,
            }
        };
        // Ticks on absolute deadlines, so windows do not stretch by the work done in them.
        let step = enforcer.window() / PUMPS_PER_WINDOW;
        let interval = match &mut ticks {
            Some((s, i)) if *s == step => i,
            _ => {
                let mut i = tokio::time::interval(step);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                &mut ticks.insert((step, i)).1
            }
        };
        tokio::select! {
            _ = interval.tick() => {}
            () = &mut shutdown => return,
        }
        let now = crate::clock::now();
        pumps += 1;
        if pumps >= PUMPS_PER_WINDOW {
            pumps = 0;
            enforcer.end_window(now);
        }
        enforcer.pump(now);
    }
}
