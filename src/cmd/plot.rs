//! `--plot FILE.svg`: line charts as a small, self-contained SVG (no fonts to embed, no
//! scripts, no external references), one chart under another. Each series is one
//! `<polyline class="series" data-series="NAME">`, so a test or a script can find it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

/// One line: a name and its points `(x, y)`.
#[derive(Debug, Clone)]
pub struct Series {
    /// Shown in the legend and as `data-series`.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` with `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// One chart: a title, axis labels, and its lines.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Above the chart.
    pub title: String,
    /// Under the x axis (with its unit).
    pub x_label: String,
    /// Beside the y axis (with its unit).
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

const WIDTH: f64 = 720.0;
const CHART_HEIGHT: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick label: few digits, no trailing zeros.
fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The range of the finite values, widened when flat so a line is never on the border.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-12 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

fn chart(out: &mut String, c: &Chart, y0: f64) {
    let (x_lo, x_hi) = range(c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y_lo, y_hi) = range(c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let (pw, ph) = (WIDTH - LEFT - RIGHT, CHART_HEIGHT - TOP - BOTTOM);
    let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * pw;
    let py = |y: f64| y0 + TOP + ph - (y - y_lo) / (y_hi - y_lo) * ph;
    let _ = writeln!(
        out,
        r#"<g class="chart"><text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        LEFT,
        y0 + 18.0,
        esc(&c.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#888"/>"##,
        y0 + TOP
    );
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let (xv, yv) = (x_lo + f * (x_hi - x_lo), y_lo + f * (y_hi - y_lo));
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text><line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            px(xv),
            y0 + TOP + ph + 15.0,
            label(xv),
            LEFT - 5.0,
            py(yv) + 4.0,
            label(yv),
            LEFT + pw,
            py(yv),
            py(yv)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text><text x="14" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"#,
        LEFT + pw / 2.0,
        y0 + CHART_HEIGHT - 8.0,
        esc(&c.x_label),
        y0 + TOP + ph / 2.0,
        y0 + TOP + ph / 2.0,
        esc(&c.y_label)
    );
    for (i, s) in c.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut points = String::new();
        for &(x, y) in s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
        {
            let _ = write!(points, "{:.2},{:.2} ", px(x), py(y));
        }
        let _ = writeln!(
            out,
            r#"<polyline class="series" data-series="{}" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            esc(&s.name),
            points.trim_end()
        );
        let ly = y0 + TOP + 14.0 * i as f64 + 6.0;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            LEFT + pw + 10.0,
            LEFT + pw + 28.0,
            LEFT + pw + 32.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    out.push_str("</g>\n");
}

/// The charts, stacked, as one SVG document.
pub fn svg(charts: &[Chart]) -> String {
    let height = CHART_HEIGHT * charts.len().max(1) as f64;
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, c) in charts.iter().enumerate() {
        chart(&mut out, c, CHART_HEIGHT * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

/// Writes the charts to `path`.
pub fn write(path: &Path, charts: &[Chart]) -> anyhow::Result<()> {
    std::fs::write(path, svg(charts))
        .with_context(|| format!("--plot: cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_series_is_one_named_polyline_with_every_point() {
        let c = Chart {
            title: "a <b>".into(),
            x_label: "t (s)".into(),
            y_label: "y".into(),
            series: vec![
                Series::new("one", vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN)]),
                Series::new("flat", vec![(0.0, 5.0), (2.0, 5.0)]),
            ],
        };
        let s = svg(&[c.clone(), c]);
        assert_eq!(s.matches(r#"data-series="one""#).count(), 2);
        assert!(s.contains("a &lt;b&gt;"));
        let line = s
            .lines()
            .find(|l| l.contains(r#"data-series="one""#))
            .unwrap();
        let points = line.split("points=\"").nth(1).unwrap();
        assert_eq!(points.split_whitespace().count(), 2, "the NaN is left out");
        assert!(!s.contains("NaN") && !s.contains("inf"));
    }
}
