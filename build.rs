//! Build script: the commit the binary was built from, for `allot --version`.
//!
//! Read from git when the source is a git checkout; `ALLOT_BUILD_COMMIT` overrides it
//! (a packager building from a tarball); with neither, the version stands alone.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ALLOT_BUILD_COMMIT");
    let version = env!("CARGO_PKG_VERSION");
    let commit = std::env::var("ALLOT_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Build again when HEAD moves: HEAD itself, its log (written on every commit,
    // checkout and reset), the branch it points to and the packed refs. Only files that
    // exist: cargo takes a missing one as changed, and would run this script (and build
    // the binary again) on every build.
    let watch = |path: &str| {
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    };
    watch("HEAD");
    watch("logs/HEAD");
    watch("packed-refs");
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(&branch);
    }
    let long = match commit {
        Some(c) => format!("{version} (commit {c})"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=ALLOT_VERSION_LONG={long}");
}
