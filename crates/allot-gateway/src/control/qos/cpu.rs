//! Sensor: the CPU utilisation of a back end's processes, from `/proc` (through
//! `allot-proc`'s readers), in percent of one CPU.

use std::collections::{BTreeSet, HashMap};

use allot_model::Nanos;
use allot_proc::procfs;
use allot_proc::selector::{self, Selector};

/// Which processes make up the back end, and their CPU time at the last reading.
#[derive(Debug)]
pub(crate) struct CpuSensor {
    pids: Vec<i32>,
    tree: Option<i32>,
    comm: Option<regex::Regex>,
    members: BTreeSet<i32>,
    last: HashMap<i32, u64>,
    last_at: Option<Nanos>,
}

impl CpuSensor {
    /// A sensor over `pids`, the tree under `tree`, and processes whose name matches `comm`.
    pub(crate) fn new(pids: &[i32], tree: Option<i32>, comm: Option<&str>) -> CpuSensor {
        CpuSensor {
            pids: pids.to_vec(),
            tree,
            comm: comm.and_then(|c| regex::Regex::new(c).ok()),
            members: BTreeSet::new(),
            last: HashMap::new(),
            last_at: None,
        }
    }

    fn refresh(&mut self) {
        let mut members: BTreeSet<i32> = self.pids.iter().copied().collect();
        if self.tree.is_some() || self.comm.is_some() {
            if let Ok(all) = procfs::snapshot() {
                let protected = selector::protected_pids(&all);
                if let Some(root) = self.tree {
                    members.extend(selector::resolve(
                        &Selector::Tree(root),
                        &all,
                        &protected,
                        &self.members,
                    ));
                }
                if let Some(re) = &self.comm {
                    members.extend(selector::resolve(
                        &Selector::Comm(re.clone()),
                        &all,
                        &protected,
                        &self.members,
                    ));
                }
            }
        }
        self.members = members;
    }

    /// Utilisation since the last reading, percent of one CPU; `None` on the first reading
    /// or when no member could be read. Processes that appear count from their second
    /// reading; processes that vanish are dropped.
    pub(crate) fn read(&mut self, now: Nanos) -> Option<f64> {
        self.refresh();
        let mut used_ns = 0u64;
        let mut any = false;
        let mut next = HashMap::with_capacity(self.members.len());
        for &pid in &self.members {
            let Ok(ns) = procfs::cpu_ns(pid) else {
                continue;
            };
            if let Some(before) = self.last.get(&pid) {
                used_ns += ns.saturating_sub(*before);
                any = true;
            }
            next.insert(pid, ns);
        }
        self.last = next;
        let since = self.last_at.replace(now)?;
        let wall_ns = now.0.saturating_sub(since.0);
        if !any || wall_ns == 0 {
            return None;
        }
        Some(used_ns as f64 / wall_ns as f64 * 100.0)
    }

    /// Members found at the last reading.
    pub(crate) fn members(&self) -> usize {
        self.members.len()
    }
}
