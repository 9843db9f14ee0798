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

// ---------------------------------------------------------------------------------------------
// Launches (lora.cu).

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::{launch, DevicePtr};
use crate::{Dtype, Error, KernelId, Kernels, Result};

const THREADS: u32 = 256;
/// lora.cu's tile sizes (rows per block of rank_down / rank_up / rank_reduce, columns of the
/// latter two).
const DOWN_ROWS: usize = 16;
const UP_ROWS: usize = 32;
const UP_COLS: usize = 64;
const RED_ROWS: usize = 32;
const RED_COLS: usize = 64;

/// The launch geometry lora.cu is compiled with: `#define`d in front of it
/// ([`crate::Source::text`]), so the grid computed here and the tiles the kernels loop over
/// cannot drift apart.
pub(crate) const CU_DEFINES: &[(&str, usize)] = &[
    ("LORA_THREADS", THREADS as usize),
    ("MAX_RANK", MAX_RANK),
    ("DOWN_ROWS", DOWN_ROWS),
    ("UP_ROWS", UP_ROWS),
    ("UP_COLS", UP_COLS),
    ("RED_ROWS", RED_ROWS),
    ("RED_COLS", RED_COLS),
];

/// Rows per split of the dA / dB reductions, from the shape alone (≈ 256 rows, ≤ 64 splits,
/// a multiple of the kernel's 32-row tile): the same on every GPU, so gradients are bit-stable
/// across devices of one capability, unlike a split chosen from the SM count.
pub fn rows_per_split(n: usize) -> usize {
    let splits = n.div_ceil(256).clamp(1, 64);
    n.div_ceil(splits).max(1).next_multiple_of(RED_ROWS)
}

/// f32 elements of the backward's workspace (the split partial sums of the larger reduction).
pub fn workspace_len(sh: &LoraShape) -> usize {
    sh.n.div_ceil(sh.rows_per_split.max(1)).max(1) * sh.k.max(sh.m) * sh.r
}

/// `struct Dropout` of prelude.cuh, by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DropoutArg {
    seed: u64,
    offset: u64,
    threshold: u32,
    scale: f32,
}

// SAFETY: #[repr(C)] (u64, u64, u32, f32), the layout of the CUDA struct.
unsafe impl DeviceRepr for DropoutArg {}

fn dropout_arg(d: &Dropout) -> DropoutArg {
    DropoutArg { seed: d.seed, offset: d.offset, threshold: d.threshold(), scale: d.scale() }
}

/// Device buffers of the forward: x `[n,k]`, A `[r,k]`, B `[m,r]`, y0 and y `[n,m]` (dtype;
/// y0 may be y, for an in-place epilogue on cuBLAS's output, or 0 for none), h `[n,r]` f32.
#[derive(Debug, Clone, Copy)]
pub struct ForwardBuffers {
    pub x: DevicePtr,
    pub a: DevicePtr,
    pub b: DevicePtr,
    pub y0: DevicePtr,
    pub y: DevicePtr,
    pub h: DevicePtr,
}

/// Device buffers of the backward: x, A, B, h as in the forward, dy `[n,m]` (dtype), dx `[n,k]`
/// (dtype, holds dy·W on entry and gets the LoRA part added), g `[n,r]` f32 scratch, dA `[r,k]`
/// and dB `[m,r]` f32, workspace [`workspace_len`] f32.
#[derive(Debug, Clone, Copy)]
pub struct BackwardBuffers {
    pub x: DevicePtr,
    pub a: DevicePtr,
    pub b: DevicePtr,
    pub h: DevicePtr,
    pub dy: DevicePtr,
    pub dx: DevicePtr,
    pub g: DevicePtr,
    pub da: DevicePtr,
    pub db: DevicePtr,
    pub workspace: DevicePtr,
}

fn check(sh: &LoraShape) -> Result<()> {
    if sh.r == 0 || sh.r > MAX_RANK {
        return Err(Error::invalid("lora", format!("rank {} must be in 1..={MAX_RANK}", sh.r)));
    }
    if sh.n == 0 || sh.k == 0 || sh.m == 0 || sh.rows_per_split == 0 {
        return Err(Error::invalid("lora", format!("empty shape {sh:?}")));
    }
    if !sh.rows_per_split.is_multiple_of(RED_ROWS) {
        return Err(Error::invalid("lora", format!("rows_per_split {} is not a multiple of 32", sh.rows_per_split)));
    }
    if !(0.0..1.0).contains(&sh.drop.p) {
        return Err(Error::invalid("lora", format!("dropout p = {} must be in [0, 1)", sh.drop.p)));
    }
    // Row tiles and splits are the grid's y dimension (at most 65 535 blocks).
    if sh.n.div_ceil(UP_ROWS) > 65_535 || sh.n.div_ceil(sh.rows_per_split) > 65_535 {
        return Err(Error::invalid(
            "lora",
            format!("{} rows: split the batch (at most {} rows)", sh.n, 65_535 * UP_ROWS),
        ));
    }
    Ok(())
}

fn cfg(grid: (usize, usize)) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `lora_rank_down`: see [`rank_down`].
#[allow(clippy::too_many_arguments)]
unsafe fn launch_down(
    k: &Kernels,
    s: &CudaStream,
    dt: Dtype,
    input: DevicePtr,
    (n, kd): (usize, usize),
    w: DevicePtr,
    (w_sj, w_sk): (usize, usize),
    r: usize,
    scale: f32,
    drop: &Dropout,
    out: DevicePtr,
) -> Result<()> {
    let f = k.function(KernelId::LoraRankDown(dt))?;
    let (n, kd, w_sj, w_sk, r, d) = (n as i64, kd as i64, w_sj as i64, w_sk as i64, r as i32, dropout_arg(drop));
    let mut b = s.launch_builder(&f);
    b.arg(&input).arg(&n).arg(&kd).arg(&w).arg(&w_sj).arg(&w_sk).arg(&r).arg(&scale).arg(&d).arg(&out);
    launch(b, cfg(((n as usize).div_ceil(DOWN_ROWS), 1)), "lora_rank_down")
}

/// `lora_rank_up`: see [`rank_up`].
#[allow(clippy::too_many_arguments)]
unsafe fn launch_up(
    k: &Kernels,
    s: &CudaStream,
    dt: Dtype,
    (base, out, h): (DevicePtr, DevicePtr, DevicePtr),
    (n, c): (usize, usize),
    w: DevicePtr,
    (w_sc, w_sj): (usize, usize),
    r: usize,
    scale: f32,
    drop: &Dropout,
) -> Result<()> {
    let f = k.function(KernelId::LoraRankUp(dt))?;
    let grid = (c.div_ceil(UP_COLS), n.div_ceil(UP_ROWS));
    let (n, c, w_sc, w_sj, r, d) = (n as i64, c as i64, w_sc as i64, w_sj as i64, r as i32, dropout_arg(drop));
    let mut b = s.launch_builder(&f);
    b.arg(&base).arg(&out).arg(&h).arg(&n).arg(&c).arg(&w).arg(&w_sc).arg(&w_sj).arg(&r).arg(&scale).arg(&d);
    launch(b, cfg(grid), "lora_rank_up")
}

/// `lora_rank_reduce` then `lora_rank_finish`: `out[c·o_sc + j·o_sj] = scale·Σ_n x'[n,c]·hm[n,j]`.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_reduce(
    k: &Kernels,
    s: &CudaStream,
    dt: Dtype,
    (x, hm, part): (DevicePtr, DevicePtr, DevicePtr),
    (n, c, r, rows_per_split): (usize, usize, usize, usize),
    drop: &Dropout,
    scale: f32,
    (out, o_sc, o_sj): (DevicePtr, usize, usize),
) -> Result<()> {
    let splits = n.div_ceil(rows_per_split);
    let f = k.function(KernelId::LoraRankReduce(dt))?;
    let (ni, ci, ri, rps, d) = (n as i64, c as i64, r as i32, rows_per_split as i64, dropout_arg(drop));
    let mut b = s.launch_builder(&f);
    b.arg(&x).arg(&hm).arg(&ni).arg(&ci).arg(&ri).arg(&rps).arg(&d).arg(&part);
    launch(b, cfg((c.div_ceil(RED_COLS), splits)), "lora_rank_reduce")?;
    let f = k.function(KernelId::LoraRankFinish)?;
    let (sp, o_sc, o_sj) = (splits as i32, o_sc as i64, o_sj as i64);
    let mut b = s.launch_builder(&f);
    b.arg(&part).arg(&sp).arg(&ci).arg(&ri).arg(&scale).arg(&out).arg(&o_sc).arg(&o_sj);
    launch(b, cfg(((c * r).div_ceil(THREADS as usize), 1)), "lora_rank_finish")
}

/// The fused forward on `stream` (two launches): `h = dropout(x)·Aᵀ`, `y = y0 + s·h·Bᵀ`; the
/// base GEMM `y0 = x·Wᵀ` is the caller's. Same results as [`forward`].
///
/// # Safety
/// Every pointer is device memory of `kernels`' context with the shapes of [`ForwardBuffers`],
/// valid until the work on `stream` completes; h does not overlap the others.
pub unsafe fn forward_gpu(
    kernels: &Kernels,
    stream: &CudaStream,
    dtype: Dtype,
    sh: &LoraShape,
    buf: &ForwardBuffers,
) -> Result<()> {
    check(sh)?;
    let (n, k, m, r) = (sh.n, sh.k, sh.m, sh.r);
    launch_down(kernels, stream, dtype, buf.x, (n, k), buf.a, (k, 1), r, 1.0, &sh.drop, buf.h)?;
    launch_up(kernels, stream, dtype, (buf.y0, buf.y, buf.h), (n, m), buf.b, (r, 1), r, sh.scale, &Dropout::NONE)
}

/// The fused backward on `stream` (six launches): g = s·dy·B, dB = s·dyᵀ·h, dA = gᵀ·x',
/// dx += mask/(1−p)·g·A with the forward's mask; `dx_base = dy·W` is the caller's, already in
/// `dx`. Same results as [`backward`].
///
/// # Safety
/// As for [`forward_gpu`], with the shapes of [`BackwardBuffers`].
pub unsafe fn backward_gpu(
    kernels: &Kernels,
    stream: &CudaStream,
    dtype: Dtype,
    sh: &LoraShape,
    buf: &BackwardBuffers,
) -> Result<()> {
    check(sh)?;
    let (n, k, m, r, rps) = (sh.n, sh.k, sh.m, sh.r, sh.rows_per_split);
    let none = Dropout::NONE;
    launch_down(kernels, stream, dtype, buf.dy, (n, m), buf.b, (1, r), r, sh.scale, &none, buf.g)?;
    let db = (buf.db, r, 1);
    launch_reduce(kernels, stream, dtype, (buf.dy, buf.h, buf.workspace), (n, m, r, rps), &none, sh.scale, db)?;
    // dA[j,c] = Σ_n x'[n,c]·g[n,j]: the reduction's [c, j] written transposed.
    let da = (buf.da, 1, k);
    launch_reduce(kernels, stream, dtype, (buf.x, buf.g, buf.workspace), (n, k, r, rps), &sh.drop, 1.0, da)?;
    launch_up(kernels, stream, dtype, (buf.dx, buf.dx, buf.g), (n, k), buf.a, (1, k), r, 1.0, &sh.drop)
}
