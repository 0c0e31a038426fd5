//! Envoy's gradient rule for an adaptive concurrency limit (the `adaptive_concurrency`
//! filter's gradient controller), offered beside AIMD so the two can be compared.
//!
//! Every sampling window the caller passes the window's sample latency (Envoy uses the
//! p50 of the requests completed in it). With `B = buffer · minRTT`:
//! `gradient = clamp((minRTT + B) / sample, 0.5, 2)`,
//! `L' = gradient · L`, then `L = L' + √L'` (the headroom lets the limit grow when
//! latency is flat), clamped to `[min_limit, max_limit]`.
//!
//! minRTT is *measured*, not guessed: the limit is pinned to `min_concurrency`, and once
//! [`MEASURE_WINDOWS`] windows in a row have run with no more than that in flight (the
//! requests admitted under the old limit have drained), the smallest of their samples
//! becomes minRTT (a slow straggler from before cannot set it). A measurement happens at
//! the start, every `recalc_every` windows, and after the limit has sat at its minimum for
//! 5 windows in a row (as Envoy does, so a stale minRTT cannot pin the limit down).

use thiserror::Error;

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum GradientError {
    /// Bounds must satisfy `1 ≤ min_concurrency`, `1 ≤ min_limit ≤ max_limit`, finite.
    #[error("gradient bounds must be finite with 1 <= min_limit <= max_limit and min_concurrency >= 1, got min_limit {min_limit} max_limit {max_limit} min_concurrency {min_concurrency}")]
    Bounds {
        /// Lowest limit given.
        min_limit: f64,
        /// Highest limit given.
        max_limit: f64,
        /// Pinned limit while measuring, given.
        min_concurrency: f64,
    },
    /// The buffer must be a finite fraction ≥ 0.
    #[error("gradient buffer must be a finite number >= 0, got {0}")]
    Buffer(f64),
    /// The recalculation interval must be at least 2 windows.
    #[error("gradient recalculation interval must be at least 2 windows, got {0}")]
    Interval(u32),
}

/// Parameters of the gradient rule (Envoy's defaults where it has them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientConfig {
    /// Lowest limit outside measurements.
    pub min_limit: f64,
    /// Highest limit.
    pub max_limit: f64,
    /// The limit while minRTT is measured (Envoy: 3).
    pub min_concurrency: f64,
    /// Tolerated latency above minRTT, as a fraction of it (Envoy: 0.25).
    pub buffer: f64,
    /// Windows between minRTT measurements.
    pub recalc_every: u32,
}

impl Default for GradientConfig {
    fn default() -> Self {
        GradientConfig {
            min_limit: 1.0,
            max_limit: 1000.0,
            min_concurrency: 3.0,
            buffer: 0.25,
            recalc_every: 100,
        }
    }
}

/// Drained windows whose samples make one minRTT measurement.
pub const MEASURE_WINDOWS: u32 = 3;

/// Windows at the minimum limit after which minRTT is measured again.
const AT_MIN_WINDOWS: u32 = 5;

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradientPhase {
    /// The limit is pinned to `min_concurrency`; this window's sample becomes minRTT.
    Measuring,
    /// The gradient rule moves the limit.
    Adjusting,
}

/// The gradient controller.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    config: GradientConfig,
    limit: f64,
    /// The limit to go back to after a measurement.
    resume_at: f64,
    min_rtt: Option<f64>,
    phase: GradientPhase,
    since_measure: u32,
    at_min: u32,
    last_gradient: f64,
    /// Measuring: the current window started with no more than `min_concurrency` in flight.
    drained: bool,
    /// Measuring: drained windows with a sample so far, and their smallest sample.
    clean: (u32, f64),
}

impl Gradient {
    /// A controller that first measures minRTT, then starts from `initial`.
    pub fn new(config: GradientConfig, initial: f64) -> Result<Gradient, GradientError> {
        let GradientConfig {
            min_limit,
            max_limit,
            min_concurrency,
            buffer,
            recalc_every,
        } = config;
        if !(min_limit.is_finite()
            && max_limit.is_finite()
            && min_concurrency.is_finite()
            && min_limit >= 1.0
            && min_limit <= max_limit
            && min_concurrency >= 1.0)
        {
            return Err(GradientError::Bounds {
                min_limit,
                max_limit,
                min_concurrency,
            });
        }
        if !(buffer.is_finite() && buffer >= 0.0) {
            return Err(GradientError::Buffer(buffer));
        }
        if recalc_every < 2 {
            return Err(GradientError::Interval(recalc_every));
        }
        let start = if initial.is_finite() {
            initial.clamp(min_limit, max_limit)
        } else {
            min_limit
        };
        Ok(Gradient {
            config,
            limit: min_concurrency.min(max_limit),
            resume_at: start,
            min_rtt: None,
            phase: GradientPhase::Measuring,
            since_measure: 0,
            at_min: 0,
            last_gradient: 1.0,
            drained: false,
            clean: (0, f64::INFINITY),
        })
    }

    /// Closes a sampling window whose sample latency was `sample` (`None` when no request
    /// completed), with `in_flight` requests outstanding at its end, and returns the limit
    /// for the next window.
    pub fn end_window(&mut self, sample: Option<f64>, in_flight: f64) -> f64 {
        let sample = sample.filter(|s| s.is_finite() && *s > 0.0);
        match self.phase {
            GradientPhase::Measuring => {
                // Measuring → Adjusting once a whole window ran at the pinned concurrency
                // and produced a sample; until then keep measuring.
                let was_drained = self.drained;
                self.drained = in_flight <= self.config.min_concurrency;
                match (sample, was_drained && self.drained) {
                    (Some(s), true) => self.clean = (self.clean.0 + 1, self.clean.1.min(s)),
                    (_, false) => self.clean = (0, f64::INFINITY),
                    (None, true) => {}
                }
                if self.clean.0 >= MEASURE_WINDOWS {
                    self.min_rtt = Some(self.clean.1);
                    self.clean = (0, f64::INFINITY);
                    self.phase = GradientPhase::Adjusting;
                    self.since_measure = 0;
                    self.at_min = 0;
                    self.limit = self.resume_at;
                }
            }
            GradientPhase::Adjusting => {
                self.since_measure += 1;
                if let (Some(s), Some(min_rtt)) = (sample, self.min_rtt) {
                    let buffered = min_rtt * (1.0 + self.config.buffer);
                    let gradient = (buffered / s).clamp(0.5, 2.0);
                    self.last_gradient = gradient;
                    let scaled = gradient * self.limit;
                    self.limit = (scaled + scaled.max(0.0).sqrt())
                        .clamp(self.config.min_limit, self.config.max_limit);
                }
                // "At the minimum" as the dispatcher sees it: the whole-number limit.
                self.at_min = if self.limit.floor() <= self.config.min_limit {
                    self.at_min + 1
                } else {
                    0
                };
                // Adjusting → Measuring: periodically, or when stuck at the minimum.
                if self.since_measure >= self.config.recalc_every || self.at_min >= AT_MIN_WINDOWS {
                    self.phase = GradientPhase::Measuring;
                    self.drained = false;
                    self.resume_at = self.limit;
                    self.limit = self.config.min_concurrency.min(self.config.max_limit);
                }
            }
        }
        self.limit
    }

    /// The limit in force.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The measured minRTT, once known.
    pub fn min_rtt(&self) -> Option<f64> {
        self.min_rtt
    }

    /// The last gradient applied (1 before any).
    pub fn gradient(&self) -> f64 {
        self.last_gradient
    }

    /// Measuring or adjusting.
    pub fn phase(&self) -> GradientPhase {
        self.phase
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> GradientConfig {
        GradientConfig {
            min_limit: 1.0,
            max_limit: 100.0,
            min_concurrency: 3.0,
            buffer: 0.25,
            recalc_every: 50,
        }
    }

    #[test]
    fn measures_first_then_applies_the_rule() {
        let mut g = Gradient::new(cfg(), 10.0).unwrap();
        assert_eq!(g.phase(), GradientPhase::Measuring);
        assert_eq!(g.limit(), 3.0);
        // No sample: keep measuring.
        // Not yet whole windows at the pinned concurrency, or no sample: keep measuring.
        assert_eq!(g.end_window(Some(10.0), 0.0), 3.0);
        assert_eq!(g.end_window(None, 0.0), 3.0);
        assert_eq!(g.end_window(Some(12.0), 0.0), 3.0);
        assert_eq!(g.end_window(Some(10.0), 0.0), 3.0);
        assert_eq!(g.end_window(Some(11.0), 0.0), 10.0);
        assert_eq!(g.min_rtt(), Some(10.0));
        // Sample equal to minRTT: gradient 1.25 → 12.5 + √12.5.
        let l = g.end_window(Some(10.0), 0.0);
        assert!((l - (12.5 + 12.5f64.sqrt())).abs() < 1e-9, "{l}");
        // Sample at 4× minRTT: gradient clamps at 0.5.
        let before = g.limit();
        let l = g.end_window(Some(40.0), 0.0);
        let scaled = before * 0.5;
        assert!((l - (scaled + scaled.sqrt())).abs() < 1e-9);
    }

    #[test]
    fn settles_where_latency_balances_headroom() {
        // Plant: latency = 10 ms up to 8 in flight, then grows linearly.
        let mut g = Gradient::new(cfg(), 5.0).unwrap();
        let mut limit = g.limit();
        for _ in 0..45 {
            let latency = 10.0 * (limit / 8.0).max(1.0);
            limit = g.end_window(Some(latency), 0.0);
        }
        // Fixed point: 1.25·8/L · L + √(10) ≈ 13.2.
        assert!(limit > 10.0 && limit < 16.0, "{limit}");
    }

    #[test]
    fn remeasures_when_stuck_at_the_minimum() {
        let mut g = Gradient::new(cfg(), 1.0).unwrap();
        for _ in 0..=MEASURE_WINDOWS {
            g.end_window(Some(10.0), 0.0);
        }
        for _ in 0..AT_MIN_WINDOWS {
            g.end_window(Some(1000.0), 0.0);
        }
        assert_eq!(g.phase(), GradientPhase::Measuring);
        assert_eq!(g.limit(), 3.0);
        // Requests admitted under the old limit are still out: their slow samples must
        // not become minRTT.
        g.end_window(Some(900.0), 20.0);
        g.end_window(Some(800.0), 2.0);
        g.end_window(Some(700.0), 2.0);
        g.end_window(Some(50.0), 3.0);
        assert_eq!(g.min_rtt(), Some(10.0));
        g.end_window(Some(60.0), 3.0);
        assert_eq!(g.min_rtt(), Some(50.0));
        assert_eq!(g.phase(), GradientPhase::Adjusting);
    }

    #[test]
    fn rejects_bad_config() {
        assert!(Gradient::new(
            GradientConfig {
                min_limit: 0.0,
                ..cfg()
            },
            1.0
        )
        .is_err());
        assert!(Gradient::new(
            GradientConfig {
                buffer: -1.0,
                ..cfg()
            },
            1.0
        )
        .is_err());
        assert!(Gradient::new(
            GradientConfig {
                recalc_every: 1,
                ..cfg()
            },
            1.0
        )
        .is_err());
    }

    proptest! {
        #[test]
        fn limit_stays_in_bounds(samples in prop::collection::vec(prop::option::of(0.001f64..1e5), 1..200)) {
            let mut g = Gradient::new(cfg(), 20.0).unwrap();
            for s in samples {
                let l = g.end_window(s, 0.0);
                prop_assert!((1.0..=100.0).contains(&l));
            }
        }
    }
}
