//! allot's cluster link: several gateways enforce one agreement set together.
//!
//! The tree logic is pure and lives in `allot_model::cluster`; this crate only carries it:
//! - [`engine`]: the coordination engine behind a small trait (create-if-absent,
//!   update-with-revision, watch, expiry, publish/subscribe), and [`engine::MemEngine`]
//!   for tests of the logic;
//! - [`nats`]: the engine on NATS JetStream (KV buckets) and core NATS subjects;
//! - [`link`]: the per-gateway loop: membership, election of the root with fencing
//!   epochs, the agreement set shared, the per-window messages;
//! - [`config`]: the `[cluster]` table.
//!
//! It makes no admission decision and holds no gateway state: the gateway reads what to
//! enforce from the [`link::LinkStatus`] the loop publishes.
#![deny(missing_docs)]

pub mod config;
pub mod engine;
pub mod link;
pub mod nats;

pub use config::ClusterConfig;
pub use engine::{Bucket, Engine, EngineError, Lifetimes, MemEngine};
pub use link::{run, LinkConfig, LinkError, LinkStatus, Role};
pub use nats::NatsEngine;
