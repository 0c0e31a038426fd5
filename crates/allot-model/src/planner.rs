//! The window planner: given each principal's demand, how much of it to serve, and on
//! whose capacity (paper §3.1.2; DESIGN.md "The window planner" is the specification).
//!
//! Built once from a validated [`AgreementSet`], then [`Planner::solve`] once per window
//! with plain numbers: demand in, allocation out, in the same unit as capacity (units per
//! second from [`Planner::new`], units per window from [`Planner::per_window`]). Demand
//! may be global (summed over gateways); a gateway admits its local part with
//! [`local_part`].
//!
//! Objectives, each a two-stage linear program on `good_lp` with the pure-Rust `microlp`:
//! - **community**: variables `x[i][k]` (units of `i` served on `k`'s capacity) within
//!   `[floor, MI[k][i] + OI[k][i]]`; maximise θ with `Σ_k x[i][k] ≥ θ·n[i]`,
//!   `Σ_i x[i][k] ≤ V[k]` (and `≤ c[k]`, the locality limit), `Σ_k x[i][k] ≤ n[i]`; floors
//!   `x[i][k] ≥ MI[k][i]` when `n[i] ≥ MC[i]`, else `Σ_k x[i][k] ≥ n[i]`. Then, θ fixed,
//!   maximise `Σ x` so nothing that could be served is left idle.
//! - **provider**: all capacity is one pool `V`; maximise `Σ price[i]·x[i]` (the paper's
//!   income `Σ price[i]·(x[i] − MC[i])` up to a constant) with `Σ x ≤ V`,
//!   `min(n[i], MC[i]) ≤ x[i] ≤ min(n[i], MC[i] + OC[i])`; then, income fixed, maximise
//!   `Σ x` (ties go to serving more).
//!
//! A locality limit `c[k]` below the guarantees on `k`'s capacity (`Σ_i MI[k][i]`) would
//! make the floors infeasible, so the floors on `k` are scaled by `c[k] / Σ_i MI[k][i]`, and
//! a principal with demand under its guarantee is served in full up to the same scaled
//! share. Without locality limits the formulation is exactly DESIGN.md's. In the provider
//! objective the pool is `Σ_k min(V[k], c[k])` and floors scale the same way.
//!
//! Cost (see `docs/benchmarks.md`): variables only exist for pairs a principal may use
//! and demand is non-zero; floors are moved out of the variables; owners that only their
//! capacity row can bind are merged into one (exact: a shared pool becomes n variables
//! instead of n²); rows that can never bind are left out. The community second stage is
//! a maximum flow started from the first stage's plan, finished by augmenting paths
//! instead of a second LP, and is skipped when θ = 1. Above 64 LP columns (pairs that
//! bind, many principals) the first stage also runs as a flow: parametric maximum flow,
//! Newton steps on minimum cuts. Both give the LP's optimum (property tests compare
//! them with microlp on random sets), and the LP remains the fallback if round-off stops
//! them.

use good_lp::{
    microlp, variable, Expression, ProblemVariables, ResolutionError, Solution, SolverModel,
    Variable,
};

use crate::agreements::{AgreementSet, Objective};

/// Largest reduced LP solved by microlp in stage 1 (well under 1 ms); larger ones use
/// the parametric maximum flow, exact for the same LP (microlp needs about one pivot per
/// column, each costing more as the LP grows: 2 ms at 225 columns, 240 ms at 2 500).
const LP_COLUMN_LIMIT: usize = 64;
/// θ this close to 1 means every demand is met: no second stage.
const THETA_FULL: f64 = 1.0 - 1e-9;
/// Relative slack when a first-stage optimum becomes a second-stage constraint, so that
/// solver round-off cannot make the second stage infeasible.
const FIX_SLACK: f64 = 1e-9;

/// Why a window could not be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The demand vector does not have one entry per principal.
    #[error("demand has {got} entries, expected one per principal ({expected})")]
    DemandLength {
        /// Number of principals.
        expected: usize,
        /// Entries given.
        got: usize,
    },
    /// A demand negative, infinite or not a number.
    #[error("demand of principal #{} is {value}; expected a finite number ≥ 0", principal + 1)]
    BadDemand {
        /// Index of the principal.
        principal: usize,
        /// The value given.
        value: f64,
    },
    /// The LP solver failed (a bug: the formulation is always feasible and bounded).
    #[error("the planner's linear program could not be solved: {0}")]
    Solver(String),
}

impl From<ResolutionError> for PlanError {
    fn from(err: ResolutionError) -> Self {
        PlanError::Solver(err.to_string())
    }
}

/// Units of one principal served on another's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Index of the principal whose demand is served.
    pub user: usize,
    /// Index of the principal whose capacity serves it.
    pub owner: usize,
    /// Amount, in the planner's unit.
    pub units: f64,
}

/// The plan for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// Community: the smallest served fraction of demand over principals with demand (1
    /// when nobody has demand). Provider: `None`.
    pub theta: Option<f64>,
    /// Units served per principal, in the planner's unit, indexed like the principals.
    pub units: Vec<f64>,
    /// Community: where each principal's units are served (non-zero entries only).
    /// Provider: empty, the capacity is one pool.
    pub placement: Vec<Placement>,
}

/// The part of a global allocation a gateway that saw `demand_local` of `demand_global`
/// admits: `x_local = x · n_local / n` (paper §3.2). Zero when there is no global demand.
pub fn local_part(allocation: f64, demand_local: f64, demand_global: f64) -> f64 {
    if demand_global > 0.0 {
        (allocation * demand_local / demand_global).clamp(0.0, allocation.max(0.0))
    } else {
        0.0
    }
}

/// One `(user, owner)` pair the user may be served on, with its bounds.
#[derive(Debug, Clone, Copy)]
struct Pair {
    user: usize,
    owner: usize,
    /// `MI[owner][user]`, scaled down where a locality limit requires.
    floor: f64,
    /// `min(MI + OI, V[owner], c[owner])`.
    ceiling: f64,
}

/// A window planner for one agreement set. Cheap to call every window.
#[derive(Debug, Clone)]
pub struct Planner {
    objective: Objective,
    n: usize,
    /// `MC[i]`.
    mandatory: Vec<f64>,
    /// `OC[i]`.
    optional: Vec<f64>,
    /// `Σ_k floor[i][k]`: `MC[i]` after locality scaling.
    floor_total: Vec<f64>,
    price: Vec<f64>,
    /// `min(V[k], c[k])` per owner.
    limit: Vec<f64>,
    /// Pairs grouped by user, in user order.
    pairs: Vec<Pair>,
    /// Provider pool `Σ_k limit[k]` and the scale on its floors.
    pool: f64,
    pool_floor_scale: f64,
    /// Merge interchangeable owners (always, except in tests comparing with the full LP).
    merge_owners: bool,
    /// Solve stage 2 by augmenting paths (always, except in tests comparing with the LP).
    flow_stage2: bool,
    /// Above this many LP columns, stage 1 runs as parametric maximum flow (the LP stays
    /// the fallback); tests lower or raise it to compare both.
    lp_column_limit: usize,
}

impl Planner {
    /// A planner in units per second: capacity as configured, demand and allocation in
    /// units per second.
    pub fn new(set: &AgreementSet) -> Self {
        Self::with_scale(set, 1.0)
    }

    /// A planner in units per window of `set.window_ms()`: pass demand as units arriving
    /// per window; allocations are units per window (the window's credits).
    pub fn per_window(set: &AgreementSet) -> Self {
        Self::with_scale(set, set.window_ms() as f64 / 1000.0)
    }

    /// A planner whose unit is `scale` × units per second.
    pub fn with_scale(set: &AgreementSet, scale: f64) -> Self {
        let access = set.access();
        let principals = set.principals();
        let n = principals.len();
        let limit: Vec<f64> = principals
            .iter()
            .map(|p| {
                let cap = p.capacity_units_per_s;
                p.locality_limit_units_per_s.map_or(cap, |c| c.min(cap)) * scale
            })
            .collect();
        // Floors on an owner's capacity scale down when its locality limit is below them.
        let floor_scale: Vec<f64> = (0..n)
            .map(|owner| {
                let guaranteed: f64 = (0..n)
                    .map(|user| access.pair_mandatory_units_per_s(owner, user) * scale)
                    .sum();
                if guaranteed > limit[owner] && guaranteed > 0.0 {
                    limit[owner] / guaranteed
                } else {
                    1.0
                }
            })
            .collect();
        let mut pairs = Vec::new();
        for user in 0..n {
            for owner in 0..n {
                let mi = access.pair_mandatory_units_per_s(owner, user) * scale;
                let oi = access.pair_optional_units_per_s(owner, user) * scale;
                let ceiling = (mi + oi).min(limit[owner]);
                if ceiling <= 0.0 {
                    continue;
                }
                let floor = (mi * floor_scale[owner]).min(ceiling);
                pairs.push(Pair {
                    user,
                    owner,
                    floor,
                    ceiling,
                });
            }
        }
        let mut floor_total = vec![0.0; n];
        for p in &pairs {
            floor_total[p.user] += p.floor;
        }
        let mandatory: Vec<f64> = (0..n)
            .map(|i| access.mandatory_units_per_s(i) * scale)
            .collect();
        let pool: f64 = limit.iter().sum();
        let mandatory_sum: f64 = mandatory.iter().sum();
        let pool_floor_scale = if mandatory_sum > pool && mandatory_sum > 0.0 {
            pool / mandatory_sum
        } else {
            1.0
        };
        Planner {
            objective: set.objective(),
            n,
            optional: (0..n)
                .map(|i| access.optional_units_per_s(i) * scale)
                .collect(),
            mandatory,
            floor_total,
            price: principals.iter().map(|p| p.price).collect(),
            limit,
            pairs,
            pool,
            pool_floor_scale,
            merge_owners: true,
            flow_stage2: true,
            lp_column_limit: LP_COLUMN_LIMIT,
        }
    }

    /// Number of principals (the length `solve` expects).
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no principals.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The objective this planner optimises.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// `MC[i]` in the planner's unit: what a gateway may fall back to (its share of) when
    /// no fresh global demand is known.
    pub fn mandatory(&self) -> &[f64] {
        &self.mandatory
    }

    /// `OC[i]` in the planner's unit.
    pub fn optional(&self) -> &[f64] {
        &self.optional
    }

    /// Plans one window. `demand[i]` is principal `i`'s demand in the planner's unit.
    pub fn solve(&self, demand: &[f64]) -> Result<Allocation, PlanError> {
        if demand.len() != self.n {
            return Err(PlanError::DemandLength {
                expected: self.n,
                got: demand.len(),
            });
        }
        if let Some((principal, &value)) = demand
            .iter()
            .enumerate()
            .find(|(_, d)| !(d.is_finite() && **d >= 0.0))
        {
            return Err(PlanError::BadDemand { principal, value });
        }
        match self.objective {
            Objective::Community => self.community(demand),
            Objective::Provider => self.provider(demand),
        }
    }

    fn community(&self, demand: &[f64]) -> Result<Allocation, PlanError> {
        let active: Vec<Pair> = self
            .pairs
            .iter()
            .filter(|p| demand[p.user] > 0.0)
            .map(|p| Pair {
                floor: if demand[p.user] >= self.mandatory[p.user] {
                    p.floor
                } else {
                    0.0
                },
                ..*p
            })
            .collect();
        let reduced = Reduced::new(self.n, &self.limit, &active, self.merge_owners);
        let z = if reduced.columns.is_empty() {
            Vec::new()
        } else {
            let by_flow = if reduced.columns.len() > self.lp_column_limit {
                let low = self.low_above_floors(demand, &reduced);
                reduced.max_theta_by_flow(demand, &low)
            } else {
                None
            };
            let (mut z, theta) = match by_flow {
                Some(found) => found,
                None => self.community_stage(demand, &reduced, None)?,
            };
            if theta >= THETA_FULL || (self.flow_stage2 && reduced.augment(demand, &mut z)) {
                z
            } else {
                let fixed = (theta * (1.0 - FIX_SLACK) - FIX_SLACK).max(0.0);
                // Round-off could in principle make the fixed θ infeasible; the first
                // stage's answer is then still a valid plan, only maybe not work conserving.
                match self.community_stage(demand, &reduced, Some(fixed)) {
                    Ok((z2, _)) => z2,
                    Err(_) => z,
                }
            }
        };
        let x = reduced.expand(&active, &z);
        Ok(self.community_allocation(demand, &active, &x))
    }

    /// Per user: units above its floors it must get whatever θ is (demand under the
    /// guarantee is served in full, up to its locality-scaled share).
    fn low_above_floors(&self, demand: &[f64], reduced: &Reduced) -> Vec<f64> {
        (0..self.n)
            .map(|user| {
                let n = demand[user];
                if n > 0.0 && n < self.mandatory[user] {
                    (n * self.floor_total[user] / self.mandatory[user]
                        - reduced.floor_by_user[user])
                        .max(0.0)
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Stage 1 (`fixed_theta = None`): maximise θ. Stage 2: θ fixed, maximise `Σ x`.
    /// Works on the reduced problem: `z` above the floors, interchangeable owners merged.
    fn community_stage(
        &self,
        demand: &[f64],
        reduced: &Reduced,
        fixed_theta: Option<f64>,
    ) -> Result<(Vec<f64>, f64), PlanError> {
        let mut vars = ProblemVariables::new();
        let theta = fixed_theta
            .is_none()
            .then(|| vars.add(variable().min(0.0).max(1.0)));
        let zs: Vec<Variable> = reduced
            .columns
            .iter()
            .map(|c| vars.add(variable().min(0.0).max(c.room)))
            .collect();
        let objective: Expression = match theta {
            Some(t) => t.into(),
            None => zs.iter().copied().sum(),
        };
        let mut model = vars.maximise(objective).using(microlp);
        let mut by_group: Vec<Expression> = vec![Expression::default(); reduced.groups.len()];
        let mut by_user: Vec<Expression> = vec![Expression::default(); self.n];
        let mut room_by_user = vec![0.0; self.n];
        let mut room_by_group = vec![0.0; reduced.groups.len()];
        for (c, z) in reduced.columns.iter().zip(&zs) {
            by_group[c.group] += *z;
            by_user[c.user] += *z;
            room_by_user[c.user] += c.room;
            room_by_group[c.group] += c.room;
        }
        for (user, served) in by_user.into_iter().enumerate() {
            let n = demand[user];
            if n <= 0.0 {
                continue;
            }
            let floors = reduced.floor_by_user[user];
            if n < self.mandatory[user] {
                // Demand under the guarantee is served in full (up to its locality-scaled share).
                let must = n * self.floor_total[user] / self.mandatory[user] - floors;
                if must > 0.0 {
                    model.add_constraint(served.clone().geq(must));
                }
            }
            if room_by_user[user] > n - floors {
                model.add_constraint(served.clone().leq((n - floors).max(0.0)));
            }
            match (theta, fixed_theta) {
                (Some(t), _) => {
                    model.add_constraint((served - t * n).geq(-floors));
                }
                (None, Some(fixed)) => {
                    if fixed * n > floors {
                        model.add_constraint(served.geq(fixed * n - floors));
                    }
                }
                (None, None) => {}
            }
        }
        for ((load, room), capacity) in by_group
            .into_iter()
            .zip(room_by_group)
            .zip(&reduced.group_residual)
        {
            if room > *capacity {
                model.add_constraint(load.leq(*capacity));
            }
        }
        let solution = model.solve()?;
        let z = zs.iter().map(|v| solution.value(*v)).collect();
        let theta_value = theta.map_or(fixed_theta.unwrap_or(0.0), |t| solution.value(t));
        Ok((z, theta_value))
    }

    fn community_allocation(&self, demand: &[f64], active: &[Pair], x: &[f64]) -> Allocation {
        let mut units = vec![0.0; self.n];
        let mut placement = Vec::with_capacity(active.len());
        for (p, value) in active.iter().zip(x) {
            let v = value.clamp(p.floor, p.ceiling);
            units[p.user] += v;
            placement.push(Placement {
                user: p.user,
                owner: p.owner,
                units: v,
            });
        }
        // Solver round-off may overshoot demand by a hair; never plan more than asked.
        for (user, total) in units.iter_mut().enumerate() {
            if *total > demand[user] && *total > 0.0 {
                let factor = demand[user] / *total;
                for pl in placement.iter_mut().filter(|pl| pl.user == user) {
                    pl.units *= factor;
                }
                *total = demand[user];
            }
        }
        placement.retain(|pl| pl.units > 0.0);
        let theta = (0..self.n)
            .filter(|&i| demand[i] > 0.0)
            .map(|i| (units[i] / demand[i]).min(1.0))
            .fold(1.0f64, f64::min);
        Allocation {
            theta: Some(theta),
            units,
            placement,
        }
    }

    fn provider(&self, demand: &[f64]) -> Result<Allocation, PlanError> {
        let active: Vec<usize> = (0..self.n).filter(|&i| demand[i] > 0.0).collect();
        let low: Vec<f64> = active
            .iter()
            .map(|&i| demand[i].min(self.mandatory[i]) * self.pool_floor_scale)
            .collect();
        let high: Vec<f64> = active
            .iter()
            .map(|&i| demand[i].min(self.mandatory[i] + self.optional[i]))
            .collect();
        let mut units = vec![0.0; self.n];
        let x = if high.iter().sum::<f64>() <= self.pool {
            high.clone()
        } else {
            let (x, income) = self.provider_stage(&active, &low, &high, None)?;
            let prices_equal = active
                .iter()
                .all(|&i| self.price[i] == self.price[active[0]] && self.price[i] > 0.0);
            if prices_equal {
                x
            } else {
                let fixed = income * (1.0 - FIX_SLACK) - FIX_SLACK;
                match self.provider_stage(&active, &low, &high, Some(fixed)) {
                    Ok((x2, _)) => x2,
                    Err(_) => x,
                }
            }
        };
        for ((&i, value), (lo, hi)) in active.iter().zip(x).zip(low.iter().zip(&high)) {
            units[i] = value.clamp(*lo, *hi);
        }
        Ok(Allocation {
            theta: None,
            units,
            placement: Vec::new(),
        })
    }

    /// Stage 1 (`fixed_income = None`): maximise income. Stage 2: income fixed, maximise
    /// the total served.
    fn provider_stage(
        &self,
        active: &[usize],
        low: &[f64],
        high: &[f64],
        fixed_income: Option<f64>,
    ) -> Result<(Vec<f64>, f64), PlanError> {
        let mut vars = ProblemVariables::new();
        let xs: Vec<Variable> = low
            .iter()
            .zip(high)
            .map(|(lo, hi)| vars.add(variable().min(*lo).max(*hi)))
            .collect();
        let income: Expression = active
            .iter()
            .zip(&xs)
            .map(|(&i, x)| self.price[i] * *x)
            .sum();
        let total: Expression = xs.iter().copied().sum();
        let mut model = match fixed_income {
            None => vars.maximise(income.clone()),
            Some(_) => vars.maximise(total.clone()),
        }
        .using(microlp);
        model.add_constraint(total.leq(self.pool));
        if let Some(fixed) = fixed_income {
            model.add_constraint(income.clone().geq(fixed));
        }
        let solution = model.solve()?;
        let x: Vec<f64> = xs.iter().map(|v| solution.value(*v)).collect();
        let value = active.iter().zip(&x).map(|(&i, v)| self.price[i] * v).sum();
        Ok((x, value))
    }
}

mod reduced;

use reduced::Reduced;

#[cfg(test)]
mod tests;
