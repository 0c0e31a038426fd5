//! `allot sim cluster`: the combining tree of `allot_model::cluster` — the very code a
//! gateway runs — for up to 10 000 simulated gateways, with message lag, loss and killed
//! nodes, on an open-loop demand trace.
//!
//! Time is simulated (microseconds, an event queue); nothing sleeps. Each window every
//! live gateway enforces what its node says, admits `min(demand, quota)` of each
//! principal, and closes the window with its demand; messages take `--lag` (±50%) and are
//! lost with probability `--loss`, each delivery on its own. The root's lease is renewed
//! at every window boundary while it lives; `--lease-windows` after the last renewal the
//! first live member (by name) wins the election with the next epoch, and every gateway
//! takes its place in the new tree.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use allot_model::agreements::{
    AgreementSet, AgreementSpec, AgreementsSpec, Objective, PrincipalSpec,
};
use allot_model::cluster::{Node, Outgoing, Quotas, Report, Shape, Source};
use allot_model::planner::Planner;
use anyhow::{bail, Context};
use serde::Serialize;

/// Units per second of capacity per simulated gateway.
const CAPACITY_PER_GATEWAY: f64 = 100.0;
/// A principal's admitted units within this fraction of capacity of the single-gateway
/// plan counts as converged.
const CONVERGED_FRACTION: f64 = 0.02;
/// Principals of the built-in agreement set: the server S owns the capacity, A and B use
/// it with [0.25, 1] and [0.75, 1].
const PRINCIPALS: [&str; 3] = ["S", "A", "B"];
/// The built-in trace: from `time_ms`, A's and B's global demand as fractions of capacity.
const TRACE: [(u64, f64, f64); 5] = [
    (0, 0.5, 0.3),
    (4_000, 1.2, 1.0),
    (8_000, 1.2, 0.0),
    (12_000, 0.2, 1.5),
    (16_000, 1.0, 1.0),
];

/// Flags of `allot sim cluster`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Built-in scenario: one server S owning 100 units/s per gateway, shared by A
[0.25, 1] and B [0.75, 1]; 100 ms windows. Global demand (fractions of capacity):
  0 s: A 0.5, B 0.3 | 4 s: A 1.2, B 1.0 | 8 s: A 1.2, B 0 | 12 s: A 0.2, B 1.5 |
  16 s: A 1.0, B 1.0
spread unevenly over the gateways (fixed random weights, some gateways without a
principal) with per-window noise (--noise). Example:
  allot sim cluster --gateways 10000 --fanout 32 --loss 0.01 --kill root@7050"
)]
pub struct Args {
    /// Number of simulated gateways (1 to 10 000).
    #[arg(long, default_value_t = 100)]
    pub gateways: usize,
    /// Most children per node of the combining tree (≥ 2).
    #[arg(long, default_value_t = 32)]
    pub fanout: usize,
    /// Probability that any one message delivery is lost, in [0, 1) (`0.01` or `1%`).
    #[arg(long, default_value = "0", value_parser = parse_fraction)]
    pub loss: f64,
    /// Mean one-way message lag in milliseconds (each message takes 0.5 to 1.5 times it).
    #[arg(long, default_value_t = 1.0)]
    pub lag: f64,
    /// Kill a node at a time: `root@MS` (whoever is root then) or `NAME@MS` (gateways are
    /// named g00000, g00001, …). Repeatable.
    #[arg(long = "kill", value_name = "WHO@MS", value_parser = parse_kill)]
    pub kills: Vec<Kill>,
    /// Length of simulated time in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    pub duration_ms: u64,
    /// Window length in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub window_ms: u64,
    /// An aggregator waits at most this long per level below it for its children's
    /// reports (default: a tenth of the window).
    #[arg(long)]
    pub hop_ms: Option<f64>,
    /// The root's lease, in windows after its last renewal.
    #[arg(long, default_value_t = 2)]
    pub lease_windows: u64,
    /// A dead member leaves the membership this many windows after it died.
    #[arg(long, default_value_t = 10)]
    pub member_lease_windows: u64,
    /// Per-window noise on each gateway's demand: uniform in ±this fraction.
    #[arg(long, default_value_t = 0.05)]
    pub noise: f64,
    /// Seed of the random weights, noise, lag and loss.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print no per-window rows, only the summary.
    #[arg(long)]
    pub quiet: bool,
    /// Print exactly one JSON object (summary and windows) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One `--kill`.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    /// `None` for whoever is root at the time.
    who: Option<String>,
    time_ms: u64,
}

fn parse_kill(text: &str) -> Result<Kill, String> {
    let (who, at) = text
        .split_once('@')
        .ok_or_else(|| format!("`{text}`: expected WHO@MS, e.g. root@5000"))?;
    let time_ms = at
        .parse()
        .map_err(|_| format!("`{text}`: `{at}` is not a whole number of milliseconds"))?;
    let who = match who {
        "root" => None,
        "" => {
            return Err(format!(
                "`{text}`: expected `root` or a gateway name before @"
            ))
        }
        name => Some(name.to_string()),
    };
    Ok(Kill { who, time_ms })
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let (number, scale) = match text.strip_suffix('%') {
        Some(n) => (n, 0.01),
        None => (text, 1.0),
    };
    let value = number
        .trim()
        .parse::<f64>()
        .map(|v| v * scale)
        .map_err(|_| format!("`{text}`: expected a fraction such as 0.01 or 1%"))?;
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("`{text}`: expected a fraction in [0, 1)"))
    }
}

/// SplitMix64: a small seeded generator, so a run is a function of its flags.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Kind {
    Report(usize, Report),
    Quotas(usize, Rc<Quotas>),
    Deadline(usize, u64),
    Kill(Option<String>, u64),
}

struct Event {
    at_us: u64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_us, self.seq).cmp(&(other.at_us, other.seq))
    }
}

/// One window's figures (units per window).
#[derive(Debug, Clone, Serialize)]
struct WindowRow {
    window: u64,
    start_ms: u64,
    demand: f64,
    admitted: f64,
    capacity: f64,
    /// Admitted per principal (A, B).
    admitted_by_principal: [f64; 2],
    /// The single-gateway plan of the same global demand (A, B).
    ideal_by_principal: [f64; 2],
    fresh: usize,
    stale: usize,
    fallback: usize,
    epoch: u64,
}

#[derive(Debug, Clone, Serialize)]
struct KillJson {
    who: String,
    time_ms: u64,
    window: u64,
    /// Windows from the kill on in which more than 1% of live gateways enforced their
    /// fallback.
    fallback_windows: u64,
    new_root: Option<String>,
    new_epoch: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct StepJson {
    window: u64,
    /// Windows until every window to the next event is within 2% of capacity of the
    /// single-gateway plan; `None` if it never settled.
    converge_windows: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct Summary {
    gateways: usize,
    fanout: usize,
    loss: f64,
    lag_ms: f64,
    depth: u32,
    root_children: usize,
    windows: u64,
    peak_overshoot_percent: f64,
    peak_window: u64,
    mean_while_over_percent: f64,
    windows_over: u64,
    excess_windows: u64,
    capacity_used_under_excess_percent: f64,
    /// The same, leaving out the windows before a plan can know of a demand step or a
    /// kill (the step's window and the two after it).
    capacity_used_under_steady_excess_percent: f64,
    steps: Vec<StepJson>,
    kills: Vec<KillJson>,
    root_messages_per_s: f64,
    root_sent_per_s: f64,
    root_received_per_s: f64,
    messages_lost: u64,
}

#[derive(Serialize)]
struct SimJson<'a> {
    summary: &'a Summary,
    windows: &'a [WindowRow],
}

struct Gateway {
    node: Node,
    alive: bool,
    died_window: Option<u64>,
    weight: [f64; 2],
    demand: [f64; 3],
    level: u32,
    has_children: bool,
}

struct Sim {
    args: Args,
    window_us: u64,
    hop_us: u64,
    rng: Rng,
    queue: BinaryHeap<Reverse<Event>>,
    seq: u64,
    gateways: Vec<Gateway>,
    index: HashMap<String, usize>,
    root: usize,
    former_roots: std::collections::HashSet<usize>,
    now_window: u64,
    epoch: u64,
    depth: u32,
    root_children: usize,
    root_renewed_window: u64,
    root_sent: u64,
    root_received: u64,
    lost: u64,
    kills: Vec<KillJson>,
    capacity_per_window: f64,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.gateways == 0 || args.gateways > 10_000 {
        bail!("--gateways {}: expected 1 to 10000", args.gateways);
    }
    if args.fanout < 2 {
        bail!("--fanout {}: expected an integer ≥ 2", args.fanout);
    }
    if !(args.lag.is_finite() && args.lag >= 0.0) {
        bail!("--lag {}: expected milliseconds ≥ 0", args.lag);
    }
    if args.window_ms == 0 {
        bail!("--window-ms 0: expected milliseconds ≥ 1");
    }
    if !(args.noise.is_finite() && (0.0..1.0).contains(&args.noise)) {
        bail!("--noise {}: expected a fraction in [0, 1)", args.noise);
    }
    if args.lease_windows == 0 {
        bail!("--lease-windows 0: expected an integer ≥ 1");
    }
    if let Some(h) = args.hop_ms {
        if !(h.is_finite() && h > 0.0) {
            bail!("--hop-ms {h}: expected milliseconds > 0");
        }
    }
    for k in &args.kills {
        if let Some(name) = &k.who {
            let known = name
                .strip_prefix('g')
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|i| i < args.gateways && name.len() == 6);
            if !known {
                bail!(
                    "--kill {name}@{}: no such gateway (they are g00000 to g{:05})",
                    k.time_ms,
                    args.gateways - 1
                );
            }
        }
    }
    let json = args.json;
    let quiet = args.quiet;
    let mut sim = Sim::new(args)?;
    let rows = sim.run(|row| {
        if !json && !quiet {
            print_row(row);
        }
    })?;
    let summary = sim.summary(&rows);
    if json {
        let text = serde_json::to_string(&SimJson {
            summary: &summary,
            windows: &rows,
        })?;
        println!("{text}");
    } else {
        print_summary(&summary);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_row(r: &WindowRow) {
    if r.window == 0 {
        println!(
            "{:>6} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {:>6} {:>8} {:>5}",
            "window",
            "start_ms",
            "demand",
            "admitted",
            "capacity",
            "admitted%",
            "ideal%",
            "fresh",
            "stale",
            "fallback",
            "epoch"
        );
    }
    let ideal: f64 = r.ideal_by_principal.iter().sum();
    println!(
        "{:>6} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>9.2} {:>7} {:>6} {:>8} {:>5}",
        r.window,
        r.start_ms,
        r.demand,
        r.admitted,
        r.capacity,
        100.0 * r.admitted / r.capacity,
        100.0 * ideal / r.capacity,
        r.fresh,
        r.stale,
        r.fallback,
        r.epoch
    );
}

fn print_summary(s: &Summary) {
    println!(
        "{} gateways, fan-out {} (root has {} children, {} levels below it), loss {}%, lag {} ms, {} windows",
        s.gateways,
        s.fanout,
        s.root_children,
        s.depth,
        s.loss * 100.0,
        s.lag_ms,
        s.windows
    );
    println!(
        "peak overshoot:                    {:.2}% of capacity (window {})",
        s.peak_overshoot_percent, s.peak_window
    );
    println!(
        "mean while over capacity:          {:.2}% ({} windows over)",
        s.mean_while_over_percent, s.windows_over
    );
    println!(
        "capacity used under excess demand: {:.2}% ({} windows); {:.2}% leaving out the 3 windows from each step or kill",
        s.capacity_used_under_excess_percent,
        s.excess_windows,
        s.capacity_used_under_steady_excess_percent
    );
    let steps: Vec<String> = s
        .steps
        .iter()
        .map(|st| match st.converge_windows {
            Some(w) => format!("{w} (window {})", st.window),
            None => format!("never (window {})", st.window),
        })
        .collect();
    println!("windows to converge after a step:  {}", steps.join(", "));
    for k in &s.kills {
        println!(
            "kill {}@{} ms: {} windows in fallback; new root {} (epoch {})",
            k.who,
            k.time_ms,
            k.fallback_windows,
            k.new_root.as_deref().unwrap_or("-"),
            k.new_epoch.map_or("-".to_string(), |e| e.to_string())
        );
    }
    println!(
        "messages at the root:              {:.1} per second ({:.1} sent, {:.1} received); {} deliveries lost",
        s.root_messages_per_s, s.root_sent_per_s, s.root_received_per_s, s.messages_lost
    );
}

fn agreement_set(gateways: usize) -> anyhow::Result<AgreementSet> {
    let principal = |name: &str, capacity: f64| PrincipalSpec {
        name: name.to_string(),
        capacity_units_per_s: capacity,
        price: 1.0,
        locality_limit_units_per_s: None,
    };
    let agreement = |to: &str, lower: f64| AgreementSpec {
        from: "S".to_string(),
        to: to.to_string(),
        share: [lower, 1.0],
    };
    let spec = AgreementsSpec {
        objective: Objective::Community,
        window_ms: 100,
        principals: vec![
            principal(PRINCIPALS[0], CAPACITY_PER_GATEWAY * gateways as f64),
            principal(PRINCIPALS[1], 0.0),
            principal(PRINCIPALS[2], 0.0),
        ],
        agreements: vec![agreement("A", 0.25), agreement("B", 0.75)],
    };
    AgreementSet::from_spec(&spec).context("the built-in agreement set")
}

fn name_of(i: usize) -> String {
    format!("g{i:05}")
}

impl Sim {
    fn new(args: Args) -> anyhow::Result<Sim> {
        let set = agreement_set(args.gateways)?;
        let scale = args.window_ms as f64 / 1000.0;
        let planner = Arc::new(Planner::with_scale(&set, scale));
        let capacity_per_window = CAPACITY_PER_GATEWAY * args.gateways as f64 * scale;
        let mut rng = Rng(args.seed);
        let gateways: Vec<Gateway> = (0..args.gateways)
            .map(|i| {
                // Uneven: weights from 0.2 to 1.8, and a third of gateways lack a principal.
                let mut weight = [0.0; 2];
                for w in &mut weight {
                    *w = if rng.unit() < 0.3 {
                        0.0
                    } else {
                        0.2 + 1.6 * rng.unit()
                    };
                }
                Gateway {
                    node: Node::new(name_of(i), Arc::clone(&planner)),
                    alive: true,
                    died_window: None,
                    weight,
                    demand: [0.0; 3],
                    level: 0,
                    has_children: false,
                }
            })
            .collect();
        let index = (0..args.gateways).map(|i| (name_of(i), i)).collect();
        let window_us = args.window_ms * 1000;
        let hop_us = args
            .hop_ms
            .map_or(window_us / 10, |h| (h * 1000.0).round() as u64)
            .max(1);
        let mut sim = Sim {
            window_us,
            hop_us,
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            gateways,
            index,
            root: 0,
            former_roots: std::collections::HashSet::new(),
            now_window: 0,
            epoch: 1,
            depth: 0,
            root_children: 0,
            root_renewed_window: 0,
            root_sent: 0,
            root_received: 0,
            lost: 0,
            kills: Vec::new(),
            capacity_per_window,
            args,
        };
        for k in sim.args.kills.clone() {
            sim.push(k.time_ms * 1000, Kind::Kill(k.who, k.time_ms));
        }
        sim.reshape()?;
        Ok(sim)
    }

    fn push(&mut self, at_us: u64, kind: Kind) {
        self.seq += 1;
        self.queue.push(Reverse(Event {
            at_us,
            seq: self.seq,
            kind,
        }));
    }

    fn lag_us(&mut self) -> u64 {
        (self.args.lag * 1000.0 * (0.5 + self.rng.unit())).round() as u64
    }

    /// Every live member takes its place in the tree of the current root and epoch.
    fn reshape(&mut self) -> anyhow::Result<()> {
        // A dead member stays in the membership until its key expires, unless it was the
        // root: its lease expired, so it is known gone.
        let (now, lease) = (self.now_window, self.args.member_lease_windows);
        let members: Vec<String> = self
            .gateways
            .iter()
            .enumerate()
            .filter(|(i, g)| {
                g.alive
                    || (!self.former_roots.contains(i)
                        && g.died_window.is_some_and(|d| now < d + lease))
            })
            .map(|(_, g)| g.node.name().to_string())
            .collect();
        let root_name = self.gateways[self.root].node.name().to_string();
        let shape = Shape::new(&members, &root_name, self.args.fanout)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.depth = shape.depth();
        self.root_children = shape.position(&root_name).map_or(0, |p| p.children.len());
        for g in self.gateways.iter_mut().filter(|g| g.alive) {
            g.node.reshape(self.epoch, &shape);
            let p = g.node.position();
            g.level = p.map_or(0, |p| p.level);
            g.has_children = p.is_some_and(|p| !p.children.is_empty());
        }
        Ok(())
    }

    /// Delivers what a node sent at `now_us`.
    fn send(&mut self, from: usize, now_us: u64, out: Vec<Outgoing>) {
        for o in out {
            if from == self.root {
                self.root_sent += 1;
            }
            match o {
                Outgoing::Report { to, report } => {
                    let Some(&to) = self.index.get(&to) else {
                        continue;
                    };
                    if self.rng.unit() < self.args.loss {
                        self.lost += 1;
                        continue;
                    }
                    let at = now_us + self.lag_us();
                    self.push(at, Kind::Report(to, report));
                }
                Outgoing::Quotas(q) => {
                    // Published on the sender's subject: every child of the sender gets
                    // it, a child left out of the parts too (it takes zero).
                    let q = Rc::new(q);
                    let children: Vec<String> = self.gateways[from]
                        .node
                        .position()
                        .map(|p| p.children.clone())
                        .unwrap_or_default();
                    for child in &children {
                        let Some(&to) = self.index.get(child) else {
                            continue;
                        };
                        if self.rng.unit() < self.args.loss {
                            self.lost += 1;
                            continue;
                        }
                        let at = now_us + self.lag_us();
                        self.push(at, Kind::Quotas(to, Rc::clone(&q)));
                    }
                }
            }
        }
    }

    fn handle(&mut self, now_us: u64, kind: Kind) {
        match kind {
            Kind::Report(to, report) => {
                if !self.gateways[to].alive {
                    return;
                }
                if to == self.root {
                    self.root_received += 1;
                }
                if let Ok(out) = self.gateways[to].node.on_report(report) {
                    self.send(to, now_us, out);
                }
            }
            Kind::Quotas(to, q) => {
                if !self.gateways[to].alive {
                    return;
                }
                if let Ok(out) = self.gateways[to].node.on_quotas(&q) {
                    self.send(to, now_us, out);
                }
            }
            Kind::Deadline(node, window) => {
                if self.gateways[node].alive {
                    let out = self.gateways[node].node.deadline(window);
                    self.send(node, now_us, out);
                }
            }
            Kind::Kill(who, time_ms) => {
                let target = match &who {
                    None => Some(self.root),
                    Some(name) => self.index.get(name).copied(),
                };
                if let Some(i) = target.filter(|&i| self.gateways[i].alive) {
                    let window = now_us / self.window_us;
                    self.gateways[i].alive = false;
                    self.gateways[i].died_window = Some(window);
                    self.kills.push(KillJson {
                        who: who.unwrap_or_else(|| format!("root ({})", name_of(i))),
                        time_ms,
                        window,
                        fallback_windows: 0,
                        new_root: None,
                        new_epoch: None,
                    });
                }
            }
        }
    }

    fn demand_fractions(&self, time_ms: u64) -> [f64; 2] {
        TRACE
            .iter()
            .rev()
            .find(|(t, _, _)| *t <= time_ms)
            .map_or([0.0, 0.0], |(_, a, b)| [*a, *b])
    }

    fn run(&mut self, mut each: impl FnMut(&WindowRow)) -> anyhow::Result<Vec<WindowRow>> {
        let windows = self.args.duration_ms.div_ceil(self.args.window_ms);
        let weight_sum: [f64; 2] = [0, 1].map(|i| {
            self.gateways
                .iter()
                .map(|g| g.weight[i])
                .sum::<f64>()
                .max(f64::MIN_POSITIVE)
        });
        let planner = Planner::with_scale(
            &agreement_set(self.args.gateways)?,
            self.args.window_ms as f64 / 1000.0,
        );
        let mut rows = Vec::with_capacity(windows as usize);
        for b in 0..windows {
            let t_us = b * self.window_us;
            self.now_window = b;
            while self.queue.peek().is_some_and(|e| e.0.at_us < t_us) {
                if let Some(Reverse(e)) = self.queue.pop() {
                    self.handle(e.at_us, e.kind);
                }
            }
            // The root's lease: renewed while it lives; once expired the first live member
            // wins the election with the next epoch.
            let mut changed = false;
            if self.gateways[self.root].alive {
                self.root_renewed_window = b;
            } else if b >= self.root_renewed_window + self.args.lease_windows {
                if let Some(next) = self.gateways.iter().position(|g| g.alive) {
                    self.former_roots.insert(self.root);
                    self.root = next;
                    self.epoch += 1;
                    changed = true;
                    if let Some(k) = self.kills.iter_mut().rev().find(|k| k.new_root.is_none()) {
                        k.new_root = Some(name_of(next));
                        k.new_epoch = Some(self.epoch);
                    }
                }
            }
            // Dead members leave the membership when their key expires.
            let member_lease = self.args.member_lease_windows;
            for g in &mut self.gateways {
                if g.died_window.is_some_and(|d| d + member_lease == b) {
                    changed = true;
                }
            }
            if changed {
                self.reshape()?;
            }
            // Close the last window everywhere: leaves report now, aggregators by their
            // deadlines.
            if b > 0 {
                for i in 0..self.gateways.len() {
                    if !self.gateways[i].alive {
                        continue;
                    }
                    let demand = self.gateways[i].demand;
                    let out = self.gateways[i].node.close_window(b - 1, &demand);
                    self.send(i, t_us, out);
                    if self.gateways[i].has_children {
                        let height = u64::from(self.depth.saturating_sub(self.gateways[i].level));
                        self.push(t_us + height.max(1) * self.hop_us, Kind::Deadline(i, b - 1));
                    }
                }
            }
            // This window: demand, what each gateway enforces, what is admitted.
            let fractions = self.demand_fractions(b * self.args.window_ms);
            let noise = self.args.noise;
            let capacity = self.capacity_per_window;
            let mut row = WindowRow {
                window: b,
                start_ms: b * self.args.window_ms,
                demand: 0.0,
                admitted: 0.0,
                capacity,
                admitted_by_principal: [0.0; 2],
                ideal_by_principal: [0.0; 2],
                fresh: 0,
                stale: 0,
                fallback: 0,
                epoch: self.epoch,
            };
            let mut global = [0.0; 3];
            for i in 0..self.gateways.len() {
                if !self.gateways[i].alive {
                    continue;
                }
                let mut demand = [0.0; 3];
                for p in 0..2 {
                    let wobble = 1.0 + noise * (2.0 * self.rng.unit() - 1.0);
                    demand[p + 1] = fractions[p] * capacity * self.gateways[i].weight[p]
                        / weight_sum[p]
                        * wobble;
                }
                let g = &mut self.gateways[i];
                g.demand = demand;
                let e = g.node.enforce(b);
                match e.source {
                    Source::Fresh => row.fresh += 1,
                    Source::Stale { .. } => row.stale += 1,
                    Source::Fallback { .. } => row.fallback += 1,
                }
                for p in 0..2 {
                    let admitted = demand[p + 1].min(e.units.get(p + 1).copied().unwrap_or(0.0));
                    row.admitted_by_principal[p] += admitted;
                    global[p + 1] += demand[p + 1];
                }
            }
            row.demand = global.iter().sum();
            row.admitted = row.admitted_by_principal.iter().sum();
            if let Ok(plan) = planner.solve(&global) {
                row.ideal_by_principal = [plan.units[1], plan.units[2]];
            }
            // Loss alone puts a few gateways in fallback now and then (two quotas lost in
            // a row); a kill's fallback is the windows with more than 1% of them there.
            let live = row.fresh + row.stale + row.fallback;
            for k in &mut self.kills {
                if b >= k.window && row.fallback * 100 > live && b <= k.window + 50 {
                    k.fallback_windows += 1;
                }
            }
            each(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    fn summary(&self, rows: &[WindowRow]) -> Summary {
        // Start-up (no plan yet) is not an overshoot or utilisation figure.
        let settled = &rows[rows.len().min(LEAD_START)..];
        let (mut peak, mut peak_window) = (0.0f64, 0);
        let (mut over_sum, mut over_n) = (0.0, 0u64);
        let (mut excess_admitted, mut excess_capacity, mut excess_n) = (0.0, 0.0, 0u64);
        // Windows a plan cannot know of yet: the lead after each demand step and kill.
        let window_ms = self.args.window_ms;
        let lead = allot_model::cluster::LEAD_WINDOWS;
        let unsettled: Vec<u64> = TRACE
            .iter()
            .map(|(t, _, _)| t / window_ms)
            .chain(self.kills.iter().map(|k| k.window))
            .collect();
        let (mut steady_admitted, mut steady_capacity) = (0.0, 0.0);
        for r in settled {
            let ratio = r.admitted / r.capacity;
            let steady = !unsettled
                .iter()
                .any(|&e| r.window >= e && r.window < e + lead + 1);
            if steady && r.demand >= r.capacity {
                steady_admitted += r.admitted;
                steady_capacity += r.capacity;
            }
            if ratio > peak {
                peak = ratio;
                peak_window = r.window;
            }
            if ratio > 1.0 + 1e-9 {
                over_sum += ratio;
                over_n += 1;
            }
            if r.demand >= r.capacity {
                excess_admitted += r.admitted;
                excess_capacity += r.capacity;
                excess_n += 1;
            }
        }
        let events: Vec<u64> = TRACE
            .iter()
            .map(|(t, _, _)| t / window_ms)
            .filter(|w| *w > 0 && (*w as usize) < rows.len())
            .collect();
        let kill_windows: Vec<u64> = self.kills.iter().map(|k| k.window).collect();
        let steps: Vec<StepJson> = events
            .iter()
            .map(|&s| {
                let end = events
                    .iter()
                    .chain(&kill_windows)
                    .copied()
                    .filter(|&e| e > s)
                    .min()
                    .unwrap_or(rows.len() as u64)
                    .min(rows.len() as u64);
                let within = |r: &WindowRow| {
                    (0..2).all(|p| {
                        (r.admitted_by_principal[p] - r.ideal_by_principal[p]).abs()
                            <= CONVERGED_FRACTION * r.capacity
                    })
                };
                let mut converged = None;
                for v in s..end {
                    if rows[v as usize..end as usize].iter().all(within) {
                        converged = Some(v - s);
                        break;
                    }
                }
                StepJson {
                    window: s,
                    converge_windows: converged,
                }
            })
            .collect();
        let seconds = rows.len() as f64 * window_ms as f64 / 1000.0;
        Summary {
            gateways: self.args.gateways,
            fanout: self.args.fanout,
            loss: self.args.loss,
            lag_ms: self.args.lag,
            depth: self.depth,
            root_children: self.root_children,
            windows: rows.len() as u64,
            peak_overshoot_percent: 100.0 * peak,
            peak_window,
            mean_while_over_percent: if over_n > 0 {
                100.0 * over_sum / over_n as f64
            } else {
                0.0
            },
            windows_over: over_n,
            excess_windows: excess_n,
            capacity_used_under_excess_percent: if excess_capacity > 0.0 {
                100.0 * excess_admitted / excess_capacity
            } else {
                0.0
            },
            capacity_used_under_steady_excess_percent: if steady_capacity > 0.0 {
                100.0 * steady_admitted / steady_capacity
            } else {
                0.0
            },
            steps,
            kills: self.kills.clone(),
            root_messages_per_s: (self.root_sent + self.root_received) as f64 / seconds,
            root_sent_per_s: self.root_sent as f64 / seconds,
            root_received_per_s: self.root_received as f64 / seconds,
            messages_lost: self.lost,
        }
    }
}

/// Windows at the start before the first plan is enforced.
const LEAD_START: usize = allot_model::cluster::LEAD_WINDOWS as usize + 1;
