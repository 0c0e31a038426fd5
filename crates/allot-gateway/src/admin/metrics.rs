//! `/metrics`: the sensors through a `prometheus_client` collector that reads the same
//! counters `/status` does (names `allot_<area>_<what>_<unit>`), in the format the scraper
//! asks for: OpenMetrics when its `Accept` names it (as Prometheus does), else the classic
//! Prometheus text format (what `curl` and `promtool check metrics` read).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::gateway::Gateway;
use crate::stats::{
    bucket_bounds_s, AbortReason, BackendFailure, CloseReason, HistogramSnapshot, Status,
};

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The classic Prometheus text format, version 0.0.4.
    Classic,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn for_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Classic,
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

#[derive(Debug)]
struct StatusCollector(Status);

type Labels = Vec<(&'static str, String)>;

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn gauge_f64(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, &HistogramSnapshot)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    let bounds = bucket_bounds_s();
    for (labels, h) in rows {
        // Per-bucket counts: the encoder makes them cumulative. The last is +Inf.
        let buckets: Vec<(f64, u64)> = h
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| (bounds.get(i).copied().unwrap_or(f64::INFINITY), *c))
            .collect();
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
            h.sum_ns as f64 / 1e9,
            h.count(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let class = |name: &str| vec![("class", name.to_string())];
        let rows = |f: fn(&crate::stats::ClassSnapshot) -> u64| -> Vec<(Labels, u64)> {
            s.classes.iter().map(|c| (class(&c.name), f(c))).collect()
        };
        counter(
            &mut e,
            "allot_class_arrivals",
            "Requests classified into the class.",
            &rows(|c| c.arrivals),
        )?;
        counter(
            &mut e,
            "allot_class_admitted",
            "Requests sent on to service.",
            &rows(|c| c.admitted),
        )?;
        let refused: Vec<(Labels, u64)> = s
            .classes
            .iter()
            .flat_map(|c| {
                [
                    ("queue_full", c.refused_queue_full),
                    ("timeout", c.refused_timeout),
                    ("rate", c.refused_rate),
                    ("quota", c.refused_quota),
                    ("address", c.refused_address),
                ]
                .map(|(reason, v)| {
                    (
                        vec![("class", c.name.clone()), ("reason", reason.to_string())],
                        v,
                    )
                })
            })
            .collect();
        counter(
            &mut e,
            "allot_class_refused",
            "Requests refused, by reason.",
            &refused,
        )?;
        counter(
            &mut e,
            "allot_class_failed",
            "Requests answered 502/504 for back-end failures.",
            &rows(|c| c.failed),
        )?;
        let aborted: Vec<(Labels, u64)> = s
            .classes
            .iter()
            .flat_map(|c| {
                AbortReason::ALL.map(|r| {
                    (
                        vec![
                            ("class", c.name.clone()),
                            ("reason", r.as_str().to_string()),
                        ],
                        c.aborted.get(r.as_str()).copied().unwrap_or(0),
                    )
                })
            })
            .collect();
        counter(
            &mut e,
            "allot_class_aborted",
            "Requests cut off in service, by reason.",
            &aborted,
        )?;
        let closed: Vec<(Labels, u64)> = s
            .classes
            .iter()
            .flat_map(|c| {
                CloseReason::ALL.map(|r| {
                    (
                        vec![
                            ("class", c.name.clone()),
                            ("reason", r.as_str().to_string()),
                        ],
                        c.closed.get(r.as_str()).copied().unwrap_or(0),
                    )
                })
            })
            .collect();
        counter(
            &mut e,
            "allot_class_closed",
            "TCP connections that ended after admission, by reason.",
            &closed,
        )?;
        counter(
            &mut e,
            "allot_class_bytes_in",
            "Request body bytes received.",
            &rows(|c| c.bytes_in),
        )?;
        counter(
            &mut e,
            "allot_class_bytes_out",
            "Response body bytes sent.",
            &rows(|c| c.bytes_out),
        )?;
        let g = |f: fn(&crate::stats::ClassSnapshot) -> u64| -> Vec<(Labels, i64)> {
            s.classes
                .iter()
                .map(|c| (class(&c.name), f(c) as i64))
                .collect()
        };
        gauge(
            &mut e,
            "allot_class_queue_length",
            "Requests waiting now.",
            &g(|c| c.queued),
        )?;
        gauge(
            &mut e,
            "allot_class_in_flight",
            "Requests in service now.",
            &g(|c| c.in_flight),
        )?;
        let qd: Vec<(Labels, &HistogramSnapshot)> = s
            .classes
            .iter()
            .map(|c| (class(&c.name), &c.queue_delay))
            .collect();
        histogram(
            &mut e,
            "allot_class_queue_delay",
            "Time from classification to service.",
            &qd,
        )?;
        let st: Vec<(Labels, &HistogramSnapshot)> = s
            .classes
            .iter()
            .map(|c| (class(&c.name), &c.service_time))
            .collect();
        histogram(
            &mut e,
            "allot_class_service_time",
            "Time from service start to the end of the response body.",
            &st,
        )?;

        let backend = |name: &str| vec![("backend", name.to_string())];
        let b: Vec<(Labels, u64)> = s
            .backends
            .iter()
            .map(|b| (backend(&b.name), b.requests))
            .collect();
        counter(
            &mut e,
            "allot_backend_requests",
            "Requests sent to the back end.",
            &b,
        )?;
        let failures: Vec<(Labels, u64)> = s
            .backends
            .iter()
            .flat_map(|b| {
                BackendFailure::ALL
                    .map(|k| {
                        let v = match k {
                            BackendFailure::Connect => b.failures_connect,
                            BackendFailure::Timeout => b.failures_timeout,
                            BackendFailure::Protocol => b.failures_protocol,
                            BackendFailure::BodyTimeout => b.failures_body_timeout,
                        };
                        (k.as_str(), v)
                    })
                    .map(|(kind, v)| {
                        (
                            vec![("backend", b.name.clone()), ("kind", kind.to_string())],
                            v,
                        )
                    })
            })
            .collect();
        counter(
            &mut e,
            "allot_backend_failures",
            "Failed exchanges, by kind.",
            &failures,
        )?;
        let b: Vec<(Labels, u64)> = s
            .backends
            .iter()
            .map(|b| (backend(&b.name), b.bytes_out))
            .collect();
        counter(
            &mut e,
            "allot_backend_bytes_out",
            "Bytes received from the back end (response bodies, connections).",
            &b,
        )?;
        let b: Vec<(Labels, u64)> = s
            .backends
            .iter()
            .map(|b| (backend(&b.name), b.bytes_in))
            .collect();
        counter(
            &mut e,
            "allot_backend_bytes_in",
            "Bytes sent to the back end on connections.",
            &b,
        )?;
        let b: Vec<(Labels, i64)> = s
            .backends
            .iter()
            .map(|b| (backend(&b.name), b.in_flight as i64))
            .collect();
        gauge(
            &mut e,
            "allot_backend_in_flight",
            "Requests in flight now.",
            &b,
        )?;
        let b: Vec<(Labels, i64)> = s
            .backends
            .iter()
            .map(|b| (backend(&b.name), b.healthy_addresses as i64))
            .collect();
        gauge(
            &mut e,
            "allot_backend_healthy_addresses",
            "Addresses not ejected now.",
            &b,
        )?;
        let b: Vec<(Labels, &HistogramSnapshot)> = s
            .backends
            .iter()
            .map(|b| (backend(&b.name), &b.service_time))
            .collect();
        histogram(
            &mut e,
            "allot_backend_service_time",
            "Time from sending to the end of the response body.",
            &b,
        )?;
        let principal = |name: &str| vec![("principal", name.to_string())];
        type Field = fn(&crate::stats::PrincipalSnapshot) -> f64;
        let levels: [(&str, &str, Field); 4] = [
            (
                "allot_principal_mandatory_units_per_second",
                "MC: guaranteed cost units per second.",
                |p| p.mandatory,
            ),
            (
                "allot_principal_optional_units_per_second",
                "OC: units per second usable beyond the guarantee.",
                |p| p.optional,
            ),
            (
                "allot_principal_demand_units_per_second",
                "Smoothed demand.",
                |p| p.demand,
            ),
            (
                "allot_principal_allocation_units_per_second",
                "This window's allocation.",
                |p| p.allocation,
            ),
        ];
        for (name, help, f) in levels {
            let rows: Vec<(Labels, f64)> = s
                .principals
                .iter()
                .map(|p| (principal(&p.name), f(p)))
                .collect();
            gauge_f64(&mut e, name, help, &rows)?;
        }
        type Count = fn(&crate::stats::PrincipalSnapshot) -> u64;
        let counts: [(&str, &str, Count); 3] = [
            (
                "allot_principal_admitted",
                "Requests admitted within credit.",
                |p| p.admitted,
            ),
            (
                "allot_principal_deferred",
                "Requests that waited for credit (or were redirected back).",
                |p| p.deferred,
            ),
            (
                "allot_principal_refused",
                "Requests refused for want of credit.",
                |p| p.refused,
            ),
        ];
        for (name, help, f) in counts {
            let rows: Vec<(Labels, u64)> = s
                .principals
                .iter()
                .map(|p| (principal(&p.name), f(p)))
                .collect();
            counter(&mut e, name, help, &rows)?;
        }
        if let Some(c) = &s.cluster {
            cluster_metrics(&mut e, c)?;
        }
        gauge(
            &mut e,
            "allot_gateway_running",
            "Requests in service now, all classes.",
            &[(vec![], s.running as i64)],
        )?;
        gauge(
            &mut e,
            "allot_gateway_max_running",
            "The overall cap on requests in service.",
            &[(vec![], s.max_running as i64)],
        )?;
        gauge(
            &mut e,
            "allot_gateway_connections",
            "Client connections open now.",
            &[(vec![], s.connections as i64)],
        )?;
        Ok(())
    }
}

/// The cluster link's metrics (under `[cluster]` only).
fn cluster_metrics(
    e: &mut DescriptorEncoder,
    c: &crate::cluster::ClusterSnapshot,
) -> std::fmt::Result {
    let roles: Vec<(Labels, i64)> = ["root", "aggregator", "leaf", "detached"]
        .iter()
        .map(|r| (vec![("role", r.to_string())], i64::from(c.role == *r)))
        .collect();
    gauge(
        e,
        "allot_cluster_role",
        "1 for this gateway's role in the combining tree, 0 for the others.",
        &roles,
    )?;
    gauge(
        e,
        "allot_cluster_epoch",
        "The highest fencing epoch seen.",
        &[(vec![], c.epoch as i64)],
    )?;
    gauge(
        e,
        "allot_cluster_windows_since_fresh",
        "Windows since the last fresh quota (0 when this window's is fresh).",
        &[(vec![], c.windows_since_fresh as i64)],
    )?;
    gauge(
        e,
        "allot_cluster_fallback",
        "1 while the gateway enforces its fallback share, else 0.",
        &[(vec![], i64::from(c.fallback))],
    )?;
    counter(
        e,
        "allot_cluster_messages_sent",
        "Messages the cluster link published.",
        &[(vec![], c.messages_sent_total)],
    )?;
    counter(
        e,
        "allot_cluster_messages_received",
        "Messages the cluster link received.",
        &[(vec![], c.messages_received_total)],
    )?;
    counter(
        e,
        "allot_cluster_messages_ignored",
        "Messages ignored: malformed, from outside the tree, or of another epoch.",
        &[(vec![], c.messages_ignored_total)],
    )?;
    gauge_f64(
        e,
        "allot_cluster_slowest_step_seconds",
        "The slowest single step of the cluster link's tree logic so far (at the root: \
         summing the reports and solving the plan).",
        &[(vec![], c.slowest_step_us as f64 / 1e6)],
    )?;
    gauge_f64(
        e,
        "allot_cluster_slowest_step_cpu_seconds",
        "The most CPU time a single step of the cluster link's tree logic took so far \
         (without the time its thread waited for a CPU).",
        &[(vec![], c.slowest_step_cpu_us as f64 / 1e6)],
    )?;
    let per = |f: fn(&crate::cluster::ClusterPrincipal) -> f64| -> Vec<(Labels, f64)> {
        c.principals
            .iter()
            .map(|p| (vec![("principal", p.name.clone())], f(p)))
            .collect()
    };
    gauge_f64(
        e,
        "allot_cluster_demand",
        "The whole cluster's demand behind the plan in force, units per second.",
        &per(|p| p.global_demand),
    )?;
    gauge_f64(
        e,
        "allot_cluster_share",
        "What this gateway admits now, units per second: its quota or fallback share.",
        &per(|p| p.local_share),
    )?;
    Ok(())
}

/// The gateway's metrics in `format`.
pub fn render(gw: &Gateway, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(gw.status())));
    registry.register_collector(Box::new(super::controller_metrics::ControllerCollector(
        gw.readouts(),
    )));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    match format {
        Format::OpenMetrics => out,
        Format::Classic => classic(&out),
    }
}

/// OpenMetrics text as the classic Prometheus text format: a counter family is named
/// with its samples' `_total` suffix, and the `# UNIT` and `# EOF` lines go.
fn classic(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut lines = open.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // The family's TYPE line follows its HELP line.
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let is_counter = lines
                .peek()
                .is_some_and(|t| *t == format!("# TYPE {name} counter"));
            let name = if is_counter {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            out.push_str(&format!("# HELP {name} {help}\n"));
            if let Some(t) = lines.next() {
                let kind = t.rsplit(' ').next().unwrap_or("untyped");
                out.push_str(&format!("# TYPE {name} {kind}\n"));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_with_total_and_drops_units_and_eof() {
        let open = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total{c=\"1\"} 3\n\
                    # HELP d_seconds Delay.\n# TYPE d_seconds histogram\n# UNIT d_seconds seconds\n\
                    d_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        let c = classic(open);
        assert_eq!(
            c,
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total{c=\"1\"} 3\n\
             # HELP d_seconds Delay.\n# TYPE d_seconds histogram\nd_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }

    #[test]
    fn accept_picks_the_format() {
        assert_eq!(Format::for_accept(None), Format::Classic);
        assert_eq!(
            Format::for_accept(Some("text/plain;version=0.0.4")),
            Format::Classic
        );
        assert_eq!(
            Format::for_accept(Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.3"
            )),
            Format::OpenMetrics
        );
    }
}
