//! The adapt loop behind `allot adapt` (FVM paper sections 2 and 4): sensor (a probe's
//! run time) → controller (slowdown signal, then AIMD on the multiprogramming level, or
//! on a duty cycle once the level is down to one) → actuator (keep at most L members
//! running, rotating which ones every period so all progress).
//!
//! The baseline needs an unloaded reference: with a purely windowed minimum and CPU
//! contention (a price linear in demand) the baseline would follow the load upwards and
//! the group would never see itself as the cause of congestion. The built-in probe's
//! latency is its wall time over the CPU time it got, whose unloaded value is 1 by
//! definition; for a `--probe-cmd`, the whole group is stopped for a moment at start and
//! the command timed.
//!
//! Instead of a probe, the signal can be the group's own wait for a CPU
//! ([`Sensor::RunQueueWait`]): over each period, (run + run-queue wait) / run of the
//! members that ran, from their schedstat. Its unloaded value is 1 by definition too. It
//! costs no CPU and sees every scheduling round of every running member, where a probe
//! sees a few of its own; but it sees CPU contention only, not memory or disk.
//!
//! Each period's length is jittered uniformly within ±25% of the configured period (the
//! mean is unchanged). Two groups sharing the machine must not keep a fixed phase order:
//! whichever closes its period first after the machine slows down takes the cut, the other
//! then sees the relief and does not, and with fixed phases that is the same group every
//! time, so their limits settle apart. With jitter the order reshuffles
//! within a few periods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allot_model::aimd::{Mode, MplOrRate};
use allot_model::police::{PoliceConfig, Policer, Verdict};
use allot_model::slowdown::{SlowdownConfig, SlowdownSignal};
use allot_model::Nanos;

use crate::error::ProcError;
use crate::group::Principal;
use crate::handle::ProcHandle;
use crate::probe::{Probe, ProbeRunner};
use crate::procfs;
use crate::selector::{protected_pids, snapshot_for, Selector};
use crate::stopped::StoppedSet;
use crate::timer::{monotonic_ns, sleep_until, Wait};

/// The sensor of the slowdown signal.
#[derive(Debug, Clone)]
pub enum Sensor {
    /// A probe's run time (the FVM paper's sensor).
    Probe(Probe),
    /// The members' own wait for a CPU: (run + run-queue wait) / run over each period.
    RunQueueWait,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct AdaptConfig {
    /// The group: every process any selector picks.
    pub selectors: Vec<Selector>,
    /// Control period (T_c, paper default 5 s).
    pub period: Duration,
    /// Window of the baseline minimum (paper default 60 s).
    pub window: Duration,
    /// EWMA weight γ (paper 0.3).
    pub gamma: f64,
    /// Threshold H (paper 2.5).
    pub threshold: f64,
    /// Additive step of the multiprogramming level (paper 1).
    pub mpl_increase: f64,
    /// Additive step of the duty cycle (paper 0.1 Hz; here a fraction of the period).
    pub rate_increase: f64,
    /// Multiplicative decrease factor (paper 1.5).
    pub decrease: f64,
    /// Initial limit L (paper 10).
    pub initial: f64,
    /// Lowest duty cycle.
    pub min_duty: f64,
    /// Probe runs per period (their EWMA is the signal).
    pub samples_per_period: u32,
    /// Where the slowdown comes from.
    pub sensor: Sensor,
    /// Time the unloaded reference before starting.
    pub reference: bool,
    /// Stop after this long (`None`: until a signal).
    pub duration: Option<Duration>,
    /// Where the stopped set is recorded.
    pub state_file: PathBuf,
    /// Other groups sharing the machine, expected to back off on their own when
    /// congested; one that does not is capped (FVM paper section 4).
    pub police: Vec<PolicedGroup>,
    /// How policed groups are judged.
    pub police_config: PoliceConfig,
}

/// A group allot watches but does not adapt, unless it turns out unfriendly.
#[derive(Debug, Clone)]
pub struct PolicedGroup {
    /// Its name in reports.
    pub name: String,
    /// Its processes: every one any selector picks.
    pub selectors: Vec<Selector>,
}

/// A policed group in one period's report.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicedReport {
    /// Its name.
    pub name: String,
    /// Member processes.
    pub members: usize,
    /// Mean runnable tasks over the period (its demand).
    pub demand: f64,
    /// `friendly`, `watching` (congested, waiting for its demand to fall) or
    /// `unfriendly` (capped).
    pub verdict: &'static str,
    /// Members allowed to run while capped.
    pub cap: Option<usize>,
}

/// A policed group in the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicedSummary {
    /// Its name.
    pub name: String,
    /// Times it was found unfriendly.
    pub offences: u64,
    /// Periods it spent capped.
    pub capped_periods: u64,
    /// The period it was first found unfriendly.
    pub first_capped_period: Option<u64>,
    /// The first congested period it was then judged from.
    pub first_watched_period: Option<u64>,
}

/// What happened in one period.
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodReport {
    /// Period number, from 1.
    pub period: u64,
    /// Seconds since start.
    pub elapsed_s: f64,
    /// Members in the group.
    pub members: usize,
    /// Limit in force during the period (`running · duty`).
    pub limit: f64,
    /// Members allowed to run.
    pub running: usize,
    /// Duty cycle.
    pub duty: f64,
    /// `mpl` or `rate`.
    pub mode: &'static str,
    /// Mean probe time in the period, ms.
    pub probe_ms: f64,
    /// Slowdown R at the end of the period.
    pub slowdown: f64,
    /// R > H.
    pub congested: bool,
    /// The policed groups.
    pub policed: Vec<PolicedReport>,
}

/// End-of-run summary.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptSummary {
    /// Periods completed.
    pub periods: u64,
    /// Unloaded reference probe time, ms: the built-in probe's least CPU time per run
    /// (what it takes with a CPU to itself), or the timed `--probe-cmd` with the group
    /// stopped; 0 with the run-queue-wait sensor, whose unloaded stretch is 1.
    pub reference_probe_ms: f64,
    /// Mean limit over the second half of the run.
    pub mean_limit: f64,
    /// Mean slowdown over the second half of the run.
    pub mean_slowdown: f64,
    /// Mean probe time over the second half, ms.
    pub mean_probe_ms: f64,
    /// allot's CPU time over wall time.
    pub overhead_cpu_fraction: f64,
    /// Wall time, s.
    pub wall_s: f64,
    /// The signal that ended the run, if one did.
    pub signal: Option<String>,
    /// The policed groups.
    pub policed: Vec<PolicedSummary>,
}

/// Receives each period's report; an error ends the run.
pub trait AdaptObserver {
    /// A period ended.
    fn on_period(&mut self, report: &PeriodReport) -> Result<(), String>;
}

/// A small xorshift generator for sample jitter (no need for a crate).
struct XorShift(u64);

impl XorShift {
    fn seeded() -> XorShift {
        XorShift((monotonic_ns() ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn members_of(principals: &[Principal]) -> BTreeMap<i32, &ProcHandle> {
    let mut m = BTreeMap::new();
    for p in principals {
        for h in p.handles() {
            m.entry(h.pid()).or_insert(h);
        }
    }
    m
}

struct Group {
    principals: Vec<Principal>,
    stopped: StoppedSet,
}

impl Group {
    fn refresh(&mut self, strict: bool) -> Result<(), ProcError> {
        let procs = snapshot_for(self.principals.iter().map(|p| &p.selector))?;
        let mut protected = protected_pids(&procs);
        // The probe command's processes are ours, never the group's.
        let me = std::process::id() as i32;
        protected.extend(procs.iter().filter(|p| p.ppid == me).map(|p| p.pid));
        for p in &mut self.principals {
            let stopped_now = p
                .pids()
                .next()
                .is_some_and(|pid| self.stopped.contains(pid));
            let changes = p.refresh(&procs, &protected, &mut self.stopped, stopped_now)?;
            if strict {
                if let Some((pid, comm)) = changes.refused.first() {
                    return Err(ProcError::NotPermitted {
                        pid: *pid,
                        comm: comm.clone(),
                        uid: procfs::uid_of(*pid).unwrap_or(u32::MAX),
                    });
                }
            }
        }
        Ok(())
    }

    /// The members' CPU time and run-queue wait so far, in nanoseconds (members gone
    /// since the last refresh are dropped; a member two selectors pick counts twice in
    /// both, which leaves their ratio alone).
    fn contention(&mut self) -> (u64, u64) {
        let (mut run, mut wait) = (0, 0);
        for p in &mut self.principals {
            if let Some(s) = p.sample(&mut self.stopped) {
                run += s.cpu_ns;
                wait += s.wait_ns;
            }
        }
        (run, wait)
    }

    /// Runnable member tasks now (a member two selectors pick counts twice).
    fn runnable(&mut self) -> u32 {
        let mut n = 0;
        for p in &mut self.principals {
            if let Some(s) = p.sample(&mut self.stopped) {
                n += s.runnable;
            }
        }
        n
    }

    /// Members by PID, each once even if several selectors pick it.
    fn members(&self) -> BTreeMap<i32, &ProcHandle> {
        members_of(&self.principals)
    }

    fn apply(&mut self, running: &[i32]) -> Result<(), ProcError> {
        let members = members_of(&self.principals);
        let to_stop: Vec<&ProcHandle> = members
            .iter()
            .filter(|(pid, _)| !running.contains(pid))
            .map(|(_, h)| *h)
            .collect();
        let to_run: Vec<&ProcHandle> = running
            .iter()
            .filter_map(|p| members.get(p).copied())
            .collect();
        // Continue first, then stop: the group never drops below its limit in between.
        let stopped = &mut self.stopped;
        stopped.cont_all(to_run);
        stopped.stop_all(to_stop)?;
        Ok(())
    }
}

/// A policed group while the loop runs.
struct Policed {
    name: String,
    group: Group,
    policer: Policer,
    /// Capped (unfriendly): held to allot's own group's limit and duty cycle.
    capped: bool,
    offset: usize,
    demand_sum: f64,
    demand_n: u32,
    watching_since: Option<u64>,
    first_capped: Option<u64>,
    first_watched: Option<u64>,
}

impl Policed {
    fn sample_demand(&mut self) {
        self.demand_sum += f64::from(self.group.runnable());
        self.demand_n += 1;
    }

    /// Lets every member run, or (capped) as many as allot's own group may run now,
    /// rotating: an unfriendly group gets no more than the friendly one it crowded.
    fn apply(&mut self, own_running: usize) -> Result<Option<usize>, ProcError> {
        let members: Vec<i32> = self.group.members().keys().copied().collect();
        if !self.capped {
            self.group.apply(&members)?;
            return Ok(None);
        }
        let running = own_running.min(members.len());
        let n = members.len().max(1);
        self.offset %= n;
        let run: Vec<i32> = (0..running)
            .map(|i| members[(self.offset + i) % n])
            .collect();
        self.offset += running;
        self.group.apply(&run)?;
        Ok(Some(running))
    }
}

/// Runs the adapt loop until the duration passes, `shutdown` is set, or an error; every
/// stopped member is continued before it returns.
pub fn run_adapt(
    config: AdaptConfig,
    shutdown: &AtomicBool,
    observer: &mut dyn AdaptObserver,
) -> Result<AdaptSummary, ProcError> {
    if config.selectors.is_empty() {
        return Err(ProcError::Config(
            "no group: give at least one of --pid, --tree, --user, --comm".into(),
        ));
    }
    let mut group = Group {
        principals: config
            .selectors
            .iter()
            .map(|s| Principal::new(s.clone(), 1))
            .collect(),
        stopped: StoppedSet::new(config.state_file.clone()),
    };
    let mut policed = Vec::new();
    for (i, g) in config.police.iter().enumerate() {
        let dir = config
            .state_file
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        policed.push(Policed {
            name: g.name.clone(),
            group: Group {
                principals: g
                    .selectors
                    .iter()
                    .map(|s| Principal::new(s.clone(), 1))
                    .collect(),
                stopped: StoppedSet::new(
                    dir.join(format!("adapt-police{i}-{}.state", std::process::id())),
                ),
            },
            policer: Policer::new(config.police_config)
                .map_err(|e| ProcError::Config(e.to_string()))?,
            capped: false,
            offset: 0,
            demand_sum: 0.0,
            demand_n: 0,
            watching_since: None,
            first_capped: None,
            first_watched: None,
        });
    }
    let result = adapt_loop(&config, &mut group, &mut policed, shutdown, observer);
    for g in std::iter::once(&mut group).chain(policed.iter_mut().map(|p| &mut p.group)) {
        let all: Vec<&ProcHandle> = g.principals.iter().flat_map(|p| p.handles()).collect();
        g.stopped.cont_all(all);
        g.stopped.release();
    }
    result
}

fn adapt_loop(
    config: &AdaptConfig,
    group: &mut Group,
    policed: &mut [Policed],
    shutdown: &AtomicBool,
    observer: &mut dyn AdaptObserver,
) -> Result<AdaptSummary, ProcError> {
    let period_ns = config.period.as_nanos().max(1) as u64;
    let window_periods = (config.window.as_nanos() / u128::from(period_ns)).max(1) as usize;
    let mut signal = SlowdownSignal::new(SlowdownConfig {
        gamma: config.gamma,
        window_periods,
        threshold: config.threshold,
    })
    .map_err(|e| ProcError::Config(e.to_string()))?;
    group.refresh(true)?;
    if group.members().is_empty() {
        return Err(ProcError::Selector(
            "no process matches the group's selectors".into(),
        ));
    }
    for p in policed.iter_mut() {
        p.group.refresh(true)?;
    }
    let mut ctrl = MplOrRate::new(
        group.members().len(),
        config.initial,
        config.mpl_increase,
        config.rate_increase,
        config.decrease,
        config.min_duty,
    )
    .map_err(|e| ProcError::Config(e.to_string()))?;
    let mut probe = match &config.sensor {
        Sensor::Probe(p) => Some(ProbeRunner::new(p.clone())),
        Sensor::RunQueueWait => None,
    };
    let start_ns = monotonic_ns();
    let own_start = procfs::self_cpu_ns();

    // Unloaded reference (see the module comment).
    let mut reference_ms = 0.0;
    let mut builtin_cpu_ms = f64::INFINITY;
    let builtin = matches!(
        config.sensor,
        Sensor::Probe(Probe::BuiltIn { .. }) | Sensor::RunQueueWait
    );
    if config.reference && builtin {
        signal.set_reference(Some(1.0));
    } else if let (true, Some(probe)) = (config.reference, probe.as_mut()) {
        group.apply(&[])?;
        let mut best = f64::INFINITY;
        for k in 0..5u64 {
            if let Wait::Interrupted = sleep_until(monotonic_ns() + 20_000_000 + k * 1_000_000) {
                if shutdown.load(Ordering::SeqCst) {
                    break;
                }
            }
            best = best.min(probe.run()?.wall.as_secs_f64() * 1e3);
        }
        if best.is_finite() {
            reference_ms = best;
            signal.set_reference(Some(best));
        }
    }

    let mut rng = XorShift::seeded();
    let mut offset = 0usize;
    let mut period = 0u64;
    let mut history: Vec<PeriodReport> = Vec::new();
    let deadline = config
        .duration
        .map(|d| start_ns + d.as_nanos().min(u128::from(u64::MAX / 2)) as u64);
    let samples = match config.sensor {
        Sensor::Probe(_) => config.samples_per_period.max(1) as u64,
        Sensor::RunQueueWait => 0,
    };
    let mut t0 = monotonic_ns();
    'periods: loop {
        if shutdown.load(Ordering::SeqCst) || deadline.is_some_and(|d| monotonic_ns() >= d) {
            break;
        }
        group.refresh(false)?;
        group.stopped.ensure_file()?;
        group.stopped.sweep_ancestors();
        let members: Vec<i32> = group.members().keys().copied().collect();
        ctrl.set_max_running(members.len());
        let decision = ctrl.decision();
        // Rotate which members run, so every one progresses.
        let running: Vec<i32> = if members.is_empty() {
            Vec::new()
        } else {
            offset %= members.len();
            let r: Vec<i32> = (0..decision.running.min(members.len()))
                .map(|i| members[(offset + i) % members.len()])
                .collect();
            offset += decision.running;
            r
        };
        group.apply(&running)?;
        let mut caps = Vec::with_capacity(policed.len());
        for p in policed.iter_mut() {
            p.group.refresh(false)?;
            p.group.stopped.ensure_file()?;
            p.group.stopped.sweep_ancestors();
            caps.push(p.apply(decision.running)?);
            (p.demand_sum, p.demand_n) = (0.0, 0);
        }
        let contention_before = group.contention();

        // Events within the period: probe samples, and the end of the duty cycle.
        // Each sample at a random point of its slot: two groups started together would
        // otherwise probe at the same instants every period, and the one whose probe
        // starts first is the one the other's wake-up preempts — a steady bias in R.
        // This period's length, jittered (see the module comment).
        let span = (period_ns / 2).max(1);
        let len = period_ns - period_ns / 4 + rng.next() % span;
        let slot = len / samples.max(1);
        let mut events: Vec<(u64, bool)> = (0..samples)
            .map(|k| {
                let jitter = slot / 10 + rng.next() % (slot * 8 / 10).max(1);
                (t0 + k * slot + jitter, false)
            })
            .collect();
        if decision.duty < 1.0 {
            events.push((t0 + (decision.duty * len as f64) as u64, true));
        }
        events.sort();
        let mut probe_sum_ms = 0.0;
        let mut probes = 0u32;
        for (at, is_duty_end) in events {
            loop {
                if shutdown.load(Ordering::SeqCst) {
                    break 'periods;
                }
                if let Wait::Tick { .. } = sleep_until(at) {
                    break;
                }
            }
            for p in policed.iter_mut() {
                p.sample_demand();
            }
            if is_duty_end {
                group.apply(&[])?;
                for p in policed.iter_mut().filter(|p| p.capped) {
                    p.group.apply(&[])?;
                }
            } else if let Some(probe) = probe.as_mut() {
                let t = probe.run()?;
                // The built-in probe's unloaded time is the CPU time it needs.
                if let (true, Some(cpu)) = (builtin, t.cpu) {
                    let ms = cpu.as_secs_f64() * 1e3;
                    if ms > 0.0 {
                        builtin_cpu_ms = builtin_cpu_ms.min(ms);
                    }
                }
                let ms = t.wall.as_secs_f64() * 1e3;
                match (builtin, t.stretch()) {
                    (true, Some(stretch)) if config.reference => signal.record(stretch),
                    _ => signal.record(ms),
                }
                probe_sum_ms += ms;
                probes += 1;
            }
        }
        let end = t0 + len;
        loop {
            if shutdown.load(Ordering::SeqCst) {
                break 'periods;
            }
            if let Wait::Tick { .. } = sleep_until(end) {
                break;
            }
        }
        if matches!(config.sensor, Sensor::RunQueueWait) {
            let (run0, wait0) = contention_before;
            let (run1, wait1) = group.contention();
            let run = run1.saturating_sub(run0);
            // Less than a millisecond on a CPU says nothing about waiting for one.
            if run >= 1_000_000 {
                signal.record((run + wait1.saturating_sub(wait0)) as f64 / run as f64);
            }
        }
        let now = monotonic_ns();
        let reading = signal.end_period(Nanos(now - start_ns));
        period += 1;
        let mut policed_reports = Vec::with_capacity(policed.len());
        for (p, cap) in policed.iter_mut().zip(caps) {
            p.sample_demand();
            let demand = p.demand_sum / f64::from(p.demand_n.max(1));
            let verdict = p.policer.update(reading.congested, demand);
            let label = match verdict {
                Verdict::Friendly => {
                    p.watching_since = None;
                    if std::mem::take(&mut p.capped) {
                        tracing::info!(group = %p.name, "released on probation");
                    }
                    "friendly"
                }
                Verdict::Watching { waited } => {
                    if waited == 0 {
                        p.watching_since = Some(period);
                    }
                    "watching"
                }
                Verdict::Unfriendly {
                    onset_demand: _,
                    newly,
                } => {
                    if newly {
                        p.capped = true;
                        p.first_capped.get_or_insert(period);
                        if p.first_watched.is_none() {
                            p.first_watched = p.watching_since;
                        }
                        tracing::warn!(group = %p.name, demand, "did not back off: capped");
                    }
                    "unfriendly"
                }
            };
            policed_reports.push(PolicedReport {
                name: p.name.clone(),
                members: p.group.members().len(),
                demand,
                verdict: label,
                cap,
            });
        }
        let report = PeriodReport {
            period,
            elapsed_s: (now - start_ns) as f64 / 1e9,
            members: members.len(),
            limit: decision.effective,
            running: decision.running,
            duty: decision.duty,
            mode: match decision.mode {
                Mode::Mpl => "mpl",
                Mode::Rate => "rate",
            },
            probe_ms: if probes > 0 {
                probe_sum_ms / f64::from(probes)
            } else {
                0.0
            },
            slowdown: reading.slowdown,
            congested: reading.congested,
            policed: policed_reports,
        };
        ctrl.update(reading.congested);
        observer.on_period(&report).map_err(ProcError::Observer)?;
        history.push(report);
        // Next period starts where this one was due to end (late wake-ups do not
        // accumulate).
        t0 = end.max(now.saturating_sub(len / 2));
        if deadline.is_some_and(|d| t0 >= d) {
            break;
        }
    }

    let wall = (monotonic_ns() - start_ns) as f64;
    let half = &history[history.len() / 2..];
    let mean = |f: &dyn Fn(&PeriodReport) -> f64| {
        if half.is_empty() {
            0.0
        } else {
            half.iter().map(f).sum::<f64>() / half.len() as f64
        }
    };
    Ok(AdaptSummary {
        periods: period,
        reference_probe_ms: if builtin_cpu_ms.is_finite() {
            builtin_cpu_ms
        } else {
            reference_ms
        },
        mean_limit: mean(&|r| r.limit),
        mean_slowdown: mean(&|r| r.slowdown),
        mean_probe_ms: mean(&|r| r.probe_ms),
        overhead_cpu_fraction: if wall > 0.0 {
            procfs::self_cpu_ns().saturating_sub(own_start) as f64 / wall
        } else {
            0.0
        },
        wall_s: wall / 1e9,
        signal: if shutdown.load(Ordering::SeqCst) {
            crate::shutdown::received().map(|s| s.to_string())
        } else {
            None
        },
        policed: policed
            .iter()
            .map(|p| PolicedSummary {
                name: p.name.clone(),
                offences: p.policer.offences,
                capped_periods: p.policer.capped_periods,
                first_capped_period: p.first_capped,
                first_watched_period: p.first_watched,
            })
            .collect(),
    })
}
