//! `allot adapt`: friendly adaptation of a process group (FVM paper): AIMD on how many of
//! its members run at once, from the slowdown of a probe; rate control (a duty cycle)
//! once one member is left. Stopped members are continued on exit; after a SIGKILL,
//! `allot cpu resume` continues them from the state file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use allot_model::police::PoliceConfig;
use allot_proc::adapt::{
    run_adapt, AdaptConfig, AdaptObserver, PeriodReport, PolicedGroup, Sensor,
};
use allot_proc::probe::Probe;
use allot_proc::selector::{parse_selector, SelectorKind};
use allot_proc::stopped;
use anyhow::{bail, Context};

use super::cpu::parse_duration;

/// Flags of `allot adapt`. Defaults are the FVM paper's table 1.
/// `--sensor`: where the slowdown comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SensorArg {
    /// A probe timed every period (built-in work unit, or `--probe-cmd`).
    Probe,
    /// The members' own run-queue wait.
    RunQueueWait,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A member process (repeatable; all selectors together form the group).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<String>,
    /// A process tree (the PID and its descendants).
    #[arg(long = "tree", value_name = "PID")]
    pub trees: Vec<String>,
    /// Every process of a user.
    #[arg(long = "user", value_name = "NAME")]
    pub users: Vec<String>,
    /// Every process whose command name matches.
    #[arg(long = "comm", value_name = "REGEX")]
    pub comms: Vec<String>,
    /// Control period T_c.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub period: Duration,
    /// Window of the baseline minimum (w · T_c).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub window: Duration,
    /// EWMA weight γ of each probe sample, in (0, 1].
    #[arg(long, default_value_t = 0.3)]
    pub gamma: f64,
    /// Slowdown threshold H: congested when R > H.
    #[arg(long = "threshold", short = 'H', default_value_t = 2.5)]
    pub threshold: f64,
    /// Additive increase of the number of running members.
    #[arg(long, default_value_t = 1.0)]
    pub increase: f64,
    /// Additive increase of the duty cycle in rate control (fraction of the period).
    #[arg(long, default_value_t = 0.1)]
    pub rate_increase: f64,
    /// Multiplicative decrease factor (> 1).
    #[arg(long, default_value_t = 1.5)]
    pub decrease: f64,
    /// Initial limit L (members running at once).
    #[arg(long, default_value_t = 10.0)]
    pub initial: f64,
    /// Lowest duty cycle in rate control, in (0, 1].
    #[arg(long, default_value_t = 0.05)]
    pub min_duty: f64,
    /// Where the slowdown comes from: a probe timed every period (the FVM paper's), or
    /// the members' own wait for a CPU ((run + run-queue wait) / run over each period,
    /// from /proc: no CPU spent, CPU contention only).
    #[arg(long, value_enum, default_value_t = SensorArg::Probe)]
    pub sensor: SensorArg,
    /// Probe runs per period (each costs about 10 ms of CPU times the slowdown).
    #[arg(long, default_value_t = 4)]
    pub samples: u32,
    /// Time this command as the probe instead of the built-in work unit.
    #[arg(long)]
    pub probe_cmd: Option<String>,
    /// Passes of the built-in probe over its 256 KiB buffer (120: about 10 ms on an idle
    /// core, several kernel slices, so a freshly woken probe cannot finish before the
    /// competition shows).
    #[arg(long, default_value_t = 120)]
    pub probe_passes: u32,
    /// Do not time an unloaded reference at start (use only the windowed minimum).
    #[arg(long)]
    pub no_reference: bool,
    /// Stop after this long (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print a JSON summary at the end (period lines go to standard error).
    #[arg(long)]
    pub json: bool,
    /// State file for the stopped set (default under $XDG_RUNTIME_DIR or /tmp).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Draw the limit, the members running, the duty cycle and the slowdown (against the
    /// threshold H) over time, as an SVG here when the run ends.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Police another group: NAME=pid:PID, tree:PID, user:NAME or comm:REGEX (repeat with
    /// the same NAME to add processes). allot does not adapt it, but if its demand (its
    /// runnable tasks) does not fall within --police-periods of a congested signal it is
    /// marked unfriendly and capped (AIMD on how many of its members run) until the
    /// machine has been uncongested for --police-release periods.
    #[arg(long = "police", value_name = "NAME=KIND:VALUE")]
    pub police: Vec<String>,
    /// Periods a policed group has to back off after a congested one (N).
    #[arg(long, default_value_t = 3)]
    pub police_periods: u32,
    /// Uncongested periods after which a capped group is released, on probation.
    #[arg(long, default_value_t = 5)]
    pub police_release: u32,
}

/// Parses `--police NAME=KIND:VALUE` flags into groups (one per NAME, in order).
fn parse_police(flags: &[String]) -> anyhow::Result<Vec<PolicedGroup>> {
    let mut out: Vec<PolicedGroup> = Vec::new();
    for f in flags {
        let (name, sel) = f.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--police {f:?}: expected NAME=KIND:VALUE, e.g. batch=comm:^make$")
        })?;
        let (kind, value) = sel.split_once(':').ok_or_else(|| {
            anyhow::anyhow!(
                "--police {f:?}: expected KIND:VALUE after '=' (pid, tree, user or comm)"
            )
        })?;
        let kind = match kind {
            "pid" => SelectorKind::Pid,
            "tree" => SelectorKind::Tree,
            "user" => SelectorKind::User,
            "comm" => SelectorKind::Comm,
            k => bail!("--police {f:?}: unknown kind {k:?} (use pid, tree, user or comm)"),
        };
        if name.is_empty() {
            bail!("--police {f:?}: the group needs a name before '='");
        }
        let selector = parse_selector(kind, value)?;
        match out.iter_mut().find(|g| g.name == name) {
            Some(g) => g.selectors.push(selector),
            None => out.push(PolicedGroup {
                name: name.to_string(),
                selectors: vec![selector],
            }),
        }
    }
    Ok(out)
}

struct Lines {
    json: bool,
    /// With `--plot`: per period, (seconds since start, limit, running, duty, slowdown).
    periods: Option<Vec<PlotPeriod>>,
}

/// One period for `--plot`: seconds since start, limit L, members running, duty, slowdown R.
type PlotPeriod = (f64, f64, f64, f64, f64);

/// Periods kept for `--plot`; beyond this every other one is dropped, so a long run stays
/// a small picture (and bounded memory).
const PLOT_PERIODS: usize = 4000;

/// The `--plot` charts: limit and running members, duty cycle, slowdown against H.
fn adapt_charts(periods: &[PlotPeriod], threshold: f64) -> Vec<super::plot::Chart> {
    use super::plot::{Chart, Series};
    let line = |name: &str, pick: fn(&PlotPeriod) -> f64| {
        Series::new(name, periods.iter().map(|p| (p.0, pick(p))).collect())
    };
    vec![
        Chart {
            title: "Limit L and members running".into(),
            x_label: "time (s)".into(),
            y_label: "members".into(),
            series: vec![line("L", |p| p.1), line("running", |p| p.2)],
        },
        Chart {
            title: "Duty cycle (rate control, once one member is left)".into(),
            x_label: "time (s)".into(),
            y_label: "duty (fraction of a period)".into(),
            series: vec![line("duty", |p| p.3)],
        },
        Chart {
            title: "Slowdown R of the probe against the threshold H".into(),
            x_label: "time (s)".into(),
            y_label: "slowdown (1 = unloaded)".into(),
            series: vec![
                line("R", |p| p.4),
                Series::new("H", periods.iter().map(|p| (p.0, threshold)).collect()),
            ],
        },
    ]
}

impl AdaptObserver for Lines {
    fn on_period(&mut self, r: &PeriodReport) -> Result<(), String> {
        if let Some(periods) = &mut self.periods {
            periods.push((r.elapsed_s, r.limit, r.running as f64, r.duty, r.slowdown));
            if periods.len() > PLOT_PERIODS {
                let kept = periods.iter().step_by(2).copied().collect();
                *periods = kept;
            }
        }
        let line = format!(
            "period={} t={:.1}s members={} L={:.2} running={} duty={:.2} mode={} R={:.2}{} probe={:.2}ms",
            r.period,
            r.elapsed_s,
            r.members,
            r.limit,
            r.running,
            r.duty,
            r.mode,
            r.slowdown,
            if r.congested { " congested" } else { "" },
            r.probe_ms
        );
        let mut line = line;
        for p in &r.policed {
            line.push_str(&format!(
                " | police {}: members={} demand={:.1} {}",
                p.name, p.members, p.demand, p.verdict
            ));
            if let Some(cap) = p.cap {
                line.push_str(&format!(" (capped to {cap} running)"));
            }
        }
        super::cpu::live_line(&line, self.json)
    }
}

/// Runs `allot adapt`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut selectors = Vec::new();
    for (kind, list) in [
        (SelectorKind::Pid, &args.pids),
        (SelectorKind::Tree, &args.trees),
        (SelectorKind::User, &args.users),
        (SelectorKind::Comm, &args.comms),
    ] {
        for v in list {
            selectors.push(parse_selector(kind, v)?);
        }
    }
    if selectors.is_empty() {
        bail!("no group: give at least one of --pid, --tree, --user, --comm");
    }
    if args.period < Duration::from_millis(10) {
        bail!("--period {:?}: expected at least 10ms", args.period);
    }
    if args.window < args.period {
        bail!(
            "--window {:?}: must be at least one --period ({:?})",
            args.window,
            args.period
        );
    }
    if args.samples == 0 || args.samples > 100 {
        bail!("--samples {}: expected 1 to 100", args.samples);
    }
    if !(args.initial.is_finite() && args.initial >= 1.0) {
        bail!("--initial {}: expected a number >= 1", args.initial);
    }
    let sensor_arg = args.sensor;
    let sensor = match (args.sensor, args.probe_cmd) {
        (SensorArg::Probe, Some(cmd)) => Sensor::Probe(Probe::Command(cmd)),
        (SensorArg::Probe, None) => Sensor::Probe(Probe::BuiltIn {
            bytes: 256 * 1024,
            passes: args.probe_passes.max(1),
        }),
        (SensorArg::RunQueueWait, Some(_)) => {
            bail!("--probe-cmd: not with --sensor run-queue-wait, which runs no probe")
        }
        (SensorArg::RunQueueWait, None) => Sensor::RunQueueWait,
    };
    let police = parse_police(&args.police)?;
    let police_config = PoliceConfig {
        grace_periods: args.police_periods,
        fall: 0.9,
        release_periods: args.police_release,
    };
    police_config
        .validate()
        .map_err(|e| anyhow::anyhow!("--police-periods/--police-release: {e}"))?;
    if let Some(path) = &args.plot {
        // Fail before anything is stopped, not after the run.
        std::fs::File::create(path)
            .with_context(|| format!("--plot: cannot write {}", path.display()))?;
    }
    let threshold = args.threshold;
    let plot = args.plot.clone();
    let shutdown = allot_proc::shutdown::install()?;
    let config = AdaptConfig {
        selectors,
        period: args.period,
        window: args.window,
        gamma: args.gamma,
        threshold: args.threshold,
        mpl_increase: args.increase,
        rate_increase: args.rate_increase,
        decrease: args.decrease,
        initial: args.initial,
        min_duty: args.min_duty,
        samples_per_period: args.samples,
        sensor,
        reference: !args.no_reference,
        duration: args.duration,
        state_file: args
            .state
            .unwrap_or_else(|| stopped::default_state_file("adapt")),
        police,
        police_config,
    };
    let mut lines = Lines {
        json: args.json,
        periods: plot.as_ref().map(|_| Vec::new()),
    };
    let s = run_adapt(config, shutdown, &mut lines)?;
    if let (Some(path), Some(periods)) = (&plot, &lines.periods) {
        super::plot::write(path, &adapt_charts(periods, threshold))?;
    }
    let sensor = sensor_arg;
    let text = if args.json {
        format!(
            "{}",
            serde_json::json!({
                "periods": s.periods,
                "reference_probe_ms": s.reference_probe_ms,
                "mean_limit": s.mean_limit,
                "mean_slowdown": s.mean_slowdown,
                "mean_probe_ms": s.mean_probe_ms,
                "overhead_cpu_fraction": s.overhead_cpu_fraction,
                "wall_s": s.wall_s,
                "signal": s.signal,
                "policed": s.policed.iter().map(|p| serde_json::json!({
                    "group": p.name,
                    "offences": p.offences,
                    "capped_periods": p.capped_periods,
                    "first_capped_period": p.first_capped_period,
                    "first_watched_period": p.first_watched_period,
                })).collect::<Vec<_>>(),
            })
        )
    } else {
        format!(
            "summary: {} periods in {:.1}s; second half: mean L {:.2}, mean R {:.2}, {}; allot CPU {:.2}%",
            s.periods,
            s.wall_s,
            s.mean_limit,
            s.mean_slowdown,
            if sensor == SensorArg::RunQueueWait {
                "sensor run-queue wait (unloaded stretch 1)".to_string()
            } else {
                format!(
                    "mean probe {:.2}ms (unloaded {:.2}ms)",
                    s.mean_probe_ms, s.reference_probe_ms
                )
            },
            s.overhead_cpu_fraction * 100.0
        )
    };
    super::cpu::live_line(&text, false).map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_draws_limit_running_duty_and_slowdown_against_h() {
        let periods = [(0.5, 4.0, 4.0, 1.0, 1.2), (1.0, 2.67, 2.0, 1.0, 3.1)];
        let charts = adapt_charts(&periods, 2.5);
        let names: Vec<&str> = charts
            .iter()
            .flat_map(|c| c.series.iter().map(|s| s.name.as_str()))
            .collect();
        assert_eq!(names, ["L", "running", "duty", "R", "H"]);
        assert_eq!(charts[2].series[1].points, [(0.5, 2.5), (1.0, 2.5)]);
    }
}
