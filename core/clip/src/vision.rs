//! CLIP image tower (ViT): transformers' `CLIPVisionModel` + `visual_projection` / open_clip's
//! `VisionTransformer` (pool type `tok`): patch conv (no bias) → [CLS; patches] + positional
//! embedding → pre-LN → pre-LN residual blocks → post-LN of the CLS token → projection (no bias).
//! Weights are frozen; the graph is differentiable in the input pixels (DRIP's L_text).
use crate::config::VisionConfig;
use crate::weights::{block_shapes, Block, Weights};
use crate::{ClipError, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

pub struct VisionTower {
    pub cfg: VisionConfig,
    w: HashMap<String, Tensor>,
}

/// `last_hidden_state` (the encoder output, before the post-LN, as transformers returns it),
/// `pooler_output` (post-LN of the CLS token) and the projected `image_embeds` (not normalised).
pub struct VisionOutput {
    pub last_hidden_state: Tensor,
    pub pooler_output: Tensor,
    pub image_embeds: Tensor,
}

impl VisionTower {
    pub fn new(weights: &Weights, cfg: &VisionConfig, projection_dim: usize) -> Result<Self> {
        let need = Self::expected(cfg, projection_dim);
        let w = weights.take(&need, "image tower: wrong `layers`/width/patch_size/image_size in the config?")?;
        Ok(Self { cfg: cfg.clone(), w })
    }

    /// The tower's tensors (transformers names) and shapes for `cfg`.
    pub fn expected(cfg: &VisionConfig, projection_dim: usize) -> Vec<(String, Vec<i64>)> {
        let (d, ps) = (cfg.width as i64, cfg.patch_size as i64);
        let grid = (cfg.image_size / cfg.patch_size) as i64;
        let mut need = vec![
            ("vision_model.embeddings.patch_embedding.weight".to_string(), vec![d, 3, ps, ps]),
            ("vision_model.embeddings.class_embedding".into(), vec![d]),
            ("vision_model.embeddings.position_embedding.weight".into(), vec![grid * grid + 1, d]),
            ("vision_model.pre_layrnorm.weight".into(), vec![d]),
            ("vision_model.pre_layrnorm.bias".into(), vec![d]),
            ("vision_model.post_layernorm.weight".into(), vec![d]),
            ("vision_model.post_layernorm.bias".into(), vec![d]),
            ("visual_projection.weight".into(), vec![projection_dim as i64, d]),
        ];
        for i in 0..cfg.layers {
            need.extend(block_shapes(&format!("vision_model.encoder.layers.{i}"), d, cfg.mlp as i64));
        }
        need
    }

    pub fn kind(&self) -> Kind {
        self.w["visual_projection.weight"].kind()
    }

    pub fn device(&self) -> tch::Device {
        self.w["visual_projection.weight"].device()
    }

    /// `pixels`: [B, 3, S, S] already preprocessed (CLIP-normalised, S = image_size), in the
    /// tower's kind and device. Differentiable in `pixels`.
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let s = self.cfg.image_size as i64;
        let size = pixels.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            return Err(ClipError::Input(format!(
                "the image tower takes preprocessed [B, 3, {s}, {s}] pixels, got {size:?} (resize and crop first: \
                 likeness_clip::preprocess)"
            )));
        }
        let b = size[0];
        let ps = self.cfg.patch_size as i64;
        let patches = pixels.conv2d::<Tensor>(
            &self.w["vision_model.embeddings.patch_embedding.weight"],
            None,
            [ps, ps],
            [0, 0],
            [1, 1],
            1,
        );
        let d = self.cfg.width as i64;
        let patches = patches.flatten(2, 3).transpose(1, 2);
        let cls = self.w["vision_model.embeddings.class_embedding"].view([1, 1, d]).expand([b, 1, d], false);
        let x =
            Tensor::cat(&[cls, patches], 1) + self.w["vision_model.embeddings.position_embedding.weight"].unsqueeze(0);
        let blk =
            Block { w: &self.w, heads: self.cfg.heads as i64, eps: self.cfg.eps, quick_gelu: self.cfg.quick_gelu };
        let mut x = blk.ln(&x, "vision_model.pre_layrnorm");
        for i in 0..self.cfg.layers {
            x = blk.forward(&x, &format!("vision_model.encoder.layers.{i}"), None);
        }
        let pooled = blk.ln(&x.select(1, 0), "vision_model.post_layernorm");
        let image_embeds = pooled.linear::<Tensor>(&self.w["visual_projection.weight"], None);
        Ok(VisionOutput { last_hidden_state: x, pooler_output: pooled, image_embeds })
    }
}
