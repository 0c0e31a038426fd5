//! The ALPS scheduler loop behind `allot cpu`: sensor (`/proc`) → controller
//! ([`allot_model::alps`]) → actuator (SIGSTOP/SIGCONT through the [`StoppedSet`]).
//!
//! Every quantum, on an absolute deadline (ticks with nothing to read are slept
//! through): read the members the model asks for, give it the readings, stop and
//! continue whom it says. Between ticks, extra steps when a member's exhaustion or the
//! cycle's end is predicted before the next tick. About once a second: refresh
//! membership. At each cycle end: read every principal's CPU clock once more for the
//! accuracy report (what each consumed in the cycle against its entitlement, ALPS paper
//! section 3.3).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use allot_model::accuracy::{entitlements, relative_errors, AccuracyTracker};
use allot_model::alps::{Algorithm, Alps, AlpsConfig, Progress};
use allot_model::Nanos;

use crate::cgroup::{self, CpuCgroups};
use crate::error::ProcError;
use crate::group::Principal;
use crate::procfs;
use crate::selector::{protected_pids, snapshot_for, Selector};
use crate::stopped::StoppedSet;
use crate::timer::{monotonic_ns, sleep_until, tighten_timer_slack, PeriodicTimer, Wait};

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
    /// Which mechanism shares the CPU.
    pub backend: Backend,
    /// Signals back end: let over-share principals run while the eligible ones leave a
    /// CPU idle (the time they borrow is not charged to them).
    pub work_conserving: bool,
}

/// The mechanism behind `allot cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ALPS: SIGSTOP/SIGCONT from user space (no privileges).
    Signals,
    /// Child cgroups weighted by shares (the kernel shares the CPU).
    Cgroup,
    /// The cgroup back end where this process may use it, signals otherwise.
    Auto,
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
    /// CPU it consumed in the cycle, ms (charged: without what it borrowed).
    pub consumed_ms: f64,
    /// Its entitlement in the cycle, ms.
    pub entitlement_ms: f64,
    /// `(consumed − entitlement) / entitlement`.
    pub rel_error: f64,
    /// CPU it borrowed in the cycle while a CPU was idle (work-conserving), ms.
    pub borrowed_ms: f64,
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
    /// Each principal's target against what it got in the last cycles.
    pub principals: Vec<PrincipalStatus>,
}

/// One principal in the live status.
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipalStatus {
    /// Label.
    pub label: String,
    /// Its target fraction of what the principals present consumed (share / Σ shares).
    pub target: f64,
    /// The fraction it consumed over the last (up to ten) cycles.
    pub got: f64,
    /// `(got − target) / target` over those cycles.
    pub rel_error: f64,
    /// CPU it borrowed beyond its share while a CPU was idle in those cycles, as a
    /// fraction of what all consumed (work-conserving mode; 0 otherwise).
    pub borrowed: f64,
    /// Member processes now.
    pub members: usize,
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
    /// Its target fraction (share / Σ shares).
    pub target: f64,
    /// CPU it borrowed while a CPU was idle (work-conserving mode), ms; not charged.
    pub borrowed_ms: f64,
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
    /// The mechanism used, e.g. `signals` or `cgroup (cpu.shares under …)`.
    pub backend: String,
}

/// Receives the loop's output. An error from it ends the run (everything is continued).
pub trait CpuObserver {
    /// A cycle ended.
    fn on_cycle(&mut self, rows: &[CycleRow]) -> Result<(), String>;
    /// About once a second. An error (standard output closed, say) ends the run.
    fn on_status(&mut self, status: &LiveStatus) -> Result<(), String>;
    /// The back end chosen, once at start (e.g. `signals`, `cgroup (cpu.shares under …)`).
    fn on_start(&mut self, backend: &str) {
        let _ = backend;
    }
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

/// Per-cycle book-keeping both back ends share: what each principal consumed in a cycle
/// (charged: without what it borrowed) against its entitlement, and the last ten cycles
/// for the live status.
struct CycleBook {
    shares: Vec<f64>,
    /// Cumulative CPU of each principal at the start of the cycle, ns.
    mark: Vec<u64>,
    /// Cumulative CPU each principal borrowed (work-conserving), ns, and at cycle start.
    borrowed_ns: Vec<u64>,
    borrowed_mark: Vec<u64>,
    accuracy: AccuracyTracker,
    recent_rms: VecDeque<f64>,
    /// The last cycles: (charged consumption, borrowed, present) per principal.
    recent: VecDeque<(Vec<f64>, Vec<f64>, Vec<bool>)>,
    cycle_start_ns: u64,
    lengths_ms: Vec<f64>,
    cycles: u64,
}

const RECENT_CYCLES: usize = 10;

impl CycleBook {
    fn new(shares: Vec<f64>, start_ns: u64) -> CycleBook {
        let n = shares.len();
        CycleBook {
            shares,
            mark: vec![0; n],
            borrowed_ns: vec![0; n],
            borrowed_mark: vec![0; n],
            accuracy: AccuracyTracker::new(),
            recent_rms: VecDeque::new(),
            recent: VecDeque::new(),
            cycle_start_ns: start_ns,
            lengths_ms: Vec::new(),
            cycles: 0,
        }
    }

    /// Ends cycle `cycle` at `now`, given each principal's cumulative CPU and presence.
    fn close(
        &mut self,
        cycle: u64,
        now: u64,
        cpu: &[u64],
        principals: &[Principal],
    ) -> Vec<CycleRow> {
        self.cycles = cycle;
        let n = self.shares.len();
        let mut consumed = vec![0.0; n];
        let mut borrowed = vec![0.0; n];
        for i in 0..n {
            let b = self.borrowed_ns[i].saturating_sub(self.borrowed_mark[i]);
            let used = cpu[i].saturating_sub(self.mark[i]);
            consumed[i] = used.saturating_sub(b) as f64;
            borrowed[i] = b as f64;
            self.mark[i] = cpu[i];
            self.borrowed_mark[i] = self.borrowed_ns[i];
        }
        let present: Vec<bool> = principals.iter().map(|p| !p.is_empty()).collect();
        let ids: Vec<usize> = (0..n).filter(|&i| present[i]).collect();
        let s: Vec<f64> = ids.iter().map(|&i| self.shares[i]).collect();
        let c: Vec<f64> = ids.iter().map(|&i| consumed[i]).collect();
        // The first cycles are start-up (ALPS paper section 3.3 leaves out four).
        if cycle > 4 {
            if let Some(rms) = self.accuracy.record_cycle(&s, &c) {
                self.recent_rms.push_back(rms);
                if self.recent_rms.len() > RECENT_CYCLES {
                    self.recent_rms.pop_front();
                }
            }
        }
        self.recent.push_back((consumed, borrowed.clone(), present));
        if self.recent.len() > RECENT_CYCLES {
            self.recent.pop_front();
        }
        self.lengths_ms
            .push(now.saturating_sub(self.cycle_start_ns) as f64 / 1e6);
        self.cycle_start_ns = now;
        let ent = entitlements(&s, &c);
        let errs = relative_errors(&s, &c);
        ids.iter()
            .enumerate()
            .map(|(k, &i)| CycleRow {
                cycle,
                principal: principals[i].label.clone(),
                share: principals[i].shares,
                consumed_ms: c[k] / 1e6,
                entitlement_ms: ent[k] / 1e6,
                rel_error: errs[k],
                borrowed_ms: borrowed[i] / 1e6,
            })
            .collect()
    }

    fn recent_rms(&self) -> f64 {
        if self.recent_rms.is_empty() {
            0.0
        } else {
            self.recent_rms.iter().sum::<f64>() / self.recent_rms.len() as f64
        }
    }

    /// Mean wall length of the cycles since the last call, ms.
    fn take_cycle_ms(&mut self) -> f64 {
        let v = std::mem::take(&mut self.lengths_ms);
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Each principal's target against what it got over the recent cycles.
    fn status(&self, principals: &[Principal]) -> Vec<PrincipalStatus> {
        let n = self.shares.len();
        let mut got = vec![0.0; n];
        let mut borrowed = vec![0.0; n];
        for (c, b, _) in &self.recent {
            for i in 0..n {
                got[i] += c[i];
                borrowed[i] += b[i];
            }
        }
        let present: Vec<bool> = principals.iter().map(|p| !p.is_empty()).collect();
        let total_share: f64 = (0..n).filter(|&i| present[i]).map(|i| self.shares[i]).sum();
        let total: f64 = (0..n).filter(|&i| present[i]).map(|i| got[i]).sum();
        let total_all: f64 = total + borrowed.iter().sum::<f64>();
        principals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let target = if present[i] && total_share > 0.0 {
                    self.shares[i] / total_share
                } else {
                    0.0
                };
                let g = if total > 0.0 && present[i] {
                    got[i] / total
                } else {
                    0.0
                };
                PrincipalStatus {
                    label: p.label.clone(),
                    target,
                    got: g,
                    rel_error: if target > 0.0 {
                        (g - target) / target
                    } else {
                        0.0
                    },
                    borrowed: if total_all > 0.0 {
                        borrowed[i] / total_all
                    } else {
                        0.0
                    },
                    members: p.pids().count(),
                }
            })
            .collect()
    }
}

/// Runs `allot cpu` until the duration passes, `shutdown` is set, or an error, with the
/// back end `config.backend` asks for. Whatever ends it, every process it stopped is
/// continued (and every process it moved into a cgroup moved back) before it returns
/// (and, on a panic, when the guards are dropped during unwinding).
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
    let backend = config.backend;
    let mut runner = Runner {
        stopped: StoppedSet::new(config.state_file.clone()),
        config,
        principals,
        alps,
        protected: Default::default(),
        ncpu: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut cgroups = None;
    let mut why_not = String::new();
    if backend != Backend::Signals {
        let made = cgroup::detect().and_then(|h| {
            CpuCgroups::create(h.clone(), &shares)
                .map_err(|e| format!("cannot make groups under {}: {e}", h.base.display()))
        });
        match made {
            Ok(cg) => cgroups = Some(cg),
            Err(e) if backend == Backend::Auto => why_not = e,
            Err(e) => return Err(ProcError::Config(format!("--backend cgroup: {e}"))),
        }
    }
    let result = match cgroups.as_mut() {
        Some(cg) => {
            let desc = format!(
                "cgroup ({} under {})",
                cg.hierarchy().knob.file(),
                cg.root().display()
            );
            match cgroup_join_all(&mut runner, cg, true, observer) {
                Ok(()) => {
                    observer.on_start(&desc);
                    cgroup_loop(&mut runner, cg, shutdown, observer, desc)
                }
                Err(ProcError::NotPermitted { pid, .. }) if backend == Backend::Auto => {
                    cg.release();
                    let desc = format!("signals (cgroup: may not move process {pid})");
                    observer.on_start(&desc);
                    run_loop(&mut runner, shutdown, observer, desc)
                }
                Err(e) => Err(e),
            }
        }
        None => {
            let desc = if why_not.is_empty() {
                "signals".to_string()
            } else {
                format!("signals (cgroup not available: {why_not})")
            };
            observer.on_start(&desc);
            run_loop(&mut runner, shutdown, observer, desc)
        }
    };
    if let Some(cg) = cgroups.as_mut() {
        cg.release();
    }
    // Continue everything before reporting, whatever happened.
    let all: Vec<&crate::handle::ProcHandle> =
        runner.principals.iter().flat_map(|p| p.handles()).collect();
    runner.stopped.cont_all(all);
    runner.stopped.release();
    result
}

/// Refreshes membership and puts every member in its principal's group (and members
/// that left back where they came from). `strict` (at start): a member that may not be
/// moved is an error.
fn cgroup_join_all(
    r: &mut Runner,
    cg: &mut CpuCgroups,
    strict: bool,
    observer: &mut dyn CpuObserver,
) -> Result<(), ProcError> {
    r.refresh(strict, observer)?;
    for (id, p) in r.principals.iter().enumerate() {
        let members: Vec<(i32, u64)> = p
            .handles()
            .map(|h| (h.pid(), h.start_time_ticks()))
            .collect();
        for pid in cg.members_of(id) {
            if !members.iter().any(|m| m.0 == pid) {
                cg.leave(pid);
            }
        }
        for (pid, start) in members {
            if cg.contains(pid) {
                continue;
            }
            match cg.join(id, pid, start) {
                Ok(()) | Err(ProcError::Gone { .. }) => {}
                Err(e @ ProcError::NotPermitted { .. }) if strict => return Err(e),
                Err(e) => tracing::warn!(pid, error = %e, "could not move a member"),
            }
        }
    }
    Ok(())
}

/// What every loop reads at start and reports at the end.
struct RunStart {
    start_ns: u64,
    own_start_ns: u64,
    cpu: Vec<u64>,
}

fn check_start(r: &Runner) -> Result<(), ProcError> {
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
    Ok(())
}

fn fixed_and_gone(r: &Runner) -> bool {
    let fixed = r
        .config
        .principals
        .iter()
        .all(|(sel, _)| matches!(sel, Selector::Pid(_) | Selector::Tree(_)));
    fixed && r.principals.iter().all(|p| p.is_empty())
}

fn live_status(
    r: &Runner,
    book: &mut CycleBook,
    start: &RunStart,
    now: u64,
    late_ms: f64,
) -> LiveStatus {
    let wall = now.saturating_sub(start.start_ns) as f64;
    let own = procfs::self_cpu_ns().saturating_sub(start.own_start_ns) as f64;
    LiveStatus {
        elapsed_s: wall / 1e9,
        cycles: book.cycles,
        cycle_ms: book.take_cycle_ms(),
        recent_rms: book.recent_rms(),
        own_cpu_fraction: if wall > 0.0 { own / wall } else { 0.0 },
        stopped: r.stopped.len(),
        late_ms,
        principals: book.status(&r.principals),
    }
}

fn summary(
    r: &mut Runner,
    book: &CycleBook,
    start: &RunStart,
    quanta: u64,
    reads: u64,
    shutdown: &AtomicBool,
    backend: String,
) -> CpuSummary {
    let end_ns = monotonic_ns();
    let wall = end_ns.saturating_sub(start.start_ns) as f64;
    let own = procfs::self_cpu_ns().saturating_sub(start.own_start_ns) as f64;
    let n = r.principals.len();
    let mut cpu: Vec<f64> = Vec::with_capacity(n);
    for (id, p) in r.principals.iter_mut().enumerate() {
        let now_cpu = p.sample(&mut r.stopped).map_or(p.cpu_ns(), |s| s.cpu_ns);
        cpu.push(now_cpu.saturating_sub(start.cpu[id]) as f64);
    }
    let total: f64 = cpu.iter().sum();
    let total_share: u64 = r.principals.iter().map(|p| p.shares).sum();
    CpuSummary {
        mean_rms_rel_error: book.accuracy.mean_rms(),
        overhead_cpu_fraction: if wall > 0.0 { own / wall } else { 0.0 },
        cycles: book.cycles,
        quanta,
        reads,
        wall_s: wall / 1e9,
        principals: r
            .principals
            .iter()
            .zip(&cpu)
            .enumerate()
            .map(|(i, (p, c))| PrincipalSummary {
                label: p.label.clone(),
                share: p.shares,
                cpu_ms: c / 1e6,
                fraction: if total > 0.0 { c / total } else { 0.0 },
                target: p.shares as f64 / total_share.max(1) as f64,
                borrowed_ms: book.borrowed_ns[i] as f64 / 1e6,
            })
            .collect(),
        signal: if shutdown.load(Ordering::SeqCst) {
            crate::shutdown::received().map(|s| s.to_string())
        } else {
            None
        },
        backend,
    }
}

/// The kernel back end's loop: membership kept in the groups about once a second; every
/// quantum the principals are read, and a cycle is closed each time they have consumed
/// S·Q together (as ALPS's cycle), so the reports compare with the signals back end's.
fn cgroup_loop(
    r: &mut Runner,
    cg: &mut CpuCgroups,
    shutdown: &AtomicBool,
    observer: &mut dyn CpuObserver,
    backend: String,
) -> Result<CpuSummary, ProcError> {
    check_start(r)?;
    let n = r.principals.len();
    let start_ns = monotonic_ns();
    let mut start = RunStart {
        start_ns,
        own_start_ns: procfs::self_cpu_ns(),
        cpu: vec![0; n],
    };
    let mut book = CycleBook::new(
        r.principals.iter().map(|p| p.shares as f64).collect(),
        start_ns,
    );
    for (id, p) in r.principals.iter_mut().enumerate() {
        if let Some(s) = p.sample(&mut r.stopped) {
            start.cpu[id] = s.cpu_ns;
            book.mark[id] = s.cpu_ns;
        }
    }
    let g = r
        .principals
        .iter()
        .map(|p| p.shares)
        .fold(0, gcd_u64)
        .max(1);
    let cycle_ns: u64 = r.principals.iter().map(|p| p.shares / g).sum::<u64>()
        * r.config.quantum.as_nanos().min(u128::from(u64::MAX / 1024)) as u64;
    let mut timer = PeriodicTimer::new(r.config.quantum);
    let refresh_ns = r.config.refresh.as_nanos() as u64;
    let mut next_refresh = start_ns + refresh_ns;
    let mut next_status = start_ns + 1_000_000_000;
    let (mut late_sum_ns, mut late_count, mut quanta) = (0u64, 0u64, 0u64);
    let deadline = r
        .config
        .duration
        .map(|d| start_ns + d.as_nanos().min(u128::from(u64::MAX / 2)) as u64);
    loop {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        match timer.wait() {
            Wait::Interrupted => continue,
            Wait::Tick { late_ns } => {
                late_sum_ns += late_ns;
                late_count += 1;
                quanta += 1;
            }
        }
        let now = monotonic_ns();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if now >= next_refresh {
            next_refresh = now + refresh_ns;
            cgroup_join_all(r, cg, false, observer)?;
            if fixed_and_gone(r) {
                tracing::info!("every member has exited");
                break;
            }
        }
        // Only the CPU clocks (one call a member): the kernel does the scheduling, so
        // nothing else is needed to close cycles.
        let mut cpu = vec![0u64; n];
        for (id, p) in r.principals.iter_mut().enumerate() {
            cpu[id] = p.read_cpu(&mut r.stopped).unwrap_or(p.cpu_ns());
        }
        let used: u64 = (0..n)
            .filter(|&i| !r.principals[i].is_empty())
            .map(|i| cpu[i].saturating_sub(book.mark[i]))
            .sum();
        if used >= cycle_ns {
            let rows = book.close(book.cycles + 1, now, &cpu, &r.principals);
            observer.on_cycle(&rows).map_err(ProcError::Observer)?;
        }
        if now >= next_status {
            next_status += 1_000_000_000;
            let late = late_sum_ns as f64 / late_count.max(1) as f64 / 1e6;
            (late_sum_ns, late_count) = (0, 0);
            let status = live_status(r, &mut book, &start, now, late);
            observer.on_status(&status).map_err(ProcError::Observer)?;
        }
    }
    Ok(summary(
        r,
        &book,
        &start,
        quanta,
        quanta * n as u64,
        shutdown,
        backend,
    ))
}

fn gcd_u64(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd_u64(b, a % b)
    }
}

/// The shortest extra step the loop takes before a predicted exhaustion or cycle end, ns.
const MIN_STEP_NS: u64 = 500_000;

fn run_loop(
    r: &mut Runner,
    shutdown: &AtomicBool,
    observer: &mut dyn CpuObserver,
    backend: String,
) -> Result<CpuSummary, ProcError> {
    let start_ns = monotonic_ns();
    let own_start_ns = procfs::self_cpu_ns();
    tighten_timer_slack();
    r.refresh(true, observer)?;
    check_start(r)?;
    let moved = crate::affinity::avoid_members(r.principals.iter().flat_map(|p| p.pids()));
    if !moved.is_empty() {
        tracing::debug!(cpus = ?moved, "running on CPUs the members are not pinned to");
        // The members may use the CPUs allot left.
        r.ncpu = r.ncpu.saturating_sub(moved.len()).max(1);
        r.alps.set_cpus(r.ncpu as u32);
    }
    let n = r.principals.len();
    let mut start = RunStart {
        start_ns,
        own_start_ns,
        cpu: vec![0; n],
    };
    let mut book = CycleBook::new(
        r.principals.iter().map(|p| p.shares as f64).collect(),
        start_ns,
    );
    // First readings: origins for the model, the cycle marks and the totals.
    let mut last_read: Vec<(u64, u64)> = vec![(0, start_ns); n];
    let mut run_since: Vec<u64> = vec![start_ns; n];
    for (id, p) in r.principals.iter_mut().enumerate() {
        if let Some(s) = p.sample(&mut r.stopped) {
            book.mark[id] = s.cpu_ns;
            start.cpu[id] = s.cpu_ns;
            last_read[id] = (s.cpu_ns, start_ns);
            r.alps.prime(id, s.cpu_ns);
        }
    }
    // Work-conserving: the CPU each borrowing principal had when it started borrowing.
    let mut borrowing: Vec<Option<u64>> = vec![None; n];
    // The earliest moment a member is predicted to use up its allowance before the next
    // tick (see `Alps::exhaustion_in_ns`): the loop runs an extra step then.
    let mut early: Option<u64> = None;
    // The members whose exhaustion was predicted: the extra step reads them.
    let mut asked: Vec<usize> = Vec::new();
    let (mut late_sum_ns, mut late_count) = (0u64, 0u64);
    let mut timer = PeriodicTimer::new(r.config.quantum);
    let quantum_ns = r.alps.config().quantum_ns;
    let refresh_ns = r.config.refresh.as_nanos() as u64;
    let mut next_refresh = start_ns + refresh_ns;
    let mut next_status = start_ns + 1_000_000_000;
    let deadline = r
        .config
        .duration
        .map(|d| start_ns + d.as_nanos().min(u128::from(u64::MAX / 2)) as u64);

    loop {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        // Ticks at which the model has nothing to read are slept through (the optimised
        // algorithm; the same decisions, fewer wake-ups), but not the refresh, the status
        // line or the end of the run.
        let due = start_ns
            + r.alps
                .next_due_ns(Nanos(monotonic_ns().saturating_sub(start_ns)));
        timer.skip_before(
            due.min(next_refresh)
                .min(next_status)
                .min(deadline.unwrap_or(u64::MAX)),
        );
        let (wait, extra) = match early.take() {
            Some(at) if at < timer.next_deadline_ns() => (sleep_until(at), true),
            _ => (timer.wait(), false),
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
            r.stopped.sweep_ancestors();
            // Processes and trees cannot come back once gone: nothing left to schedule.
            if fixed_and_gone(r) {
                tracing::info!("every member has exited");
                break;
            }
        }
        // Sensor: the members the model asks for.
        let model_now = Nanos(now - start_ns);
        let due = if extra {
            // An extra step reads the members it was for, those already due, and all
            // of them if the cycle may have ended; the rest wait for the next tick, as
            // they would without extra steps.
            r.alps.begin_step(model_now, model_now, &asked)
        } else {
            r.alps.begin_quantum(model_now)
        };
        asked.clear();
        let mut readings = Vec::with_capacity(due.len());
        let mut rates: Vec<(usize, f64)> = Vec::with_capacity(due.len());
        for id in due {
            // A member seen to use at least half of what it would get if the eligible
            // members split the CPUs evenly was running: its tasks' states (the I/O rule)
            // are not read, only its CPU clock.
            let (last_cpu, last_t) = last_read[id];
            let since = last_t.max(run_since[id]);
            let min_progress =
                (now.saturating_sub(since) as f64 * r.alps.fair_rate(id) * 0.5) as u64;
            match r.principals[id].sample_cpu(&mut r.stopped, min_progress) {
                Some(s) => {
                    readings.push((
                        id,
                        Progress {
                            cpu_ns: s.cpu_ns,
                            blocked: s.blocked,
                        },
                    ));
                    // A rate seen over less than half a quantum is mostly where the
                    // kernel's slices fell (0 or a whole CPU): the model's even split
                    // stands in for it.
                    let rate = if now.saturating_sub(since) >= quantum_ns / 2 {
                        s.cpu_ns.saturating_sub(last_cpu) as f64 / (now - since) as f64
                    } else {
                        0.0
                    };
                    rates.push((id, rate));
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
        if r.config.work_conserving {
            let want = r.alps.borrowers();
            for id in 0..n {
                match (borrowing[id], want.contains(&id)) {
                    (None, true) => {
                        let p = &mut r.principals[id];
                        let cpu = p.read_cpu(&mut r.stopped).unwrap_or(p.cpu_ns());
                        let handles: Vec<&crate::handle::ProcHandle> = p.handles().collect();
                        r.stopped.cont_all(handles);
                        borrowing[id] = Some(cpu);
                    }
                    (Some(from), false) => {
                        let p = &mut r.principals[id];
                        let cpu = p.read_cpu(&mut r.stopped).unwrap_or(p.cpu_ns());
                        book.borrowed_ns[id] += cpu.saturating_sub(from);
                        // What it borrowed is not charged to its allowance.
                        r.alps.prime(id, cpu);
                        last_read[id] = (cpu, now);
                        borrowing[id] = None;
                        if !r.alps.is_eligible(id) {
                            let handles: Vec<&crate::handle::ProcHandle> =
                                r.principals[id].handles().collect();
                            r.stopped.stop_all(handles)?;
                        }
                    }
                    _ => {}
                }
            }
        }
        for &(id, rate) in &rates {
            if let Some(t) = r.alps.exhaustion_in_ns(id, rate) {
                let at = now + t.max(MIN_STEP_NS);
                early = Some(early.map_or(at, |e: u64| e.min(at)));
                asked.push(id);
            }
        }
        if let Some(t) = r.alps.cycle_end_in_ns(model_now) {
            let at = now + t.max(MIN_STEP_NS);
            early = Some(early.map_or(at, |e: u64| e.min(at)));
        }
        if outcome.cycle_ended {
            let mut cpu = vec![0u64; n];
            for (id, p) in r.principals.iter_mut().enumerate() {
                // Only the CPU clocks: what each consumed in the cycle.
                cpu[id] = p.read_cpu(&mut r.stopped).unwrap_or(p.cpu_ns());
                if let Some(from) = borrowing[id] {
                    book.borrowed_ns[id] += cpu[id].saturating_sub(from);
                    borrowing[id] = Some(cpu[id]);
                }
            }
            let rows = book.close(r.alps.cycles(), now, &cpu, &r.principals);
            observer.on_cycle(&rows).map_err(ProcError::Observer)?;
        }
        if now >= next_status {
            next_status += 1_000_000_000;
            let late = late_sum_ns as f64 / late_count.max(1) as f64 / 1e6;
            (late_sum_ns, late_count) = (0, 0);
            let status = live_status(r, &mut book, &start, now, late);
            observer.on_status(&status).map_err(ProcError::Observer)?;
        }
    }
    let (quanta, reads) = (r.alps.quanta(), r.alps.reads());
    Ok(summary(r, &book, &start, quanta, reads, shutdown, backend))
}
