//! What the gateway and its cluster link share: the local demand going up, the quota
//! coming down, and the link's state for `/status` and `/metrics`. The link's loop
//! (`control::cluster`) writes it; the agreement window loop reads the quota and writes
//! the demand. Without `[cluster]` nothing writes it and the gateway plans alone.
//!
//! The link publishes its state every window. A state not renewed for more than
//! [`STALE_WINDOWS`] windows (the process was stopped, the link's loop is stuck on the
//! engine) is no longer enforced: the gateway admits nothing (its parent has dropped it
//! meanwhile, and the others' quotas may hold its part) for up to `REJOIN_WINDOWS`
//! windows, then its fallback share, and `/status` says so, until the link publishes
//! again. This is judged on the monotonic clock, so a
//! gateway continued after SIGSTOP never applies, even for a moment, the quota it held
//! before it stopped.

use std::sync::Mutex;
use std::time::Instant;

use allot_cluster::link::{LinkStatus, Role};
use allot_model::cluster::{Source, REJOIN_WINDOWS};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Windows after which a link state not renewed is no longer enforced.
pub const STALE_WINDOWS: u64 = 2;

/// One principal's figures in the cluster, units per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterPrincipal {
    /// Principal name.
    pub name: String,
    /// The whole cluster's demand behind the plan in force (units per second).
    pub global_demand: f64,
    /// What this gateway admits now (units per second): its quota, or its fallback share.
    pub local_share: f64,
}

/// The cluster link as `/status` serves it (present only under `[cluster]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// This gateway's node name.
    pub node: String,
    /// `root`, `aggregator`, `leaf`, or `detached` (in no tree yet: enforcing its
    /// fallback).
    pub role: String,
    /// The highest fencing epoch seen.
    pub epoch: u64,
    /// The parent node, if any.
    pub parent: Option<String>,
    /// The root obeyed, if any.
    #[serde(default)]
    pub root: Option<String>,
    /// The nodes reporting to this one.
    #[serde(default)]
    pub children: Vec<String>,
    /// Members known at the last reading.
    #[serde(default)]
    pub members: u64,
    /// Windows since the last fresh quota (0 when this window's is fresh).
    pub windows_since_fresh: u64,
    /// Whether the gateway enforces its fallback share (no quota for two windows, or no
    /// link to the cluster).
    pub fallback: bool,
    /// Unix time in milliseconds when the current fallback began.
    pub fallback_since_ms: Option<u64>,
    /// Messages published by the link.
    pub messages_sent_total: u64,
    /// Messages received by the link.
    pub messages_received_total: u64,
    /// Messages ignored: malformed, from outside the tree, of another epoch.
    #[serde(default)]
    pub messages_ignored_total: u64,
    /// The slowest single step of the link's tree logic so far, microseconds (at the
    /// root: summing the reports and solving the plan).
    #[serde(default)]
    pub slowest_step_us: u64,
    /// The most CPU time a single step of the link's tree logic took so far, microseconds
    /// (without the time its thread waited for a CPU).
    #[serde(default)]
    pub slowest_step_cpu_us: u64,
    /// The last problem with the coordination engine, if the last attempt failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The fingerprint of the agreement set the link plans with (16 hex digits; equal on
    /// every gateway planning with the same set; empty while there is no link).
    #[serde(default)]
    pub agreements: String,
    /// Per principal of the agreement set.
    pub principals: Vec<ClusterPrincipal>,
}

/// The link's state as the gateway keeps it.
#[derive(Debug, Default)]
struct State {
    /// `[cluster]` in force: the node name, the window in milliseconds and the principals.
    configured: Option<(String, u64, Vec<String>)>,
    link: Option<LinkStatus>,
    /// When `link` was last published.
    updated_at: Option<Instant>,
    /// What to enforce while there is no link (engine unreachable, name taken).
    detached_quota: Vec<f64>,
    detached_since_ms: Option<u64>,
    error: Option<String>,
}

/// Shared between the cluster link's loop and the agreement window loop.
#[derive(Debug)]
pub struct ClusterShared {
    demand: watch::Sender<Vec<f64>>,
    state: Mutex<State>,
}

impl Default for ClusterShared {
    fn default() -> ClusterShared {
        ClusterShared {
            demand: watch::channel(Vec::new()).0,
            state: Mutex::default(),
        }
    }
}

/// The quota the enforcer is to apply this window.
#[derive(Debug, Clone, PartialEq)]
pub enum Quota {
    /// No `[cluster]`: plan alone.
    Alone,
    /// Units per window per principal: the cluster's quota or the fallback share.
    Units(Vec<f64>),
}

impl ClusterShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link starts (or restarts) for node `node`, windows of `window_ms` and
    /// `principals`; `detached_quota` (units per window) is enforced until it runs.
    pub fn configure(
        &self,
        node: &str,
        window_ms: u64,
        principals: Vec<String>,
        detached_quota: Vec<f64>,
    ) {
        let mut s = self.lock();
        s.configured = Some((node.to_string(), window_ms, principals));
        s.link = None;
        s.detached_quota = detached_quota;
        s.detached_since_ms.get_or_insert_with(unix_ms);
    }

    /// `[cluster]` was removed: the gateway plans alone again.
    pub fn unconfigure(&self) {
        *self.lock() = State::default();
    }

    /// The link is down (`error` says why, never a secret): the detached quota applies.
    pub fn detach(&self, error: Option<String>) {
        let mut s = self.lock();
        s.link = None;
        s.detached_since_ms.get_or_insert_with(unix_ms);
        if error.is_some() {
            s.error = error;
        }
    }

    /// The link published its state.
    pub fn update(&self, status: &LinkStatus) {
        let mut s = self.lock();
        s.error = status.engine_error.clone();
        if status.enforcement.is_some() {
            s.detached_since_ms = None;
        }
        s.link = Some(status.clone());
        s.updated_at = Some(Instant::now());
    }

    /// The local demand of the window that just closed (units per window per principal),
    /// for the link's next report.
    pub fn set_demand(&self, demand: Vec<f64>) {
        self.demand.send_replace(demand);
    }

    /// Follows the local demand (the link's sensor).
    pub fn demand(&self) -> watch::Receiver<Vec<f64>> {
        self.demand.subscribe()
    }

    /// What the enforcer applies for `principals` principals.
    pub fn quota(&self, principals: usize) -> Quota {
        let s = self.lock();
        if s.configured.is_none() {
            return Quota::Alone;
        }
        let units = s.units();
        if units.len() == principals {
            Quota::Units(units)
        } else {
            // Another agreement set is being adopted: nothing for principals unknown.
            Quota::Units(vec![0.0; principals])
        }
    }

    /// The link's state for `/status`, under `[cluster]` only.
    pub fn snapshot(&self) -> Option<ClusterSnapshot> {
        let s = self.lock();
        let (node, window_ms, names) = s.configured.clone()?;
        let per_s = 1000.0 / window_ms.max(1) as f64;
        let link = s.link.as_ref();
        let enforcement = s.in_force().and_then(|l| l.enforcement.as_ref());
        let stale_ms = s.stale_ms();
        let (fallback, fallback_since_ms) = match enforcement.map(|e| e.source) {
            Some(Source::Fallback { since_window }) => (true, Some(since_window * window_ms)),
            Some(_) => (false, None),
            None => (
                true,
                s.detached_since_ms
                    .or(stale_ms.map(|ms| unix_ms().saturating_sub(ms))),
            ),
        };
        let stale_windows = stale_ms.map_or(0, |ms| ms / window_ms.max(1) + STALE_WINDOWS);
        let local = s.units();
        let global = link.map(|l| l.global_demand.clone()).unwrap_or_default();
        let principals = names
            .iter()
            .enumerate()
            .map(|(i, name)| ClusterPrincipal {
                name: name.clone(),
                global_demand: global.get(i).copied().unwrap_or(0.0) * per_s,
                local_share: local.get(i).copied().unwrap_or(0.0) * per_s,
            })
            .collect();
        Some(ClusterSnapshot {
            node,
            role: link.map_or(Role::Detached, |l| l.role).as_str().to_string(),
            epoch: link.map_or(0, |l| l.epoch),
            parent: link.and_then(|l| l.parent.clone()),
            root: link.and_then(|l| l.root.clone()),
            children: link.map(|l| l.children.clone()).unwrap_or_default(),
            members: link.map_or(0, |l| l.members as u64),
            windows_since_fresh: link.map_or(0, |l| l.windows_since_fresh) + stale_windows,
            fallback,
            fallback_since_ms,
            messages_sent_total: link.map_or(0, |l| l.sent),
            messages_received_total: link.map_or(0, |l| l.received),
            messages_ignored_total: link.map_or(0, |l| l.ignored),
            slowest_step_us: link.map_or(0, |l| l.slowest_step_us),
            slowest_step_cpu_us: link.map_or(0, |l| l.slowest_step_cpu_us),
            error: s.error.clone(),
            agreements: link.map(|l| l.agreements.clone()).unwrap_or_default(),
            principals,
        })
    }
}

impl State {
    /// How long past [`STALE_WINDOWS`] windows the link's state has gone unrenewed, in
    /// milliseconds; `None` while it is renewed in time (or there is none).
    fn stale_ms(&self) -> Option<u64> {
        let window_ms = self.configured.as_ref().map_or(100, |c| c.1.max(1));
        let limit = window_ms.saturating_mul(STALE_WINDOWS);
        let age = u64::try_from(
            self.link
                .as_ref()
                .and(self.updated_at)?
                .elapsed()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        age.checked_sub(limit).filter(|&over| over > 0)
    }

    /// The link's state, while it is renewed in time.
    fn in_force(&self) -> Option<&LinkStatus> {
        self.link.as_ref().filter(|_| self.stale_ms().is_none())
    }

    /// What to enforce now, units per window per principal: the link's quota while its
    /// state is renewed in time. Once stale, nothing for [`REJOIN_WINDOWS`] windows: the
    /// link has not reported either, so its parent has dropped it and the others' quotas
    /// may hold its part (the process was stopped; its link's next state says more).
    /// Stale for longer, the lesser of its last quota and the detached share (so the
    /// gateways together stay within what their last plans or the mandatory-only plan
    /// allow); with no link, the detached share.
    fn units(&self) -> Vec<f64> {
        if let Some(e) = self.in_force().and_then(|l| l.enforcement.as_ref()) {
            return e.units.clone();
        }
        let window_ms = self.configured.as_ref().map_or(100, |c| c.1.max(1));
        let rejoining = self
            .stale_ms()
            .is_some_and(|ms| ms < window_ms.saturating_mul(REJOIN_WINDOWS));
        match self.link.as_ref().and_then(|l| l.enforcement.as_ref()) {
            Some(e) if rejoining => vec![0.0; e.units.len()],
            Some(e) if e.units.len() == self.detached_quota.len() => e
                .units
                .iter()
                .zip(&self.detached_quota)
                .map(|(u, d)| u.min(*d))
                .collect(),
            _ => self.detached_quota.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_model::cluster::Enforcement;

    #[test]
    fn without_cluster_the_gateway_plans_alone_and_shows_nothing() {
        let c = ClusterShared::default();
        assert_eq!(c.quota(2), Quota::Alone);
        assert!(c.snapshot().is_none());
    }

    #[test]
    fn detached_it_enforces_its_fallback_then_the_links_quota() {
        let c = ClusterShared::default();
        // Windows of 100 s: the link's state below never goes stale during the test.
        c.configure("g1", 100_000, vec!["A".into(), "B".into()], vec![1.0, 3.0]);
        assert_eq!(c.quota(2), Quota::Units(vec![1.0, 3.0]));
        let s = c.snapshot().expect("configured");
        assert!(s.fallback && s.fallback_since_ms.is_some());
        assert_eq!(s.role, "detached");
        let mut link = LinkStatus::new("g1");
        link.role = Role::Leaf;
        link.enforcement = Some(Enforcement {
            units: vec![2.0, 5.0],
            source: Source::Fresh,
        });
        link.global_demand = vec![4.0, 8.0];
        c.update(&link);
        assert_eq!(c.quota(2), Quota::Units(vec![2.0, 5.0]));
        assert_eq!(c.quota(3), Quota::Units(vec![0.0; 3]));
        let s = c.snapshot().expect("configured");
        assert!(!s.fallback && s.fallback_since_ms.is_none());
        assert_eq!(s.role, "leaf");
        assert_eq!(s.principals[1].local_share, 0.05);
        assert_eq!(s.principals[1].global_demand, 0.08);
    }

    #[test]
    fn a_link_state_not_renewed_for_two_windows_is_no_longer_enforced() {
        let c = ClusterShared::default();
        // Windows of 1 ms: stale after 2 ms without a new state.
        c.configure("g1", 1, vec!["A".into()], vec![1.0]);
        let mut link = LinkStatus::new("g1");
        link.role = Role::Root;
        link.epoch = 7;
        link.enforcement = Some(Enforcement {
            units: vec![4.0],
            source: Source::Fresh,
        });
        c.update(&link);
        std::thread::sleep(std::time::Duration::from_millis(10));
        // Just stale: the others may hold this gateway's part now; nothing.
        assert_eq!(c.quota(1), Quota::Units(vec![0.0]));
        let s = c.snapshot().expect("configured");
        assert!(s.fallback && s.fallback_since_ms.is_some(), "{s:?}");
        assert!(s.windows_since_fresh >= STALE_WINDOWS, "{s:?}");
        assert_eq!(s.principals[0].local_share, 0.0);
        // Stale for longer than a rejoin takes: the detached share.
        std::thread::sleep(std::time::Duration::from_millis(REJOIN_WINDOWS + 10));
        assert_eq!(c.quota(1), Quota::Units(vec![1.0]));
        let s = c.snapshot().expect("configured");
        assert_eq!(s.principals[0].local_share, 1000.0);
        // A last quota below the detached share: the lesser is enforced.
        link.enforcement = Some(Enforcement {
            units: vec![0.5],
            source: Source::Fresh,
        });
        c.update(&link);
        std::thread::sleep(std::time::Duration::from_millis(REJOIN_WINDOWS + 10));
        assert_eq!(c.quota(1), Quota::Units(vec![0.5]));
    }
}
