//! allot's process groups: the mechanism behind `allot cpu` and `allot adapt`.
//!
//! Reads `/proc`, keeps group membership fresh, and stops and continues members on the
//! model's decisions, never signalling a process that is not a member.
#![deny(missing_docs)]
