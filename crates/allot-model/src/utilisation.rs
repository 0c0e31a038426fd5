//! Two-level utilisation control: content degradation, then admission control.
//!
//! Kernel-support-for-open-QoS paper, section 4.3: when the server's CPU use is above
//! its share, first divert more requests to a degraded variant; when everything is
//! diverted and it is still above, lower the accept rate; below the set point, undo in
//! the reverse order — raise the accept rate until nothing is refused, then divert less.
//!
//! Each level is a [`Pi`] in velocity form on its own knob (divert probability in
//! [0, 1]; accept rate in [min, max] per second), so each has gains that suit its own
//! plant gain. Only one level moves per period, chosen by the error's sign and where the
//! knobs are. Entering the rate level starts from what the class offers (a rate above the
//! offered one refuses nothing, so winding down from `max` would be dead time); leaving
//! it sets the rate to `max` (no throttling at all).

use crate::pi::{Pi, PiConfig, PiError};

/// Which knob is moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Diverting a fraction of requests to the degraded variant; no throttling.
    Divert,
    /// Everything diverted; the accept rate is below its maximum.
    Throttle,
}

impl Level {
    /// 0 for divert, 1 for throttle (for metrics).
    pub fn as_number(self) -> f64 {
        match self {
            Level::Divert => 0.0,
            Level::Throttle => 1.0,
        }
    }
}

/// Gains and bounds of the two levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilisationConfig {
    /// Target utilisation, in percent of one CPU.
    pub setpoint_percent: f64,
    /// Proportional gain of the divert level, probability per percentage point.
    pub divert_kp: f64,
    /// Integral gain of the divert level, probability per percentage point per second.
    pub divert_ki: f64,
    /// Proportional gain of the rate level, requests/s per percentage point.
    pub rate_kp: f64,
    /// Integral gain of the rate level, requests/s per percentage point per second.
    pub rate_ki: f64,
    /// Lowest accept rate, requests per second.
    pub min_rate_per_sec: f64,
    /// Highest accept rate (no throttling), requests per second.
    pub max_rate_per_sec: f64,
}

/// What one period's measurement says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilisationSample {
    /// Measured CPU use of the back end's processes, percent of one CPU.
    pub utilisation_percent: f64,
    /// Requests per second the class offered in the period (arrivals, before refusals).
    pub offered_per_sec: f64,
    /// Length of the period, seconds.
    pub dt_s: f64,
}

/// The knobs after a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilisationOutput {
    /// Probability of diverting a request to the degraded variant.
    pub divert: f64,
    /// Accept rate, requests per second (`max_rate_per_sec` when not throttling).
    pub rate_per_sec: f64,
    /// The level that moved.
    pub level: Level,
    /// Both knobs at their limit and the error still pushing (cannot do more).
    pub saturated: bool,
}

/// The two-level controller.
#[derive(Debug, Clone, PartialEq)]
pub struct Utilisation {
    setpoint: f64,
    divert: Pi,
    rate: Pi,
    level: Level,
    saturated: bool,
}

impl Utilisation {
    /// A controller diverting nothing and not throttling.
    pub fn new(config: UtilisationConfig) -> Result<Utilisation, PiError> {
        let (divert, rate) = Self::pis(&config)?;
        Ok(Utilisation {
            setpoint: config.setpoint_percent,
            divert: Pi::new(divert, 0.0)?,
            rate: Pi::new(rate, config.max_rate_per_sec)?,
            level: Level::Divert,
            saturated: false,
        })
    }

    fn pis(c: &UtilisationConfig) -> Result<(PiConfig, PiConfig), PiError> {
        if !c.setpoint_percent.is_finite() {
            return Err(PiError::Bounds {
                min: c.setpoint_percent,
                max: c.setpoint_percent,
            });
        }
        Ok((
            PiConfig {
                kp: c.divert_kp,
                ki: c.divert_ki,
                min: 0.0,
                max: 1.0,
            },
            PiConfig {
                kp: c.rate_kp,
                ki: c.rate_ki,
                min: c.min_rate_per_sec,
                max: c.max_rate_per_sec,
            },
        ))
    }

    /// Replaces gains, bounds and set point, keeping the knobs where they are.
    pub fn retune(&mut self, config: UtilisationConfig) -> Result<(), PiError> {
        let (divert, rate) = Self::pis(&config)?;
        self.divert.retune(divert)?;
        self.rate.retune(rate)?;
        self.setpoint = config.setpoint_percent;
        Ok(())
    }

    /// One period: moves one level and returns both knobs.
    pub fn update(&mut self, sample: UtilisationSample) -> UtilisationOutput {
        let u = sample.utilisation_percent;
        if !(u.is_finite() && sample.dt_s.is_finite() && sample.dt_s > 0.0) {
            return self.output();
        }
        // Positive error: room to spare (undo); negative: over the share (act).
        let error = self.setpoint - u;
        let rate_max = self.rate.config().max;
        self.saturated = false;
        match self.level {
            Level::Divert => {
                if error < 0.0 && self.divert.output() >= 1.0 {
                    // Divert → Throttle: all diverted and still over. Start from the
                    // offered rate, where a cut starts to refuse requests.
                    self.level = Level::Throttle;
                    let offered = sample.offered_per_sec;
                    self.rate
                        .set_output(if offered > 0.0 { offered } else { rate_max });
                    self.rate.update(error, sample.dt_s);
                } else {
                    // The divert knob rises when over the set point: its error is reversed.
                    self.divert.update(-error, sample.dt_s);
                }
            }
            Level::Throttle => {
                let offered = sample.offered_per_sec;
                let released = self.rate.output() >= rate_max
                    || (error > 0.0 && self.rate.output() >= offered * 1.05);
                if released {
                    // Throttle → Divert: the rate refuses nothing any more; undo the
                    // divert level next.
                    self.level = Level::Divert;
                    self.rate.set_output(rate_max);
                    self.divert.update(-error, sample.dt_s);
                } else {
                    self.rate.update(error, sample.dt_s);
                    self.saturated = error < 0.0 && self.rate.output() <= self.rate.config().min;
                }
            }
        }
        self.output()
    }

    /// The knobs now.
    pub fn output(&self) -> UtilisationOutput {
        UtilisationOutput {
            divert: self.divert.output(),
            rate_per_sec: match self.level {
                Level::Divert => self.rate.config().max,
                Level::Throttle => self.rate.output(),
            },
            level: self.level,
            saturated: self.saturated,
        }
    }

    /// The set point, percent of one CPU.
    pub fn setpoint(&self) -> f64 {
        self.setpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> UtilisationConfig {
        UtilisationConfig {
            setpoint_percent: 30.0,
            divert_kp: 0.005,
            divert_ki: 0.01,
            rate_kp: 0.5,
            rate_ki: 1.0,
            min_rate_per_sec: 1.0,
            max_rate_per_sec: 1000.0,
        }
    }

    /// The paper's plant: full requests cost `full_ms` of CPU, degraded `lite_ms`.
    fn plant(offered: f64, out: &UtilisationOutput) -> f64 {
        let (full_ms, lite_ms) = (10.0, 2.5);
        let admitted = offered.min(out.rate_per_sec);
        admitted * ((1.0 - out.divert) * full_ms + out.divert * lite_ms) / 10.0
    }

    fn run(c: &mut Utilisation, offered: f64, periods: usize, trace: &mut Vec<UtilisationOutput>) {
        let mut out = c.output();
        for _ in 0..periods {
            let u = plant(offered, &out);
            out = c.update(UtilisationSample {
                utilisation_percent: u,
                offered_per_sec: offered,
                dt_s: 1.0,
            });
            trace.push(out);
        }
    }

    #[test]
    fn diverts_first_then_throttles_and_undoes_in_reverse() {
        let mut c = Utilisation::new(config()).unwrap();
        let mut trace = Vec::new();
        // 70/s: all full would be 70 %; diverting 76 % holds 30 %.
        run(&mut c, 70.0, 200, &mut trace);
        let o = c.output();
        assert_eq!(o.level, Level::Divert);
        assert!((plant(70.0, &o) - 30.0).abs() < 0.5, "{o:?}");
        assert_eq!(o.rate_per_sec, 1000.0);
        // 140/s: even all degraded is 35 %: divert everything, then throttle to 120/s.
        run(&mut c, 140.0, 200, &mut trace);
        let o = c.output();
        assert_eq!(o.level, Level::Throttle);
        assert_eq!(o.divert, 1.0);
        assert!((o.rate_per_sec - 120.0).abs() < 2.0, "{o:?}");
        // Divert reached 1 before the rate ever moved below its maximum.
        let first_throttle = trace.iter().position(|o| o.rate_per_sec < 1000.0).unwrap();
        assert!(trace[..first_throttle].iter().any(|o| o.divert >= 1.0));
        // Back to 70/s: the rate is released first, then less is diverted.
        let from = trace.len();
        run(&mut c, 70.0, 200, &mut trace);
        let o = c.output();
        assert_eq!(o.level, Level::Divert);
        assert!((plant(70.0, &o) - 30.0).abs() < 0.5, "{o:?}");
        let released = from
            + trace[from..]
                .iter()
                .position(|o| o.rate_per_sec >= 1000.0)
                .unwrap();
        assert!(trace[from..released].iter().all(|o| o.divert >= 1.0));
    }

    proptest! {
        #[test]
        fn knobs_stay_in_bounds(us in prop::collection::vec((0.0f64..200.0, 0.0f64..500.0), 1..100)) {
            let mut c = Utilisation::new(config()).unwrap();
            for (u, offered) in us {
                let o = c.update(UtilisationSample { utilisation_percent: u, offered_per_sec: offered, dt_s: 0.5 });
                prop_assert!((0.0..=1.0).contains(&o.divert));
                prop_assert!((1.0..=1000.0).contains(&o.rate_per_sec));
                // Throttling only ever happens with everything diverted.
                prop_assert!(o.rate_per_sec >= 1000.0 || o.divert >= 1.0);
            }
        }
    }
}
