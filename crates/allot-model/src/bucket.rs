//! Token buckets: the accept-rate actuator (tokens are requests) and output-bandwidth
//! groups (tokens are bytes).
//!
//! The paper's socket groups (kernel-support-open-qos, section 2.2, "accept rate" and
//! "output" groups) hold a quota replenished by a timer; a process finding it depleted
//! sleeps. Here the quota refills continuously at `rate_per_sec`, up to `burst`, and the
//! caller passes the time of each decision in.
//!
//! Edge rates, chosen so a configuration can say "closed" and "open" with one number:
//! - rate `0` (or negative, or NaN) means **nothing passes**: the bucket holds no tokens
//!   whatever its burst, [`TokenBucket::try_take`] refuses every positive take and
//!   [`TokenBucket::reserve`] answers [`Duration::MAX`] without taking anything;
//! - rate `+∞` means **everything passes**: every take succeeds, every reserve is free;
//! - a burst of `+∞` with a finite rate also lets everything pass (the bucket never
//!   empties); a negative or NaN burst counts as `0`.
//!
//! A take larger than `burst` can never succeed with [`TokenBucket::try_take`]; byte
//! shaping of chunks larger than the burst uses [`TokenBucket::reserve`], which goes into
//! debt and says how long to wait.

use crate::time::Nanos;
use std::time::Duration;

/// Relative rounding slack a take is allowed (see [`TokenBucket::try_take`]).
const TAKE_SLACK: f64 = 1e-9;

/// A token bucket that refills at `rate_per_sec` tokens a second up to `burst` tokens.
///
/// Time never runs backwards for the bucket: a `now` earlier than one already seen is
/// treated as that earlier-seen instant.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    /// Tokens at `last`; negative while in debt after [`TokenBucket::reserve`].
    tokens: f64,
    last: Nanos,
}

/// A rate as the bucket uses it: NaN and negatives are "closed" (0).
fn clean_rate(rate_per_sec: f64) -> f64 {
    if rate_per_sec.is_nan() || rate_per_sec <= 0.0 {
        0.0
    } else {
        rate_per_sec
    }
}

/// A burst as the bucket uses it: NaN and negatives are 0.
fn clean_burst(burst: f64) -> f64 {
    if burst.is_nan() || burst <= 0.0 {
        0.0
    } else {
        burst
    }
}

impl TokenBucket {
    /// A bucket refilling at `rate_per_sec` up to `burst`, full at `now` (empty if the rate
    /// is 0, see the module doc).
    pub fn new(rate_per_sec: f64, burst: f64, now: Nanos) -> Self {
        let rate_per_sec = clean_rate(rate_per_sec);
        let burst = clean_burst(burst);
        TokenBucket {
            rate_per_sec,
            burst,
            tokens: if rate_per_sec == 0.0 { 0.0 } else { burst },
            last: now,
        }
    }

    /// Change the rate and burst at run time. Tokens earned so far at the old rate are
    /// kept, capped at the new burst; a debt is kept too. Setting rate 0 empties the bucket.
    pub fn set_rate(&mut self, rate_per_sec: f64, burst: f64, now: Nanos) {
        self.refill(now);
        self.rate_per_sec = clean_rate(rate_per_sec);
        self.burst = clean_burst(burst);
        if self.rate_per_sec == 0.0 {
            self.tokens = 0.0;
        } else if self.rate_per_sec.is_infinite() {
            self.tokens = self.burst;
        } else {
            self.tokens = self.tokens.min(self.burst);
        }
    }

    /// Take `n` tokens if there are that many at `now`; otherwise take nothing and say no.
    /// A take of zero or less always succeeds and takes nothing.
    pub fn try_take(&mut self, n: f64, now: Nanos) -> bool {
        if n.is_nan() || n <= 0.0 {
            return true;
        }
        if self.rate_per_sec.is_infinite() {
            return true;
        }
        self.refill(now);
        // Forgive float rounding in the refill sum (tokens earned in 0.1 steps may add up
        // to 0.999…): a relative slack of 1e-9 never lets a whole extra take through.
        if self.tokens >= n - TAKE_SLACK * n.max(1.0) {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Take `n` now even if it goes into debt; returns how long the caller must wait before
    /// sending (zero when there were enough tokens). For byte shaping of chunks larger than
    /// burst. Successive reservations queue behind each other's debt. With rate 0 nothing
    /// is taken and the wait is [`Duration::MAX`].
    pub fn reserve(&mut self, n: f64, now: Nanos) -> Duration {
        if n.is_nan() || n <= 0.0 || self.rate_per_sec.is_infinite() {
            return Duration::ZERO;
        }
        if self.rate_per_sec == 0.0 {
            return Duration::MAX;
        }
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        // Round up to a whole nanosecond so that a caller who waits exactly this long
        // finds the debt repaid.
        let wait_ns = (-self.tokens / self.rate_per_sec * 1e9).ceil();
        if wait_ns >= u64::MAX as f64 {
            Duration::MAX
        } else {
            Duration::from_nanos(wait_ns as u64)
        }
    }

    /// Returns `n` tokens taken earlier and not used after all (the request they were
    /// taken for was refused later), capped at `burst`: never more than was there.
    pub fn give_back(&mut self, n: f64, now: Nanos) {
        if n.is_nan() || n <= 0.0 || !self.rate_per_sec.is_finite() || self.rate_per_sec == 0.0 {
            return;
        }
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.burst);
    }

    /// Keeps at most `max_tokens` of the tokens saved up to `now` (a debt stays): 0
    /// forgets them all, and from `now` the bucket holds only what it earns after.
    pub fn keep_at_most(&mut self, max_tokens: f64, now: Nanos) {
        self.refill(now);
        self.tokens = self.tokens.min(max_tokens.max(0.0));
    }

    /// Tokens available at `now`; negative while a reservation's debt is being repaid.
    /// Infinite when the rate is.
    pub fn available(&mut self, now: Nanos) -> f64 {
        if self.rate_per_sec.is_infinite() {
            return f64::INFINITY;
        }
        self.refill(now);
        self.tokens
    }

    /// The refill rate, tokens a second (0 when closed).
    pub fn rate_per_sec(&self) -> f64 {
        self.rate_per_sec
    }

    /// The largest number of tokens the bucket holds.
    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Credit the tokens earned since `last`, capped at `burst`.
    fn refill(&mut self, now: Nanos) {
        if now <= self.last {
            return;
        }
        let elapsed_ns = (now.0 - self.last.0) as f64;
        self.last = now;
        if self.rate_per_sec == 0.0 || self.tokens >= self.burst {
            return;
        }
        // Multiply before dividing: whole-token refills stay exact for round rates.
        let earned = self.rate_per_sec * elapsed_ns / 1e9;
        self.tokens = (self.tokens + earned).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(x: u64) -> Nanos {
        Nanos::from_millis(x)
    }

    #[test]
    fn starts_full_then_refills_at_rate() {
        let mut b = TokenBucket::new(100.0, 10.0, ms(0));
        for _ in 0..10 {
            assert!(b.try_take(1.0, ms(0)));
        }
        assert!(!b.try_take(1.0, ms(0)));
        // 100/s = one token every 10 ms.
        assert!(!b.try_take(1.0, ms(9)));
        assert!(b.try_take(1.0, ms(10)));
        assert!(!b.try_take(1.0, ms(10)));
        // Refill caps at burst.
        assert_eq!(b.available(ms(10_000)), 10.0);
    }

    #[test]
    fn it_keeps_at_most_what_it_is_told_and_never_forgives_a_debt() {
        let mut b = TokenBucket::new(100.0, 10.0, ms(0));
        // Full (10 saved); 2 kept.
        b.keep_at_most(2.0, ms(5_000));
        assert!((b.available(ms(5_000)) - 2.0).abs() < 1e-9);
        // Holding less than that, it keeps what it holds.
        b.keep_at_most(3.0, ms(5_000));
        assert!((b.available(ms(5_000)) - 2.0).abs() < 1e-9);
        // Nothing: only what it earns from then on.
        b.keep_at_most(0.0, ms(5_000));
        assert!(!b.try_take(1.0, ms(5_000)));
        assert!(b.try_take(1.0, ms(5_010)));
        // A debt is not forgiven.
        b.reserve(5.0, ms(5_010));
        b.keep_at_most(0.0, ms(5_010));
        assert!(b.available(ms(5_010)) < -4.9);
    }

    #[test]
    fn passes_rate_times_time_plus_burst() {
        let mut b = TokenBucket::new(1000.0, 50.0, ms(0));
        let mut passed = 0;
        // A flood: a try every 100 µs for 1 s.
        for i in 0..=10_000u64 {
            if b.try_take(1.0, Nanos(i * 100_000)) {
                passed += 1;
            }
        }
        assert_eq!(passed, 1050);
    }

    #[test]
    fn rate_zero_lets_nothing_through() {
        let mut b = TokenBucket::new(0.0, 100.0, ms(0));
        assert!(!b.try_take(1.0, ms(0)));
        assert!(!b.try_take(1.0, ms(1_000_000)));
        assert_eq!(b.reserve(1.0, ms(5)), Duration::MAX);
        assert_eq!(b.available(ms(10)), 0.0);
        let mut n = TokenBucket::new(f64::NAN, 1.0, ms(0));
        assert!(!n.try_take(1.0, ms(1)));
        assert_eq!(n.rate_per_sec(), 0.0);
    }

    #[test]
    fn infinite_rate_lets_everything_through() {
        let mut b = TokenBucket::new(f64::INFINITY, 1.0, ms(0));
        for _ in 0..1000 {
            assert!(b.try_take(1e9, ms(0)));
            assert_eq!(b.reserve(1e12, ms(0)), Duration::ZERO);
        }
        assert_eq!(b.available(ms(0)), f64::INFINITY);
    }

    #[test]
    fn reserve_goes_into_debt_and_says_how_long() {
        // 1 MB/s, burst 64 KiB; a 1 MB chunk.
        let mut b = TokenBucket::new(1e6, 65_536.0, ms(0));
        let wait = b.reserve(1e6, ms(0));
        // Debt of 1e6 - 65536 bytes at 1e6 B/s.
        assert_eq!(wait, Duration::from_nanos(934_464_000));
        assert!(!b.try_take(1.0, ms(500)));
        // A second reservation queues behind the first.
        let wait2 = b.reserve(1e6, Nanos(934_464_000));
        assert_eq!(wait2, Duration::from_secs(1));
        assert!(b.available(Nanos(1_934_464_000)) >= 0.0);
        // Enough tokens: no wait.
        let mut c = TokenBucket::new(1e6, 65_536.0, ms(0));
        assert_eq!(c.reserve(1000.0, ms(0)), Duration::ZERO);
    }

    #[test]
    fn set_rate_keeps_earned_tokens_capped_at_new_burst() {
        let mut b = TokenBucket::new(10.0, 100.0, ms(0));
        assert!(b.try_take(100.0, ms(0)));
        // 500 ms at 10/s = 5 tokens earned at the old rate.
        b.set_rate(1000.0, 3.0, ms(500));
        assert_eq!(b.available(ms(500)), 3.0);
        assert_eq!(b.rate_per_sec(), 1000.0);
        b.set_rate(0.0, 3.0, ms(600));
        assert!(!b.try_take(1.0, ms(10_000)));
        b.set_rate(1.0, 3.0, ms(10_000));
        // Reopened empty: earns from now on.
        assert!(!b.try_take(1.0, ms(10_500)));
        assert!(b.try_take(1.0, ms(11_000)));
    }

    #[test]
    fn time_going_backwards_is_ignored() {
        let mut b = TokenBucket::new(1.0, 1.0, ms(1000));
        assert!(b.try_take(1.0, ms(1000)));
        assert!(!b.try_take(1.0, ms(0)));
        assert!(!b.try_take(1.0, ms(1999)));
        assert!(b.try_take(1.0, ms(2000)));
    }

    proptest! {
        /// Over any sequence of takes, what passed is at most burst + rate × elapsed.
        #[test]
        fn never_more_than_burst_plus_rate_times_elapsed(
            rate in 0.0f64..10_000.0,
            burst in 0.0f64..1000.0,
            steps in proptest::collection::vec((0u64..50_000_000, 0.0f64..200.0, any::<bool>()), 1..200),
        ) {
            let start = Nanos(1_000);
            let mut b = TokenBucket::new(rate, burst, start);
            let mut now = start;
            let mut taken = 0.0;
            let mut owed_until = start;
            for (dt, n, reserve) in steps {
                now = Nanos(now.0 + dt);
                if reserve {
                    let wait = b.reserve(n, now);
                    if wait != Duration::MAX {
                        taken += n;
                        owed_until = owed_until.max(now.after(wait));
                    }
                } else if b.try_take(n, now) {
                    taken += n;
                }
                // A caller that honours the waits has sent `taken` by `owed_until`.
                let horizon = now.max(owed_until);
                let allowed = burst + rate * horizon.saturating_since(start).as_secs_f64();
                prop_assert!(taken <= allowed + 1e-6 * allowed.max(1.0),
                    "taken {} > allowed {}", taken, allowed);
            }
        }
    }

    #[test]
    fn tokens_given_back_are_taken_again_but_never_past_the_burst() {
        let mut b = TokenBucket::new(10.0, 2.0, Nanos(0));
        assert!(b.try_take(2.0, Nanos(0)));
        assert!(!b.try_take(1.0, Nanos(0)));
        b.give_back(1.0, Nanos(0));
        assert!(b.try_take(1.0, Nanos(0)));
        assert!(!b.try_take(1.0, Nanos(0)));
        b.give_back(5.0, Nanos(0));
        assert_eq!(b.available(Nanos(0)), 2.0);
        let mut closed = TokenBucket::new(0.0, 2.0, Nanos(0));
        closed.give_back(1.0, Nanos(0));
        assert_eq!(closed.available(Nanos(0)), 0.0);
    }
}
