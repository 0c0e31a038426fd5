//! The community LP reduced for speed, and the flow algorithms that solve it exactly:
//! floors moved out of the variables, interchangeable owners merged, stage 2 (and, for
//! large problems, stage 1) as maximum flow. See the parent module for why.

use std::collections::HashMap;

use super::Pair;

/// One variable of the reduced community LP: units of `user` above its floors, served on
/// the owners of `group`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Column {
    pub(super) user: usize,
    pub(super) group: usize,
    /// Most it may take: the pair's ceiling minus floor (for a merged group, the group's
    /// residual capacity, which the owner row caps anyway).
    pub(super) room: f64,
}

/// The community LP with floors moved out of the variables and interchangeable owners
/// merged. An owner is interchangeable when every pair on it has more room than the
/// owner's residual capacity (so only the owner row can bind); owners with the same set
/// of such users then form one transportation sink: any split of a user's units among
/// them that respects their residual capacities is feasible, so merging them is exact.
/// A shared pool (every principal may use every capacity) becomes n variables, not n².
#[derive(Debug)]
pub(super) struct Reduced {
    pub(super) columns: Vec<Column>,
    /// Owners in each group, in index order.
    pub(super) groups: Vec<Vec<usize>>,
    /// Capacity left in each group once the floors are served.
    pub(super) group_residual: Vec<f64>,
    /// Per owner: capacity left once the floors on it are served.
    pub(super) owner_residual: Vec<f64>,
    /// Per user: units its floors already serve.
    pub(super) floor_by_user: Vec<f64>,
    /// Per active pair: its column.
    pub(super) pair_column: Vec<usize>,
}

impl Reduced {
    pub(super) fn new(n: usize, limit: &[f64], active: &[Pair], merge: bool) -> Self {
        let mut owner_residual = limit.to_vec();
        let mut floor_by_user = vec![0.0; n];
        let mut users_of: Vec<Vec<usize>> = vec![Vec::new(); n];
        for p in active {
            owner_residual[p.owner] -= p.floor;
            floor_by_user[p.user] += p.floor;
            users_of[p.owner].push(p.user);
        }
        for r in &mut owner_residual {
            *r = r.max(0.0);
        }
        let mut free = vec![merge; n];
        for p in active {
            if p.ceiling - p.floor < owner_residual[p.owner] {
                free[p.owner] = false;
            }
        }
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of_owner: Vec<Option<usize>> = vec![None; n];
        let mut by_users: HashMap<&[usize], usize> = HashMap::new();
        for owner in 0..n {
            if !free[owner] || users_of[owner].is_empty() {
                continue;
            }
            let group = *by_users
                .entry(users_of[owner].as_slice())
                .or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
            groups[group].push(owner);
            group_of_owner[owner] = Some(group);
        }
        // An owner with a binding pair is a group of its own, with one column per pair.
        for owner in 0..n {
            if !free[owner] && !users_of[owner].is_empty() {
                groups.push(vec![owner]);
                group_of_owner[owner] = Some(groups.len() - 1);
            }
        }
        let group_residual: Vec<f64> = groups
            .iter()
            .map(|owners| owners.iter().map(|&k| owner_residual[k]).sum())
            .collect();
        let mut columns = Vec::new();
        let mut pair_column = vec![0; active.len()];
        let mut column_of: HashMap<(usize, usize), usize> = HashMap::new();
        for (index, p) in active.iter().enumerate() {
            let Some(group) = group_of_owner[p.owner] else {
                continue;
            };
            let room = if free[p.owner] {
                group_residual[group]
            } else {
                (p.ceiling - p.floor).max(0.0)
            };
            pair_column[index] = *column_of.entry((p.user, group)).or_insert_with(|| {
                columns.push(Column {
                    user: p.user,
                    group,
                    room,
                });
                columns.len() - 1
            });
        }
        Reduced {
            columns,
            groups,
            group_residual,
            owner_residual,
            floor_by_user,
            pair_column,
        }
    }

    /// Stage 2 without a second LP: with θ fixed, "maximise `Σ x`" is a maximum flow
    /// (source → user, at most its demand; user → owner group, within the pair's room;
    /// group → sink, within its residual capacity), and stage 1's answer is a feasible
    /// flow that already meets every user's lower bound (θ·n, the floors, "in full").
    /// Augmenting along shortest residual paths (Edmonds–Karp) until none is left gives
    /// the maximum; a path only raises the total of the user it starts from, so no lower
    /// bound is ever broken. Returns false if it gave up (round-off), and the caller then
    /// solves stage 2 as an LP.
    pub(super) fn augment(&self, demand: &[f64], z: &mut [f64]) -> bool {
        let upper: Vec<f64> = demand
            .iter()
            .zip(&self.floor_by_user)
            .map(|(n, f)| (n - f).max(0.0))
            .collect();
        self.max_flow(&upper, z).is_some()
    }

    /// Tolerance for flows, relative to the largest group.
    pub(super) fn eps(&self) -> f64 {
        1e-9 * self.group_residual.iter().fold(1.0f64, |m, r| m.max(*r))
    }

    /// Raises the flow `z` to a maximum where user `i` sends at most `upper[i]` (Edmonds–
    /// Karp from the users). Returns the users and groups still reachable from the source
    /// in the residual network (the source side of a minimum cut), or `None` if round-off
    /// stopped it.
    pub(super) fn max_flow(&self, upper: &[f64], z: &mut [f64]) -> Option<(Vec<bool>, Vec<bool>)> {
        let users = upper.len();
        let groups = self.groups.len();
        let eps = self.eps();
        let mut served = vec![0.0; users];
        let mut load = vec![0.0; groups];
        let mut cols_of_user: Vec<Vec<usize>> = vec![Vec::new(); users];
        let mut cols_of_group: Vec<Vec<usize>> = vec![Vec::new(); groups];
        for (c, col) in self.columns.iter().enumerate() {
            served[col.user] += z[c];
            load[col.group] += z[c];
            cols_of_user[col.user].push(c);
            cols_of_group[col.group].push(c);
        }
        let max_rounds = 4 * self.columns.len() * (users + 1) + 16;
        for _ in 0..max_rounds {
            // Breadth-first search from every user that could send more.
            let mut from_group: Vec<Option<usize>> = vec![None; groups];
            let mut from_user: Vec<Option<usize>> = vec![None; users];
            let mut seen_user = vec![false; users];
            let mut queue = std::collections::VecDeque::new();
            for user in 0..users {
                if upper[user] - served[user] > eps && !cols_of_user[user].is_empty() {
                    seen_user[user] = true;
                    queue.push_back(user);
                }
            }
            let mut end = None;
            'search: while let Some(user) = queue.pop_front() {
                for &c in &cols_of_user[user] {
                    let g = self.columns[c].group;
                    if from_group[g].is_some() || self.columns[c].room - z[c] <= eps {
                        continue;
                    }
                    from_group[g] = Some(c);
                    if self.group_residual[g] - load[g] > eps {
                        end = Some(g);
                        break 'search;
                    }
                    // The group is full: move one of its users elsewhere to make room.
                    for &c2 in &cols_of_group[g] {
                        let other = self.columns[c2].user;
                        if !seen_user[other] && z[c2] > eps {
                            seen_user[other] = true;
                            from_user[other] = Some(c2);
                            queue.push_back(other);
                        }
                    }
                }
            }
            let Some(end) = end else {
                let group_seen = from_group.iter().map(Option::is_some).collect();
                return Some((seen_user, group_seen));
            };
            // Walk the path back to its source user, finding the bottleneck.
            let mut delta = self.group_residual[end] - load[end];
            let mut path = Vec::new();
            let mut g = end;
            let source = loop {
                let c = from_group[g]?;
                delta = delta.min(self.columns[c].room - z[c]);
                path.push((c, 1.0));
                let user = self.columns[c].user;
                match from_user[user] {
                    Some(back) => {
                        delta = delta.min(z[back]);
                        path.push((back, -1.0));
                        g = self.columns[back].group;
                    }
                    None => break user,
                }
            };
            delta = delta.min(upper[source] - served[source]);
            if delta <= eps {
                return None;
            }
            for (c, sign) in path {
                z[c] += sign * delta;
            }
            served[source] += delta;
            load[end] += delta;
        }
        None
    }

    /// Stage 1 as parametric maximum flow, for problems too large for the LP to be quick:
    /// θ is feasible when a flow gives every user `need(θ) = max(low, θ·n − floors)`
    /// above its floors. Starting at θ = 1, each infeasible θ yields a minimum cut whose
    /// users cannot all get their need; the largest θ that cut allows is the next guess
    /// (Newton's method on a piecewise-linear function, finite and decreasing). Returns
    /// the flow and θ, or `None` (round-off, or too many steps) to fall back to the LP.
    pub(super) fn max_theta_by_flow(&self, demand: &[f64], low: &[f64]) -> Option<(Vec<f64>, f64)> {
        let users = demand.len();
        let floors = &self.floor_by_user;
        let need = |user: usize, theta: f64| {
            if demand[user] > 0.0 {
                low[user].max(theta * demand[user] - floors[user]).max(0.0)
            } else {
                0.0
            }
        };
        let eps = self.eps();
        let mut has_column = vec![false; users];
        for col in &self.columns {
            has_column[col.user] = true;
        }
        // Someone with demand and nowhere to be served pins θ at 0.
        let stranded = (0..users).any(|u| demand[u] > 0.0 && !has_column[u]);
        let mut theta = if stranded { 0.0 } else { 1.0f64 };
        for _ in 0..64 {
            let upper: Vec<f64> = (0..users).map(|u| need(u, theta)).collect();
            let mut z = vec![0.0; self.columns.len()];
            let (user_seen, group_seen) = self.max_flow(&upper, &mut z)?;
            let mut served = vec![0.0; users];
            for (c, col) in self.columns.iter().enumerate() {
                served[col.user] += z[c];
            }
            let short: f64 = (0..users).map(|u| (upper[u] - served[u]).max(0.0)).sum();
            if short <= eps * (users as f64 + 1.0) {
                return Some((z, theta));
            }
            // Capacity across the cut: full columns from reached users to unreached
            // groups, and the residual of every reached group.
            let mut cut = 0.0;
            for col in &self.columns {
                if user_seen[col.user] && !group_seen[col.group] {
                    cut += col.room;
                }
            }
            for (g, seen) in group_seen.iter().enumerate() {
                if *seen {
                    cut += self.group_residual[g];
                }
            }
            let reached: Vec<usize> = (0..users).filter(|&u| user_seen[u]).collect();
            let wanted = |t: f64| reached.iter().map(|&u| need(u, t)).sum::<f64>();
            if reached.is_empty() || wanted(0.0) > cut + eps * (users as f64 + 1.0) {
                return None;
            }
            // Largest t ≤ θ with wanted(t) ≤ cut (wanted is non-decreasing).
            let (mut lo, mut hi) = (0.0f64, theta);
            for _ in 0..100 {
                let mid = 0.5 * (lo + hi);
                if wanted(mid) <= cut {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            if lo >= theta {
                return None;
            }
            theta = lo;
        }
        None
    }

    /// Turns a solution `z` of the reduced LP back into `x` per active pair: floors plus,
    /// in a merged group, each user's units poured into its owners' residual capacity in
    /// index order.
    pub(super) fn expand(&self, active: &[Pair], z: &[f64]) -> Vec<f64> {
        let mut x: Vec<f64> = active.iter().map(|p| p.floor).collect();
        if z.is_empty() {
            return x;
        }
        let mut left = self.owner_residual.clone();
        // Pairs of one column, in owner order (active pairs are sorted by user, then owner).
        let mut pairs_of: Vec<Vec<usize>> = vec![Vec::new(); self.columns.len()];
        for (index, &column) in self.pair_column.iter().enumerate() {
            if column < pairs_of.len() {
                pairs_of[column].push(index);
            }
        }
        for (column, pairs) in pairs_of.iter().enumerate() {
            let mut units = z[column].max(0.0);
            let last = pairs.len().saturating_sub(1);
            for (i, &index) in pairs.iter().enumerate() {
                let owner = active[index].owner;
                // The last owner takes any round-off the others could not.
                let take = if i == last {
                    units
                } else {
                    units.min(left[owner])
                };
                x[index] += take;
                left[owner] -= take;
                units -= take;
            }
        }
        x
    }
}
