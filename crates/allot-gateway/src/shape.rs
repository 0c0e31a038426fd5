//! Bandwidth groups: bytes per second shared by every response of the group's classes.
//! One lock per group (held for one bucket update per chunk), never one for all requests.

use std::sync::Mutex;
use std::time::Duration;

use allot_model::bucket::TokenBucket;
use allot_model::Nanos;

/// A shared output-bandwidth group, kept for its life across reloads.
#[derive(Debug)]
pub struct BandwidthGroup {
    bucket: Mutex<TokenBucket>,
}

impl BandwidthGroup {
    /// A group of `bytes_per_sec` with room for `burst_bytes` at once, full at `now`.
    pub fn new(bytes_per_sec: f64, burst_bytes: f64, now: Nanos) -> BandwidthGroup {
        BandwidthGroup {
            bucket: Mutex::new(TokenBucket::new(bytes_per_sec, burst_bytes, now)),
        }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the rate and burst, keeping the bytes earned so far.
    pub fn set_rate(&self, bytes_per_sec: f64, burst_bytes: f64, now: Nanos) {
        self.bucket().set_rate(bytes_per_sec, burst_bytes, now);
    }

    /// Takes `bytes` from the group at `now`; returns how long to wait before sending them.
    pub fn reserve(&self, bytes: u64, now: Nanos) -> Duration {
        self.bucket().reserve(bytes as f64, now)
    }
}
