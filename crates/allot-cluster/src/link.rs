//! The cluster link: one loop per gateway that carries its node of the combining tree
//! (`allot_model::cluster::Node`) over an [`Engine`]. Sensor: the gateway's local demand
//! and the engine's keys and messages; controller: the model's node; actuator: the quota
//! the gateway enforces this window, published on a watch channel.
//!
//! Each window boundary `b` (window numbers from the wall clock, so every gateway agrees):
//! renew the root's lease (if this node is root) or stand for election when the root's
//! key has not been renewed for a lease; renew this node's membership and reread the
//! members every few windows; take the node's place in the tree when root, epoch or
//! members changed; close window `b − 1` with the local demand (a report up, or the plan
//! at the root); publish what the node enforces in `b`. Between boundaries: reports from
//! children, quotas from the parent, an aggregator's deadline, changes of the root's key
//! and of the agreement set.
//!
//! Election (DESIGN.md "Cluster"): the root's key is won by create-if-absent; its
//! revision is the fencing epoch, written into the key's value so that every member
//! learns it, and kept on disk as the highest seen: a root of a lower epoch (a rolled-back
//! engine, a split leader) is never obeyed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use allot_model::agreements::{AgreementSet, AgreementsSpec};
use allot_model::cluster::{Enforcement, Node, Outgoing, Quotas, Report, Shape, Source};
use allot_model::planner::Planner;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::engine::{Bucket, Engine, EngineError};

/// The key of the root's lease in [`Bucket::Election`].
pub const ROOT_KEY: &str = "root";
/// The key of the agreement set in [`Bucket::Config`].
pub const AGREEMENTS_KEY: &str = "agreements";
/// The key of the mandatory-only plan in [`Bucket::Config`].
pub const MANDATORY_KEY: &str = "mandatory";

/// Settings of one link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The cluster's name (subjects are `allot.<cluster>.up.<node>` and `….down.<node>`).
    pub cluster: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Most children per node.
    pub fanout: usize,
    /// Window length.
    pub window: Duration,
    /// How long an aggregator waits per level below it for its children's reports.
    pub hop: Duration,
    /// The root's lease (the election bucket's `max_age` should be the same).
    pub root_lease: Duration,
    /// A member's key lives this long unless renewed (the members bucket's `max_age`).
    pub member_lease: Duration,
    /// How often membership is renewed and reread, in windows.
    pub member_refresh_windows: u64,
    /// File keeping the highest epoch seen, if any.
    pub epoch_file: Option<PathBuf>,
    /// Unix time in milliseconds at `origin`: window numbers are `unix_ms / window_ms`.
    pub origin_unix_ms: u64,
    /// The instant matching `origin_unix_ms`.
    pub origin: Instant,
}

/// What this node is in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not (yet) in a tree: enforcing its fallback.
    Detached,
    /// Plans for the whole cluster.
    Root,
    /// Sums its children's demand and splits its quota among them.
    Aggregator,
    /// Only reports its own demand.
    Leaf,
}

impl Role {
    /// The name used in metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Detached => "detached",
            Role::Root => "root",
            Role::Aggregator => "aggregator",
            Role::Leaf => "leaf",
        }
    }
}

/// The link's state, published every window and after each change.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkStatus {
    /// This node's name.
    pub node: String,
    /// Its role now.
    pub role: Role,
    /// The highest epoch seen.
    pub epoch: u64,
    /// The root obeyed, if any.
    pub root: Option<String>,
    /// The parent, if any.
    pub parent: Option<String>,
    /// The children that report to this node, in name order.
    pub children: Vec<String>,
    /// Members known at the last reading.
    pub members: usize,
    /// The current window's number.
    pub window: u64,
    /// What to enforce in this window (units per window, per principal of the set in
    /// force), once the first window has begun.
    pub enforcement: Option<Enforcement>,
    /// Windows since the last fresh quota (0 when this window's is fresh).
    pub windows_since_fresh: u64,
    /// The whole cluster's demand behind the plan in force, units per window per
    /// principal (empty until a plan has been made or received).
    pub global_demand: Vec<f64>,
    /// Messages published.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Messages ignored (malformed, from outside the tree, of another epoch).
    pub ignored: u64,
    /// The slowest single step of the tree's logic so far (closing a window, taking a
    /// report or quotas, a deadline), microseconds: at the root it includes summing the
    /// reports and solving the plan.
    pub slowest_step_us: u64,
    /// The most CPU time a single step took so far, microseconds: what the step itself
    /// cost, without the time its thread waited for a CPU (which `slowest_step_us`
    /// includes, and which a loaded machine makes long).
    pub slowest_step_cpu_us: u64,
    /// The last engine error, until a chore (renewing the lease or the membership)
    /// succeeds again.
    pub engine_error: Option<String>,
    /// The fingerprint of the agreement set planned with ([`fingerprint`]): equal on
    /// every gateway that plans with the same set, so a newly published set can be seen
    /// to have reached each one.
    pub agreements: String,
}

impl LinkStatus {
    /// The status before the link has started.
    pub fn new(node: &str) -> LinkStatus {
        LinkStatus {
            node: node.to_string(),
            role: Role::Detached,
            epoch: 0,
            root: None,
            parent: None,
            children: Vec::new(),
            members: 0,
            window: 0,
            enforcement: None,
            windows_since_fresh: 0,
            global_demand: Vec::new(),
            sent: 0,
            received: 0,
            ignored: 0,
            slowest_step_us: 0,
            slowest_step_cpu_us: 0,
            engine_error: None,
            agreements: String::new(),
        }
    }
}

/// A fingerprint of an agreement set: 16 hex digits of the 64-bit FNV-1a hash of its
/// JSON form (the form shared in [`Bucket::Config`]); empty if it cannot be written.
pub fn fingerprint(spec: &AgreementsSpec) -> String {
    let Ok(bytes) = serde_json::to_vec(spec) else {
        return String::new();
    };
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Why the link stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The engine failed at start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Another live gateway holds this node's name.
    #[error("node name `{0}` is already a live member of the cluster (another gateway uses it)")]
    NameTaken(String),
}

/// The root key's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RootValue {
    node: String,
    /// The winning revision, 0 until the winner has written it.
    epoch: u64,
}

/// A member key's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MemberValue {
    node: String,
    /// Tells this process from an earlier one of the same name.
    instance: u64,
}

fn up_subject(cluster: &str, node: &str) -> String {
    format!("allot.{cluster}.up.{node}")
}

fn down_subject(cluster: &str, node: &str) -> String {
    format!("allot.{cluster}.down.{node}")
}

/// The highest epoch kept in `path` (0 if none or unreadable).
fn read_epoch(path: &Option<PathBuf>) -> u64 {
    path.as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_epoch(path: &Option<PathBuf>, epoch: u64) {
    let Some(path) = path else {
        return;
    };
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, format!("{epoch}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the cluster epoch on disk");
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The planner of a shared agreement set, if it is valid.
fn planner_of(spec: &AgreementsSpec) -> Option<(AgreementSet, Arc<Planner>)> {
    let set = AgreementSet::from_spec(spec).ok()?;
    let planner = Arc::new(Planner::per_window(&set));
    Some((set, planner))
}

/// The longest one key-value request of a chore may take before it counts as failed
/// (it is retried at a later boundary).
const REQUEST_LIMIT: Duration = Duration::from_secs(2);

/// How long a root leads on while its lease goes unrenewed because the engine does not
/// answer (requests fail or time out), as long as every child still reports: the tree's
/// messages flow without the key-value store, and a JetStream stream whose leader's
/// server died takes seconds to elect another (longer than a lease of a few windows),
/// during which no other gateway can win the root's key either. Past this, or once a
/// child falls silent, the root steps down as its lease says.
pub const RIDE_THROUGH: Duration = Duration::from_secs(30);

/// One key-value request, failed if it takes longer than `limit`.
async fn bounded<T>(
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| EngineError::Unavailable("a key-value request timed out".into()))?
}

async fn join_opt<T>(task: &mut Option<tokio::task::JoinHandle<T>>) -> Option<T> {
    match task {
        Some(t) => t.await.ok(),
        None => std::future::pending().await,
    }
}

fn root_bytes(value: &RootValue) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// What the root's chore found.
#[derive(Debug)]
struct RootFound {
    /// When the chore began: a renewal or a win holds from then at the latest.
    began: Instant,
    outcome: Option<RootOutcome>,
    errors: Vec<EngineError>,
}

#[derive(Debug)]
enum RootOutcome {
    /// The lease renewed: the key's new revision and value.
    Renewed(u64, RootValue),
    /// The election won: the key's revision and value (with the epoch).
    Won(u64, RootValue),
    /// The key holds another value: its revision and value.
    Seen(u64, Bytes),
}

/// Renews the root's lease (`renew`: the revision held and the value) or stands for
/// election with epochs above `floor` (taking over the key from revision `stale`, seen
/// unrenewed for a lease).
async fn root_chore<E: Engine>(
    engine: E,
    node: String,
    renew: Option<(u64, RootValue)>,
    floor: u64,
    stale: Option<u64>,
    limit: Duration,
) -> RootFound {
    let mut found = RootFound {
        began: Instant::now(),
        outcome: None,
        errors: Vec::new(),
    };
    let Some((rev, value)) = renew else {
        stand(&engine, node, floor, None, stale, limit, &mut found).await;
        return found;
    };
    match bounded(
        limit,
        engine.update(Bucket::Election, ROOT_KEY, root_bytes(&value), rev),
    )
    .await
    {
        Ok(Some(next)) => found.outcome = Some(RootOutcome::Renewed(next, value)),
        // Changed or expired, unless a renewal that timed out landed after all: the
        // key is still this node's if it holds this node's value.
        Ok(None) => match bounded(limit, engine.get(Bucket::Election, ROOT_KEY)).await {
            Ok(Some(e))
                if serde_json::from_slice::<RootValue>(&e.value).ok().as_ref() == Some(&value) =>
            {
                found.outcome = Some(RootOutcome::Renewed(e.revision, value));
            }
            Ok(Some(e)) => found.outcome = Some(RootOutcome::Seen(e.revision, e.value)),
            // Expired while the engine could not renew it (the root rode it through):
            // stand again at once.
            Ok(None) => {
                stand(
                    &engine,
                    node,
                    floor,
                    Some((rev, value.epoch)),
                    None,
                    limit,
                    &mut found,
                )
                .await
            }
            Err(e) => found.errors.push(e),
        },
        Err(e) => found.errors.push(e),
    }
    found
}

/// Stands for election: create-if-absent, or, when the key still holds revision `stale`
/// (a root's write seen unrenewed for a whole lease, which the engine has not expired
/// yet), update-by-revision from it; then writes the epoch into the key. The epoch is the
/// winning revision (at least `floor + 1`), except for a root whose own key expired
/// unrenewed (`held`: the revision it last held and its epoch): if its win is the
/// bucket's very next revision, nothing was written to the election bucket between (no
/// other gateway won the key meanwhile), so its term goes on under the same epoch and the
/// tree need not change.
async fn stand<E: Engine>(
    engine: &E,
    node: String,
    floor: u64,
    held: Option<(u64, u64)>,
    stale: Option<u64>,
    limit: Duration,
    found: &mut RootFound,
) {
    let claim = root_bytes(&RootValue {
        node: node.clone(),
        epoch: 0,
    });
    let won = match bounded(
        limit,
        engine.create(Bucket::Election, ROOT_KEY, claim.clone()),
    )
    .await
    {
        Ok(Some(rev)) => Some(rev),
        // Someone holds it: read who, and take it over if it is the write seen unrenewed.
        Ok(None) => match bounded(limit, engine.get(Bucket::Election, ROOT_KEY)).await {
            Ok(Some(e)) if Some(e.revision) == stale => {
                match bounded(
                    limit,
                    engine.update(Bucket::Election, ROOT_KEY, claim, e.revision),
                )
                .await
                {
                    Ok(won) => won,
                    Err(e) => {
                        found.errors.push(e);
                        None
                    }
                }
            }
            Ok(Some(e)) => {
                found.outcome = Some(RootOutcome::Seen(e.revision, e.value));
                None
            }
            Ok(None) => None,
            Err(e) => {
                found.errors.push(e);
                None
            }
        },
        Err(e) => {
            found.errors.push(e);
            None
        }
    };
    let Some(rev) = won else {
        return;
    };
    // Won: the winning revision is the epoch; write it for everyone.
    let epoch = match held {
        Some((last, epoch)) if rev == last + 1 && epoch >= floor => epoch,
        _ => rev.max(floor + 1),
    };
    let value = RootValue { node, epoch };
    match bounded(
        limit,
        engine.update(Bucket::Election, ROOT_KEY, root_bytes(&value), rev),
    )
    .await
    {
        Ok(Some(next)) => found.outcome = Some(RootOutcome::Won(next, value)),
        Ok(None) => {}
        Err(e) => found.errors.push(e),
    }
}

/// What the members' chore found.
#[derive(Debug)]
struct MembersFound {
    /// The membership's revision after the chore (`None` inside: neither renewed nor
    /// created); `None` if the engine failed before knowing.
    member_rev: Option<Option<u64>>,
    /// Whether the membership held had expired and was created again.
    rejoined: bool,
    /// Every live member, if read.
    members: Option<BTreeSet<String>>,
    errors: Vec<EngineError>,
}

/// Renews `node`'s membership held at `rev` (joining again if it expired) and rereads
/// the members.
async fn members_chore<E: Engine>(
    engine: E,
    node: String,
    value: Bytes,
    rev: Option<u64>,
    limit: Duration,
) -> MembersFound {
    let mut found = MembersFound {
        member_rev: None,
        rejoined: false,
        members: None,
        errors: Vec::new(),
    };
    let renewed = match rev {
        Some(rev) => {
            bounded(
                limit,
                engine.update(Bucket::Members, &node, value.clone(), rev),
            )
            .await
        }
        None => Ok(None),
    };
    match renewed {
        Ok(Some(rev)) => found.member_rev = Some(Some(rev)),
        // Expired (paused, partitioned): join again.
        Ok(None) => match bounded(limit, engine.create(Bucket::Members, &node, value)).await {
            Ok(created) => {
                found.rejoined = rev.is_some() && created.is_some();
                found.member_rev = Some(created);
            }
            Err(e) => found.errors.push(e),
        },
        Err(e) => found.errors.push(e),
    }
    match bounded(limit, engine.entries(Bucket::Members)).await {
        Ok(entries) => found.members = Some(entries.into_iter().map(|e| e.key).collect()),
        Err(e) => found.errors.push(e),
    }
    found
}

struct Link<E: Engine> {
    engine: E,
    config: LinkConfig,
    node: Node,
    status: LinkStatus,
    instance: u64,
    member_rev: Option<u64>,
    members: BTreeSet<String>,
    /// The root key as last seen: node, epoch, when.
    root_seen: Option<(String, u64, Instant)>,
    /// The root key's revision as last seen: a read that finds the same revision again
    /// finds the key not renewed since.
    root_rev: Option<u64>,
    /// When this node last stood for election.
    stood_at: Option<Instant>,
    /// This node's lease revision while it is root.
    my_root_rev: Option<u64>,
    /// When the root's lease was last won or renewed by this node (the renewal's start).
    renewed_at: Option<Instant>,
    /// The root's lease being renewed, or an election being stood for, beside the
    /// window step.
    root_chore: Option<tokio::task::JoinHandle<RootFound>>,
    /// The membership being renewed and the members reread, beside the window step.
    members_chore: Option<tokio::task::JoinHandle<MembersFound>>,
    /// The window the members were last reread at.
    members_at: Option<u64>,
    /// When the members read last became doubtful: the engine failed, or this node found
    /// its own membership expired and joined again. Keys may have expired meanwhile that
    /// their live owners renew only at their next refresh.
    doubted_at: Option<Instant>,
    /// What the current shape was built from.
    shaped: Option<(String, u64, BTreeSet<String>)>,
    down: Option<mpsc::Receiver<Bytes>>,
    deadline: Option<(Instant, u64)>,
    spec: AgreementsSpec,
    /// The engine's interruptions counted at the last boundary.
    interruptions: u64,
}

/// Runs the link until `shutdown` resolves. `spec` is this gateway's agreement set: it
/// is shared through the engine, and a set published by another gateway replaces it
/// (`status` then carries quotas for the new set's principals). `demand` holds the local
/// demand of the window that just closed, units per window per principal.
pub async fn run<E: Engine>(
    engine: E,
    config: LinkConfig,
    spec: AgreementsSpec,
    demand: watch::Receiver<Vec<f64>>,
    status: watch::Sender<LinkStatus>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LinkError> {
    let planner = planner_of(&spec)
        .map(|(_, p)| p)
        .ok_or_else(|| EngineError::Unavailable("the agreement set is not valid".into()))?;
    let mut node = Node::new(config.node.clone(), planner);
    node.observe_epoch(read_epoch(&config.epoch_file));
    let instance = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(config.origin_unix_ms);
        h.finish()
    };
    let mut link = Link {
        status: LinkStatus {
            epoch: node.epoch(),
            agreements: fingerprint(&spec),
            ..LinkStatus::new(&config.node)
        },
        engine,
        node,
        instance,
        member_rev: None,
        members: BTreeSet::new(),
        root_seen: None,
        root_rev: None,
        stood_at: None,
        my_root_rev: None,
        renewed_at: None,
        root_chore: None,
        members_chore: None,
        members_at: None,
        doubted_at: None,
        shaped: None,
        down: None,
        deadline: None,
        spec,
        config,
        interruptions: 0,
    };
    link.interruptions = link.engine.interruptions();
    link.join().await?;
    let mut up = Some(
        link.engine
            .subscribe(&up_subject(&link.config.cluster, &link.config.node))
            .await?,
    );
    let mut election = Some(link.engine.watch(Bucket::Election).await?);
    let mut shared = Some(link.engine.watch(Bucket::Config).await?);
    link.share_agreements().await;
    if let Ok(Some(e)) = link.engine.get(Bucket::Election, ROOT_KEY).await {
        link.saw_root(e.revision, &e.value);
    }
    tokio::pin!(shutdown);
    let window_ms = link.config.window.as_millis().max(1) as u64;
    // The next boundary is kept across iterations, not recomputed from the clock: a
    // message handled at the boundary's very instant must not make the loop skip it (a
    // skipped boundary is a lost report and a root's lease left unrenewed).
    let mut next_b = link.unix_ms(Instant::now()) / window_ms + 1;
    loop {
        let next = link.instant_of(next_b * window_ms);
        let deadline = link.deadline.map(|(at, _)| at);
        let stand_at = link.election_at();
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(next) => {
                // Late by more than a window (a paused process): the current window.
                let b = (link.unix_ms(Instant::now().max(next)) / window_ms).max(next_b);
                next_b = b + 1;
                let local = demand.borrow().clone();
                link.boundary(b, &local).await;
                status.send_replace(link.status.clone());
            }
            found = join_opt(&mut link.root_chore) => {
                link.root_chore = None;
                if let Some(found) = found {
                    link.root_found(found);
                    // A root won or lost mid-window takes its place at once, so the
                    // tree's next reports go to it.
                    link.retake_place(&status).await;
                }
            }
            found = join_opt(&mut link.members_chore) => {
                link.members_chore = None;
                if let Some(found) = found {
                    link.members_found(found);
                }
            }
            _ = sleep_opt(stand_at) => link.start_root_chore(None),
            _ = sleep_opt(deadline) => {
                if let Some((_, w)) = link.deadline.take() {
                    let out = link.step(|n| n.deadline(w));
                    link.send(out).await;
                }
            }
            msg = recv_opt(&mut up) => match msg {
                Some(bytes) => {
                    link.status.received += 1;
                    match serde_json::from_slice::<Report>(&bytes) {
                        Ok(r) => match link.step(|n| n.on_report(r)) {
                            Ok(out) => link.send(out).await,
                            Err(_) => link.status.ignored += 1,
                        },
                        Err(_) => link.status.ignored += 1,
                    }
                }
                None => up = None,
            },
            msg = recv_opt(&mut link.down) => match msg {
                Some(bytes) => {
                    link.status.received += 1;
                    match serde_json::from_slice::<Quotas>(&bytes) {
                        Ok(q) => match link.step(|n| n.on_quotas(&q)) {
                            Ok(out) => {
                                link.root_alive(q.epoch);
                                link.send(out).await;
                            }
                            Err(_) => link.status.ignored += 1,
                        },
                        Err(_) => link.status.ignored += 1,
                    }
                }
                None => link.down = None,
            },
            entry = recv_opt(&mut election) => match entry {
                Some(e) if e.key == ROOT_KEY => {
                    link.saw_root(e.revision, &e.value);
                    link.retake_place(&status).await;
                }
                Some(_) => {}
                None => election = None,
            },
            entry = recv_opt(&mut shared) => match entry {
                Some(e) if e.key == AGREEMENTS_KEY => link.adopt_agreements(&e.value),
                Some(_) => {}
                None => shared = None,
            },
        }
    }
    // Leaving: give up the root's lease and the membership so others move on at once.
    for chore in [
        link.root_chore.take().map(|t| t.abort_handle()),
        link.members_chore.take().map(|t| t.abort_handle()),
    ]
    .into_iter()
    .flatten()
    {
        chore.abort();
    }
    if let Some(rev) = link.my_root_rev {
        if let Ok(Some(e)) = link.engine.get(Bucket::Election, ROOT_KEY).await {
            if e.revision == rev {
                let _ = link.engine.delete(Bucket::Election, ROOT_KEY).await;
            }
        }
    }
    let _ = link.engine.delete(Bucket::Members, &link.config.node).await;
    Ok(())
}

impl<E: Engine> Link<E> {
    fn unix_ms(&self, at: Instant) -> u64 {
        self.config.origin_unix_ms
            + u64::try_from(at.saturating_duration_since(self.config.origin).as_millis())
                .unwrap_or(u64::MAX / 2)
    }

    fn instant_of(&self, unix_ms: u64) -> Instant {
        self.config.origin
            + Duration::from_millis(unix_ms.saturating_sub(self.config.origin_unix_ms))
    }

    /// One step of the tree's logic, timed for [`LinkStatus::slowest_step_us`] and
    /// [`LinkStatus::slowest_step_cpu_us`] (a step runs on one thread from start to end).
    fn step<T>(&mut self, f: impl FnOnce(&mut Node) -> T) -> T {
        let cpu_began = thread_cpu_ns();
        let began = std::time::Instant::now();
        let out = f(&mut self.node);
        let us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.status.slowest_step_us = self.status.slowest_step_us.max(us);
        if let (Some(from), Some(to)) = (cpu_began, thread_cpu_ns()) {
            let cpu_us = to.saturating_sub(from) / 1000;
            self.status.slowest_step_cpu_us = self.status.slowest_step_cpu_us.max(cpu_us);
        }
        out
    }

    fn member_value(&self) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&MemberValue {
                node: self.config.node.clone(),
                instance: self.instance,
            })
            .unwrap_or_default(),
        )
    }

    /// Becomes a member: create-if-absent; a live key of another process with the same
    /// name is waited out for one lease, then it is an error.
    async fn join(&mut self) -> Result<(), LinkError> {
        let key = self.config.node.clone();
        let lease_end = Instant::now() + self.config.member_lease + self.config.window;
        loop {
            if let Some(rev) = self
                .engine
                .create(Bucket::Members, &key, self.member_value())
                .await?
            {
                self.member_rev = Some(rev);
                return Ok(());
            }
            let theirs = self.engine.get(Bucket::Members, &key).await?;
            let ours = theirs.as_ref().and_then(|e| {
                serde_json::from_slice::<MemberValue>(&e.value)
                    .ok()
                    .filter(|m| m.instance == self.instance)
                    .map(|_| e.revision)
            });
            if let Some(rev) = ours {
                self.member_rev = Some(rev);
                return Ok(());
            }
            if Instant::now() >= lease_end {
                return Err(LinkError::NameTaken(key));
            }
            tokio::time::sleep(self.config.window).await;
        }
    }

    async fn share_agreements(&mut self) {
        let Ok(text) = serde_json::to_vec(&self.spec) else {
            return;
        };
        let current = self.engine.get(Bucket::Config, AGREEMENTS_KEY).await;
        if let Ok(Some(e)) = &current {
            if e.value.as_ref() == text.as_slice() {
                return;
            }
        }
        if let Err(e) = self
            .engine
            .put(Bucket::Config, AGREEMENTS_KEY, Bytes::from(text))
            .await
        {
            self.failed(&e);
            return;
        }
        if let Some((_, planner)) = planner_of(&self.spec) {
            let plan = allot_model::cluster::mandatory_plan(&planner);
            if let Ok(bytes) = serde_json::to_vec(&plan) {
                let _ = self
                    .engine
                    .put(Bucket::Config, MANDATORY_KEY, Bytes::from(bytes))
                    .await;
            }
        }
    }

    /// Another gateway published an agreement set: plan with it from now on.
    fn adopt_agreements(&mut self, value: &[u8]) {
        let Ok(spec) = serde_json::from_slice::<AgreementsSpec>(value) else {
            self.status.ignored += 1;
            return;
        };
        if spec == self.spec {
            return;
        }
        match planner_of(&spec) {
            Some((_, planner)) => {
                tracing::info!("cluster: a new agreement set was published; planning with it");
                self.node.set_planner(planner);
                self.status.agreements = fingerprint(&spec);
                self.spec = spec;
            }
            None => self.status.ignored += 1,
        }
    }

    /// The root's key changed.
    fn saw_root(&mut self, revision: u64, value: &[u8]) {
        if value.is_empty() && self.my_root_rev.is_none() {
            // Deleted by a root that left: no root now; stand at once.
            self.root_seen = None;
            self.root_rev = None;
            return;
        }
        let Ok(root) = serde_json::from_slice::<RootValue>(value) else {
            return; // being written
        };
        if root.epoch == 0 {
            return;
        }
        if root.epoch < self.node.epoch() {
            // A root of a lower epoch than we have seen: never obeyed.
            self.status.ignored += 1;
            return;
        }
        if root.node != self.config.node {
            self.my_root_rev = None;
        } else if self.my_root_rev.is_none() {
            // This node's own key from a lease it no longer holds (it stepped down, or an
            // earlier process of the same name): not a live root; it expires.
            return;
        }
        if self.root_rev == Some(revision) && self.root_seen.is_some() {
            // The same write as before: not renewed since it was first seen.
            return;
        }
        self.root_rev = Some(revision);
        self.root_seen = Some((root.node, root.epoch, Instant::now()));
    }

    /// When this node is to stand for election between boundaries: as soon as the root's
    /// key, unrenewed, has expired (a lease after its last renewal was seen), not at the
    /// next boundary; retried every half window while the key is still there unrenewed.
    /// `None` while this node is root or a chore on the root's key is running.
    fn election_at(&self) -> Option<Instant> {
        if self.my_root_rev.is_some() || self.root_chore.is_some() {
            return None;
        }
        let due = self
            .root_seen
            .as_ref()
            .map(|(_, _, seen)| *seen + self.config.root_lease);
        let retry = self.stood_at.map(|t| t + self.config.window / 2);
        match (due, retry) {
            (Some(d), Some(r)) => Some(d.max(r)),
            (d, r) => d.or(r).or_else(|| Some(Instant::now())),
        }
    }

    /// Starts renewing the root's lease (`renew`: the revision held and the value) or,
    /// without one, standing for election.
    fn start_root_chore(&mut self, renew: Option<(u64, RootValue)>) {
        if self.root_chore.is_some() {
            return;
        }
        if renew.is_none() {
            self.stood_at = Some(Instant::now());
        }
        // The root's write seen unrenewed for a whole lease: its holder's lease is over
        // (a lease counts from the start of the renewal, before the write was seen).
        let stale = self
            .root_seen
            .as_ref()
            .filter(|(_, _, seen)| seen.elapsed() >= self.config.root_lease)
            .and(self.root_rev);
        let limit = self.request_limit();
        let engine = self.engine.clone();
        let node = self.config.node.clone();
        let floor = self.node.epoch();
        self.root_chore = Some(tokio::spawn(root_chore(
            engine, node, renew, floor, stale, limit,
        )));
    }

    /// How long one engine request may take.
    fn request_limit(&self) -> Duration {
        (self.config.root_lease / 2).clamp(self.config.window, REQUEST_LIMIT)
    }

    /// Fresh quotas of `epoch` arrived from the parent: the root of that epoch planned
    /// them a moment ago, so it is alive whatever the engine's keys say (they may be
    /// stuck in an election of the engine's own).
    fn root_alive(&mut self, epoch: u64) {
        if let Some((_, e, seen)) = &mut self.root_seen {
            if *e == epoch {
                *seen = Instant::now();
            }
        }
    }

    /// Leaves the tree: no root obeyed, no parent, no children.
    fn detach_tree(&mut self) {
        if self.shaped.is_some() {
            self.node.leave();
            self.shaped = None;
            self.down = None;
            self.status.role = Role::Detached;
            self.status.parent = None;
            self.status.children.clear();
        }
    }

    /// An engine operation failed: shown in the status, and told to the node (messages
    /// around it may have been lost together).
    fn failed(&mut self, e: &EngineError) {
        self.status.engine_error = Some(e.to_string());
        self.doubted_at = Some(Instant::now());
        // The window now, not the boundary's: an operation may have taken long.
        let now = self.unix_ms(Instant::now()) / self.config.window.as_millis().max(1) as u64;
        self.node.engine_failed(now.max(self.status.window));
    }

    async fn boundary(&mut self, b: u64, demand: &[f64]) {
        self.status.window = b;
        let interruptions = self.engine.interruptions();
        if interruptions != self.interruptions {
            self.interruptions = interruptions;
            self.node.engine_failed(b);
            self.doubted_at = Some(Instant::now());
        }
        self.chores(b);
        self.reshape().await;
        if b > 0 {
            let out = self.step(|n| n.close_window(b - 1, demand));
            self.send(out).await;
            if let Some(p) = self.node.position() {
                if !p.children.is_empty() {
                    let depth = self.shaped_depth();
                    let height = u64::from(p.height(depth).max(1));
                    let at = self.instant_of(b * self.config.window.as_millis() as u64)
                        + self.config.hop * height as u32;
                    self.deadline = Some((at, b - 1));
                }
            }
        }
        let e = self.node.enforce(b);
        self.status.windows_since_fresh = match e.source {
            Source::Fresh => 0,
            _ => self.status.windows_since_fresh + 1,
        };
        self.status.enforcement = Some(e);
        self.status.epoch = self.node.epoch();
        self.status.global_demand = self.node.global_demand().to_vec();
    }

    fn shaped_depth(&self) -> u32 {
        self.shaped
            .as_ref()
            .and_then(|(root, _, members)| {
                let m: Vec<String> = members.iter().cloned().collect();
                Shape::new(&m, root, self.config.fanout).ok()
            })
            .map_or(0, |s| s.depth())
    }

    /// Starts the key-value chores due at boundary `b`, each beside the window step (a
    /// JetStream request can wait seconds while the engine elects a leader of its own, and
    /// the tree must not wait with it): renewing the root's lease or standing for
    /// election, and renewing the membership and rereading the members. A chore still
    /// running is not started twice. A root whose last renewal is a lease old steps down
    /// first (its key may have expired and another gateway won it), unless it rides the
    /// engine's outage through: its renewals found no other root (they failed or did not
    /// answer), every child still reports, and the outage is shorter than
    /// [`RIDE_THROUGH`].
    fn chores(&mut self, b: u64) {
        let now = Instant::now();
        let unrenewed = self.renewed_at.map(|t| now.saturating_duration_since(t));
        let riding = unrenewed.is_some_and(|d| d < RIDE_THROUGH)
            && self.node.children_reporting(b.saturating_sub(1));
        if self.my_root_rev.is_some()
            && unrenewed.is_some_and(|d| d >= self.config.root_lease)
            && riding
        {
            // The tree is alive without the engine: it still knows its root is this node.
            if let Some((_, _, seen)) = &mut self.root_seen {
                *seen = now;
            }
        } else if self.my_root_rev.is_some()
            && unrenewed.is_none_or(|d| d >= self.config.root_lease)
        {
            tracing::warn!("cluster: the root's lease was not renewed for a lease; stepping down");
            self.my_root_rev = None;
            self.root_seen = None;
            self.detach_tree();
        }
        let limit = self.request_limit();
        if self.root_chore.is_none() {
            let renew = self.my_root_rev.map(|rev| {
                (
                    rev,
                    RootValue {
                        node: self.config.node.clone(),
                        epoch: self.node.epoch(),
                    },
                )
            });
            let expired = self.root_seen.as_ref().is_none_or(|(_, _, seen)| {
                now.saturating_duration_since(*seen) >= self.config.root_lease
            });
            if renew.is_some() || expired {
                self.start_root_chore(renew);
            }
        }
        let refresh = self.config.member_refresh_windows.max(1);
        let due = self.members.is_empty() || self.members_at.is_none_or(|w| b >= w + refresh);
        if self.members_chore.is_none() && due {
            self.members_at = Some(b);
            self.members_chore = Some(tokio::spawn(members_chore(
                self.engine.clone(),
                self.config.node.clone(),
                self.member_value(),
                self.member_rev,
                limit,
            )));
        }
    }

    /// What renewing the lease or standing for election found.
    fn root_found(&mut self, found: RootFound) {
        for e in &found.errors {
            self.failed(e);
        }
        if found.errors.is_empty() {
            // The engine answered: the error shown is over.
            self.status.engine_error = None;
        }
        match found.outcome {
            Some(RootOutcome::Renewed(rev, value)) if self.my_root_rev.is_some() => {
                self.my_root_rev = Some(rev);
                self.root_rev = Some(rev);
                self.renewed_at = Some(found.began);
                self.root_seen = Some((value.node, value.epoch, found.began));
            }
            Some(RootOutcome::Won(rev, value)) if value.epoch >= self.node.epoch() => {
                tracing::info!(epoch = value.epoch, "cluster: this gateway is the root");
                self.my_root_rev = Some(rev);
                self.root_rev = Some(rev);
                self.renewed_at = Some(found.began);
                self.node.observe_epoch(value.epoch);
                write_epoch(&self.config.epoch_file, value.epoch);
                self.root_seen = Some((value.node, value.epoch, found.began));
            }
            Some(RootOutcome::Seen(revision, value)) => {
                if self.my_root_rev.is_some() {
                    // The lease is lost: the key changed or expired.
                    self.my_root_rev = None;
                    self.root_seen = None;
                }
                self.saw_root(revision, &value);
            }
            _ => {}
        }
    }

    /// What renewing the membership and rereading the members found.
    fn members_found(&mut self, found: MembersFound) {
        for e in &found.errors {
            self.failed(e);
        }
        if found.errors.is_empty() {
            self.status.engine_error = None;
        }
        if let Some(rev) = found.member_rev {
            self.member_rev = rev;
        }
        if found.rejoined {
            self.doubted_at = Some(Instant::now());
        }
        if let Some(mut members) = found.members {
            members.insert(self.config.node.clone());
            // Right after the engine failed or this node's own membership expired, the
            // others' keys may have expired too (the engine was out, or this process
            // stopped), and they join again each at its next renewal. Until every live
            // member has had one (a member lease), the members known before stay, so the
            // tree does not drop them meanwhile.
            if self
                .doubted_at
                .is_some_and(|t| t.elapsed() < self.config.member_lease)
            {
                members.extend(self.members.iter().cloned());
            }
            self.status.members = members.len();
            self.members = members;
        }
    }

    /// Between boundaries: takes this node's place in the tree of the root in force if
    /// it changed, and shows it. Not shown while this window's boundary has not run yet
    /// (the process was stopped, the loop is late): the state held is an old window's,
    /// its quota included, and the boundary about to run publishes the current one.
    async fn retake_place(&mut self, status: &watch::Sender<LinkStatus>) {
        let before = self.shaped.clone();
        self.reshape().await;
        let window_ms = self.config.window.as_millis().max(1) as u64;
        let current = self.status.window == self.unix_ms(Instant::now()) / window_ms;
        if self.shaped != before && current {
            self.status.epoch = self.node.epoch();
            status.send_replace(self.status.clone());
        }
    }

    /// Takes this node's place in the tree of the root in force.
    async fn reshape(&mut self) {
        let Some((root, epoch, seen)) = self.root_seen.clone() else {
            return;
        };
        if Instant::now().saturating_duration_since(seen) >= self.config.root_lease * 2 {
            // The root's key has gone unrenewed for long: no tree until a new election.
            self.detach_tree();
            return;
        }
        let mut members = self.members.clone();
        members.insert(root.clone());
        members.insert(self.config.node.clone());
        let wanted = (root.clone(), epoch, members.clone());
        if self.shaped.as_ref() == Some(&wanted) {
            return;
        }
        let list: Vec<String> = members.iter().cloned().collect();
        let Ok(shape) = Shape::new(&list, &root, self.config.fanout) else {
            return;
        };
        if !self.node.reshape(epoch, &shape) {
            return;
        }
        if epoch > read_epoch(&self.config.epoch_file) {
            write_epoch(&self.config.epoch_file, epoch);
        }
        let parent = self.node.position().and_then(|p| p.parent.clone());
        let old_parent = self.status.parent.clone();
        if parent != old_parent || self.down.is_none() {
            self.down = match &parent {
                Some(p) => self
                    .engine
                    .subscribe(&down_subject(&self.config.cluster, p))
                    .await
                    .ok(),
                None => None,
            };
        }
        self.status.role = match self.node.position() {
            None => Role::Detached,
            Some(p) if p.is_root() => Role::Root,
            Some(p) if !p.children.is_empty() => Role::Aggregator,
            Some(_) => Role::Leaf,
        };
        self.status.parent = parent;
        self.status.children = self
            .node
            .position()
            .map(|p| p.children.clone())
            .unwrap_or_default();
        self.status.root = Some(root);
        self.shaped = Some(wanted);
    }

    async fn send(&mut self, out: Vec<Outgoing>) {
        for o in out {
            let (subject, bytes) = match o {
                Outgoing::Report { to, report } => (
                    up_subject(&self.config.cluster, &to),
                    serde_json::to_vec(&report),
                ),
                Outgoing::Quotas(q) => (
                    down_subject(&self.config.cluster, &self.config.node),
                    serde_json::to_vec(&q),
                ),
            };
            let Ok(bytes) = bytes else {
                continue;
            };
            match self.engine.publish(&subject, Bytes::from(bytes)).await {
                Ok(()) => self.status.sent += 1,
                Err(e) => self.failed(&e),
            }
        }
    }
}

/// The CPU time the calling thread has used, nanoseconds (`None` where the clock cannot be
/// read).
fn thread_cpu_ns() -> Option<u64> {
    use nix::time::{clock_gettime, ClockId};
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    let secs = u64::try_from(t.tv_sec()).ok()?;
    let nanos = u64::try_from(t.tv_nsec()).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}
