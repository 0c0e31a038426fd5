//! `allot`: one binary, one subcommand per job. `main` parses flags and dispatches; each
//! job lives in its own module under `cmd/`.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cmd;

/// The version and the commit it was built from (see build.rs).
pub const VERSION: &str = env!("ALLOT_VERSION_LONG");

/// Quality of service and sharing agreements for servers and process groups that were
/// never written for it.
#[derive(Debug, Parser)]
#[command(name = "allot", version = VERSION, about)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: cmd::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a short, self-contained demonstration of the gateway under overload.
    Demo(cmd::demo::Args),
    /// Run the HTTP gateway in front of unmodified back ends.
    Gateway(cmd::gateway::Args),
    /// Change a running gateway through its admin API (rules, actuators).
    Ctl(cmd::ctl::Args),
    /// Print a running gateway's sensors as a table: totals and rates per second.
    Stat(cmd::stat::Args),
    /// A live terminal dashboard of a running gateway (over its admin API).
    Top(cmd::top::Args),
    /// Solve the agreement planner once and print the allocation.
    Plan(cmd::plan::Args),
    /// Models for analysis: replay a demand trace, or the friendly-VM fluid model.
    #[command(subcommand)]
    Sim(cmd::sim::Command),
    /// Proportional CPU shares for groups of processes (user-level, SIGSTOP/SIGCONT).
    Cpu(cmd::cpu::Args),
    /// Friendly adaptation: AIMD on a group's running processes from a slowdown signal.
    Adapt(cmd::adapt::Args),
    /// Print shell completions (bash, zsh, fish, …) generated from these flags.
    Completions(cmd::completions::CompletionsArgs),
    /// Print the man page (roff) generated from these flags.
    Man(cmd::completions::ManArgs),
    /// A synthetic HTTP back end (fixed workers and service time) for demos, tests and benchmarks.
    #[command(hide = true)]
    Backend(cmd::backend::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Gateway(args) => cmd::gateway::run(args),
        Command::Ctl(args) => cmd::ctl::run(args),
        Command::Stat(args) => cmd::stat::run(args),
        Command::Top(args) => cmd::top::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Sim(command) => cmd::sim::run(command),
        Command::Cpu(args) => cmd::cpu::run(args),
        Command::Adapt(args) => cmd::adapt::run(args),
        Command::Backend(args) => cmd::backend::run(args),
        Command::Completions(args) => cmd::completions::completions(args, Cli::command()),
        Command::Man(args) => cmd::completions::man(args, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("allot: {err:#}");
            ExitCode::from(2)
        }
    }
}
