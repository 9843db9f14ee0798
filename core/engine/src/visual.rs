//! The per-epoch visualization grid: one row per sample, columns reference | target | generated,
//! under a header naming the columns, so a run's progress can be judged by eye.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{EngineError, Result};

/// Width of the white gutters between and around cells, in pixels.
pub const GUTTER: u32 = 2;
/// Column titles, left to right.
pub const COLUMN_TITLES: [&str; 3] = ["reference", "target", "generated"];
/// Cells narrower than this are upscaled (nearest neighbour, integer factor) so the images can
/// be seen and the titles fit.
pub const MIN_CELL: u32 = 96;

/// One sample of the grid; each slice is CHW, 3×size×size, values in [0, 1] (clamped).
#[derive(Debug, Clone, Copy)]
pub struct GridRow<'a> {
    pub reference: &'a [f32],
    pub target: &'a [f32],
    pub generated: &'a [f32],
}

/// Integer upscale factor applied to `size`×`size` images in the grid.
pub fn display_scale(size: u32) -> u32 {
    if size == 0 {
        1
    } else {
        MIN_CELL.div_ceil(size).max(1)
    }
}

/// Height of the title strip above the cells, for images of side `size`.
pub fn header_height(size: u32) -> u32 {
    let cell = size * display_scale(size);
    font_px(cell) + 10
}

fn font_px(cell: u32) -> u32 {
    (cell / 6).clamp(12, 20)
}

/// Top-left pixel of the cell at (`row`, `col`) in a grid of `size`×`size` images.
pub fn cell_origin(size: u32, row: u32, col: u32) -> (u32, u32) {
    let cell = size * display_scale(size);
    (GUTTER + col * (cell + GUTTER), header_height(size) + row * (cell + GUTTER))
}

/// Converts CHW [0, 1] data of a `size`×`size` image to an RGB image (values clamped, NaN → 0).
///
/// Panics if `data.len() != 3 * size * size` ([`save_grid`] checks this and returns an error).
pub fn chw_to_rgb_image(data: &[f32], size: u32) -> RgbImage {
    chw_to_rgb(data, size, size)
}

/// Converts CHW [0, 1] data of a `width`×`height` image to an RGB image (values clamped,
/// NaN → 0). Panics if `data.len() != 3 * width * height`.
pub fn chw_to_rgb(data: &[f32], width: u32, height: u32) -> RgbImage {
    let plane = (width as usize) * (height as usize);
    assert_eq!(data.len(), 3 * plane, "chw_to_rgb: expected 3*{width}*{height} values, got {}", data.len());
    let to_u8 = |v: f32| {
        if v.is_nan() {
            0
        } else {
            (v.clamp(0.0, 1.0) * 255.0).round() as u8
        }
    };
    RgbImage::from_fn(width, height, |x, y| {
        let i = (y * width + x) as usize;
        Rgb([to_u8(data[i]), to_u8(data[plane + i]), to_u8(data[2 * plane + i])])
    })
}

/// A temp path next to `path` that keeps its extension (so encoders inferring the format work).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{stem}.tmp-{}{ext}", std::process::id()))
}

/// Writes `img` as PNG to `path` atomically (temp file in the same directory, then rename).
pub(crate) fn save_png_atomic(path: &Path, img: &RgbImage) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| EngineError::io(parent, format!("cannot create directory: {e}")))?;
        }
    }
    let tmp = temp_sibling(path);
    if let Err(e) = img.save_with_format(&tmp, image::ImageFormat::Png) {
        let _ = std::fs::remove_file(&tmp);
        return Err(EngineError::io(path, format!("cannot write PNG: {e}")));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EngineError::io(path, format!("cannot move PNG into place: {e}"))
    })
}

/// Writes CHW [0, 1] data of a `width`×`height` image as a PNG, atomically.
pub fn save_chw_png(path: &Path, data: &[f32], width: u32, height: u32) -> Result<()> {
    if data.len() != 3 * width as usize * height as usize {
        return Err(EngineError::io(path, format!("expected 3×{height}×{width} values, got {}", data.len())));
    }
    save_png_atomic(path, &chw_to_rgb(data, width, height))
}

/// Draws `texts` (centre-anchored at the given pixel) in black onto `img`.
pub(crate) fn draw_texts(img: &mut RgbImage, texts: &[(&str, (i32, i32))], px: u32) -> std::result::Result<(), String> {
    crate::plots::ensure_fonts();
    let (w, h) = img.dimensions();
    let buf: &mut [u8] = img;
    let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
    let style = TextStyle::from(("sans-serif", px).into_font()).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
    for (text, pos) in texts {
        root.draw_text(text, &style, *pos).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// Saves the reference | target | generated grid of `rows` (images of side `size`) as a PNG.
pub fn save_grid(path: &Path, size: u32, rows: &[GridRow<'_>]) -> Result<()> {
    let bad = |message: String| EngineError::Io { path: path.to_path_buf(), message };
    if size == 0 {
        return Err(bad("cannot draw grid: image size 0".into()));
    }
    if rows.is_empty() {
        return Err(bad("cannot draw grid: no samples".into()));
    }
    let want = 3 * (size as usize) * (size as usize);
    for (i, r) in rows.iter().enumerate() {
        for (name, d) in [("reference", r.reference), ("target", r.target), ("generated", r.generated)] {
            if d.len() != want {
                return Err(bad(format!(
                    "cannot draw grid: row {i} {name} has {} values, expected 3*{size}*{size} = {want}",
                    d.len()
                )));
            }
        }
    }
    let scale = display_scale(size);
    let cell = size * scale;
    let header = header_height(size);
    let width = GUTTER + 3 * (cell + GUTTER);
    let height = header + rows.len() as u32 * (cell + GUTTER);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, data) in [row.reference, row.target, row.generated].into_iter().enumerate() {
            let mut img = chw_to_rgb_image(data, size);
            if scale > 1 {
                img = image::imageops::resize(&img, cell, cell, image::imageops::FilterType::Nearest);
            }
            let (x, y) = cell_origin(size, r as u32, c as u32);
            image::imageops::replace(&mut canvas, &img, x as i64, y as i64);
        }
    }
    let texts: Vec<(&str, (i32, i32))> = COLUMN_TITLES
        .iter()
        .enumerate()
        .map(|(c, t)| {
            let (x, _) = cell_origin(size, 0, c as u32);
            (*t, ((x + cell / 2) as i32, (header / 2) as i32))
        })
        .collect();
    draw_texts(&mut canvas, &texts, font_px(cell)).map_err(|e| bad(format!("cannot draw grid titles: {e}")))?;
    save_png_atomic(path, &canvas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(size: u32, rgb: [f32; 3]) -> Vec<f32> {
        let plane = (size * size) as usize;
        let mut v = vec![0f32; 3 * plane];
        for c in 0..3 {
            v[c * plane..(c + 1) * plane].fill(rgb[c]);
        }
        v
    }

    #[test]
    fn chw_conversion_clamps() {
        let mut d = solid(2, [1.0, 0.5, 0.0]);
        d[0] = 2.0;
        d[4] = -1.0;
        d[8] = f32::NAN;
        let img = chw_to_rgb_image(&d, 2);
        assert_eq!(img.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 128, 0]);
    }

    #[test]
    fn grid_layout_colours_and_titles() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("epoch_001.png");
        let size = 32;
        let red = solid(size, [1.0, 0.0, 0.0]);
        let green = solid(size, [0.0, 1.0, 0.0]);
        let blue = solid(size, [0.0, 0.0, 1.0]);
        let over = solid(size, [3.0, -2.0, 0.5]);
        let rows = [
            GridRow { reference: &red, target: &green, generated: &blue },
            GridRow { reference: &blue, target: &red, generated: &over },
        ];
        save_grid(&p, size, &rows).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        let cell = size * display_scale(size);
        assert!(cell >= MIN_CELL);
        assert_eq!(img.width(), GUTTER + 3 * (cell + GUTTER));
        assert_eq!(img.height(), header_height(size) + 2 * (cell + GUTTER));
        let at = |r, c| {
            let (x, y) = cell_origin(size, r, c);
            (
                img.get_pixel(x + cell / 2, y + cell / 2).0,
                img.get_pixel(x, y).0,
                img.get_pixel(x + cell - 1, y + cell - 1).0,
            )
        };
        assert_eq!(at(0, 0), ([255, 0, 0], [255, 0, 0], [255, 0, 0]));
        assert_eq!(at(0, 1).0, [0, 255, 0]);
        assert_eq!(at(0, 2).0, [0, 0, 255]);
        assert_eq!(at(1, 0).0, [0, 0, 255]);
        assert_eq!(at(1, 2).0, [255, 0, 128]);
        // Gutter is white.
        let (x, y) = cell_origin(size, 0, 1);
        assert_eq!(img.get_pixel(x - 1, y + 5).0, [255, 255, 255]);
        // Header has dark text pixels over each column.
        for c in 0..3 {
            let (x0, _) = cell_origin(size, 0, c);
            let dark = (x0..x0 + cell)
                .flat_map(|x| (0..header_height(size)).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 128))
                .count();
            assert!(dark > 10, "column {c} title not drawn ({dark} dark pixels)");
        }
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn grid_rejects_wrong_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        let ok = solid(8, [0.5; 3]);
        let short = vec![0.0; 10];
        let err =
            save_grid(&p, 8, &[GridRow { reference: &ok, target: &short, generated: &ok }]).unwrap_err().to_string();
        assert!(err.contains("g.png") && err.contains("target"), "{err}");
        assert!(save_grid(&p, 8, &[]).is_err());
        assert!(!p.exists());
    }
}
