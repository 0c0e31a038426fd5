//! Sharing agreements at the gateway: each principal's credit, planned every window and
//! handed out as requests arrive.
//!
//! After distributed-sharing-agreements §3–4: a request within its principal's credit goes
//! straight on (implicit queuing); the rest wait for credit in a later window, up to
//! `max_wait_ms`, then get 503. In redirect mode the answer is a 307 instead of a proxied
//! response. Credit taken by a request that is then refused (its class queue is full, it
//! timed out waiting for a slot, its client left) is given back by the [`Charge`]'s drop.
//! The window loop that plans and pumps lives in `control`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_model::agreements::AgreementSet;
use allot_model::bucket::TokenBucket;
use allot_model::ewma::Ewma;
use allot_model::planner::Planner;
use allot_model::Nanos;
use tokio::sync::oneshot;

use crate::config::{AgreementMode, AgreementsConfig};
use crate::stats::PrincipalSnapshot;

/// How many times per window waiting requests are offered the credit that accrued.
pub const PUMPS_PER_WINDOW: u32 = 10;

/// How many pump steps of credit a principal's bucket holds (plus one request): a pump
/// that runs up to two steps late (a busy gateway, a loaded machine) still hands out
/// everything that accrued, and an idle principal saves at most this much.
const CREDIT_ROOM_STEPS: f64 = 3.0;

/// Windows without a pump after which the gateway is taken to have been away (its
/// process stopped, its runtime stuck): the credit its principals saved before is
/// forgotten, not spent at once on return, since under `[cluster]` the other gateways'
/// quotas may have taken this one's part meanwhile.
const AWAY_WINDOWS: u64 = 2;

/// Pump steps of credit from one wall-clock window that may still be spent in the next,
/// once the enforcer follows the wall clock's windows (under `[cluster]`, where the
/// quotas are per wall-clock window): the credit of the last step before the boundary,
/// which the first pump after it hands out, and less than one request's cost besides (the
/// part of a request the last pump could not pay for yet). Credit older than that, saved by
/// an idle principal or left by a pump that ran late across the boundary, is forgotten
/// there, so one window never admits the previous one's part on top of its own.
const CARRY_STEPS: u64 = 1;

/// How many ended wall-clock windows a principal's admissions are kept for, as `/status`
/// shows them: 6.4 s of 100 ms windows, so a reader polling every second misses none.
const PAST_WINDOWS: usize = 64;

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    deferred: AtomicU64,
    refused: AtomicU64,
}

struct Waiter {
    cost: f64,
    tx: oneshot::Sender<Charge>,
}

struct PrincipalState {
    /// Cost units that arrived in the current window.
    arrived: f64,
    demand: Ewma,
    credit: TokenBucket,
    waiting: VecDeque<Waiter>,
    /// Units per window, last plan.
    allocation: f64,
    /// The wall-clock window (`unix_ns / window_ns`) the credit was last used in.
    credit_window: u64,
    /// Units admitted in `credit_window` (followed under wall-clock windows only).
    window_admitted: f64,
    /// The last [`PAST_WINDOWS`] wall-clock windows that ended: (window, units admitted).
    past_windows: VecDeque<(u64, f64)>,
    /// Owners whose capacity serves this principal, with units (redirect targets).
    owners: Vec<(usize, f64)>,
}

#[derive(Debug)]
struct Principal {
    name: String,
    state: Mutex<PrincipalState>,
    counters: Counters,
}

impl std::fmt::Debug for PrincipalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalState")
            .field("allocation", &self.allocation)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

/// The outcome of asking for credit.
pub enum Credit {
    /// Within credit: go on.
    Now(Charge),
    /// Over credit: wait for a later window's ([`CreditWait::wait`]).
    Wait(CreditWait),
    /// Over credit in redirect mode: send the client back to try again later.
    Deferred,
}

/// Credit taken for one request. Dropped before [`Charge::keep`] (the request was refused
/// or abandoned before service), it goes back to its principal.
#[derive(Debug)]
pub struct Charge {
    principal: Option<Arc<Principal>>,
    cost: f64,
}

impl Charge {
    /// The request went into service: the credit is spent.
    pub fn keep(mut self) {
        self.principal = None;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(p) = self.principal.take() {
            lock(&p.state).give_back(self.cost, crate::clock::now());
        }
    }
}

/// A request waiting for its principal's credit. Dropping it (the client left) gives up
/// its turn; credit granted meanwhile goes back.
pub struct CreditWait {
    rx: oneshot::Receiver<Charge>,
    principal: Arc<Principal>,
}

impl CreditWait {
    /// Waits at most `max_wait` for credit; counts the request as admitted or refused.
    pub async fn wait(mut self, max_wait: Duration) -> Option<Charge> {
        let charge = match tokio::time::timeout(max_wait, &mut self.rx).await {
            Ok(Ok(charge)) => Some(charge),
            Ok(Err(_)) => None,
            // Granted just as time ran out: use it.
            Err(_) => self.rx.try_recv().ok(),
        };
        let counter = if charge.is_some() {
            &self.principal.counters.admitted
        } else {
            &self.principal.counters.refused
        };
        counter.fetch_add(1, Relaxed);
        charge
    }
}

/// The enforcer of one agreement set.
pub struct Enforcer {
    config: AgreementsConfig,
    planner: Planner,
    principals: Vec<Arc<Principal>>,
    /// Redirect mode: location of each principal's capacity.
    locations: Vec<Option<String>>,
    /// Connections: the back-end address of each principal's capacity.
    addresses: Vec<Option<std::net::SocketAddr>>,
    window: Duration,
    /// When credit was last offered to the waiting requests (a [`Nanos`] count).
    last_pump_ns: AtomicU64,
    /// Unix time minus the model's time, ns, while the credit follows the wall clock's
    /// windows; 0 when it does not.
    wall_offset_ns: AtomicU64,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("principals", &self.principals.len())
            .field("window", &self.window)
            .finish()
    }
}

impl Enforcer {
    /// Builds an enforcer. State of principals with the same names in `previous` is kept
    /// (demand, credit, waiters).
    pub fn new(
        config: &AgreementsConfig,
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
                                demand: Ewma::new(config.demand_weight()).unwrap_or_else(|_| {
                                    Ewma::new(0.5).expect("0.5 is a valid weight")
                                }),
                                credit: TokenBucket::new(0.0, 1.0, now),
                                waiting: VecDeque::new(),
                                allocation: 0.0,
                                credit_window: 0,
                                window_admitted: 0.0,
                                past_windows: VecDeque::new(),
                                owners: Vec::new(),
                            }),
                            counters: Counters::default(),
                        })
                    })
            })
            .collect();
        let locations = set
            .principals()
            .iter()
            .map(|p| {
                config
                    .server
                    .iter()
                    .find(|s| s.principal == p.name)
                    .and_then(|s| s.location.as_deref())
                    .map(|l| l.trim_end_matches('/').to_string())
            })
            .collect();
        let addresses = set
            .principals()
            .iter()
            .map(|p| {
                config
                    .server
                    .iter()
                    .find(|s| s.principal == p.name)
                    .and_then(|s| s.address)
            })
            .collect();
        let enforcer = Enforcer {
            config: config.clone(),
            planner,
            principals,
            locations,
            addresses,
            window: Duration::from_millis(config.window_ms),
            last_pump_ns: AtomicU64::new(now.0),
            wall_offset_ns: AtomicU64::new(previous.map_or(0, |o| o.wall_offset_ns.load(Relaxed))),
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

    /// The run-time index of the principal named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.principals.iter().position(|p| p.name == name)
    }

    /// The principal the requests of class `class` are charged to, if any.
    pub fn principal_of_class(&self, class: &str) -> Option<usize> {
        self.config
            .classes
            .get(class)
            .and_then(|p| self.index_of(p))
    }

    /// The cost of a request or connection, in units.
    pub fn cost_of(&self, unit: &crate::config::CostOf<'_>) -> f64 {
        self.config.cost_of(unit)
    }

    /// A request (or connection) of `principal` costing `cost` arrives: count it as
    /// demand and take credit if there is some and nobody of the same principal waits
    /// before it. In redirect mode a request over credit is deferred (sent back) when
    /// `redirectable`; a connection, which cannot be redirected, waits.
    pub fn arrive(&self, principal: usize, cost: f64, redirectable: bool, now: Nanos) -> Credit {
        let Some(p) = self.principals.get(principal) else {
            return Credit::Now(Charge {
                principal: None,
                cost,
            });
        };
        let away = self.away(now);
        let mut s = lock(&p.state);
        let per_window = self.keep_to_window(&mut s, now);
        s.arrived += cost;
        if !away && s.waiting.is_empty() && s.take(cost, now, per_window) {
            p.counters.admitted.fetch_add(1, Relaxed);
            return Credit::Now(Charge {
                principal: Some(Arc::clone(p)),
                cost,
            });
        }
        p.counters.deferred.fetch_add(1, Relaxed);
        if self.redirect() && redirectable {
            return Credit::Deferred;
        }
        let (tx, rx) = oneshot::channel();
        s.waiting.push_back(Waiter { cost, tx });
        Credit::Wait(CreditWait {
            rx,
            principal: Arc::clone(p),
        })
    }

    /// Redirect mode: where a request of `principal` goes, drawing among the owners whose
    /// capacity serves it in proportion to their part (`draw` in [0, 1)).
    pub fn location(&self, principal: usize, draw: f64) -> Option<&str> {
        let owner = self.owner_for(principal, draw)?;
        self.locations.get(owner)?.as_deref()
    }

    /// The owner whose capacity serves one unit of `principal`, drawn in proportion to
    /// this window's placement (`draw` in [0, 1)); the principal itself when the plan
    /// places nothing.
    fn owner_for(&self, principal: usize, draw: f64) -> Option<usize> {
        let p = self.principals.get(principal)?;
        let s = lock(&p.state);
        let total: f64 = s.owners.iter().map(|(_, u)| u).sum();
        let mut at = draw * total;
        Some(
            s.owners
                .iter()
                .find(|(_, u)| {
                    at -= u;
                    at < 0.0
                })
                .or(s.owners.last())
                .map(|(o, _)| *o)
                .unwrap_or(principal),
        )
    }

    /// Connections: whether any principal's capacity is tied to a back-end address.
    pub fn places_connections(&self) -> bool {
        self.addresses.iter().any(|a| a.is_some())
    }

    /// Connections: the back-end address a connection of `principal` goes to, drawn by
    /// this window's placement (`draw` in [0, 1)); `None` when the owner drawn has none.
    pub fn server_address(&self, principal: usize, draw: f64) -> Option<std::net::SocketAddr> {
        let owner = self.owner_for(principal, draw)?;
        self.addresses.get(owner).copied().flatten()
    }

    /// Connections: whether this window's placement lets `principal` use the server at
    /// `addr` (for affinity: a client stays on its server only while this holds).
    pub fn allows(&self, principal: usize, addr: std::net::SocketAddr) -> bool {
        let Some(p) = self.principals.get(principal) else {
            return false;
        };
        let s = lock(&p.state);
        let owners: Vec<usize> = s.owners.iter().map(|(o, _)| *o).collect();
        let own = owners.is_empty().then_some(principal);
        owners
            .into_iter()
            .chain(own)
            .any(|o| self.addresses.get(o).copied().flatten() == Some(addr))
    }

    /// The number of principals.
    pub fn principals(&self) -> usize {
        self.principals.len()
    }

    /// End of a window: fold arrivals (and the backlog still waiting) into the demand
    /// estimates, plan (alone, or take the cluster's quota, units per window per
    /// principal), and set every principal's credit rate for the next window. Returns the
    /// smoothed demand, units per window per principal.
    pub fn end_window(&self, now: Nanos, quota: &crate::cluster::Quota) -> Vec<f64> {
        let demand = self.fold_demand();
        match quota {
            crate::cluster::Quota::Alone => self.plan(Some(&demand), now),
            crate::cluster::Quota::Units(units) => self.apply_quota(units, now),
        }
        demand
    }

    /// Folds the window's arrivals (and the backlog still waiting) into the demand
    /// estimates; returns them, units per window per principal.
    pub fn fold_demand(&self) -> Vec<f64> {
        self.principals
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
            .collect()
    }

    /// Sets every principal's credit rate from a quota handed down (units per window per
    /// principal): the cluster's, or the fallback share.
    pub fn apply_quota(&self, units: &[f64], now: Nanos) {
        self.apply(units.to_vec(), Vec::new(), now);
    }

    fn plan(&self, demand: Option<&[f64]>, now: Nanos) {
        let (units, placement) = match demand.map(|d| self.planner.solve(d)) {
            Some(Ok(a)) => (a.units, a.placement),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "agreement plan failed; falling back to the guarantees");
                (self.planner.mandatory().to_vec(), Vec::new())
            }
            None => (self.planner.mandatory().to_vec(), Vec::new()),
        };
        self.apply(units, placement, now);
    }

    /// Sets every principal's allocation (units per window) and credit rate.
    fn apply(&self, units: Vec<f64>, placement: Vec<allot_model::planner::Placement>, now: Nanos) {
        let window_s = self.window.as_secs_f64();
        let max_cost = self.max_cost();
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

    /// The largest cost of one request or connection, units.
    fn max_cost(&self) -> f64 {
        self.config.cost.iter().map(|c| c.units).fold(1.0, f64::max)
    }

    /// From now on, credit follows the wall clock's windows (see [`CARRY_STEPS`]):
    /// `unix_ns` is the Unix time in nanoseconds at model time `now`.
    pub fn follow_wall_windows(&self, now: Nanos, unix_ns: u64) {
        self.wall_offset_ns
            .store(unix_ns.saturating_sub(now.0).max(1), Relaxed);
    }

    /// Credit follows the enforcer's own windows again.
    pub fn unfollow_wall_windows(&self) {
        self.wall_offset_ns.store(0, Relaxed);
    }

    /// The first use of a principal's credit in a new wall-clock window forgets what was
    /// saved before the window's last [`CARRY_STEPS`] steps. Says whether the credit
    /// follows the wall clock's windows.
    fn keep_to_window(&self, s: &mut PrincipalState, now: Nanos) -> bool {
        let offset = self.wall_offset_ns.load(Relaxed);
        if offset == 0 {
            return false;
        }
        let window_ns = u64::try_from(self.window.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let wall_ns = now.0.saturating_add(offset);
        let window = wall_ns / window_ns;
        if window == s.credit_window {
            return true;
        }
        if s.credit_window != 0 {
            if s.past_windows.len() == PAST_WINDOWS {
                s.past_windows.pop_front();
            }
            s.past_windows
                .push_back((s.credit_window, s.window_admitted));
        }
        s.credit_window = window;
        s.window_admitted = 0.0;
        let step_ns = window_ns / u64::from(PUMPS_PER_WINDOW) * CARRY_STEPS;
        let since_ns = wall_ns.saturating_sub(window * window_ns) + step_ns;
        let earned = s.credit.rate_per_sec() * since_ns as f64 / 1e9;
        s.credit.keep_at_most(earned + self.max_cost(), now);
        true
    }

    /// Whether no pump has run for [`AWAY_WINDOWS`] windows up to `now`: requests then
    /// wait for the next pump rather than spend credit saved before the gap.
    pub fn away(&self, now: Nanos) -> bool {
        let gap_ns = now.0.saturating_sub(self.last_pump_ns.load(Relaxed));
        u128::from(gap_ns) > self.window.as_nanos() * u128::from(AWAY_WINDOWS)
    }

    /// Offers the credit accrued since the last call to the requests waiting, in order.
    /// After a gap of [`AWAY_WINDOWS`] windows the credit saved before it is forgotten.
    pub fn pump(&self, now: Nanos) {
        let away = self.away(now);
        self.last_pump_ns.store(now.0, Relaxed);
        for p in &self.principals {
            let mut s = lock(&p.state);
            if away {
                s.credit.keep_at_most(0.0, now);
            }
            let per_window = self.keep_to_window(&mut s, now);
            while let Some(front) = s.waiting.front() {
                if front.tx.is_closed() {
                    s.waiting.pop_front();
                    continue;
                }
                let cost = front.cost;
                if !s.take(cost, now, per_window) {
                    break;
                }
                if let Some(w) = s.waiting.pop_front() {
                    let charge = Charge {
                        principal: Some(Arc::clone(p)),
                        cost,
                    };
                    if let Err(back) = w.tx.send(charge) {
                        // Gone between the check and the send: the credit goes back
                        // here, under the lock this loop holds.
                        back.keep();
                        s.give_back(cost, now);
                    }
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
                    windows: s.past_windows.iter().copied().collect(),
                }
            })
            .collect()
    }
}

impl PrincipalState {
    /// Takes `cost` units of credit if there are that many; `per_window`, only while the
    /// units admitted in this wall-clock window stay within the quota rounded up to a
    /// whole request (so the gateways together never admit more in a window than their
    /// quotas and one request each, however their pumps fall).
    fn take(&mut self, cost: f64, now: Nanos, per_window: bool) -> bool {
        if per_window && self.window_admitted + cost > self.allocation + cost * (1.0 - 1e-6) {
            return false;
        }
        if !self.credit.try_take(cost, now) {
            return false;
        }
        self.window_admitted += cost;
        true
    }

    /// Gives back credit taken for a request refused later.
    fn give_back(&mut self, cost: f64, now: Nanos) {
        self.credit.give_back(cost, now);
        self.window_admitted = (self.window_admitted - cost).max(0.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enforcer(capacity: f64) -> Enforcer {
        let text = format!(
            "[[backend]]\nname = \"b\"\naddresses = [\"127.0.0.1:1\"]\n\
             [[class]]\nname = \"c\"\nbackend = \"b\"\n\
             [agreements]\nclasses = {{ c = \"p\" }}\n\
             [[agreements.principal]]\nname = \"p\"\ncapacity = {capacity}\n"
        );
        let config = crate::config::Config::parse(&text, "test").expect("valid");
        let a = config.agreements.expect("agreements");
        Enforcer::new(a.get_ref(), None, Nanos(0)).expect("enforcer")
    }

    fn credit_left(e: &Enforcer, now: Nanos) -> f64 {
        lock(&e.principals[0].state).credit.available(now)
    }

    /// The window loop's pumps, every tenth of a window, over `from..=to` milliseconds.
    fn pumps(e: &Enforcer, from: u64, to: u64) {
        for ms in (from..=to).step_by(10) {
            e.pump(Nanos::from_millis(ms));
        }
    }

    #[test]
    fn following_wall_windows_credit_saved_in_one_is_not_spent_in_the_next() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        // 10 units a window, 1 a pump step; the bucket holds 3 steps and one request.
        let e = enforcer(100.0);
        e.apply_quota(&[10.0], Nanos(0));
        // Model time 0 is a boundary of the wall clock's windows.
        e.follow_wall_windows(Nanos(0), 17_000_000 * 100_000_000);
        // Idle, the principal saves what the bucket holds.
        pumps(&e, 5, 85);
        assert!(close(credit_left(&e, Nanos::from_millis(85)), 4.0));
        // The next pump runs late, in the next window: it keeps only what was earned
        // since one step before the boundary (90 ms) and a request's part, not the
        // savings of the window past.
        e.pump(Nanos::from_millis(103));
        let kept = credit_left(&e, Nanos::from_millis(103));
        assert!(close(kept, 2.3), "{kept}");
        // Within a window nothing is forgotten.
        pumps(&e, 113, 193);
        assert!(close(credit_left(&e, Nanos::from_millis(193)), 4.0));
        // A quota of less than a request a step: the same.
        let small = enforcer(100.0);
        small.apply_quota(&[3.0], Nanos(0));
        small.follow_wall_windows(Nanos(0), 17_000_000 * 100_000_000);
        pumps(&small, 5, 85);
        small.pump(Nanos::from_millis(103));
        let kept = credit_left(&small, Nanos::from_millis(103));
        assert!(close(kept, 1.39), "{kept}");
        // Planning alone, the enforcer's own windows count: the savings stay.
        let alone = enforcer(100.0);
        alone.apply_quota(&[10.0], Nanos(0));
        pumps(&alone, 5, 85);
        alone.pump(Nanos::from_millis(103));
        assert!(close(credit_left(&alone, Nanos::from_millis(103)), 4.0));
    }

    /// Requests of 1 unit admitted in wall-clock windows 0 and 1 (100 ms each) when 30
    /// wait from the start, with pumps at 5..85 ms, one late at 103 ms (the one due at
    /// 95 ms), then 113..193 ms; and the windows that ended as the enforcer reports them
    /// after one more pump at 203 ms.
    fn admitted_per_window_with_a_late_pump(follow: bool) -> ([u32; 2], Vec<(u64, f64)>) {
        let e = enforcer(100.0);
        e.apply_quota(&[10.0], Nanos(0));
        if follow {
            e.follow_wall_windows(Nanos(0), 17_000_000 * 100_000_000);
        }
        let mut waiting: Vec<CreditWait> = (0..30)
            .map(|_| match e.arrive(0, 1.0, false, Nanos(0)) {
                Credit::Wait(w) => w,
                _ => panic!("no credit at the start"),
            })
            .collect();
        let mut per_window = [0u32; 2];
        let times = (5..=85)
            .step_by(10)
            .chain([103])
            .chain((113..=193).step_by(10));
        for ms in times {
            e.pump(Nanos::from_millis(ms));
            for w in &mut waiting {
                if let Ok(charge) = w.rx.try_recv() {
                    charge.keep();
                    per_window[(ms / 100) as usize] += 1;
                }
            }
        }
        e.pump(Nanos::from_millis(203));
        let reported = e.snapshot().swap_remove(0).windows;
        (per_window, reported)
    }

    #[test]
    fn following_wall_windows_a_late_pump_never_admits_more_than_the_quota_in_a_window() {
        // 10 units a window. The late pump hands out what its step and the one before
        // earned; alone, the window after it admits 11.
        let (alone, reported) = admitted_per_window_with_a_late_pump(false);
        assert_eq!(alone, [8, 11]);
        // Not following the wall clock, there are no wall-clock windows to report.
        assert!(reported.is_empty());
        // Per wall-clock window: never more than the quota (rounded up to a request),
        // and each ended window reported with what it admitted.
        let (per_window, reported) = admitted_per_window_with_a_late_pump(true);
        assert_eq!(per_window, [8, 10]);
        let w = 17_000_000;
        assert_eq!(reported, vec![(w, 8.0), (w + 1, 10.0)]);
    }

    #[test]
    fn credit_saved_before_a_gap_without_pumps_is_not_spent_after_it() {
        let e = enforcer(100.0);
        pumps(&e, 0, 1000);
        let t = Nanos::from_millis(1000);
        let saved = credit_left(&e, t);
        assert!(saved >= 1.0, "{saved}");
        // The process stopped for 5 s: a request on return waits for the next pump...
        let back = Nanos::from_millis(6000);
        assert!(matches!(e.arrive(0, 1.0, true, back), Credit::Wait(_)));
        // ...which forgets what was saved before the gap.
        e.pump(back);
        assert!(credit_left(&e, back) <= 0.0);
        // Live again: credit earned from then on is spent as it comes.
        pumps(&e, 6010, 6100);
        let Credit::Now(_) = e.arrive(0, 1.0, true, Nanos::from_millis(6100)) else {
            panic!("credit again once the pumps run");
        };
    }

    #[test]
    fn credit_of_a_request_refused_later_goes_back() {
        let e = enforcer(100.0);
        // A second in: the bucket is full.
        pumps(&e, 0, 1000);
        let t = Nanos::from_millis(1000);
        let before = credit_left(&e, t);
        let Credit::Now(charge) = e.arrive(0, 1.0, true, t) else {
            panic!("within credit");
        };
        assert!((credit_left(&e, t) - (before - 1.0)).abs() < 1e-9);
        // Refused by its queue: the charge drops unkept.
        drop(charge);
        assert!(credit_left(&e, t) >= before - 1e-9, "the credit came back");
        // Served: kept, spent.
        let Credit::Now(charge) = e.arrive(0, 1.0, true, t) else {
            panic!("within credit");
        };
        charge.keep();
        assert!(credit_left(&e, t) < before - 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_gives_back_credit_sent_to_it() {
        let e = enforcer(10.0);
        // Nothing accrued yet: the request waits.
        let t0 = Nanos(0);
        let Credit::Wait(wait) = e.arrive(0, 1.0, true, t0) else {
            panic!("no credit at the start");
        };
        // Credit accrues and is sent to the waiter, who has left meanwhile.
        let t = Nanos::from_millis(1000);
        drop(wait);
        pumps(&e, 10, 1000);
        let left = credit_left(&e, t);
        assert!(
            left >= 1.0 - 1e-9,
            "the credit stayed with the principal: {left}"
        );
    }
}
