//! CLIP text tower (transformers' `CLIPTextModel` + `text_projection`, open_clip's
//! `encode_text`): the diffusion toolkit's [`ClipTextModel`] — one CLIP text transformer for the
//! metric, SD1.5 and Flux — built with its projection on a [`Store`] filled from the
//! transformers-named table of [`crate::weights`], in the dtype the weights were read in (f32 for
//! the metric, f64 for the oracle tests), and pooled at the tokenizer's end-of-text positions.
use crate::config::TextConfig;
use crate::weights::Weights;
use crate::{ClipError, Result};
use likeness_diffusion_torch::clip_text::{Activation, ClipTextConfig, ClipTextModel, Pooling};
use likeness_diffusion_torch::{Mode, Store};
use tch::{Kind, Tensor};

pub struct TextTower {
    pub cfg: TextConfig,
    store: Store,
    model: ClipTextModel,
}

/// `last_hidden_state` (after the final LN), `penultimate` (the hidden state entering the last
/// block, what SD2-style pipelines take) and the projected EOT-pooled embedding (not normalised).
pub struct TextOutput {
    pub last_hidden_state: Tensor,
    pub penultimate: Tensor,
    pub text_embeds: Tensor,
}

/// The toolkit's config for this tower (the EOS id is unused: the tokenizer gives the positions).
fn toolkit_config(cfg: &TextConfig, projection_dim: usize) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: cfg.vocab_size as i64,
        hidden_size: cfg.width as i64,
        intermediate_size: cfg.mlp as i64,
        num_hidden_layers: cfg.layers as i64,
        num_attention_heads: cfg.heads as i64,
        max_position_embeddings: cfg.context_length as i64,
        hidden_act: if cfg.quick_gelu { Activation::QuickGelu } else { Activation::Gelu },
        layer_norm_eps: cfg.eps,
        projection_dim: Some(projection_dim as i64),
        eos_token_id: 49407,
    }
}

impl TextTower {
    /// The text half of a checkpoint; every missing or mis-shaped tensor is named.
    pub fn new(weights: &Weights, cfg: &TextConfig, projection_dim: usize) -> Result<Self> {
        let need = Self::expected(cfg, projection_dim);
        let w = weights.take(&need, "text tower: wrong `layers`/width in the config, or not a CLIPModel file")?;
        let first = &w["text_projection.weight"];
        let store = Store::new(Mode::Alloc, first.kind(), first.device());
        let model = ClipTextModel::with_projection(&store, &toolkit_config(cfg, projection_dim), projection_dim as i64);
        tch::no_grad(|| {
            for (name, mut p) in store.named_parameters() {
                p.copy_(&w[&name]);
            }
        });
        Ok(Self { cfg: cfg.clone(), store, model })
    }

    /// The tower's tensors (transformers names) and shapes for `cfg`: those of the toolkit's
    /// model, planned without allocating.
    pub fn expected(cfg: &TextConfig, projection_dim: usize) -> Vec<(String, Vec<i64>)> {
        let store = Store::new(Mode::Plan, Kind::Float, tch::Device::Cpu);
        let _ = ClipTextModel::with_projection(&store, &toolkit_config(cfg, projection_dim), projection_dim as i64);
        store.shapes()
    }

    pub fn kind(&self) -> Kind {
        self.store.kind
    }

    pub fn device(&self) -> tch::Device {
        self.store.device
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
        let out = self.model.forward_pooled(ids, Pooling::At(eot)).map_err(|e| ClipError::Input(e.to_string()))?;
        Ok(TextOutput {
            last_hidden_state: out.last_hidden_state,
            penultimate: out.penultimate_hidden_state,
            text_embeds: out.text_embeds.expect("built with a projection"),
        })
    }
}
