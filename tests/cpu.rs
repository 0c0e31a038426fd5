//! End-to-end tests of `allot cpu`. Workers are busy `sh` loops pinned to one CPU; the
//! tests read their CPU time and state from /proc themselves. Other engineers' builds
//! share the machine, so shares are judged on what the members consumed relative to each
//! other, which is what ALPS promises.
//!
//! CI runs the behavioural checks, with bounds that hold while another CPU-bound process
//! shares the machine: shares roughly hold, nothing is left stopped, selectors pick what
//! they say, reports agree with /proc. The precision figures (per-cycle RMS error, allot's
//! own CPU, the largest group held under 10%) move with the machine's load: they are the
//! `#[ignore]`d `experiment_*` tests, run and printed by `bench/cpu.sh experiments`.

mod cpu_support;

use std::time::{Duration, Instant};

use cpu_support::*;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Runs allot over `pids` with `shares` for `secs`, measuring each worker's CPU from
/// /proc between `warm` seconds in and the end, and allot's own CPU over the run.
struct Measured {
    fractions: Vec<f64>,
    overhead: f64,
    rms: Vec<f64>,
    report_totals_ms: Vec<f64>,
    own_totals_ms: Vec<f64>,
    stdout: String,
    /// allot's "backend …" line from standard error.
    backend_line: String,
}

fn measure(
    workers: &Workers,
    shares: &[u64],
    quantum: &str,
    secs: u64,
    warm: u64,
    tag: &str,
) -> Measured {
    measure_with(
        workers,
        shares,
        &["--backend", "signals", "--quantum", quantum],
        secs,
        warm,
        tag,
    )
}

fn measure_with(
    workers: &Workers,
    shares: &[u64],
    flags: &[&str],
    secs: u64,
    warm: u64,
    tag: &str,
) -> Measured {
    let scratch = Scratch::new(tag);
    let report = scratch.file("cycles.csv");
    let mut a = args(&["cpu", "--report", &report, "--json"]);
    a.extend(args(flags));
    for (pid, s) in workers.pids().iter().zip(shares) {
        a.push("--pid".into());
        a.push(format!("{pid}:{s}"));
    }
    let start_cpu = workers.cpu();
    let allot = Allot::start(&a);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(warm));
    let warm_cpu = workers.cpu();
    let own0 = cpu_ns(allot.pid());
    let t_warm = Instant::now();
    std::thread::sleep(Duration::from_secs(secs.saturating_sub(warm)));
    let end_cpu = workers.cpu();
    let own1 = cpu_ns(allot.pid());
    let wall = t_warm.elapsed().as_nanos() as f64;
    let _ = t0;
    allot.signal("INT");
    let (code, stdout, stderr) = allot.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "allot failed: {stderr}");
    let backend_line = stderr
        .lines()
        .find(|l| l.starts_with("allot cpu: backend"))
        .unwrap_or_default()
        .to_string();
    let used: Vec<f64> = end_cpu
        .iter()
        .zip(&warm_cpu)
        .map(|(e, w)| (e - w) as f64)
        .collect();
    let total: f64 = used.iter().sum();
    let csv = std::fs::read_to_string(&report).unwrap_or_default();
    let (rms, totals) = report_rms(&csv, 4);
    let report_totals_ms = workers
        .pids()
        .iter()
        .map(|p| totals.get(&format!("pid:{p}")).copied().unwrap_or(0.0))
        .collect();
    let own_totals_ms = end_cpu
        .iter()
        .zip(&start_cpu)
        .map(|(e, s)| (e - s) as f64 / 1e6)
        .collect();
    Measured {
        fractions: used.iter().map(|u| u / total).collect(),
        overhead: own1.saturating_sub(own0) as f64 / wall,
        rms,
        report_totals_ms,
        own_totals_ms,
        stdout,
        backend_line,
    }
}

fn assert_fractions(got: &[f64], shares: &[u64], tolerance: f64, what: &str) {
    let total: u64 = shares.iter().sum();
    for (g, s) in got.iter().zip(shares) {
        let want = *s as f64 / total as f64;
        let rel = (g - want).abs() / want;
        assert!(
            rel <= tolerance,
            "{what}: share {s} got {:.4} want {want:.4} ({:.2}% off, allowed {:.1}%); all: {got:?}",
            g,
            rel * 100.0,
            tolerance * 100.0
        );
    }
}

/// Five busy processes on one CPU at 1:3:5:7:9, quantum 20 ms: each gets roughly its
/// share, the report's totals agree with what the test read from /proc, and `--json`
/// prints the summary.
#[test]
fn linear_five_on_one_cpu_roughly_meets_shares_and_reports_agree_with_proc() {
    let _x = exclusive();
    let cpu = experiment_cpu();
    let workers = Workers::busy(5, cpu);
    let shares = [1, 3, 5, 7, 9];
    let m = measure(&workers, &shares, "20ms", 10, 2, "a");
    eprintln!(
        "five at 1:3:5:7:9: cycles {} mean RMS {:.3}% fractions {:?} overhead {:.3}%",
        m.rms.len(),
        mean(&m.rms) * 100.0,
        m.fractions,
        m.overhead * 100.0
    );
    assert!(m.rms.len() >= 5, "too few cycles: {}", m.rms.len());
    // The report's per-principal totals must agree with what the test read itself (the
    // test's reading also spans start-up and shutdown, allot's does not: 50 ms slack).
    for (r, o) in m.report_totals_ms.iter().zip(&m.own_totals_ms) {
        assert!(
            (r - o).abs() <= 0.15 * o + 50.0,
            "report says {r} ms, /proc says {o} ms"
        );
    }
    assert_fractions(&m.fractions, &shares, 0.25, "long-run fractions");
    assert!(m.stdout.contains("\"mean_rms_rel_error\""), "{}", m.stdout);
    assert!(m.stdout.contains("\"target\":0.04"), "{}", m.stdout);
    assert!(
        m.backend_line.contains("backend signals"),
        "{}",
        m.backend_line
    );
}

/// Experiment: the same workload for 20 s, judged on precision — mean per-cycle RMS
/// error, long-run fractions within 2%, allot's own CPU.
#[test]
#[ignore = "experiment: precision moves with the machine's load; run by bench/cpu.sh"]
fn experiment_linear_five_precision() {
    let _x = exclusive();
    let cpu = experiment_cpu();
    let workers = Workers::busy(5, cpu);
    let shares = [1, 3, 5, 7, 9];
    let m = measure(&workers, &shares, "20ms", 20, 3, "xa");
    let mean_rms = mean(&m.rms);
    let total: u64 = shares.iter().sum();
    let worst = m
        .fractions
        .iter()
        .zip(&shares)
        .map(|(f, s)| {
            let want = *s as f64 / total as f64;
            (f - want).abs() / want
        })
        .fold(0.0, f64::max);
    println!(
        "experiment five 1:3:5:7:9 at 20 ms: cycles {} mean per-cycle RMS {:.2}% worst long-run {:.2}% overhead {:.3}%",
        m.rms.len(),
        mean_rms * 100.0,
        worst * 100.0,
        m.overhead * 100.0
    );
    assert!(
        mean_rms < 0.05,
        "mean per-cycle RMS {:.3}%",
        mean_rms * 100.0
    );
    assert_fractions(&m.fractions, &shares, 0.02, "long-run fractions");
    assert!(m.overhead < 0.01, "allot used {:.3}%", m.overhead * 100.0);
}

/// The ALPS paper's table 3: three allot instances at once on one CPU, each over its own
/// three processes, for `secs` (3 s warm-up); each group's internal split within
/// `tolerance` (relative).
fn three_instances(secs: u64, tolerance: f64) {
    let _x = exclusive();
    let cpu = experiment_cpu();
    let groups: [[u64; 3]; 3] = [[7, 8, 9], [4, 5, 6], [1, 2, 3]];
    let workers: Vec<Workers> = groups.iter().map(|_| Workers::busy(3, cpu)).collect();
    let mut allots = Vec::new();
    for (w, shares) in workers.iter().zip(&groups) {
        let mut a = args(&["cpu", "--backend", "signals", "--quantum", "20ms"]);
        for (pid, s) in w.pids().iter().zip(shares) {
            a.push("--pid".into());
            a.push(format!("{pid}:{s}"));
        }
        allots.push(Allot::start(&a));
    }
    std::thread::sleep(Duration::from_secs(3));
    let before: Vec<Vec<u64>> = workers.iter().map(|w| w.cpu()).collect();
    std::thread::sleep(Duration::from_secs(secs));
    let after: Vec<Vec<u64>> = workers.iter().map(|w| w.cpu()).collect();
    for a in allots {
        a.signal("TERM");
        let (code, _, err) = a.finish(Duration::from_secs(10));
        assert_eq!(code, Some(0), "{err}");
    }
    for ((b, a), shares) in before.iter().zip(&after).zip(&groups) {
        let used: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x - y) as f64).collect();
        let total: f64 = used.iter().sum();
        let fr: Vec<f64> = used.iter().map(|u| u / total).collect();
        eprintln!("b: group {shares:?} fractions {fr:?}");
        assert_fractions(&fr, shares, tolerance, &format!("group {shares:?}"));
    }
}

#[test]
fn three_instances_each_keep_their_groups_internal_shares() {
    three_instances(10, 0.15);
}

/// Experiment: the same for 20 s, within 3%.
#[test]
#[ignore = "experiment: precision moves with the machine's load; run by bench/cpu.sh"]
fn experiment_three_instances_within_three_percent() {
    three_instances(20, 0.03);
}

/// Shares 1, 2, 3; the 2-share member is busy for 1 s, then sleeps for 1 s, and says so
/// on its standard output. While it sleeps the others split 1:3 (within `tolerance`,
/// relative), and the cycle does not wait for it: the two are both stopped in less than
/// `max_stall` of the samples.
fn sleeping_member(secs: u64, tolerance: f64, max_stall: f64) {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};
    let _x = exclusive();
    let cpu = experiment_cpu();
    let mut w = Workers::busy(2, cpu);
    let pids = w.pids();
    let (a_pid, c_pid) = (pids[0], pids[1]);
    let sleeper_child = std::process::Command::new("taskset")
        .args(["-c", &cpu.to_string(), "perl", "-e"])
        .arg("use Time::HiRes qw(time sleep); $|=1; while (1) { my $e = time + 1.0; 1 while time < $e; print \"s\\n\"; sleep 1.0; print \"w\\n\"; }")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("taskset and perl are needed");
    w.children.push(sleeper_child);
    let sleeper = w.children[2].id();
    let stdout = w.children[2].stdout.take().expect("piped");
    let phases: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let p2 = phases.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            p2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Instant::now(), line.trim() == "s"));
        }
    });
    let allot = Allot::start(&args(&[
        "cpu",
        "--backend",
        "signals",
        "--quantum",
        "20ms",
        "--pid",
        &format!("{a_pid}:1"),
        "--pid",
        &format!("{sleeper}:2"),
        "--pid",
        &format!("{c_pid}:3"),
    ]));
    std::thread::sleep(Duration::from_secs(2));
    // (time, cpu of A, cpu of C, both stopped)
    let mut samples: Vec<(Instant, u64, u64, bool)> = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        samples.push((
            Instant::now(),
            cpu_ns(a_pid),
            cpu_ns(c_pid),
            state(a_pid) == 'T' && state(c_pid) == 'T',
        ));
        std::thread::sleep(Duration::from_millis(10));
    }
    allot.signal("INT");
    let (code, _, err) = allot.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    // Sleep windows, from 100 ms after the sleeper says it sleeps until it says it woke.
    let ph = phases.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let windows: Vec<(Instant, Instant)> = ph
        .windows(2)
        .filter(|p| p[0].1 && !p[1].1)
        .map(|p| (p[0].0 + Duration::from_millis(100), p[1].0))
        .collect();
    let (mut da, mut dc, mut inside, mut stalled) = (0u64, 0u64, 0u32, 0u32);
    for pair in samples.windows(2) {
        let (t1, a1, c1, _) = pair[0];
        let (t2, a2, c2, both) = pair[1];
        if windows.iter().any(|(s, e)| t1 >= *s && t2 <= *e) {
            da += a2 - a1;
            dc += c2 - c1;
            inside += 1;
            stalled += u32::from(both);
        }
    }
    let split = da as f64 / (da + dc).max(1) as f64;
    let stall = f64::from(stalled) / f64::from(inside.max(1));
    eprintln!(
        "c: {} sleep windows, {inside} samples: the 1-share got {split:.4} of the others' CPU; both stopped in {:.2}% of samples",
        windows.len(),
        stall * 100.0
    );
    assert!(
        windows.len() as u64 >= secs / 4,
        "the sleeper slept only {} times",
        windows.len()
    );
    assert!(
        (split - 0.25).abs() / 0.25 <= tolerance,
        "split {split:.4}, want 0.25 ± {:.0}%",
        tolerance * 100.0
    );
    assert!(
        stall < max_stall,
        "both runnable members stopped in {:.1}% of samples",
        stall * 100.0
    );
}

#[test]
fn a_sleeping_member_neither_skews_the_others_nor_stalls_the_cycle() {
    sleeping_member(12, 0.2, 0.15);
}

/// Experiment: the same for 18 s, split within 5%, stalled in under 5% of samples.
#[test]
#[ignore = "experiment: precision moves with the machine's load; run by bench/cpu.sh"]
fn experiment_sleeping_member_split_within_five_percent() {
    sleeping_member(18, 0.05, 0.05);
}

/// Many equal-share processes: `n` at quantum `quantum` for `secs`; returns the mean
/// per-cycle RMS error and the number of cycles, and checks every member made progress.
fn equal_group(n: usize, quantum: &str, secs: u64, warm: u64) -> (f64, usize, f64) {
    let cpu = experiment_cpu();
    let workers = Workers::busy(n, cpu);
    let shares = vec![1u64; n];
    let before = workers.cpu();
    let m = measure(&workers, &shares, quantum, secs, warm, &format!("eq{n}"));
    let after = workers.cpu();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a > b, "member {i} of {n} made no progress");
    }
    (mean(&m.rms), m.rms.len(), m.overhead)
}

/// Twenty equal-share processes at 20 ms: every one runs, cycles complete, and the
/// per-cycle error stays far from losing control (a generous bound; the 10% figure is
/// an experiment).
#[test]
fn twenty_equal_processes_all_progress_in_complete_cycles() {
    let _x = exclusive();
    let (rms, cycles, overhead) = equal_group(20, "20ms", 12, 3);
    eprintln!(
        "20 processes: {cycles} cycles, mean RMS {:.2}%, overhead {:.2}%",
        rms * 100.0,
        overhead * 100.0
    );
    assert!(cycles >= 4, "too few cycles: {cycles}");
    assert!(
        rms < 0.4,
        "mean per-cycle RMS relative error {:.2}%",
        rms * 100.0
    );
}

/// Experiment: 50 equal-share processes at 20 ms stay under 10% RMS.
#[test]
#[ignore = "experiment: precision moves with the machine's load; run by bench/cpu.sh"]
fn experiment_fifty_equal_processes_under_ten_percent() {
    let _x = exclusive();
    let (rms, cycles, overhead) = equal_group(50, "20ms", 24, 4);
    println!(
        "experiment 50 equal at 20 ms: {cycles} cycles, mean per-cycle RMS {:.2}%, overhead {:.2}%",
        rms * 100.0,
        overhead * 100.0
    );
    assert!(cycles >= 4, "too few cycles: {cycles}");
    assert!(
        rms < 0.10,
        "mean per-cycle RMS relative error {:.2}%",
        rms * 100.0
    );
}

fn any_stopped(pids: &[u32]) -> bool {
    pids.iter().any(|p| state(*p) == 'T')
}

/// Runs `allot cpu` over `members` (PID, shares) until one of them is stopped, ends it by
/// `end`, and asserts that none of `watch` is left stopped.
fn safety_run(end: &str, members: &[(u32, u64)], watch: &[u32], what: &str) {
    let scratch = Scratch::new(&format!("e-{end}-{}", members[0].0));
    let state_dir = scratch.0.join("state");
    let state_file = state_dir.join("cpu.state").display().to_string();
    let mut a = args(&[
        "cpu",
        "--backend",
        "signals",
        "--quantum",
        "20ms",
        "--state",
        &state_file,
    ]);
    for (pid, s) in members {
        a.push("--pid".into());
        a.push(format!("{pid}:{s}"));
    }
    let pids: Vec<u32> = members.iter().map(|m| m.0).collect();
    let allot = Allot::start(&a);
    assert!(
        wait_for(Duration::from_secs(10), || any_stopped(&pids)),
        "{what}: allot never stopped a member"
    );
    // Let a wrapper see its child stop and stop itself.
    std::thread::sleep(Duration::from_millis(300));
    end_allot(allot, end, &state_dir, &state_file);
    let clean = wait_for(Duration::from_secs(2), || stopped_among(watch).is_empty());
    assert!(
        clean,
        "{what}, after {end}: left stopped: {:?}",
        stopped_among(watch)
    );
}

const ENDS: [&str; 7] = ["TERM", "INT", "HUP", "QUIT", "PIPE", "error", "KILL"];

/// Whatever ends allot — SIGTERM, SIGINT, SIGHUP, SIGQUIT, a closed standard output, an
/// error, SIGKILL followed by `allot cpu resume` — no member is left stopped.
#[test]
fn no_member_is_left_stopped_whatever_ends_allot() {
    let cpu = experiment_cpu();
    for end in ENDS {
        let workers = Workers::busy(3, cpu);
        let pids = workers.pids();
        let members: Vec<(u32, u64)> = pids.iter().copied().zip([1, 1, 20]).collect();
        safety_run(end, &members, &pids, "plain members");
    }
}

/// A member started under a wrapper that stops itself when its child stops (runuser,
/// su, sudo where present), exec'd by setpriv, or a job-control shell's foreground job:
/// whatever ends allot, no process of the wrapper's tree (or the other member) that was
/// running before is left stopped.
#[test]
fn no_wrapper_or_shell_is_left_stopped() {
    let cpu = experiment_cpu();
    for wrapper in Wrapper::available() {
        for end in ["TERM", "INT", "HUP", "error", "KILL"] {
            let w = Wrapped::start(wrapper, cpu);
            let workers = Workers::busy(1, cpu);
            let mut watch = w.tree();
            assert!(
                stopped_among(&watch).is_empty(),
                "{wrapper:?} tree stopped before allot started"
            );
            watch.extend(workers.pids());
            let members = [(w.member, 1), (workers.pids()[0], 20)];
            safety_run(end, &members, &watch, &format!("{wrapper:?}"));
        }
    }
}

/// A non-member that was already stopped before allot started (someone else's stop) is
/// left stopped; the member under it is continued as usual.
#[test]
fn a_wrapper_stopped_before_allot_started_is_left_stopped() {
    if !Wrapper::available().contains(&Wrapper::Runuser) {
        eprintln!("skipped: needs runuser as root");
        return;
    }
    let cpu = experiment_cpu();
    let w = Wrapped::start(Wrapper::Runuser, cpu);
    let wrapper_pid = w.top.id();
    assert_ne!(wrapper_pid, w.member);
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &wrapper_pid.to_string()])
        .status();
    assert!(wait_for(Duration::from_secs(2), || state(wrapper_pid) == 'T'));
    let workers = Workers::busy(1, cpu);
    let members = [(w.member, 1), (workers.pids()[0], 20)];
    let watch = [w.member, workers.pids()[0]];
    for end in ["TERM", "KILL"] {
        safety_run(end, &members, &watch, "member under a stopped runuser");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            state(wrapper_pid),
            'T',
            "after {end}: allot continued a process someone else had stopped"
        );
    }
}

/// A member that exits is dropped and allot carries on.
#[test]
fn an_exited_member_is_dropped() {
    let cpu = experiment_cpu();
    let mut workers = Workers::busy(3, cpu);
    let pids = workers.pids();
    let mut a = args(&[
        "cpu",
        "--backend",
        "signals",
        "--quantum",
        "20ms",
        "--duration",
        "4s",
        "--json",
    ]);
    for pid in &pids {
        a.push("--pid".into());
        a.push(format!("{pid}:1"));
    }
    let allot = Allot::start(&a);
    std::thread::sleep(Duration::from_millis(1500));
    let victim = &mut workers.children[0];
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &victim.id().to_string()])
        .status();
    victim.kill().expect("kill a worker");
    victim.wait().expect("reap it");
    let before: Vec<u64> = pids[1..].iter().map(|p| cpu_ns(*p)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let after: Vec<u64> = pids[1..].iter().map(|p| cpu_ns(*p)).collect();
    let (code, out, err) = allot.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "allot failed after a member exited: {err}");
    assert!(out.contains("\"cycles\""), "{out}");
    for (b, a) in before.iter().zip(&after) {
        assert!(a > b, "a remaining member made no progress after the exit");
    }
    assert!(!any_stopped(&pids[1..]));
}

/// A PID that now names a non-member (start time differs) is not signalled
/// by `allot cpu resume`.
#[test]
fn a_reused_pid_is_not_signalled() {
    let cpu = experiment_cpu();
    let workers = Workers::busy(1, cpu);
    let pid = workers.pids()[0];
    let scratch = Scratch::new("e-reuse");
    let state_file = scratch.file("cpu.state");
    // The state file names this PID with another start time: a process that no longer
    // exists, whose PID the worker (a non-member) now holds.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("worker stat");
    let start: u64 = stat[stat.rfind(')').expect("stat line") + 1..]
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .expect("start time field");
    std::fs::write(
        &state_file,
        format!("# allot stopped set v1\n{pid} {}\n", start + 1),
    )
    .expect("write state");
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
    assert!(wait_for(Duration::from_secs(2), || state(pid) == 'T'));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["cpu", "resume", "--state", &state_file])
        .output()
        .expect("allot cpu resume runs");
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        state(pid),
        'T',
        "resume continued a process that was not its member"
    );
}

/// A process allot may not signal is refused at start with a clear error. Needs a
/// process owned by someone else: when the tests run as root, allot is run as `nobody`
/// (util-linux `setpriv`) against a root-owned worker; otherwise that half is skipped.
#[test]
fn refuses_what_it_may_not_signal_and_bad_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["cpu", "--pid", "999999999:1", "--duration", "1s"])
        .output()
        .expect("allot runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("999999999"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["cpu", "--pid", "12:0"])
        .output()
        .expect("allot runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pid") && err.contains(">= 1"), "{err}");

    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok();
    if !(root && setpriv) {
        eprintln!(
            "skipped the permission half: needs root and setpriv to run allot as another user"
        );
        return;
    }
    let workers = Workers::busy(1, experiment_cpu());
    let pid = workers.pids()[0];
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_allot"),
        ])
        .args(["cpu", "--pid", &format!("{pid}:1"), "--duration", "2s"])
        .output()
        .expect("setpriv runs");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && !err.contains("allot:") {
        eprintln!("skipped the permission half: nobody cannot execute the test binary: {err}");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not permitted") && err.contains(&pid.to_string()),
        "{err}"
    );
    assert_ne!(state(pid), 'T');
}

/// PIDs whose parent is `ppid`, read from /proc by the test.
fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let parent = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if parent == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// A `--tree` principal counts all its processes together: a tree of two busy children
/// against one busy process at 1:1 gets half the CPU, not two thirds.
#[test]
fn a_tree_principal_counts_its_processes_together() {
    let _x = exclusive();
    let cpu = experiment_cpu();
    let mut w = Workers::busy(1, cpu);
    let root = w.spawn_sh(
        "sh -c 'while :; do :; done' & sh -c 'while :; do :; done' & wait",
        cpu,
    );
    assert!(wait_for(Duration::from_secs(2), || children_of(root).len() == 2));
    let kids = children_of(root);
    let single = w.pids()[0];
    let allot = Allot::start(&args(&[
        "cpu",
        "--backend",
        "signals",
        "--tree",
        &format!("{root}:1"),
        "--pid",
        &format!("{single}:1"),
    ]));
    std::thread::sleep(Duration::from_secs(2));
    let tree = |k: &[u32]| k.iter().map(|p| cpu_ns(*p)).sum::<u64>();
    let (t0, s0) = (tree(&kids), cpu_ns(single));
    std::thread::sleep(Duration::from_secs(8));
    let (t1, s1) = (tree(&kids), cpu_ns(single));
    allot.signal("TERM");
    let (code, _, err) = allot.finish(Duration::from_secs(10));
    // The children are not the test's: kill them (continued first) before asserting.
    for k in &kids {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &k.to_string()])
            .status();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &k.to_string()])
            .status();
    }
    assert_eq!(code, Some(0), "{err}");
    let f = (t1 - t0) as f64 / ((t1 - t0) + (s1 - s0)) as f64;
    eprintln!("tree of two got {f:.3} against one process at 1:1");
    assert!((f - 0.5).abs() < 0.12, "tree fraction {f:.3}, want 0.5");
}

/// The cpu cgroup hierarchy this process is in, and whether allot could use it here
/// (the test runs as root on a machine with a cpu controller, or skips).
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.splitn(3, ':').collect();
            f.len() == 3 && (f[1].split(',').any(|c| c == "cpu") || f[1].is_empty())
        })
        .unwrap_or_default()
        .to_string()
}

fn cgroup_usable() -> bool {
    let probe = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args([
            "cpu",
            "--backend",
            "cgroup",
            "--pid",
            &format!("{}:1", std::process::id()),
            "--duration",
            "1ms",
        ])
        .output();
    let err = probe
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    // allot refuses its own ancestors; anything but "cgroup not usable" means it could.
    !err.contains("--backend cgroup:")
}

/// `--backend auto` picks the kernel's cgroups where it may (and says so): five busy
/// processes at 1:3:5:7:9 roughly hold their shares, and every one is back in its own
/// cgroup afterwards, with allot's groups removed.
#[test]
fn auto_picks_cgroups_where_allowed_and_moves_everything_back() {
    if !cgroup_usable() {
        eprintln!("skipped: no cpu cgroup controller this user may write");
        return;
    }
    let _x = exclusive();
    let cpu = experiment_cpu();
    let workers = Workers::busy(5, cpu);
    let before: Vec<String> = workers.pids().iter().map(|p| cgroup_of(*p)).collect();
    let shares = [1, 3, 5, 7, 9];
    let m = measure_with(&workers, &shares, &["--backend", "auto"], 8, 2, "cg");
    eprintln!(
        "cgroup five: fractions {:?}, {}",
        m.fractions, m.backend_line
    );
    assert!(
        m.backend_line.contains("backend cgroup"),
        "{}",
        m.backend_line
    );
    assert!(m.stdout.contains("\"backend\":\"cgroup"), "{}", m.stdout);
    assert_fractions(&m.fractions, &shares, 0.10, "cgroup long-run fractions");
    let after: Vec<String> = workers.pids().iter().map(|p| cgroup_of(*p)).collect();
    assert_eq!(before, after, "members not moved back");
    assert!(!after.iter().any(|c| c.contains("allot-")), "{after:?}");
    // After SIGKILL the groups stay; resume moves their processes out and removes them.
    let a = Allot::start(&args(&[
        "cpu",
        "--backend",
        "cgroup",
        "--pid",
        &format!("{}:1", workers.pids()[0]),
        "--pid",
        &format!("{}:2", workers.pids()[1]),
    ]));
    assert!(wait_for(Duration::from_secs(5), || cgroup_of(
        workers.pids()[0]
    )
    .contains("allot-")));
    a.signal("KILL");
    let _ = a.finish(Duration::from_secs(5));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["cpu", "resume"])
        .output()
        .expect("resume runs");
    assert!(out.status.success());
    assert!(
        !cgroup_of(workers.pids()[0]).contains("allot-"),
        "resume left a member in a dead allot's group: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Experiment: the cgroup back end holds 1:3:5:7:9 within 1% long-run over 20 s.
#[test]
#[ignore = "experiment: precision moves with the machine's load; run by bench/cpu.sh"]
fn experiment_cgroup_five_within_one_percent() {
    if !cgroup_usable() {
        println!("experiment cgroup five: skipped (no usable cpu cgroup)");
        return;
    }
    let _x = exclusive();
    let workers = Workers::busy(5, experiment_cpu());
    let shares = [1, 3, 5, 7, 9];
    let m = measure_with(&workers, &shares, &["--backend", "cgroup"], 20, 3, "xcg");
    println!(
        "experiment cgroup five 1:3:5:7:9: fractions {:?}, per-cycle RMS {:.2}%, overhead {:.3}%",
        m.fractions,
        mean(&m.rms) * 100.0,
        m.overhead * 100.0
    );
    assert_fractions(&m.fractions, &shares, 0.01, "cgroup long-run fractions");
}

/// CPU each worker used per second of wall time over `secs`.
fn cpu_rates(workers: &Workers, secs: u64) -> Vec<f64> {
    let c0 = workers.cpu();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let c1 = workers.cpu();
    let wall = t0.elapsed().as_nanos() as f64;
    c1.iter()
        .zip(&c0)
        .map(|(b, a)| (b - a) as f64 / wall)
        .collect()
}

/// `--work-conserving`: two members at 1:3, each pinned to its own CPU, both run: the
/// 1-share one gets far more than the third of the other's time plain ALPS leaves it.
#[test]
fn work_conserving_lets_members_use_idle_cpus() {
    let last = experiment_cpu();
    if last == 0 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let _x = exclusive();
    let mut w = Workers {
        children: Vec::new(),
    };
    w.spawn_sh("while :; do :; done", 0);
    w.spawn_sh("while :; do :; done", last);
    let pids = w.pids();
    let allot = Allot::start(&args(&[
        "cpu",
        "--backend",
        "signals",
        "--work-conserving",
        "--pid",
        &format!("{}:1", pids[0]),
        "--pid",
        &format!("{}:3", pids[1]),
    ]));
    std::thread::sleep(Duration::from_secs(2));
    let rates = cpu_rates(&w, 6);
    allot.signal("TERM");
    let (code, out, err) = allot.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    eprintln!("work-conserving 1:3 on two CPUs: CPUs used {rates:?}; {out}");
    assert!(
        rates[0] > 0.3 && rates[1] > 0.3,
        "each should get most of a CPU: {rates:?}"
    );
    assert!(
        rates[0] / rates[1] > 0.6,
        "the 1-share member was held back: {rates:?}"
    );
    assert!(!any_stopped(&pids));
}

/// Experiment: with `--work-conserving` on one CPU (nothing idle), 1:3 still splits
/// within 2%.
#[test]
#[ignore = "experiment: precision moves with the machine's load; run by bench/cpu.sh"]
fn experiment_work_conserving_on_one_cpu_splits_within_two_percent() {
    let _x = exclusive();
    let workers = Workers::busy(2, experiment_cpu());
    let shares = [1, 3];
    let m = measure_with(
        &workers,
        &shares,
        &["--backend", "signals", "--work-conserving"],
        20,
        3,
        "xwc",
    );
    println!(
        "experiment work-conserving 1:3 on one CPU: fractions {:?}, per-cycle RMS {:.2}%",
        m.fractions,
        mean(&m.rms) * 100.0
    );
    assert_fractions(&m.fractions, &shares, 0.02, "work-conserving on one CPU");
}
