//! Loss plugin `pixel`: weighted L1, MSE and SSIM between a predicted and a target image,
//! with analytic gradients for the prediction. Pure Rust, CPU, computed in f64 internally.
//!
//! ```text
//! total = l1 · mean|p − t| + mse · mean((p − t)²) + ssim · (1 − mean SSIM(p, t))
//! ```
//!
//! SSIM follows Wang et al. (2004) exactly as `pytorch_msssim.ssim(data_range=1,
//! size_average=True, win_size=11, win_sigma=1.5)` computes it: a normalised separable Gaussian
//! window (11 taps, σ = 1.5), "valid" filtering (no padding), C1 = 0.01², C2 = 0.03², computed
//! per channel and averaged over every valid position, channel and batch item.
//!
//! # Gradient of SSIM
//! With `W` the valid 2-D Gaussian correlation and, per position p of the SSIM map,
//! ```text
//! μx = W x, μy = W y, σxx = W(x²) − μx², σyy = W(y²) − μy², σxy = W(xy) − μx μy
//! S  = A · B,  A = (2 μx μy + C1) / (μx² + μy² + C1) = N1/D1,
//!              B = (2 σxy + C2) / (σxx + σyy + C2)   = N2/D2
//! ```
//! the partial derivatives at each position are
//! ```text
//! α = ∂S/∂μx  = B · (2 μy − 2 μx A) / D1
//! β = ∂S/∂σxx = −A · B / D2
//! γ = ∂S/∂σxy = 2 A / D2
//! ```
//! and, since ∂μx(p)/∂x(q) = w(q−p), ∂σxx(p)/∂x(q) = 2 w(q−p)(x(q) − μx(p)) and
//! ∂σxy(p)/∂x(q) = w(q−p)(y(q) − μy(p)),
//! ```text
//! ∂ΣS/∂x = Wᵀ(α − 2 β μx − γ μy) + 2 x ⊙ Wᵀβ + y ⊙ Wᵀγ
//! ```
//! where `Wᵀ` is the adjoint of the valid correlation (a "full" scatter back onto the image).

use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, Inputs, LossOutput, LossPlugin,
    PluginDescriptor, PluginKind,
};
use serde::Deserialize;

/// Plugin id users type.
pub const ID: &str = "pixel";
/// Gaussian window size of SSIM.
pub const WIN_SIZE: usize = 11;
/// Gaussian window σ of SSIM.
pub const WIN_SIGMA: f64 = 1.5;
/// SSIM stabilisers for data range 1: (K1·L)², (K2·L)².
pub const C1: f64 = 0.01 * 0.01;
pub const C2: f64 = 0.03 * 0.03;

/// Names of the inputs, in order; gradients are returned for the first only.
pub const INPUT_NAMES: [&str; 2] = ["prediction", "target"];

/// Component weights — the plugin's whole config (`{"l1": 1.0, "mse": 0.0, "ssim": 0.0}`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Weight of mean |p − t|.
    pub l1: f64,
    /// Weight of mean (p − t)².
    pub mse: f64,
    /// Weight of 1 − mean SSIM(p, t).
    pub ssim: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { l1: 1.0, mse: 0.0, ssim: 0.0 }
    }
}

impl Weights {
    /// Rejects negative or non-finite weights and an all-zero config.
    pub fn validate(&self) -> likeness_sdk::Result<()> {
        for (name, w) in [("l1", self.l1), ("mse", self.mse), ("ssim", self.ssim)] {
            if !w.is_finite() || w < 0.0 {
                return Err(err::config(format!(
                    "config of plugin `{ID}`: weight `{name}` must be a finite number ≥ 0, got {w}"
                )));
            }
        }
        if self.l1 == 0.0 && self.mse == 0.0 && self.ssim == 0.0 {
            return Err(err::config(format!(
                "config of plugin `{ID}`: all weights (l1, mse, ssim) are 0; set at least one above 0"
            )));
        }
        Ok(())
    }
}

/// JSON Schema (draft 2020-12) of the config.
pub fn config_schema() -> serde_json::Value {
    let weight = |default: f64, what: &str| {
        serde_json::json!({
            "type": "number",
            "minimum": 0,
            "default": default,
            "description": what,
        })
    };
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pixel loss",
        "description": "total = l1·mean|p−t| + mse·mean((p−t)²) + ssim·(1 − mean SSIM); at least one weight must be > 0",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "l1": weight(1.0, "weight of the mean absolute error"),
            "mse": weight(0.0, "weight of the mean squared error"),
            "ssim": weight(0.0, "weight of 1 − mean SSIM (Gaussian window 11, σ 1.5, data range 1, valid filtering); needs H, W ≥ 11"),
        },
    })
}

/// What [`compute`] returns: `(value, terms, grad)`.
pub type Computed = (f64, Vec<(String, f64)>, Option<CpuTensor>);

/// The loss value, its logged components and dL/d(prediction).
///
/// `terms` holds, for each component with a weight > 0, its **unweighted** value: `l1` (mean
/// absolute error), `mse` (mean squared error) and `ssim` (mean SSIM index — a similarity,
/// 1 for identical images). `grad` has the prediction's shape and is `Some` iff `want_grad`.
///
/// Both tensors must be f32 NCHW `[B, C, H, W]` of the same shape; with `ssim > 0`, `H` and
/// `W` must be at least 11.
pub fn compute(
    weights: Weights,
    prediction: &CpuTensor,
    target: &CpuTensor,
    want_grad: bool,
) -> likeness_sdk::Result<Computed> {
    check_shapes(&weights, &prediction.shape, &target.shape)?;
    let p: Vec<f64> = prediction.data.iter().map(|&v| v as f64).collect();
    let t: Vec<f64> = target.data.iter().map(|&v| v as f64).collect();
    let dims = [prediction.shape[0], prediction.shape[1], prediction.shape[2], prediction.shape[3]].map(|d| d as usize);
    let out = compute_f64(&weights, dims, &p, &t, want_grad);
    let grad = out.grad.map(|g| CpuTensor::new(prediction.shape.clone(), g.into_iter().map(|v| v as f32).collect()));
    Ok((out.value, out.terms, grad))
}

/// Shape checks with messages that name the inputs and their shapes.
pub fn check_shapes(weights: &Weights, prediction: &[i64], target: &[i64]) -> likeness_sdk::Result<()> {
    for (name, shape) in [("prediction", prediction), ("target", target)] {
        if shape.len() != 4 {
            return Err(err::input(format!(
                "loss `{ID}`: input `{name}` must be 4-D NCHW [B, C, H, W], got shape {shape:?}"
            )));
        }
    }
    if prediction != target {
        return Err(err::input(format!(
            "loss `{ID}`: inputs `prediction` {prediction:?} and `target` {target:?} must have the same shape"
        )));
    }
    if prediction.iter().any(|&d| d <= 0) {
        return Err(err::input(format!("loss `{ID}`: input `prediction` has an empty shape {prediction:?}")));
    }
    if weights.ssim > 0.0 && (prediction[2] < WIN_SIZE as i64 || prediction[3] < WIN_SIZE as i64) {
        return Err(err::input(format!(
            "loss `{ID}`: SSIM needs H and W ≥ {WIN_SIZE} (its Gaussian window), but `prediction` and `target` have shape \
             {prediction:?}; use larger images or set \"ssim\": 0"
        )));
    }
    Ok(())
}

/// Result of [`compute_f64`].
#[derive(Debug, Clone)]
pub struct F64Output {
    pub value: f64,
    pub terms: Vec<(String, f64)>,
    pub grad: Option<Vec<f64>>,
}

/// The whole computation in f64 on row-major `[B, C, H, W]` buffers. Shapes must already be
/// checked ([`check_shapes`]).
pub fn compute_f64(weights: &Weights, dims: [usize; 4], p: &[f64], t: &[f64], want_grad: bool) -> F64Output {
    let [b, c, h, w] = dims;
    let n = p.len();
    assert_eq!(n, b * c * h * w);
    assert_eq!(t.len(), n);
    let inv_n = 1.0 / n as f64;
    let mut value = 0.0;
    let mut terms = Vec::new();
    let mut grad = if want_grad { Some(vec![0.0f64; n]) } else { None };

    if weights.l1 > 0.0 {
        let l1 = p.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f64>() * inv_n;
        value += weights.l1 * l1;
        terms.push(("l1".to_string(), l1));
        if let Some(g) = grad.as_mut() {
            let s = weights.l1 * inv_n;
            for ((gi, a), b) in g.iter_mut().zip(p).zip(t) {
                let d = a - b;
                // sign(d), 0 at 0 (torch's abs backward).
                *gi += if d > 0.0 {
                    s
                } else if d < 0.0 {
                    -s
                } else {
                    0.0
                };
            }
        }
    }

    if weights.mse > 0.0 {
        let mse = p.iter().zip(t).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() * inv_n;
        value += weights.mse * mse;
        terms.push(("mse".to_string(), mse));
        if let Some(g) = grad.as_mut() {
            let s = 2.0 * weights.mse * inv_n;
            for ((gi, a), b) in g.iter_mut().zip(p).zip(t) {
                *gi += s * (a - b);
            }
        }
    }

    if weights.ssim > 0.0 {
        let win = gaussian_window();
        let plane = h * w;
        let positions = (h - WIN_SIZE + 1) * (w - WIN_SIZE + 1);
        // mean over every valid position of every (batch, channel) plane.
        let inv_count = 1.0 / (positions * b * c) as f64;
        let mut sum = 0.0;
        for k in 0..b * c {
            let range = k * plane..(k + 1) * plane;
            let (s, g) = ssim_plane(&p[range.clone()], &t[range.clone()], h, w, &win, want_grad);
            sum += s;
            if let (Some(gout), Some(g)) = (grad.as_mut(), g) {
                // d/dx of ssim·(1 − ΣS·inv_count)
                let scale = -weights.ssim * inv_count;
                for (o, v) in gout[range].iter_mut().zip(g) {
                    *o += scale * v;
                }
            }
        }
        let mean_ssim = sum * inv_count;
        value += weights.ssim * (1.0 - mean_ssim);
        terms.push(("ssim".to_string(), mean_ssim));
    }

    F64Output { value, terms, grad }
}

/// The normalised 1-D Gaussian window (`pytorch_msssim._fspecial_gauss_1d`).
pub fn gaussian_window() -> [f64; WIN_SIZE] {
    let mut g = [0.0; WIN_SIZE];
    let half = (WIN_SIZE / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - half;
        *v = (-(x * x) / (2.0 * WIN_SIGMA * WIN_SIGMA)).exp();
    }
    let s: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= s);
    g
}

/// Valid separable correlation of an `h × w` plane: output `(h−10) × (w−10)`.
fn filter_valid(x: &[f64], h: usize, w: usize, g: &[f64; WIN_SIZE]) -> Vec<f64> {
    let (oh, ow) = (h - WIN_SIZE + 1, w - WIN_SIZE + 1);
    // Along W: tmp[r][j] = Σ_b g[b] x[r][j+b].
    let mut tmp = vec![0.0; h * ow];
    for r in 0..h {
        let row = &x[r * w..(r + 1) * w];
        let out = &mut tmp[r * ow..(r + 1) * ow];
        for (j, o) in out.iter_mut().enumerate() {
            *o = g.iter().zip(&row[j..j + WIN_SIZE]).map(|(a, b)| a * b).sum();
        }
    }
    // Along H: out[i][j] = Σ_a g[a] tmp[i+a][j].
    let mut out = vec![0.0; oh * ow];
    for i in 0..oh {
        let o = &mut out[i * ow..(i + 1) * ow];
        for (a, ga) in g.iter().enumerate() {
            let src = &tmp[(i + a) * ow..(i + a + 1) * ow];
            for (ov, sv) in o.iter_mut().zip(src) {
                *ov += ga * sv;
            }
        }
    }
    out
}

/// Adjoint of [`filter_valid`]: scatters an `(h−10) × (w−10)` map back onto `h × w`.
fn filter_valid_adjoint(u: &[f64], h: usize, w: usize, g: &[f64; WIN_SIZE]) -> Vec<f64> {
    let (oh, ow) = (h - WIN_SIZE + 1, w - WIN_SIZE + 1);
    // Adjoint of the H pass: tmp[i+a][j] += g[a] u[i][j].
    let mut tmp = vec![0.0; h * ow];
    for i in 0..oh {
        let src = &u[i * ow..(i + 1) * ow];
        for (a, ga) in g.iter().enumerate() {
            let dst = &mut tmp[(i + a) * ow..(i + a + 1) * ow];
            for (dv, sv) in dst.iter_mut().zip(src) {
                *dv += ga * sv;
            }
        }
    }
    // Adjoint of the W pass: x[r][j+b] += g[b] tmp[r][j].
    let mut x = vec![0.0; h * w];
    for r in 0..h {
        let src = &tmp[r * ow..(r + 1) * ow];
        let dst = &mut x[r * w..(r + 1) * w];
        for (j, sv) in src.iter().enumerate() {
            for (b, gb) in g.iter().enumerate() {
                dst[j + b] += gb * sv;
            }
        }
    }
    x
}

/// Σ of the SSIM map of one plane and, when asked, its gradient w.r.t. `x`.
fn ssim_plane(
    x: &[f64],
    y: &[f64],
    h: usize,
    w: usize,
    g: &[f64; WIN_SIZE],
    want_grad: bool,
) -> (f64, Option<Vec<f64>>) {
    let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
    let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
    let xy: Vec<f64> = x.iter().zip(y).map(|(a, b)| a * b).collect();
    let mx = filter_valid(x, h, w, g);
    let my = filter_valid(y, h, w, g);
    let exx = filter_valid(&xx, h, w, g);
    let eyy = filter_valid(&yy, h, w, g);
    let exy = filter_valid(&xy, h, w, g);
    let m = mx.len();

    let mut sum = 0.0;
    let (mut alpha, mut beta, mut gamma) =
        if want_grad { (vec![0.0; m], vec![0.0; m], vec![0.0; m]) } else { (Vec::new(), Vec::new(), Vec::new()) };
    for k in 0..m {
        let (ux, uy) = (mx[k], my[k]);
        let sxx = exx[k] - ux * ux;
        let syy = eyy[k] - uy * uy;
        let sxy = exy[k] - ux * uy;
        let d1 = ux * ux + uy * uy + C1;
        let a = (2.0 * ux * uy + C1) / d1;
        let d2 = sxx + syy + C2;
        let bb = (2.0 * sxy + C2) / d2;
        sum += a * bb;
        if want_grad {
            let al = bb * (2.0 * uy - 2.0 * ux * a) / d1; // ∂S/∂μx
            let be = -a * bb / d2; // ∂S/∂σxx
            let ga = 2.0 * a / d2; // ∂S/∂σxy
                                   // Fold the −2μx·β and −μy·γ parts of ∂σ/∂x into the μ term.
            alpha[k] = al - 2.0 * be * ux - ga * uy;
            beta[k] = be;
            gamma[k] = ga;
        }
    }
    if !want_grad {
        return (sum, None);
    }
    let ta = filter_valid_adjoint(&alpha, h, w, g);
    let tb = filter_valid_adjoint(&beta, h, w, g);
    let tg = filter_valid_adjoint(&gamma, h, w, g);
    let grad = (0..h * w).map(|q| ta[q] + 2.0 * x[q] * tb[q] + y[q] * tg[q]).collect();
    (sum, Some(grad))
}

// ---------------------------------------------------------------------------------------------
// The plugin

/// The `pixel` loss plugin.
pub struct PixelLoss {
    weights: Weights,
}

impl LossPlugin for PixelLoss {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Loss, env!("CARGO_PKG_VERSION"))
            .summary("L1 / MSE / SSIM pixel losses with analytic gradients")
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .dtypes(&[DataType::F32])
            .config_schema(config_schema())
            .build()
    }

    fn create(config_json: &str, _device: Device, _seed: u64) -> likeness_sdk::Result<Self> {
        let weights: Weights = parse_config(ID, config_json)?;
        weights.validate()?;
        Ok(PixelLoss { weights })
    }

    fn input_names(&self) -> Vec<String> {
        INPUT_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn value_and_grad(&mut self, inputs: Inputs<'_>, want_grad: bool) -> likeness_sdk::Result<LossOutput> {
        let prediction = CpuTensor::<f32>::from_view(inputs.get("prediction")?, "prediction")?;
        let target = CpuTensor::<f32>::from_view(inputs.get("target")?, "target")?;
        let (value, terms, grad) = compute(self.weights, &prediction, &target, want_grad)?;
        let grads = grad.map(|g| vec![("prediction".to_string(), g.into_managed())]).unwrap_or_default();
        Ok(LossOutput { value, terms, grads })
    }
}

likeness_sdk::export_loss_plugin!(PixelLoss);

#[cfg(test)]
mod tests {
    use super::*;

    use likeness_sdk::testing::uniform;

    /// A prediction near the target (so SSIM is far from 0), kept away from |p − t| ≈ 0 so the
    /// L1 kink does not sit inside a finite-difference step.
    fn pair(seed: u64, n: usize) -> (Vec<f64>, Vec<f64>) {
        let t = uniform(seed, n);
        let noise = uniform(seed + 1, n);
        let p = t
            .iter()
            .zip(&noise)
            .map(|(t, z)| {
                let d = 0.05 + 0.25 * z;
                let sign = if (t * 1e6) as u64 & 1 == 0 { 1.0 } else { -1.0 };
                t + sign * d
            })
            .collect();
        (p, t)
    }

    fn finite_difference_check(weights: Weights, dims: [usize; 4], seed: u64) {
        let n = dims.iter().product();
        let (p, t) = pair(seed, n);
        let out = compute_f64(&weights, dims, &p, &t, true);
        let grad = out.grad.unwrap();
        let eps = 1e-6;
        let gmax = grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let mut worst = 0.0f64;
        for i in 0..n {
            let mut pp = p.clone();
            pp[i] += eps;
            let up = compute_f64(&weights, dims, &pp, &t, false).value;
            pp[i] -= 2.0 * eps;
            let down = compute_f64(&weights, dims, &pp, &t, false).value;
            let fd = (up - down) / (2.0 * eps);
            worst = worst.max((fd - grad[i]).abs());
        }
        eprintln!("{weights:?} {dims:?}: max |fd − analytic| = {worst:e}, max |grad| = {gmax:e}");
        // Central differences in f64: O(eps²) truncation + O(1e-16/eps) rounding ≈ 1e-10
        // (measured ≤ 1.4e-10). Pure scalar Rust, which neither reassociates nor contracts
        // floating-point operations: the same bits on every CPU. 1e-7 · max(max|grad|, 1e-3)
        // ≥ 1e-10: the floor keeps the bound above the rounding for the small mean-loss
        // gradients (≈ 1/numel).
        assert!(
            worst <= 1e-7 * gmax.max(1e-3),
            "{weights:?} {dims:?}: max |fd − analytic| = {worst:e} (max |grad| {gmax:e})"
        );
    }

    #[test]
    fn window_is_normalised_and_symmetric() {
        let g = gaussian_window();
        // 11 positive f64 terms normalised by their sum: the re-summed error is ≤ 11·u64 ≈ 1.2e-15;
        // in practice ≤ 2 ulps (4.4e-16).
        assert!((g.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        for i in 0..WIN_SIZE {
            assert_eq!(g[i], g[WIN_SIZE - 1 - i]);
        }
    }

    #[test]
    fn adjoint_is_the_transpose_of_the_filter() {
        let (h, w) = (13, 15);
        let x = uniform(7, h * w);
        let u = uniform(8, (h - 10) * (w - 10));
        let g = gaussian_window();
        let lhs: f64 = filter_valid(&x, h, w, &g).iter().zip(&u).map(|(a, b)| a * b).sum();
        let rhs: f64 = filter_valid_adjoint(&u, h, w, &g).iter().zip(&x).map(|(a, b)| a * b).sum();
        // ⟨Fx, u⟩ = ⟨x, Fᵀu⟩ exactly; in f64 the two sides sum the same 15·121 products of values
        // in [0, 1] (Σ ≤ 15) in different orders: typically √1815·u64·15 ≈ 7e-14 apart (the
        // worst case γ₁₈₁₅·15 is 3e-12). Scalar Rust gives the same bits on every CPU.
        assert!((lhs - rhs).abs() < 1e-12, "{lhs} vs {rhs}");
    }

    #[test]
    fn gradient_l1_matches_finite_differences() {
        finite_difference_check(Weights { l1: 1.0, mse: 0.0, ssim: 0.0 }, [2, 3, 4, 5], 1);
    }

    #[test]
    fn gradient_mse_matches_finite_differences() {
        finite_difference_check(Weights { l1: 0.0, mse: 1.0, ssim: 0.0 }, [2, 3, 4, 5], 2);
    }

    #[test]
    fn gradient_ssim_matches_finite_differences() {
        finite_difference_check(Weights { l1: 0.0, mse: 0.0, ssim: 1.0 }, [2, 2, 13, 14], 3);
    }

    #[test]
    fn gradient_mix_matches_finite_differences() {
        finite_difference_check(Weights { l1: 0.5, mse: 2.0, ssim: 0.8 }, [1, 3, 12, 11], 4);
    }

    #[test]
    fn identical_images_have_ssim_one_and_zero_loss() {
        let dims = [1, 2, 16, 16];
        let x = uniform(5, 512);
        let out = compute_f64(&Weights { l1: 1.0, mse: 1.0, ssim: 1.0 }, dims, &x, &x, true);
        // L1 and MSE are exactly 0; 1 − SSIM is 0 up to f64 rounding of the local means and
        // variances (≈ 1e-16 relative each, divided by C1, C2 ≥ 1e-4: ≲ 1e-12).
        assert!(out.value.abs() < 1e-12, "{}", out.value);
        assert!((out.terms[2].1 - 1.0).abs() < 1e-12);
        assert!(out.grad.unwrap().iter().all(|g| g.abs() < 1e-10));
    }

    #[test]
    fn terms_are_unweighted_components() {
        let (p, t) = pair(9, 2 * 11 * 11);
        let w = Weights { l1: 2.0, mse: 3.0, ssim: 4.0 };
        let out = compute_f64(&w, [1, 2, 11, 11], &p, &t, false);
        let names: Vec<_> = out.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["l1", "mse", "ssim"]);
        let expect = 2.0 * out.terms[0].1 + 3.0 * out.terms[1].1 + 4.0 * (1.0 - out.terms[2].1);
        // The same f64 sum formed in a different order: a few ulps of a value ≈ 1.
        assert!((out.value - expect).abs() < 1e-14);
        assert!(out.grad.is_none());
    }

    #[test]
    fn f32_boundary_and_shape_errors() {
        let p = CpuTensor::new(vec![1, 1, 12, 12], vec![0.25f32; 144]);
        let t = CpuTensor::new(vec![1, 1, 12, 12], vec![0.5f32; 144]);
        let (v, _, g) = compute(Weights::default(), &p, &t, true).unwrap();
        // Exact inputs (0.25, 0.5): f64 gives 0.25 to an ulp. The gradient is returned as f32:
        // −1/144 rounded to f32 is off by ≤ u·1/144 ≈ 4e-10 ≤ 1e-9.
        assert!((v - 0.25).abs() < 1e-12);
        let g = g.unwrap();
        assert_eq!(g.shape, p.shape);
        assert!(g.data.iter().all(|&x| (x + 1.0 / 144.0).abs() < 1e-9));

        let other = CpuTensor::new(vec![1, 1, 12, 11], vec![0.5f32; 132]);
        let e = compute(Weights::default(), &p, &other, false).unwrap_err();
        assert_eq!(e.code, likeness_sdk::ErrorCode::InvalidInput);
        assert!(
            e.message.contains("`prediction` [1, 1, 12, 12]") && e.message.contains("`target` [1, 1, 12, 11]"),
            "{}",
            e.message
        );

        let small = CpuTensor::new(vec![1, 1, 10, 12], vec![0.5f32; 120]);
        let ssim = Weights { l1: 0.0, mse: 0.0, ssim: 1.0 };
        let e = compute(ssim, &small, &small, false).unwrap_err();
        assert_eq!(e.code, likeness_sdk::ErrorCode::InvalidInput);
        assert!(e.message.contains("H and W ≥ 11") && e.message.contains("[1, 1, 10, 12]"), "{}", e.message);
        // Without SSIM small images are fine.
        assert!(compute(Weights::default(), &small, &small, false).is_ok());

        let flat = CpuTensor::new(vec![144], vec![0.5f32; 144]);
        let e = compute(Weights::default(), &flat, &flat, false).unwrap_err();
        assert!(e.message.contains("`prediction` must be 4-D"), "{}", e.message);
    }

    #[test]
    fn config_is_validated() {
        let ok = PixelLoss::create(r#"{"ssim": 0.5}"#, Device::CPU, 0).unwrap();
        assert_eq!(ok.weights, Weights { l1: 1.0, mse: 0.0, ssim: 0.5 });
        assert_eq!(PixelLoss::create("", Device::CPU, 0).unwrap().weights, Weights::default());
        let e = PixelLoss::create(r#"{"ssmi": 1}"#, Device::CPU, 0).err().unwrap();
        assert!(e.message.contains("ssmi") && e.message.contains("pixel"), "{}", e.message);
        let e = PixelLoss::create(r#"{"l1": -1}"#, Device::CPU, 0).err().unwrap();
        assert!(e.message.contains("`l1`"), "{}", e.message);
        let e = PixelLoss::create(r#"{"l1": 0}"#, Device::CPU, 0).err().unwrap();
        assert!(e.message.contains("all weights"), "{}", e.message);
    }

    #[test]
    fn descriptor_has_schema_and_is_differentiable() {
        let d = PixelLoss::descriptor();
        assert_eq!(d.id.as_str(), "pixel");
        assert!(d.capabilities.differentiable);
        let schema: serde_json::Value = serde_json::from_str(d.config_schema.as_str()).unwrap();
        assert_eq!(schema["properties"]["ssim"]["default"], 0.0);
        assert_eq!(schema["additionalProperties"], false);
    }

    #[test]
    fn through_the_abi_shims() {
        use likeness_sdk::abi::{LossPluginModRef, NamedView};
        use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
        let m: LossPluginModRef = likeness_sdk::plugin::loss_module::<PixelLoss>();
        let h = m.create()(RStr::from(r#"{"mse": 1.0}"#), Device::CPU, 0).unwrap();
        let names: Vec<String> = m.input_names()(h).into_iter().map(|s| s.into_string()).collect();
        assert_eq!(names, ["prediction", "target"]);
        let p = CpuTensor::new(vec![1, 1, 2, 2], vec![0.0f32, 0.5, 1.0, 0.5]);
        let t = CpuTensor::new(vec![1, 1, 2, 2], vec![0.5f32; 4]);
        let views = [
            NamedView { name: RStr::from("prediction"), view: p.view() },
            NamedView { name: RStr::from("target"), view: t.view() },
        ];
        let out = m.value_and_grad()(h, RSlice::from_slice(&views), true).unwrap();
        assert_eq!(out.grads.len(), 1);
        assert_eq!(out.grads[0].name.as_str(), "prediction");
        let g = CpuTensor::<f32>::from_managed(&out.grads[0].tensor, "grad").unwrap();
        assert_eq!(g.shape, vec![1, 1, 2, 2]);
        let missing = m.value_and_grad()(h, RSlice::from_slice(&views[..1]), false).unwrap_err();
        assert!(missing.message.contains("missing input `target`"), "{}", missing.message);
        m.destroy()(h);
    }
}
