//! The project's one CLIP text transformer: the text encoder of SD1.5 and Flux (transformers'
//! `CLIPTextModel`, numerically transformers 5.24) and, with `text_projection` and given pooling
//! positions, core/clip's text tower of the CLIP metric,
//! built on this crate's [`Store`] so that LoRA injection can target
//! `text_model.encoder.layers.*.self_attn.{q,k,v,out}_proj` and `mlp.fc1` / `mlp.fc2`.
//!
//! Parameter names are the `text_model.…` names of SD1.5's `text_encoder/model.safetensors` and of
//! diffusers/kohya text-encoder LoRAs. transformers 5 itself saves the same tensors without the
//! `text_model.` prefix; the loader ([`crate::load::text_encoder_from_diffusers`]) accepts both.

use crate::config::Fields;
use crate::error::{Error, Result};
use crate::nn::{LayerNorm, Linear};
use crate::store::{Store, P};
use serde_json::Value;
use std::path::Path;
use tch::{Kind, Tensor};

/// `hidden_act` of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(1.702·x)` (CLIP ViT-L/14, SD1.5).
    QuickGelu,
    /// exact erf GELU (OpenCLIP ViT-H/14 text towers, SD2).
    Gelu,
}

/// The fields of `text_encoder/config.json` the network depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// The projection's width (CLIPModel / `CLIPTextModelWithProjection`); built only by
    /// [`ClipTextModel::with_projection`].
    pub projection_dim: Option<i64>,
    /// Decides the pooled token (see [`ClipTextModel::forward`]).
    pub eos_token_id: i64,
}

impl ClipTextConfig {
    /// SD1.5's `text_encoder/config.json` (openai/clip-vit-large-patch14's text tower).
    pub fn sd15() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
            eos_token_id: 2,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })?;
        Self::from_value(path, &v)
    }

    /// transformers' `CLIPTextConfig` defaults for absent fields.
    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let f = Fields { path, v };
        let err = |field: &str, msg: String| f.err(field, msg);
        let int = |field: &str, default: i64| f.positive_int(field, default);
        let hidden_act = match v.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu") {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(err("hidden_act", format!("{other:?} is not supported; use quick_gelu or gelu"))),
        };
        let layer_norm_eps = f.positive("layer_norm_eps", 1e-5)?;
        let c = ClipTextConfig {
            vocab_size: int("vocab_size", 49408)?,
            hidden_size: int("hidden_size", 512)?,
            intermediate_size: int("intermediate_size", 2048)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: int("num_attention_heads", 8)?,
            max_position_embeddings: int("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps,
            projection_dim: v.get("projection_dim").and_then(Value::as_i64),
            eos_token_id: f.integer("eos_token_id", 49407, |_| true)?,
        };
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(err(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", c.num_attention_heads, c.hidden_size),
            ));
        }
        Ok(c)
    }
}

/// What one forward pass gives.
pub struct ClipTextOutput {
    /// After `final_layer_norm`: SD1.5's conditioning (`prompt_embeds`), `[B, L, H]`.
    pub last_hidden_state: Tensor,
    /// transformers' `hidden_states[-2]`: the input of the last layer, *before* the final layer
    /// norm. diffusers' `clip_skip = 1` (A1111's "clip skip 2") is `final_layer_norm` of this
    /// ([`ClipTextModel::final_norm`]).
    pub penultimate_hidden_state: Tensor,
    /// `last_hidden_state` at the end-of-text token, `[B, H]`.
    pub pooled: Tensor,
    /// `text_projection(pooled)` (`[B, P]`, not normalised) for a model built with a projection
    /// (CLIPModel's text tower, the CLIP metric's); `None` for a plain `CLIPTextModel`.
    pub text_embeds: Option<Tensor>,
}

/// Which token each row pools at.
#[derive(Clone, Copy, Debug)]
pub enum Pooling<'a> {
    /// transformers 5's rule for the config's `eos_token_id` (see [`ClipTextModel::forward`]).
    Eos,
    /// Given positions, one per row (open_clip's `argmax(ids)` done by the tokenizer).
    At(&'a [usize]),
}

struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// transformers' `CLIPTextModel` (no projection): the text encoder of diffusion pipelines.
    pub fn new(store: &Store, config: &ClipTextConfig) -> Self {
        Self::build(store, config, None)
    }

    /// CLIPModel's text tower: the encoder plus `text_projection` (`[projection_dim, hidden]`, no
    /// bias, at the root as CLIPModel names it): what the CLIP metric embeds texts with.
    pub fn with_projection(store: &Store, config: &ClipTextConfig, projection_dim: i64) -> Self {
        Self::build(store, config, Some(projection_dim))
    }

    fn build(store: &Store, config: &ClipTextConfig, projection_dim: Option<i64>) -> Self {
        let c = config;
        let tm = store.root().sub("text_model");
        let emb = tm.sub("embeddings");
        let token_embedding = emb.sub("token_embedding").param("weight", &[c.vocab_size, c.hidden_size]);
        let position_embedding =
            emb.sub("position_embedding").param("weight", &[c.max_position_embeddings, c.hidden_size]);
        let h = c.hidden_size;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p: P = tm.sub("encoder").sub("layers").sub(i);
                let a = p.sub("self_attn");
                Layer {
                    q_proj: Linear::new(&a.sub("q_proj"), h, h, true),
                    k_proj: Linear::new(&a.sub("k_proj"), h, h, true),
                    v_proj: Linear::new(&a.sub("v_proj"), h, h, true),
                    out_proj: Linear::new(&a.sub("out_proj"), h, h, true),
                    layer_norm1: LayerNorm::new(&p.sub("layer_norm1"), h, c.layer_norm_eps),
                    fc1: Linear::new(&p.sub("mlp").sub("fc1"), h, c.intermediate_size, true),
                    fc2: Linear::new(&p.sub("mlp").sub("fc2"), c.intermediate_size, h, true),
                    layer_norm2: LayerNorm::new(&p.sub("layer_norm2"), h, c.layer_norm_eps),
                }
            })
            .collect();
        let final_layer_norm = LayerNorm::new(&tm.sub("final_layer_norm"), h, c.layer_norm_eps);
        let text_projection = projection_dim.map(|p| Linear::new(&store.root().sub("text_projection"), h, p, false));
        ClipTextModel {
            config: c.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        }
    }

    fn act(&self, x: Tensor) -> Tensor {
        match self.config.hidden_act {
            Activation::QuickGelu => &x * (&x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
        }
    }

    fn layer(&self, l: &Layer, x: &Tensor) -> Tensor {
        let (b, n, h) = x.size3().expect("[B, L, H]");
        let heads = self.config.num_attention_heads;
        let t = l.layer_norm1.forward(x);
        let split = |y: Tensor| y.view([b, n, heads, h / heads]).transpose(1, 2);
        let (q, k, v) = (split(l.q_proj.forward(&t)), split(l.k_proj.forward(&t)), split(l.v_proj.forward(&t)));
        // Causal self-attention with scale head_dim^-½ (transformers' sdpa path: is_causal).
        let o = Tensor::scaled_dot_product_attention::<&Tensor>(&q, &k, &v, None, 0.0, true, None, false);
        let x = x + l.out_proj.forward(&o.transpose(1, 2).reshape([b, n, h]));
        let t = l.layer_norm2.forward(&x);
        &x + l.fc2.forward(&self.act(l.fc1.forward(&t)))
    }

    /// `final_layer_norm` (for a clip-skipped hidden state).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.final_layer_norm.forward(x)
    }

    /// `input_ids` `[B, L]` (int64, L ≤ max_position_embeddings). The pooled token is chosen as
    /// transformers 5 does: with the legacy `eos_token_id == 2` (SD1.5's config) at
    /// `argmax(input_ids)` (the end-of-text id 49407 is the largest in CLIP's vocab), otherwise at
    /// the first position holding `eos_token_id`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_pooled(input_ids, Pooling::Eos)
    }

    /// [`forward`](Self::forward) with the pooled token chosen by `pooling`.
    pub fn forward_pooled(&self, input_ids: &Tensor, pooling: Pooling<'_>) -> Result<ClipTextOutput> {
        let c = &self.config;
        let size = input_ids.size();
        if size.len() != 2 || size[1] < 1 || size[1] > c.max_position_embeddings {
            return Err(Error::Config {
                path: "<input_ids>".into(),
                field: "shape".into(),
                msg: format!(
                    "{size:?}: pass [batch, length] token ids with 1 ≤ length ≤ max_position_embeddings = {} \
                     (tokenize with truncation to {})",
                    c.max_position_embeddings, c.max_position_embeddings
                ),
            });
        }
        if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::Config {
                path: "<input_ids>".into(),
                field: "dtype".into(),
                msg: format!("{:?}: token ids must be int64", input_ids.kind()),
            });
        }
        let (b, n) = (size[0], size[1]);
        let ids = input_ids.to_kind(Kind::Int64).to_device(self.token_embedding.device());
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= c.vocab_size {
            return Err(Error::Config {
                path: "<input_ids>".into(),
                field: "values".into(),
                msg: format!("ids span {lo}..={hi}; they must be in 0..{} (vocab_size)", c.vocab_size),
            });
        }
        let tok = Tensor::embedding(&self.token_embedding, &ids, -1, false, false);
        let mut x = tok + self.position_embedding.narrow(0, 0, n).unsqueeze(0);
        let mut penultimate = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.shallow_clone();
            }
            x = self.layer(l, &x);
        }
        let last = self.final_layer_norm.forward(&x);
        let eot = match pooling {
            Pooling::At(at) => {
                if at.len() != b as usize || at.iter().any(|&e| e as i64 >= n) {
                    return Err(Error::Config {
                        path: "<input_ids>".into(),
                        field: "pooling".into(),
                        msg: format!("EOT positions {at:?} for [{b}, {n}] ids: one position < {n} per row"),
                    });
                }
                Tensor::from_slice(&at.iter().map(|&e| e as i64).collect::<Vec<_>>()).to_device(ids.device())
            }
            Pooling::Eos if c.eos_token_id == 2 => ids.argmax(-1, false),
            // argmax of a 0/1 mask = the first maximal position (the first EOS).
            Pooling::Eos => ids.eq(c.eos_token_id).to_kind(Kind::Int).argmax(-1, false),
        };
        let flat = Tensor::arange(b, (Kind::Int64, ids.device())) * n + eot;
        let pooled = last.reshape([b * n, -1]).index_select(0, &flat);
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(&pooled));
        Ok(ClipTextOutput { last_hidden_state: last, penultimate_hidden_state: penultimate, pooled, text_embeds })
    }
}
