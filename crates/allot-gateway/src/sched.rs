//! Between registration and service: class queues, the caps on running requests, and the
//! dispatcher that hands out service slots ([`Permit`]s) when one frees.
//!
//! Two phases, after the admission-control paper: a request is first registered and
//! classified, then waits here until a slot is free under its class's `max_running`, the
//! overall one and its back end's adaptive limit. Slots are released when the response
//! body ends (the permit travels inside the body), and every release dispatches the next
//! waiters at once.
//!
//! The counts of requests in service are atomics, so while nothing waits a request takes
//! and gives back its slot without a lock shared by all requests. The queues and the
//! dispatcher's order between classes sit behind one lock, taken only while some request
//! waits: then every release dispatches under it, so waiting requests are served in the
//! dispatcher's order and none is overtaken by a newcomer.
//!
//! No wake-up is lost between the two: a request that must wait is queued and counted in
//! `waiting` before it tries once more for a slot under the lock, and a release gives its
//! slot back before it reads `waiting` (both sequentially consistent), so one of the two
//! always sees the other.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use allot_model::dispatch::{ClassWeights, Dispatcher};
use allot_model::queue::{ClassQueue, QueueConfig, Ticket};
use allot_model::Nanos;
use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use crate::stats::{ClassStats, RefuseReason};

/// "No limit" in the atomics below.
const UNLIMITED: usize = usize::MAX;

/// A back end's adaptive concurrency limit (the `adaptive` controller's actuator) and the
/// requests counted against it. Kept for the life of the back end, across reloads.
#[derive(Debug)]
pub struct BackendGate {
    running: AtomicUsize,
    limit: AtomicUsize,
}

impl Default for BackendGate {
    fn default() -> Self {
        BackendGate {
            running: AtomicUsize::new(0),
            limit: AtomicUsize::new(UNLIMITED),
        }
    }
}

impl BackendGate {
    /// Requests in service counted against this back end, and its limit if one is set.
    pub fn running(&self) -> (usize, Option<usize>) {
        let limit = self.limit.load(SeqCst);
        (
            self.running.load(SeqCst),
            (limit != UNLIMITED).then_some(limit),
        )
    }

    fn has_room(&self) -> bool {
        self.running.load(SeqCst) < self.limit.load(SeqCst)
    }
}

/// One class's scheduling state, kept for the life of the class (across reloads).
#[derive(Debug)]
pub struct SchedClass {
    index: usize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// Requests registered and not yet in service: waiting for credit or in the queue.
    registered: AtomicUsize,
    queue_limit: AtomicUsize,
    /// The back end whose adaptive limit this class's requests count against.
    gate: ArcSwap<BackendGate>,
    stats: Arc<ClassStats>,
}

impl SchedClass {
    /// Requests of this class in service now.
    pub fn running(&self) -> usize {
        self.running.load(SeqCst)
    }
}

/// The settings of one class that the scheduler enforces.
#[derive(Debug, Clone, Copy)]
pub struct ClassLimits {
    /// Cap on this class's requests in service.
    pub max_running: usize,
    /// Strict priority and ratio among classes.
    pub weights: ClassWeights,
    /// The queue's policy and age bound (its limit is `queue_limit` below).
    pub queue: QueueConfig,
}

struct Waiter {
    tx: oneshot::Sender<Permit>,
}

/// What the lock guards: each class's queue, and the dispatcher's order between classes.
struct Queues {
    classes: Vec<(Arc<SchedClass>, ClassQueue<Waiter>)>,
    dispatcher: Dispatcher,
}

/// The scheduler shared by every connection.
pub struct Scheduler {
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// Requests in any class queue.
    waiting: AtomicUsize,
    queues: Mutex<Queues>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("running", &self.running.load(SeqCst))
            .field("max_running", &self.max_running.load(SeqCst))
            .field("waiting", &self.waiting.load(SeqCst))
            .finish()
    }
}

/// A service slot: held while a request is in service, released (and the next waiters
/// dispatched) when dropped.
pub struct Permit {
    scheduler: Arc<Scheduler>,
    class: Arc<SchedClass>,
    /// The back end it counts against (fixed at grant, whatever changes later).
    gate: Arc<BackendGate>,
    /// Already given back: the drop does nothing.
    given_back: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("class", &self.class.index)
            .finish()
    }
}

/// A request's place in its class's waiting room (waiting for credit, or queued): counts
/// against `queue_limit` until dropped.
#[derive(Debug)]
pub struct Place {
    class: Arc<SchedClass>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.class.registered.fetch_sub(1, SeqCst);
    }
}

/// The outcome of asking for a slot.
pub enum Admission {
    /// A slot was free: serve now.
    Now(Permit),
    /// Queued: wait with [`Queued::wait`].
    Queued(Queued),
    /// Refused.
    Refused(RefuseReason),
}

/// A request in its class queue. Dropping it (the client went away) takes it out.
pub struct Queued {
    scheduler: Arc<Scheduler>,
    class: Arc<SchedClass>,
    ticket: Option<Ticket>,
    rx: oneshot::Receiver<Permit>,
    _place: Place,
}

impl Queued {
    /// Waits for a slot at most `max_wait`; `None` when none came in time.
    pub async fn wait(mut self, max_wait: std::time::Duration) -> Option<Permit> {
        match tokio::time::timeout(max_wait, &mut self.rx).await {
            Ok(Ok(permit)) => {
                self.ticket = None;
                Some(permit)
            }
            // The scheduler is gone: nothing will come.
            Ok(Err(_)) => {
                self.ticket = None;
                None
            }
            Err(_) => {
                let ticket = self.ticket.take()?;
                if self.scheduler.give_up(&self.class, ticket) {
                    None
                } else {
                    // Granted just as time ran out: serve it rather than waste the slot.
                    self.rx.try_recv().ok()
                }
            }
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            // Still queued: leave. If the permit was sent meanwhile, it drops with `rx`,
            // which releases the slot and dispatches again.
            self.scheduler.give_up(&self.class, ticket);
        }
    }
}

/// Takes one unit of `count` if it is below `max`.
fn try_take(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1))
        .is_ok()
}

impl Scheduler {
    /// An empty scheduler with the overall cap.
    pub fn new(max_running: usize) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(max_running),
            waiting: AtomicUsize::new(0),
            queues: Mutex::new(Queues {
                classes: Vec::new(),
                dispatcher: Dispatcher::new(Vec::new()),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A panic while holding this lock would be a bug in this module; the state stays
        // consistent between statements, so keep serving rather than poison every request.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new class, counted against `gate`, with its sensors in `stats`.
    pub fn add_class(
        self: &Arc<Self>,
        limits: ClassLimits,
        queue_limit: usize,
        gate: Arc<BackendGate>,
        stats: Arc<ClassStats>,
    ) -> Arc<SchedClass> {
        let mut q = self.lock();
        let class = Arc::new(SchedClass {
            index: q.classes.len(),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(limits.max_running),
            registered: AtomicUsize::new(0),
            queue_limit: AtomicUsize::new(queue_limit),
            gate: ArcSwap::new(gate),
            stats,
        });
        q.dispatcher.set(class.index, limits.weights);
        q.classes
            .push((Arc::clone(&class), ClassQueue::new(unbounded(limits.queue))));
        class
    }

    /// Changes a class's settings in place; waiting requests keep their place.
    pub fn configure_class(
        self: &Arc<Self>,
        class: &SchedClass,
        limits: ClassLimits,
        queue_limit: usize,
        gate: Arc<BackendGate>,
    ) {
        let mut q = self.lock();
        class.max_running.store(limits.max_running, SeqCst);
        class.queue_limit.store(queue_limit, SeqCst);
        class.gate.store(gate);
        q.dispatcher.set(class.index, limits.weights);
        if let Some((_, queue)) = q.classes.get_mut(class.index) {
            queue.set_config(unbounded(limits.queue));
        }
        self.dispatch_locked(q);
    }

    /// Changes the overall cap.
    pub fn set_max_running(self: &Arc<Self>, max_running: usize) {
        let q = self.lock();
        self.max_running.store(max_running, SeqCst);
        self.dispatch_locked(q);
    }

    /// Sets (or with `None` removes) a back end's adaptive concurrency limit; raising it
    /// dispatches waiters at once. Requests already in service are never cut short.
    pub fn set_backend_limit(self: &Arc<Self>, gate: &BackendGate, limit: Option<usize>) {
        let q = self.lock();
        gate.limit
            .store(limit.map_or(UNLIMITED, |l| l.max(1)), SeqCst);
        self.dispatch_locked(q);
    }

    /// Requests in service now, and the overall cap.
    pub fn running(&self) -> (usize, usize) {
        (self.running.load(SeqCst), self.max_running.load(SeqCst))
    }

    /// A place in `class`'s waiting room, or `None` when it holds `queue_limit` already.
    pub fn reserve_place(&self, class: &Arc<SchedClass>) -> Option<Place> {
        let limit = class.queue_limit.load(SeqCst);
        try_take(&class.registered, limit).then(|| Place {
            class: Arc::clone(class),
        })
    }

    /// Takes a slot under all three caps, or none.
    fn try_acquire(&self, class: &Arc<SchedClass>) -> Option<Arc<BackendGate>> {
        let gate = class.gate.load_full();
        if !try_take(&self.running, self.max_running.load(SeqCst)) {
            return None;
        }
        if !try_take(&class.running, class.max_running.load(SeqCst)) {
            self.running.fetch_sub(1, SeqCst);
            return None;
        }
        if !try_take(&gate.running, gate.limit.load(SeqCst)) {
            class.running.fetch_sub(1, SeqCst);
            self.running.fetch_sub(1, SeqCst);
            return None;
        }
        Some(gate)
    }

    /// Gives back what [`Scheduler::try_acquire`] took, without dispatching.
    fn give_back(&self, class: &SchedClass, gate: &BackendGate) {
        gate.running.fetch_sub(1, SeqCst);
        class.running.fetch_sub(1, SeqCst);
        self.running.fetch_sub(1, SeqCst);
    }

    /// Asks for a slot for a request of `class` for `path` from `flow`, registered at
    /// `now`. `place` is the request's place in the waiting room if it holds one already
    /// (it waited for credit); without one, a place is reserved should it have to queue.
    pub fn admit(
        self: &Arc<Self>,
        class: &Arc<SchedClass>,
        place: Option<Place>,
        path: &str,
        flow: IpAddr,
        now: Nanos,
    ) -> Admission {
        let permit = |gate| Permit {
            scheduler: Arc::clone(self),
            class: Arc::clone(class),
            gate,
            given_back: false,
        };
        // Nothing waits anywhere: no order to keep, no lock to take.
        if self.waiting.load(SeqCst) == 0 {
            if let Some(gate) = self.try_acquire(class) {
                return Admission::Now(permit(gate));
            }
        }
        let Some(place) = place.or_else(|| self.reserve_place(class)) else {
            return Admission::Refused(RefuseReason::QueueFull);
        };
        let mut q = self.lock();
        // Serve those already waiting first: a slot freed by a release that has not yet
        // dispatched is theirs, not this newcomer's.
        q = self.dispatch_with(q);
        let Some((_, queue)) = q.classes.get_mut(class.index) else {
            return Admission::Refused(RefuseReason::QueueFull);
        };
        if queue.is_empty() {
            if let Some(gate) = self.try_acquire(class) {
                return Admission::Now(permit(gate));
            }
        }
        let (tx, rx) = oneshot::channel();
        let ticket = match queue.push(Waiter { tx }, path, flow, now) {
            Ok(ticket) => ticket,
            Err(_) => return Admission::Refused(RefuseReason::QueueFull),
        };
        class.stats.queued.store(queue.len() as i64, SeqCst);
        self.waiting.fetch_add(1, SeqCst);
        // A slot may have freed since the last try, by a release that saw nobody waiting.
        self.dispatch_locked(q);
        Admission::Queued(Queued {
            scheduler: Arc::clone(self),
            class: Arc::clone(class),
            ticket: Some(ticket),
            rx,
            _place: place,
        })
    }

    /// A waiting request gives up (timeout or client gone). Returns false when its permit
    /// was already sent, in which case the caller must take it from the receiver.
    fn give_up(&self, class: &SchedClass, ticket: Ticket) -> bool {
        let mut q = self.lock();
        let Some((_, queue)) = q.classes.get_mut(class.index) else {
            return true;
        };
        let removed = queue.remove(ticket).is_some();
        if removed {
            self.waiting.fetch_sub(1, SeqCst);
            class.stats.queued.store(queue.len() as i64, SeqCst);
        }
        removed
    }

    /// Teaches `class`'s queue the size of a response for `path` (shortest-first).
    pub fn observe_size(&self, class: &SchedClass, path: &str, bytes: u64) {
        if let Some((_, queue)) = self.lock().classes.get_mut(class.index) {
            queue.observe_size(path, bytes);
        }
    }

    fn release(self: &Arc<Self>, class: &SchedClass, gate: &BackendGate) {
        self.give_back(class, gate);
        if self.waiting.load(SeqCst) > 0 {
            let q = self.lock();
            self.dispatch_locked(q);
        }
    }

    /// Hands free slots to waiting requests, then sends the permits outside the lock.
    fn dispatch_locked(self: &Arc<Self>, q: MutexGuard<'_, Queues>) {
        drop(self.dispatch_with(q));
    }

    /// Hands free slots to waiting requests and gives the lock back. Permits are sent
    /// under the lock: a receiver that is gone hands its permit back at once, and that
    /// permit's release only counts down (it finds the lock held and `waiting` handled
    /// by the loop here).
    fn dispatch_with<'a>(
        self: &'a Arc<Self>,
        mut q: MutexGuard<'a, Queues>,
    ) -> MutexGuard<'a, Queues> {
        if self.waiting.load(SeqCst) == 0 {
            return q;
        }
        let mut now = None;
        loop {
            if self.running.load(SeqCst) >= self.max_running.load(SeqCst) {
                break;
            }
            let Queues {
                classes,
                dispatcher,
            } = &mut *q;
            let Some(index) = dispatcher.pick(&mut |i| {
                classes.get(i).is_some_and(|(c, queue)| {
                    !queue.is_empty()
                        && c.running.load(SeqCst) < c.max_running.load(SeqCst)
                        && c.gate.load().has_room()
                })
            }) else {
                break;
            };
            let (class, queue) = &mut classes[index];
            let Some(gate) = self.try_acquire(class) else {
                // A request that saw nobody waiting took the slot meanwhile; its release
                // will dispatch again.
                break;
            };
            let at = *now.get_or_insert_with(crate::clock::now);
            let Some((waiter, _queued_at)) = queue.pop(at) else {
                self.give_back(class, &gate);
                continue;
            };
            self.waiting.fetch_sub(1, SeqCst);
            class.stats.queued.store(queue.len() as i64, SeqCst);
            if waiter.tx.is_closed() {
                // The client went away while waiting.
                self.give_back(class, &gate);
                continue;
            }
            let permit = Permit {
                scheduler: Arc::clone(self),
                class: Arc::clone(class),
                gate,
                given_back: false,
            };
            if let Err(back) = waiter.tx.send(permit) {
                // Gone between the check and the send: take the slot back quietly (its
                // drop must not dispatch while this lock is held).
                back.give_back_quietly();
            }
        }
        q
    }
}

impl Permit {
    /// Gives the slot back without dispatching; for a permit that was never handed out.
    fn give_back_quietly(mut self) {
        self.scheduler.give_back(&self.class, &self.gate);
        self.given_back = true;
    }
}

/// The model's queue without a limit of its own: `queue_limit` is enforced by [`Place`]s,
/// which count requests waiting for credit too.
fn unbounded(mut config: QueueConfig) -> QueueConfig {
    config.limit = usize::MAX;
    config
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.given_back {
            self.scheduler.release(&self.class, &self.gate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn limits(max_running: usize) -> ClassLimits {
        ClassLimits {
            max_running,
            weights: ClassWeights::default(),
            queue: QueueConfig {
                policy: allot_model::queue::Policy::Fifo,
                limit: usize::MAX,
                age_bound: Duration::from_secs(10),
            },
        }
    }

    fn setup(max_running: usize, queue_limit: usize) -> (Arc<Scheduler>, Arc<SchedClass>) {
        let s = Scheduler::new(max_running);
        let c = s.add_class(
            limits(usize::MAX),
            queue_limit,
            Arc::new(BackendGate::default()),
            Arc::new(ClassStats::default()),
        );
        (s, c)
    }

    fn admit(s: &Arc<Scheduler>, c: &Arc<SchedClass>) -> Admission {
        s.admit(c, None, "/", Ipv4Addr::LOCALHOST.into(), Nanos(0))
    }

    fn now(a: Admission) -> Permit {
        match a {
            Admission::Now(p) => p,
            _ => panic!("expected a slot at once"),
        }
    }

    fn queued(a: Admission) -> Queued {
        match a {
            Admission::Queued(q) => q,
            _ => panic!("expected to queue"),
        }
    }

    #[test]
    fn a_released_slot_goes_to_the_first_waiter() {
        let (s, c) = setup(1, 10);
        let first = now(admit(&s, &c));
        let mut second = queued(admit(&s, &c));
        assert_eq!(s.running(), (1, 1));
        assert_eq!(c.stats.queued.load(SeqCst), 1);
        drop(first);
        assert!(second.rx.try_recv().is_ok(), "the waiter got the slot");
        assert_eq!(c.stats.queued.load(SeqCst), 0);
        assert_eq!(s.waiting.load(SeqCst), 0);
    }

    #[test]
    fn a_waiter_granted_as_it_gives_up_takes_its_slot_from_the_receiver() {
        let (s, c) = setup(1, 10);
        let first = now(admit(&s, &c));
        let mut second = queued(admit(&s, &c));
        let ticket = second.ticket.take().expect("queued with a ticket");
        // The grant comes first...
        drop(first);
        // ...then the waiter's time runs out: it is no longer queued, so it must take
        // the permit that was sent rather than drop it.
        assert!(!s.give_up(&c, ticket));
        let permit = second.rx.try_recv().expect("the permit is there");
        assert_eq!(s.running(), (1, 1));
        drop(permit);
        assert_eq!(s.running(), (0, 1));
    }

    #[test]
    fn a_waiter_dropped_leaves_the_queue_and_its_place() {
        let (s, c) = setup(1, 10);
        let first = now(admit(&s, &c));
        let second = queued(admit(&s, &c));
        assert_eq!(c.registered.load(SeqCst), 1);
        drop(second);
        assert_eq!(c.stats.queued.load(SeqCst), 0);
        assert_eq!(s.waiting.load(SeqCst), 0);
        assert_eq!(c.registered.load(SeqCst), 0);
        drop(first);
        assert_eq!(s.running(), (0, 1));
    }

    #[test]
    fn a_waiter_whose_client_left_is_skipped_for_the_next() {
        let (s, c) = setup(1, 10);
        let first = now(admit(&s, &c));
        let mut gone = queued(admit(&s, &c));
        let mut next = queued(admit(&s, &c));
        // The client leaves without the queue hearing of it yet.
        gone.ticket = None;
        drop(gone);
        drop(first);
        let permit = next
            .rx
            .try_recv()
            .expect("the slot went to the next waiter");
        assert_eq!(s.running(), (1, 1));
        assert_eq!(s.waiting.load(SeqCst), 0);
        drop(permit);
    }

    #[test]
    fn places_count_against_the_queue_limit_until_dropped() {
        let (s, c) = setup(1, 2);
        let _first = now(admit(&s, &c));
        let p1 = s.reserve_place(&c).expect("a place");
        let _q = queued(admit(&s, &c));
        assert!(s.reserve_place(&c).is_none(), "two places of two are taken");
        assert!(matches!(
            admit(&s, &c),
            Admission::Refused(RefuseReason::QueueFull)
        ));
        drop(p1);
        assert!(s.reserve_place(&c).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_after_max_wait_and_leaves_nothing_behind() {
        let (s, c) = setup(1, 10);
        let first = now(admit(&s, &c));
        let q = queued(admit(&s, &c));
        let t0 = tokio::time::Instant::now();
        assert!(q.wait(Duration::from_millis(250)).await.is_none());
        assert_eq!(t0.elapsed(), Duration::from_millis(250));
        assert_eq!(s.waiting.load(SeqCst), 0);
        assert_eq!(c.registered.load(SeqCst), 0);
        drop(first);
        assert_eq!(s.running(), (0, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_taking_and_releasing_slots_lose_no_wake_up() {
        let (s, c) = setup(3, usize::MAX);
        let served = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (s, c, served) = (Arc::clone(&s), Arc::clone(&c), Arc::clone(&served));
            tasks.push(tokio::spawn(async move {
                for _ in 0..500 {
                    let permit = match admit(&s, &c) {
                        Admission::Now(p) => p,
                        Admission::Queued(q) => q
                            .wait(Duration::from_secs(30))
                            .await
                            .expect("a slot within 30 s: a lost wake-up otherwise"),
                        Admission::Refused(r) => panic!("refused: {r:?}"),
                    };
                    assert!(s.running().0 <= 3, "over the cap");
                    served.fetch_add(1, SeqCst);
                    tokio::task::yield_now().await;
                    drop(permit);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(served.load(SeqCst), 16 * 500);
        assert_eq!(s.running(), (0, 3));
        assert_eq!(s.waiting.load(SeqCst), 0);
        assert_eq!(c.running(), 0);
    }
}
