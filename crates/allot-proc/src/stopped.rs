//! The stopped set: every process allot has stopped and not yet continued, mirrored in a
//! state file so `allot cpu resume` can continue them after allot was killed. A process
//! is recorded (and the file written) *before* it is sent SIGSTOP, so the file never
//! misses a stopped process.
//!
//! The file holds a superset: every identity (PID and start time) stopped so far that has
//! not exited. A scheduler stops and continues the same members every cycle, so the file
//! is written only when a member is stopped for the first time, not on every quantum;
//! an entry for a member that is running costs one checked, harmless SIGCONT on recovery.
//!
//! [`StoppedSet`] is also the guard: when dropped (normal exit, error, or a panic
//! unwinding) it continues everything still stopped and removes the file.
//!
//! Non-members stopped because of a member: a parent that waits for its child with
//! `WUNTRACED` — `su`, `runuser`, `sudo` — stops itself when the child stops, and stays
//! stopped after the child is continued. Before a member is stopped for the first time its
//! non-member ancestors are noted (up to allot's own ancestors or init) with their state;
//! one already stopped then was stopped by someone else and is never touched. The others
//! are continued when found stopped: the member's parent (and up the chain from it) each
//! time the member is continued, every one whose members all run about once a second, and
//! all of them at exit and by `allot cpu resume` (the file lists them too).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::error::ProcError;
use crate::handle::{signal_if_same, ProcHandle};

const HEADER: &str =
    "# allot stopped set v1: pid start_time_ticks [a: a non-member ancestor, continued if stopped]";

/// How long the exit path and `resume` keep looking for ancestors that stop themselves a
/// moment after their member was stopped, in milliseconds.
const ANCESTOR_SETTLE_MS: u64 = 100;

/// The deepest chain of non-member ancestors noted above a member.
const MAX_ANCESTORS: usize = 8;

/// A non-member ancestor of a member (see the module comment).
#[derive(Debug, Clone, Copy)]
struct Ancestor {
    start: u64,
    /// Its parent, if that is tracked too.
    parent: Option<i32>,
    /// Stopped when first seen: someone else's stop, left alone.
    pre_stopped: bool,
}

/// The directory for state files: `$XDG_RUNTIME_DIR/allot`, else `/tmp/allot-<uid>`.
pub fn state_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("allot"),
        _ => PathBuf::from(format!("/tmp/allot-{}", nix::unistd::getuid().as_raw())),
    }
}

/// The default state file of this allot process for job `job` (`cpu`, `adapt`).
pub fn default_state_file(job: &str) -> PathBuf {
    state_dir().join(format!("{job}-{}.state", std::process::id()))
}

/// Processes stopped by allot, with the file that records them.
#[derive(Debug)]
pub struct StoppedSet {
    path: PathBuf,
    stopped: BTreeMap<i32, u64>,
    /// The identities the file holds (a superset of `stopped`).
    recorded: BTreeMap<i32, u64>,
    written: bool,
    /// Each member's parent, where that is a tracked non-member ancestor.
    parent_of: BTreeMap<i32, i32>,
    ancestors: BTreeMap<i32, Ancestor>,
    /// allot and its own ancestors (never tracked, never signalled).
    own: HashSet<i32>,
}

fn own_ancestry() -> HashSet<i32> {
    let mut out = HashSet::from([0, 1]);
    let mut cur = std::process::id() as i32;
    while cur > 1 && out.insert(cur) {
        cur = crate::procfs::read_stat(cur).map_or(0, |s| s.ppid);
    }
    out
}

fn is_stopped(state: char) -> bool {
    matches!(state, 'T' | 't')
}

impl StoppedSet {
    /// An empty set recorded in `path` (the file is created on the first stop).
    pub fn new(path: PathBuf) -> StoppedSet {
        StoppedSet {
            path,
            stopped: BTreeMap::new(),
            recorded: BTreeMap::new(),
            written: false,
            parent_of: BTreeMap::new(),
            ancestors: BTreeMap::new(),
            own: own_ancestry(),
        }
    }

    /// Notes the non-member ancestors of `pid` (before it is stopped for the first time).
    fn track_ancestors(&mut self, pid: i32) {
        let Ok(stat) = crate::procfs::read_stat(pid) else {
            return;
        };
        let mut child = pid;
        let mut cur = stat.ppid;
        for _ in 0..MAX_ANCESTORS {
            if self.own.contains(&cur) || self.recorded.contains_key(&cur) {
                break;
            }
            if child == pid {
                self.parent_of.insert(pid, cur);
            }
            if self.ancestors.contains_key(&cur) {
                break;
            }
            let Ok(s) = crate::procfs::read_stat(cur) else {
                break;
            };
            self.ancestors.insert(
                cur,
                Ancestor {
                    start: s.start_time_ticks,
                    parent: None,
                    pre_stopped: is_stopped(s.state),
                },
            );
            if let Some(a) = self.ancestors.get_mut(&child) {
                a.parent = Some(cur);
            }
            child = cur;
            cur = s.ppid;
        }
    }

    /// Continues `pid` if it is a tracked ancestor stopped not by someone else and not a
    /// member allot holds stopped; returns whether it was found stopped.
    fn wake_ancestor(&mut self, pid: i32) -> bool {
        let Some(a) = self.ancestors.get(&pid).copied() else {
            return false;
        };
        if a.pre_stopped || self.stopped.contains_key(&pid) {
            return false;
        }
        match crate::procfs::read_stat(pid) {
            Ok(s) if s.start_time_ticks == a.start => {
                if is_stopped(s.state) {
                    let _ = signal_if_same(pid, a.start, Signal::SIGCONT);
                    return true;
                }
                false
            }
            _ => {
                self.ancestors.remove(&pid);
                false
            }
        }
    }

    /// Continues the stopped ancestors of members that were just continued: each
    /// member's parent, and up the chain while they are found stopped.
    fn wake_parents(&mut self, members: &[i32]) {
        let mut parents: Vec<i32> = members
            .iter()
            .filter_map(|m| self.parent_of.get(m).copied())
            .collect();
        parents.sort_unstable();
        parents.dedup();
        for p in parents {
            let mut cur = Some(p);
            while let Some(pid) = cur {
                if !self.wake_ancestor(pid) {
                    break;
                }
                cur = self.ancestors.get(&pid).and_then(|a| a.parent);
            }
        }
    }

    /// Continues every tracked ancestor found stopped none of whose members allot holds
    /// stopped (continuing a wrapper continues its child, which would undo a stop). Cheap
    /// when there are none; the loops call it about once a second.
    pub fn sweep_ancestors(&mut self) {
        if self.ancestors.is_empty() {
            return;
        }
        let mut held: HashSet<i32> = HashSet::new();
        for m in self.stopped.keys() {
            let mut cur = self.parent_of.get(m).copied();
            while let Some(p) = cur {
                if !held.insert(p) {
                    break;
                }
                cur = self.ancestors.get(&p).and_then(|a| a.parent);
            }
        }
        let free: Vec<i32> = self
            .ancestors
            .keys()
            .filter(|p| !held.contains(p))
            .copied()
            .collect();
        for p in free {
            self.wake_ancestor(p);
        }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `pid` is in the set.
    pub fn contains(&self, pid: i32) -> bool {
        self.stopped.contains_key(&pid)
    }

    /// Number of stopped processes.
    pub fn len(&self) -> usize {
        self.stopped.len()
    }

    /// Whether nothing is stopped.
    pub fn is_empty(&self) -> bool {
        self.stopped.is_empty()
    }

    /// Rewrites the file with `recorded`.
    fn write(&mut self) -> Result<(), ProcError> {
        if !self.written {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir).map_err(|e| ProcError::io(dir.display().to_string(), e))?;
            }
        }
        let tmp = self.path.with_extension("tmp");
        let mut text = String::from(HEADER);
        text.push('\n');
        for (pid, start) in &self.recorded {
            text.push_str(&format!("{pid} {start}\n"));
        }
        for (pid, a) in &self.ancestors {
            if !a.pre_stopped && !self.recorded.contains_key(pid) {
                text.push_str(&format!("{pid} {} a\n", a.start));
            }
        }
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| ProcError::io(self.path.display().to_string(), e))?;
        self.written = true;
        Ok(())
    }

    /// Rewrites the file if it has gone missing (removed by someone, its directory
    /// replaced) while it has entries: a lost file would leave nothing for `allot cpu
    /// resume` after a SIGKILL. Cheap (one `stat`); the loops call it about once a second.
    pub fn ensure_file(&mut self) -> Result<(), ProcError> {
        if self.written && !self.recorded.is_empty() && !self.path.exists() {
            self.written = false;
            self.write()?;
        }
        Ok(())
    }

    /// Stops these processes: records them all, writes the file if one of them is not in
    /// it yet, then signals. Returns the PIDs that turned out to be gone.
    pub fn stop_all<'a>(
        &mut self,
        handles: impl IntoIterator<Item = &'a ProcHandle>,
    ) -> Result<Vec<i32>, ProcError> {
        let handles: Vec<&ProcHandle> = handles
            .into_iter()
            .filter(|h| !self.stopped.contains_key(&h.pid()))
            .collect();
        if handles.is_empty() {
            return Ok(Vec::new());
        }
        let mut new = Vec::new();
        for h in &handles {
            let id = (h.pid(), h.start_time_ticks());
            self.stopped.insert(id.0, id.1);
            if self.recorded.insert(id.0, id.1) != Some(id.1) {
                new.push(id.0);
            }
        }
        for &pid in &new {
            self.track_ancestors(pid);
        }
        if !new.is_empty() {
            self.write()?;
        }
        let mut gone = Vec::new();
        for h in handles {
            match h.signal(Some(Signal::SIGSTOP)) {
                Ok(()) => {}
                Err(ProcError::Gone { pid }) => {
                    self.stopped.remove(&pid);
                    self.recorded.remove(&pid);
                    gone.push(pid);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }

    /// Continues these processes. They stay in the file (see the module comment).
    pub fn cont_all<'a>(&mut self, handles: impl IntoIterator<Item = &'a ProcHandle>) -> Vec<i32> {
        let mut gone = Vec::new();
        let mut continued = Vec::new();
        for h in handles {
            if self.stopped.remove(&h.pid()).is_none() {
                continue;
            }
            match h.signal(Some(Signal::SIGCONT)) {
                Err(ProcError::Gone { pid }) => gone.push(pid),
                _ => continued.push(h.pid()),
            }
        }
        if !self.parent_of.is_empty() {
            self.wake_parents(&continued);
        }
        gone
    }

    /// Forgets a process that exited; the file drops it at its next write.
    pub fn forget(&mut self, pid: i32) {
        self.stopped.remove(&pid);
        self.recorded.remove(&pid);
        self.parent_of.remove(&pid);
    }

    /// Continues everything still stopped (checking identities) and removes the file.
    /// Returns how many were continued.
    pub fn release(&mut self) -> usize {
        let mut n = 0;
        self.recorded.clear();
        for (pid, start) in std::mem::take(&mut self.stopped) {
            if signal_if_same(pid, start, Signal::SIGCONT).is_ok() {
                n += 1;
            }
        }
        let ancestors: Vec<(i32, u64)> = self
            .ancestors
            .iter()
            .filter(|(_, a)| !a.pre_stopped)
            .map(|(p, a)| (*p, a.start))
            .collect();
        continue_stopped_ancestors(&ancestors);
        self.ancestors.clear();
        self.parent_of.clear();
        if self.written {
            let _ = fs::remove_file(&self.path);
            self.written = false;
        }
        n
    }
}

impl Drop for StoppedSet {
    fn drop(&mut self) {
        self.release();
    }
}

/// Continues each of these (PID, start time) that is found stopped, looking again for
/// [`ANCESTOR_SETTLE_MS`]: a wrapper stops itself a moment after its child stopped.
fn continue_stopped_ancestors(ancestors: &[(i32, u64)]) {
    if ancestors.is_empty() {
        return;
    }
    let passes = 5;
    for pass in 0..passes {
        for &(pid, start) in ancestors {
            if let Ok(s) = crate::procfs::read_stat(pid) {
                if s.start_time_ticks == start && is_stopped(s.state) {
                    let _ = signal_if_same(pid, start, Signal::SIGCONT);
                }
            }
        }
        if pass + 1 < passes {
            std::thread::sleep(std::time::Duration::from_millis(
                ANCESTOR_SETTLE_MS / (passes - 1),
            ));
        }
    }
}

/// Parses a state file's member entries (PID, start time).
pub fn parse_state(text: &str) -> Vec<(i32, u64)> {
    parse_state_all(text)
        .into_iter()
        .filter(|e| !e.2)
        .map(|e| (e.0, e.1))
        .collect()
}

/// Parses every entry: (PID, start time, whether it is a non-member ancestor).
fn parse_state_all(text: &str) -> Vec<(i32, u64, bool)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pid = it.next()?.parse().ok()?;
            let start = it.next()?.parse().ok()?;
            Some((pid, start, it.next() == Some("a")))
        })
        .collect()
}

/// Continues every member recorded in `path` that still is the process recorded (a
/// reused PID is left alone), and every recorded ancestor found stopped, then removes
/// the file. Returns how many were continued.
pub fn resume_file(path: &Path) -> Result<usize, ProcError> {
    let text =
        fs::read_to_string(path).map_err(|e| ProcError::io(path.display().to_string(), e))?;
    let mut n = 0;
    let entries = parse_state_all(&text);
    for &(pid, start, _) in entries.iter().filter(|e| !e.2) {
        if signal_if_same(pid, start, Signal::SIGCONT).is_ok() {
            n += 1;
        }
    }
    let ancestors: Vec<(i32, u64)> = entries.iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect();
    continue_stopped_ancestors(&ancestors);
    fs::remove_file(path).map_err(|e| ProcError::io(path.display().to_string(), e))?;
    Ok(n)
}

/// The state files in `dir` whose allot process is no longer running.
pub fn orphaned_state_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(owner) = name
            .strip_suffix(".state")
            .and_then(|s| s.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let owner_alive = crate::procfs::read_stat(owner)
            .map(|s| s.comm == "allot" && !matches!(s.state, 'Z' | 'X'))
            .unwrap_or(false);
        if !owner_alive {
            out.push(path);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn state_of(pid: u32) -> char {
        crate::procfs::read_stat(pid as i32).unwrap().state
    }

    fn wait_state(pid: u32, want: char) -> bool {
        for _ in 0..200 {
            if state_of(pid) == want {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn guard_records_then_continues_on_drop_and_resume_reads_the_file() {
        let dir = std::env::temp_dir().join(format!("allot-stopped-test-{}", std::process::id()));
        let path = dir.join("cpu-1.state");
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let h = ProcHandle::open_now(child.id() as i32).unwrap();
        {
            let mut set = StoppedSet::new(path.clone());
            set.stop_all([&h]).unwrap();
            assert!(wait_state(child.id(), 'T'));
            let text = fs::read_to_string(&path).unwrap();
            assert_eq!(parse_state(&text), vec![(h.pid(), h.start_time_ticks())]);
        }
        assert!(wait_state(child.id(), 'S'));
        assert!(!path.exists());

        // Recovery: a file left behind by a killed allot.
        let mut set = StoppedSet::new(path.clone());
        set.stop_all([&h]).unwrap();
        assert!(wait_state(child.id(), 'T'));
        std::mem::forget(set);
        assert_eq!(resume_file(&path).unwrap(), 1);
        assert!(wait_state(child.id(), 'S'));

        // A stale identity is not signalled.
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            &path,
            format!("{HEADER}\n{} {}\n", h.pid(), h.start_time_ticks() + 7),
        )
        .unwrap();
        h.signal(Some(Signal::SIGSTOP)).unwrap();
        assert_eq!(resume_file(&path).unwrap(), 0);
        assert!(wait_state(child.id(), 'T'));
        h.signal(Some(Signal::SIGCONT)).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_file_is_written_only_when_a_new_identity_is_stopped() {
        let dir = std::env::temp_dir().join(format!("allot-stopped-once-{}", std::process::id()));
        let path = dir.join("cpu-1.state");
        let mut a = Command::new("sleep").arg("30").spawn().unwrap();
        let mut b = Command::new("sleep").arg("30").spawn().unwrap();
        let ha = ProcHandle::open_now(a.id() as i32).unwrap();
        let hb = ProcHandle::open_now(b.id() as i32).unwrap();
        let id = |h: &ProcHandle| (h.pid(), h.start_time_ticks());
        let mut set = StoppedSet::new(path.clone());
        set.stop_all([&ha]).unwrap();
        set.cont_all([&ha]);
        assert!(set.is_empty());
        // Mark the file: stopping the same process again must not rewrite it.
        fs::write(&path, format!("{HEADER}\n")).unwrap();
        set.stop_all([&ha]).unwrap();
        assert!(parse_state(&fs::read_to_string(&path).unwrap()).is_empty());
        // A removed file is put back.
        fs::remove_file(&path).unwrap();
        set.ensure_file().unwrap();
        assert_eq!(
            parse_state(&fs::read_to_string(&path).unwrap()),
            vec![id(&ha)]
        );
        // A new identity rewrites it with everything recorded so far.
        set.stop_all([&hb]).unwrap();
        let mut got = parse_state(&fs::read_to_string(&path).unwrap());
        got.sort();
        let mut want = vec![id(&ha), id(&hb)];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(set.release(), 2);
        assert!(wait_state(a.id(), 'S') && wait_state(b.id(), 'S'));
        for c in [&mut a, &mut b] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
