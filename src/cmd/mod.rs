//! One module per subcommand. Each exposes `Args` (clap) and `run(Args) -> Result<ExitCode>`.

pub mod adapt;
pub mod admin_client;
pub mod backend;
pub mod completions;
pub mod cpu;
pub mod ctl;
pub mod demo;
pub mod gateway;
pub mod plan;
pub mod plot;
pub mod sim;
pub mod sim_cluster;
pub mod sim_fvm;
pub mod sim_plan;
pub mod stat;
pub mod top;
pub mod top_view;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

/// Colour (and other ANSI styling) only on a terminal, and never with `NO_COLOR` set to
/// anything but the empty string.
pub fn colour_allowed(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets up `tracing` on standard error; `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_allowed(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A tokio runtime with `threads` workers (default: one per CPU); one thread runs on the
/// current thread, with no hand-offs between threads.
pub fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let built = match threads {
        Some(0) => anyhow::bail!("--threads: expected an integer ≥ 1, got 0"),
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    built.map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}
