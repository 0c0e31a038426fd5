//! allot's gateway: the mechanism around the model's policy.
//!
//! Listeners accept and parse request heads (registration), the model's rule chains
//! classify them, the class's actuators admit, queue or refuse, a dispatcher sends
//! queued requests to back-end pools within the caps on running requests, and responses
//! pass through bandwidth groups on their way back. Sensors record every step.
//!
//! Layout, one job per module:
//! - [`config`]: the TOML configuration, validated with file/line/key errors;
//! - [`state`]: the live gateway and the one way it changes ([`Gateway::apply`]);
//! - `service`: one request's path; `sched`: queues, caps and permits;
//! - `upstream`: back-end pools, balancing, passive health; `body`: streamed bodies,
//!   shaping; `conn`: head and idle timeouts on client sockets;
//! - [`server`]: accept loops with graceful shutdown; `admin`, `metrics`: the admin API;
//! - [`stats`]: sensors and their snapshots;
//! - [`qos`]: the QoS manager's feedback loops (`[[controller]]`).
//! - [`agreements`]: sharing agreements, planned every window and enforced as credits.
#![deny(missing_docs)]

mod admin;
pub mod agreements;
mod body;
mod clock;
pub mod config;
mod conn;
mod metrics;
pub mod qos;
mod sched;
pub mod server;
mod service;
pub mod state;
pub mod stats;
mod upstream;

pub use config::{Config, ConfigError};
pub use state::Gateway;
