//! PNG charts of a training run: the three stage losses (with held-out losses where logged) and
//! the three learned difficulties σ over steps, read from `train_log.jsonl`.
//!
//! Rendering is pure Rust (plotters' bitmap backend, `ab_glyph` text, `png` encoding); files are
//! encoded in memory and written atomically. Text needs a TrueType font: `STEPER_PLOT_FONT`, or
//! the first of the usual system fonts (DejaVu, Liberation, Noto, …). Without one the charts are
//! still drawn, without axis labels, captions or legends, and the report says so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use serde::Serialize;

use crate::fit::LogLine;
use crate::{Error, Result};

/// Chart size in pixels.
pub const DEFAULT_SIZE: (u32, u32) = (1000, 600);

/// Options of [`plot_log`].
#[derive(Debug, Clone)]
pub struct PlotOptions {
    /// Width and height of each PNG.
    pub size: (u32, u32),
    /// Window of the trailing moving average drawn over the raw (noisy) per-step losses;
    /// 1 draws the raw losses only.
    pub smooth: usize,
    /// Chart title prefix (e.g. the run name).
    pub title: Option<String>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            size: DEFAULT_SIZE,
            smooth: 20,
            title: None,
        }
    }
}

/// What [`plot_log`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PlotReport {
    /// Log lines read.
    pub steps: usize,
    /// The loss chart.
    pub losses_png: PathBuf,
    /// The σ chart.
    pub sigma_png: PathBuf,
    /// Font used for text; `None` when no font was found (charts without text).
    pub font: Option<PathBuf>,
    /// Final σ (init, expand, aggregate).
    pub final_sigma: [f64; 3],
    /// Mean of the last `smooth` steps' losses per stage (None when a stage never occurred).
    pub final_losses: [Option<f64>; 3],
}

/// Reads `train_log.jsonl`; every line must parse (the error names the line).
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut lines = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let line: LogLine = serde_json::from_str(l).map_err(|e| {
            Error::Input(format!(
                "{}:{}: not a train_log line (expected step, lr, L_init, L_exp, L_agg, total, \
                 sigma_init, sigma_exp, sigma_agg, grad_norm, tokens_per_sec): {e}",
                path.display(),
                i + 1
            ))
        })?;
        lines.push(line);
    }
    if lines.is_empty() {
        return Err(Error::Input(format!("{}: no log lines", path.display())));
    }
    Ok(lines)
}

/// Writes `losses.png` and `sigma.png` for the log at `log` into `out` (created if missing).
pub fn plot_log(log: &Path, out: &Path, opts: &PlotOptions) -> Result<PlotReport> {
    let lines = read_log(log)?;
    if opts.size.0 < 200 || opts.size.1 < 150 {
        return Err(Error::Input(format!(
            "plot size {}x{} is too small (at least 200x150)",
            opts.size.0, opts.size.1
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let font = font();
    let smooth = opts.smooth.max(1);
    let prefix = opts
        .title
        .as_deref()
        .map(|t| format!("{t}: "))
        .unwrap_or_default();

    // Losses: raw per-step points (light) and their trailing moving average (solid).
    let stage_loss = |l: &LogLine, j: usize| [l.l_init, l.l_exp, l.l_agg][j];
    let mut loss_series = Vec::new();
    for (j, name) in STAGES.iter().enumerate() {
        let raw: Vec<(f64, f64)> = lines
            .iter()
            .filter_map(|l| stage_loss(l, j).map(|v| (l.step as f64, v)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        let eval: Vec<(f64, f64)> = lines
            .iter()
            .filter_map(|l| {
                let e = l.eval.as_ref()?;
                [e.l_init, e.l_exp, e.l_agg][j].map(|v| (l.step as f64, v))
            })
            .filter(|(_, v)| v.is_finite())
            .collect();
        loss_series.push(Series {
            name,
            color: COLORS[j],
            smoothed: moving_average(&raw, smooth),
            raw,
            eval,
        });
    }
    let losses_png = out.join("losses.png");
    let png = render(
        &loss_series,
        &format!("{prefix}stage losses (mean token NLL; dashed: held-out)"),
        "loss",
        opts.size,
        font.is_some(),
    )?;
    steper_fsutil::write_atomic(&losses_png, &png)?;

    let sigma_series: Vec<Series> = STAGES
        .iter()
        .enumerate()
        .map(|(j, name)| {
            let pts: Vec<(f64, f64)> = lines
                .iter()
                .map(|l| (l.step as f64, [l.sigma_init, l.sigma_exp, l.sigma_agg][j]))
                .filter(|(_, v)| v.is_finite())
                .collect();
            Series {
                name,
                color: COLORS[j],
                raw: Vec::new(),
                smoothed: pts,
                eval: Vec::new(),
            }
        })
        .collect();
    let sigma_png = out.join("sigma.png");
    let png = render(
        &sigma_series,
        &format!("{prefix}learned difficulty σ per stage"),
        "σ",
        opts.size,
        font.is_some(),
    )?;
    steper_fsutil::write_atomic(&sigma_png, &png)?;

    let last = lines.last().expect("non-empty");
    let tail = &lines[lines.len().saturating_sub(smooth)..];
    let final_losses = [0, 1, 2].map(|j| {
        let v: Vec<f64> = tail.iter().filter_map(|l| stage_loss(l, j)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    });
    Ok(PlotReport {
        steps: lines.len(),
        losses_png,
        sigma_png,
        font: font.map(Path::to_path_buf),
        final_sigma: [last.sigma_init, last.sigma_exp, last.sigma_agg],
        final_losses,
    })
}

const STAGES: [&str; 3] = ["init", "expand", "aggregate"];
const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    raw: Vec<(f64, f64)>,
    smoothed: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
}

/// Trailing moving average over `window` points.
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

/// Finds a TrueType font once and registers it with plotters as "sans-serif".
fn font() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = font_candidates();
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Some(path);
            }
        }
        None
    })
    .as_deref()
}

fn font_candidates() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::env::var_os("STEPER_PLOT_FONT")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for p in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/opentype/noto/NotoSans-Regular.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "C:\\Windows\\Fonts\\arial.ttf",
    ] {
        v.push(PathBuf::from(p));
    }
    // Any other TrueType font of the system.
    let mut stack = vec![PathBuf::from("/usr/share/fonts")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) {
                v.push(p);
            }
        }
    }
    v
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Input(format!("plot: {e}"))
}

/// Renders series into an RGB buffer and encodes it as PNG.
fn render(
    series: &[Series<'_>],
    caption: &str,
    y_desc: &str,
    (w, h): (u32, u32),
    text: bool,
) -> Result<Vec<u8>> {
    let all = || {
        series
            .iter()
            .flat_map(|s| s.raw.iter().chain(&s.smoothed).chain(&s.eval))
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (
        (y0 - pad).min(if y0 >= 0.0 { 0.0 } else { y0 - pad }),
        y1 + pad,
    );

    let mut buf = vec![0u8; (w as usize) * (h as usize) * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(12);
        if text {
            builder
                .caption(caption, ("sans-serif", 24))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        if text {
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(y_desc)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(plot_err)?;
        }
        for s in series {
            let light = s.color.mix(0.25);
            if !s.raw.is_empty() {
                chart
                    .draw_series(LineSeries::new(s.raw.iter().copied(), light))
                    .map_err(plot_err)?;
            }
            let solid = s.color.stroke_width(2);
            let drawn = chart
                .draw_series(LineSeries::new(s.smoothed.iter().copied(), solid))
                .map_err(plot_err)?;
            if text {
                let c = s.color;
                drawn.label(s.name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            }
            if !s.eval.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(
                        s.eval.iter().copied(),
                        8,
                        5,
                        s.color.stroke_width(2),
                    ))
                    .map_err(plot_err)?;
                chart
                    .draw_series(s.eval.iter().map(|&p| Circle::new(p, 3, s.color.filled())))
                    .map_err(plot_err)?;
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    encode_png(&buf, w, h)
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(plot_err)?;
        writer.write_image_data(rgb).map_err(plot_err)?;
        writer.finish().map_err(plot_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_trailing() {
        let pts: Vec<(f64, f64)> = [1.0, 3.0, 5.0, 7.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as f64, y))
            .collect();
        let m = moving_average(&pts, 2);
        assert_eq!(
            m.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![1.0, 2.0, 4.0, 6.0]
        );
        assert_eq!(moving_average(&pts, 1), pts);
    }
}
