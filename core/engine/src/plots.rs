//! PNG plots of a run (loss curves, face similarity by step), drawn with plotters into memory
//! and written atomically. Fonts are the embedded DejaVu Sans: no system fonts are needed.

use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use image::RgbImage;
use plotters::coord::cartesian::Cartesian2d;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::error::{EngineError, Result};
use crate::visual::save_png_atomic;

/// Plot size in pixels (width, height).
pub const PLOT_SIZE: (u32, u32) = (900, 500);

/// One named line of a plot; non-finite points are left out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` with `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points }
    }
}

/// One x position of a band plot: the mean and the min–max spread (e.g. face similarity over
/// the validation samples at one step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandPoint {
    pub x: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

static FONTS: Once = Once::new();

/// Registers the embedded DejaVu fonts as plotters' `sans-serif` (once per process).
pub(crate) fn ensure_fonts() {
    FONTS.call_once(|| {
        for (style, bytes) in [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
            (FontStyle::Oblique, dejavu::sans::oblique()),
            (FontStyle::Italic, dejavu::sans::oblique()),
        ] {
            if plotters::style::register_font("sans-serif", style, bytes).is_err() {
                tracing::warn!("cannot register the embedded DejaVu font; plot text may be missing");
            }
        }
    });
}

/// A padded axis range covering `values` (a single value or a flat line gets a unit-ish span).
fn padded_range(mut lo: f64, mut hi: f64) -> Range<f64> {
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()).max(1.0) {
        let pad = if lo.abs() > 0.0 { lo.abs() * 0.1 } else { 1.0 };
        lo -= pad;
        hi += pad;
    } else {
        let pad = (hi - lo) * 0.05;
        lo -= pad;
        hi += pad;
    }
    lo..hi
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Tick label: `1800` rather than `1800.0`, `0.25`, and scientific notation for tiny values.
fn tick_label(v: &f64) -> String {
    let v = *v;
    if v == 0.0 || (1e-3..1e9).contains(&v.abs()) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    } else {
        format!("{v:.2e}")
    }
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::io(path, format!("cannot draw plot: {e}"))
}

/// Renders into an in-memory RGB buffer with `draw`, then writes it atomically as PNG.
fn render<F>(path: &Path, draw: F) -> Result<()>
where
    F: FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> std::result::Result<(), String>,
{
    ensure_fonts();
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        draw(&root).map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let img = RgbImage::from_raw(w, h, buf).ok_or_else(|| plot_err(path, "buffer size mismatch"))?;
    save_png_atomic(path, &img)
}

/// Title plus a centred "no data yet" caption, for plots drawn before any point exists.
fn draw_empty(
    root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
) -> std::result::Result<(), String> {
    let (w, h) = PLOT_SIZE;
    let centre = Pos::new(HPos::Center, VPos::Center);
    let title_style = TextStyle::from(("sans-serif", 24).into_font()).color(&BLACK).pos(centre);
    root.draw_text(title, &title_style, (w as i32 / 2, 24)).map_err(|e| e.to_string())?;
    let style = TextStyle::from(("sans-serif", 20).into_font()).color(&RGBColor(110, 110, 110)).pos(centre);
    root.draw_text("no data yet", &style, (w as i32 / 2, h as i32 / 2)).map_err(|e| e.to_string())?;
    Ok(())
}

/// A chart with f64 axes on an in-memory bitmap.
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The chart both plot kinds draw on: `title`, padded linear axes over `x` and `y` (min, max),
/// labelled ticks and a light grid (already drawn).
fn chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> std::result::Result<Chart<'a, 'b>, String> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(padded_range(x0, x1), padded_range(y0, y1))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(chart)
}

/// The legend of the labelled series, at `position`.
fn draw_legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws `series` as coloured lines with a legend and labelled, autoscaled axes; single points
/// are drawn as dots, and a plot with no finite point says "no data yet".
pub fn plot_lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let clean: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.name.clone(), s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()))
        .collect();
    let xb = bounds(clean.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let yb = bounds(clean.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    render(path, |root| {
        let (Some((x0, x1)), Some((y0, y1))) = (xb, yb) else {
            return draw_empty(root, title);
        };
        let mut chart = chart(root, title, x_label, y_label, (x0, x1), (y0, y1))?;
        let mut any_label = false;
        for (i, (name, pts)) in clean.iter().enumerate() {
            if pts.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            let anno = chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if !name.is_empty() {
                any_label = true;
                anno.label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            if pts.len() == 1 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| e.to_string())?;
            }
        }
        if any_label {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    })
}

/// Draws the mean of `points` as a line over a shaded min–max band (e.g. face similarity by step).
pub fn plot_band(path: &Path, title: &str, x_label: &str, y_label: &str, points: &[BandPoint]) -> Result<()> {
    let mut pts: Vec<BandPoint> = points
        .iter()
        .copied()
        .filter(|p| p.x.is_finite() && p.mean.is_finite() && p.min.is_finite() && p.max.is_finite())
        .map(|p| BandPoint { min: p.min.min(p.max), max: p.max.max(p.min), ..p })
        .collect();
    pts.sort_by(|a, b| a.x.total_cmp(&b.x));
    let xb = bounds(pts.iter().map(|p| p.x));
    let yb = bounds(pts.iter().flat_map(|p| [p.min, p.max, p.mean]));
    render(path, |root| {
        let (Some((x0, x1)), Some((y0, y1))) = (xb, yb) else {
            return draw_empty(root, title);
        };
        let mut chart = chart(root, title, x_label, y_label, (x0, x1), (y0, y1))?;
        let color = BLUE;
        let band_color = color.mix(0.2);
        if pts.len() > 1 {
            let mut poly: Vec<(f64, f64)> = pts.iter().map(|p| (p.x, p.max)).collect();
            poly.extend(pts.iter().rev().map(|p| (p.x, p.min)));
            chart
                .draw_series(std::iter::once(Polygon::new(poly, band_color.filled())))
                .map_err(|e| e.to_string())?
                .label("min–max")
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], band_color.filled()));
        } else {
            // A single step: show the spread as a vertical bar.
            chart
                .draw_series(
                    pts.iter().map(|p| PathElement::new(vec![(p.x, p.min), (p.x, p.max)], band_color.stroke_width(6))),
                )
                .map_err(|e| e.to_string())?
                .label("min–max")
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], band_color.filled()));
        }
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.x, p.mean)), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("mean")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.x, p.mean), 3, color.filled())))
            .map_err(|e| e.to_string())?;
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_png(path: &Path) -> RgbImage {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), PLOT_SIZE);
        let first = *img.get_pixel(0, 0);
        assert!(img.pixels().any(|p| *p != first), "plot is a single colour");
        img
    }

    fn dark_pixels(img: &RgbImage) -> usize {
        img.pixels().filter(|p| p.0.iter().all(|&v| v < 100)).count()
    }

    #[test]
    fn lines_plot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let train = Series::new("train", (0..50).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect());
        let val = Series::new("val", vec![(0.0, 0.9), (10.0, f64::NAN), (25.0, 0.2), (49.0, 0.1)]);
        plot_lines(&p, "loss", "step", "loss", &[train, val, Series::new("empty", vec![])]).unwrap();
        let img = check_png(&p);
        // Some coloured (non-grey) pixels from the lines.
        assert!(img.pixels().any(|px| {
            let [r, g, b] = px.0;
            r.max(g).max(b) - r.min(g).min(b) > 100
        }));
        assert!(dark_pixels(&img) > 200, "no text/axes drawn");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn single_point_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("one.png");
        plot_lines(&p, "loss", "step", "loss", &[Series::new("train", vec![(3.0, 0.5)])]).unwrap();
        check_png(&p);
        let q = dir.path().join("sub/empty.png");
        plot_lines(&q, "loss", "step", "loss", &[]).unwrap();
        let img = check_png(&q);
        assert!(dark_pixels(&img) > 50, "no caption drawn");
        let r = dir.path().join("nan.png");
        plot_lines(&r, "loss", "step", "loss", &[Series::new("x", vec![(f64::NAN, 1.0)])]).unwrap();
        check_png(&r);
    }

    #[test]
    fn band_plot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("face.png");
        let pts: Vec<BandPoint> = (0..20)
            .map(|i| {
                let m = 0.2 + 0.03 * i as f64;
                BandPoint { x: (i * 100) as f64, mean: m, min: m - 0.1, max: m + 0.05 }
            })
            .collect();
        plot_band(&p, "face similarity", "step", "cosine", &pts).unwrap();
        let img = check_png(&p);
        // The light-blue band is there.
        assert!(img.pixels().any(|px| px.0[2] > 200 && px.0[0] < 230 && px.0[0] > 150));
        let q = dir.path().join("one.png");
        plot_band(&q, "face similarity", "step", "cosine", &pts[..1]).unwrap();
        check_png(&q);
        let r = dir.path().join("none.png");
        plot_band(&r, "face similarity", "step", "cosine", &[]).unwrap();
        check_png(&r);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(&1800.0), "1800");
        assert_eq!(tick_label(&0.25), "0.25");
        assert_eq!(tick_label(&0.0), "0");
        assert_eq!(tick_label(&-2.5), "-2.5");
        assert_eq!(tick_label(&1e-5), "1.00e-5");
    }

    #[test]
    fn padded_ranges() {
        let r = padded_range(1.0, 1.0);
        assert!(r.start < 1.0 && r.end > 1.0);
        let r = padded_range(0.0, 0.0);
        assert!(r.start < 0.0 && r.end > 0.0);
        let r = padded_range(0.0, 10.0);
        assert!(r.start < 0.0 && r.end > 10.0 && r.end < 11.0);
    }
}
