//! Drawing `allot top`: a title line, the view's tabs, its table, sparklines of the
//! selected class, and a key line. Pure: it reads [`State`] and writes a frame.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table, Tabs};
use ratatui::Frame;

use super::stat::{cap, cap_f64, opt, BackendRates, ClassRates, PrincipalRates};
use super::top::{sorted, State, View};

fn style(state: &State, colour: Color) -> Style {
    if state.colour {
        Style::default().fg(colour)
    } else {
        Style::default()
    }
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

/// Draws the whole screen.
pub fn draw(f: &mut Frame, state: &State) {
    let [title, tabs, body, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(title_line(state)), title);
    let titles: Vec<&str> = View::ALL.iter().map(|v| v.title()).collect();
    let selected = View::ALL.iter().position(|v| *v == state.view).unwrap_or(0);
    f.render_widget(
        Tabs::new(titles)
            .select(selected)
            .highlight_style(bold().add_modifier(Modifier::REVERSED)),
        tabs,
    );
    match state.view {
        View::Classes => classes(f, body, state),
        View::Backends => backends(f, body, state),
        View::Principals => principals(f, body, state),
        View::Controllers => controllers(f, body, state),
    }
    let sort = state.view.sort_keys()[state.sort.min(state.view.sort_keys().len() - 1)];
    let keys_text = format!(
        "q quit  1-4/Tab view  s sort ({sort}{})  r reverse  p pause  ↑↓ select",
        if state.descending { " ↓" } else { "" }
    );
    f.render_widget(Paragraph::new(keys_text), keys);
}

fn title_line(state: &State) -> Line<'static> {
    let mut spans = vec![Span::styled(format!("allot top  {}", state.admin), bold())];
    if let Some(s) = &state.now {
        let st = &s.status;
        spans.push(Span::raw(format!(
            "   up {:.0} s   running {}/{}   connections {}   every {:.1} s",
            st.uptime_s,
            st.running,
            cap(st.max_running),
            st.connections,
            state.rates.interval_s
        )));
    }
    if state.paused {
        spans.push(Span::styled(
            "   PAUSED",
            style(state, Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    if let Some(e) = &state.error {
        spans.push(Span::styled(format!("   {e}"), style(state, Color::Red)));
    }
    Line::from(spans)
}

fn header(names: &[&'static str]) -> Row<'static> {
    Row::new(names.to_vec()).style(bold())
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

/// Classes in display order, with their rates.
fn class_rows(state: &State) -> Vec<(String, ClassRates, u64, u64)> {
    let Some(now) = &state.now else {
        return Vec::new();
    };
    let items: Vec<(String, ClassRates, u64, u64)> = now
        .status
        .classes
        .iter()
        .map(|c| {
            let r = state
                .rates
                .classes
                .iter()
                .find(|r| r.name == c.name)
                .cloned()
                .unwrap_or_default();
            (c.name.clone(), r, c.queued, c.in_flight)
        })
        .collect();
    sorted(
        items,
        state.sort,
        state.descending,
        |x| x.0.as_str(),
        |x, k| match k {
            1 => x.1.arrivals_per_s,
            2 => x.1.refused_per_s,
            3 => x.2 as f64,
            _ => x.1.queue_delay_p99_ms.unwrap_or(0.0),
        },
    )
}

fn classes(f: &mut Frame, area: Rect, state: &State) {
    let rows = class_rows(state);
    let table_height = (rows.len() as u16 + 3).min(area.height.saturating_sub(7).max(4));
    let [table_area, spark_area] =
        Layout::vertical([Constraint::Length(table_height), Constraint::Min(0)]).areas(area);
    let selected = state.selected.min(rows.len().saturating_sub(1));
    let body: Vec<Row> = rows
        .iter()
        .enumerate()
        .map(|(i, (name, r, queued, in_flight))| {
            let reasons: Vec<String> = r
                .refused_by_reason_per_s
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect();
            let refused = Cell::from(f1(r.refused_per_s)).style(if r.refused_per_s > 0.0 {
                style(state, Color::Red)
            } else {
                Style::default()
            });
            let row = Row::new(vec![
                Cell::from(name.clone()),
                Cell::from(f1(r.arrivals_per_s)),
                Cell::from(f1(r.admitted_per_s)),
                refused,
                Cell::from(reasons.join(" ")),
                Cell::from(queued.to_string()),
                Cell::from(in_flight.to_string()),
                Cell::from(opt(r.queue_delay_p50_ms, 2)),
                Cell::from(opt(r.queue_delay_p99_ms, 2)),
                Cell::from(opt(r.service_time_mean_ms, 2)),
                Cell::from(opt(r.service_time_p99_ms, 2)),
                Cell::from(format!("{:.3}", r.bytes_out_per_s / 1e6)),
            ]);
            if i == selected {
                row.style(Style::default().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths = [
        Constraint::Min(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Min(16),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
    ];
    let table = Table::new(body, widths)
        .header(header(&[
            "class",
            "arrivals/s",
            "admitted/s",
            "refused/s",
            "refused by reason/s",
            "queued",
            "in-fl",
            "p50 ms",
            "p99 ms",
            "svc ms",
            "svc p99",
            "MB/s out",
        ]))
        .block(Block::bordered().title(" classes: rates per second, delays over the interval "));
    f.render_widget(table, table_area);
    if let Some((name, _, _, _)) = rows.get(selected) {
        sparklines(f, spark_area, state, name);
    }
}

/// Values scaled to integers for a sparkline (it draws `u64`s), keeping three decimals.
fn scaled(values: &std::collections::VecDeque<f64>, width: u16) -> Vec<u64> {
    let skip = values.len().saturating_sub(usize::from(width));
    values
        .iter()
        .skip(skip)
        .map(|v| (v.max(0.0) * 1000.0) as u64)
        .collect()
}

fn sparklines(f: &mut Frame, area: Rect, state: &State, class: &str) {
    let Some(h) = state.history.get(class) else {
        return;
    };
    if area.height < 3 {
        return;
    }
    let last = |q: &std::collections::VecDeque<f64>| q.back().copied().unwrap_or(0.0);
    let series = [
        ("arrivals/s", &h.arrivals_per_s, Color::Cyan),
        ("refused/s", &h.refused_per_s, Color::Red),
        ("queueing delay p99 ms", &h.delay_p99_ms, Color::Yellow),
        ("service time ms", &h.service_ms, Color::Green),
    ];
    let each = Constraint::Ratio(1, series.len() as u32);
    let areas = Layout::vertical([each; 4]).split(area);
    for ((label, values, colour), a) in series.iter().zip(areas.iter()) {
        let width = a.width.saturating_sub(2);
        let data = scaled(values, width);
        let title = format!(" {class} {label}: {:.2} ", last(values));
        f.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(title))
                .data(&data)
                .style(style(state, *colour)),
            *a,
        );
    }
}

fn backends(f: &mut Frame, area: Rect, state: &State) {
    let Some(now) = &state.now else {
        return;
    };
    let items: Vec<(&allot_gateway::stats::BackendSnapshot, BackendRates)> = now
        .status
        .backends
        .iter()
        .map(|b| {
            let r = state
                .rates
                .backends
                .iter()
                .find(|r| r.name == b.name)
                .cloned()
                .unwrap_or_default();
            (b, r)
        })
        .collect();
    let items = sorted(
        items,
        state.sort,
        state.descending,
        |x| x.0.name.as_str(),
        |x, k| match k {
            1 => x.1.requests_per_s,
            2 => x.1.failures_per_s,
            _ => x.0.in_flight as f64,
        },
    );
    let mut rows = Vec::new();
    for (b, r) in items {
        let total = if b.addresses.is_empty() {
            b.healthy_addresses
        } else {
            b.addresses.len()
        };
        let healthy = Cell::from(format!("{}/{}", b.healthy_addresses, total)).style(
            if b.healthy_addresses < total {
                style(state, Color::Red)
            } else {
                style(state, Color::Green)
            },
        );
        rows.push(Row::new(vec![
            Cell::from(b.name.clone()),
            healthy,
            Cell::from(b.in_flight.to_string()),
            Cell::from(f1(r.requests_per_s)),
            Cell::from(f1(r.failures_per_s)),
            Cell::from(opt(r.service_time_mean_ms, 2)),
            Cell::from(format!("{:.3}", r.bytes_out_per_s / 1e6)),
        ]));
        for a in &b.addresses {
            let health = match (a.checked_down, a.ejected) {
                (false, false) => "up",
                (true, _) => "check failing",
                (false, true) => "ejected",
            };
            rows.push(Row::new(vec![
                Cell::from(format!("  {}", a.address)),
                Cell::from(format!("{} {health}", a.mode)),
                Cell::from(a.in_flight.to_string()),
            ]));
        }
    }
    let widths = [
        Constraint::Min(24),
        Constraint::Length(22),
        Constraint::Length(9),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(9),
        Constraint::Length(9),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(header(&[
                "back end / address",
                "healthy / mode",
                "in flight",
                "requests/s",
                "failures/s",
                "svc ms",
                "MB/s in",
            ]))
            .block(Block::bordered().title(" back ends ")),
        area,
    );
}

fn principals(f: &mut Frame, area: Rect, state: &State) {
    let Some(now) = &state.now else {
        return;
    };
    let items: Vec<(&allot_gateway::stats::PrincipalSnapshot, PrincipalRates)> = now
        .status
        .principals
        .iter()
        .map(|p| {
            let r = state
                .rates
                .principals
                .iter()
                .find(|r| r.name == p.name)
                .cloned()
                .unwrap_or_default();
            (p, r)
        })
        .collect();
    let items = sorted(
        items,
        state.sort,
        state.descending,
        |x| x.0.name.as_str(),
        |x, k| match k {
            1 => x.0.demand,
            2 => x.0.allocation,
            _ => x.1.admitted_per_s,
        },
    );
    let rows: Vec<Row> = items
        .iter()
        .map(|(p, r)| {
            Row::new(vec![
                p.name.clone(),
                f1(p.mandatory),
                f1(p.optional),
                f1(p.demand),
                f1(p.allocation),
                f1(r.admitted_per_s),
                f1(r.deferred_per_s),
                f1(r.refused_per_s),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let widths = [
        Constraint::Min(12),
        Constraint::Length(13),
        Constraint::Length(11),
        Constraint::Length(10),
        Constraint::Length(13),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(10),
    ];
    let title = if empty {
        " principals: none (no [agreements] in force) "
    } else {
        " principals: demand and plan in units/s; admitted against the plan, requests/s "
    };
    f.render_widget(
        Table::new(rows, widths)
            .header(header(&[
                "principal",
                "guaranteed",
                "optional",
                "demand",
                "allocation",
                "admitted/s",
                "deferred/s",
                "refused/s",
            ]))
            .block(Block::bordered().title(title)),
        area,
    );
}

fn controllers(f: &mut Frame, area: Rect, state: &State) {
    let mut items = state.controllers.clone();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    if state.descending {
        items.reverse();
    }
    let rows: Vec<Row> = items
        .iter()
        .map(|c| {
            let outputs: Vec<String> = c
                .outputs
                .iter()
                .map(|(k, v)| format!("{k}={}", v.map_or_else(|| "unlimited".into(), cap_f64)))
                .collect();
            let flags = match (c.paused, c.saturated) {
                (true, _) => "paused",
                (false, true) => "saturated",
                _ => "",
            };
            Row::new(vec![
                Cell::from(c.name.clone()),
                Cell::from(c.kind.clone()),
                Cell::from(c.signal.clone()),
                Cell::from(opt(c.input, 2)),
                Cell::from(opt(c.setpoint, 2)),
                Cell::from(outputs.join(" ")),
                Cell::from(flags).style(style(state, Color::Yellow)),
            ])
        })
        .collect();
    let widths = [
        Constraint::Min(14),
        Constraint::Length(12),
        Constraint::Length(15),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Min(24),
        Constraint::Length(10),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(header(&[
                "controller",
                "kind",
                "signal",
                "measured",
                "set point",
                "actuators",
                "",
            ]))
            .block(Block::bordered().title(" controllers ")),
        area,
    );
}
