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

/// The parent PID of a process (0 if gone).
pub fn ppid(pid: u32) -> u32 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let close = t.rfind(')')?;
            t[close + 1..].split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Every live descendant of `root`, read from /proc.
pub fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &c in &all {
            if ppid(c) == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// The command line of a process, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// How a wrapped busy loop is started: under a program that stays its parent and may
/// stop itself when its child stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapper {
    /// util-linux `runuser -u root --`.
    Runuser,
    /// `su root -c`.
    Su,
    /// util-linux `setpriv` (it execs: no process in between).
    Setpriv,
    /// `sudo` (only where installed).
    Sudo,
    /// An interactive bash with job control on a pseudo-terminal (`script`), the loop
    /// its foreground job.
    JobShell,
}

impl Wrapper {
    /// The wrappers this machine can run (sudo only if present; all but setpriv need
    /// root to switch to root without a password).
    pub fn available() -> Vec<Wrapper> {
        let root = fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        let has = |tool: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut out = Vec::new();
        for (w, tool, needs_root) in [
            (Wrapper::Runuser, "runuser", true),
            (Wrapper::Su, "su", true),
            (Wrapper::Setpriv, "setpriv", false),
            (Wrapper::Sudo, "sudo", true),
            (Wrapper::JobShell, "script", false),
        ] {
            let extra = match w {
                Wrapper::JobShell => has("bash"),
                Wrapper::Runuser | Wrapper::Su => has("script"),
                _ => true,
            };
            if has(tool) && (root || !needs_root) && extra {
                out.push(w);
            } else {
                eprintln!("skipped {w:?}: {tool} missing or not root");
            }
        }
        out
    }
}

const BUSY: &str = "while :; do :; done";

/// A busy loop started under a [`Wrapper`], pinned to a CPU. Drop continues and kills
/// the whole tree.
pub struct Wrapped {
    /// The first process (the wrapper, or the loop itself for setpriv).
    pub top: Child,
    /// The busy loop: the member.
    pub member: u32,
    /// What it was started under.
    pub wrapper: Wrapper,
    stdin: Option<std::process::ChildStdin>,
}

impl Wrapped {
    /// Starts the loop under `wrapper` on `cpu`, and waits (bounded) for it to run.
    pub fn start(wrapper: Wrapper, cpu: usize) -> Wrapped {
        let cpu_s = cpu.to_string();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpu_s]);
        match wrapper {
            Wrapper::Runuser => {
                cmd.args(["runuser", "-u", "root", "--", "sh", "-c", BUSY]);
            }
            Wrapper::Su => {
                cmd.args([
                    "su",
                    "root",
                    "-s",
                    "/bin/sh",
                    "-c",
                    &format!("sh -c '{BUSY}'"),
                ]);
            }
            Wrapper::Setpriv => {
                cmd.args(["setpriv", "--reuid=0", "sh", "-c", BUSY]);
            }
            Wrapper::Sudo => {
                cmd.args(["sudo", "-n", "sh", "-c", &format!("sh -c '{BUSY}'; :")]);
            }
            Wrapper::JobShell => {
                cmd.env("SHELL", "/bin/sh").args([
                    "script",
                    "-qfec",
                    "bash --norc --noprofile -i",
                    "/dev/null",
                ]);
            }
        }
        let mut top = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the wrapper starts");
        let mut stdin = top.stdin.take();
        if wrapper == Wrapper::JobShell {
            use std::io::Write;
            std::thread::sleep(Duration::from_millis(300));
            if let Some(i) = stdin.as_mut() {
                let _ = writeln!(i, "sh -c '{BUSY}'");
                let _ = i.flush();
            }
        }
        let top_pid = top.id();
        let mut member = 0;
        wait_for(Duration::from_secs(5), || {
            let mut cands: Vec<u32> = descendants(top_pid);
            cands.push(top_pid);
            if let Some(&m) = cands
                .iter()
                .find(|p| cmdline(**p) == format!("sh -c {BUSY}") && descendants(**p).is_empty())
            {
                member = m;
                true
            } else {
                false
            }
        });
        assert!(member != 0, "{wrapper:?}: the busy loop never appeared");
        Wrapped {
            top,
            member,
            wrapper,
            stdin,
        }
    }

    /// Every process of the tree (wrapper, shells, the loop).
    pub fn tree(&self) -> Vec<u32> {
        let mut t = vec![self.top.id()];
        t.extend(descendants(self.top.id()));
        t
    }
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        let tree = self.tree();
        for p in &tree {
            let _ = Command::new("kill")
                .args(["-CONT", &p.to_string()])
                .status();
        }
        // The loop first (the wrapper then sees it end), then everything else.
        let _ = Command::new("kill")
            .args(["-KILL", &self.member.to_string()])
            .status();
        drop(self.stdin.take());
        for p in tree.iter().rev() {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        let _ = self.top.kill();
        let _ = self.top.wait();
    }
}

/// The processes among `pids` in state T (stopped), with their command lines.
pub fn stopped_among(pids: &[u32]) -> Vec<(u32, String)> {
    pids.iter()
        .filter(|p| state(**p) == 'T')
        .map(|p| (*p, cmdline(*p)))
        .collect()
}

/// Ends a running allot in one of the ways it can end: a signal (`TERM`, `INT`, `HUP`,
/// `QUIT`: exit 0), its standard output closed (`PIPE`: an error, exit 2), a forced error
/// (`error`: the state file's directory replaced by a plain file while members are
/// stopped, so the next record fails: exit 2), or `KILL` followed by `allot cpu resume`.
pub fn end_allot(mut allot: Allot, end: &str, state_dir: &std::path::Path, state_file: &str) {
    match end {
        "TERM" | "INT" | "HUP" | "QUIT" => {
            allot.signal(end);
            let (code, _, err) = allot.finish(Duration::from_secs(10));
            assert_eq!(code, Some(0), "after SIG{end}: {err}");
        }
        "PIPE" => {
            drop(allot.child.stdout.take());
            let (code, _, err) = allot.finish(Duration::from_secs(10));
            assert_eq!(
                code,
                Some(2),
                "a closed standard output must end the run: {err}"
            );
            assert!(err.contains("standard output"), "{err}");
        }
        "error" => {
            let _ = std::fs::remove_dir_all(state_dir);
            std::fs::write(state_dir, "not a directory").expect("replace the state directory");
            let (code, _, err) = allot.finish(Duration::from_secs(20));
            assert_eq!(code, Some(2), "expected the state-file error: {err}");
            assert!(err.contains("state"), "{err}");
        }
        "KILL" => {
            allot.signal("KILL");
            let _ = allot.finish(Duration::from_secs(10));
            assert!(
                std::path::Path::new(state_file).exists(),
                "no state file left behind"
            );
            let out = Command::new(env!("CARGO_BIN_EXE_allot"))
                .args(["cpu", "resume", "--state", state_file])
                .output()
                .expect("allot cpu resume runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        _ => unreachable!("unknown end {end}"),
    }
}
