//! One class's queue, between registration and service.
//!
//! The admission-control paper (admission-control-www-servers, "Scheduling Policies")
//! blocks each request after its head is parsed and lets a scheduling policy choose which
//! waiting request is served when a slot frees: FIFO, Shortest-File-First and Batch
//! Processing (most recently served document first). Those are [`Policy::Fifo`],
//! [`Policy::ShortestFirst`] and [`Policy::Locality`] here; [`Policy::Share`] adds fair
//! queuing across clients. Every policy has an age bound: an entry older than
//! [`QueueConfig::age_bound`] is served first, oldest first, so nothing starves.
//!
//! All operations are O(log n) in the queue length, or amortised O(1).

use crate::time::Nanos;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::Duration;

/// How many paths a queue remembers response sizes for (least recently observed
/// forgotten first).
pub const SIZE_MEMORY_PATHS: usize = 4096;

/// Weight of a new observation in a path's moving average of response sizes.
const SIZE_EWMA_ALPHA: f64 = 0.25;

/// The median of known sizes is recomputed at most once per this many observations (and
/// on every change while fewer paths than this are known).
const MEDIAN_REFRESH_OBSERVATIONS: usize = 32;

/// Which waiting request a class serves next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Arrival order.
    #[default]
    Fifo,
    /// Smallest expected response first (the paper's Shortest-File-First); sizes are
    /// learned per path from earlier responses ([`ClassQueue::observe_size`]).
    ShortestFirst,
    /// Requests for the path most recently served first, to keep the back end's caches
    /// warm (the paper's Batch Processing); otherwise arrival order.
    Locality,
    /// Round robin across clients (flows = client addresses), arrival order within a
    /// client, so that one client cannot take a whole class.
    Share,
}

/// A class queue's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// The ordering policy.
    pub policy: Policy,
    /// At most this many entries wait; a push beyond is refused with [`Full`].
    pub limit: usize,
    /// An entry that has waited longer than this is served before any other, oldest first.
    pub age_bound: Duration,
}

/// Identifies a queued entry, for [`ClassQueue::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// A push refused because the queue is at its limit; the item is handed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full<T>(pub T);

/// One waiting request.
#[derive(Debug)]
struct Entry<T> {
    item: T,
    queued_at: Nanos,
    /// Expected response size in bytes, fixed at push time.
    size_bytes: u64,
    path: PathKey,
    flow: IpAddr,
}

/// A path, hashed: the queue only needs to tell paths apart, and a 64-bit collision only
/// changes an order preference, never loses an entry.
type PathKey = u64;

fn path_key(path: &str) -> PathKey {
    // `DefaultHasher::new()` has fixed keys, so keys are stable within a process.
    let mut h = DefaultHasher::new();
    path.hash(&mut h);
    h.finish()
}

/// A client's entries under [`Policy::Share`].
#[derive(Debug, Default)]
struct Flow {
    seqs: BTreeSet<u64>,
}

/// The policy's own index over the entries (all of them keyed by sequence number).
#[derive(Debug)]
enum Index {
    Fifo,
    Shortest(BTreeSet<(u64, u64)>),
    Locality {
        by_path: HashMap<PathKey, BTreeSet<u64>>,
        last_path: Option<PathKey>,
    },
    Share {
        /// Every flow in the ring, each once; a flow emptied by a removal stays (stale)
        /// until the ring reaches it or a compaction drops it.
        flows: HashMap<IpAddr, Flow>,
        ring: VecDeque<IpAddr>,
        stale: usize,
    },
}

impl Index {
    fn new(policy: Policy) -> Index {
        match policy {
            Policy::Fifo => Index::Fifo,
            Policy::ShortestFirst => Index::Shortest(BTreeSet::new()),
            Policy::Locality => Index::Locality {
                by_path: HashMap::new(),
                last_path: None,
            },
            Policy::Share => Index::Share {
                flows: HashMap::new(),
                ring: VecDeque::new(),
                stale: 0,
            },
        }
    }

    fn insert<T>(&mut self, seq: u64, e: &Entry<T>) {
        match self {
            Index::Fifo => {}
            Index::Shortest(set) => {
                set.insert((e.size_bytes, seq));
            }
            Index::Locality { by_path, .. } => {
                by_path.entry(e.path).or_default().insert(seq);
            }
            Index::Share {
                flows, ring, stale, ..
            } => match flows.get_mut(&e.flow) {
                Some(flow) => {
                    if flow.seqs.is_empty() {
                        // A stale flow comes back to life in its old ring position.
                        *stale -= 1;
                    }
                    flow.seqs.insert(seq);
                }
                None => {
                    let mut flow = Flow::default();
                    flow.seqs.insert(seq);
                    flows.insert(e.flow, flow);
                    ring.push_back(e.flow);
                }
            },
        }
    }

    fn remove<T>(&mut self, seq: u64, e: &Entry<T>) {
        match self {
            Index::Fifo => {}
            Index::Shortest(set) => {
                set.remove(&(e.size_bytes, seq));
            }
            Index::Locality { by_path, .. } => {
                if let Some(set) = by_path.get_mut(&e.path) {
                    set.remove(&seq);
                    if set.is_empty() {
                        by_path.remove(&e.path);
                    }
                }
            }
            Index::Share {
                flows, ring, stale, ..
            } => {
                if let Some(flow) = flows.get_mut(&e.flow) {
                    if flow.seqs.remove(&seq) && flow.seqs.is_empty() {
                        *stale += 1;
                    }
                }
                // Drop stale flows once they are half the ring: amortised O(1) per removal.
                if *stale > 32 && *stale * 2 > ring.len() {
                    flows.retain(|_, f| !f.seqs.is_empty());
                    ring.retain(|ip| flows.contains_key(ip));
                    *stale = 0;
                }
            }
        }
    }

    /// The sequence number the policy serves next, with `head` the oldest entry's. Under
    /// `Share` this also moves the served flow to the back of the ring.
    fn choose(&mut self, head: u64) -> u64 {
        match self {
            Index::Fifo => head,
            Index::Shortest(set) => set.first().map_or(head, |&(_, seq)| seq),
            Index::Locality { by_path, last_path } => last_path
                .and_then(|p| by_path.get(&p))
                .and_then(|set| set.first().copied())
                .unwrap_or(head),
            Index::Share { flows, ring, stale } => {
                while let Some(ip) = ring.pop_front() {
                    let Some(flow) = flows.get(&ip) else {
                        continue;
                    };
                    let Some(&seq) = flow.seqs.first() else {
                        // Stale: emptied by removals since it was last served.
                        flows.remove(&ip);
                        *stale -= 1;
                        continue;
                    };
                    if flow.seqs.len() == 1 {
                        // Its last entry: the flow leaves the ring (it is not stale).
                        flows.remove(&ip);
                    } else {
                        ring.push_back(ip);
                    }
                    return seq;
                }
                head
            }
        }
    }

    /// Note what was served (for [`Policy::Locality`]).
    fn served<T>(&mut self, e: &Entry<T>) {
        if let Index::Locality { last_path, .. } = self {
            *last_path = Some(e.path);
        }
    }
}

/// What a queue has learned about one path's response sizes.
#[derive(Debug, Clone, Copy)]
struct Learned {
    ewma_bytes: f64,
    /// When it was last observed, in observation ticks; key into `SizeMemory::by_tick`.
    tick: u64,
}

/// A bounded least-recently-observed memory of response sizes per path.
#[derive(Debug)]
struct SizeMemory {
    capacity: usize,
    paths: HashMap<PathKey, Learned>,
    by_tick: BTreeMap<u64, PathKey>,
    tick: u64,
    median_bytes: Option<f64>,
    observations_since_median: usize,
    scratch: Vec<f64>,
}

impl SizeMemory {
    fn new(capacity: usize) -> SizeMemory {
        SizeMemory {
            capacity: capacity.max(1),
            paths: HashMap::new(),
            by_tick: BTreeMap::new(),
            tick: 0,
            median_bytes: None,
            observations_since_median: 0,
            scratch: Vec::new(),
        }
    }

    fn observe(&mut self, key: PathKey, bytes: u64) {
        self.tick += 1;
        let x = bytes as f64;
        match self.paths.get_mut(&key) {
            Some(l) => {
                l.ewma_bytes += SIZE_EWMA_ALPHA * (x - l.ewma_bytes);
                self.by_tick.remove(&l.tick);
                l.tick = self.tick;
            }
            None => {
                if self.paths.len() >= self.capacity {
                    if let Some((_, old)) = self.by_tick.pop_first() {
                        self.paths.remove(&old);
                    }
                }
                self.paths.insert(
                    key,
                    Learned {
                        ewma_bytes: x,
                        tick: self.tick,
                    },
                );
            }
        }
        self.by_tick.insert(self.tick, key);
        self.observations_since_median += 1;
    }

    /// Expected size for `key`: its average if known, else the median of known paths,
    /// else 0 (nothing learned yet: unknown paths tie and keep arrival order).
    fn estimate_bytes(&mut self, key: PathKey) -> u64 {
        if let Some(l) = self.paths.get(&key) {
            return l.ewma_bytes.round() as u64;
        }
        self.median().map_or(0, |m| m.round() as u64)
    }

    fn median(&mut self) -> Option<f64> {
        let dirty = self.observations_since_median > 0;
        if dirty
            && (self.median_bytes.is_none()
                || self.observations_since_median >= MEDIAN_REFRESH_OBSERVATIONS
                || self.paths.len() <= MEDIAN_REFRESH_OBSERVATIONS)
        {
            self.scratch.clear();
            self.scratch
                .extend(self.paths.values().map(|l| l.ewma_bytes));
            self.median_bytes = if self.scratch.is_empty() {
                None
            } else {
                let mid = self.scratch.len() / 2;
                let (_, m, _) = self.scratch.select_nth_unstable_by(mid, f64::total_cmp);
                Some(*m)
            };
            self.observations_since_median = 0;
        }
        self.median_bytes
    }
}

/// One class's queue of waiting requests, ordered by its [`Policy`].
#[derive(Debug)]
pub struct ClassQueue<T> {
    config: QueueConfig,
    next_seq: u64,
    /// The latest enqueue time seen; enqueue times are kept non-decreasing so arrival
    /// order and age order agree even if callers' clocks race slightly.
    last_push: Nanos,
    /// Every entry, in arrival order.
    entries: BTreeMap<u64, Entry<T>>,
    index: Index,
    sizes: SizeMemory,
}

impl<T> ClassQueue<T> {
    /// An empty queue.
    pub fn new(config: QueueConfig) -> Self {
        ClassQueue {
            config,
            next_seq: 0,
            last_push: Nanos::ZERO,
            entries: BTreeMap::new(),
            index: Index::new(config.policy),
            sizes: SizeMemory::new(SIZE_MEMORY_PATHS),
        }
    }

    /// The current settings.
    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// Change the settings at run time; waiting entries are kept (in arrival order when the
    /// policy changes). A lower limit refuses new pushes until the queue drains below it.
    pub fn set_config(&mut self, config: QueueConfig) {
        let policy_changed = config.policy != self.config.policy;
        self.config = config;
        if policy_changed {
            if config.policy == Policy::ShortestFirst {
                // Entries queued under another policy were never sized.
                for e in self.entries.values_mut() {
                    e.size_bytes = self.sizes.estimate_bytes(e.path);
                }
            }
            let mut index = Index::new(config.policy);
            for (&seq, e) in &self.entries {
                index.insert(seq, e);
            }
            self.index = index;
        }
    }

    /// Queue `item` for `path` from client `flow`, at `now`. Refused with the item handed
    /// back when the queue holds `limit` entries already.
    pub fn push(
        &mut self,
        item: T,
        path: &str,
        flow: IpAddr,
        now: Nanos,
    ) -> Result<Ticket, Full<T>> {
        if self.entries.len() >= self.config.limit {
            return Err(Full(item));
        }
        let path = path_key(path);
        let size_bytes = match self.config.policy {
            Policy::ShortestFirst => self.sizes.estimate_bytes(path),
            _ => 0,
        };
        self.last_push = self.last_push.max(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Entry {
            item,
            queued_at: self.last_push,
            size_bytes,
            path,
            flow: flow.to_canonical(),
        };
        self.index.insert(seq, &entry);
        self.entries.insert(seq, entry);
        Ok(Ticket(seq))
    }

    /// The next entry to serve under the policy: an entry older than `age_bound` goes first
    /// (oldest first) so nothing starves. Returns the item and when it was queued.
    pub fn pop(&mut self, now: Nanos) -> Option<(T, Nanos)> {
        let (&head, oldest) = self.entries.first_key_value()?;
        let seq = if now.saturating_since(oldest.queued_at) > self.config.age_bound {
            head
        } else {
            self.index.choose(head)
        };
        let entry = self.entries.remove(&seq)?;
        self.index.remove(seq, &entry);
        self.index.served(&entry);
        Some((entry.item, entry.queued_at))
    }

    /// Take the entry out of the queue (the client gave up or timed out). `None` if it was
    /// already served or removed.
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        let entry = self.entries.remove(&ticket.0)?;
        self.index.remove(ticket.0, &entry);
        Some(entry.item)
    }

    /// The number of waiting entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Enqueue time of the oldest entry.
    pub fn oldest(&self) -> Option<Nanos> {
        self.entries.first_key_value().map(|(_, e)| e.queued_at)
    }

    /// Learn a response's size for `path` (shortest-first); bounded LRU of paths, EWMA per
    /// path. Affects entries pushed from now on.
    pub fn observe_size(&mut self, path: &str, bytes: u64) {
        self.sizes.observe(path_key(path), bytes);
    }

    /// The size [`Policy::ShortestFirst`] would expect now for `path`, in bytes: its
    /// learned average, else the median of known paths, else 0.
    pub fn expected_size_bytes(&mut self, path: &str) -> u64 {
        self.sizes.estimate_bytes(path_key(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn cfg(policy: Policy) -> QueueConfig {
        QueueConfig {
            policy,
            limit: 1000,
            age_bound: Duration::from_secs(10),
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn drain<T>(q: &mut ClassQueue<T>, now: Nanos) -> Vec<T> {
        std::iter::from_fn(|| q.pop(now).map(|(t, _)| t)).collect()
    }

    #[test]
    fn fifo_is_arrival_order() {
        let mut q = ClassQueue::new(cfg(Policy::Fifo));
        for i in 0..5 {
            q.push(i, "/x", ip(1), Nanos(i)).ok();
        }
        assert_eq!(q.len(), 5);
        assert_eq!(q.oldest(), Some(Nanos(0)));
        assert_eq!(q.pop(Nanos(9)), Some((0, Nanos(0))));
        assert_eq!(drain(&mut q, Nanos(9)), vec![1, 2, 3, 4]);
        assert!(q.is_empty());
        assert_eq!(q.pop(Nanos(9)), None);
    }

    #[test]
    fn limit_refuses_and_hands_back() {
        let mut q = ClassQueue::new(QueueConfig {
            limit: 2,
            ..cfg(Policy::Fifo)
        });
        assert!(q.push("a", "/", ip(1), Nanos(0)).is_ok());
        assert!(q.push("b", "/", ip(1), Nanos(0)).is_ok());
        assert_eq!(q.push("c", "/", ip(1), Nanos(0)), Err(Full("c")));
        q.pop(Nanos(0));
        assert!(q.push("c", "/", ip(1), Nanos(0)).is_ok());
    }

    #[test]
    fn remove_by_ticket_is_exact() {
        let mut q = ClassQueue::new(cfg(Policy::ShortestFirst));
        let a = q
            .push("a", "/a", ip(1), Nanos(0))
            .ok()
            .unwrap_or_else(|| unreachable!());
        let b = q
            .push("b", "/b", ip(1), Nanos(1))
            .ok()
            .unwrap_or_else(|| unreachable!());
        assert_eq!(q.remove(a), Some("a"));
        assert_eq!(q.remove(a), None);
        assert_eq!(q.len(), 1);
        assert_eq!(q.oldest(), Some(Nanos(1)));
        assert_eq!(q.pop(Nanos(2)), Some(("b", Nanos(1))));
        assert_eq!(q.remove(b), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn shortest_first_serves_small_before_large() {
        let mut q = ClassQueue::new(cfg(Policy::ShortestFirst));
        q.observe_size("/big", 1_000_000);
        q.observe_size("/small", 100);
        for (i, p) in ["/big", "/small", "/big", "/small"].iter().enumerate() {
            q.push(i, p, ip(1), Nanos(i as u64)).ok();
        }
        assert_eq!(drain(&mut q, Nanos(10)), vec![1, 3, 0, 2]);
    }

    #[test]
    fn shortest_first_unknown_paths_count_as_the_median() {
        let mut q = ClassQueue::new(cfg(Policy::ShortestFirst));
        q.observe_size("/a", 10);
        q.observe_size("/b", 1000);
        q.observe_size("/c", 100_000);
        assert_eq!(q.expected_size_bytes("/never-seen"), 1000);
        q.push("huge", "/c", ip(1), Nanos(0)).ok();
        q.push("unknown", "/new", ip(1), Nanos(1)).ok();
        q.push("tiny", "/a", ip(1), Nanos(2)).ok();
        assert_eq!(drain(&mut q, Nanos(3)), vec!["tiny", "unknown", "huge"]);
        // Nothing learned: arrival order.
        let mut q = ClassQueue::new(cfg(Policy::ShortestFirst));
        q.push(1, "/x", ip(1), Nanos(0)).ok();
        q.push(2, "/y", ip(1), Nanos(0)).ok();
        assert_eq!(drain(&mut q, Nanos(0)), vec![1, 2]);
    }

    #[test]
    fn sizes_are_averaged_and_memory_is_bounded() {
        let mut q: ClassQueue<()> = ClassQueue::new(cfg(Policy::ShortestFirst));
        q.observe_size("/p", 1000);
        q.observe_size("/p", 2000);
        assert_eq!(q.expected_size_bytes("/p"), 1250);
        for i in 0..(SIZE_MEMORY_PATHS + 100) {
            q.observe_size(&format!("/f{i}"), i as u64);
        }
        assert_eq!(q.sizes.paths.len(), SIZE_MEMORY_PATHS);
        assert_eq!(q.sizes.by_tick.len(), SIZE_MEMORY_PATHS);
        // The least recently observed went first.
        assert!(!q.sizes.paths.contains_key(&path_key("/p")));
        assert!(q.sizes.paths.contains_key(&path_key("/f4195")));
    }

    #[test]
    fn age_bound_lets_the_starving_go_first() {
        let mut q = ClassQueue::new(QueueConfig {
            age_bound: Duration::from_millis(100),
            ..cfg(Policy::ShortestFirst)
        });
        q.observe_size("/big", 1_000_000);
        q.observe_size("/small", 10);
        q.push("big", "/big", ip(1), Nanos::from_millis(0)).ok();
        for i in 0..3 {
            q.push("small", "/small", ip(1), Nanos::from_millis(50 + i))
                .ok();
        }
        assert_eq!(q.pop(Nanos::from_millis(100)).map(|x| x.0), Some("small"));
        // Now the big one is 101 ms old: it goes before the younger small ones.
        assert_eq!(
            q.pop(Nanos::from_millis(101)),
            Some(("big", Nanos::from_millis(0)))
        );
        assert_eq!(
            drain(&mut q, Nanos::from_millis(101)),
            vec!["small", "small"]
        );
    }

    #[test]
    fn locality_prefers_the_path_just_served() {
        let mut q = ClassQueue::new(cfg(Policy::Locality));
        for (i, p) in ["/a", "/b", "/a", "/c", "/a", "/b"].iter().enumerate() {
            q.push((i, *p), p, ip(1), Nanos(i as u64)).ok();
        }
        let order: Vec<usize> = drain(&mut q, Nanos(10)).into_iter().map(|x| x.0).collect();
        // /a (oldest), then the other /a's, then oldest (/b) and its batch, then /c.
        assert_eq!(order, vec![0, 2, 4, 1, 5, 3]);
    }

    #[test]
    fn share_round_robins_across_clients() {
        let mut q = ClassQueue::new(cfg(Policy::Share));
        for i in 0..10 {
            q.push(("hog", i), "/", ip(1), Nanos(i)).ok();
        }
        q.push(("meek", 0), "/", ip(2), Nanos(20)).ok();
        q.push(("meek", 1), "/", ip(2), Nanos(21)).ok();
        q.push(("other", 0), "/", ip(3), Nanos(22)).ok();
        let order = drain(&mut q, Nanos(30));
        assert_eq!(
            &order[..6],
            &[
                ("hog", 0),
                ("meek", 0),
                ("other", 0),
                ("hog", 1),
                ("meek", 1),
                ("hog", 2)
            ]
        );
        assert_eq!(order.len(), 13);
        // FIFO within the hog's flow.
        let hog: Vec<u64> = order.iter().filter(|x| x.0 == "hog").map(|x| x.1).collect();
        assert_eq!(hog, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn share_survives_removals_and_v4_mapped_clients_are_one_flow() {
        let mut q = ClassQueue::new(cfg(Policy::Share));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(ip(0));
        let mut tickets = Vec::new();
        for i in 0..100u8 {
            if let Ok(t) = q.push(i as u64, "/", ip(100 + (i % 50)), Nanos(0)) {
                tickets.push(t);
            }
        }
        for t in &tickets {
            q.remove(*t);
        }
        assert!(q.is_empty());
        q.push(1000, "/", ip(1), Nanos(1)).ok();
        q.push(1001, "/", mapped, Nanos(1)).ok();
        q.push(2000, "/", ip(2), Nanos(1)).ok();
        assert_eq!(drain(&mut q, Nanos(1)), vec![1000, 2000, 1001]);
        if let Index::Share { flows, ring, .. } = &q.index {
            assert!(flows.is_empty() && ring.is_empty());
        }
    }

    #[test]
    fn set_config_keeps_entries_and_reorders() {
        let mut q = ClassQueue::new(cfg(Policy::Fifo));
        q.observe_size("/big", 1_000_000);
        q.observe_size("/small", 10);
        q.push("big", "/big", ip(1), Nanos(0)).ok();
        q.push("small", "/small", ip(1), Nanos(1)).ok();
        q.set_config(cfg(Policy::Share));
        q.set_config(cfg(Policy::Locality));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(Nanos(2)).map(|x| x.0), Some("big"));
        q.set_config(QueueConfig {
            limit: 0,
            ..cfg(Policy::Fifo)
        });
        assert_eq!(q.len(), 1);
        assert!(q.push("x", "/", ip(1), Nanos(3)).is_err());
        assert_eq!(q.pop(Nanos(3)).map(|x| x.0), Some("small"));
        // Switching to shortest-first sizes the entries already waiting.
        q.set_config(cfg(Policy::Fifo));
        q.push("big", "/big", ip(1), Nanos(4)).ok();
        q.push("small", "/small", ip(1), Nanos(5)).ok();
        q.set_config(cfg(Policy::ShortestFirst));
        assert_eq!(drain(&mut q, Nanos(6)), vec!["small", "big"]);
    }

    #[test]
    fn policy_names_in_configuration() {
        let names: Vec<String> = [
            Policy::Fifo,
            Policy::ShortestFirst,
            Policy::Locality,
            Policy::Share,
        ]
        .iter()
        .map(|p| serde_json::to_string(p).unwrap_or_default())
        .collect();
        assert_eq!(
            names,
            [
                "\"fifo\"",
                "\"shortest-first\"",
                "\"locality\"",
                "\"share\""
            ]
        );
        assert!(serde_json::from_str::<Policy>("\"shortest_first\"").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { path: u8, flow: u8, dt_ms: u64 },
        Pop { dt_ms: u64 },
        Remove { pick: usize },
        Observe { path: u8, bytes: u64 },
        SetPolicy(Policy),
    }

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::Fifo),
            Just(Policy::ShortestFirst),
            Just(Policy::Locality),
            Just(Policy::Share)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..4, 0u64..30).prop_map(|(path, flow, dt_ms)| Op::Push { path, flow, dt_ms }),
            3 => (0u64..40).prop_map(|dt_ms| Op::Pop { dt_ms }),
            1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
            1 => (0u8..6, 0u64..100_000).prop_map(|(path, bytes)| Op::Observe { path, bytes }),
            1 => policy().prop_map(Op::SetPolicy),
        ]
    }

    proptest! {
        /// Every pushed item comes out exactly once (pop or remove), len is exact, the
        /// limit holds, and no entry older than the age bound is passed over.
        #[test]
        fn nothing_lost_bounds_hold(
            start in policy(),
            limit in 0usize..12,
            age_bound_ms in 0u64..200,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let age_bound = Duration::from_millis(age_bound_ms);
            let mut q = ClassQueue::new(QueueConfig { policy: start, limit, age_bound });
            let mut now = Nanos::ZERO;
            let mut next_id = 0u64;
            // id -> (ticket, queued_at), in push order.
            let mut live: BTreeMap<u64, (Ticket, Nanos)> = BTreeMap::new();
            let mut out: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Push { path, flow, dt_ms } => {
                        now = now.after(Duration::from_millis(dt_ms));
                        let id = next_id;
                        next_id += 1;
                        let was_full = live.len() >= limit;
                        match q.push(id, &format!("/p{path}"), ip(flow), now) {
                            Ok(t) => {
                                prop_assert!(!was_full);
                                live.insert(id, (t, now));
                            }
                            Err(Full(back)) => {
                                prop_assert!(was_full);
                                prop_assert_eq!(back, id);
                            }
                        }
                    }
                    Op::Pop { dt_ms } => {
                        now = now.after(Duration::from_millis(dt_ms));
                        let overdue = live.values().any(|&(_, t)| now.saturating_since(t) > age_bound);
                        let oldest = live.keys().next().copied();
                        match q.pop(now) {
                            None => prop_assert!(live.is_empty()),
                            Some((id, queued_at)) => {
                                let (_, t) = live.remove(&id).ok_or_else(|| TestCaseError::fail("popped an item not live"))?;
                                prop_assert_eq!(t, queued_at);
                                if overdue || q.config().policy == Policy::Fifo {
                                    prop_assert_eq!(Some(id), oldest);
                                }
                                out.push(id);
                            }
                        }
                    }
                    Op::Remove { pick } => {
                        if next_id > 0 {
                            let id = pick as u64 % next_id;
                            // Tickets of gone items must return None.
                            if let Some(&(t, _)) = live.get(&id) {
                                prop_assert_eq!(q.remove(t), Some(id));
                                live.remove(&id);
                                out.push(id);
                                prop_assert_eq!(q.remove(t), None);
                            }
                        }
                    }
                    Op::Observe { path, bytes } => q.observe_size(&format!("/p{path}"), bytes),
                    Op::SetPolicy(p) => q.set_config(QueueConfig { policy: p, limit, age_bound }),
                }
                prop_assert_eq!(q.len(), live.len());
                prop_assert!(q.len() <= limit);
                prop_assert_eq!(q.oldest(), live.values().map(|&(_, t)| t).min());
            }
            while let Some((id, _)) = q.pop(now) {
                prop_assert!(live.remove(&id).is_some());
                out.push(id);
            }
            prop_assert!(live.is_empty());
            let mut seen = out.clone();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), out.len(), "an item came out twice");
        }
    }
}
