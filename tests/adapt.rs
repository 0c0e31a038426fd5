//! End-to-end tests of `allot adapt`. Everything is pinned to one CPU, "the machine" of the experiment. The slowdown is measured by the test's own probe
//! process (a fixed loop, timed, five times a second), against its own unloaded
//! baseline; running members are counted from /proc states, not from allot's report.

mod cpu_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpu_support::*;

/// The test's own probe: a perl loop of fixed work, timed, printed, every 200 ms.
struct Probe {
    _child: Workers,
    samples: Arc<Mutex<Vec<(Instant, f64)>>>,
}

impl Probe {
    fn start(cpu: usize) -> Probe {
        let child = Command::new("taskset")
            .args(["-c", &cpu.to_string(), "perl", "-e"])
            .arg("use Time::HiRes qw(time sleep); $|=1; while (1) { my $t = time; my $x = 0; $x += $_ for 1..200000; printf \"%.6f\\n\", time - $t; sleep 0.2 }")
            .stdout(Stdio::piped())
            .spawn()
            .expect("taskset and perl are needed");
        let mut w = Workers {
            children: vec![child],
        };
        let stdout = w.children[0].stdout.take().expect("piped stdout");
        let samples = Arc::new(Mutex::new(Vec::new()));
        let s2 = samples.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = line.trim().parse::<f64>() {
                    s2.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), v));
                }
            }
        });
        Probe { _child: w, samples }
    }

    fn since(&self, t: Instant) -> Vec<f64> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, v)| *v)
            .collect()
    }
}

fn adapt_args(pids: &[u32], initial: &str, period: &str, threshold: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "adapt",
        "--period",
        period,
        "--window",
        "20s",
        "-H",
        threshold,
        "--samples",
        "2",
        "--initial",
        initial,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for p in pids {
        a.push("--pid".into());
        a.push(p.to_string());
    }
    a
}

fn pinned_allot(cpu: usize, args: &[String]) -> Allot {
    let mut a = vec![
        "-c".to_string(),
        cpu.to_string(),
        env!("CARGO_BIN_EXE_allot").to_string(),
    ];
    a.extend(args.iter().cloned());
    let child = Command::new("taskset")
        .args(&a)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("taskset runs allot");
    Allot { child }
}

/// Eight CPU-bound workers, built-in probe, H = 2.5, measured over `secs` after 10 s of
/// settling: the test probe's mean slowdown within `max_slowdown`, the workers keep at
/// least `min_share` of the CPU, none is left stopped.
fn holds_slowdown(secs: u64, max_slowdown: f64, min_share: f64) {
    let _x = exclusive();
    let cpu = experiment_cpu();
    let probe = Probe::start(cpu);
    std::thread::sleep(Duration::from_secs(2));
    let base = probe.since(Instant::now() - Duration::from_secs(3));
    // Slowdown is the probe's mean time under load over its mean time alone; the minimum of
    // the quiet samples would count the probe's own jitter as slowdown.
    assert!(!base.is_empty(), "the test probe produced no samples");
    let baseline = mean(&base);

    let workers = Workers::busy(8, cpu);
    let allot = pinned_allot(cpu, &adapt_args(&workers.pids(), "10", "1s", "2.5"));
    std::thread::sleep(Duration::from_secs(10));
    let settled = Instant::now();
    let cpu0: u64 = workers.cpu().iter().sum();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu1: u64 = workers.cpu().iter().sum();
    let wall = settled.elapsed().as_nanos() as f64;
    allot.signal("TERM");
    let (code, out, err) = allot.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    let samples = probe.since(settled);
    let slowdown = mean(&samples) / baseline;
    let share = (cpu1 - cpu0) as f64 / wall;
    eprintln!(
        "f: probe slowdown {slowdown:.2} (baseline {:.2} ms, {} samples), workers' CPU share {:.1}%",
        baseline * 1e3,
        samples.len(),
        share * 100.0
    );
    eprintln!(
        "{}",
        out.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(samples.len() as u64 > secs * 2);
    // The summary names the built-in probe's unloaded time (its CPU time per run).
    assert!(
        out.contains("(unloaded ") && !out.contains("(unloaded 0.00ms)"),
        "{out}"
    );
    // Only the ceiling is behaviour: on a shared machine the quiet baseline can itself be
    // slowed by another process, so the ratio may fall below 1.
    assert!(
        slowdown > 0.0 && slowdown <= max_slowdown,
        "mean probe slowdown {slowdown:.2} outside (0, {max_slowdown}]"
    );
    assert!(
        share >= min_share,
        "workers kept only {:.1}% of the CPU",
        share * 100.0
    );
    assert!(
        !workers.pids().iter().any(|p| state(*p) == 'T'),
        "members left stopped"
    );
}

/// Without allot the eight workers would slow the probe about ninefold; with it the
/// slowdown stays well below that and the workers still progress. (Generous bounds: on
/// a machine where another CPU-bound process shares the CPU, that process alone counts
/// as slowdown and allot leaves the workers little.)
#[test]
fn adapt_holds_slowdown_down_while_workers_keep_the_cpu() {
    holds_slowdown(12, 6.0, 0.02);
}

/// Experiment: over 20 s the probe's slowdown stays within [1, 3.5] and the workers keep
/// at least half the CPU.
#[test]
#[ignore = "experiment: slowdown and share move with the machine's load; run by bench/cpu.sh"]
fn experiment_adapt_slowdown_within_threshold_and_half_the_cpu() {
    holds_slowdown(20, 3.5, 0.5);
}

/// Two groups of 16 workers, started at L = 2 and L = 12, converge to mean limits within
/// `tolerance` of each other over `secs`. On one CPU, H = 2.5 would hold the
/// two groups to about one running member together, deep in rate control; H = 6 keeps
/// them in MPL control, where the limits are what is compared, and `--min-duty 1` keeps
/// the group that the other's start pushes down from dropping into rate control, whose
/// additive step (0.1 of a period) is not comparable with MPL's (one member).
///
/// The slowdown comes from the members' own run-queue wait (`--sensor run-queue-wait`):
/// with the built-in probe, 60 s means ended 9–30% apart over five runs, which group led
/// switching every 10–20 s; with the run-queue wait, seven runs ended 2–18% apart. The
/// probe sees a few of its own scheduling rounds per period, the run-queue wait every
/// round of every running member.
fn two_groups(secs: u64, tolerance: f64) {
    let _x = exclusive();
    let cpu = experiment_cpu();
    let a = Workers::busy(16, cpu);
    let b = Workers::busy(16, cpu);
    // Both groups start from rest, so both allots time their unloaded reference on the
    // same idle CPU (each stops only its own group while it does).
    for p in a.pids().iter().chain(b.pids().iter()) {
        let _ = Command::new("kill")
            .args(["-STOP", &p.to_string()])
            .status();
    }
    let with_floor = |mut v: Vec<String>| {
        v.extend(
            ["--min-duty", "1", "--sensor", "run-queue-wait"]
                .iter()
                .map(|s| s.to_string()),
        );
        v
    };
    let allot_a = pinned_allot(cpu, &with_floor(adapt_args(&a.pids(), "2", "500ms", "6")));
    let allot_b = pinned_allot(cpu, &with_floor(adapt_args(&b.pids(), "12", "500ms", "6")));
    std::thread::sleep(Duration::from_secs(10));
    // Count running (not stopped) members of each group, 20 times a second.
    let running = |w: &Workers| w.pids().iter().filter(|p| state(**p) != 'T').count() as f64;
    let (mut sa, mut sb, mut n) = (0.0, 0.0, 0.0);
    let t0 = Instant::now();
    // Which group leads switches every 10–20 s; a long average is what AIMD makes fair.
    while t0.elapsed() < Duration::from_secs(secs) {
        sa += running(&a);
        sb += running(&b);
        n += 1.0;
        std::thread::sleep(Duration::from_millis(50));
    }
    for allot in [allot_a, allot_b] {
        allot.signal("INT");
        let (code, _, err) = allot.finish(Duration::from_secs(10));
        assert_eq!(code, Some(0), "{err}");
    }
    let (ma, mb) = (sa / n, sb / n);
    let diff = (ma - mb).abs() / ma.max(mb);
    eprintln!(
        "f: mean running members: group started at 2 → {ma:.2}, at 12 → {mb:.2} ({:.1}% apart)",
        diff * 100.0
    );
    assert!(ma > 0.0 && mb > 0.0, "a group was starved: {ma} {mb}");
    assert!(
        diff <= tolerance,
        "limits {ma:.2} and {mb:.2} are {:.1}% apart",
        diff * 100.0
    );
    assert!(!a
        .pids()
        .iter()
        .chain(b.pids().iter())
        .any(|p| state(*p) == 'T'));
}

/// Neither group is starved and their limits come out roughly alike (a generous bound).
#[test]
fn two_groups_converge_to_fair_limits() {
    two_groups(30, 0.6);
}

/// Experiment: over 60 s the two groups' mean limits end within 25% of each other.
#[test]
#[ignore = "experiment: fairness moves with the machine's load; run by bench/cpu.sh"]
fn experiment_two_groups_within_a_quarter() {
    two_groups(60, 0.25);
}

/// Whatever ends `allot adapt` — SIGTERM, SIGHUP, SIGQUIT, a closed standard output, an
/// error, SIGKILL followed by `allot cpu resume` — no member and no process of a
/// member's wrapper (runuser, which stops itself when its child stops) is left stopped.
#[test]
fn adapt_leaves_nothing_stopped_whatever_ends_it() {
    let cpu = experiment_cpu();
    let runuser = Wrapper::available().contains(&Wrapper::Runuser);
    for end in ["TERM", "HUP", "QUIT", "PIPE", "error", "KILL"] {
        let wrapped = runuser.then(|| Wrapped::start(Wrapper::Runuser, cpu));
        let workers = Workers::busy(3, cpu);
        let mut pids = workers.pids();
        let mut watch = pids.clone();
        if let Some(w) = &wrapped {
            pids.push(w.member);
            watch.extend(w.tree());
        }
        let scratch = Scratch::new(&format!("adapt-{end}-{}", pids[0]));
        let state_dir = scratch.0.join("state");
        let state_file = state_dir.join("adapt.state").display().to_string();
        let mut a = adapt_args(&pids, "1", "200ms", "2.5");
        a.extend(["--state".to_string(), state_file.clone()]);
        a.extend(["--sensor".to_string(), "run-queue-wait".to_string()]);
        let allot = Allot::start(&a);
        assert!(
            wait_for(Duration::from_secs(10), || pids
                .iter()
                .any(|p| state(*p) == 'T')),
            "adapt never stopped a member"
        );
        std::thread::sleep(Duration::from_millis(300));
        end_allot(allot, end, &state_dir, &state_file);
        let clean = wait_for(Duration::from_secs(2), || stopped_among(&watch).is_empty());
        assert!(
            clean,
            "adapt, after {end}: left stopped: {:?}",
            stopped_among(&watch)
        );
    }
}

/// Policing: allot adapts its own group (four busy workers: friendly, since allot cuts
/// them when congested) and polices a second group of four busy workers that ignores the
/// signal (without `police`, the same run with nobody policing it). Returns (periods
/// from the congested one to the cap, the friendly group's CPU per second over the second
/// half of the run, the run's JSON summary).
fn policing_run(secs: u64, grace: u32, police: bool) -> (i64, f64, String) {
    let cpu = experiment_cpu();
    let friendly = Workers::busy(4, cpu);
    let hog = Workers::busy(4, cpu);
    let mut a = adapt_args(&friendly.pids(), "4", "500ms", "2.5");
    a.extend(
        [
            "--sensor",
            "run-queue-wait",
            "--json",
            "--police-periods",
            &grace.to_string(),
            "--duration",
            &format!("{secs}s"),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    for p in hog.pids().into_iter().filter(|_| police) {
        a.push("--police".into());
        a.push(format!("hog=pid:{p}"));
    }
    let allot = pinned_allot(cpu, &a);
    let t0 = Instant::now();
    let mut capped = false;
    let mut half: Option<(Instant, u64)> = None;
    while t0.elapsed() < Duration::from_secs(secs) {
        capped |= hog.pids().iter().any(|p| state(*p) == 'T');
        if half.is_none() && t0.elapsed() >= Duration::from_secs(secs / 2) {
            half = Some((Instant::now(), friendly.cpu().iter().sum()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let c1: u64 = friendly.cpu().iter().sum();
    let (at, c_at) = half.unwrap_or((t0, 0));
    let rate = (c1 - c_at) as f64 / at.elapsed().as_secs_f64().max(0.1) / 1e9;
    let (code, out, err) = allot.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    if !police {
        return (0, rate, out);
    }
    assert!(capped, "the hog group was never capped: {err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON summary");
    let p = &summary["policed"][0];
    let waited = p["first_capped_period"].as_i64().unwrap_or(i64::MAX)
        - p["first_watched_period"].as_i64().unwrap_or(0);
    assert!(
        err.contains("police hog") && err.contains("unfriendly"),
        "live lines: {err}"
    );
    assert!(!friendly
        .pids()
        .iter()
        .chain(hog.pids().iter())
        .any(|p| state(*p) == 'T'));
    (waited, rate, out)
}

/// A policed group that does not back off is found unfriendly within the grace periods
/// and capped (some of its members stopped), says so in the live line and the JSON
/// summary, and is left running at the end.
#[test]
fn an_unfriendly_group_is_detected_and_capped() {
    let _x = exclusive();
    let (waited, rate, out) = policing_run(12, 3, true);
    eprintln!("policing: capped {waited} periods after congestion; friendly CPU {rate:.2}; {out}");
    assert!(
        (1..=4).contains(&waited),
        "capped {waited} periods after the congested one (grace 3): {out}"
    );
}

/// Experiment: with the unfriendly group capped, the friendly one keeps far more of the
/// CPU than when nobody polices the hog (which then leaves it its minimum duty cycle).
#[test]
#[ignore = "experiment: shares move with the machine's load; run by bench/cpu.sh"]
fn experiment_friendly_share_recovers_after_capping() {
    let _x = exclusive();
    let (_, unpoliced, _) = policing_run(24, 3, false);
    let (waited, policed, _) = policing_run(24, 3, true);
    println!(
        "experiment policing: capped {waited} periods after congestion; friendly group's CPU over the second half {policed:.3} policed, {unpoliced:.3} unpoliced (CPUs)"
    );
    assert!(
        policed > 1.5 * unpoliced,
        "friendly CPU {policed:.3} vs {unpoliced:.3} unpoliced"
    );
}
