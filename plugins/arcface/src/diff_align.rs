//! The differentiable face alignment: 112×112 (or any size) crops sampled from the input pixels
//! with `grid_sample` (bilinear, zero padding, `align_corners = true`), from similarity
//! matrices found **without** gradient (SCRFD landmarks → [`crate::align::estimate_norm`]).
//! Gradients flow from the crops to the pixels; the matrices are constants.
//!
//! The sampling grid is [`crate::align::grid_sample_theta`]'s: `affine_grid(θ, align_corners =
//! true)` with θ = `N_src · M⁻¹ · N_dst⁻¹`, so each crop equals
//! [`crate::align::warp_affine_chw_f32`] (the plain-float reference of OpenCV's warp) up to
//! float rounding. The grid is built in f64 and cast to the pixels' kind.

use tch::{Kind, Tensor};

use crate::align::{grid_sample_theta, Affine};

/// `[N, 2, 3]` θ matrices (f64, CPU) for sources of `w × h` and `out × out` crops.
pub fn thetas(ms: &[Affine], w: usize, h: usize, out_w: usize, out_h: usize) -> Tensor {
    let mut v = Vec::with_capacity(ms.len() * 6);
    for m in ms {
        let th = grid_sample_theta(m, w, h, out_w, out_h);
        v.extend_from_slice(&th[0]);
        v.extend_from_slice(&th[1]);
    }
    Tensor::from_slice(&v).reshape([ms.len() as i64, 2, 3])
}

/// Crops `[N, C, out_h, out_w]` from `pixels` (`[N, C, H, W]`, any float kind, may require
/// grad), crop `i` warped from image `i` by `ms[i]` (source → destination pixels).
pub fn align_crops(pixels: &Tensor, ms: &[Affine], out_w: usize, out_h: usize) -> Result<Tensor, String> {
    let s = pixels.size();
    if s.len() != 4 || s[0] as usize != ms.len() {
        return Err(format!("align_crops: pixels {s:?} must be [N, C, H, W] with N = {} matrices", ms.len()));
    }
    if s[2] < 2 || s[3] < 2 {
        return Err(format!("align_crops: image {}×{} is smaller than 2×2", s[3], s[2]));
    }
    let (h, w) = (s[2] as usize, s[3] as usize);
    let theta = thetas(ms, w, h, out_w, out_h);
    let grid =
        Tensor::f_affine_grid_generator(&theta, [ms.len() as i64, s[1], out_h as i64, out_w as i64].as_slice(), true)
            .map_err(|e| format!("align_crops: affine_grid: {e}"))?;
    let kind = match pixels.kind() {
        k @ (Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16) => k,
        _ => Kind::Float,
    };
    let grid = grid.to_kind(kind).to_device(pixels.device());
    // interpolation 0 = bilinear, padding 0 = zeros.
    pixels.to_kind(kind).f_grid_sampler(&grid, 0, 0, true).map_err(|e| format!("align_crops: grid_sample: {e}"))
}

/// Crops for faces that may share images: face `k` is `(image index, matrix)`; the images are
/// gathered (differentiably) from `pixels` `[B, C, H, W]`.
pub fn align_faces(pixels: &Tensor, faces: &[(usize, Affine)], out_w: usize, out_h: usize) -> Result<Tensor, String> {
    let b = pixels.size().first().copied().unwrap_or(0);
    if let Some((i, _)) = faces.iter().find(|(i, _)| *i as i64 >= b) {
        return Err(format!("align_faces: face of image {i}, but the batch has {b} images"));
    }
    let idx: Vec<i64> = faces.iter().map(|(i, _)| *i as i64).collect();
    let idx = Tensor::from_slice(&idx).to_device(pixels.device());
    let ms: Vec<Affine> = faces.iter().map(|(_, m)| *m).collect();
    align_crops(&pixels.index_select(0, &idx), &ms, out_w, out_h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::{estimate_norm, warp_affine_chw_f32, ARCFACE_DST};

    #[test]
    fn matches_float_warp_and_has_gradients() {
        let (c, h, w) = (3usize, 150usize, 130usize);
        // A smooth-plus-edges image in [0, 1].
        let src: Vec<f32> = (0..c * h * w)
            .map(|i| {
                let (k, y, x) = (i / (h * w), (i / w) % h, i % w);
                (0.5 + 0.4 * ((x as f32 * 0.13 + k as f32).sin() * (y as f32 * 0.07).cos()))
                    * if (x / 9 + y / 11) % 2 == 0 { 1.0 } else { 0.8 }
            })
            .collect();
        // Landmarks: the template scaled/rotated/shifted, partly off the image for the border.
        let mut lmks = Vec::new();
        for (s, r, tx, ty) in [(1.1f32, 0.15f32, 10.0f32, 20.0f32), (0.7, -0.3, -25.0, 40.0)] {
            let l: [[f32; 2]; 5] = std::array::from_fn(|i| {
                let [x, y] = ARCFACE_DST[i];
                [s * (r.cos() * x - r.sin() * y) + tx, s * (r.sin() * x + r.cos() * y) + ty]
            });
            lmks.push(estimate_norm(&l, 112).unwrap());
        }
        let px = Tensor::from_slice(&src)
            .reshape([1, c as i64, h as i64, w as i64])
            .repeat([2, 1, 1, 1])
            .set_requires_grad(true);
        let crops = align_crops(&px, &lmks, 112, 112).unwrap();
        let mut max = 0f32;
        for (i, m) in lmks.iter().enumerate() {
            let want = warp_affine_chw_f32(&src, c, h, w, m, 112, 112);
            let got: Vec<f32> = Vec::try_from(crops.get(i as i64).flatten(0, -1)).unwrap();
            for (a, b) in got.iter().zip(&want) {
                max = max.max((a - b).abs());
            }
        }
        // Both bilinear in f32 with no reductions: the sampling points differ by a few ulps of
        // coordinates ≤ 150 px (ulp 1.5e-5 px) times the image's steepest slope (its checker
        // edges, ≈ 0.2 per px) ≈ 1e-5, plus value rounding ≈ u. 1e-4 on [0, 1] images.
        assert!(max <= 1e-4, "grid_sample crop vs warp_affine_chw_f32: max |diff| {max}");
        crops.sum(Kind::Float).backward();
        let g = px.grad();
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
