//! `allot sim cluster`: the combining tree's invariants at a small size with a fixed seed
//! (the simulation is a function of its flags, so these bounds are deterministic). The
//! figures at 10 000 gateways are an experiment: `bench/sim_cluster.sh`.

use std::process::Command;

use serde_json::Value;

fn sim(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["sim", "cluster", "--json"])
        .args(args)
        .output()
        .expect("allot runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

#[test]
fn a_lossy_tree_with_a_killed_root_stays_within_capacity_and_recovers() {
    let v = sim(&[
        "--gateways",
        "300",
        "--fanout",
        "8",
        "--loss",
        "0.01",
        "--lag",
        "2",
        "--kill",
        "root@7050",
        "--seed",
        "7",
    ]);
    let s = &v["summary"];
    // At 300 gateways one aggregator's subtree is a fifth of the tree, so one lost quota
    // moves more than at 10 000 (where the bench holds it to 102%).
    assert!(number(s, "peak_overshoot_percent") <= 103.0, "{s}");
    assert!(
        number(s, "capacity_used_under_steady_excess_percent") >= 98.0,
        "{s}"
    );
    for step in s["steps"].as_array().expect("steps") {
        let w = step["converge_windows"].as_u64().unwrap_or(u64::MAX);
        assert!(w <= 3, "a step took {w} windows: {s}");
    }
    let kills = s["kills"].as_array().expect("kills");
    assert_eq!(kills.len(), 1, "{s}");
    assert!(
        kills[0]["fallback_windows"].as_u64().unwrap_or(u64::MAX) <= 2,
        "{s}"
    );
    assert!(kills[0]["new_epoch"].as_u64().unwrap_or(0) > 1, "{s}");
    // Every window: never above capacity by more than what stale quotas can add.
    for w in v["windows"].as_array().expect("windows") {
        assert!(number(w, "admitted") <= number(w, "capacity") * 1.03, "{w}");
    }
}

#[test]
fn without_loss_or_failures_every_window_after_the_first_plans_is_the_single_gateway_plan() {
    let v = sim(&[
        "--gateways",
        "50",
        "--fanout",
        "4",
        "--noise",
        "0",
        "--seed",
        "3",
    ]);
    let windows = v["windows"].as_array().expect("windows");
    let steps: Vec<u64> = v["summary"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["window"].as_u64())
        .collect();
    for w in windows {
        let n = w["window"].as_u64().expect("window");
        // A plan is enforced two windows after the demand it answers.
        let settling = n < 3 || steps.iter().any(|s| n >= *s && n < s + 2);
        assert!(
            number(w, "admitted") <= number(w, "capacity") * (1.0 + 1e-9),
            "{w}"
        );
        if settling {
            continue;
        }
        for p in 0..2 {
            let got = w["admitted_by_principal"][p].as_f64().expect("number");
            let want = w["ideal_by_principal"][p].as_f64().expect("number");
            assert!((got - want).abs() <= 1e-6 * (1.0 + want), "{w}");
        }
    }
}

#[test]
fn bad_flags_are_named() {
    for (args, word) in [
        (vec!["--gateways", "0"], "--gateways"),
        (vec!["--fanout", "1"], "--fanout"),
        (vec!["--loss", "1.5"], "--loss"),
        (vec!["--kill", "nobody"], "--kill"),
        (vec!["--kill", "g99999@100"], "g99999"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_allot"))
            .args(["sim", "cluster"])
            .args(&args)
            .output()
            .expect("allot runs");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(word), "{args:?}: {err}");
    }
}
