//! `allot gateway`: run the gateway from a configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use allot_gateway::config::diff::diff;
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
    /// With --check: print the effective configuration, every default filled in
    /// (secrets redacted).
    #[arg(long, requires = "check")]
    print: bool,
    /// Listen here instead of the file's (first) listener address.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve the admin API here instead of the file's address.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Worker threads (default: one per CPU). `1` runs everything on one thread.
    #[arg(long)]
    threads: Option<usize>,
}

/// Runs the gateway until SIGINT or SIGTERM; SIGHUP reloads the configuration.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: args.listen,
        admin: args.admin,
    };
    let config = overrides.load(&args.config)?;
    if args.check {
        if args.print {
            print!("{}", config.to_toml()?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{}: ok ({} listeners, {} classes, {} back ends, {} chains)",
            args.config.display(),
            config.listener.0.len(),
            config.class.len(),
            config.backend.len(),
            config.chain.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = super::runtime(args.threads)?;
    runtime.block_on(serve(config, args.config, overrides))?;
    Ok(ExitCode::SUCCESS)
}

/// Addresses given on the command line, put over the file's at every load.
#[derive(Debug, Clone, Copy)]
struct Overrides {
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl Overrides {
    fn load(&self, path: &std::path::Path) -> anyhow::Result<Config> {
        let mut config = Config::load(path)?;
        if let Some(a) = self.listen {
            if let Some(first) = config.listener.0.first_mut() {
                first.get_mut().address = a;
            }
        }
        if let Some(a) = self.admin {
            config.admin.address = a;
        }
        Ok(config)
    }
}

async fn serve(config: Config, path: PathBuf, overrides: Overrides) -> anyhow::Result<()> {
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
    let from_file = Arc::new(Mutex::new(config.clone()));
    let gw = Gateway::new(config).context("starting the gateway")?;
    let reload = tokio::spawn(reload_on_hangup(
        gw.clone(),
        path,
        overrides,
        from_file,
        hup,
    ));
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
/// and the configuration in force is kept. Each run-time change (made through the admin
/// API since the file was last read) that the file now replaces is logged.
async fn reload_on_hangup(
    gw: Gateway,
    path: PathBuf,
    overrides: Overrides,
    from_file: Arc<Mutex<Config>>,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        let loaded = match overrides.load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload refused; the configuration in force is kept");
                continue;
            }
        };
        let in_force = gw.runtime().config.clone();
        let last_file = from_file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let run_time: Vec<String> = diff(&last_file, &in_force)
            .into_iter()
            .map(|c| c.key)
            .collect();
        let replaced: Vec<_> = diff(&in_force, &loaded)
            .into_iter()
            .filter(|c| {
                run_time
                    .iter()
                    .any(|k| c.key == *k || c.key.starts_with(&format!("{k}.")))
            })
            .collect();
        match gw.apply(loaded.clone()) {
            Ok(()) => {
                for change in &replaced {
                    tracing::info!(change = %change, "a run-time change is replaced by the file");
                }
                *from_file.lock().unwrap_or_else(|p| p.into_inner()) = loaded;
                tracing::info!(config = %path.display(), "configuration reloaded")
            }
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
