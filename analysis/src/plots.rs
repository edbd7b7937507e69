//! PNG plots (plotters, 800×500): Δ success against layer and against coefficient (one series per
//! model, 95% bootstrap CI as error bars) and baseline vs steered success per task.
//!
//! Text is drawn with ab_glyph from a TrueType file registered at run time (no fontconfig):
//! `--font`, `$ANALYZE_FONT`, or the usual DejaVu / Liberation paths.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 500;
const FONT: &str = "sans-serif";

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

static FONT_FILE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Registers a TrueType font once per process; the error says which paths were tried.
pub fn init_font(explicit: Option<&Path>) -> Result<PathBuf> {
    let r = FONT_FILE.get_or_init(|| {
        let mut tried: Vec<PathBuf> = Vec::new();
        if let Some(p) = explicit {
            tried.push(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("ANALYZE_FONT") {
            tried.push(PathBuf::from(p));
        }
        tried.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for (i, p) in tried.iter().enumerate() {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return Ok(p.clone());
                }
            }
            if i == 0 && explicit.is_some() {
                eprintln!("warning: --font {}: not a readable TrueType font; trying the defaults", p.display());
            }
        }
        Err(format!(
            "no usable TrueType font (tried {}); pass --font FILE.ttf or set ANALYZE_FONT",
            tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    });
    r.clone().map_err(|e| anyhow!(e))
}

/// Tableau-10 colours (distinct on white; Palette99's yellow is hard to read).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Tick text: integers without decimals, otherwise up to 2 decimals.
fn tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').to_string()
    }
}

fn pe<E: Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// One point of a Δ plot (all in percentage points).
#[derive(Debug, Clone, Copy)]
pub struct DeltaPoint {
    pub x: f64,
    pub delta: f64,
    pub lo: f64,
    pub hi: f64,
}

fn padded(lo: f64, hi: f64, frac: f64, min_pad: f64) -> (f64, f64) {
    let pad = ((hi - lo) * frac).max(min_pad);
    (lo - pad, hi + pad)
}

/// Δ success (pp) against `x_label` for each named series, with CI error bars and a zero line.
pub fn delta_plot(path: &Path, title: &str, x_label: &str, series: &[(String, Vec<DeltaPoint>)]) -> Result<()> {
    let pts: Vec<&DeltaPoint> = series.iter().flat_map(|(_, p)| p).collect();
    if pts.is_empty() {
        bail!("no points to plot");
    }
    let fin = |v: f64, d: f64| if v.is_finite() { v } else { d };
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.x), b.max(p.x)));
    let (y0, y1) = pts.iter().fold((0.0f64, 0.0f64), |(a, b), p| {
        (a.min(fin(p.lo, p.delta)).min(p.delta), b.max(fin(p.hi, p.delta)).max(p.delta))
    });
    let (x0, x1) = padded(x0, x1, 0.05, 0.5);
    let (y0, y1) = padded(y0, y1, 0.08, 2.0);

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("Δ success, steered − baseline (pp)")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(pe)?;
    chart.draw_series(LineSeries::new(vec![(x0, 0.0), (x1, 0.0)], BLACK.mix(0.5).stroke_width(1))).map_err(pe)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        let mut points = points.clone();
        points.sort_by(|a, b| a.x.total_cmp(&b.x));
        chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.x, p.delta)), color.stroke_width(2)))
            .map_err(pe)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        chart.draw_series(points.iter().map(|p| Circle::new((p.x, p.delta), 4, color.filled()))).map_err(pe)?;
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.lo.is_finite() && p.hi.is_finite())
                    .map(|p| ErrorBar::new_vertical(p.x, p.lo, p.delta, p.hi, color.stroke_width(1), 10)),
            )
            .map_err(pe)?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}

/// Horizontal bars: baseline and steered success (%) per task (steered may be absent).
pub fn task_plot(path: &Path, title: &str, tasks: &[(String, f64, Option<f64>)]) -> Result<()> {
    if tasks.is_empty() {
        bail!("no tasks to plot");
    }
    let n = tasks.len();
    let names: Vec<String> = tasks.iter().map(|t| t.0.clone()).collect();
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let label_px = names.iter().map(|s| s.chars().count()).max().unwrap_or(4).clamp(4, 28) as u32 * 7 + 10;
    let font_px = if n > 30 { 10 } else { 13 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(label_px)
        .build_cartesian_2d(0.0f64..100.0f64, -0.6f64..n as f64 - 0.4)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("success (%)")
        .y_desc("")
        .label_style((FONT, font_px))
        .axis_desc_style((FONT, 16))
        .y_labels(n + 1)
        .disable_y_mesh()
        .x_label_formatter(&tick)
        .y_label_formatter(&|y| {
            // task 0 at the top
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[names.len() - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(pe)?;
    let blue = RGBColor(66, 110, 180);
    let orange = RGBColor(230, 130, 40);
    let h = 0.38;
    chart
        .draw_series(tasks.iter().enumerate().map(|(i, t)| {
            let y = (n - 1 - i) as f64;
            Rectangle::new([(0.0, y), (100.0 * t.1, y + h)], blue.filled())
        }))
        .map_err(pe)?
        .label("baseline")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], blue.filled()));
    chart
        .draw_series(tasks.iter().enumerate().filter_map(|(i, t)| {
            let y = (n - 1 - i) as f64;
            t.2.map(|s| Rectangle::new([(0.0, y - h), (100.0 * s, y)], orange.filled()))
        }))
        .map_err(pe)?
        .label("steered")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], orange.filled()));
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}
