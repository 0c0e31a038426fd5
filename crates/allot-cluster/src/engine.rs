//! The coordination engine behind a small trait: keys that can be created only if absent,
//! updated only at a known revision, watched, and that expire with their bucket's
//! `max_age`; and at-most-once publish/subscribe for the per-window messages. NATS
//! JetStream is the engine in production ([`crate::nats::NatsEngine`]); [`MemEngine`]
//! keeps the same semantics in memory for tests of the logic; etcd would fit the same.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// The key spaces the cluster uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// One key per gateway, expiring unless renewed.
    Members,
    /// The root's key, won by create-if-absent; its revision is the fencing epoch.
    Election,
    /// The agreement set and the mandatory-only plan; never expire.
    Config,
}

impl Bucket {
    /// Every bucket.
    pub const ALL: [Bucket; 3] = [Bucket::Members, Bucket::Election, Bucket::Config];

    /// The bucket's name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Bucket::Members => "members",
            Bucket::Election => "election",
            Bucket::Config => "config",
        }
    }
}

/// One key's value and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value (empty for a deletion seen by a watch).
    pub value: Bytes,
    /// Revision of this value. Every write to a bucket (a put, a create, an update, a
    /// delete) takes the bucket's next revision, so a revision one above another means
    /// nothing else was written to the bucket between them; expiry by age takes none.
    pub revision: u64,
}

/// How long keys live in each bucket (0 = forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// A member's key lives this long after its last renewal.
    pub member: Duration,
    /// The root's key lives this long after its last renewal (its lease).
    pub root: Duration,
}

impl Lifetimes {
    /// The `max_age` of `bucket`; zero means no expiry.
    pub fn of(&self, bucket: Bucket) -> Duration {
        match bucket {
            Bucket::Members => self.member,
            Bucket::Election => self.root,
            Bucket::Config => Duration::ZERO,
        }
    }
}

/// What the engine could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot be reached, refused us, or failed.
    #[error("coordination engine: {0}")]
    Unavailable(String),
}

/// A coordination engine.
pub trait Engine: Clone + Send + Sync + 'static {
    /// Creates `key` with `value` if absent: its revision, or `None` if it exists.
    fn create(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<Option<u64>, EngineError>> + Send;
    /// Replaces `key`'s value if its revision is still `revision`: the new revision, or
    /// `None` if the key changed or expired meanwhile.
    fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> impl Future<Output = Result<Option<u64>, EngineError>> + Send;
    /// Sets `key` whatever it holds: the new revision.
    fn put(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<u64, EngineError>> + Send;
    /// `key`'s live value, if any.
    fn get(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> impl Future<Output = Result<Option<Entry>, EngineError>> + Send;
    /// Every live key of `bucket`.
    fn entries(
        &self,
        bucket: Bucket,
    ) -> impl Future<Output = Result<Vec<Entry>, EngineError>> + Send;
    /// Removes `key` (a member leaving).
    fn delete(
        &self,
        bucket: Bucket,
        key: &str,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// Every put to `bucket` from now on (expiry by age is not announced: readers check
    /// ages themselves).
    fn watch(
        &self,
        bucket: Bucket,
    ) -> impl Future<Output = Result<mpsc::Receiver<Entry>, EngineError>> + Send;
    /// Sends `payload` on `subject`, at most once.
    fn publish(
        &self,
        subject: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// Messages on `subject` from now on; dropping the receiver unsubscribes.
    fn subscribe(
        &self,
        subject: &str,
    ) -> impl Future<Output = Result<mpsc::Receiver<Bytes>, EngineError>> + Send;
    /// How many times the connection to the engine was lost so far (a count: the
    /// messages of those moments were lost together); 0 for an engine without one.
    fn interruptions(&self) -> u64 {
        0
    }
}

/// Depth of each watch and subscription channel; a slow reader loses messages beyond it
/// (they are at most once anyway).
const CHANNEL_DEPTH: usize = 1024;

#[derive(Debug, Default)]
struct MemState {
    /// Each bucket's last revision (a bucket is one stream: its own sequence).
    revisions: HashMap<Bucket, u64>,
    keys: HashMap<(Bucket, String), (Entry, tokio::time::Instant)>,
    watchers: Vec<(Bucket, mpsc::Sender<Entry>)>,
    subscribers: HashMap<String, Vec<mpsc::Sender<Bytes>>>,
    /// Subjects whose messages are dropped (tests of loss and partitions).
    muted: Vec<String>,
    /// Key-value requests wait until this instant (an engine electing a leader).
    stalled_until: Option<tokio::time::Instant>,
}

/// The engine in memory, with the same semantics as the real one: revisions, expiry by
/// age (on tokio's clock, so tests can pause time), at-most-once delivery.
#[derive(Debug, Clone)]
pub struct MemEngine {
    lifetimes: Lifetimes,
    state: Arc<Mutex<MemState>>,
}

impl MemEngine {
    /// An empty engine whose buckets expire keys after `lifetimes`.
    pub fn new(lifetimes: Lifetimes) -> MemEngine {
        MemEngine {
            lifetimes,
            state: Arc::default(),
        }
    }

    /// Drops every message published on a subject starting with `prefix` until
    /// [`MemEngine::unmute`].
    pub fn mute(&self, prefix: &str) {
        self.lock().muted.push(prefix.to_string());
    }

    /// Holds every key-value request (create, update, put, get, entries, delete) until
    /// `until`, as an engine electing a new leader does; messages still flow.
    pub fn stall_keys(&self, until: tokio::time::Instant) {
        self.lock().stalled_until = Some(until);
    }

    async fn keys_ready(&self) {
        let until = self.lock().stalled_until;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Delivers messages on `prefix` again.
    pub fn unmute(&self, prefix: &str) {
        self.lock().muted.retain(|m| m != prefix);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, state: &mut MemState, bucket: Bucket, key: &str) -> Option<Entry> {
        let max_age = self.lifetimes.of(bucket);
        let k = (bucket, key.to_string());
        let expired = state
            .keys
            .get(&k)
            .is_some_and(|(_, at)| !max_age.is_zero() && at.elapsed() >= max_age);
        if expired {
            state.keys.remove(&k);
        }
        state.keys.get(&k).map(|(e, _)| e.clone())
    }

    fn write(&self, state: &mut MemState, bucket: Bucket, key: &str, value: Bytes) -> u64 {
        let revision = state.revisions.entry(bucket).or_default();
        *revision += 1;
        let revision = *revision;
        let entry = Entry {
            key: key.to_string(),
            value,
            revision,
        };
        state.watchers.retain(|(b, tx)| {
            if *b == bucket {
                !matches!(
                    tx.try_send(entry.clone()),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            } else {
                !tx.is_closed()
            }
        });
        state.keys.insert(
            (bucket, key.to_string()),
            (entry, tokio::time::Instant::now()),
        );
        revision
    }
}

impl Engine for MemEngine {
    async fn create(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
    ) -> Result<Option<u64>, EngineError> {
        self.keys_ready().await;
        let mut s = self.lock();
        if self.live(&mut s, bucket, key).is_some() {
            return Ok(None);
        }
        Ok(Some(self.write(&mut s, bucket, key, value)))
    }

    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, EngineError> {
        self.keys_ready().await;
        let mut s = self.lock();
        match self.live(&mut s, bucket, key) {
            Some(e) if e.revision == revision => Ok(Some(self.write(&mut s, bucket, key, value))),
            _ => Ok(None),
        }
    }

    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<u64, EngineError> {
        self.keys_ready().await;
        let mut s = self.lock();
        Ok(self.write(&mut s, bucket, key, value))
    }

    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Entry>, EngineError> {
        self.keys_ready().await;
        let mut s = self.lock();
        Ok(self.live(&mut s, bucket, key))
    }

    async fn entries(&self, bucket: Bucket) -> Result<Vec<Entry>, EngineError> {
        self.keys_ready().await;
        let mut s = self.lock();
        let keys: Vec<String> = s
            .keys
            .keys()
            .filter(|(b, _)| *b == bucket)
            .map(|(_, k)| k.clone())
            .collect();
        let mut out: Vec<Entry> = keys
            .iter()
            .filter_map(|k| self.live(&mut s, bucket, k))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), EngineError> {
        self.keys_ready().await;
        self.lock().keys.remove(&(bucket, key.to_string()));
        Ok(())
    }

    async fn watch(&self, bucket: Bucket) -> Result<mpsc::Receiver<Entry>, EngineError> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        self.lock().watchers.push((bucket, tx));
        Ok(rx)
    }

    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EngineError> {
        let mut s = self.lock();
        if s.muted.iter().any(|m| subject.starts_with(m.as_str())) {
            return Ok(());
        }
        if let Some(subs) = s.subscribers.get_mut(subject) {
            subs.retain(|tx| {
                !matches!(
                    tx.try_send(payload.clone()),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            });
        }
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<mpsc::Receiver<Bytes>, EngineError> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        self.lock()
            .subscribers
            .entry(subject.to_string())
            .or_default()
            .push(tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> MemEngine {
        MemEngine::new(Lifetimes {
            member: Duration::from_secs(1),
            root: Duration::from_millis(200),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn create_if_absent_wins_once_and_update_needs_the_current_revision() {
        let e = engine();
        let first = e
            .create(Bucket::Election, "root", Bytes::from_static(b"a"))
            .await
            .expect("engine");
        let rev = first.expect("created");
        assert_eq!(
            e.create(Bucket::Election, "root", Bytes::from_static(b"b"))
                .await
                .expect("engine"),
            None
        );
        let next = e
            .update(Bucket::Election, "root", Bytes::from_static(b"a"), rev)
            .await
            .expect("engine")
            .expect("current revision");
        assert!(next > rev);
        assert_eq!(
            e.update(Bucket::Election, "root", Bytes::from_static(b"c"), rev)
                .await
                .expect("engine"),
            None,
            "a stale revision is refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keys_expire_with_their_bucket_age_unless_renewed() {
        let e = engine();
        let rev = e
            .create(Bucket::Election, "root", Bytes::from_static(b"a"))
            .await
            .expect("engine")
            .expect("created");
        tokio::time::advance(Duration::from_millis(150)).await;
        let rev = e
            .update(Bucket::Election, "root", Bytes::from_static(b"a"), rev)
            .await
            .expect("engine")
            .expect("renewed in time");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(e
            .get(Bucket::Election, "root")
            .await
            .expect("engine")
            .is_some());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(e
            .get(Bucket::Election, "root")
            .await
            .expect("engine")
            .is_none());
        let later = e
            .create(Bucket::Election, "root", Bytes::from_static(b"b"))
            .await
            .expect("engine")
            .expect("created again once expired");
        assert!(later > rev, "a new election has a higher epoch");
    }
}
