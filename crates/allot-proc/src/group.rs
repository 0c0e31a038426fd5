//! A principal: the processes one selector picks, counted together. Membership is
//! refreshed from a `/proc` snapshot; exited members are dropped (their CPU time kept);
//! new members join in the principal's current state (stopped if it is stopped).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::error::ProcError;
use crate::handle::ProcHandle;
use crate::procfs::ProcessInfo;
use crate::selector::{resolve, Selector};
use crate::stopped::StoppedSet;

/// A principal's processes, read together.
#[derive(Debug)]
pub struct Principal {
    /// Name for reports (`pid:123`, `user:alice`, …).
    pub label: String,
    /// How members are found.
    pub selector: Selector,
    /// Shares as given.
    pub shares: u64,
    members: BTreeMap<i32, ProcHandle>,
    /// CPU used by members that have left.
    dead_ns: u64,
}

/// One reading of a principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrincipalSample {
    /// Cumulative CPU of the principal since it was first seen (monotone).
    pub cpu_ns: u64,
    /// No member task runnable (and not just stopped by us).
    pub blocked: bool,
    /// Live tasks.
    pub tasks: u32,
    /// Tasks found runnable (running or waiting for a CPU).
    pub runnable: u32,
    /// Run-queue wait of the live member tasks, in nanoseconds (see
    /// [`crate::handle::Sample::wait_ns`]).
    pub wait_ns: u64,
}

/// What a refresh changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// PIDs that joined.
    pub added: Vec<i32>,
    /// PIDs that left (exited or no longer selected).
    pub removed: Vec<i32>,
    /// PIDs selected but refused (not permitted to signal them).
    pub refused: Vec<(i32, String)>,
}

impl Principal {
    /// A principal with no members yet.
    pub fn new(selector: Selector, shares: u64) -> Principal {
        Principal {
            label: selector.to_string(),
            selector,
            shares,
            members: BTreeMap::new(),
            dead_ns: 0,
        }
    }

    /// Whether it has no live member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members' PIDs.
    pub fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.members.keys().copied()
    }

    /// Members.
    pub fn handles(&self) -> impl Iterator<Item = &ProcHandle> + '_ {
        self.members.values()
    }

    /// Live tasks over all members (as last seen).
    pub fn task_count(&self) -> usize {
        self.members.values().map(|h| h.task_count()).sum()
    }

    /// Re-resolves the selector against `processes`. New members are checked for
    /// permission (a refused one is reported, not added) and stopped at once if
    /// `stopped_now` (the principal is ineligible). Members that left are continued if
    /// allot had stopped them, and dropped.
    pub fn refresh(
        &mut self,
        processes: &[ProcessInfo],
        protected: &HashSet<i32>,
        stopped: &mut StoppedSet,
        stopped_now: bool,
    ) -> Result<Changes, ProcError> {
        let current: BTreeSet<i32> = self.members.keys().copied().collect();
        let wanted = resolve(&self.selector, processes, protected, &current);
        let mut changes = Changes::default();
        // Leavers: exited, or no longer selected.
        for pid in current.difference(&wanted) {
            if let Some(h) = self.members.remove(pid) {
                if stopped.contains(*pid) {
                    stopped.cont_all([&h]);
                }
                self.dead_ns += h.last_cpu_ns();
                changes.removed.push(*pid);
            }
        }
        let mut gone = Vec::new();
        for (pid, h) in self.members.iter_mut() {
            if h.refresh_tasks().is_err() {
                gone.push(*pid);
            }
        }
        for pid in gone {
            self.drop_member(pid, stopped);
            changes.removed.push(pid);
        }
        // Joiners.
        let mut joined = Vec::new();
        for info in processes
            .iter()
            .filter(|p| wanted.contains(&p.pid) && !current.contains(&p.pid))
        {
            let h = match ProcHandle::open(info.pid, info.start_time_ticks) {
                Ok(h) => h,
                Err(_) => continue,
            };
            match h.signal(None) {
                Ok(()) => {}
                Err(ProcError::NotPermitted { .. }) => {
                    changes.refused.push((info.pid, info.comm.clone()));
                    continue;
                }
                Err(_) => continue,
            }
            joined.push(info.pid);
            self.members.insert(info.pid, h);
        }
        if stopped_now && !joined.is_empty() {
            let hs: Vec<&ProcHandle> = joined.iter().filter_map(|p| self.members.get(p)).collect();
            for pid in stopped.stop_all(hs)? {
                self.drop_member(pid, stopped);
            }
        }
        changes.added = joined;
        Ok(changes)
    }

    fn drop_member(&mut self, pid: i32, stopped: &mut StoppedSet) {
        if let Some(h) = self.members.remove(&pid) {
            self.dead_ns += h.last_cpu_ns();
        }
        stopped.forget(pid);
    }

    /// Reads every member; members found gone are dropped. `None` if none is left.
    pub fn sample(&mut self, stopped: &mut StoppedSet) -> Option<PrincipalSample> {
        self.sample_with(stopped, None)
    }

    /// The scheduler's reading: each member through [`ProcHandle::sample_cpu`], whose
    /// tasks' states are read only if it used less than its part of `min_progress_ns`
    /// (split evenly between the members) since its last reading. Members found gone are dropped; `None` if none is left.
    pub fn sample_cpu(
        &mut self,
        stopped: &mut StoppedSet,
        min_progress_ns: u64,
    ) -> Option<PrincipalSample> {
        self.sample_with(stopped, Some(min_progress_ns))
    }

    /// Cumulative CPU since first seen, read now from each member's CPU clock where it
    /// has one (one call per member; see [`ProcHandle::cpu_now`]). Members found gone
    /// are dropped; `None` if none is left.
    pub fn read_cpu(&mut self, stopped: &mut StoppedSet) -> Option<u64> {
        let mut gone = Vec::new();
        for (pid, h) in self.members.iter_mut() {
            if h.cpu_now().is_err() {
                gone.push(*pid);
            }
        }
        for pid in gone {
            self.drop_member(pid, stopped);
        }
        (!self.members.is_empty()).then(|| self.cpu_ns())
    }

    fn sample_with(
        &mut self,
        stopped: &mut StoppedSet,
        min_progress_ns: Option<u64>,
    ) -> Option<PrincipalSample> {
        let per_member = min_progress_ns.map(|m| {
            if m == 0 {
                0
            } else {
                (m / self.members.len().max(1) as u64).max(1)
            }
        });
        let mut runnable = 0;
        let mut stopped_tasks = 0;
        let mut tasks = 0;
        let mut wait_ns = 0;
        let mut gone = Vec::new();
        for (pid, h) in self.members.iter_mut() {
            let s = match per_member {
                Some(m) => h.sample_cpu(m),
                None => h.sample(),
            };
            match s {
                Ok(s) => {
                    runnable += s.runnable;
                    stopped_tasks += s.stopped;
                    tasks += s.tasks;
                    wait_ns += s.wait_ns;
                }
                Err(_) => gone.push(*pid),
            }
        }
        for pid in gone {
            self.drop_member(pid, stopped);
        }
        if self.members.is_empty() {
            return None;
        }
        Some(PrincipalSample {
            cpu_ns: self.cpu_ns(),
            blocked: runnable == 0 && stopped_tasks < tasks,
            tasks,
            runnable,
            wait_ns,
        })
    }

    /// Cumulative CPU since first seen, from the last readings (no read).
    pub fn cpu_ns(&self) -> u64 {
        self.dead_ns + self.members.values().map(|h| h.last_cpu_ns()).sum::<u64>()
    }
}
