//! The README's "A first gateway" and "Planning shares" steps run as written: each shell
//! block is taken from the README itself and run with bash in the repository,
//! `target/release/allot` being this build (the block's `cargo build` is what built it).
//! The gateway steps use the example's fixed ports (8000, 8080, 9090), as a reader would.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The first `sh` block after the heading `## {title}` of the README.
fn sh_block(title: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split(&format!("## {title}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("README has a section {title:?}"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an sh block in the section");
    block.to_string()
}

#[test]
fn the_first_gateway_steps_of_the_readme_run_as_written() {
    let block = sh_block("A first gateway");
    assert!(
        block.contains("allot backend") && block.contains("allot gateway"),
        "{block}"
    );
    let bin = allot_bin().to_string_lossy().to_string();
    let script: Vec<String> = block
        .lines()
        .filter(|l| l.trim() != "cargo build --release")
        .map(|l| l.replace("target/release/allot", &bin))
        .collect();
    // Whatever fails, nothing started by the block outlives it. A job that ends between
    // `jobs -p` and `kill` makes the kill fail, which must not fail the steps.
    let script = format!(
        "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n{}\n",
        script.join("\n")
    );
    let started = Instant::now();
    let mut child = Command::new("timeout")
        .args(["-k", "5", "90", "bash", "-c", &script])
        .current_dir(repo())
        .env_remove("ALLOT_ADMIN")
        .env_remove("ALLOT_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash");
    let out = loop {
        if child.try_wait().expect("wait").is_some() {
            break child.wait_with_output().expect("output");
        }
        assert!(
            started.elapsed() < Duration::from_secs(100),
            "the steps hung"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.contains("listening backend=127.0.0.1:8000"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("running ")),
        "allot stat: {stdout}"
    );
    assert!(stdout.contains("(default)"), "ctl rules list: {stdout}");
    assert!(
        stdout.contains("allot_class_arrivals_total"),
        "metrics: {stdout}"
    );
    assert!(stderr.contains("class basic changed") || stdout.contains("class basic changed"));
}

#[test]
fn the_planning_steps_of_the_readme_run_as_written() {
    let block = sh_block("Planning shares");
    assert!(
        block.contains("allot plan") && block.contains("allot sim plan"),
        "{block}"
    );
    let bin = allot_bin().to_string_lossy().to_string();
    let script = format!("set -e\n{}", block.replace("target/release/allot", &bin));
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "bash", "-c", &script])
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    // Each command's output: the planner's table (units and meanings), then the replay.
    assert_eq!(
        stdout.matches("objective: community").count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("units/s: cost units per second"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mandatory: what its agreements"),
        "{stdout}"
    );
    assert!(
        stdout.contains("theta (θ, community objective)"),
        "{stdout}"
    );
    assert!(stdout.contains("alloc/demand"), "{stdout}");
}
