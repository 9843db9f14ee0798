//! 5-point face alignment as `insightface/utils/face_align.py` (insightface 0.7.3) does it:
//! `estimate_norm` (skimage's Umeyama similarity fit to the ArcFace template) and `norm_crop`
//! (`cv2.warpAffine(img, M, (112, 112), borderValue=0.0)`, bilinear).
//!
//! Matrices are `[[a, b, tx], [c, d, ty]]` mapping source pixels to crop pixels, pixel centres
//! at integer coordinates (OpenCV's convention).

/// `face_align.arcface_dst`: the 112×112 ArcFace template (left eye, right eye, nose, left and
/// right mouth corners), `float32` in the reference.
pub const ARCFACE_DST: [[f32; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// A 2×3 affine matrix (source → destination).
pub type Affine = [[f64; 3]; 2];

/// The template for an `image_size` crop as `estimate_norm` scales it (`mode='arcface'`):
/// multiples of 112 scale it, multiples of 128 scale it by `size/128` and shift x by `8·ratio`.
pub fn template(image_size: usize) -> Result<[[f32; 2]; 5], String> {
    let (ratio, diff_x) = if image_size.is_multiple_of(112) {
        (image_size as f64 / 112.0, 0.0f64)
    } else if image_size.is_multiple_of(128) {
        let r = image_size as f64 / 128.0;
        (r, 8.0 * r)
    } else {
        return Err(format!("alignment crop size {image_size} is not a multiple of 112 or 128"));
    };
    // `arcface_dst * ratio` (float32 × Python float → float32), then `dst[:,0] += diff_x`.
    let (ratio, diff_x) = (ratio as f32, diff_x as f32);
    let mut dst = ARCFACE_DST;
    for p in &mut dst {
        p[0] = p[0] * ratio + diff_x;
        p[1] *= ratio;
    }
    Ok(dst)
}

/// The mean over 5 points as NumPy computes it for `float32` (sequential `float32` sum, then
/// division by 5 in `float32`).
fn mean_f32(p: &[[f32; 2]; 5]) -> [f32; 2] {
    let mut s = [0f32; 2];
    for q in p {
        s[0] += q[0];
        s[1] += q[1];
    }
    [s[0] / 5.0, s[1] / 5.0]
}

/// The rotation and `S @ d` of Umeyama's SVD step for a 2×2 cross-covariance `A`, in closed
/// form: the proper rotation maximising `tr(Rᵀ A)` is the rotation by `atan2(c − b, a + d)`, and
/// `S @ d` (with `d = [1, −1]` when `det A < 0`) equals `2·√(p² + q²)` in both cases.
/// Returns `(cos, sin, S1, S2, det_negative)`.
fn umeyama_2x2(a: [[f64; 2]; 2]) -> (f64, f64, f64, f64, bool) {
    let p = (a[0][0] + a[1][1]) / 2.0;
    let q = (a[1][0] - a[0][1]) / 2.0;
    let r = (a[0][0] - a[1][1]) / 2.0;
    let s = (a[0][1] + a[1][0]) / 2.0;
    let n1 = p.hypot(q);
    let n2 = r.hypot(s);
    let (c, sn) = if n1 > 0.0 { (p / n1, q / n1) } else { (1.0, 0.0) };
    let det_neg = a[0][0] * a[1][1] - a[0][1] * a[1][0] < 0.0;
    (c, sn, n1 + n2, (n1 - n2).abs(), det_neg)
}

/// `skimage.transform.SimilarityTransform().estimate(src, dst)` (Umeyama with scale) followed
/// by `params[0:2, :]`, for `float32` landmarks and a `float32` template — the dtypes
/// insightface passes (the detector's key points are `float32`), so the means, the centred
/// points, the cross-covariance and the variance are `float32` as in NumPy, and the rest `f64`.
///
/// The reference's SVD runs in LAPACK's `float32`; here the same 2×2 problem is solved in
/// closed form in `f64`, which agrees to about 1e-6 relative.
pub fn umeyama_f32(src: &[[f32; 2]; 5], dst: &[[f32; 2]; 5]) -> Affine {
    let sm = mean_f32(src);
    let dm = mean_f32(dst);
    let sd: Vec<[f32; 2]> = src.iter().map(|p| [p[0] - sm[0], p[1] - sm[1]]).collect();
    let dd: Vec<[f32; 2]> = dst.iter().map(|p| [p[0] - dm[0], p[1] - dm[1]]).collect();
    // A = dst_demean.T @ src_demean / num, float32 (accumulated in f64, rounded once).
    let mut a = [[0f64; 2]; 2];
    for r in 0..2 {
        for c in 0..2 {
            let acc: f64 = (0..5).map(|i| dd[i][r] as f64 * sd[i][c] as f64).sum();
            a[r][c] = ((acc as f32) / 5.0) as f64;
        }
    }
    let (cs, sn, s1, s2, det_neg) = umeyama_2x2(a);
    let sdotd = s1 as f32 as f64 + if det_neg { -(s2 as f32 as f64) } else { s2 as f32 as f64 };
    // src_demean.var(axis=0).sum() in float32; `1.0 / float32` stays float32.
    let mut var_sum = 0f32;
    for c in 0..2 {
        let m = (((sd[0][c] + sd[1][c]) + sd[2][c]) + sd[3][c] + sd[4][c]) / 5.0;
        let mut v = 0f32;
        for p in &sd {
            let x = p[c] - m;
            v += x * x;
        }
        var_sum += v / 5.0;
    }
    let scale = (1.0f32 / var_sum) as f64 * sdotd;
    finish(cs, sn, scale, [sm[0] as f64, sm[1] as f64], [dm[0] as f64, dm[1] as f64])
}

/// As [`umeyama_f32`] for `float64` landmarks (a caller passing `np.float64` key points): the
/// landmark side is `f64` throughout; the template side keeps NumPy's `float32` mean.
pub fn umeyama_f64(src: &[[f64; 2]; 5], dst: &[[f32; 2]; 5]) -> Affine {
    let mut sm = [0f64; 2];
    for p in src {
        sm[0] += p[0];
        sm[1] += p[1];
    }
    sm = [sm[0] / 5.0, sm[1] / 5.0];
    let dm = mean_f32(dst);
    let sd: Vec<[f64; 2]> = src.iter().map(|p| [p[0] - sm[0], p[1] - sm[1]]).collect();
    let dd: Vec<[f32; 2]> = dst.iter().map(|p| [p[0] - dm[0], p[1] - dm[1]]).collect();
    let mut a = [[0f64; 2]; 2];
    for r in 0..2 {
        for c in 0..2 {
            a[r][c] = (0..5).map(|i| dd[i][r] as f64 * sd[i][c]).sum::<f64>() / 5.0;
        }
    }
    let (cs, sn, s1, s2, det_neg) = umeyama_2x2(a);
    let sdotd = if det_neg { s1 - s2 } else { s1 + s2 };
    let mut var_sum = 0f64;
    for c in 0..2 {
        let m = sd.iter().map(|p| p[c]).sum::<f64>() / 5.0;
        var_sum += sd.iter().map(|p| (p[c] - m) * (p[c] - m)).sum::<f64>() / 5.0;
    }
    let scale = 1.0 / var_sum * sdotd;
    finish(cs, sn, scale, sm, [dm[0] as f64, dm[1] as f64])
}

fn finish(cs: f64, sn: f64, scale: f64, sm: [f64; 2], dm: [f64; 2]) -> Affine {
    // T[:2, 2] = dst_mean − scale·(R @ src_mean); T[:2, :2] *= scale.
    let tx = dm[0] - scale * (cs * sm[0] - sn * sm[1]);
    let ty = dm[1] - scale * (sn * sm[0] + cs * sm[1]);
    [[cs * scale, -sn * scale, tx], [sn * scale, cs * scale, ty]]
}

/// `face_align.estimate_norm(lmk, image_size)` for `float32` key points (the detector's).
pub fn estimate_norm(lmk: &[[f32; 2]; 5], image_size: usize) -> Result<Affine, String> {
    Ok(umeyama_f32(lmk, &template(image_size)?))
}

/// `face_align.estimate_norm` for `float64` key points.
pub fn estimate_norm_f64(lmk: &[[f64; 2]; 5], image_size: usize) -> Result<Affine, String> {
    Ok(umeyama_f64(lmk, &template(image_size)?))
}

/// The inverse of an affine map, as OpenCV's `invertAffineTransform` computes it.
pub fn invert_affine(m: &Affine) -> Affine {
    let d = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let a11 = m[1][1] * d;
    let a22 = m[0][0] * d;
    let a12 = -m[0][1] * d;
    let a21 = -m[1][0] * d;
    let b1 = -a11 * m[0][2] - a12 * m[1][2];
    let b2 = -a21 * m[0][2] - a22 * m[1][2];
    [[a11, a12, b1], [a21, a22, b2]]
}

/// Which OpenCV `warpAffine(INTER_LINEAR)` arithmetic to reproduce for `u8` images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WarpKernel {
    /// OpenCV ≥ 4.11 / 5.x (`warp_kernels.simd.hpp`): source coordinates and interpolation in
    /// `float32`, rounded to nearest (the `opencv-python-headless` that installs with
    /// insightface 0.7.3 today).
    #[default]
    OpenCvFloat,
    /// OpenCV ≤ 4.10: coordinates in 10-bit fixed point, 5-bit (1/32 pixel) sub-pixel tables,
    /// 15-bit integer weights.
    OpenCvFixedPoint,
}

/// `cv2.warpAffine(img, m, (out_w, out_h), flags=INTER_LINEAR, borderValue=0)` on an
/// interleaved `u8` image of `c` channels (`m` maps source to destination).
// The arguments are cv2.warpAffine's, one for one.
#[allow(clippy::too_many_arguments)]
pub fn warp_affine_u8(
    src: &[u8],
    w: usize,
    h: usize,
    c: usize,
    m: &Affine,
    out_w: usize,
    out_h: usize,
    kernel: WarpKernel,
) -> Vec<u8> {
    assert_eq!(src.len(), w * h * c, "warp: buffer is not {w}x{h}x{c}");
    let inv = invert_affine(m);
    let mut dst = vec![0u8; out_w * out_h * c];
    let (wi, hi) = (w as i64, h as i64);
    let px = |x: i64, y: i64, k: usize| -> i32 {
        if x >= 0 && y >= 0 && x < wi && y < hi {
            src[(y as usize * w + x as usize) * c + k] as i32
        } else {
            0
        }
    };
    match kernel {
        WarpKernel::OpenCvFloat => {
            let m0 = inv[0][0] as f32;
            let m3 = inv[1][0] as f32;
            for y in 0..out_h {
                let mx = (y as f64 * inv[0][1] + inv[0][2]) as f32;
                let my = (y as f64 * inv[1][1] + inv[1][2]) as f32;
                for x in 0..out_w {
                    let sx = m0.mul_add(x as f32, mx);
                    let sy = m3.mul_add(x as f32, my);
                    let ix = sx.floor();
                    let iy = sy.floor();
                    let (ax, ay) = (sx - ix, sy - iy);
                    let (ix, iy) = (ix as i64, iy as i64);
                    let out = &mut dst[(y * out_w + x) * c..(y * out_w + x + 1) * c];
                    if ix + 1 < 0 || ix >= wi || iy + 1 < 0 || iy >= hi {
                        out.fill(0);
                        continue;
                    }
                    for (k, o) in out.iter_mut().enumerate() {
                        let p00 = px(ix, iy, k) as f32;
                        let p01 = px(ix + 1, iy, k) as f32;
                        let p10 = px(ix, iy + 1, k) as f32;
                        let p11 = px(ix + 1, iy + 1, k) as f32;
                        let v0 = ax.mul_add(p01 - p00, p00);
                        let v1 = ax.mul_add(p11 - p10, p10);
                        let v = ay.mul_add(v1 - v0, v0);
                        *o = v.round_ties_even().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
        WarpKernel::OpenCvFixedPoint => {
            const AB_BITS: i32 = 10;
            const AB_SCALE: f64 = (1 << AB_BITS) as f64;
            const INTER_BITS: i32 = 5;
            const TAB: i32 = 1 << INTER_BITS;
            const ROUND_DELTA: i64 = (1 << AB_BITS) / TAB as i64 / 2;
            let rnd = |v: f64| v.round_ties_even() as i64;
            let adelta: Vec<i64> = (0..out_w).map(|x| rnd(inv[0][0] * x as f64 * AB_SCALE)).collect();
            let bdelta: Vec<i64> = (0..out_w).map(|x| rnd(inv[1][0] * x as f64 * AB_SCALE)).collect();
            for y in 0..out_h {
                let x0 = rnd((inv[0][1] * y as f64 + inv[0][2]) * AB_SCALE) + ROUND_DELTA;
                let y0 = rnd((inv[1][1] * y as f64 + inv[1][2]) * AB_SCALE) + ROUND_DELTA;
                for x in 0..out_w {
                    let xx = (x0 + adelta[x]) >> (AB_BITS - INTER_BITS);
                    let yy = (y0 + bdelta[x]) >> (AB_BITS - INTER_BITS);
                    let (ix, iy) = (xx >> INTER_BITS, yy >> INTER_BITS);
                    let (fx, fy) = ((xx & (TAB as i64 - 1)) as i32, (yy & (TAB as i64 - 1)) as i32);
                    // Weights (1−fx)(1−fy)·2^15 … are exact integers for 1/32 steps.
                    let w00 = (TAB - fx) * (TAB - fy) * 32;
                    let w01 = fx * (TAB - fy) * 32;
                    let w10 = (TAB - fx) * fy * 32;
                    let w11 = fx * fy * 32;
                    let out = &mut dst[(y * out_w + x) * c..(y * out_w + x + 1) * c];
                    if ix >= wi || ix + 1 < 0 || iy >= hi || iy + 1 < 0 {
                        out.fill(0);
                        continue;
                    }
                    for (k, o) in out.iter_mut().enumerate() {
                        let v = px(ix, iy, k) * w00
                            + px(ix + 1, iy, k) * w01
                            + px(ix, iy + 1, k) * w10
                            + px(ix + 1, iy + 1, k) * w11;
                        *o = ((v + (1 << 14)) >> 15).clamp(0, 255) as u8;
                    }
                }
            }
        }
    }
    dst
}

/// `face_align.norm_crop(img, landmark, image_size)` on an interleaved `u8` image: the crop and
/// the matrix used.
pub fn norm_crop_u8(
    img: &[u8],
    w: usize,
    h: usize,
    c: usize,
    lmk: &[[f32; 2]; 5],
    image_size: usize,
    kernel: WarpKernel,
) -> Result<(Vec<u8>, Affine), String> {
    let m = estimate_norm(lmk, image_size)?;
    Ok((warp_affine_u8(img, w, h, c, &m, image_size, image_size, kernel), m))
}

/// Bilinear warp of a planar `f32` image (`[C, H, W]`, row-major) by `m` (source → destination)
/// into `[C, out_h, out_w]`, zero outside the source: each output pixel samples the source at
/// `m⁻¹·(x, y)` and weights its four neighbours, a neighbour outside the image contributing 0.
/// This is the continuous function the `u8` OpenCV kernels round, and what
/// `torch.nn.functional.grid_sample(…, mode='bilinear', padding_mode='zeros',
/// align_corners=True)` computes with [`grid_sample_theta`].
pub fn warp_affine_chw_f32(
    src: &[f32],
    c: usize,
    h: usize,
    w: usize,
    m: &Affine,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    assert_eq!(src.len(), c * h * w, "warp: buffer is not {c}x{h}x{w}");
    let inv = invert_affine(m);
    let mut dst = vec![0f32; c * out_h * out_w];
    let (wi, hi) = (w as i64, h as i64);
    for y in 0..out_h {
        for x in 0..out_w {
            let sx = inv[0][0] * x as f64 + inv[0][1] * y as f64 + inv[0][2];
            let sy = inv[1][0] * x as f64 + inv[1][1] * y as f64 + inv[1][2];
            let (fx, fy) = (sx.floor(), sy.floor());
            let (ax, ay) = ((sx - fx) as f32, (sy - fy) as f32);
            let (ix, iy) = (fx as i64, fy as i64);
            let taps = [
                (ix, iy, (1.0 - ax) * (1.0 - ay)),
                (ix + 1, iy, ax * (1.0 - ay)),
                (ix, iy + 1, (1.0 - ax) * ay),
                (ix + 1, iy + 1, ax * ay),
            ];
            for k in 0..c {
                let plane = &src[k * h * w..(k + 1) * h * w];
                let mut v = 0f32;
                for &(tx, ty, wt) in &taps {
                    if tx >= 0 && ty >= 0 && tx < wi && ty < hi {
                        v += wt * plane[ty as usize * w + tx as usize];
                    }
                }
                dst[k * out_h * out_w + y * out_w + x] = v;
            }
        }
    }
    dst
}

/// The `theta` (2×3, row-major) for `torch.nn.functional.affine_grid(theta, [N, C, out_h,
/// out_w], align_corners=True)` + `grid_sample(…, align_corners=True)` that reproduces the warp
/// by `m` (source → destination pixels) of a `w × h` source: `N_src · m⁻¹ · N_dst⁻¹`, with
/// `N(x) = 2x/(size − 1) − 1` the pixel-to-normalised map.
pub fn grid_sample_theta(m: &Affine, w: usize, h: usize, out_w: usize, out_h: usize) -> [[f64; 3]; 2] {
    let inv = invert_affine(m);
    // Destination normalised u → pixel x = (u + 1)(out_w − 1)/2.
    let (dx, dy) = ((out_w as f64 - 1.0) / 2.0, (out_h as f64 - 1.0) / 2.0);
    // Source pixel X → normalised 2X/(w − 1) − 1.
    let (sx, sy) = (2.0 / (w as f64 - 1.0), 2.0 / (h as f64 - 1.0));
    let row = |r: usize, s: f64| -> [f64; 3] {
        let (a, b, t) = (inv[r][0], inv[r][1], inv[r][2]);
        // pixel = a·dx(u+1) + b·dy(v+1) + t
        [s * a * dx, s * b * dy, s * (a * dx + b * dy + t) - 1.0]
    };
    [row(0, sx), row(1, sy)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_maps_to_itself() {
        let m = estimate_norm(&ARCFACE_DST, 112).unwrap();
        // f32 landmarks (skimage's float32 path): the linear part to a few u (6e-8 relative),
        // the translation = mean(dst) − M·mean(src) to that times the coordinates (≤ 112 px).
        // Scalar Rust: the same bits on every CPU.
        assert!((m[0][0] - 1.0).abs() < 1e-6 && m[0][1].abs() < 1e-6 && m[0][2].abs() < 1e-4, "{m:?}");
        let t = template(128).unwrap();
        assert!((t[0][0] - (38.2946 * 128.0 / 112.0 * 0.0 + 38.2946 + 8.0)).abs() < 1e-4);
        assert!(template(100).is_err());
    }

    #[test]
    fn similarity_is_recovered() {
        // Known similarity: scale 0.7, rotation 0.2 rad, translation (−30, −40), inverted onto src.
        let (s, th) = (0.7f64, 0.2f64);
        let m: Affine = [[s * th.cos(), -s * th.sin(), -30.0], [s * th.sin(), s * th.cos(), -40.0]];
        let inv = invert_affine(&m);
        let src: Vec<[f64; 2]> = ARCFACE_DST
            .iter()
            .map(|p| {
                let (x, y) = (p[0] as f64, p[1] as f64);
                [inv[0][0] * x + inv[0][1] * y + inv[0][2], inv[1][0] * x + inv[1][1] * y + inv[1][2]]
            })
            .collect();
        let src: [[f64; 2]; 5] = src.try_into().unwrap();
        let got = estimate_norm_f64(&src, 112).unwrap();
        // f64 Umeyama on exact data: ~1e-13 in practice; 1e-5 is a loose algorithm check (a
        // wrong rotation sign or scale is O(1)), and f64 scalar Rust is the same on every CPU.
        for r in 0..2 {
            for c in 0..3 {
                assert!((got[r][c] - m[r][c]).abs() < 1e-5, "{got:?} vs {m:?}");
            }
        }
    }

    #[test]
    fn float_warp_matches_grid_theta_identity() {
        let m: Affine = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let th = grid_sample_theta(&m, 10, 10, 10, 10);
        // The identity in f64: exact up to ulps.
        assert!((th[0][0] - 1.0).abs() < 1e-12 && th[0][2].abs() < 1e-12 && (th[1][1] - 1.0).abs() < 1e-12);
        let src: Vec<f32> = (0..100).map(|v| v as f32).collect();
        assert_eq!(warp_affine_chw_f32(&src, 1, 10, 10, &m, 10, 10), src);
    }
}
