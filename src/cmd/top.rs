//! `allot top`: a live terminal dashboard of a running gateway, over the admin API only
//! (`/status` and `/controllers`), so it works against a remote, tunnelled gateway too.
//!
//! This module holds the state and the keys; [`super::top_view`] draws it. Each interval
//! a new sample gives rates against the one before (the arithmetic of `allot stat`), and
//! short histories of them feed the sparklines.

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::Method;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use serde::Deserialize;

use super::admin_client::{call, AdminTarget};
use super::stat::{fetch, Rates, Sample};

/// Flags of `allot top`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Keys: 1-5 or Tab switch views (classes, back ends, principals, \
controllers, cluster); s cycles the sort column, r reverses it; Up/Down select a class for the \
sparklines; p or space pauses; q or Esc quits."
)]
pub struct Args {
    #[command(flatten)]
    target: AdminTarget,
    /// Time between samples, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    interval_ms: u64,
}

/// Points kept per sparkline.
pub const HISTORY_POINTS: usize = 120;

/// Which table fills the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Per class rates, queues and delays.
    Classes,
    /// Back ends and their addresses.
    Backends,
    /// Principals under agreements.
    Principals,
    /// The QoS manager's loops.
    Controllers,
    /// This gateway's place in the cluster (`/status`'s `"cluster"`).
    Cluster,
}

impl View {
    /// Every view, in key order (1–5).
    pub const ALL: [View; 5] = [
        View::Classes,
        View::Backends,
        View::Principals,
        View::Controllers,
        View::Cluster,
    ];

    /// The tab's title.
    pub fn title(self) -> &'static str {
        match self {
            View::Classes => "1 classes",
            View::Backends => "2 back ends",
            View::Principals => "3 principals",
            View::Controllers => "4 controllers",
            View::Cluster => "5 cluster",
        }
    }

    /// Column names a view can be sorted by (the first: by name).
    pub fn sort_keys(self) -> &'static [&'static str] {
        match self {
            View::Classes => &["name", "arrivals/s", "refused/s", "queued", "p99 delay"],
            View::Backends => &["name", "requests/s", "failures/s", "in flight"],
            View::Principals => &["name", "demand", "allocation", "admitted/s"],
            View::Controllers => &["name"],
            View::Cluster => &["name", "global demand", "local share"],
        }
    }
}

/// One controller's readout, as `/controllers` serves it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Controller {
    /// Its name.
    pub name: String,
    /// `delay`, `utilisation` or `adaptive`.
    pub kind: String,
    /// What it senses.
    pub signal: String,
    /// The last measurement.
    pub input: Option<f64>,
    /// The set point.
    pub setpoint: Option<f64>,
    /// Actuator values by knob (`None`: unlimited, which JSON cannot write as a number).
    #[serde(default)]
    pub outputs: Vec<(String, Option<f64>)>,
    /// Paused: outputs frozen.
    #[serde(default)]
    pub paused: bool,
    /// The last tick was saturated.
    #[serde(default)]
    pub saturated: bool,
}

/// Histories of one class, newest last, for the sparklines.
#[derive(Debug, Clone, Default)]
pub struct ClassHistory {
    /// Arrivals per second.
    pub arrivals_per_s: VecDeque<f64>,
    /// Refusals per second.
    pub refused_per_s: VecDeque<f64>,
    /// Queueing delay p99, milliseconds.
    pub delay_p99_ms: VecDeque<f64>,
    /// Mean service time, milliseconds.
    pub service_ms: VecDeque<f64>,
}

fn push(q: &mut VecDeque<f64>, v: f64) {
    if q.len() == HISTORY_POINTS {
        q.pop_front();
    }
    q.push_back(v);
}

/// Everything the screen shows.
#[derive(Debug)]
pub struct State {
    /// The admin address, for the title.
    pub admin: String,
    /// The latest sample.
    pub now: Option<Sample>,
    /// Rates between the last two samples.
    pub rates: Rates,
    /// The latest controller readouts.
    pub controllers: Vec<Controller>,
    /// Per class histories.
    pub history: BTreeMap<String, ClassHistory>,
    /// Cluster messages (sent, received) per second between the last two samples.
    pub cluster_messages_per_s: Option<(f64, f64)>,
    /// The view shown.
    pub view: View,
    /// Index into the view's sort keys.
    pub sort: usize,
    /// Sort descending (numbers: largest first).
    pub descending: bool,
    /// No new samples while paused.
    pub paused: bool,
    /// The class whose sparklines are drawn (index in display order).
    pub selected: usize,
    /// The last error reading the admin API, shown until a read succeeds.
    pub error: Option<String>,
    /// Colours allowed (a terminal, `NO_COLOR` unset).
    pub colour: bool,
}

impl State {
    /// A state with nothing read yet.
    pub fn new(admin: String, colour: bool) -> State {
        State {
            admin,
            now: None,
            rates: Rates::default(),
            controllers: Vec::new(),
            history: BTreeMap::new(),
            cluster_messages_per_s: None,
            view: View::Classes,
            sort: 0,
            descending: false,
            paused: false,
            selected: 0,
            error: None,
            colour,
        }
    }

    /// Takes in a new sample: rates against the previous one, histories extended.
    pub fn update(&mut self, sample: Sample, controllers: Vec<Controller>) {
        if let Some(before) = &self.now {
            self.rates = Rates::between(before, &sample);
            for c in &self.rates.classes {
                let h = self.history.entry(c.name.clone()).or_default();
                push(&mut h.arrivals_per_s, c.arrivals_per_s);
                push(&mut h.refused_per_s, c.refused_per_s);
                push(&mut h.delay_p99_ms, c.queue_delay_p99_ms.unwrap_or(0.0));
                push(&mut h.service_ms, c.service_time_mean_ms.unwrap_or(0.0));
            }
            self.cluster_messages_per_s = match (&before.cluster, &sample.cluster) {
                (Some(b), Some(n)) => {
                    let dt = sample.at.saturating_duration_since(before.at).as_secs_f64();
                    let rate = |x: u64, y: u64| {
                        if dt > 0.0 {
                            y.saturating_sub(x) as f64 / dt
                        } else {
                            0.0
                        }
                    };
                    Some((
                        rate(b.messages_sent_total, n.messages_sent_total),
                        rate(b.messages_received_total, n.messages_received_total),
                    ))
                }
                _ => None,
            };
        }
        self.now = Some(sample);
        self.controllers = controllers;
        self.error = None;
    }

    /// Acts on one key; `false` to quit.
    pub fn key(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Char(d @ '1'..='5') => {
                self.set_view(View::ALL[usize::from(d as u8 - b'1')]);
            }
            KeyCode::Tab => {
                let i = View::ALL.iter().position(|v| *v == self.view).unwrap_or(0);
                self.set_view(View::ALL[(i + 1) % View::ALL.len()]);
            }
            KeyCode::BackTab => {
                let i = View::ALL.iter().position(|v| *v == self.view).unwrap_or(0);
                self.set_view(View::ALL[(i + View::ALL.len() - 1) % View::ALL.len()]);
            }
            KeyCode::Char('s') => {
                self.sort = (self.sort + 1) % self.view.sort_keys().len();
                // Names read best A→Z, figures largest first.
                self.descending = self.sort != 0;
            }
            KeyCode::Char('r') => self.descending = !self.descending,
            KeyCode::Char('p') | KeyCode::Char(' ') => self.paused = !self.paused,
            KeyCode::Down | KeyCode::Char('j') => self.selected = self.selected.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            _ => {}
        }
        true
    }

    fn set_view(&mut self, v: View) {
        if v != self.view {
            self.view = v;
            self.sort = 0;
            self.descending = false;
        }
    }
}

/// Orders `items` by the figure `key` gives (name order breaks ties, and is the order for
/// sort index 0).
pub fn sorted<T>(
    mut items: Vec<T>,
    sort: usize,
    descending: bool,
    name: impl Fn(&T) -> &str,
    key: impl Fn(&T, usize) -> f64,
) -> Vec<T> {
    items.sort_by(|a, b| {
        let by = if sort == 0 {
            name(a).cmp(name(b))
        } else {
            key(a, sort)
                .partial_cmp(&key(b, sort))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| name(a).cmp(name(b)))
        };
        if descending {
            by.reverse()
        } else {
            by
        }
    });
    items
}

async fn controllers(target: &AdminTarget) -> anyhow::Result<Vec<Controller>> {
    let (code, text) = call(target, Method::GET, "/controllers", None).await?;
    if !code.is_success() {
        anyhow::bail!("GET /controllers: the gateway answered {code}");
    }
    serde_json::from_str(&text).context("reading /controllers")
}

async fn sample(target: &AdminTarget) -> anyhow::Result<(Sample, Vec<Controller>)> {
    let s = fetch(target).await?;
    Ok((s, controllers(target).await?))
}

/// Draws until `q`; the terminal is put back whatever happens.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.interval_ms == 0 {
        anyhow::bail!("--interval-ms: expected an integer ≥ 1, got 0");
    }
    let rt = super::runtime(Some(1))?;
    // Fail before taking the screen when the gateway cannot be reached at all.
    let first = rt.block_on(sample(&args.target))?;
    let colour = super::colour_allowed(&std::io::stdout());
    let mut state = State::new(args.target.admin.to_string(), colour);
    state.update(first.0, first.1);
    let mut terminal = ratatui::try_init().context("cannot take over the terminal")?;
    let result = event_loop(&mut terminal, &rt, &args, &mut state);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    rt: &tokio::runtime::Runtime,
    args: &Args,
    state: &mut State,
) -> anyhow::Result<()> {
    let interval = Duration::from_millis(args.interval_ms);
    let mut next = Instant::now() + interval;
    loop {
        terminal
            .draw(|f| super::top_view::draw(f, state))
            .context("drawing")?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait).context("reading the keyboard")? {
            if let Event::Key(k) = event::read().context("reading the keyboard")? {
                if k.kind == KeyEventKind::Press && !state.key(k.code, k.modifiers) {
                    return Ok(());
                }
            }
            continue;
        }
        next = Instant::now() + interval;
        if state.paused {
            continue;
        }
        match rt.block_on(sample(&args.target)) {
            Ok((s, c)) => state.update(s, c),
            Err(e) => state.error = Some(format!("{e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_switch_views_sort_pause_and_quit() {
        let mut s = State::new("x".into(), false);
        assert!(s.key(KeyCode::Char('2'), KeyModifiers::NONE));
        assert_eq!(s.view, View::Backends);
        assert!(s.key(KeyCode::Tab, KeyModifiers::NONE));
        assert_eq!(s.view, View::Principals);
        s.key(KeyCode::Char('s'), KeyModifiers::NONE);
        assert_eq!((s.sort, s.descending), (1, true));
        s.key(KeyCode::Char('r'), KeyModifiers::NONE);
        assert!(!s.descending);
        s.key(KeyCode::Char('p'), KeyModifiers::NONE);
        assert!(s.paused);
        assert!(!s.key(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(!s.key(KeyCode::Char('c'), KeyModifiers::CONTROL));
    }

    #[test]
    fn sorting_by_a_figure_breaks_ties_by_name() {
        let items = vec![("b", 1.0), ("a", 1.0), ("c", 5.0)];
        let by = |xs: Vec<(&'static str, f64)>, d| {
            sorted(xs, 1, d, |x| x.0, |x, _| x.1)
                .into_iter()
                .map(|x| x.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(by(items.clone(), false), ["a", "b", "c"]);
        assert_eq!(by(items, true), ["c", "b", "a"]);
    }
}
