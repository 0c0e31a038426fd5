//! The FVM fluid model (FVM paper section 3.1, eqs. 3–7): V applications adapt their
//! demand `n_v` by AIMD on a congestion signal derived from a super-linear price.
//!
//! - eq. 3: usage `m = K1 · Σ n_v`
//! - eq. 4: price (slowdown) `p = m²`
//! - eq. 5: averaged price `ġ = −γ (g − p)`
//! - eq. 6: congestion signal `c = σ · g`
//! - eq. 7: AIMD `ṅ_v = (1 − c) − (n_v / 2) · c`
//!
//! Solved with forward Euler. Steady state (eq. 9): `n* = 2/c* − 2` for every v.
//! The defaults are the paper's figure 3(a).

use thiserror::Error;

/// A parameter out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum FvmError {
    /// At least one application is needed.
    #[error("the fluid model needs at least one group")]
    NoGroups,
    /// A parameter must be finite and > 0 (γ also < 1 per eq. 5).
    #[error("fvm parameter `{name}` out of range: {value}")]
    Param {
        /// Which parameter.
        name: &'static str,
        /// The value given.
        value: f64,
    },
}

/// Parameters of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct FvmParams {
    /// Initial demand of each group (V = its length).
    pub initial: Vec<f64>,
    /// Resource units per thread (K1, eq. 3).
    pub k1: f64,
    /// EWMA weight of the price (γ, eq. 5), in (0, 1).
    pub gamma: f64,
    /// Price-to-signal scale (σ, eq. 6).
    pub sigma: f64,
    /// Euler step.
    pub dt: f64,
}

impl Default for FvmParams {
    /// Figure 3(a): five VMs starting at 4, 7, 10, 13, 16 threads, K1 = 10, γ = 0.1,
    /// σ = 2.5·10⁻⁶.
    fn default() -> Self {
        FvmParams {
            initial: vec![4.0, 7.0, 10.0, 13.0, 16.0],
            k1: 10.0,
            gamma: 0.1,
            sigma: 2.5e-6,
            dt: 0.01,
        }
    }
}

/// The model's state at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct FvmState {
    /// Model time.
    pub t: f64,
    /// Demand of each group.
    pub n: Vec<f64>,
    /// Averaged price g (eq. 5).
    pub g: f64,
}

impl FvmState {
    /// Total usage m (eq. 3).
    pub fn usage(&self, params: &FvmParams) -> f64 {
        params.k1 * self.n.iter().sum::<f64>()
    }

    /// Congestion signal c (eq. 6).
    pub fn congestion(&self, params: &FvmParams) -> f64 {
        params.sigma * self.g
    }
}

/// The fluid model, stepped with forward Euler.
#[derive(Debug, Clone)]
pub struct FvmModel {
    params: FvmParams,
    state: FvmState,
}

impl FvmModel {
    /// A model at t = 0 with `g = 0` (the average price starts behind the price).
    pub fn new(params: FvmParams) -> Result<FvmModel, FvmError> {
        if params.initial.is_empty() {
            return Err(FvmError::NoGroups);
        }
        let positive = |name, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(FvmError::Param { name, value })
            }
        };
        positive("k1", params.k1)?;
        positive("sigma", params.sigma)?;
        positive("dt", params.dt)?;
        if !(params.gamma > 0.0 && params.gamma < 1.0) {
            return Err(FvmError::Param {
                name: "gamma",
                value: params.gamma,
            });
        }
        for &n in &params.initial {
            if !(n.is_finite() && n >= 0.0) {
                return Err(FvmError::Param {
                    name: "initial",
                    value: n,
                });
            }
        }
        let state = FvmState {
            t: 0.0,
            n: params.initial.clone(),
            g: 0.0,
        };
        Ok(FvmModel { params, state })
    }

    /// The parameters.
    pub fn params(&self) -> &FvmParams {
        &self.params
    }

    /// The current state.
    pub fn state(&self) -> &FvmState {
        &self.state
    }

    /// One Euler step of eqs. 3–7. Demands are kept ≥ 0.
    pub fn step(&mut self) {
        let p = &self.params;
        let m = self.state.usage(p);
        let price = m * m;
        let c = self.state.congestion(p);
        for n in &mut self.state.n {
            let dn = (1.0 - c) - *n / 2.0 * c;
            *n = (*n + p.dt * dn).max(0.0);
        }
        self.state.g += p.dt * (-p.gamma * (self.state.g - price));
        self.state.t += p.dt;
    }

    /// Steps until model time `t` (no-op if already past it).
    pub fn run_until(&mut self, t: f64) {
        while self.state.t + self.params.dt / 2.0 < t {
            self.step();
        }
    }

    /// The analytic steady state (eq. 9) for the current congestion: `2/c − 2`.
    pub fn steady_state_demand(&self) -> f64 {
        let c = self.state.congestion(&self.params);
        if c > 0.0 {
            2.0 / c - 2.0
        } else {
            f64::INFINITY
        }
    }

    /// Largest relative spread of the demands: `(max − min) / mean`.
    pub fn spread(&self) -> f64 {
        let n = &self.state.n;
        let max = n.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let min = n.iter().cloned().fold(f64::INFINITY, f64::min);
        let mean = n.iter().sum::<f64>() / n.len() as f64;
        if mean > 0.0 {
            (max - min) / mean
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_3a_converges_to_equal_demands_at_the_analytic_steady_state() {
        let mut m = FvmModel::new(FvmParams::default()).unwrap();
        m.run_until(150.0);
        assert!(m.spread() < 0.01, "spread {}", m.spread());
        let n_star = m.steady_state_demand();
        for &n in &m.state().n {
            assert!((n - n_star).abs() / n_star < 0.01, "n {n} vs n* {n_star}");
        }
        // And the value itself: n³ + 2n² = 2/(σ (K1 V)²) = 320 → n ≈ 6.234.
        assert!((n_star - 6.234).abs() < 0.01);
    }

    #[test]
    fn demands_rise_while_the_average_price_lags() {
        let mut m = FvmModel::new(FvmParams::default()).unwrap();
        let before = m.state().n.clone();
        m.run_until(2.0);
        for (a, b) in before.iter().zip(&m.state().n) {
            assert!(b > a);
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(
            FvmModel::new(FvmParams {
                initial: vec![],
                ..Default::default()
            })
            .err(),
            Some(FvmError::NoGroups)
        );
        assert!(FvmModel::new(FvmParams {
            gamma: 1.0,
            ..Default::default()
        })
        .is_err());
        assert!(FvmModel::new(FvmParams {
            sigma: -1.0,
            ..Default::default()
        })
        .is_err());
    }
}
