//! CPU references of `kernels/cu/lora.cu`: the four rank-r primitives with the kernels' exact
//! semantics (strided `w`, inverted dropout from [`Dropout`], f32 accumulation in the kernels'
//! order with fused multiply-adds, as NVRTC's default `--fmad=true` contracts `a += x·w`), and
//! the fused LoRA linear's forward and backward assembled from them as the launch code will.
//!
//! The base GEMMs (`x·Wᵀ`, `dy·W`) are not here: they stay cuBLAS / libtorch.
//!
//! Shapes (row-major): x `[n, k]`, A `[r, k]`, B `[m, r]`, y and dy `[n, m]`, h and g `[n, r]`.

use crate::mask::Dropout;
use crate::Element;

/// Largest rank the kernels take (their shared-memory tiles).
pub const MAX_RANK: usize = 64;

/// `out[n,j] = scale · Σ_k dropout(in)[n,k] · w[j·w_sj + k·w_sk]` (`lora_rank_down`):
/// `h = x'·Aᵀ` (w = A, strides (k, 1)) and `g = s·dy·B` (w = B read as Bᵀ, strides (1, r)).
#[allow(clippy::too_many_arguments)]
pub fn rank_down<T: Element>(
    input: &[T],
    n_rows: usize,
    k_dim: usize,
    w: &[T],
    (w_sj, w_sk): (usize, usize),
    r: usize,
    scale: f32,
    drop: Dropout,
) -> Vec<f32> {
    let mut out = vec![0f32; n_rows * r];
    for n in 0..n_rows {
        for j in 0..r {
            let mut a = 0f32;
            for k in 0..k_dim {
                let x = drop.apply((n * k_dim + k) as u64, input[n * k_dim + k].to_f32());
                a = x.mul_add(w[j * w_sj + k * w_sk].to_f32(), a);
            }
            out[n * r + j] = scale * a;
        }
    }
    out
}

/// `out[n,c] = base[n,c] + dropout(scale · Σ_j h[n,j] · w[c·w_sc + j·w_sj])` (`lora_rank_up`):
/// the forward's epilogue `y = y0 + s·h·Bᵀ` (w = B, strides (r, 1), no dropout) and the
/// backward's `dx += mask/(1−p) · g·A` (w = A read as Aᵀ, strides (1, k), the forward's mask).
#[allow(clippy::too_many_arguments)]
pub fn rank_up<T: Element>(
    base: Option<&[T]>,
    h: &[f32],
    n_rows: usize,
    c_dim: usize,
    w: &[T],
    (w_sc, w_sj): (usize, usize),
    r: usize,
    scale: f32,
    drop: Dropout,
) -> Vec<T> {
    let mut out = Vec::with_capacity(n_rows * c_dim);
    for n in 0..n_rows {
        for c in 0..c_dim {
            let mut a = 0f32;
            for j in 0..r {
                a = h[n * r + j].mul_add(w[c * w_sc + j * w_sj].to_f32(), a);
            }
            let idx = n * c_dim + c;
            let b = base.map(|b| b[idx].to_f32()).unwrap_or(0.0);
            out.push(T::from_f32(b + drop.apply(idx as u64, scale * a)));
        }
    }
    out
}

/// `out[c,j] = scale · Σ_n dropout(x)[n,c] · hm[n,j]` (`lora_rank_reduce` over row splits of
/// `rows_per_split`, each summed in row order, then `lora_rank_finish` summing the splits in
/// order): `dBᵀ`-shaped `[m, r]` = s·dyᵀ·h, and `[k, r]` = x'ᵀ·g (dAᵀ).
#[allow(clippy::too_many_arguments)]
pub fn rank_reduce<T: Element>(
    x: &[T],
    hm: &[f32],
    n_rows: usize,
    c_dim: usize,
    r: usize,
    rows_per_split: usize,
    scale: f32,
    drop: Dropout,
) -> Vec<f32> {
    let splits = n_rows.div_ceil(rows_per_split.max(1)).max(1);
    let mut part = vec![0f32; splits * c_dim * r];
    for s in 0..splits {
        let (begin, end) = (s * rows_per_split, ((s + 1) * rows_per_split).min(n_rows));
        for c in 0..c_dim {
            for j in 0..r {
                let mut a = 0f32;
                for n in begin..end {
                    let v = drop.apply((n * c_dim + c) as u64, x[n * c_dim + c].to_f32());
                    a = v.mul_add(hm[n * r + j], a);
                }
                part[s * c_dim * r + c * r + j] = a;
            }
        }
    }
    (0..c_dim * r).map(|i| scale * (0..splits).fold(0f32, |a, s| a + part[s * c_dim * r + i])).collect()
}

/// Shapes and settings of one fused LoRA linear.
#[derive(Debug, Clone, Copy)]
pub struct LoraShape {
    pub n: usize,
    pub k: usize,
    pub m: usize,
    pub r: usize,
    /// `s = alpha / r · adapter scale`.
    pub scale: f32,
    pub drop: Dropout,
    /// Rows per split of the gradient reductions (the launch code picks it from the SM count).
    pub rows_per_split: usize,
}

/// Forward: `y = y0 + s·(dropout(x)·Aᵀ)·Bᵀ`; returns `(y, h)` (h = x'·Aᵀ, kept for backward).
pub fn forward<T: Element>(sh: &LoraShape, x: &[T], y0: &[T], a: &[T], b: &[T]) -> (Vec<T>, Vec<f32>) {
    let h = rank_down(x, sh.n, sh.k, a, (sh.k, 1), sh.r, 1.0, sh.drop);
    let y = rank_up(Some(y0), &h, sh.n, sh.m, b, (sh.r, 1), sh.r, sh.scale, Dropout::NONE);
    (y, h)
}

/// The LoRA branch's gradients given dy and the forward's h.
pub struct LoraGrads<T> {
    /// `dx_base + mask/(1−p)·(g·A)`, g = s·dy·B.
    pub dx: Vec<T>,
    /// `[r, k]`.
    pub da: Vec<f32>,
    /// `[m, r]`.
    pub db: Vec<f32>,
}

/// Backward of [`forward`]: `dx_base` = dy·W is the caller's (cuBLAS).
pub fn backward<T: Element>(
    sh: &LoraShape,
    x: &[T],
    dy: &[T],
    dx_base: &[T],
    a: &[T],
    b: &[T],
    h: &[f32],
) -> LoraGrads<T> {
    let (n, k, m, r) = (sh.n, sh.k, sh.m, sh.r);
    // g[n,j] = s · Σ_c dy[n,c] · B[c,j]: B read as Bᵀ (strides (1, r)).
    let g = rank_down(dy, n, m, b, (1, r), r, sh.scale, Dropout::NONE);
    // dB[c,j] = s · Σ_n dy[n,c] · h[n,j].
    let db = rank_reduce(dy, h, n, m, r, sh.rows_per_split, sh.scale, Dropout::NONE);
    // dAᵀ[c,j] = Σ_n x'[n,c] · g[n,j], transposed to [r, k].
    let da_t = rank_reduce(x, &g, n, k, r, sh.rows_per_split, 1.0, sh.drop);
    let mut da = vec![0f32; r * k];
    for c in 0..k {
        for j in 0..r {
            da[j * k + c] = da_t[c * r + j];
        }
    }
    // dx[n,c] = dx_base + mask·(Σ_j g[n,j] · A[j,c]): A read as Aᵀ (strides (1, k)).
    let dx = rank_up(Some(dx_base), &g, n, k, a, (1, k), r, 1.0, sh.drop);
    LoraGrads { dx, da, db }
}
