//! The agreement window loop: sensor (cost units arriving, and waiting, per principal) →
//! controller (smoothed demand, the model's planner) → actuator (each principal's credit
//! rate), at every window's end; in between, the credit that accrued is offered to the
//! requests waiting for it, [`PUMPS_PER_WINDOW`] times a window. Under `[cluster]` the
//! plan is the cluster's: the demand goes to the cluster link at each window's end, and
//! the quota it hands back (or the fallback share) sets the credit rates at every pump
//! instead of the local planner at the window's end.

use std::sync::Weak;
use std::time::Duration;

use crate::cluster::Quota;
use crate::credit::PUMPS_PER_WINDOW;
use crate::runtime::Live;

/// Runs while the gateway lives; follows the enforcer in force (a reload may replace it).
pub(crate) async fn run(live: Weak<Live>) {
    let mut pumps = 0u32;
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
        pumps += 1;
        // Back from a gap (the process was stopped): at once, not at the window's end.
        let window_end = pumps >= PUMPS_PER_WINDOW || enforcer.away(now);
        if window_end {
            pumps = 0;
        }
        match live.cluster.quota(enforcer.principals()) {
            Quota::Alone => {
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
                enforcer.follow_wall_windows(now, crate::clock::unix_ns());
            }
        }
        enforcer.pump(now);
    }
}
