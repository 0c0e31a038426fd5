//! allot's policy, apart from its mechanism.
//!
//! Everything here is pure: no sockets, no signals, no `/proc`, no clock. Time is passed
//! in as [`Nanos`] since an origin the caller picks, so every decision can be tested by
//! value. The gateway, the process scheduler and the binary sense the world, ask this
//! crate what to do, and act.
//!
//! Layout, one job per module:
//! - [`time`]: the instant type every decision takes.
//! - [`classify`]: the gateway's ordered rule chains (request → class).
//! - [`queue`]: one class's queue between registration and service, and its policies.
//! - [`dispatch`]: which class's queue is served next (priority, then ratio).
//! - [`bucket`]: token buckets for accept rates and bandwidth groups.
#![deny(missing_docs)]

pub mod bucket;
pub mod classify;
pub mod dispatch;
pub mod queue;
pub mod time;

pub use time::Nanos;
