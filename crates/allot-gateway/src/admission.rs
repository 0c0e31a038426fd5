//! Admission, the same for an HTTP request and a TCP connection: the class's accept-rate
//! actuator, then (under agreements) the principal's credit, then a slot or a place in
//! the class queue. A place in the waiting room is taken before waiting for credit, so
//! credit waiters count against `queue_limit`; credit taken by a unit the queue then
//! refuses goes back with the dropped [`Charge`]. Every refusal is counted in the class's
//! sensors here.

use std::net::IpAddr;

use allot_model::Nanos;

use crate::config::CostOf;
use crate::credit::{Charge, Credit};
use crate::runtime::{ClassRt, Live, Runtime};
use crate::sched::{Admission, Permit};
use crate::stats::RefuseReason;

/// One request or connection asking to be served.
#[derive(Debug, Clone, Copy)]
pub struct Unit<'a> {
    /// Its client (the queue's flow, for the `share` policy).
    pub client: IpAddr,
    /// Its path (the queue's key for `shortest-first` and `locality`; empty for a
    /// connection).
    pub path: &'a str,
    /// Its listener's name (for cost rules).
    pub listener: &'a str,
    /// Whether it may be answered with a redirect (HTTP) rather than wait for credit.
    pub redirectable: bool,
    /// When it arrived.
    pub now: Nanos,
}

/// The outcome of admission.
#[derive(Debug)]
pub enum Admitted {
    /// A slot, and the credit taken for it (under agreements): keep the charge when
    /// service starts.
    Serve(Permit, Option<Charge>),
    /// Agreements in redirect mode, within credit: send the client to the server whose
    /// capacity serves it, at this base location.
    RedirectTo(String),
    /// Agreements in redirect mode, over credit: send the client back to try later.
    TryLater,
}

/// Admits `unit` into `class` of snapshot `rt`, or says why not (counted).
pub async fn admit(
    rt: &Runtime,
    live: &Live,
    class: &ClassRt,
    unit: Unit<'_>,
) -> Result<Admitted, RefuseReason> {
    let refuse = |reason: RefuseReason| {
        class.core.stats.refuse(reason);
        reason
    };
    if !class.core.try_accept(unit.now) {
        return Err(refuse(RefuseReason::Rate));
    }
    let scheduler = live.scheduler();
    let mut place = None;
    let mut charge = None;
    if let (Some(enforcer), Some(principal)) = (&rt.enforcer, class.principal) {
        let cost = enforcer.cost_of(&CostOf {
            path: unit.redirectable.then_some(unit.path),
            listener: unit.listener,
            class: class.name(),
        });
        match enforcer.arrive(principal, cost, unit.redirectable, unit.now) {
            Credit::Now(c) => {
                if enforcer.redirect() && unit.redirectable {
                    let base = enforcer
                        .location(principal, rand::random::<f64>())
                        .map(str::to_string);
                    c.keep();
                    // A principal whose plan places nothing has no location to go to.
                    return base
                        .map(Admitted::RedirectTo)
                        .ok_or_else(|| refuse(RefuseReason::Quota));
                }
                charge = Some(c);
            }
            Credit::Deferred => return Ok(Admitted::TryLater),
            Credit::Wait(wait) => {
                place = Some(
                    scheduler
                        .reserve_place(&class.core.sched)
                        .ok_or_else(|| refuse(RefuseReason::QueueFull))?,
                );
                charge = Some(
                    wait.wait(enforcer.max_wait())
                        .await
                        .ok_or_else(|| refuse(RefuseReason::Quota))?,
                );
            }
        }
    }
    let permit = match scheduler.admit(&class.core.sched, place, unit.path, unit.client, unit.now) {
        Admission::Now(p) => p,
        Admission::Refused(reason) => return Err(refuse(reason)),
        Admission::Queued(q) => q
            .wait(class.max_wait)
            .await
            .ok_or_else(|| refuse(RefuseReason::Timeout))?,
    };
    Ok(Admitted::Serve(permit, charge))
}
