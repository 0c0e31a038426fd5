//! `[[controller]]` tables: one feedback loop each, tagged by `kind`.
//!
//! Validation builds the model's controller from the table, so a value the controller
//! would refuse is refused at load with the file, line and key, like every other key.

use std::collections::HashSet;
use std::ops::Range;

use allot_model::aimd::{Aimd, AimdConfig, AimdError};
use allot_model::gradient::{Gradient, GradientConfig, GradientError};
use allot_model::pi::{Pi, PiConfig, PiError};
use allot_model::slowdown::{SlowdownConfig, SlowdownError, SlowdownSignal};
use allot_model::utilisation::{Utilisation, UtilisationConfig};
use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// One controller: sensor → controller → actuator on a period.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ControllerConfig {
    /// Hold a class's mean queueing delay by moving other classes' accept rates.
    Delay(DelayConfig),
    /// Hold a back end's CPU utilisation by diverting, then throttling, a class.
    Utilisation(UtilisationControllerConfig),
    /// Adapt a back end's concurrency limit to its service time.
    Adaptive(AdaptiveConfig),
}

impl ControllerConfig {
    /// The controller's name.
    pub fn name(&self) -> &str {
        match self {
            ControllerConfig::Delay(c) => &c.name,
            ControllerConfig::Utilisation(c) => &c.name,
            ControllerConfig::Adaptive(c) => &c.name,
        }
    }

    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            ControllerConfig::Delay(_) => "delay",
            ControllerConfig::Utilisation(_) => "utilisation",
            ControllerConfig::Adaptive(_) => "adaptive",
        }
    }

    /// The period, milliseconds.
    pub fn period_ms(&self) -> u64 {
        match self {
            ControllerConfig::Delay(c) => c.period_ms,
            ControllerConfig::Utilisation(c) => c.period_ms,
            ControllerConfig::Adaptive(c) => c.period_ms,
        }
    }
}

/// `kind = "delay"`: the PI delay guarantee (open-QoS paper, section 4.1).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DelayConfig {
    /// Name, unique among controllers.
    pub name: String,
    /// The class whose mean queueing delay is held.
    pub class: String,
    /// The target mean queueing delay, milliseconds.
    pub setpoint_ms: f64,
    /// Classes whose accept rate is moved, cut in this order (the first is cut first).
    pub throttle: Vec<String>,
    /// Period of the loop, milliseconds.
    #[serde(default = "default_delay_period_ms")]
    pub period_ms: u64,
    /// Proportional gain: requests/s per millisecond of error change.
    #[serde(default = "default_delay_kp")]
    pub kp: f64,
    /// Integral gain: requests/s per millisecond of error per second.
    #[serde(default = "default_delay_ki")]
    pub ki: f64,
    /// Lowest accept rate given to each throttled class, requests per second.
    #[serde(default = "default_min_rate")]
    pub min_rate_per_sec: f64,
    /// Highest accept rate given to each throttled class, requests per second.
    #[serde(default = "default_max_rate")]
    pub max_rate_per_sec: f64,
    /// Burst of the accept-rate buckets the controller sets.
    #[serde(default = "default_rate_burst")]
    pub burst: f64,
    /// Rate each throttled class starts at, requests per second (default: the maximum).
    /// Starting low protects the held class from the first seconds' flood.
    pub initial_rate_per_sec: Option<f64>,
}

/// `kind = "utilisation"`: two-level CPU utilisation control (open-QoS paper, 4.3).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UtilisationControllerConfig {
    /// Name, unique among controllers.
    pub name: String,
    /// The class whose requests are diverted, then throttled.
    pub class: String,
    /// The back end serving the degraded variant.
    pub degraded_backend: String,
    /// The back end's processes, by PID.
    #[serde(default)]
    pub pids: Vec<i32>,
    /// The back end's processes: this PID and all its descendants.
    pub tree: Option<i32>,
    /// The back end's processes: command names matching this regex.
    pub comm: Option<String>,
    /// Target CPU use of those processes, percent of one CPU.
    pub setpoint_percent: f64,
    /// Period of the loop, milliseconds.
    #[serde(default = "default_util_period_ms")]
    pub period_ms: u64,
    /// Divert level: probability per percentage point of error change.
    #[serde(default = "default_divert_kp")]
    pub divert_kp: f64,
    /// Divert level: probability per percentage point of error per second.
    #[serde(default = "default_divert_ki")]
    pub divert_ki: f64,
    /// Rate level: requests/s per percentage point of error change.
    #[serde(default = "default_rate_kp")]
    pub rate_kp: f64,
    /// Rate level: requests/s per percentage point of error per second.
    #[serde(default = "default_rate_ki")]
    pub rate_ki: f64,
    /// Lowest accept rate, requests per second.
    #[serde(default = "default_min_rate")]
    pub min_rate_per_sec: f64,
    /// Accept rate when not throttling, requests per second.
    #[serde(default = "default_max_rate")]
    pub max_rate_per_sec: f64,
    /// Burst of the accept-rate bucket.
    #[serde(default = "default_rate_burst")]
    pub burst: f64,
}

/// The rule an adaptive limit follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AdaptiveRule {
    /// AIMD from the slowdown signal (FVM paper, sections 2.1 and 2.3).
    #[default]
    Aimd,
    /// Envoy's gradient rule.
    Gradient,
}

/// `kind = "adaptive"`: a per-back-end concurrency limit.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Name, unique among controllers.
    pub name: String,
    /// The back end whose requests in flight are limited.
    pub backend: String,
    /// `aimd` (default) or `gradient`.
    #[serde(default)]
    pub rule: AdaptiveRule,
    /// Period of the loop (one slowdown period, one gradient window), milliseconds.
    #[serde(default = "default_adaptive_period_ms")]
    pub period_ms: u64,
    /// Lowest limit.
    #[serde(default = "default_min_limit")]
    pub min_limit: f64,
    /// Highest limit.
    #[serde(default = "default_max_limit")]
    pub max_limit: f64,
    /// The limit to start from.
    #[serde(default = "default_initial_limit")]
    pub initial_limit: f64,
    /// AIMD: added per period when not congested.
    #[serde(default = "default_increase")]
    pub increase: f64,
    /// AIMD: divides the limit when congested.
    #[serde(default = "default_decrease")]
    pub decrease: f64,
    /// AIMD: congested when the slowdown exceeds this.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// AIMD: EWMA weight of each period's mean service time.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// AIMD: periods over which the baseline minimum is taken.
    #[serde(default = "default_window_periods")]
    pub window_periods: usize,
    /// Gradient: tolerated latency above minRTT, as a fraction of it.
    #[serde(default = "default_buffer")]
    pub buffer: f64,
    /// Gradient: the limit while minRTT is measured.
    #[serde(default = "default_min_concurrency")]
    pub min_concurrency: f64,
    /// Gradient: periods between minRTT measurements.
    #[serde(default = "default_recalc_every")]
    pub recalc_every: u32,
}

fn default_delay_period_ms() -> u64 {
    100
}
fn default_delay_kp() -> f64 {
    0.2
}
fn default_delay_ki() -> f64 {
    2.0
}
fn default_min_rate() -> f64 {
    1.0
}
fn default_max_rate() -> f64 {
    10_000.0
}
fn default_rate_burst() -> f64 {
    5.0
}
fn default_util_period_ms() -> u64 {
    1_000
}
fn default_divert_kp() -> f64 {
    0.005
}
fn default_divert_ki() -> f64 {
    0.01
}
fn default_rate_kp() -> f64 {
    0.5
}
fn default_rate_ki() -> f64 {
    1.0
}
fn default_adaptive_period_ms() -> u64 {
    200
}
fn default_min_limit() -> f64 {
    1.0
}
fn default_max_limit() -> f64 {
    1_000.0
}
fn default_initial_limit() -> f64 {
    10.0
}
fn default_increase() -> f64 {
    1.0
}
fn default_decrease() -> f64 {
    1.5
}
fn default_threshold() -> f64 {
    2.5
}
fn default_gamma() -> f64 {
    0.3
}
fn default_window_periods() -> usize {
    25
}
fn default_buffer() -> f64 {
    0.25
}
fn default_min_concurrency() -> f64 {
    3.0
}
fn default_recalc_every() -> u32 {
    100
}

/// Shortest period a loop may have.
const MIN_PERIOD_MS: u64 = 10;

impl DelayConfig {
    pub(crate) fn pi(&self) -> PiConfig {
        let n = self.throttle.len().max(1) as f64;
        PiConfig {
            kp: self.kp,
            ki: self.ki,
            min: self.min_rate_per_sec * n,
            max: self.max_rate_per_sec * n,
        }
    }
}

impl UtilisationControllerConfig {
    pub(crate) fn model(&self) -> UtilisationConfig {
        UtilisationConfig {
            setpoint_percent: self.setpoint_percent,
            divert_kp: self.divert_kp,
            divert_ki: self.divert_ki,
            rate_kp: self.rate_kp,
            rate_ki: self.rate_ki,
            min_rate_per_sec: self.min_rate_per_sec,
            max_rate_per_sec: self.max_rate_per_sec,
        }
    }
}

impl AdaptiveConfig {
    pub(crate) fn aimd(&self) -> AimdConfig {
        AimdConfig {
            min: self.min_limit,
            max: self.max_limit,
            increase: self.increase,
            decrease: self.decrease,
        }
    }

    pub(crate) fn slowdown(&self) -> SlowdownConfig {
        SlowdownConfig {
            gamma: self.gamma,
            window_periods: self.window_periods,
            threshold: self.threshold,
        }
    }

    pub(crate) fn gradient(&self) -> GradientConfig {
        GradientConfig {
            min_limit: self.min_limit,
            max_limit: self.max_limit,
            min_concurrency: self.min_concurrency,
            buffer: self.buffer,
            recalc_every: self.recalc_every,
        }
    }
}

/// Builds an error for `key` of the table at `span`.
pub type Invalid<'a> = &'a dyn Fn(Range<usize>, String, String) -> ConfigError;

/// Checks every `[[controller]]` against the rest of the configuration.
pub fn validate(config: &Config, invalid: Invalid<'_>) -> Result<(), ConfigError> {
    let classes: HashSet<&str> = config.classes().map(|c| c.name.as_str()).collect();
    let backends: HashSet<&str> = config.backends().map(|b| b.name.as_str()).collect();
    let mut names = HashSet::new();
    let mut limited = HashSet::new();
    for c in &config.controller {
        let (span, c) = (c.span(), c.get_ref());
        let name = c.name();
        let err =
            |k: &str, m: String| Err(invalid(span.clone(), format!("controller.{name}.{k}"), m));
        if name.is_empty() {
            return err("name", "expected a non-empty name".into());
        }
        if !names.insert(name) {
            return err("name", "controller names must be unique".into());
        }
        if c.period_ms() < MIN_PERIOD_MS {
            return err(
                "period_ms",
                format!(
                    "expected an integer ≥ {MIN_PERIOD_MS}, got {}",
                    c.period_ms()
                ),
            );
        }
        let known_class = |k: &str, v: &str| {
            if classes.contains(v) {
                Ok(())
            } else {
                err(
                    k,
                    format!("no [[class]] is named {v:?}; known: {}", join(&classes)),
                )
            }
        };
        let known_backend = |k: &str, v: &str| {
            if backends.contains(v) {
                Ok(())
            } else {
                err(
                    k,
                    format!("no [[backend]] is named {v:?}; known: {}", join(&backends)),
                )
            }
        };
        match c {
            ControllerConfig::Delay(d) => {
                known_class("class", &d.class)?;
                if d.throttle.is_empty() {
                    return err("throttle", "expected at least one class to throttle".into());
                }
                let mut seen = HashSet::new();
                for t in &d.throttle {
                    known_class("throttle", t)?;
                    if *t == d.class {
                        return err(
                            "throttle",
                            format!(
                                "{t:?} is the class whose delay is held; it cannot throttle itself"
                            ),
                        );
                    }
                    if !seen.insert(t) {
                        return err("throttle", format!("{t:?} is listed twice"));
                    }
                }
                if !(d.setpoint_ms.is_finite() && d.setpoint_ms > 0.0) {
                    return err(
                        "setpoint_ms",
                        format!("expected a number > 0, got {}", d.setpoint_ms),
                    );
                }
                if !(d.min_rate_per_sec.is_finite() && d.min_rate_per_sec >= 0.0) {
                    return err(
                        "min_rate_per_sec",
                        format!("expected a number ≥ 0, got {}", d.min_rate_per_sec),
                    );
                }
                if let Some(r) = d.initial_rate_per_sec {
                    if !(r.is_finite() && r >= d.min_rate_per_sec && r <= d.max_rate_per_sec) {
                        return err(
                            "initial_rate_per_sec",
                            format!("expected a number between min_rate_per_sec and max_rate_per_sec, got {r}"),
                        );
                    }
                }
                if !(d.burst.is_finite() && d.burst >= 1.0) {
                    return err("burst", format!("expected a number ≥ 1, got {}", d.burst));
                }
                if let Err(e) = Pi::new(d.pi(), 0.0) {
                    return err(pi_key(&e, "kp", "max_rate_per_sec"), e.to_string());
                }
            }
            ControllerConfig::Utilisation(u) => {
                known_class("class", &u.class)?;
                known_backend("degraded_backend", &u.degraded_backend)?;
                if let Some(class) = config.classes().find(|k| k.name == u.class) {
                    if class.backend == u.degraded_backend {
                        return err("degraded_backend", format!("{:?} is the class's own back end; the degraded variant must be another", u.degraded_backend));
                    }
                }
                if u.pids.is_empty() && u.tree.is_none() && u.comm.is_none() {
                    return err(
                        "pids",
                        "say which processes to measure: `pids`, `tree` or `comm`".into(),
                    );
                }
                if let Some(p) = u.pids.iter().chain(u.tree.iter()).find(|p| **p <= 0) {
                    return err("pids", format!("expected PIDs > 0, got {p}"));
                }
                if let Some(re) = &u.comm {
                    if let Err(e) = regex::Regex::new(re) {
                        return err("comm", format!("not a valid regex: {e}"));
                    }
                }
                if !(u.setpoint_percent.is_finite() && u.setpoint_percent > 0.0) {
                    return err(
                        "setpoint_percent",
                        format!(
                            "expected a number > 0 (percent of one CPU), got {}",
                            u.setpoint_percent
                        ),
                    );
                }
                if !(u.burst.is_finite() && u.burst >= 1.0) {
                    return err("burst", format!("expected a number ≥ 1, got {}", u.burst));
                }
                if let Err(e) = Utilisation::new(u.model()) {
                    let key = pi_key(
                        &e,
                        "divert_kp, divert_ki, rate_kp or rate_ki",
                        "max_rate_per_sec",
                    );
                    return err(key, e.to_string());
                }
            }
            ControllerConfig::Adaptive(a) => {
                known_backend("backend", &a.backend)?;
                if !limited.insert(a.backend.as_str()) {
                    return err(
                        "backend",
                        format!(
                            "back end {:?} already has an adaptive controller",
                            a.backend
                        ),
                    );
                }
                if !(a.min_limit.is_finite() && a.min_limit >= 1.0) {
                    return err(
                        "min_limit",
                        format!("expected a number ≥ 1, got {}", a.min_limit),
                    );
                }
                if let Err(e) = Aimd::new(a.aimd(), a.initial_limit) {
                    let key = match e {
                        AimdError::Increase(_) => "increase",
                        AimdError::Decrease(_) => "decrease",
                        _ => "max_limit",
                    };
                    return err(key, e.to_string());
                }
                if let Err(e) = SlowdownSignal::new(a.slowdown()) {
                    let key = match e {
                        SlowdownError::Ewma(_) => "gamma",
                        SlowdownError::Window(_) => "window_periods",
                        SlowdownError::Threshold(_) => "threshold",
                    };
                    return err(key, e.to_string());
                }
                if let Err(e) = Gradient::new(a.gradient(), a.initial_limit) {
                    let key = match e {
                        GradientError::Buffer(_) => "buffer",
                        GradientError::Interval(_) => "recalc_every",
                        GradientError::Bounds { .. } => "min_concurrency",
                    };
                    return err(key, e.to_string());
                }
            }
        }
    }
    Ok(())
}

/// The key to blame for a PI error.
fn pi_key<'a>(e: &PiError, gains: &'a str, bounds: &'a str) -> &'a str {
    match e {
        PiError::Gains { .. } => gains,
        PiError::Bounds { .. } => bounds,
    }
}

fn join(names: &HashSet<&str>) -> String {
    let mut v: Vec<&str> = names.iter().copied().collect();
    v.sort_unstable();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    const BASE: &str = r#"
[[backend]]
name = "app"
addresses = ["127.0.0.1:9000"]
[[backend]]
name = "lite"
addresses = ["127.0.0.1:9001"]
[[class]]
name = "premium"
backend = "app"
[[class]]
name = "basic"
backend = "app"
[[chain]]
name = "main"
default = { class = "basic" }
"#;

    fn check(controller: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{controller}"), "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn each_kind_loads_with_defaults() {
        let c = check(
            r#"
[[controller]]
kind = "delay"
name = "d"
class = "premium"
setpoint_ms = 50
throttle = ["basic"]
[[controller]]
kind = "utilisation"
name = "u"
class = "basic"
degraded_backend = "lite"
tree = 1
setpoint_percent = 30
[[controller]]
kind = "adaptive"
name = "a"
backend = "app"
rule = "gradient"
"#,
        )
        .unwrap();
        assert_eq!(c.controller.len(), 3);
        assert_eq!(c.controller[2].get_ref().period_ms(), 200);
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let e = check(
            r#"
[[controller]]
kind = "delay"
name = "d"
class = "premium"
setpoint_ms = 50
throttle = ["premium"]
"#,
        )
        .unwrap_err();
        assert!(e.starts_with("t.toml:23: `controller.d.throttle`"), "{e}");
        assert!(e.contains("cannot throttle itself"), "{e}");
        let adaptive = "[[controller]]\nkind = \"adaptive\"\nname = \"a\"\n";
        let e = check(&format!("{adaptive}backend = \"app\"\ndecrease = 0.5\n")).unwrap_err();
        assert!(e.contains("`controller.a.decrease`"), "{e}");
        let e = check(&format!("{adaptive}backend = \"nope\"\n")).unwrap_err();
        assert!(e.contains("known: app, lite"), "{e}");
        let util = "[[controller]]\nkind = \"utilisation\"\nname = \"u\"\nclass = \"basic\"\nsetpoint_percent = 30\n";
        let e = check(&format!("{util}degraded_backend = \"app\"\npids = [1]\n")).unwrap_err();
        assert!(
            e.contains("degraded_backend") && e.contains("own back end"),
            "{e}"
        );
        let e = check(&format!("{util}degraded_backend = \"lite\"\n")).unwrap_err();
        assert!(e.contains("`controller.u.pids`"), "{e}");
        let two = format!("{adaptive}backend = \"app\"\n");
        let e = check(&format!("{two}{}", two.replace("\"a\"", "\"b\""))).unwrap_err();
        assert!(e.contains("already has an adaptive controller"), "{e}");
        let e = check(&format!("{two}{two}")).unwrap_err();
        assert!(e.contains("unique"), "{e}");
    }
}
