//! `allot sim`: models for analysis, one subcommand each.

use std::process::ExitCode;

/// The models `allot sim` can run.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Replay a demand trace (CSV: time, principal, units/s) through the window planner.
    Plan(super::sim_plan::Args),
    /// The friendly-VM fluid model (AIMD groups sharing one resource).
    Fvm(super::sim_fvm::Args),
    /// The combining tree of a cluster of gateways, up to 10 000, with lag, loss and kills.
    Cluster(super::sim_cluster::Args),
}

/// Runs the chosen model.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Plan(args) => super::sim_plan::run(args),
        Command::Fvm(args) => super::sim_fvm::run(args),
        Command::Cluster(args) => super::sim_cluster::run(args),
    }
}
