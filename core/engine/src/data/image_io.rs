//! The one image-I/O module of the engine: which files are images, listing a dataset folder
//! (dangling symbolic links reported, never silently dropped), a strict decode (a truncated
//! JPEG or PNG is an error, not a grey-filled picture), and the three ways an image is fitted
//! to the size a consumer wants:
//!
//! - [`Fit::Bucket`]: musubi-tuner's `resize_image_to_bucket` (`dataset/media_utils.py`):
//!   scale so the image covers the bucket (`scale = max(bw/w, bh/h)`, new size
//!   `int(w·scale + 0.5)`), Lanczos-3 when enlarging (Pillow's `LANCZOS`, bit-exact:
//!   [`pil_lanczos`]), area averaging when shrinking (OpenCV `INTER_AREA`: `f32` sums rounded
//!   half to even to 8 bits, as OpenCV's `saturate_cast`), then a centre crop with offsets
//!   `(new − bucket) // 2`. The result equals musubi-tuner's 8-bit array (checked against
//!   Pillow and OpenCV by `tests/python/bucket_oracle.py`).
//!   Every dataset layout uses it.
//! - [`Fit::SquareCrop`]: the bundle trainer's historic rule (centre square crop of side
//!   `min(w, h)`, then a triangle-filter resize to `size × size`), kept bit-for-bit for the
//!   `bundles` layout when bucketing is off.
//! - [`Fit::Letterbox`]: `host eval-faces`' rule (fit inside `size × size`, aspect kept,
//!   top-left, black padding: the letterbox InsightFace's detector uses; an image already
//!   `size × size` is untouched).
//!
//! Every loader returns CHW `f32` RGB in [0, 1]. Alpha is dropped and EXIF orientation is not
//! applied (musubi-tuner opens images with PIL without `exif_transpose` either).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};

use crate::error::{EngineError, Result};

/// File extensions treated as images (compared case-insensitively): musubi-tuner's
/// `IMAGE_EXTENSIONS` (which contains seed 004's png/jpg/jpeg/webp and the bundle layout's
/// jpg/jpeg/png). Whether one can be decoded is [`decodable`]'s answer; a file with an
/// extension in this list that this build cannot decode is reported, not ignored.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "avif"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (case-insensitive). Looks at the name only.
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Whether this build's `image` crate can decode files with `path`'s extension.
pub fn decodable(path: &Path) -> bool {
    path.extension().and_then(ImageFormat::from_extension).is_some_and(|f| f.reading_enabled())
}

/// File stem as a string (lossy), `""` when there is none.
pub fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What [`list_dir`] found in one folder, each list sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Regular files (or symbolic links to regular files).
    pub files: Vec<PathBuf>,
    /// Directories (or symbolic links to directories).
    pub dirs: Vec<PathBuf>,
    /// Entries that could not be followed, with the reason: dangling symbolic links (the
    /// message names the missing target), symlink loops, unreadable entries.
    pub broken: Vec<(PathBuf, String)>,
}

impl Listing {
    /// The image files ([`is_image_path`]).
    pub fn images(&self) -> impl Iterator<Item = &PathBuf> {
        self.files.iter().filter(|p| is_image_path(p))
    }
}

/// Lists `dir` (one level). A symbolic link is followed; one whose target is missing is
/// listed in [`Listing::broken`] as `dangling symbolic link to <target>`.
pub fn list_dir(dir: &Path) -> std::io::Result<Listing> {
    let mut l = Listing::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                l.broken.push((dir.to_path_buf(), format!("unreadable directory entry: {e}")));
                continue;
            }
        };
        let path = entry.path();
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => l.dirs.push(path),
            Ok(m) if m.is_file() => l.files.push(path),
            Ok(_) => {} // sockets, fifos, devices: not dataset material
            Err(e) => {
                let is_link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
                let msg = if is_link {
                    match std::fs::read_link(&path) {
                        Ok(t) if e.kind() == std::io::ErrorKind::NotFound => {
                            format!("dangling symbolic link to {} (target missing)", t.display())
                        }
                        Ok(t) => {
                            format!("symbolic link to {} cannot be followed: {e}", t.display())
                        }
                        Err(_) => format!("symbolic link cannot be followed: {e}"),
                    }
                } else {
                    format!("cannot read: {e}")
                };
                l.broken.push((path, msg));
            }
        }
    }
    l.files.sort();
    l.dirs.sort();
    l.broken.sort();
    Ok(l)
}

/// Size and format of an image that passed [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub format: ImageFormat,
}

/// Checks that a JPEG stream is complete: walks its marker segments from SOI, skips each
/// scan's entropy-coded data, and requires the EOI marker (`FF D9`). A file cut anywhere
/// before EOI fails (the `image` crate's decoder fills the missing part with grey and
/// reports success); bytes after EOI (camera trailers, MPF pictures) are allowed.
pub fn check_jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG stream (no SOI marker)".into());
    }
    let n = b.len();
    let truncated =
        |what: &str| Err(format!("truncated JPEG: the file ends {what}, before the EOI marker (FF D9); {n} bytes"));
    let mut i = 2usize;
    loop {
        // Find the next marker: 0xFF (any number of fill bytes) then a non-0xFF code.
        while i < n && b[i] != 0xFF {
            i += 1; // tolerate junk between segments, as decoders do
        }
        while i < n && b[i] == 0xFF {
            i += 1;
        }
        if i >= n {
            return truncated("between segments");
        }
        let m = b[i];
        i += 1;
        match m {
            0xD9 => return Ok(()),
            0x00 | 0x01 | 0xD0..=0xD8 => continue, // stuffed byte, TEM, RSTn, SOI: no length
            _ => {
                if i + 2 > n {
                    return truncated(&format!("inside the length of marker FF {m:02X}"));
                }
                let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
                if len < 2 {
                    return Err(format!("corrupt JPEG: marker FF {m:02X} has length {len}"));
                }
                if i + len > n {
                    return truncated(&format!("inside segment FF {m:02X}"));
                }
                i += len;
                if m == 0xDA {
                    // Entropy-coded data up to the next marker that is not a stuffed 0xFF00
                    // or a restart marker.
                    loop {
                        while i < n && b[i] != 0xFF {
                            i += 1;
                        }
                        if i + 1 >= n {
                            return truncated("inside the entropy-coded data of a scan");
                        }
                        match b[i + 1] {
                            0x00 | 0xD0..=0xD7 => i += 2,
                            0xFF => i += 1,
                            _ => break,
                        }
                    }
                }
            }
        }
    }
}

/// Checks that a PNG stream is complete: walks its chunks from the signature and requires the
/// `IEND` chunk. CRCs are left to the decoder.
pub fn check_png_complete(b: &[u8]) -> std::result::Result<(), String> {
    const SIG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if b.len() < 8 || b[..8] != SIG {
        return Err("not a PNG stream (bad signature)".into());
    }
    let n = b.len();
    let mut i = 8usize;
    loop {
        if i + 8 > n {
            return Err(format!("truncated PNG: the file ends before the IEND chunk; {n} bytes"));
        }
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let kind = &b[i + 4..i + 8];
        let end = i.checked_add(12).and_then(|x| x.checked_add(len));
        match end {
            Some(e) if e <= n => {
                if kind == b"IEND" {
                    return Ok(());
                }
                i = e;
            }
            _ => {
                return Err(format!(
                "truncated PNG: chunk {} at byte {i} needs {len} bytes, the file ends before the IEND chunk; {n} bytes",
                String::from_utf8_lossy(kind)
            ))
            }
        }
    }
}

/// Why an image cannot be used: `Io` (cannot read the file) or `Decode` (anything about its
/// content). The message never repeats the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProblem {
    Io(String),
    Decode(String),
}

impl std::fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageProblem::Io(m) => write!(f, "cannot read: {m}"),
            ImageProblem::Decode(m) => write!(f, "cannot decode: {m}"),
        }
    }
}

impl ImageProblem {
    /// As an [`EngineError`] naming `path`.
    pub fn into_error(self, path: &Path) -> EngineError {
        match self {
            ImageProblem::Io(m) => EngineError::io(path, m),
            ImageProblem::Decode(m) => EngineError::Image { path: path.to_path_buf(), message: m },
        }
    }
}

fn read_checked(path: &Path) -> std::result::Result<(Vec<u8>, ImageFormat), ImageProblem> {
    let bytes = std::fs::read(path).map_err(|e| ImageProblem::Io(e.to_string()))?;
    if bytes.is_empty() {
        return Err(ImageProblem::Decode("empty file".into()));
    }
    let format = image::guess_format(&bytes).map_err(|_| {
        ImageProblem::Decode(match path.extension().and_then(ImageFormat::from_extension) {
            Some(f) => format!("not a valid {} file (unrecognised content)", f.to_mime_type()),
            None => "unrecognised image format".into(),
        })
    })?;
    if !format.reading_enabled() {
        return Err(ImageProblem::Decode(format!(
            "{} images are not supported by this build (supported: png, jpeg)",
            format.extensions_str().first().copied().unwrap_or("this format")
        )));
    }
    match format {
        ImageFormat::Jpeg => check_jpeg_complete(&bytes).map_err(ImageProblem::Decode)?,
        ImageFormat::Png => check_png_complete(&bytes).map_err(ImageProblem::Decode)?,
        _ => {}
    }
    Ok((bytes, format))
}

/// Reads and checks an image: the file is read, its format recognised from its content, a
/// JPEG or PNG checked for completeness ([`check_jpeg_complete`], [`check_png_complete`]),
/// and with `full_decode` every pixel decoded (otherwise only the header is parsed).
pub fn probe(path: &Path, full_decode: bool) -> std::result::Result<ImageInfo, ImageProblem> {
    let (bytes, format) = read_checked(path)?;
    let (width, height) = if full_decode {
        let img =
            image::load_from_memory_with_format(&bytes, format).map_err(|e| ImageProblem::Decode(e.to_string()))?;
        (img.width(), img.height())
    } else {
        let mut r = image::ImageReader::new(Cursor::new(&bytes));
        r.set_format(format);
        r.into_dimensions().map_err(|e| ImageProblem::Decode(format!("cannot read the header: {e}")))?
    };
    if width == 0 || height == 0 {
        return Err(ImageProblem::Decode(format!("empty image {width}x{height}")));
    }
    Ok(ImageInfo { width, height, format })
}

/// Decodes `path` strictly (as [`probe`] checks it) and converts it to 8-bit RGB.
pub fn decode_rgb(path: &Path) -> std::result::Result<RgbImage, ImageProblem> {
    let (bytes, format) = read_checked(path)?;
    let img = image::load_from_memory_with_format(&bytes, format).map_err(|e| ImageProblem::Decode(e.to_string()))?;
    let img = img.to_rgb8();
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageProblem::Decode(format!("empty image {}x{}", img.width(), img.height())));
    }
    Ok(img)
}

/// How an image is brought to the size a consumer wants (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fit {
    /// musubi-tuner's resize-to-cover + centre crop to `(width, height)`.
    Bucket(u32, u32),
    /// Centre square crop, then triangle resize to `size × size` (the historic bundle loader).
    SquareCrop(u32),
    /// Fit inside `size × size`, aspect kept, top-left, black padding (`host eval-faces`).
    Letterbox(u32),
}

impl Fit {
    /// Output `(width, height)`.
    pub fn size(self) -> (u32, u32) {
        match self {
            Fit::Bucket(w, h) => (w, h),
            Fit::SquareCrop(s) | Fit::Letterbox(s) => (s, s),
        }
    }
}

/// Decodes `path` and fits it (see [`Fit`]); CHW `f32` RGB in [0, 1].
pub fn load(path: &Path, fit: Fit) -> Result<Vec<f32>> {
    let (w, h) = fit.size();
    if w == 0 || h == 0 {
        return Err(EngineError::Image { path: path.to_path_buf(), message: format!("requested size {w}x{h}") });
    }
    let img = decode_rgb(path).map_err(|e| e.into_error(path))?;
    Ok(fit_image(&img, fit))
}

/// Fits a decoded image (see [`Fit`]); CHW `f32` RGB in [0, 1].
pub fn fit_image(img: &RgbImage, fit: Fit) -> Vec<f32> {
    match fit {
        Fit::Bucket(w, h) => resize_to_bucket(img, (w, h)),
        Fit::SquareCrop(s) => to_chw(&square_crop_resize(img, s)),
        Fit::Letterbox(s) => to_chw(&letterbox(img, s)),
    }
}

/// Centre square crop, then triangle resize to `size × size` (untouched when already that).
pub fn square_crop_resize(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let square = image::imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image();
    if side == size {
        square
    } else {
        image::imageops::resize(&square, size, size, image::imageops::FilterType::Triangle)
    }
}

/// Fits inside `size × size` keeping the aspect ratio (triangle filter), top-left, black
/// padding; an image already `size × size` is returned untouched.
pub fn letterbox(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (size, size) {
        return img.clone();
    }
    let scale = (size as f64 / w as f64).min(size as f64 / h as f64);
    let nw = ((w as f64 * scale).round() as u32).clamp(1, size);
    let nh = ((h as f64 * scale).round() as u32).clamp(1, size);
    let r = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
    let mut canvas = RgbImage::new(size, size);
    image::imageops::replace(&mut canvas, &r, 0, 0);
    canvas
}

/// 8-bit RGB → CHW `f32` in [0, 1].
pub fn to_chw(img: &RgbImage) -> Vec<f32> {
    let p = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * p];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * p + i] = px.0[c] as f32 / 255.0;
        }
    }
    out
}

/// Writes a CHW `f32` RGB image in [0, 1] of `(width, height)` to `path`, in the format its
/// extension names (png, jpg), atomically.
pub fn save_chw(path: &Path, chw: &[f32], (w, h): (u32, u32)) -> Result<()> {
    let p = (w * h) as usize;
    if chw.len() != 3 * p {
        return Err(EngineError::Other(format!("save_chw: {} values for a 3x{h}x{w} image", chw.len())));
    }
    let img = RgbImage::from_fn(w, h, |x, y| {
        let i = (y * w + x) as usize;
        image::Rgb([0, 1, 2].map(|c| (chw[c * p + i].clamp(0.0, 1.0) * 255.0).round() as u8))
    });
    let format = ImageFormat::from_path(path).map_err(|e| EngineError::io(path, e))?;
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), format).map_err(|e| EngineError::io(path, e))?;
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| EngineError::io(d, e))?;
    }
    crate::write_atomic(path, &buf)
}

/// The size musubi-tuner resizes an image of size `(w, h)` to before its centre crop to
/// `bucket`: `scale = max(bw / w, bh / h)`, `(int(w·scale + 0.5), int(h·scale + 0.5))`.
pub fn cover_size((w, h): (u32, u32), (bw, bh): (u32, u32)) -> (u32, u32, f64) {
    let scale = (bw as f64 / w as f64).max(bh as f64 / h as f64);
    let nw = ((w as f64 * scale + 0.5).floor() as u32).max(bw);
    let nh = ((h as f64 * scale + 0.5).floor() as u32).max(bh);
    (nw, nh, scale)
}

/// musubi-tuner's `resize_image_to_bucket` (see the module docs); CHW `f32` in [0, 1], each
/// value one of the 256 levels musubi-tuner's 8-bit array holds.
pub fn resize_to_bucket(img: &RgbImage, (bw, bh): (u32, u32)) -> Vec<f32> {
    let (w, h) = img.dimensions();
    if (w, h) == (bw, bh) {
        return to_chw(img);
    }
    let (nw, nh, scale) = cover_size((w, h), (bw, bh));
    let (left, top) = ((nw - bw) / 2, (nh - bh) / 2);
    if scale > 1.0 {
        let r = pil_lanczos(img, nw, nh);
        let c = image::imageops::crop_imm(&r, left, top, bw, bh).to_image();
        return to_chw(&c);
    }
    // Area averaging, separable: rows first (only the kept output rows' sources), then columns.
    let xs = area_weights(w as usize, nw as usize);
    let ys = area_weights(h as usize, nh as usize);
    let (bw, bh, left, top) = (bw as usize, bh as usize, left as usize, top as usize);
    let (w, _h) = (w as usize, h as usize);
    let raw = img.as_raw();
    let plane = bw * bh;
    let mut out = vec![0f32; 3 * plane];
    let mut row = vec![0f32; 3 * w];
    let mut acc = vec![0f32; 3 * bw];
    for oy in 0..bh {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for &(sy, wy) in &ys[top + oy] {
            let src = &raw[sy * w * 3..(sy + 1) * w * 3];
            for (r, s) in row.iter_mut().zip(src) {
                *r = *s as f32;
            }
            for ox in 0..bw {
                let mut px = [0f32; 3];
                for &(sx, wx) in &xs[left + ox] {
                    for c in 0..3 {
                        px[c] += wx * row[sx * 3 + c];
                    }
                }
                for c in 0..3 {
                    acc[ox * 3 + c] += wy * px[c];
                }
            }
        }
        for ox in 0..bw {
            for c in 0..3 {
                out[c * plane + oy * bw + ox] = acc[ox * 3 + c].round_ties_even().clamp(0.0, 255.0) / 255.0;
            }
        }
    }
    out
}

/// Pillow's `Image.resize((w, h), Image.LANCZOS)` on 8-bit RGB, bit-exact: Pillow's
/// `libImaging/Resample.c` (`precompute_coeffs`, `normalize_coeffs_8bpc`, 22-bit fixed-point
/// coefficients, the horizontal pass first with its result rounded and clipped to 8 bits, then
/// the vertical pass; a pass is skipped when that side keeps its size).
pub fn pil_lanczos(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let src = img.as_raw();
    // Horizontal pass: w → out_w on every row.
    let (tw, tmp) = if out_w != w {
        let (ks, bounds, kk) = pil_coeffs(w as usize, out_w as usize);
        let mut t = vec![0u8; out_w as usize * h as usize * 3];
        for y in 0..h as usize {
            let row = &src[y * w as usize * 3..(y + 1) * w as usize * 3];
            for xx in 0..out_w as usize {
                let (xmin, xmax) = bounds[xx];
                let k = &kk[xx * ks..xx * ks + xmax];
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PIL_PRECISION_BITS - 1);
                    for (x, kx) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i64 * *kx as i64;
                    }
                    t[(y * out_w as usize + xx) * 3 + c] = pil_clip8(ss);
                }
            }
        }
        (out_w as usize, t)
    } else {
        (w as usize, src.to_vec())
    };
    // Vertical pass: h → out_h on every column.
    let out = if out_h != h {
        let (ks, bounds, kk) = pil_coeffs(h as usize, out_h as usize);
        let mut o = vec![0u8; tw * out_h as usize * 3];
        for yy in 0..out_h as usize {
            let (ymin, ymax) = bounds[yy];
            let k = &kk[yy * ks..yy * ks + ymax];
            for xx in 0..tw {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PIL_PRECISION_BITS - 1);
                    for (y, ky) in k.iter().enumerate() {
                        ss += tmp[((y + ymin) * tw + xx) * 3 + c] as i64 * *ky as i64;
                    }
                    o[(yy * tw + xx) * 3 + c] = pil_clip8(ss);
                }
            }
        }
        o
    } else {
        tmp
    };
    RgbImage::from_raw(tw as u32, out_h, out).expect("sizes match")
}

const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

fn pil_clip8(ss: i64) -> u8 {
    (ss >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `precompute_coeffs` (Lanczos, support 3) + `normalize_coeffs_8bpc`: kernel size,
/// `(xmin, count)` per output sample, fixed-point coefficients.
fn pil_coeffs(in_size: usize, out_size: usize) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    fn lanczos(x: f64) -> f64 {
        if (-3.0..3.0).contains(&x) {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    }
    let scale = ((in_size as f32 - 0.0f32) as f64) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C's (int) truncates
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut k = vec![0f64; xmax];
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate() {
            let w = lanczos(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate() {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let f = v * (1u32 << PIL_PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    (ksize, bounds, kk)
}

/// OpenCV `INTER_AREA` weights for shrinking `n_in` samples to `n_out` (`n_out ≤ n_in`):
/// output `i` averages the source interval `[i·s, (i+1)·s)`, `s = n_in / n_out`, each source
/// sample weighted by its overlap. `n_out == n_in` is the identity.
pub fn area_weights(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f32)>> {
    let s = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let a = i as f64 * s;
            let b = (a + s).min(n_in as f64);
            let mut v = Vec::new();
            let mut k = a.floor() as usize;
            while (k as f64) < b && k < n_in {
                let lo = a.max(k as f64);
                let hi = b.min(k as f64 + 1.0);
                let wgt = (hi - lo) / s;
                if wgt > 1e-9 {
                    v.push((k, wgt as f32));
                }
                k += 1;
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
        let img =
            RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x + y) % 256) as u8]));
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Jpeg).unwrap();
        buf
    }

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 3 % 256) as u8, (y * 11 % 256) as u8, 9]));
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png).unwrap();
        buf
    }

    #[test]
    fn complete_streams_pass_and_every_truncation_fails() {
        let j = jpeg_bytes(64, 48);
        check_jpeg_complete(&j).unwrap();
        // Bytes after EOI are allowed.
        let mut trailer = j.clone();
        trailer.extend_from_slice(b"camera trailer");
        check_jpeg_complete(&trailer).unwrap();
        for cut in [j.len() - 1, j.len() - 2, j.len() / 2, 300, 20, 3] {
            let e = check_jpeg_complete(&j[..cut]).unwrap_err();
            assert!(e.contains("truncated JPEG") || e.contains("SOI"), "cut {cut}: {e}");
        }
        let p = png_bytes(40, 30);
        check_png_complete(&p).unwrap();
        for cut in [p.len() - 1, p.len() - 12, p.len() / 2, 10] {
            let e = check_png_complete(&p[..cut]).unwrap_err();
            assert!(e.contains("truncated PNG"), "cut {cut}: {e}");
        }
    }

    #[test]
    fn the_decoder_alone_accepts_a_truncated_jpeg_probe_does_not() {
        let d = tempfile::tempdir().unwrap();
        let j = jpeg_bytes(64, 64);
        let path = d.path().join("cut.jpg");
        std::fs::write(&path, &j[..j.len() * 2 / 3]).unwrap();
        // What the bundle loader relied on before: record whether the plain decoder notices.
        let plain = image::load_from_memory_with_format(&j[..j.len() * 2 / 3], ImageFormat::Jpeg);
        eprintln!("plain image-crate decode of a truncated JPEG: ok = {}", plain.is_ok());
        let e = probe(&path, true).unwrap_err();
        assert!(matches!(&e, ImageProblem::Decode(m) if m.contains("truncated JPEG")), "{e}");
        let e = probe(&path, false).unwrap_err();
        assert!(e.to_string().contains("truncated JPEG"), "{e}");
        let e = load(&path, Fit::Bucket(16, 16)).unwrap_err().to_string();
        assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
    }

    #[test]
    fn probe_reports_size_format_and_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.png");
        std::fs::write(&p, png_bytes(40, 30)).unwrap();
        let i = probe(&p, true).unwrap();
        assert_eq!((i.width, i.height, i.format), (40, 30, ImageFormat::Png));
        // A JPEG named .png is recognised by content.
        let q = d.path().join("b.png");
        std::fs::write(&q, jpeg_bytes(20, 10)).unwrap();
        assert_eq!(probe(&q, true).unwrap().format, ImageFormat::Jpeg);
        std::fs::write(d.path().join("junk.jpg"), b"not a jpeg").unwrap();
        let e = probe(&d.path().join("junk.jpg"), true).unwrap_err();
        assert!(matches!(e, ImageProblem::Decode(_)), "{e}");
        std::fs::write(d.path().join("empty.png"), b"").unwrap();
        assert!(probe(&d.path().join("empty.png"), true).unwrap_err().to_string().contains("empty"));
        let e = probe(&d.path().join("missing.png"), true).unwrap_err();
        assert!(matches!(e, ImageProblem::Io(_)), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn list_dir_reports_dangling_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.png"), png_bytes(4, 4)).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(d.path().join("gone.png"), d.path().join("link.png")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a.png"), d.path().join("good.png")).unwrap();
        let l = list_dir(d.path()).unwrap();
        assert_eq!(l.files, vec![d.path().join("a.png"), d.path().join("good.png")]);
        assert_eq!(l.dirs, vec![d.path().join("sub")]);
        assert_eq!(l.broken.len(), 1);
        assert_eq!(l.broken[0].0, d.path().join("link.png"));
        assert!(l.broken[0].1.contains("dangling") && l.broken[0].1.contains("gone.png"), "{:?}", l.broken);
    }

    #[test]
    fn extensions_and_decodability() {
        assert!(is_image_path(Path::new("x/A.JPG")) && is_image_path(Path::new("b.webp")));
        assert!(!is_image_path(Path::new("c.txt")) && !is_image_path(Path::new("noext")));
        assert!(decodable(Path::new("a.png")) && decodable(Path::new("a.JPEG")));
    }

    #[test]
    fn bucket_resize_covers_and_centre_crops() {
        // 60x40, left and right 10 px blue, the middle red: a 40x40 bucket keeps the red.
        let img =
            RgbImage::from_fn(60, 40, |x, _| if (10..50).contains(&x) { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
        let v = resize_to_bucket(&img, (40, 40));
        assert_eq!(v.len(), 3 * 40 * 40);
        assert!(v[..1600].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(v[1600..].iter().all(|&x| x.abs() < 1e-6));
        // Shrinking by 2 averages 2x2 blocks exactly (INTER_AREA).
        let g = RgbImage::from_fn(4, 2, |x, _| Rgb([if x % 2 == 0 { 0 } else { 255 }, 0, 0]));
        let v = resize_to_bucket(&g, (2, 1));
        // (0 + 255) / 2 = 127.5, rounded half to even as OpenCV's saturate_cast does.
        assert!(v[..2].iter().all(|&x| x == 128.0 / 255.0), "{v:?}");
        // Enlarging a flat image stays flat; the size is the bucket's.
        let f = RgbImage::from_pixel(10, 20, Rgb([51, 102, 153]));
        let v = resize_to_bucket(&f, (32, 48));
        assert_eq!(v.len(), 3 * 32 * 48);
        assert!(v[..32 * 48].iter().all(|&x| (x - 0.2).abs() < 2e-2));
        assert_eq!(cover_size((1000, 600), (512, 512)), (853, 512, 512.0 / 600.0));
    }

    #[test]
    fn save_chw_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..3 * 6 * 4).map(|i| (i % 7) as f32 / 6.0).collect();
        let p = d.path().join("sub/a.png");
        save_chw(&p, &v, (6, 4)).unwrap();
        let back = to_chw(&decode_rgb(&p).unwrap());
        assert!(v.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.5 / 255.0 + 1e-6));
        save_chw(&d.path().join("a.jpg"), &v, (6, 4)).unwrap();
        assert_eq!(probe(&d.path().join("a.jpg"), true).unwrap().format, ImageFormat::Jpeg);
        assert!(save_chw(&p, &v[1..], (6, 4)).is_err());
    }

    #[test]
    fn area_weights_sum_to_one() {
        for (a, b) in [(10, 3), (7, 7), (100, 33), (5, 4)] {
            let w = area_weights(a, b);
            assert_eq!(w.len(), b);
            for row in &w {
                let s: f32 = row.iter().map(|x| x.1).sum();
                assert!((s - 1.0).abs() < 1e-5, "{a}->{b}: {row:?}");
            }
        }
        assert_eq!(area_weights(3, 3), vec![vec![(0, 1.0)], vec![(1, 1.0)], vec![(2, 1.0)]]);
    }

    #[test]
    fn square_crop_matches_the_historic_loader() {
        let img = RgbImage::from_fn(60, 40, |x, y| Rgb([x as u8, y as u8, 7]));
        let a = to_chw(&square_crop_resize(&img, 16));
        assert_eq!(a.len(), 3 * 256);
        let l = letterbox(&img, 30);
        assert_eq!(l.dimensions(), (30, 30));
        assert_eq!(l.get_pixel(0, 29).0, [0, 0, 0]); // padding below the 30x20 picture
    }
}
