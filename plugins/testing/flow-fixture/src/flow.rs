//! The fixture's mathematics, in f64, free of the ABI (the plugin in `lib.rs` converts views).
//!
//! # Shapes and names
//! `C = 3` channels, latents `[B, 3, h, w]` at half the image size, text embeddings `[B, 8]`.
//! Parameters are one flat vector `θ` of [`N_PARAMS`] = 36 numbers:
//!
//! | name | shape | slots | group |
//! |---|---|---|---|
//! | `W` | `[3, 3]` | 0..9 | `unet` |
//! | `b` | `[3]` | 9..12 | `unet` |
//! | `P` | `[3, 8]` | 12..36 | `text_encoder` |
//!
//! # The model
//! ```text
//! encode latents:   z0[c,i,j] = s · mean_{2×2 block (i,j)} (2·x − 1)            (s = latent_scale)
//! encode text:      e[k] = mean_{bytes β of the string} (2·U(splitmix64(8·β + k)) − 1),  e("") = 0
//! velocity:         v̂[c,q] = Σ_d W[c,d] · x[d,q] + b[c] + Σ_k P[c,k] · e[k]       (P term only with use_text)
//! train draw:       t ~ U(0.02, 0.98), ε ~ N(0, 1) from the sample's seed (see [`Rng`], [`draw`])
//! noising:          x_t = (1 − t)·z0 + t·ε,   target v = ε − z0
//! internal loss:    L = mean_{b,c,q} (v̂(x_t) − v)²
//! decoded x̂0:       x̂0 = x_t − t·v̂(x_t);   pixels = (x̂0 / s + 1) / 2, nearest-upsampled ×2 (not clamped)
//! ```
//! Both encodings are rounded to f32 however they are computed, so that a forward from the raw
//! image/caption and one from the host's cached (f32) encoding are bit-identical.
//!
//! # Backward (exact VJP)
//! For `G = dJ/dpixels` and internal-loss weight `w`, with `N = B·3·h·w`:
//! ```text
//! dJ/dx̂0[c,i,j] = (1 / 2s) · Σ_{2×2 block} G
//! dJ/dv̂         = −t · dJ/dx̂0 + w · (2/N) · (v̂ − v)
//! dJ/dW[c,d] = Σ_{b,q} dJ/dv̂[b,c,q] · x_t[b,d,q]    dJ/db[c] = Σ_{b,q} dJ/dv̂[b,c,q]
//! dJ/dP[c,k] = Σ_b (Σ_q dJ/dv̂[b,c,q]) · e[b,k]
//! ```

use likeness_sdk::abi::splitmix64;

pub const C: usize = 3;
pub const TEXT_DIM: usize = 8;
pub const N_PARAMS: usize = 36;
/// Slots of `W`, `b` and `P` in θ.
pub const W: std::ops::Range<usize> = 0..9;
pub const B: std::ops::Range<usize> = 9..12;
pub const P: std::ops::Range<usize> = 12..36;
/// The timestep range of a training draw.
pub const T_MIN: f64 = 0.02;
pub const T_MAX: f64 = 0.98;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A SplitMix64 stream: output `k` (0-based) is `splitmix64(seed + k·γ)`, γ the golden ratio
/// constant; uniforms take the top 53 bits; normals are Box–Muller pairs
/// `(√(−2 ln(1 − u1)) cos 2πu2, √(−2 ln(1 − u1)) sin 2πu2)` from two consecutive uniforms.
pub struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed, spare: None }
    }

    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(GOLDEN);
        out
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * (1.0 - u1).ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * a.sin());
        r * a.cos()
    }

    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// A training draw for one sample: `t` (the first uniform) then `n` normals.
pub fn draw(seed: u64, n: usize) -> (f64, Vec<f64>) {
    let mut r = Rng::new(seed);
    let t = T_MIN + (T_MAX - T_MIN) * r.uniform();
    (t, r.normals(n))
}

/// Initial parameters for a create seed: `W = I + 0.1·(u − ½)`, `b = 0.05·(u − ½)`,
/// `P = 0.2·(u − ½)`, with `u` the uniforms of the stream seeded `seed`.
pub fn init(seed: u64) -> [f64; N_PARAMS] {
    let mut r = Rng::new(seed);
    let mut th = [0.0; N_PARAMS];
    for (i, v) in th.iter_mut().enumerate() {
        let u = r.uniform() - 0.5;
        *v = if W.contains(&i) {
            let (c, d) = (i / C, i % C);
            (c == d) as u8 as f64 + 0.1 * u
        } else if B.contains(&i) {
            0.05 * u
        } else {
            0.2 * u
        };
    }
    th
}

fn round_f32(v: f64) -> f64 {
    v as f32 as f64
}

/// `latents` of images `[n, 3, H, W]` (H, W even) → `[n, 3, H/2, W/2]`, rounded to f32.
pub fn encode_latents(x: &[f64], n: usize, h2: usize, w2: usize, scale: f64) -> Vec<f64> {
    let (h, w) = (h2 / 2, w2 / 2);
    let mut z = vec![0.0; n * C * h * w];
    for b in 0..n * C {
        for i in 0..h {
            for j in 0..w {
                let at = |di: usize, dj: usize| x[(b * h2 + 2 * i + di) * w2 + 2 * j + dj];
                let s =
                    (2.0 * at(0, 0) - 1.0) + (2.0 * at(0, 1) - 1.0) + (2.0 * at(1, 0) - 1.0) + (2.0 * at(1, 1) - 1.0);
                z[(b * h + i) * w + j] = round_f32(scale * s / 4.0);
            }
        }
    }
    z
}

/// The 8-d bag-of-bytes embedding of one string (zeros for the empty string), rounded to f32.
pub fn embed_text(s: &str) -> [f64; TEXT_DIM] {
    let mut e = [0.0; TEXT_DIM];
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return e;
    }
    for &byte in bytes {
        for (k, v) in e.iter_mut().enumerate() {
            let u = (splitmix64(((byte as u64) << 3) | k as u64) >> 11) as f64 / (1u64 << 53) as f64;
            *v += 2.0 * u - 1.0;
        }
    }
    e.map(|v| round_f32(v / bytes.len() as f64))
}

/// `v̂` of one sample: `x` `[3, q]`, `e` `[8]` (ignored when `use_text` is false).
pub fn velocity(th: &[f64; N_PARAMS], x: &[f64], e: &[f64], use_text: bool) -> Vec<f64> {
    let q = x.len() / C;
    let mut v = vec![0.0; x.len()];
    for c in 0..C {
        let mut bias = th[B.start + c];
        if use_text {
            bias += (0..TEXT_DIM).map(|k| th[P.start + c * TEXT_DIM + k] * e[k]).sum::<f64>();
        }
        for p in 0..q {
            v[c * q + p] = (0..C).map(|d| th[c * C + d] * x[d * q + p]).sum::<f64>() + bias;
        }
    }
    v
}

/// Everything one forward computes (and backward needs), batch-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// `[n, h, w]`.
    pub dims: [usize; 3],
    pub t: Vec<f64>,
    pub x_t: Vec<f64>,
    /// The flow-matching target `ε − z0`.
    pub v: Vec<f64>,
    pub v_hat: Vec<f64>,
    /// `[n, 8]`.
    pub e: Vec<f64>,
    pub x0_hat: Vec<f64>,
    pub loss: f64,
}

/// The forward pass for latents `z0` `[n, 3, h, w]`, embeddings `e` `[n, 8]`, one `t` and
/// `3·h·w` normals per sample.
pub fn forward(
    th: &[f64; N_PARAMS],
    z0: &[f64],
    e: &[f64],
    dims: [usize; 3],
    t: &[f64],
    eps: &[Vec<f64>],
    use_text: bool,
) -> Forward {
    let [n, h, w] = dims;
    let m = C * h * w;
    let (mut x_t, mut v, mut v_hat, mut x0_hat) =
        (vec![0.0; n * m], vec![0.0; n * m], Vec::with_capacity(n * m), vec![0.0; n * m]);
    let mut sq = 0.0;
    for b in 0..n {
        let r = b * m..(b + 1) * m;
        for (k, i) in r.clone().enumerate() {
            x_t[i] = (1.0 - t[b]) * z0[i] + t[b] * eps[b][k];
            v[i] = eps[b][k] - z0[i];
        }
        let vh = velocity(th, &x_t[r.clone()], &e[b * TEXT_DIM..(b + 1) * TEXT_DIM], use_text);
        for (k, i) in r.enumerate() {
            sq += (vh[k] - v[i]) * (vh[k] - v[i]);
            x0_hat[i] = x_t[i] - t[b] * vh[k];
        }
        v_hat.extend(vh);
    }
    let loss = sq / (n * m) as f64;
    Forward { dims, t: t.to_vec(), x_t, v, v_hat, e: e.to_vec(), x0_hat, loss }
}

/// Latent-space `z` `[n, 3, h, w]` → pixels `(z / s + 1) / 2` upsampled ×2 (nearest), optionally clamped.
pub fn decode(z: &[f64], dims: [usize; 3], scale: f64, clamp: bool) -> Vec<f64> {
    let [n, h, w] = dims;
    let (h2, w2) = (2 * h, 2 * w);
    let mut out = vec![0.0; n * C * h2 * w2];
    for b in 0..n * C {
        for y in 0..h2 {
            for x in 0..w2 {
                let p = (z[(b * h + y / 2) * w + x / 2] / scale + 1.0) / 2.0;
                out[(b * h2 + y) * w2 + x] = if clamp { p.clamp(0.0, 1.0) } else { p };
            }
        }
    }
    out
}

/// dJ/dθ for `J = Σ g·pixels + weight·L` (see the module docs); `g` is `[n, 3, 2h, 2w]`.
pub fn backward(f: &Forward, g: Option<&[f64]>, weight: f64, scale: f64, use_text: bool) -> [f64; N_PARAMS] {
    let [n, h, w] = f.dims;
    let (q, w2) = (h * w, 2 * w);
    let m = C * q;
    let mut grad = [0.0; N_PARAMS];
    let k_loss = weight * 2.0 / (n * m) as f64;
    for b in 0..n {
        let mut gv = vec![0.0; m];
        for c in 0..C {
            for i in 0..h {
                for j in 0..w {
                    let idx = c * q + i * w + j;
                    let mut d = k_loss * (f.v_hat[b * m + idx] - f.v[b * m + idx]);
                    if let Some(g) = g {
                        let base = (b * C + c) * 4 * q;
                        let at = |di: usize, dj: usize| g[base + (2 * i + di) * w2 + 2 * j + dj];
                        let gx0 = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / (2.0 * scale);
                        d += -f.t[b] * gx0;
                    }
                    gv[idx] = d;
                }
            }
        }
        let xt = &f.x_t[b * m..(b + 1) * m];
        for c in 0..C {
            let row = &gv[c * q..(c + 1) * q];
            for d in 0..C {
                grad[c * C + d] += row.iter().zip(&xt[d * q..(d + 1) * q]).map(|(a, x)| a * x).sum::<f64>();
            }
            let s: f64 = row.iter().sum();
            grad[B.start + c] += s;
            if use_text {
                for k in 0..TEXT_DIM {
                    grad[P.start + c * TEXT_DIM + k] += s * f.e[b * TEXT_DIM + k];
                }
            }
        }
    }
    grad
}

/// Euler integration of `dx/dt = v̂` from t = 1 to 0 in `steps` steps for one sample, with
/// classifier-free guidance `v = v̂(e_u) + g·(v̂(e_c) − v̂(e_u))` when `guidance > 1`.
pub fn euler(
    th: &[f64; N_PARAMS],
    mut x: Vec<f64>,
    e_c: &[f64],
    e_u: &[f64],
    steps: usize,
    guidance: f64,
    use_text: bool,
) -> Vec<f64> {
    let dt = 1.0 / steps as f64;
    for _ in 0..steps {
        let mut v = velocity(th, &x, e_c, use_text);
        if guidance > 1.0 {
            let vu = velocity(th, &x, e_u, use_text);
            for (a, u) in v.iter_mut().zip(&vu) {
                *a = u + guidance * (*a - u);
            }
        }
        for (xi, vi) in x.iter_mut().zip(&v) {
            *xi -= dt * vi;
        }
    }
    x
}

/// `init + scale · (θ − init)`.
pub fn scaled_params(th: &[f64; N_PARAMS], init: &[f64; N_PARAMS], scale: f64) -> [f64; N_PARAMS] {
    std::array::from_fn(|i| init[i] + scale * (th[i] - init[i]))
}

/// AdamW state of one parameter slot range.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub lr: f64,
    pub weight_decay: f64,
}

/// One `torch.optim.AdamW` step (foreach = False) on the slots in `groups` after
/// `torch.nn.utils.clip_grad_norm_(max_norm)` over all of them; returns the norm before
/// clipping:
/// ```text
/// clip = min(1, max_norm / (‖g‖ + 1e-6))      g ← clip·g                (when max_norm > 0)
/// p ← p·(1 − lr·wd)     m ← m + (1 − β1)(g − m)     v ← β2·v + (1 − β2)·g²
/// p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
/// ```
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &mut [f64; N_PARAMS],
    m: &mut [f64; N_PARAMS],
    v: &mut [f64; N_PARAMS],
    g: &[f64; N_PARAMS],
    groups: &[(std::ops::Range<usize>, Hyper)],
    step: u64,
    betas: (f64, f64),
    eps: f64,
    max_norm: f64,
) -> f64 {
    let norm = groups.iter().flat_map(|(r, _)| r.clone()).map(|i| g[i] * g[i]).sum::<f64>().sqrt();
    let clip = if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
    let (b1, b2) = betas;
    let bc1 = 1.0 - b1.powi(step as i32);
    let bc2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
    for (r, hyper) in groups {
        let step_size = hyper.lr / bc1;
        for i in r.clone() {
            let gi = g[i] * clip;
            p[i] *= 1.0 - hyper.lr * hyper.weight_decay;
            m[i] += (1.0 - b1) * (gi - m[i]);
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// θ, latents, text embeddings, timesteps and noise of a test batch.
    type Batch = ([f64; N_PARAMS], Vec<f64>, Vec<f64>, Vec<f64>, Vec<Vec<f64>>);

    fn setup(n: usize, h: usize, w: usize, seed: u64) -> Batch {
        let th = init(seed);
        let mut r = Rng::new(seed + 100);
        let z0: Vec<f64> = (0..n * C * h * w).map(|_| 2.0 * r.uniform() - 1.0).collect();
        let e: Vec<f64> = (0..n).flat_map(|i| embed_text(&format!("caption {i}"))).collect();
        let (ts, eps): (Vec<f64>, Vec<Vec<f64>>) = (0..n).map(|i| draw(seed * 31 + i as u64, C * h * w)).unzip();
        (th, z0, e, ts, eps)
    }

    /// `J(θ) = Σ g·pixels(θ) + w·L(θ)` is a quadratic in θ (pixels are affine in θ, L is
    /// quadratic), so central differences have no truncation error at all; what remains is
    /// cancellation, ≈ 2⁻⁵²·|J|/h per difference. Here |J| ≲ 50 and h = 1e-4, so the error is
    /// ≲ 1e-10 against gradients of size ~1: the bound 1e-8·max(1, |grad|) has 100× margin and
    /// does not depend on the CPU (every operation is plain f64, no FMA-sensitive reduction is
    /// anywhere near the bound).
    #[test]
    fn vjp_matches_central_differences() {
        for use_text in [true, false] {
            let (n, h, w, s) = (2, 2, 3, 0.7);
            let (th, z0, e, ts, eps) = setup(n, h, w, 5);
            let mut r = Rng::new(77);
            let g: Vec<f64> = (0..n * C * 4 * h * w).map(|_| 2.0 * r.uniform() - 1.0).collect();
            let weight = 0.3;
            let objective = |th: &[f64; N_PARAMS]| {
                let f = forward(th, &z0, &e, [n, h, w], &ts, &eps, use_text);
                let px = decode(&f.x0_hat, [n, h, w], s, false);
                px.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>() + weight * f.loss
            };
            let f = forward(&th, &z0, &e, [n, h, w], &ts, &eps, use_text);
            let analytic = backward(&f, Some(&g), weight, s, use_text);
            let hstep = 1e-4;
            for k in 0..N_PARAMS {
                let (mut a, mut b) = (th, th);
                a[k] += hstep;
                b[k] -= hstep;
                let fd = (objective(&a) - objective(&b)) / (2.0 * hstep);
                let tol = 1e-8 * analytic[k].abs().max(1.0);
                assert!(
                    (fd - analytic[k]).abs() <= tol,
                    "use_text {use_text}, slot {k}: fd {fd} vs analytic {}",
                    analytic[k]
                );
                if !use_text && P.contains(&k) {
                    assert_eq!(analytic[k], 0.0);
                }
            }
        }
    }

    #[test]
    fn perfect_velocity_reconstructs_the_image() {
        // With v̂ = v exactly, x̂0 = z0 and pixels are the pooled image.
        let (n, h, w, s) = (1, 2, 2, 2.0);
        let x: Vec<f64> = (0..n * C * 16).map(|i| (i % 7) as f64 / 7.0).collect();
        let z0 = encode_latents(&x, n, 2 * h, 2 * w, s);
        let (t, eps) = draw(3, C * h * w);
        let x_t: Vec<f64> = z0.iter().zip(&eps).map(|(z, e)| (1.0 - t) * z + t * e).collect();
        let x0: Vec<f64> = x_t.iter().zip(z0.iter().zip(&eps)).map(|(xt, (z, e))| xt - t * (e - z)).collect();
        let px = decode(&x0, [n, h, w], s, false);
        for b in 0..C * 4 {
            let (c, i, j) = (b / 4, (b / 2) % 2, b % 2);
            let mean = (0..4).map(|k| x[c * 16 + (2 * i + k / 2) * 4 + 2 * j + k % 2]).sum::<f64>() / 4.0;
            assert!((px[c * 16 + (2 * i) * 4 + 2 * j] - mean).abs() < 1e-6);
        }
    }

    #[test]
    fn draws_are_in_range_and_normal_enough() {
        let (t, eps) = draw(42, 20_000);
        assert!((T_MIN..T_MAX).contains(&t));
        let mean = eps.iter().sum::<f64>() / eps.len() as f64;
        let var = eps.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / eps.len() as f64;
        // Standard errors: 1/√n ≈ 0.007 for the mean, √(2/n) ≈ 0.01 for the variance; 5σ.
        assert!(mean.abs() < 0.035 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
        assert_eq!(draw(42, 5), draw(42, 5));
        assert_ne!(draw(42, 5).0, draw(43, 5).0);
    }

    #[test]
    fn text_embedding_is_deterministic_and_empty_is_zero() {
        assert_eq!(embed_text(""), [0.0; TEXT_DIM]);
        assert_eq!(embed_text("a face"), embed_text("a face"));
        assert_ne!(embed_text("a face"), embed_text("a cat"));
        // A bag of bytes: order does not matter.
        assert_eq!(embed_text("ab"), embed_text("ba"));
    }
}
