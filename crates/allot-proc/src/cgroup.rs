//! The kernel back end of `allot cpu`: each principal's processes in a child cgroup whose
//! weight is its shares — `cpu.weight` (cgroup v2, in a subtree this user may write) or
//! `cpu.shares` (cgroup v1 `cpu` controller). The kernel then shares the CPU itself:
//! exact to its own slice granularity, work-conserving, and with no signals at all.
//!
//! Layout: `<base>/allot-<pid>/p<N>`, one `p<N>` per principal, where `<base>` is allot's
//! own cgroup (v1), or the nearest ancestor of it that may hold child cgroups with the
//! `cpu` controller (v2, whose "no internal processes" rule forbids enabling controllers
//! below a cgroup that holds processes). The `allot-<pid>` group competes with its
//! siblings at the default weight; inside it the principals split what it gets by shares.
//!
//! Each member's cgroup is noted before it is moved, and it is moved back when it leaves
//! the selection and at exit (a [`CpuCgroups`] is a guard: dropping it moves every
//! process back and removes the groups). After a SIGKILL, `allot cpu resume` moves what
//! a dead allot left in its groups to the directory those groups were made in.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::ProcError;

/// Which interface sets a group's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    /// cgroup v2 `cpu.weight` (1–10000, default 100).
    WeightV2,
    /// cgroup v1 `cpu.shares` (2–262144, default 1024).
    SharesV1,
}

impl Knob {
    /// The file name.
    pub fn file(self) -> &'static str {
        match self {
            Knob::WeightV2 => "cpu.weight",
            Knob::SharesV1 => "cpu.shares",
        }
    }

    /// The weights for these shares: proportional, scaled so the default weight is one
    /// share where the range allows, within the knob's range.
    pub fn weights(self, shares: &[u64]) -> Vec<u64> {
        let (unit, min, max) = match self {
            Knob::WeightV2 => (100u64, 1u64, 10_000u64),
            Knob::SharesV1 => (1024, 2, 262_144),
        };
        let g = shares.iter().copied().fold(0, gcd).max(1);
        let reduced: Vec<u64> = shares.iter().map(|s| s / g).collect();
        let top = reduced.iter().copied().max().unwrap_or(1).max(1);
        let scale = (unit as f64).min(max as f64 / top as f64);
        reduced
            .iter()
            .map(|s| ((*s as f64 * scale).round() as u64).clamp(min, max))
            .collect()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Where a cpu controller is available to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// The interface.
    pub knob: Knob,
    /// The hierarchy's mount point.
    pub mount: PathBuf,
    /// The directory allot makes its groups in.
    pub base: PathBuf,
}

/// Mount points of the cgroup hierarchies from `/proc/self/mountinfo` text: the v1 one
/// holding the `cpu` controller, and the v2 one.
pub fn parse_mounts(mountinfo: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut v1, mut v2) = (None, None);
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mount = pre.split_whitespace().nth(4);
        let mut post = post.split_whitespace();
        let (fstype, _source, opts) = (post.next(), post.next(), post.next().unwrap_or(""));
        match (fstype, mount) {
            (Some("cgroup2"), Some(m)) => v2 = Some(PathBuf::from(m)),
            (Some("cgroup"), Some(m)) if opts.split(',').any(|o| o == "cpu") => {
                v1 = Some(PathBuf::from(m))
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// A process's cgroup path in the v1 hierarchy holding `cpu` (`v1 = true`) or in v2, from
/// `/proc/PID/cgroup` text.
pub fn parse_own_cgroup(text: &str, v1: bool) -> Option<String> {
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_id, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        let hit = if v1 {
            ctrl.split(',').any(|c| c == "cpu")
        } else {
            ctrl.is_empty()
        };
        if hit {
            return Some(path.to_string());
        }
    }
    None
}

fn join(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

/// Finds a cpu controller this process may make child groups in, or says why not.
pub fn detect() -> Result<Hierarchy, String> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let (v1, v2) = parse_mounts(&info);
    if let Some(mount) = v1 {
        let rel = parse_own_cgroup(&own, true).unwrap_or_else(|| "/".into());
        let base = join(&mount, &rel);
        if base.join("cpu.shares").exists() {
            return Ok(Hierarchy {
                knob: Knob::SharesV1,
                mount,
                base,
            });
        }
        return Err(format!("{}: no cpu.shares", base.display()));
    }
    let Some(mount) = v2 else {
        return Err("no cgroup hierarchy with the cpu controller is mounted".into());
    };
    let rel = parse_own_cgroup(&own, false).unwrap_or_else(|| "/".into());
    // The own group holds processes (allot at least): unless it is the root, its
    // children cannot get controllers; start from its parent.
    let mut dir = join(&mount, &rel);
    if dir != mount {
        dir.pop();
    }
    loop {
        let controllers = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            return Ok(Hierarchy {
                knob: Knob::WeightV2,
                mount,
                base: dir,
            });
        }
        if dir == mount || !dir.pop() {
            break;
        }
    }
    Err(format!(
        "cgroup v2 at {}: the cpu controller is not available to allot's cgroup",
        mount.display()
    ))
}

fn write(path: &Path, value: &str) -> Result<(), ProcError> {
    fs::write(path, value).map_err(|e| ProcError::io(path.display().to_string(), e))
}

/// A process's cgroup directory in `h` right now.
fn cgroup_of(h: &Hierarchy, pid: i32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = parse_own_cgroup(&text, h.knob == Knob::SharesV1)?;
    Some(join(&h.mount, &rel))
}

fn same_process(pid: i32, start: u64) -> bool {
    crate::procfs::read_stat(pid).is_ok_and(|s| s.start_time_ticks == start)
}

/// The groups of one allot run (see the module comment).
#[derive(Debug)]
pub struct CpuCgroups {
    hierarchy: Hierarchy,
    root: PathBuf,
    groups: Vec<PathBuf>,
    /// Member → (start time, the cgroup it came from, its principal).
    moved: BTreeMap<i32, (u64, PathBuf, usize)>,
    released: bool,
}

impl CpuCgroups {
    /// Makes `<base>/allot-<pid>/p<N>` with the weights of `shares`.
    pub fn create(hierarchy: Hierarchy, shares: &[u64]) -> Result<CpuCgroups, ProcError> {
        let root = hierarchy.base.join(format!("allot-{}", std::process::id()));
        fs::create_dir(&root).map_err(|e| ProcError::io(root.display().to_string(), e))?;
        let mut cg = CpuCgroups {
            hierarchy,
            root,
            groups: Vec::new(),
            moved: BTreeMap::new(),
            released: false,
        };
        if cg.hierarchy.knob == Knob::WeightV2 {
            let sub = cg.hierarchy.base.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&sub).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "cpu") {
                write(&sub, "+cpu")?;
            }
            write(&cg.root.join("cgroup.subtree_control"), "+cpu")?;
        }
        let knob = cg.hierarchy.knob;
        for (i, w) in knob.weights(shares).into_iter().enumerate() {
            let g = cg.root.join(format!("p{i}"));
            fs::create_dir(&g).map_err(|e| ProcError::io(g.display().to_string(), e))?;
            cg.groups.push(g.clone());
            write(&g.join(knob.file()), &w.to_string())?;
        }
        Ok(cg)
    }

    /// The hierarchy in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// The directory holding the principals' groups.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `pid` was moved into a group.
    pub fn contains(&self, pid: i32) -> bool {
        self.moved.contains_key(&pid)
    }

    /// The members moved into principal `principal`'s group.
    pub fn members_of(&self, principal: usize) -> Vec<i32> {
        self.moved
            .iter()
            .filter(|(_, m)| m.2 == principal)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Moves a member into its principal's group, noting where it came from.
    pub fn join(&mut self, principal: usize, pid: i32, start: u64) -> Result<(), ProcError> {
        let Some(group) = self.groups.get(principal) else {
            return Err(ProcError::Config(format!(
                "no group for principal {principal}"
            )));
        };
        let from = match cgroup_of(&self.hierarchy, pid) {
            // A child forked inside one of our groups came from where its principal did.
            Some(d) if d.starts_with(&self.root) => self
                .moved
                .values()
                .find(|m| m.2 == principal)
                .map_or_else(|| self.hierarchy.base.clone(), |m| m.1.clone()),
            Some(d) => d,
            None => return Err(ProcError::Gone { pid }),
        };
        match fs::write(group.join("cgroup.procs"), pid.to_string()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {
                return Err(ProcError::Gone { pid })
            }
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(nix::libc::EACCES) | Some(nix::libc::EPERM) => ProcError::NotPermitted {
                        pid,
                        comm: crate::procfs::read_stat(pid)
                            .map(|s| s.comm)
                            .unwrap_or_default(),
                        uid: crate::procfs::uid_of(pid).unwrap_or(u32::MAX),
                    },
                    _ => ProcError::io(group.join("cgroup.procs").display().to_string(), e),
                })
            }
        }
        self.moved.insert(pid, (start, from, principal));
        Ok(())
    }

    /// Moves a member back where it came from (if it is still that process).
    pub fn leave(&mut self, pid: i32) {
        if let Some((start, from, _)) = self.moved.remove(&pid) {
            if same_process(pid, start) {
                self.move_back(pid, &from);
            }
        }
    }

    fn move_back(&self, pid: i32, to: &Path) {
        if fs::write(to.join("cgroup.procs"), pid.to_string()).is_err() {
            let _ = fs::write(self.hierarchy.base.join("cgroup.procs"), pid.to_string());
        }
    }

    /// Moves every process back (members where they came from, anything else found in
    /// the groups — a child not yet seen — where its principal came from) and removes the
    /// groups. Idempotent.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        for (pid, (start, from, _)) in std::mem::take(&mut self.moved) {
            if same_process(pid, start) {
                self.move_back(pid, &from);
            }
        }
        for g in &self.groups {
            for _ in 0..3 {
                let procs = fs::read_to_string(g.join("cgroup.procs")).unwrap_or_default();
                if procs.trim().is_empty() {
                    break;
                }
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    self.move_back(pid, &self.hierarchy.base);
                }
            }
            let _ = fs::remove_dir(g);
        }
        let _ = fs::remove_dir(&self.root);
    }
}

impl Drop for CpuCgroups {
    fn drop(&mut self) {
        self.release();
    }
}

/// Groups left by an allot that is no longer running (after a SIGKILL): every process in
/// them is moved to the directory they were made in, and they are removed. Returns
/// (groups removed, processes moved).
pub fn recover_orphans() -> (usize, usize) {
    let Ok(h) = detect() else {
        return (0, 0);
    };
    let mut groups = 0;
    let mut moved = 0;
    let Ok(entries) = fs::read_dir(&h.base) else {
        return (0, 0);
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix("allot-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = crate::procfs::read_stat(owner)
            .map(|s| s.comm == "allot" && !matches!(s.state, 'Z' | 'X'))
            .unwrap_or(false);
        if alive {
            continue;
        }
        let root = e.path();
        for child in fs::read_dir(&root).into_iter().flatten().flatten() {
            let p = child.path();
            if !p.is_dir() {
                continue;
            }
            let procs = fs::read_to_string(p.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if fs::write(h.base.join("cgroup.procs"), pid.to_string()).is_ok() {
                    moved += 1;
                }
            }
            let _ = fs::remove_dir(&p);
        }
        if fs::remove_dir(&root).is_ok() {
            groups += 1;
        }
    }
    (groups, moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_proportional_within_range() {
        assert_eq!(
            Knob::SharesV1.weights(&[1, 3, 5, 7, 9]),
            vec![1024, 3072, 5120, 7168, 9216]
        );
        assert_eq!(Knob::WeightV2.weights(&[2, 4]), vec![100, 200]);
        // Too wide for the unit: scaled down, the largest at the top of the range.
        assert_eq!(Knob::WeightV2.weights(&[1, 1000]), vec![10, 10_000]);
        assert_eq!(Knob::WeightV2.weights(&[1, 100_000]), vec![1, 10_000]);
    }

    #[test]
    fn parses_mounts_and_own_cgroup() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let (v1, v2) = parse_mounts(info);
        assert_eq!(v1, Some(PathBuf::from("/sys/fs/cgroup/cpu")));
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let own = "2:cpuacct:/\n1:cpu,cpuacct:/user/42\n0::/user.slice/x.scope\n";
        assert_eq!(parse_own_cgroup(own, true).as_deref(), Some("/user/42"));
        assert_eq!(
            parse_own_cgroup(own, false).as_deref(),
            Some("/user.slice/x.scope")
        );
    }
}
