//! Draws a CSV time series (first column: time in seconds) as an SVG line plot, for
//! `bench/controllers.sh`.
//!
//! `cargo run --release --example plot_series -- IN.csv OUT.svg TITLE LEFT [RIGHT]`
//! where LEFT and RIGHT are comma-separated column names drawn against the left and
//! the right axis. Empty cells are gaps.

use std::process::ExitCode;

use plotters::prelude::*;

struct Table {
    header: Vec<String>,
    rows: Vec<Vec<Option<f64>>>,
}

fn read(path: &str) -> Result<Table, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .ok_or(format!("{path}: empty"))?
        .split(',')
        .map(|h| h.trim().to_string())
        .collect();
    let rows = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|v| v.trim().parse().ok()).collect())
        .collect();
    Ok(Table { header, rows })
}

fn column(t: &Table, name: &str) -> Result<usize, String> {
    t.header.iter().position(|h| h == name).ok_or(format!(
        "no column {name:?}; columns: {}",
        t.header.join(", ")
    ))
}

fn points(t: &Table, col: usize) -> Vec<Vec<(f64, f64)>> {
    // Split at gaps so a missing value is not drawn as a line across it.
    let mut runs = vec![Vec::new()];
    for r in &t.rows {
        match (r.first().copied().flatten(), r.get(col).copied().flatten()) {
            (Some(x), Some(y)) => runs.last_mut().map(|run| run.push((x, y))).unwrap_or(()),
            _ => runs.push(Vec::new()),
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

fn range(t: &Table, cols: &[usize]) -> (f64, f64) {
    let vals = t
        .rows
        .iter()
        .flat_map(|r| cols.iter().filter_map(|c| r.get(*c).copied().flatten()));
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if lo.is_finite() && hi.is_finite() {
        let pad = ((hi - lo) * 0.08).max(1e-3);
        (lo - pad, hi + pad)
    } else {
        (0.0, 1.0)
    }
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(90, 90, 90),
];

fn plot(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [input, output, title, left, rest @ ..] = args else {
        return Err("usage: plot_series IN.csv OUT.svg TITLE LEFT_COLS [RIGHT_COLS]".into());
    };
    let t = read(input)?;
    let names = |s: &str| -> Result<Vec<(String, usize)>, String> {
        s.split(',')
            .filter(|n| !n.is_empty())
            .map(|n| column(&t, n).map(|c| (n.to_string(), c)))
            .collect()
    };
    let left = names(left)?;
    let right = match rest.first() {
        Some(r) => names(r)?,
        None => Vec::new(),
    };
    let (x0, x1) = range(&t, &[0]);
    let (l0, l1) = range(&t, &left.iter().map(|c| c.1).collect::<Vec<_>>());
    let (r0, r1) = range(&t, &right.iter().map(|c| c.1).collect::<Vec<_>>());

    let root = SVGBackend::new(output, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .right_y_label_area_size(if right.is_empty() { 0 } else { 56 })
        .build_cartesian_2d(x0..x1, l0..l1)?
        .set_secondary_coord(x0..x1, r0..r1);
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("time (s)")
        .y_desc(
            left.iter()
                .map(|c| c.0.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )
        .draw()?;
    if !right.is_empty() {
        chart
            .configure_secondary_axes()
            .y_desc(
                right
                    .iter()
                    .map(|c| c.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
            .draw()?;
    }
    let mut colour = COLOURS.iter().cycle();
    for (name, col) in &left {
        let c = *colour.next().unwrap_or(&BLACK);
        let mut first = true;
        for run in points(&t, *col) {
            let s = chart.draw_series(LineSeries::new(run, c.stroke_width(2)))?;
            if first {
                s.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
                first = false;
            }
        }
    }
    for (name, col) in &right {
        let c = *colour.next().unwrap_or(&BLACK);
        let mut first = true;
        for run in points(&t, *col) {
            let s = chart.draw_secondary_series(LineSeries::new(run, c.stroke_width(2)))?;
            if first {
                s.label(format!("{name} (right)")).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
                first = false;
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match plot(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plot_series: {e}");
            ExitCode::from(2)
        }
    }
}
