//! Flux.1's `FluxTransformer2DModel` (numerically diffusers 0.42.1): 2×2-packed latent tokens
//! and T5 tokens in double-stream blocks (separate weights, joint attention), then single-stream
//! blocks over the concatenated sequence; 3-axis RoPE over (0, row, column) position ids;
//! timestep, pooled CLIP and (Flux-dev) guidance embeddings summed into one conditioning vector
//! that drives every block's adaLN-Zero modulation.
//!
//! Parameter names are diffusers' state-dict names (`transformer_blocks.N.attn.to_q.weight`, …),
//! so the loader, the layout test against the real checkpoint's manifest and LoRA injection by
//! module path work as they do for the UNet. The BFL single-file names (`double_blocks.N.img_attn
//! .qkv`, fused) are a key map on top (see `lora_keys` for LoRA files), not a second network.
//!
//! The forward is a list of segments (embed, each double block, each single block, the output
//! head) over numbered activation slots, so gradient checkpointing can recompute per block
//! ([`crate::checkpoint`]).

use crate::checkpoint::{self, Program, Segments, Step, Tape};
use crate::config::{cfg_err, read_json};
use crate::error::Result;
use crate::identity::IdentityInjection;
use crate::nn::{Linear, RmsNorm};
use crate::store::{Store, P};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use tch::{Kind, Tensor};

fn d_patch() -> i64 {
    1
}
fn d_in() -> i64 {
    64
}
fn d_layers() -> i64 {
    19
}
fn d_single() -> i64 {
    38
}
fn d_head_dim() -> i64 {
    128
}
fn d_heads() -> i64 {
    24
}
fn d_joint() -> i64 {
    4096
}
fn d_pooled() -> i64 {
    768
}
fn d_axes() -> Vec<i64> {
    vec![16, 56, 56]
}

/// `transformer/config.json` (defaults: diffusers' `FluxTransformer2DModel.__init__`).
#[derive(Debug, Clone, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_in")]
    pub in_channels: i64,
    #[serde(default)]
    pub out_channels: Option<i64>,
    #[serde(default = "d_layers")]
    pub num_layers: i64,
    #[serde(default = "d_single")]
    pub num_single_layers: i64,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: i64,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: i64,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<i64>,
}

/// RoPE's base (diffusers hard-codes `FluxPosEmbed(theta=10000)`).
const ROPE_THETA: f64 = 10000.0;
/// The sinusoidal width of the timestep and guidance projections (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: i64 = 256;
/// Flux feeds timesteps and guidance as fractions in [0, 1] and scales them by 1000 inside.
const TIME_SCALE: f64 = 1000.0;

impl FluxConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, read_json(path)?)
    }

    pub fn from_value(path: &Path, v: Value) -> Result<Self> {
        if let Some(name) = v.get("_class_name").and_then(Value::as_str) {
            if name != "FluxTransformer2DModel" {
                return Err(cfg_err(path, "_class_name", format!("{name} is not a FluxTransformer2DModel")));
            }
        }
        let c: FluxConfig = serde_json::from_value(v).map_err(|e| cfg_err(path, "(schema)", e.to_string()))?;
        if c.patch_size != 1 {
            // The 2×2 patching is done by the pipeline's packing; diffusers' model only uses
            // patch_size to size proj_out, which a patch_size > 1 checkpoint never was.
            return Err(cfg_err(path, "patch_size", format!("{} is not supported (1)", c.patch_size)));
        }
        if c.axes_dims_rope.iter().sum::<i64>() != c.attention_head_dim || c.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(cfg_err(
                path,
                "axes_dims_rope",
                format!(
                    "{:?} must be even sizes that sum to attention_head_dim = {}",
                    c.axes_dims_rope, c.attention_head_dim
                ),
            ));
        }
        Ok(c)
    }

    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// diffusers' `get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)`
/// in fp32.
pub(crate) fn time_proj(t: &Tensor) -> Tensor {
    crate::nn::sinusoidal_embedding(t, TIME_PROJ_DIM, true, 0.0)
}

/// `linear_2(act(linear_1(x)))`: `TimestepEmbedding` and `PixArtAlphaTextProjection(act_fn="silu")`.
pub struct Mlp2 {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Mlp2 {
    pub(crate) fn new(p: &P, inp: i64, dim: i64) -> Self {
        Mlp2 {
            linear_1: Linear::new(&p.sub("linear_1"), inp, dim, true),
            linear_2: Linear::new(&p.sub("linear_2"), dim, dim, true),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj`, tanh GELU, `net.2`.
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    fn new(p: &P, dim: i64) -> Self {
        let inner = 4 * dim;
        FeedForward {
            proj: Linear::new(&p.sub("net").sub(0).sub("proj"), dim, inner, true),
            out: Linear::new(&p.sub("net").sub(2), inner, dim, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("tanh"))
    }
}

/// The adaLN modulation: `linear(silu(temb))` cut into `n` vectors of width `dim`.
pub struct Modulation {
    pub linear: Linear,
    pub n: i64,
}

impl Modulation {
    fn new(p: &P, dim: i64, n: i64) -> Self {
        Self::named(p, "linear", dim, n)
    }

    /// The Linear at `p.<leaf>` (Flux: `norm1.linear`; Qwen-Image: `img_mod.1`, index 1 of
    /// `Sequential(SiLU, Linear)`).
    pub(crate) fn named(p: &P, leaf: &str, dim: i64, n: i64) -> Self {
        Modulation { linear: Linear::new(&p.sub(leaf), dim, n * dim, true), n }
    }

    pub(crate) fn chunks(&self, temb: &Tensor) -> Vec<Tensor> {
        self.linear.forward(&temb.silu()).chunk(self.n, 1)
    }
}

/// LayerNorm without affine parameters, eps 1e-6 (every Flux norm), then `· (1 + scale) + shift`.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    let c = *x.size().last().unwrap();
    x.layer_norm([c], None::<&Tensor>, None::<&Tensor>, 1e-6, false) * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// The rotary tables `(cos, sin)`, each `[S, head_dim]`, for position ids `[S, n_axes]`:
/// diffusers' `FluxPosEmbed` (frequencies and angles in f64, then f32; each frequency repeated
/// for its pair of channels). An f64 model keeps them in f64 ([`rope_for`]).
pub fn rope(ids: &Tensor, axes_dim: &[i64]) -> (Tensor, Tensor) {
    rope_for(ids, axes_dim, Kind::Float)
}

/// [`rope`] with the tables in `kind`: f32 as diffusers (its `.float()`, also under bf16 and
/// fp16), f64 for an f64 model — where diffusers' f32 tables and f32 rotation would round every
/// q and k to f32 and make finite differences of the f64 network meaningless.
pub fn rope_for(ids: &Tensor, axes_dim: &[i64], kind: Kind) -> (Tensor, Tensor) {
    let table = if kind == Kind::Double { Kind::Double } else { Kind::Float };
    let pos = ids.to_kind(Kind::Float).to_kind(Kind::Double);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for (i, &dim) in axes_dim.iter().enumerate() {
        let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Double, ids.device())) / dim as f64;
        let freqs = Tensor::pow_scalar(ROPE_THETA, &exponent).reciprocal();
        let angles = pos.select(1, i as i64).outer(&freqs);
        cos.push(angles.cos().repeat_interleave_self_int(2, 1, None).to_kind(table));
        sin.push(angles.sin().repeat_interleave_self_int(2, 1, None).to_kind(table));
    }
    (Tensor::cat(&cos, -1), Tensor::cat(&sin, -1))
}

/// Rotates `x` `[B, S, H, D]` by the tables (diffusers' `apply_rotary_emb(use_real=True,
/// use_real_unbind_dim=-1, sequence_dim=1)`): pairs (x₀, x₁) → (x₀cos − x₁sin, x₁cos + x₀sin),
/// computed in the tables' kind (f32, or f64 for an f64 model).
fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
    let size = x.size();
    let pairs = x.reshape([size[0], size[1], size[2], -1, 2]);
    let (re, im) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let rotated = Tensor::stack(&[-im, re], -1).flatten(3, -1);
    let (cos, sin) = (cos.unsqueeze(0).unsqueeze(2), sin.unsqueeze(0).unsqueeze(2));
    let k = cos.kind();
    (x.to_kind(k) * cos + rotated.to_kind(k) * sin).to_kind(x.kind())
}

/// q, k, v projections of one stream with their per-head RMS norms.
pub struct Qkv {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
}

impl Qkv {
    /// `names`: the projections' and norms' names (`to_q`… / `norm_q`… or `add_q_proj`… /
    /// `norm_added_q`…).
    fn new(p: &P, dim: i64, head_dim: i64, names: [&str; 5]) -> Self {
        Qkv {
            q: Linear::new(&p.sub(names[0]), dim, dim, true),
            k: Linear::new(&p.sub(names[1]), dim, dim, true),
            v: Linear::new(&p.sub(names[2]), dim, dim, true),
            norm_q: RmsNorm::new(&p.sub(names[3]), head_dim, 1e-6),
            norm_k: RmsNorm::new(&p.sub(names[4]), head_dim, 1e-6),
        }
    }

    /// `[B, S, H, D]` each.
    fn project(&self, x: &Tensor, head_dim: i64) -> [Tensor; 3] {
        let heads = |t: Tensor| {
            let s = t.size();
            t.reshape([s[0], s[1], -1, head_dim])
        };
        [
            self.norm_q.forward(&heads(self.q.forward(x))),
            self.norm_k.forward(&heads(self.k.forward(x))),
            heads(self.v.forward(x)),
        ]
    }
}

/// Scaled dot-product attention over `[B, S, H, D]` after RoPE on q and k → `[B, S, H·D]`;
/// `mask`: a bool key mask `[B, 1, 1, S]` (true = attend; Qwen-Image's padded text).
fn attend([q, k, v]: [Tensor; 3], rope: &(Tensor, Tensor), mask: Option<&Tensor>) -> Tensor {
    let (q, k) = (apply_rope(&q, rope), apply_rope(&k, rope));
    let kind = q.kind();
    let o = Tensor::scaled_dot_product_attention::<&Tensor>(
        &q.transpose(1, 2),
        &k.transpose(1, 2),
        &v.transpose(1, 2),
        mask,
        0.0,
        false,
        None,
        false,
    );
    o.transpose(1, 2).flatten(2, 3).to_kind(kind)
}

/// A double-stream block (`FluxTransformerBlock`): image and text keep their own weights and
/// attend jointly (text tokens first).
pub struct DoubleBlock {
    pub norm1: Modulation,
    pub norm1_context: Modulation,
    pub img: Qkv,
    pub txt: Qkv,
    pub to_out: Linear,
    pub to_add_out: Linear,
    pub ff: FeedForward,
    pub ff_context: FeedForward,
    head_dim: i64,
}

/// Where a double-stream block keeps its modulations and MLPs: Flux's `norm1.linear`,
/// `norm1_context.linear`, `ff`, `ff_context`; Qwen-Image's `img_mod.1`, `txt_mod.1`,
/// `img_mlp`, `txt_mlp` (the attention's names are the same in both).
pub(crate) struct BlockNames {
    pub img_mod: (&'static str, &'static str),
    pub txt_mod: (&'static str, &'static str),
    pub img_mlp: &'static str,
    pub txt_mlp: &'static str,
}

const FLUX_BLOCK: BlockNames = BlockNames {
    img_mod: ("norm1", "linear"),
    txt_mod: ("norm1_context", "linear"),
    img_mlp: "ff",
    txt_mlp: "ff_context",
};

impl DoubleBlock {
    fn new(p: &P, dim: i64, head_dim: i64) -> Self {
        Self::named(p, dim, head_dim, &FLUX_BLOCK)
    }

    pub(crate) fn named(p: &P, dim: i64, head_dim: i64, n: &BlockNames) -> Self {
        let a = p.sub("attn");
        DoubleBlock {
            norm1: Modulation::named(&p.sub(n.img_mod.0), n.img_mod.1, dim, 6),
            norm1_context: Modulation::named(&p.sub(n.txt_mod.0), n.txt_mod.1, dim, 6),
            img: Qkv::new(&a, dim, head_dim, ["to_q", "to_k", "to_v", "norm_q", "norm_k"]),
            txt: Qkv::new(
                &a,
                dim,
                head_dim,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
            ),
            to_out: Linear::new(&a.sub("to_out").sub(0), dim, dim, true),
            to_add_out: Linear::new(&a.sub("to_add_out"), dim, dim, true),
            ff: FeedForward::new(&p.sub(n.img_mlp), dim),
            ff_context: FeedForward::new(&p.sub(n.txt_mlp), dim),
            head_dim,
        }
    }

    /// → (image, text) hidden states.
    pub fn forward(&self, img: &Tensor, txt: &Tensor, temb: &Tensor, rope: &(Tensor, Tensor)) -> (Tensor, Tensor) {
        self.forward_masked(img, txt, temb, rope, None)
    }

    /// [`forward`](Self::forward) with a bool key mask `[B, 1, 1, S_txt + S_img]` over the joint
    /// sequence (Qwen-Image's text mask; padded text keys are not attended).
    pub fn forward_masked(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let m = self.norm1.chunks(temb);
        let c = self.norm1_context.chunks(temb);
        // chunk order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        let img_n = modulate(img, &m[0], &m[1]);
        let txt_n = modulate(txt, &c[0], &c[1]);
        let [iq, ik, iv] = self.img.project(&img_n, self.head_dim);
        let [tq, tk, tv] = self.txt.project(&txt_n, self.head_dim);
        let joint = [Tensor::cat(&[tq, iq], 1), Tensor::cat(&[tk, ik], 1), Tensor::cat(&[tv, iv], 1)];
        let o = attend(joint, rope, mask);
        let n_txt = txt.size()[1];
        let (txt_o, img_o) = (o.narrow(1, 0, n_txt), o.narrow(1, n_txt, o.size()[1] - n_txt));
        let img = img + m[2].unsqueeze(1) * self.to_out.forward(&img_o.contiguous());
        let img = &img + m[5].unsqueeze(1) * self.ff.forward(&modulate(&img, &m[3], &m[4]));
        let txt = txt + c[2].unsqueeze(1) * self.to_add_out.forward(&txt_o.contiguous());
        let txt = &txt + c[5].unsqueeze(1) * self.ff_context.forward(&modulate(&txt, &c[3], &c[4]));
        (clip_f16(img), clip_f16(txt))
    }
}

/// diffusers clamps fp16 hidden states to ±65504 after each block (an overflow guard).
pub(crate) fn clip_f16(x: Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        x.clamp(-65504.0, 65504.0)
    } else {
        x
    }
}

/// A single-stream block (`FluxSingleTransformerBlock`) over the concatenated [text, image]
/// sequence: attention and the MLP run in parallel from one modulated input.
pub struct SingleBlock {
    pub norm: Modulation,
    pub qkv: Qkv,
    pub proj_mlp: Linear,
    pub proj_out: Linear,
    head_dim: i64,
}

impl SingleBlock {
    fn new(p: &P, dim: i64, head_dim: i64) -> Self {
        let mlp = 4 * dim;
        SingleBlock {
            norm: Modulation::new(&p.sub("norm"), dim, 3),
            qkv: Qkv::new(&p.sub("attn"), dim, head_dim, ["to_q", "to_k", "to_v", "norm_q", "norm_k"]),
            proj_mlp: Linear::new(&p.sub("proj_mlp"), dim, mlp, true),
            proj_out: Linear::new(&p.sub("proj_out"), dim + mlp, dim, true),
            head_dim,
        }
    }

    /// `x`: [B, text + image, dim].
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &(Tensor, Tensor)) -> Tensor {
        let m = self.norm.chunks(temb);
        let n = modulate(x, &m[0], &m[1]);
        let mlp = self.proj_mlp.forward(&n).gelu("tanh");
        let attn = attend(self.qkv.project(&n, self.head_dim), rope, None);
        clip_f16(x + m[2].unsqueeze(1) * self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2)))
    }
}

/// The inputs of one forward, as FluxPipeline passes them.
pub struct FluxInputs<'a> {
    /// Packed latents `[B, (h/2)(w/2), 4·C]` ([`pack_latents`]).
    pub hidden_states: &'a Tensor,
    /// T5 hidden states `[B, M, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// CLIP's pooled output `[B, pooled_projection_dim]`.
    pub pooled_projections: &'a Tensor,
    /// σ ∈ [0, 1] per sample `[B]` (the model scales it by 1000).
    pub timestep: &'a Tensor,
    /// `[(h/2)(w/2), 3]` ([`latent_image_ids`]).
    pub img_ids: &'a Tensor,
    /// `[M, 3]` (zeros in FluxPipeline).
    pub txt_ids: &'a Tensor,
    /// Flux-dev's distilled guidance scale per sample `[B]` (None for a model without
    /// `guidance_embeds`).
    pub guidance: Option<&'a Tensor>,
    /// The identity tokens `[B, M, dim]` the installed [`IdentityInjection`] attends to
    /// (required when one is installed, refused otherwise).
    pub id_tokens: Option<&'a Tensor>,
}

pub struct FluxTransformer2DModel {
    pub config: FluxConfig,
    pub x_embedder: Linear,
    pub context_embedder: Linear,
    pub timestep_embedder: Mlp2,
    pub guidance_embedder: Option<Mlp2>,
    pub text_embedder: Mlp2,
    pub double: Vec<DoubleBlock>,
    pub single: Vec<SingleBlock>,
    pub norm_out: Modulation,
    pub proj_out: Linear,
    /// DTBack's identity injection, when installed (crate::identity).
    pub identity: Option<IdentityInjection>,
}

impl FluxTransformer2DModel {
    pub fn new(store: &Store, c: &FluxConfig) -> Self {
        let p = store.root();
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        let tte = p.sub("time_text_embed");
        FluxTransformer2DModel {
            config: c.clone(),
            timestep_embedder: Mlp2::new(&tte.sub("timestep_embedder"), TIME_PROJ_DIM, dim),
            guidance_embedder: c.guidance_embeds.then(|| Mlp2::new(&tte.sub("guidance_embedder"), TIME_PROJ_DIM, dim)),
            text_embedder: Mlp2::new(&tte.sub("text_embedder"), c.pooled_projection_dim, dim),
            context_embedder: Linear::new(&p.sub("context_embedder"), c.joint_attention_dim, dim, true),
            x_embedder: Linear::new(&p.sub("x_embedder"), c.in_channels, dim, true),
            double: (0..c.num_layers).map(|i| DoubleBlock::new(&p.sub("transformer_blocks").sub(i), dim, hd)).collect(),
            single: (0..c.num_single_layers)
                .map(|i| SingleBlock::new(&p.sub("single_transformer_blocks").sub(i), dim, hd))
                .collect(),
            norm_out: Modulation::new(&p.sub("norm_out"), dim, 2),
            proj_out: Linear::new(&p.sub("proj_out"), dim, c.patch_size * c.patch_size * c.out_channels(), true),
            identity: None,
        }
    }

    /// The velocity prediction `[B, N, out_channels]` for packed latents.
    pub fn forward(&self, i: &FluxInputs) -> Result<Tensor> {
        self.forward_reseeded(i, None)
    }

    /// [`forward`](Self::forward) with libtorch's generator seeded per segment (LoRA dropout;
    /// see [`crate::checkpoint`]).
    pub fn forward_reseeded(&self, i: &FluxInputs, reseed: Option<i64>) -> Result<Tensor> {
        Ok(checkpoint::forward(self, self.segment_inputs(i)?, reseed))
    }

    /// Gradient checkpointing per block (diffusers' granularity: each double and each single
    /// block, plus the embeddings and the head): the output is a leaf; after the backward into
    /// it, [`FluxTape::backward`] recomputes the blocks in reverse and pushes the gradient into
    /// the LoRA weights (and into the text states' own graph when they carry one).
    pub fn forward_checkpointed(&self, i: &FluxInputs, reseed: Option<i64>) -> Result<(Tensor, FluxTape)> {
        Ok(checkpoint::forward_checkpointed(self, self.segment_inputs(i)?, reseed))
    }

    /// The program's input slots (see [`Segment`]), in the weights' kind where diffusers casts.
    fn segment_inputs(&self, i: &FluxInputs) -> Result<Vec<Tensor>> {
        let kind = self.x_embedder.weight.kind();
        match (&self.guidance_embedder, i.guidance) {
            (Some(_), None) => {
                return Err(guidance_error(
                    "the model embeds a guidance scale (Flux-dev), so every forward needs one: set a guidance \
                     scale (FluxPipeline's default is 3.5)",
                ))
            }
            (None, Some(_)) => {
                return Err(guidance_error(
                    "false: this model (e.g. Flux-schnell) has no guidance embedding; use no guidance or true CFG \
                     with a negative prompt",
                ))
            }
            _ => {}
        }
        // diffusers casts timestep and guidance to the hidden dtype *before* the ×1000 (bf16
        // rounding included); the sinusoidal projection itself runs in f32.
        let scaled = |t: &Tensor| t.to_kind(kind) * TIME_SCALE;
        let guidance = i.guidance.map(scaled).unwrap_or_else(|| Tensor::zeros([0], (kind, i.timestep.device())));
        let (cos, sin) = rope_for(&Tensor::cat(&[i.txt_ids, i.img_ids], 0), &self.config.axes_dims_rope, kind);
        let id_tokens = match (&self.identity, i.id_tokens) {
            (Some(_), Some(t)) => t.shallow_clone(),
            (None, None) => Tensor::zeros([0], (kind, i.timestep.device())),
            (Some(_), None) => {
                return Err(identity_error(
                    "an identity injection is installed: every forward needs the identity tokens (the `face_embedding` / `body_embedding` inputs)",
                ))
            }
            (None, Some(_)) => {
                return Err(identity_error("identity tokens were given but no identity injection is installed"))
            }
        };
        Ok(vec![
            i.hidden_states.to_kind(kind),
            i.encoder_hidden_states.to_kind(kind),
            i.pooled_projections.to_kind(kind),
            scaled(i.timestep),
            guidance,
            cos,
            sin,
            id_tokens,
        ])
    }

    /// The conditioning vector `temb` [B, dim]: timestep (+ guidance) + pooled text.
    fn conditioning(&self, pooled: &Tensor, timestep: &Tensor, guidance: &Tensor) -> Tensor {
        let embed = |mlp: &Mlp2, t: &Tensor| mlp.forward(&time_proj(t).to_kind(pooled.kind()));
        // Out of place (no `+=`): libtorch's in-place add would rewrite a tensor autograd holds.
        let time = embed(&self.timestep_embedder, timestep);
        let time = match &self.guidance_embedder {
            Some(g) => time + embed(g, guidance),
            None => time,
        };
        time + self.text_embedder.forward(pooled)
    }

    /// `norm_out` (`AdaLayerNormContinuous`: scale first, then shift — BFL's `final_layer`
    /// stores them the other way round) and `proj_out`.
    fn head(&self, img: &Tensor, temb: &Tensor) -> Tensor {
        // diffusers: `linear(silu(temb).to(x.dtype))`, the cast after the SiLU.
        let m = self.norm_out.linear.forward(&temb.silu().to_kind(img.kind())).chunk(2, 1);
        self.proj_out.forward(&modulate(img, &m[1], &m[0]))
    }
}

fn identity_error(msg: &str) -> crate::error::Error {
    crate::error::Error::Config { path: "transformer".into(), field: "identity".into(), msg: msg.into() }
}

fn guidance_error(msg: &str) -> crate::error::Error {
    crate::error::Error::Config {
        path: "transformer/config.json".into(),
        field: "guidance_embeds".into(),
        msg: msg.into(),
    }
}

/// What the Flux transformer's checkpointed backward needs (see [`crate::checkpoint::Tape`]).
pub type FluxTape = Tape;

/// The checkpointing segments. Input slots: 0 packed latents, 1 T5 states, 2 pooled CLIP,
/// 3 timestep·1000, 4 guidance·1000 (empty without a guidance embedding), 5/6 RoPE cos/sin.
/// The double blocks' two streams travel as one tensor `cat([text, image], 1)` (a segment
/// returns one tensor; the split point is the T5 length, read from slot 1's shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// `temb` from slots 2, 3, 4.
    Conditioning,
    /// `cat([context_embedder(T5), x_embedder(latents)])`.
    Embed,
    Double(usize),
    Single(usize),
    /// `norm_out` + `proj_out` on the image tokens.
    Head,
    /// The identity injection after double block i (`true`) or single block i (`false`), on the
    /// image tokens; reads slot 8, the identity tokens.
    Inject(bool, usize),
}

const SLOT_LATENTS: usize = 0;
const SLOT_TEXT: usize = 1;
const SLOT_POOLED: usize = 2;
const SLOT_TIMESTEP: usize = 3;
const SLOT_GUIDANCE: usize = 4;
const SLOT_COS: usize = 5;
const SLOT_SIN: usize = 6;
const SLOT_ID: usize = 7;
const INPUT_SLOTS: usize = 8;

impl Segments for FluxTransformer2DModel {
    type Segment = Segment;

    fn program(&self) -> Vec<Step<Segment>> {
        let mut p = Program::new(INPUT_SLOTS);
        let temb = p.push(Segment::Conditioning, vec![SLOT_POOLED, SLOT_TIMESTEP, SLOT_GUIDANCE], None);
        let mut x = p.push(Segment::Embed, vec![SLOT_LATENTS, SLOT_TEXT], None);
        let inj = self.identity.as_ref();
        for i in 0..self.double.len() {
            x = p.push(Segment::Double(i), vec![x, temb, SLOT_COS, SLOT_SIN], Some(SLOT_TEXT));
            if inj.is_some_and(|j| j.after_double(i)) {
                x = p.push(Segment::Inject(true, i), vec![x, SLOT_ID], Some(SLOT_TEXT));
            }
        }
        for i in 0..self.single.len() {
            x = p.push(Segment::Single(i), vec![x, temb, SLOT_COS, SLOT_SIN], None);
            if inj.is_some_and(|j| j.after_single(i)) {
                x = p.push(Segment::Inject(false, i), vec![x, SLOT_ID], Some(SLOT_TEXT));
            }
        }
        p.push(Segment::Head, vec![x, temb], Some(SLOT_TEXT));
        p.steps()
    }

    fn run_segment(&self, segment: Segment, x: &[Tensor], text_shape: Option<Vec<i64>>) -> Tensor {
        let split = |joint: &Tensor| checkpoint::split_joint(joint, text_shape.as_deref());
        match segment {
            Segment::Conditioning => self.conditioning(&x[0], &x[1], &x[2]),
            Segment::Embed => Tensor::cat(&[self.context_embedder.forward(&x[1]), self.x_embedder.forward(&x[0])], 1),
            Segment::Double(i) => {
                let (txt, img) = split(&x[0]);
                let (img, txt) =
                    self.double[i].forward(&img, &txt, &x[1], &(x[2].shallow_clone(), x[3].shallow_clone()));
                Tensor::cat(&[txt, img], 1)
            }
            Segment::Single(i) => self.single[i].forward(&x[0], &x[1], &(x[2].shallow_clone(), x[3].shallow_clone())),
            Segment::Head => self.head(&split(&x[0]).1, &x[1]),
            Segment::Inject(double, i) => {
                let (txt, img) = split(&x[0]);
                let inj = self.identity.as_ref().expect("the program injects only with an injection installed");
                Tensor::cat(&[txt, inj.inject(double, i, &img, &x[1])], 1)
            }
        }
    }
}

/// FluxPipeline's `_pack_latents`: `[B, C, H, W]` → `[B, (H/2)(W/2), 4C]` (2×2 patches,
/// channel-major within a patch).
pub fn pack_latents(x: &Tensor) -> Tensor {
    let (b, c, h, w) = x.size4().unwrap();
    x.view([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([b, (h / 2) * (w / 2), c * 4])
}

/// The inverse of [`pack_latents`] (FluxPipeline's `_unpack_latents` at latent size `h`×`w`).
pub fn unpack_latents(x: &Tensor, h: i64, w: i64) -> Tensor {
    let (b, _, c4) = x.size3().unwrap();
    let c = c4 / 4;
    x.view([b, h / 2, w / 2, c, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([b, c, h, w])
}

/// FluxPipeline's `_prepare_latent_image_ids` for a packed grid of `h2`×`w2` tokens:
/// `[h2·w2, 3]` rows `(0, row, column)`.
pub fn latent_image_ids(h2: i64, w2: i64, device: tch::Device) -> Tensor {
    let opts = (Kind::Float, device);
    let rows = Tensor::arange(h2, opts).unsqueeze(1).expand([h2, w2], false);
    let cols = Tensor::arange(w2, opts).unsqueeze(0).expand([h2, w2], false);
    Tensor::stack(&[Tensor::zeros([h2, w2], opts), rows, cols], -1).reshape([h2 * w2, 3])
}

/// The module paths whose Linear weights `fp8_blocks` stores in fp8: every double and single
/// block (≈ 99 % of the 12 B parameters); the embedders, the head and the norms keep the
/// store's kind, as musubi-tuner's `--fp8_base` keeps them.
pub const FP8_BLOCK_PREFIXES: [&str; 2] = ["transformer_blocks.", "single_transformer_blocks."];

fn new_store(mode: crate::store::Mode, kind: Kind, device: tch::Device, fp8_blocks: bool) -> Store {
    let store = Store::new(mode, kind, device);
    if fp8_blocks {
        store.with_fp8_linears(&FP8_BLOCK_PREFIXES)
    } else {
        store
    }
}

/// A `transformer/` folder (or the model root holding one): `config.json` and the diffusers
/// weights (single or sharded), every mismatch named. `Mode::Plan` checks names and shapes
/// from the headers without reading a weight. `fp8_blocks`: the blocks' Linear weights are held
/// in fp8 with a per-tensor scale (see [`FP8_BLOCK_PREFIXES`]).
pub fn flux_from_diffusers(
    dir: &Path,
    kind: Kind,
    device: tch::Device,
    mode: crate::store::Mode,
    fp8_blocks: bool,
) -> Result<(Store, FluxTransformer2DModel)> {
    let dir =
        if dir.join("transformer").join("config.json").exists() { dir.join("transformer") } else { dir.to_path_buf() };
    let cfg = FluxConfig::from_file(&dir.join("config.json"))?;
    let store = new_store(mode, kind, device, fp8_blocks);
    let model = FluxTransformer2DModel::new(&store, &cfg);
    crate::load::apply(
        &store,
        crate::load::read_component_weights(&dir)?,
        &dir.display().to_string(),
        "FluxTransformer2DModel",
    )?;
    Ok((store, model))
}

/// The per-head RMS norms, which are not LoRA targets and so not in `lora_keys`' module table:
/// BFL suffix (after `double_blocks.<i>.` / `single_blocks.<i>.`) → diffusers suffix.
const BFL_NORMS_DOUBLE: &[(&str, &str)] = &[
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
];
const BFL_NORMS_SINGLE: &[(&str, &str)] =
    &[("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")];

fn bfl_norm(name: &str) -> Option<String> {
    let (table, block, rest) = if let Some(r) = name.strip_prefix("double_blocks.") {
        (BFL_NORMS_DOUBLE, "transformer_blocks", r)
    } else {
        (BFL_NORMS_SINGLE, "single_transformer_blocks", name.strip_prefix("single_blocks.")?)
    };
    let (i, leaf) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    table.iter().find(|(b, _)| *b == leaf).map(|(_, d)| format!("{block}.{i}.{d}"))
}

/// The tensors of an original Black Forest Labs transformer file (`flux1-dev.safetensors`; also
/// ComfyUI's `model.diffusion_model.`-prefixed and fp8-scaled ones) under diffusers' names: the
/// module map is `lora_keys::flux`'s (one table for LoRA files and weights), fused `qkv` /
/// `linear1` weights and biases become row slices (read from disk on their own), the final
/// modulation's halves are swapped (BFL: shift, scale). A name that maps to nothing is kept as it
/// is, so [`crate::load::apply`] lists it as unexpected.
pub fn bfl_to_diffusers(
    tensors: Vec<(String, crate::load::Stored)>,
    inner_dim: i64,
) -> Result<Vec<(String, crate::load::Stored)>> {
    use likeness_diffusion::lora_keys::flux::{from_bfl, part_rows};
    let mut out = Vec::with_capacity(tensors.len() + tensors.len() / 4);
    for (name, t) in crate::load::fold_fp8_scales(tensors)? {
        let bare =
            name.strip_prefix("model.diffusion_model.").or(name.strip_prefix("diffusion_model.")).unwrap_or(&name);
        if let Some(n) = bfl_norm(bare) {
            out.push((n, t));
            continue;
        }
        let module = bare.rsplit_once('.').filter(|(_, leaf)| matches!(*leaf, "weight" | "bias"));
        let Some((b, leaf)) = module.and_then(|(m, leaf)| Some((from_bfl(m)?, leaf))) else {
            out.push((name, t));
            continue;
        };
        let rows = t.size()[0];
        let slices = part_rows(&b, rows as usize, inner_dim as usize).ok_or_else(|| crate::error::Error::Config {
            path: bare.into(),
            field: "shape".into(),
            msg: format!("{rows} rows cannot be split into {:?} (inner dim {inner_dim})", b.parts),
        })?;
        if b.swap_halves {
            let h = rows / 2;
            out.push((
                format!("{}.{leaf}", b.parts[0]),
                crate::load::Stored::concat(vec![t.rows(h, h)?, t.rows(0, h)?])?,
            ));
            continue;
        }
        if b.parts.len() == 1 {
            out.push((format!("{}.{leaf}", b.parts[0]), t));
            continue;
        }
        for (part, (s, e)) in b.parts.iter().zip(slices) {
            out.push((format!("{part}.{leaf}"), t.rows(s as i64, (e - s) as i64)?));
        }
    }
    Ok(out)
}

/// The transformer from an original BFL single file, with its config from elsewhere (a
/// diffusers `transformer/config.json`: the file carries none). `Mode::Plan` checks names and
/// shapes only.
pub fn flux_from_bfl_single_file(
    file: &Path,
    cfg: &FluxConfig,
    kind: Kind,
    device: tch::Device,
    mode: crate::store::Mode,
    fp8_blocks: bool,
) -> Result<(Store, FluxTransformer2DModel)> {
    let store = new_store(mode, kind, device, fp8_blocks);
    let model = FluxTransformer2DModel::new(&store, cfg);
    let tensors = bfl_to_diffusers(crate::load::read_st(file)?, cfg.inner_dim())?;
    crate::load::apply(&store, tensors, &file.display().to_string(), "FluxTransformer2DModel (BFL single file)")?;
    Ok((store, model))
}
