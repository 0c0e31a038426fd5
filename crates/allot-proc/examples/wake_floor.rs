//! The platform's floor under `allot cpu`'s own CPU: a loop that does nothing but sleep
//! to absolute deadlines with the scheduler's own timer (same clock, same 1 ns timer
//! slack), `RATE` times a second for `SECS` seconds, then prints what that cost.
//!
//! `bench/cpu.sh` runs it beside `allot cpu` at the scheduler's tick rate and at the
//! step rate it measured, so allot's overhead can be read as floor + its own work.
//!
//! ```text
//! cargo run --release -p allot-proc --example wake_floor -- 50 10
//! ```

use std::process::ExitCode;
use std::time::Duration;

use allot_proc::procfs;
use allot_proc::timer::{monotonic_ns, tighten_timer_slack, PeriodicTimer};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [rate, secs] => rate.parse::<f64>().ok().zip(secs.parse::<f64>().ok()),
        _ => None,
    };
    let Some((rate, secs)) = parsed.filter(|(r, s)| *r > 0.0 && *r <= 10_000.0 && *s > 0.0) else {
        eprintln!("usage: wake_floor RATE SECS (wake-ups per second in (0, 10000], seconds > 0)");
        return ExitCode::from(2);
    };
    tighten_timer_slack();
    let mut timer = PeriodicTimer::new(Duration::from_secs_f64(1.0 / rate));
    let (start_ns, own_start_ns) = (monotonic_ns(), procfs::self_cpu_ns());
    let end_ns = start_ns + (secs * 1e9) as u64;
    let mut wakes = 0u64;
    while monotonic_ns() < end_ns {
        timer.wait();
        wakes += 1;
    }
    let wall_ns = monotonic_ns().saturating_sub(start_ns).max(1) as f64;
    let own_ns = procfs::self_cpu_ns().saturating_sub(own_start_ns) as f64;
    println!(
        "{:.1} wakes/s: own CPU {:.3}%, {:.1} µs a wake",
        wakes as f64 / (wall_ns / 1e9),
        100.0 * own_ns / wall_ns,
        own_ns / wakes.max(1) as f64 / 1e3
    );
    ExitCode::SUCCESS
}
