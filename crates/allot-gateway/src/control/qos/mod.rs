//! The QoS manager: feedback loops that hold delay and utilisation targets, and adaptive
//! concurrency limits. Each `[[controller]]` is one loop, **sensor → controller →
//! actuator**, ticking on its period:
//!
//! - `delay` (open-QoS paper, 4.1): a class's mean queueing delay → PI in velocity form
//!   ([`allot_model::pi`]) → the accept rates of the throttled classes, cut in order;
//! - `utilisation` (4.3): the CPU use of a back end's processes (`/proc`) → the two-level
//!   controller ([`allot_model::utilisation`]) → divert probability, then accept rate;
//! - `adaptive` (FVM paper, 2.1–2.3): a back end's mean service time → slowdown signal and
//!   AIMD, or Envoy's gradient rule → that back end's concurrency limit in the dispatcher.
//!
//! The controllers are the model's pure ones; this module only reads sensors, passes the
//! time in (read once per tick from the gateway's clock), and applies the outputs
//! idempotently every tick, so a reload that resets an actuator is corrected one period
//! later. Loops are started, retuned and stopped by [`Controllers::reconcile`], which the
//! supervisor runs after every change of the configuration: the configuration stays the
//! one source of truth, and a controller added, changed or removed through the admin API
//! is checked exactly like a file. Pausing freezes a loop's outputs where they are.
//! Removing a loop puts its actuators back as configured.

mod cpu;
mod step;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Serialize;

use crate::config::ControllerConfig;
use crate::runtime::Live;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a loop last saw and did: served at `/controllers`, exported in `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Readout {
    /// Controller name.
    pub name: String,
    /// `delay`, `utilisation` or `adaptive`.
    pub kind: String,
    /// What it senses (`queue_delay_ms`, `cpu_percent`, `slowdown`, `latency_ms`).
    pub signal: String,
    /// The last measurement, when there was one.
    pub input: Option<f64>,
    /// The set point (for `adaptive`: the congestion threshold, or 1 for the gradient).
    pub setpoint: f64,
    /// Actuator values, by knob (`rate_per_sec:<class>`, `divert`, `limit`).
    pub outputs: Vec<(String, f64)>,
    /// Internal state worth seeing (level, offered rate, baseline, minRTT…).
    pub state: Vec<(String, f64)>,
    /// The last tick could not do more (an output at its bound, the error still pushing).
    pub saturated: bool,
    /// Ticks that ended saturated, since start.
    pub saturations: u64,
    /// Ticks since start.
    pub ticks: u64,
    /// Paused: outputs frozen.
    pub paused: bool,
    /// Period, milliseconds.
    pub period_ms: u64,
    /// Gateway time of the last tick, seconds.
    pub at_s: f64,
}

/// One loop at run time.
#[derive(Debug)]
pub(crate) struct Loop {
    name: String,
    config: Mutex<ControllerConfig>,
    retune: AtomicBool,
    paused: AtomicBool,
    readout: Mutex<Readout>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Every controller loop of one gateway.
#[derive(Debug, Default)]
pub struct Controllers {
    loops: Mutex<Vec<Arc<Loop>>>,
}

impl Controllers {
    /// A copy of every loop's readout, in configuration order.
    pub fn readouts(&self) -> Vec<Readout> {
        lock(&self.loops)
            .iter()
            .map(|l| {
                let mut r = lock(&l.readout).clone();
                r.paused = l.paused.load(Relaxed);
                r
            })
            .collect()
    }

    /// Pauses (outputs frozen) or resumes a loop; false when there is no such loop.
    pub fn set_paused(&self, name: &str, paused: bool) -> bool {
        match lock(&self.loops).iter().find(|l| l.name == name) {
            Some(l) => {
                l.paused.store(paused, Relaxed);
                tracing::info!(controller = %name, paused, "controller {}", if paused { "paused" } else { "resumed" });
                true
            }
            None => false,
        }
    }
}

impl Controllers {
    /// Starts, retunes and stops loops to match the configuration in force.
    pub(crate) fn reconcile(&self, live: &Arc<Live>) {
        let rt = live.load();
        let configs: Vec<ControllerConfig> = rt
            .config
            .controller
            .iter()
            .map(|c| c.get_ref().clone())
            .collect();
        let mut loops = lock(&self.loops);
        // Gone, or changed kind: stop and put the actuators back.
        loops.retain(|l| {
            let keep = configs
                .iter()
                .any(|c| c.name() == l.name && c.kind() == lock(&l.config).kind());
            if !keep {
                if let Some(task) = lock(&l.task).take() {
                    task.abort();
                }
                step::release(live, &lock(&l.config));
                tracing::info!(controller = %l.name, "controller stopped");
            }
            keep
        });
        let mut ordered = Vec::with_capacity(configs.len());
        for c in configs {
            match loops.iter().position(|l| l.name == c.name()) {
                Some(i) => {
                    let l = loops.swap_remove(i);
                    let mut current = lock(&l.config);
                    if *current != c {
                        if let (ControllerConfig::Adaptive(a), ControllerConfig::Adaptive(b)) =
                            (&*current, &c)
                        {
                            if a.backend != b.backend {
                                step::release(live, &current);
                            }
                        }
                        *current = c;
                        l.retune.store(true, Relaxed);
                        tracing::info!(controller = %l.name, "controller retuned");
                    }
                    drop(current);
                    ordered.push(l);
                }
                None => {
                    let l = Arc::new(Loop {
                        name: c.name().to_string(),
                        readout: Mutex::new(Readout {
                            name: c.name().to_string(),
                            kind: c.kind().to_string(),
                            period_ms: c.period_ms(),
                            ..Readout::default()
                        }),
                        config: Mutex::new(c),
                        retune: AtomicBool::new(false),
                        paused: AtomicBool::new(false),
                        task: Mutex::new(None),
                    });
                    // The initial limit holds from the first request, not the first tick.
                    step::prime(live, &lock(&l.config));
                    // Without a runtime (a configuration check) nothing runs.
                    if let Ok(handle) = tokio::runtime::Handle::try_current() {
                        let task = handle.spawn(run(Arc::downgrade(live), Arc::clone(&l)));
                        *lock(&l.task) = Some(task);
                        tracing::info!(controller = %l.name, "controller started");
                    }
                    ordered.push(l);
                }
            }
        }
        *loops = ordered;
    }

    /// Stops every loop, leaving the actuators where they are (the gateway is stopping).
    pub(crate) fn stop(&self) {
        for l in lock(&self.loops).iter() {
            if let Some(task) = lock(&l.task).take() {
                task.abort();
            }
        }
    }
}

/// How far each tick may fall from the period, as a fraction of it (both ways).
///
/// Several gateways' loops on one shared back end must not keep a fixed phase order:
/// with AIMD, whichever loop closes its period first after the back end slows down takes
/// the cut, the others then see the relief and do not, and with fixed phases that is the
/// same loop every time, so the limits drift apart and stay apart. A tick
/// jittered by ±25% reshuffles the order within a few periods; the controllers measure
/// each period's length, so none of them assumes a fixed one.
const TICK_JITTER: f64 = 0.25;

/// The wait before the next tick: the period, jittered by [`TICK_JITTER`].
fn next_tick(period_ms: u64) -> Duration {
    let u: f64 = rand::random::<f64>() * 2.0 - 1.0;
    Duration::from_secs_f64(period_ms.max(1) as f64 * (1.0 + TICK_JITTER * u) / 1000.0)
}

/// One loop: tick on the period, read the clock once, step, publish the readout.
async fn run(live: Weak<Live>, l: Arc<Loop>) {
    let mut period_ms = lock(&l.config).period_ms();
    let mut state: Option<step::State> = None;
    let mut was_saturated = false;
    loop {
        tokio::time::sleep(next_tick(period_ms)).await;
        let Some(live) = live.upgrade() else {
            return; // the gateway is gone
        };
        let gw = &*live;
        let config = lock(&l.config).clone();
        period_ms = config.period_ms();
        let now = crate::clock::now();
        if l.retune.swap(false, Relaxed) {
            state = Some(step::State::new(&config, gw, now, state.as_ref()));
        }
        let state = state.get_or_insert_with(|| step::State::new(&config, gw, now, None));
        if l.paused.load(Relaxed) {
            // Paused: keep the sensors' baselines fresh so resuming starts from now.
            state.skip(now);
            continue;
        }
        let out = state.step(&config, gw, now);
        drop(live);
        let mut r = lock(&l.readout);
        r.kind = config.kind().to_string();
        r.period_ms = period_ms;
        r.ticks += 1;
        r.at_s = now.as_secs_f64();
        r.signal = out.signal.to_string();
        r.input = out.input;
        r.setpoint = out.setpoint;
        r.outputs = out.outputs;
        r.state = out.state;
        r.saturated = out.saturated;
        if out.saturated {
            r.saturations += 1;
            if !was_saturated {
                tracing::warn!(
                    controller = %l.name,
                    kind = config.kind(),
                    input = ?out.input,
                    setpoint = out.setpoint,
                    outputs = ?r.outputs,
                    "controller saturated: its actuators are at their bounds and the error persists"
                );
            }
        } else if was_saturated {
            tracing::info!(controller = %l.name, "controller no longer saturated");
        }
        was_saturated = out.saturated;
    }
}
