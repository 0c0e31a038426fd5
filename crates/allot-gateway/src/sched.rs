//! Between registration and service: class queues, the caps on running requests, and the
//! dispatcher that hands out service slots ([`Permit`]s) when one frees.
//!
//! Two phases, after the admission-control paper: a request is first registered and
//! classified, then waits here until a slot is free under both its class's `max_running`
//! and the overall one. Slots are released when the response body ends (the permit
//! travels inside the body), and every release dispatches the next waiters at once.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use allot_model::dispatch::{ClassWeights, Dispatcher};
use allot_model::queue::{ClassQueue, QueueConfig, Ticket};
use allot_model::Nanos;
use tokio::sync::oneshot;

use crate::stats::{ClassStats, RefuseReason};

/// One class's scheduling state.
struct SchedClass {
    queue: ClassQueue<oneshot::Sender<Permit>>,
    running: usize,
    max_running: usize,
    stats: Arc<ClassStats>,
    /// The back end whose adaptive limit this class's requests count against.
    backend: usize,
}

/// What the dispatcher decides over: queues, running counts and caps.
pub struct Sched {
    running: usize,
    max_running: usize,
    classes: Vec<SchedClass>,
    dispatcher: Dispatcher,
    /// Per back end: requests in service and the adaptive limit (`adaptive` controller).
    backends: Vec<BackendGate>,
}

/// A back end's adaptive concurrency limit, as the dispatcher sees it.
#[derive(Debug, Clone, Copy, Default)]
struct BackendGate {
    running: usize,
    limit: Option<usize>,
}

impl Sched {
    /// Whether `class`'s back end has room under its adaptive limit.
    fn backend_open(&self, class: &SchedClass) -> bool {
        self.backends
            .get(class.backend)
            .is_none_or(|g| g.limit.is_none_or(|l| g.running < l))
    }
}

/// The class-independent scheduling settings of one class.
#[derive(Debug, Clone, Copy)]
pub struct ClassLimits {
    /// Cap on this class's requests in service.
    pub max_running: usize,
    /// Strict priority and ratio among classes.
    pub weights: ClassWeights,
}

/// The scheduler shared by every connection.
pub struct Scheduler {
    sched: Mutex<Sched>,
}

/// A service slot: held while a request is in service, released (and the next waiters
/// dispatched) when dropped.
pub struct Permit {
    scheduler: Arc<Scheduler>,
    class: usize,
    /// The back end it counts against (fixed at grant, whatever changes later).
    backend: usize,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("class", &self.class)
            .finish()
    }
}

/// The outcome of asking for a slot.
pub enum Admission {
    /// A slot was free: serve now.
    Now(Permit),
    /// Queued: wait on the receiver; on giving up, call [`Scheduler::give_up`] with the ticket.
    Wait(oneshot::Receiver<Permit>, Ticket),
    /// Refused.
    Refused(RefuseReason),
}

impl Scheduler {
    /// An empty scheduler with the overall cap.
    pub fn new(max_running: usize) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            sched: Mutex::new(Sched {
                running: 0,
                max_running,
                classes: Vec::new(),
                dispatcher: Dispatcher::new(Vec::new()),
                backends: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Sched> {
        // A panic while holding this lock would be a bug in this module; the state stays
        // consistent between statements, so keep serving rather than poison every request.
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a class (its index is the next one) or, for an existing index, changes its
    /// settings in place; waiting requests keep their place.
    pub fn configure_class(
        self: &Arc<Self>,
        index: usize,
        limits: ClassLimits,
        queue: QueueConfig,
        stats: Arc<ClassStats>,
    ) {
        let mut s = self.lock();
        if index < s.classes.len() {
            let c = &mut s.classes[index];
            c.max_running = limits.max_running;
            c.queue.set_config(queue);
            s.dispatcher.set(index, limits.weights);
        } else {
            s.classes.push(SchedClass {
                queue: ClassQueue::new(queue),
                running: 0,
                max_running: limits.max_running,
                stats,
                backend: 0,
            });
            // `set` grows the dispatcher for a new index.
            s.dispatcher.set(index, limits.weights);
        }
        self.dispatch_locked(s);
    }

    /// Changes the overall cap.
    pub fn set_max_running(self: &Arc<Self>, max_running: usize) {
        let mut s = self.lock();
        s.max_running = max_running;
        self.dispatch_locked(s);
    }

    /// Sets which back end's adaptive limit `class`'s requests count against.
    pub fn set_class_backend(self: &Arc<Self>, class: usize, backend: usize) {
        let mut s = self.lock();
        // Count every back end's running requests from the start, so a limit set later
        // sees the true count.
        if s.backends.len() <= backend {
            s.backends.resize(backend + 1, BackendGate::default());
        }
        if let Some(c) = s.classes.get_mut(class) {
            c.backend = backend;
        }
        self.dispatch_locked(s);
    }

    /// Sets (or with `None` removes) a back end's adaptive concurrency limit; raising it
    /// dispatches waiters at once. Requests already in service are never cut short.
    pub fn set_backend_limit(self: &Arc<Self>, backend: usize, limit: Option<usize>) {
        let mut s = self.lock();
        if s.backends.len() <= backend {
            s.backends.resize(backend + 1, BackendGate::default());
        }
        s.backends[backend].limit = limit.map(|l| l.max(1));
        self.dispatch_locked(s);
    }

    /// Requests in service on `backend` under its limit, and the limit.
    pub fn backend_running(&self, backend: usize) -> (usize, Option<usize>) {
        let s = self.lock();
        s.backends
            .get(backend)
            .map_or((0, None), |g| (g.running, g.limit))
    }

    /// Requests in service now, and the overall cap.
    pub fn running(&self) -> (usize, usize) {
        let s = self.lock();
        (s.running, s.max_running)
    }

    /// Asks for a slot for a request of `class` for `path` from `flow`, registered at `now`.
    pub fn admit(
        self: &Arc<Self>,
        class: usize,
        path: &str,
        flow: IpAddr,
        now: Nanos,
    ) -> Admission {
        let mut s = self.lock();
        let Some(c) = s.classes.get(class) else {
            return Admission::Refused(RefuseReason::QueueFull);
        };
        let free = s.running < s.max_running
            && c.running < c.max_running
            && c.queue.is_empty()
            && s.backend_open(c);
        if free {
            s.running += 1;
            s.classes[class].running += 1;
            let b = s.classes[class].backend;
            if let Some(g) = s.backends.get_mut(b) {
                g.running += 1;
            }
            return Admission::Now(Permit {
                scheduler: Arc::clone(self),
                class,
                backend: b,
            });
        }
        let (tx, rx) = oneshot::channel();
        let c = &mut s.classes[class];
        match c.queue.push(tx, path, flow, now) {
            Ok(ticket) => {
                c.stats
                    .queued
                    .store(c.queue.len() as i64, std::sync::atomic::Ordering::Relaxed);
                Admission::Wait(rx, ticket)
            }
            Err(_) => Admission::Refused(RefuseReason::QueueFull),
        }
    }

    /// A waiting request gives up (timeout or client gone). Returns false when its permit
    /// was already sent, in which case the caller must take it from the receiver.
    pub fn give_up(&self, class: usize, ticket: Ticket) -> bool {
        let mut s = self.lock();
        let Some(c) = s.classes.get_mut(class) else {
            return true;
        };
        let removed = c.queue.remove(ticket).is_some();
        c.stats
            .queued
            .store(c.queue.len() as i64, std::sync::atomic::Ordering::Relaxed);
        removed
    }

    /// Teaches `class`'s queue the size of a response for `path` (shortest-first).
    pub fn observe_size(&self, class: usize, path: &str, bytes: u64) {
        if let Some(c) = self.lock().classes.get_mut(class) {
            c.queue.observe_size(path, bytes);
        }
    }

    fn release(self: &Arc<Self>, class: usize, backend: usize) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        if let Some(c) = s.classes.get_mut(class) {
            c.running = c.running.saturating_sub(1);
        }
        if let Some(g) = s.backends.get_mut(backend) {
            g.running = g.running.saturating_sub(1);
        }
        self.dispatch_locked(s);
    }

    /// Hands free slots to waiting requests, then sends the permits outside the lock.
    fn dispatch_locked(self: &Arc<Self>, mut s: MutexGuard<'_, Sched>) {
        let mut grants = Vec::new();
        let now = crate::clock::now();
        while s.running < s.max_running {
            let Sched {
                classes,
                dispatcher,
                backends,
                ..
            } = &mut *s;
            let open = |c: &SchedClass| {
                backends
                    .get(c.backend)
                    .is_none_or(|g| g.limit.is_none_or(|l| g.running < l))
            };
            let Some(class) = dispatcher.pick(&mut |i| {
                classes
                    .get(i)
                    .is_some_and(|c| !c.queue.is_empty() && c.running < c.max_running && open(c))
            }) else {
                break;
            };
            let c = &mut classes[class];
            let Some((tx, _queued_at)) = c.queue.pop(now) else {
                continue;
            };
            c.stats
                .queued
                .store(c.queue.len() as i64, std::sync::atomic::Ordering::Relaxed);
            if tx.is_closed() {
                continue; // the client went away while waiting
            }
            c.running += 1;
            let b = c.backend;
            if let Some(g) = backends.get_mut(b) {
                g.running += 1;
            }
            s.running += 1;
            grants.push((
                tx,
                Permit {
                    scheduler: Arc::clone(self),
                    class,
                    backend: b,
                },
            ));
        }
        drop(s);
        for (tx, permit) in grants {
            // If the waiter vanished in between, the returned permit is dropped here, which
            // releases its slot and dispatches again.
            let _ = tx.send(permit);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.scheduler.release(self.class, self.backend);
    }
}
