//! diffusers' `AutoencoderKLQwenImage` (the Wan-2.1 VAE) for single images, as a 2-D network.
//!
//! For one frame the causal 3-D VAE is exactly 2-D (diffusers 0.42.1 `_encode` / `_decode` on
//! T = 1, a fresh feature cache): a `CausalConv3d` pads `2·pt` zero frames in front, so a kernel
//! of depth kt sees `[0, …, 0, x]` and only its last time slice `w[:, :, kt−1]` touches x; the
//! first chunk skips every `time_conv` (its weights load but never run). So each causal conv is
//! a `Conv2d` with that slice and the same spatial padding, each resample its 2-D half.
//!
//! Names and shapes are diffusers' (the 5-D conv weights are stored as they are and sliced per
//! forward, so a checkpoint loads unchanged); `RMS_norm` is an L2 normalisation over channels
//! times √C times γ (`F.normalize(x, dim=1)`, eps 1e-12), not a mean-square one. A checkpoint
//! may also carry the original Wan-2.1 names (ComfyUI's `qwen_image_vae.safetensors`): see
//! [`qwen_vae_from_path`] and the `wan` module.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::config::{cfg_err, read_json};
use crate::error::{Error, Result};
use crate::load::Stored;
use crate::nn::Conv2d;
use crate::store::{Store, P};

mod wan;

fn d_base() -> i64 {
    96
}
fn d_z() -> i64 {
    16
}
fn d_mult() -> Vec<i64> {
    vec![1, 2, 4, 4]
}
fn d_res() -> i64 {
    2
}
fn d_temporal() -> Vec<bool> {
    vec![false, true, true]
}
fn d_in() -> i64 {
    3
}
fn d_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922,
        -0.9497, 0.2503, -0.2921,
    ]
}
fn d_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253,
        2.8251, 1.9160,
    ]
}

/// `vae/config.json` (defaults: diffusers' `AutoencoderKLQwenImage.__init__` = Qwen-Image's).
#[derive(Debug, Clone, Deserialize)]
pub struct QwenVaeConfig {
    #[serde(default = "d_base")]
    pub base_dim: i64,
    #[serde(default = "d_z")]
    pub z_dim: i64,
    #[serde(default = "d_mult")]
    pub dim_mult: Vec<i64>,
    #[serde(default = "d_res")]
    pub num_res_blocks: i64,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    #[serde(default = "d_temporal")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default = "d_in")]
    pub input_channels: i64,
    #[serde(default = "d_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "d_std")]
    pub latents_std: Vec<f64>,
}

impl QwenVaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, read_json(path)?)
    }

    /// Qwen-Image's own config (every default), for a checkpoint that carries none.
    pub fn qwen_image() -> Self {
        Self::from_value(Path::new("(Qwen-Image's VAE config)"), serde_json::json!({}))
            .expect("the defaults are a valid config")
    }

    /// A parsed `config.json` (`path` names it in errors).
    pub fn from_value(path: &Path, v: Value) -> Result<Self> {
        if let Some(name) = v.get("_class_name").and_then(Value::as_str) {
            if name != "AutoencoderKLQwenImage" {
                return Err(cfg_err(path, "_class_name", format!("{name} is not an AutoencoderKLQwenImage")));
            }
        }
        let c: QwenVaeConfig = serde_json::from_value(v).map_err(|e| cfg_err(path, "(schema)", e.to_string()))?;
        if c.temperal_downsample.len() + 1 != c.dim_mult.len() {
            return Err(cfg_err(path, "temperal_downsample", "needs one entry per downsampling (len(dim_mult) − 1)"));
        }
        if c.latents_mean.len() != c.z_dim as usize || c.latents_std.len() != c.z_dim as usize {
            return Err(cfg_err(path, "latents_mean/latents_std", format!("need z_dim = {} values each", c.z_dim)));
        }
        Ok(c)
    }

    /// Pixels per latent pixel: 2^(number of downsamplings).
    pub fn factor(&self) -> i64 {
        1 << self.temperal_downsample.len()
    }
}

/// A `CausalConv3d` on one frame: its stored 5-D weight's last time slice as a `Conv2d`.
struct CausalConv {
    weight: Tensor,
    bias: Tensor,
    padding: i64,
}

impl CausalConv {
    fn new(p: &P, inp: i64, out: i64, k: i64) -> Self {
        CausalConv { weight: p.param("weight", &[out, inp, k, k, k]), bias: p.param("bias", &[out]), padding: k / 2 }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kt = self.weight.size()[2];
        let w = self.weight.select(2, kt - 1);
        x.conv2d(&w, Some(&self.bias), [1, 1], [self.padding, self.padding], [1, 1], 1)
    }
}

/// `RMS_norm`: `normalize(x, dim=1) · √C · γ` (γ stored `[C, 1, 1, 1]` or `[C, 1, 1]`).
struct RmsNorm {
    gamma: Tensor,
}

impl RmsNorm {
    fn new(p: &P, c: i64, images: bool) -> Self {
        let shape: Vec<i64> = if images { vec![c, 1, 1] } else { vec![c, 1, 1, 1] };
        RmsNorm { gamma: p.param("gamma", &shape) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let c = x.size()[1];
        let xf =
            if matches!(x.kind(), Kind::Half | Kind::BFloat16) { x.to_kind(Kind::Float) } else { x.shallow_clone() };
        let norm = xf.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
        let n = (xf / norm).to_kind(x.kind());
        n * (c as f64).sqrt() * self.gamma.view([c, 1, 1])
    }
}

struct Residual {
    norm1: RmsNorm,
    conv1: CausalConv,
    norm2: RmsNorm,
    conv2: CausalConv,
    shortcut: Option<CausalConv>,
}

impl Residual {
    fn new(p: &P, inp: i64, out: i64) -> Self {
        Residual {
            norm1: RmsNorm::new(&p.sub("norm1"), inp, false),
            conv1: CausalConv::new(&p.sub("conv1"), inp, out, 3),
            norm2: RmsNorm::new(&p.sub("norm2"), out, false),
            conv2: CausalConv::new(&p.sub("conv2"), out, out, 3),
            shortcut: (inp != out).then(|| CausalConv::new(&p.sub("conv_shortcut"), inp, out, 1)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = match &self.shortcut {
            Some(s) => s.forward(x),
            None => x.shallow_clone(),
        };
        let y = self.conv1.forward(&self.norm1.forward(x).silu());
        let y = self.conv2.forward(&self.norm2.forward(&y).silu());
        y + h
    }
}

/// One head over the H·W positions of a frame, residual on the un-normalised input.
struct Attention {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl Attention {
    fn new(p: &P, c: i64) -> Self {
        Attention {
            norm: RmsNorm::new(&p.sub("norm"), c, true),
            to_qkv: Conv2d::new(&p.sub("to_qkv"), c, 3 * c, 1, 1, 0),
            proj: Conv2d::new(&p.sub("proj"), c, c, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("4-d");
        let qkv = self.to_qkv.forward(&self.norm.forward(x));
        let qkv = qkv.reshape([b, 1, 3 * c, h * w]).permute([0, 1, 3, 2]).contiguous();
        let parts = qkv.chunk(3, -1);
        let o = Tensor::scaled_dot_product_attention::<&Tensor>(
            &parts[0], &parts[1], &parts[2], None, 0.0, false, None, false,
        );
        let o = o.squeeze_dim(1).permute([0, 2, 1]).reshape([b, c, h, w]);
        self.proj.forward(&o) + x
    }
}

/// `resnets.0 → attentions.0 → resnets.1`.
struct Mid {
    res0: Residual,
    attn: Attention,
    res1: Residual,
}

impl Mid {
    fn new(p: &P, c: i64) -> Self {
        Mid {
            res0: Residual::new(&p.sub("resnets").sub(0), c, c),
            attn: Attention::new(&p.sub("attentions").sub(0), c),
            res1: Residual::new(&p.sub("resnets").sub(1), c, c),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.res1.forward(&self.attn.forward(&self.res0.forward(x)))
    }
}

/// A `Resample`'s 2-D half (`resample.1`; `time_conv` is stored, never run on one frame).
enum Resample {
    /// `ZeroPad2d((0, 1, 0, 1))` then a stride-2 3×3 conv.
    Down(Conv2d),
    /// Nearest ×2 (in f32, cast back) then a 3×3 conv to C/2.
    Up(Conv2d),
}

impl Resample {
    fn new(p: &P, c: i64, down: bool, temporal: bool) -> Self {
        if temporal {
            let (out, k) = if down { (c, 3) } else { (2 * c, 3) };
            let tp = p.sub("time_conv");
            let _ = (tp.param("weight", &[out, c, k, 1, 1]), tp.param("bias", &[out]));
        }
        let r = p.sub("resample").sub(1);
        if down {
            Resample::Down(Conv2d::new(&r, c, c, 3, 2, 0))
        } else {
            Resample::Up(Conv2d::new(&r, c, c / 2, 3, 1, 1))
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Resample::Down(conv) => conv.forward(&x.constant_pad_nd([0, 1, 0, 1])),
            Resample::Up(conv) => {
                // diffusers upsamples in f32 and casts back; a nearest 2× copy is exact in every
                // dtype, so without the casts f32 / bf16 / f16 are bitwise the same and f64 keeps
                // its precision (a differentiable f64 chain must not round through f32).
                let up = x.repeat_interleave_self_int(2, 2, None).repeat_interleave_self_int(2, 3, None);
                conv.forward(&up)
            }
        }
    }
}

enum Layer {
    Res(Residual),
    Attn(Attention),
    Resample(Resample),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Layer::Res(r) => r.forward(x),
            Layer::Attn(a) => a.forward(x),
            Layer::Resample(r) => r.forward(x),
        }
    }
}

/// The encoder or the decoder: conv_in, the layers (with the mid block where it sits), norm_out,
/// SiLU, conv_out.
struct Coder {
    conv_in: CausalConv,
    before_mid: Vec<Layer>,
    mid: Mid,
    after_mid: Vec<Layer>,
    norm_out: RmsNorm,
    conv_out: CausalConv,
}

impl Coder {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.conv_in.forward(x);
        for l in &self.before_mid {
            x = l.forward(&x);
        }
        x = self.mid.forward(&x);
        for l in &self.after_mid {
            x = l.forward(&x);
        }
        self.conv_out.forward(&self.norm_out.forward(&x).silu())
    }
}

fn encoder(p: &P, c: &QwenVaeConfig) -> Coder {
    let dims: Vec<i64> = std::iter::once(1).chain(c.dim_mult.iter().copied()).map(|u| c.base_dim * u).collect();
    let (mut layers, mut scale, mut k) = (Vec::new(), 1.0, 0);
    let blocks = p.sub("down_blocks");
    let mut out_dim = dims[0];
    for i in 0..c.dim_mult.len() {
        let mut in_dim = dims[i];
        out_dim = dims[i + 1];
        for _ in 0..c.num_res_blocks {
            layers.push(Layer::Res(Residual::new(&blocks.sub(k), in_dim, out_dim)));
            k += 1;
            if c.attn_scales.contains(&scale) {
                layers.push(Layer::Attn(Attention::new(&blocks.sub(k), out_dim)));
                k += 1;
            }
            in_dim = out_dim;
        }
        if i != c.dim_mult.len() - 1 {
            layers.push(Layer::Resample(Resample::new(&blocks.sub(k), out_dim, true, c.temperal_downsample[i])));
            k += 1;
            scale /= 2.0;
        }
    }
    Coder {
        conv_in: CausalConv::new(&p.sub("conv_in"), c.input_channels, dims[0], 3),
        before_mid: layers,
        mid: Mid::new(&p.sub("mid_block"), out_dim),
        after_mid: Vec::new(),
        norm_out: RmsNorm::new(&p.sub("norm_out"), out_dim, false),
        conv_out: CausalConv::new(&p.sub("conv_out"), out_dim, 2 * c.z_dim, 3),
    }
}

fn decoder(p: &P, c: &QwenVaeConfig) -> Coder {
    let n = c.dim_mult.len();
    let last = *c.dim_mult.last().expect("dim_mult");
    let dims: Vec<i64> =
        std::iter::once(last).chain(c.dim_mult.iter().rev().copied()).map(|u| c.base_dim * u).collect();
    let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
    let mut layers = Vec::new();
    let mut out_dim = dims[0];
    for i in 0..n {
        let b = p.sub("up_blocks").sub(i);
        let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
        out_dim = dims[i + 1];
        for j in 0..=c.num_res_blocks {
            layers.push(Layer::Res(Residual::new(&b.sub("resnets").sub(j), in_dim, out_dim)));
            in_dim = out_dim;
        }
        // diffusers' up blocks hold no attention (its attn_scales act in the encoder only).
        if i != n - 1 {
            layers.push(Layer::Resample(Resample::new(&b.sub("upsamplers").sub(0), out_dim, false, temporal_up[i])));
        }
    }
    Coder {
        conv_in: CausalConv::new(&p.sub("conv_in"), c.z_dim, dims[0], 3),
        before_mid: Vec::new(),
        mid: Mid::new(&p.sub("mid_block"), dims[0]),
        after_mid: layers,
        norm_out: RmsNorm::new(&p.sub("norm_out"), out_dim, false),
        conv_out: CausalConv::new(&p.sub("conv_out"), out_dim, c.input_channels, 3),
    }
}

/// The VAE on single images `[B, 3, H, W]`.
pub struct QwenImageVae {
    pub config: QwenVaeConfig,
    /// The weights' kind: inputs are cast to it (a sampler's f32 latents on bf16 weights).
    kind: Kind,
    encoder: Coder,
    quant_conv: CausalConv,
    post_quant_conv: CausalConv,
    decoder: Coder,
}

impl QwenImageVae {
    pub fn new(store: &Store, c: &QwenVaeConfig) -> Self {
        let p = store.root();
        QwenImageVae {
            config: c.clone(),
            kind: store.kind,
            encoder: encoder(&p.sub("encoder"), c),
            quant_conv: CausalConv::new(&p.sub("quant_conv"), 2 * c.z_dim, 2 * c.z_dim, 1),
            post_quant_conv: CausalConv::new(&p.sub("post_quant_conv"), c.z_dim, c.z_dim, 1),
            decoder: decoder(&p.sub("decoder"), c),
        }
    }

    /// Images in [−1, 1] → the posterior's (mean, logvar), unnormalised; logvar clamped to
    /// [−30, 20] as `DiagonalGaussianDistribution` does.
    pub fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        let h = self.quant_conv.forward(&self.encoder.forward(&x.to_kind(self.kind)));
        let parts = h.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// Unnormalised latents → images, clamped to [−1, 1] as `_decode` does.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.decoder.forward(&self.post_quant_conv.forward(&z.to_kind(self.kind))).clamp(-1.0, 1.0)
    }

    fn stats(&self, v: &[f64], like: &Tensor) -> Tensor {
        Tensor::from_slice(v).to_kind(like.kind()).to_device(like.device()).view([1, -1, 1, 1])
    }

    /// The pipeline's latents: `(mean − latents_mean) / latents_std`.
    pub fn normalize(&self, z: &Tensor) -> Tensor {
        (z - self.stats(&self.config.latents_mean, z)) / self.stats(&self.config.latents_std, z)
    }

    /// The inverse of [`normalize`](Self::normalize), before [`decode`](Self::decode).
    pub fn denormalize(&self, z: &Tensor) -> Tensor {
        z * self.stats(&self.config.latents_std, z) + self.stats(&self.config.latents_mean, z)
    }
}

/// The model's name in load errors.
const MODEL: &str = "AutoencoderKLQwenImage";

/// A diffusers `vae/` folder (or its parent pipeline folder) as a store and the model; the
/// weights' names may be either layout ([`qwen_vae_from_path`]).
pub fn qwen_vae_from_diffusers(
    dir: &Path,
    kind: Kind,
    device: tch::Device,
    mode: crate::store::Mode,
) -> Result<(Store, QwenImageVae)> {
    let dir = if dir.join("vae").join("config.json").exists() { dir.join("vae") } else { dir.to_path_buf() };
    let cfg = QwenVaeConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(mode, kind, device);
    let model = QwenImageVae::new(&store, &cfg);
    apply_either_layout(&store, &cfg, crate::load::read_component_weights(&dir)?, &dir)?;
    Ok((store, model))
}

/// What musubi-tuner's `--vae` takes (`qwen_image_utils.load_vae`: one safetensors file, its
/// names diffusers' or ComfyUI's), and a diffusers folder: a directory loads as
/// [`qwen_vae_from_diffusers`]; a `.safetensors` file — `vae/diffusion_pytorch_model.safetensors`
/// or ComfyUI's `qwen_image_vae.safetensors` — with the `config.json` beside it when that is an
/// AutoencoderKLQwenImage's (or names no class), else with Qwen-Image's config (ComfyUI's file
/// carries none; musubi-tuner hard-codes the same values). The layout is told from the names in
/// the header: diffusers' (`encoder.conv_in.weight`, `encoder.down_blocks.0.norm1.gamma`) or
/// Wan-2.1's (`encoder.conv1.weight`, `encoder.downsamples.0.residual.0.gamma`), whichever holds
/// more of the model's tensors; a file where neither holds half of them is refused, naming a few
/// of its unexpected and missing tensors.
pub fn qwen_vae_from_path(
    path: &Path,
    kind: Kind,
    device: tch::Device,
    mode: crate::store::Mode,
) -> Result<(Store, QwenImageVae)> {
    if path.is_dir() {
        return qwen_vae_from_diffusers(path, kind, device, mode);
    }
    let beside = path.with_file_name("config.json");
    let cfg = if beside.exists() {
        let v = read_json(&beside)?;
        match v.get("_class_name").and_then(Value::as_str) {
            // Another component's config next to the file (a transformer's, musubi-tuner's files
            // side by side): not this VAE's.
            Some(name) if name != MODEL => QwenVaeConfig::qwen_image(),
            _ => QwenVaeConfig::from_value(&beside, v)?,
        }
    } else {
        QwenVaeConfig::qwen_image()
    };
    let store = Store::new(mode, kind, device);
    let model = QwenImageVae::new(&store, &cfg);
    apply_either_layout(&store, &cfg, crate::load::read_st(path)?, path)?;
    Ok((store, model))
}

/// [`crate::load::apply`] after renaming Wan-2.1 names to ours when the tensors carry those; a
/// mismatch is then reported in the file's names.
fn apply_either_layout(store: &Store, c: &QwenVaeConfig, tensors: Vec<(String, Stored)>, source: &Path) -> Result<()> {
    let wan = wan::WanNames::new(c);
    let ours: Vec<String> = store.shapes().into_iter().map(|(n, _)| n).collect();
    let to_wan = ours
        .iter()
        .map(|n| {
            let w = wan.name(n).ok_or_else(|| Error::NotImplemented(format!("no Wan-2.1 name for parameter {n}")))?;
            Ok((n.clone(), w))
        })
        .collect::<Result<BTreeMap<String, String>>>()?;
    let names: HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let diffusers = ours.iter().filter(|n| names.contains(n.as_str())).count();
    let wan_hits = to_wan.values().filter(|n| names.contains(n.as_str())).count();
    let is_wan = wan_hits > diffusers;
    if 2 * diffusers.max(wan_hits) < ours.len() {
        return Err(neither_layout(&tensors, &ours, &to_wan, is_wan, (diffusers, wan_hits), source));
    }
    let desc = source.display().to_string();
    if !is_wan {
        return crate::load::apply(store, tensors, &desc, MODEL);
    }
    let from_wan: HashMap<&str, &str> = to_wan.iter().map(|(o, w)| (w.as_str(), o.as_str())).collect();
    let renamed = tensors
        .into_iter()
        .map(|(n, t)| match from_wan.get(n.as_str()) {
            Some(o) => (o.to_string(), t),
            // Kept under its own name, so the mismatch report lists it as unexpected.
            None => (n, t),
        })
        .collect();
    let wan_name = |n: String| to_wan.get(&n).cloned().unwrap_or(n);
    crate::load::apply(store, renamed, &format!("{desc} (Wan-2.1 / ComfyUI names)"), MODEL).map_err(|e| match e {
        Error::Mismatch { source_desc, model, missing, unexpected, wrong_shape } => {
            let mut missing: Vec<String> = missing.into_iter().map(wan_name).collect();
            missing.sort();
            let wrong_shape = wrong_shape.into_iter().map(|(n, want, got)| (wan_name(n), want, got)).collect();
            Error::Mismatch { source_desc, model, missing, unexpected, wrong_shape }
        }
        e => e,
    })
}

/// The refusal of tensors in neither layout: the counts, and a few unexpected and missing names
/// of the closer layout (a full list would be every tensor of the file and of the model).
fn neither_layout(
    tensors: &[(String, Stored)],
    ours: &[String],
    to_wan: &BTreeMap<String, String>,
    is_wan: bool,
    (diffusers, wan_hits): (usize, usize),
    source: &Path,
) -> Error {
    let expected: Vec<&String> = if is_wan { to_wan.values().collect() } else { ours.iter().collect() };
    let expected_set: HashSet<&str> = expected.iter().map(|n| n.as_str()).collect();
    let mut unexpected: Vec<&str> =
        tensors.iter().map(|(n, _)| n.as_str()).filter(|n| !expected_set.contains(n)).collect();
    unexpected.sort();
    let names: HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing: Vec<&str> = expected.iter().map(|n| n.as_str()).filter(|n| !names.contains(n)).collect();
    missing.sort();
    let few = |v: &[&str]| {
        let shown = v.iter().take(4).copied().collect::<Vec<_>>().join(", ");
        if v.len() > 4 {
            format!("{shown}, … ({} in all)", v.len())
        } else {
            shown
        }
    };
    let layout = if is_wan { "Wan-2.1 / ComfyUI" } else { "diffusers" };
    Error::Config {
        path: source.into(),
        field: "(tensor names)".into(),
        msg: format!(
            "not a Qwen-Image VAE in a layout this loader reads: of the {} tensors of the {MODEL} its config \
             builds, the file holds {diffusers} under diffusers' names (e.g. encoder.conv_in.weight) and \
             {wan_hits} under the Wan-2.1 / ComfyUI names (e.g. encoder.conv1.weight); unexpected: {}; \
             missing ({layout} names): {}",
            ours.len(),
            few(&unexpected),
            few(&missing)
        ),
    }
}
