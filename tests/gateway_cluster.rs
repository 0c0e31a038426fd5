//! Gateways enforce one agreement set together over a real three-node NATS cluster
//! (installed by the tests when missing), as real processes. One back end of 400 units/s
//! (requests cost 10 units in the CI tests, 1 in the experiments), A [0.25, 1] and
//! B [0.75, 1]; clients of A on two gateways and of B on the third, each offering more
//! than its share.
//!
//! The CI test checks behaviour with bounds that hold on a busy machine: one root, one
//! epoch, fresh quotas; the gateways together admit within a generous band of the
//! single-gateway plan, never far above capacity; when the root is killed the others
//! fall back, a new root of a higher epoch appears and fresh quotas return; a gateway
//! with a wrong credential says so in `/status` and enforces its fallback share; a root
//! stopped (SIGSTOP) until another root of a higher epoch stands never enforces its old
//! quota when continued and obeys the new epoch; a changed agreement set published once
//! reaches every gateway. Every wait is bounded and polls for the state wanted.
//!
//! The experiments (`experiment_*`, ignored) print the figures recorded in
//! docs/benchmarks.md, "Cluster on real processes", counting what reached the back end
//! in each 100 ms window (its `/__windows`) as well as what the gateways admitted.

mod common;

use common::nats::NatsCluster;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const TOKEN: &str = "cluster-test-token-5f1e";
/// Longest any one condition may take to hold.
const PATIENCE: Duration = Duration::from_secs(15);
/// Units per request in the CI tests (light load: a few requests a window).
const COST: f64 = 10.0;
/// Units per request in the experiments: a window's capacity is 40 requests, so one
/// request more or less in a window is 2.5% of capacity, finer than the 5% the per-window
/// figures are held to (at 10 units, one request is 25%).
const EXPERIMENT_COST: f64 = 1.0;
/// The agreement set's window, milliseconds.
const WINDOW_MS: u64 = 100;
/// The back end's capacity, units per window (400 units/s).
const CAPACITY_PER_WINDOW: f64 = 40.0;

fn config(
    backend: SocketAddr,
    servers: &[String],
    cluster: &str,
    node: &str,
    token: &str,
    cost: f64,
) -> String {
    let list = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let tables = set_tables("agreements.", 400.0);
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
units = {cost}
{tables}

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

/// The agreement set's principals and agreements as TOML tables under `prefix`: S owns
/// `capacity` units per second, A may use [0.25, 1] of it and B [0.75, 1].
fn set_tables(prefix: &str, capacity: f64) -> String {
    format!(
        r#"[[{prefix}principal]]
name = "S"
capacity = {capacity}
[[{prefix}principal]]
name = "A"
capacity = 0
[[{prefix}principal]]
name = "B"
capacity = 0
[[{prefix}agreement]]
from = "S"
to = "A"
share = [0.25, 1.0]
[[{prefix}agreement]]
from = "S"
to = "B"
share = [0.75, 1.0]"#
    )
}

/// The agreement set with S's capacity changed, as the config bucket holds it (JSON).
fn changed_set(capacity: f64) -> Vec<u8> {
    let text = format!("window_ms = {WINDOW_MS}\n{}", set_tables("", capacity));
    let spec: allot_model::agreements::AgreementsSpec =
        toml::from_str(&text).expect("a valid agreement set");
    serde_json::to_vec(&spec).expect("the set as JSON")
}

/// Publishes an agreement set once in the cluster's config bucket, as the link of a
/// gateway whose agreement file changed does (a JetStream KV put is a publish on the
/// key's subject).
fn publish_set(nats_url: &str, cluster: &str, set: &[u8]) {
    publish_raw(
        nats_url,
        &format!("$KV.allot-{cluster}-config.agreements"),
        set,
    );
}

struct Gw {
    proc: Option<Proc>,
    gw: SocketAddr,
    admin: SocketAddr,
}

fn start(
    backend: SocketAddr,
    nats: &NatsCluster,
    i: usize,
    cluster: &str,
    token: &str,
    cost: f64,
) -> Gw {
    let mut servers = nats.urls.clone();
    let n = servers.len();
    servers.rotate_left(i % n);
    let text = config(backend, &servers, cluster, &format!("g{i}"), token, cost);
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
                let Ok(Some(mut c)) =
                    tokio::time::timeout(Duration::from_secs(2), Client::try_connect(gw, None))
                        .await
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
        .map(|i| start(backend, &nats, i, &cluster, TOKEN, COST))
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

    // The metrics, and `allot stat --cluster` with the tree.
    let m = get_once(g[0].admin, "/metrics", &[]).await.text();
    for name in [
        "allot_cluster_role{role=\"",
        "allot_cluster_epoch ",
        "allot_cluster_windows_since_fresh ",
        "allot_cluster_fallback ",
        "allot_cluster_messages_sent_total ",
        "allot_cluster_messages_received_total ",
        "allot_cluster_demand{principal=\"B\"}",
        "allot_cluster_share{principal=\"A\"}",
    ] {
        assert!(m.contains(name), "no {name} in /metrics:\n{m}");
    }
    let admin = g[0].admin.to_string();
    let (code, out, err) = run_allot(&["stat", "--cluster", "--admin", &admin], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("node g0") && out.contains("tree") && out.contains("root"),
        "{out}"
    );

    // A malformed message on the root's subject: ignored, counted, the tree unharmed.
    let root_at = first
        .iter()
        .position(|c| c["role"] == "root")
        .expect("a root");
    let root_name = first[root_at]["node"].as_str().unwrap_or("").to_string();
    let ignored_before = cluster_of(g[root_at].admin).await["messages_ignored_total"]
        .as_u64()
        .unwrap_or(0);
    publish_raw(
        &nats.urls[0],
        &format!("allot.{cluster}.up.{root_name}"),
        b"{not a report",
    );
    until("the malformed message is counted", &[&g[root_at]], |all| {
        all[0]["messages_ignored_total"].as_u64() > Some(ignored_before)
    })
    .await;

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
    let second = until("a new root of a higher epoch, fresh quotas", &rest, |all| {
        roots(all) == 1 && all_fresh(all) && all.iter().all(|c| c["epoch"].as_u64() > Some(epoch))
    })
    .await;

    // The new root is stopped (SIGSTOP) until the other gateway stands as root with a
    // higher epoch, then continued: from its first answer on it enforces no quota of
    // its old epoch (its state is stale at once: fallback), then obeys the new root.
    let r = second
        .iter()
        .position(|c| c["role"] == "root")
        .expect("a root");
    let (stopped, other) = (&g[r], &g[1 - r]);
    let old_epoch = second[r]["epoch"].as_u64().unwrap_or(0);
    if let Some(p) = &stopped.proc {
        p.signal("STOP");
    }
    let third = until(
        "the other stands as root of a higher epoch",
        &[other],
        |all| all[0]["role"] == "root" && all[0]["epoch"].as_u64() > Some(old_epoch),
    )
    .await;
    let new_epoch = third[0]["epoch"].as_u64().unwrap_or(0);
    if let Some(p) = &stopped.proc {
        p.signal("CONT");
    }
    let end = Instant::now() + PATIENCE;
    loop {
        let c = cluster_of(stopped.admin).await;
        let enforcing_quota = c["fallback"] == false;
        assert!(
            !enforcing_quota || c["epoch"].as_u64() >= Some(new_epoch),
            "continued, it enforced a quota of its old epoch: {c:#}"
        );
        if enforcing_quota && c["windows_since_fresh"].as_u64() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < end,
            "continued, it never obeyed the new root; last {c:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A changed agreement set, published once in the config bucket (as a gateway whose
    // agreement file changed does): every gateway plans with it.
    let rest: Vec<&Gw> = g.iter().collect();
    let old_set = cluster_of(g[0].admin).await["agreements"].clone();
    assert!(
        old_set.as_str().is_some_and(|f| !f.is_empty()),
        "no agreement set's fingerprint: {old_set}"
    );
    publish_set(&nats.urls[1], &cluster, &changed_set(200.0));
    until(
        "every gateway plans with the new agreement set",
        &rest,
        |all| {
            all.iter()
                .all(|c| c["agreements"] != old_set && c["agreements"] == all[0]["agreements"])
        },
    )
    .await;

    // A wrong credential: a clear error in `/status`, and the fallback share enforced.
    let wrong = start(backend, &nats, 3, &cluster, "wrong-token", COST);
    let c = until("the wrong credential is reported", &[&wrong], |all| {
        all[0]["error"].as_str().is_some_and(|e| !e.is_empty())
    })
    .await;
    assert_eq!(c[0]["fallback"], true, "{c:#?}");
    assert_eq!(c[0]["role"], "detached", "{c:#?}");
    let text = serde_json::to_string(&status(wrong.admin).await).unwrap_or_default();
    assert!(!text.contains("wrong-token"), "a secret in /status");

    // A second gateway with a live node's name: after one member lease, a clear error
    // naming it, and the fallback share enforced.
    let alive = g[0].admin;
    let name = cluster_of(alive).await["node"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let i: usize = name.trim_start_matches('g').parse().expect("a gN name");
    let twin = start(backend, &nats, i, &cluster, TOKEN, COST);
    let c = until("the name taken is reported", &[&twin], |all| {
        all[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("already a live member"))
    })
    .await;
    assert_eq!(c[0]["fallback"], true, "{c:#?}");
    nats.kill(0);
}

/// Publishes `payload` on `subject` with NATS's text protocol (no client library): a
/// message no gateway wrote.
fn publish_raw(url: &str, subject: &str, payload: &[u8]) {
    use std::io::{BufRead, BufReader, Write};
    let addr = url.trim_start_matches("nats://");
    let stream = std::net::TcpStream::connect(addr).expect("connect to nats-server");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("INFO from nats-server");
    let mut w = stream;
    let connect =
        format!("CONNECT {{\"auth_token\":\"{TOKEN}\",\"verbose\":false,\"pedantic\":false}}\r\n");
    w.write_all(connect.as_bytes()).expect("CONNECT");
    w.write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())
        .expect("PUB");
    w.write_all(payload).expect("payload");
    w.write_all(b"\r\nPING\r\n").expect("PING");
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("PONG from nats-server");
        assert!(n > 0 && !line.starts_with("-ERR"), "nats-server: {line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

async fn futures_statuses(g: &[Gw]) -> Vec<Value> {
    statuses_at_once(g.iter().map(|x| x.admin)).await
}

/// Every gateway's `/status`, read at the same moment (each on its own task), so counters
/// summed over gateways cover the same span.
async fn statuses_at_once(admins: impl Iterator<Item = SocketAddr>) -> Vec<Value> {
    let tasks: Vec<_> = admins.map(|a| tokio::spawn(status(a))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or(Value::Null));
    }
    out
}

/// Sum over gateways of a principal's admitted requests.
fn total_admitted(statuses: &[Value], name: &str) -> f64 {
    statuses.iter().map(|s| admitted(s, name)).sum()
}

/// One reading of every live gateway: seconds since the start, A and B admitted (summed
/// over the gateways of this phase), whether any is in fallback, roots.
struct Sample {
    t: f64,
    a: f64,
    b: f64,
    fallback: bool,
    roots: usize,
}

/// Units per second of A and B between samples `i` and `j`.
fn rates(s: &[Sample], i: usize, j: usize) -> (f64, f64) {
    let dt = (s[j].t - s[i].t).max(1e-3);
    ((s[j].a - s[i].a) / dt, (s[j].b - s[i].b) / dt)
}

/// The wall clock's window number (`unix_ms / WINDOW_MS`, as the gateways and the back
/// end number them).
fn window_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        / WINDOW_MS
}

/// Windows (fractional) since `t`.
fn windows_since(t: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(t).as_secs_f64() * 1000.0 / WINDOW_MS as f64
}

/// An experiment's setting: a three-node NATS cluster, the back end (400 units/s) and
/// `n` gateways g0…, with one root and fresh quotas everywhere.
struct Rig {
    nats: NatsCluster,
    _backend: Proc,
    backend: SocketAddr,
    cluster: String,
    g: Vec<Gw>,
    /// Units per request.
    cost: f64,
}

impl Rig {
    async fn start(tag: &str, n: usize, cost: f64) -> Rig {
        let nats = NatsCluster::start(TOKEN);
        let (backend_proc, backend) = backend(128, 1, &[]);
        let cluster = format!("{tag}{}", std::process::id());
        let g: Vec<Gw> = (0..n)
            .map(|i| start(backend, &nats, i, &cluster, TOKEN, cost))
            .collect();
        until(
            "one root, fresh quotas",
            &g.iter().collect::<Vec<_>>(),
            |all| roots(all) == 1 && all_fresh(all),
        )
        .await;
        Rig {
            nats,
            _backend: backend_proc,
            backend,
            cluster,
            g,
            cost,
        }
    }

    /// Requests per second that carry `units_per_s`.
    fn requests(&self, units_per_s: f64) -> f64 {
        units_per_s / self.cost
    }

    /// The experiments' load until `stop`: A 400 units/s on g0 and 200 on g1, B 400 on
    /// g2; the single-gateway plan on 400 units/s is A 100, B 300.
    fn load(&self, stop: Instant) -> Vec<Arc<AtomicU64>> {
        vec![
            offer(self.g[0].gw, "/a", self.requests(400.0), stop),
            offer(self.g[1].gw, "/a", self.requests(200.0), stop),
            offer(self.g[2].gw, "/b/x", self.requests(400.0), stop),
        ]
    }

    fn all(&self) -> Vec<&Gw> {
        self.g.iter().collect()
    }

    fn but(&self, skip: usize) -> Vec<&Gw> {
        self.g
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != skip)
            .map(|(_, g)| g)
            .collect()
    }

    /// Kills gateway `i` (its process is gone; its entry stays, never read again).
    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.g[i].proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(p) = &self.g[i].proc {
            p.signal(sig);
        }
    }
}

/// One reading of some gateways: their `/status` and its cluster objects.
struct Reading {
    at: Instant,
    statuses: Vec<Value>,
    clusters: Vec<Value>,
}

/// Reads `gws`' status every 50 ms until `end`.
async fn trace(gws: &[&Gw], end: Instant) -> Vec<Reading> {
    let mut out = Vec::new();
    while Instant::now() < end {
        let mut statuses = Vec::new();
        for g in gws {
            statuses.push(status(g.admin).await);
        }
        out.push(Reading {
            at: Instant::now(),
            clusters: statuses.iter().map(|s| s["cluster"].clone()).collect(),
            statuses,
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// Units per 100 ms window, and whose count it is: the back end's (what it served, from
/// its `/__windows`, read once after a run) or the gateways' (what each admitted in each
/// ended wall-clock window, from the `/status` readings of a run, summed over gateways).
struct Counted {
    units: BTreeMap<u64, f64>,
    whose: &'static str,
}

impl Counted {
    async fn served(rig: &Rig) -> Counted {
        Counted {
            units: backend_windows(rig.backend)
                .await
                .into_iter()
                .map(|(w, n)| (w, n as f64 * rig.cost))
                .collect(),
            whose: "back end, most served",
        }
    }

    /// From every reading's `principals[].windows` (of principal `only`, or all); a
    /// window a gateway reported in several readings counts once.
    fn admitted<'a>(readings: impl IntoIterator<Item = &'a Value>, only: Option<&str>) -> Counted {
        let mut each: BTreeMap<(String, String, u64), f64> = BTreeMap::new();
        for r in readings {
            let node = r["cluster"]["node"].as_str().unwrap_or("").to_string();
            for p in r["principals"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap_or("").to_string();
                if only.is_some_and(|o| o != name) {
                    continue;
                }
                for w in p["windows"].as_array().into_iter().flatten() {
                    if let (Some(w), Some(u)) = (w[0].as_u64(), w[1].as_f64()) {
                        each.insert((node.clone(), name.clone(), w), u);
                    }
                }
            }
        }
        let mut units = BTreeMap::new();
        for ((_, _, w), u) in each {
            *units.entry(w).or_insert(0.0) += u;
        }
        Counted {
            units,
            whose: "the gateways' own counts, most admitted",
        }
    }

    /// Units in window `w`.
    fn units(&self, w: u64) -> f64 {
        self.units.get(&w).copied().unwrap_or(0.0)
    }

    /// Over windows `from..to`: the most in one window (% of capacity), how many windows
    /// above 105%, how many windows, the mean (% of capacity).
    fn stats(&self, from: u64, to: u64) -> (f64, usize, usize, f64) {
        let pct: Vec<f64> = (from..to)
            .map(|w| self.units(w) / CAPACITY_PER_WINDOW * 100.0)
            .collect();
        let peak = pct.iter().copied().fold(0.0, f64::max);
        let over = pct.iter().filter(|&&p| p > 105.0).count();
        let mean = pct.iter().sum::<f64>() / pct.len().max(1) as f64;
        (peak, over, pct.len(), mean)
    }

    /// The most in any 3 consecutive windows of `from..to`, % of capacity.
    fn peak3(&self, from: u64, to: u64) -> f64 {
        (from..to.saturating_sub(2))
            .map(|w| (self.units(w) + self.units(w + 1) + self.units(w + 2)) / 3.0)
            .fold(0.0, f64::max)
            / CAPACITY_PER_WINDOW
            * 100.0
    }
}

/// Prints one markdown row per figure and remembers whether every bound was met.
struct Rows {
    all_met: bool,
}

impl Rows {
    fn new() -> Rows {
        Rows { all_met: true }
    }

    fn row(&mut self, what: &str, measured: String, bound: &str, met: bool) {
        self.all_met &= met;
        println!(
            "| cluster: {what} | {measured} | {bound} | {} |",
            if met { "met" } else { "NOT met" }
        );
    }

    /// A count per 100 ms window over `from..to` against the 105% bound.
    fn backend(&mut self, what: &str, served: &Counted, from: u64, to: u64) {
        let (peak, over, n, mean) = served.stats(from, to);
        let series: Vec<String> = (from..to)
            .map(|w| format!("{:.0}", served.units(w) / CAPACITY_PER_WINDOW * 100.0))
            .collect();
        let whose = served.whose;
        println!(
            "{what}: {whose} per window, % of capacity: {}",
            series.join(" ")
        );
        self.row(
            &format!("{what}: {whose} in one 100 ms window"),
            format!(
                "{peak:.0}% of capacity; {over} of {n} windows above 105%; most over 3 \
                 windows {:.0}%; mean {mean:.0}%",
                served.peak3(from, to)
            ),
            "≤ 105%",
            peak <= 105.0,
        );
    }

    fn done(self) {
        assert!(self.all_met, "a cluster figure missed its bound");
    }
}

/// Windows from `t` until the first reading where `ok` holds.
fn first_after(readings: &[Reading], t: Instant, ok: impl Fn(&[Value]) -> bool) -> Option<f64> {
    readings
        .iter()
        .find(|r| r.at >= t && ok(&r.clusters))
        .map(|r| windows_since(t, r.at))
}

fn fmt_windows(w: Option<f64>) -> String {
    w.map_or("never".into(), |w| format!("{w:.1}"))
}

/// A principal's `local_share` (units/s) in a cluster object.
fn share(c: &Value, name: &str) -> f64 {
    c["principals"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["local_share"].as_f64())
        .unwrap_or(0.0)
}

/// The precise figures, recorded in docs/benchmarks.md ("Cluster on real processes"):
/// four gateways, A's clients on two of them (unevenly), B's on a third; the shares
/// against the single-gateway plan, the most served per 100 ms window at the back end
/// and the most admitted per window by the gateways' own counts against capacity, how
/// fast A takes the capacity when B stops, and what a root kill costs. Run by
/// `bench/acceptance.sh`; needs a quiet machine.
#[ignore = "experiment: precise figures, run on a quiet machine by bench/acceptance.sh"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_cluster_shares_within_five_percent_and_a_root_kill() {
    let mut rig = Rig::start("ex", 4, EXPERIMENT_COST).await;
    let start_at = Instant::now();
    let first_w = window_now();
    let b_stop = start_at + Duration::from_secs(8);
    let kill_at = b_stop + Duration::from_secs(4);
    let all_stop = kill_at + Duration::from_secs(4);
    let _a = offer(rig.g[0].gw, "/a", rig.requests(400.0), all_stop);
    let _a1 = offer(rig.g[1].gw, "/a", rig.requests(200.0), all_stop);
    let _b2 = offer(rig.g[2].gw, "/b/x", rig.requests(400.0), b_stop);
    let mut phases: Vec<Vec<Sample>> = vec![Vec::new()];
    let mut readings: Vec<Value> = Vec::new();
    let mut b_demand: Vec<String> = Vec::new();
    let mut killed = None;
    let mut b_stop_w = None;
    let mut kill_w = 0;
    while Instant::now() < all_stop {
        let live: Vec<&Gw> = rig.g.iter().filter(|g| g.proc.is_some()).collect();
        let s = statuses_at_once(live.iter().map(|g| g.admin)).await;
        let sample = Sample {
            t: start_at.elapsed().as_secs_f64(),
            a: total_admitted(&s, "A") * rig.cost,
            b: total_admitted(&s, "B") * rig.cost,
            fallback: s.iter().any(|x| x["cluster"]["fallback"] == true),
            roots: s.iter().filter(|x| x["cluster"]["role"] == "root").count(),
        };
        if let Some(p) = phases.last_mut() {
            p.push(sample);
        }
        readings.extend(s.iter().cloned());
        if killed.is_none() {
            let root = s.iter().find(|x| x["cluster"]["role"] == "root");
            let demand = root
                .and_then(|r| r["cluster"]["principals"].as_array())
                .and_then(|ps| ps.iter().find(|p| p["name"] == "B"))
                .and_then(|p| p["global_demand"].as_f64());
            b_demand.push(demand.map_or("-".into(), |d| format!("{d:.0}")));
        }
        if b_stop_w.is_none() && Instant::now() >= b_stop {
            b_stop_w = Some(window_now());
        }
        if killed.is_none() && Instant::now() >= kill_at {
            let root = s
                .iter()
                .position(|x| x["cluster"]["role"] == "root")
                .expect("a root");
            let name = s[root]["cluster"]["node"].as_str().unwrap_or("");
            let i = rig
                .g
                .iter()
                .position(|g| g.proc.is_some() && g.admin == live[root].admin)
                .unwrap_or(0);
            println!("root killed: {name}");
            rig.kill(i);
            kill_w = window_now();
            killed = Some(i);
            // The dead gateway's counts leave the sums: a new phase of samples.
            phases.push(Vec::new());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_w = window_now();
    let served = Counted::served(&rig).await;
    let admitted = Counted::admitted(&readings, None);
    for name in ["A", "B"] {
        let c = Counted::admitted(&readings, Some(name));
        let series: Vec<String> = (first_w + 30..b_stop_w.unwrap_or(first_w + 80))
            .map(|w| format!("{:.0}", c.units(w)))
            .collect();
        println!(
            "steady with B: {name} admitted per window, units: {}",
            series.join(" ")
        );
    }
    println!(
        "until the kill: B's demand at the root per reading, units/s: {}",
        b_demand.join(" ")
    );
    let before_kill = &phases[0];
    let after_kill = &phases[1];
    // Steady state with B: from 3 s to B's stop.
    let i = before_kill.iter().position(|x| x.t >= 3.0).unwrap_or(0);
    let j = before_kill
        .iter()
        .rposition(|x| x.t <= 8.0)
        .unwrap_or(before_kill.len() - 1);
    let (a, b) = rates(before_kill, i, j);
    // B stops at 8 s (its last waiting requests end within max_wait, 200 ms): the
    // first 300 ms span from which A admits at least 90% of capacity.
    let settle = 8.2;
    let k = before_kill.iter().position(|x| x.t >= settle).unwrap_or(0);
    let took = (k..before_kill.len())
        .find(|&m| {
            let n = (m + 3).min(before_kill.len() - 1);
            n > m && rates(before_kill, m, n).0 >= 360.0
        })
        .map(|m| ((before_kill[m].t - settle) / 0.1).max(0.0));
    let fallback: Vec<f64> = after_kill
        .iter()
        .filter(|x| x.fallback)
        .map(|x| x.t)
        .collect();
    let fallback_windows = match (fallback.first(), fallback.last()) {
        (Some(f), Some(l)) => (l - f) / 0.1 + 1.0,
        _ => 0.0,
    };
    let windows_until = |ok: &dyn Fn(&Sample) -> bool| {
        after_kill
            .iter()
            .find(|x| ok(x))
            .map(|x| (x.t - after_kill[0].t) / 0.1)
    };
    let new_root_windows = windows_until(&|x| x.roots == 1);
    let fresh_windows = windows_until(&|x| x.roots == 1 && !x.fallback);
    let mut rows = Rows::new();
    let within = |x: f64, want: f64| (x - want).abs() <= 0.05 * want;
    rows.row(
        "A and B admitted by 4 gateways together",
        format!("{a:.1}, {b:.1} units/s"),
        "100, 300 ± 5% (the single-gateway plan)",
        within(a, 100.0) && within(b, 300.0),
    );
    rows.backend(
        "steady with B",
        &served,
        first_w + 30,
        b_stop_w.unwrap_or(first_w + 80),
    );
    rows.backend("until the root is killed", &admitted, first_w + 30, kill_w);
    rows.row(
        "windows until A takes the capacity after B stops",
        took.map_or("never".into(), |w| format!("{w:.0}")),
        "≤ 3",
        took.is_some_and(|w| w <= 3.0),
    );
    rows.backend("root killed", &served, kill_w, last_w);
    // The last window or two may lack a gateway's part: it ended after the last reading.
    rows.backend("root killed", &admitted, kill_w, last_w.saturating_sub(2));
    rows.row(
        "root killed: windows with a gateway in fallback",
        format!("{fallback_windows:.0}"),
        "reported (lease 10 windows)",
        true,
    );
    rows.row(
        "root killed: windows from the kill until a new root",
        fmt_windows(new_root_windows),
        "≤ lease + 2 = 12",
        new_root_windows.is_some_and(|w| w <= 12.0),
    );
    rows.row(
        "root killed: windows from the kill until every gateway has its fresh quotas",
        fmt_windows(fresh_windows),
        "reported",
        fresh_windows.is_some(),
    );
    rows.done();
}

/// A leaf carrying A's clients is killed under load: its parent drops it after two
/// silent windows and its share goes to the others. Figures: the back end's count per
/// window after the kill, windows until the gateways left hold A's whole share again,
/// the capacity used afterwards.
#[ignore = "experiment: a leaf killed, figures for docs/benchmarks.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_cluster_leaf_killed() {
    let mut rig = Rig::start("leaf", 4, EXPERIMENT_COST).await;
    let first_w = window_now();
    let end = Instant::now() + Duration::from_secs(11);
    let _load = rig.load(end);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut roles = Vec::new();
    for g in &rig.g {
        roles.push(cluster_of(g.admin).await["role"].clone());
    }
    // The A gateway with more load if it is a leaf, else the other.
    let victim = [0, 1]
        .into_iter()
        .find(|&i| roles[i] == "leaf")
        .expect("a leaf among g0 and g1");
    let before = futures_statuses(&rig.g).await;
    let kill_w = window_now();
    let killed_at = Instant::now();
    rig.kill(victim);
    let rest = rig.but(victim);
    let readings = trace(&rest, end).await;
    let last_w = window_now();
    let served = Counted::served(&rig).await;
    let admitted = Counted::admitted(
        before
            .iter()
            .chain(readings.iter().flat_map(|r| &r.statuses)),
        None,
    );
    let mut rows = Rows::new();
    rows.backend("leaf killed: before", &served, first_w + 20, kill_w);
    // The window of the reading before the kill has not ended in it.
    rows.backend("leaf killed: before", &admitted, first_w + 20, kill_w - 1);
    rows.backend("leaf killed: after", &served, kill_w, last_w);
    rows.backend(
        "leaf killed: after",
        &admitted,
        kill_w,
        last_w.saturating_sub(2),
    );
    // A's share (100 units/s) held by the gateways left, every one fresh.
    let back = first_after(&readings, killed_at, |all| {
        all_fresh(all) && all.iter().map(|c| share(c, "A")).sum::<f64>() >= 95.0
    });
    rows.row(
        &format!("leaf g{victim} killed: windows until the others hold A's share again"),
        fmt_windows(back),
        "reported (2 silent windows + the 2-window lead = 4)",
        back.is_some(),
    );
    let (_, _, _, mean) = served.stats(last_w.saturating_sub(30), last_w);
    rows.row(
        "leaf killed: capacity used, the last 3 s",
        format!("{mean:.0}%"),
        "≥ 95% (demand above capacity)",
        mean >= 95.0,
    );
    rows.done();
}

/// One NATS server (the one the root connects to first) is killed under load: the
/// clients reconnect to the others and JetStream keeps quorum. Figures: the most windows
/// any gateway went without a fresh quota, windows with a gateway in fallback, the back
/// end's count per window.
#[ignore = "experiment: a NATS server killed, figures for docs/benchmarks.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_cluster_nats_server_killed() {
    let mut rig = Rig::start("nk", 4, EXPERIMENT_COST).await;
    let first_w = window_now();
    let end = Instant::now() + Duration::from_secs(11);
    let _load = rig.load(end);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut root = 0;
    for (i, g) in rig.g.iter().enumerate() {
        if cluster_of(g.admin).await["role"] == "root" {
            root = i;
        }
    }
    // Gateway gi lists the servers from the i-th on.
    let kill_w = window_now();
    let killed_at = Instant::now();
    rig.nats.kill(root % 3);
    let readings = trace(&rig.all(), end).await;
    let last_w = window_now();
    let served = Counted::served(&rig).await;
    let stale = readings
        .iter()
        .flat_map(|r| r.clusters.iter())
        .filter_map(|c| c["windows_since_fresh"].as_u64())
        .max()
        .unwrap_or(0);
    let fallback_windows: std::collections::BTreeSet<u64> = readings
        .iter()
        .filter(|r| r.clusters.iter().any(|c| c["fallback"] == true))
        .map(|r| (windows_since(killed_at, r.at)) as u64)
        .collect();
    let errors: usize = readings
        .iter()
        .filter(|r| r.clusters.iter().any(|c| !c["error"].is_null()))
        .count();
    let mut rows = Rows::new();
    rows.row(
        &format!(
            "NATS server n{} killed (the root g{root}'s first)",
            root % 3
        ),
        format!(
            "most windows without a fresh quota {stale}; windows with a gateway in fallback {}; \
             readings with an engine error {errors} of {}",
            fallback_windows.len(),
            readings.len()
        ),
        "no effect beyond a window (≤ 1 window stale, none in fallback)",
        stale <= 1 && fallback_windows.is_empty(),
    );
    rows.backend("NATS server killed: before", &served, first_w + 20, kill_w);
    rows.backend("NATS server killed: after", &served, kill_w, last_w);
    let (_, _, _, mean) = served.stats(kill_w, kill_w + 10);
    rows.row(
        "NATS server killed: capacity used, the 10 windows after",
        format!("{mean:.0}%"),
        "reported",
        true,
    );
    rows.done();
}

/// The root is stopped with SIGSTOP for 5 s under load, then continued: the others elect
/// a root of a higher epoch; continued, it enforces nothing of its old epoch (its quotas
/// are stale), rejoins and obeys the new root. Figures: windows until the others have
/// fresh quotas again, what the continued gateway's `/status` shows, the back end's count
/// per window while it is stopped and after.
#[ignore = "experiment: the root stopped for 5 s, figures for docs/benchmarks.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_cluster_root_paused() {
    let rig = Rig::start("pz", 4, EXPERIMENT_COST).await;
    let first_w = window_now();
    let end = Instant::now() + Duration::from_secs(15);
    let _load = rig.load(end);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut root = 0;
    let mut old_epoch = 0;
    for (i, g) in rig.g.iter().enumerate() {
        let c = cluster_of(g.admin).await;
        if c["role"] == "root" {
            root = i;
            old_epoch = c["epoch"].as_u64().unwrap_or(0);
        }
    }
    let stop_w = window_now();
    let stopped_at = Instant::now();
    rig.signal(root, "STOP");
    let others = rig.but(root);
    let paused = trace(&others, stopped_at + Duration::from_secs(5)).await;
    let cont_w = window_now();
    let continued_at = Instant::now();
    rig.signal(root, "CONT");
    let after = trace(&rig.all(), end).await;
    let last_w = window_now();
    let served = Counted::served(&rig).await;
    let new_root = first_after(&paused, stopped_at, |all| {
        roots(all) == 1
            && all
                .iter()
                .any(|c| c["role"] == "root" && c["epoch"].as_u64() > Some(old_epoch))
    });
    let others_back = first_after(&paused, stopped_at, |all| {
        roots(all) == 1
            && all_fresh(all)
            && all.iter().all(|c| c["epoch"].as_u64() > Some(old_epoch))
    });
    let new_epoch = paused
        .last()
        .and_then(|r| r.clusters.iter().filter_map(|c| c["epoch"].as_u64()).max())
        .unwrap_or(0);
    let mine: Vec<&Value> = after.iter().map(|r| &r.clusters[root]).collect();
    let old_enforced = mine
        .iter()
        .filter(|c| c["fallback"] == false && c["epoch"].as_u64() <= Some(old_epoch))
        .count();
    let first = mine.first().map(|c| {
        format!(
            "first answer: role {}, epoch {}, fallback {}",
            c["role"], c["epoch"], c["fallback"]
        )
    });
    let rejoined = first_after(&after, continued_at, |all| {
        let c = &all[root];
        c["fallback"] == false
            && c["windows_since_fresh"].as_u64() == Some(0)
            && c["epoch"].as_u64() >= Some(new_epoch)
            && c["role"] != "root"
    });
    let final_epoch = mine.last().and_then(|c| c["epoch"].as_u64()).unwrap_or(0);
    let mut rows = Rows::new();
    rows.row(
        &format!("root g{root} stopped 5 s: windows until a new root"),
        fmt_windows(new_root),
        "≤ lease + 2 = 12",
        new_root.is_some_and(|w| w <= 12.0),
    );
    rows.row(
        "root stopped 5 s: windows until the others have the new root's fresh quotas",
        fmt_windows(others_back),
        "reported",
        others_back.is_some(),
    );
    rows.row(
        "root stopped 5 s, continued: readings enforcing its old epoch",
        format!(
            "{old_enforced} of {} ({}); epoch {old_epoch} → {final_epoch}",
            mine.len(),
            first.unwrap_or_default()
        ),
        "0, and a newer epoch",
        old_enforced == 0 && final_epoch > old_epoch,
    );
    rows.row(
        "root stopped 5 s, continued: windows until it obeys the new root with fresh quotas",
        fmt_windows(rejoined),
        "reported (member lease 10 windows)",
        rejoined.is_some(),
    );
    rows.backend("root stopped: before", &served, first_w + 20, stop_w);
    rows.backend("root stopped: while stopped", &served, stop_w, cont_w);
    rows.backend("root stopped: after SIGCONT", &served, cont_w, last_w);
    rows.done();
}

/// A changed agreement set (S's capacity 400 → 200 units/s) is published once in the
/// config bucket under load. Figures: windows from the publication until every
/// gateway's `/status` shows the new set, until their quotas together reflect it, and the
/// back end's rate with the new set.
#[ignore = "experiment: a changed agreement set, figures for docs/benchmarks.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_cluster_agreement_change_reaches_every_gateway() {
    let rig = Rig::start("ag", 4, EXPERIMENT_COST).await;
    let end = Instant::now() + Duration::from_secs(10);
    let _load = rig.load(end);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let old_set = cluster_of(rig.g[0].admin).await["agreements"].clone();
    let set = changed_set(200.0);
    let published_at = Instant::now();
    publish_set(&rig.nats.urls[1], &rig.cluster, &set);
    let readings = trace(&rig.all(), end).await;
    let last_w = window_now();
    let served = Counted::served(&rig).await;
    let everywhere = first_after(&readings, published_at, |all| {
        all.iter()
            .all(|c| c["agreements"] != old_set && c["agreements"] == all[0]["agreements"])
    });
    let reflected = first_after(&readings, published_at, |all| {
        all_fresh(all)
            && all
                .iter()
                .map(|c| share(c, "A") + share(c, "B"))
                .sum::<f64>()
                <= 210.0
    });
    let mut rows = Rows::new();
    rows.row(
        "changed agreement set: windows from publication until every gateway's /status shows it",
        fmt_windows(everywhere),
        "≤ 2",
        everywhere.is_some_and(|w| w <= 2.0),
    );
    rows.row(
        "changed agreement set: windows until the quotas together are within the new capacity",
        fmt_windows(reflected),
        "reported (+ the 2-window lead)",
        reflected.is_some(),
    );
    let (_, _, _, mean) = served.stats(last_w.saturating_sub(30), last_w);
    rows.row(
        "changed agreement set: back end, the last 3 s",
        format!("{:.0} units/s", mean / 100.0 * 400.0),
        "200 ± 5% (the new capacity)",
        (mean / 100.0 * 400.0 - 200.0).abs() <= 10.0,
    );
    rows.done();
}

/// CPU seconds (user and system, every thread) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3:
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// The coordination cost with 8 gateway processes: each gateway's CPU per window against
/// a gateway without `[cluster]` under the same load, the messages each sends and
/// receives per window (the root and a leaf), and the slowest step of the tree's logic at
/// the root (which solves the plan): its CPU time against a tenth of a window, and its
/// wall-clock time, which on a loaded machine includes waiting for a CPU.
#[ignore = "experiment: the coordination cost of 8 gateways, figures for docs/benchmarks.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_cluster_coordination_cost_of_eight_gateways() {
    let rig = Rig::start("cc", 8, COST).await;
    // A gateway planning alone: the same configuration without `[cluster]`.
    let alone_text = {
        let text = config(
            rig.backend,
            &rig.nats.urls,
            "unused",
            "alone",
            TOKEN,
            rig.cost,
        );
        let at = text.find("\n[cluster]").expect("a [cluster] table");
        text[..at].to_string()
    };
    let (alone_proc, alone_gw, _, _) = gateway(&alone_text, &[], &[]);
    let (idle_alone_proc, _, _, _) = gateway(&alone_text, &[], &[]);
    let secs = 15.0;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    // The same light load on the lone gateway and on g1; the others idle.
    let _load = [
        offer(alone_gw, "/a", 20.0, end),
        offer(rig.g[1].gw, "/a", 20.0, end),
    ];
    let pids: Vec<u32> = rig
        .g
        .iter()
        .map(|g| g.proc.as_ref().map_or(0, |p| p.child.id()))
        .collect();
    let alone_pid = alone_proc.child.id();
    let idle_alone_pid = idle_alone_proc.child.id();
    let before: Vec<Value> = futures_statuses(&rig.g).await;
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let alone0 = cpu_seconds(alone_pid);
    let idle_alone0 = cpu_seconds(idle_alone_pid);
    tokio::time::sleep_until(end).await;
    let cpu1: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let alone1 = cpu_seconds(alone_pid);
    let idle_alone1 = cpu_seconds(idle_alone_pid);
    let after: Vec<Value> = futures_statuses(&rig.g).await;
    let windows = secs * 1000.0 / WINDOW_MS as f64;
    let ms_per_window = |c: f64| c * 1000.0 / windows;
    let alone = ms_per_window(alone1 - alone0);
    let idle_alone = ms_per_window(idle_alone1 - idle_alone0);
    let per: Vec<f64> = cpu0
        .iter()
        .zip(&cpu1)
        .map(|(a, b)| ms_per_window(b - a))
        .collect();
    let root = after
        .iter()
        .position(|s| s["cluster"]["role"] == "root")
        .expect("a root");
    let messages = |i: usize, key: &str| {
        (after[i]["cluster"][key].as_f64().unwrap_or(0.0)
            - before[i]["cluster"][key].as_f64().unwrap_or(0.0))
            / windows
    };
    let idle_leaf = (0..8)
        .find(|&i| i != root && i != 1 && after[i]["cluster"]["role"] == "leaf")
        .unwrap_or(0);
    let mut sorted = per.clone();
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[3] + sorted[4]) / 2.0;
    let slowest_us = after[root]["cluster"]["slowest_step_us"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let slowest_cpu_us = after[root]["cluster"]["slowest_step_cpu_us"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let mut rows = Rows::new();
    rows.row(
        "8 gateways: CPU per 100 ms window (median of 8; the root; a loaded leaf; an idle leaf) against gateways alone, loaded and idle",
        format!(
            "{median:.2} ms; root g{root} {:.2} ms; g1 {:.2} ms; g{idle_leaf} {:.2} ms; alone {alone:.2} ms loaded, {idle_alone:.2} ms idle; the link's cost: loaded {:.2} ms, idle {:.2} ms, root {:.2} ms per window",
            per[root],
            per[1],
            per[idle_leaf],
            per[1] - alone,
            per[idle_leaf] - idle_alone,
            per[root] - idle_alone,
        ),
        "recorded",
        true,
    );
    rows.row(
        "8 gateways: messages per window, root sent / received; a leaf sent / received",
        format!(
            "{:.2} / {:.2}; {:.2} / {:.2}",
            messages(root, "messages_sent_total"),
            messages(root, "messages_received_total"),
            messages(idle_leaf, "messages_sent_total"),
            messages(idle_leaf, "messages_received_total"),
        ),
        "recorded",
        true,
    );
    rows.row(
        "8 gateways: the root's slowest step (sums and the plan), CPU time; wall clock",
        format!("{slowest_cpu_us} µs; {slowest_us} µs"),
        "CPU ≤ a tenth of a window (10 000 µs); the wall clock's reported (it includes waiting for a CPU)",
        slowest_cpu_us <= WINDOW_MS * 100,
    );
    rows.done();
}
