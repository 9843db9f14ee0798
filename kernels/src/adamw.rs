//! Multi-tensor AdamW (`kernels/cu/adamw.cu`): the CPU reference and the launch function.
//!
//! Numerically `torch.optim.AdamW(foreach=False)` step by step: the step's scalars are formed in
//! f64 (as Python floats) and rounded to f32 once, then each tensor operation is one f32
//! rounding in torch's order:
//! `p ← p·(1 − lr·wd)`; `m ← m + (1−β1)·(g − m)` (torch's `lerp_`, weight < ½);
//! `v ← v·β2 + ((1−β2)·g)·g` (`mul_`, `addcmul_`); `p ← p + ((−lr/(1−β1ᵗ))·m) / (√v/√(1−β2ᵗ) + ε)`
//! (`addcdiv_`). The kernel uses the `_rn` intrinsics (no FMA contraction) and so matches this
//! reference bit for bit; libtorch's vectorised CPU kernels may fuse some of these (see the
//! tolerance of `tests/torch_oracle.rs`).

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::{launch, DevicePtr};
use crate::{Dtype, Element, Error, KernelId, Kernels, Result};

/// Tensors per launch: the by-value kernel argument holds six pointer arrays of this length
/// (3.1 KB, under CUDA's classic 4 KiB parameter limit).
pub const MAX_TENSORS_PER_LAUNCH: usize = 64;
const THREADS: u32 = 256;

/// What adamw.cu is compiled with (the by-value list's length must equal [`AdamwList`]'s here),
/// `#define`d in front of it by [`crate::Source::text`].
pub(crate) const CU_DEFINES: &[(&str, usize)] =
    &[("ADAMW_THREADS", THREADS as usize), ("ADAMW_MAX_TENSORS", MAX_TENSORS_PER_LAUNCH)];

/// AdamW's hyper-parameters (torch's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamwHyper {
    fn default() -> Self {
        AdamwHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// `struct AdamwScalars` of adamw.cu: one step's scalars, f64 → f32 once.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwScalars {
    pub decay: f32,
    pub one_minus_b1: f32,
    pub beta2: f32,
    pub one_minus_b2: f32,
    pub bc2_sqrt: f32,
    pub neg_step: f32,
    pub eps: f32,
}

// SAFETY: #[repr(C)] f32s, the layout of the CUDA struct.
unsafe impl DeviceRepr for AdamwScalars {}

impl AdamwScalars {
    /// The scalars of optimizer step `step` (1-based, as torch's `state['step']` after increment).
    pub fn new(h: &AdamwHyper, step: u64) -> Self {
        let t = step as i32;
        let bc1 = 1.0 - h.beta1.powi(t);
        let bc2 = 1.0 - h.beta2.powi(t);
        AdamwScalars {
            decay: (1.0 - h.lr * h.weight_decay) as f32,
            one_minus_b1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_b2: (1.0 - h.beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            neg_step: (-(h.lr / bc1)) as f32,
            eps: h.eps as f32,
        }
    }
}

/// One AdamW step of one tensor (f32 params and state, gradient of any storage type); writes
/// the bf16 copy of the new params when `p_bf16` is given.
pub fn adamw_ref<G: Element>(
    s: &AdamwScalars,
    p: &mut [f32],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    mut p_bf16: Option<&mut [bf16]>,
) {
    for e in 0..p.len() {
        let gv = g[e].to_f32();
        let pd = p[e] * s.decay;
        let mv = m[e] + s.one_minus_b1 * (gv - m[e]);
        let vv = v[e] * s.beta2 + (s.one_minus_b2 * gv) * gv;
        let denom = vv.sqrt() / s.bc2_sqrt + s.eps;
        p[e] = pd + (s.neg_step * mv) / denom;
        m[e] = mv;
        v[e] = vv;
        if let Some(out) = p_bf16.as_deref_mut() {
            out[e] = bf16::from_f32(p[e]);
        }
    }
}

/// One tensor of a multi-tensor step: device pointers (f32 `p`, `m`, `v`; `g` of the launch's
/// gradient dtype; `p_bf16` 0 or a bf16 buffer) and its element count.
#[derive(Debug, Clone, Copy)]
pub struct AdamwTensor {
    pub p: DevicePtr,
    pub g: DevicePtr,
    pub m: DevicePtr,
    pub v: DevicePtr,
    pub p_bf16: DevicePtr,
    pub len: usize,
}

/// `struct AdamwList` of adamw.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamwList {
    p: [u64; MAX_TENSORS_PER_LAUNCH],
    g: [u64; MAX_TENSORS_PER_LAUNCH],
    m: [u64; MAX_TENSORS_PER_LAUNCH],
    v: [u64; MAX_TENSORS_PER_LAUNCH],
    p_bf16: [u64; MAX_TENSORS_PER_LAUNCH],
    start: [u64; MAX_TENSORS_PER_LAUNCH + 1],
    count: u32,
    pad: u32,
}

// SAFETY: #[repr(C)] integers, the layout of the CUDA struct.
unsafe impl DeviceRepr for AdamwList {}

fn list(chunk: &[AdamwTensor]) -> (AdamwList, u64) {
    let mut l = AdamwList {
        p: [0; MAX_TENSORS_PER_LAUNCH],
        g: [0; MAX_TENSORS_PER_LAUNCH],
        m: [0; MAX_TENSORS_PER_LAUNCH],
        v: [0; MAX_TENSORS_PER_LAUNCH],
        p_bf16: [0; MAX_TENSORS_PER_LAUNCH],
        start: [0; MAX_TENSORS_PER_LAUNCH + 1],
        count: chunk.len() as u32,
        pad: 0,
    };
    let mut total = 0u64;
    for (i, t) in chunk.iter().enumerate() {
        (l.p[i], l.g[i], l.m[i], l.v[i], l.p_bf16[i]) = (t.p, t.g, t.m, t.v, t.p_bf16);
        l.start[i] = total;
        total += t.len as u64;
    }
    l.start[chunk.len()] = total;
    (l, total)
}

/// One AdamW step of every tensor in `tensors`, `MAX_TENSORS_PER_LAUNCH` per launch, with
/// gradients of storage type `grad_dtype`. Empty tensors are skipped.
///
/// # Safety
/// Every pointer is device memory of `kernels`' context holding `len` elements of its type,
/// no two tensors overlap, and all stay valid until the work on `stream` completes.
pub unsafe fn adamw_step(
    kernels: &Kernels,
    stream: &CudaStream,
    grad_dtype: Dtype,
    scalars: &AdamwScalars,
    tensors: &[AdamwTensor],
) -> Result<()> {
    let f = kernels.function(KernelId::AdamwMultiTensor(grad_dtype))?;
    let live: Vec<AdamwTensor> = tensors.iter().copied().filter(|t| t.len > 0).collect();
    if let Some(t) = live.iter().find(|t| t.p == 0 || t.g == 0 || t.m == 0 || t.v == 0) {
        return Err(Error::invalid("adamw_multi_tensor", format!("a null pointer in {t:?}")));
    }
    for chunk in live.chunks(MAX_TENSORS_PER_LAUNCH) {
        let (l, total) = list(chunk);
        // A grid-stride loop: enough blocks to fill a large GPU, never more than the work.
        let blocks = total.div_ceil(THREADS as u64).clamp(1, 4096) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = stream.launch_builder(&f);
        b.arg(&l).arg(scalars);
        launch(b, cfg, "adamw_multi_tensor")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_layout_is_the_cuda_struct() {
        // 6 arrays of u64 (the last one 65 long) + two u32: 3088 bytes, no padding.
        assert_eq!(std::mem::size_of::<AdamwList>(), 8 * (5 * 64 + 65) + 8);
        assert_eq!(std::mem::size_of::<AdamwScalars>(), 28);
        let t = AdamwTensor { p: 1, g: 2, m: 3, v: 4, p_bf16: 0, len: 5 };
        let (l, total) = list(&[t, AdamwTensor { len: 7, ..t }]);
        assert_eq!((l.start[0], l.start[1], l.start[2], total, l.count), (0, 5, 12, 12, 2));
    }

    #[test]
    fn first_step_moves_by_lr_against_the_gradient_sign() {
        // Step 1 without decay: m̂ = g, v̂ = g², update = −lr·g/(|g| + eps) ≈ −lr·sign(g).
        let h = AdamwHyper { weight_decay: 0.0, ..Default::default() };
        let s = AdamwScalars::new(&h, 1);
        let (mut p, mut m, mut v) = (vec![1.0f32, 1.0], vec![0.0; 2], vec![0.0; 2]);
        adamw_ref(&s, &mut p, &[0.5f32, -2.0], &mut m, &mut v, None);
        assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6 && (p[1] - (1.0 + 1e-3)).abs() < 1e-6, "{p:?}");
    }
}
