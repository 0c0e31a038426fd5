//! SIGINT and SIGTERM as a flag the loops poll: the handler only stores to an atomic
//! (async-signal-safe), and is installed without `SA_RESTART` so a sleeping loop wakes.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::ProcError;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM and returns the flag it sets.
pub fn install() -> Result<&'static AtomicBool, ProcError> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
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
