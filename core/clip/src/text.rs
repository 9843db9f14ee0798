//! CLIP text tower (transformers' `CLIPTextModel` + `text_projection`, open_clip's
//! `encode_text`) on the transformers-named table of [`crate::weights`], in the dtype the
//! weights were read in (f32 for the metric, f64 for the oracle tests).
use crate::config::TextConfig;
use crate::weights::{block_shapes, Block, Weights};
use crate::{ClipError, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

pub struct TextTower {
    pub cfg: TextConfig,
    w: HashMap<String, Tensor>,
}

/// `last_hidden_state` (after the final LN), `penultimate` (the hidden state entering the last
/// block, what SD2-style pipelines take) and the projected EOT-pooled embedding (not normalised).
pub struct TextOutput {
    pub last_hidden_state: Tensor,
    pub penultimate: Tensor,
    pub text_embeds: Tensor,
}

impl TextTower {
    /// The text half of a checkpoint; every missing or mis-shaped tensor is named.
    pub fn new(weights: &Weights, cfg: &TextConfig, projection_dim: usize) -> Result<Self> {
        let need = Self::expected(cfg, projection_dim);
        let w = weights.take(&need, "text tower: wrong `layers`/width in the config, or not a CLIPModel file")?;
        Ok(Self { cfg: cfg.clone(), w })
    }

    /// The tower's tensors (transformers names) and shapes for `cfg`.
    pub fn expected(cfg: &TextConfig, projection_dim: usize) -> Vec<(String, Vec<i64>)> {
        let (d, p) = (cfg.width as i64, projection_dim as i64);
        let mut need = vec![
            ("text_model.embeddings.token_embedding.weight".to_string(), vec![cfg.vocab_size as i64, d]),
            ("text_model.embeddings.position_embedding.weight".into(), vec![cfg.context_length as i64, d]),
            ("text_model.final_layer_norm.weight".into(), vec![d]),
            ("text_model.final_layer_norm.bias".into(), vec![d]),
            ("text_projection.weight".into(), vec![p, d]),
        ];
        for i in 0..cfg.layers {
            need.extend(block_shapes(&format!("text_model.encoder.layers.{i}"), d, cfg.mlp as i64));
        }
        need
    }

    pub fn kind(&self) -> Kind {
        self.w["text_projection.weight"].kind()
    }

    pub fn device(&self) -> tch::Device {
        self.w["text_projection.weight"].device()
    }

    /// `ids`: [B, L] i64 (L ≤ context_length), `eot`: the pooled position per row.
    pub fn forward(&self, ids: &Tensor, eot: &[usize]) -> Result<TextOutput> {
        let (b, l) = ids.size2().map_err(|e| ClipError::Input(format!("token ids must be [B, L]: {e}")))?;
        if l as usize > self.cfg.context_length || eot.len() != b as usize || eot.iter().any(|&e| e as i64 >= l) {
            return Err(ClipError::Input(format!(
                "token ids [{b}, {l}] with EOT positions {eot:?}: need L <= context_length {} and one position < L per row",
                self.cfg.context_length
            )));
        }
        let dev = self.device();
        let ids = ids.to_device(dev);
        let emb = &self.w["text_model.embeddings.token_embedding.weight"];
        let pos = &self.w["text_model.embeddings.position_embedding.weight"];
        let mut x = emb.index_select(0, &ids.view([-1])).view([b, l, -1]) + pos.narrow(0, 0, l).unsqueeze(0);
        let blk =
            Block { w: &self.w, heads: self.cfg.heads as i64, eps: self.cfg.eps, quick_gelu: self.cfg.quick_gelu };
        // Causal: position i attends to j <= i (-inf strictly above the diagonal, 0 elsewhere).
        let mask = Tensor::full([l, l], f64::NEG_INFINITY, (self.kind(), dev)).triu(1);
        let mut penultimate = x.shallow_clone();
        for i in 0..self.cfg.layers {
            if i + 1 == self.cfg.layers {
                penultimate = x.shallow_clone();
            }
            x = blk.forward(&x, &format!("text_model.encoder.layers.{i}"), Some(&mask));
        }
        let last = blk.ln(&x, "text_model.final_layer_norm");
        let rows = Tensor::from_slice(&(0..b).collect::<Vec<i64>>()).to_device(dev);
        let cols = Tensor::from_slice(&eot.iter().map(|&e| e as i64).collect::<Vec<_>>()).to_device(dev);
        let pooled = last.index(&[Some(rows), Some(cols)]);
        let text_embeds = pooled.linear::<Tensor>(&self.w["text_projection.weight"], None);
        Ok(TextOutput { last_hidden_state: last, penultimate, text_embeds })
    }
}
