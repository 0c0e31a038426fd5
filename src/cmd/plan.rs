//! `allot plan`: validate an agreement set, print each principal's mandatory and optional
//! access levels, and, given demand, solve the window planner once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use allot_model::agreements::{AgreementError, AgreementSet, AgreementsSpec};
use allot_model::planner::{Allocation, Planner};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Flags of this subcommand.
#[derive(Debug, clap::Args)]
#[command(after_help = "The file (see docs/agreements.md and examples/plan/):
  objective = \"community\"   # or \"provider\"
  window_ms = 100
  [[principal]]
  name = \"A\"
  capacity = 1000           # units per second
  price = 1.0               # provider objective
  locality_limit = 800      # optional
  [[agreement]]
  from = \"A\"                # owner of the capacity
  to = \"B\"                  # who may use it
  share = [0.4, 0.6]        # [lower, upper]")]
pub struct Args {
    /// Agreement set to load (TOML).
    #[arg(long, value_name = "FILE")]
    config: std::path::PathBuf,
    /// Demand of one principal in cost units per second; repeat for each. A principal
    /// left out has demand 0. Without any, only access levels are printed.
    #[arg(long = "demand", value_name = "NAME=UNITS_PER_S")]
    demand: Vec<String>,
    /// Print exactly one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let set = load_agreements(&args.config)?;
    let demand = if args.demand.is_empty() {
        None
    } else {
        Some(parse_demand(&args.demand, &set)?)
    };
    let allocation = match &demand {
        Some(d) => Some(Planner::new(&set).solve(d).context("planning the window")?),
        None => None,
    };
    if args.json {
        println!("{}", to_json(&set, demand.as_deref(), allocation.as_ref()));
    } else {
        print!("{}", to_table(&set, demand.as_deref(), allocation.as_ref()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads, parses and validates an agreement set; errors name the file, line and key.
pub(crate) fn load_agreements(path: &Path) -> anyhow::Result<AgreementSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading agreement set {}", path.display()))?;
    parse_agreements(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
}

/// Parses and validates an agreement set from text; the error starts with the line.
pub(crate) fn parse_agreements(text: &str) -> Result<AgreementSet, String> {
    let spec: AgreementsSpec = toml::from_str(text).map_err(|e| {
        let Some(span) = e.span() else {
            return format!(" {}", e.message().trim_end());
        };
        let line = line_of(text, span.start);
        // Name the key written on that line, when there is one (`key = value`).
        let key = text
            .lines()
            .nth(line.saturating_sub(1))
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('[') && !k.contains(' '));
        match key {
            Some(k) => format!("{line}: `{k}`: {}", e.message().trim_end()),
            None => format!("{line}: {}", e.message().trim_end()),
        }
    })?;
    AgreementSet::from_spec(&spec).map_err(|e| {
        let line = key_line(text, &e).map_or(String::new(), |l| format!("{l}:"));
        format!("{line} `{}`: {e}", e.key())
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |head| head.matches('\n').count() + 1)
}

type SpannedTable = toml::Spanned<BTreeMap<String, toml::Spanned<toml::Value>>>;

/// Where each key is, to turn a validation error into a line number.
#[derive(Deserialize)]
struct Spans {
    window_ms: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    principal: Vec<SpannedTable>,
    #[serde(default)]
    agreement: Vec<SpannedTable>,
}

fn key_line(text: &str, err: &AgreementError) -> Option<usize> {
    let spans: Spans = toml::from_str(text).ok()?;
    let key = err.key();
    let span = match key.table {
        "window_ms" => spans.window_ms?.span(),
        table => {
            let tables = if table == "principal" {
                &spans.principal
            } else {
                &spans.agreement
            };
            let entry = tables.get(key.index?)?;
            match key.field.and_then(|f| entry.get_ref().get(f)) {
                Some(value) => value.span(),
                None => entry.span(),
            }
        }
    };
    Some(line_of(text, span.start))
}

/// Parses `NAME=UNITS_PER_S` flags into one demand per principal (0 when absent).
fn parse_demand(flags: &[String], set: &AgreementSet) -> anyhow::Result<Vec<f64>> {
    let mut demand = vec![0.0; set.principals().len()];
    let mut given = vec![false; demand.len()];
    for flag in flags {
        let Some((name, value)) = flag.rsplit_once('=') else {
            bail!("`--demand {flag}`: expected NAME=UNITS_PER_S");
        };
        let Some(index) = set.index_of(name.trim()) else {
            let known: Vec<&str> = set.principals().iter().map(|p| p.name.as_str()).collect();
            bail!(
                "`--demand {flag}`: unknown principal `{name}`; declared: {}",
                known.join(", ")
            );
        };
        let units: f64 = match value.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => v,
            _ => bail!("`--demand {flag}`: expected a finite number ≥ 0 after `=`, got `{value}`"),
        };
        if given[index] {
            bail!("`--demand {flag}`: demand of `{name}` given twice");
        }
        given[index] = true;
        demand[index] = units;
    }
    Ok(demand)
}

/// Rounds to a millionth so solver round-off does not show as 599.9999999.
pub(crate) fn tidy(value: f64) -> f64 {
    let r = (value * 1e6).round() / 1e6;
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// `allot plan --json`, fields in the documented order.
#[derive(Serialize)]
struct PlanJson<'a> {
    objective: &'static str,
    theta: Option<f64>,
    principals: Vec<PrincipalJson<'a>>,
}

#[derive(Serialize)]
struct PrincipalJson<'a> {
    name: &'a str,
    capacity: f64,
    mandatory: f64,
    optional: f64,
    demand: Option<f64>,
    allocation: Option<f64>,
}

fn to_json(set: &AgreementSet, demand: Option<&[f64]>, allocation: Option<&Allocation>) -> String {
    let access = set.access();
    let doc = PlanJson {
        objective: set.objective().as_str(),
        theta: allocation.and_then(|a| a.theta).map(tidy),
        principals: set
            .principals()
            .iter()
            .enumerate()
            .map(|(i, p)| PrincipalJson {
                name: &p.name,
                capacity: tidy(p.capacity_units_per_s),
                mandatory: tidy(access.mandatory_units_per_s(i)),
                optional: tidy(access.optional_units_per_s(i)),
                demand: demand.map(|d| tidy(d[i])),
                allocation: allocation.map(|a| tidy(a.units[i])),
            })
            .collect(),
    };
    // Plain numbers and strings always serialise.
    serde_json::to_string(&doc).unwrap_or_default()
}

/// A number for a table cell: whole numbers without decimals, others with three.
pub(crate) fn cell(value: f64) -> String {
    let v = tidy(value);
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn to_table(set: &AgreementSet, demand: Option<&[f64]>, allocation: Option<&Allocation>) -> String {
    let access = set.access();
    let width = set
        .principals()
        .iter()
        .map(|p| p.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("principal".len());
    let mut out = format!("objective: {}", set.objective().as_str());
    if let Some(theta) = allocation.and_then(|a| a.theta) {
        out += &format!("   theta: {}", cell(theta));
    }
    out += "\n";
    out += &format!(
        "{:<width$}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}\n",
        "principal", "capacity", "mandatory", "optional", "demand", "allocation"
    );
    out += &format!(
        "{:<width$}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}\n",
        "", "units/s", "units/s", "units/s", "units/s", "units/s"
    );
    for (i, p) in set.principals().iter().enumerate() {
        let dash = || "-".to_string();
        out += &format!(
            "{:<width$}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}\n",
            p.name,
            cell(p.capacity_units_per_s),
            cell(access.mandatory_units_per_s(i)),
            cell(access.optional_units_per_s(i)),
            demand.map_or_else(dash, |d| cell(d[i])),
            allocation.map_or_else(dash, |a| cell(a.units[i])),
        );
    }
    out +=
        "\nunits/s: cost units per second (a plain request costs 1 unless [agreements] cost says\n\
            otherwise). capacity: what the principal owns itself. mandatory: what its agreements\n\
            guarantee it whatever others ask. optional: what it may use beyond that when others\n\
            leave it unused. allocation: this window's plan for the demand given.\n";
    if allocation.is_some_and(|a| a.theta.is_some()) {
        out +=
            "theta (θ, community objective): the smallest fraction of its demand that any principal\n\
                with demand is served; 1 means every demand is met in full.\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_name_the_line_and_key() {
        let text = "objective = \"community\"\n[[principal]]\nname = \"A\"\ncapacity = 10\n\n[[agreement]]\nfrom = \"A\"\nto = \"Z\"\nshare = [0.1, 0.2]\n";
        let err = parse_agreements(text).expect_err("Z is unknown");
        assert!(err.starts_with("8: `agreement[0].to`"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = "[[principal]]\nname = \"A\"\ncapacity = \"lots\"\n";
        let err = parse_agreements(text).expect_err("capacity is a string");
        assert!(err.starts_with("3: `capacity`: "), "{err}");
    }
}
