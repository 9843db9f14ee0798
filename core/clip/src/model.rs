//! Both towers of one checkpoint and CLIP's scores.
use crate::config::ClipConfig;
use crate::text::TextTower;
use crate::vision::VisionTower;
use crate::weights::{Layout, Weights};
use crate::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct ClipModel {
    pub cfg: ClipConfig,
    pub layout: Layout,
    pub text: TextTower,
    pub vision: VisionTower,
    /// ln of CLIP's temperature: the checkpoint's `logit_scale` or the config's init value.
    pub logit_scale: f64,
}

impl ClipModel {
    /// Reads a transformers CLIPModel `model.safetensors` or an OpenAI/open_clip safetensors
    /// state dict (the layout is detected from the keys) in `kind` (f32 or f64) on `device`.
    pub fn load(path: &Path, cfg: &ClipConfig, kind: Kind, device: Device) -> Result<Self> {
        Self::from_weights(&Weights::read(path, kind, device)?, cfg)
    }

    /// Both towers from a weight table already read (or built: [`ClipModel::random`]).
    pub fn from_weights(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let text = TextTower::new(w, &cfg.text, cfg.projection_dim)?;
        let vision = VisionTower::new(w, &cfg.vision, cfg.projection_dim)?;
        let logit_scale = w.map.get("logit_scale").map_or(cfg.logit_scale_init, |t| t.double_value(&[]));
        Ok(Self { cfg: cfg.clone(), layout: w.layout, text, vision, logit_scale })
    }

    /// Seeded random weights of the shapes `cfg` asks for (tests and benchmarks only): LayerNorms
    /// at identity, biases 0, embeddings N(0, 0.02²), matrices N(0, 1/fan_in) so that activations
    /// stay O(1) through the blocks.
    pub fn random(cfg: &ClipConfig, seed: i64, kind: Kind, device: Device) -> Result<Self> {
        tch::manual_seed(seed);
        let mut need = TextTower::expected(&cfg.text, cfg.projection_dim);
        need.extend(VisionTower::expected(&cfg.vision, cfg.projection_dim));
        let opts = (Kind::Float, Device::Cpu);
        let map = need
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.contains("norm") || name.contains("layrnorm") {
                    if name.ends_with(".weight") {
                        Tensor::ones(&shape[..], opts)
                    } else {
                        Tensor::zeros(&shape[..], opts)
                    }
                } else if name.ends_with(".bias") {
                    Tensor::zeros(&shape[..], opts)
                } else if name.contains("embedding") {
                    Tensor::randn(&shape[..], opts) * 0.02
                } else {
                    let fan_in: i64 = shape[1..].iter().product();
                    Tensor::randn(&shape[..], opts) / (fan_in as f64).sqrt()
                };
                (name, t.to_kind(kind).to_device(device))
            })
            .collect();
        let w = Weights { path: "<random weights>".into(), layout: Layout::Transformers, map };
        Self::from_weights(&w, cfg)
    }
}

/// Rows scaled to unit L2 norm (`x / ‖x‖`, as open_clip's `normalize=True` and CLIPModel's
/// logits do; a zero row becomes NaN, which callers report as invalid).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.square().sum_dim_intlist(&[-1i64][..], true, x.kind()).sqrt()
}

/// `[Ba, Bb]` cosine similarities of the rows of `a` and `b` (image–text or image–image).
pub fn cosine(a: &Tensor, b: &Tensor) -> Tensor {
    l2_normalize(a).matmul(&l2_normalize(b).tr())
}

/// CLIPModel's `logits_per_image`: `exp(logit_scale) · cos(image, text)`, `[B_image, B_text]`.
pub fn logits_per_image(image_embeds: &Tensor, text_embeds: &Tensor, logit_scale: f64) -> Tensor {
    cosine(image_embeds, text_embeds) * logit_scale.exp()
}
