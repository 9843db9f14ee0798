//! One training micro-batch and one validation pass.
//!
//! The loss of a micro-batch is
//! `w_model·L_model + w_content·L_content + w_identity·L_identity + w_text·L_text`. The text term's embedding gradient is computed on the host in f64 from
//! the `[B, D]` embeddings (see [`super::text`]) — small, and the only gradient the host builds.
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
use likeness_abi::{sample_seed, CpuTensor, ForwardMode, ManagedTensor, StepContext, TensorView};

use super::Trainer;
use crate::data::{self, Example};
use crate::eval_faces::identity_similarities;
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

/// The shape of an owned output (its view is valid while `t` lives).
fn shape_of(t: &ManagedTensor) -> Vec<i64> {
    // SAFETY: a ManagedTensor's shape stays valid until it is dropped.
    unsafe { t.view.shape().to_vec() }
}

/// The batch size of an output `[B, …]`.
fn generated_batch(t: &ManagedTensor) -> usize {
    shape_of(t).first().copied().unwrap_or(0).max(0) as usize
}

fn plugin_answer(plugin: &str, message: String) -> EngineError {
    EngineError::Plugin { plugin: plugin.to_string(), message }
}

impl Trainer<'_> {
    /// Decodes the batch and assembles the model's inputs (cached encodings in place of their
    /// sources).
    pub(crate) fn model_inputs(&mut self, examples: &[Example]) -> Result<ModelInputs> {
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = data::make_batch(&refs, &mut self.images)?;
        let replaced: Vec<&str> = self.plan.encodings.iter().map(|e| e.source.as_str()).collect();
        let mut tensors: Vec<(String, CpuTensor<f32>)> = Vec::new();
        for role in &self.plan.images {
            if self.cache.enabled() && replaced.contains(&role.as_str()) {
                continue;
            }
            tensors.push((role.clone(), batch_image(&batch, role)?.clone()));
        }
        let mut texts = Vec::new();
        for role in &self.plan.texts {
            if self.cache.enabled() && replaced.contains(&role.as_str()) {
                continue;
            }
            let t = batch.texts.iter().find(|(r, _)| r == role).map(|(_, t)| t.clone()).unwrap_or_default();
            texts.push((role.clone(), t));
        }
        if self.cache.enabled() {
            for decl in self.plan.encodings.clone() {
                tensors.extend(self.cache.encodings(&mut self.parts.model, &decl, examples, &batch)?);
            }
        }
        Ok(ModelInputs { batch, tensors, texts })
    }

    /// One forward/backward over a micro-batch. `scale` = 1 / grad_accum: the gradients are
    /// scaled so that accumulated micro-batches average.
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
        let model_id = self.parts.model.id.clone();
        let out =
            self.parts.model.forward_batch(&inputs.image_views(), &inputs.text_batches(), ctx, ForwardMode::Train)?;
        let mut r = StepResult::default();
        // Gradients of the model's outputs, each already scaled by its term's weight.
        let mut grads: Vec<(String, ManagedTensor)> = Vec::new();

        let internal_weight = match self.plan.model_weight {
            Some(w) => {
                let l = out.internal_loss.ok_or_else(|| {
                    plugin_answer(
                        &model_id,
                        "declares an internal loss but returned none from forward_batch(Train)".into(),
                    )
                })?;
                r.loss += w * l;
                r.terms.push(("model".into(), l));
                w * scale
            }
            None => {
                if let Some(l) = out.internal_loss {
                    r.terms.push(("model.internal".into(), l));
                }
                0.0
            }
        };

        if let (Some(w), Some(content)) = (self.plan.content, self.parts.content.as_mut()) {
            let pixels = out.outputs.require(&model_id, "pixels")?;
            let target = batch_image(&inputs.batch, "target")?;
            if shape_of(pixels) != target.shape {
                return Err(plugin_answer(
                    &model_id,
                    format!("output `pixels` has shape {:?}, the targets have {:?}", shape_of(pixels), target.shape),
                ));
            }
            let mut l = content.value_and_scaled_grad(
                &[("prediction", pixels.view), ("target", target.view())],
                true,
                w * scale,
            )?;
            r.loss += w * l.value;
            r.terms.extend(l.terms.iter().map(|(n, v)| (format!("{}.{n}", content.id), *v)));
            r.terms.push((content.id.clone(), l.value));
            let g = l
                .grads
                .take("prediction")
                .ok_or_else(|| plugin_answer(&content.id, "returned no gradient for `prediction`".into()))?;
            grads.push(("pixels".into(), g));
        }

        if let (Some(term), Some(metric), Some(id_loss)) =
            (self.plan.identity.clone(), self.parts.metric.as_mut(), self.parts.identity_loss.as_mut())
        {
            let generated = out.outputs.require(&model_id, &term.output)?;
            let reference = batch_image(&inputs.batch, "reference")?;
            // The reference embedding is a constant (no graph); the generated one keeps its graph.
            let re = metric.embed(reference.view(), ForwardMode::Eval)?;
            let ge = metric.embed(generated.view, ForwardMode::Train)?;
            let weights = match term.weighting_output() {
                None => None,
                Some(name) => {
                    let t = out.outputs.cpu(&model_id, name)?;
                    let b = generated_batch(generated);
                    if t.numel() != b {
                        return Err(plugin_answer(
                            &model_id,
                            format!("output `{name}` has {} values for a batch of {b} (expected [B])", t.numel()),
                        ));
                    }
                    if let Some(bad) = t.data.iter().find(|v| !v.is_finite() || **v < 0.0) {
                        return Err(plugin_answer(
                            &model_id,
                            format!("output `{name}` holds {bad}: a per-sample weight must be finite and ≥ 0"),
                        ));
                    }
                    Some(CpuTensor::new(vec![b as i64], t.data.iter().map(|&t| term.sample_weight(t)).collect()))
                }
            };
            let mut named: Vec<(&str, TensorView)> = vec![
                ("embedding", ge.embeddings.view),
                ("reference_embedding", re.embeddings.view),
                ("valid", ge.valid.view),
                ("reference_valid", re.valid.view),
            ];
            if let Some(w) = &weights {
                named.push(("weight", w.view()));
            }
            let mut il = id_loss.value_and_scaled_grad(&named, true, term.weight * scale)?;
            let valid = CpuTensor::<u8>::from_managed(&ge.valid, "valid")
                .map_err(|e| plugin_answer(&metric.id, e.message.into_string()))?;
            let ref_valid = CpuTensor::<u8>::from_managed(&re.valid, "reference_valid")
                .map_err(|e| plugin_answer(&metric.id, e.message.into_string()))?;
            r.identity_samples += valid.numel();
            r.no_face += valid.data.iter().zip(&ref_valid.data).filter(|(g, rf)| **g == 0 || **rf == 0).count();
            r.loss += term.weight * il.value;
            r.terms.push((format!("identity.{}", metric.id), il.value));
            let d_emb = il
                .grads
                .take("embedding")
                .ok_or_else(|| plugin_answer(&id_loss.id, "returned no gradient for `embedding`".into()))?;
            let d_pix = metric.backward_scaled(d_emb.view, 1.0)?;
            if shape_of(&d_pix) != shape_of(generated) {
                return Err(plugin_answer(
                    &metric.id,
                    format!("backward returned shape {:?}, expected {:?}", shape_of(&d_pix), shape_of(generated)),
                ));
            }
            grads.push((term.output.clone(), d_pix));
        }

        if let (Some(term), Some(tm)) = (self.plan.text.clone(), self.parts.text.as_mut()) {
            let generated = out.outputs.require(&model_id, &term.output)?;
            let captions =
                inputs.batch.texts.iter().find(|(r, _)| *r == term.prompt).map(|(_, t)| t.clone()).ok_or_else(
                    || {
                        EngineError::Other(format!(
                            "batch of {} has no text `{}`",
                            inputs.batch.ids.join(", "),
                            term.prompt
                        ))
                    },
                )?;
            let t = super::text::text_embeddings(tm, &mut self.parts.text_cache, &captions)?;
            let ge = tm.embed(generated.view, ForwardMode::Train)?;
            let emb = CpuTensor::<f32>::from_managed(&ge.embeddings, "embeddings")
                .map_err(|e| plugin_answer(&tm.id, e.message.into_string()))?;
            let valid = CpuTensor::<u8>::from_managed(&ge.valid, "valid")
                .map_err(|e| plugin_answer(&tm.id, e.message.into_string()))?;
            let b = captions.len();
            if emb.shape.len() != 2 || emb.shape[0] as usize != b || valid.numel() != b || t.len() != emb.numel() {
                return Err(plugin_answer(
                    &tm.id,
                    format!(
                        "image embeddings have shape {:?} and valid {:?}, text embeddings {} values for {b} texts: the text term needs [B, D] both, with the same D",
                        emb.shape,
                        valid.shape,
                        t.len()
                    ),
                ));
            }
            let d = emb.shape[1] as usize;
            let a = super::text::text_alignment(&emb.data, &t, &valid.data, d);
            r.loss += term.weight * a.value;
            r.terms.push(("text".into(), a.value));
            r.text_similarity = a.similarity;
            let g = CpuTensor::new(emb.shape.clone(), a.grad.iter().map(|&v| v as f32).collect());
            // The plugin scales by w_text / grad_accum on its device, like the identity term.
            let d_pix = tm.backward_scaled(g.view(), term.weight * scale)?;
            if shape_of(&d_pix) != shape_of(generated) {
                return Err(plugin_answer(
                    &tm.id,
                    format!("backward returned shape {:?}, expected {:?}", shape_of(&d_pix), shape_of(generated)),
                ));
            }
            // The model sums the gradients given for the same output (identity + text on `pixels`).
            grads.push((term.output.clone(), d_pix));
        }
        let views: Vec<(&str, TensorView, f64)> = grads.iter().map(|(n, t)| (n.as_str(), t.view, 1.0)).collect();
        self.parts.model.backward_scaled(&views, internal_weight)?;
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
        let model_id = self.parts.model.id.clone();
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut loss_sum = 0.0;
        let mut n = 0usize;
        let mut sims: Vec<Option<f64>> = Vec::new();
        for idx in batches {
            let examples: Vec<Example> = idx.iter().map(|&i| val[i].clone()).collect();
            let inputs = self.model_inputs(&examples)?;
            let seeds: Vec<u64> = idx.iter().map(|&i| sample_seed(self.cfg.run.seed, 0, u64::MAX, i as u64)).collect();
            let ctx =
                StepContext { optimizer_step: 0, micro_batch: 0, epoch: 0, sample_seeds: RSlice::from_slice(&seeds) };
            let out = self.parts.model.forward_batch(
                &inputs.image_views(),
                &inputs.text_batches(),
                ctx,
                ForwardMode::Eval,
            )?;
            let k = examples.len() as f64;
            let mut batch_loss = 0.0;
            if let (Some(w), Some(l)) = (self.plan.model_weight, out.internal_loss) {
                batch_loss += w * l;
                *sums.entry("model".into()).or_default() += l * k;
            }
            if let (Some(w), Some(content)) = (self.plan.content, self.parts.content.as_mut()) {
                let pixels = out.outputs.require(&model_id, "pixels")?;
                let target = batch_image(&inputs.batch, "target")?;
                let l = content.value_and_grad(&[("prediction", pixels.view), ("target", target.view())], false)?;
                batch_loss += w * l.value;
                *sums.entry(content.id.clone()).or_default() += l.value * k;
            }
            if let Some(metric) = self.parts.metric.as_mut() {
                let output = self.cfg.metric.as_ref().map(|m| m.output.clone()).unwrap_or_else(|| "pixels".into());
                let generated = out.outputs.cpu(&model_id, &output)?;
                let reference = batch_image(&inputs.batch, "reference")?;
                let s = identity_similarities(metric, &generated, reference)?;
                if self.plan.model_weight.is_none() && self.plan.content.is_none() {
                    // Identity-only training: the validation loss is the identity loss.
                    let w = self.plan.identity.as_ref().map(|t| t.weight).unwrap_or(1.0);
                    let valid: Vec<f64> = s.iter().flatten().copied().collect();
                    if !valid.is_empty() {
                        batch_loss += w * valid.iter().map(|c| 1.0 - c).sum::<f64>() / valid.len() as f64;
                    }
                }
                sims.extend(s);
            }
            if let (Some(term), Some(tm)) = (self.plan.text.clone(), self.parts.text.as_mut()) {
                // Measured like the training term, without a graph; part of the validation
                // loss as the identity term is only when nothing else trains.
                let generated = out.outputs.require(&model_id, &term.output)?;
                let captions = inputs
                    .batch
                    .texts
                    .iter()
                    .find(|(r, _)| *r == term.prompt)
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default();
                let t = super::text::text_embeddings(tm, &mut self.parts.text_cache, &captions)?;
                let ge = tm.embed(generated.view, ForwardMode::Eval)?;
                let emb = CpuTensor::<f32>::from_managed(&ge.embeddings, "embeddings")
                    .map_err(|e| plugin_answer(&tm.id, e.message.into_string()))?;
                let valid = CpuTensor::<u8>::from_managed(&ge.valid, "valid")
                    .map_err(|e| plugin_answer(&tm.id, e.message.into_string()))?;
                if emb.shape.len() != 2 || t.len() != emb.numel() || valid.numel() != captions.len() {
                    return Err(plugin_answer(
                        &tm.id,
                        format!("image embeddings {:?} do not match {} text embedding values", emb.shape, t.len()),
                    ));
                }
                let a = super::text::text_alignment(&emb.data, &t, &valid.data, emb.shape[1] as usize);
                *sums.entry("text".into()).or_default() += a.value * k;
                if self.plan.model_weight.is_none() && self.plan.content.is_none() && self.plan.identity.is_none() {
                    batch_loss += term.weight * a.value;
                }
            }
            loss_sum += batch_loss * k;
            n += examples.len();
        }
        let identity = self.parts.metric.as_ref().map(|_| {
            let valid: Vec<f64> = sims.iter().flatten().copied().collect();
            let k = valid.len();
            IdentityStats {
                mean: if k == 0 { 0.0 } else { valid.iter().sum::<f64>() / k as f64 },
                min: valid.iter().copied().fold(f64::INFINITY, f64::min),
                max: valid.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                valid_pairs: k,
                total_pairs: sims.len(),
            }
        });
        let terms = sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect();
        Ok(Some(Validation { loss: loss_sum / n as f64, terms, identity }))
    }
}
