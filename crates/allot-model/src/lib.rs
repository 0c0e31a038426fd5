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
//! - [`ewma`], [`slowdown`], [`aimd`]: the feedback-control pieces (FVM paper).
//! - [`pi`], [`gradient`], [`utilisation`]: the QoS manager's controllers (PI delay
//!   guarantee, Envoy's gradient rule, two-level utilisation control).
//! - [`alps`]: basic and optimised ALPS decisions with the I/O rule.
//! - [`police`]: finding groups that do not back off when congested (FVM section 4).
//! - [`fvm`]: the FVM fluid model (section 3, eqs. 3–7).
//! - [`accuracy`]: relative error, RMS, fairness indices.
//! - [`agreements`]: principals, agreements, and the access levels (MI/OI/MC/OC) they imply.
//! - [`planner`]: the per-window linear program (community and provider objectives).
//! - [`cluster`]: several gateways enforcing one agreement set (the combining tree).
#![deny(missing_docs)]

pub mod accuracy;
pub mod agreements;
pub mod aimd;
pub mod alps;
pub mod bucket;
pub mod classify;
pub mod cluster;
pub mod dispatch;
pub mod ewma;
pub mod fvm;
pub mod gradient;
pub mod pi;
pub mod planner;
pub mod police;
pub mod queue;
pub mod slowdown;
pub mod time;
pub mod utilisation;

pub use time::Nanos;
