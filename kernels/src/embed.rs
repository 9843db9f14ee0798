//! Embedding similarity (`kernels/cu/embed.cu`): CPU references with the kernels' exact order
//! of operations (lane-strided partial sums, the warp's xor butterfly, warps in index order,
//! FMAs where NVRTC contracts `a += x·y`), and the launch functions.
//!
//! Conventions, shared by both sides:
//! - normalisation is `v / max(‖v‖, eps)` (torch.nn.functional.normalize);
//! - top-k orders by value, larger first, ties by the smaller index, NaN above +inf (torch.topk
//!   ranks NaN largest; its order among ties is unspecified, ours is fixed); −0 ranks below +0;
//! - the identity loss is `mean_i(1 − â_i·b̂_i)` over paired rows, its gradient is wrt the
//!   un-normalised `a` (`−(b̂ − cos·â)/(N‖a‖)`, or `−b̂/(N·eps)` when `‖a‖ ≤ eps`).

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use crate::device::{launch, DevicePtr};
use crate::{Dtype, Element, Error, KernelId, Kernels, Result};

/// `torch.nn.functional.normalize`'s default eps.
pub const NORMALIZE_EPS: f32 = 1e-12;
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;

/// The block size embed.cu is compiled with (`EMB_WARPS` derives from it there as `WARPS`
/// does here), `#define`d in front of it by [`crate::Source::text`].
pub(crate) const CU_DEFINES: &[(&str, usize)] = &[("EMB_THREADS", THREADS as usize)];

/// The warp reduction of embed.cu: lane `l` sums elements `l, l+32, …` (FMA), then five xor
/// butterfly steps (every lane ends with the same value).
fn warp_sum(lane_partial: impl Fn(usize) -> f32) -> f32 {
    let mut p: Vec<f32> = (0..32).map(lane_partial).collect();
    for o in [16, 8, 4, 2, 1] {
        p = (0..32).map(|l| p[l] + p[l ^ o]).collect();
    }
    p[0]
}

fn lane_dot<A: Element, B: Element>(a: &[A], b: &[B], lane: usize) -> f32 {
    a.iter().zip(b).skip(lane).step_by(32).fold(0f32, |s, (x, y)| x.to_f32().mul_add(y.to_f32(), s))
}

/// Row L2 normalisation: `(v/max(‖v‖, eps), ‖v‖)` per row of `input` (`rows × d`).
pub fn l2_normalize_ref<T: Element>(input: &[T], rows: usize, d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut out = Vec::with_capacity(rows * d);
    let mut norms = Vec::with_capacity(rows);
    for row in input.chunks_exact(d).take(rows) {
        let norm = warp_sum(|l| lane_dot(row, row, l)).sqrt();
        let inv = 1.0 / norm.max(eps);
        out.extend(row.iter().map(|v| v.to_f32() * inv));
        norms.push(norm);
    }
    (out, norms)
}

/// `out[i,j] = Σ_d a[i,d]·b[j,d]` (a `n × d`, b `m × d`), summed in d order with FMAs.
pub fn cosine_matrix_ref(a: &[f32], b: &[f32], n: usize, m: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * m);
    for i in 0..n {
        for j in 0..m {
            let (ar, br) = (&a[i * d..(i + 1) * d], &b[j * d..(j + 1) * d]);
            out.push(ar.iter().zip(br).fold(0f32, |s, (x, y)| x.mul_add(*y, s)));
        }
    }
    out
}

/// embed.cu's `order_key`: a total order on floats as unsigned keys (NaN highest).
pub fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return u32::MAX;
    }
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Whether `(va, ia)` ranks before `(vb, ib)`: larger first, ties by the smaller index.
pub fn precedes(va: f32, ia: usize, vb: f32, ib: usize) -> bool {
    let (ka, kb) = (order_key(va), order_key(vb));
    ka > kb || (ka == kb && ia < ib)
}

/// Top-k per row of `s` (`n × m`, `k ≤ m`): `(values, indices)`, each `n × k`, best first.
pub fn topk_rows_ref(s: &[f32], n: usize, m: usize, k: usize) -> (Vec<f32>, Vec<i32>) {
    let (mut vals, mut idxs) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
    for row in s.chunks_exact(m).take(n) {
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&a, &b| {
            if precedes(row[a], a, row[b], b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        for &j in order.iter().take(k) {
            vals.push(row[j]);
            idxs.push(j as i32);
        }
    }
    (vals, idxs)
}

/// The identity loss of paired rows and its gradient wrt `a`.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityLoss {
    pub loss: f32,
    /// `n × d`, wrt the un-normalised a.
    pub grad_a: Vec<f32>,
    /// `cos(a_i, b_i)`.
    pub cos: Vec<f32>,
}

/// `mean_i(1 − cos(a_i, b_i))` over `n` paired rows of width `d`, with its gradient wrt `a`.
pub fn identity_loss_ref<T: Element>(a: &[T], b: &[T], n: usize, d: usize, eps: f32) -> IdentityLoss {
    let inv_n = 1.0 / n as f32;
    let mut warp_loss = [0f32; WARPS];
    let (mut grad_a, mut cos) = (vec![0f32; n * d], vec![0f32; n]);
    for row in 0..n {
        let (ar, br) = (&a[row * d..(row + 1) * d], &b[row * d..(row + 1) * d]);
        let ab = warp_sum(|l| lane_dot(ar, br, l));
        let aa = warp_sum(|l| lane_dot(ar, ar, l));
        let bb = warp_sum(|l| lane_dot(br, br, l));
        let na = aa.sqrt();
        let (ca, cb) = (na.max(eps), bb.sqrt().max(eps));
        let c = ab / (ca * cb);
        warp_loss[row % WARPS] += 1.0 - c;
        cos[row] = c;
        // (I − ââᵀ)/‖a‖ applied to b̂; only b̂/eps when the clamp is active.
        let ga = if na > eps { c } else { 0.0 };
        for i in 0..d {
            let (x, y) = (ar[i].to_f32(), br[i].to_f32());
            grad_a[row * d + i] = -inv_n * (y / cb - ga * x / ca) / ca;
        }
    }
    let loss = warp_loss.iter().fold(0f32, |s, v| s + v) * inv_n;
    IdentityLoss { loss, grad_a, cos }
}

fn check_rows(kernel: &'static str, rows: usize, d: usize) -> Result<()> {
    if rows == 0 || d == 0 {
        return Err(Error::invalid(kernel, format!("empty input ({rows} rows of width {d})")));
    }
    Ok(())
}

/// Launches `emb_l2_normalize_<dtype>`: `input` (`rows × d`, dtype) → `out` (f32 `rows × d`)
/// and `norms` (f32 `rows`, or 0 for none).
///
/// # Safety
/// Every pointer is device memory of `kernels`' context with the sizes above, valid until the
/// work on `stream` completes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn l2_normalize(
    kernels: &Kernels,
    stream: &CudaStream,
    dtype: Dtype,
    input: DevicePtr,
    rows: usize,
    d: usize,
    out: DevicePtr,
    norms: DevicePtr,
) -> Result<()> {
    check_rows("emb_l2_normalize", rows, d)?;
    let f = kernels.function(KernelId::EmbL2Normalize(dtype))?;
    let (r, dd, eps) = (rows as i64, d as i64, NORMALIZE_EPS);
    let cfg =
        LaunchConfig { grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&input).arg(&r).arg(&dd).arg(&eps).arg(&out).arg(&norms);
    launch(b, cfg, "emb_l2_normalize")
}

/// Launches `emb_cosine_matrix_f32`: `out[i,j] = a_i·b_j` (f32 a `n × d`, b `m × d`, out `n × m`).
///
/// # Safety
/// As for [`l2_normalize`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn cosine_matrix(
    kernels: &Kernels,
    stream: &CudaStream,
    a: DevicePtr,
    b: DevicePtr,
    n: usize,
    m: usize,
    d: usize,
    out: DevicePtr,
) -> Result<()> {
    check_rows("emb_cosine_matrix_f32", n.min(m), d)?;
    let f = kernels.function(KernelId::EmbCosineMatrix)?;
    let (ni, mi, di) = (n as i64, m as i64, d as i64);
    let cfg = LaunchConfig {
        grid_dim: (m.div_ceil(32) as u32, n.div_ceil(32) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut lb = stream.launch_builder(&f);
    lb.arg(&a).arg(&b).arg(&ni).arg(&mi).arg(&di).arg(&out);
    launch(lb, cfg, "emb_cosine_matrix_f32")
}

/// Launches `emb_topk_rows_f32`: the top `k ≤ m` of each row of `s` (f32 `n × m`) into
/// `values` (f32 `n × k`) and `indices` (i32 `n × k`).
///
/// # Safety
/// As for [`l2_normalize`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn topk_rows(
    kernels: &Kernels,
    stream: &CudaStream,
    s: DevicePtr,
    n: usize,
    m: usize,
    k: usize,
    values: DevicePtr,
    indices: DevicePtr,
) -> Result<()> {
    check_rows("emb_topk_rows_f32", n, m)?;
    if k == 0 || k > m || m > i32::MAX as usize {
        return Err(Error::invalid("emb_topk_rows_f32", format!("k = {k} must be in 1..={m} (and m < 2³¹)")));
    }
    let f = kernels.function(KernelId::EmbTopkRows)?;
    let (ni, mi, ki) = (n as i64, m as i64, k as i32);
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut lb = stream.launch_builder(&f);
    lb.arg(&s).arg(&ni).arg(&mi).arg(&ki).arg(&values).arg(&indices);
    launch(lb, cfg, "emb_topk_rows_f32")
}

/// Launches `emb_identity_loss_<dtype>` (one block: paired rows are a batch, not a gallery):
/// `a`, `b` (dtype `n × d`) → `loss` (f32 scalar), `grad_a` (f32 `n × d`), `cos` (f32 `n`, or 0).
///
/// # Safety
/// As for [`l2_normalize`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn identity_loss(
    kernels: &Kernels,
    stream: &CudaStream,
    dtype: Dtype,
    a: DevicePtr,
    b: DevicePtr,
    n: usize,
    d: usize,
    loss: DevicePtr,
    grad_a: DevicePtr,
    cos: DevicePtr,
) -> Result<()> {
    check_rows("emb_identity_loss", n, d)?;
    let f = kernels.function(KernelId::EmbIdentityLoss(dtype))?;
    let (ni, di, eps) = (n as i64, d as i64, NORMALIZE_EPS);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut lb = stream.launch_builder(&f);
    lb.arg(&a).arg(&b).arg(&ni).arg(&di).arg(&eps).arg(&loss).arg(&grad_a).arg(&cos);
    launch(lb, cfg, "emb_identity_loss")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_ties_take_the_smaller_index_and_nan_ranks_first() {
        let s = [1.0, 3.0, 3.0, f32::NAN, -2.0, 3.0];
        let (v, i) = topk_rows_ref(&s, 1, 6, 4);
        assert_eq!(i, vec![3, 1, 2, 5]);
        assert!(v[0].is_nan() && v[1..] == [3.0, 3.0, 3.0]);
        assert!(order_key(-1.0) < order_key(-0.5) && order_key(-0.0) < order_key(0.0));
        assert!(order_key(f32::INFINITY) < order_key(f32::NAN));
    }

    #[test]
    fn identity_loss_of_equal_rows_is_zero_with_zero_gradient() {
        let a: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let r = identity_loss_ref(&a, &a, 2, 32, NORMALIZE_EPS);
        assert!(r.loss.abs() < 1e-6, "{}", r.loss);
        assert!(r.grad_a.iter().all(|g| g.abs() < 1e-6));
        // A zero row hits the clamp: gradient b̂/eps, finite.
        let z = identity_loss_ref(&[0.0f32, 0.0], &[1.0f32, 0.0], 1, 2, NORMALIZE_EPS);
        assert_eq!(z.loss, 1.0);
        assert_eq!(z.grad_a, vec![-1e12, 0.0]);
    }
}
