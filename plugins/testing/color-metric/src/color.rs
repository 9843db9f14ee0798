//! The colour-statistics "identity" embedding shared by the `testing-color-metric` and
//! `testing-nondiff-metric` fixtures (the latter includes this file with `#[path]`).
//!
//! For each sample of `pixels` `[B, 3, H, W]` (f32 in [0, 1]), with `P = H·W`:
//! ```text
//! f = [mean R, mean G, mean B, mean R², mean G², mean B²] − 0.25     (so f is not all-positive)
//! u = f / |f|                                                         (the embedding, [B, 6])
//! ```
//! A sample whose pixels are all exactly 0 stands for "no face found": valid 0, embedding
//! zeros. So is one whose `|f|` is (numerically) 0 — e.g. 25 % white, 75 % black pixels in
//! every channel — since it has no direction.
//!
//! Backward, for dL/du = g on a valid row:
//! ```text
//! dL/df = (g − u (u·g)) / |f|
//! dL/dx[c, p] = dL/df[c] / P + dL/df[3 + c] · 2 x[c, p] / P
//! ```

use likeness_sdk::{err, CpuTensor, MetricOutput, TensorView};

/// Embedding size.
pub const DIM: usize = 6;
/// Subtracted from every statistic.
pub const OFFSET: f64 = 0.25;
/// Below this `|f|` a row has no direction and is reported invalid.
pub const MIN_NORM: f64 = 1e-12;

/// What one embed computes (f64, row-major).
#[derive(Debug, Clone)]
pub struct Embedded {
    /// `[B, 6]`, unit rows (zeros where invalid).
    pub emb: Vec<f64>,
    /// `[B]`, `|f|` per row.
    pub norms: Vec<f64>,
    /// `[B]`, 1 where a "face" was found.
    pub valid: Vec<u8>,
}

/// Checks `pixels` is `[B, 3, H, W]` with every size ≥ 1; returns the dims.
pub fn check_pixels(id: &str, shape: &[i64]) -> likeness_sdk::Result<[usize; 4]> {
    if shape.len() != 4 || shape[1] != 3 || shape.iter().any(|&d| d <= 0) {
        return Err(err::input(format!(
            "metric `{id}`: input `pixels` must be f32 NCHW RGB [B, 3, H, W] with B, H, W ≥ 1, got shape {shape:?}"
        )));
    }
    Ok([shape[0] as usize, 3, shape[2] as usize, shape[3] as usize])
}

/// The embedding of every sample.
pub fn embed_f64(x: &[f64], dims: [usize; 4]) -> Embedded {
    let [b, c, h, w] = dims;
    let p = h * w;
    assert_eq!(x.len(), b * c * p);
    let mut emb = vec![0.0; b * DIM];
    let mut norms = vec![0.0; b];
    let mut valid = vec![0u8; b];
    for i in 0..b {
        let sample = &x[i * c * p..(i + 1) * c * p];
        if sample.iter().all(|&v| v == 0.0) {
            continue;
        }
        let mut f = [0.0; DIM];
        for ch in 0..3 {
            let plane = &sample[ch * p..(ch + 1) * p];
            f[ch] = plane.iter().sum::<f64>() / p as f64 - OFFSET;
            f[3 + ch] = plane.iter().map(|v| v * v).sum::<f64>() / p as f64 - OFFSET;
        }
        let n = f.iter().map(|v| v * v).sum::<f64>().sqrt();
        // A NaN norm is no face, like a tiny one.
        if !n.is_finite() || n <= MIN_NORM {
            continue;
        }
        norms[i] = n;
        valid[i] = 1;
        for k in 0..DIM {
            emb[i * DIM + k] = f[k] / n;
        }
    }
    Embedded { emb, norms, valid }
}

/// dL/d(pixels) for dL/d(embeddings) `g` `[B, 6]` (zero on invalid rows).
pub fn backward_f64(x: &[f64], dims: [usize; 4], e: &Embedded, g: &[f64]) -> Vec<f64> {
    let [b, c, h, w] = dims;
    let p = h * w;
    assert_eq!(g.len(), b * DIM);
    let mut dx = vec![0.0; x.len()];
    for i in 0..b {
        if e.valid[i] == 0 {
            continue;
        }
        let u = &e.emb[i * DIM..(i + 1) * DIM];
        let gi = &g[i * DIM..(i + 1) * DIM];
        let ug: f64 = u.iter().zip(gi).map(|(a, b)| a * b).sum();
        let df: Vec<f64> = (0..DIM).map(|k| (gi[k] - u[k] * ug) / e.norms[i]).collect();
        for ch in 0..3 {
            let base = i * c * p + ch * p;
            let (a, s) = (df[ch] / p as f64, 2.0 * df[3 + ch] / p as f64);
            for q in 0..p {
                dx[base + q] = a + s * x[base + q];
            }
        }
    }
    dx
}

/// Copies the borrowed `pixels` view (so nothing of it is kept) and embeds it.
pub fn embed_view(id: &str, pixels: &TensorView) -> likeness_sdk::Result<(Vec<f64>, [usize; 4], Embedded)> {
    let t = CpuTensor::<f32>::from_view(pixels, "pixels")?;
    let dims = check_pixels(id, &t.shape)?;
    let x: Vec<f64> = t.data.iter().map(|&v| v as f64).collect();
    let e = embed_f64(&x, dims);
    Ok((x, dims, e))
}

/// The ABI outputs: embeddings `[B, 6]` f32 and valid `[B]` u8.
pub fn outputs(e: &Embedded) -> MetricOutput {
    let b = e.valid.len() as i64;
    MetricOutput {
        embeddings: CpuTensor::new(vec![b, DIM as i64], e.emb.iter().map(|&v| v as f32).collect()).into_managed(),
        valid: CpuTensor::new(vec![b], e.valid.clone()).into_managed(),
    }
}
