//! `allot sim plan`: replay a demand trace through the window planner, window by window,
//! to check an agreement set before it meets real traffic.

use std::path::Path;
use std::process::ExitCode;

use allot_model::agreements::AgreementSet;
use allot_model::planner::Planner;
use anyhow::Context;
use serde::Serialize;

use super::plan::{cell, load_agreements, tidy};

/// The header a trace must start with.
const HEADER: [&str; 3] = ["time_ms", "principal", "units_per_s"];

/// Flags of this subcommand.
#[derive(Debug, clap::Args)]
#[command(after_help = "Trace format (CSV, comma separated, header required):
  time_ms,principal,units_per_s
  0,A,500
  0,B,130
  2000,B,0
Each row sets that principal's demand, in cost units per second, from time_ms
(milliseconds since the start of the trace, never decreasing) until its next row.
A principal without a row yet has demand 0. Window w covers
[w * window_ms, (w + 1) * window_ms) and uses the demand in force at its start; the
replay runs until the window that starts at or after the last row. Blank lines and
lines starting with # are ignored.")]
pub struct Args {
    /// Agreement set to plan with (TOML, as for `allot plan`).
    #[arg(long, value_name = "FILE")]
    config: std::path::PathBuf,
    /// Demand trace (CSV: time_ms,principal,units_per_s).
    #[arg(long, value_name = "FILE.csv")]
    trace: std::path::PathBuf,
    /// Print exactly one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw each principal's allocation (and demand) per window as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
}

/// `allot sim plan --json`.
#[derive(Serialize)]
struct SimJson<'a> {
    objective: &'static str,
    window_ms: u64,
    windows: Vec<WindowJson<'a>>,
}

#[derive(Serialize)]
struct WindowJson<'a> {
    start_ms: u64,
    theta: Option<f64>,
    principals: Vec<ShareJson<'a>>,
}

#[derive(Serialize)]
struct ShareJson<'a> {
    name: &'a str,
    demand: f64,
    allocation: f64,
}

/// One window replayed: its start (ms), the demand in force, and the plan.
type Row = (u64, Vec<f64>, allot_model::planner::Allocation);

/// One trace row, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    time_ms: u64,
    principal: usize,
    units_per_s: f64,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let set = load_agreements(&args.config)?;
    let steps = load_trace(&args.trace, &set)?;
    let planner = Planner::new(&set);
    let window_ms = set.window_ms();
    let last_ms = steps.last().map_or(0, |s| s.time_ms);
    let windows = last_ms.div_ceil(window_ms) + 1;
    let n = set.principals().len();
    let mut demand = vec![0.0; n];
    let mut next = 0;
    let mut rows: Vec<Row> = Vec::new();
    let mut previous: Option<(Vec<f64>, allot_model::planner::Allocation)> = None;
    for w in 0..windows {
        let start_ms = w * window_ms;
        while next < steps.len() && steps[next].time_ms <= start_ms {
            demand[steps[next].principal] = steps[next].units_per_s;
            next += 1;
        }
        // The planner is a pure function of demand: reuse the last plan while it holds.
        let allocation = match &previous {
            Some((d, a)) if *d == demand => a.clone(),
            _ => planner
                .solve(&demand)
                .with_context(|| format!("planning the window starting at {start_ms} ms"))?,
        };
        rows.push((start_ms, demand.clone(), allocation.clone()));
        previous = Some((demand.clone(), allocation));
    }
    if let Some(path) = &args.plot {
        use super::plot::{Chart, Series};
        let names: Vec<&str> = set.principals().iter().map(|p| p.name.as_str()).collect();
        let series = |what: &str, pick: &dyn Fn(&Row, usize) -> f64| {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Series::new(
                        format!("{n} {what}"),
                        rows.iter().map(|r| (r.0 as f64, pick(r, i))).collect(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let charts = [
            Chart {
                title: "Allocation per principal, window by window".into(),
                x_label: "window start (ms)".into(),
                y_label: "allocation (units/s)".into(),
                series: series("allocation", &|r, i| r.2.units[i]),
            },
            Chart {
                title: "Demand per principal (from the trace)".into(),
                x_label: "window start (ms)".into(),
                y_label: "demand (units/s)".into(),
                series: series("demand", &|r, i| r.1[i]),
            },
        ];
        super::plot::write(path, &charts)?;
    }
    if args.json {
        let doc = SimJson {
            objective: set.objective().as_str(),
            window_ms,
            windows: rows
                .iter()
                .map(|(start_ms, demand, a)| WindowJson {
                    start_ms: *start_ms,
                    theta: a.theta.map(tidy),
                    principals: set
                        .principals()
                        .iter()
                        .enumerate()
                        .map(|(i, p)| ShareJson {
                            name: &p.name,
                            demand: tidy(demand[i]),
                            allocation: tidy(a.units[i]),
                        })
                        .collect(),
                })
                .collect(),
        };
        // Plain numbers and strings always serialise.
        println!("{}", serde_json::to_string(&doc).unwrap_or_default());
    } else {
        let mut header = format!("{:>10}  {:>8}", "start_ms", "theta");
        for p in set.principals() {
            header += &format!("  {:>21}", format!("{} alloc/demand", p.name));
        }
        println!("{header}");
        for (start_ms, demand, a) in &rows {
            let theta = a.theta.map_or_else(|| "-".to_string(), cell);
            let mut line = format!("{start_ms:>10}  {theta:>8}");
            for (units, wanted) in a.units.iter().zip(demand) {
                line += &format!("  {:>21}", format!("{}/{}", cell(*units), cell(*wanted)));
            }
            println!("{line}");
        }
        println!(
            "\nstart_ms: the window's start, milliseconds from the trace's start. alloc/demand:\n\
             the window's allocation and the demand in force at its start, both in cost units\n\
             per second. theta (θ, community objective): the smallest fraction of its demand that\n\
             any principal with demand is served; 1 means every demand is met in full."
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn load_trace(path: &Path, set: &AgreementSet) -> anyhow::Result<Vec<Step>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading trace {}", path.display()))?;
    parse_trace(&text, set).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
}

/// Parses a trace; errors start with the line number and name the column.
fn parse_trace(text: &str, set: &AgreementSet) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    let mut header_seen = false;
    for (number, raw) in text.lines().enumerate() {
        let line = number + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = trimmed.split(',').map(str::trim).collect();
        if !header_seen {
            if fields != HEADER {
                return Err(format!(
                    "{line}: expected the header `{}`, got `{trimmed}`",
                    HEADER.join(",")
                ));
            }
            header_seen = true;
            continue;
        }
        let [time, name, units] = fields[..] else {
            return Err(format!(
                "{line}: expected 3 fields (time_ms,principal,units_per_s), got {}",
                fields.len()
            ));
        };
        let time_ms: u64 = time.parse().map_err(|_| {
            format!("{line}: `time_ms`: expected an integer ≥ 0 (milliseconds), got `{time}`")
        })?;
        if let Some(prev) = steps.last() {
            if time_ms < prev.time_ms {
                return Err(format!(
                    "{line}: `time_ms`: {time_ms} is before the previous row's {}; rows must be in time order",
                    prev.time_ms
                ));
            }
        }
        let principal = set.index_of(name).ok_or_else(|| {
            let known: Vec<&str> = set.principals().iter().map(|p| p.name.as_str()).collect();
            format!(
                "{line}: `principal`: unknown principal `{name}`; declared: {}",
                known.join(", ")
            )
        })?;
        let units_per_s = match units.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => v,
            _ => {
                return Err(format!(
                    "{line}: `units_per_s`: expected a finite number ≥ 0, got `{units}`"
                ))
            }
        };
        steps.push(Step {
            time_ms,
            principal,
            units_per_s,
        });
    }
    if !header_seen {
        return Err(format!(
            "1: empty trace; expected the header `{}`",
            HEADER.join(",")
        ));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::plan::parse_agreements;

    fn set() -> AgreementSet {
        parse_agreements(
            "[[principal]]\nname = \"S\"\ncapacity = 320\n[[principal]]\nname = \"A\"\ncapacity = 0\n",
        )
        .expect("valid")
    }

    #[test]
    fn trace_rows_resolve() {
        let steps = parse_trace(
            "time_ms,principal,units_per_s\n# comment\n0,A,5\n\n100, S ,2.5\n",
            &set(),
        )
        .expect("valid trace");
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].principal, 0);
        assert_eq!(steps[1].units_per_s, 2.5);
    }

    #[test]
    fn trace_errors_name_the_line_and_column() {
        let cases = [
            ("time,who,rate\n", "1: expected the header"),
            (
                "time_ms,principal,units_per_s\n0,A\n",
                "2: expected 3 fields",
            ),
            ("time_ms,principal,units_per_s\nx,A,1\n", "2: `time_ms`"),
            (
                "time_ms,principal,units_per_s\n5,A,1\n4,A,1\n",
                "3: `time_ms`",
            ),
            (
                "time_ms,principal,units_per_s\n0,Z,1\n",
                "2: `principal`: unknown principal `Z`",
            ),
            (
                "time_ms,principal,units_per_s\n0,A,-1\n",
                "2: `units_per_s`",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_trace(text, &set()).expect_err(text);
            assert!(err.starts_with(expected), "{text:?}: {err}");
        }
    }
}
