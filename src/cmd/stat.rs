//! `allot stat`: a running gateway's sensors as a table, totals since start next to rates
//! per second from two samples of `/status`. The rate arithmetic here is shared with
//! `allot top`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use allot_gateway::stats::{BackendSnapshot, ClassSnapshot, HistogramSnapshot, Status};
use anyhow::Context;
use http::Method;
use serde::Serialize;

use super::admin_client::{call, AdminTarget};

/// Flags of `allot stat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: AdminTarget,
    /// Print one JSON object per sample (`status` as `/status` serves it, `rates` per
    /// second over the interval) instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep printing, one table (or JSON line) every interval, until interrupted.
    #[arg(long)]
    watch: bool,
    /// With `--watch`: stop after this many tables.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
    /// Time between the two samples that give the rates, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    interval_ms: u64,
    /// Print the cluster link instead (role, epoch, the tree as this gateway knows it,
    /// fallback, messages, per-principal global demand and local share); with `--json`
    /// the `cluster` object of `/status`.
    #[arg(long, conflicts_with_all = ["watch", "count"])]
    cluster: bool,
}

/// Fetches `/status` twice, `--interval-ms` apart, and prints totals and rates.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.interval_ms == 0 {
        anyhow::bail!("--interval-ms: expected an integer ≥ 1, got 0");
    }
    let rt = super::runtime(Some(1))?;
    if args.cluster {
        return rt.block_on(async {
            let now = fetch(&args.target).await?;
            let Some(c) = now.status.cluster else {
                anyhow::bail!("this gateway has no [cluster]: it plans alone");
            };
            if args.json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                print!("{}", cluster_table(&c));
            }
            Ok(ExitCode::SUCCESS)
        });
    }
    rt.block_on(async {
        let interval = Duration::from_millis(args.interval_ms);
        let clear = args.watch && !args.json && std::io::stdout().is_terminal();
        let mut before = fetch(&args.target).await?;
        let mut printed = 0u64;
        loop {
            tokio::time::sleep(interval).await;
            let now = fetch(&args.target).await?;
            let rates = Rates::between(&before, &now);
            if args.json {
                let line = serde_json::json!({ "status": now.status, "rates": rates });
                println!("{line}");
            } else {
                if clear {
                    // Home and clear the screen: the table redrawn in place.
                    print!("\x1b[H\x1b[2J");
                } else if printed > 0 {
                    println!();
                }
                print!("{}", table(&now.status, &rates));
            }
            printed += 1;
            if !args.watch || args.count.is_some_and(|n| printed >= n) {
                return Ok(ExitCode::SUCCESS);
            }
            before = now;
        }
    })
}

/// The cluster link as text: this node, its place in the tree, and the figures.
pub fn cluster_table(c: &allot_gateway::cluster::ClusterSnapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let none = "-".to_string();
    let _ = writeln!(out, "node {}  role {}  epoch {}", c.node, c.role, c.epoch);
    let _ = writeln!(
        out,
        "fallback {}{}  windows since fresh {}  members {}",
        if c.fallback { "yes" } else { "no" },
        c.fallback_since_ms
            .map(|ms| format!(" (since unix ms {ms})"))
            .unwrap_or_default(),
        c.windows_since_fresh,
        c.members
    );
    let _ = writeln!(
        out,
        "messages sent {}  received {}  ignored {}",
        c.messages_sent_total, c.messages_received_total, c.messages_ignored_total
    );
    if let Some(e) = &c.error {
        let _ = writeln!(out, "engine error: {e}");
    }
    let _ = writeln!(out, "tree (as this gateway knows it):");
    let root = c.root.clone().unwrap_or_else(|| none.clone());
    let _ = writeln!(out, "  root {root}");
    match &c.parent {
        Some(p) if *p != root => {
            let _ = writeln!(out, "    … {p}");
            let _ = writeln!(out, "        {} (this gateway)", c.node);
        }
        Some(_) => {
            let _ = writeln!(out, "    {} (this gateway)", c.node);
        }
        None if c.root.as_deref() == Some(c.node.as_str()) => {}
        None => {
            let _ = writeln!(out, "  {} (this gateway, in no tree)", c.node);
        }
    }
    let indent = if c.parent.is_some() {
        "        "
    } else {
        "    "
    };
    for child in &c.children {
        let _ = writeln!(out, "{indent}{child}");
    }
    let _ = writeln!(
        out,
        "{:<16} {:>18} {:>18}",
        "principal", "global demand/s", "local share/s"
    );
    for p in &c.principals {
        let _ = writeln!(
            out,
            "{:<16} {:>18.1} {:>18.1}",
            p.name, p.global_demand, p.local_share
        );
    }
    out
}

/// One reading of `/status` and when it was taken.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What `/status` said.
    pub status: Status,
    /// Its `"cluster"` object: `None` when the gateway is in no cluster (or the object
    /// could not be read).
    pub cluster: Option<ClusterStatus>,
    /// Why a `"cluster"` object present could not be read (the rest of `/status` still is).
    pub cluster_error: Option<String>,
    /// When the answer came.
    pub at: Instant,
}

/// This gateway's place in the cluster, as `/status` serves it under `"cluster"` (only
/// with `[cluster]` in the configuration): the gateway's own type, read back.
pub use allot_gateway::cluster::ClusterSnapshot as ClusterStatus;

/// What [`parse_status`] gives: the status, and its `"cluster"` object (`Ok(None)`:
/// none; `Err`: one that could not be read, and why).
pub type StatusDocument = (Status, Result<Option<ClusterStatus>, String>);

/// Reads a `/status` document: the status, and its `"cluster"` object when there is one.
/// A `"cluster"` object of another shape does not make the rest unreadable.
pub fn parse_status(text: &str) -> anyhow::Result<StatusDocument> {
    let mut doc: serde_json::Value = serde_json::from_str(text).context("reading /status")?;
    let cluster = doc
        .as_object_mut()
        .and_then(|o| o.remove("cluster"))
        .filter(|c| !c.is_null());
    let mut status: Status = serde_json::from_value(doc).context("reading /status")?;
    let cluster = cluster
        .map(serde_json::from_value::<ClusterStatus>)
        .transpose()
        .map_err(|e| format!("/status `cluster`: {e}"));
    if let Ok(Some(c)) = &cluster {
        status.cluster = Some(c.clone());
    }
    Ok((status, cluster))
}

/// Reads `/status` once.
pub async fn fetch(target: &AdminTarget) -> anyhow::Result<Sample> {
    let (code, text) = call(target, Method::GET, "/status", None).await?;
    if !code.is_success() {
        anyhow::bail!("the gateway answered {code}: {}", text.trim());
    }
    let (status, cluster) = parse_status(&text)?;
    let (cluster, cluster_error) = match cluster {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e)),
    };
    Ok(Sample {
        status,
        cluster,
        cluster_error,
        at: Instant::now(),
    })
}

/// Per-second rates of one class between two samples; delays over the same window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClassRates {
    /// Class name.
    pub name: String,
    /// Requests classified into it, per second.
    pub arrivals_per_s: f64,
    /// Requests sent on to service, per second.
    pub admitted_per_s: f64,
    /// Requests refused, per second, all reasons.
    pub refused_per_s: f64,
    /// Requests refused per second, by reason (`queue_full`, `timeout`, `rate`, `quota`,
    /// `address`).
    pub refused_by_reason_per_s: BTreeMap<String, f64>,
    /// Back-end failures answered 502/504, per second.
    pub failed_per_s: f64,
    /// Request body bytes received per second.
    pub bytes_in_per_s: f64,
    /// Response body bytes sent per second.
    pub bytes_out_per_s: f64,
    /// Median queueing delay over the window, milliseconds (`None`: nothing admitted).
    pub queue_delay_p50_ms: Option<f64>,
    /// 99th percentile of the queueing delay over the window, milliseconds.
    pub queue_delay_p99_ms: Option<f64>,
    /// Mean service time over the window, milliseconds.
    pub service_time_mean_ms: Option<f64>,
    /// 99th percentile of the service time over the window, milliseconds.
    pub service_time_p99_ms: Option<f64>,
}

/// Per-second rates of one back end between two samples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendRates {
    /// Back-end name.
    pub name: String,
    /// Requests (or connections) sent, per second.
    pub requests_per_s: f64,
    /// Failures of every kind, per second.
    pub failures_per_s: f64,
    /// Bytes sent to it on connections, per second.
    pub bytes_in_per_s: f64,
    /// Response bytes received from it, per second.
    pub bytes_out_per_s: f64,
    /// Mean service time over the window, milliseconds.
    pub service_time_mean_ms: Option<f64>,
}

/// Per-second rates of one principal between two samples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrincipalRates {
    /// Principal name.
    pub name: String,
    /// Requests admitted within credit, per second.
    pub admitted_per_s: f64,
    /// Requests that waited for credit, per second.
    pub deferred_per_s: f64,
    /// Requests refused for want of credit, per second.
    pub refused_per_s: f64,
}

/// Every rate between two samples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rates {
    /// Seconds between the samples.
    pub interval_s: f64,
    /// Per class, in the order of the later sample.
    pub classes: Vec<ClassRates>,
    /// Per back end.
    pub backends: Vec<BackendRates>,
    /// Per principal.
    pub principals: Vec<PrincipalRates>,
}

/// `(now − before) / seconds`, 0 when the counter went back (a restart) or no time passed.
fn per_s(now: u64, before: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        now.saturating_sub(before) as f64 / seconds
    } else {
        0.0
    }
}

fn window(now: &HistogramSnapshot, before: Option<&HistogramSnapshot>) -> HistogramSnapshot {
    match before {
        Some(b) => now.since(b),
        None => now.clone(),
    }
}

fn some_if_seen(h: &HistogramSnapshot, f: impl Fn(&HistogramSnapshot) -> f64) -> Option<f64> {
    (h.count() > 0).then(|| f(h))
}

fn backend_failures(b: &BackendSnapshot) -> u64 {
    b.failures_connect + b.failures_timeout + b.failures_protocol + b.failures_body_timeout
}

fn refusals(c: &ClassSnapshot) -> [(&'static str, u64); 5] {
    [
        ("queue_full", c.refused_queue_full),
        ("timeout", c.refused_timeout),
        ("rate", c.refused_rate),
        ("quota", c.refused_quota),
        ("address", c.refused_address),
    ]
}

impl Rates {
    /// The rates from `before` to `now`, matched by name (a class new in `now` counts
    /// from zero).
    pub fn between(before: &Sample, now: &Sample) -> Rates {
        Rates::of(
            &before.status,
            &now.status,
            now.at.saturating_duration_since(before.at).as_secs_f64(),
        )
    }

    /// The rates from `before` to `now`, `seconds` apart.
    pub fn of(before: &Status, now: &Status, seconds: f64) -> Rates {
        let empty_class = ClassSnapshot::default();
        let classes = now
            .classes
            .iter()
            .map(|c| {
                let found = before.classes.iter().find(|p| p.name == c.name);
                let p = found.unwrap_or(&empty_class);
                let delay = window(&c.queue_delay, found.map(|p| &p.queue_delay));
                let service = window(&c.service_time, found.map(|p| &p.service_time));
                let by_reason: BTreeMap<String, f64> = refusals(c)
                    .iter()
                    .zip(refusals(p).iter())
                    .map(|((k, n), (_, b))| (k.to_string(), per_s(*n, *b, seconds)))
                    .collect();
                ClassRates {
                    name: c.name.clone(),
                    arrivals_per_s: per_s(c.arrivals, p.arrivals, seconds),
                    admitted_per_s: per_s(c.admitted, p.admitted, seconds),
                    refused_per_s: per_s(c.refused(), p.refused(), seconds),
                    refused_by_reason_per_s: by_reason,
                    failed_per_s: per_s(c.failed, p.failed, seconds),
                    bytes_in_per_s: per_s(c.bytes_in, p.bytes_in, seconds),
                    bytes_out_per_s: per_s(c.bytes_out, p.bytes_out, seconds),
                    queue_delay_p50_ms: some_if_seen(&delay, |h| h.quantile_ms(0.5)),
                    queue_delay_p99_ms: some_if_seen(&delay, |h| h.quantile_ms(0.99)),
                    service_time_mean_ms: some_if_seen(&service, HistogramSnapshot::mean_ms),
                    service_time_p99_ms: some_if_seen(&service, |h| h.quantile_ms(0.99)),
                }
            })
            .collect();
        let empty_backend = BackendSnapshot::default();
        let backends = now
            .backends
            .iter()
            .map(|b| {
                let found = before.backends.iter().find(|p| p.name == b.name);
                let p = found.unwrap_or(&empty_backend);
                let service = window(&b.service_time, found.map(|p| &p.service_time));
                BackendRates {
                    name: b.name.clone(),
                    requests_per_s: per_s(b.requests, p.requests, seconds),
                    failures_per_s: per_s(backend_failures(b), backend_failures(p), seconds),
                    bytes_in_per_s: per_s(b.bytes_in, p.bytes_in, seconds),
                    bytes_out_per_s: per_s(b.bytes_out, p.bytes_out, seconds),
                    service_time_mean_ms: some_if_seen(&service, HistogramSnapshot::mean_ms),
                }
            })
            .collect();
        let principals = now
            .principals
            .iter()
            .map(|x| {
                let p = before.principals.iter().find(|p| p.name == x.name);
                let (a, d, r) = p.map_or((0, 0, 0), |p| (p.admitted, p.deferred, p.refused));
                PrincipalRates {
                    name: x.name.clone(),
                    admitted_per_s: per_s(x.admitted, a, seconds),
                    deferred_per_s: per_s(x.deferred, d, seconds),
                    refused_per_s: per_s(x.refused, r, seconds),
                }
            })
            .collect();
        Rates {
            interval_s: seconds,
            classes,
            backends,
            principals,
        }
    }
}

/// A cap as a person reads it: the largest integers (what "no cap" is stored as) read
/// `unlimited`.
pub fn cap(v: u64) -> String {
    if v >= u64::from(u32::MAX) {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

/// A value that may stand for "no limit" (non-finite, or too large to be a real one).
pub fn cap_f64(v: f64) -> String {
    if !v.is_finite() || v.abs() >= 1e15 {
        "unlimited".to_string()
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// An optional figure with `d` decimals, `-` when absent.
pub fn opt(v: Option<f64>, d: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"))
}

/// Bytes as MB with two decimals.
fn mb(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / 1e6)
}

/// The status and its rates as fixed-width tables: classes, back ends and their
/// addresses, principals.
pub fn table(s: &Status, r: &Rates) -> String {
    let mut out = format!(
        "running {}/{}   up {:.0} s   connections {}   rates per second over {:.1} s\n",
        s.running,
        cap(s.max_running),
        s.uptime_s,
        s.connections,
        r.interval_s
    );
    out += &format!(
        "{:<12} {:>9} {:>8} {:>9} {:>8} {:>8} {:>7} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
        "class",
        "arrivals",
        "/s",
        "admitted",
        "/s",
        "refused",
        "/s",
        "queued",
        "in-fl",
        "delay p50",
        "delay p99",
        "svc ms",
        "MB in",
        "MB out",
        "MB/s out"
    );
    let none = ClassRates::default();
    for c in &s.classes {
        let cr = r.classes.iter().find(|x| x.name == c.name).unwrap_or(&none);
        out += &format!(
            "{:<12} {:>9} {:>8.1} {:>9} {:>8.1} {:>8} {:>7.1} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8.3}\n",
            c.name,
            c.arrivals,
            cr.arrivals_per_s,
            c.admitted,
            cr.admitted_per_s,
            c.refused(),
            cr.refused_per_s,
            c.queued,
            c.in_flight,
            opt(cr.queue_delay_p50_ms, 1),
            opt(cr.queue_delay_p99_ms, 1),
            opt(cr.service_time_mean_ms, 1),
            mb(c.bytes_in),
            mb(c.bytes_out),
            cr.bytes_out_per_s / 1e6
        );
        if c.refused() > 0 {
            let reasons: Vec<String> = refusals(c)
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| {
                    let rate = cr.refused_by_reason_per_s.get(*k).copied().unwrap_or(0.0);
                    format!("{k} {n} ({rate:.1}/s)")
                })
                .collect();
            out += &format!("  refused: {}\n", reasons.join(", "));
        }
    }
    out += &format!(
        "{:<12} {:>9} {:>8} {:>6} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
        "backend",
        "requests",
        "/s",
        "in-fl",
        "failed",
        "fail/s",
        "healthy",
        "svc ms",
        "MB in",
        "MB out"
    );
    let none = BackendRates::default();
    for b in &s.backends {
        let br = r
            .backends
            .iter()
            .find(|x| x.name == b.name)
            .unwrap_or(&none);
        let total = if b.addresses.is_empty() {
            b.healthy_addresses
        } else {
            b.addresses.len()
        };
        out += &format!(
            "{:<12} {:>9} {:>8.1} {:>6} {:>8} {:>7.1} {:>8} {:>8} {:>8} {:>8}\n",
            b.name,
            b.requests,
            br.requests_per_s,
            b.in_flight,
            backend_failures(b),
            br.failures_per_s,
            format!("{}/{}", b.healthy_addresses, total),
            opt(br.service_time_mean_ms, 1),
            mb(b.bytes_in),
            mb(b.bytes_out)
        );
        for a in &b.addresses {
            let health = match (a.checked_down, a.ejected) {
                (false, false) => "up",
                (true, _) => "check failing",
                (false, true) => "ejected",
            };
            out += &format!(
                "  {:<24} {:<9} {:<14} in-fl {}\n",
                a.address, a.mode, health, a.in_flight
            );
        }
    }
    if !s.principals.is_empty() {
        out += &format!(
            "{:<12} {:>12} {:>11} {:>10} {:>12} {:>9} {:>8} {:>8} {:>8}\n",
            "principal",
            "guaranteed/s",
            "optional/s",
            "demand/s",
            "allocation/s",
            "admitted",
            "/s",
            "refused",
            "/s"
        );
        let none = PrincipalRates::default();
        for p in &s.principals {
            let pr = r
                .principals
                .iter()
                .find(|x| x.name == p.name)
                .unwrap_or(&none);
            out += &format!(
                "{:<12} {:>12.1} {:>11.1} {:>10.1} {:>12.1} {:>9} {:>8.1} {:>8} {:>8.1}\n",
                p.name,
                p.mandatory,
                p.optional,
                p.demand,
                p.allocation,
                p.admitted,
                pr.admitted_per_s,
                p.refused,
                pr.refused_per_s
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, arrivals: u64, refused_rate: u64) -> ClassSnapshot {
        ClassSnapshot {
            name: name.into(),
            arrivals,
            admitted: arrivals - refused_rate,
            refused_rate,
            ..ClassSnapshot::default()
        }
    }

    #[test]
    fn rates_are_differences_over_the_interval_and_new_classes_count_from_zero() {
        let before = Status {
            classes: vec![class("a", 100, 10)],
            ..Status::default()
        };
        let now = Status {
            classes: vec![class("a", 300, 30), class("b", 50, 0)],
            ..Status::default()
        };
        let r = Rates::of(&before, &now, 2.0);
        assert_eq!(r.classes[0].arrivals_per_s, 100.0);
        assert_eq!(r.classes[0].refused_per_s, 10.0);
        assert_eq!(r.classes[0].refused_by_reason_per_s["rate"], 10.0);
        assert_eq!(r.classes[1].arrivals_per_s, 25.0);
        // A counter that went back (a restarted gateway) reads 0, not a huge rate.
        assert_eq!(Rates::of(&now, &before, 1.0).classes[0].arrivals_per_s, 0.0);
    }

    #[test]
    fn the_largest_integers_read_unlimited() {
        assert_eq!(cap(u64::MAX), "unlimited");
        assert_eq!(cap(usize::MAX as u64), "unlimited");
        assert_eq!(cap(256), "256");
        assert_eq!(cap_f64(u64::MAX as f64), "unlimited");
        assert_eq!(cap_f64(f64::INFINITY), "unlimited");
        assert_eq!(cap_f64(3.0), "3");
        let table = table(
            &Status {
                max_running: u64::MAX,
                ..Status::default()
            },
            &Rates::default(),
        );
        assert!(table.starts_with("running 0/unlimited"), "{table}");
        assert!(!table.contains("18446744073709551615"));
    }
}
