//! The model's own loss (`w_model · L_model`, e.g. a diffusion loss): the model computes it
//! and its gradient; the host only passes the weight to `backward_scaled`.

use super::{plugin_answer, Gradient, LossTerm, TermBatch, ValidationBatch};
use crate::train::step::StepResult;
use crate::Result;

/// See the module docs. Always present: a model with a loss of its own that does not train
/// on it (`model.loss_weight = 0`) still has it recorded as `model.internal`.
pub(crate) struct ModelTerm {
    /// `w_model`, when the model has its own loss and the weight is > 0.
    pub weight: Option<f64>,
}

impl ModelTerm {
    pub fn is_active(&self) -> bool {
        self.weight.is_some()
    }
}

impl LossTerm for ModelTerm {
    fn train(&mut self, b: &TermBatch<'_>, scale: f64, r: &mut StepResult) -> Result<Option<Gradient>> {
        let Some(w) = self.weight else {
            if let Some(l) = b.out.internal_loss {
                r.terms.push(("model.internal".into(), l));
            }
            return Ok(None);
        };
        let l = b.out.internal_loss.ok_or_else(|| {
            plugin_answer(b.model_id, "declares an internal loss but returned none from forward_batch(Train)".into())
        })?;
        r.loss += w * l;
        r.terms.push(("model".into(), l));
        Ok(Some(Gradient::Internal(w * scale)))
    }

    fn validate(&mut self, b: &TermBatch<'_>, counts: bool, v: &mut ValidationBatch) -> Result<()> {
        if let (Some(w), Some(l)) = (self.weight, b.out.internal_loss) {
            if counts {
                v.loss += w * l;
            }
            v.records.push(("model".into(), l));
        }
        Ok(())
    }
}
