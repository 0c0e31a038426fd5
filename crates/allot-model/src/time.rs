//! Time as the model sees it: integer nanoseconds since an origin the caller picks.

use std::time::Duration;

/// An instant, in nanoseconds since an origin chosen by the caller (often the start of
/// the process). Integers keep tests literal and easy to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub u64);

impl Nanos {
    /// The origin.
    pub const ZERO: Nanos = Nanos(0);

    /// An instant `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Nanos {
        Nanos(ms * 1_000_000)
    }

    /// An instant `s` seconds after the origin.
    pub const fn from_secs(s: u64) -> Nanos {
        Nanos(s * 1_000_000_000)
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This instant moved `d` later (saturating at the largest instant).
    pub fn after(self, d: Duration) -> Nanos {
        Nanos(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// Seconds since the origin, as a float (for rates and plots).
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Nanos::from_millis(5);
        assert_eq!(
            t.saturating_since(Nanos::from_millis(2)),
            Duration::from_millis(3)
        );
        assert_eq!(Nanos::ZERO.saturating_since(t), Duration::ZERO);
        assert_eq!(
            Nanos(u64::MAX).after(Duration::from_secs(1)),
            Nanos(u64::MAX)
        );
        assert_eq!(t.after(Duration::from_millis(1)), Nanos::from_millis(6));
    }
}
