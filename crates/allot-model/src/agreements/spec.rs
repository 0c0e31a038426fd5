//! The agreement set as an operator writes it (TOML), before validation.
//!
//! Self-contained so a gateway configuration can embed it as is: `objective`, `window_ms`,
//! `[[principal]]` and `[[agreement]]` at the level where it is flattened or nested.

use serde::{Deserialize, Serialize};

/// Which quantity the window planner optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Cooperative owners: maximise the smallest served fraction of demand (θ), then the
    /// total served (paper §3.1.2, "Global Response Time").
    #[default]
    Community,
    /// One provider pool: maximise income above the mandatory levels, then the total
    /// served (paper §3.1.2, "Total Income of Provider").
    Provider,
}

impl Objective {
    /// The name used in configuration and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Community => "community",
            Objective::Provider => "provider",
        }
    }
}

fn default_window_ms() -> u64 {
    100
}

fn default_price() -> f64 {
    1.0
}

/// An agreement set as written, names unresolved. Validate it with
/// [`AgreementSet::from_spec`](super::AgreementSet::from_spec).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgreementsSpec {
    /// The planner's objective; `community` unless set.
    #[serde(default)]
    pub objective: Objective,
    /// Length of one planning window in milliseconds (default 100).
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// The principals, in the order output lists them (`[[principal]]`).
    #[serde(default, rename = "principal")]
    pub principals: Vec<PrincipalSpec>,
    /// The agreements between them (`[[agreement]]`).
    #[serde(default, rename = "agreement")]
    pub agreements: Vec<AgreementSpec>,
}

/// One `[[principal]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    /// Unique name, used by agreements and demand.
    pub name: String,
    /// Capacity owned, in cost units per second (`capacity` in TOML); 0 owns nothing.
    #[serde(rename = "capacity")]
    pub capacity_units_per_s: f64,
    /// Price per unit served above the mandatory level (provider objective; default 1).
    #[serde(default = "default_price")]
    pub price: f64,
    /// At most this many units per second may be served on this principal's capacity
    /// (`locality_limit` in TOML; paper §3.1.2, locality costs).
    #[serde(default, rename = "locality_limit")]
    pub locality_limit_units_per_s: Option<f64>,
}

/// One `[[agreement]]` table: `to` may use between `share[0]` and `share[1]` of `from`'s
/// resources.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgreementSpec {
    /// Owner of the capacity.
    pub from: String,
    /// Who may use it.
    pub to: String,
    /// `[lower, upper]` fractions of `from`'s resources, each in `[0, 1]`.
    pub share: [f64; 2],
}
