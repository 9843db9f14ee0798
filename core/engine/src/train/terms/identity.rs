//! The identity term: the metric embeds the generated image (with a graph) and the reference
//! (without); the identity loss plugin turns the two embeddings into `L_identity` and its
//! embedding gradient (scaled by `w_identity / grad_accum`, optionally weighted per sample by
//! noise level, [`IdentityPlan::sample_weight`]); the metric's backward turns that into a pixel
//! gradient. Validation measures the cosine similarity of the two embeddings instead
//! ([`crate::similarity`]), for every pair where the metric found a face in both.

use likeness_abi::{CpuTensor, ForwardMode, ManagedTensor, TensorView};

use super::{checked_pixel_grad, plugin_answer, read_valid, shape_of, Gradient, LossTerm, TermBatch, ValidationBatch};
use crate::plugins::{Loss, Metric};
use crate::similarity::identity_similarities;
use crate::train::plan::IdentityPlan;
use crate::train::step::{batch_image, StepResult};
use crate::Result;

/// Which identity an [`IdentityTerm`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentityRole {
    /// `[metric]`: the face (its similarities are the run's identity statistics).
    Face,
    /// `[body]`: DTBack's body identity, recorded beside the face's (`body.<metric>`,
    /// `body_similarity`), never mixed into the face statistics.
    Body,
}

/// See the module docs.
pub(crate) struct IdentityTerm {
    pub role: IdentityRole,
    pub metric: Metric,
    /// The model output the metric embeds (`metric.output`).
    pub output: String,
    /// The plan and the identity loss, when the term trains (metric.weight > 0).
    pub training: Option<(IdentityPlan, Loss)>,
}

impl IdentityTerm {
    pub fn trains(&self) -> bool {
        self.training.is_some()
    }

    /// The weight of the identity measure in the validation loss.
    fn weight(&self) -> f64 {
        self.training.as_ref().map(|(p, _)| p.weight).unwrap_or(1.0)
    }
}

/// The per-sample weights `[B]` of the plan's weighting, from the model output it reads.
fn sample_weights(plan: &IdentityPlan, b: &TermBatch<'_>, generated: &ManagedTensor) -> Result<Option<CpuTensor<f32>>> {
    let Some(name) = plan.weighting_output() else { return Ok(None) };
    let t = b.out.outputs.cpu(b.model_id, name)?;
    let n = shape_of(generated).first().copied().unwrap_or(0).max(0) as usize;
    if t.numel() != n {
        return Err(plugin_answer(
            b.model_id,
            format!("output `{name}` has {} values for a batch of {n} (expected [B])", t.numel()),
        ));
    }
    if let Some(bad) = t.data.iter().find(|v| !v.is_finite() || **v < 0.0) {
        return Err(plugin_answer(
            b.model_id,
            format!("output `{name}` holds {bad}: a per-sample weight must be finite and ≥ 0"),
        ));
    }
    Ok(Some(CpuTensor::new(vec![n as i64], t.data.iter().map(|&t| plan.sample_weight(t)).collect())))
}

impl LossTerm for IdentityTerm {
    fn train(&mut self, b: &TermBatch<'_>, scale: f64, r: &mut StepResult) -> Result<Option<Gradient>> {
        let Some((plan, id_loss)) = self.training.as_mut() else { return Ok(None) };
        let metric = &mut self.metric;
        let generated = b.out.outputs.require(b.model_id, &plan.output)?;
        let reference = batch_image(b.batch, "reference")?;
        // The reference embedding is a constant (no graph); the generated one keeps its graph.
        let re = metric.embed(reference.view(), ForwardMode::Eval)?;
        let ge = metric.embed(generated.view, ForwardMode::Train)?;
        let weights = sample_weights(plan, b, generated)?;
        let mut named: Vec<(&str, TensorView)> = vec![
            ("embedding", ge.embeddings.view),
            ("reference_embedding", re.embeddings.view),
            ("valid", ge.valid.view),
            ("reference_valid", re.valid.view),
        ];
        if let Some(w) = &weights {
            named.push(("weight", w.view()));
        }
        let mut il = id_loss.value_and_scaled_grad(&named, true, plan.weight * scale)?;
        // Only the `[B]` flags are read back (the embeddings stay on the metric's device).
        let valid = read_valid(&metric.id, &ge.valid, "valid")?;
        let ref_valid = read_valid(&metric.id, &re.valid, "reference_valid")?;
        let prefix = match self.role {
            IdentityRole::Face => {
                r.identity_samples += valid.numel();
                r.no_face += valid.data.iter().zip(&ref_valid.data).filter(|(g, rf)| **g == 0 || **rf == 0).count();
                "identity"
            }
            IdentityRole::Body => "body",
        };
        r.loss += plan.weight * il.value;
        r.terms.push((format!("{prefix}.{}", metric.id), il.value));
        let d_emb = il
            .grads
            .take("embedding")
            .ok_or_else(|| plugin_answer(&id_loss.id, "returned no gradient for `embedding`".into()))?;
        let d_pix = metric.backward_scaled(d_emb.view, 1.0)?;
        let d_pix = checked_pixel_grad(&metric.id, d_pix, generated)?;
        Ok(Some(Gradient::Output(plan.output.clone(), d_pix)))
    }

    fn validate(&mut self, b: &TermBatch<'_>, counts: bool, v: &mut ValidationBatch) -> Result<()> {
        let generated = b.out.outputs.cpu(b.model_id, &self.output)?;
        let reference = batch_image(b.batch, "reference")?;
        let s = identity_similarities(&mut self.metric, &generated, reference)?;
        if counts {
            // Nothing else is measured: the validation loss is the identity loss, 1 − cos.
            let valid: Vec<f64> = s.iter().flatten().copied().collect();
            if !valid.is_empty() {
                v.loss += self.weight() * valid.iter().map(|c| 1.0 - c).sum::<f64>() / valid.len() as f64;
            }
        }
        match self.role {
            IdentityRole::Face => v.similarities.extend(s),
            IdentityRole::Body => {
                let valid: Vec<f64> = s.iter().flatten().copied().collect();
                if !valid.is_empty() {
                    v.records.push(("body_similarity".into(), valid.iter().sum::<f64>() / valid.len() as f64));
                }
            }
        }
        Ok(())
    }
}
