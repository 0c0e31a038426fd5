//! `allot sim fvm`: the FVM fluid model (paper section 3, eqs. 3–7) for V groups. Prints
//! n_v(t), c(t) and Jain's fairness index of the demands; defaults are figure 3(a).

use std::process::ExitCode;

use allot_model::accuracy::jain_index;
use allot_model::fvm::{FvmModel, FvmParams};
use anyhow::bail;

/// Flags of `allot sim fvm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Initial demand of each group, comma separated (V = how many).
    #[arg(long, default_value = "4,7,10,13,16", value_delimiter = ',')]
    pub initial: Vec<f64>,
    /// Resource units per thread, K1 (eq. 3).
    #[arg(long, default_value_t = 10.0)]
    pub k1: f64,
    /// Weight of the averaged price, γ (eq. 5), in (0, 1).
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Price-to-signal scale, σ (eq. 6).
    #[arg(long, default_value_t = 2.5e-6)]
    pub sigma: f64,
    /// Euler step.
    #[arg(long, default_value_t = 0.01)]
    pub dt: f64,
    /// Model time to simulate.
    #[arg(long, default_value_t = 100.0)]
    pub duration: f64,
    /// Print a row every this much model time.
    #[arg(long, default_value_t = 1.0)]
    pub every: f64,
    /// Print one JSON object (the final state and the steady-state check) instead of CSV.
    #[arg(long)]
    pub json: bool,
    /// Also draw n_v(t), c(t) and the fairness index over time as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

/// Runs the model.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration {}: expected a number > 0", args.duration);
    }
    if !(args.every.is_finite() && args.every >= args.dt) {
        bail!(
            "--every {}: expected a number >= --dt ({})",
            args.every,
            args.dt
        );
    }
    let params = FvmParams {
        initial: args.initial.clone(),
        k1: args.k1,
        gamma: args.gamma,
        sigma: args.sigma,
        dt: args.dt,
    };
    let mut model = FvmModel::new(params).map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = args.initial.len();
    if !args.json {
        let names: Vec<String> = (1..=v).map(|i| format!("n{i}")).collect();
        println!("t,{},c,fairness", names.join(","));
    }
    let mut next = 0.0;
    let mut rows: Vec<(f64, Vec<f64>, f64, f64)> = Vec::new();
    loop {
        model.run_until(next);
        {
            let s = model.state();
            rows.push((
                s.t,
                s.n.clone(),
                s.congestion(model.params()),
                jain_index(&s.n),
            ));
        }
        if !args.json {
            let s = model.state();
            let ns: Vec<String> = s.n.iter().map(|n| format!("{n:.4}")).collect();
            println!(
                "{:.2},{},{:.6},{:.6}",
                s.t,
                ns.join(","),
                s.congestion(model.params()),
                jain_index(&s.n)
            );
        }
        if next >= args.duration {
            break;
        }
        next = (next + args.every).min(args.duration);
    }
    if let Some(path) = &args.plot {
        super::plot::write(path, &fvm_charts(&rows))?;
    }
    let s = model.state();
    let c = s.congestion(model.params());
    let n_star = model.steady_state_demand();
    let mean = s.n.iter().sum::<f64>() / v as f64;
    let max_dev =
        s.n.iter()
            .map(|n| (n - mean).abs() / mean.max(f64::MIN_POSITIVE))
            .fold(0.0, f64::max);
    let steady_err = (mean - n_star).abs() / n_star;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "t": s.t,
                "n": s.n,
                "c": c,
                "g": s.g,
                "fairness": jain_index(&s.n),
                "max_rel_deviation_from_mean": max_dev,
                "analytic_n_star": n_star,
                "steady_state_rel_error": steady_err,
            })
        );
    } else {
        eprintln!(
            "final: mean n {mean:.4}, max deviation {:.3}%, c* {c:.5}, analytic n* = 2/c* - 2 = {n_star:.4} ({:.3}% off)",
            max_dev * 100.0,
            steady_err * 100.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--plot` charts: demands, congestion, fairness, each against model time.
fn fvm_charts(rows: &[(f64, Vec<f64>, f64, f64)]) -> Vec<super::plot::Chart> {
    use super::plot::{Chart, Series};
    let v = rows.first().map_or(0, |r| r.1.len());
    let demands = (0..v)
        .map(|i| {
            Series::new(
                format!("n{}", i + 1),
                rows.iter().map(|r| (r.0, r.1[i])).collect(),
            )
        })
        .collect();
    vec![
        Chart {
            title: "Demand of each group, n_v(t)".into(),
            x_label: "model time t".into(),
            y_label: "n_v (threads)".into(),
            series: demands,
        },
        Chart {
            title: "Congestion signal c(t)".into(),
            x_label: "model time t".into(),
            y_label: "c".into(),
            series: vec![Series::new("c", rows.iter().map(|r| (r.0, r.2)).collect())],
        },
        Chart {
            title: "Jain's fairness index of the demands".into(),
            x_label: "model time t".into(),
            y_label: "fairness (1 = equal)".into(),
            series: vec![Series::new(
                "fairness",
                rows.iter().map(|r| (r.0, r.3)).collect(),
            )],
        },
    ]
}
