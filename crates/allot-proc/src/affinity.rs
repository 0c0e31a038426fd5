//! Keeping the scheduler off its members' CPUs. A user-level scheduler only works if it
//! wakes on time (ALPS paper section 3.3: a late ALPS lets low-share processes run on);
//! when the members are pinned to some CPUs and others are free of them, allot runs on
//! the others, where its wake-ups do not queue behind the members.

use std::collections::BTreeSet;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

fn cpus_of(pid: i32) -> Option<BTreeSet<usize>> {
    let set = sched_getaffinity(Pid::from_raw(pid)).ok()?;
    Some(
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
    )
}

/// Moves this process to the CPUs it may use that none of `members` may use, if there
/// are any. Returns the CPUs it moved to (empty if it stayed).
pub fn avoid_members(members: impl IntoIterator<Item = i32>) -> Vec<usize> {
    let Some(mine) = cpus_of(0) else {
        return Vec::new();
    };
    let mut used = BTreeSet::new();
    for pid in members {
        if let Some(c) = cpus_of(pid) {
            used.extend(c);
        }
    }
    let free: Vec<usize> = mine.difference(&used).copied().collect();
    if free.is_empty() || free.len() == mine.len() {
        return Vec::new();
    }
    let mut set = CpuSet::new();
    for &c in &free {
        if set.set(c).is_err() {
            return Vec::new();
        }
    }
    match sched_setaffinity(Pid::from_raw(0), &set) {
        Ok(()) => free,
        Err(_) => Vec::new(),
    }
}
