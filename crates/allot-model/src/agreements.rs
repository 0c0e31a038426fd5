//! Principals, agreements between them, and the access levels they imply.
//!
//! A principal owns capacity `V[i]` in cost units per second. An agreement
//! `from → to : [lower, upper]` lets `to` use between `lower` and `upper` of `from`'s
//! resources, including what `from` itself obtains through its own agreements (tickets
//! and currencies, paper §2.3). [`AgreementSet::from_spec`] validates a written set and
//! computes, once, each principal's mandatory and optional access levels (`MC`, `OC`)
//! and the pairwise flows (`MI[j][i]`, `OI[j][i]`) the window planner bounds its
//! allocations with (paper §3.1.1; DESIGN.md "Agreements: tickets and currencies").

mod access;
mod spec;

use std::collections::HashMap;
use std::fmt;

pub use spec::{AgreementSpec, AgreementsSpec, Objective, PrincipalSpec};

/// Most path steps the access-level walk may take before the set is refused.
pub const MAX_PATH_STEPS: usize = 40_000_000;

/// Slack allowed on `Σ lower ≤ 1` and `[0, 1]` bounds, for decimal fractions.
const BOUND_SLACK: f64 = 1e-9;

/// Where in the written set an error is: a TOML key path such as `agreement[2].share`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigKey {
    /// The array of tables (`principal`, `agreement`), or the top-level key itself.
    pub table: &'static str,
    /// Index in the array (0-based), `None` for a top-level key.
    pub index: Option<usize>,
    /// Key inside the table, `None` when the whole table is meant.
    pub field: Option<&'static str>,
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.table)?;
        if let Some(index) = self.index {
            write!(f, "[{index}]")?;
        }
        if let Some(field) = self.field {
            write!(f, ".{field}")?;
        }
        Ok(())
    }
}

/// Why an agreement set was refused. Each message names the principal or agreement and
/// what is allowed; [`AgreementError::key`] says where it is in the written set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgreementError {
    /// `window_ms` is zero.
    #[error("`window_ms`: expected an integer ≥ 1, got 0")]
    ZeroWindow,
    /// A principal has an empty name.
    #[error("principal #{}: `name` must not be empty", index + 1)]
    EmptyName {
        /// Index of the principal.
        index: usize,
    },
    /// Two principals share a name.
    #[error("principal `{name}` is declared twice; names must be unique")]
    DuplicatePrincipal {
        /// Index of the second declaration.
        index: usize,
        /// The repeated name.
        name: String,
    },
    /// Capacity negative, infinite or not a number.
    #[error("principal `{name}`: `capacity` must be a finite number ≥ 0 (units per second), got {value}")]
    BadCapacity {
        /// Index of the principal.
        index: usize,
        /// Its name.
        name: String,
        /// The value given.
        value: f64,
    },
    /// Price negative, infinite or not a number.
    #[error("principal `{name}`: `price` must be a finite number ≥ 0, got {value}")]
    BadPrice {
        /// Index of the principal.
        index: usize,
        /// Its name.
        name: String,
        /// The value given.
        value: f64,
    },
    /// Locality limit negative, infinite or not a number.
    #[error("principal `{name}`: `locality_limit` must be a finite number ≥ 0 (units per second), got {value}")]
    BadLocalityLimit {
        /// Index of the principal.
        index: usize,
        /// Its name.
        name: String,
        /// The value given.
        value: f64,
    },
    /// An agreement names a principal that is not declared.
    #[error("agreement #{} ({from} → {to}): `{field}` names unknown principal `{name}`; declared: {known}", index + 1)]
    UnknownPrincipal {
        /// Index of the agreement.
        index: usize,
        /// `from` or `to`.
        field: &'static str,
        /// Its `from` as written.
        from: String,
        /// Its `to` as written.
        to: String,
        /// The unknown name.
        name: String,
        /// Declared names, comma separated.
        known: String,
    },
    /// `from` and `to` are the same principal.
    #[error("agreement #{} ({name} → {name}): a principal cannot have an agreement with itself", index + 1)]
    SelfAgreement {
        /// Index of the agreement.
        index: usize,
        /// The principal.
        name: String,
    },
    /// The same pair appears twice.
    #[error("agreement #{} ({from} → {to}) repeats an earlier agreement between the same principals; merge them", index + 1)]
    DuplicateAgreement {
        /// Index of the later agreement.
        index: usize,
        /// Owner.
        from: String,
        /// User.
        to: String,
    },
    /// A bound outside `[0, 1]` or not a number.
    #[error("agreement #{} ({from} → {to}): `share` bounds must be in [0, 1], got [{lower}, {upper}]", index + 1)]
    BoundOutOfRange {
        /// Index of the agreement.
        index: usize,
        /// Owner.
        from: String,
        /// User.
        to: String,
        /// Lower bound given.
        lower: f64,
        /// Upper bound given.
        upper: f64,
    },
    /// Lower bound above upper bound.
    #[error("agreement #{} ({from} → {to}): `share` lower bound {lower} is above upper bound {upper}", index + 1)]
    LowerAboveUpper {
        /// Index of the agreement.
        index: usize,
        /// Owner.
        from: String,
        /// User.
        to: String,
        /// Lower bound given.
        lower: f64,
        /// Upper bound given.
        upper: f64,
    },
    /// A principal guarantees away more than all it has.
    #[error("principal `{name}`: the lower bounds of its agreements sum to {sum}, over 1; it cannot guarantee more than all of its resources")]
    LowerBoundsOverOne {
        /// Index of the principal.
        index: usize,
        /// Its name.
        name: String,
        /// `Σ_k lb(name → k)`.
        sum: f64,
    },
    /// Too many simple paths to sum the access levels over.
    #[error("the agreement graph has more than {max_steps} simple paths with a non-zero share; access levels are summed over every simple path, so shorten transitive chains or remove agreements")]
    TooManyPaths {
        /// The budget that was exceeded.
        max_steps: usize,
    },
}

impl AgreementError {
    /// Where the error is in the written set, for the caller to turn into a line number.
    pub fn key(&self) -> ConfigKey {
        use AgreementError as E;
        let at = |table, index, field| ConfigKey {
            table,
            index: Some(index),
            field: Some(field),
        };
        match self {
            E::ZeroWindow => ConfigKey {
                table: "window_ms",
                index: None,
                field: None,
            },
            E::EmptyName { index } | E::DuplicatePrincipal { index, .. } => {
                at("principal", *index, "name")
            }
            E::BadCapacity { index, .. } => at("principal", *index, "capacity"),
            E::BadPrice { index, .. } => at("principal", *index, "price"),
            E::BadLocalityLimit { index, .. } => at("principal", *index, "locality_limit"),
            E::LowerBoundsOverOne { index, .. } => ConfigKey {
                table: "principal",
                index: Some(*index),
                field: None,
            },
            E::UnknownPrincipal { index, field, .. } => at("agreement", *index, field),
            E::SelfAgreement { index, .. } | E::DuplicateAgreement { index, .. } => {
                at("agreement", *index, "to")
            }
            E::BoundOutOfRange { index, .. } | E::LowerAboveUpper { index, .. } => {
                at("agreement", *index, "share")
            }
            E::TooManyPaths { .. } => ConfigKey {
                table: "agreement",
                index: None,
                field: None,
            },
        }
    }
}

/// A validated principal.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Unique name.
    pub name: String,
    /// Capacity owned, cost units per second.
    pub capacity_units_per_s: f64,
    /// Price per unit above the mandatory level (provider objective).
    pub price: f64,
    /// Most that may be served on this principal's capacity, units per second.
    pub locality_limit_units_per_s: Option<f64>,
}

/// A validated agreement between principals, by index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Index of the owner of the capacity.
    pub from: usize,
    /// Index of the principal that may use it.
    pub to: usize,
    /// Guaranteed fraction (mandatory ticket).
    pub lower: f64,
    /// Most it may use (lower plus the optional ticket).
    pub upper: f64,
}

/// Access levels implied by the agreements, in cost units per second.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLevels {
    n: usize,
    pair_mandatory: Vec<f64>,
    pair_optional: Vec<f64>,
    mandatory: Vec<f64>,
    optional: Vec<f64>,
}

impl AccessLevels {
    /// Number of principals.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no principals.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// `MI[owner][user]`: guaranteed units per second `user` may use on `owner`'s capacity.
    pub fn pair_mandatory_units_per_s(&self, owner: usize, user: usize) -> f64 {
        self.pair_mandatory[owner * self.n + user]
    }

    /// `OI[owner][user]`: further units per second `user` may use on `owner`'s capacity
    /// when others leave it idle.
    pub fn pair_optional_units_per_s(&self, owner: usize, user: usize) -> f64 {
        self.pair_optional[owner * self.n + user]
    }

    /// `MC[user] = Σ_j MI[j][user]`.
    pub fn mandatory_units_per_s(&self, user: usize) -> f64 {
        self.mandatory[user]
    }

    /// `OC[user] = Σ_j OI[j][user]`.
    pub fn optional_units_per_s(&self, user: usize) -> f64 {
        self.optional[user]
    }
}

/// A validated agreement set with its access levels computed.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementSet {
    objective: Objective,
    window_ms: u64,
    principals: Vec<Principal>,
    agreements: Vec<Agreement>,
    access: AccessLevels,
}

fn finite_non_negative(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

impl AgreementSet {
    /// Validates a written set and computes its access levels.
    pub fn from_spec(spec: &AgreementsSpec) -> Result<Self, AgreementError> {
        if spec.window_ms == 0 {
            return Err(AgreementError::ZeroWindow);
        }
        let principals = validate_principals(&spec.principals)?;
        let agreements = validate_agreements(&spec.agreements, &principals)?;
        let access = compute_access(&principals, &agreements)?;
        Ok(AgreementSet {
            objective: spec.objective,
            window_ms: spec.window_ms,
            principals,
            agreements,
            access,
        })
    }

    /// The planner's objective.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// Planning window length in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Principals, in declaration order; every index in this crate refers to it.
    pub fn principals(&self) -> &[Principal] {
        &self.principals
    }

    /// Agreements, in declaration order.
    pub fn agreements(&self) -> &[Agreement] {
        &self.agreements
    }

    /// Index of the principal with this name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.principals.iter().position(|p| p.name == name)
    }

    /// Access levels (`MI`, `OI`, `MC`, `OC`).
    pub fn access(&self) -> &AccessLevels {
        &self.access
    }
}

fn validate_principals(specs: &[PrincipalSpec]) -> Result<Vec<Principal>, AgreementError> {
    let mut seen = HashMap::new();
    let mut principals = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let name = spec.name.trim().to_string();
        if name.is_empty() {
            return Err(AgreementError::EmptyName { index });
        }
        if seen.insert(name.clone(), index).is_some() {
            return Err(AgreementError::DuplicatePrincipal { index, name });
        }
        if !finite_non_negative(spec.capacity_units_per_s) {
            return Err(AgreementError::BadCapacity {
                index,
                name,
                value: spec.capacity_units_per_s,
            });
        }
        if !finite_non_negative(spec.price) {
            return Err(AgreementError::BadPrice {
                index,
                name,
                value: spec.price,
            });
        }
        if let Some(limit) = spec.locality_limit_units_per_s {
            if !finite_non_negative(limit) {
                return Err(AgreementError::BadLocalityLimit {
                    index,
                    name,
                    value: limit,
                });
            }
        }
        principals.push(Principal {
            name,
            capacity_units_per_s: spec.capacity_units_per_s,
            price: spec.price,
            locality_limit_units_per_s: spec.locality_limit_units_per_s,
        });
    }
    Ok(principals)
}

fn validate_agreements(
    specs: &[AgreementSpec],
    principals: &[Principal],
) -> Result<Vec<Agreement>, AgreementError> {
    let lookup: HashMap<&str, usize> = principals
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let known = || {
        principals
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut pairs = HashMap::new();
    let mut agreements = Vec::with_capacity(specs.len());
    let mut lower_sum = vec![0.0; principals.len()];
    for (index, spec) in specs.iter().enumerate() {
        let resolve = |field: &'static str, name: &str| {
            lookup
                .get(name.trim())
                .copied()
                .ok_or_else(|| AgreementError::UnknownPrincipal {
                    index,
                    field,
                    from: spec.from.clone(),
                    to: spec.to.clone(),
                    name: name.to_string(),
                    known: known(),
                })
        };
        let from = resolve("from", &spec.from)?;
        let to = resolve("to", &spec.to)?;
        if from == to {
            return Err(AgreementError::SelfAgreement {
                index,
                name: spec.from.clone(),
            });
        }
        if pairs.insert((from, to), index).is_some() {
            return Err(AgreementError::DuplicateAgreement {
                index,
                from: spec.from.clone(),
                to: spec.to.clone(),
            });
        }
        let [lower, upper] = spec.share;
        let in_range = |b: f64| (-BOUND_SLACK..=1.0 + BOUND_SLACK).contains(&b);
        if !in_range(lower) || !in_range(upper) {
            return Err(AgreementError::BoundOutOfRange {
                index,
                from: spec.from.clone(),
                to: spec.to.clone(),
                lower,
                upper,
            });
        }
        if lower > upper {
            return Err(AgreementError::LowerAboveUpper {
                index,
                from: spec.from.clone(),
                to: spec.to.clone(),
                lower,
                upper,
            });
        }
        lower_sum[from] += lower;
        agreements.push(Agreement {
            from,
            to,
            lower: lower.clamp(0.0, 1.0),
            upper: upper.clamp(0.0, 1.0),
        });
    }
    for (index, sum) in lower_sum.iter().enumerate() {
        if *sum > 1.0 + BOUND_SLACK {
            return Err(AgreementError::LowerBoundsOverOne {
                index,
                name: principals[index].name.clone(),
                sum: *sum,
            });
        }
    }
    Ok(agreements)
}

fn compute_access(
    principals: &[Principal],
    agreements: &[Agreement],
) -> Result<AccessLevels, AgreementError> {
    let n = principals.len();
    let capacity: Vec<f64> = principals.iter().map(|p| p.capacity_units_per_s).collect();
    let mut edges = vec![Vec::new(); n];
    let mut out = vec![0.0f64; n];
    for a in agreements {
        edges[a.from].push(access::Edge {
            to: a.to,
            lower: a.lower,
            upper: a.upper,
        });
        out[a.from] += a.lower;
    }
    for o in &mut out {
        *o = o.min(1.0);
    }
    let flows = access::flows(&capacity, &edges, &out, MAX_PATH_STEPS).map_err(|_| {
        AgreementError::TooManyPaths {
            max_steps: MAX_PATH_STEPS,
        }
    })?;
    let column_sum = |m: &[f64], user: usize| (0..n).map(|owner| m[owner * n + user]).sum();
    let mandatory = (0..n).map(|i| column_sum(&flows.mandatory, i)).collect();
    let optional = (0..n).map(|i| column_sum(&flows.optional, i)).collect();
    Ok(AccessLevels {
        n,
        pair_mandatory: flows.mandatory,
        pair_optional: flows.optional,
        mandatory,
        optional,
    })
}

#[cfg(test)]
pub(crate) mod tests;
