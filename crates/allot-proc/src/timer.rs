//! The quantum timer: sleeps to absolute deadlines on the monotonic clock
//! (`clock_nanosleep(TIMER_ABSTIME)`), so lateness in one quantum does not push every
//! later quantum back. A signal interrupts the sleep so shutdown is prompt.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_nanosleep, ClockId, ClockNanosleepFlags};

/// Monotonic time in nanoseconds (the origin is arbitrary but fixed).
pub fn monotonic_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// Asks the kernel to wake this thread within 1 ns of its deadlines rather than the
/// default 50 µs timer slack (`PR_SET_TIMERSLACK`); best effort.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument; no memory is passed.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_TIMERSLACK, 1 as nix::libc::c_ulong);
    }
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The deadline passed; `late_ns` after it.
    Tick {
        /// How late the wake-up was.
        late_ns: u64,
    },
    /// A signal arrived first; the deadline still stands.
    Interrupted,
}

/// Sleeps from deadline to deadline, `period` apart.
#[derive(Debug, Clone)]
pub struct PeriodicTimer {
    period_ns: u64,
    next_ns: u64,
    /// Deadlines skipped because the process woke more than a whole period late.
    pub skipped: u64,
}

/// Sleeps until the absolute monotonic instant `deadline_ns`.
pub fn sleep_until(deadline_ns: u64) -> Wait {
    let ts = TimeSpec::from(Duration::from_nanos(deadline_ns));
    match clock_nanosleep(
        ClockId::CLOCK_MONOTONIC,
        ClockNanosleepFlags::TIMER_ABSTIME,
        &ts,
    ) {
        Err(Errno::EINTR) => Wait::Interrupted,
        _ => Wait::Tick {
            late_ns: monotonic_ns().saturating_sub(deadline_ns),
        },
    }
}

impl PeriodicTimer {
    /// A timer whose first deadline is one period from now.
    pub fn new(period: Duration) -> PeriodicTimer {
        let period_ns = period.as_nanos().clamp(1, u128::from(u64::MAX)) as u64;
        PeriodicTimer {
            period_ns,
            next_ns: monotonic_ns() + period_ns,
            skipped: 0,
        }
    }

    /// The next deadline.
    pub fn next_deadline_ns(&self) -> u64 {
        self.next_ns
    }

    /// Moves the next deadline to the first one on the same grid at or after `t` (ticks
    /// the caller knows will have nothing to do are slept through).
    pub fn skip_before(&mut self, t: u64) {
        if t > self.next_ns {
            self.next_ns += (t - self.next_ns).div_ceil(self.period_ns) * self.period_ns;
        }
    }

    /// Waits for the next deadline, then sets the one after. Deadlines missed by more
    /// than a period are skipped rather than run back to back.
    pub fn wait(&mut self) -> Wait {
        let w = sleep_until(self.next_ns);
        if let Wait::Tick { .. } = w {
            self.next_ns += self.period_ns;
            let now = monotonic_ns();
            if now > self.next_ns {
                let missed = (now - self.next_ns) / self.period_ns + 1;
                self.skipped += missed;
                self.next_ns += missed * self.period_ns;
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_on_absolute_deadlines() {
        let start = monotonic_ns();
        let mut t = PeriodicTimer::new(Duration::from_millis(5));
        for _ in 0..20 {
            assert!(matches!(t.wait(), Wait::Tick { .. }));
        }
        let elapsed = monotonic_ns() - start;
        let next = t.next_deadline_ns();
        t.skip_before(next + 1);
        assert_eq!(t.next_deadline_ns(), next + 5_000_000);
        t.skip_before(next);
        assert_eq!(t.next_deadline_ns(), next + 5_000_000);
        // 20 periods of 5 ms: never less, and not drifting by a period per tick.
        assert!(elapsed >= 100_000_000, "{elapsed}");
        assert!(elapsed < 100_000_000 + 60_000_000, "{elapsed}");
    }
}
