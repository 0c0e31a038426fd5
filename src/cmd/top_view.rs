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
        View::Cluster => cluster(f, body, state),
    }
    let sort = state.view.sort_keys()[state.sort.min(state.view.sort_keys().len() - 1)];
    let keys_text = format!(
        "q quit  1-5/Tab view  s sort ({sort}{})  r reverse  p pause  ↑↓ select",
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

/// The cluster view: this node's role, epoch, parent, how fresh its quota is, fallback,
/// messages, and per principal the demand across the cluster next to this node's share.
fn cluster(f: &mut Frame, area: Rect, state: &State) {
    if let Some(e) = state.now.as_ref().and_then(|s| s.cluster_error.as_ref()) {
        f.render_widget(
            Paragraph::new(format!("cannot read this gateway's cluster status: {e}"))
                .style(style(state, Color::Red))
                .block(Block::bordered().title(" cluster ")),
            area,
        );
        return;
    }
    let Some(c) = state.now.as_ref().and_then(|s| s.cluster.as_ref()) else {
        f.render_widget(
            Paragraph::new(
                "no cluster: this gateway's /status has no \"cluster\" object \
                 (it runs alone, without [cluster] in its configuration)",
            )
            .block(Block::bordered().title(" cluster ")),
            area,
        );
        return;
    };
    let fresh = if c.windows_since_fresh == 0 {
        Cell::from("0 (fresh)").style(style(state, Color::Green))
    } else {
        Cell::from(c.windows_since_fresh.to_string()).style(style(state, Color::Yellow))
    };
    let fallback = match (c.fallback, c.fallback_since_ms) {
        (false, _) => Cell::from("no").style(style(state, Color::Green)),
        (true, Some(ms)) => {
            Cell::from(format!("YES, since {ms} ms")).style(style(state, Color::Red))
        }
        (true, None) => Cell::from("YES").style(style(state, Color::Red)),
    };
    let per_s = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.1}/s"));
    let (sent_per_s, received_per_s) = match state.cluster_messages_per_s {
        Some((s, r)) => (Some(s), Some(r)),
        None => (None, None),
    };
    let facts: Vec<Row> = vec![
        Row::new(vec![Cell::from("node"), Cell::from(c.node.clone())]),
        Row::new(vec![Cell::from("role"), Cell::from(c.role.clone())]),
        Row::new(vec![Cell::from("epoch"), Cell::from(c.epoch.to_string())]),
        Row::new(vec![
            Cell::from("parent"),
            Cell::from(c.parent.clone().unwrap_or_else(|| "none".into())),
        ]),
        Row::new(vec![Cell::from("windows since fresh quota"), fresh]),
        Row::new(vec![Cell::from("fallback"), fallback]),
        Row::new(vec![
            Cell::from("messages sent"),
            Cell::from(format!("{} {}", c.messages_sent_total, per_s(sent_per_s))),
        ]),
        Row::new(vec![
            Cell::from("messages received"),
            Cell::from(format!(
                "{} {}",
                c.messages_received_total,
                per_s(received_per_s)
            )),
        ]),
    ];
    let facts_height = facts.len() as u16 + 2;
    let [facts_area, principals_area] =
        Layout::vertical([Constraint::Length(facts_height), Constraint::Min(0)]).areas(area);
    f.render_widget(
        Table::new(facts, [Constraint::Length(27), Constraint::Min(20)])
            .block(Block::bordered().title(" cluster: this node ")),
        facts_area,
    );
    let items = sorted(
        c.principals.iter().collect(),
        state.sort,
        state.descending,
        |p| p.name.as_str(),
        |p, k| match k {
            1 => p.global_demand,
            _ => p.local_share,
        },
    );
    let rows: Vec<Row> = items
        .iter()
        .map(|p| Row::new(vec![p.name.clone(), f1(p.global_demand), f1(p.local_share)]))
        .collect();
    let title = if rows.is_empty() {
        " principals: none "
    } else {
        " principals: demand across the cluster, this node's share of it "
    };
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Min(12),
                Constraint::Length(15),
                Constraint::Length(13),
            ],
        )
        .header(header(&["principal", "global demand", "local share"]))
        .block(Block::bordered().title(title)),
        principals_area,
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::super::stat::{parse_status, Sample};
    use super::super::top::{State, View};
    use super::*;

    const STATUS: &str = r#"{"uptime_s": 12.0, "running": 0, "max_running": 100,
        "classes": [], "backends": []"#;

    fn sample(cluster: &str, at: Instant) -> Sample {
        let text = format!("{STATUS}{cluster}}}");
        let (status, cluster) = parse_status(&text).expect("a /status document");
        Sample {
            status,
            cluster: cluster.clone().ok().flatten(),
            cluster_error: cluster.err(),
            at,
        }
    }

    fn cluster(sent: u64, fallback: bool) -> String {
        let since = if fallback { "4200" } else { "null" };
        format!(
            r#", "cluster": {{"node": "gw-2", "role": "aggregator", "epoch": 7,
            "parent": "gw-1", "windows_since_fresh": 3, "fallback": {fallback},
            "fallback_since_ms": {since}, "messages_sent_total": {sent},
            "messages_received_total": 40,
            "principals": [{{"name": "tenant-a", "global_demand": 1250.5, "local_share": 312.3}},
                           {{"name": "tenant-b", "global_demand": 80.0, "local_share": 20.0}}]}}"#
        )
    }

    /// The screen as text, one string per line.
    fn screen(state: &State) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(100, 30)).expect("a test terminal");
        t.draw(|f| draw(f, state)).expect("drawn");
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    fn line_with<'a>(lines: &'a [String], what: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?}:\n{}", lines.join("\n")))
    }

    #[test]
    fn the_cluster_view_shows_role_epoch_parent_freshness_fallback_messages_and_principals() {
        let t0 = Instant::now();
        let mut state = State::new("127.0.0.1:9090".into(), false);
        state.update(sample(&cluster(100, false), t0), Vec::new());
        state.update(
            sample(&cluster(120, true), t0 + Duration::from_secs(2)),
            Vec::new(),
        );
        state.view = View::Cluster;
        let lines = screen(&state);
        let field = |name: &str| {
            let name = format!("│{name} ");
            let l = line_with(&lines, &name);
            l.split_once(&name)
                .map(|(_, v)| v.trim().trim_end_matches('│').trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(field("node"), "gw-2");
        assert_eq!(field("role"), "aggregator");
        assert_eq!(field("epoch"), "7");
        assert_eq!(field("parent"), "gw-1");
        assert_eq!(field("windows since fresh quota"), "3");
        assert_eq!(field("fallback"), "YES, since 4200 ms");
        assert_eq!(field("messages sent"), "120 10.0/s", "20 messages in 2 s");
        assert_eq!(field("messages received"), "40 0.0/s");
        let cells = |what: &str| -> Vec<String> {
            line_with(&lines, what)
                .replace('│', " ")
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        assert_eq!(cells("tenant-a"), ["tenant-a", "1250.5", "312.3"]);
        assert_eq!(cells("tenant-b"), ["tenant-b", "80.0", "20.0"]);
        assert!(line_with(&lines, "5 cluster").contains("4 controllers"));
    }

    #[test]
    fn without_a_cluster_object_the_view_says_there_is_no_cluster() {
        let mut state = State::new("127.0.0.1:9090".into(), false);
        state.update(sample("", Instant::now()), Vec::new());
        state.view = View::Cluster;
        let lines = screen(&state);
        line_with(&lines, "no cluster");
        assert!(state.now.as_ref().is_some_and(|s| s.cluster.is_none()));
    }

    #[test]
    fn a_cluster_object_of_another_shape_is_named_and_the_rest_still_read() {
        let mut state = State::new("x".into(), false);
        state.update(
            sample(r#", "cluster": {"node": "gw-1"}"#, Instant::now()),
            Vec::new(),
        );
        state.view = View::Cluster;
        let lines = screen(&state);
        assert!(
            line_with(&lines, "cannot read this gateway's cluster status").contains("role"),
            "names the missing field"
        );
        assert!(line_with(&lines, "allot top").contains("up 12 s"));
    }

    #[test]
    fn a_root_in_no_fallback_has_no_parent_and_a_fresh_quota() {
        let root = r#", "cluster": {"node": "gw-1", "role": "root", "epoch": 1,
            "parent": null, "windows_since_fresh": 0, "fallback": false,
            "fallback_since_ms": null, "messages_sent_total": 0,
            "messages_received_total": 0, "principals": []}"#;
        let mut state = State::new("x".into(), false);
        state.update(sample(root, Instant::now()), Vec::new());
        state.view = View::Cluster;
        let lines = screen(&state);
        assert!(line_with(&lines, "│parent").contains("none"));
        assert!(line_with(&lines, "│windows since fresh quota").contains("0 (fresh)"));
        assert!(line_with(&lines, "│fallback").contains("no"));
        line_with(&lines, "principals: none");
    }
}
