//! One tick of each kind of loop: read the sensors since the last tick, ask the model's
//! controller, apply its output. The time is passed in.

use std::sync::atomic::Ordering::Relaxed;

use allot_model::aimd::Aimd;
use allot_model::gradient::{Gradient, GradientPhase};
use allot_model::pi::{split_ordered, Pi, Saturation, Throttled};
use allot_model::slowdown::SlowdownSignal;
use allot_model::utilisation::{Level, Utilisation, UtilisationSample};
use allot_model::Nanos;

use super::cpu::CpuSensor;
use crate::config::controller::{
    AdaptiveConfig, AdaptiveRule, ControllerConfig, DelayConfig, UtilisationControllerConfig,
};
use crate::runtime::Live;
use crate::stats::HistogramSnapshot;

/// A rate above what a class offers times this refuses nothing: the delay loop jumps
/// down to it rather than wind through the dead range, and hands out spare rate to each
/// class up to it before giving any class more.
const HEADROOM: f64 = 1.25;

/// What one tick produced.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub signal: &'static str,
    pub input: Option<f64>,
    pub setpoint: f64,
    pub outputs: Vec<(String, f64)>,
    pub state: Vec<(String, f64)>,
    pub saturated: bool,
}

/// A counter and a histogram at the previous tick, to take differences.
#[derive(Debug, Default, Clone)]
struct Prev {
    at: Option<Nanos>,
}

impl Prev {
    /// Seconds since the previous tick (None on the first), and remembers `now`.
    fn dt_s(&mut self, now: Nanos) -> Option<f64> {
        let dt = self
            .at
            .map(|a| now.saturating_since(a).as_secs_f64())
            .filter(|d| *d > 0.0);
        self.at = Some(now);
        dt
    }
}

/// A loop's controller and the sensor readings it differences against.
pub(crate) enum State {
    Delay(DelayState),
    Utilisation(UtilState),
    Adaptive(AdaptiveState),
}

pub(crate) struct DelayState {
    pi: Option<Pi>,
    prev: Prev,
    delay: Option<HistogramSnapshot>,
    arrivals: Vec<u64>,
}

pub(crate) struct UtilState {
    controller: Option<Utilisation>,
    cpu: CpuSensor,
    prev: Prev,
    arrivals: Option<u64>,
}

pub(crate) struct AdaptiveState {
    rule: Rule,
    prev: Prev,
    service: Option<HistogramSnapshot>,
}

enum Rule {
    Aimd { signal: SlowdownSignal, aimd: Aimd },
    Gradient(Gradient),
    Invalid,
}

fn class_stats(gw: &Live, name: &str) -> Option<std::sync::Arc<crate::stats::ClassStats>> {
    gw.load()
        .class(name)
        .map(|c| std::sync::Arc::clone(&c.core.stats))
}

/// Actuator: sets the accept rate of the class named `name` (`None`: as configured).
fn set_accept_rate(gw: &Live, name: &str, rate: Option<(f64, f64)>, now: Nanos) {
    if let Some(c) = gw.load().class(name) {
        c.core.set_accept_rate(rate, now);
    }
}

/// Actuator: sets the adaptive limit of the back end named `name` (`None`: no limit).
fn set_backend_limit(gw: &Live, name: &str, limit: Option<usize>) {
    if let Some(b) = gw.load().backend(name) {
        gw.scheduler().set_backend_limit(&b.core.gate, limit);
    }
}

impl State {
    /// A fresh controller for `config`; `previous` (a retune) hands over its outputs so
    /// the knobs do not jump.
    pub(crate) fn new(
        config: &ControllerConfig,
        gw: &Live,
        now: Nanos,
        previous: Option<&State>,
    ) -> State {
        let mut s = match config {
            ControllerConfig::Delay(d) => {
                let initial = match previous {
                    Some(State::Delay(p)) => p.pi.as_ref().map(|p| p.output()),
                    _ => None,
                };
                State::Delay(DelayState {
                    pi: Pi::new(
                        d.pi(),
                        initial.unwrap_or(
                            d.initial_rate_per_sec
                                .map_or(f64::INFINITY, |r| r * d.throttle.len() as f64),
                        ),
                    )
                    .ok(),
                    prev: Prev::default(),
                    delay: None,
                    arrivals: Vec::new(),
                })
            }
            ControllerConfig::Utilisation(u) => {
                let controller = match previous {
                    Some(State::Utilisation(p)) => p.controller.clone().and_then(|mut c| {
                        c.retune(u.model()).ok()?;
                        Some(c)
                    }),
                    _ => None,
                }
                .or_else(|| Utilisation::new(u.model()).ok());
                State::Utilisation(UtilState {
                    controller,
                    cpu: CpuSensor::new(&u.pids, u.tree, u.comm.as_deref()),
                    prev: Prev::default(),
                    arrivals: None,
                })
            }
            ControllerConfig::Adaptive(a) => {
                let carried = match previous {
                    Some(State::Adaptive(p)) => p.limit(),
                    _ => None,
                };
                State::Adaptive(AdaptiveState {
                    rule: Rule::new(a, carried.unwrap_or(a.initial_limit)),
                    prev: Prev::default(),
                    service: None,
                })
            }
        };
        s.skip(now);
        if let (State::Adaptive(st), ControllerConfig::Adaptive(a)) = (&s, config) {
            st.apply(gw, a);
        }
        s
    }

    /// Takes fresh sensor baselines without acting (first tick, or paused).
    pub(crate) fn skip(&mut self, now: Nanos) {
        // Each kind's own baselines are refreshed by a step that does not act; the
        // simplest faithful way is to read and throw away.
        match self {
            State::Delay(s) => {
                s.prev.at = Some(now);
                s.delay = None;
                s.arrivals.clear();
            }
            State::Utilisation(s) => {
                s.prev.at = Some(now);
                s.cpu.read(now);
                s.arrivals = None;
            }
            State::Adaptive(s) => {
                s.prev.at = Some(now);
                s.service = None;
            }
        }
    }

    /// One tick.
    pub(crate) fn step(&mut self, config: &ControllerConfig, gw: &Live, now: Nanos) -> Outcome {
        match (self, config) {
            (State::Delay(s), ControllerConfig::Delay(c)) => s.step(c, gw, now),
            (State::Utilisation(s), ControllerConfig::Utilisation(c)) => s.step(c, gw, now),
            (State::Adaptive(s), ControllerConfig::Adaptive(c)) => s.step(c, gw, now),
            // A kind change replaces the loop (see `reconcile`); nothing to do here.
            _ => Outcome::default(),
        }
    }
}

impl DelayState {
    fn step(&mut self, c: &DelayConfig, gw: &Live, now: Nanos) -> Outcome {
        let mut out = Outcome {
            signal: "queue_delay_ms",
            setpoint: c.setpoint_ms,
            ..Outcome::default()
        };
        let dt = self.prev.dt_s(now);
        // Sensor: the held class's mean queueing delay over the period.
        let Some(held) = class_stats(gw, &c.class) else {
            return out;
        };
        let snap = held.queue_delay.snapshot();
        let measured = match (&self.delay, dt) {
            (Some(before), Some(dt)) => {
                let d = snap.since(before);
                if d.count() > 0 {
                    Some(d.mean_ms())
                } else if held.queued.load(Relaxed) > 0 {
                    // Waiting but nobody served: the delay is at least a period.
                    Some(dt * 1e3)
                } else {
                    None // no traffic: nothing to hold
                }
            }
            _ => None,
        };
        self.delay = Some(snap);
        // What each throttled class offers (arrivals per second).
        let arrivals: Vec<u64> = c
            .throttle
            .iter()
            .map(|t| class_stats(gw, t).map_or(0, |s| s.arrivals.load(Relaxed)))
            .collect();
        let offered: Vec<f64> = match dt {
            Some(dt) if self.arrivals.len() == arrivals.len() => arrivals
                .iter()
                .zip(&self.arrivals)
                .map(|(now, before)| now.saturating_sub(*before) as f64 / dt)
                .collect(),
            _ => vec![f64::NAN; arrivals.len()],
        };
        self.arrivals = arrivals;
        out.input = measured;
        let Some(pi) = self.pi.as_mut() else {
            return out;
        };
        let (Some(measured), Some(dt)) = (measured, dt) else {
            return out;
        };
        if offered.iter().any(|o| o.is_nan()) {
            return out;
        }
        let error = c.setpoint_ms - measured;
        let total_offered: f64 = offered.iter().sum();
        if error < 0.0 && pi.output() > total_offered * HEADROOM {
            // Cutting a rate that refuses nothing does nothing: start where it bites.
            pi.set_output(total_offered * HEADROOM);
        }
        let total = pi.update(error, dt);
        let throttled: Vec<Throttled> = offered
            .iter()
            .map(|&o| Throttled {
                min: c.min_rate_per_sec,
                max: c.max_rate_per_sec,
                offered: o,
            })
            .collect();
        let rates = split_ordered(total, &throttled, HEADROOM);
        for (name, rate) in c.throttle.iter().zip(&rates) {
            set_accept_rate(gw, name, Some((*rate, c.burst)), now);
            out.outputs.push((format!("rate_per_sec:{name}"), *rate));
        }
        for (name, o) in c.throttle.iter().zip(&offered) {
            out.state.push((format!("offered_per_sec:{name}"), *o));
        }
        out.state.push(("total_rate_per_sec".into(), total));
        // Saturated low: every throttled class at its minimum and the delay still high.
        out.saturated =
            pi.saturation() == Saturation::Low || (error < 0.0 && total <= pi.config().min);
        out
    }
}

impl UtilState {
    fn step(&mut self, c: &UtilisationControllerConfig, gw: &Live, now: Nanos) -> Outcome {
        let mut out = Outcome {
            signal: "cpu_percent",
            setpoint: c.setpoint_percent,
            ..Outcome::default()
        };
        let dt = self.prev.dt_s(now);
        let utilisation = self.cpu.read(now);
        out.input = utilisation;
        let arrivals = class_stats(gw, &c.class).map_or(0, |s| s.arrivals.load(Relaxed));
        let offered = match (self.arrivals.replace(arrivals), dt) {
            (Some(before), Some(dt)) => Some(arrivals.saturating_sub(before) as f64 / dt),
            _ => None,
        };
        out.state
            .push(("members".into(), self.cpu.members() as f64));
        let (Some(ctl), Some(u), Some(offered), Some(dt)) =
            (self.controller.as_mut(), utilisation, offered, dt)
        else {
            return out;
        };
        let o = ctl.update(UtilisationSample {
            utilisation_percent: u,
            offered_per_sec: offered,
            dt_s: dt,
        });
        if let Some(class) = gw.load().class(&c.class) {
            class
                .core
                .divert
                .set(Some(c.degraded_backend.as_str()), o.divert);
            let rate = (o.level == Level::Throttle).then_some((o.rate_per_sec, c.burst));
            class.core.set_accept_rate(rate, now);
        }
        out.outputs.push(("divert".into(), o.divert));
        out.outputs.push(("rate_per_sec".into(), o.rate_per_sec));
        out.state.push(("level".into(), o.level.as_number()));
        out.state.push(("offered_per_sec".into(), offered));
        out.saturated = o.saturated;
        out
    }
}

impl Rule {
    fn new(a: &AdaptiveConfig, initial: f64) -> Rule {
        match a.rule {
            AdaptiveRule::Aimd => match (
                SlowdownSignal::new(a.slowdown()),
                Aimd::new(a.aimd(), initial),
            ) {
                (Ok(signal), Ok(aimd)) => Rule::Aimd { signal, aimd },
                _ => Rule::Invalid,
            },
            AdaptiveRule::Gradient => Gradient::new(a.gradient(), initial)
                .map(Rule::Gradient)
                .unwrap_or(Rule::Invalid),
        }
    }
}

impl AdaptiveState {
    fn limit(&self) -> Option<f64> {
        match &self.rule {
            Rule::Aimd { aimd, .. } => Some(aimd.limit()),
            Rule::Gradient(g) => Some(g.limit()),
            Rule::Invalid => None,
        }
    }

    fn apply(&self, gw: &Live, c: &AdaptiveConfig) {
        if let Some(limit) = self.limit() {
            set_backend_limit(gw, &c.backend, Some(limit.floor().max(1.0) as usize));
        }
    }

    fn step(&mut self, c: &AdaptiveConfig, gw: &Live, now: Nanos) -> Outcome {
        let mut out = Outcome::default();
        let dt = self.prev.dt_s(now);
        let rt = gw.load();
        let Some(backend) = rt.backend(&c.backend) else {
            return out;
        };
        // Sensor: mean service time of the requests that completed in the period.
        let snap = backend.stats().service_time.snapshot();
        let sample = match (&self.service, dt) {
            (Some(before), Some(_)) => {
                let d = snap.since(before);
                (d.count() > 0).then(|| d.mean_ms())
            }
            _ => None,
        };
        self.service = Some(snap);
        let in_flight = backend.core.gate.running().0 as f64;
        match &mut self.rule {
            Rule::Aimd { signal, aimd } => {
                out.signal = "slowdown";
                out.setpoint = c.threshold;
                if let Some(ms) = sample {
                    signal.record(ms);
                }
                let reading = signal.end_period(now);
                out.input = Some(reading.slowdown);
                // No completions: nothing learned; hold the limit.
                if sample.is_some() {
                    aimd.update(reading.congested);
                }
                out.saturated = reading.congested && aimd.limit() <= aimd.config().min;
                if let Some(e) = reading.ewma {
                    out.state.push(("ewma_ms".into(), e));
                }
                if let Some(b) = reading.baseline {
                    out.state.push(("baseline_ms".into(), b));
                }
                out.state
                    .push(("congested".into(), f64::from(u8::from(reading.congested))));
            }
            Rule::Gradient(g) => {
                out.signal = "latency_ms";
                out.setpoint = 1.0;
                out.input = sample;
                g.end_window(sample, in_flight);
                if let Some(m) = g.min_rtt() {
                    out.state.push(("min_rtt_ms".into(), m));
                }
                out.state.push(("gradient".into(), g.gradient()));
                out.state.push((
                    "measuring".into(),
                    f64::from(u8::from(g.phase() == GradientPhase::Measuring)),
                ));
                out.saturated = g.limit() <= c.min_limit && g.gradient() <= 0.5;
            }
            Rule::Invalid => return out,
        }
        out.state.push(("in_flight".into(), in_flight));
        if let Some(l) = self.limit() {
            out.outputs.push(("limit".into(), l.floor().max(1.0)));
        }
        self.apply(gw, c);
        out
    }
}

/// Sets a new loop's actuators to their starting values before it first ticks.
pub(crate) fn prime(gw: &Live, config: &ControllerConfig) {
    if let ControllerConfig::Adaptive(a) = config {
        let limit = match a.rule {
            AdaptiveRule::Aimd => a.initial_limit.clamp(a.min_limit, a.max_limit),
            // The gradient rule starts by measuring minRTT at its pinned concurrency.
            AdaptiveRule::Gradient => a.min_concurrency.min(a.max_limit),
        };
        if limit.is_finite() {
            set_backend_limit(gw, &a.backend, Some(limit.floor().max(1.0) as usize));
        }
    }
}

/// Puts a loop's actuators back as the configuration says (the loop is going away).
pub(crate) fn release(gw: &Live, config: &ControllerConfig) {
    let now = crate::clock::now();
    match config {
        ControllerConfig::Delay(d) => {
            for t in &d.throttle {
                set_accept_rate(gw, t, None, now);
            }
        }
        ControllerConfig::Utilisation(u) => {
            if let Some(class) = gw.load().class(&u.class) {
                class.core.divert.set(None, 0.0);
                class.core.set_accept_rate(None, now);
            }
        }
        ControllerConfig::Adaptive(a) => set_backend_limit(gw, &a.backend, None),
    }
}
