//! diffusers' `QwenImageTransformer2DModel` (Qwen-Image / Qwen-Image-Edit(-Plus), diffusers
//! 0.42.1 `transformer_qwenimage.py`), on the toolkit's Flux parts: its blocks are Flux's
//! double-stream blocks under other names (`img_mod.1` / `txt_mod.1` / `img_mlp` / `txt_mlp`)
//! with a key mask over the padded text, so nothing of [`crate::flux`] is repeated here.
//!
//! What is Qwen-Image's own: the text input (`txt_norm` RMSNorm over the 3584-d Qwen2.5-VL
//! states, then `txt_in`), the timestep embedding (`Timesteps(256, flip_sin_to_cos, scale=1000)`:
//! the sinusoid of `1000 · (t · freq)` in f32, t cast to the weights' kind first), no pooled text
//! and no guidance, and the RoPE positions ([`rope_positions`]): per image (frame = its index in
//! `img_shapes`, h and w centred, `scale_rope`), text on all three axes from the largest half
//! size on.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::checkpoint::{self, Program, Segments, Step, Tape};
use crate::config::{cfg_err, read_json};
use crate::error::Result;
use crate::flux::{modulate, rope_for, BlockNames, DoubleBlock, Mlp2, Modulation};
use crate::nn::{Linear, RmsNorm};
use crate::store::{Store, P};

fn d_patch() -> i64 {
    2
}
fn d_in() -> i64 {
    64
}
fn d_out() -> i64 {
    16
}
fn d_layers() -> i64 {
    60
}
fn d_head_dim() -> i64 {
    128
}
fn d_heads() -> i64 {
    24
}
fn d_joint() -> i64 {
    3584
}
fn d_axes() -> Vec<i64> {
    vec![16, 56, 56]
}

/// `transformer/config.json` (defaults: diffusers' `QwenImageTransformer2DModel.__init__`).
#[derive(Debug, Clone, Deserialize)]
pub struct QwenImageConfig {
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_in")]
    pub in_channels: i64,
    #[serde(default = "d_out")]
    pub out_channels: i64,
    #[serde(default = "d_layers")]
    pub num_layers: i64,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: i64,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<i64>,
    /// Qwen-Image-Edit-2511's per-token timestep split; refused (2509 has none).
    #[serde(default)]
    pub zero_cond_t: bool,
    #[serde(default)]
    pub use_additional_t_cond: bool,
    #[serde(default)]
    pub use_layer3d_rope: bool,
}

/// The sinusoid's width (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: i64 = 256;
/// `Timesteps(scale=1000)`: the model gets σ ∈ [0, 1].
const TIME_SCALE: f64 = 1000.0;

const QWEN_BLOCK: BlockNames =
    BlockNames { img_mod: ("img_mod", "1"), txt_mod: ("txt_mod", "1"), img_mlp: "img_mlp", txt_mlp: "txt_mlp" };

impl QwenImageConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, read_json(path)?)
    }

    pub fn from_value(path: &Path, v: Value) -> Result<Self> {
        if let Some(name) = v.get("_class_name").and_then(Value::as_str) {
            if name != "QwenImageTransformer2DModel" {
                return Err(cfg_err(path, "_class_name", format!("{name} is not a QwenImageTransformer2DModel")));
            }
        }
        let c: QwenImageConfig = serde_json::from_value(v).map_err(|e| cfg_err(path, "(schema)", e.to_string()))?;
        for (field, on) in [
            ("zero_cond_t", c.zero_cond_t),
            ("use_additional_t_cond", c.use_additional_t_cond),
            ("use_layer3d_rope", c.use_layer3d_rope),
            ("guidance_embeds", c.guidance_embeds),
        ] {
            if on {
                return Err(cfg_err(
                    path,
                    field,
                    "true is a later Qwen-Image variant's (Edit-2511 / Layered); Qwen-Image and Qwen-Image-Edit(-2509) have false",
                ));
            }
        }
        if c.in_channels != c.out_channels * c.patch_size * c.patch_size {
            return Err(cfg_err(
                path,
                "in_channels",
                format!(
                    "{} must be out_channels · patch_size² = {} (the pipeline's 2×2 packing)",
                    c.in_channels,
                    c.out_channels * c.patch_size * c.patch_size
                ),
            ));
        }
        if c.axes_dims_rope.len() != 3
            || c.axes_dims_rope.iter().sum::<i64>() != c.attention_head_dim
            || c.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return Err(cfg_err(
                path,
                "axes_dims_rope",
                format!(
                    "{:?} must be three even sizes (frame, height, width) that sum to attention_head_dim = {}",
                    c.axes_dims_rope, c.attention_head_dim
                ),
            ));
        }
        Ok(c)
    }

    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// One forward's inputs, as QwenImagePipeline / QwenImageEditPlusPipeline pass them.
pub struct QwenInputs<'a> {
    /// Packed latents `[B, S_img, in_channels]`: the noisy target's tokens, then each control
    /// image's (edit-plus).
    pub hidden_states: &'a Tensor,
    /// Qwen2.5-VL states `[B, S_txt, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B, S_txt]`, nonzero = a real token (None: every token is).
    pub encoder_hidden_states_mask: Option<&'a Tensor>,
    /// σ ∈ [0, 1] per sample `[B]`.
    pub timestep: &'a Tensor,
    /// `(frames, h, w)` of each image in packed tokens, in `hidden_states`' order; the same for
    /// every sample (diffusers reads only the first sample's).
    pub img_shapes: &'a [(i64, i64, i64)],
}

pub struct QwenImageTransformer2DModel {
    pub config: QwenImageConfig,
    pub img_in: Linear,
    pub txt_norm: RmsNorm,
    pub txt_in: Linear,
    pub timestep_embedder: Mlp2,
    pub blocks: Vec<DoubleBlock>,
    pub norm_out: Modulation,
    pub proj_out: Linear,
}

/// RoPE positions `[S_txt + S_img, 3]` (text first, as the joint sequence): image k's tokens
/// row-major over its `h × w` grid at (frame = k, centred h, centred w); text token j at
/// `m + j` on all three axes, m = the largest `max(h/2, w/2)` over the images.
pub fn rope_positions(img_shapes: &[(i64, i64, i64)], s_txt: i64, device: tch::Device) -> Tensor {
    let mut rows: Vec<[f32; 3]> = Vec::new();
    let mut max_half = 0;
    let mut images = Vec::new();
    for (k, &(f, h, w)) in img_shapes.iter().enumerate() {
        max_half = max_half.max(h / 2).max(w / 2);
        for fi in 0..f {
            for i in 0..h {
                for j in 0..w {
                    // scale_rope: -(h - h/2) … h/2 - 1 (and the same for w).
                    images.push([(k as i64 + fi) as f32, (i - (h - h / 2)) as f32, (j - (w - w / 2)) as f32]);
                }
            }
        }
    }
    for j in 0..s_txt {
        let p = (max_half + j) as f32;
        rows.push([p, p, p]);
    }
    rows.extend(images);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([-1, 3]).to_device(device)
}

impl QwenImageTransformer2DModel {
    pub fn new(store: &Store, c: &QwenImageConfig) -> Self {
        let p = store.root();
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        QwenImageTransformer2DModel {
            config: c.clone(),
            img_in: Linear::new(&p.sub("img_in"), c.in_channels, dim, true),
            txt_norm: RmsNorm::new(&p.sub("txt_norm"), c.joint_attention_dim, 1e-6),
            txt_in: Linear::new(&p.sub("txt_in"), c.joint_attention_dim, dim, true),
            timestep_embedder: Mlp2::new(&p.sub("time_text_embed").sub("timestep_embedder"), TIME_PROJ_DIM, dim),
            blocks: (0..c.num_layers).map(|i| block(&p.sub("transformer_blocks").sub(i), dim, hd)).collect(),
            norm_out: Modulation::named(&p.sub("norm_out"), "linear", dim, 2),
            proj_out: Linear::new(&p.sub("proj_out"), dim, c.patch_size * c.patch_size * c.out_channels, true),
        }
    }

    /// `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)` then the MLP:
    /// `cat[cos, sin](1000 · (t · freqᵢ))` in f32, freqᵢ = exp(−ln(10⁴)·i/128).
    fn time_embedding(&self, t: &Tensor, kind: Kind) -> Tensor {
        let half = TIME_PROJ_DIM / 2;
        let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
        let arg = (t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0)) * TIME_SCALE;
        let emb = Tensor::cat(&[arg.cos(), arg.sin()], -1).to_kind(kind);
        self.timestep_embedder.forward(&emb)
    }

    /// The velocity `[B, S_img, patch²·out_channels]` for all image tokens (the pipeline keeps the
    /// first image's).
    pub fn forward(&self, i: &QwenInputs) -> Result<Tensor> {
        let kind = self.img_in.weight.kind();
        let (_, s_img, _) = i.hidden_states.size3()?;
        let s_txt = i.encoder_hidden_states.size()[1];
        let tokens: i64 = i.img_shapes.iter().map(|(f, h, w)| f * h * w).sum();
        if tokens != s_img {
            return Err(crate::error::Error::Config {
                path: "transformer".into(),
                field: "img_shapes".into(),
                msg: format!("{:?} hold {tokens} tokens, hidden_states has {s_img}", i.img_shapes),
            });
        }
        let x = self.img_in.forward(&i.hidden_states.to_kind(kind));
        // diffusers casts the timestep to the hidden dtype before the (f32) sinusoid.
        let temb = self.time_embedding(&i.timestep.to_kind(kind), kind);
        let ctx = self.txt_in.forward(&self.txt_norm.forward(&i.encoder_hidden_states.to_kind(kind)));
        let rope = rope_for(&rope_positions(i.img_shapes, s_txt, x.device()), &self.config.axes_dims_rope, kind);
        let mask = i.encoder_hidden_states_mask.map(|m| key_mask(m, s_img));
        let (mut x, mut ctx) = (x, ctx);
        for blk in &self.blocks {
            let (img, txt) = blk.forward_masked(&x, &ctx, &temb, &rope, mask.as_ref());
            (x, ctx) = (img, txt);
        }
        Ok(self.head(&x, &temb))
    }

    /// [`forward`](Self::forward) with one checkpointing segment per block: the output is a
    /// leaf; after the backward into it, the tape recomputes the blocks in reverse
    /// ([`crate::checkpoint`]).
    pub fn forward_checkpointed(&self, i: &QwenInputs, reseed: Option<i64>) -> Result<(Tensor, Tape)> {
        let kind = self.img_in.weight.kind();
        let (_, s_img, _) = i.hidden_states.size3()?;
        let s_txt = i.encoder_hidden_states.size()[1];
        let (cos, sin) =
            rope_for(&rope_positions(i.img_shapes, s_txt, i.hidden_states.device()), &self.config.axes_dims_rope, kind);
        // No mask: an empty slot (the program's slots are tensors).
        let mask = i
            .encoder_hidden_states_mask
            .map(|m| key_mask(m, s_img))
            .unwrap_or_else(|| Tensor::zeros([0], (Kind::Bool, i.hidden_states.device())));
        let inputs = vec![
            i.hidden_states.to_kind(kind),
            i.encoder_hidden_states.to_kind(kind),
            i.timestep.to_kind(kind),
            cos,
            sin,
            mask,
        ];
        Ok(checkpoint::forward_checkpointed(self, inputs, reseed))
    }

    /// `norm_out` (`AdaLayerNormContinuous`: scale first, then shift) and `proj_out`.
    fn head(&self, img: &Tensor, temb: &Tensor) -> Tensor {
        let m = self.norm_out.linear.forward(&temb.silu().to_kind(img.kind())).chunk(2, 1);
        self.proj_out.forward(&modulate(img, &m[1], &m[0]))
    }
}

/// The joint attention's bool key mask `[B, 1, 1, S_txt + S_img]` from a text mask `[B, S_txt]`:
/// padded text keys off, every image key on (diffusers' QwenDoubleStreamAttnProcessor2_0).
fn key_mask(text_mask: &Tensor, s_img: i64) -> Tensor {
    let (b, s_txt) = (text_mask.size()[0], text_mask.size()[1]);
    let keys =
        Tensor::cat(&[text_mask.to_kind(Kind::Bool), Tensor::ones([b, s_img], (Kind::Bool, text_mask.device()))], 1);
    keys.view([b, 1, 1, s_txt + s_img])
}

/// The segments of [`QwenImageTransformer2DModel::forward_checkpointed`]: the timestep
/// embedding, the two input projections (joined text-first), each block, the head.
#[derive(Clone, Copy, Debug)]
pub enum Segment {
    Time,
    Embed,
    Block(usize),
    Head,
}

const SLOT_LATENTS: usize = 0;
const SLOT_TEXT: usize = 1;
const SLOT_TIMESTEP: usize = 2;
const SLOT_COS: usize = 3;
const SLOT_SIN: usize = 4;
const SLOT_MASK: usize = 5;
const INPUT_SLOTS: usize = 6;

impl Segments for QwenImageTransformer2DModel {
    type Segment = Segment;

    fn program(&self) -> Vec<Step<Segment>> {
        let mut p = Program::new(INPUT_SLOTS);
        let temb = p.push(Segment::Time, vec![SLOT_TIMESTEP], None);
        let mut x = p.push(Segment::Embed, vec![SLOT_LATENTS, SLOT_TEXT], None);
        for i in 0..self.blocks.len() {
            x = p.push(Segment::Block(i), vec![x, temb, SLOT_COS, SLOT_SIN, SLOT_MASK], Some(SLOT_TEXT));
        }
        p.push(Segment::Head, vec![x, temb], Some(SLOT_TEXT));
        p.steps()
    }

    fn run_segment(&self, segment: Segment, x: &[Tensor], text_shape: Option<Vec<i64>>) -> Tensor {
        let split = |joint: &Tensor| checkpoint::split_joint(joint, text_shape.as_deref());
        match segment {
            Segment::Time => self.time_embedding(&x[0], x[0].kind()),
            Segment::Embed => {
                Tensor::cat(&[self.txt_in.forward(&self.txt_norm.forward(&x[1])), self.img_in.forward(&x[0])], 1)
            }
            Segment::Block(i) => {
                let (txt, img) = split(&x[0]);
                let mask = (x[4].numel() > 0).then(|| x[4].shallow_clone());
                let rope = (x[2].shallow_clone(), x[3].shallow_clone());
                let (img, txt) = self.blocks[i].forward_masked(&img, &txt, &x[1], &rope, mask.as_ref());
                Tensor::cat(&[txt, img], 1)
            }
            Segment::Head => self.head(&split(&x[0]).1, &x[1]),
        }
    }
}

fn block(p: &P, dim: i64, head_dim: i64) -> DoubleBlock {
    DoubleBlock::named(p, dim, head_dim, &QWEN_BLOCK)
}

/// A diffusers `transformer/` folder (or its parent pipeline folder) as a store and the model.
pub fn qwen_image_from_diffusers(
    dir: &Path,
    kind: Kind,
    device: tch::Device,
    mode: crate::store::Mode,
) -> Result<(Store, QwenImageTransformer2DModel)> {
    let dir =
        if dir.join("transformer").join("config.json").exists() { dir.join("transformer") } else { dir.to_path_buf() };
    let cfg = QwenImageConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(mode, kind, device);
    let model = QwenImageTransformer2DModel::new(&store, &cfg);
    crate::load::apply(
        &store,
        crate::load::read_component_weights(&dir)?,
        &dir.display().to_string(),
        "QwenImageTransformer2DModel",
    )?;
    Ok((store, model))
}
