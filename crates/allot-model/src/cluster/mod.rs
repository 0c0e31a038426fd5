//! Several gateways, one agreement set: the combining tree's logic (paper §3.2).
//!
//! - [`shape`]: who reports to whom, from the membership list and the elected root.
//! - [`node`]: one node's per-window step: demand up, the plan at the root, quotas down
//!   split by demand, staleness, epochs, fallback to the mandatory-only plan.
//!
//! Pure like the rest of the crate: the shells (`allot-cluster` on NATS, `allot sim
//! cluster` for 10 000 simulated gateways) carry the messages and tell the time, as
//! window numbers.

pub mod node;
pub mod shape;

pub use node::{
    mandatory_plan, Enforcement, Ignored, Node, Outgoing, QuotaPart, Quotas, Report, Source,
    CHILD_SILENT_WINDOWS, ENGINE_FAILED_WINDOWS, LEAD_WINDOWS, PARENT_SILENT_WINDOWS,
    REJOIN_WINDOWS, REPEAT_CHANGE, STALE_WINDOWS,
};
pub use shape::{Position, Shape, ShapeError};

#[cfg(test)]
mod tests;
