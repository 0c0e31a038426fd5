//! `/metrics`: the sensors in Prometheus text, through a `prometheus_client` collector that
//! reads the same counters `/status` does (names `allot_<area>_<what>_<unit>`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::state::Gateway;
use crate::stats::{bucket_bounds_s, HistogramSnapshot, Status};

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
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(h.counts.len());
        for (i, c) in h.counts.iter().enumerate() {
            cumulative += c;
            buckets.push((bounds.get(i).copied().unwrap_or(f64::MAX), cumulative));
        }
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
                [
                    ("connect", b.failures_connect),
                    ("timeout", b.failures_timeout),
                    ("protocol", b.failures_protocol),
                ]
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
            "Response body bytes received from the back end.",
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
        type Field = fn(&crate::agreements::PrincipalSnapshot) -> f64;
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
        type Count = fn(&crate::agreements::PrincipalSnapshot) -> u64;
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
        Ok(())
    }
}

/// The gateway's metrics in the Prometheus/OpenMetrics text format.
pub fn render(gw: &Gateway) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(gw.status())));
    registry.register_collector(Box::new(crate::qos::metrics::ControllerCollector(
        gw.inner.qos.readouts(),
    )));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}
