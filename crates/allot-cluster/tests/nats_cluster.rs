//! The cluster link on a real three-node NATS cluster (installed into `target/` by the
//! support module): gateways elect one root and share the single-gateway plan; a wrong
//! credential is a clear error; a root that leaves is replaced with a higher epoch.
//! Waits are bounded and poll for the state wanted, so a loaded machine only slows them.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allot_cluster::link::{self, LinkConfig, LinkStatus, Role};
use allot_cluster::{ClusterConfig, Lifetimes, NatsEngine};
use allot_model::agreements::{AgreementSpec, AgreementsSpec, Objective, PrincipalSpec};
use allot_model::cluster::Source;
use tokio::sync::{oneshot, watch};

const WINDOW: Duration = Duration::from_millis(100);
const TOKEN: &str = "test-token-0b7c";
/// Longest any one condition may take to hold.
const PATIENCE: Duration = Duration::from_secs(30);

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

fn lifetimes() -> Lifetimes {
    Lifetimes {
        member: Duration::from_secs(3),
        root: WINDOW * 2,
    }
}

fn config(servers: &[String], cluster: &str, token: &str) -> ClusterConfig {
    let list = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text =
        format!("servers = [{list}]\nname = \"{cluster}\"\ntoken = \"{token}\"\nreplicas = 3\n");
    let c: ClusterConfig = toml::from_str(&text).expect("valid [cluster]");
    c.validate().expect("valid values");
    c
}

/// Connects, retrying while the new cluster elects its JetStream leader.
async fn connect(c: &ClusterConfig) -> NatsEngine {
    let end = tokio::time::Instant::now() + PATIENCE;
    loop {
        match NatsEngine::connect(c, lifetimes()).await {
            Ok(e) => return e,
            Err(e) if tokio::time::Instant::now() >= end => panic!("cannot connect: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

struct Gateway {
    status: watch::Receiver<LinkStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _demand: watch::Sender<Vec<f64>>,
}

fn start(engine: NatsEngine, cluster: &str, name: &str, demand: Vec<f64>) -> Gateway {
    let (demand_tx, demand_rx) = watch::channel(demand);
    let (status_tx, status_rx) = watch::channel(LinkStatus::new(name));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let config = LinkConfig {
        cluster: cluster.into(),
        node: name.into(),
        fanout: 32,
        window: WINDOW,
        hop: WINDOW / 10,
        root_lease: WINDOW * 2,
        member_lease: lifetimes().member,
        member_refresh_windows: 5,
        epoch_file: None,
        origin_unix_ms: unix_ms,
        origin: tokio::time::Instant::now(),
    };
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
        task,
        _demand: demand_tx,
    }
}

/// (A, B, gateways enforcing a fresh quota, roots, lowest epoch).
fn totals(gateways: &[Gateway]) -> (f64, f64, usize, usize, u64) {
    let (mut a, mut b, mut fresh, mut roots, mut epoch) = (0.0, 0.0, 0, 0, u64::MAX);
    for g in gateways {
        let s = g.status.borrow();
        if let Some(e) = &s.enforcement {
            a += e.units[1];
            b += e.units[2];
            fresh += usize::from(e.source == Source::Fresh);
        }
        roots += usize::from(s.role == Role::Root);
        epoch = epoch.min(s.epoch);
    }
    (a, b, fresh, roots, epoch)
}

async fn until(
    what: &str,
    gateways: &[Gateway],
    ok: impl Fn((f64, f64, usize, usize, u64)) -> bool,
) {
    let end = tokio::time::Instant::now() + PATIENCE;
    loop {
        let t = totals(gateways);
        if ok(t) {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("{what}: never held; last {t:?}");
        }
        tokio::time::sleep(WINDOW / 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_three_nats_servers_share_one_plan_and_replace_a_root_that_leaves() {
    let mut nats = match support::NatsCluster::start(TOKEN) {
        Ok(n) => n,
        Err(e) => panic!("a NATS cluster for the test: {e}"),
    };
    let cluster = format!("t{}", std::process::id());
    // A wrong credential is a clear error, not a hang.
    let wrong = NatsEngine::connect(&config(&nats.urls[..1], &cluster, "wrong"), lifetimes()).await;
    let err = wrong.expect_err("a wrong token is refused");
    assert!(err.to_string().contains("coordination engine"), "{err}");

    let mut g = Vec::new();
    // Per window: A 10 + 10, B 30 + 10 on 40 units: both at their floors, A 10, B 30.
    for (i, d) in [[0.0, 10.0, 0.0], [0.0, 10.0, 30.0], [0.0, 0.0, 10.0]]
        .iter()
        .enumerate()
    {
        // Each starts on another server and knows all three.
        let mut servers = nats.urls.clone();
        servers.rotate_left(i);
        let engine = connect(&config(&servers, &cluster, TOKEN)).await;
        g.push(start(engine, &cluster, &format!("g{i}"), d.to_vec()));
    }
    until(
        "one root, every quota fresh, the plan shared",
        &g,
        |(a, b, fresh, roots, _)| {
            roots == 1 && fresh == 3 && (a - 10.0).abs() < 1e-6 && (b - 30.0).abs() < 1e-6
        },
    )
    .await;
    let epoch = totals(&g).4;
    assert!(epoch > 0);

    // One NATS server fails: its gateway reconnects to another; nobody goes over capacity.
    nats.kill(2);
    tokio::time::sleep(WINDOW * 5).await;
    let (a, b, _, _, _) = totals(&g);
    let each: Vec<String> = g
        .iter()
        .map(|x| {
            let s = x.status.borrow();
            format!(
                "{} {:?} epoch {} window {} {:?} error {:?}",
                s.node, s.role, s.epoch, s.window, s.enforcement, s.engine_error
            )
        })
        .collect();
    assert!(
        a + b <= 40.0 + 1e-6,
        "never over capacity: A {a} B {b}; {each:#?}"
    );

    // The root leaves: another takes over with a higher epoch. (With a lease of two
    // windows the root may have stepped down while the killed server's streams elected
    // new leaders: wait for one.)
    until(
        "a root after the server's death",
        &g,
        |(_, _, _, roots, _)| roots == 1,
    )
    .await;
    let epoch = totals(&g).4;
    let root = g
        .iter()
        .position(|x| x.status.borrow().role == Role::Root)
        .expect("a root");
    let mut gone = g.remove(root);
    if let Some(stop) = gone.stop.take() {
        let _ = stop.send(());
    }
    let _ = tokio::time::timeout(PATIENCE, &mut gone.task).await;
    until("a new root of a higher epoch", &g, |(a, b, _, roots, e)| {
        roots == 1 && e > epoch && a + b <= 40.0 + 1e-6
    })
    .await;
    for mut x in g {
        if let Some(stop) = x.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(PATIENCE, &mut x.task).await;
    }
}
