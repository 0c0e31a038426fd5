//! What a distribution package ships: the systemd units pass `systemd-analyze verify`,
//! the shell completions load in bash, the man page renders with `man -l`, `--version`
//! names the commit, and nothing writes colour escapes into a pipe.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `systemd-analyze`, installed with Debian's `systemd` package when missing; `None`
/// (and a printed reason) only when it cannot be installed either.
fn systemd_analyze() -> Option<PathBuf> {
    let found = std::panic::catch_unwind(|| tools::ensure("systemd-analyze", "systemd"));
    match found {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!(
                "SKIPPED: systemd-analyze is absent and the `systemd` package could not be \
                 installed, so the units were not verified"
            );
            None
        }
    }
}

/// The unit with `/usr/bin/allot` pointing at this build (verify checks that every
/// command exists), as an instance `NAME@test.service` in a directory of its own.
fn instance(unit: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("packaging/systemd").join(unit))
        .unwrap_or_else(|e| panic!("packaging/systemd/{unit}: {e}"));
    let text = text.replace("/usr/bin/allot", &allot_bin().to_string_lossy());
    let path = dir.join(unit.replace("@.service", "@test.service"));
    std::fs::write(&path, text).expect("write the unit");
    path
}

#[test]
fn the_systemd_units_pass_verify_and_reload_with_sighup() {
    for unit in ["allot-gateway@.service", "allot-cpu@.service"] {
        let text = std::fs::read_to_string(repo().join("packaging/systemd").join(unit))
            .unwrap_or_else(|e| panic!("{unit}: {e}"));
        assert!(
            text.contains("KillSignal=SIGTERM"),
            "{unit}: stop is SIGTERM"
        );
        assert!(text.contains("TimeoutStopSec="), "{unit}: a bounded stop");
        if unit.starts_with("allot-gateway") {
            assert!(
                text.contains("ExecReload=/bin/kill -HUP $MAINPID"),
                "{unit}: reload"
            );
        }
    }
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = temp_path("units");
    std::fs::create_dir_all(dir.join("man/man1")).expect("unit dir");
    // `Documentation=man:allot(1)` is checked too: the page installed as a package would.
    let (code, page, err) = run_allot(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(dir.join("man/man1/allot.1"), page).expect("write the page");
    for unit in ["allot-gateway@.service", "allot-cpu@.service"] {
        let path = instance(unit, &dir);
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(&path)
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .env("MANPATH", dir.join("man"))
            .output()
            .expect("run systemd-analyze");
        let err = String::from_utf8_lossy(&out.stderr);
        // Only lines about our unit count: a container's own units may have warnings.
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("allot-"))
            .filter(|l| !l.contains("/etc/allot/")) // the instance's files are not installed here
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {unit}: {}\n{err}",
            out.status
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bash_completions_load_and_complete_subcommands() {
    let (code, script, err) = run_allot(&["completions", "bash"], &[]);
    assert_eq!(code, 0, "{err}");
    let path = temp_path("allot.bash");
    std::fs::write(&path, &script).expect("write completions");
    // Load them, then ask for the words after `allot ` as bash would on Tab.
    let probe = format!(
        "source {} && COMP_WORDS=(allot '') && COMP_CWORD=1 && COMP_LINE='allot ' && \
         COMP_POINT=6 && _allot allot '' allot && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &probe])
        .output()
        .expect("run bash");
    let words = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in ["gateway", "stat", "top", "ctl", "completions", "man"] {
        assert!(words.lines().any(|l| l == w), "{w} not completed: {words}");
    }
    for shell in ["zsh", "fish"] {
        let (code, script, err) = run_allot(&["completions", shell], &[]);
        assert_eq!(code, 0, "{err}");
        assert!(script.contains("gateway"), "{shell}: {script}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_man_page_renders_with_man() {
    tools::ensure("man", "man-db");
    let (code, page, err) = run_allot(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    let path = temp_path("allot.1");
    std::fs::write(&path, &page).expect("write the page");
    let out = Command::new("man")
        .arg("-l")
        .arg(&path)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .stderr(Stdio::piped())
        .output()
        .expect("run man");
    let text = String::from_utf8_lossy(&out.stdout);
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "man -l: {warnings}");
    assert!(!warnings.contains("warning"), "{warnings}");
    for section in ["NAME", "SYNOPSIS", "ALLOT GATEWAY", "ALLOT TOP", "--admin"] {
        assert!(text.contains(section), "{section} missing from:\n{text}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn version_names_the_commit_when_built_from_git() {
    let (code, out, _) = run_allot(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("allot {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output();
    if let Some(h) = head.ok().filter(|h| h.status.success()) {
        let commit = String::from_utf8_lossy(&h.stdout).trim().to_string();
        assert!(
            out.contains(&format!("commit {commit}")),
            "{out} (HEAD is {commit})"
        );
    }
}

#[test]
fn no_colour_escapes_into_pipes_or_with_no_color() {
    // Log lines (a --check error) and help text, to a pipe: no escapes.
    let bad = temp_path("bad.toml");
    std::fs::write(&bad, "[gateway]\nmax_running = 0\n").expect("write");
    let b = bad.to_string_lossy().to_string();
    for envs in [vec![], vec![("NO_COLOR", "1")]] {
        let (_, out, err) = run_allot(&["gateway", "--check", "--config", &b], &envs);
        assert!(!out.contains('\x1b') && !err.contains('\x1b'), "{out}{err}");
        let (_, out, err) = run_allot(&["--help"], &envs);
        assert!(!out.contains('\x1b') && !err.contains('\x1b'), "{out}{err}");
    }
    let _ = std::fs::remove_file(&bad);
}
