//! `allot stat`: a running gateway's sensors as a table.

use std::process::ExitCode;

use allot_gateway::stats::Status;
use anyhow::Context;
use http::Method;

use super::admin_client::{call_blocking, AdminTarget};

/// Flags of `allot stat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: AdminTarget,
    /// Print the raw JSON of `/status` instead of a table.
    #[arg(long)]
    json: bool,
}

/// Fetches `/status` and prints it.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (status, text) = call_blocking(&args.target, Method::GET, "/status", None)?;
    if !status.is_success() {
        anyhow::bail!("the gateway answered {status}: {}", text.trim());
    }
    if args.json {
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let s: Status = serde_json::from_str(&text).context("reading /status")?;
    print!("{}", table(&s));
    Ok(ExitCode::SUCCESS)
}

/// The status as a fixed-width table, classes then back ends.
pub fn table(s: &Status) -> String {
    let mut out = format!(
        "running {}/{}   up {:.0} s\n{:<12} {:>9} {:>9} {:>8} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
        s.running,
        s.max_running,
        s.uptime_s,
        "class",
        "arrivals",
        "admitted",
        "refused",
        "queued",
        "in-fl",
        "delay ms",
        "delay p99",
        "svc ms",
        "MB out"
    );
    for c in &s.classes {
        out += &format!(
            "{:<12} {:>9} {:>9} {:>8} {:>6} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.2}\n",
            c.name,
            c.arrivals,
            c.admitted,
            c.refused(),
            c.queued,
            c.in_flight,
            c.queue_delay.mean_ms(),
            c.queue_delay.quantile_ms(0.99),
            c.service_time.mean_ms(),
            c.bytes_out as f64 / 1e6
        );
    }
    out += &format!(
        "{:<12} {:>9} {:>9} {:>8} {:>8} {:>10}\n",
        "backend", "requests", "in-fl", "failed", "healthy", "svc ms"
    );
    for b in &s.backends {
        out += &format!(
            "{:<12} {:>9} {:>9} {:>8} {:>8} {:>10.1}\n",
            b.name,
            b.requests,
            b.in_flight,
            b.failures_connect + b.failures_timeout + b.failures_protocol,
            b.healthy_addresses,
            b.service_time.mean_ms()
        );
    }
    out
}
