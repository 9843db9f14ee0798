//! The loss terms of a run, each a small object behind one trait ([`LossTerm`]), as candle
//! puts its learning-rate schedulers behind `Scheduler`: the training step and the validation
//! pass walk the same list and each term does its own part.
//!
//! | term | reads | trains by | validation measures |
//! |---|---|---|---|
//! | [`ModelTerm`] | the model's own loss | `backward_scaled(…, w_model / accum)` | the same loss |
//! | [`ContentTerm`] | output `pixels`, image `target` | the loss plugin's scaled gradient | the same loss |
//! | [`IdentityTerm`] | `metric.output`, image `reference` | identity loss → metric backward | 1 − cos (and the similarity stats) |
//! | [`TextAlignmentTerm`] | `text.output`, text `text.prompt` | host f64 gradient → metric backward | the same 1 − cos |
//!
//! The terms run in this order in both passes, so sums and gradients add up in the same order
//! as before they were objects (the model sums the gradients given for one output).

pub(crate) mod conditioning;
mod content;
mod identity;
mod model;
pub mod text_alignment;

use std::collections::BTreeMap;

use likeness_abi::{CpuTensor, ManagedTensor};

pub(crate) use conditioning::Conditioner;
pub(crate) use content::ContentTerm;
pub(crate) use identity::{IdentityRole, IdentityTerm};
pub(crate) use model::ModelTerm;
pub(crate) use text_alignment::TextAlignmentTerm;

use super::step::StepResult;
use crate::data;
use crate::plugins::{Metric, ModelResult};
use crate::{EngineError, Result};

/// One batch as the terms see it: the model's outputs and the decoded batch.
pub(crate) struct TermBatch<'a> {
    pub model_id: &'a str,
    pub out: &'a ModelResult,
    pub batch: &'a data::Batch,
}

/// A gradient a term hands to the model's backward.
pub(crate) enum Gradient {
    /// The weight of the model's own loss in this micro-batch (`w_model / grad_accum`).
    Internal(f64),
    /// The gradient of a model output, already scaled by the term's weight where it lives.
    Output(String, ManagedTensor),
}

/// What the terms measured on one validation batch (unscaled by the batch size).
#[derive(Debug, Default)]
pub(crate) struct ValidationBatch {
    /// The weighted values of the terms that count in the validation loss.
    pub loss: f64,
    /// `(record name, value)`, as metrics.jsonl's `terms`.
    pub records: Vec<(String, f64)>,
    /// Identity similarity per sample (`None`: no face in one of the pair).
    pub similarities: Vec<Option<f64>>,
}

/// A loss term (see the module docs).
pub(crate) trait LossTerm {
    /// One training micro-batch: adds the weighted value and the records to `r`, and returns
    /// the term's gradient (none when it does not train). `scale` = 1 / grad_accum.
    fn train(&mut self, b: &TermBatch<'_>, scale: f64, r: &mut StepResult) -> Result<Option<Gradient>>;

    /// One validation batch, without a graph: adds the records to `v`, and the weighted value
    /// to `v.loss` when `counts` (see [`Terms::validate`] for which terms count).
    fn validate(&mut self, b: &TermBatch<'_>, counts: bool, v: &mut ValidationBatch) -> Result<()>;
}

/// Every term of a run, in the order they run.
pub(crate) struct Terms {
    pub model: ModelTerm,
    pub content: Option<ContentTerm>,
    /// Present whenever a `[metric]` is configured: it trains only with metric.weight > 0, and
    /// is measured at every validation either way.
    pub identity: Option<IdentityTerm>,
    /// `[body]`: the second identity term (DTBack), measured like `identity`.
    pub body: Option<IdentityTerm>,
    pub text_alignment: Option<TextAlignmentTerm>,
    /// `model.conditioning`: the metrics whose embeddings are model inputs (not terms, but
    /// opened and kept with them).
    pub conditioning: Vec<Conditioner>,
}

impl Terms {
    /// The identity metric (measured at every validation, used by `[eval]`).
    pub fn metric(&self) -> Option<&Metric> {
        self.identity.as_ref().map(|t| &t.metric)
    }

    pub fn metric_mut(&mut self) -> Option<&mut Metric> {
        self.identity.as_mut().map(|t| &mut t.metric)
    }

    /// The identity term, when it trains.
    pub fn training_identity(&self) -> Option<&IdentityTerm> {
        self.identity.as_ref().filter(|t| t.trains())
    }

    /// Every term with its validation rule: the model and content terms always count in the
    /// validation loss; when neither is active the identity measure does (1 − cos at its weight,
    /// 1 when it is only measured), and the text term does unless the identity term trains.
    fn each(&mut self) -> [(Option<&mut dyn LossTerm>, bool); 5] {
        let counts =
            counts_in_validation(self.model.is_active() || self.content.is_some(), self.training_identity().is_some());
        [
            (Some(&mut self.model as &mut dyn LossTerm), counts[0]),
            (self.content.as_mut().map(|t| t as &mut dyn LossTerm), counts[1]),
            (self.identity.as_mut().map(|t| t as &mut dyn LossTerm), counts[2]),
            // The body term counts where the face term does.
            (self.body.as_mut().map(|t| t as &mut dyn LossTerm), counts[2]),
            (self.text_alignment.as_mut().map(|t| t as &mut dyn LossTerm), counts[3]),
        ]
    }

    /// One training micro-batch over every term; the gradients in term order.
    pub fn train(&mut self, b: &TermBatch<'_>, scale: f64, r: &mut StepResult) -> Result<Vec<Gradient>> {
        let mut grads = Vec::new();
        for (term, _) in self.each() {
            if let Some(g) = term.map(|t| t.train(b, scale, r)).transpose()?.flatten() {
                grads.push(g);
            }
        }
        Ok(grads)
    }

    /// One validation batch over every term.
    pub fn validate(&mut self, b: &TermBatch<'_>) -> Result<ValidationBatch> {
        let mut v = ValidationBatch::default();
        for (term, counts) in self.each() {
            if let Some(t) = term {
                t.validate(b, counts, &mut v)?;
            }
        }
        Ok(v)
    }
}

/// Whether the model, content, identity and text terms (in that order) count in the validation
/// loss, given whether the model or content term is active (`primary`) and whether the identity
/// term trains. See [`Terms::each`].
fn counts_in_validation(primary: bool, identity_trains: bool) -> [bool; 4] {
    [true, true, !primary, !primary && !identity_trains]
}

/// Averages of the validation batches, weighted by their sizes.
#[derive(Debug, Default)]
pub(crate) struct ValidationSums {
    pub loss: f64,
    pub terms: BTreeMap<String, f64>,
    pub similarities: Vec<Option<f64>>,
    pub examples: usize,
}

impl ValidationSums {
    pub fn add(&mut self, v: ValidationBatch, examples: usize) {
        let k = examples as f64;
        for (name, value) in v.records {
            *self.terms.entry(name).or_default() += value * k;
        }
        self.loss += v.loss * k;
        self.similarities.extend(v.similarities);
        self.examples += examples;
    }
}

pub(crate) fn plugin_answer(plugin: &str, message: String) -> EngineError {
    EngineError::Plugin { plugin: plugin.to_string(), message }
}

/// The shape of an owned output (its view is valid while `t` lives).
pub(crate) fn shape_of(t: &ManagedTensor) -> Vec<i64> {
    // SAFETY: a ManagedTensor's shape stays valid until it is dropped.
    unsafe { t.view.shape().to_vec() }
}

/// A metric's `[B]` valid flags, read back.
pub(crate) fn read_valid(metric_id: &str, valid: &ManagedTensor, what: &str) -> Result<CpuTensor<u8>> {
    CpuTensor::<u8>::from_managed(valid, what).map_err(|e| plugin_answer(metric_id, e.message.into_string()))
}

/// A metric's pixel gradient, checked against the shape of the output it differentiates.
pub(crate) fn checked_pixel_grad(
    metric_id: &str,
    d_pix: ManagedTensor,
    generated: &ManagedTensor,
) -> Result<ManagedTensor> {
    if shape_of(&d_pix) != shape_of(generated) {
        return Err(plugin_answer(
            metric_id,
            format!("backward returned shape {:?}, expected {:?}", shape_of(&d_pix), shape_of(generated)),
        ));
    }
    Ok(d_pix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the validation loss has always followed (before the terms were objects it was
    /// three `if`s in `validate`): the model and content terms when either is active, else the
    /// identity measure, and the text term unless the identity term trains.
    #[test]
    fn which_terms_count_in_the_validation_loss() {
        assert_eq!(counts_in_validation(true, true), [true, true, false, false]);
        assert_eq!(counts_in_validation(true, false), [true, true, false, false]);
        assert_eq!(counts_in_validation(false, true), [true, true, true, false]);
        assert_eq!(counts_in_validation(false, false), [true, true, true, true]);
    }

    #[test]
    fn validation_sums_weigh_batches_by_size() {
        let mut s = ValidationSums::default();
        let batch = |loss: f64, v: f64| ValidationBatch {
            loss,
            records: vec![("model".into(), v)],
            similarities: vec![Some(v), None],
        };
        s.add(batch(1.0, 2.0), 3);
        s.add(batch(4.0, 8.0), 1);
        assert_eq!((s.loss, s.terms["model"], s.examples), (7.0, 14.0, 4));
        assert_eq!(s.similarities, vec![Some(2.0), None, Some(8.0), None]);
    }
}
