//! The control plane: one [`Supervisor`] starts and stops every loop of the gateway, each
//! of the one shape **sensor → controller → actuator** on a period, with the time read
//! once per tick and passed in:
//!
//! - [`agreements`]: every window, demand per principal → the planner → credit rates;
//!   in between, credit handed to the requests waiting for it;
//! - [`qos`]: the `[[controller]]` loops (delay, utilisation, adaptive limits);
//! - [`health`]: active health checks, one loop per back end that has them;
//! - [`cluster`]: under `[cluster]`, this gateway's node of the combining tree: its
//!   demand up to the cluster, the quota it enforces back.
//!
//! Loops follow the configuration in force: the supervisor reconciles them after every
//! change, and they hold the live state weakly, so none outlives the gateway. There is one
//! supervisor per gateway, however many listeners it has.

pub mod agreements;
pub mod cluster;
pub mod health;
pub mod qos;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::runtime::Live;

/// Starts, follows and stops every loop of one gateway.
#[derive(Debug, Default)]
pub struct Supervisor {
    controllers: qos::Controllers,
    windows: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The cluster link's loop, with what it was started with.
    cluster: Mutex<Option<(cluster::Wanted, tokio::task::JoinHandle<()>)>>,
    /// Health-check loops by back end, with the settings each was started with.
    checks: Mutex<
        HashMap<
            String,
            (
                crate::config::HealthCheckConfig,
                tokio::task::JoinHandle<()>,
            ),
        >,
    >,
}

impl Supervisor {
    /// Makes the running loops match the configuration in force: starts, retunes and
    /// stops controllers, and runs the agreement windows while there are agreements.
    /// Outside a tokio runtime (a configuration check) it starts nothing.
    pub fn reconcile(&self, live: &Arc<Live>) {
        self.controllers.reconcile(live);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = live.load().enforcer.is_some();
        if windows.as_ref().is_some_and(|t| t.is_finished()) {
            *windows = None;
        }
        match (wanted, windows.as_ref()) {
            (true, None) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    *windows = Some(handle.spawn(agreements::run(Arc::downgrade(live))));
                }
            }
            (false, Some(_)) => {
                if let Some(task) = windows.take() {
                    task.abort();
                }
            }
            _ => {}
        }
        drop(windows);
        self.reconcile_checks(live);
        self.reconcile_cluster(live);
    }

    /// The cluster loop while `[cluster]` is configured, restarted when its settings,
    /// the agreement set or the node name change.
    fn reconcile_cluster(&self, live: &Arc<Live>) {
        let wanted = cluster::Wanted::of(live);
        let mut slot = self.cluster.lock().unwrap_or_else(|p| p.into_inner());
        let keep = match (&wanted, slot.as_ref()) {
            (Some(w), Some((running, task))) => w == running && !task.is_finished(),
            (None, None) => true,
            _ => false,
        };
        if keep {
            return;
        }
        if let Some((_, task)) = slot.take() {
            task.abort();
        }
        let Some(wanted) = wanted else {
            cluster::stopped(&live.cluster);
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let task = handle.spawn(cluster::run(Arc::downgrade(live), wanted.clone()));
            *slot = Some((wanted, task));
        }
    }

    /// One health-check loop per back end with a `health_check`, restarted when its
    /// settings change.
    fn reconcile_checks(&self, live: &Arc<Live>) {
        let wanted: HashMap<String, crate::config::HealthCheckConfig> = live
            .load()
            .config
            .backends()
            .filter_map(|b| b.health_check.clone().map(|h| (b.name.clone(), h)))
            .collect();
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.retain(|name, (config, task)| {
            let keep = wanted.get(name) == Some(config) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (name, config) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = checks.entry(name) {
                let task = handle.spawn(health::run(Arc::downgrade(live), slot.key().clone()));
                slot.insert((config, task));
            }
        }
    }

    /// The controllers' readouts.
    pub fn readouts(&self) -> Vec<qos::Readout> {
        self.controllers.readouts()
    }

    /// Pauses or resumes a controller; false when there is no such controller.
    pub fn set_paused(&self, name: &str, paused: bool) -> bool {
        self.controllers.set_paused(name, paused)
    }

    /// Stops every loop (the gateway is stopping).
    pub fn stop(&self) {
        self.controllers.stop();
        for (_, (_, task)) in self
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            task.abort();
        }
        if let Some(task) = self
            .windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        if let Some((_, task)) = self
            .cluster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}
