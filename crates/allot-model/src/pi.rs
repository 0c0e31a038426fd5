//! A PI controller in velocity (incremental) form, and the ordered split of its output
//! over several throttled classes.
//!
//! Kernel-support-for-open-QoS paper, section 4.1: hold the premium class's mean delay at
//! a set point by moving the basic class's accept rate. DESIGN.md gives the law:
//! `u(k) = u(k−1) + Kp·(e(k) − e(k−1)) + Ki·T·e(k)`, with `e = setpoint − measured`.
//!
//! Velocity form keeps no separate integral: the output *is* the integrator, so clamping
//! the output to `[min, max]` is the anti-windup — a saturated controller starts moving
//! back as soon as the error changes sign instead of unwinding a stored integral.
//! The controller reports whether the last step was clipped so the shell can log it.

use thiserror::Error;

/// A constructor argument out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PiError {
    /// Bounds must be finite with `min ≤ max`.
    #[error("pi bounds must be finite with min <= max, got min {min} max {max}")]
    Bounds {
        /// The lower bound given.
        min: f64,
        /// The upper bound given.
        max: f64,
    },
    /// Gains must be finite; `kp ≥ 0`, `ki > 0` (a loop with no integral action cannot
    /// remove a steady error).
    #[error("pi gains must be finite with kp >= 0 and ki > 0, got kp {kp} ki {ki}")]
    Gains {
        /// Proportional gain given.
        kp: f64,
        /// Integral gain given.
        ki: f64,
    },
}

/// Gains and bounds of one PI controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PiConfig {
    /// Proportional gain: output units per error unit.
    pub kp: f64,
    /// Integral gain: output units per error unit per second.
    pub ki: f64,
    /// Lowest output.
    pub min: f64,
    /// Highest output.
    pub max: f64,
}

impl PiConfig {
    fn check(&self) -> Result<(), PiError> {
        if !(self.min.is_finite() && self.max.is_finite() && self.min <= self.max) {
            return Err(PiError::Bounds {
                min: self.min,
                max: self.max,
            });
        }
        if !(self.kp.is_finite() && self.ki.is_finite() && self.kp >= 0.0 && self.ki > 0.0) {
            return Err(PiError::Gains {
                kp: self.kp,
                ki: self.ki,
            });
        }
        Ok(())
    }
}

/// Which bound, if any, the last step ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saturation {
    /// Inside the bounds.
    None,
    /// Clipped at the lower bound.
    Low,
    /// Clipped at the upper bound.
    High,
}

/// A PI controller in velocity form with a clamped output.
#[derive(Debug, Clone, PartialEq)]
pub struct Pi {
    config: PiConfig,
    output: f64,
    last_error: Option<f64>,
    saturation: Saturation,
}

impl Pi {
    /// A controller whose output starts at `initial` (clamped into the bounds; non-finite
    /// starts at `max`).
    pub fn new(config: PiConfig, initial: f64) -> Result<Pi, PiError> {
        config.check()?;
        let initial = if initial.is_finite() {
            initial
        } else {
            config.max
        };
        Ok(Pi {
            config,
            output: initial.clamp(config.min, config.max),
            last_error: None,
            saturation: Saturation::None,
        })
    }

    /// One step with error `e = setpoint − measured` after `dt_s` seconds; returns the new
    /// output. A non-finite error or interval leaves everything unchanged.
    pub fn update(&mut self, error: f64, dt_s: f64) -> f64 {
        if !(error.is_finite() && dt_s.is_finite() && dt_s >= 0.0) {
            return self.output;
        }
        // The first step has no previous error: no proportional kick.
        let de = self.last_error.map_or(0.0, |last| error - last);
        self.last_error = Some(error);
        let next = self.output + self.config.kp * de + self.config.ki * dt_s * error;
        self.saturation = if next < self.config.min {
            Saturation::Low
        } else if next > self.config.max {
            Saturation::High
        } else {
            Saturation::None
        };
        // Clamping the output is the anti-windup: nothing else accumulates.
        self.output = next.clamp(self.config.min, self.config.max);
        self.output
    }

    /// Moves the output to `value` (clamped), keeping the error history: used to jump out
    /// of a range where the actuator has no effect (a rate above what is offered).
    pub fn set_output(&mut self, value: f64) {
        if value.is_finite() {
            self.output = value.clamp(self.config.min, self.config.max);
        }
    }

    /// Replaces gains and bounds, keeping the output (clamped into the new bounds).
    pub fn retune(&mut self, config: PiConfig) -> Result<(), PiError> {
        config.check()?;
        self.config = config;
        self.output = self.output.clamp(config.min, config.max);
        Ok(())
    }

    /// The current output.
    pub fn output(&self) -> f64 {
        self.output
    }

    /// Whether the last step was clipped, and at which bound.
    pub fn saturation(&self) -> Saturation {
        self.saturation
    }

    /// The configuration in force.
    pub fn config(&self) -> PiConfig {
        self.config
    }
}

/// One throttled class in an ordered split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    /// The lowest rate it is ever given.
    pub min: f64,
    /// The highest rate it is ever given.
    pub max: f64,
    /// What it offers now (arrivals per second); a rate above this has no effect.
    pub offered: f64,
}

/// Splits a total rate over classes throttled in order (the first in `classes` is cut
/// first, the last is cut last), as the paper's generalisation to several classes
/// suggests: throttling is applied in a stated order until the deadlines are met.
///
/// Every class gets at least its `min`. What is left is handed out from the *last* class
/// backwards: first up to what each offers (times `headroom`), then up to its `max`. So
/// reducing the total takes from the first class until it is at its minimum, then from
/// the next. The rates sum to `total` clamped into `[Σ min, Σ max]`.
pub fn split_ordered(total: f64, classes: &[Throttled], headroom: f64) -> Vec<f64> {
    let mut rates: Vec<f64> = classes.iter().map(|c| c.min).collect();
    let floor: f64 = rates.iter().sum();
    let mut left = if total.is_finite() {
        (total - floor).max(0.0)
    } else {
        0.0
    };
    let useful = |c: &Throttled| (c.offered * headroom).clamp(c.min, c.max);
    for cap in [&useful as &dyn Fn(&Throttled) -> f64, &|c: &Throttled| {
        c.max
    }] {
        for (i, c) in classes.iter().enumerate().rev() {
            let give = (cap(c) - rates[i]).max(0.0).min(left);
            rates[i] += give;
            left -= give;
        }
    }
    rates
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pi(kp: f64, ki: f64, min: f64, max: f64, initial: f64) -> Pi {
        Pi::new(PiConfig { kp, ki, min, max }, initial).unwrap()
    }

    #[test]
    fn velocity_form_by_value() {
        let mut c = pi(2.0, 0.5, 0.0, 1000.0, 100.0);
        // First step: no previous error, only integral: 100 + 0.5·1·(−10) = 95.
        assert_eq!(c.update(-10.0, 1.0), 95.0);
        // Second: 95 + 2·(−4 − −10) + 0.5·1·(−4) = 95 + 12 − 2 = 105.
        assert_eq!(c.update(-4.0, 1.0), 105.0);
        assert_eq!(c.saturation(), Saturation::None);
    }

    #[test]
    fn clamps_and_unwinds_at_once() {
        let mut c = pi(0.0, 1.0, 0.0, 10.0, 5.0);
        for _ in 0..100 {
            c.update(-50.0, 1.0);
        }
        assert_eq!(c.output(), 0.0);
        assert_eq!(c.saturation(), Saturation::Low);
        // No stored integral: one step of positive error moves it up straight away.
        assert_eq!(c.update(3.0, 1.0), 3.0);
        assert_eq!(c.saturation(), Saturation::None);
    }

    #[test]
    fn ignores_non_finite_input() {
        let mut c = pi(1.0, 1.0, 0.0, 10.0, 5.0);
        assert_eq!(c.update(f64::NAN, 1.0), 5.0);
        assert_eq!(c.update(1.0, f64::INFINITY), 5.0);
    }

    #[test]
    fn rejects_bad_config() {
        assert!(Pi::new(
            PiConfig {
                kp: 1.0,
                ki: 0.0,
                min: 0.0,
                max: 1.0
            },
            0.0
        )
        .is_err());
        assert!(Pi::new(
            PiConfig {
                kp: 1.0,
                ki: 1.0,
                min: 2.0,
                max: 1.0
            },
            0.0
        )
        .is_err());
    }

    #[test]
    fn holds_a_simple_plant_at_its_set_point() {
        // Plant: the held class's delay grows with the other's rate: delay = rate − 100
        // (ms); set point 50 → rate 150.
        let mut c = pi(0.2, 0.5, 0.0, 300.0, 300.0);
        let mut delay = 200.0;
        for _ in 0..200 {
            let rate = c.update(50.0 - delay, 1.0);
            delay = rate - 100.0;
        }
        assert!((c.output() - 150.0).abs() < 1e-6, "{}", c.output());
    }

    #[test]
    fn split_cuts_the_first_class_first() {
        let a = Throttled {
            min: 1.0,
            max: 100.0,
            offered: 50.0,
        };
        let b = Throttled {
            min: 2.0,
            max: 100.0,
            offered: 40.0,
        };
        // Plenty: both get what they offer, the rest goes to the last one up to its max.
        assert_eq!(split_ordered(90.0, &[a, b], 1.0), vec![50.0, 40.0]);
        assert_eq!(split_ordered(150.0, &[a, b], 1.0), vec![50.0, 100.0]);
        // Less: the first class is cut first, down to its minimum.
        assert_eq!(split_ordered(60.0, &[a, b], 1.0), vec![20.0, 40.0]);
        assert_eq!(split_ordered(30.0, &[a, b], 1.0), vec![1.0, 29.0]);
        assert_eq!(split_ordered(0.0, &[a, b], 1.0), vec![1.0, 2.0]);
    }

    proptest! {
        #[test]
        fn output_stays_in_bounds(errors in prop::collection::vec(-1e4f64..1e4, 1..100),
                                  kp in 0.0f64..10.0, ki in 0.001f64..10.0) {
            let mut c = pi(kp, ki, 5.0, 500.0, 100.0);
            for e in errors {
                let u = c.update(e, 0.5);
                prop_assert!((5.0..=500.0).contains(&u));
            }
        }

        #[test]
        fn split_sums_to_the_clamped_total(total in -10.0f64..1000.0,
                                           cls in prop::collection::vec((0.0f64..20.0, 0.0f64..200.0, 0.0f64..300.0), 1..5)) {
            let classes: Vec<Throttled> = cls.iter().map(|&(min, extra, offered)| Throttled { min, max: min + extra, offered }).collect();
            let rates = split_ordered(total, &classes, 1.2);
            let lo: f64 = classes.iter().map(|c| c.min).sum();
            let hi: f64 = classes.iter().map(|c| c.max).sum();
            let sum: f64 = rates.iter().sum();
            prop_assert!((sum - total.clamp(lo, hi)).abs() < 1e-6);
            for (r, c) in rates.iter().zip(&classes) {
                prop_assert!(*r >= c.min - 1e-9 && *r <= c.max + 1e-9);
            }
        }
    }
}
