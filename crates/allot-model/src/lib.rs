//! allot's policy, apart from its mechanism.
//!
//! Everything here is pure: no sockets, no signals, no `/proc`, no clock. Time is passed
//! in as [`Nanos`] since an origin the caller picks, so every decision can be tested by
//! value. The gateway, the process scheduler and the binary sense the world, ask this
//! crate what to do, and act.
//!
//! Layout, one job per module:
//! - [`time`]: the instant type every decision takes.
//! - [`agreements`]: principals, agreements, and the access levels (MI/OI/MC/OC) they imply.
//! - [`planner`]: the per-window linear program (community and provider objectives).
#![deny(missing_docs)]

pub mod agreements;
pub mod planner;
pub mod time;

pub use time::Nanos;
