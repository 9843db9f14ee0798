//! The T5 encoder (transformers' `T5EncoderModel`, numerically transformers 5.24 with its default
//! sdpa attention): Flux's `text_encoder_2` (google/t5-v1_1-xxl: gated-gelu feed-forward,
//! 24 layers, d_model 4096), built from its config.json on this crate's [`Store`] with the
//! transformers state-dict names (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q`, …),
//! so that LoRA injection can target `SelfAttention.{q,k,v,o}` and `DenseReluDense.*`.
//!
//! What makes T5 differ from a textbook transformer, and is reproduced here:
//! - T5LayerNorm is an RMS norm (no mean subtraction, no bias), its variance taken in fp32;
//! - no `1/√d_kv` scaling of the scores (T5 folds it into the initialisation of `q`);
//! - one relative position bias, owned by block 0 and added to every layer's scores; positions
//!   are bucketed bidirectionally (half the buckets per sign, half of those exact, the rest
//!   logarithmic up to `relative_attention_max_distance`);
//! - the attention mask (1 = attend) enters as the dtype's minimum on masked keys, added to the
//!   position bias, as transformers' sdpa path does;
//! - dropout is an inference no-op and is not built.
//!
//! Deliberately absent: the decoder (Flux uses the encoder only), `inputs_embeds`, and
//! transformers' `_keep_in_fp32_modules = ["wo"]` (a bf16/fp16 [`Store`] keeps every weight in its
//! kind; with fp16 the feed-forward output can overflow, which that rule exists to avoid — load
//! T5 in bf16 or fp32). The tokenizer is the `tokenizers` crate on `tokenizer_2/`.

use crate::config::Fields;
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::store::{Store, P};
use serde_json::Value;
use std::path::Path;
use tch::{Kind, Tensor};

/// The activation of the feed-forward (`feed_forward_proj` = `[gated-]{act}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum T5Activation {
    Relu,
    /// Exact erf GELU (`gelu`, only when not gated: transformers maps `gated-gelu` to gelu_new).
    Gelu,
    /// The tanh approximation (`gelu_new`; t5-v1_1's `gated-gelu`).
    GeluNew,
    Silu,
}

/// The fields of a `T5Config` the encoder depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
    /// `gated-…`: `wi_0` (activated) × `wi_1`, else one `wi`.
    pub gated: bool,
    pub activation: T5Activation,
}

impl T5Config {
    /// google/t5-v1_1-xxl, Flux's `text_encoder_2/config.json`.
    pub fn t5_v1_1_xxl() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            gated: true,
            activation: T5Activation::GeluNew,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })?;
        Self::from_value(path, &v)
    }

    /// transformers' `T5Config` defaults for absent fields.
    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let f = Fields { path, v };
        let err = |field: &str, msg: String| f.err(field, msg);
        let int = |field: &str, default: i64| f.positive_int(field, default);
        let proj = v.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu");
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => return Err(err("feed_forward_proj", format!("{proj:?} is not `gated-<act>` or `<act>`"))),
        };
        let activation = match (gated, act) {
            // transformers' backwards-compatibility rule: `gated-gelu` means gelu_new.
            (true, "gelu") | (_, "gelu_new") => T5Activation::GeluNew,
            (false, "gelu") => T5Activation::Gelu,
            (_, "relu") => T5Activation::Relu,
            (_, "silu") => T5Activation::Silu,
            _ => {
                return Err(err(
                    "feed_forward_proj",
                    format!("{proj:?} is not supported; use relu, gated-gelu, gelu_new or silu (optionally gated-)"),
                ))
            }
        };
        let layer_norm_epsilon = f.positive("layer_norm_epsilon", 1e-6)?;
        let c = T5Config {
            vocab_size: int("vocab_size", 32128)?,
            d_model: int("d_model", 512)?,
            d_kv: int("d_kv", 64)?,
            d_ff: int("d_ff", 2048)?,
            num_layers: int("num_layers", 6)?,
            num_heads: int("num_heads", 8)?,
            relative_attention_num_buckets: int("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: int("relative_attention_max_distance", 128)?,
            layer_norm_epsilon,
            gated,
            activation,
        };
        // Bidirectional bucketing halves the buckets, then halves again for the exact range: at
        // least 4 buckets keep both halves non-empty (the log branch divides by their size).
        if c.relative_attention_num_buckets < 4 {
            return Err(err(
                "relative_attention_num_buckets",
                format!("{} is too few; bidirectional bucketing needs at least 4", c.relative_attention_num_buckets),
            ));
        }
        Ok(c)
    }
}

/// T5's RMS norm: `weight · x / √(mean(x²) + ε)`, the mean taken in fp32.
pub struct T5LayerNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl T5LayerNorm {
    pub fn new(p: &P, c: i64, eps: f64) -> Self {
        T5LayerNorm { weight: p.param("weight", &[c]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x.to_kind(Kind::Float).pow_tensor_scalar(2).mean_dim(-1, true, None::<Kind>);
        let h = x * (variance + self.eps).rsqrt();
        // As transformers: back to a reduced-precision weight's kind before the scale.
        let h =
            if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) { h.to_kind(self.weight.kind()) } else { h };
        &self.weight * h
    }
}

/// The feed-forward half of a block (`layer.1`).
struct FeedForward {
    layer_norm: T5LayerNorm,
    /// `[wi]` or `[wi_0, wi_1]`.
    wi: Vec<Linear>,
    wo: Linear,
}

struct Block {
    layer_norm: T5LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff: FeedForward,
}

pub struct T5EncoderModel {
    pub config: T5Config,
    shared: Tensor,
    /// `[num_buckets, num_heads]`, block 0's; shared by every block.
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
}

fn block(p: &P, c: &T5Config) -> Block {
    let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
    let a = p.sub("layer").sub(0).sub("SelfAttention");
    let f = p.sub("layer").sub(1);
    let ff = f.sub("DenseReluDense");
    let wi = if c.gated {
        vec![Linear::new(&ff.sub("wi_0"), d, c.d_ff, false), Linear::new(&ff.sub("wi_1"), d, c.d_ff, false)]
    } else {
        vec![Linear::new(&ff.sub("wi"), d, c.d_ff, false)]
    };
    Block {
        layer_norm: T5LayerNorm::new(&p.sub("layer").sub(0).sub("layer_norm"), d, c.layer_norm_epsilon),
        q: Linear::new(&a.sub("q"), d, inner, false),
        k: Linear::new(&a.sub("k"), d, inner, false),
        v: Linear::new(&a.sub("v"), d, inner, false),
        o: Linear::new(&a.sub("o"), inner, d, false),
        ff: FeedForward {
            layer_norm: T5LayerNorm::new(&f.sub("layer_norm"), d, c.layer_norm_epsilon),
            wi,
            wo: Linear::new(&ff.sub("wo"), c.d_ff, d, false),
        },
    }
}

/// The most negative finite value of `kind` (transformers' `torch.finfo(dtype).min`): a masked
/// key's score, finite so that a fully masked row gives a uniform softmax rather than NaN.
fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

impl T5EncoderModel {
    pub fn new(store: &Store, config: &T5Config) -> Self {
        let c = config;
        let root = store.root();
        let shared = root.sub("shared").param("weight", &[c.vocab_size, c.d_model]);
        let enc = root.sub("encoder");
        // Constructed in transformers' order: block 0's relative bias sits among its attention.
        let mut relative_attention_bias = None;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let p = enc.sub("block").sub(i);
                let b = block(&p, c);
                if i == 0 {
                    let a = p.sub("layer").sub(0).sub("SelfAttention").sub("relative_attention_bias");
                    relative_attention_bias = Some(a.param("weight", &[c.relative_attention_num_buckets, c.num_heads]));
                }
                b
            })
            .collect();
        // num_layers ≥ 1 is checked by the config; a hand-made 0-layer config gets an unused,
        // unregistered zero bias.
        let relative_attention_bias = relative_attention_bias.unwrap_or_else(|| {
            Tensor::zeros([c.relative_attention_num_buckets, c.num_heads], (store.kind, store.device))
        });
        let final_layer_norm = T5LayerNorm::new(&enc.sub("final_layer_norm"), c.d_model, c.layer_norm_epsilon);
        T5EncoderModel { config: c.clone(), shared, relative_attention_bias, blocks, final_layer_norm }
    }

    /// The bucket of each `memory − query` position, `[q_len, k_len]` int64: transformers'
    /// `_relative_position_bucket` with `bidirectional = True`, in the same fp32 torch ops: the
    /// logarithmic bucket truncates an f32 expression, so a position whose value lands on a
    /// bucket boundary must round as transformers' does (with t5-v1_1's 32 / 128 an f64
    /// evaluation happens to agree over 0..512; other configs are not checked for that).
    pub fn relative_position_bucket(&self, q_len: i64, k_len: i64) -> Tensor {
        let c = &self.config;
        let dev = self.relative_attention_bias.device();
        let ctx = Tensor::arange(q_len, (Kind::Int64, dev)).unsqueeze(1);
        let mem = Tensor::arange(k_len, (Kind::Int64, dev)).unsqueeze(0);
        let rel = mem - ctx;
        let half = c.relative_attention_num_buckets / 2;
        let sign = rel.gt(0).to_kind(Kind::Int64) * half;
        let rel = rel.abs();
        let max_exact = half / 2;
        let is_small = rel.lt(max_exact);
        let large = (rel.to_kind(Kind::Float) / max_exact as f64).log()
            / (c.relative_attention_max_distance as f64 / max_exact as f64).ln()
            * (half - max_exact) as f64;
        let large = (large.to_kind(Kind::Int64) + max_exact).clamp_max(half - 1);
        sign + rel.where_self(&is_small, &large)
    }

    /// `[1, heads, q_len, k_len]` in the weights' kind.
    pub fn position_bias(&self, q_len: i64, k_len: i64) -> Tensor {
        let buckets = self.relative_position_bucket(q_len, k_len);
        Tensor::embedding(&self.relative_attention_bias, &buckets, -1, false, false).permute([2, 0, 1]).unsqueeze(0)
    }

    fn attention(&self, b: &Block, x: &Tensor, bias: &Tensor) -> Tensor {
        let (n, l, _) = x.size3().expect("[B, L, d_model]");
        let (h, dk) = (self.config.num_heads, self.config.d_kv);
        let t = b.layer_norm.forward(x);
        let split = |y: Tensor| y.view([n, l, h, dk]).transpose(1, 2);
        let (q, k, v) = (split(b.q.forward(&t)), split(b.k.forward(&t)), split(b.v.forward(&t)));
        // scale 1: T5 does not divide the scores by √d_kv.
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(bias), 0.0, false, 1.0, false);
        x + b.o.forward(&o.transpose(1, 2).reshape([n, l, h * dk]))
    }

    fn act(&self, x: Tensor) -> Tensor {
        match self.config.activation {
            T5Activation::Relu => x.relu(),
            T5Activation::Gelu => x.gelu("none"),
            T5Activation::GeluNew => x.gelu("tanh"),
            T5Activation::Silu => x.silu(),
        }
    }

    fn feed_forward(&self, f: &FeedForward, x: &Tensor) -> Tensor {
        let t = f.layer_norm.forward(x);
        let h = match f.wi.as_slice() {
            [wi_0, wi_1] => self.act(wi_0.forward(&t)) * wi_1.forward(&t),
            [wi] => self.act(wi.forward(&t)),
            _ => unreachable!("built with one or two input projections"),
        };
        x + f.wo.forward(&h)
    }

    fn check_inputs(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        let bad = |field: &str, msg: String| Error::Config { path: "<input_ids>".into(), field: field.into(), msg };
        let size = input_ids.size();
        if size.len() != 2 || size[1] < 1 {
            return Err(bad("shape", format!("{size:?}: pass [batch, length ≥ 1] token ids")));
        }
        if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(bad("dtype", format!("{:?}: token ids must be int64", input_ids.kind())));
        }
        let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.config.vocab_size {
            return Err(bad(
                "values",
                format!("ids span {lo}..={hi}; they must be in 0..{} (vocab_size)", self.config.vocab_size),
            ));
        }
        if let Some(m) = mask {
            if m.size() != size {
                return Err(bad(
                    "attention_mask",
                    format!(
                        "shape {:?} differs from the ids' {size:?}; pass [batch, length] of 1 (attend) / 0",
                        m.size()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `input_ids` `[B, L]` int64, `attention_mask` `[B, L]` (nonzero = attend; None = all tokens,
    /// which is what Flux does: the prompt padded to max_sequence_length and every pad attended).
    /// Returns `last_hidden_state` `[B, L, d_model]` (after `final_layer_norm`).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.check_inputs(input_ids, attention_mask)?;
        let dev = self.shared.device();
        let ids = input_ids.to_kind(Kind::Int64).to_device(dev);
        let l = ids.size()[1];
        let mut x = Tensor::embedding(&self.shared, &ids, -1, false, false);
        let mut bias = self.position_bias(l, l);
        if let Some(m) = attention_mask {
            // [B, 1, 1, L]: masked keys get the kind's minimum (transformers' sdpa position-bias mask).
            let masked = m.to_device(dev).eq(0).view([-1, 1, 1, l]);
            bias = bias.masked_fill(&masked, finfo_min(bias.kind()));
        }
        for b in &self.blocks {
            x = self.attention(b, &x, &bias);
            x = self.feed_forward(&b.ff, &x);
        }
        Ok(self.final_layer_norm.forward(&x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<T5Config> {
        T5Config::from_value(Path::new("text_encoder_2/config.json"), &v)
    }

    /// `feed_forward_proj` as transformers reads it: `gated-gelu` is gelu_new (its
    /// backwards-compatibility rule), a bare `gelu` the exact one; unknown forms are named.
    #[test]
    fn feed_forward_proj_follows_transformers() {
        let c = parse(serde_json::json!({"feed_forward_proj": "gated-gelu"})).unwrap();
        assert_eq!((c.gated, c.activation), (true, T5Activation::GeluNew));
        let c = parse(serde_json::json!({})).unwrap();
        assert_eq!((c.gated, c.activation, c.d_model, c.layer_norm_epsilon), (false, T5Activation::Relu, 512, 1e-6));
        let c = parse(serde_json::json!({"feed_forward_proj": "gelu"})).unwrap();
        assert_eq!((c.gated, c.activation), (false, T5Activation::Gelu));
        let c = parse(serde_json::json!({"feed_forward_proj": "gated-silu"})).unwrap();
        assert_eq!((c.gated, c.activation), (true, T5Activation::Silu));
        for (bad, want) in [
            ("gated-swish", "\"gated-swish\" is not supported"),
            ("a-b", "\"a-b\" is not `gated-<act>`"),
            ("gated-gelu-x", "is not supported"),
        ] {
            let e = parse(serde_json::json!({"feed_forward_proj": bad})).unwrap_err().to_string();
            assert!(e.contains("text_encoder_2/config.json: field `feed_forward_proj`") && e.contains(want), "{e}");
        }
        let e = parse(serde_json::json!({"relative_attention_num_buckets": 2})).unwrap_err().to_string();
        assert!(e.contains("`relative_attention_num_buckets`: 2 is too few"), "{e}");
        let e = parse(serde_json::json!({"d_model": -4})).unwrap_err().to_string();
        assert!(e.contains("`d_model`: -4 is not a positive integer"), "{e}");
    }
}
