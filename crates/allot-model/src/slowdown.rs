//! The slowdown signal of the FVM paper, section 2.1 eqs. 1–2: an EWMA of a latency
//! (the probe's run time, a request's latency), its minimum over the last `w` periods as
//! the baseline, and `R = EWMA / baseline`, congested when `R > H`.
//!
//! Generic over what the latency is: samples are plain numbers, periods are closed by the
//! caller with [`SlowdownSignal::end_period`] at a [`Nanos`] it chooses, so the gateway can
//! run it with millisecond periods and `allot adapt` with seconds.
//!
//! One deliberate difference from eq. 2: the baseline is the minimum over the window
//! *including* the period just closed, so a new low becomes the baseline at once and R is
//! never below 1. A caller may also add unloaded reference samples
//! ([`SlowdownSignal::record_baseline`]) that count towards the minimum only.

use std::collections::VecDeque;

use thiserror::Error;

use crate::ewma::{Ewma, EwmaError};
use crate::Nanos;

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SlowdownError {
    /// γ out of range.
    #[error(transparent)]
    Ewma(#[from] EwmaError),
    /// The window must hold at least one period.
    #[error("slowdown window must be at least one period, got {0}")]
    Window(usize),
    /// The threshold H must be finite and ≥ 1.
    #[error("slowdown threshold must be a finite number >= 1, got {0}")]
    Threshold(f64),
}

/// Parameters of the signal. Defaults are the FVM paper's table 1 (5 s period, 60 s
/// window → w = 12, γ = 0.3, H = 2.5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowdownConfig {
    /// Weight of each new sample in the EWMA.
    pub gamma: f64,
    /// Number of past periods over which the baseline minimum is taken.
    pub window_periods: usize,
    /// Congested when `R > threshold`.
    pub threshold: f64,
}

impl Default for SlowdownConfig {
    fn default() -> Self {
        SlowdownConfig {
            gamma: 0.3,
            window_periods: 12,
            threshold: 2.5,
        }
    }
}

/// What one period's end says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowdownReading {
    /// When the period was closed.
    pub at: Nanos,
    /// The EWMA of the samples so far (`None` before any sample).
    pub ewma: Option<f64>,
    /// The minimum over the window (`None` before any sample).
    pub baseline: Option<f64>,
    /// `ewma / baseline`, 1 when either is unknown.
    pub slowdown: f64,
    /// `slowdown > threshold`.
    pub congested: bool,
}

/// The slowdown signal: EWMA → windowed minimum → threshold.
#[derive(Debug, Clone)]
pub struct SlowdownSignal {
    config: SlowdownConfig,
    ewma: Ewma,
    /// Per closed period: the EWMA at its end and any baseline samples recorded in it.
    history: VecDeque<f64>,
    pending_baseline: Option<f64>,
    reference: Option<f64>,
}

impl SlowdownSignal {
    /// A signal with no samples yet.
    pub fn new(config: SlowdownConfig) -> Result<SlowdownSignal, SlowdownError> {
        let ewma = Ewma::new(config.gamma)?;
        if config.window_periods == 0 {
            return Err(SlowdownError::Window(0));
        }
        if !(config.threshold.is_finite() && config.threshold >= 1.0) {
            return Err(SlowdownError::Threshold(config.threshold));
        }
        Ok(SlowdownSignal {
            config,
            ewma,
            history: VecDeque::with_capacity(config.window_periods + 1),
            pending_baseline: None,
            reference: None,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> SlowdownConfig {
        self.config
    }

    /// Folds one latency sample into the EWMA (eq. 1).
    pub fn record(&mut self, sample: f64) {
        self.ewma.observe(sample);
    }

    /// Records an unloaded reference latency: it counts towards the baseline minimum of
    /// the current period, not towards the EWMA.
    pub fn record_baseline(&mut self, sample: f64) {
        if sample.is_finite() && sample > 0.0 {
            self.pending_baseline = Some(self.pending_baseline.map_or(sample, |b| b.min(sample)));
        }
    }

    /// Sets a standing reference latency (measured unloaded) that the baseline never
    /// exceeds, whatever the window holds; `None` removes it.
    pub fn set_reference(&mut self, reference: Option<f64>) {
        self.reference = reference.filter(|r| r.is_finite() && *r > 0.0);
    }

    /// Closes a period at `now`: pushes the EWMA into the window, drops the oldest, and
    /// returns `R` and whether it exceeds the threshold.
    pub fn end_period(&mut self, now: Nanos) -> SlowdownReading {
        let ewma = self.ewma.value();
        let entry = match (ewma, self.pending_baseline.take()) {
            (Some(e), Some(b)) => Some(e.min(b)),
            (e, b) => e.or(b),
        };
        if let Some(v) = entry {
            self.history.push_back(v);
            while self.history.len() > self.config.window_periods {
                self.history.pop_front();
            }
        }
        let baseline = self
            .history
            .iter()
            .cloned()
            .chain(self.reference)
            .reduce(f64::min);
        let slowdown = match (ewma, baseline) {
            (Some(e), Some(b)) if b > 0.0 => e / b,
            _ => 1.0,
        };
        SlowdownReading {
            at: now,
            ewma,
            baseline,
            slowdown,
            congested: slowdown > self.config.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signal(gamma: f64, w: usize, h: f64) -> SlowdownSignal {
        SlowdownSignal::new(SlowdownConfig {
            gamma,
            window_periods: w,
            threshold: h,
        })
        .unwrap()
    }

    #[test]
    fn steady_latency_is_not_congested() {
        let mut s = signal(0.3, 12, 2.5);
        for i in 0..20 {
            s.record(5.0);
            let r = s.end_period(Nanos::from_secs(5 * i));
            assert_eq!(r.slowdown, 1.0);
            assert!(!r.congested);
        }
    }

    #[test]
    fn a_jump_raises_r_until_it_leaves_the_window() {
        let mut s = signal(1.0, 3, 2.5);
        s.record(1.0);
        s.end_period(Nanos::from_secs(1));
        s.record(3.0);
        let r = s.end_period(Nanos::from_secs(2));
        assert_eq!(r.baseline, Some(1.0));
        assert!((r.slowdown - 3.0).abs() < 1e-12);
        assert!(r.congested);
        // Two more periods at 3: the 1 falls out of the 3-period window.
        s.record(3.0);
        s.end_period(Nanos::from_secs(3));
        s.record(3.0);
        let r = s.end_period(Nanos::from_secs(4));
        assert_eq!(r.baseline, Some(3.0));
        assert!(!r.congested);
    }

    #[test]
    fn baseline_samples_count_only_towards_the_minimum() {
        let mut s = signal(1.0, 4, 2.5);
        s.record_baseline(2.0);
        s.record(8.0);
        let r = s.end_period(Nanos::from_secs(1));
        assert_eq!(r.ewma, Some(8.0));
        assert_eq!(r.baseline, Some(2.0));
        assert!((r.slowdown - 4.0).abs() < 1e-12);
    }

    #[test]
    fn a_reference_caps_the_baseline_for_good() {
        let mut s = signal(1.0, 2, 2.5);
        s.set_reference(Some(1.0));
        for i in 0..10 {
            s.record(3.0);
            let r = s.end_period(Nanos::from_secs(i));
            assert_eq!(r.baseline, Some(1.0));
            assert!(r.congested);
        }
    }

    #[test]
    fn no_samples_means_no_congestion() {
        let mut s = signal(0.3, 2, 2.0);
        let r = s.end_period(Nanos::ZERO);
        assert_eq!(r.slowdown, 1.0);
        assert!(!r.congested);
    }

    #[test]
    fn rejects_bad_config() {
        assert!(SlowdownSignal::new(SlowdownConfig {
            window_periods: 0,
            ..Default::default()
        })
        .is_err());
        assert!(SlowdownSignal::new(SlowdownConfig {
            threshold: 0.5,
            ..Default::default()
        })
        .is_err());
        assert!(SlowdownSignal::new(SlowdownConfig {
            gamma: 2.0,
            ..Default::default()
        })
        .is_err());
    }

    proptest! {
        #[test]
        fn r_is_at_least_one(xs in prop::collection::vec(0.001f64..1e6, 1..60), w in 1usize..20) {
            let mut s = signal(0.3, w, 2.5);
            for (i, &x) in xs.iter().enumerate() {
                s.record(x);
                let r = s.end_period(Nanos(i as u64));
                prop_assert!(r.slowdown >= 1.0 - 1e-9);
                prop_assert_eq!(r.congested, r.slowdown > 2.5);
            }
        }
    }
}
