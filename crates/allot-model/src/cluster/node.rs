//! One gateway's part in the combining tree, window by window (paper §3.2; DESIGN.md
//! "Cluster" is the specification).
//!
//! Each window `w` every node measures its local demand (cost units per window, per
//! principal) and, when the window closes, [`Node::close_window`]s it. A leaf reports at
//! once. An aggregator adds its children's reports for `w` and reports when all are in, or
//! at its deadline ([`Node::deadline`]), using a child's report of `w − 1` when the one of
//! `w` is missing and dropping a child silent for [`CHILD_SILENT_WINDOWS`]. The root solves
//! the planner on the sum and sends the quotas down; each aggregator splits what it
//! receives by the demand it reported, `x_local = x · n_local / n`, so the quotas handed
//! down never sum above the parent's. A quota computed from window `w`'s demand is for
//! window `w + LEAD_WINDOWS`: every gateway switches plans at the same window boundary, so
//! two plans never mix inside one window.
//!
//! What a node enforces in window `v` ([`Node::enforce`]): the quota for `v` (fresh), or
//! failing that the one for `v − 1` (stale by one; the lesser of it and the plan before
//! while the shell reports the engine failing, [`Node::engine_failed`]); after
//! [`PARENT_SILENT_WINDOWS`]
//! without a quota, its share of the mandatory-only plan (fallback: the planner's plan
//! when every principal asks for its guarantee, split like the quotas, so the shares of
//! all gateways never sum above capacity). A quota of a lower epoch than the highest seen,
//! or older than [`STALE_WINDOWS`], is never enforced.
//!
//! Messages are at most once, and a lost one is stood in for by the sender's previous one
//! (a child's last report, the last quota held): exact while demand is steady, wrong just
//! after a step, when a loss costs the most. So a report or quotas message that moved by
//! more than [`REPEAT_CHANGE`] from the sender's previous one is sent twice (both copies
//! in the step's [`Outgoing`]), and a second copy is taken as nothing new. At 10 000
//! gateways this costs the root a handful of messages a second.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::shape::{Position, Shape};
use crate::planner::Planner;

/// A quota computed from window `w`'s demand is enforced in window `w + LEAD_WINDOWS`:
/// one window to close `w` and one for the reports and quotas to cross the tree.
pub const LEAD_WINDOWS: u64 = 2;
/// A quota older than this many windows is never enforced.
pub const STALE_WINDOWS: u64 = 3;
/// After this many windows without a quota from its parent, a node falls back.
pub const PARENT_SILENT_WINDOWS: u64 = 2;
/// A child that has not reported for this many windows is dropped from the sums.
pub const CHILD_SILENT_WINDOWS: u64 = 2;
/// A node whose window starts jump by more than [`CHILD_SILENT_WINDOWS`] (its process was
/// stopped, its loop stuck) was dropped by its parent meanwhile, and the others' quotas
/// took its part: its fallback share would come on top of them. Until a fresh quota
/// takes it back, it admits nothing, for at most this many windows; past that the
/// cluster is taken to be gone too and the fallback share applies.
pub const REJOIN_WINDOWS: u64 = 20;
/// Quotas are split a hair under proportion so round-off never hands down more than
/// was received.
const SPLIT_MARGIN: f64 = 1.0 - 1e-12;
/// After the engine fails ([`Node::engine_failed`]), windows (counted from the failure's)
/// in which a stale quota is the lesser of the last two plans: one for the failure's own
/// messages, [`LEAD_WINDOWS`] for the plans made from demand reported across it.
pub const ENGINE_FAILED_WINDOWS: u64 = LEAD_WINDOWS + 1;
/// Report breakdowns kept to split a late quota with the figures it was computed from.
const BREAKDOWNS_KEPT: usize = 4;
/// A lost message is stood in for by the sender's previous one (a child's last report, the
/// last quota held). A message that differs from the sender's previous one by more than
/// this fraction of the larger figure, in any principal, would be stood in for badly, so
/// it is sent twice ([`Outgoing`] holds it twice): a unitless fraction. Messages that
/// barely move (steady demand) are sent once, so repeats cost messages only when the
/// demand or the plan moves.
pub const REPEAT_CHANGE: f64 = 0.1;

/// Demand of a subtree, sent up once a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The sender's epoch (the root's fencing epoch it obeys).
    pub epoch: u64,
    /// The window the demand was measured in.
    pub window: u64,
    /// The sender's name.
    pub from: String,
    /// Cost units per window, per principal, summed over the sender's subtree.
    pub demand: Vec<f64>,
}

/// One child's part of a parent's quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaPart {
    /// The child's name.
    pub to: String,
    /// Units per window, per principal, for the child's whole subtree.
    pub units: Vec<f64>,
    /// The subtree's share of the mandatory-only plan (its fallback), same unit.
    pub fallback_units: Vec<f64>,
}

/// A parent's quotas for all its children, sent down once a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quotas {
    /// The root's fencing epoch.
    pub epoch: u64,
    /// The window whose demand the plan was computed from.
    pub window: u64,
    /// The window the quotas are for (`window + LEAD_WINDOWS`).
    pub target_window: u64,
    /// The sender's name.
    pub from: String,
    /// One part per child the sender counted; a child left out gets nothing.
    pub parts: Vec<QuotaPart>,
    /// The whole cluster's demand the plan was computed from, units per window per
    /// principal (for status; empty from a sender that does not tell it).
    #[serde(default)]
    pub demand: Vec<f64>,
}

/// A message a step wants sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// To the parent named `to`.
    Report {
        /// The parent's name.
        to: String,
        /// The report.
        report: Report,
    },
    /// To every child (one message, each child picks its part).
    Quotas(Quotas),
}

/// Why a message was ignored (the shell counts these in its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// The sender is not a child (reports) or not the parent (quotas) in this shape.
    #[error("the sender is not in this position's tree")]
    NotInTree,
    /// The sender obeys a lower epoch: an old or split-off tree.
    #[error("the message is from a lower epoch")]
    LowerEpoch,
    /// The message is from a newer epoch this node has not joined yet.
    #[error("the message is from a newer epoch")]
    HigherEpoch,
    /// Wrong number of principals, or a figure negative or not finite.
    #[error("the message's figures are malformed")]
    Malformed,
    /// Older than what is already held.
    #[error("the message is older than one already received")]
    Old,
}

/// Where a node's enforced quota comes from this window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The quota planned for this window.
    Fresh,
    /// The previous window's quota (this window's was not received).
    Stale {
        /// Windows since the quota's own window.
        age_windows: u64,
    },
    /// The share of the mandatory-only plan: no quota for [`PARENT_SILENT_WINDOWS`].
    Fallback {
        /// First window of this fallback.
        since_window: u64,
    },
}

/// What to admit in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Enforcement {
    /// Units per window, per principal (the window's credits for this gateway).
    pub units: Vec<f64>,
    /// Where they come from.
    pub source: Source,
}

#[derive(Debug, Clone)]
struct ChildReport {
    window: u64,
    demand: Vec<f64>,
}

/// The figures a report was made of, kept to split the quota that answers it.
#[derive(Debug, Clone)]
struct Breakdown {
    window: u64,
    local: Vec<f64>,
    children: Vec<(String, Vec<f64>)>,
}

#[derive(Debug, Clone)]
struct Held {
    target_window: u64,
    epoch: u64,
    units: Vec<f64>,
}

/// One node's combining-tree state.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    principals: usize,
    /// The planner, for when this node is the root.
    planner: Arc<Planner>,
    /// The mandatory-only plan, units per window per principal, for all gateways together.
    mandatory_plan: Vec<f64>,
    /// Highest epoch seen; lower ones are never obeyed.
    epoch: u64,
    position: Option<Position>,
    members: usize,
    reports: HashMap<String, ChildReport>,
    /// The window being combined and this node's own demand in it, until reported.
    pending: Option<(u64, Vec<f64>)>,
    breakdowns: VecDeque<Breakdown>,
    /// Quotas received for this node itself, oldest first.
    held: VecDeque<Held>,
    /// This node's share of the mandatory-only plan, from the last quota received.
    fallback_share: Option<Vec<f64>>,
    fallback_since: Option<u64>,
    /// The window last enforced, to see a jump.
    last_enforced: Option<u64>,
    /// The window in which this node found it had been away, until a fresh quota.
    rejoining_since: Option<u64>,
    /// The last window in which the shell saw the engine fail (an error, a reconnect).
    engine_failed: Option<u64>,
    /// The whole cluster's demand behind the last plan made or received.
    global_demand: Vec<f64>,
    /// The demand of the last report sent up, to tell whether the next one moved.
    last_report_sent: Option<Vec<f64>>,
    /// The parts of the last quotas sent down, to tell whether the next ones moved.
    last_parts_sent: Option<Vec<QuotaPart>>,
    /// Sender, epoch and target window of the last quotas taken, to know a repeat.
    last_quotas_taken: Option<(String, u64, u64)>,
}

/// The mandatory-only plan: what the planner gives when every principal asks for exactly
/// its guarantee (within capacity by construction), units per window.
pub fn mandatory_plan(planner: &Planner) -> Vec<f64> {
    planner
        .solve(planner.mandatory())
        .map(|a| a.units)
        .unwrap_or_else(|_| vec![0.0; planner.len()])
}

fn well_formed(figures: &[f64], principals: usize) -> bool {
    figures.len() == principals && figures.iter().all(|v| v.is_finite() && *v >= 0.0)
}

fn add(into: &mut [f64], from: &[f64]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// True when `new` would be stood in for badly by `old`: some figure differs by more than
/// [`REPEAT_CHANGE`] of the larger of the two, or the lengths differ.
fn moved(old: &[f64], new: &[f64]) -> bool {
    old.len() != new.len()
        || old
            .iter()
            .zip(new)
            .any(|(a, b)| (a - b).abs() > REPEAT_CHANGE * a.abs().max(b.abs()))
}

/// True when quotas `new` would be stood in for badly by `old`: a child added or left
/// out, or one child's quota or fallback [`moved`].
fn parts_moved(old: &[QuotaPart], new: &[QuotaPart]) -> bool {
    old.len() != new.len()
        || new.iter().any(|n| {
            old.iter().find(|o| o.to == n.to).is_none_or(|o| {
                moved(&o.units, &n.units) || moved(&o.fallback_units, &n.fallback_units)
            })
        })
}

/// `total · weight / sum` per principal, a hair under, zero where `sum` is zero.
fn proportion(total: &[f64], weight: &[f64], sum: &[f64]) -> Vec<f64> {
    total
        .iter()
        .zip(weight)
        .zip(sum)
        .map(|((t, w), s)| {
            if *s > 0.0 {
                (t * (w / s) * SPLIT_MARGIN).clamp(0.0, t.max(0.0))
            } else {
                0.0
            }
        })
        .collect()
}

impl Node {
    /// A node named `name` for an agreement set planned by `planner` (units per window).
    /// It is in no tree until [`Node::reshape`].
    pub fn new(name: impl Into<String>, planner: Arc<Planner>) -> Node {
        let mandatory_plan = mandatory_plan(&planner);
        Node {
            name: name.into(),
            principals: planner.len(),
            planner,
            mandatory_plan,
            epoch: 0,
            position: None,
            members: 1,
            reports: HashMap::new(),
            pending: None,
            breakdowns: VecDeque::new(),
            held: VecDeque::new(),
            fallback_share: None,
            fallback_since: None,
            last_enforced: None,
            rejoining_since: None,
            engine_failed: None,
            global_demand: Vec::new(),
            last_report_sent: None,
            last_parts_sent: None,
            last_quotas_taken: None,
        }
    }

    /// The whole cluster's demand behind the last plan this node made (at the root) or
    /// received, units per window per principal; empty before the first.
    pub fn global_demand(&self) -> &[f64] {
        &self.global_demand
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The node's place in the tree, if it has one.
    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    /// A new agreement set: the planner changes, and quotas planned for the old one
    /// (possibly another number of principals) are dropped.
    pub fn set_planner(&mut self, planner: Arc<Planner>) {
        self.mandatory_plan = mandatory_plan(&planner);
        if planner.len() != self.principals {
            self.held.clear();
            self.reports.clear();
            self.breakdowns.clear();
            self.pending = None;
            self.fallback_share = None;
            self.global_demand.clear();
        }
        self.principals = planner.len();
        self.planner = planner;
    }

    /// An epoch seen anywhere (the engine's watch, a message): kept if highest. Quotas of
    /// lower epochs held so far are dropped.
    pub fn observe_epoch(&mut self, epoch: u64) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.held.retain(|h| h.epoch >= epoch);
        }
    }

    /// Takes this node's place in `shape`, the tree of `epoch`. A lower epoch than the
    /// highest seen is refused (returns false): its root is not obeyed.
    pub fn reshape(&mut self, epoch: u64, shape: &Shape) -> bool {
        if epoch < self.epoch {
            return false;
        }
        self.observe_epoch(epoch);
        self.position = shape.position(&self.name).cloned();
        self.members = shape.len().max(1);
        let children: Vec<String> = self
            .position
            .as_ref()
            .map(|p| p.children.clone())
            .unwrap_or_default();
        self.reports.retain(|name, _| children.contains(name));
        // A new parent or new children hold no stand-in from this node: its next
        // messages count as moved.
        self.last_report_sent = None;
        self.last_parts_sent = None;
        true
    }

    /// Leaves the tree (the shell lost the engine, or this node's membership expired).
    pub fn leave(&mut self) {
        self.position = None;
        self.reports.clear();
        self.pending = None;
        self.last_report_sent = None;
        self.last_parts_sent = None;
    }

    /// Window `window` has closed with `local_demand` (units per principal) at this
    /// node. A leaf reports at once; an aggregator waits for its children or its deadline.
    pub fn close_window(&mut self, window: u64, local_demand: &[f64]) -> Vec<Outgoing> {
        let local = if well_formed(local_demand, self.principals) {
            local_demand.to_vec()
        } else {
            vec![0.0; self.principals]
        };
        self.pending = Some((window, local));
        if self.all_reported(window) {
            self.finish()
        } else {
            Vec::new()
        }
    }

    /// The deadline for combining `window` passed: report (or plan, at the root) with
    /// what has arrived.
    pub fn deadline(&mut self, window: u64) -> Vec<Outgoing> {
        match &self.pending {
            Some((w, _)) if *w == window => self.finish(),
            _ => Vec::new(),
        }
    }

    /// Whether the tree below this node is alive: every child's last report is recent
    /// enough to count in `window`'s sums (within [`CHILD_SILENT_WINDOWS`]). True for a
    /// node without children; false for a node in no tree.
    pub fn children_reporting(&self, window: u64) -> bool {
        self.position.as_ref().is_some_and(|p| {
            p.children.iter().all(|c| {
                self.reports
                    .get(c)
                    .is_some_and(|r| r.window + CHILD_SILENT_WINDOWS > window)
            })
        })
    }

    fn all_reported(&self, window: u64) -> bool {
        self.position.as_ref().is_some_and(|p| {
            p.children
                .iter()
                .all(|c| self.reports.get(c).is_some_and(|r| r.window >= window))
        })
    }

    /// A child's report arrived.
    pub fn on_report(&mut self, report: Report) -> Result<Vec<Outgoing>, Ignored> {
        let Some(position) = &self.position else {
            return Err(Ignored::NotInTree);
        };
        if !position.children.contains(&report.from) {
            return Err(Ignored::NotInTree);
        }
        if report.epoch < self.epoch {
            return Err(Ignored::LowerEpoch);
        }
        if report.epoch > self.epoch {
            return Err(Ignored::HigherEpoch);
        }
        if !well_formed(&report.demand, self.principals) {
            return Err(Ignored::Malformed);
        }
        if let Some(r) = self.reports.get(&report.from) {
            // The second copy of a report already counted: nothing new.
            if r.window == report.window && r.demand == report.demand {
                return Ok(Vec::new());
            }
            if r.window >= report.window {
                return Err(Ignored::Old);
            }
        }
        self.reports.insert(
            report.from,
            ChildReport {
                window: report.window,
                demand: report.demand,
            },
        );
        match &self.pending {
            Some((w, _)) if self.all_reported(*w) => Ok(self.finish()),
            _ => Ok(Vec::new()),
        }
    }

    /// Combines the pending window: reports up, or at the root plans and sends quotas.
    fn finish(&mut self) -> Vec<Outgoing> {
        let Some((window, local)) = self.pending.take() else {
            return Vec::new();
        };
        let Some(position) = self.position.clone() else {
            return Vec::new();
        };
        let mut total = local.clone();
        let mut children = Vec::with_capacity(position.children.len());
        for child in &position.children {
            if let Some(r) = self.reports.get(child) {
                // The last report stands in for one missing window; silent longer, the
                // child's demand is dropped (it gets no quota).
                if r.window + CHILD_SILENT_WINDOWS > window {
                    add(&mut total, &r.demand);
                    children.push((child.clone(), r.demand.clone()));
                }
            }
        }
        self.breakdowns.push_back(Breakdown {
            window,
            local,
            children,
        });
        while self.breakdowns.len() > BREAKDOWNS_KEPT {
            self.breakdowns.pop_front();
        }
        match position.parent {
            Some(parent) => {
                // Sent twice when the parent's stand-in (this node's previous report)
                // would be off: a loss then costs the plan the most.
                let copies = if self
                    .last_report_sent
                    .as_ref()
                    .is_none_or(|old| moved(old, &total))
                {
                    2
                } else {
                    1
                };
                self.last_report_sent = Some(total.clone());
                let out = Outgoing::Report {
                    to: parent,
                    report: Report {
                        epoch: self.epoch,
                        window,
                        from: self.name.clone(),
                        demand: total,
                    },
                };
                vec![out; copies]
            }
            None => {
                self.global_demand = total.clone();
                let units = self
                    .planner
                    .solve(&total)
                    .map(|a| a.units)
                    .unwrap_or_else(|_| self.mandatory_plan.clone());
                let fallback = self.mandatory_plan.clone();
                self.split(window, window + LEAD_WINDOWS, &units, &fallback)
            }
        }
    }

    /// Splits a subtree's quota (and its fallback) by the demand reported for `window`:
    /// holds this node's part and returns the message for the children, if any (twice
    /// when it moved).
    fn split(
        &mut self,
        window: u64,
        target_window: u64,
        units: &[f64],
        fallback: &[f64],
    ) -> Vec<Outgoing> {
        let breakdown = self
            .breakdowns
            .iter()
            .rev()
            .find(|b| b.window == window)
            .or(self.breakdowns.back())
            .cloned();
        let has_children = self
            .position
            .as_ref()
            .is_some_and(|p| !p.children.is_empty());
        let (own, own_fallback, parts) = match breakdown {
            Some(b) => {
                let mut sum = b.local.clone();
                for (_, d) in &b.children {
                    add(&mut sum, d);
                }
                let parts: Vec<QuotaPart> = b
                    .children
                    .iter()
                    .map(|(name, d)| QuotaPart {
                        to: name.clone(),
                        units: proportion(units, d, &sum),
                        fallback_units: proportion(fallback, d, &sum),
                    })
                    .collect();
                (
                    proportion(units, &b.local, &sum),
                    proportion(fallback, &b.local, &sum),
                    parts,
                )
            }
            // Nothing reported yet: nothing to split by, so nothing is handed out.
            None => (
                vec![0.0; self.principals],
                vec![0.0; self.principals],
                Vec::new(),
            ),
        };
        self.hold(target_window, own, own_fallback);
        if !has_children {
            return Vec::new();
        }
        // Sent twice when a child's stand-in (its previous quota) would be off.
        let copies = if self
            .last_parts_sent
            .as_ref()
            .is_none_or(|old| parts_moved(old, &parts))
        {
            2
        } else {
            1
        };
        self.last_parts_sent = Some(parts.clone());
        let out = Outgoing::Quotas(Quotas {
            epoch: self.epoch,
            window,
            target_window,
            from: self.name.clone(),
            parts,
            demand: self.global_demand.clone(),
        });
        vec![out; copies]
    }

    fn hold(&mut self, target_window: u64, units: Vec<f64>, fallback: Vec<f64>) {
        self.fallback_share = Some(fallback);
        self.held.retain(|h| h.target_window != target_window);
        self.held.push_back(Held {
            target_window,
            epoch: self.epoch,
            units,
        });
        self.held.make_contiguous().sort_by_key(|h| h.target_window);
        while self.held.len() > STALE_WINDOWS as usize + 1 {
            self.held.pop_front();
        }
    }

    /// The parent's quotas arrived: hold this node's part and split it for the children.
    /// A message that leaves this node out is a quota of zero (the parent dropped it and
    /// gave its share to others), passed down as zero.
    pub fn on_quotas(&mut self, quotas: &Quotas) -> Result<Vec<Outgoing>, Ignored> {
        let Some(position) = &self.position else {
            return Err(Ignored::NotInTree);
        };
        if position.parent.as_deref() != Some(quotas.from.as_str()) {
            return Err(Ignored::NotInTree);
        }
        if quotas.epoch < self.epoch {
            return Err(Ignored::LowerEpoch);
        }
        if quotas.epoch > self.epoch {
            return Err(Ignored::HigherEpoch);
        }
        if quotas.target_window < quotas.window
            || quotas.parts.iter().any(|p| {
                !well_formed(&p.units, self.principals)
                    || !well_formed(&p.fallback_units, self.principals)
            })
        {
            return Err(Ignored::Malformed);
        }
        // The second copy of quotas already taken: nothing new, nothing to pass down.
        if self
            .last_quotas_taken
            .as_ref()
            .is_some_and(|(from, epoch, target)| {
                *from == quotas.from && *epoch == quotas.epoch && *target == quotas.target_window
            })
        {
            return Ok(Vec::new());
        }
        if self
            .held
            .back()
            .is_some_and(|h| h.target_window > quotas.target_window)
        {
            return Err(Ignored::Old);
        }
        if well_formed(&quotas.demand, self.principals) {
            self.global_demand = quotas.demand.clone();
        }
        let zero = vec![0.0; self.principals];
        let (units, fallback) = quotas
            .parts
            .iter()
            .find(|p| p.to == self.name)
            .map(|p| (p.units.clone(), p.fallback_units.clone()))
            .unwrap_or((zero.clone(), zero));
        self.last_quotas_taken = Some((quotas.from.clone(), quotas.epoch, quotas.target_window));
        Ok(self.split(quotas.window, quotas.target_window, &units, &fallback))
    }

    /// The shell saw the coordination engine fail in window `window` (an operation's
    /// error, a lost connection): messages of this window and the next
    /// [`ENGINE_FAILED_WINDOWS`] may have been lost together, so a quota stale in them
    /// is the lesser of the last two plans held.
    pub fn engine_failed(&mut self, window: u64) {
        self.engine_failed = Some(self.engine_failed.map_or(window, |f| f.max(window)));
    }

    /// What this node admits in window `window` (call once, at the window's start).
    pub fn enforce(&mut self, window: u64) -> Enforcement {
        if self
            .last_enforced
            .is_some_and(|last| window > last + CHILD_SILENT_WINDOWS)
        {
            self.rejoining_since = Some(window);
        }
        self.last_enforced = Some(window);
        let current = self
            .held
            .iter()
            .rev()
            .find(|h| h.target_window <= window && h.epoch >= self.epoch);
        if let Some(h) = current {
            let age_windows = window - h.target_window;
            if age_windows == 0 {
                self.rejoining_since = None;
            }
            if age_windows < PARENT_SILENT_WINDOWS.min(STALE_WINDOWS + 1)
                && self.rejoining_since.is_none()
            {
                self.fallback_since = None;
                // Stale: the last plan stands in. A plan that moved from the one before
                // was sent twice, so it is off by more than REPEAT_CHANGE only when
                // both copies of this window's were lost, which independent losses
                // rarely do. An engine failing loses messages together (every copy, for
                // every gateway behind a server that went away), and the last plan may
                // be an outlier the others have moved on from (a sibling dropped in it
                // and back since): then the lesser of it and the plan before, so a
                // missed quota never enforces more than two plans agree on.
                let mut units = h.units.clone();
                let failing = self
                    .engine_failed
                    .is_some_and(|f| f + ENGINE_FAILED_WINDOWS >= window);
                if age_windows > 0 && failing {
                    if let Some(before) = self
                        .held
                        .iter()
                        .rev()
                        .find(|p| p.target_window < h.target_window && p.epoch == h.epoch)
                    {
                        for (u, b) in units.iter_mut().zip(&before.units) {
                            *u = u.min(*b);
                        }
                    }
                }
                return Enforcement {
                    units,
                    source: if age_windows == 0 {
                        Source::Fresh
                    } else {
                        Source::Stale { age_windows }
                    },
                };
            }
        }
        let since_window = *self.fallback_since.get_or_insert(window);
        let rejoining = self
            .rejoining_since
            .is_some_and(|r| window < r + REJOIN_WINDOWS);
        let units = match &self.fallback_share {
            _ if rejoining => vec![0.0; self.principals],
            Some(share) => share.clone(),
            // Never told a share: an equal part of the mandatory-only plan.
            None => self
                .mandatory_plan
                .iter()
                .map(|m| m / self.members as f64)
                .collect(),
        };
        Enforcement {
            units,
            source: Source::Fallback { since_window },
        }
    }
}
