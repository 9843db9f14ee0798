//! The text-alignment term (DRIP's λ_text): `L_text = mean over valid rows of 1 − cos(e_i, t_i)`,
//! e_i the `[text]` metric's embedding of sample i's generated image, t_i its embedding of the
//! sample's text (`text.prompt`, the caption).
//!
//! The gradient is computed here, in f64, rather than by a loss plugin: the identity loss
//! plugin compares two image embeddings and marks validity per pair, which would also fit, but
//! it would treat t as a second "reference" with its own weighting modes (seed 004's squared
//! distance, triplet) that DRIP's text term does not have. For a valid row, with n valid rows,
//! ```text
//! cos = e·t / (|e| |t|)
//! dL/de = −(t/|t| − cos · e/|e|) / (|e| · n)
//! ```
//! and 0 on rows where the metric found nothing (valid = 0) or either vector is zero (no
//! direction). The text embeddings carry no gradient; they are computed once per distinct
//! text and cached for the run.

use std::collections::HashMap;

use likeness_abi::{CpuTensor, ForwardMode};

use super::{checked_pixel_grad, plugin_answer, read_valid, Gradient, LossTerm, TermBatch, ValidationBatch};
use crate::plugins::Metric;
use crate::train::plan::TextAlignmentPlan;
use crate::train::step::{batch_texts, StepResult};
use crate::{EngineError, Result};

/// What the term measured on one batch.
#[derive(Debug, Clone)]
pub struct TextAlignment {
    /// `L_text`, 0 when no row is valid.
    pub value: f64,
    /// Mean cosine over the valid rows (None when none is).
    pub similarity: Option<f64>,
    pub valid_rows: usize,
    /// dL_text/de, `[B, D]` (unscaled by w_text).
    pub grad: Vec<f64>,
}

/// `L_text` and its gradient for image embeddings `emb` `[B, D]`, text embeddings `texts`
/// `[B, D]` (row i = sample i's text) and the metric's `valid` flags `[B]`.
pub fn text_alignment(emb: &[f32], texts: &[f32], valid: &[u8], d: usize) -> TextAlignment {
    let b = valid.len();
    assert_eq!(emb.len(), b * d, "image embeddings are [B, D]");
    assert_eq!(texts.len(), b * d, "text embeddings are [B, D]");
    let mut rows = Vec::new();
    for i in 0..b {
        let e: Vec<f64> = emb[i * d..(i + 1) * d].iter().map(|&v| v as f64).collect();
        let t: Vec<f64> = texts[i * d..(i + 1) * d].iter().map(|&v| v as f64).collect();
        let ne = e.iter().map(|v| v * v).sum::<f64>().sqrt();
        let nt = t.iter().map(|v| v * v).sum::<f64>().sqrt();
        if valid[i] != 0 && ne > 0.0 && nt > 0.0 && ne.is_finite() && nt.is_finite() {
            let cos = e.iter().zip(&t).map(|(a, b)| a * b).sum::<f64>() / (ne * nt);
            rows.push((i, e, t, ne, nt, cos));
        }
    }
    let n = rows.len();
    let mut grad = vec![0.0; b * d];
    if n == 0 {
        return TextAlignment { value: 0.0, similarity: None, valid_rows: 0, grad };
    }
    let mut sum_cos = 0.0;
    for (i, e, t, ne, nt, cos) in &rows {
        sum_cos += cos;
        for k in 0..d {
            grad[i * d + k] = -(t[k] / nt - cos * e[k] / ne) / (ne * n as f64);
        }
    }
    let sim = sum_cos / n as f64;
    TextAlignment { value: 1.0 - sim, similarity: Some(sim), valid_rows: n, grad }
}

/// The text embeddings of `texts` `[B, D]`, each distinct text embedded once per run (`cache`).
pub fn text_embeddings(
    metric: &mut Metric,
    cache: &mut HashMap<String, Vec<f32>>,
    texts: &[String],
) -> Result<Vec<f32>> {
    let mut missing: Vec<String> = texts.iter().filter(|t| !cache.contains_key(*t)).cloned().collect();
    missing.sort();
    missing.dedup();
    if !missing.is_empty() {
        let m = metric.embed_texts(&missing)?;
        let t = CpuTensor::<f32>::from_managed(&m, "text_embeddings")
            .map_err(|e| EngineError::Plugin { plugin: metric.id.clone(), message: e.message.into_string() })?;
        if t.shape.len() != 2 || t.shape[0] as usize != missing.len() || t.shape[1] <= 0 {
            return Err(EngineError::Plugin {
                plugin: metric.id.clone(),
                message: format!(
                    "embed_texts of {} texts returned shape {:?}, expected [{}, D]",
                    missing.len(),
                    t.shape,
                    missing.len()
                ),
            });
        }
        let d = t.shape[1] as usize;
        for (k, text) in missing.into_iter().enumerate() {
            cache.insert(text, t.data[k * d..(k + 1) * d].to_vec());
        }
    }
    Ok(texts.iter().flat_map(|t| cache[t].iter().copied()).collect())
}

/// The text-alignment term as the trainer runs it (see the module docs): the `[text]` metric
/// (its own instance, even when it is also the `[metric]`) and its embedding of every text
/// seen so far (texts carry no gradient).
pub(crate) struct TextAlignmentTerm {
    pub plan: TextAlignmentPlan,
    pub metric: Metric,
    cache: HashMap<String, Vec<f32>>,
}

/// One batch measured: the alignment and the `[B, D]` shape of the image embeddings.
struct Measured {
    alignment: TextAlignment,
    shape: Vec<i64>,
}

impl TextAlignmentTerm {
    pub fn new(plan: TextAlignmentPlan, metric: Metric) -> Self {
        TextAlignmentTerm { plan, metric, cache: HashMap::new() }
    }

    /// Embeds the generated images (`mode` = Train keeps the metric's graph) and the batch's
    /// texts, and measures their alignment. A batch without the text role is an error naming
    /// its examples (in training and validation alike).
    fn measure(&mut self, b: &TermBatch<'_>, mode: ForwardMode) -> Result<Measured> {
        let generated = b.out.outputs.require(b.model_id, &self.plan.output)?;
        let texts = batch_texts(b.batch, &self.plan.prompt)?;
        let t = text_embeddings(&mut self.metric, &mut self.cache, texts)?;
        let ge = self.metric.embed(generated.view, mode)?;
        let emb = CpuTensor::<f32>::from_managed(&ge.embeddings, "embeddings")
            .map_err(|e| plugin_answer(&self.metric.id, e.message.into_string()))?;
        let valid = read_valid(&self.metric.id, &ge.valid, "valid")?;
        let n = texts.len();
        if emb.shape.len() != 2 || emb.shape[0] as usize != n || valid.numel() != n || t.len() != emb.numel() {
            return Err(plugin_answer(
                &self.metric.id,
                format!(
                    "image embeddings have shape {:?} and valid {:?}, text embeddings {} values for {n} texts: the text term needs [B, D] both, with the same D",
                    emb.shape,
                    valid.shape,
                    t.len()
                ),
            ));
        }
        let alignment = text_alignment(&emb.data, &t, &valid.data, emb.shape[1] as usize);
        Ok(Measured { alignment, shape: emb.shape })
    }
}

impl LossTerm for TextAlignmentTerm {
    fn train(&mut self, b: &TermBatch<'_>, scale: f64, r: &mut StepResult) -> Result<Option<Gradient>> {
        let Measured { alignment: a, shape } = self.measure(b, ForwardMode::Train)?;
        let w = self.plan.weight;
        r.loss += w * a.value;
        r.terms.push(("text".into(), a.value));
        r.text_similarity = a.similarity;
        let g = CpuTensor::new(shape, a.grad.iter().map(|&v| v as f32).collect());
        // The plugin scales by w_text / grad_accum on its device, like the identity term.
        let d_pix = self.metric.backward_scaled(g.view(), w * scale)?;
        let generated = b.out.outputs.require(b.model_id, &self.plan.output)?;
        let d_pix = checked_pixel_grad(&self.metric.id, d_pix, generated)?;
        // The model sums the gradients given for the same output (identity + text on `pixels`).
        Ok(Some(Gradient::Output(self.plan.output.clone(), d_pix)))
    }

    fn validate(&mut self, b: &TermBatch<'_>, counts: bool, v: &mut ValidationBatch) -> Result<()> {
        let a = self.measure(b, ForwardMode::Eval)?.alignment;
        v.records.push(("text".into(), a.value));
        if counts {
            v.loss += self.plan.weight * a.value;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value against a hand computation: e = (1, 0), t = (1, 1) → cos = 1/√2; e = (0, 2),
    /// t = (0, −3) → cos = −1; the invalid row is left out. L = 1 − (1/√2 − 1)/2.
    #[test]
    fn value_by_hand() {
        let emb = [1.0, 0.0, 0.0, 2.0, 5.0, 5.0];
        let txt = [1.0, 1.0, 0.0, -3.0, 1.0, 0.0];
        let r = text_alignment(&emb, &txt, &[1, 1, 0], 2);
        let expect = 1.0 - (std::f64::consts::FRAC_1_SQRT_2 - 1.0) / 2.0;
        // Inputs are exact in f32 and the arithmetic is f64: only f64 rounding (≈1e-16) remains.
        assert!((r.value - expect).abs() < 1e-12, "{} vs {expect}", r.value);
        assert_eq!(r.valid_rows, 2);
        assert_eq!(&r.grad[4..], &[0.0, 0.0], "an invalid row gets no gradient");
    }

    /// The analytic gradient against central differences of `text_alignment` itself, in f64
    /// on the formula (the f32 inputs are the evaluation points, perturbed in f64 through a
    /// re-evaluation with exact f32-representable steps 2⁻¹⁰). Truncation h²·|L'''|/6 with
    /// |L'''| = O(1/|e|³) ≈ O(10) here → ≈ 2e-6; f32 input rounding does not enter (the
    /// perturbed points are exact in f32). Bound 1e-5.
    #[test]
    fn gradient_matches_finite_differences() {
        let d = 5;
        let emb: Vec<f32> = (0..3 * d).map(|k| ((k * 37 % 11) as f32 - 5.0) / 4.0).collect();
        let txt: Vec<f32> = (0..3 * d).map(|k| ((k * 53 % 13) as f32 - 6.0) / 5.0).collect();
        let valid = [1u8, 1, 1];
        let r = text_alignment(&emb, &txt, &valid, d);
        let h = 1.0f32 / 1024.0;
        for k in 0..3 * d {
            let mut p = emb.clone();
            p[k] += h;
            let mut m = emb.clone();
            m[k] -= h;
            let fd = (text_alignment(&p, &txt, &valid, d).value - text_alignment(&m, &txt, &valid, d).value)
                / (2.0 * h as f64);
            assert!((fd - r.grad[k]).abs() < 1e-5, "component {k}: finite difference {fd}, analytic {}", r.grad[k]);
        }
    }

    #[test]
    fn no_valid_row_is_zero() {
        let r = text_alignment(&[1.0, 0.0], &[0.0, 1.0], &[0], 2);
        assert_eq!((r.value, r.similarity, r.valid_rows), (0.0, None, 0));
    }
}
