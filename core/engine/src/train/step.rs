//! One training micro-batch and one validation pass; the loss terms themselves are
//! [`super::terms`].
//!
//! The loss of a micro-batch is
//! `w_model·L_model + w_content·L_content + w_identity·L_identity + w_text·L_text`. The text
//! term's embedding gradient is computed on the host in f64 from the `[B, D]` embeddings (see
//! [`super::terms::text_alignment`]) — small, and the only gradient the host builds.
//! No gradient is copied to or scaled on the host: the content loss returns its gradient
//! already multiplied by `w_content / grad_accum` (`value_and_scaled_grad`), the identity
//! loss its embedding gradient by `w_identity / grad_accum`, the metric turns that into a
//! pixel gradient on its device, and the model sums the gradients of each output and adds
//! `w_model / grad_accum · ∇L_model` itself (`backward_scaled`). What the host reads back is
//! small and on purpose: the per-sample noise levels (`timesteps`, `[B]`) or diffusion-loss
//! weights (`timestep_weights`, `[B]`) for the identity weighting and the metric's `valid` flags
//! (`[B]` u8) for the no-face count.

use std::collections::BTreeMap;

use abi_stable::std_types::RSlice;
use likeness_abi::{sample_seed, CpuTensor, ForwardMode, InputKind, StepContext, TensorView};

use super::terms::{Gradient, TermBatch, ValidationSums};
use super::Trainer;
use crate::data::{self, Example};
use crate::plugins::TextBatch;
use crate::{EngineError, Result};

/// What one micro-batch measured.
#[derive(Debug, Default)]
pub struct StepResult {
    pub loss: f64,
    pub terms: Vec<(String, f64)>,
    pub no_face: usize,
    pub identity_samples: usize,
    /// Mean cosine of the text term (None when it is off or no row was valid).
    pub text_similarity: Option<f64>,
}

/// The micro-batches of one optimizer step, averaged.
#[derive(Debug, Default)]
pub struct StepTotals {
    pub loss: f64,
    pub terms: BTreeMap<String, f64>,
    pub no_face: usize,
    pub identity_samples: usize,
    text_sim_sum: f64,
    text_sim_weight: f64,
}

impl StepTotals {
    /// The text term's mean cosine over the micro-batches that had a valid row.
    pub fn text_similarity(&self) -> Option<f64> {
        (self.text_sim_weight > 0.0).then(|| self.text_sim_sum / self.text_sim_weight)
    }

    pub fn add(&mut self, r: &StepResult, weight: f64) {
        if let Some(s) = r.text_similarity {
            self.text_sim_sum += s * weight;
            self.text_sim_weight += weight;
        }
        self.loss += r.loss * weight;
        for (k, v) in &r.terms {
            *self.terms.entry(k.clone()).or_default() += v * weight;
        }
        self.no_face += r.no_face;
        self.identity_samples += r.identity_samples;
    }
}

/// Cosine similarity of metric embeddings (generated vs reference) over the pairs where the
/// metric found a face in both.
#[derive(Debug, Clone, Copy)]
pub struct IdentityStats {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub valid_pairs: usize,
    pub total_pairs: usize,
}

impl IdentityStats {
    /// The statistics of one validation's per-pair similarities (`None`: no face in one of the pair).
    fn of(similarities: &[Option<f64>]) -> IdentityStats {
        let valid: Vec<f64> = similarities.iter().flatten().copied().collect();
        let k = valid.len();
        IdentityStats {
            mean: if k == 0 { 0.0 } else { valid.iter().sum::<f64>() / k as f64 },
            min: valid.iter().copied().fold(f64::INFINITY, f64::min),
            max: valid.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            valid_pairs: k,
            total_pairs: similarities.len(),
        }
    }
}

/// What one validation pass measured.
#[derive(Debug, Clone)]
pub struct Validation {
    /// Mean of the active model and content terms (weighted) over the validation examples;
    /// the identity loss when it is the only term.
    pub loss: f64,
    pub terms: BTreeMap<String, f64>,
    pub identity: Option<IdentityStats>,
}

/// The tensors and texts passed to the model for one batch, and the batch itself (the host
/// keeps `target` and `reference` for the losses).
pub(crate) struct ModelInputs {
    pub batch: data::Batch,
    /// Raw images the model reads, then cached encodings in place of their sources.
    pub tensors: Vec<(String, CpuTensor<f32>)>,
    pub texts: Vec<(String, Vec<String>)>,
}

impl ModelInputs {
    pub fn image_views(&self) -> Vec<(&str, TensorView)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t.view())).collect()
    }

    pub fn text_batches(&self) -> Vec<TextBatch<'_>> {
        self.texts.iter().map(|(n, t)| (n.as_str(), t.as_slice())).collect()
    }
}

/// The batch's image of `role`, or an error naming the examples.
pub(crate) fn batch_image<'b>(batch: &'b data::Batch, role: &str) -> Result<&'b CpuTensor<f32>> {
    batch
        .images
        .iter()
        .find(|(r, _)| r == role)
        .map(|(_, t)| t)
        .ok_or_else(|| EngineError::Other(format!("batch of {} has no image `{role}`", batch.ids.join(", "))))
}

/// The batch's texts of `role`, one per sample, or an error naming the examples. A text the
/// model or a loss term reads is never replaced by "" (nor cached as the encoding of "").
pub(crate) fn batch_texts<'b>(batch: &'b data::Batch, role: &str) -> Result<&'b [String]> {
    batch.text(role).ok_or_else(|| {
        EngineError::Other(format!(
            "batch of {} has no text `{role}`: every example of a run must have the texts its model and loss terms read",
            batch.ids.join(", ")
        ))
    })
}

impl Trainer<'_> {
    /// Decodes the batch and assembles the model's inputs (cached encodings in place of their
    /// sources).
    pub(crate) fn model_inputs(&mut self, examples: &[Example]) -> Result<ModelInputs> {
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = data::make_batch(&refs, &mut self.images)?;
        // While encodings are cached, no source of one goes in raw (an input two encodings
        // read, as Qwen's control images, is encoded by both).
        let cached = self.cache.enabled();
        let encoded = |kind: InputKind, name: &str| cached && self.plan.encodings.iter().any(|e| e.reads(kind, name));
        let mut tensors: Vec<(String, CpuTensor<f32>)> = Vec::new();
        // The roles this batch has: an optional one (or a pattern's) that the batch lacks is
        // skipped rather than an error (issue 17: one control here, two in the next batch).
        for role in self.plan.batch_image_roles(&batch)? {
            if encoded(InputKind::Image, &role) {
                continue;
            }
            tensors.push((role.clone(), batch_image(&batch, &role)?.clone()));
        }
        // model.conditioning: a metric's embedding of one of the batch's images.
        for c in self.parts.terms.conditioning.iter_mut() {
            tensors.push((c.input.clone(), c.embed_batch(&batch)?));
        }
        let mut texts = Vec::new();
        for role in &self.plan.text_inputs {
            if encoded(InputKind::Text, role) {
                continue;
            }
            texts.push((role.clone(), batch_texts(&batch, role)?.to_vec()));
        }
        if cached {
            for enc in &self.plan.encodings {
                // An optional source this batch has no image of: nothing to encode (a required
                // one was refused by batch_image_roles above).
                if !enc.reads_any_of(&batch) {
                    continue;
                }
                tensors.extend(self.cache.encodings(&mut self.parts.model, enc, examples, &batch)?);
            }
        }
        Ok(ModelInputs { batch, tensors, texts })
    }

    /// One forward/backward over a micro-batch: every loss term in turn ([`super::terms::Terms::train`]),
    /// then one `backward_scaled` with their gradients. `scale` = 1 / grad_accum: the gradients
    /// are scaled so that accumulated micro-batches average.
    pub(crate) fn train_micro_batch(
        &mut self,
        examples: &[Example],
        step: u64,
        micro: u64,
        epoch: u64,
        scale: f64,
    ) -> Result<StepResult> {
        let inputs = self.model_inputs(examples)?;
        let seeds: Vec<u64> =
            (0..examples.len() as u64).map(|i| sample_seed(self.cfg.run.seed, step, micro, i)).collect();
        let ctx =
            StepContext { optimizer_step: step, micro_batch: micro, epoch, sample_seeds: RSlice::from_slice(&seeds) };
        let model = &mut self.parts.model;
        let out = model.forward_batch(&inputs.image_views(), &inputs.text_batches(), ctx, ForwardMode::Train)?;
        let b = TermBatch { model_id: &model.id, out: &out, batch: &inputs.batch };
        let mut r = StepResult::default();
        let grads = self.parts.terms.train(&b, scale, &mut r)?;
        let mut internal_weight = 0.0;
        let mut views: Vec<(&str, TensorView, f64)> = Vec::new();
        for g in &grads {
            match g {
                Gradient::Internal(w) => internal_weight = *w,
                Gradient::Output(name, t) => views.push((name.as_str(), t.view, 1.0)),
            }
        }
        model.backward_scaled(&views, internal_weight)?;
        Ok(r)
    }

    /// Validation loss (and identity similarity when a metric is configured) over the
    /// validation examples; None when there are none. The model draws the same noise at every
    /// validation (seeds from the run seed and the example's position), so validations compare.
    pub(crate) fn validate(&mut self) -> Result<Option<Validation>> {
        if self.ds.val.is_empty() {
            return Ok(None);
        }
        let batches = data::epoch_batches(&self.ds.val, self.cfg.train.batch_size, self.cfg.run.seed, 0);
        let val = self.ds.val.clone();
        let mut sums = ValidationSums::default();
        for idx in batches {
            let examples: Vec<Example> = idx.iter().map(|&i| val[i].clone()).collect();
            let inputs = self.model_inputs(&examples)?;
            let seeds: Vec<u64> = idx.iter().map(|&i| sample_seed(self.cfg.run.seed, 0, u64::MAX, i as u64)).collect();
            let ctx =
                StepContext { optimizer_step: 0, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
            let model = &mut self.parts.model;
            let out = model.forward_batch(&inputs.image_views(), &inputs.text_batches(), ctx, ForwardMode::Eval)?;
            let b = TermBatch { model_id: &model.id, out: &out, batch: &inputs.batch };
            sums.add(self.parts.terms.validate(&b)?, examples.len());
        }
        let n = sums.examples as f64;
        let identity = self.parts.terms.identity.as_ref().map(|_| IdentityStats::of(&sums.similarities));
        let terms = sums.terms.into_iter().map(|(k, v)| (k, v / n)).collect();
        Ok(Some(Validation { loss: sums.loss / n, terms, identity }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text the model or a term reads is an error naming the batch's examples when the batch
    /// lacks it: before, validation measured the text term against "" (and the encoding cache
    /// keyed a missing text as ""), while training stopped with an error.
    #[test]
    fn a_missing_text_is_an_error_naming_the_examples() {
        let batch = data::Batch {
            images: Vec::new(),
            texts: vec![("caption".into(), vec!["a".into(), "b".into()])],
            ids: vec!["person_001".into(), "person_002".into()],
        };
        assert_eq!(batch_texts(&batch, "caption").unwrap(), &["a".to_string(), "b".to_string()]);
        let e = batch_texts(&batch, "attribute").unwrap_err().to_string();
        assert!(e.contains("person_001, person_002") && e.contains("`attribute`"), "{e}");
        let e = batch_image(&batch, "target").unwrap_err().to_string();
        assert!(e.contains("person_001") && e.contains("`target`"), "{e}");
    }
}
