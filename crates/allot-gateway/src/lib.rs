//! allot's gateway: the mechanism around the model's policy.
//!
//! Listeners accept and parse request heads (registration), the model's rule chains
//! classify them, the class's actuators admit, queue or refuse, a dispatcher sends
//! queued requests to back-end pools within the caps on running requests, and responses
//! pass through bandwidth groups on their way back. Sensors record every step. It decides
//! nothing itself that the model can decide: the model's code is called with the time
//! passed in.
//!
//! Layout, one job per module, each importing only those above it:
//! - [`clock`]: the one clock, as the model's time;
//! - [`config`]: the file's schema and its validation (the leaf: imports nothing here);
//! - [`cluster`]: what the gateway and its cluster link share (demand up, quota down);
//! - [`stats`]: sensors and their snapshots;
//! - [`sched`]: class queues, the caps on running requests, and service permits;
//! - [`shape`]: bandwidth groups;
//! - [`access`]: the access log, written by a task of its own;
//! - [`credit`]: sharing agreements as credit per principal;
//! - [`upstream`]: back-end pools, balancing, passive health, the request body sent on;
//! - [`runtime`]: the live state as one snapshot, swapped whole on every change;
//! - [`admission`]: accept rate, credit and a slot, alike for requests and connections;
//! - [`http`]: the L7 path as small steps, and the one map from answers to responses;
//! - [`tcp`]: the L4 path: inspect, classify, admit, connect, copy both ways; FTP;
//! - [`control`]: the supervisor of every loop (agreement windows, QoS controllers);
//! - [`gateway`]: the gateway as the binary holds it (live state and supervisor);
//! - [`admin`]: the admin API and the metrics;
//! - [`server`]: the listeners, their caps and graceful shutdown.
#![deny(missing_docs)]

pub mod access;
pub mod admin;
pub mod admission;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod credit;
pub mod gateway;
pub mod http;
pub mod runtime;
pub mod sched;
pub mod server;
pub mod shape;
pub mod stats;
pub mod tcp;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use gateway::Gateway;
