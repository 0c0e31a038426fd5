//! allot's process groups: the mechanism behind `allot cpu` and `allot adapt`.
//!
//! Reads `/proc`, keeps group membership fresh, and stops and continues members on the
//! model's decisions, never signalling a process that is not a member. Policy (ALPS,
//! the slowdown signal, AIMD) lives in `allot-model`; this crate senses and acts.
//!
//! Layout, one job per module:
//! - [`affinity`]: keeping the scheduler off CPUs its members are pinned to.
//! - [`procfs`]: parse `/proc/PID/stat`, `schedstat`; snapshots of all processes.
//! - [`handle`]: one member process: open `/proc` files, pidfd, safe signalling.
//! - [`selector`]: PID, tree, user and command-regex selectors.
//! - [`group`]: a principal's members, refreshed; their CPU time counted together.
//! - [`stopped`]: the stopped set, its state file, the guard, and `resume`.
//! - [`timer`]: sleeping to absolute deadlines.
//! - [`shutdown`]: the signals that end allot, as a flag.
//! - [`cgroup`]: the kernel back end (child cgroups weighted by shares).
//! - [`probe`]: the slowdown probe (built-in work unit or a command).
//! - [`scheduler`]: the ALPS loop (`allot cpu`).
//! - [`adapt`]: the AIMD loop (`allot adapt`).
#![deny(missing_docs)]

pub mod adapt;
pub mod affinity;
pub mod cgroup;
pub mod error;
pub mod group;
pub mod handle;
pub mod probe;
pub mod procfs;
pub mod scheduler;
pub mod selector;
pub mod shutdown;
pub mod stopped;
pub mod timer;

pub use error::ProcError;
