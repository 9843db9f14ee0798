//! Qwen2.5-VL as Qwen-Image-Edit-2509's text encoder (transformers 5.24's
//! `Qwen2_5_VLForConditionalGeneration` without `lm_head`, called as diffusers 0.42.1's
//! `QwenImageEditPlusPipeline._get_qwen_prompt_embeds` calls it), with transformers 5's
//! parameter names (`model.language_model.*`, `model.visual.*`; the legacy `model.layers.*` /
//! `visual.*` of transformers-4 folders and ComfyUI single files are renamed on load).
//!
//! - [`QwenVlConfig`]: config.json, transformers 5 (nested `text_config`) or 4.x (text keys at
//!   the top level); the defaults are Qwen2.5-VL-7B's, so a single file without config builds it.
//! - [`QwenTextModel`]: the Qwen2 decoder (GQA, q/k/v bias, rotate_half RoPE, causal + padding
//!   mask, SwiGLU), giving the state after the final norm (= diffusers' `hidden_states[-1]`).
//!   Positions are 1-D `arange` as in the oracle (diffusers does not forward
//!   `mm_token_type_ids`, diffusers#14194); M-RoPE (`get_rope_index`) behind
//!   [`QwenVlEncoder::mrope`].
//! - [`QwenVisionModel`]: patch embed, 2-D RoPE, window attention with full-attention blocks,
//!   merger, several images per call.
//! - [`ImageProcessor`]: `Qwen2VLImageProcessor` on CPU (smart_resize, libtorch's uint8
//!   antialiased bicubic, fused CLIP normalisation, block-major patches).
//! - [`QwenTokenizer`]: `tokenizer.json`, or the Qwen2 BPE pipeline built from vocab.json +
//!   merges.txt + tokenizer_config.json's added tokens; no BOS/EOS.
//! - [`QwenVlEncoder::encode_edit_plus`]: template, `Picture i:` prefixes, image-token expansion,
//!   the forward, drop of the first 64 tokens, zero padding with a 0/1 mask.

use crate::config::{cfg_err, read_json, Fields};
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::store::{Mode, Store, P};
use serde_json::{json, Value};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// `(t, h, w)`: one image's grid of patches (`image_grid_thw`'s row; t = 1 for images).
pub type Grid = (i64, i64, i64);

/// The decoder's fields (`text_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct QwenTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Frequency slots per axis (t, h, w); sums to head_dim / 2.
    pub mrope_section: Vec<i64>,
}

/// The vision tower's fields (`vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct QwenVisionConfig {
    pub depth: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_heads: i64,
    pub out_hidden_size: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub temporal_patch_size: i64,
    pub spatial_merge_size: i64,
    pub window_size: i64,
    pub fullatt_block_indexes: Vec<i64>,
    pub rope_theta: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QwenVlConfig {
    pub text: QwenTextConfig,
    pub vision: QwenVisionConfig,
    pub image_token_id: i64,
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
}

impl QwenTextConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

impl QwenVisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// Values per patch row: `C · T · P · P` (1176 for the real model).
    pub fn patch_dim(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches per merged token (4).
    pub fn merge_unit(&self) -> i64 {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

impl QwenVlConfig {
    /// Qwen2.5-VL-7B-Instruct (Qwen-Image's `text_encoder/config.json`).
    pub fn qwen2_5_vl_7b() -> Self {
        Self::from_value(Path::new("<Qwen2.5-VL-7B defaults>"), &json!({})).expect("the defaults are valid")
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, &read_json(path)?)
    }

    /// transformers 5's layout (`text_config` / `vision_config` objects) or 4.x's (the text
    /// fields at the top level); absent fields take Qwen2.5-VL-7B's values (not the config
    /// classes' defaults, which are another model's: 8192 wide text, 3584 wide vision).
    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let text = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
        let vision = v.get("vision_config").filter(|t| t.is_object()).cloned().unwrap_or(json!({}));
        let top = Fields { path, v };
        let c = QwenVlConfig {
            text: text_config(path, text)?,
            vision: vision_config(path, &vision)?,
            image_token_id: top.integer("image_token_id", 151655, |n| n >= 0)?,
            vision_start_token_id: top.integer("vision_start_token_id", 151652, |n| n >= 0)?,
            vision_end_token_id: top.integer("vision_end_token_id", 151653, |n| n >= 0)?,
        };
        if c.vision.out_hidden_size != c.text.hidden_size {
            return Err(cfg_err(
                path,
                "vision_config.out_hidden_size",
                format!(
                    "{} must equal the text hidden_size {} (the merger's output replaces token embeddings)",
                    c.vision.out_hidden_size, c.text.hidden_size
                ),
            ));
        }
        Ok(c)
    }
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (4.x; `type: mrope` is transformers'
/// alias of the default rope with sections): (theta, mrope_section).
fn text_rope(path: &Path, t: &Value) -> Result<(f64, Vec<i64>)> {
    let rope = t.get("rope_parameters").or_else(|| t.get("rope_scaling")).filter(|r| r.is_object());
    let empty = json!({});
    let r = rope.unwrap_or(&empty);
    let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
    if kind != "default" && kind != "mrope" {
        return Err(cfg_err(
            path,
            "rope_parameters.rope_type",
            format!("{kind:?} is not supported; Qwen2.5-VL uses \"default\" (or its alias \"mrope\")"),
        ));
    }
    let theta = r.get("rope_theta").or_else(|| t.get("rope_theta")).and_then(Value::as_f64).unwrap_or(1e6);
    let section = match r.get("mrope_section") {
        None => vec![16, 24, 24],
        Some(s) => serde_json::from_value::<Vec<i64>>(s.clone())
            .ok()
            .filter(|s| s.len() == 3 && s.iter().all(|&n| n > 0))
            .ok_or_else(|| cfg_err(path, "mrope_section", format!("{s} is not three positive integers")))?,
    };
    Ok((theta, section))
}

fn text_config(path: &Path, t: &Value) -> Result<QwenTextConfig> {
    let f = Fields { path, v: t };
    let int = |field: &str, default: i64| f.positive_int(field, default);
    refuse_values(path, t, &[("hidden_act", json!("silu")), ("use_sliding_window", json!(false))])?;
    if let Some(types) = t.get("layer_types").and_then(Value::as_array) {
        if types.iter().any(|x| x != "full_attention") {
            return Err(cfg_err(path, "layer_types", "only full_attention layers are supported (no sliding window)"));
        }
    }
    let (rope_theta, mrope_section) = text_rope(path, t)?;
    let c = QwenTextConfig {
        vocab_size: int("vocab_size", 152064)?,
        hidden_size: int("hidden_size", 3584)?,
        intermediate_size: int("intermediate_size", 18944)?,
        num_hidden_layers: int("num_hidden_layers", 28)?,
        num_attention_heads: int("num_attention_heads", 28)?,
        num_key_value_heads: int("num_key_value_heads", 4)?,
        rms_norm_eps: f.positive("rms_norm_eps", 1e-6)?,
        rope_theta,
        mrope_section,
    };
    let hd = c.hidden_size / c.num_attention_heads;
    if c.hidden_size % c.num_attention_heads != 0 || c.num_attention_heads % c.num_key_value_heads != 0 {
        return Err(cfg_err(
            path,
            "num_attention_heads",
            format!(
                "{} must divide hidden_size {} and be a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.hidden_size, c.num_key_value_heads
            ),
        ));
    }
    if t.get("head_dim").and_then(Value::as_i64).is_some_and(|h| h != hd) {
        return Err(cfg_err(path, "head_dim", format!("must be hidden_size / num_attention_heads = {hd}")));
    }
    if c.mrope_section.iter().sum::<i64>() * 2 != hd {
        return Err(cfg_err(
            path,
            "mrope_section",
            format!("{:?} must sum to head_dim / 2 = {}", c.mrope_section, hd / 2),
        ));
    }
    Ok(c)
}

fn vision_config(path: &Path, v: &Value) -> Result<QwenVisionConfig> {
    let f = Fields { path, v };
    let int = |field: &str, default: i64| f.positive_int(field, default);
    refuse_values(path, v, &[("hidden_act", json!("silu"))])?;
    let rope = v.get("rope_parameters").filter(|r| r.is_object());
    if let Some(kind) = rope.and_then(|r| r.get("rope_type")).and_then(Value::as_str) {
        if kind != "axial" {
            return Err(cfg_err(path, "vision_config.rope_parameters.rope_type", format!("{kind:?} is not \"axial\"")));
        }
    }
    let fullatt = match v.get("fullatt_block_indexes") {
        None => vec![7, 15, 23, 31],
        Some(x) => serde_json::from_value(x.clone()).map_err(|_| {
            cfg_err(path, "vision_config.fullatt_block_indexes", format!("{x} is not a list of integers"))
        })?,
    };
    // transformers 4.x configs spell the input channels `in_chans`.
    let in_channels = if v.get("in_channels").is_none() { int("in_chans", 3)? } else { int("in_channels", 3)? };
    let c = QwenVisionConfig {
        depth: int("depth", 32)?,
        hidden_size: int("hidden_size", 1280)?,
        intermediate_size: int("intermediate_size", 3420)?,
        num_heads: int("num_heads", 16)?,
        out_hidden_size: int("out_hidden_size", 3584)?,
        in_channels,
        patch_size: int("patch_size", 14)?,
        temporal_patch_size: int("temporal_patch_size", 2)?,
        spatial_merge_size: int("spatial_merge_size", 2)?,
        window_size: int("window_size", 112)?,
        fullatt_block_indexes: fullatt,
        rope_theta: rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64).unwrap_or(10000.0),
    };
    // The 2-D rotary splits head_dim in four (h and w halves of cos and sin).
    if c.hidden_size % c.num_heads != 0 || c.head_dim() % 4 != 0 {
        return Err(cfg_err(path, "vision_config.num_heads", "hidden_size / num_heads must be a multiple of 4"));
    }
    if c.window_size / c.spatial_merge_size / c.patch_size < 1 {
        return Err(cfg_err(path, "vision_config.window_size", "must hold at least one merged patch"));
    }
    Ok(c)
}

/// Fields whose other values change the network in ways this module does not build.
fn refuse_values(path: &Path, v: &Value, fields: &[(&str, Value)]) -> Result<()> {
    for (field, only) in fields {
        if let Some(x) = v.get(*field).filter(|x| !x.is_null() && *x != only) {
            return Err(cfg_err(path, field, format!("{x} is not supported (only {only})")));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Layers

/// `Qwen2_5_VLRMSNorm`: the norm in f32, cast back to the input's kind, then `weight · x` (in bf16
/// the product rounds in bf16, unlike torch's fused `rms_norm`).
pub struct QwenRmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl QwenRmsNorm {
    pub fn new(p: &P, c: i64, eps: f64) -> Self {
        QwenRmsNorm { weight: p.param("weight", &[c]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, None::<Kind>);
        &self.weight * (h * (var + self.eps).rsqrt()).to_kind(x.kind())
    }
}

/// `down(silu(gate(x)) · up(x))`: the decoder's MLP (no bias) and the vision blocks' (bias).
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl GatedMlp {
    fn new(p: &P, dim: i64, hidden: i64, bias: bool) -> Self {
        GatedMlp {
            gate_proj: Linear::new(&p.sub("gate_proj"), dim, hidden, bias),
            up_proj: Linear::new(&p.sub("up_proj"), dim, hidden, bias),
            down_proj: Linear::new(&p.sub("down_proj"), hidden, dim, bias),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// `cat(-x2, x1)` over the last dimension's halves.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

/// `1 / theta^(arange(0, dim, 2) / dim)` with torch's f32 ops, as transformers builds it.
fn inv_freq(theta: f64, dim: i64, device: Device) -> Tensor {
    let e = Tensor::arange_start_step(0, dim, 2, (Kind::Float, device)) / dim as f64;
    Tensor::from(theta).to_kind(Kind::Float).to_device(device).pow(&e).reciprocal()
}

// ------------------------------------------------------------------------------------------------
// Text model

struct DecoderLayer {
    input_layernorm: QwenRmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: QwenRmsNorm,
    mlp: GatedMlp,
}

/// `Qwen2_5_VLTextModel` (under `model.language_model`).
pub struct QwenTextModel {
    pub config: QwenTextConfig,
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    pub norm: QwenRmsNorm,
}

impl QwenTextModel {
    pub fn new(p: &P, c: &QwenTextConfig) -> Self {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let kv = c.num_key_value_heads * hd;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = p.sub("layers").sub(i);
                let a = l.sub("self_attn");
                DecoderLayer {
                    input_layernorm: QwenRmsNorm::new(&l.sub("input_layernorm"), h, c.rms_norm_eps),
                    q_proj: Linear::new(&a.sub("q_proj"), h, h, true),
                    k_proj: Linear::new(&a.sub("k_proj"), h, kv, true),
                    v_proj: Linear::new(&a.sub("v_proj"), h, kv, true),
                    o_proj: Linear::new(&a.sub("o_proj"), h, h, false),
                    post_attention_layernorm: QwenRmsNorm::new(&l.sub("post_attention_layernorm"), h, c.rms_norm_eps),
                    mlp: GatedMlp::new(&l.sub("mlp"), h, c.intermediate_size, false),
                }
            })
            .collect();
        QwenTextModel {
            config: c.clone(),
            embed_tokens: p.sub("embed_tokens").param("weight", &[c.vocab_size, h]),
            layers,
            norm: QwenRmsNorm::new(&p.sub("norm"), h, c.rms_norm_eps),
        }
    }

    /// Token embeddings `[B, L, hidden]` of int64 ids, range-checked.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_kind(Kind::Int64).to_device(self.embed_tokens.device());
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.config.vocab_size {
            return Err(Error::Config {
                path: "<input_ids>".into(),
                field: "values".into(),
                msg: format!("ids span {lo}..={hi}; they must be in 0..{} (vocab_size)", self.config.vocab_size),
            });
        }
        Ok(Tensor::embedding(&self.embed_tokens, &ids, -1, false, false))
    }

    /// cos, sin `[B, L, head_dim]` in `kind` for positions `[3, B, L]` (t, h, w): frequency
    /// slot group i of `mrope_section` takes axis i % 3, then the halves repeat (transformers'
    /// `Qwen2_5_VLRotaryEmbedding`: f32 angles, cast to the activations' kind).
    fn rope(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let c = &self.config;
        let dev = self.embed_tokens.device();
        let freqs =
            positions.to_device(dev).to_kind(Kind::Float).unsqueeze(-1) * inv_freq(c.rope_theta, c.head_dim(), dev);
        let (mut parts, mut start) = (Vec::new(), 0);
        for (i, &n) in c.mrope_section.iter().enumerate() {
            parts.push(freqs.get(i as i64 % 3).narrow(-1, start, n));
            start += n;
        }
        let f = Tensor::cat(&parts, -1);
        let emb = Tensor::cat(&[&f, &f], -1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    fn attention(&self, l: &DecoderLayer, x: &Tensor, rope: &(Tensor, Tensor), mask: Option<&Tensor>) -> Tensor {
        let c = &self.config;
        let (b, n, _) = x.size3().expect("[B, L, hidden]");
        let hd = c.head_dim();
        let split = |y: Tensor| y.view([b, n, -1, hd]).transpose(1, 2);
        let (q, k, v) = (split(l.q_proj.forward(x)), split(l.k_proj.forward(x)), split(l.v_proj.forward(x)));
        let (cos, sin) = (rope.0.unsqueeze(1), rope.1.unsqueeze(1));
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        // repeat_kv: query head h reads key/value head h / (heads / kv_heads).
        let rep = c.num_attention_heads / c.num_key_value_heads;
        let repeat = |t: Tensor| {
            let s = t.size();
            t.unsqueeze(2).expand([s[0], s[1], rep, s[2], s[3]], false).reshape([b, c.num_attention_heads, n, hd])
        };
        let (k, v) = (repeat(k), repeat(v));
        let scale = (hd as f64).powf(-0.5);
        // No padding: sdpa's is_causal (transformers passes no mask then); else causal ∧ key mask.
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none(), scale, false);
        l.o_proj.forward(&o.transpose(1, 2).reshape([b, n, -1]))
    }

    /// The state after the final norm `[B, L, hidden]` for embeddings `x` `[B, L, hidden]`,
    /// `mask` `[B, L]` (nonzero = a real token; None = all are) and positions `[3, B, L]`.
    pub fn forward_embeds(&self, x: &Tensor, mask: Option<&Tensor>, positions: &Tensor) -> Tensor {
        let (b, n, _) = x.size3().expect("[B, L, hidden]");
        let dev = x.device();
        let mask = mask.filter(|m| Tensor::eq(m, 0).any().int64_value(&[]) != 0).map(|m| {
            let causal = Tensor::ones([n, n], (Kind::Bool, dev)).tril(0);
            causal.view([1, 1, n, n]).logical_and(&m.to_device(dev).ne(0).view([b, 1, 1, n]))
        });
        let rope = self.rope(positions, x.kind());
        let mut h = x.shallow_clone();
        for l in &self.layers {
            h = &h + self.attention(l, &l.input_layernorm.forward(&h), &rope, mask.as_ref());
            h = &h + l.mlp.forward(&l.post_attention_layernorm.forward(&h));
        }
        self.norm.forward(&h)
    }
}

/// 1-D positions `arange(L)` on all three axes, `[3, B, L]` (what the text model uses when no
/// M-RoPE positions are given, padding included).
pub fn arange_positions(b: i64, l: i64, device: Device) -> Tensor {
    Tensor::arange(l, (Kind::Int64, device)).view([1, 1, l]).expand([3, b, l], false)
}

// ------------------------------------------------------------------------------------------------
// Vision tower

struct VisionBlock {
    norm1: QwenRmsNorm,
    norm2: QwenRmsNorm,
    qkv: Linear,
    proj: Linear,
    mlp: GatedMlp,
}

/// `Qwen2_5_VisionTransformerPretrainedModel` (under `model.visual`).
pub struct QwenVisionModel {
    pub config: QwenVisionConfig,
    /// The Conv3d kernel `[hidden, C, T, P, P]` (stride = size: one dot product per patch row).
    pub patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    pub ln_q: QwenRmsNorm,
    pub merger_fc1: Linear,
    pub merger_fc2: Linear,
}

/// Where each merged token goes for window attention and which rows attend together.
struct Windows {
    /// A permutation of the merged tokens of all images (window-major per image).
    index: Vec<i64>,
    /// Patch-row boundaries of the windows (empty windows dropped) and of the images.
    window_bounds: Vec<i64>,
    image_bounds: Vec<i64>,
}

/// transformers' `get_vision_window_index` + `get_vision_cu_seqlens`: the merged grid of each
/// image cut into `w × w` windows (w = window_size / merge / patch), windows row-major, tokens
/// row-major inside; edge windows are partial.
fn windows(grids: &[Grid], merge: i64, w: i64) -> Windows {
    let (mut index, mut window_bounds, mut image_bounds) = (Vec::new(), vec![0], vec![0]);
    let mut offset = 0;
    for &(t, gh, gw) in grids {
        let (mh, mw) = (gh / merge, gw / merge);
        for f in 0..t {
            for wy in 0..(mh + w - 1) / w {
                for wx in 0..(mw + w - 1) / w {
                    for y in wy * w..((wy + 1) * w).min(mh) {
                        for x in wx * w..((wx + 1) * w).min(mw) {
                            index.push(offset + f * mh * mw + y * mw + x);
                        }
                    }
                    window_bounds.push(index.len() as i64 * merge * merge);
                }
            }
            image_bounds.push(image_bounds.last().unwrap() + gh * gw);
        }
        offset += t * mh * mw;
    }
    Windows { index, window_bounds, image_bounds }
}

/// (h, w) of every patch in the block-major order of the pixel rows, `[N, 2]` (transformers'
/// `get_vision_position_ids`).
fn patch_positions(grids: &[Grid], merge: i64) -> Tensor {
    let mut pos = Vec::new();
    for &(t, gh, gw) in grids {
        for _ in 0..t {
            for by in 0..gh / merge {
                for bx in 0..gw / merge {
                    for dy in 0..merge {
                        for dx in 0..merge {
                            pos.extend([by * merge + dy, bx * merge + dx]);
                        }
                    }
                }
            }
        }
    }
    Tensor::from_slice(&pos).view([-1, 2])
}

impl QwenVisionModel {
    pub fn new(p: &P, c: &QwenVisionConfig) -> Self {
        let h = c.hidden_size;
        let merged = h * c.merge_unit();
        let blocks = (0..c.depth)
            .map(|i| {
                let b = p.sub("blocks").sub(i);
                VisionBlock {
                    norm1: QwenRmsNorm::new(&b.sub("norm1"), h, 1e-6),
                    norm2: QwenRmsNorm::new(&b.sub("norm2"), h, 1e-6),
                    qkv: Linear::new(&b.sub("attn").sub("qkv"), h, 3 * h, true),
                    proj: Linear::new(&b.sub("attn").sub("proj"), h, h, true),
                    mlp: GatedMlp::new(&b.sub("mlp"), h, c.intermediate_size, true),
                }
            })
            .collect();
        let pe = &[h, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size];
        QwenVisionModel {
            config: c.clone(),
            patch_embed: p.sub("patch_embed").sub("proj").param("weight", pe),
            blocks,
            ln_q: QwenRmsNorm::new(&p.sub("merger").sub("ln_q"), h, 1e-6),
            merger_fc1: Linear::new(&p.sub("merger").sub("mlp").sub(0), merged, merged, true),
            merger_fc2: Linear::new(&p.sub("merger").sub("mlp").sub(2), merged, c.out_hidden_size, true),
        }
    }

    /// Rows grouped per merged token, reordered by `index` (`permute_input_for_window_attn`).
    fn permute(&self, x: &Tensor, index: &Tensor) -> Tensor {
        let (n, d) = x.size2().expect("[N, D]");
        let u = self.config.merge_unit();
        x.view([n / u, u, d]).index_select(0, index).view([n, d])
    }

    /// cos, sin `[N, head_dim]` in f32: `cat[h·inv, w·inv]` repeated twice.
    fn rope(&self, grids: &[Grid], device: Device) -> (Tensor, Tensor) {
        let c = &self.config;
        let pos = patch_positions(grids, c.spatial_merge_size).to_device(device).to_kind(Kind::Float);
        let inv = inv_freq(c.rope_theta, c.head_dim() / 2, device);
        let f = (pos.unsqueeze(-1) * inv).flatten(1, 2);
        let emb = Tensor::cat(&[&f, &f], -1);
        (emb.cos(), emb.sin())
    }

    /// Non-causal attention within each segment `bounds[i]..bounds[i+1]`; RoPE in f32.
    fn attention(&self, b: &VisionBlock, x: &Tensor, rope: &(Tensor, Tensor), bounds: &[i64]) -> Tensor {
        let c = &self.config;
        let s = x.size()[0];
        let qkv = b.qkv.forward(x).reshape([s, 3, c.num_heads, -1]).permute([1, 0, 2, 3]);
        let (cos, sin) = (rope.0.unsqueeze(-2), rope.1.unsqueeze(-2));
        let rot = |t: Tensor| {
            let f = t.to_kind(Kind::Float);
            (&f * &cos + rotate_half(&f) * &sin).to_kind(t.kind()).transpose(0, 1).unsqueeze(0)
        };
        let (q, k, v) = (rot(qkv.get(0)), rot(qkv.get(1)), qkv.get(2).transpose(0, 1).unsqueeze(0));
        let scale = (c.head_dim() as f64).powf(-0.5);
        let outs: Vec<Tensor> = bounds
            .windows(2)
            .map(|w| {
                let part = |t: &Tensor| t.narrow(2, w[0], w[1] - w[0]);
                let o = Tensor::scaled_dot_product_attention::<&Tensor>(
                    &part(&q),
                    &part(&k),
                    &part(&v),
                    None,
                    0.0,
                    false,
                    scale,
                    false,
                );
                o.transpose(1, 2)
            })
            .collect();
        b.proj.forward(&Tensor::cat(&outs, 1).reshape([s, -1]))
    }

    /// Image features `[Σ t·h·w / 4, out_hidden_size]` in grid order (image by image, row-major
    /// over each merged grid) for patch rows `pixel_values` `[Σ t·h·w, patch_dim]` and the
    /// `(t, h, w)` patch grid of each image.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[Grid]) -> Result<Tensor> {
        let c = &self.config;
        let rows: i64 = grids.iter().map(|(t, h, w)| t * h * w).sum();
        let m = c.spatial_merge_size;
        if pixel_values.size() != [rows, c.patch_dim()] || grids.iter().any(|g| g.1 % m != 0 || g.2 % m != 0) {
            return Err(Error::Config {
                path: "<pixel_values>".into(),
                field: "shape".into(),
                msg: format!(
                    "{:?} for grids {grids:?}: pass [Σ t·h·w = {rows}, {}] patch rows with h and w multiples of {m}",
                    pixel_values.size(),
                    c.patch_dim()
                ),
            });
        }
        let w = &self.patch_embed;
        let dev = w.device();
        // Conv3d with stride = kernel, as transformers runs it (a Linear over the rows is the
        // same sum in another order).
        let (t, p) = (c.temporal_patch_size, c.patch_size);
        let x = pixel_values.to_device(dev).to_kind(w.kind()).view([-1, c.in_channels, t, p, p]);
        let x = x.conv3d::<&Tensor>(w, None, [t, p, p], [0, 0, 0], [1, 1, 1], 1).view([-1, c.hidden_size]);
        let win = windows(grids, m, c.window_size / m / c.patch_size);
        let index = Tensor::from_slice(&win.index).to_device(dev);
        let mut x = self.permute(&x, &index);
        let (cos, sin) = self.rope(grids, dev);
        let rope = (self.permute(&cos, &index), self.permute(&sin, &index));
        for (i, b) in self.blocks.iter().enumerate() {
            let full = c.fullatt_block_indexes.contains(&(i as i64));
            let bounds = if full { &win.image_bounds } else { &win.window_bounds };
            x = &x + self.attention(b, &b.norm1.forward(&x), &rope, bounds);
            x = &x + b.mlp.forward(&b.norm2.forward(&x));
        }
        let merged = self.ln_q.forward(&x).view([-1, c.hidden_size * c.merge_unit()]);
        let out = self.merger_fc2.forward(&self.merger_fc1.forward(&merged).gelu("none"));
        Ok(out.index_select(0, &index.argsort(0, false)))
    }
}

// ------------------------------------------------------------------------------------------------
// Image preprocessing

/// `Qwen2VLImageProcessor`'s settings (`preprocessor_config.json`, or the `image_processor`
/// object of transformers 5's `processor_config.json`; its defaults otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub min_pixels: i64,
    pub max_pixels: i64,
    pub patch_size: i64,
    pub merge_size: i64,
    pub temporal_patch_size: i64,
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl Default for ImageProcessor {
    fn default() -> Self {
        ImageProcessor {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            rescale_factor: 1.0 / 255.0,
            // OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

/// transformers' `smart_resize`: both sides multiples of `factor`, the area within
/// `[min_pixels, max_pixels]`, the aspect ratio kept as well as may be (Python's `round`, i.e.
/// half to even, as the reference uses).
pub fn smart_resize(h: i64, w: i64, factor: i64, min_pixels: i64, max_pixels: i64) -> Result<(i64, i64)> {
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    if h < 1 || w < 1 || hf.max(wf) / hf.min(wf) > 200.0 {
        return Err(cfg_err(Path::new("<image>"), "size", format!("{w}×{h}: the aspect ratio must be under 200")));
    }
    let (mut hb, mut wb) = ((hf / f).round_ties_even() * f, (wf / f).round_ties_even() * f);
    if hb * wb > max_pixels as f64 {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = f.max((hf / beta / f).floor() * f);
        wb = f.max((wf / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = (hf * beta / f).ceil() * f;
        wb = (wf * beta / f).ceil() * f;
    }
    Ok((hb as i64, wb as i64))
}

impl ImageProcessor {
    /// From a processor folder: `preprocessor_config.json`, else `processor_config.json`'s
    /// `image_processor`, else the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        if pre.exists() {
            return Self::from_value(&pre, &read_json(&pre)?);
        }
        let proc = dir.join("processor_config.json");
        match proc.exists().then(|| read_json(&proc)).transpose()? {
            Some(v) => Self::from_value(&proc, v.get("image_processor").unwrap_or(&json!({}))),
            None => Ok(Self::default()),
        }
    }

    /// `min_pixels`/`max_pixels` or `size.shortest_edge`/`longest_edge` (the processor's
    /// constructor prefers the former); mean/std/rescale as given.
    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let d = Self::default();
        let f = Fields { path, v };
        let size = v.get("size").cloned().unwrap_or(json!({}));
        let s = Fields { path, v: &size };
        let three = |field: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match v.get(field).filter(|x| !x.is_null()) {
                None => Ok(default),
                Some(x) => serde_json::from_value(x.clone())
                    .map_err(|_| cfg_err(path, field, format!("{x} is not three numbers"))),
            }
        };
        let p = ImageProcessor {
            min_pixels: f.positive_int("min_pixels", s.positive_int("shortest_edge", d.min_pixels)?)?,
            max_pixels: f.positive_int("max_pixels", s.positive_int("longest_edge", d.max_pixels)?)?,
            patch_size: f.positive_int("patch_size", d.patch_size)?,
            merge_size: f.positive_int("merge_size", d.merge_size)?,
            temporal_patch_size: f.positive_int("temporal_patch_size", d.temporal_patch_size)?,
            rescale_factor: f.positive("rescale_factor", d.rescale_factor)?,
            image_mean: three("image_mean", d.image_mean)?,
            image_std: three("image_std", d.image_std)?,
        };
        for (field, only) in [("do_resize", true), ("do_rescale", true), ("do_normalize", true)] {
            if v.get(field).and_then(Value::as_bool).is_some_and(|b| b != only) {
                return Err(cfg_err(path, field, format!("only {only} is supported (as Qwen-Image's processor)")));
            }
        }
        if v.get("resample").and_then(Value::as_i64).is_some_and(|r| r != 3) {
            return Err(cfg_err(path, "resample", "only 3 (bicubic) is supported"));
        }
        Ok(p)
    }

    /// One uint8 RGB image `[3, H, W]` (CPU or not) → its patch rows `[gh·gw, 3·T·P·P]` f32 and
    /// `(1, gh, gw)`: smart_resize with factor P·merge, libtorch's uint8 antialiased bicubic
    /// (torchvision's CPU path; skipped at the same size), `(x − 255·mean) / (255·std)` in f32,
    /// block-major patches with the frame repeated T times.
    pub fn preprocess(&self, image: &Tensor) -> Result<(Tensor, Grid)> {
        let size = image.size();
        if size.len() != 3 || size[0] != 3 || image.kind() != Kind::Uint8 {
            return Err(cfg_err(
                Path::new("<image>"),
                "shape",
                format!("{size:?} {:?}: pass one uint8 RGB image [3, H, W]", image.kind()),
            ));
        }
        let (h, w) = (size[1], size[2]);
        let (p, m) = (self.patch_size, self.merge_size);
        let (nh, nw) = smart_resize(h, w, p * m, self.min_pixels, self.max_pixels)?;
        // Channels-last memory, as torchvision gets it from a PIL image (its uint8 kernel).
        let img = image.to_device(Device::Cpu).permute([1, 2, 0]).contiguous().permute([2, 0, 1]).unsqueeze(0);
        let img =
            if (nh, nw) == (h, w) { img } else { img.f_internal_upsample_bicubic2d_aa([nh, nw], false, None, None)? };
        // The processor fuses rescale into normalize: mean and std scaled by 1 / rescale_factor.
        let stat = |v: &[f64; 3]| {
            let t = Tensor::from_slice(&v.map(|x| x as f32)) * (1.0 / self.rescale_factor);
            t.view([1, 3, 1, 1])
        };
        let x = (img.to_kind(Kind::Float) - stat(&self.image_mean)) / stat(&self.image_std);
        let (gh, gw) = (nh / p, nw / p);
        let t = self.temporal_patch_size;
        let x = x.reshape([3, gh / m, m, p, gw / m, m, p]).permute([1, 4, 2, 5, 0, 3, 6]).unsqueeze(5);
        let x = x.expand([gh / m, gw / m, m, m, 3, t, p, p], false).reshape([gh * gw, 3 * t * p * p]);
        Ok((x, (1, gh, gw)))
    }

    /// Several images' patch rows, concatenated in order, and their grids.
    pub fn preprocess_all(&self, images: &[Tensor]) -> Result<(Tensor, Vec<Grid>)> {
        let mut rows = Vec::new();
        let mut grids = Vec::new();
        for im in images {
            let (r, g) = self.preprocess(im)?;
            rows.push(r);
            grids.push(g);
        }
        Ok((Tensor::cat(&rows, 0), grids))
    }
}

// ------------------------------------------------------------------------------------------------
// Tokenizer

/// Qwen2's pre-tokenisation regex (`Qwen2Tokenizer.PRETOKENIZE_REGEX`).
const PRETOKENIZE_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 tokenizer (the `tokenizers` crate, as transformers' `Qwen2Tokenizer` runs it).
pub struct QwenTokenizer {
    pub inner: tokenizers::Tokenizer,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    cfg_err(path, "(tokenizer)", e.to_string())
}

impl QwenTokenizer {
    /// `dir/tokenizer.json`, else the pipeline built from `vocab.json` + `merges.txt` +
    /// `tokenizer_config.json` ([`QwenTokenizer::from_vocab_merges`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if file.exists() {
            let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| tok_err(&file, e))?;
            return Ok(QwenTokenizer { inner });
        }
        if !dir.join("vocab.json").exists() {
            return Err(cfg_err(
                dir,
                "tokenizer.json",
                "neither tokenizer.json nor vocab.json + merges.txt is there; point at the model's processor/ or tokenizer/ folder",
            ));
        }
        Self::from_vocab_merges(dir)
    }

    /// What `Qwen2Tokenizer` builds without a tokenizer.json: NFC, the regex split (isolated)
    /// then byte-level (no prefix space, no regex), byte-level BPE without unk/prefix/suffix/byte
    /// fallback, no post-processor, and the added tokens of `tokenizer_config.json`'s
    /// `added_tokens_decoder` at their ids.
    pub fn from_vocab_merges(dir: &Path) -> Result<Self> {
        let mut vocab = read_json(&dir.join("vocab.json"))?;
        let merges_path = dir.join("merges.txt");
        let text =
            std::fs::read_to_string(&merges_path).map_err(|source| Error::Io { path: merges_path.clone(), source })?;
        let merges: Vec<&str> = text.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).collect();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() { read_json(&config_path)? } else { json!({}) };
        let mut added: Vec<Value> = Vec::new();
        if let Some(map) = config.get("added_tokens_decoder").and_then(Value::as_object) {
            for (id, t) in map {
                let id: u32 = id
                    .parse()
                    .map_err(|_| cfg_err(&config_path, "added_tokens_decoder", format!("key {id:?} is not an id")))?;
                let flag = |k: &str, d: bool| t.get(k).and_then(Value::as_bool).unwrap_or(d);
                let content = t.get("content").and_then(Value::as_str).ok_or_else(|| {
                    cfg_err(&config_path, "added_tokens_decoder", format!("token {id} has no content"))
                })?;
                added.push(json!({"id": id, "content": content, "single_word": flag("single_word", false),
                    "lstrip": flag("lstrip", false), "rstrip": flag("rstrip", false),
                    "normalized": flag("normalized", false), "special": flag("special", false)}));
            }
        }
        added.sort_by_key(|t| t["id"].as_u64());
        // The crate gives an added token its id in the model's vocab, else the next free one (the
        // `id` field is not read back): entered into the vocab, each keeps the id the config
        // gives it even where the ids are not contiguous with the vocab (merges never build them,
        // and added tokens are split off before the BPE runs).
        if let Some(map) = vocab.as_object_mut() {
            for t in &added {
                map.entry(t["content"].as_str().unwrap_or_default()).or_insert(t["id"].clone());
            }
        }
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_bytes(spec.to_string()).map_err(|e| tok_err(&merges_path, e))?;
        Ok(QwenTokenizer { inner })
    }

    /// Token ids as the processor's tokenizer gives them (no BOS/EOS: Qwen2 adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.inner.encode(text, true).map_err(|e| tok_err(Path::new("<tokenizer>"), e))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }
}

// ------------------------------------------------------------------------------------------------
// The whole model and the edit-plus prompt encoding

/// `Qwen2_5_VLModel`: the decoder and the vision tower on one store (`model.language_model`,
/// `model.visual`; `lm_head` is not built: the pipeline reads hidden states only).
pub struct QwenVlModel {
    pub config: QwenVlConfig,
    pub language_model: QwenTextModel,
    pub visual: QwenVisionModel,
}

/// transformers' `get_rope_index` for images, `[3, B, L]`: per row over its real tokens, a text
/// run continues `pos + arange` on all axes, an image run of merged grid `gh × gw` starting at
/// `pos` gets `(pos, pos + row, pos + col)` and then `pos += max(gh, gw)`; padding stays 0. The
/// image runs consume `grids` (patch units) in order across the batch.
pub fn mrope_positions(
    ids: &[Vec<i64>],
    mask: &[Vec<bool>],
    image_token: i64,
    grids: &[Grid],
    merge: i64,
) -> Result<Tensor> {
    let (b, l) = (ids.len(), ids.first().map_or(0, Vec::len));
    let mut out = vec![0i64; 3 * b * l];
    let mut next = grids.iter();
    for (r, (row, keep)) in ids.iter().zip(mask).enumerate() {
        let real: Vec<usize> = (0..row.len()).filter(|&i| keep[i]).collect();
        let (mut pos, mut k) = (0i64, 0usize);
        while k < real.len() {
            let is_img = row[real[k]] == image_token;
            let run = real[k..].iter().take_while(|&&i| (row[i] == image_token) == is_img).count();
            let mut put = |j: usize, p: [i64; 3]| (0..3).for_each(|a| out[a * b * l + r * l + real[j]] = p[a]);
            if !is_img {
                (0..run).for_each(|j| put(k + j, [pos + j as i64; 3]));
                pos += run as i64;
            } else {
                let &(t, gh, gw) = next
                    .next()
                    .ok_or_else(|| cfg_err(Path::new("<input_ids>"), "image tokens", "more image runs than images"))?;
                let (mh, mw) = (gh / merge, gw / merge);
                if run as i64 != t * mh * mw {
                    return Err(cfg_err(
                        Path::new("<input_ids>"),
                        "image tokens",
                        format!("a run of {run} image tokens for a grid of {}", t * mh * mw),
                    ));
                }
                (0..run as i64)
                    .for_each(|j| put(k + j as usize, [pos + j / (mh * mw), pos + j / mw % mh, pos + j % mw]));
                pos += mh.max(mw);
            }
            k += run;
        }
    }
    Ok(Tensor::from_slice(&out).view([3, b as i64, l as i64]))
}

impl QwenVlModel {
    pub fn new(store: &Store, config: &QwenVlConfig) -> Self {
        let m = store.root().sub("model");
        QwenVlModel {
            config: config.clone(),
            language_model: QwenTextModel::new(&m.sub("language_model"), &config.text),
            visual: QwenVisionModel::new(&m.sub("visual"), &config.vision),
        }
    }

    /// `text_encoder(input_ids, attention_mask, pixel_values, image_grid_thw)`'s last hidden
    /// state `[B, L, hidden]`: the image features replace the image tokens in sequence order
    /// (`masked_scatter`); `positions` `[3, B, L]` (None: 1-D `arange`, as diffusers calls it).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        images: Option<(&Tensor, &[Grid])>,
        positions: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = self.language_model.embed(ids)?;
        let (b, l, d) = x.size3()?;
        let is_image = ids.to_device(x.device()).eq(self.config.image_token_id);
        let n_tokens = is_image.sum(Kind::Int64).int64_value(&[]);
        let x = match images {
            Some((px, grids)) => {
                let feats = self.visual.forward(px, grids)?.to_kind(x.kind());
                if feats.size()[0] != n_tokens {
                    return Err(cfg_err(
                        Path::new("<input_ids>"),
                        "image tokens",
                        format!("{n_tokens} image tokens for {} image features", feats.size()[0]),
                    ));
                }
                x.masked_scatter(&is_image.unsqueeze(-1).expand([b, l, d], false), &feats)
            }
            None if n_tokens > 0 => {
                return Err(cfg_err(
                    Path::new("<input_ids>"),
                    "image tokens",
                    format!("{n_tokens} image tokens but no images"),
                ))
            }
            None => x,
        };
        let pos = positions.map_or_else(|| arange_positions(b, l, x.device()), |p| p.shallow_clone());
        Ok(self.language_model.forward_embeds(&x, Some(mask), &pos))
    }
}

/// `QwenImageEditPlusPipeline.prompt_template_encode`.
pub const EDIT_PLUS_TEMPLATE: &str = "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";
/// `prompt_template_encode_start_idx`: the system block and `<|im_start|>user\n`.
pub const EDIT_PLUS_DROP: i64 = 64;

/// diffusers' `calculate_dimensions(area, w / h)`: `W = √(area·r)`, `H = W / r`, each rounded to
/// a multiple of 32 (Python's round: half to even).
fn calculate_dimensions(area: f64, w: i64, h: i64) -> (i64, i64) {
    let r = w as f64 / h as f64;
    let width = (area * r).sqrt();
    let height = width / r;
    (((width / 32.0).round_ties_even() * 32.0) as i64, ((height / 32.0).round_ties_even() * 32.0) as i64)
}

/// The (w, h) the pipeline resizes a condition image to for the VL encoder (~384² area).
pub fn condition_size(w: i64, h: i64) -> (i64, i64) {
    calculate_dimensions(384.0 * 384.0, w, h)
}

/// The (w, h) the pipeline resizes a control image to for the VAE (~1024² area).
pub fn vae_size(w: i64, h: i64) -> (i64, i64) {
    calculate_dimensions(1024.0 * 1024.0, w, h)
}

/// The text encoder of QwenImageEditPlusPipeline: model, tokenizer and image processor.
pub struct QwenVlEncoder {
    pub model: QwenVlModel,
    pub tokenizer: QwenTokenizer,
    pub processor: ImageProcessor,
    /// M-RoPE positions (`get_rope_index`, as transformers computes them when given
    /// `mm_token_type_ids`, and as the model was trained) instead of diffusers 0.42.1's 1-D ones.
    pub mrope: bool,
}

/// transformers 5's name for a legacy one (`visual.*` → `model.visual.*`, `model.*` →
/// `model.language_model.*`, as `conversion_mapping.py` renames Qwen2.5-VL); None for `lm_head`.
fn rename_legacy(name: String) -> Option<String> {
    if name == "lm_head.weight" {
        return None;
    }
    if let Some(rest) = name.strip_prefix("visual.") {
        return Some(format!("model.visual.{rest}"));
    }
    match name.strip_prefix("model.") {
        Some(rest) if !rest.starts_with("language_model.") && !rest.starts_with("visual.") => {
            Some(format!("model.language_model.{rest}"))
        }
        _ => Some(name),
    }
}

/// A transformers folder (`config.json` + `model.safetensors`, sharded or not; the config's
/// absence means the 7B defaults) or one safetensors file (ComfyUI's `qwen_2.5_vl_7b*.safetensors`:
/// the 7B defaults), either naming scheme; `lm_head.weight` is ignored, anything else that does
/// not match is an error naming it.
pub fn qwen_vl_from_path(path: &Path, kind: Kind, device: Device, mode: Mode) -> Result<(Store, QwenVlModel)> {
    let (config, tensors) = if path.is_dir() {
        let c = path.join("config.json");
        let cfg = if c.exists() { QwenVlConfig::from_file(&c)? } else { QwenVlConfig::qwen2_5_vl_7b() };
        (cfg, crate::load::read_weights(path, "model")?)
    } else {
        (QwenVlConfig::qwen2_5_vl_7b(), crate::load::read_st(path)?)
    };
    let tensors = tensors.into_iter().filter_map(|(n, t)| rename_legacy(n).map(|n| (n, t))).collect();
    let store = Store::new(mode, kind, device);
    let model = QwenVlModel::new(&store, &config);
    crate::load::apply(&store, tensors, &path.display().to_string(), "Qwen2_5_VLForConditionalGeneration")?;
    Ok((store, model))
}

/// An image for the encoder as uint8 `[3, H, W]`: uint8 as is, a float one in [0, 1] scaled by
/// 255 and rounded (what converting it to the PIL image the pipeline takes does).
fn to_uint8(im: &Tensor) -> Tensor {
    if im.kind() == Kind::Uint8 {
        im.shallow_clone()
    } else {
        (im.to_kind(Kind::Float) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
    }
}

impl QwenVlEncoder {
    /// The text encoder (see [`qwen_vl_from_path`]) and the processor folder (`processor/`:
    /// its tokenizer and image-processor settings).
    pub fn load(text_encoder: &Path, tokenizer_dir: &Path, kind: Kind, device: Device) -> Result<(Store, Self)> {
        let (store, model) = qwen_vl_from_path(text_encoder, kind, device, Mode::Alloc)?;
        let tokenizer = QwenTokenizer::from_dir(tokenizer_dir)?;
        let processor = ImageProcessor::from_dir(tokenizer_dir)?;
        Ok((store, QwenVlEncoder { model, tokenizer, processor, mrope: false }))
    }

    /// The processor's ids for one prompt with `grids.len()` pictures: the template around
    /// `Picture i: <|vision_start|><|image_pad|><|vision_end|>`… + prompt, each image token
    /// expanded to t·h·w / merge² copies.
    pub fn prompt_ids(&self, prompt: &str, grids: &[Grid]) -> Result<Vec<i64>> {
        let prefix: String =
            (1..=grids.len()).map(|i| format!("Picture {i}: <|vision_start|><|image_pad|><|vision_end|>")).collect();
        let ids = self.tokenizer.encode(&EDIT_PLUS_TEMPLATE.replace("{}", &format!("{prefix}{prompt}")))?;
        let image = self.model.config.image_token_id;
        if ids.iter().filter(|&&i| i == image).count() != grids.len() {
            return Err(cfg_err(
                Path::new("<prompt>"),
                "<|image_pad|>",
                format!("{prompt:?}: the prompt must not contain image tokens itself ({} images)", grids.len()),
            ));
        }
        let merge = self.processor.merge_size * self.processor.merge_size;
        let mut per_image = grids.iter().map(|(t, h, w)| t * h * w / merge);
        Ok(ids
            .into_iter()
            .flat_map(|i| vec![i; if i == image { per_image.next().unwrap_or(0) as usize } else { 1 }])
            .collect())
    }

    /// `_get_qwen_prompt_embeds` for a batch: `images[b]` are prompt b's condition images, uint8
    /// or float in [0, 1], `[3, H, W]`, already at [`condition_size`] (the pipeline's Lanczos
    /// resize is the caller's). Returns the embeddings `[B, L, hidden]` in the store's kind (the
    /// first 64 tokens dropped, rows zero-padded to the longest) and the int64 0/1 mask `[B, L]`.
    /// A prompt with no images is a text-only prompt under the same template.
    pub fn encode_edit_plus(&self, prompts: &[&str], images: &[Vec<Tensor>]) -> Result<(Tensor, Tensor)> {
        if prompts.len() != images.len() || prompts.is_empty() {
            return Err(cfg_err(
                Path::new("<prompts>"),
                "images",
                format!("{} prompts need as many image lists, got {}", prompts.len(), images.len()),
            ));
        }
        let flat: Vec<Tensor> = images.iter().flatten().map(to_uint8).collect();
        let pixels = (!flat.is_empty()).then(|| self.processor.preprocess_all(&flat)).transpose()?;
        let grids = pixels.as_ref().map_or(vec![], |p| p.1.clone());
        let mut rows = Vec::new();
        let mut used = 0;
        for (p, ims) in prompts.iter().zip(images) {
            rows.push(self.prompt_ids(p, &grids[used..used + ims.len()])?);
            used += ims.len();
        }
        let l = rows.iter().map(Vec::len).max().unwrap_or(0);
        let keep: Vec<Vec<bool>> = rows.iter().map(|r| (0..l).map(|i| i < r.len()).collect()).collect();
        // Right padding with <|endoftext|> (the processor's pad side and token; masked anyway).
        let pad = self.tokenizer.inner.token_to_id("<|endoftext|>").unwrap_or(0) as i64;
        let padded: Vec<Vec<i64>> =
            rows.iter().map(|r| r.iter().copied().chain(std::iter::repeat(pad)).take(l).collect()).collect();
        let dev = self.model.language_model.embed_tokens.device();
        let ids = Tensor::from_slice(&padded.concat()).view([rows.len() as i64, l as i64]).to_device(dev);
        let mask = Tensor::from_slice(&keep.concat()).view([rows.len() as i64, l as i64]).to_device(dev);
        let positions = if self.mrope {
            let merge = self.model.config.vision.spatial_merge_size;
            Some(mrope_positions(&padded, &keep, self.model.config.image_token_id, &grids, merge)?.to_device(dev))
        } else {
            None
        };
        let images = pixels.as_ref().map(|(px, g)| (px, g.as_slice()));
        let hidden = self.model.forward(&ids, &mask, images, positions.as_ref())?;
        Ok(drop_and_pad(&hidden, &rows.iter().map(|r| r.len() as i64).collect::<Vec<_>>()))
    }
}

/// `_extract_masked_hidden` + `e[64:]` + zero padding: each row's real tokens after the first
/// [`EDIT_PLUS_DROP`], stacked `[B, L', hidden]` with the int64 0/1 mask `[B, L']`.
fn drop_and_pad(hidden: &Tensor, lens: &[i64]) -> (Tensor, Tensor) {
    let kept: Vec<i64> = lens.iter().map(|&n| (n - EDIT_PLUS_DROP).max(0)).collect();
    let l = kept.iter().copied().max().unwrap_or(0);
    let d = hidden.size()[2];
    let o = (hidden.kind(), hidden.device());
    let (mut rows, mut masks) = (Vec::new(), Vec::new());
    for (i, &k) in kept.iter().enumerate() {
        let real = hidden.get(i as i64).narrow(0, lens[i] - k, k);
        rows.push(Tensor::cat(&[real, Tensor::zeros([l - k, d], o)], 0));
        masks
            .push(Tensor::cat(&[Tensor::ones([k], (Kind::Int64, o.1)), Tensor::zeros([l - k], (Kind::Int64, o.1))], 0));
    }
    (Tensor::stack(&rows, 0), Tensor::stack(&masks, 0))
}
