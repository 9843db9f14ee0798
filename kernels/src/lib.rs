//! Custom CUDA kernels and their CPU references.
//!
//! Not implemented yet (see `kernels/README.md` for the plan): this crate is a compiling
//! skeleton so the workspace layout of DESIGN.md holds. Every kernel will ship with a CPU
//! reference here; the CPU reference of the embedding-similarity kernel is below.

/// Cosine similarity of two embeddings (the CPU reference the CUDA kernel will be checked
/// against). Returns 0 when either vector is zero.
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
        assert!((super::cosine_similarity(&[1.0, 0.0], &[1.0, 1.0]) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(super::cosine_similarity(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
