//! `allot plan` and `allot sim plan` end to end, through the real binary: the paper's
//! figure 3, every check DESIGN.md lists under "The window planner", the JSON shape, and
//! configuration errors naming file, line and key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn allot(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("running allot {args:?}: {e}"),
    }
}

/// Runs `allot plan --json` on a file and returns the one JSON object it prints.
fn plan_json(config: &Path, demand: &[&str]) -> Value {
    let config = config.to_string_lossy().into_owned();
    let mut args = vec!["plan", "--config", config.as_str(), "--json"];
    for d in demand {
        args.push("--demand");
        args.push(d);
    }
    let out = allot(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "allot {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "one JSON object: {stdout}"
    );
    match serde_json::from_str(stdout.trim()) {
        Ok(v) => v,
        Err(e) => panic!("not JSON ({e}): {stdout}"),
    }
}

fn principal<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["principals"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no principal {name} in {doc}"))
}

fn number(doc: &Value, name: &str, field: &str) -> f64 {
    principal(doc, name)[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{name}.{field} is not a number in {doc}"))
}

fn assert_near(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
        "{what}: got {actual}, expected {expected}"
    );
}

static FILES: AtomicUsize = AtomicUsize::new(0);

/// Writes a scratch file unique to this test run.
fn scratch(name: &str, text: &str) -> PathBuf {
    let n = FILES.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("allot-plan-{}-{n}-{name}", std::process::id()));
    if let Err(e) = std::fs::write(&path, text) {
        panic!("writing {}: {e}", path.display());
    }
    path
}

#[test]
fn figure3_access_levels() {
    let doc = plan_json(&repo("examples/plan/figure3.toml"), &[]);
    for (name, capacity, mandatory, optional) in [
        ("A", 1000.0, 600.0, 400.0),
        ("B", 1500.0, 760.0, 1340.0),
        ("C", 0.0, 1140.0, 960.0),
    ] {
        assert_near(number(&doc, name, "capacity"), capacity, "capacity");
        assert_near(
            number(&doc, name, "mandatory"),
            mandatory,
            &format!("{name} mandatory"),
        );
        assert_near(
            number(&doc, name, "optional"),
            optional,
            &format!("{name} optional"),
        );
        assert!(principal(&doc, name)["demand"].is_null());
        assert!(principal(&doc, name)["allocation"].is_null());
    }
    assert!(doc["theta"].is_null());
}

#[test]
fn json_shape_is_exactly_as_documented() {
    let doc = plan_json(&repo("examples/plan/figure3.toml"), &["A=100"]);
    let top: Vec<&String> = doc
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(top.len(), 3, "{doc}");
    assert_eq!(doc["objective"], "community");
    assert!(doc["theta"].is_number(), "{doc}");
    for p in doc["principals"].as_array().into_iter().flatten() {
        let mut keys: Vec<&String> = p
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "allocation",
                "capacity",
                "demand",
                "mandatory",
                "name",
                "optional"
            ],
            "{p}"
        );
    }
    // A principal left out of --demand has demand 0 and gets nothing.
    assert_near(number(&doc, "B", "demand"), 0.0, "B demand");
    assert_near(number(&doc, "B", "allocation"), 0.0, "B allocation");
    assert_near(number(&doc, "A", "allocation"), 100.0, "A allocation");
}

#[test]
fn one_server_b_under_guarantee_gets_all_a_the_rest() {
    let doc = plan_json(
        &repo("examples/plan/one-server.toml"),
        &["A=10000", "B=130"],
    );
    assert_near(number(&doc, "B", "allocation"), 130.0, "B");
    assert_near(number(&doc, "A", "allocation"), 190.0, "A");
    // B stops: A may use the whole server.
    let doc = plan_json(&repo("examples/plan/one-server.toml"), &["A=10000"]);
    assert_near(number(&doc, "A", "allocation"), 320.0, "A alone");
}

#[test]
fn two_servers_both_flooding_then_a_at_400() {
    let config = repo("examples/plan/two-servers.toml");
    let doc = plan_json(&config, &["A=5000", "B=5000"]);
    assert_near(number(&doc, "A", "allocation"), 480.0, "A flooding");
    assert_near(number(&doc, "B", "allocation"), 160.0, "B flooding");
    let doc = plan_json(&config, &["A=400", "B=5000"]);
    assert_near(number(&doc, "A", "allocation"), 400.0, "A at 400");
    assert_near(number(&doc, "B", "allocation"), 240.0, "B with A at 400");
}

#[test]
fn provider_both_flooding() {
    let doc = plan_json(&repo("examples/plan/provider.toml"), &["A=5000", "B=5000"]);
    assert_eq!(doc["objective"], "provider");
    assert!(
        doc["theta"].is_null(),
        "θ is null for the provider objective"
    );
    assert_near(number(&doc, "A", "allocation"), 512.0, "A");
    assert_near(number(&doc, "B", "allocation"), 128.0, "B");
}

#[test]
fn table_without_json() {
    let config = repo("examples/plan/figure3.toml");
    let config = config.to_string_lossy();
    let out = allot(&["plan", "--config", &config, "--demand", "C=2000"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("principal") && text.contains("allocation"),
        "{text}"
    );
    let c_row = text
        .lines()
        .find(|l| l.starts_with("C "))
        .unwrap_or_default();
    // C: capacity 0, mandatory 1140, optional 960, demand 2000, allocation 2000.
    let cells: Vec<&str> = c_row.split_whitespace().collect();
    assert_eq!(cells, ["C", "0", "1140", "960", "2000", "2000"], "{text}");
}

fn failure(args: &[&str]) -> String {
    let out = allot(args);
    assert_eq!(out.status.code(), Some(2), "allot {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_errors_name_file_line_and_key() {
    let cases = [
        (
            "[[principal]]\nname = \"A\"\ncapacity = 10\n\n[[agreement]]\nfrom = \"A\"\nto = \"Z\"\nshare = [0.1, 0.2]\n",
            ":7: `agreement[0].to`",
            "unknown principal `Z`",
        ),
        (
            "[[principal]]\nname = \"A\"\ncapacity = 10\n[[principal]]\nname = \"B\"\ncapacity = 0\n[[agreement]]\nfrom = \"A\"\nto = \"B\"\nshare = [0.7, 0.2]\n",
            ":10: `agreement[0].share`",
            "above upper bound",
        ),
        (
            "[[principal]]\nname = \"A\"\ncapacity = 10\n[[principal]]\nname = \"B\"\ncapacity = 0\n[[agreement]]\nfrom = \"A\"\nto = \"B\"\nshare = [0.2, 1.2]\n",
            ":10: `agreement[0].share`",
            "must be in [0, 1]",
        ),
        (
            "[[principal]]\nname = \"A\"\ncapacity = -3\n",
            ":3: `principal[0].capacity`",
            "finite number ≥ 0",
        ),
        (
            "[[principal]]\nname = \"A\"\ncapacity = 10\n[[principal]]\nname = \"B\"\ncapacity = 0\n[[principal]]\nname = \"C\"\ncapacity = 0\n[[agreement]]\nfrom = \"A\"\nto = \"B\"\nshare = [0.6, 1]\n[[agreement]]\nfrom = \"A\"\nto = \"C\"\nshare = [0.6, 1]\n",
            ":1: `principal[0]`",
            "sum to 1.2",
        ),
        (
            "objective = \"fastest\"\n",
            ":1: `objective`",
            "community",
        ),
        (
            "[[principal]]\nname = \"A\"\ncapacity = \"lots\"\n",
            ":3: `capacity`",
            "expected f64",
        ),
    ];
    for (text, location, message) in cases {
        let path = scratch("bad.toml", text);
        let shown = path.to_string_lossy().into_owned();
        let err = failure(&["plan", "--config", &shown]);
        assert!(
            err.contains(&format!("{shown}{location}")) && err.contains(message),
            "for {text:?}: {err}"
        );
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn demand_flag_errors_name_the_flag() {
    let config = repo("examples/plan/figure3.toml");
    let config = config.to_string_lossy();
    let err = failure(&["plan", "--config", &config, "--demand", "Z=5"]);
    assert!(
        err.contains("`--demand Z=5`") && err.contains("declared: A, B, C"),
        "{err}"
    );
    let err = failure(&["plan", "--config", &config, "--demand", "A=-1"]);
    assert!(err.contains("`--demand A=-1`"), "{err}");
}

#[test]
fn sim_plan_replays_a_trace_window_by_window() {
    let trace = scratch(
        "trace.csv",
        "time_ms,principal,units_per_s\n0,A,10000\n0,B,130\n250,B,0\n",
    );
    let config = repo("examples/plan/one-server.toml");
    let (config, trace_s) = (config.to_string_lossy(), trace.to_string_lossy());
    let out = allot(&[
        "sim", "plan", "--config", &config, "--trace", &trace_s, "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let windows = doc["windows"].as_array().cloned().unwrap_or_default();
    // Windows start at 0, 100, 200, 300: B's stop at 250 ms takes effect at 300.
    let starts: Vec<u64> = windows
        .iter()
        .filter_map(|w| w["start_ms"].as_u64())
        .collect();
    assert_eq!(starts, [0, 100, 200, 300], "{doc}");
    for (w, (a, b)) in
        windows
            .iter()
            .zip([(190.0, 130.0), (190.0, 130.0), (190.0, 130.0), (320.0, 0.0)])
    {
        assert_near(number(w, "A", "allocation"), a, "A");
        assert_near(number(w, "B", "allocation"), b, "B");
    }
    let _ = std::fs::remove_file(&trace);
}

#[test]
fn sim_plan_errors_name_the_csv_line() {
    let trace = scratch("bad.csv", "time_ms,principal,units_per_s\n0,A,5\n100,Q,5\n");
    let config = repo("examples/plan/one-server.toml");
    let (config, trace_s) = (config.to_string_lossy(), trace.to_string_lossy());
    let err = failure(&["sim", "plan", "--config", &config, "--trace", &trace_s]);
    assert!(
        err.contains(&format!("{trace_s}:3: `principal`: unknown principal `Q`")),
        "{err}"
    );
    let _ = std::fs::remove_file(&trace);
}

#[test]
fn every_agreement_set_in_examples_plan_is_valid() {
    let dir = repo("examples/plan");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/plan/") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = path.to_string_lossy().to_string();
            let out = allot(&["plan", "--config", &p]);
            assert!(
                out.status.success(),
                "{p}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} agreement sets");
}
