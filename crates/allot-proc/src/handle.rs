//! One member process: its identity (PID + start time, and a pidfd where the kernel has
//! them), its tasks' `/proc` files kept open for cheap re-reads, and safe signalling.
//!
//! Never signal a non-member: a pidfd refers to one process for its whole life, so a
//! signal sent through it cannot reach a process that reused the PID. Without pidfds the
//! start time is checked again right before every signal.
//!
//! CPU time: where the process's CPU clock can be read (`clock_gettime` on its
//! `CPUCLOCK_SCHED` clock, which the kernel brings up to date for a task running at that
//! instant) and a pidfd is held, that is the reading: one call for every thread, live or
//! exited, to the nanosecond. The clock is named by the PID, so it could only ever read
//! another process if this one were reaped and its PID handed out again; the kernel hands
//! PIDs out in turn, so that takes every other PID being used first, and
//! [`ProcHandle::refresh_tasks`] (about once a second) asks the pidfd whether the process
//! exited. A reading is therefore one system call, not two. `schedstat` (what the other path reads) is only brought up to
//! date at a context switch or a scheduler tick, so a task running on another CPU reads up
//! to one tick (4 ms at 250 Hz) behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::error::ProcError;
use crate::procfs::{self, parse_schedstat, parse_schedstat_run_wait, parse_stat, ticks_to_ns};

/// One measurement of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// CPU time used since the handle was opened (monotone, nanoseconds).
    pub cpu_ns: u64,
    /// Tasks found runnable (state R).
    pub runnable: u32,
    /// Tasks found stopped (state T or t).
    pub stopped: u32,
    /// Live tasks.
    pub tasks: u32,
    /// Time the live tasks have waited on a run queue for a CPU, in nanoseconds
    /// (schedstat's second field; 0 where only `stat` is readable).
    pub wait_ns: u64,
}

impl Sample {
    /// Blocked: no task runnable and not merely stopped (ALPS section 4.3).
    pub fn blocked(&self) -> bool {
        self.runnable == 0 && self.stopped < self.tasks
    }
}

#[derive(Debug)]
struct Task {
    schedstat: Option<File>,
    stat: File,
    last_ns: u64,
}

/// An open member process.
#[derive(Debug)]
pub struct ProcHandle {
    pid: i32,
    start_time_ticks: u64,
    comm: String,
    pidfd: Option<OwnedFd>,
    tasks: BTreeMap<i32, Task>,
    /// CPU of tasks that exited since the handle was opened.
    dead_ns: u64,
    /// CPU of the live tasks when they were first seen (not ours to count).
    origin_ns: u64,
    /// The process CPU clock, its reading when opened and its last reading (ns), where
    /// it can be read and a pidfd is held (see the module comment).
    clock: Option<CpuClock>,
}

#[derive(Debug, Clone, Copy)]
struct CpuClock {
    id: nix::libc::clockid_t,
    origin_ns: u64,
    last_ns: u64,
}

/// The CPU clock of process `pid` (the kernel's `MAKE_PROCESS_CPUCLOCK(pid,
/// CPUCLOCK_SCHED)`): all its threads' time on a CPU.
fn process_cpu_clock(pid: i32) -> nix::libc::clockid_t {
    ((!pid) << 3) | 2
}

fn read_clock(id: nix::libc::clockid_t) -> Option<u64> {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a clock id and a valid out-pointer.
    let r = unsafe { nix::libc::clock_gettime(id, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Whether the process behind `fd` has exited (its pidfd is readable).
fn pidfd_exited(fd: &OwnedFd) -> bool {
    let mut p = nix::libc::pollfd {
        fd: fd.as_raw_fd(),
        events: nix::libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { nix::libc::poll(&mut p, 1, 0) };
    r != 0
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: Option<Signal>) -> Result<(), Errno> {
    let signo = sig.map_or(0, |s| s as i32);
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signo,
            std::ptr::null::<nix::libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn read_at(file: &File, buf: &mut [u8]) -> Option<usize> {
    match file.read_at(buf, 0) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

impl ProcHandle {
    /// Opens `pid`, which must still have start time `start_time_ticks` (from a
    /// snapshot). Fails with [`ProcError::Gone`] if it exited or the PID was reused.
    pub fn open(pid: i32, start_time_ticks: u64) -> Result<ProcHandle, ProcError> {
        let pidfd = pidfd_open(pid);
        // Checked after the pidfd is held: if it matches now, the pidfd is this process.
        let stat = procfs::read_stat(pid)?;
        if stat.start_time_ticks != start_time_ticks || matches!(stat.state, 'Z' | 'X') {
            return Err(ProcError::Gone { pid });
        }
        let mut h = ProcHandle {
            pid,
            start_time_ticks,
            comm: stat.comm,
            pidfd,
            tasks: BTreeMap::new(),
            dead_ns: 0,
            origin_ns: 0,
            clock: None,
        };
        h.refresh_tasks()?;
        h.origin_ns = h.tasks.values().map(|t| t.last_ns).sum();
        if h.pidfd.is_some() {
            let id = process_cpu_clock(pid);
            h.clock = read_clock(id).map(|ns| CpuClock {
                id,
                origin_ns: ns,
                last_ns: ns,
            });
        }
        Ok(h)
    }

    /// Opens `pid` as it is now.
    pub fn open_now(pid: i32) -> Result<ProcHandle, ProcError> {
        let stat = procfs::read_stat(pid)?;
        ProcHandle::open(pid, stat.start_time_ticks)
    }

    /// The PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The start time that, with the PID, identifies the process.
    pub fn start_time_ticks(&self) -> u64 {
        self.start_time_ticks
    }

    /// The command name when opened.
    pub fn comm(&self) -> &str {
        &self.comm
    }

    /// Number of live tasks last seen.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Re-lists the process's threads: opens new ones (their CPU until now is not
    /// counted), forgets exited ones (keeping the CPU they used). Fails with
    /// [`ProcError::Gone`] once the process has exited.
    pub fn refresh_tasks(&mut self) -> Result<(), ProcError> {
        if self.pidfd.as_ref().is_some_and(pidfd_exited) {
            return Err(ProcError::Gone { pid: self.pid });
        }
        let tids = procfs::task_ids(self.pid)?;
        let live: std::collections::BTreeSet<i32> = tids.iter().copied().collect();
        let gone: Vec<i32> = self
            .tasks
            .keys()
            .filter(|t| !live.contains(t))
            .copied()
            .collect();
        for tid in gone {
            if let Some(t) = self.tasks.remove(&tid) {
                self.dead_ns += t.last_ns;
            }
        }
        for tid in tids {
            if self.tasks.contains_key(&tid) {
                continue;
            }
            let base = format!("/proc/{}/task/{tid}", self.pid);
            let Ok(stat) = File::open(format!("{base}/stat")) else {
                continue;
            };
            let schedstat = File::open(format!("{base}/schedstat")).ok();
            let mut task = Task {
                schedstat,
                stat,
                last_ns: 0,
            };
            let mut buf = [0u8; 1024];
            task.last_ns = Self::task_cpu(&task, &mut buf).unwrap_or(0);
            // A thread that appears later: what it used before we saw it is not ours to
            // count, so it starts in the origin.
            self.origin_ns += task.last_ns;
            self.tasks.insert(tid, task);
        }
        if self.tasks.is_empty() {
            return Err(ProcError::Gone { pid: self.pid });
        }
        Ok(())
    }

    fn task_cpu(task: &Task, buf: &mut [u8]) -> Option<u64> {
        if let Some(f) = &task.schedstat {
            if let Some(n) = read_at(f, buf) {
                if let Some(ns) = std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(parse_schedstat)
                {
                    return Some(ns);
                }
            }
        }
        let n = read_at(&task.stat, buf)?;
        let s = parse_stat(std::str::from_utf8(&buf[..n]).ok()?)?;
        Some(ticks_to_ns(s.utime_ticks + s.stime_ticks))
    }

    /// Reads the process CPU clock (before the tasks' files, whose reads then show the
    /// process was still alive, so the PID the clock names was still this process).
    fn clock_now(&mut self) -> Option<u64> {
        let c = self.clock?;
        let ns = read_clock(c.id)?.max(c.last_ns);
        Some(ns)
    }

    /// CPU used since opened, from the process CPU clock alone (no `/proc` read) where it
    /// can be read (a zombie's is frozen at its total); a full [`ProcHandle::sample`]
    /// otherwise.
    pub fn cpu_now(&mut self) -> Result<u64, ProcError> {
        if let Some(ns) = self.clock_now() {
            if let Some(c) = self.clock.as_mut() {
                c.last_ns = ns;
                return Ok(ns - c.origin_ns);
            }
        }
        self.sample().map(|s| s.cpu_ns)
    }

    /// A cheaper [`ProcHandle::sample`] for the scheduler: if the process CPU clock says
    /// the process used at least `min_progress_ns` (more than zero) since the last
    /// reading, it was running, and its tasks' states are not read: every live task
    /// counts as runnable, none as stopped, and `wait_ns` is 0. Otherwise (or without the
    /// clock) a full sample.
    pub fn sample_cpu(&mut self, min_progress_ns: u64) -> Result<Sample, ProcError> {
        if min_progress_ns > 0 {
            if let (Some(ns), Some(c)) = (self.clock_now(), self.clock) {
                if ns - c.last_ns >= min_progress_ns {
                    if let Some(c) = self.clock.as_mut() {
                        c.last_ns = ns;
                    }
                    let tasks = self.tasks.len() as u32;
                    return Ok(Sample {
                        cpu_ns: ns - c.origin_ns,
                        runnable: tasks,
                        stopped: 0,
                        tasks,
                        wait_ns: 0,
                    });
                }
            }
        }
        self.sample()
    }

    /// Reads every task's CPU time and state through the open files.
    pub fn sample(&mut self) -> Result<Sample, ProcError> {
        let clock = self.clock_now();
        let mut buf = [0u8; 1024];
        let mut sample = Sample {
            cpu_ns: 0,
            runnable: 0,
            stopped: 0,
            tasks: 0,
            wait_ns: 0,
        };
        let mut exited = Vec::new();
        for (&tid, task) in self.tasks.iter_mut() {
            let state = read_at(&task.stat, &mut buf).and_then(|n| {
                let s = parse_stat(std::str::from_utf8(&buf[..n]).ok()?)?;
                Some((s.state, ticks_to_ns(s.utime_ticks + s.stime_ticks)))
            });
            let Some((state, stat_ns)) = state else {
                exited.push(tid);
                continue;
            };
            if matches!(state, 'Z' | 'X') {
                exited.push(tid);
                continue;
            }
            let (ns, wait_ns) = task
                .schedstat
                .as_ref()
                .and_then(|f| read_at(f, &mut buf))
                .and_then(|n| {
                    std::str::from_utf8(&buf[..n])
                        .ok()
                        .and_then(parse_schedstat_run_wait)
                })
                .unwrap_or((stat_ns, 0));
            sample.wait_ns += wait_ns;
            task.last_ns = task.last_ns.max(ns);
            sample.tasks += 1;
            match state {
                'R' => sample.runnable += 1,
                'T' | 't' => sample.stopped += 1,
                _ => {}
            }
        }
        for tid in exited {
            if let Some(t) = self.tasks.remove(&tid) {
                self.dead_ns += t.last_ns;
            }
        }
        if sample.tasks == 0 {
            return Err(ProcError::Gone { pid: self.pid });
        }
        match (clock, self.clock.as_mut()) {
            (Some(ns), Some(c)) => {
                c.last_ns = ns;
                sample.cpu_ns = ns - c.origin_ns;
            }
            _ => {
                let total = self.dead_ns + self.tasks.values().map(|t| t.last_ns).sum::<u64>();
                sample.cpu_ns = total.saturating_sub(self.origin_ns);
            }
        }
        Ok(sample)
    }

    /// CPU used since opened, from the last sample (no read).
    pub fn last_cpu_ns(&self) -> u64 {
        match self.clock {
            Some(c) => c.last_ns - c.origin_ns,
            None => (self.dead_ns + self.tasks.values().map(|t| t.last_ns).sum::<u64>())
                .saturating_sub(self.origin_ns),
        }
    }

    /// Sends `sig` (or checks we may, with `None`) to this process and no other.
    pub fn signal(&self, sig: Option<Signal>) -> Result<(), ProcError> {
        let result = match &self.pidfd {
            Some(fd) => pidfd_send_signal(fd, sig),
            None => {
                // No pidfd: make sure the PID still names our process right before.
                match procfs::read_stat(self.pid) {
                    Ok(s) if s.start_time_ticks == self.start_time_ticks => {
                        nix::sys::signal::kill(Pid::from_raw(self.pid), sig)
                    }
                    _ => Err(Errno::ESRCH),
                }
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(Errno::ESRCH) => Err(ProcError::Gone { pid: self.pid }),
            Err(Errno::EPERM) => Err(ProcError::NotPermitted {
                pid: self.pid,
                comm: self.comm.clone(),
                uid: procfs::uid_of(self.pid).unwrap_or(u32::MAX),
            }),
            Err(e) => Err(ProcError::Sys {
                what: format!("signal process {}", self.pid),
                source: e,
            }),
        }
    }

    /// Whether this handle uses a pidfd.
    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }
}

/// Sends `sig` to `pid` only if it still has start time `start_time_ticks`
/// (for recovery from a state file, where no handle exists).
pub fn signal_if_same(pid: i32, start_time_ticks: u64, sig: Signal) -> Result<(), ProcError> {
    let h = ProcHandle {
        pid,
        start_time_ticks,
        comm: String::new(),
        pidfd: pidfd_open(pid),
        tasks: BTreeMap::new(),
        dead_ns: 0,
        origin_ns: 0,
        clock: None,
    };
    // With a pidfd held, a matching start time means the pidfd is that process.
    match procfs::read_stat(pid) {
        Ok(s) if s.start_time_ticks == start_time_ticks && !matches!(s.state, 'Z' | 'X') => {
            h.signal(Some(sig))
        }
        _ => Err(ProcError::Gone { pid }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn samples_a_busy_child_and_refuses_a_stale_identity() {
        let mut child = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = procfs::read_stat(pid).unwrap().start_time_ticks;
        assert!(matches!(
            ProcHandle::open(pid, start + 1),
            Err(ProcError::Gone { .. })
        ));
        let mut h = ProcHandle::open(pid, start).unwrap();
        let t0 = std::time::Instant::now();
        let mut last = 0;
        while t0.elapsed() < std::time::Duration::from_millis(300) {
            let s = h.sample().unwrap();
            assert!(s.cpu_ns >= last);
            last = s.cpu_ns;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(last > 10_000_000, "busy child used only {last} ns");
        h.signal(Some(Signal::SIGSTOP)).unwrap();
        h.signal(Some(Signal::SIGCONT)).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(h.sample(), Err(ProcError::Gone { .. })));
        assert!(matches!(
            h.signal(Some(Signal::SIGCONT)),
            Err(ProcError::Gone { .. })
        ));
        assert!(signal_if_same(pid, start, Signal::SIGCONT).is_err());
    }
}
