//! Additive-increase / multiplicative-decrease on a limit (FVM paper section 2.3 and
//! table 1): not congested → `L += a`; congested → `L /= b`; always within [min, max].
//!
//! [`Aimd`] is the generic controller (a concurrency limit, a rate, a number of running
//! processes). [`MplOrRate`] is the FVM controller of section 2.2: AIMD on the
//! multiprogramming level, and once that level is down to one, AIMD on a duty cycle.

use thiserror::Error;

/// A constructor argument out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AimdError {
    /// Bounds must be finite with `0 ≤ min ≤ max`.
    #[error("aimd bounds must be finite with 0 <= min <= max, got min {min} max {max}")]
    Bounds {
        /// The lower bound given.
        min: f64,
        /// The upper bound given.
        max: f64,
    },
    /// The additive step must be finite and > 0.
    #[error("aimd additive increase must be a finite number > 0, got {0}")]
    Increase(f64),
    /// The multiplicative factor must be finite and > 1.
    #[error("aimd multiplicative decrease factor must be a finite number > 1, got {0}")]
    Decrease(f64),
    /// The duty cycle floor must be in (0, 1].
    #[error("minimum duty cycle must be in (0, 1], got {0}")]
    MinDuty(f64),
}

/// Parameters of one AIMD controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AimdConfig {
    /// Lowest limit.
    pub min: f64,
    /// Highest limit.
    pub max: f64,
    /// Added when not congested (`a`, default 1).
    pub increase: f64,
    /// Divides the limit when congested (`b`, default 1.5).
    pub decrease: f64,
}

impl AimdConfig {
    fn check(&self) -> Result<(), AimdError> {
        if !(self.min.is_finite()
            && self.max.is_finite()
            && self.min >= 0.0
            && self.min <= self.max)
        {
            return Err(AimdError::Bounds {
                min: self.min,
                max: self.max,
            });
        }
        if !(self.increase.is_finite() && self.increase > 0.0) {
            return Err(AimdError::Increase(self.increase));
        }
        if !(self.decrease.is_finite() && self.decrease > 1.0) {
            return Err(AimdError::Decrease(self.decrease));
        }
        Ok(())
    }
}

/// AIMD on one limit, clamped to its bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    config: AimdConfig,
    limit: f64,
}

impl Aimd {
    /// A controller starting at `initial` (clamped into the bounds).
    pub fn new(config: AimdConfig, initial: f64) -> Result<Aimd, AimdError> {
        config.check()?;
        let initial = if initial.is_finite() {
            initial
        } else {
            config.max
        };
        Ok(Aimd {
            config,
            limit: initial.clamp(config.min, config.max),
        })
    }

    /// Applies one period's verdict and returns the new limit.
    pub fn update(&mut self, congested: bool) -> f64 {
        let next = if congested {
            self.limit / self.config.decrease
        } else {
            self.limit + self.config.increase
        };
        self.limit = next.clamp(self.config.min, self.config.max);
        self.limit
    }

    /// Sets the limit (clamped into the bounds); non-finite values are ignored.
    pub fn set_limit(&mut self, limit: f64) {
        if limit.is_finite() {
            self.limit = limit.clamp(self.config.min, self.config.max);
        }
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The configuration.
    pub fn config(&self) -> AimdConfig {
        self.config
    }
}

/// Which knob [`MplOrRate`] is turning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Limiting how many members run at once.
    Mpl,
    /// One member runs, for a fraction of each period.
    Rate,
}

/// What the actuator should enforce for the next period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MplDecision {
    /// The knob in use.
    pub mode: Mode,
    /// Members allowed to run at once (≥ 1).
    pub running: usize,
    /// Fraction of the period they may run, in (0, 1]; 1 in MPL mode.
    pub duty: f64,
    /// The combined limit `running · duty`, for reports and fairness.
    pub effective: f64,
}

/// The FVM controller (section 2.2, table 1): AIMD on the multiprogramming level in
/// `[1, max_running]` with steps `a_mpl`, `b`; when a decrease would take it below one,
/// switch to AIMD on the duty cycle in `[min_duty, 1]` with steps `a_rate`, `b`; when the
/// duty cycle is back at 1 and still not congested, return to MPL control.
#[derive(Debug, Clone, PartialEq)]
pub struct MplOrRate {
    mpl: Aimd,
    duty: Aimd,
    mode: Mode,
}

impl MplOrRate {
    /// A controller starting at `initial_running` members (clamped to `[1, max_running]`).
    /// `mpl_increase` and `rate_increase` are the additive steps, `decrease` the shared
    /// multiplicative factor, `min_duty` the lowest duty cycle.
    pub fn new(
        max_running: usize,
        initial_running: f64,
        mpl_increase: f64,
        rate_increase: f64,
        decrease: f64,
        min_duty: f64,
    ) -> Result<MplOrRate, AimdError> {
        if !(min_duty.is_finite() && min_duty > 0.0 && min_duty <= 1.0) {
            return Err(AimdError::MinDuty(min_duty));
        }
        let mpl = Aimd::new(
            AimdConfig {
                min: 1.0,
                max: max_running.max(1) as f64,
                increase: mpl_increase,
                decrease,
            },
            initial_running,
        )?;
        let duty = Aimd::new(
            AimdConfig {
                min: min_duty,
                max: 1.0,
                increase: rate_increase,
                decrease,
            },
            1.0,
        )?;
        Ok(MplOrRate {
            mpl,
            duty,
            mode: Mode::Mpl,
        })
    }

    /// Applies one period's verdict.
    pub fn update(&mut self, congested: bool) -> MplDecision {
        match self.mode {
            Mode::Mpl => {
                // Going below one member is the switch to rate control (section 2.2).
                if congested && self.mpl.limit() / self.mpl.config().decrease < 1.0 {
                    self.mode = Mode::Rate;
                    self.mpl.set_limit(1.0);
                    self.duty.set_limit(1.0);
                    self.duty.update(true);
                } else {
                    self.mpl.update(congested);
                }
            }
            Mode::Rate => {
                // Back to MPL control once the duty cycle is full and there is room.
                if !congested && self.duty.limit() >= 1.0 {
                    self.mode = Mode::Mpl;
                    self.mpl.update(false);
                } else {
                    self.duty.update(congested);
                }
            }
        }
        self.decision()
    }

    /// The decision in force.
    pub fn decision(&self) -> MplDecision {
        match self.mode {
            Mode::Mpl => {
                let running = self.mpl.limit().floor().max(1.0) as usize;
                MplDecision {
                    mode: Mode::Mpl,
                    running,
                    duty: 1.0,
                    effective: self.mpl.limit(),
                }
            }
            Mode::Rate => MplDecision {
                mode: Mode::Rate,
                running: 1,
                duty: self.duty.limit(),
                effective: self.duty.limit(),
            },
        }
    }

    /// Changes the largest number of members (the group grew or shrank).
    pub fn set_max_running(&mut self, max_running: usize) {
        self.mpl.config.max = max_running.max(1) as f64;
        let limit = self.mpl.limit;
        self.mpl.set_limit(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> AimdConfig {
        AimdConfig {
            min: 1.0,
            max: 10.0,
            increase: 1.0,
            decrease: 1.5,
        }
    }

    #[test]
    fn additive_increase_multiplicative_decrease() {
        let mut a = Aimd::new(cfg(), 3.0).unwrap();
        assert_eq!(a.update(false), 4.0);
        assert_eq!(a.update(true), 4.0 / 1.5);
    }

    #[test]
    fn clamped_to_bounds() {
        let mut a = Aimd::new(cfg(), 50.0).unwrap();
        assert_eq!(a.limit(), 10.0);
        assert_eq!(a.update(false), 10.0);
        for _ in 0..20 {
            a.update(true);
        }
        assert_eq!(a.limit(), 1.0);
    }

    #[test]
    fn constructor_checks_bounds() {
        assert!(matches!(
            Aimd::new(
                AimdConfig {
                    min: 5.0,
                    max: 1.0,
                    ..cfg()
                },
                1.0
            ),
            Err(AimdError::Bounds { .. })
        ));
        assert_eq!(
            Aimd::new(
                AimdConfig {
                    increase: 0.0,
                    ..cfg()
                },
                1.0
            ),
            Err(AimdError::Increase(0.0))
        );
        assert_eq!(
            Aimd::new(
                AimdConfig {
                    decrease: 1.0,
                    ..cfg()
                },
                1.0
            ),
            Err(AimdError::Decrease(1.0))
        );
        assert!(MplOrRate::new(4, 2.0, 1.0, 0.1, 1.5, 0.0).is_err());
    }

    #[test]
    fn mpl_switches_to_rate_at_one_and_back() {
        let mut c = MplOrRate::new(8, 1.2, 1.0, 0.1, 1.5, 0.05).unwrap();
        let d = c.update(true);
        assert_eq!(d.mode, Mode::Rate);
        assert_eq!(d.running, 1);
        assert!((d.duty - 1.0 / 1.5).abs() < 1e-12);
        let d = c.update(true);
        assert!((d.duty - 1.0 / 2.25).abs() < 1e-12);
        // Increase back to a full duty cycle, then one more quiet period returns to MPL.
        let mut d = d;
        for _ in 0..10 {
            d = c.update(false);
            if d.mode == Mode::Mpl {
                break;
            }
        }
        assert_eq!(d.mode, Mode::Mpl);
        assert_eq!(d.running, 2);
    }

    #[test]
    fn running_is_the_floor_of_the_limit() {
        let mut c = MplOrRate::new(8, 4.0, 1.0, 0.1, 1.5, 0.05).unwrap();
        let d = c.update(true);
        assert_eq!(d.running, 2); // 4 / 1.5 = 2.67
        assert_eq!(d.mode, Mode::Mpl);
        c.set_max_running(1);
        assert_eq!(c.decision().running, 1);
    }

    proptest! {
        #[test]
        fn limit_always_within_bounds(init in -5.0f64..50.0, steps in prop::collection::vec(any::<bool>(), 0..100)) {
            let mut a = Aimd::new(cfg(), init).unwrap();
            for s in steps {
                let l = a.update(s);
                prop_assert!((1.0..=10.0).contains(&l));
            }
        }

        #[test]
        fn mpl_or_rate_decisions_stay_valid(steps in prop::collection::vec(any::<bool>(), 0..200), max in 1usize..20) {
            let mut c = MplOrRate::new(max, 3.0, 1.0, 0.1, 1.5, 0.05).unwrap();
            for s in steps {
                let d = c.update(s);
                prop_assert!(d.running >= 1 && d.running <= max);
                prop_assert!(d.duty >= 0.05 - 1e-12 && d.duty <= 1.0);
                prop_assert!(d.mode == Mode::Mpl || d.running == 1);
            }
        }
    }
}
