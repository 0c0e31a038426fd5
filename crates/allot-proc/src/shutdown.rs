//! Every signal that would end allot by default and that a user or the terminal sends —
//! SIGINT, SIGTERM, SIGHUP (the terminal closed), SIGQUIT — as a flag the loops poll, so
//! the members are continued before allot exits. The handler only stores to an atomic
//! (async-signal-safe), and is installed without `SA_RESTART` so a sleeping loop wakes.
//! (SIGPIPE is ignored by the Rust runtime: a closed output shows up as a write error,
//! which the commands turn into an orderly end.)

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::ProcError;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT, SIGTERM, SIGHUP and SIGQUIT and returns the flag it
/// sets.
pub fn install() -> Result<&'static AtomicBool, ProcError> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(|e| ProcError::Sys {
            what: format!("install a {sig} handler"),
            source: e,
        })?;
    }
    Ok(&REQUESTED)
}

/// The signal that asked for shutdown, if any.
pub fn received() -> Option<Signal> {
    Signal::try_from(SIGNAL.load(Ordering::SeqCst)).ok()
}
