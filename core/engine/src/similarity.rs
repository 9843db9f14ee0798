//! Identity similarity: the cosine of two metric embeddings and the batch embedding around
//! it. One implementation, used by `host eval-faces` ([`crate::eval_faces`]) and by the
//! trainer's validation (`identity_similarity` in metrics.jsonl).

use likeness_abi::{CpuTensor, ForwardMode};

use crate::plugins::Metric;
use crate::{EngineError, Result};

/// Cosine similarity in f64; 0 when either vector is all zeros.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Embeds a batch `[B, 3, H, W]` (no gradient); one row per sample, `None` where the metric
/// found no face.
pub fn embed_rows(metric: &mut Metric, pixels: &CpuTensor<f32>) -> Result<Vec<Option<Vec<f32>>>> {
    let plugin_err = |id: &str, e: likeness_abi::PluginError| EngineError::Plugin {
        plugin: id.to_string(),
        message: e.message.to_string(),
    };
    let out = metric.embed(pixels.view(), ForwardMode::Eval)?;
    let emb = CpuTensor::<f32>::from_managed(&out.embeddings, "embeddings").map_err(|e| plugin_err(&metric.id, e))?;
    let valid = CpuTensor::<u8>::from_managed(&out.valid, "valid").map_err(|e| plugin_err(&metric.id, e))?;
    let b = pixels.shape.first().copied().unwrap_or(0) as usize;
    if emb.shape.len() != 2 || emb.shape[0] as usize != b || valid.numel() != b {
        return Err(EngineError::Plugin {
            plugin: metric.id.clone(),
            message: format!("embed returned embeddings {:?} / valid {:?} for a batch of {b}", emb.shape, valid.shape),
        });
    }
    let d = emb.shape[1] as usize;
    Ok((0..b).map(|i| (valid.data[i] != 0).then(|| emb.data[i * d..(i + 1) * d].to_vec())).collect())
}

/// Similarities of one batch: `None` for pairs where either side has no face.
pub fn identity_similarities(
    metric: &mut Metric,
    generated: &CpuTensor<f32>,
    reference: &CpuTensor<f32>,
) -> Result<Vec<Option<f64>>> {
    let g = embed_rows(metric, generated)?;
    let r = embed_rows(metric, reference)?;
    if g.len() != r.len() {
        return Err(EngineError::Plugin {
            plugin: metric.id.clone(),
            message: format!("embed returned {} generated and {} reference rows for equal batches", g.len(), r.len()),
        });
    }
    let mut out = Vec::with_capacity(g.len());
    for (a, b) in g.iter().zip(&r) {
        out.push(match (a, b) {
            (Some(a), Some(b)) if a.len() == b.len() => Some(cosine(a, b)),
            (Some(a), Some(b)) => {
                return Err(EngineError::Plugin {
                    plugin: metric.id.clone(),
                    message: format!("embed returned {}-d and {}-d embeddings for two batches", a.len(), b.len()),
                })
            }
            _ => None,
        });
    }
    Ok(out)
}
