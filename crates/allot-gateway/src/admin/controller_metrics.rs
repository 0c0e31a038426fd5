//! Controller metrics: every loop's input, set point, outputs and state as gauges
//! (`allot_controller_*`), labelled by `controller` and `kind`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::control::qos::Readout;

/// A collector over a copy of the readouts.
#[derive(Debug)]
pub(crate) struct ControllerCollector(pub Vec<Readout>);

type Labels = Vec<(&'static str, String)>;

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

impl Collector for ControllerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let base = |r: &Readout| -> Labels {
            vec![("controller", r.name.clone()), ("kind", r.kind.clone())]
        };
        let with = |r: &Readout, k: &'static str, v: &str| -> Labels {
            let mut l = base(r);
            l.push((k, v.to_string()));
            l
        };
        let rs = &self.0;
        let input: Vec<(Labels, f64)> = rs
            .iter()
            .filter_map(|r| r.input.map(|v| (with(r, "signal", &r.signal), v)))
            .collect();
        gauge(
            &mut e,
            "allot_controller_input",
            "The controller's last measurement (its `signal`).",
            &input,
        )?;
        let sp: Vec<(Labels, f64)> = rs.iter().map(|r| (base(r), r.setpoint)).collect();
        gauge(
            &mut e,
            "allot_controller_setpoint",
            "The set point (adaptive: the congestion threshold).",
            &sp,
        )?;
        let out: Vec<(Labels, f64)> = rs
            .iter()
            .flat_map(|r| r.outputs.iter().map(move |(k, v)| (with(r, "knob", k), *v)))
            .collect();
        gauge(
            &mut e,
            "allot_controller_output",
            "Actuator values the controller set, by knob.",
            &out,
        )?;
        let st: Vec<(Labels, f64)> = rs
            .iter()
            .flat_map(|r| r.state.iter().map(move |(k, v)| (with(r, "var", k), *v)))
            .collect();
        gauge(
            &mut e,
            "allot_controller_state",
            "Controller state (level, offered rate, baseline…).",
            &st,
        )?;
        let sat: Vec<(Labels, f64)> = rs
            .iter()
            .map(|r| (base(r), f64::from(u8::from(r.saturated))))
            .collect();
        gauge(
            &mut e,
            "allot_controller_saturated",
            "1 when the last tick was saturated.",
            &sat,
        )?;
        let paused: Vec<(Labels, f64)> = rs
            .iter()
            .map(|r| (base(r), f64::from(u8::from(r.paused))))
            .collect();
        gauge(
            &mut e,
            "allot_controller_paused",
            "1 when the controller is paused.",
            &paused,
        )?;
        if !rs.is_empty() {
            let mut m = e.encode_descriptor(
                "allot_controller_saturations",
                "Ticks that ended saturated.",
                None,
                MetricType::Counter,
            )?;
            for r in rs {
                m.encode_family(&base(r))?
                    .encode_counter::<NoLabelSet, _, u64>(&r.saturations, None)?;
            }
        }
        Ok(())
    }
}
