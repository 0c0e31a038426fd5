//! `--plot FILE.svg`: `allot sim fvm` draws n_v(t), c(t) and fairness, `allot sim plan`
//! each principal's allocation per window, `allot cpu` each principal's CPU fraction
//! against its target per cycle, `allot adapt` the limit and the slowdown over time; each
//! file is a well-formed SVG whose series carry their names and one point per row.
//! The `cpu` and `adapt` runs are two seconds of two busy loops: they check what is
//! drawn, never how well the CPU was shared.

mod common;
mod cpu_support;

use std::collections::BTreeMap;

use common::*;

/// The document's elements are balanced (every open tag closed, in order) and it is one
/// `<svg>`; returns each series' name and its points.
fn parse_svg(text: &str) -> BTreeMap<String, Vec<Vec<(f64, f64)>>> {
    assert!(text.starts_with("<?xml"), "no XML declaration");
    let mut stack: Vec<String> = Vec::new();
    let mut series: BTreeMap<String, Vec<Vec<(f64, f64)>>> = BTreeMap::new();
    let mut rest = text;
    let mut roots = 0;
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>').expect("an unclosed tag") + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if tag.starts_with('?') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "misnested </{name}>"
            );
            continue;
        }
        let name = tag.split_whitespace().next().unwrap_or("").to_string();
        if stack.is_empty() {
            roots += 1;
            assert_eq!(name, "svg", "the root element");
        }
        for quote in tag.split('"').skip(1).step_by(2) {
            assert!(!quote.contains('<'), "a raw < in an attribute of <{name}>");
        }
        if name == "polyline" && tag.contains(r#"class="series""#) {
            let attr = |key: &str| {
                tag.split(&format!("{key}=\""))
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or_else(|| panic!("polyline without {key}"))
                    .to_string()
            };
            let points = attr("points")
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').expect("x,y");
                    (x.parse().expect("x"), y.parse().expect("y"))
                })
                .collect();
            series.entry(attr("data-series")).or_default().push(points);
        }
        if !tag.ends_with('/') {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1);
    series
}

#[test]
fn sim_fvm_plots_demands_congestion_and_fairness() {
    let path = temp_path("fvm.svg");
    let p = path.to_string_lossy().to_string();
    let (code, csv, err) = run_allot(
        &[
            "sim",
            "fvm",
            "--initial",
            "4,10,16",
            "--duration",
            "20",
            "--plot",
            &p,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows = csv.lines().count() - 1;
    let series = parse_svg(&std::fs::read_to_string(&path).expect("the SVG"));
    for name in ["n1", "n2", "n3", "c", "fairness"] {
        let lines = series
            .get(name)
            .unwrap_or_else(|| panic!("{name}: {series:?}"));
        assert_eq!(lines.len(), 1, "{name} drawn once");
        assert_eq!(lines[0].len(), rows, "{name}: one point per printed row");
    }
    // The demands converge: the lines end closer together than they start.
    let spread = |i: usize| {
        let ys: Vec<f64> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| series[*n][0][i].1)
            .collect();
        ys.iter().cloned().fold(f64::MIN, f64::max) - ys.iter().cloned().fold(f64::MAX, f64::min)
    };
    assert!(
        spread(rows - 1) < spread(0) / 2.0,
        "{} vs {}",
        spread(rows - 1),
        spread(0)
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn sim_plan_plots_each_principals_allocation_per_window() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = repo.join("examples/plan/one-server.toml");
    let trace = repo.join("examples/plan/demand-trace.csv");
    let path = temp_path("plan.svg");
    let (c, t, p) = (
        config.to_string_lossy().to_string(),
        trace.to_string_lossy().to_string(),
        path.to_string_lossy().to_string(),
    );
    let (code, out, err) = run_allot(
        &[
            "sim", "plan", "--config", &c, "--trace", &t, "--json", "--plot", &p,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let windows = doc["windows"].as_array().expect("windows").len();
    let series = parse_svg(&std::fs::read_to_string(&path).expect("the SVG"));
    for name in [
        "S allocation",
        "A allocation",
        "B allocation",
        "A demand",
        "B demand",
    ] {
        let lines = series
            .get(name)
            .unwrap_or_else(|| panic!("{name}: {series:?}"));
        assert_eq!(lines[0].len(), windows, "{name}: one point per window");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn cpu_plots_each_principals_fraction_against_its_target_per_cycle() {
    let workers = cpu_support::Workers::busy(2, cpu_support::experiment_cpu());
    let pids = workers.pids();
    let (path, report) = (temp_path("cpu.svg"), temp_path("cpu.csv"));
    let (p, r) = (
        path.to_string_lossy().to_string(),
        report.to_string_lossy().to_string(),
    );
    let (a, b) = (format!("{}:1", pids[0]), format!("{}:3", pids[1]));
    let (code, _, err) = run_allot(
        &[
            "cpu",
            "--backend",
            "signals",
            "--quantum",
            "10ms",
            "--duration",
            "2s",
            "--pid",
            &a,
            "--pid",
            &b,
            "--report",
            &r,
            "--plot",
            &p,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let csv = std::fs::read_to_string(&report).expect("the report");
    let cycles: std::collections::BTreeSet<&str> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    assert!(!cycles.is_empty(), "no cycle in two seconds: {csv}");
    let series = parse_svg(&std::fs::read_to_string(&path).expect("the SVG"));
    for pid in &pids {
        let got = &series
            .get(&format!("pid:{pid}"))
            .unwrap_or_else(|| panic!("pid:{pid}: {series:?}"))[0];
        let target = &series
            .get(&format!("pid:{pid} target"))
            .unwrap_or_else(|| panic!("pid:{pid} target: {series:?}"))[0];
        assert_eq!(target.len(), cycles.len(), "a target point per cycle");
        assert!(
            !got.is_empty() && got.len() <= cycles.len(),
            "{} fractions for {} cycles",
            got.len(),
            cycles.len()
        );
        assert!(
            target.iter().all(|t| t.1 == target[0].1),
            "the target of a fixed share is a flat line: {target:?}"
        );
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&report);
}

#[test]
fn adapt_plots_the_limit_and_the_slowdown_over_time() {
    let workers = cpu_support::Workers::busy(2, cpu_support::experiment_cpu());
    let pids: Vec<String> = workers.pids().iter().map(|p| p.to_string()).collect();
    let path = temp_path("adapt.svg");
    let p = path.to_string_lossy().to_string();
    let (code, out, err) = run_allot(
        &[
            "adapt",
            "--period",
            "200ms",
            "--window",
            "1s",
            "--samples",
            "1",
            "--initial",
            "2",
            "--duration",
            "2s",
            "--pid",
            &pids[0],
            "--pid",
            &pids[1],
            "--json",
            "--plot",
            &p,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    let periods = doc["periods"].as_u64().expect("periods") as usize;
    assert!(periods > 0, "no period in two seconds: {err}");
    let series = parse_svg(&std::fs::read_to_string(&path).expect("the SVG"));
    for name in ["L", "running", "duty", "R", "H"] {
        let lines = series
            .get(name)
            .unwrap_or_else(|| panic!("{name}: {series:?}"));
        assert_eq!(lines[0].len(), periods, "{name}: one point per period");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_unwritable_plot_path_is_an_error_naming_it() {
    let (code, _, err) = run_allot(
        &[
            "sim",
            "fvm",
            "--duration",
            "1",
            "--plot",
            "/nonexistent-dir/x.svg",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("--plot") && err.contains("/nonexistent-dir/x.svg"),
        "{err}"
    );
}
