//! Exponentially weighted moving average, FVM paper section 2.1 eq. 1:
//! `avg(t) = (1 − γ)·avg(t − 1) + γ·x(t)`.
//!
//! Generic: the samples are plain numbers (a probe's run time in nanoseconds, a request's
//! latency in milliseconds); the caller decides what one sample is.

use thiserror::Error;

/// A constructor argument out of range.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EwmaError {
    /// The weight γ must be in (0, 1].
    #[error("ewma weight gamma must be in (0, 1], got {0}")]
    Gamma(f64),
}

/// An EWMA with weight γ on the newest sample. Empty until the first sample, which it
/// takes as its value (no bias towards zero).
#[derive(Debug, Clone, PartialEq)]
pub struct Ewma {
    gamma: f64,
    value: Option<f64>,
}

impl Ewma {
    /// An empty average with weight `gamma` ∈ (0, 1] on each new sample.
    pub fn new(gamma: f64) -> Result<Ewma, EwmaError> {
        if !(gamma > 0.0 && gamma <= 1.0) {
            return Err(EwmaError::Gamma(gamma));
        }
        Ok(Ewma { gamma, value: None })
    }

    /// Folds in one sample and returns the new average. Non-finite samples are ignored.
    pub fn observe(&mut self, sample: f64) -> Option<f64> {
        if !sample.is_finite() {
            return self.value;
        }
        self.value = Some(match self.value {
            None => sample,
            Some(avg) => (1.0 - self.gamma) * avg + self.gamma * sample,
        });
        self.value
    }

    /// The current average, `None` before the first sample.
    pub fn value(&self) -> Option<f64> {
        self.value
    }

    /// The weight on each new sample.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_sample_is_the_value_then_weighted() {
        let mut e = Ewma::new(0.3).unwrap();
        assert_eq!(e.value(), None);
        assert_eq!(e.observe(10.0), Some(10.0));
        let v = e.observe(20.0).unwrap();
        assert!((v - 13.0).abs() < 1e-12);
    }

    #[test]
    fn rejects_bad_gamma() {
        assert_eq!(Ewma::new(0.0), Err(EwmaError::Gamma(0.0)));
        assert!(Ewma::new(1.5).is_err());
        assert!(Ewma::new(f64::NAN).is_err());
        assert!(Ewma::new(1.0).is_ok());
    }

    #[test]
    fn ignores_non_finite_samples() {
        let mut e = Ewma::new(0.5).unwrap();
        e.observe(4.0);
        assert_eq!(e.observe(f64::INFINITY), Some(4.0));
    }

    proptest! {
        #[test]
        fn stays_within_sample_range(gamma in 0.01f64..=1.0, xs in prop::collection::vec(0.0f64..1e9, 1..50)) {
            let mut e = Ewma::new(gamma).unwrap();
            for &x in &xs { e.observe(x); }
            let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let v = e.value().unwrap();
            prop_assert!(v >= lo - 1e-6 && v <= hi + 1e-6);
        }
    }
}
