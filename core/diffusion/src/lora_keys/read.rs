//! Reading: every key of a LoRA file is classified (which network, which module, down / up /
//! alpha) through the spellings the other tools accept, then grouped into [`LoraModule`]s.
//! A key that fits none of them is an error naming it: ComfyUI would skip it silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::peft::PeftConfig;
use super::sd15::{self, LayerKind};
use super::tensor::{read_safetensors, StFile};
use super::{flux, qwen};
use super::{BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use crate::{DiffusionError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Down,
    Up,
    Alpha,
}

/// Which spelling a key used: decides the reported format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// `lora_unet_<diffusers path>`, `lora_te_…`
    Kohya,
    /// `lora_unet_input_blocks_…` (original LDM module names)
    KohyaLdm,
    /// `unet.` / `text_encoder.` with lora_A/B (or the older `.lora.down`, `_lora.down`, `.lora_linear_layer.`)
    Diffusers,
    /// `base_model.model.<path>` (PEFT `save_pretrained`)
    Peft,
    /// ComfyUI-only spellings: `lycoris_…`, `diffusion_model.<LDM path>`, bare diffusers paths
    Comfy,
}

impl Style {
    fn format(self) -> LoraFormat {
        match self {
            Style::Kohya | Style::KohyaLdm => LoraFormat::Kohya,
            Style::Diffusers => LoraFormat::Diffusers,
            Style::Peft => LoraFormat::Peft,
            Style::Comfy => LoraFormat::ComfyUi,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ParsedKey {
    pub component: Component,
    /// The canonical (diffusers) path, or with `bfl` the BFL path of a Flux module.
    pub path: String,
    pub role: Role,
    pub style: Style,
    /// Named by the original BFL layout: a fused module that [`flux::split`] turns into
    /// diffusers modules once its tensors are known.
    pub bfl: bool,
}

/// The largest block index after `transformer_blocks.` / `transformer_blocks_` in `k`.
fn dit_block_index(k: &str) -> Option<usize> {
    let at = k.find("transformer_blocks")? + "transformer_blocks".len();
    let digits: String = k[at + 1..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Flux.1 has 19 double-stream blocks (`transformer_blocks.0…18`); Qwen-Image has 60.
const FLUX_DOUBLE_BLOCKS: usize = 19;

/// The base model a set of key names is for (from names only).
///
/// Flux and Qwen-Image spell their attention alike (`transformer_blocks.<i>.attn.to_q`,
/// `add_q_proj`, `to_add_out`, `to_out.0`), so those names decide nothing; what differs
/// (see the manifests in shared/reference): Flux's double blocks have `ff` / `ff_context` /
/// `norm1(_context).linear`, its single blocks, `x_embedder`, `context_embedder`, and the BFL
/// names (`double_blocks`, `img_attn`); Qwen-Image has `img_mlp` / `txt_mlp` / `img_mod` /
/// `txt_mod` inside `transformer_blocks`, `img_in` / `txt_in`, `txt_norm`. An attention-only
/// DiT LoRA is Qwen-Image when a block index is past Flux's 19 double blocks, else Flux.
pub(crate) fn guess_arch<'a>(keys: impl IntoIterator<Item = &'a String>) -> BaseArch {
    let (mut sd, mut sdxl, mut flux, mut qwen, mut dit) = (false, false, false, false, false);
    let mut max_block = 0;
    for k in keys {
        let has = |s: &str| k.contains(s);
        if has("double_blocks")
            || has("single_blocks")
            || has("single_transformer_blocks")
            || has("x_embedder")
            || has("context_embedder")
            || has("img_attn")
            || has("txt_attn")
            || has("ff_context")
            || has("norm1_context")
            || has("guidance_embedder")
            || has("text_embedder")
            || has("guidance_in")
            || has("vector_in")
            || has("final_layer")
        {
            flux = true;
        }
        if has("lora_te2_") || has("text_encoder_2.") || has("add_embedding") || has("label_emb") {
            // SDXL (two CLIP encoders, added embeddings) — unless Flux's T5 is `text_encoder_2`.
            sdxl = true;
        }
        let sd_nesting = has("attentions") || has("input_blocks") || has("middle_block") || has("output_blocks");
        if has("transformer_blocks") && !sd_nesting {
            // SD1.x transformer blocks always sit inside `attentions` (diffusers) or a numbered
            // input/middle/output block (LDM); a bare `transformer_blocks.<i>` is a DiT.
            dit = true;
            max_block = max_block.max(dit_block_index(k).unwrap_or(0));
            if has("img_mlp") || has("txt_mlp") || has("img_mod") || has("txt_mod") {
                qwen = true;
            }
            if has(".ff.") || has("_ff_") || has("norm1.") || has("norm1_") {
                flux = true;
            }
        }
        if has("txt_norm") || ((has("img_in") || has("txt_in")) && !has("lora_unet_")) {
            qwen = true;
        }
        if has("down_blocks")
            || has("up_blocks")
            || has("mid_block")
            || has("input_blocks")
            || has("output_blocks")
            || has("middle_block")
            || has("conv_in")
            || has("time_embed")
            || has("lora_te_")
            || has("lora_te1_")
            || has("text_model")
            || has("encoder.layers.")
        {
            sd = true;
        }
    }
    match (flux, qwen) {
        (true, true) => return BaseArch::Unknown,
        (true, false) => return BaseArch::Flux,
        (false, true) => return BaseArch::QwenImage,
        _ => {}
    }
    if dit {
        return if max_block >= FLUX_DOUBLE_BLOCKS { BaseArch::QwenImage } else { BaseArch::Flux };
    }
    if sdxl {
        BaseArch::Unknown
    } else if sd {
        BaseArch::Sd15
    } else {
        BaseArch::Unknown
    }
}

fn key_err(file: &Path, key: &str, why: impl Into<String>) -> DiffusionError {
    DiffusionError::LoraKey { file: file.to_path_buf(), key: key.to_string(), why: why.into() }
}

/// Suffix spellings, in ComfyUI's order (comfy/weight_adapter/lora.py) plus PEFT's `.default`.
const SUFFIXES: &[(&str, Role)] = &[
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    ("_lora.down.weight", Role::Down),
    ("_lora.up.weight", Role::Up),
    (".lora_A.default.weight", Role::Down),
    (".lora_B.default.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    (".lora_A", Role::Down),
    (".lora_B", Role::Up),
    (".alpha", Role::Alpha),
];

/// The diffusers path of an old attention-processor UNet stem (`attn1.processor.to_out`).
fn unet_dotted_clean(stem: &str) -> String {
    let mut p = stem.replace(".processor.", ".");
    if p.ends_with(".to_out") {
        p.push_str(".0");
    }
    p
}

/// A text-encoder stem in canonical form: transformers ≥ 5's `CLIPTextModel` has no `text_model.`
/// level (`encoder.layers.0…`, as diffusers 0.42 + transformers 5 save it), SD1.5's files and
/// transformers 4 have it; and diffusers' old spelling (`self_attn.to_q_lora`, `DIFFUSERS_OLD_TO_PEFT`).
fn te_dotted_clean(stem: &str) -> String {
    let owned;
    let stem = if stem.starts_with("encoder.layers.") {
        owned = format!("text_model.{stem}");
        owned.as_str()
    } else {
        stem
    };
    for (old, new) in [
        (".self_attn.to_q", ".self_attn.q_proj"),
        (".self_attn.to_k", ".self_attn.k_proj"),
        (".self_attn.to_v", ".self_attn.v_proj"),
        (".self_attn.to_out", ".self_attn.out_proj"),
    ] {
        if let Some(base) = stem.strip_suffix(old) {
            return format!("{base}{new}");
        }
    }
    stem.to_string()
}

fn is_ldm_root(p: &str) -> bool {
    ["input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out."].iter().any(|r| p.starts_with(r))
}

/// The key's stem (without its LoRA suffix) and role; refuses the non-LoRA adapters by name.
fn split_suffix<'k>(file: &Path, key: &'k str) -> Result<(&'k str, Role)> {
    for bad in [".dora_scale", ".lora_magnitude_vector"] {
        if key.contains(bad) {
            return Err(key_err(
                file,
                key,
                "DoRA magnitude vectors are not supported; export a plain LoRA (use_dora=false)",
            ));
        }
    }
    if key.contains(".lora_mid.") {
        return Err(key_err(
            file,
            key,
            "LoCon/Tucker `lora_mid` is not supported; export a plain LoRA (no conv Tucker)",
        ));
    }
    let full_diff = key.ends_with(".diff") || key.ends_with(".diff_b");
    for lyco in ["hada_", "lokr_", ".oft_"] {
        if key.contains(lyco) || full_diff {
            return Err(key_err(
                file,
                key,
                "LyCORIS LoHa/LoKr/OFT/full-diff tensors are not LoRA; convert with LyCORIS tools first",
            ));
        }
    }
    SUFFIXES.iter().find_map(|(s, r)| key.strip_suffix(s).map(|stem| (stem, *r))).ok_or_else(|| {
        key_err(file, key, "no LoRA suffix (.lora_down/.lora_up/.lora_A/.lora_B .weight or .alpha); not a LoRA tensor")
    })
}

/// Classifies one key of a LoRA for `arch`: every key maps to a module or is an error naming it.
pub(crate) fn parse_key(file: &Path, key: &str, arch: BaseArch) -> Result<ParsedKey> {
    let (stem, role) = split_suffix(file, key)?;
    match arch {
        BaseArch::Flux => parse_flux_key(file, key, stem, role),
        BaseArch::QwenImage => parse_qwen_key(file, key, stem, role),
        _ => parse_sd15_key(file, key, stem, role),
    }
}

fn parse_sd15_key(file: &Path, key: &str, stem: &str, role: Role) -> Result<ParsedKey> {
    let unknown = |what: &str| {
        key_err(
            file,
            key,
            format!(
                "`{what}` is not a LoRA-targetable SD1.5 module (attention to_q/k/v/out.0, ff.net.0.proj, ff.net.2, \
                 proj_in/out, resnet conv1/conv2/conv_shortcut/time_emb_proj, down/upsampler conv, conv_in/out, \
                 time_embedding.linear_1/2, text encoder q/k/v/out_proj, mlp.fc1/fc2)"
            ),
        )
    };
    let unet = |path: String, style: Style| -> Result<ParsedKey> {
        if sd15::unet_module(&path).is_none() {
            return Err(unknown(&path));
        }
        Ok(ParsedKey { component: Component::Unet, path, role, style, bfl: false })
    };
    let te = |path: String, style: Style| -> Result<ParsedKey> {
        if sd15::text_encoder_module(&path).is_none() {
            return Err(unknown(&path));
        }
        Ok(ParsedKey { component: Component::TextEncoder, path, role, style, bfl: false })
    };
    let ldm = |ldm_path: &str, style: Style| -> Result<ParsedKey> {
        // SD1.x: 2 layers per block (the only value real SD1.x/2.x checkpoints use).
        let p = sd15::unet_from_ldm(ldm_path, 2).ok_or_else(|| unknown(ldm_path))?;
        unet(p, style)
    };
    if let Some(r) = stem.strip_prefix("lora_unet_") {
        let d = sd15::dotted(r);
        return if is_ldm_root(&d) { ldm(&d, Style::KohyaLdm) } else { unet(d, Style::Kohya) };
    }
    if let Some(r) = stem.strip_prefix("lora_te_").or_else(|| stem.strip_prefix("lora_te1_")) {
        return te(te_dotted_clean(&sd15::dotted(r)), Style::Kohya);
    }
    if stem.starts_with("lora_te2_") || stem.starts_with("text_encoder_2.") {
        return Err(key_err(file, key, "a second text encoder (SDXL) is not part of SD1.5; this is an SDXL LoRA"));
    }
    if let Some(r) = stem.strip_prefix("lycoris_") {
        return unet(sd15::dotted(r), Style::Comfy);
    }
    if let Some(r) = stem.strip_prefix("unet.base_model.model.").or_else(|| stem.strip_prefix("base_model.model.")) {
        return if r.starts_with("text_model.") || r.starts_with("encoder.layers.") {
            te(te_dotted_clean(r), Style::Peft)
        } else {
            unet(unet_dotted_clean(r), Style::Peft)
        };
    }
    if let Some(r) = stem.strip_prefix("unet.") {
        return unet(unet_dotted_clean(r), Style::Diffusers);
    }
    if let Some(r) = stem.strip_prefix("text_encoder.") {
        return te(te_dotted_clean(r), Style::Diffusers);
    }
    if let Some(r) = stem.strip_prefix("diffusion_model.") {
        return ldm(r, Style::Comfy);
    }
    if stem.starts_with("text_model.") || stem.starts_with("encoder.layers.") {
        return te(te_dotted_clean(stem), Style::Comfy);
    }
    let p = unet_dotted_clean(stem);
    if sd15::unet_module(&p).is_some() {
        return unet(p, Style::Comfy);
    }
    Err(key_err(
        file,
        key,
        "unknown prefix: expected lora_unet_ / lora_te_ (kohya), unet. / text_encoder. (diffusers), \
         base_model.model. (PEFT), diffusion_model. / lycoris_ / bare diffusers names (ComfyUI)",
    ))
}

const FLUX_TARGETS: &str = "Flux targets: BFL double_blocks.<i>.{img,txt}_{attn.qkv,attn.proj,mlp.0,mlp.2,mod.lin}, \
     single_blocks.<i>.{linear1,linear2,modulation.lin}, img_in, txt_in, {time,vector,guidance}_in.{in,out}_layer, \
     final_layer.{linear,adaLN_modulation.1}; or their diffusers names (transformer_blocks.<i>.attn.to_q, …); \
     CLIP text_model.encoder.layers.<i>.*; T5 encoder.block.<i>.*";

/// A Flux key: kohya / musubi / ComfyUI BFL names (fused layers), diffusers / PEFT names, the
/// CLIP-L (`lora_te1_`, `text_encoder.`) and T5 (`lora_te3_`, `text_encoder_2.`) encoders.
fn parse_flux_key(file: &Path, key: &str, stem: &str, role: Role) -> Result<ParsedKey> {
    let unknown =
        |what: &str| key_err(file, key, format!("`{what}` is not a LoRA-targetable Flux module ({FLUX_TARGETS})"));
    let pk = |component, path: String, style, bfl| Ok(ParsedKey { component, path, role, style, bfl });
    let transformer = |p: String, style: Style| -> Result<ParsedKey> {
        if flux::from_bfl(&p).is_some() {
            return pk(Component::Transformer, p, style, true);
        }
        let p = p.strip_suffix(".to_out").map(|b| format!("{b}.to_out.0")).unwrap_or(p);
        if flux::transformer_module(&p).is_some() {
            return pk(Component::Transformer, p, style, false);
        }
        Err(unknown(&p))
    };
    let clip = |p: String, style: Style| -> Result<ParsedKey> {
        let p = te_dotted_clean(&p);
        sd15::text_encoder_module(&p).ok_or_else(|| unknown(&p))?;
        pk(Component::TextEncoder, p, style, false)
    };
    let t5 = |p: String, style: Style| -> Result<ParsedKey> {
        flux::t5_module(&p).ok_or_else(|| unknown(&p))?;
        pk(Component::TextEncoder2, p, style, false)
    };
    let spec = |c| BaseArch::Flux.component(c).expect("Flux has this component");
    for c in [Component::Transformer, Component::TextEncoder, Component::TextEncoder2] {
        let sp = spec(c);
        let kohya = std::iter::once(sp.kohya).chain(sp.kohya_also.iter().copied());
        let found = kohya.clone().find_map(|pre| stem.strip_prefix(pre).map(|r| (r, Style::Kohya)));
        let found = found.or_else(|| stem.strip_prefix(sp.diffusers).map(|r| (r, Style::Diffusers)));
        let found = found.or_else(|| sp.comfy.and_then(|pre| stem.strip_prefix(pre)).map(|r| (r, Style::Comfy)));
        let Some((rest, style)) = found else { continue };
        let path = match (style, c) {
            (Style::Kohya, Component::TextEncoder) => sd15::dotted(rest),
            (Style::Kohya, _) => flux::dotted(rest),
            _ => rest.to_string(),
        };
        return match c {
            Component::Transformer => transformer(path, style),
            Component::TextEncoder => clip(path, style),
            _ => t5(path, style),
        };
    }
    if let Some(r) = stem.strip_prefix("lora_transformer_") {
        return transformer(flux::dotted(r), Style::Comfy);
    }
    if let Some(r) = stem.strip_prefix("base_model.model.") {
        // One PEFT adapter wraps one model: which one, its module names say.
        if r.starts_with("text_model.") || r.starts_with("encoder.layers.") {
            return clip(r.to_string(), Style::Peft);
        }
        if r.starts_with("encoder.block.") {
            return t5(r.to_string(), Style::Peft);
        }
        return transformer(r.to_string(), Style::Peft);
    }
    if flux::from_bfl(stem).is_some() || flux::transformer_module(stem).is_some() {
        return transformer(stem.to_string(), Style::Comfy);
    }
    Err(key_err(
        file,
        key,
        "unknown prefix for a Flux LoRA: expected lora_unet_ / lora_te1_ / lora_te3_ (kohya), transformer. / \
         text_encoder. / text_encoder_2. (diffusers), base_model.model. (PEFT), diffusion_model. or bare names \
         (ComfyUI)",
    ))
}

const QWEN_TARGETS: &str = "Qwen-Image targets: transformer_blocks.<i>.{attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,\
     add_v_proj,to_out.0,to_add_out},{img,txt}_mlp.{net.0.proj,net.2},{img,txt}_mod.1}, img_in, txt_in, proj_out, \
     norm_out.linear, time_text_embed.timestep_embedder.linear_{1,2}";

/// A Qwen-Image key: every spelling names the diffusers path — kohya / musubi `lora_unet_<path _>`,
/// diffusers `transformer.`, PEFT `base_model.model.`, and ComfyUI's QwenImage rules
/// (`comfy/lora.py` `model_lora_keys_unet`: `diffusion_model.<path>`, bare `<path>`,
/// `lycoris_<path _>`).
fn parse_qwen_key(file: &Path, key: &str, stem: &str, role: Role) -> Result<ParsedKey> {
    let spec = BaseArch::QwenImage.component(Component::Transformer).expect("Qwen-Image has a transformer");
    let found = [
        (spec.kohya, Style::Kohya, true),
        ("lycoris_", Style::Comfy, true),
        ("base_model.model.", Style::Peft, false),
        (spec.diffusers, Style::Diffusers, false),
        (spec.comfy.expect("Qwen-Image has a ComfyUI prefix"), Style::Comfy, false),
    ]
    .into_iter()
    .find_map(|(pre, style, underscored)| stem.strip_prefix(pre).map(|r| (r, style, underscored)));
    let (path, style) = match found {
        Some((r, style, true)) => (qwen::dotted(r), style),
        Some((r, style, false)) => (r.to_string(), style),
        None if qwen::transformer_module(stem).is_some() => (stem.to_string(), Style::Comfy),
        None => {
            return Err(key_err(
                file,
                key,
                "unknown prefix for a Qwen-Image LoRA: expected lora_unet_ (kohya / musubi-tuner), transformer. \
                 (diffusers), base_model.model. (PEFT), diffusion_model. / lycoris_ / bare diffusers names (ComfyUI)",
            ))
        }
    };
    if qwen::transformer_module(&path).is_none() {
        return Err(key_err(
            file,
            key,
            format!("`{path}` is not a LoRA-targetable Qwen-Image module ({QWEN_TARGETS})"),
        ));
    }
    Ok(ParsedKey { component: Component::Transformer, path, role, style, bfl: false })
}

#[derive(Default)]
struct Parts {
    down: Option<(String, RawTensor)>,
    up: Option<(String, RawTensor)>,
    alpha: Option<(String, f64)>,
}

fn check_shapes(file: &Path, key: &str, path: &str, kind: LayerKind, down: &RawTensor, up: &RawTensor) -> Result<()> {
    let (d, u) = (&down.shape, &up.shape);
    let conv_ok = d.len() == 4 && u.len() == 4 && u[2] == 1 && u[3] == 1;
    let lin_ok = d.len() == 2 && u.len() == 2;
    let ok = match kind {
        LayerKind::Linear => lin_ok,
        LayerKind::Conv => conv_ok,
        LayerKind::LinearOrConv => lin_ok || conv_ok,
    };
    if !ok {
        return Err(key_err(
            file,
            key,
            format!(
                "`{path}` is a {} layer but its LoRA has down {d:?} / up {u:?}; expected down [r, in] / up [out, r] \
                 for Linear, down [r, in, kh, kw] / up [out, r, 1, 1] for Conv2d",
                match kind {
                    LayerKind::Linear => "Linear",
                    LayerKind::Conv => "Conv2d",
                    LayerKind::LinearOrConv => "Linear or 1×1 Conv2d",
                }
            ),
        ));
    }
    if d[0] == 0 || u[1] != d[0] {
        return Err(key_err(
            file,
            key,
            format!("rank mismatch: down {d:?} has r = {}, up {u:?} has r = {}", d[0], u[1]),
        ));
    }
    for (t, which) in [(down, "down"), (up, "up")] {
        if t.to_f32().is_none() {
            return Err(key_err(
                file,
                key,
                format!("{which} weight has dtype {:?}; LoRA weights must be F32, F16, BF16 or F64", t.dtype),
            ));
        }
        if t.data.len() != t.numel() * t.dtype.size() {
            return Err(key_err(file, key, format!("{which} weight byte size does not match its shape {:?}", t.shape)));
        }
    }
    Ok(())
}

/// Where a module's alpha comes from when the file has no `.alpha` key.
pub(crate) enum AlphaSource<'a> {
    /// kohya / ComfyUI / diffusers without metadata: no alpha means scale 1 (alpha = r) in
    /// sd-scripts, ComfyUI and diffusers' converter alike.
    Rank,
    /// A PEFT `LoraConfig` (adapter_config.json, or diffusers' `lora_adapter_metadata` per
    /// component).
    Config(&'a BTreeMap<Component, PeftConfig>, &'a Path),
}

/// The format of a file from the spellings its keys used (`formats`: format → one key).
fn file_format(file: &Path, formats: &BTreeMap<&'static str, (LoraFormat, String)>) -> Result<LoraFormat> {
    // ComfyUI takes kohya and its own spellings in one file; other mixes are a broken export.
    match formats.len() {
        0 => Err(DiffusionError::LoraFile { file: file.to_path_buf(), why: "no LoRA tensors in this file".into() }),
        1 => Ok(formats.values().next().unwrap().0),
        2 if formats.contains_key("kohya") && formats.contains_key("comfyui") => Ok(LoraFormat::ComfyUi),
        _ => {
            let list: Vec<String> = formats.values().map(|(f, k)| format!("{f} (`{k}`)")).collect();
            Err(DiffusionError::LoraFile {
                file: file.to_path_buf(),
                why: format!("keys of several layouts in one file: {}; re-export it in one format", list.join(", ")),
            })
        }
    }
}

/// The modules sorted by (component, path), each at most once.
fn checked_unique(file: &Path, mut modules: Vec<LoraModule>) -> Result<Vec<LoraModule>> {
    // A BFL module and a diffusers spelling of one of its parts would patch a layer twice.
    let mut seen = std::collections::BTreeSet::new();
    for m in &modules {
        if !seen.insert((m.component, m.path.as_str())) {
            return Err(DiffusionError::LoraFile {
                file: file.to_path_buf(),
                why: format!("module `{}` is given twice (a fused BFL name and its diffusers name); keep one", m.path),
            });
        }
    }
    modules.sort_by(|a, b| (a.component, &a.path).cmp(&(b.component, &b.path)));
    Ok(modules)
}

/// Groups the tensors of one file into modules and names the file's format from its spellings.
pub(crate) fn modules_from_file(
    file: &Path,
    st: StFile,
    alpha: &AlphaSource,
    arch: BaseArch,
) -> Result<(Vec<LoraModule>, LoraFormat, BTreeMap<String, String>)> {
    let mut groups: BTreeMap<(Component, String, bool), Parts> = BTreeMap::new();
    let mut formats: BTreeMap<&'static str, (LoraFormat, String)> = BTreeMap::new();
    for (key, t) in st.tensors {
        let pk = parse_key(file, &key, arch)?;
        let f = pk.style.format();
        formats.entry(f.as_str()).or_insert((f, key.clone()));
        let g = groups.entry((pk.component, pk.path.clone(), pk.bfl)).or_default();
        let dup = |prev: &str| {
            key_err(file, &key, format!("module `{}` is given twice (also as `{prev}`); keep one spelling", pk.path))
        };
        match pk.role {
            Role::Down => {
                if let Some((prev, _)) = &g.down {
                    return Err(dup(prev));
                }
                g.down = Some((key, t));
            }
            Role::Up => {
                if let Some((prev, _)) = &g.up {
                    return Err(dup(prev));
                }
                g.up = Some((key, t));
            }
            Role::Alpha => {
                if let Some((prev, _)) = &g.alpha {
                    return Err(dup(prev));
                }
                let a = t.scalar().filter(|a| a.is_finite()).ok_or_else(|| {
                    key_err(file, &key, format!("alpha must be one finite number, got shape {:?}", t.shape))
                })?;
                g.alpha = Some((key, a));
            }
        }
    }
    let format = file_format(file, &formats)?;
    let mut modules = Vec::with_capacity(groups.len());
    for ((component, path, bfl), g) in groups {
        let any_key = g
            .down
            .as_ref()
            .map(|d| d.0.clone())
            .or(g.up.as_ref().map(|u| u.0.clone()))
            .unwrap_or_else(|| g.alpha.as_ref().map(|a| a.0.clone()).unwrap_or_default());
        let missing = if g.down.is_none() { "down (lora_down / lora_A)" } else { "up (lora_up / lora_B)" };
        let (Some((dk, down)), Some((_, up))) = (g.down, g.up) else {
            return Err(key_err(
                file,
                &any_key,
                format!("module `{path}` has no {missing} weight; a LoRA module needs both"),
            ));
        };
        let kind = if bfl { Some(LayerKind::Linear) } else { arch.module_kind(component, &path) }
            .expect("parse_key validated the path");
        check_shapes(file, &dk, &path, kind, &down, &up)?;
        let r = down.shape[0];
        let alpha = match (g.alpha, alpha) {
            (Some((_, a)), _) => a,
            (None, AlphaSource::Rank) => r as f64,
            (None, AlphaSource::Config(cfgs, cfg_file)) => {
                let cfg = cfgs.get(&component).ok_or_else(|| {
                    key_err(
                        file,
                        &dk,
                        format!("no LoRA config for the {} in {}", component.as_str(), cfg_file.display()),
                    )
                })?;
                cfg.alpha_for(&path, r, cfg_file, &dk)?
            }
        };
        let m = LoraModule { component, path, down, up, alpha };
        match flux::from_bfl(&m.path).filter(|_| bfl) {
            Some(b) => modules.extend(flux::split(m, &b).map_err(|why| key_err(file, &dk, why))?),
            None => modules.push(m),
        }
    }
    let modules = checked_unique(file, modules)?;
    Ok((modules, format, st.metadata))
}

/// A folder: PEFT (`adapter_config.json`) or diffusers (`pytorch_lora_weights.safetensors`).
pub(crate) fn folder_files(dir: &Path) -> Result<(LoraFormat, PathBuf)> {
    let cfg = dir.join("adapter_config.json");
    if cfg.is_file() {
        let w = dir.join("adapter_model.safetensors");
        if !w.is_file() {
            let why = if dir.join("adapter_model.bin").is_file() {
                "has adapter_model.bin (pickle) but no adapter_model.safetensors; re-save with \
                 save_pretrained(..., safe_serialization=True)"
            } else {
                "has adapter_config.json but no adapter_model.safetensors"
            };
            return Err(DiffusionError::LoraFile { file: dir.to_path_buf(), why: why.into() });
        }
        return Ok((LoraFormat::Peft, w));
    }
    let w = dir.join("pytorch_lora_weights.safetensors");
    if w.is_file() {
        return Ok((LoraFormat::Diffusers, w));
    }
    Err(DiffusionError::LoraFile {
        file: dir.to_path_buf(),
        why: "a LoRA folder must hold adapter_config.json + adapter_model.safetensors (PEFT) or \
              pytorch_lora_weights.safetensors (diffusers); pass a .safetensors file otherwise"
            .into(),
    })
}

/// The base model of a file from its key names. `Unknown` reads as SD1.5 (its validators then
/// decide), so a file that reads is SD1.5, Flux or Qwen-Image.
fn arch_gate(names: &[String]) -> BaseArch {
    match guess_arch(names) {
        BaseArch::Unknown => BaseArch::Sd15,
        arch => arch,
    }
}

pub(crate) fn read_peft_folder(dir: &Path, weights: &Path) -> Result<LoraSet> {
    read_peft_as(dir, weights, None)
}

/// A PEFT folder; `arch`: the parent folder's base model, for a text encoder's subfolder (a T5
/// adapter alone does not name its base model).
fn read_peft_as(dir: &Path, weights: &Path, arch: Option<BaseArch>) -> Result<LoraSet> {
    let cfg_file = dir.join("adapter_config.json");
    let cfg = PeftConfig::from_file(&cfg_file)?;
    let st = read_safetensors(weights)?;
    let names: Vec<String> = st.tensors.keys().cloned().collect();
    let arch = match arch {
        Some(a) => a,
        None => arch_gate(&names),
    };
    // One PEFT folder wraps one model: its component is whatever its paths say.
    let cfgs: BTreeMap<Component, PeftConfig> = arch.components().iter().map(|s| (s.component, cfg.clone())).collect();
    let (mut modules, format, metadata) = modules_from_file(weights, st, &AlphaSource::Config(&cfgs, &cfg_file), arch)?;
    if format != LoraFormat::Peft {
        return Err(DiffusionError::LoraFile {
            file: weights.to_path_buf(),
            why: format!("next to adapter_config.json but holds {format} keys; a PEFT file has base_model.model. keys"),
        });
    }
    cfg.check_targets(&modules, &cfg_file)?;
    for spec in arch.components() {
        let Some(sub) = spec.peft_subfolder else { continue };
        let sub_dir = dir.join(sub);
        if !sub_dir.join("adapter_config.json").is_file() {
            continue;
        }
        let inner = read_peft_as(&sub_dir, &sub_dir.join("adapter_model.safetensors"), Some(arch))?;
        if let Some(m) = inner.modules.iter().find(|m| m.component != spec.component) {
            return Err(DiffusionError::LoraFile {
                file: sub_dir.clone(),
                why: format!("the {sub}/ PEFT folder holds {} module `{}`", m.component.as_str(), m.path),
            });
        }
        modules.extend(inner.modules);
    }
    Ok(LoraSet { format: LoraFormat::Peft, arch, modules, metadata })
}

pub(crate) fn read_file(file: &Path) -> Result<LoraSet> {
    let st = read_safetensors(file)?;
    let names: Vec<String> = st.tensors.keys().cloned().collect();
    let arch = arch_gate(&names);
    if names.iter().any(|k| k.starts_with("base_model.model.")) {
        let dir = file.parent().unwrap_or(Path::new("."));
        if dir.join("adapter_config.json").is_file() {
            return read_peft_folder(dir, file);
        }
        return Err(DiffusionError::LoraFile {
            file: file.to_path_buf(),
            why: "PEFT keys (base_model.model.) need the adapter_config.json they were saved with (r, lora_alpha); \
                  put it next to the file or pass the folder"
                .into(),
        });
    }
    // diffusers' own file: alphas (if any) live in `lora_adapter_metadata`, packed per component.
    let cfgs = match st.metadata.get("lora_adapter_metadata") {
        Some(js) => Some(PeftConfig::from_diffusers_metadata(js, file)?),
        None => None,
    };
    let src = match &cfgs {
        Some(c) => AlphaSource::Config(c, file),
        None => AlphaSource::Rank,
    };
    let (modules, format, metadata) = modules_from_file(file, st, &src, arch)?;
    Ok(LoraSet { format, arch, modules, metadata })
}
