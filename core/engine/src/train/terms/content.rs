//! The content loss (`w_content · L_content`): a loss plugin comparing the model's `pixels`
//! with the data's `target`, its gradient returned already scaled by `w_content / grad_accum`.

use likeness_abi::TensorView;

use super::{plugin_answer, shape_of, Gradient, LossTerm, TermBatch, ValidationBatch};
use crate::plugins::Loss;
use crate::train::step::{batch_image, StepResult};
use crate::Result;

/// See the module docs.
pub(crate) struct ContentTerm {
    pub weight: f64,
    pub loss: Loss,
}

impl ContentTerm {
    /// `(prediction, target)` views of one batch, their shapes checked.
    fn inputs(&self, b: &TermBatch<'_>) -> Result<[(&'static str, TensorView); 2]> {
        let pixels = b.out.outputs.require(b.model_id, "pixels")?;
        let target = batch_image(b.batch, "target")?;
        if shape_of(pixels) != target.shape {
            return Err(plugin_answer(
                b.model_id,
                format!("output `pixels` has shape {:?}, the targets have {:?}", shape_of(pixels), target.shape),
            ));
        }
        Ok([("prediction", pixels.view), ("target", target.view())])
    }
}

impl LossTerm for ContentTerm {
    fn train(&mut self, b: &TermBatch<'_>, scale: f64, r: &mut StepResult) -> Result<Option<Gradient>> {
        let inputs = self.inputs(b)?;
        let loss = &mut self.loss;
        let mut l = loss.value_and_scaled_grad(&inputs, true, self.weight * scale)?;
        r.loss += self.weight * l.value;
        r.terms.extend(l.terms.iter().map(|(n, v)| (format!("{}.{n}", loss.id), *v)));
        r.terms.push((loss.id.clone(), l.value));
        let g = l
            .grads
            .take("prediction")
            .ok_or_else(|| plugin_answer(&loss.id, "returned no gradient for `prediction`".into()))?;
        Ok(Some(Gradient::Output("pixels".into(), g)))
    }

    fn validate(&mut self, b: &TermBatch<'_>, counts: bool, v: &mut ValidationBatch) -> Result<()> {
        let inputs = self.inputs(b)?;
        let l = self.loss.value_and_grad(&inputs, false)?;
        if counts {
            v.loss += self.weight * l.value;
        }
        v.records.push((self.loss.id.clone(), l.value));
        Ok(())
    }
}
