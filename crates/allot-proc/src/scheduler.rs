//! The ALPS scheduler loop behind `allot cpu`: sensor (`/proc`) → controller
//! ([`allot_model::alps`]) → actuator (SIGSTOP/SIGCONT through the [`StoppedSet`]).
//!
//! Every quantum, on an absolute deadline: read the members the model asks for, give it
//! the readings, stop and continue whom it says. About once a second: refresh membership.
//! At each cycle end: read every principal once more for the accuracy report (what each
//! consumed in the cycle against its entitlement, ALPS paper section 3.3).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allot_model::accuracy::{entitlements, relative_errors, AccuracyTracker};
use allot_model::alps::{Algorithm, Alps, AlpsConfig, Progress};
use allot_model::Nanos;

use crate::error::ProcError;
use crate::group::Principal;
use crate::procfs;
use crate::selector::{protected_pids, snapshot_for, Selector};
use crate::stopped::StoppedSet;
use crate::timer::{monotonic_ns, sleep_until, PeriodicTimer, Wait};

/// What to run.
#[derive(Debug, Clone)]
pub struct CpuConfig {
    /// The ALPS quantum.
    pub quantum: Duration,
    /// Basic or optimised ALPS.
    pub algorithm: Algorithm,
    /// Apply the I/O rule.
    pub io_rule: bool,
    /// One principal per selector, with its shares.
    pub principals: Vec<(Selector, u64)>,
    /// Stop after this long (`None`: until a signal).
    pub duration: Option<Duration>,
    /// Where the stopped set is recorded.
    pub state_file: PathBuf,
    /// How often membership is refreshed.
    pub refresh: Duration,
}

/// One row of the per-cycle report.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleRow {
    /// Cycle number, from 1.
    pub cycle: u64,
    /// Principal label.
    pub principal: String,
    /// Its shares.
    pub share: u64,
    /// CPU it consumed in the cycle, ms.
    pub consumed_ms: f64,
    /// Its entitlement in the cycle, ms.
    pub entitlement_ms: f64,
    /// `(consumed − entitlement) / entitlement`.
    pub rel_error: f64,
}

/// The once-a-second status line.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveStatus {
    /// Seconds since start.
    pub elapsed_s: f64,
    /// Cycles so far.
    pub cycles: u64,
    /// Mean wall length of the cycles in the last second, ms (0 if none ended).
    pub cycle_ms: f64,
    /// Mean RMS relative error of the last ten cycles.
    pub recent_rms: f64,
    /// allot's own CPU time over wall time since start.
    pub own_cpu_fraction: f64,
    /// Processes stopped right now.
    pub stopped: usize,
    /// Mean lateness of the quantum timer's wake-ups in the last second, ms.
    pub late_ms: f64,
}

/// One principal in the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipalSummary {
    /// Label.
    pub label: String,
    /// Shares.
    pub share: u64,
    /// CPU consumed while scheduled, ms.
    pub cpu_ms: f64,
    /// Its fraction of all principals' CPU.
    pub fraction: f64,
}

/// The end-of-run summary.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSummary {
    /// Mean over cycles of the RMS relative error.
    pub mean_rms_rel_error: f64,
    /// allot's CPU time over wall time.
    pub overhead_cpu_fraction: f64,
    /// Cycles completed.
    pub cycles: u64,
    /// Quanta run.
    pub quanta: u64,
    /// Member reads.
    pub reads: u64,
    /// Wall time, s.
    pub wall_s: f64,
    /// Per principal.
    pub principals: Vec<PrincipalSummary>,
    /// The signal that ended the run, if one did.
    pub signal: Option<String>,
}

/// Receives the loop's output. An error from it ends the run (everything is continued).
pub trait CpuObserver {
    /// A cycle ended.
    fn on_cycle(&mut self, rows: &[CycleRow]) -> Result<(), String>;
    /// About once a second.
    fn on_status(&mut self, status: &LiveStatus);
    /// Membership changed (joins, leaves, refusals), for logging.
    fn on_membership(&mut self, principal: &str, added: &[i32], removed: &[i32]) {
        let _ = (principal, added, removed);
    }
}

struct Runner {
    config: CpuConfig,
    principals: Vec<Principal>,
    stopped: StoppedSet,
    alps: Alps,
    protected: std::collections::HashSet<i32>,
    /// The CPUs the members may run on (read once: it costs several file reads).
    ncpu: usize,
}

impl Runner {
    fn refresh(&mut self, strict: bool, observer: &mut dyn CpuObserver) -> Result<(), ProcError> {
        let procs = snapshot_for(self.principals.iter().map(|p| &p.selector))?;
        self.protected = protected_pids(&procs);
        let ncpu = self.ncpu;
        self.alps.set_cpus(ncpu as u32);
        for (id, p) in self.principals.iter_mut().enumerate() {
            let stopped_now = !self.alps.is_eligible(id) && !p.is_empty();
            let changes = p.refresh(&procs, &self.protected, &mut self.stopped, stopped_now)?;
            if strict {
                if let Some((pid, comm)) = changes.refused.first() {
                    return Err(ProcError::NotPermitted {
                        pid: *pid,
                        comm: comm.clone(),
                        uid: procfs::uid_of(*pid).unwrap_or(u32::MAX),
                    });
                }
            }
            if !changes.added.is_empty() || !changes.removed.is_empty() {
                observer.on_membership(&p.label, &changes.added, &changes.removed);
            }
            self.alps.set_active(id, !p.is_empty());
            self.alps
                .set_parallelism(id, p.task_count().clamp(1, ncpu) as u32);
        }
        Ok(())
    }
}

/// Runs ALPS over the principals until the duration passes, `shutdown` is set, or an
/// error. Whatever ends it, every process it stopped is continued before it returns
/// (and, on a panic, when the stopped set is dropped during unwinding).
pub fn run_cpu(
    config: CpuConfig,
    shutdown: &AtomicBool,
    observer: &mut dyn CpuObserver,
) -> Result<CpuSummary, ProcError> {
    if config.principals.is_empty() {
        return Err(ProcError::Config(
            "no principals: give at least one of --pid, --tree, --user, --comm".into(),
        ));
    }
    let shares: Vec<u64> = config.principals.iter().map(|(_, s)| *s).collect();
    let alps = Alps::new(
        AlpsConfig {
            quantum_ns: config.quantum.as_nanos().min(u128::from(u64::MAX)) as u64,
            algorithm: config.algorithm,
            io_rule: config.io_rule,
        },
        &shares,
    )
    .map_err(|e| ProcError::Config(e.to_string()))?;
    let principals = config
        .principals
        .iter()
        .map(|(sel, s)| Principal::new(sel.clone(), *s))
        .collect();
    let mut runner = Runner {
        stopped: StoppedSet::new(config.state_file.clone()),
        config,
        principals,
        alps,
        protected: Default::default(),
        ncpu: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let result = run_loop(&mut runner, shutdown, observer);
    // Continue everything before reporting, whatever happened.
    let all: Vec<&crate::handle::ProcHandle> =
        runner.principals.iter().flat_map(|p| p.handles()).collect();
    runner.stopped.cont_all(all);
    runner.stopped.release();
    result
}

fn run_loop(
    r: &mut Runner,
    shutdown: &AtomicBool,
    observer: &mut dyn CpuObserver,
) -> Result<CpuSummary, ProcError> {
    let start_ns = monotonic_ns();
    let own_start_ns = procfs::self_cpu_ns();
    r.refresh(true, observer)?;
    for (p, (sel, _)) in r.principals.iter().zip(&r.config.principals) {
        if p.is_empty() {
            if let Selector::Pid(pid) | Selector::Tree(pid) = sel {
                return Err(ProcError::Selector(format!(
                    "{sel}: no such process {pid} (or it may not be scheduled)"
                )));
            }
        }
    }
    if r.principals.iter().all(|p| p.is_empty()) {
        return Err(ProcError::Selector(
            "no process matches any selector".into(),
        ));
    }
    let moved = crate::affinity::avoid_members(r.principals.iter().flat_map(|p| p.pids()));
    if !moved.is_empty() {
        tracing::debug!(cpus = ?moved, "running on CPUs the members are not pinned to");
        // The members may use the CPUs allot left.
        r.ncpu = r.ncpu.saturating_sub(moved.len()).max(1);
    }
    let n = r.principals.len();
    let share_f: Vec<f64> = r.principals.iter().map(|p| p.shares as f64).collect();
    let mut accuracy = AccuracyTracker::new();
    let mut recent: VecDeque<f64> = VecDeque::new();
    let mut cycle_mark: Vec<u64> = vec![0; n];
    let mut run_start_cpu: Vec<u64> = vec![0; n];
    // First readings: origins for the model, the cycle marks and the totals.
    let mut last_read: Vec<(u64, u64)> = vec![(0, start_ns); n];
    let mut run_since: Vec<u64> = vec![start_ns; n];
    for (id, p) in r.principals.iter_mut().enumerate() {
        if let Some(s) = p.sample(&mut r.stopped) {
            cycle_mark[id] = s.cpu_ns;
            run_start_cpu[id] = s.cpu_ns;
            last_read[id] = (s.cpu_ns, start_ns);
            r.alps.prime(id, s.cpu_ns);
        }
    }
    // The earliest moment a member is predicted to use up its allowance before the next
    // tick (see `Alps::exhaustion_in_ns`): the loop runs an extra step then.
    let mut early: Option<u64> = None;
    let (mut late_sum_ns, mut late_count) = (0u64, 0u64);
    let mut timer = PeriodicTimer::new(r.config.quantum);
    let refresh_ns = r.config.refresh.as_nanos() as u64;
    let mut next_refresh = start_ns + refresh_ns;
    let mut next_status = start_ns + 1_000_000_000;
    let mut cycle_start_ns = start_ns;
    let mut cycle_lengths_ms: Vec<f64> = Vec::new();
    let deadline = r
        .config
        .duration
        .map(|d| start_ns + d.as_nanos().min(u128::from(u64::MAX / 2)) as u64);

    loop {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let wait = match early.take() {
            Some(at) if at < timer.next_deadline_ns() => sleep_until(at),
            _ => timer.wait(),
        };
        match wait {
            Wait::Interrupted => continue,
            Wait::Tick { late_ns } => {
                late_sum_ns += late_ns;
                late_count += 1;
            }
        }
        let now = monotonic_ns();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if now >= next_refresh {
            next_refresh = now + refresh_ns;
            r.refresh(false, observer)?;
            r.stopped.ensure_file()?;
            // Processes and trees cannot come back once gone: nothing left to schedule.
            let fixed = r
                .config
                .principals
                .iter()
                .all(|(sel, _)| matches!(sel, Selector::Pid(_) | Selector::Tree(_)));
            if fixed && r.principals.iter().all(|p| p.is_empty()) {
                tracing::info!("every member has exited");
                break;
            }
        }
        // Sensor: the members the model asks for.
        let model_now = Nanos(now - start_ns);
        let due = r.alps.begin_quantum(model_now);
        let mut readings = Vec::with_capacity(due.len());
        let mut rates: Vec<(usize, f64)> = Vec::with_capacity(due.len());
        for id in due {
            match r.principals[id].sample(&mut r.stopped) {
                Some(s) => {
                    readings.push((
                        id,
                        Progress {
                            cpu_ns: s.cpu_ns,
                            blocked: s.blocked,
                        },
                    ));
                    let (last_cpu, last_t) = last_read[id];
                    let since = last_t.max(run_since[id]);
                    if now > since {
                        let rate = s.cpu_ns.saturating_sub(last_cpu) as f64 / (now - since) as f64;
                        rates.push((id, rate));
                    }
                    last_read[id] = (s.cpu_ns, now);
                }
                None => r.alps.set_active(id, false),
            }
        }
        // Controller.
        let outcome = r.alps.end_quantum(model_now, &readings);
        // Actuator: record-then-stop, continue.
        for &id in &outcome.stop {
            let handles: Vec<&crate::handle::ProcHandle> = r.principals[id].handles().collect();
            r.stopped.stop_all(handles)?;
        }
        for &id in &outcome.resume {
            let handles: Vec<&crate::handle::ProcHandle> = r.principals[id].handles().collect();
            r.stopped.cont_all(handles);
            run_since[id] = now;
        }
        for (id, rate) in rates {
            if let Some(t) = r.alps.exhaustion_in_ns(id, rate) {
                let at = now + t.max(500_000);
                early = Some(early.map_or(at, |e: u64| e.min(at)));
            }
        }
        if outcome.cycle_ended {
            let mut consumed = vec![0.0; n];
            for (id, p) in r.principals.iter_mut().enumerate() {
                let cpu = p.sample(&mut r.stopped).map_or(p.cpu_ns(), |s| s.cpu_ns);
                consumed[id] = cpu.saturating_sub(cycle_mark[id]) as f64;
                cycle_mark[id] = cpu;
            }
            // Only principals present count towards this cycle's entitlements.
            let present: Vec<usize> = (0..n).filter(|&i| !r.principals[i].is_empty()).collect();
            let s: Vec<f64> = present.iter().map(|&i| share_f[i]).collect();
            let c: Vec<f64> = present.iter().map(|&i| consumed[i]).collect();
            // The first cycles are start-up (ALPS paper section 3.3 leaves out four).
            let cycle_rms = if r.alps.cycles() > 4 {
                accuracy.record_cycle(&s, &c)
            } else {
                None
            };
            if let Some(cycle_rms) = cycle_rms {
                recent.push_back(cycle_rms);
                if recent.len() > 10 {
                    recent.pop_front();
                }
            }
            let ent = entitlements(&s, &c);
            let errs = relative_errors(&s, &c);
            let rows: Vec<CycleRow> = present
                .iter()
                .enumerate()
                .map(|(k, &i)| CycleRow {
                    cycle: r.alps.cycles(),
                    principal: r.principals[i].label.clone(),
                    share: r.principals[i].shares,
                    consumed_ms: c[k] / 1e6,
                    entitlement_ms: ent[k] / 1e6,
                    rel_error: errs[k],
                })
                .collect();
            cycle_lengths_ms.push((now - cycle_start_ns) as f64 / 1e6);
            cycle_start_ns = now;
            observer.on_cycle(&rows).map_err(ProcError::Observer)?;
        }
        if now >= next_status {
            next_status += 1_000_000_000;
            let wall = (now - start_ns) as f64;
            let own = procfs::self_cpu_ns().saturating_sub(own_start_ns) as f64;
            let status = LiveStatus {
                elapsed_s: wall / 1e9,
                cycles: r.alps.cycles(),
                cycle_ms: if cycle_lengths_ms.is_empty() {
                    0.0
                } else {
                    cycle_lengths_ms.iter().sum::<f64>() / cycle_lengths_ms.len() as f64
                },
                recent_rms: if recent.is_empty() {
                    0.0
                } else {
                    recent.iter().sum::<f64>() / recent.len() as f64
                },
                own_cpu_fraction: if wall > 0.0 { own / wall } else { 0.0 },
                stopped: r.stopped.len(),
                late_ms: late_sum_ns as f64 / late_count.max(1) as f64 / 1e6,
            };
            (late_sum_ns, late_count) = (0, 0);
            cycle_lengths_ms.clear();
            observer.on_status(&status);
        }
    }

    let end_ns = monotonic_ns();
    let wall = (end_ns - start_ns) as f64;
    let own = procfs::self_cpu_ns().saturating_sub(own_start_ns) as f64;
    let mut cpu: Vec<f64> = Vec::with_capacity(n);
    for (id, p) in r.principals.iter_mut().enumerate() {
        let now_cpu = p.sample(&mut r.stopped).map_or(p.cpu_ns(), |s| s.cpu_ns);
        cpu.push(now_cpu.saturating_sub(run_start_cpu[id]) as f64);
    }
    let total: f64 = cpu.iter().sum();
    Ok(CpuSummary {
        mean_rms_rel_error: accuracy.mean_rms(),
        overhead_cpu_fraction: if wall > 0.0 { own / wall } else { 0.0 },
        cycles: r.alps.cycles(),
        quanta: r.alps.quanta(),
        reads: r.alps.reads(),
        wall_s: wall / 1e9,
        principals: r
            .principals
            .iter()
            .zip(&cpu)
            .map(|(p, c)| PrincipalSummary {
                label: p.label.clone(),
                share: p.shares,
                cpu_ms: c / 1e6,
                fraction: if total > 0.0 { c / total } else { 0.0 },
            })
            .collect(),
        signal: if shutdown.load(Ordering::SeqCst) {
            crate::shutdown::received().map(|s| s.to_string())
        } else {
            None
        },
    })
}
