//! Helpers for the `allot cpu` / `allot adapt` end-to-end tests: busy workers pinned to
//! a CPU, an allot child, and readings taken from /proc by the test itself (never from
//! allot's own report). Every guard cleans up on drop, even when an assertion fails.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Serialises the timing-sensitive experiments within one test binary.
pub static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Takes the lock even if a previous holder panicked.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last CPU this process may run on (experiments are pinned to it).
pub fn experiment_cpu() -> usize {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("0")
        .trim()
        .to_string();
    let last = list.rsplit(',').next().unwrap_or("0");
    let last = last.rsplit('-').next().unwrap_or("0");
    last.trim().parse().unwrap_or(0)
}

/// Total CPU time of a process's threads, in ns, read by the test from schedstat.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The state letter of a process ('?' if gone).
pub fn state(pid: u32) -> char {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let close = t.rfind(')')?;
            t[close + 1..].split_whitespace().next()?.chars().next()
        })
        .unwrap_or('?')
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Busy (or scripted) worker processes; killed and reaped on drop, continued first so
/// none is left stopped.
pub struct Workers {
    pub children: Vec<Child>,
}

impl Workers {
    /// `n` busy loops pinned to `cpu`.
    pub fn busy(n: usize, cpu: usize) -> Workers {
        let mut w = Workers {
            children: Vec::new(),
        };
        for _ in 0..n {
            w.spawn_sh("while :; do :; done", cpu);
        }
        w
    }

    /// Adds one `sh -c script` pinned to `cpu`.
    pub fn spawn_sh(&mut self, script: &str, cpu: usize) -> u32 {
        self.spawn(&["sh", "-c", script], cpu)
    }

    /// Adds one command pinned to `cpu`.
    pub fn spawn(&mut self, argv: &[&str], cpu: usize) -> u32 {
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("taskset (util-linux) must be installed for these tests");
        let pid = child.id();
        self.children.push(child);
        // taskset execs the command, so the PID is the worker's.
        wait_for(Duration::from_secs(2), || {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() != "taskset")
                .unwrap_or(true)
        });
        pid
    }

    /// PIDs in spawn order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// CPU time of each worker, ns.
    pub fn cpu(&self) -> Vec<u64> {
        self.pids().into_iter().map(cpu_ns).collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let pid = c.id().to_string();
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `allot` binary; SIGKILLed and reaped on drop if still running.
pub struct Allot {
    pub child: Child,
}

impl Allot {
    /// Starts `allot ARGS…` with stdout piped.
    pub fn start(args: &[String]) -> Allot {
        let child = Command::new(env!("CARGO_BIN_EXE_allot"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the allot binary must start");
        Allot { child }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status();
    }

    /// Waits (bounded) for exit and returns (status code, stdout, stderr).
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = self.child.kill();
                    break;
                }
            }
        }
        let child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("`true` must start"),
        );
        let out = child.wait_with_output().expect("allot output");
        let _ = self.child.wait();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Allot {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("allot-{name}-{}", std::process::id()));
        let _ = fs::create_dir_all(&p);
        Scratch(p)
    }

    pub fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Per-cycle RMS relative errors from a `--report` CSV (cycle, principal, share,
/// consumed_ms, …), recomputed by the test from the consumed column; the first
/// `skip` cycles (start-up) are left out. Also returns each principal's total consumed.
pub fn report_rms(csv: &str, skip: u64) -> (Vec<f64>, std::collections::BTreeMap<String, f64>) {
    use std::collections::BTreeMap;
    let mut cycles: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 4 {
            continue;
        }
        let (Ok(cycle), Ok(share), Ok(consumed)) = (
            f[0].parse::<u64>(),
            f[2].parse::<f64>(),
            f[3].parse::<f64>(),
        ) else {
            continue;
        };
        *totals.entry(f[1].to_string()).or_default() += consumed;
        if cycle > skip {
            cycles.entry(cycle).or_default().push((share, consumed));
        }
    }
    let rms = cycles
        .values()
        .filter_map(|rows| {
            let s: f64 = rows.iter().map(|r| r.0).sum();
            let c: f64 = rows.iter().map(|r| r.1).sum();
            if c <= 0.0 {
                return None;
            }
            let sq: f64 = rows
                .iter()
                .map(|(share, consumed)| {
                    let e = share / s * c;
                    ((consumed - e) / e).powi(2)
                })
                .sum();
            Some((sq / rows.len() as f64).sqrt())
        })
        .collect();
    (rms, totals)
}

/// Mean of a slice (0 if empty).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}
