//! LoRA files in the four layouts other tools load (kohya / sd-scripts, diffusers'
//! `pytorch_lora_weights.safetensors`, PEFT folders, ComfyUI), read into one canonical form
//! ([`LoraSet`] of [`LoraModule`]s named by their diffusers module path) and written back out.
//!
//! Backbone-generic: each [`BaseArch`] has a table of [`ComponentSpec`]s (which networks a LoRA
//! patches and their prefix in each format) and a module grammar ([`BaseArch::module_kind`]):
//! SD1.x in `sd15` (UNet + CLIP), Flux.1 in `flux` (transformer + CLIP-L + T5, with the split /
//! merge of BFL's fused qkv / linear1 layers that kohya-style files use), Qwen-Image(-Edit) in
//! `qwen` (transformer only; every format names modules by the diffusers path). Reading detects
//! the architecture from the key names and reports it in [`LoraSet::arch`].
//!
//! Every conversion goes through the canonical form, so a key that cannot be mapped is an error
//! naming the file and the key (ComfyUI silently skips such keys; we do not).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{DiffusionError, Result};

pub mod flux;
mod peft;
pub mod qwen;
mod read;
pub mod sd15;
mod tensor;
mod write;

/// The LoRA file formats we read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// sd-scripts / kohya: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// diffusers' own `pytorch_lora_weights.safetensors`: `unet.<path>.lora_A.weight` / `lora_B.weight`.
    Diffusers,
    /// A PEFT folder: `adapter_config.json` + `adapter_model.safetensors` (`base_model.model.<path>…`).
    Peft,
    /// What ComfyUI loads best: kohya names with `.alpha` (on read also `diffusion_model.`, bare
    /// diffusers names, `lycoris_`).
    ComfyUi,
}

impl LoraFormat {
    pub const ALL: [LoraFormat; 4] = [LoraFormat::Kohya, LoraFormat::Diffusers, LoraFormat::Peft, LoraFormat::ComfyUi];

    pub fn as_str(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::Peft => "peft",
            LoraFormat::ComfyUi => "comfyui",
        }
    }
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LoraFormat {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "kohya" => Ok(LoraFormat::Kohya),
            "diffusers" => Ok(LoraFormat::Diffusers),
            "peft" => Ok(LoraFormat::Peft),
            "comfyui" | "comfy" => Ok(LoraFormat::ComfyUi),
            _ => Err(crate::invalid("format", format!("`{s}`: use kohya, diffusers, peft or comfyui"))),
        }
    }
}

/// The base model a LoRA is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseArch {
    Sd15,
    Flux,
    QwenImage,
    Unknown,
}

impl BaseArch {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseArch::Sd15 => "sd15",
            BaseArch::Flux => "flux",
            BaseArch::QwenImage => "qwen-image",
            BaseArch::Unknown => "unknown",
        }
    }
}

impl fmt::Display for BaseArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which network a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// SD1.x's UNet.
    Unet,
    /// A DiT denoiser (Flux's `FluxTransformer2DModel`).
    Transformer,
    /// The (first) CLIP text encoder.
    TextEncoder,
    /// The second text encoder (Flux: T5).
    TextEncoder2,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Transformer => "transformer",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How one component's modules are spelled in each format, for one base architecture.
#[derive(Debug, Clone, Copy)]
pub struct ComponentSpec {
    pub component: Component,
    /// kohya / sd-scripts key prefix, written (`lora_unet_`, `lora_te_`, `lora_te1_`, …).
    pub kohya: &'static str,
    /// More kohya prefixes accepted on read (`lora_te1_` for SD1.5's text encoder).
    pub kohya_also: &'static [&'static str],
    /// diffusers' `pytorch_lora_weights.safetensors` prefix (`unet.`, `transformer.`, …).
    pub diffusers: &'static str,
    /// Where this component's PEFT adapter sits in a PEFT folder: `None` at the root (the
    /// denoiser), else a subfolder (`text_encoder`).
    pub peft_subfolder: Option<&'static str>,
    /// ComfyUI's extra prefix for this component (`diffusion_model.`), if it has one.
    pub comfy: Option<&'static str>,
    /// Whether kohya / ComfyUI name the modules by the original (BFL) layout, fused layers
    /// merged (Flux); otherwise by the diffusers path.
    pub original_names: bool,
}

const SD15_COMPONENTS: &[ComponentSpec] = &[
    ComponentSpec {
        component: Component::Unet,
        kohya: "lora_unet_",
        kohya_also: &[],
        diffusers: "unet.",
        peft_subfolder: None,
        comfy: Some("diffusion_model."),
        original_names: false,
    },
    ComponentSpec {
        component: Component::TextEncoder,
        kohya: "lora_te_",
        kohya_also: &["lora_te1_"],
        diffusers: "text_encoder.",
        peft_subfolder: Some("text_encoder"),
        comfy: None,
        original_names: false,
    },
];

/// Flux.1: sd-scripts' `networks/lora_flux.py` prefixes (`lora_te1` CLIP-L, `lora_te3` T5).
const FLUX_COMPONENTS: &[ComponentSpec] = &[
    ComponentSpec {
        component: Component::Transformer,
        kohya: "lora_unet_",
        kohya_also: &[],
        diffusers: "transformer.",
        peft_subfolder: None,
        comfy: Some("diffusion_model."),
        original_names: true,
    },
    ComponentSpec {
        component: Component::TextEncoder,
        kohya: "lora_te1_",
        kohya_also: &["lora_te_"],
        diffusers: "text_encoder.",
        peft_subfolder: Some("text_encoder"),
        comfy: None,
        original_names: false,
    },
    ComponentSpec {
        component: Component::TextEncoder2,
        kohya: "lora_te3_",
        kohya_also: &["lora_te2_"],
        diffusers: "text_encoder_2.",
        peft_subfolder: Some("text_encoder_2"),
        comfy: None,
        original_names: false,
    },
];

/// Qwen-Image(-Edit, -Edit-2509): the transformer only (musubi-tuner trains no text-encoder
/// LoRA for it); musubi / kohya and ComfyUI use the diffusers paths (no fused layers).
const QWEN_COMPONENTS: &[ComponentSpec] = &[ComponentSpec {
    component: Component::Transformer,
    kohya: "lora_unet_",
    kohya_also: &[],
    diffusers: "transformer.",
    peft_subfolder: None,
    comfy: Some("diffusion_model."),
    original_names: false,
}];

impl BaseArch {
    /// The components a LoRA for this base model can patch, with their prefixes per format
    /// (Unknown: SD1.5's, the layout a file without DiT keys is read as).
    pub fn components(self) -> &'static [ComponentSpec] {
        match self {
            BaseArch::Flux => FLUX_COMPONENTS,
            BaseArch::QwenImage => QWEN_COMPONENTS,
            _ => SD15_COMPONENTS,
        }
    }

    /// The spec of one component, `None` if this base model has no such component.
    pub fn component(self, c: Component) -> Option<&'static ComponentSpec> {
        self.components().iter().find(|s| s.component == c)
    }

    /// The layer kind of a LoRA-targetable module (canonical diffusers path) of component `c`,
    /// `None` when the module cannot carry a LoRA in this base model.
    pub fn module_kind(self, c: Component, path: &str) -> Option<sd15::LayerKind> {
        match (self, c) {
            (BaseArch::Flux, Component::Transformer) => flux::transformer_module(path),
            (BaseArch::Flux, Component::TextEncoder2) => flux::t5_module(path),
            (BaseArch::Flux, Component::TextEncoder) => sd15::text_encoder_module(path),
            (BaseArch::Flux, Component::Unet) => None,
            (BaseArch::QwenImage, Component::Transformer) => qwen::transformer_module(path),
            (BaseArch::QwenImage, _) => None,
            (_, Component::Unet) => sd15::unet_module(path),
            (_, Component::TextEncoder) => sd15::text_encoder_module(path),
            _ => None,
        }
    }
}

/// `a_b_c` → dotted path, keeping the `_` of the multi-word names in `compounds` (longest
/// match first as listed): kohya keys replace every `.` of a module path with `_`.
pub(crate) fn dotted_with(underscored: &str, compounds: &[&str]) -> String {
    let toks: Vec<&str> = underscored.split('_').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let mut took = 1;
        for c in compounds {
            let n = c.split('_').count();
            if i + n <= toks.len() && toks[i..i + n].join("_") == *c {
                took = n;
                break;
            }
        }
        out.push(toks[i..i + took].join("_"));
        i += took;
    }
    out.join(".")
}

/// One raw tensor (little-endian bytes as in safetensors).
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// One LoRA module in canonical form: diffusers module path (e.g.
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, text encoder:
/// `text_model.encoder.layers.0.self_attn.q_proj`), down = lora_A `[r, in]` or `[r, in, kh, kw]`,
/// up = lora_B `[out, r]` or `[out, r, 1, 1]`, alpha (scale = alpha / r).
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub component: Component,
    pub path: String,
    pub down: RawTensor,
    pub up: RawTensor,
    pub alpha: f64,
}

impl LoraModule {
    /// The rank: the first dimension of `down`.
    pub fn rank(&self) -> usize {
        self.down.shape.first().copied().unwrap_or(0)
    }
}

/// A LoRA as read from / written to disk.
#[derive(Debug, Clone)]
pub struct LoraSet {
    pub format: LoraFormat,
    pub arch: BaseArch,
    pub modules: Vec<LoraModule>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads a `.safetensors` file, a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`,
/// plus `text_encoder/` if present) or a diffusers folder (`pytorch_lora_weights.safetensors`);
/// detects the format. Every key must be consumed or it is an error naming the key.
///
/// Alpha: a kohya/ComfyUI `.alpha` key, else PEFT's config (`lora_alpha`, `alpha_pattern`,
/// `use_rslora`; in a diffusers file the `lora_adapter_metadata` JSON), else `alpha = r` (what
/// sd-scripts, ComfyUI and diffusers all do without an alpha).
pub fn read(path: &Path) -> Result<LoraSet> {
    if path.is_dir() {
        let (format, file) = read::folder_files(path)?;
        return match format {
            LoraFormat::Peft => read::read_peft_folder(path, &file),
            _ => read::read_file(&file),
        };
    }
    if !path.exists() {
        return Err(DiffusionError::LoraFile {
            file: path.to_path_buf(),
            why: "does not exist; pass a .safetensors file or a PEFT / diffusers LoRA folder".into(),
        });
    }
    read::read_file(path)
}

/// The format a set of key names is in, from their prefixes alone (lenient: for `detect`).
fn format_of_names(names: &[String]) -> Option<LoraFormat> {
    let mut kohya = false;
    let mut comfy = false;
    let mut diffusers = false;
    let mut peft = false;
    for k in names {
        if k.starts_with("base_model.model.") || k.starts_with("unet.base_model.model.") {
            peft = true;
        } else if k.starts_with("lora_unet_") || k.starts_with("lora_te") {
            kohya = true;
        } else if k.starts_with("unet.")
            || k.starts_with("text_encoder.")
            || k.starts_with("text_encoder_2.")
            || k.starts_with("transformer.")
        {
            diffusers = true;
        } else if k.starts_with("diffusion_model.")
            || k.starts_with("lycoris_")
            || k.contains("lora")
            || k.ends_with(".alpha")
        {
            comfy = true;
        }
    }
    match (peft, diffusers, kohya, comfy) {
        (true, ..) => Some(LoraFormat::Peft),
        (_, true, ..) => Some(LoraFormat::Diffusers),
        (_, _, _, true) => Some(LoraFormat::ComfyUi),
        (_, _, true, _) => Some(LoraFormat::Kohya),
        _ => None,
    }
}

/// The format and base architecture of a LoRA file or folder, from its key names (no tensor
/// data is interpreted; `read` checks every key).
pub fn detect(path: &Path) -> Result<(LoraFormat, BaseArch)> {
    let (folder_format, file) = if path.is_dir() {
        let (f, file) = read::folder_files(path)?;
        (Some(f), file)
    } else {
        (None, path.to_path_buf())
    };
    let (names, _) = tensor::read_names(&file)?;
    let arch = read::guess_arch(&names);
    let format = match folder_format {
        Some(LoraFormat::Peft) => LoraFormat::Peft,
        _ => format_of_names(&names).ok_or_else(|| DiffusionError::LoraFile {
            file: file.clone(),
            why: format!(
                "no LoRA keys (first key: `{}`); expected lora_unet_/lora_te_ (kohya), unet./transformer./text_encoder. (diffusers) \
                 or base_model.model. (PEFT)",
                names.first().map(String::as_str).unwrap_or("none")
            ),
        })?,
    };
    Ok((format, arch))
}

/// Writes `set` as `to` (atomic: temp + rename; deterministic bytes). Returns the files written.
///
/// - kohya / comfyui: `out` is a `.safetensors` path. Keys `lora_unet_<diffusers path with _>`
///   / `lora_te_<path>` with `.lora_down.weight`, `.lora_up.weight` and a 0-d `.alpha` of the
///   weights' dtype — sd-scripts' own layout, which ComfyUI, A1111/Forge and diffusers'
///   converter load. (The two formats write the same bytes: ComfyUI loads kohya names best.)
///   Flux: BFL names (`lora_unet_double_blocks_0_img_attn_qkv`, `…_single_blocks_0_linear1`),
///   to_q/k/v (+ proj_mlp) merged by [`flux::merge`], `lora_te1_` CLIP-L, `lora_te3_` T5.
///   Qwen-Image: musubi-tuner's names (`lora_unet_transformer_blocks_0_img_mod_1`) with an
///   **fp32** `.alpha` on every module whatever the weights' dtype (musubi's default save dtype;
///   diffusers' Qwen converter and ComfyUI read it with `.item()`).
/// - diffusers: `out` is a `.safetensors` path, or a directory (existing or new) →
///   `<dir>/pytorch_lora_weights.safetensors`; `unet.<path>.lora_A.weight` / `.lora_B.weight`
///   (Flux: `transformer.` / `text_encoder.` / `text_encoder_2.`; Qwen-Image: `transformer.`)
///   with **alpha / r folded into lora_B**: the layout has no alpha key, and diffusers 0.42.1
///   without `lora_adapter_metadata` loads `lora_alpha = r` (scale 1) — so the folded file
///   is right in every diffusers version and in ComfyUI, where metadata is not read.
/// - peft: `out` is a folder → `adapter_config.json` + `adapter_model.safetensors`
///   (`base_model.model.<path>.lora_A.weight`) for the UNet (Flux: the transformer); text-encoder
///   modules go to the subfolder `<out>/text_encoder/` (Flux's T5: `<out>/text_encoder_2/`; a
///   PEFT adapter wraps one model), loaded with
///   `PeftModel.from_pretrained(text_encoder, out, subfolder="text_encoder")`. A LoRA with only
///   text-encoder modules is written at `<out>/` itself.
///
/// The metadata is carried over except `format` / `lora_adapter_metadata`, which describe one
/// layout and are regenerated.
pub fn write(set: &LoraSet, to: LoraFormat, out: &Path) -> Result<Vec<PathBuf>> {
    write::write(set, to, out)
}

impl LoraFormat {
    /// Which tool loads a file of this format, in words (for `host lora inspect` and READMEs).
    pub fn loaded_by(self) -> &'static str {
        match self {
            LoraFormat::Kohya | LoraFormat::ComfyUi => {
                "ComfyUI / A1111 / Forge, and diffusers pipe.load_lora_weights(file) (converted)"
            }
            LoraFormat::Diffusers => "diffusers pipe.load_lora_weights(dir) (or the file with weight_name=)",
            LoraFormat::Peft => {
                "peft PeftModel.from_pretrained(unet, dir); NOT diffusers pipe.load_lora_weights, which accepts it \
                 without an error and changes nothing (it only logs \"No LoRA keys associated to \
                 UNet2DConditionModel found\")"
            }
        }
    }
}

/// Where a LoRA holds values that are not finite (NaN or ±inf): one entry per tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFinite {
    /// `<component>.<module path>.<down|up|alpha>` (canonical names, as `host lora inspect` prints).
    pub key: String,
    /// How many of the tensor's values are NaN or infinite.
    pub count: usize,
    pub numel: usize,
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} of {} values NaN/inf)", self.key, self.count, self.numel)
    }
}

impl RawTensor {
    /// How many values are NaN or infinite (exact in the tensor's own dtype: F64 is checked as
    /// F64; F16/BF16 widen to F32 exactly, so their inf/NaN stay inf/NaN).
    pub fn non_finite_count(&self) -> usize {
        if self.dtype == safetensors::Dtype::F64 {
            return self
                .data
                .chunks_exact(8)
                .filter(|c| !f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite())
                .count();
        }
        self.to_f32().map(|v| v.iter().filter(|x| !x.is_finite()).count()).unwrap_or(0)
    }
}

impl LoraSet {
    /// Every tensor holding NaN or ±inf, by canonical key. Such a LoRA silently turns a model's
    /// output into NaN wherever it applies (issue 14, part 7): `host lora inspect` reports them,
    /// `host lora convert` and an initial LoRA refuse them.
    pub fn non_finite(&self) -> Vec<NonFinite> {
        let mut out = Vec::new();
        for m in &self.modules {
            let key = |what: &str| format!("{}.{}.{what}", m.component.as_str(), m.path);
            for (what, t) in [("down", &m.down), ("up", &m.up)] {
                let count = t.non_finite_count();
                if count > 0 {
                    out.push(NonFinite { key: key(what), count, numel: t.numel() });
                }
            }
            if !m.alpha.is_finite() {
                out.push(NonFinite { key: key("alpha"), count: 1, numel: 1 });
            }
        }
        out
    }

    /// `Err` naming the file and every non-finite tensor (at most 8, then a count), for the
    /// places that must refuse such a LoRA.
    pub fn check_finite(&self, file: &Path) -> Result<()> {
        let bad = self.non_finite();
        if bad.is_empty() {
            return Ok(());
        }
        let mut list: Vec<String> = bad.iter().take(8).map(|b| b.to_string()).collect();
        if bad.len() > 8 {
            list.push(format!("and {} more", bad.len() - 8));
        }
        Err(DiffusionError::LoraFile {
            file: file.to_path_buf(),
            why: format!(
                "holds non-finite values (NaN or inf) in {} tensor(s): {}; the LoRA is damaged (a diverged \
                 training run?): retrain it or take an earlier checkpoint",
                bad.len(),
                list.join(", ")
            ),
        })
    }
}

impl LoraModule {
    /// The effective weight change `alpha / r · up @ down` as a row-major `[out, in·kh·kw]`
    /// matrix, accumulated in f64 (for comparisons across formats and for merging).
    pub fn delta(&self) -> Vec<f64> {
        let r = self.rank();
        let up = self.up.to_f32().unwrap_or_default();
        let down = self.down.to_f32().unwrap_or_default();
        let out = self.up.shape[0];
        let inn = down.len().checked_div(r).unwrap_or(0);
        let s = self.alpha / r as f64;
        let mut d = vec![0.0f64; out * inn];
        for o in 0..out {
            for k in 0..r {
                let u = up[o * r + k] as f64 * s;
                let row = &down[k * inn..(k + 1) * inn];
                for (x, dv) in d[o * inn..(o + 1) * inn].iter_mut().zip(row) {
                    *x += u * *dv as f64;
                }
            }
        }
        d
    }
}
