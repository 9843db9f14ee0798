//! dlib's face alignment: `get_face_chip_details(shape, size, padding)` (5-point version) and
//! `extract_image_chip` (dlib/image_transforms/interpolation.h), including the
//! `pyramid_down<2>` pre-downsampling (image_pyramid.h) and bilinear sampling with dlib's
//! truncating conversion to u8.

use crate::shape_predictor::RgbImage;

/// dlib's `drectangle` (inclusive corners: width = r − l + 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DRect {
    pub l: f64,
    pub t: f64,
    pub r: f64,
    pub b: f64,
}

impl DRect {
    fn is_empty(&self) -> bool {
        self.t > self.b || self.l > self.r
    }
    fn area(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            (self.r - self.l + 1.0) * (self.b - self.t + 1.0)
        }
    }
    fn center(&self) -> [f64; 2] {
        [(self.l + self.r) / 2.0, (self.t + self.b) / 2.0]
    }
    fn corners(&self) -> [[f64; 2]; 4] {
        // tl, tr, bl, br
        [[self.l, self.t], [self.r, self.t], [self.l, self.b], [self.r, self.b]]
    }
}

/// dlib's `chip_details`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChipDetails {
    pub rect: DRect,
    pub angle: f64,
    pub rows: usize,
    pub cols: usize,
}

/// `pyramid_down<2>::point_down`.
fn point_down(p: [f64; 2]) -> [f64; 2] {
    [p[0] / 2.0 - 1.25, p[1] / 2.0 - 0.75]
}

fn rect_down(r: DRect) -> DRect {
    let a = point_down([r.l, r.t]);
    let b = point_down([r.r, r.b]);
    DRect { l: a[0], t: a[1], r: b[0], b: b[1] }
}

fn rotate_point(c: [f64; 2], p: [f64; 2], angle: f64) -> [f64; 2] {
    let (s, co) = (angle.sin(), angle.cos());
    let (x, y) = (p[0] - c[0], p[1] - c[1]);
    [co * x - s * y + c[0], s * x + co * y + c[1]]
}

/// `find_similarity_transform(from, to)` (Umeyama): returns (m row-major 2×2, b).
/// For 2-D the SVD solution has the closed form R = rot(atan2(c10 − c01, c00 + c11)),
/// trace(DS) = hypot(c00 + c11, c10 − c01).
pub fn find_similarity_transform(from: &[[f64; 2]], to: &[[f64; 2]]) -> ([f64; 4], [f64; 2]) {
    let n = from.len() as f64;
    let (mut mf, mut mt) = ([0.0; 2], [0.0; 2]);
    for (f, t) in from.iter().zip(to) {
        mf[0] += f[0];
        mf[1] += f[1];
        mt[0] += t[0];
        mt[1] += t[1];
    }
    for k in 0..2 {
        mf[k] /= n;
        mt[k] /= n;
    }
    let mut sigma_from = 0.0;
    let mut cov = [0.0f64; 4];
    for (f, t) in from.iter().zip(to) {
        let df = [f[0] - mf[0], f[1] - mf[1]];
        let dt = [t[0] - mt[0], t[1] - mt[1]];
        sigma_from += df[0] * df[0] + df[1] * df[1];
        cov[0] += dt[0] * df[0];
        cov[1] += dt[0] * df[1];
        cov[2] += dt[1] * df[0];
        cov[3] += dt[1] * df[1];
    }
    sigma_from /= n;
    for c in &mut cov {
        *c /= n;
    }
    let a = cov[0] + cov[3];
    let b = cov[2] - cov[1];
    let norm = a.hypot(b);
    let (cs, sn) = if norm > 0.0 { (a / norm, b / norm) } else { (1.0, 0.0) };
    let c = if sigma_from != 0.0 { norm / sigma_from } else { 1.0 };
    let m = [c * cs, -c * sn, c * sn, c * cs];
    let t = [mt[0] - (m[0] * mf[0] + m[1] * mf[1]), mt[1] - (m[2] * mf[0] + m[3] * mf[1])];
    (m, t)
}

/// `get_face_chip_details(det, size, padding)` for a 5-point shape (points as dlib's `point`).
pub fn get_face_chip_details(parts: &[[i64; 2]], size: usize, padding: f64) -> ChipDetails {
    assert_eq!(parts.len(), 5, "the 5-point shape predictor's output is needed");
    const MEAN: [[f64; 2]; 5] = [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ];
    let from: Vec<[f64; 2]> = MEAN
        .iter()
        .map(|p| {
            let d = 2.0 * padding + 1.0;
            [(padding + p[0]) / d * size as f64, (padding + p[1]) / d * size as f64]
        })
        .collect();
    let to: Vec<[f64; 2]> = parts.iter().map(|p| [p[0] as f64, p[1] as f64]).collect();
    let (m, b) = find_similarity_transform(&from, &to);
    let angle = m[2].atan2(m[0]);
    let scale = m[0].hypot(m[2]);
    let half = [size as f64 / 2.0, size as f64 / 2.0];
    let cx = m[0] * half[0] + m[1] * half[1] + b[0];
    let cy = m[2] * half[0] + m[3] * half[1] + b[1];
    let w = size as f64 * scale - 1.0;
    let h = size as f64 * scale - 1.0;
    ChipDetails {
        rect: DRect { l: cx - w / 2.0, t: cy - h / 2.0, r: cx + w / 2.0, b: cy + h / 2.0 },
        angle,
        rows: size,
        cols: size,
    }
}

/// An owned RGB image (row-major HWC).
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// `pyramid_down<2>` on RGB → RGB (5×5 [1 4 6 4 1]² filter, u16 sums, truncating /256).
pub fn pyramid_down2(src: &Rgb) -> Rgb {
    let (nr, nc) = (src.height, src.width);
    if nr <= 8 || nc <= 8 {
        return Rgb { width: 0, height: 0, data: vec![] };
    }
    let tc = (nc - 3) / 2;
    let mut temp = vec![0u32; nr * tc * 3];
    for r in 0..nr {
        for c in 0..tc {
            let oc = 2 * c;
            for k in 0..3 {
                let px = |cc: usize| src.data[(r * nc + cc) * 3 + k] as u32;
                temp[(r * tc + c) * 3 + k] = px(oc) + 4 * px(oc + 1) + 6 * px(oc + 2) + 4 * px(oc + 3) + px(oc + 4);
            }
        }
    }
    let (dh, dw) = ((nr - 3) / 2, tc);
    let mut out = vec![0u8; dh * dw * 3];
    let mut dr = 0;
    let mut r = 2;
    while r + 2 < nr {
        for c in 0..tc {
            for k in 0..3 {
                let t = |rr: usize| temp[(rr * tc + c) * 3 + k];
                let s = t(r - 2) + 4 * t(r - 1) + 6 * t(r) + 4 * t(r + 1) + t(r + 2);
                // dlib stores the sum in a uint16 (max 16·16·255 = 65280: no wrap).
                out[(dr * dw + c) * 3 + k] = ((s & 0xffff) / 256) as u8;
            }
        }
        dr += 1;
        r += 2;
    }
    debug_assert_eq!(dr, dh);
    Rgb { width: dw, height: dh, data: out }
}

/// What both samplers take from dlib's `extract_image_chips` before sampling: the pyramid
/// depth and the source bounding box (`grow_rect` of the rotated chip rectangle, intersected
/// with the image, then `lround`).
struct SourceBox {
    depth: usize,
    l: i64,
    t: i64,
    r: i64,
    b: i64,
}

fn source_box(loc: &ChipDetails, width: usize, height: usize) -> SourceBox {
    let chip_size = (loc.rows * loc.cols) as f64;
    let mut depth = 0usize;
    let mut grow = 2.0;
    let mut rect = rect_down(loc.rect);
    while rect.area() > chip_size {
        rect = rect_down(rect);
        depth += 1;
        grow = grow * 2.0 + 2.0;
    }
    let cent = loc.rect.center();
    let (mut l, mut t, mut r, mut b) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    for p in loc.rect.corners() {
        let q = rotate_point(cent, p, loc.angle);
        l = l.min(q[0]);
        t = t.min(q[1]);
        r = r.max(q[0]);
        b = b.max(q[1]);
    }
    SourceBox {
        depth,
        l: (l - grow).max(0.0).round() as i64,
        t: (t - grow).max(0.0).round() as i64,
        r: (r + grow).min(width as f64 - 1.0).round() as i64,
        b: (b + grow).min(height as f64 - 1.0).round() as i64,
    }
}

/// Where both samplers read: the pyramid level (−1: the source box itself, `k`: the `k`-th
/// `pyramid_down<2>` of it; dlib steps down while the next level's rectangle is still larger
/// than the chip), and the chip's sampling grid in that level's coordinates — the sample point
/// of chip pixel (row r, col c) is `(m[0]·c + m[1]·r + tl[0], m[2]·c + m[3]·r + tl[1])`, the
/// `find_affine_transform` from the chip corners (0,0), (cols−1,0), (0,rows−1) onto the rotated
/// rectangle's. Returns (level, tl, m).
fn sampling_grid(loc: &ChipDetails, bl: i64, bt: i64) -> (i64, [f64; 2], [f64; 4]) {
    let chip_size = (loc.rows * loc.cols) as f64;
    let mut level: i64 = -1;
    let mut rect = DRect {
        l: loc.rect.l - bl as f64,
        t: loc.rect.t - bt as f64,
        r: loc.rect.r - bl as f64,
        b: loc.rect.b - bt as f64,
    };
    while rect_down(rect).area() > chip_size {
        level += 1;
        rect = rect_down(rect);
    }
    let c = rect.center();
    let [tl, tr, bl_, _] = rect.corners().map(|p| rotate_point(c, p, loc.angle));
    let m = [
        (tr[0] - tl[0]) / (loc.cols as f64 - 1.0),
        (bl_[0] - tl[0]) / (loc.rows as f64 - 1.0),
        (tr[1] - tl[1]) / (loc.cols as f64 - 1.0),
        (bl_[1] - tl[1]) / (loc.rows as f64 - 1.0),
    ];
    (level, tl, m)
}

/// `extract_image_chip(img, location, chip)` with `interpolate_bilinear` (the rotated/scaled
/// path; dlib's exact-copy fast path for axis-aligned unscaled chips is not needed here).
pub fn extract_image_chip(img: &RgbImage, loc: &ChipDetails) -> Rgb {
    let SourceBox { depth, l: bl, t: bt, r: br, b: bb } = source_box(loc, img.width, img.height);
    let (bw, bh) = ((br - bl + 1).max(0) as usize, (bb - bt + 1).max(0) as usize);
    let mut sub = Rgb { width: bw, height: bh, data: vec![0; bw * bh * 3] };
    for y in 0..bh {
        let s = ((bt as usize + y) * img.width + bl as usize) * 3;
        sub.data[y * bw * 3..(y + 1) * bw * 3].copy_from_slice(&img.data[s..s + bw * 3]);
    }
    let mut levels: Vec<Rgb> = Vec::with_capacity(depth);
    for i in 0..depth {
        let next = pyramid_down2(if i == 0 { &sub } else { &levels[i - 1] });
        levels.push(next);
    }
    let (level, tl, m) = sampling_grid(loc, bl, bt);
    let src = if level < 0 { &sub } else { &levels[level as usize] };
    let mut out = vec![0u8; loc.rows * loc.cols * 3];
    for rr in 0..loc.rows {
        for cc in 0..loc.cols {
            let x = m[0] * cc as f64 + m[1] * rr as f64 + tl[0];
            let y = m[2] * cc as f64 + m[3] * rr as f64 + tl[1];
            let left = x.floor() as i64;
            let top = y.floor() as i64;
            if !(left >= 0 && top >= 0 && left + 1 < src.width as i64 && top + 1 < src.height as i64) {
                continue;
            }
            let lr = x - left as f64;
            let tb = y - top as f64;
            let (left, top) = (left as usize, top as usize);
            let px = |yy: usize, xx: usize, k: usize| src.data[(yy * src.width + xx) * 3 + k] as f64;
            for k in 0..3 {
                let v = (1.0 - tb) * ((1.0 - lr) * px(top, left, k) + lr * px(top, left + 1, k))
                    + tb * ((1.0 - lr) * px(top + 1, left, k) + lr * px(top + 1, left + 1, k));
                out[(rr * loc.cols + cc) * 3 + k] = v as u8;
            }
        }
    }
    Rgb { width: loc.cols, height: loc.rows, data: out }
}

/// dlib's `get_face_chip(img, shape, size, padding)`.
pub fn get_face_chip(img: &RgbImage, parts: &[[i64; 2]], size: usize, padding: f64) -> Rgb {
    extract_image_chip(img, &get_face_chip_details(parts, size, padding))
}

/// The float, differentiable twin of [`extract_image_chip`] in tch: `img` is one image
/// `[3, H, W]` (any float kind, values on dlib's 0..255 scale, may require grad); the result is
/// the `[3, rows, cols]` chip. Same geometry as [`extract_image_chip`] (bounding box, pyramid
/// depth and level, sampling points), but without any rounding: each `pyramid_down<2>` level is
/// the fixed 5×5 `[1 4 6 4 1]²/256` filter applied as a depthwise `conv2d` with stride 2 (no
/// padding: exactly dlib's output size and alignment), and the final bilinear sample is
/// `grid_sample` (bilinear, zeros, `align_corners = true`) at dlib's points, masked to zero
/// where dlib writes zero (a 2×2 neighbourhood not fully inside the level).
pub fn extract_image_chip_tch(img: &tch::Tensor, loc: &ChipDetails) -> Result<tch::Tensor, String> {
    use tch::Tensor;
    let s = img.size();
    if s.len() != 3 || s[0] != 3 {
        return Err(format!("extract_image_chip_tch: image {s:?} is not [3, H, W]"));
    }
    let (height, width) = (s[1] as usize, s[2] as usize);
    let kind = img.kind();
    let dev = img.device();
    let SourceBox { l: bl, t: bt, r: br, b: bb, .. } = source_box(loc, width, height);
    let (bw, bh) = ((br - bl + 1).max(0), (bb - bt + 1).max(0));
    let zeros = || Tensor::zeros([3, loc.rows as i64, loc.cols as i64], (kind, dev));
    if bw == 0 || bh == 0 {
        return Ok(zeros() * img.sum(kind));
    }
    let (level, tl, m) = sampling_grid(loc, bl, bt);
    // Only the levels up to the one sampled are needed (dlib computes a few more, unused).
    let need = (level + 1).max(0) as usize;
    let mut src = img.narrow(1, bt, bh).narrow(2, bl, bw).unsqueeze(0);
    let k1 = [1.0f64, 4.0, 6.0, 4.0, 1.0];
    let kern: Vec<f64> = (0..25).map(|i| k1[i / 5] * k1[i % 5] / 256.0).collect();
    let kern = Tensor::from_slice(&kern).reshape([1, 1, 5, 5]).repeat([3, 1, 1, 1]).to_kind(kind).to_device(dev);
    for _ in 0..need {
        let sz = src.size();
        if sz[2] <= 8 || sz[3] <= 8 {
            return Ok(zeros() * img.sum(kind));
        }
        src = src.conv2d(&kern, None::<&Tensor>, [2, 2], [0, 0], [1, 1], 3);
    }
    let sz = src.size();
    let (sh, sw) = (sz[2], sz[3]);
    let n = loc.rows * loc.cols;
    let mut grid = Vec::with_capacity(2 * n);
    let mut mask = Vec::with_capacity(n);
    for rr in 0..loc.rows {
        for cc in 0..loc.cols {
            let x = m[0] * cc as f64 + m[1] * rr as f64 + tl[0];
            let y = m[2] * cc as f64 + m[3] * rr as f64 + tl[1];
            let (left, top) = (x.floor() as i64, y.floor() as i64);
            let inside = left >= 0 && top >= 0 && left + 1 < sw && top + 1 < sh;
            mask.push(if inside { 1.0f64 } else { 0.0 });
            // align_corners = true: pixel i ↔ −1 + 2i/(size − 1).
            grid.push(if sw > 1 { 2.0 * x / (sw - 1) as f64 - 1.0 } else { 0.0 });
            grid.push(if sh > 1 { 2.0 * y / (sh - 1) as f64 - 1.0 } else { 0.0 });
        }
    }
    let (rows, cols) = (loc.rows as i64, loc.cols as i64);
    let grid = Tensor::from_slice(&grid).reshape([1, rows, cols, 2]).to_kind(kind).to_device(dev);
    let mask = Tensor::from_slice(&mask).reshape([1, 1, rows, cols]).to_kind(kind).to_device(dev);
    // interpolation 0 = bilinear, padding 0 = zeros.
    let out = src.f_grid_sampler(&grid, 0, 0, true).map_err(|e| format!("extract_image_chip_tch: grid_sample: {e}"))?;
    Ok((out * mask).squeeze_dim(0))
}
