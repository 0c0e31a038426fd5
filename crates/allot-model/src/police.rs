//! Policing (FVM paper section 4): a group sharing the machine is expected to back off
//! when the slowdown signal says congested, as AIMD prescribes. One whose demand does not
//! fall within N periods of a congested signal is unfriendly: it is capped until the
//! machine has been uncongested for M periods, then released on probation and watched
//! again.
//!
//! Demand is what the group asks for in a period — the mean number of its runnable tasks
//! — measured by the caller. "Falls" means to at most `fall` times the demand at the
//! onset of congestion (a friendly AIMD group cuts by its factor, 1/1.5 by default).

use thiserror::Error;

/// A constructor argument out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PoliceError {
    /// The grace must be at least one period.
    #[error("policing grace must be at least 1 period, got {0}")]
    Grace(u32),
    /// The required fall must be in (0, 1).
    #[error("policing fall must be in (0, 1), got {0}")]
    Fall(f64),
    /// The release must be at least one period.
    #[error("policing release must be at least 1 period, got {0}")]
    Release(u32),
}

/// How a group is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoliceConfig {
    /// Periods after a congested one within which demand must fall (N).
    pub grace_periods: u32,
    /// Demand must fall to at most this fraction of its value at the onset.
    pub fall: f64,
    /// Uncongested periods in a row after which a capped group is released (M).
    pub release_periods: u32,
}

impl PoliceConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), PoliceError> {
        if self.grace_periods == 0 {
            return Err(PoliceError::Grace(self.grace_periods));
        }
        if !(self.fall > 0.0 && self.fall < 1.0) {
            return Err(PoliceError::Fall(self.fall));
        }
        if self.release_periods == 0 {
            return Err(PoliceError::Release(self.release_periods));
        }
        Ok(())
    }
}

/// What the policer concluded in a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Nothing to hold against the group.
    Friendly,
    /// Waiting for its demand to fall: `waited` periods since the congested one.
    Watching {
        /// Periods waited so far.
        waited: u32,
    },
    /// It did not back off: capped. `onset_demand` is the demand it kept.
    Unfriendly {
        /// The demand at the onset of the congestion it ignored.
        onset_demand: f64,
        /// True in the period it was first found unfriendly.
        newly: bool,
    },
}

/// One group's policer.
#[derive(Debug, Clone)]
pub struct Policer {
    config: PoliceConfig,
    /// (periods waited, demand at the onset).
    onset: Option<(u32, f64)>,
    capped: Option<f64>,
    calm: u32,
    /// Periods the group has spent capped.
    pub capped_periods: u64,
    /// Times the group was found unfriendly.
    pub offences: u64,
}

impl Policer {
    /// A policer that has nothing against the group yet.
    pub fn new(config: PoliceConfig) -> Result<Policer, PoliceError> {
        config.validate()?;
        Ok(Policer {
            config,
            onset: None,
            capped: None,
            calm: 0,
            capped_periods: 0,
            offences: 0,
        })
    }

    /// Whether the group is capped now.
    pub fn is_capped(&self) -> bool {
        self.capped.is_some()
    }

    /// One period ended: whether the signal said congested, and the group's demand over
    /// the period (ignored while capped: its demand is then allot's doing).
    pub fn update(&mut self, congested: bool, demand: f64) -> Verdict {
        if let Some(onset_demand) = self.capped {
            self.capped_periods += 1;
            if congested {
                self.calm = 0;
            } else {
                self.calm += 1;
                if self.calm >= self.config.release_periods {
                    self.capped = None;
                    self.calm = 0;
                    return Verdict::Friendly;
                }
            }
            return Verdict::Unfriendly {
                onset_demand,
                newly: false,
            };
        }
        match self.onset {
            None => {
                if congested && demand > 0.0 {
                    self.onset = Some((0, demand));
                    return Verdict::Watching { waited: 0 };
                }
                Verdict::Friendly
            }
            Some((waited, d0)) => {
                if demand <= self.config.fall * d0 {
                    // It backed off. A congestion that goes on is a new onset.
                    self.onset = (congested && demand > 0.0).then_some((0, demand));
                    return match self.onset {
                        Some(_) => Verdict::Watching { waited: 0 },
                        None => Verdict::Friendly,
                    };
                }
                let waited = waited + 1;
                if waited >= self.config.grace_periods {
                    self.onset = None;
                    self.capped = Some(d0);
                    self.calm = 0;
                    self.offences += 1;
                    return Verdict::Unfriendly {
                        onset_demand: d0,
                        newly: true,
                    };
                }
                self.onset = Some((waited, d0));
                Verdict::Watching { waited }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policer() -> Policer {
        Policer::new(PoliceConfig {
            grace_periods: 3,
            fall: 0.9,
            release_periods: 2,
        })
        .unwrap()
    }

    #[test]
    fn a_group_that_backs_off_stays_friendly() {
        let mut p = policer();
        assert_eq!(p.update(false, 8.0), Verdict::Friendly);
        assert_eq!(p.update(true, 8.0), Verdict::Watching { waited: 0 });
        assert_eq!(p.update(true, 7.5), Verdict::Watching { waited: 1 });
        // Cut by 1.5 within the grace: friendly (and the signal has cleared).
        assert_eq!(p.update(false, 5.3), Verdict::Friendly);
        assert!(!p.is_capped());
        assert_eq!(p.offences, 0);
    }

    #[test]
    fn a_group_that_ignores_the_signal_is_capped_within_n_periods_then_released() {
        let mut p = policer();
        assert_eq!(p.update(true, 4.0), Verdict::Watching { waited: 0 });
        assert_eq!(p.update(true, 4.0), Verdict::Watching { waited: 1 });
        assert_eq!(p.update(true, 4.0), Verdict::Watching { waited: 2 });
        assert_eq!(
            p.update(true, 4.0),
            Verdict::Unfriendly {
                onset_demand: 4.0,
                newly: true
            }
        );
        assert!(p.is_capped());
        // Capped: its demand no longer counts; released after two calm periods.
        assert!(matches!(
            p.update(false, 1.0),
            Verdict::Unfriendly { newly: false, .. }
        ));
        assert!(matches!(p.update(true, 1.0), Verdict::Unfriendly { .. }));
        assert!(matches!(p.update(false, 1.0), Verdict::Unfriendly { .. }));
        assert_eq!(p.update(false, 4.0), Verdict::Friendly);
        assert!(!p.is_capped());
        assert_eq!((p.offences, p.capped_periods), (1, 4));
    }

    #[test]
    fn an_idle_group_is_never_judged_and_bad_configs_are_refused() {
        let mut p = policer();
        for _ in 0..10 {
            assert_eq!(p.update(true, 0.0), Verdict::Friendly);
        }
        let bad = |g, f, r| {
            Policer::new(PoliceConfig {
                grace_periods: g,
                fall: f,
                release_periods: r,
            })
            .is_err()
        };
        assert!(bad(0, 0.9, 2) && bad(3, 1.0, 2) && bad(3, 0.0, 2) && bad(3, 0.9, 0));
    }
}
