//! The probe whose run time is the slowdown signal's latency (the FVM paper's virtual
//! clock time, here measured from outside the group): either a small fixed unit of CPU
//! and memory work run inside allot, or a user command (its wall time).
//!
//! The built-in probe also measures the CPU time it was given (its thread's CPU clock),
//! so its slowdown can be read directly as wall time over CPU time: 1 on an idle core,
//! about k + 1 with k CPU-bound competitors. Every group probing the same CPU then sees
//! the same signal whatever it measured at start, which AIMD needs to converge to
//! fairness.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::ProcError;
use crate::timer::monotonic_ns;

/// Which probe to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Walk a buffer of `bytes`, `passes` times, mixing integer arithmetic with loads and
    /// stores (a few milliseconds on an idle core).
    BuiltIn {
        /// Buffer size.
        bytes: usize,
        /// Passes over it.
        passes: u32,
    },
    /// Run `sh -c CMD` and time it.
    Command(String),
}

impl Default for Probe {
    fn default() -> Self {
        Probe::BuiltIn {
            bytes: 256 * 1024,
            passes: 120,
        }
    }
}

/// Runs a probe repeatedly, keeping its buffer.
#[derive(Debug)]
pub struct ProbeRunner {
    probe: Probe,
    buf: Vec<u64>,
    sink: u64,
}

impl ProbeRunner {
    /// Prepares the probe (allocates and touches the buffer once).
    pub fn new(probe: Probe) -> ProbeRunner {
        let words = match &probe {
            Probe::BuiltIn { bytes, .. } => (bytes / 8).max(1),
            Probe::Command(_) => 0,
        };
        ProbeRunner {
            probe,
            buf: (0..words as u64).collect(),
            sink: 0,
        }
    }

    /// Runs once and returns its wall time and, for the built-in probe, its CPU time.
    pub fn run(&mut self) -> Result<ProbeTime, ProcError> {
        let t0 = monotonic_ns();
        let c0 = thread_cpu_ns();
        match &self.probe {
            Probe::BuiltIn { passes, .. } => {
                let n = self.buf.len();
                let mut acc = self.sink;
                for pass in 0..*passes as u64 {
                    // A stride that is coprime with n visits every word, defeating
                    // simple prefetching a little without making the unit noisy.
                    let mut i = (pass as usize * 7919) % n;
                    for _ in 0..n {
                        let v = self.buf[i];
                        acc = acc.wrapping_mul(6364136223846793005).wrapping_add(v ^ pass);
                        self.buf[i] = acc;
                        i += 4099;
                        if i >= n {
                            i -= n;
                        }
                    }
                }
                self.sink = std::hint::black_box(acc);
            }
            Probe::Command(cmd) => {
                let status = Command::new("sh")
                    .args(["-c", cmd])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()
                    .map_err(|e| ProcError::io(format!("--probe-cmd {cmd:?}"), e))?;
                if !status.success() {
                    return Err(ProcError::Config(format!(
                        "--probe-cmd {cmd:?} failed: {status}"
                    )));
                }
            }
        }
        let wall = Duration::from_nanos(monotonic_ns() - t0);
        let cpu = match (&self.probe, c0, thread_cpu_ns()) {
            (Probe::BuiltIn { .. }, Some(a), Some(b)) if b > a => Some(Duration::from_nanos(b - a)),
            _ => None,
        };
        Ok(ProbeTime { wall, cpu })
    }
}

/// One probe run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTime {
    /// Wall time it took.
    pub wall: Duration,
    /// CPU time it was given (built-in probe only).
    pub cpu: Option<Duration>,
}

impl ProbeTime {
    /// Wall time over CPU time, when the CPU time is known.
    pub fn stretch(&self) -> Option<f64> {
        let cpu = self.cpu?.as_secs_f64();
        (cpu > 0.0).then(|| self.wall.as_secs_f64() / cpu)
    }
}

fn thread_cpu_ns() -> Option<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_probe_takes_measurable_time_and_commands_run() {
        let mut p = ProbeRunner::new(Probe::default());
        let d = p.run().unwrap();
        assert!(d.wall > Duration::from_micros(100), "{d:?}");
        let stretch = d.stretch().unwrap();
        assert!(stretch >= 0.9, "{d:?}");
        let mut c = ProbeRunner::new(Probe::Command("true".into()));
        assert!(c.run().is_ok());
        let mut f = ProbeRunner::new(Probe::Command("exit 3".into()));
        assert!(f.run().is_err());
    }
}
