//! `allot sim fvm`: with the paper's figure 3(a) parameters the
//! fluid model converges to equal demands, at the analytic steady state n* = 2/c* − 2.

use std::process::Command;

fn field(json: &str, key: &str) -> f64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = &json[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

#[test]
fn fluid_model_converges_to_fair_demands_at_the_analytic_steady_state() {
    let out = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["sim", "fvm", "--duration", "150", "--json"])
        .output()
        .expect("allot runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(field(&json, "max_rel_deviation_from_mean") < 0.01, "{json}");
    assert!(field(&json, "steady_state_rel_error") < 0.01, "{json}");
    assert!(field(&json, "fairness") > 0.999, "{json}");
}

#[test]
fn csv_rows_show_every_group_and_the_signal() {
    let out = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["sim", "fvm", "--duration", "10"])
        .output()
        .expect("allot runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("t,n1,n2,n3,n4,n5,c,fairness"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 11);
    assert!(rows[0].starts_with("0.00,4.0000,7.0000,10.0000,13.0000,16.0000"));
    let bad = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["sim", "fvm", "--gamma", "1.5"])
        .output()
        .expect("allot runs");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("gamma"));
}
