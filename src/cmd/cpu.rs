//! `allot cpu`: proportional CPU shares for groups of processes, by ALPS (user-level,
//! SIGSTOP/SIGCONT) or by child cgroups weighted by shares where allowed (`--backend`),
//! and `allot cpu resume` to continue what a killed allot left stopped (and move out
//! what it left in its cgroups).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use allot_model::alps::Algorithm;
use allot_proc::scheduler::{
    run_cpu, Backend, CpuConfig, CpuObserver, CpuSummary, CycleRow, LiveStatus,
};
use allot_proc::selector::{parse_selector, split_shares, Selector, SelectorKind};
use allot_proc::stopped;
use anyhow::{bail, Context};
use serde::Deserialize;

/// Flags of `allot cpu`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Continue processes a killed allot left stopped.
    #[command(subcommand)]
    pub action: Option<Action>,
    /// ALPS quantum (e.g. 10ms, 20ms, 40ms).
    #[arg(long, value_parser = parse_duration)]
    pub quantum: Option<Duration>,
    /// Predicted (default), optimised or basic ALPS (each reads /proc less than the next).
    #[arg(long, value_enum)]
    pub algorithm: Option<AlgorithmArg>,
    /// Do not apply the I/O rule (a blocked member then holds up the cycle).
    #[arg(long)]
    pub no_io: bool,
    /// A process and its shares, PID:SHARES (repeatable; one principal each).
    #[arg(long = "pid", value_name = "PID:SHARES")]
    pub pids: Vec<String>,
    /// A process tree (the PID and its descendants) and its shares.
    #[arg(long = "tree", value_name = "PID:SHARES")]
    pub trees: Vec<String>,
    /// Every process of a user and their shares.
    #[arg(long = "user", value_name = "NAME:SHARES")]
    pub users: Vec<String>,
    /// Every process whose command name matches REGEX, and their shares.
    #[arg(long = "comm", value_name = "REGEX:SHARES")]
    pub comms: Vec<String>,
    /// TOML file with `quantum`, `algorithm`, `io`, `duration` and `[[principal]]`s.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stop after this long (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Write one CSV row per principal per cycle here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Draw each principal's CPU fraction against its target, cycle by cycle, as an SVG
    /// here when the run ends.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print the summary as one JSON object (live lines go to standard error).
    #[arg(long)]
    pub json: bool,
    /// State file for the stopped set (default under $XDG_RUNTIME_DIR or /tmp).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// How the CPU is shared: `signals` (ALPS, SIGSTOP/SIGCONT, no privileges),
    /// `cgroup` (a child cgroup per principal weighted by its shares: the kernel shares
    /// it), or `auto` (cgroup where this user may, signals otherwise).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Signals back end: while the principals within their share leave a CPU idle, let
    /// the others run too (not charged to them). Without it a principal that used its
    /// share waits for the cycle's end even on an idle machine. (cgroups always do this.)
    #[arg(long)]
    pub work_conserving: bool,
}

/// `--backend` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum BackendArg {
    /// ALPS by SIGSTOP/SIGCONT.
    Signals,
    /// Child cgroups with cpu.weight (v2) or cpu.shares (v1).
    Cgroup,
    /// cgroup where allowed, signals otherwise.
    Auto,
}

/// Subcommands of `allot cpu`.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Continue every process recorded in a state file (default: every state file whose
    /// allot is no longer running), checking each is still the process recorded.
    Resume {
        /// The state file to read.
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

/// `--algorithm` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AlgorithmArg {
    /// Algorithm 2 of the ALPS paper.
    Optimized,
    /// Algorithm 1 of the ALPS paper.
    Basic,
    /// Algorithm 2, reading each member again shortly before it is predicted to use up
    /// its allowance at the rate it was seen to use.
    Predicted,
}

/// Parses `20ms`, `1.5s`, `2m`, `500us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 20ms, 1.5s or 2m"))?;
    let secs = match unit.trim() {
        "ns" => v / 1e9,
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" | "" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use ns, us, ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?}: a duration must be finite and >= 0"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    quantum: Option<String>,
    algorithm: Option<AlgorithmArg>,
    io: Option<bool>,
    duration: Option<String>,
    #[serde(default)]
    principal: Vec<FilePrincipal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePrincipal {
    pid: Option<i32>,
    tree: Option<i32>,
    user: Option<String>,
    comm: Option<String>,
    shares: u64,
}

fn load_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    parse_config(&text).with_context(|| format!("{}", path.display()))
}

fn parse_config(text: &str) -> anyhow::Result<FileConfig> {
    let cfg: FileConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, p) in cfg.principal.iter().enumerate() {
        let n = [
            p.pid.is_some(),
            p.tree.is_some(),
            p.user.is_some(),
            p.comm.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            bail!("`principal[{i}]`: give exactly one of `pid`, `tree`, `user`, `comm` (got {n})");
        }
        if p.shares == 0 {
            bail!("`principal[{i}].shares`: expected an integer >= 1, got 0");
        }
    }
    Ok(cfg)
}

fn file_principal(p: &FilePrincipal) -> anyhow::Result<(Selector, u64)> {
    let sel = if let Some(pid) = p.pid {
        parse_selector(SelectorKind::Pid, &pid.to_string())?
    } else if let Some(pid) = p.tree {
        parse_selector(SelectorKind::Tree, &pid.to_string())?
    } else if let Some(u) = &p.user {
        parse_selector(SelectorKind::User, u)?
    } else if let Some(c) = &p.comm {
        parse_selector(SelectorKind::Comm, c)?
    } else {
        bail!("principal without a selector")
    };
    Ok((sel, p.shares))
}

struct Output {
    report: Option<(PathBuf, BufWriter<File>)>,
    json: bool,
    /// With `--plot`: each cycle's number and, per principal, (label, share, consumed ms).
    cycles: Option<Vec<PlotCycle>>,
}

/// One cycle for `--plot`: its number and each principal's (label, share, consumed ms).
type PlotCycle = (u64, Vec<(String, u64, f64)>);

/// Cycles kept for `--plot`; beyond this, neighbouring cycles are merged in pairs, so a
/// long run stays a small picture (and bounded memory).
const PLOT_CYCLES: usize = 4000;

/// Merges neighbouring cycles in pairs (summing what each principal consumed; a
/// principal in only one of them keeps that one's figure).
fn halve(cycles: &mut Vec<PlotCycle>) {
    let merged = cycles
        .chunks(2)
        .map(|pair| {
            let mut out = pair[0].clone();
            for (label, share, ms) in pair.iter().skip(1).flat_map(|c| c.1.iter()) {
                match out.1.iter_mut().find(|p| &p.0 == label) {
                    Some(p) => p.2 += ms,
                    None => out.1.push((label.clone(), *share, *ms)),
                }
            }
            out
        })
        .collect();
    *cycles = merged;
}

/// The `--plot` chart: per principal, its fraction of what the principals consumed in
/// each cycle, and its target (share / Σ shares of the principals in that cycle).
fn cpu_charts(cycles: &[PlotCycle]) -> Vec<super::plot::Chart> {
    use super::plot::{Chart, Series};
    let mut labels: Vec<&str> = Vec::new();
    for (_, rows) in cycles {
        for (label, _, _) in rows {
            if !labels.contains(&label.as_str()) {
                labels.push(label);
            }
        }
    }
    let mut series = Vec::new();
    for label in &labels {
        let mut got = Vec::new();
        let mut target = Vec::new();
        for (cycle, rows) in cycles {
            let Some((_, share, ms)) = rows.iter().find(|r| r.0 == *label) else {
                continue;
            };
            let shares: u64 = rows.iter().map(|r| r.1).sum();
            let consumed: f64 = rows.iter().map(|r| r.2).sum();
            let x = *cycle as f64;
            if consumed > 0.0 {
                got.push((x, ms / consumed));
            }
            if shares > 0 {
                target.push((x, *share as f64 / shares as f64));
            }
        }
        series.push(Series::new(*label, got));
        series.push(Series::new(format!("{label} target"), target));
    }
    vec![Chart {
        title: "CPU fraction of each principal against its target, cycle by cycle".into(),
        x_label: "cycle".into(),
        y_label: "fraction of the principals' CPU".into(),
        series,
    }]
}

impl CpuObserver for Output {
    fn on_cycle(&mut self, rows: &[CycleRow]) -> Result<(), String> {
        if let (Some(cycles), Some(first)) = (&mut self.cycles, rows.first()) {
            cycles.push((
                first.cycle,
                rows.iter()
                    .map(|r| (r.principal.clone(), r.share, r.consumed_ms))
                    .collect(),
            ));
            if cycles.len() > PLOT_CYCLES {
                halve(cycles);
            }
        }
        let Some((path, w)) = &mut self.report else {
            return Ok(());
        };
        let write = |w: &mut BufWriter<File>| -> std::io::Result<()> {
            for r in rows {
                writeln!(
                    w,
                    "{},{},{},{:.3},{:.3},{:.5},{:.3}",
                    r.cycle,
                    csv_field(&r.principal),
                    r.share,
                    r.consumed_ms,
                    r.entitlement_ms,
                    r.rel_error,
                    r.borrowed_ms
                )?;
            }
            w.flush()
        };
        write(w).map_err(|e| format!("--report {}: {e}", path.display()))
    }

    fn on_status(&mut self, s: &LiveStatus) -> Result<(), String> {
        let mut line = format!(
            "t={:.0}s cycles={} cycle={:.1}ms rms_rel_error(last 10)={:.2}% own_cpu={:.2}% stopped={} timer_late={:.2}ms",
            s.elapsed_s,
            s.cycles,
            s.cycle_ms,
            s.recent_rms * 100.0,
            s.own_cpu_fraction * 100.0,
            s.stopped,
            s.late_ms
        );
        // Each principal: target → what it got over the last ten cycles (error).
        for p in &s.principals {
            line.push_str(&format!(
                " | {} target {:.1}% got {:.1}% ({:+.1}%)",
                p.label,
                p.target * 100.0,
                p.got * 100.0,
                p.rel_error * 100.0
            ));
            if p.borrowed > 0.0 {
                line.push_str(&format!(" +{:.1}% borrowed", p.borrowed * 100.0));
            }
        }
        live_line(&line, self.json)
    }

    fn on_start(&mut self, backend: &str) {
        let _ = writeln!(std::io::stderr(), "allot cpu: backend {backend}");
    }

    fn on_membership(&mut self, principal: &str, added: &[i32], removed: &[i32]) {
        tracing::debug!(principal, ?added, ?removed, "membership changed");
    }
}

/// Writes a live line to standard output (standard error with `--json`). A failed write
/// (the output closed, the terminal gone) is an error that ends the run in order, with
/// every member continued, instead of a panic.
pub(crate) fn live_line(line: &str, to_stderr: bool) -> Result<(), String> {
    let r = if to_stderr {
        writeln!(std::io::stderr(), "{line}")
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush())
    };
    r.map_err(|e| {
        let which = if to_stderr { "error" } else { "output" };
        format!("standard {which}: {e}")
    })
}

/// Quotes a CSV field that holds a comma, quote or newline (a `--comm` regex may).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn print_summary(s: &CpuSummary, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let principals: Vec<serde_json::Value> = s
            .principals
            .iter()
            .map(|p| {
                serde_json::json!({
                    "principal": p.label,
                    "share": p.share,
                    "target": p.target,
                    "cpu_ms": p.cpu_ms,
                    "fraction": p.fraction,
                    "rel_error": if p.target > 0.0 { (p.fraction - p.target) / p.target } else { 0.0 },
                    "borrowed_ms": p.borrowed_ms,
                })
            })
            .collect();
        let v = serde_json::json!({
            "mean_rms_rel_error": s.mean_rms_rel_error,
            "overhead_cpu_fraction": s.overhead_cpu_fraction,
            "cycles": s.cycles,
            "quanta": s.quanta,
            "reads": s.reads,
            "wall_s": s.wall_s,
            "signal": s.signal,
            "backend": s.backend,
            "principals": principals,
        });
        writeln!(out, "{v}")?;
        return out.flush();
    }
    writeln!(
        out,
        "summary ({}): {} cycles in {:.1}s, mean RMS relative error {:.2}%, allot CPU {:.3}% of wall time{}",
        s.backend,
        s.cycles,
        s.wall_s,
        s.mean_rms_rel_error * 100.0,
        s.overhead_cpu_fraction * 100.0,
        s.signal.as_ref().map(|x| format!(" (ended by {x})")).unwrap_or_default()
    )?;
    writeln!(
        out,
        "{:<28} {:>6} {:>12} {:>9} {:>9} {:>8} {:>12}",
        "principal", "share", "cpu_ms", "target", "got", "error", "borrowed_ms"
    )?;
    for p in &s.principals {
        let err = if p.target > 0.0 {
            (p.fraction - p.target) / p.target
        } else {
            0.0
        };
        writeln!(
            out,
            "{:<28} {:>6} {:>12.1} {:>8.2}% {:>8.2}% {:>+7.2}% {:>12.1}",
            p.label,
            p.share,
            p.cpu_ms,
            p.target * 100.0,
            p.fraction * 100.0,
            err * 100.0,
            p.borrowed_ms
        )?;
    }
    out.flush()
}

fn resume(state: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let files = match state {
        Some(f) => vec![f],
        None => stopped::orphaned_state_files(&stopped::state_dir()),
    };
    let (groups, moved) = allot_proc::cgroup::recover_orphans();
    if groups > 0 {
        println!("moved {moved} process(es) out of {groups} cgroup(s) a dead allot left");
    }
    if files.is_empty() {
        println!(
            "nothing to resume: no state file of a stopped allot in {}",
            stopped::state_dir().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for f in files {
        let n = stopped::resume_file(&f)?;
        println!("{}: continued {n} process(es)", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `allot cpu`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(Action::Resume { state }) = args.action {
        return resume(state);
    }
    let file = match &args.config {
        Some(p) => load_config(p)?,
        None => FileConfig::default(),
    };
    let cfg_name = args
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let quantum = match (args.quantum, &file.quantum) {
        (Some(q), _) => q,
        (None, Some(q)) => {
            parse_duration(q).map_err(|e| anyhow::anyhow!("{cfg_name}: `quantum`: {e}"))?
        }
        (None, None) => Duration::from_millis(20),
    };
    if quantum < Duration::from_millis(1) || quantum > Duration::from_secs(10) {
        bail!("--quantum {quantum:?}: expected between 1ms and 10s");
    }
    let duration = match (args.duration, &file.duration) {
        (Some(d), _) => Some(d),
        (None, Some(d)) => {
            Some(parse_duration(d).map_err(|e| anyhow::anyhow!("{cfg_name}: `duration`: {e}"))?)
        }
        (None, None) => None,
    };
    let algorithm = match args.algorithm.or(file.algorithm) {
        Some(AlgorithmArg::Basic) => Algorithm::Basic,
        Some(AlgorithmArg::Optimized) => Algorithm::Optimized,
        _ => Algorithm::Predicted,
    };
    let io_rule = !args.no_io && file.io.unwrap_or(true);
    let mut principals = Vec::new();
    for p in &file.principal {
        principals.push(file_principal(p).with_context(|| cfg_name.clone())?);
    }
    for (kind, list) in [
        (SelectorKind::Pid, &args.pids),
        (SelectorKind::Tree, &args.trees),
        (SelectorKind::User, &args.users),
        (SelectorKind::Comm, &args.comms),
    ] {
        for arg in list {
            let (value, shares) = split_shares(kind, arg)?;
            principals.push((parse_selector(kind, &value)?, shares));
        }
    }
    if principals.is_empty() {
        bail!("no principals: give at least one of --pid, --tree, --user, --comm (VALUE:SHARES) or --config");
    }
    let report = match &args.report {
        Some(path) => {
            let f = File::create(path).with_context(|| format!("--report {}", path.display()))?;
            let mut w = BufWriter::new(f);
            // Flushed with the first cycle: a file that cannot be written fails the run
            // there, and everything stopped is continued on the way out.
            writeln!(
                w,
                "cycle,principal,share,consumed_ms,entitlement_ms,rel_error,borrowed_ms"
            )
            .with_context(|| format!("--report {}", path.display()))?;
            Some((path.clone(), w))
        }
        None => None,
    };
    if let Some(path) = &args.plot {
        // Fail before anything is stopped, not after the run.
        File::create(path).with_context(|| format!("--plot: cannot write {}", path.display()))?;
    }
    let shutdown = allot_proc::shutdown::install()?;
    let config = CpuConfig {
        quantum,
        algorithm,
        io_rule,
        principals,
        duration,
        state_file: args
            .state
            .clone()
            .unwrap_or_else(|| stopped::default_state_file("cpu")),
        refresh: Duration::from_secs(1),
        backend: match args.backend {
            BackendArg::Signals => Backend::Signals,
            BackendArg::Cgroup => Backend::Cgroup,
            BackendArg::Auto => Backend::Auto,
        },
        work_conserving: args.work_conserving,
    };
    let mut out = Output {
        report,
        json: args.json,
        cycles: args.plot.as_ref().map(|_| Vec::new()),
    };
    let summary = run_cpu(config, shutdown, &mut out)?;
    if let (Some(path), Some(cycles)) = (&args.plot, &out.cycles) {
        super::plot::write(path, &cpu_charts(cycles))?;
    }
    print_summary(&summary, args.json).context("standard output")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("pid:12"), "pid:12");
        assert_eq!(csv_field("comm:a{1,2}"), "\"comm:a{1,2}\"");
        assert_eq!(csv_field("x\"y"), "\"x\"\"y\"");
    }

    #[test]
    fn the_plot_draws_each_principal_against_its_target_and_stays_small() {
        let cycle = |n: u64| -> PlotCycle {
            (
                n,
                vec![("pid:1".into(), 1, 10.0), ("pid:2".into(), 3, 30.0)],
            )
        };
        let mut cycles: Vec<PlotCycle> = (1..=PLOT_CYCLES as u64 + 1).map(cycle).collect();
        halve(&mut cycles);
        assert_eq!(cycles.len(), PLOT_CYCLES / 2 + 1);
        assert_eq!(cycles[0].1[0].2, 20.0, "two cycles' CPU summed");
        let charts = cpu_charts(&cycles);
        let names: Vec<&str> = charts[0].series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["pid:1", "pid:1 target", "pid:2", "pid:2 target"]);
        assert_eq!(charts[0].series[0].points[0].1, 0.25);
        assert_eq!(charts[0].series[3].points[0].1, 0.75);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn config_file_errors_name_the_key() {
        let ok = parse_config("quantum = \"10ms\"\n[[principal]]\npid = 5\nshares = 2\n").unwrap();
        assert_eq!(ok.principal.len(), 1);
        let e = parse_config("[[principal]]\npid = 5\nuser = \"x\"\nshares = 1\n").unwrap_err();
        assert!(e.to_string().contains("principal[0]"), "{e}");
        let e = parse_config("[[principal]]\npid = 5\nshares = 0\n").unwrap_err();
        assert!(e.to_string().contains("shares"), "{e}");
        let e = parse_config("quantun = 3\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }
}
