//! Accuracy metrics of a proportional share (ALPS paper section 3.3) and fairness indices.
//!
//! Per cycle n: entitlement `E_p = share_p / Σ share · Σ consumed`, relative error
//! `(consumed_p − E_p) / E_p`, and the RMS of the relative errors over the members.

/// Per-member entitlements for one cycle: `share_p / Σ share · Σ consumed`.
/// Empty or zero totals give zeros.
pub fn entitlements(shares: &[f64], consumed: &[f64]) -> Vec<f64> {
    let total_share: f64 = shares.iter().sum();
    let total: f64 = consumed.iter().sum();
    shares
        .iter()
        .map(|s| {
            if total_share > 0.0 {
                s / total_share * total
            } else {
                0.0
            }
        })
        .collect()
}

/// Per-member relative errors `(consumed − E) / E` for one cycle; a member with zero
/// entitlement has error 0.
pub fn relative_errors(shares: &[f64], consumed: &[f64]) -> Vec<f64> {
    entitlements(shares, consumed)
        .iter()
        .zip(consumed)
        .map(|(e, c)| if *e > 0.0 { (c - e) / e } else { 0.0 })
        .collect()
}

/// Root mean square of `values`; 0 for an empty slice.
pub fn rms(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    (values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64).sqrt()
}

/// Jain's fairness index `(Σx)² / (n·Σx²)`: 1 when all equal, 1/n when one takes all.
/// 1 for an empty or all-zero slice.
pub fn jain_index(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().sum();
    let sq: f64 = values.iter().map(|v| v * v).sum();
    if values.is_empty() || sq == 0.0 {
        return 1.0;
    }
    sum * sum / (values.len() as f64 * sq)
}

/// The FVM paper's fairness index (section 5, eq. 16):
/// `1 − ‖x − o‖ / ‖o‖`, with `o` the fair and efficient allocation.
pub fn fvm_fairness_index(values: &[f64], optimal: &[f64]) -> f64 {
    let num: f64 = values
        .iter()
        .zip(optimal)
        .map(|(x, o)| (x - o) * (x - o))
        .sum::<f64>()
        .sqrt();
    let den: f64 = optimal.iter().map(|o| o * o).sum::<f64>().sqrt();
    if den == 0.0 {
        return if num == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - num / den
}

/// Running mean of per-cycle RMS relative errors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccuracyTracker {
    cycles: u64,
    sum_rms: f64,
}

impl AccuracyTracker {
    /// An empty tracker.
    pub fn new() -> AccuracyTracker {
        AccuracyTracker::default()
    }

    /// Records one cycle and returns its RMS relative error. A cycle in which nothing
    /// was consumed is skipped and returns `None`.
    pub fn record_cycle(&mut self, shares: &[f64], consumed: &[f64]) -> Option<f64> {
        if consumed.iter().sum::<f64>() <= 0.0 {
            return None;
        }
        let r = rms(&relative_errors(shares, consumed));
        self.cycles += 1;
        self.sum_rms += r;
        Some(r)
    }

    /// Cycles recorded.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Mean of the per-cycle RMS relative errors (0 before any cycle).
    pub fn mean_rms(&self) -> f64 {
        if self.cycles == 0 {
            0.0
        } else {
            self.sum_rms / self.cycles as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paper_example_values() {
        // Shares 1 and 3, 100 ms consumed: entitled 25 and 75.
        let e = entitlements(&[1.0, 3.0], &[30.0, 70.0]);
        assert_eq!(e, vec![25.0, 75.0]);
        let r = relative_errors(&[1.0, 3.0], &[30.0, 70.0]);
        assert!((r[0] - 0.2).abs() < 1e-12);
        assert!((r[1] + 5.0 / 75.0).abs() < 1e-12);
        let want = ((0.04 + (5.0f64 / 75.0).powi(2)) / 2.0).sqrt();
        assert!((rms(&r) - want).abs() < 1e-12);
    }

    #[test]
    fn fairness_indices() {
        assert_eq!(jain_index(&[2.0, 2.0, 2.0]), 1.0);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(fvm_fairness_index(&[3.0, 3.0], &[3.0, 3.0]), 1.0);
        assert!(fvm_fairness_index(&[6.0, 0.0], &[3.0, 3.0]) < 0.1);
    }

    #[test]
    fn tracker_means_cycles() {
        let mut t = AccuracyTracker::new();
        assert_eq!(t.record_cycle(&[1.0, 1.0], &[0.0, 0.0]), None);
        assert_eq!(t.record_cycle(&[1.0, 1.0], &[5.0, 5.0]), Some(0.0));
        let r = t.record_cycle(&[1.0, 1.0], &[6.0, 4.0]).unwrap();
        assert!((r - 0.2).abs() < 1e-12);
        assert_eq!(t.cycles(), 2);
        assert!((t.mean_rms() - 0.1).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn exact_proportions_have_zero_error(shares in prop::collection::vec(1u32..50, 1..20), scale in 0.1f64..1e6) {
            let s: Vec<f64> = shares.iter().map(|&x| x as f64).collect();
            let c: Vec<f64> = s.iter().map(|x| x * scale).collect();
            prop_assert!(rms(&relative_errors(&s, &c)) < 1e-9);
            prop_assert!(jain_index(&c) <= 1.0 + 1e-12);
        }
    }
}
