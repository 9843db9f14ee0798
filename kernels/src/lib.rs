//! Custom CUDA kernels, compiled at first use by NVRTC and launched through cudarc, each with a
//! CPU reference in Rust of the same semantics (same dropout mask, same top-k tie rule, the same
//! AdamW arithmetic).
//!
//! - [`KernelId`] names every kernel: its source ([`Source`], `kernels/cu/*.cu`) and entry point.
//! - [`nvrtc`] finds `libnvrtc` (the torch venv's `nvidia/cu13/lib` when it is not on the
//!   loader path) and the CUDA headers, and compiles a source for a compute capability;
//!   [`PtxCache`] keeps the PTX, keyed by source hash, options, NVRTC version and capability.
//! - [`mask`] is the dropout mask both sides regenerate from (seed, offset, index).
//! - [`lora`], [`embed`], [`adamw`]: the CPU references (`*_ref`, and `lora::forward` /
//!   `backward`) and the launch functions, which take the caller's stream (an ABI view's
//!   `stream`, wrapped by [`stream_from_abi`]) and raw device pointers.
//! - [`Kernels`] holds a CUDA context after probing for `libcuda` (cudarc panics without a
//!   driver) and loads each source's module at first use.
//!
//! Not here (issue 18, see kernels/README.md): the toolkit's LoRA layer joining these kernels to
//! tch's autograd through an explicit VJP, and NCCL.

pub mod adamw;
mod cache;
mod device;
mod dtype;
pub mod embed;
mod error;
mod ids;
pub mod lora;
pub mod mask;
pub mod nvrtc;

pub use cache::PtxCache;
pub use device::{cuda_driver_present, stream_from_abi, DevicePtr, Kernels};
pub use dtype::{Dtype, Element};
pub use error::{Error, Result};
pub use ids::{KernelId, Source};

/// Re-exported so callers name the same cudarc types as the launch functions.
pub use cudarc;
/// Re-exported for the bf16/fp16 storage types of the references.
pub use half;

/// Cosine similarity of two embeddings in f64 (returns 0 when either vector is zero); the
/// scalar the eval code uses, kept from the skeleton.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "cosine_similarity: lengths differ");
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += *x as f64 * *y as f64;
        na += *x as f64 * *x as f64;
        nb += *y as f64 * *y as f64;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())) as f32
}

#[cfg(test)]
mod tests {
    #[test]
    fn cosine() {
        let c = super::cosine_similarity(&[1.0, 0.0], &[1.0, 1.0]);
        assert!((c - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(super::cosine_similarity(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
