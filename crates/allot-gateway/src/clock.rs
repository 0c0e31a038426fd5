//! The gateway's one clock: nanoseconds since the process first asked, as the model's
//! [`Nanos`]. Read once per event at the edges; the model never reads it.

use std::sync::OnceLock;

use allot_model::Nanos;
use tokio::time::Instant;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Now, as the model's time.
pub fn now() -> Nanos {
    to_nanos(Instant::now())
}

/// An instant as the model's time.
pub fn to_nanos(at: Instant) -> Nanos {
    Nanos(u64::try_from(at.saturating_duration_since(origin()).as_nanos()).unwrap_or(u64::MAX))
}

/// The model's time as an instant.
pub fn to_instant(at: Nanos) -> Instant {
    origin() + std::time::Duration::from_nanos(at.0)
}

/// Now, in nanoseconds since the Unix epoch (the wall clock; 0 before 1970).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
