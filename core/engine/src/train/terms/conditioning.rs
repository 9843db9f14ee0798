//! Model inputs that are a metric's embedding of one of the batch's images (`model.conditioning`;
//! DTBack's `face_embedding` / `body_embedding` of the `reference` image): the metric runs in
//! `Eval` (no graph: the identity is a condition, not something the step differentiates), and
//! the `[B, D]` embedding joins the model's inputs under the configured name.

use likeness_abi::{CpuTensor, ForwardMode};

use crate::data;
use crate::plugins::Metric;
use crate::train::step::batch_image;
use crate::{EngineError, Result};

/// One `model.conditioning` entry with its own metric instance.
pub(crate) struct Conditioner {
    /// The model input it fills.
    pub input: String,
    /// The image role it embeds.
    pub image: String,
    pub metric: Metric,
}

impl Conditioner {
    /// The embedding `[B, D]` of the batch's `image` (a metric that finds no face or person in
    /// an image returns its own placeholder for it, as its `valid` flag says; the model is
    /// conditioned on what the metric returns).
    pub fn embed_batch(&mut self, batch: &data::Batch) -> Result<CpuTensor<f32>> {
        let img = batch_image(batch, &self.image)?;
        self.embed(img)
    }

    /// The embedding `[B, D]` of images `[B, 3, H, W]`.
    pub fn embed(&mut self, images: &CpuTensor<f32>) -> Result<CpuTensor<f32>> {
        let r = self.metric.embed(images.view(), ForwardMode::Eval)?;
        let e = CpuTensor::<f32>::from_managed(&r.embeddings, "embeddings").map_err(|e| EngineError::Plugin {
            plugin: self.metric.id.clone(),
            message: format!("model.conditioning.{}: {}", self.input, e.message),
        })?;
        if e.shape.len() != 2 || e.shape[0] != images.shape[0] {
            return Err(EngineError::Plugin {
                plugin: self.metric.id.clone(),
                message: format!(
                    "model.conditioning.{}: embeddings of shape {:?} for {} images (expected [B, D])",
                    self.input, e.shape, images.shape[0]
                ),
            });
        }
        Ok(e)
    }
}
