//! The cluster link on the in-memory engine, in paused time: one root is elected, the
//! quotas handed to the gateways sum to the single-gateway plan, and when the root goes
//! a new one takes over with a higher epoch.

use std::time::Duration;

use allot_cluster::link::{self, LinkConfig, LinkStatus, Role};
use allot_cluster::{Lifetimes, MemEngine};
use allot_model::agreements::{AgreementSpec, AgreementsSpec, Objective, PrincipalSpec};
use allot_model::cluster::Source;
use tokio::sync::{oneshot, watch};

const WINDOW: Duration = Duration::from_millis(100);

fn spec() -> AgreementsSpec {
    let principal = |name: &str, capacity: f64| PrincipalSpec {
        name: name.into(),
        capacity_units_per_s: capacity,
        price: 1.0,
        locality_limit_units_per_s: None,
    };
    let agreement = |to: &str, lower: f64| AgreementSpec {
        from: "S".into(),
        to: to.into(),
        share: [lower, 1.0],
    };
    AgreementsSpec {
        objective: Objective::Community,
        window_ms: 100,
        principals: vec![
            principal("S", 400.0),
            principal("A", 0.0),
            principal("B", 0.0),
        ],
        agreements: vec![agreement("A", 0.25), agreement("B", 0.75)],
    }
}

struct Gateway {
    status: watch::Receiver<LinkStatus>,
    stop: Option<oneshot::Sender<()>>,
    _demand: watch::Sender<Vec<f64>>,
    /// The link's task: aborting it is a crash (no leaving, its keys expire).
    task: tokio::task::JoinHandle<()>,
}

fn start(
    engine: &MemEngine,
    name: &str,
    demand: Vec<f64>,
    origin: tokio::time::Instant,
) -> Gateway {
    start_leased(engine, name, demand, origin, WINDOW * 2)
}

/// A gateway whose root lease is `root_lease`.
fn start_leased(
    engine: &MemEngine,
    name: &str,
    demand: Vec<f64>,
    origin: tokio::time::Instant,
    root_lease: Duration,
) -> Gateway {
    let (demand_tx, demand_rx) = watch::channel(demand);
    let (status_tx, status_rx) = watch::channel(LinkStatus::new(name));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let config = LinkConfig {
        cluster: "test".into(),
        node: name.into(),
        fanout: 32,
        window: WINDOW,
        hop: WINDOW / 10,
        root_lease,
        member_lease: Duration::from_secs(1),
        member_refresh_windows: 5,
        epoch_file: None,
        origin_unix_ms: 1_000_000,
        origin,
    };
    let engine = engine.clone();
    let task = tokio::spawn(async move {
        let stopped = async {
            let _ = stop_rx.await;
        };
        if let Err(e) = link::run(engine, config, spec(), demand_rx, status_tx, stopped).await {
            panic!("link: {e}");
        }
    });
    Gateway {
        status: status_rx,
        stop: Some(stop_tx),
        _demand: demand_tx,
        task,
    }
}

fn totals(gateways: &[&Gateway]) -> (f64, f64, usize) {
    let mut a = 0.0;
    let mut b = 0.0;
    let mut fresh = 0;
    for g in gateways {
        let s = g.status.borrow();
        if let Some(e) = &s.enforcement {
            a += e.units[1];
            b += e.units[2];
            if e.source == Source::Fresh {
                fresh += 1;
            }
        }
    }
    (a, b, fresh)
}

/// Waits, at most `windows` windows, until every gateway enforces a fresh quota of the
/// same window; called in the middle of a window, it reads there, never at a boundary's
/// instant. The totals as last read.
async fn settled(gateways: &[&Gateway], windows: u32) -> (f64, f64, usize) {
    for _ in 0..windows {
        let (a, b, fresh) = totals(gateways);
        let same_window = gateways
            .windows(2)
            .all(|p| p[0].status.borrow().window == p[1].status.borrow().window);
        if fresh == gateways.len() && same_window {
            return (a, b, fresh);
        }
        tokio::time::sleep(WINDOW).await;
    }
    totals(gateways)
}

/// For `windows` windows, every gateway holds a quota at most one window old of `epoch`,
/// and together they never hand out more than capacity (40 units a window).
async fn steady_for(gateways: &[&Gateway], windows: u32, epoch: u64, when: &str) {
    for _ in 0..windows {
        tokio::time::sleep(WINDOW).await;
        for x in gateways {
            let s = x.status.borrow();
            assert!(
                s.windows_since_fresh <= 1 && s.epoch == epoch,
                "{} {when}: {:?}",
                s.node,
                *s
            );
        }
        let (a, b, _) = totals(gateways);
        assert!(a + b <= 40.0 + 1e-6, "A {a} B {b} {when}");
    }
}

#[tokio::test(start_paused = true)]
async fn three_gateways_elect_one_root_share_the_plan_and_replace_a_root_that_leaves() {
    let engine = MemEngine::new(Lifetimes {
        member: Duration::from_secs(1),
        root: WINDOW * 2,
    });
    let origin = tokio::time::Instant::now();
    // Per window: A 10 + 10, B 30 + 10 on 40 units: both at their floors, A 10, B 30.
    let mut g = vec![
        start(&engine, "g1", vec![0.0, 10.0, 0.0], origin),
        start(&engine, "g2", vec![0.0, 10.0, 30.0], origin),
        start(&engine, "g3", vec![0.0, 0.0, 10.0], origin),
    ];
    // Half a window past a boundary: every gateway has taken it.
    tokio::time::sleep(Duration::from_secs(2) + WINDOW / 2).await;
    let roles: Vec<Role> = g.iter().map(|x| x.status.borrow().role).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == Role::Root).count(),
        1,
        "{roles:?}"
    );
    let epoch = g[0].status.borrow().epoch;
    assert!(epoch > 0);
    assert!(g.iter().all(|x| x.status.borrow().epoch == epoch));
    let (a, b, fresh) = settled(&g.iter().collect::<Vec<_>>(), 10).await;
    assert_eq!(fresh, 3);
    assert!(
        (a - 10.0).abs() < 1e-6 && (b - 30.0).abs() < 1e-6,
        "A {a} B {b}"
    );
    // g2 saw 3/4 of B's demand: 3/4 of B's 30.
    let b2 = g[1]
        .status
        .borrow()
        .enforcement
        .clone()
        .expect("enforcing")
        .units[2];
    assert!((b2 - 22.5).abs() < 1e-6, "{b2}");

    // The root leaves: within a few windows another is root, with a higher epoch.
    let root = roles.iter().position(|r| *r == Role::Root).expect("a root");
    if let Some(stop) = g[root].stop.take() {
        let _ = stop.send(());
    }
    let gone = g.remove(root);
    drop(gone);
    // Half a window past a boundary: every gateway has taken it.
    tokio::time::sleep(Duration::from_secs(2) + WINDOW / 2).await;
    let roles: Vec<Role> = g.iter().map(|x| x.status.borrow().role).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == Role::Root).count(),
        1,
        "{roles:?}"
    );
    assert!(g.iter().all(|x| x.status.borrow().epoch > epoch));
    let (a, b, fresh) = settled(&g.iter().collect::<Vec<_>>(), 10).await;
    assert_eq!(fresh, 2);
    assert!(a + b <= 40.0 + 1e-6, "A {a} B {b}");
}

#[tokio::test(start_paused = true)]
async fn a_second_gateway_with_a_live_name_is_refused() {
    let engine = MemEngine::new(Lifetimes {
        member: Duration::from_secs(1),
        root: WINDOW * 2,
    });
    let origin = tokio::time::Instant::now();
    let _first = start(&engine, "same", vec![0.0; 3], origin);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (demand_tx, demand_rx) = watch::channel(vec![0.0; 3]);
    let (status_tx, _status_rx) = watch::channel(LinkStatus::new("same"));
    let config = LinkConfig {
        cluster: "test".into(),
        node: "same".into(),
        fanout: 32,
        window: WINDOW,
        hop: WINDOW / 10,
        root_lease: WINDOW * 2,
        member_lease: Duration::from_secs(1),
        member_refresh_windows: 5,
        epoch_file: None,
        origin_unix_ms: 1_000_000,
        origin,
    };
    let result = link::run(
        engine,
        config,
        spec(),
        demand_rx,
        status_tx,
        std::future::pending(),
    )
    .await;
    drop(demand_tx);
    assert!(
        matches!(result, Err(link::LinkError::NameTaken(_))),
        "{result:?}"
    );
}

/// Three gateways with root lease `lease` (A 10 + 10, B 30 + 10 per window), settled on
/// fresh quotas: the gateways, the epoch and which of them is root.
async fn three_settled(engine: &MemEngine, lease: Duration) -> ([Gateway; 3], u64, usize) {
    let origin = tokio::time::Instant::now();
    let g = [
        start_leased(engine, "g1", vec![0.0, 10.0, 0.0], origin, lease),
        start_leased(engine, "g2", vec![0.0, 10.0, 30.0], origin, lease),
        start_leased(engine, "g3", vec![0.0, 0.0, 10.0], origin, lease),
    ];
    tokio::time::sleep(Duration::from_secs(2) + WINDOW / 2).await;
    let (_, _, fresh) = settled(&g.iter().collect::<Vec<_>>(), 10).await;
    assert_eq!(fresh, 3);
    let epoch = g[0].status.borrow().epoch;
    let root = g
        .iter()
        .position(|x| x.status.borrow().role == Role::Root)
        .expect("a root");
    (g, epoch, root)
}

/// The engine's keys stall (a JetStream leader election) for less than the root's lease:
/// the tree goes on as if nothing happened, every gateway on fresh quotas every window,
/// one root of one epoch. Stalled for several leases while every child still reports,
/// the root rides the outage through under the same epoch; stalled while its children
/// are silent, it steps down once its lease has run out.
#[tokio::test(start_paused = true)]
async fn a_stall_of_the_engines_keys_leaves_the_tree_alone_while_every_child_reports() {
    let lease = WINDOW * 10;
    let engine = MemEngine::new(Lifetimes {
        member: Duration::from_secs(3),
        root: lease,
    });
    let (g, epoch, root) = three_settled(&engine, lease).await;
    let all: Vec<&Gateway> = g.iter().collect();
    // Stalled for 6 windows, less than the 10-window lease.
    engine.stall_keys(tokio::time::Instant::now() + WINDOW * 6);
    steady_for(&all, 20, epoch, "during the stall").await;
    assert_eq!(g[root].status.borrow().role, Role::Root);
    // Stalled for 3 leases: the root's renewals fail, but every child still reports, so
    // it leads on; its key expired meanwhile and nothing else was written to the
    // election bucket, so it wins the key back under the same epoch.
    engine.stall_keys(tokio::time::Instant::now() + lease * 3);
    steady_for(&all, 50, epoch, "during and after a stall of 3 leases").await;
    assert_eq!(g[root].status.borrow().role, Role::Root);
    // Stalled again with the children's reports lost (the root cut off from its tree):
    // it steps down once its last renewal is a lease old.
    engine.mute("allot.test.up.");
    engine.stall_keys(tokio::time::Instant::now() + lease * 3);
    tokio::time::sleep(lease + WINDOW * 3).await;
    assert_ne!(g[root].status.borrow().role, Role::Root);
    engine.unmute("allot.test.up.");
    // The stall over, one root of a higher epoch hands out fresh quotas again.
    tokio::time::sleep(lease * 4).await;
    let (a, b, fresh) = settled(&all, 20).await;
    assert_eq!(fresh, 3);
    assert!(a + b <= 40.0 + 1e-6, "A {a} B {b}");
    let roots = g
        .iter()
        .filter(|x| x.status.borrow().role == Role::Root)
        .count();
    assert_eq!(roots, 1);
    assert!(g.iter().all(|x| x.status.borrow().epoch > epoch));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_root_is_replaced_as_soon_as_its_key_expires_not_a_window_later() {
    crashed_root_replaced_within_its_lease(WINDOW * 10).await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_root_is_replaced_after_its_lease_even_while_the_engine_keeps_its_key() {
    // The engine expires the key only after three leases (its own expiry lagging): the
    // others take the key over from the revision they saw unrenewed for a lease.
    crashed_root_replaced_within_its_lease(WINDOW * 30).await;
}

/// Three gateways with a root lease of 10 windows on an engine that expires the root's
/// key after `engine_keeps`; the root crashes mid-window, and another is root within a
/// lease of the crash, every gateway left with its fresh quota two windows after.
async fn crashed_root_replaced_within_its_lease(engine_keeps: Duration) {
    let lease = WINDOW * 10;
    let engine = MemEngine::new(Lifetimes {
        member: Duration::from_secs(3),
        root: engine_keeps,
    });
    let (g, epoch, root) = three_settled(&engine, lease).await;
    // Mid-window, a little after the root renewed its lease at the boundary: it
    // crashes, leaving its key to expire a lease after that renewal.
    g[root].task.abort();
    let crashed_at = tokio::time::Instant::now();
    let others: Vec<&Gateway> = g
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != root)
        .map(|(_, x)| x)
        .collect();
    let new_root = loop {
        let elapsed = crashed_at.elapsed();
        assert!(elapsed < lease * 2, "no new root after {elapsed:?}");
        if let Some(x) = others.iter().find(|x| {
            let s = x.status.borrow();
            s.epoch > epoch && s.role == Role::Root
        }) {
            break (x.status.borrow().node.clone(), elapsed);
        }
        tokio::time::sleep(WINDOW / 20).await;
    };
    // The key expired less than a lease after the crash; standing at the next boundary
    // would have taken half a window more.
    assert!(
        new_root.1 <= lease,
        "{} root after {:?}",
        new_root.0,
        new_root.1
    );
    // Within two windows of that, every gateway left holds the new root's fresh quota.
    tokio::time::sleep(WINDOW * 2).await;
    for x in &others {
        let s = x.status.borrow();
        assert!(s.windows_since_fresh == 0 && s.epoch > epoch, "{:?}", *s);
    }
}
