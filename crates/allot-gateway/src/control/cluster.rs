//! The cluster loop: connects to NATS and runs this gateway's node of the combining tree
//! (`allot_cluster::link::run`). Sensor: the local demand the agreement window loop
//! closes each window; controller: the tree (plan at the root, split by demand below);
//! actuator: the quota (or fallback share) the enforcer applies to the agreement credit,
//! through [`crate::cluster::ClusterShared`]. When the engine cannot be reached, refuses
//! the credential, or another live gateway holds the node name, the problem is logged and
//! shown in `/status`, the gateway enforces its fallback share, and the loop tries again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use allot_cluster::link::{self, LinkConfig, LinkError, LinkStatus};
use allot_cluster::{ClusterConfig, Lifetimes, NatsEngine};
use allot_model::agreements::{AgreementSet, AgreementsSpec};
use allot_model::planner::Planner;
use tokio::sync::watch;

use crate::cluster::ClusterShared;
use crate::runtime::Live;

/// Pause before trying the engine again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// What one cluster loop was started with: it is restarted when any of it changes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wanted {
    /// The `[cluster]` table.
    pub config: ClusterConfig,
    /// This gateway's agreement set.
    pub spec: AgreementsSpec,
    /// This gateway's node name.
    pub node: String,
}

impl Wanted {
    /// The loop the configuration in force asks for, if any.
    pub fn of(live: &Live) -> Option<Wanted> {
        let rt = live.load();
        let config = rt.config.cluster.clone()?;
        let spec = rt.config.agreements.as_ref()?.get_ref().spec();
        let port = rt.config.listeners().next().map_or(0, |l| l.address.port());
        let node = config.node_name(&host_name(), port);
        Some(Wanted { config, spec, node })
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "allot".to_string())
}

/// The share enforced while there is no link: an equal part of the mandatory-only plan
/// among the members last known (all of it when none is known).
fn detached_quota(planner: &Planner, members: usize) -> Vec<f64> {
    allot_model::cluster::mandatory_plan(planner)
        .into_iter()
        .map(|u| u / members.max(1) as f64)
        .collect()
}

/// Runs until aborted by the supervisor (or the gateway is gone).
pub(crate) async fn run(live: Weak<Live>, wanted: Wanted) {
    let Some(shared) = live.upgrade().map(|l| Arc::clone(&l.cluster)) else {
        return;
    };
    let Ok(set) = AgreementSet::from_spec(&wanted.spec) else {
        return; // validated before: cannot happen
    };
    let planner = Planner::per_window(&set);
    let principals: Vec<String> = set.principals().iter().map(|p| p.name.clone()).collect();
    let window = Duration::from_millis(wanted.spec.window_ms.max(1));
    let config = &wanted.config;
    let lifetimes = Lifetimes {
        member: config.member_lease(),
        root: window * config.root_lease_windows,
    };
    let mut members = 1usize;
    shared.configure(
        &wanted.node,
        wanted.spec.window_ms,
        principals.clone(),
        detached_quota(&planner, members),
    );
    let mut last_error = String::new();
    loop {
        if live.strong_count() == 0 {
            return;
        }
        let engine = match NatsEngine::connect(config, lifetimes).await {
            Ok(e) => e,
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::error!(cluster = %config.name, error = %message, "cluster: cannot use NATS; enforcing the fallback share");
                    last_error = message.clone();
                }
                shared.detach(Some(message));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        last_error.clear();
        tracing::info!(cluster = %config.name, node = %wanted.node, "cluster: connected to NATS");
        let (status_tx, mut status_rx) = watch::channel(LinkStatus::new(&wanted.node));
        let link_config = LinkConfig {
            cluster: config.name.clone(),
            node: wanted.node.clone(),
            fanout: config.fanout,
            window,
            hop: window / 10,
            root_lease: lifetimes.root,
            member_lease: lifetimes.member,
            member_refresh_windows: (config.member_lease_ms / 4 / window.as_millis().max(1) as u64)
                .max(1),
            epoch_file: config
                .state_dir
                .as_ref()
                .map(|d| d.join(format!("{}.epoch", wanted.node))),
            origin_unix_ms: crate::cluster::unix_ms(),
            origin: tokio::time::Instant::now(),
        };
        let link = link::run(
            engine,
            link_config,
            wanted.spec.clone(),
            shared.demand(),
            status_tx,
            std::future::pending(),
        );
        tokio::pin!(link);
        let result = loop {
            tokio::select! {
                r = &mut link => break r,
                changed = status_rx.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                    let status = status_rx.borrow_and_update().clone();
                    members = members.max(status.members);
                    shared.update(&status);
                }
            }
        };
        let message = match result {
            Ok(()) => "the cluster link stopped".to_string(),
            Err(e @ LinkError::NameTaken(_)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(cluster = %config.name, error = %message, "cluster: enforcing the fallback share");
        shared.configure(
            &wanted.node,
            wanted.spec.window_ms,
            principals.clone(),
            detached_quota(&planner, members),
        );
        shared.detach(Some(message));
        tokio::time::sleep(RETRY.max(config.member_lease() / 2)).await;
    }
}

/// Keeps the shared state honest when the loop is stopped for good.
pub(crate) fn stopped(shared: &ClusterShared) {
    shared.unconfigure();
}
