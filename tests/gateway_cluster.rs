//! Gateways enforce one agreement set together over a real three-node NATS cluster
//! (installed by the tests when missing), as real processes. One back end of 400 units/s
//! (requests cost 10 units), A [0.25, 1] and B [0.75, 1]; clients of A on two gateways
//! and of B on the third, each offering more than its share.
//!
//! The CI test checks behaviour with bounds that hold on a busy machine: one root, one
//! epoch, fresh quotas; the gateways together admit within a generous band of the
//! single-gateway plan, never far above capacity; when the root is killed the others
//! fall back, a new root of a higher epoch appears and fresh quotas return; a gateway
//! with a wrong credential says so in `/status` and enforces its fallback share. Every
//! wait is bounded and polls for the state wanted.

mod common;

use common::nats::NatsCluster;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const TOKEN: &str = "cluster-test-token-5f1e";
/// Longest any one condition may take to hold.
const PATIENCE: Duration = Duration::from_secs(15);
/// Units per request.
const COST: f64 = 10.0;

fn config(
    backend: SocketAddr,
    servers: &[String],
    cluster: &str,
    node: &str,
    token: &str,
) -> String {
    let list = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "server"
addresses = ["{backend}"]
[[class]]
name = "a"
backend = "server"
[[class]]
name = "b"
backend = "server"
[[chain]]
name = "main"
default = {{ class = "a" }}
[[chain.rule]]
id = "b"
path_prefix = "/b/"
target = {{ class = "b" }}

[agreements]
window_ms = 100
max_wait_ms = 200
classes = {{ a = "A", b = "B" }}
[[agreements.cost]]
units = {COST}
[[agreements.principal]]
name = "S"
capacity = 400
[[agreements.principal]]
name = "A"
capacity = 0
[[agreements.principal]]
name = "B"
capacity = 0
[[agreements.agreement]]
from = "S"
to = "A"
share = [0.25, 1.0]
[[agreements.agreement]]
from = "S"
to = "B"
share = [0.75, 1.0]

[cluster]
servers = [{list}]
name = "{cluster}"
node = "{node}"
token = "{token}"
replicas = 3
member_lease_ms = 1000
root_lease_windows = 10
"#
    )
}

struct Gw {
    proc: Option<Proc>,
    gw: SocketAddr,
    admin: SocketAddr,
}

fn start(backend: SocketAddr, nats: &NatsCluster, i: usize, cluster: &str, token: &str) -> Gw {
    let mut servers = nats.urls.clone();
    servers.rotate_left(i);
    let text = config(backend, &servers, cluster, &format!("g{i}"), token);
    let (proc, gw, admin, _) = gateway(&text, &[], &[]);
    Gw {
        proc: Some(proc),
        gw,
        admin,
    }
}

async fn cluster_of(admin: SocketAddr) -> Value {
    status(admin).await["cluster"].clone()
}

/// Polls the gateways' cluster objects until `ok` holds; panics with the last reading
/// after [`PATIENCE`].
async fn until(what: &str, gws: &[&Gw], ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let end = Instant::now() + PATIENCE;
    loop {
        let mut all = Vec::new();
        for g in gws {
            all.push(cluster_of(g.admin).await);
        }
        if ok(&all) {
            return all;
        }
        assert!(Instant::now() < end, "{what}: never held; last {all:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn roots(all: &[Value]) -> usize {
    all.iter().filter(|c| c["role"] == "root").count()
}

fn all_fresh(all: &[Value]) -> bool {
    all.iter()
        .all(|c| c["fallback"] == false && c["windows_since_fresh"].as_u64() == Some(0))
}

/// An open-loop client: `rate` requests per second on `path` until `stop`, counting the
/// ones served.
fn offer(gw: SocketAddr, path: &'static str, rate: f64, stop: Instant) -> Arc<AtomicU64> {
    let served = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&served);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        while Instant::now() < stop {
            tick.tick().await;
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(mut c) =
                    tokio::time::timeout(Duration::from_secs(2), Client::connect(gw, None)).await
                else {
                    return;
                };
                let reply =
                    tokio::time::timeout(Duration::from_secs(2), c.get(path, &[("host", "gw")]))
                        .await;
                if let Ok(Some(r)) = reply {
                    if r.status == 200 {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    served
}

/// Admitted requests of principal `name` at a gateway, from `/status`.
fn admitted(status: &Value, name: &str) -> f64 {
    status["principals"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["admitted"].as_f64())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_one_plan_over_nats_and_survive_the_roots_death() {
    let mut nats = NatsCluster::start(TOKEN);
    let (_backend, backend) = backend(64, 1, &[]);
    let cluster = format!("gw{}", std::process::id());
    let mut g: Vec<Gw> = (0..3)
        .map(|i| start(backend, &nats, i, &cluster, TOKEN))
        .collect();

    let first = until(
        "one root, one epoch, every quota fresh",
        &g.iter().collect::<Vec<_>>(),
        |all| {
            roots(all) == 1
                && all_fresh(all)
                && all
                    .iter()
                    .all(|c| c["epoch"] == all[0]["epoch"] && c["epoch"].as_u64() > Some(0))
        },
    )
    .await;
    let epoch = first[0]["epoch"].as_u64().unwrap_or(0);

    // Load: A on g0 and g1 (30 requests/s each, 600 units/s together), B on g2 (30/s,
    // 300 units/s): the plan for 900 units/s of demand on 400 is B 300, A 100.
    let measure = Duration::from_secs(3);
    let settle = Duration::from_secs(2);
    let stop = Instant::now() + settle + measure;
    let _a0 = offer(g[0].gw, "/a", 30.0, stop);
    let _a1 = offer(g[1].gw, "/a", 30.0, stop);
    let _b2 = offer(g[2].gw, "/b/x", 30.0, stop);
    tokio::time::sleep(settle).await;
    let before = futures_statuses(&g).await;
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    let after = futures_statuses(&g).await;
    let secs = t0.elapsed().as_secs_f64();
    let units = |name: &str| -> f64 {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| admitted(a, name) - admitted(b, name))
            .sum::<f64>()
            * COST
            / secs
    };
    let (a, b) = (units("A"), units("B"));
    // Generous: the gateways together stay near capacity, never far above it, and B,
    // within its guarantee, gets most of what it asks.
    assert!(
        a + b <= 400.0 * 1.3,
        "together over capacity: A {a:.0} B {b:.0} units/s"
    );
    assert!(
        a + b >= 400.0 * 0.4,
        "together far below the plan: A {a:.0} B {b:.0} units/s"
    );
    assert!(
        b >= 300.0 * 0.5,
        "B short of its guarantee: A {a:.0} B {b:.0} units/s"
    );
    assert!(
        a <= 100.0 * 2.5,
        "A far over its share: A {a:.0} B {b:.0} units/s"
    );
    // The cluster's demand is known everywhere.
    let c = cluster_of(g[2].admin).await;
    let demand_b = c["principals"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "B"))
        .and_then(|p| p["global_demand"].as_f64())
        .unwrap_or(0.0);
    assert!(demand_b > 0.0, "{c:#}");

    // The root dies: the others fall back (the lease is ten windows), then a new root of
    // a higher epoch hands out fresh quotas again.
    let root = first
        .iter()
        .position(|c| c["role"] == "root")
        .expect("a root");
    if let Some(mut p) = g[root].proc.take() {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    let dead = g.remove(root);
    drop(dead);
    let rest: Vec<&Gw> = g.iter().collect();
    until("the others fall back", &rest, |all| {
        all.iter().any(|c| c["fallback"] == true)
    })
    .await;
    until("a new root of a higher epoch, fresh quotas", &rest, |all| {
        roots(all) == 1 && all_fresh(all) && all.iter().all(|c| c["epoch"].as_u64() > Some(epoch))
    })
    .await;

    // A wrong credential: a clear error in `/status`, and the fallback share enforced.
    let wrong = start(backend, &nats, 3, &cluster, "wrong-token");
    let c = until("the wrong credential is reported", &[&wrong], |all| {
        all[0]["error"].as_str().is_some_and(|e| !e.is_empty())
    })
    .await;
    assert_eq!(c[0]["fallback"], true, "{c:#?}");
    assert_eq!(c[0]["role"], "detached", "{c:#?}");
    let text = serde_json::to_string(&status(wrong.admin).await).unwrap_or_default();
    assert!(!text.contains("wrong-token"), "a secret in /status");
    nats.kill(0);
}

async fn futures_statuses(g: &[Gw]) -> Vec<Value> {
    let mut out = Vec::new();
    for x in g {
        out.push(status(x.admin).await);
    }
    out
}
