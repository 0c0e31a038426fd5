//! allot's gateway: the mechanism around the model's policy.
//!
//! Listeners accept and parse request heads (registration), the model's rule chains
//! classify them, the class's actuators admit, queue or refuse, a dispatcher sends
//! queued requests to back-end pools within the caps on running requests, and responses
//! pass through bandwidth groups on their way back. Sensors record every step.
#![deny(missing_docs)]
