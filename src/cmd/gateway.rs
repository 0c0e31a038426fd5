//! `allot gateway`: run the HTTP gateway from a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use allot_gateway::{server, Config, Gateway};
use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

/// Flags of `allot gateway`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML; see docs/configuration.md).
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the configuration and exit: 0 if valid, 2 with the error if not.
    #[arg(long)]
    check: bool,
    /// Worker threads (default: one per CPU). `1` runs everything on one thread.
    #[arg(long)]
    threads: Option<usize>,
}

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP reloads the configuration.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    if args.check {
        println!(
            "{}: ok ({} classes, {} back ends, {} chains)",
            args.config.display(),
            config.class.len(),
            config.backend.len(),
            config.chain.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = super::runtime(args.threads)?;
    runtime.block_on(serve(config, args.config))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    // Signal handlers first: from the moment the gateway says it listens, SIGHUP reloads
    // and SIGTERM stops it gracefully, never the signals' default (ending the process).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let listeners = server::bind_all(&config).await?;
    let admin = server::bind(config.admin.address).await?;
    let admin_addr = admin.local_addr()?;
    // `gateway=` is the first listener; every listener also by its name.
    let mut addresses = Vec::with_capacity(listeners.len());
    for (l, bound) in config.listeners().zip(&listeners) {
        addresses.push((l.name(), bound.local_addr()?));
    }
    let gateway_addr = addresses.first().map(|(_, a)| *a).context("no listener")?;
    if config.admin.resolved_token().is_none() {
        tracing::warn!(
            "no admin token: the admin API is read-only (set admin.token or ALLOT_ADMIN_TOKEN)"
        );
    }
    let gw = Gateway::new(config).context("starting the gateway")?;
    let reload = tokio::spawn(reload_on_hangup(gw.clone(), path, hup));
    let reopen = tokio::spawn(reopen_on_usr1(gw.clone(), usr1));
    // One machine-readable line, so scripts and tests learn ports chosen at run time:
    // `gateway=` (the first listener), `admin=`, then `listener.NAME=` for each listener
    // whose name has no spaces.
    let mut line = format!("listening gateway={gateway_addr} admin={admin_addr}");
    for (name, addr) in &addresses {
        if !name.contains(char::is_whitespace) {
            line.push_str(&format!(" listener.{name}={addr}"));
        }
        tracing::info!(listener = %name, %addr, "listening");
    }
    println!("{line}");
    tracing::info!(%admin_addr, "admin API listening");
    let stop = async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    };
    let served = server::run(gw, listeners, Some(admin), stop).await;
    reload.abort();
    reopen.abort();
    served.context("the gateway stopped")
}

/// SIGHUP: read the file again; a valid one takes effect at once, a broken one is logged
/// and the configuration in force is kept.
async fn reload_on_hangup(gw: Gateway, path: PathBuf, mut hup: tokio::signal::unix::Signal) {
    while hup.recv().await.is_some() {
        match Config::load(&path).and_then(|c| gw.apply(c)) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the configuration in force is kept")
            }
        }
    }
}

/// SIGUSR1: reopen the access log (logrotate has moved it).
async fn reopen_on_usr1(gw: Gateway, mut usr1: tokio::signal::unix::Signal) {
    while usr1.recv().await.is_some() {
        gw.reopen_logs();
        tracing::info!("SIGUSR1: access log reopened");
    }
}
