//! The CLIP text encoder of the pipeline (core/diffusion-torch's `ClipTextModel`) and SD1.5's
//! conditioning with `clip_skip`.

use std::path::Path;

use likeness_diffusion_torch::clip_text::{ClipTextConfig, ClipTextModel};
use likeness_diffusion_torch::{load, Store};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use likeness_diffusion_torch::trainer::Result;

pub struct TextEncoder {
    store: Store,
    model: ClipTextModel,
}

impl TextEncoder {
    pub fn from_diffusers(root: &Path, kind: Kind, device: Device) -> Result<Self> {
        let (store, model) = load::text_encoder_from_diffusers(root, kind, device)?;
        Ok(TextEncoder { store, model })
    }

    /// From an original single file, with the component config `cfg` (read from `cfg_path`).
    pub fn from_single_file(file: &Path, cfg_path: &str, cfg: &Value, kind: Kind, device: Device) -> Result<Self> {
        let cfg = ClipTextConfig::from_value(Path::new(cfg_path), cfg)?;
        let (store, model) = load::text_encoder_from_single_file(file, &cfg, kind, device)?;
        Ok(TextEncoder { store, model })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn hidden_size(&self) -> i64 {
        self.model.config.hidden_size
    }

    /// `[B, 77, D]` conditioning: `last_hidden_state` (clip_skip 1) or the penultimate layer's
    /// output through `final_layer_norm` (clip_skip 2, as sd-scripts and diffusers' `clip_skip=1`).
    pub fn forward(&self, ids: &Tensor, clip_skip: u32) -> Result<Tensor> {
        let out = self.model.forward(ids)?;
        Ok(if clip_skip >= 2 { self.model.final_norm(&out.penultimate_hidden_state) } else { out.last_hidden_state })
    }
}
