//! The agreement window loop: sensor (cost units arriving, and waiting, per principal) →
//! controller (smoothed demand, the model's planner) → actuator (each principal's credit
//! rate), at every window's end; in between, the credit that accrued is offered to the
//! requests waiting for it, [`PUMPS_PER_WINDOW`] times a window. Under `[cluster]` the
//! plan is the cluster's: the demand goes to the cluster link at each window's end, and
//! the quota it hands back (or the fallback share) sets the credit rates at every pump
//! instead of the local planner at the window's end, and the pumps keep to a phase of the
//! wall clock's steps (see [`wall_phase_ns`]).

use std::sync::Weak;
use std::time::Duration;

use crate::cluster::Quota;
use crate::credit::PUMPS_PER_WINDOW;
use crate::runtime::Live;

/// Under wall-clock windows, where in each wall-clock pump step this gateway's pump runs:
/// between a tenth and four tenths of a step after the step begins, spread over gateways by
/// process id. Early in the step, so a window's last pump runs more than half a step before
/// the window ends and what it admits reaches the back end within that window despite the
/// transit (a pump just before the boundary would have its lump counted in the next
/// window, on top of that window's own quota); spread, so the gateways do not all wake at
/// the same instant. Nanoseconds after the step's start; `spread` is this gateway's
/// place in the range, in thousandths ([`phase_spread`]).
fn wall_phase_ns(step_ns: u64, spread: u64) -> u64 {
    step_ns / 10 + step_ns * 3 / 10 * (spread % 1000) / 1000
}

/// This gateway's place in the range of phases, in thousandths: a hash of its process id,
/// so gateways on one host differ too.
fn phase_spread() -> u64 {
    u64::from(std::process::id()).wrapping_mul(0x9E37_79B9) % 1000
}

/// How far off its phase a pump may run before the ticks are set again, ns.
fn phase_tolerance_ns(step_ns: u64) -> u64 {
    step_ns / 20
}

/// The delay from the wall-clock instant `unix_ns` to the next pump at `phase_ns` into a
/// step of `step_ns`; `None` when `unix_ns` is within tolerance of that phase already.
fn realign(unix_ns: u64, step_ns: u64, phase_ns: u64) -> Option<Duration> {
    let step_ns = step_ns.max(1);
    let at = unix_ns % step_ns;
    let off = at.abs_diff(phase_ns).min(step_ns - at.abs_diff(phase_ns));
    if off <= phase_tolerance_ns(step_ns) {
        return None;
    }
    let wait = (phase_ns + step_ns - at) % step_ns;
    Some(Duration::from_nanos(wait))
}

/// Runs while the gateway lives; follows the enforcer in force (a reload may replace it).
pub(crate) async fn run(live: Weak<Live>) {
    let mut pumps = 0u32;
    let mut last_wall_window: Option<u64> = None;
    let spread = phase_spread();
    let mut ticks: Option<(Duration, tokio::time::Interval)> = None;
    loop {
        let step = {
            let Some(live) = live.upgrade() else {
                return; // the gateway is gone
            };
            let Some(enforcer) = live.load().enforcer.clone() else {
                return; // no agreements now: the supervisor starts the loop again if needed
            };
            enforcer.window() / PUMPS_PER_WINDOW
        };
        // Ticks on absolute deadlines, so windows do not stretch by the work done in them.
        let interval = match &mut ticks {
            Some((s, i)) if *s == step => i,
            _ => {
                let mut i = tokio::time::interval(step);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                &mut ticks.insert((step, i)).1
            }
        };
        interval.tick().await;
        let Some(live) = live.upgrade() else {
            return;
        };
        let Some(enforcer) = live.load().enforcer.clone() else {
            continue;
        };
        let now = crate::clock::now();
        let unix_ns = crate::clock::unix_ns();
        let quota = live.cluster.quota(enforcer.principals());
        pumps += 1;
        // Under wall-clock windows a window ends at the first pump past its boundary.
        let window_ns = u64::try_from(enforcer.window().as_nanos()).unwrap_or(u64::MAX);
        let wall_window = unix_ns / window_ns.max(1);
        let crossed = match quota {
            Quota::Alone => pumps >= PUMPS_PER_WINDOW,
            Quota::Units(_) => last_wall_window.is_some_and(|w| w != wall_window),
        };
        last_wall_window = Some(wall_window);
        // Back from a gap (the process was stopped): at once, not at the window's end.
        let window_end = crossed || enforcer.away(now);
        if window_end {
            pumps = 0;
        }
        match quota {
            Quota::Alone => {
                last_wall_window = None;
                enforcer.unfollow_wall_windows();
                if window_end {
                    enforcer.end_window(now, &Quota::Alone);
                }
            }
            Quota::Units(units) => {
                if window_end {
                    live.cluster.set_demand(enforcer.fold_demand());
                }
                // The quota in force now, at every pump: the link publishes each window's
                // at its boundary, so the gateways switch plans within a pump of it, not
                // each at its own window's end.
                enforcer.apply_quota(&units, now);
                // The quotas are per wall-clock window: so is the credit.
                enforcer.follow_wall_windows(now, unix_ns);
                // And so are the pumps' steps: keep this gateway's phase in them.
                let step_ns = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
                if let Some(wait) = realign(unix_ns, step_ns, wall_phase_ns(step_ns, spread)) {
                    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + wait, step);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    ticks = Some((step, i));
                }
            }
        }
        enforcer.pump(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pump_off_its_phase_waits_for_the_next_one_and_one_on_it_does_not() {
        let step = 10_000_000; // 10 ms
        let phase = 2_000_000;
        // On the phase, or within half a millisecond of it: no change.
        assert_eq!(realign(5 * step + phase, step, phase), None);
        assert_eq!(realign(5 * step + phase + 400_000, step, phase), None);
        assert_eq!(realign(5 * step + phase - 400_000, step, phase), None);
        // Late in the step: wait for the phase of the next step.
        assert_eq!(
            realign(5 * step + 9_000_000, step, phase),
            Some(Duration::from_millis(3))
        );
        // Early in the step, before the phase: wait for it in this step.
        assert_eq!(
            realign(5 * step + 500_000, step, phase),
            Some(Duration::from_micros(1500))
        );
        // Near the phase across the step's start (the tolerance wraps).
        assert_eq!(realign(5 * step + 9_800_000, 10_000_000, 100_000), None);
    }

    #[test]
    fn every_gateway_pumps_early_in_its_step_and_well_before_the_window_ends() {
        let step = 10_000_000;
        for spread in [0, 1, 499, 999, phase_spread()] {
            let phase = wall_phase_ns(step, spread);
            assert!((step / 10..=step * 4 / 10).contains(&phase), "{phase}");
            assert!(phase + phase_tolerance_ns(step) < step / 2);
        }
        // Gateways at different places pump at different instants.
        assert!(wall_phase_ns(step, 0) < wall_phase_ns(step, 999));
    }
}
