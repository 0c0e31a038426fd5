//! Mandatory and optional access levels over simple paths (paper §2.3 and §3.1.1,
//! formulae 1–4; DESIGN.md "Agreements: tickets and currencies" is the specification).
//!
//! For every owner `j` we walk each simple path `j = k0 → … → km = i` once, depth first,
//! carrying two numbers that the formulas factor into:
//! - `mw = Π lb` along the path (mandatory tickets all the way);
//! - `ow = Σ_p Π_{q<p} lb · (ub − lb)_p · Π_{q>p} ub` (optional from split point `p` on).
//!
//! Extending the path by an edge `[lb, ub]` gives `mw' = mw·lb` and
//! `ow' = ow·ub + mw·(ub − lb)`, so each path costs O(1). At the end node `i`:
//! `MI[j][i] += V[j]·mw·(1 − out[i])`, `OI[j][i] += V[j]·(ow + mw·out[i])` (the second
//! term is the reclaim of mandatory resources `i` passed on).
//!
//! `mw + ow` never grows along a path (bounds are at most 1), so a prefix where it is
//! negligible is not extended. Paths never repeat a principal, so cycles terminate; the
//! number of simple paths can still grow exponentially in a dense graph, hence a budget.

/// One outgoing agreement, resolved to indices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge {
    pub(crate) to: usize,
    pub(crate) lower: f64,
    pub(crate) upper: f64,
}

/// Below this `mw + ow`, a path and all its extensions contribute nothing measurable.
const NEGLIGIBLE_WEIGHT: f64 = 1e-12;

/// Pairwise flows `MI[j][i]` and `OI[j][i]`, row-major by owner `j`.
#[derive(Debug, Clone)]
pub(crate) struct Flows {
    pub(crate) mandatory: Vec<f64>,
    pub(crate) optional: Vec<f64>,
}

/// The walk visited more path steps than allowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TooManyPaths;

/// Sums the flows over every simple path. `out[i] = Σ_k lb(i→k)`.
///
/// `OI[j][i]` is capped at `V[j] − MI[j][i]`: the path sum counts the same optional
/// capacity once per path (with `ub = 1` everywhere it grows with the number of paths),
/// but `i` can never use more of `j` than `j` owns. The planner bounds every allocation
/// by capacity anyway, so the cap changes what is reported, never what is allocated.
pub(crate) fn flows(
    capacity: &[f64],
    edges: &[Vec<Edge>],
    out: &[f64],
    max_steps: usize,
) -> Result<Flows, TooManyPaths> {
    let n = capacity.len();
    let mut mandatory = vec![0.0; n * n];
    let mut optional = vec![0.0; n * n];
    let mut on_path = vec![false; n];
    let mut steps = 0usize;
    // Stack frame: node, index of the next edge to try, path weights at this node.
    let mut stack: Vec<(usize, usize, f64, f64)> = Vec::with_capacity(n);
    for owner in 0..n {
        let v = capacity[owner];
        if v <= 0.0 {
            continue;
        }
        let row = owner * n;
        // m = 0: the owner itself keeps what it does not pass on, and may reclaim it.
        mandatory[row + owner] += v * (1.0 - out[owner]);
        optional[row + owner] += v * out[owner];
        on_path[owner] = true;
        stack.push((owner, 0, 1.0, 0.0));
        while let Some(top) = stack.last_mut() {
            let (node, next, mw, ow) = *top;
            let Some(edge) = edges[node].get(next) else {
                on_path[node] = false;
                stack.pop();
                continue;
            };
            top.1 += 1;
            if on_path[edge.to] {
                continue;
            }
            let mw2 = mw * edge.lower;
            let ow2 = ow * edge.upper + mw * (edge.upper - edge.lower);
            if mw2 + ow2 < NEGLIGIBLE_WEIGHT {
                continue;
            }
            steps += 1;
            if steps > max_steps {
                return Err(TooManyPaths);
            }
            let end = edge.to;
            mandatory[row + end] += v * mw2 * (1.0 - out[end]);
            optional[row + end] += v * (ow2 + mw2 * out[end]);
            on_path[end] = true;
            stack.push((end, 0, mw2, ow2));
        }
    }
    for (at, value) in optional.iter_mut().enumerate() {
        let room = (capacity[at / n] - mandatory[at]).max(0.0);
        *value = value.min(room);
    }
    Ok(Flows {
        mandatory,
        optional,
    })
}
