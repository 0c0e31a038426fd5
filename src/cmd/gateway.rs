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
    let listener = server::bind(config.listener.address).await?;
    let admin = server::bind(config.admin.address).await?;
    let gateway_addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    if config.admin.resolved_token().is_none() {
        tracing::warn!(
            "no admin token: the admin API is read-only (set admin.token or ALLOT_ADMIN_TOKEN)"
        );
    }
    let gw = Gateway::new(config).context("starting the gateway")?;
    // One machine-readable line, so scripts and tests learn ports chosen at run time.
    println!("listening gateway={gateway_addr} admin={admin_addr}");
    tracing::info!(%gateway_addr, %admin_addr, "gateway listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_task = tokio::spawn(server::serve_admin(
        gw.clone(),
        admin,
        stopped(stop_rx.clone()),
    ));
    let reload_task = tokio::spawn(reload_on_hangup(gw.clone(), path));
    let serve_task = tokio::spawn(server::serve(gw.clone(), listener, stopped(stop_rx)));

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    let _ = stop_tx.send(true);
    reload_task.abort();
    let _ = serve_task.await;
    let _ = admin_task.await;
    Ok(())
}

/// SIGHUP: read the file again; a valid one takes effect at once, a broken one is logged
/// and the configuration in force is kept.
async fn reload_on_hangup(gw: Gateway, path: PathBuf) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler: reload is unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        match Config::load(&path).and_then(|c| gw.apply(c)) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the configuration in force is kept")
            }
        }
    }
}
