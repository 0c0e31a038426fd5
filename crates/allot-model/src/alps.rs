//! The ALPS proportional-share algorithm (ALPS paper, Newhouse & Pasquale): a user-level
//! scheduler that, once per quantum, measures what eligible members consumed and stops
//! the ones that used up their allowance for the cycle.
//!
//! - Basic ALPS (section 3.1, algorithm 1): every eligible member is read each quantum.
//! - Optimised ALPS (section 4, algorithm 2): a member with allowance `a` cannot use it up
//!   in fewer than `⌈a⌉` quanta, so it is not read again before then. A member here is a
//!   principal that may hold several runnable tasks, so the bound is `⌈a / parallelism⌉`
//!   where the caller says how many CPUs the member can use at once.
//! - I/O (section 4.3, algorithm 3): a member found blocked forfeits one quantum of
//!   allowance and shortens the cycle by one quantum, so a sleeper never stalls a cycle.
//!   A blocked member is read again at the next quantum (the paper would wait `⌈a⌉`).
//!
//! Allowances and the cycle's remaining time are *incremented* at the end of a cycle,
//! never reset, so an error in one cycle is corrected in the next (section 3.1).
//!
//! Pure: the caller reads `/proc`, passes cumulative CPU times in, and sends the signals
//! the returned [`QuantumOutcome`] asks for.

use thiserror::Error;

use crate::Nanos;

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AlpsError {
    /// The quantum must be at least one microsecond.
    #[error("quantum must be at least 1 µs, got {0} ns")]
    Quantum(u64),
    /// No members.
    #[error("at least one member is needed")]
    NoMembers,
    /// A share of zero.
    #[error("member {0}: shares must be at least 1")]
    ZeroShare(usize),
}

/// Which variant of the algorithm runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Read every eligible member every quantum (algorithm 1).
    Basic,
    /// Skip reads that cannot change a decision (algorithm 2).
    Optimized,
    /// As `Optimized`, but a member is read again when it is predicted to be near the end
    /// of its allowance at the rate it was seen to use (or its even split, if more),
    /// rather than at the earliest it could be on every CPU it can use: far fewer
    /// wake-ups, at the risk of an overrun when a member's rate jumps unseen (the next
    /// cycle corrects it). A member is read at least every [`PREDICTED_MAX_WAIT_QUANTA`].
    Predicted,
}

/// Under [`Algorithm::Predicted`], the fraction of the predicted time to exhaustion after
/// which a member is read again (the margin absorbs errors in the predicted rate).
pub const PREDICTED_READ_FRACTION: f64 = 0.85;

/// Under [`Algorithm::Predicted`], the most quanta between two readings of an eligible
/// member.
pub const PREDICTED_MAX_WAIT_QUANTA: f64 = 8.0;

/// Under [`Algorithm::Predicted`], a member left with at most this much allowance (in
/// quanta) is stopped at once and keeps the rest for the next cycle, rather than being
/// read again and again for a remainder the kernel may not even let it run before the
/// next tick. The cycle does not wait for such remainders: it ends when no present member
/// has more than this left, and what each kept is added to its next allowance, so the
/// long-run shares are unchanged.
pub const PREDICTED_STOP_TOLERANCE_QUANTA: f64 = 0.06;

/// Under [`Algorithm::Predicted`], when a step reads any member, it also reads the
/// members due within this many quanta after the step's horizon: one wake-up then serves
/// readings that would each have cost a wake-up of their own a little later. A member read
/// early is only read sooner than needed, so accuracy does not suffer.
pub const PREDICTED_COALESCE_QUANTA: u64 = 4;

/// Parameters of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlpsConfig {
    /// Length of one quantum.
    pub quantum_ns: u64,
    /// Basic or optimised.
    pub algorithm: Algorithm,
    /// Apply the I/O rule (algorithm 3).
    pub io_rule: bool,
}

/// One measurement of a member, as the caller read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Cumulative CPU time of the member (monotone; the model takes differences).
    pub cpu_ns: u64,
    /// Whether the member is blocked (no task runnable) right now.
    pub blocked: bool,
}

/// What to do after a quantum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuantumOutcome {
    /// A cycle ended during this quantum.
    pub cycle_ended: bool,
    /// Members that became ineligible: stop them.
    pub stop: Vec<usize>,
    /// Members that became eligible: continue them.
    pub resume: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Member {
    share: u64,
    allowance: f64,
    eligible: bool,
    active: bool,
    /// When the member could first have used up its allowance (optimised algorithm).
    next_read_ns: u64,
    last_cpu_ns: Option<u64>,
    /// When it was last read (its unread consumption started then).
    last_read_ns: u64,
    parallelism: u32,
    /// The CPU it was seen to use between its last two readings, in CPUs (0 until seen
    /// over at least half a quantum).
    seen_rate: f64,
}

/// The scheduler's state: members indexed `0..n` in the order given.
#[derive(Debug, Clone)]
pub struct Alps {
    config: AlpsConfig,
    members: Vec<Member>,
    /// Time left in the current cycle (`t_c`), may go negative.
    cycle_remaining_ns: i128,
    count: u64,
    cycles: u64,
    reads: u64,
    /// CPUs the members can use together (bounds what unread members consumed).
    cpus: u32,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Alps {
    /// A scheduler for members with these shares. Shares are divided by their gcd, so
    /// the cycle is `S·Q` with the smallest S. Every member starts eligible (the processes
    /// are running when the scheduler starts) with its share as allowance; its first
    /// reading only sets the origin of its CPU time.
    pub fn new(config: AlpsConfig, shares: &[u64]) -> Result<Alps, AlpsError> {
        if config.quantum_ns < 1_000 {
            return Err(AlpsError::Quantum(config.quantum_ns));
        }
        if shares.is_empty() {
            return Err(AlpsError::NoMembers);
        }
        if let Some(i) = shares.iter().position(|&s| s == 0) {
            return Err(AlpsError::ZeroShare(i));
        }
        let g = shares.iter().cloned().fold(0, gcd);
        let members: Vec<Member> = shares
            .iter()
            .map(|&s| Member {
                share: s / g,
                allowance: (s / g) as f64,
                eligible: true,
                active: true,
                next_read_ns: 0,
                last_cpu_ns: None,
                last_read_ns: 0,
                parallelism: 1,
                seen_rate: 0.0,
            })
            .collect();
        let mut alps = Alps {
            config,
            members,
            cycle_remaining_ns: 0,
            count: 0,
            cycles: 0,
            reads: 0,
            cpus: 1,
        };
        alps.cycle_remaining_ns = alps.cycle_length_ns();
        Ok(alps)
    }

    /// `S·Q` over the active members.
    fn cycle_length_ns(&self) -> i128 {
        let s: u64 = self
            .members
            .iter()
            .filter(|m| m.active)
            .map(|m| m.share)
            .sum();
        i128::from(s) * i128::from(self.config.quantum_ns)
    }

    /// The allowance (quanta) at or below which a member is stopped.
    fn stop_tolerance(&self) -> f64 {
        match self.config.algorithm {
            Algorithm::Predicted => PREDICTED_STOP_TOLERANCE_QUANTA,
            Algorithm::Basic | Algorithm::Optimized => 0.0,
        }
    }

    /// What is left of the cycle for the members that may still run (ns): the cycle's
    /// remaining time less the remainders that stopped members keep for the next cycle.
    fn live_remaining_ns(&self) -> i128 {
        let tol = self.stop_tolerance();
        let q = self.config.quantum_ns as f64;
        let kept: f64 = self
            .members
            .iter()
            .filter(|m| m.active && m.allowance <= tol)
            .map(|m| m.allowance.max(0.0) * q)
            .sum();
        self.cycle_remaining_ns - kept as i128
    }

    /// The configuration.
    pub fn config(&self) -> AlpsConfig {
        self.config
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members (never true once built).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A member's share after division by the gcd.
    pub fn share(&self, id: usize) -> u64 {
        self.members[id].share
    }

    /// A member's allowance, in quanta.
    pub fn allowance(&self, id: usize) -> f64 {
        self.members[id].allowance
    }

    /// Whether a member may run now.
    pub fn is_eligible(&self, id: usize) -> bool {
        self.members[id].eligible
    }

    /// Completed cycles.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Quanta run.
    pub fn quanta(&self) -> u64 {
        self.count
    }

    /// Member reads asked for so far (the cost the optimised algorithm reduces).
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Sets a member's CPU-time origin without charging anything (the scheduler's first
    /// reading at start, so nothing consumed after it goes uncounted).
    pub fn prime(&mut self, id: usize, cpu_ns: u64) {
        if let Some(m) = self.members.get_mut(id) {
            m.last_cpu_ns = Some(cpu_ns);
        }
    }

    /// The CPU a present, eligible member gets when the eligible members split the CPUs
    /// evenly by parallelism (`cpus·p / Σp`, at most its own parallelism `p`), in CPUs;
    /// 0 for a member that is absent or stopped. A member's rate jumps up to this as soon
    /// as the others are stopped, before any reading can show it.
    pub fn fair_rate(&self, id: usize) -> f64 {
        let Some(m) = self.members.get(id) else {
            return 0.0;
        };
        if !m.active || !m.eligible {
            return 0.0;
        }
        let total: u32 = self
            .members
            .iter()
            .filter(|m| m.active && m.eligible)
            .map(|m| m.parallelism)
            .sum();
        let p = f64::from(m.parallelism);
        (f64::from(self.cpus) * p / f64::from(total.max(1))).min(p)
    }

    /// A refinement below the quantum (not in the paper): an eligible member with less
    /// than one quantum of allowance left will use it up in `allowance·Q / rate` of wall
    /// time, where the rate is the larger of what it was seen to use, `cpu_per_wall` (CPUs),
    /// and [`Alps::fair_rate`] (it gets more as soon as others are stopped). If that is
    /// before the next quantum, returns it (ns from the reading), so the actuator can stop
    /// the member on time instead of letting it overrun until the next tick. Erring early
    /// costs one more reading, after which the prediction is made again from what is left.
    pub fn exhaustion_in_ns(&self, id: usize, cpu_per_wall: f64) -> Option<u64> {
        let m = self.members.get(id)?;
        if !m.active || !m.eligible || m.allowance >= 1.0 {
            return None;
        }
        let rate = cpu_per_wall
            .max(self.fair_rate(id))
            .min(f64::from(m.parallelism));
        if rate <= 0.0 {
            return None;
        }
        let q = self.config.quantum_ns as f64;
        let t = (m.allowance.max(0.0) * q / rate).round();
        (t < q).then_some(t as u64)
    }

    /// Another refinement below the quantum: when every present, eligible member was read
    /// at `now` (the cycle's remaining time is then exact) and the eligible members, on
    /// at most `min(cpus, Σ parallelism)` CPUs, could finish the cycle before the next
    /// tick, the earliest they could (ns from `now`). A step then ends the cycle on time
    /// instead of up to a quantum late, or, if the members got less than every CPU, finds
    /// what is left and predicts again.
    pub fn cycle_end_in_ns(&self, now: Nanos) -> Option<u64> {
        let remaining = self.live_remaining_ns();
        if remaining <= 0 {
            return None;
        }
        let mut par = 0u32;
        for m in self.members.iter().filter(|m| m.active && m.eligible) {
            if m.last_read_ns != now.0 || m.last_cpu_ns.is_none() {
                return None;
            }
            par += m.parallelism;
        }
        let cpus = par.min(self.cpus);
        if cpus == 0 {
            return None;
        }
        let t = remaining / i128::from(cpus);
        (t < i128::from(self.config.quantum_ns)).then_some(t as u64)
    }

    /// Work-conserving mode (not in the paper): the present members past their allowance
    /// that may run anyway because the eligible ones cannot use every CPU. The eligible
    /// members' parallelism counts as busy CPUs; the idle rest goes to ineligible members,
    /// the least over their share (most allowance) first, until it is filled. Empty when
    /// the eligible members can use every CPU, so ALPS's shares hold whenever the CPUs
    /// are contended. The caller should not charge what a borrower uses (see
    /// [`Alps::prime`]).
    pub fn borrowers(&self) -> Vec<usize> {
        let busy: u32 = self
            .members
            .iter()
            .filter(|m| m.active && m.eligible)
            .map(|m| m.parallelism)
            .sum();
        let mut idle = self.cpus.saturating_sub(busy);
        if idle == 0 {
            return Vec::new();
        }
        let mut candidates: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].active && !self.members[i].eligible)
            .collect();
        candidates.sort_by(|&a, &b| {
            self.members[b]
                .allowance
                .total_cmp(&self.members[a].allowance)
        });
        let mut out = Vec::new();
        for id in candidates {
            if idle == 0 {
                break;
            }
            idle = idle.saturating_sub(self.members[id].parallelism);
            out.push(id);
        }
        out
    }

    /// Tells the model how many CPUs all members together can use (at least 1).
    pub fn set_cpus(&mut self, cpus: u32) {
        self.cpus = cpus.max(1);
    }

    /// Tells the model how many CPUs a member can use at once (its runnable tasks,
    /// bounded by the CPUs it may run on); at least 1.
    pub fn set_parallelism(&mut self, id: usize, parallelism: u32) {
        if let Some(m) = self.members.get_mut(id) {
            m.parallelism = parallelism.max(1);
        }
    }

    /// Marks a member present or absent (a principal with no processes). An absent member
    /// neither runs nor counts in the cycle length; when it returns it starts from its
    /// share again and its next reading sets a new CPU-time origin.
    pub fn set_active(&mut self, id: usize, active: bool) {
        let Some(m) = self.members.get_mut(id) else {
            return;
        };
        if m.active == active {
            return;
        }
        m.active = active;
        m.last_cpu_ns = None;
        m.next_read_ns = 0;
        let q = self.config.quantum_ns as f64;
        // The cycle only waits for allowance that can still be used: a leaving member
        // takes its unused allowance out of the cycle, a returning one brings its share.
        let delta_ns = if active {
            m.allowance = m.share as f64;
            m.allowance * q
        } else {
            -(m.allowance.max(0.0) * q)
        };
        self.cycle_remaining_ns += delta_ns as i128;
    }

    /// The earliest tick at or after `now` at which [`Alps::begin_quantum`] could have a
    /// member to read: before it every tick reads nothing and changes nothing, so the
    /// caller may sleep through those ticks. The basic algorithm reads every tick
    /// (`now`). Optimised: the earliest of each eligible member's next read and of the
    /// moment the cycle could be about to end (what is left of it, less what the unread
    /// members may have used already, consumed on every CPU they can use), less one
    /// quantum (a step reads whatever could finish before the following tick).
    pub fn next_due_ns(&self, now: Nanos) -> u64 {
        if self.config.algorithm == Algorithm::Basic {
            return now.0;
        }
        let q = self.config.quantum_ns;
        let (mut per_member, mut oldest, mut par) = (0u128, now.0, 0u32);
        let mut first_read = u64::MAX;
        for m in self.members.iter().filter(|m| m.active && m.eligible) {
            per_member +=
                u128::from(now.0.saturating_sub(m.last_read_ns)) * u128::from(m.parallelism);
            oldest = oldest.min(m.last_read_ns);
            par += m.parallelism;
            first_read = first_read.min(m.next_read_ns);
        }
        let by_cpus = u128::from(now.0 - oldest) * u128::from(self.cpus);
        let unread = per_member.min(by_cpus) as i128;
        let rate = i128::from(par.min(self.cpus).max(1));
        let left = (self.live_remaining_ns() - unread).max(0) / rate;
        let cycle_end = now
            .0
            .saturating_add(left.min(i128::from(u64::MAX >> 1)) as u64);
        first_read.min(cycle_end).saturating_sub(q).max(now.0)
    }

    /// Starts a step at `now` (normally a quantum tick): returns the members to read
    /// (eligible, present, and — optimised — able to use up their allowance before the
    /// next tick).
    pub fn begin_quantum(&mut self, now: Nanos) -> Vec<usize> {
        let horizon = now.0.saturating_add(self.config.quantum_ns);
        self.begin_step(now, Nanos(horizon), &[])
    }

    /// Starts a step at `now` whose next step comes no later than `next` (an extra step
    /// between ticks: the following tick). Returns the members to read: those of `also`
    /// (whose exhaustion was predicted for now) that are eligible, and — optimised —
    /// those that could use up their allowance before `next`, or every eligible member if
    /// the cycle could end before then. Reading only these keeps an extra step as cheap
    /// as what it is for, however many members there are.
    pub fn begin_step(&mut self, now: Nanos, next: Nanos, also: &[usize]) -> Vec<usize> {
        self.count += 1;
        let horizon = next.0.max(now.0);
        let basic = self.config.algorithm == Algorithm::Basic;
        // The optimised algorithm subtracts consumption from the cycle only when it reads
        // it, so the end of a cycle would be seen late. If what the unread members may
        // have used by the next step could finish the cycle, read them all now.
        let (mut per_member, mut oldest) = (0u128, horizon);
        for m in self.members.iter().filter(|m| m.active && m.eligible) {
            let since = horizon.saturating_sub(m.last_read_ns);
            per_member += u128::from(since) * u128::from(m.parallelism);
            oldest = oldest.min(m.last_read_ns);
        }
        let by_cpus = u128::from(horizon - oldest) * u128::from(self.cpus);
        let unread_bound = per_member.min(by_cpus) as i128;
        let read_all = basic || self.live_remaining_ns() <= unread_bound;
        let due_by = |i: usize, m: &Member, by: u64| {
            m.active && m.eligible && (read_all || m.next_read_ns < by || also.contains(&i))
        };
        // A step that wakes up anyway reads, under the predicted schedule, the members
        // due soon after it as well.
        let predicted = self.config.algorithm == Algorithm::Predicted;
        let any_due = predicted
            && self
                .members
                .iter()
                .enumerate()
                .any(|(i, m)| due_by(i, m, horizon));
        let by = if any_due {
            let ahead = PREDICTED_COALESCE_QUANTA.saturating_mul(self.config.quantum_ns);
            horizon.saturating_add(ahead)
        } else {
            horizon
        };
        let due: Vec<usize> = self
            .members
            .iter()
            .enumerate()
            .filter(|&(i, m)| due_by(i, m, by))
            .map(|(i, _)| i)
            .collect();
        self.reads += due.len() as u64;
        due
    }

    /// Ends the step begun at `now` with the readings of (some of) the members asked for
    /// by [`Alps::begin_quantum`]; a member that could not be read is simply left out.
    pub fn end_quantum(&mut self, now: Nanos, readings: &[(usize, Progress)]) -> QuantumOutcome {
        let q = self.config.quantum_ns as f64;
        let mut read = vec![false; self.members.len()];
        for &(id, progress) in readings {
            let Some(m) = self.members.get_mut(id) else {
                continue;
            };
            read[id] = true;
            let since_ns = now.0.saturating_sub(m.last_read_ns);
            m.last_read_ns = now.0;
            // The first reading (or the first after a return) only sets the origin.
            let consumed = match m.last_cpu_ns {
                Some(last) => progress.cpu_ns.saturating_sub(last),
                None => 0,
            };
            if m.last_cpu_ns.is_some() && since_ns >= self.config.quantum_ns / 2 {
                m.seen_rate = consumed as f64 / since_ns as f64;
            }
            m.last_cpu_ns = Some(progress.cpu_ns.max(m.last_cpu_ns.unwrap_or(0)));
            m.allowance -= consumed as f64 / q;
            self.cycle_remaining_ns -= i128::from(consumed);
            if self.config.io_rule && progress.blocked {
                // Section 4.3: a blocked member gave up this quantum.
                m.allowance -= 1.0;
                self.cycle_remaining_ns -= i128::from(self.config.quantum_ns);
            }
        }

        let tol = self.stop_tolerance();
        let mut cycle_ended = false;
        // The cycle ends when what is left of it is only what stopped members keep, or
        // when no present member may run any more (whatever rounding left over).
        let none_may_run = !self.members.iter().any(|m| m.active && m.allowance > tol);
        if (self.live_remaining_ns() <= 0 || none_may_run) && self.cycle_length_ns() > 0 {
            // End of cycle: extend, never reset, so errors carry over (section 3.1).
            cycle_ended = true;
            self.cycles += 1;
            self.cycle_remaining_ns += self.cycle_length_ns();
        }

        let mut outcome = QuantumOutcome {
            cycle_ended,
            ..QuantumOutcome::default()
        };
        let basic = self.config.algorithm == Algorithm::Basic;
        for (id, m) in self.members.iter_mut().enumerate() {
            if !m.active {
                if m.eligible {
                    m.eligible = false;
                }
                continue;
            }
            if cycle_ended {
                m.allowance += m.share as f64;
            }
            let eligible = m.allowance > tol;
            if eligible != m.eligible {
                m.eligible = eligible;
                if eligible {
                    m.last_read_ns = now.0;
                    outcome.resume.push(id);
                } else {
                    outcome.stop.push(id);
                }
            }
            if !basic && (read[id] || (m.eligible && m.next_read_ns <= now.0)) {
                // Algorithm 2, with the bound in time rather than in ticks (a late or
                // skipped tick must not let a member overrun): running on at most
                // `parallelism` CPUs, it cannot use up its allowance sooner than this.
                let blocked = readings
                    .iter()
                    .any(|&(i, p)| i == id && p.blocked && self.config.io_rule);
                let wait_ns = m.allowance.max(0.0) * q / f64::from(m.parallelism);
                m.next_read_ns = if blocked {
                    now.0
                } else {
                    now.0.saturating_add(wait_ns as u64)
                };
            }
        }
        if self.config.algorithm == Algorithm::Predicted {
            self.predict_reads(now, &read, !outcome.stop.is_empty());
        }
        outcome
    }

    /// [`Algorithm::Predicted`]: moves each eligible member's next reading to shortly
    /// before its predicted exhaustion, at the larger of its seen rate and its even split.
    /// Members read now are planned afresh; when members were stopped now, the others
    /// (whose even split just rose) are planned again from what they are estimated to have
    /// used since their last reading, and only ever brought forward.
    fn predict_reads(&mut self, now: Nanos, read: &[bool], split_rose: bool) {
        let q = self.config.quantum_ns as f64;
        for (id, &was_read) in read.iter().enumerate() {
            let fair = self.fair_rate(id);
            let m = &self.members[id];
            if !m.active || !m.eligible || m.next_read_ns <= now.0 {
                continue;
            }
            let rate = m.seen_rate.max(fair).min(f64::from(m.parallelism));
            if rate <= 0.0 {
                continue;
            }
            let next = if was_read {
                let bound = m.allowance.max(0.0) * q / f64::from(m.parallelism);
                let predicted = m.allowance.max(0.0) * q / rate * PREDICTED_READ_FRACTION;
                let wait = predicted.min(PREDICTED_MAX_WAIT_QUANTA * q).max(bound);
                now.0.saturating_add(wait as u64)
            } else if split_rose {
                let used = m.seen_rate * now.0.saturating_sub(m.last_read_ns) as f64 / q;
                let left = (m.allowance - used).max(0.0);
                let wait = left * q / rate * PREDICTED_READ_FRACTION;
                let bound = m.allowance.max(0.0) * q / f64::from(m.parallelism);
                let earliest = m.last_read_ns.saturating_add(bound as u64);
                m.next_read_ns
                    .min(now.0.saturating_add(wait as u64))
                    .max(earliest)
            } else {
                continue;
            };
            self.members[id].next_read_ns = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accuracy::AccuracyTracker;
    use proptest::prelude::*;

    #[test]
    fn borrowers_fill_only_idle_cpus() {
        let config = AlpsConfig {
            quantum_ns: 10_000_000,
            algorithm: Algorithm::Basic,
            io_rule: false,
        };
        let mut a = Alps::new(config, &[1, 3]).unwrap();
        a.prime(0, 0);
        a.prime(1, 0);
        a.set_cpus(2);
        // Nothing is past its allowance yet: nobody borrows.
        assert!(a.borrowers().is_empty());
        // Member 0 uses its one quantum (and more); member 1 a little.
        let due = a.begin_quantum(Nanos(10_000_000));
        assert_eq!(due, vec![0, 1]);
        let out = a.end_quantum(
            Nanos(10_000_000),
            &[
                (
                    0,
                    Progress {
                        cpu_ns: 12_000_000,
                        blocked: false,
                    },
                ),
                (
                    1,
                    Progress {
                        cpu_ns: 1_000_000,
                        blocked: false,
                    },
                ),
            ],
        );
        assert_eq!(out.stop, vec![0]);
        // Two CPUs, one eligible member using one: member 0 may use the idle one.
        assert_eq!(a.borrowers(), vec![0]);
        // On one CPU the eligible member uses it all: no borrowing.
        a.set_cpus(1);
        assert!(a.borrowers().is_empty());
        // A member that can use both CPUs leaves none idle.
        a.set_cpus(2);
        a.set_parallelism(1, 2);
        assert!(a.borrowers().is_empty());
    }

    /// A simulated one-CPU kernel: in each quantum the runnable, non-stopped processes
    /// share the CPU in slices, round robin from a rotating start, so consumption per
    /// quantum is quantised the way a real scheduler's is.
    struct SimCpu {
        cpu_ns: Vec<u64>,
        stopped: Vec<bool>,
        slice_ns: u64,
        next: usize,
    }

    impl SimCpu {
        fn new(n: usize, slice_ns: u64) -> SimCpu {
            SimCpu {
                cpu_ns: vec![0; n],
                stopped: vec![false; n],
                slice_ns,
                next: 0,
            }
        }

        /// Runs one quantum of `q` ns; `runnable(i)` says who wants the CPU.
        fn run(&mut self, q: u64, runnable: &dyn Fn(usize) -> bool) {
            let n = self.cpu_ns.len();
            let mut left = q;
            let mut idle_rounds = 0;
            while left > 0 && idle_rounds < n {
                let i = self.next % n;
                self.next += 1;
                if self.stopped[i] || !runnable(i) {
                    idle_rounds += 1;
                    continue;
                }
                idle_rounds = 0;
                let s = self.slice_ns.min(left);
                self.cpu_ns[i] += s;
                left -= s;
            }
        }
    }

    /// Drives ALPS against the simulated CPU for `quanta` quanta and returns the CPU each
    /// member got per cycle.
    fn drive(
        alps: &mut Alps,
        cpu: &mut SimCpu,
        quanta: u64,
        runnable: &dyn Fn(u64, usize) -> bool,
    ) -> Vec<Vec<f64>> {
        let q = alps.config().quantum_ns;
        let mut cycles = Vec::new();
        let mut at_cycle_start = cpu.cpu_ns.clone();
        for k in 0..quanta {
            cpu.run(q, &|i| runnable(k, i));
            let now = Nanos((k + 1) * q);
            let due = alps.begin_quantum(now);
            let readings: Vec<(usize, Progress)> = due
                .iter()
                .map(|&i| {
                    (
                        i,
                        Progress {
                            cpu_ns: cpu.cpu_ns[i],
                            blocked: !runnable(k, i),
                        },
                    )
                })
                .collect();
            let out = alps.end_quantum(now, &readings);
            for &i in &out.stop {
                cpu.stopped[i] = true;
            }
            for &i in &out.resume {
                cpu.stopped[i] = false;
            }
            if out.cycle_ended {
                cycles.push(
                    cpu.cpu_ns
                        .iter()
                        .zip(&at_cycle_start)
                        .map(|(a, b)| (a - b) as f64)
                        .collect(),
                );
                at_cycle_start = cpu.cpu_ns.clone();
            }
        }
        cycles
    }

    fn config(algorithm: Algorithm) -> AlpsConfig {
        AlpsConfig {
            quantum_ns: 20_000_000,
            algorithm,
            io_rule: true,
        }
    }

    fn fractions(v: &[u64]) -> Vec<f64> {
        let t: u64 = v.iter().sum();
        v.iter().map(|&x| x as f64 / t as f64).collect()
    }

    #[test]
    fn linear_shares_are_met_per_cycle_and_in_the_long_run() {
        for algorithm in [Algorithm::Basic, Algorithm::Optimized, Algorithm::Predicted] {
            let shares = [1, 3, 5, 7, 9];
            let mut alps = Alps::new(config(algorithm), &shares).unwrap();
            let mut cpu = SimCpu::new(5, 3_000_000);
            let cycles = drive(&mut alps, &mut cpu, 25 * 200, &|_, _| true);
            assert!(
                cycles.len() >= 190,
                "{algorithm:?}: {} cycles",
                cycles.len()
            );
            let mut acc = AccuracyTracker::new();
            let s: Vec<f64> = shares.iter().map(|&x| x as f64).collect();
            for c in cycles.iter().skip(4) {
                acc.record_cycle(&s, c);
            }
            assert!(
                acc.mean_rms() < 0.1,
                "{algorithm:?}: rms {}",
                acc.mean_rms()
            );
            for (f, s) in fractions(&cpu.cpu_ns).iter().zip(shares) {
                let want = s as f64 / 25.0;
                assert!(
                    (f - want).abs() / want < 0.02,
                    "{algorithm:?}: {f} vs {want}"
                );
            }
        }
    }

    #[test]
    fn optimized_reads_less_than_basic() {
        let shares = [1, 3, 5, 7, 9];
        let mut reads = Vec::new();
        for algorithm in [Algorithm::Basic, Algorithm::Optimized] {
            let mut alps = Alps::new(config(algorithm), &shares).unwrap();
            let mut cpu = SimCpu::new(5, 3_000_000);
            drive(&mut alps, &mut cpu, 2_500, &|_, _| true);
            reads.push(alps.reads());
        }
        assert!(
            reads[1] * 2 < reads[0],
            "basic {} optimized {}",
            reads[0],
            reads[1]
        );
    }

    /// Drives `alps` for `quanta` ticks, every tick or (`skip`) only the ticks
    /// `next_due_ns` asks for, as the shell does; returns the steps taken.
    fn drive_steps(alps: &mut Alps, cpu: &mut SimCpu, quanta: u64, skip: bool) -> u64 {
        let q = alps.config().quantum_ns;
        let mut steps = 0;
        for k in 0..quanta {
            cpu.run(q, &|_| true);
            let now = Nanos((k + 1) * q);
            if skip && alps.next_due_ns(now) > now.0 {
                continue;
            }
            steps += 1;
            let due = alps.begin_quantum(now);
            let readings: Vec<(usize, Progress)> =
                due.iter().map(|&i| (i, p_of(cpu.cpu_ns[i]))).collect();
            let out = alps.end_quantum(now, &readings);
            for &i in &out.stop {
                cpu.stopped[i] = true;
            }
            for &i in &out.resume {
                cpu.stopped[i] = false;
            }
        }
        steps
    }

    #[test]
    fn predicted_wakes_and_reads_less_than_optimized() {
        let shares = [1, 3, 5, 7, 9];
        let mut runs = Vec::new();
        for algorithm in [Algorithm::Optimized, Algorithm::Predicted] {
            let mut alps = Alps::new(config(algorithm), &shares).unwrap();
            let mut cpu = SimCpu::new(5, 3_000_000);
            let steps = drive_steps(&mut alps, &mut cpu, 2_500, true);
            runs.push((steps, alps.reads()));
        }
        assert!(runs[1].0 * 3 < runs[0].0 * 2, "steps {:?}", runs);
        assert!(runs[1].1 < runs[0].1, "reads {:?}", runs);
    }

    #[test]
    fn a_step_that_reads_anyone_also_reads_who_is_due_soon_after() {
        let q = 20_000_000u64;
        let mut alps = Alps::new(config(Algorithm::Predicted), &[1, 1, 1, 1]).unwrap();
        let all: Vec<usize> = (0..4).collect();
        assert_eq!(alps.begin_quantum(Nanos(0)), all);
        let zero: Vec<(usize, Progress)> = all.iter().map(|&i| (i, p_of(0))).collect();
        alps.end_quantum(Nanos(0), &zero);
        // Member 0 is due before the next tick, 1 just within the coalescing reach after
        // it, 2 just beyond it, and 3 far later.
        let horizon = 2 * q;
        let reach = horizon + PREDICTED_COALESCE_QUANTA * q;
        let due_at = [horizon - 1, reach - 1, reach, reach + 10 * q];
        for (m, at) in alps.members.iter_mut().zip(due_at) {
            m.next_read_ns = at;
        }
        assert_eq!(alps.begin_quantum(Nanos(q)), vec![0, 1]);
        // With nobody due before the horizon, nobody is read early.
        alps.members[0].next_read_ns = horizon;
        assert_eq!(alps.begin_quantum(Nanos(q)), Vec::<usize>::new());
    }

    #[test]
    fn predicted_reads_come_forward_when_others_stop() {
        // Two members split one CPU; the first uses up its allowance and is stopped, so
        // the second now gets the whole CPU: its next reading must come forward to what
        // the whole CPU would use up, not stay where half a CPU put it.
        let q = 20_000_000;
        let mut alps = Alps::new(config(Algorithm::Predicted), &[1, 8]).unwrap();
        let p = |cpu_ns| Progress {
            cpu_ns,
            blocked: false,
        };
        alps.prime(0, 0);
        alps.prime(1, 0);
        alps.begin_quantum(Nanos(q));
        alps.end_quantum(Nanos(q), &[(0, p(q / 2)), (1, p(q / 2))]);
        // Member 1: 7.5 quanta left at half a CPU, read again before 15 quanta from now.
        let planned = alps.members[1].next_read_ns;
        assert!(planned > 8 * q && planned < 16 * q, "{planned}");
        alps.begin_quantum(Nanos(2 * q));
        let out = alps.end_quantum(Nanos(2 * q), &[(0, p(q + 1))]);
        assert_eq!(out.stop, vec![0]);
        // About 7 quanta left now (it used about half a quantum since), on the whole CPU.
        let moved = alps.members[1].next_read_ns;
        assert!(
            moved < planned && moved < 2 * q + 7 * q,
            "{moved} vs {planned}"
        );
        // Never before the optimised algorithm's bound: 7.5 quanta after its reading.
        assert!(moved >= q + 15 * q / 2, "{moved}");
    }

    #[test]
    fn predicts_exhaustion_within_the_quantum() {
        let mut alps = Alps::new(config(Algorithm::Basic), &[1, 4]).unwrap();
        alps.prime(0, 0);
        alps.prime(1, 0);
        alps.begin_quantum(Nanos::from_millis(20));
        let p = |cpu_ns| Progress {
            cpu_ns,
            blocked: false,
        };
        // Member 0 used 15 of its 20 ms: 5 ms left; at half a CPU that is 10 ms of wall.
        alps.end_quantum(
            Nanos::from_millis(20),
            &[(0, p(15_000_000)), (1, p(15_000_000))],
        );
        assert_eq!(alps.exhaustion_in_ns(0, 0.5), Some(10_000_000));
        // Seen at a tenth of a CPU, but two members split the CPU: it may get half of it,
        // so the prediction is the earlier one.
        assert!((alps.fair_rate(0) - 0.5).abs() < 1e-12);
        assert_eq!(alps.exhaustion_in_ns(0, 0.1), Some(10_000_000));
        // Member 1 has more than a quantum left.
        assert_eq!(alps.exhaustion_in_ns(1, 1.0), None);
        // With four CPUs it could have a whole one: 5 ms left is 5 ms of wall.
        alps.set_cpus(4);
        assert_eq!(alps.exhaustion_in_ns(0, 0.1), Some(5_000_000));
    }

    #[test]
    fn ticks_with_nothing_to_read_can_be_skipped() {
        let q = 20_000_000u64;
        let mut alps = Alps::new(config(Algorithm::Optimized), &[2, 7]).unwrap();
        let due = alps.begin_quantum(Nanos(0));
        assert_eq!(due, vec![0, 1]);
        alps.end_quantum(Nanos(0), &[(0, p_of(0)), (1, p_of(0))]);
        // Member 0 could use its 2 quanta by 40 ms: a step after 20 ms may have to read
        // it (a step reads what could finish before the following tick); none before.
        assert_eq!(alps.next_due_ns(Nanos(0)), q);
        assert_eq!(alps.begin_quantum(Nanos(q / 2)), Vec::<usize>::new());
        assert_eq!(alps.begin_quantum(Nanos(q + 1)), vec![0]);
        // The basic algorithm reads every tick.
        let basic = Alps::new(config(Algorithm::Basic), &[2, 7]).unwrap();
        assert_eq!(basic.next_due_ns(Nanos(7)), 7);
    }

    #[test]
    fn skipping_ticks_changes_no_decision() {
        // Every tick against only the ticks `next_due_ns` asks for: the same CPU split.
        let shares = [1, 9, 20];
        let mut runs = Vec::new();
        for skip in [false, true] {
            let mut alps = Alps::new(config(Algorithm::Optimized), &shares).unwrap();
            let mut cpu = SimCpu::new(5, 3_000_000);
            let steps = drive_steps(&mut alps, &mut cpu, 2_500, skip);
            runs.push((cpu.cpu_ns.clone(), steps, alps.reads()));
        }
        assert_eq!(runs[0].0, runs[1].0, "the same CPU split");
        assert_eq!(runs[0].2, runs[1].2, "the same reads");
        assert!(
            runs[1].1 * 3 < runs[0].1 * 2,
            "steps: {} vs {}",
            runs[1].1,
            runs[0].1
        );
    }

    #[test]
    fn an_extra_step_reads_only_what_cannot_wait_for_the_next_tick() {
        let q = 20_000_000u64;
        let mut alps = Alps::new(config(Algorithm::Optimized), &[1, 1, 1, 1, 1, 1, 1, 1]).unwrap();
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(alps.begin_quantum(Nanos(0)), all);
        let zero: Vec<(usize, Progress)> = all.iter().map(|&i| (i, p_of(0))).collect();
        alps.end_quantum(Nanos(0), &zero);
        // Each could use its quantum by 20 ms: a tick at 5 ms reads all of them ...
        assert_eq!(alps.begin_quantum(Nanos(q / 4)), all);
        // ... an extra step at 5 ms before the tick at 10 ms reads only the member asked
        // for: nobody else can be done by then, nor can the 8-quantum cycle.
        assert_eq!(alps.begin_step(Nanos(q / 4), Nanos(q / 2), &[3]), vec![3]);
    }

    fn p_of(cpu_ns: u64) -> Progress {
        Progress {
            cpu_ns,
            blocked: false,
        }
    }

    #[test]
    fn predicts_the_end_of_a_cycle_only_from_fresh_readings() {
        let q = 20_000_000u64;
        let mut alps = Alps::new(config(Algorithm::Basic), &[1, 1]).unwrap();
        let p = |cpu_ns| Progress {
            cpu_ns,
            blocked: false,
        };
        alps.begin_quantum(Nanos(0));
        alps.end_quantum(Nanos(0), &[(0, p(0)), (1, p(0))]);
        // 2Q left of a 2Q cycle on one CPU: not before the next tick.
        assert_eq!(alps.cycle_end_in_ns(Nanos(0)), None);
        alps.begin_quantum(Nanos(q));
        alps.end_quantum(Nanos(q), &[(0, p(q / 2)), (1, p(q / 4))]);
        // 2Q − 0.75Q = 1.25Q left: still not within a quantum.
        assert_eq!(alps.cycle_end_in_ns(Nanos(q)), None);
        alps.begin_quantum(Nanos(2 * q));
        alps.end_quantum(Nanos(2 * q), &[(0, p(q * 3 / 4)), (1, p(q / 2))]);
        // 0.75Q left, both eligible, one CPU: 15 ms at the earliest.
        assert_eq!(alps.cycle_end_in_ns(Nanos(2 * q)), Some(15_000_000));
        // On two CPUs half that.
        alps.set_cpus(2);
        assert_eq!(alps.cycle_end_in_ns(Nanos(2 * q)), Some(7_500_000));
        // A reading older than `now`: the remaining time is not known, no prediction.
        assert_eq!(alps.cycle_end_in_ns(Nanos(2 * q + 1)), None);
    }

    #[test]
    fn a_small_remainder_is_kept_for_the_next_cycle() {
        let q = 20_000_000u64;
        let tol = (PREDICTED_STOP_TOLERANCE_QUANTA * q as f64) as u64;
        let mut alps = Alps::new(config(Algorithm::Predicted), &[1, 1]).unwrap();
        alps.prime(0, 0);
        alps.prime(1, 0);
        // Member 0 is a hair inside the tolerance: stopped now, not read again for it.
        alps.begin_step(Nanos(q), Nanos(q), &[0, 1]);
        let out = alps.end_quantum(Nanos(q), &[(0, p_of(q - tol / 2)), (1, p_of(q / 2))]);
        assert_eq!(out.stop, vec![0]);
        assert!(!out.cycle_ended);
        // Member 1 is stopped inside the tolerance too: only kept remainders are left, so
        // the cycle ends at once rather than waiting on members that will not run.
        alps.begin_step(Nanos(2 * q), Nanos(2 * q), &[1]);
        let out = alps.end_quantum(Nanos(2 * q), &[(1, p_of(q - tol / 4))]);
        assert!(out.cycle_ended);
        assert_eq!(out.resume, vec![0]);
        // Both carry what they kept into the new cycle: share plus remainder.
        assert!((alps.allowance(0) - (1.0 + PREDICTED_STOP_TOLERANCE_QUANTA / 2.0)).abs() < 1e-9);
        assert!((alps.allowance(1) - (1.0 + PREDICTED_STOP_TOLERANCE_QUANTA / 4.0)).abs() < 1e-9);
        assert!(alps.is_eligible(1));
        // The optimised algorithm keeps the paper's rule: run until nothing is left.
        let mut opt = Alps::new(config(Algorithm::Optimized), &[1, 1]).unwrap();
        opt.prime(0, 0);
        opt.prime(1, 0);
        opt.begin_quantum(Nanos(q));
        let out = opt.end_quantum(Nanos(q), &[(0, p_of(q - tol / 2)), (1, p_of(q / 2))]);
        assert!(out.stop.is_empty());
    }

    #[test]
    fn gcd_sets_the_cycle_length() {
        let alps = Alps::new(config(Algorithm::Basic), &[10, 20, 30]).unwrap();
        assert_eq!((alps.share(0), alps.share(1), alps.share(2)), (1, 2, 3));
        assert_eq!(alps.cycle_remaining_ns, 6 * 20_000_000);
    }

    #[test]
    fn a_blocked_member_loses_a_quantum_and_shortens_the_cycle() {
        let mut alps = Alps::new(config(Algorithm::Basic), &[1, 2, 3]).unwrap();
        // First reading sets origins.
        alps.begin_quantum(Nanos::from_millis(20));
        let p = |cpu_ns, blocked| Progress { cpu_ns, blocked };
        alps.end_quantum(
            Nanos::from_millis(20),
            &[(0, p(0, false)), (1, p(0, false)), (2, p(0, false))],
        );
        alps.begin_quantum(Nanos::from_millis(40));
        let q = 20_000_000;
        let out = alps.end_quantum(
            Nanos::from_millis(40),
            &[(0, p(q / 2, false)), (1, p(0, true)), (2, p(q / 2, false))],
        );
        assert!(!out.cycle_ended);
        assert!((alps.allowance(0) - 0.5).abs() < 1e-12);
        assert!((alps.allowance(1) - 1.0).abs() < 1e-12);
        assert!((alps.allowance(2) - 2.5).abs() < 1e-12);
        // 6Q − Q/2 − Q/2 − Q (blocked) = 4Q left.
        assert_eq!(alps.cycle_remaining_ns, 4 * i128::from(q));
    }

    #[test]
    fn while_one_sleeps_the_others_split_by_their_shares_and_cycles_keep_ending() {
        for algorithm in [Algorithm::Basic, Algorithm::Optimized, Algorithm::Predicted] {
            let mut alps = Alps::new(config(algorithm), &[1, 2, 3]).unwrap();
            let mut cpu = SimCpu::new(3, 2_000_000);
            // Member 1 sleeps throughout.
            let cycles = drive(&mut alps, &mut cpu, 4_000, &|_, i| i != 1);
            // Without the I/O rule no cycle would ever end; with it a cycle is ~4 quanta.
            assert!(cycles.len() > 800, "{algorithm:?}: {} cycles", cycles.len());
            let f = cpu.cpu_ns[0] as f64 / (cpu.cpu_ns[0] + cpu.cpu_ns[2]) as f64;
            assert!((f - 0.25).abs() / 0.25 < 0.05, "{algorithm:?}: {f}");
            assert_eq!(cpu.cpu_ns[1], 0);
        }
    }

    #[test]
    fn without_the_io_rule_a_sleeper_stalls_the_cycle() {
        let mut alps = Alps::new(
            AlpsConfig {
                io_rule: false,
                ..config(Algorithm::Basic)
            },
            &[1, 2, 3],
        )
        .unwrap();
        let mut cpu = SimCpu::new(3, 2_000_000);
        let cycles = drive(&mut alps, &mut cpu, 400, &|_, i| i != 1);
        assert!(cycles.len() <= 1);
    }

    #[test]
    fn an_absent_member_does_not_hold_up_the_others() {
        let mut alps = Alps::new(config(Algorithm::Optimized), &[1, 1]).unwrap();
        alps.set_active(1, false);
        let mut cpu = SimCpu::new(2, 2_000_000);
        let cycles = drive(&mut alps, &mut cpu, 100, &|_, i| i == 0);
        assert!(cycles.len() >= 90);
        assert!(!alps.is_eligible(1));
    }

    #[test]
    fn rejects_bad_config() {
        assert_eq!(
            Alps::new(config(Algorithm::Basic), &[]).err(),
            Some(AlpsError::NoMembers)
        );
        assert_eq!(
            Alps::new(config(Algorithm::Basic), &[1, 0]).err(),
            Some(AlpsError::ZeroShare(1))
        );
        assert!(Alps::new(
            AlpsConfig {
                quantum_ns: 10,
                ..config(Algorithm::Basic)
            },
            &[1]
        )
        .is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn long_run_fractions_follow_shares(
            shares in prop::collection::vec(1u64..12, 2..8),
            slice_ms in 1u64..20,
            variant in 0u8..3,
        ) {
            let algorithm = [Algorithm::Basic, Algorithm::Optimized, Algorithm::Predicted][usize::from(variant)];
            let mut alps = Alps::new(config(algorithm), &shares).unwrap();
            let total: u64 = shares.iter().sum();
            let mut cpu = SimCpu::new(shares.len(), slice_ms * 1_000_000);
            drive(&mut alps, &mut cpu, total * 150, &|_, _| true);
            let f = fractions(&cpu.cpu_ns);
            for (i, s) in shares.iter().enumerate() {
                let want = *s as f64 / total as f64;
                prop_assert!((f[i] - want).abs() <= 0.02 * want + 0.01, "member {} got {} want {}", i, f[i], want);
                // Allowances stay bounded: errors are carried, never accumulated.
                prop_assert!(alps.allowance(i) <= 2.0 * *s as f64 + 2.0);
                prop_assert!(alps.allowance(i) > -(*s as f64) - 2.0);
            }
        }
    }
}
