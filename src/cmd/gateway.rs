//! `allot gateway` (not yet built).

use std::process::ExitCode;

/// Flags of this subcommand.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet built")
}
