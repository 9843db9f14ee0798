//! Writing the canonical modules in each format (see `super::write` for the choices).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::flux::{self, BflModule};
use super::peft::config_json;
use super::tensor::{io_err, safetensors_bytes, write_atomic};
use super::{BaseArch, Component, ComponentSpec, LoraFormat, LoraModule, LoraSet, RawTensor};
use crate::{DiffusionError, Result};

/// Metadata keys that describe one file layout and are regenerated per output format.
const FORMAT_KEYS: &[&str] = &["format", "lora_adapter_metadata"];

fn carried(meta: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    meta.iter().filter(|(k, _)| !FORMAT_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn bad(out: &Path, why: impl Into<String>) -> DiffusionError {
    DiffusionError::LoraFile { file: out.to_path_buf(), why: why.into() }
}

/// The base model whose names a set is written with (Unknown: SD1.5's).
fn arch_of(set: &LoraSet) -> BaseArch {
    match set.arch {
        BaseArch::Flux | BaseArch::QwenImage => set.arch,
        _ => BaseArch::Sd15,
    }
}

fn spec(set: &LoraSet, c: Component) -> &'static ComponentSpec {
    arch_of(set).component(c).expect("validate checked every module's component")
}

/// Checks what every writer relies on: valid paths for the base model, matching shapes, no duplicates.
pub(crate) fn validate(set: &LoraSet, out: &Path) -> Result<()> {
    if set.modules.is_empty() {
        return Err(bad(out, "nothing to write: the LoRA has no modules"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in &set.modules {
        let arch = arch_of(set);
        if arch.module_kind(m.component, &m.path).is_none() {
            return Err(bad(
                out,
                format!("module `{}` is not a LoRA-targetable {arch} {} module", m.path, m.component.as_str()),
            ));
        }
        if !seen.insert((m.component, m.path.clone())) {
            return Err(bad(out, format!("module `{}` appears twice", m.path)));
        }
        let (d, u) = (&m.down.shape, &m.up.shape);
        if d.is_empty() || u.len() < 2 || d.len() != u.len() || u[1] != d[0] || d[0] == 0 {
            return Err(bad(out, format!("module `{}`: down {d:?} / up {u:?} do not form a LoRA", m.path)));
        }
        for t in [&m.down, &m.up] {
            if t.data.len() != t.numel() * t.dtype.size() || t.to_f32().is_none() {
                return Err(bad(
                    out,
                    format!("module `{}`: tensor bytes do not match dtype {:?} × {:?}", m.path, t.dtype, t.shape),
                ));
            }
        }
        if !m.alpha.is_finite() {
            return Err(bad(out, format!("module `{}`: alpha {} is not finite", m.path, m.alpha)));
        }
    }
    Ok(())
}

fn kohya_name(set: &LoraSet, m: &LoraModule) -> String {
    format!("{}{}", spec(set, m.component).kohya, m.path.replace('.', "_"))
}

/// The modules as kohya names them: for Flux's transformer the BFL modules, fused layers
/// merged ([`flux::merge`]); everything else one to one.
fn kohya_modules(set: &LoraSet, out: &Path) -> Result<Vec<LoraModule>> {
    let mut plain = Vec::new();
    let mut fused: BTreeMap<String, (BflModule, Vec<Option<&LoraModule>>)> = BTreeMap::new();
    for m in &set.modules {
        if !spec(set, m.component).original_names {
            plain.push(m.clone());
            continue;
        }
        let (b, at) = flux::to_bfl(&m.path).expect("validate checked the Flux path");
        let n = b.parts.len();
        let e = fused.entry(b.bfl.clone()).or_insert_with(|| (b, vec![None; n]));
        e.1[at] = Some(m);
    }
    for (b, parts) in fused.values() {
        plain.push(flux::merge(parts, b).map_err(|why| bad(out, why))?);
    }
    Ok(plain)
}

/// sd-scripts stores alpha as a 0-d tensor of the save dtype (`torch.tensor(alpha)` converted
/// with the weights); the loaders read it with `.item()`. Qwen-Image: always fp32, what musubi
/// writes with its default save dtype — and exact for alphas a bf16 scalar would round.
fn alpha_tensor(set: &LoraSet, m: &LoraModule) -> RawTensor {
    let dt = match m.up.dtype {
        _ if set.arch == BaseArch::QwenImage => Dtype::F32,
        Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 => m.up.dtype,
        _ => Dtype::F32,
    };
    RawTensor::from_f32(dt, vec![], &[m.alpha as f32]).expect("float dtype")
}

pub(crate) fn kohya(set: &LoraSet, out: &Path) -> Result<Vec<PathBuf>> {
    let file = file_target(out, "kohya")?;
    let mut t = BTreeMap::new();
    for m in &kohya_modules(set, out)? {
        let n = kohya_name(set, m);
        t.insert(format!("{n}.lora_down.weight"), m.down.clone());
        t.insert(format!("{n}.lora_up.weight"), m.up.clone());
        t.insert(format!("{n}.alpha"), alpha_tensor(set, m));
    }
    write_atomic(&file, &safetensors_bytes(&t, &carried(&set.metadata)))?;
    Ok(vec![file])
}

fn file_target(out: &Path, what: &str) -> Result<PathBuf> {
    if out.extension().and_then(|e| e.to_str()) != Some("safetensors") || out.is_dir() {
        return Err(bad(out, format!("a {what} LoRA is one file: give a path ending in .safetensors")));
    }
    Ok(out.to_path_buf())
}

/// `up · alpha / r` in the up tensor's dtype: diffusers' own file has no alpha, and its loader
/// without metadata uses `lora_alpha = r` (scale 1); folding makes every loader agree.
fn folded_up(m: &LoraModule) -> RawTensor {
    let s = (m.alpha / m.rank() as f64) as f32;
    if s == 1.0 {
        return m.up.clone();
    }
    let v: Vec<f32> = m.up.to_f32().expect("validated").iter().map(|x| x * s).collect();
    RawTensor::from_f32(m.up.dtype, m.up.shape.clone(), &v).expect("validated float dtype")
}

pub(crate) fn diffusers(set: &LoraSet, out: &Path) -> Result<Vec<PathBuf>> {
    let file = if out.extension().and_then(|e| e.to_str()) == Some("safetensors") && !out.is_dir() {
        out.to_path_buf()
    } else {
        out.join("pytorch_lora_weights.safetensors")
    };
    let mut t = BTreeMap::new();
    for m in &set.modules {
        let p = format!("{}{}", spec(set, m.component).diffusers, m.path);
        t.insert(format!("{p}.lora_A.weight"), m.down.clone());
        t.insert(format!("{p}.lora_B.weight"), folded_up(m));
    }
    let mut meta = carried(&set.metadata);
    meta.insert("format".into(), "pt".into());
    write_atomic(&file, &safetensors_bytes(&t, &meta))?;
    Ok(vec![file])
}

const PEFT_FILES: &[&str] =
    &["adapter_config.json", "adapter_model.safetensors", "README.md", "text_encoder", "text_encoder_2"];

/// The module name inside the model a PEFT adapter wraps. PEFT keys must equal the model's own
/// module names: transformers ≥ 5's `CLIPTextModel` (pinned here, 5.24) has no `text_model.`
/// level — measured: `base_model.model.text_model.…` keys are all unexpected with peft 0.21.2.
pub(crate) fn peft_name(m: &LoraModule) -> &str {
    match m.component {
        Component::TextEncoder => m.path.strip_prefix("text_model.").unwrap_or(&m.path),
        _ => &m.path,
    }
}

fn peft_dir_bytes(modules: &[&LoraModule], meta: &BTreeMap<String, String>, base: &str) -> (Vec<u8>, Vec<u8>) {
    let mut t = BTreeMap::new();
    for m in modules {
        t.insert(format!("base_model.model.{}.lora_A.weight", peft_name(m)), m.down.clone());
        t.insert(format!("base_model.model.{}.lora_B.weight", peft_name(m)), m.up.clone());
    }
    let mut meta = carried(meta);
    meta.insert("format".into(), "pt".into());
    let mut cfg = serde_json::to_string_pretty(&config_json(modules, base)).expect("JSON");
    cfg.push('\n');
    (cfg.into_bytes(), safetensors_bytes(&t, &meta))
}

/// The PEFT folder: the UNet's adapter at `out/`, the text encoder's (PEFT wraps one model) at
/// `out/text_encoder/` — load it with `PeftModel.from_pretrained(text_encoder, out, subfolder="text_encoder")`.
/// The whole folder is built beside `out` and renamed into place; an existing `out` is replaced
/// only if it holds nothing but PEFT files.
pub(crate) fn peft(set: &LoraSet, out: &Path) -> Result<Vec<PathBuf>> {
    if out.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        return Err(bad(
            out,
            "a PEFT adapter is a folder (adapter_config.json + adapter_model.safetensors): give a folder path",
        ));
    }
    if out.exists() {
        if !out.is_dir() {
            return Err(bad(out, "exists and is not a folder; a PEFT adapter is a folder"));
        }
        for e in std::fs::read_dir(out).map_err(|e| io_err(out, e))? {
            let e = e.map_err(|e| io_err(out, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !PEFT_FILES.contains(&name.as_str()) {
                return Err(bad(
                    out,
                    format!(
                        "exists and holds `{name}`, which is not part of a PEFT adapter; choose a new or empty folder"
                    ),
                ));
            }
        }
    }
    let base = set.metadata.get("ss_sd_model_name").cloned().unwrap_or_default();
    // One adapter per component: the denoiser's at the root, each text encoder's in its
    // subfolder; with no denoiser modules the first text encoder's sits at the root.
    let mut groups: Vec<(Option<&str>, Vec<&LoraModule>)> = arch_of(set)
        .components()
        .iter()
        .map(|sp| (sp.peft_subfolder, set.modules.iter().filter(|m| m.component == sp.component).collect()))
        .filter(|(_, mods): &(_, Vec<&LoraModule>)| !mods.is_empty())
        .collect();
    if groups.first().is_some_and(|(sub, _)| sub.is_some()) {
        groups[0].0 = None;
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "peft".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut written = Vec::new();
    let put = |dir: &Path, mods: &[&LoraModule]| -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let (cfg, st) = peft_dir_bytes(mods, &set.metadata, &base);
        write_atomic(&dir.join("adapter_config.json"), &cfg)?;
        write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
        Ok(())
    };
    let res = (|| {
        for (sub, mods) in &groups {
            put(&sub.map(|s| tmp.join(s)).unwrap_or_else(|| tmp.clone()), mods)?;
        }
        if out.exists() {
            std::fs::rename(out, &old).map_err(|e| io_err(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    for (sub, _) in &groups {
        let dir = sub.map(|s| out.join(s)).unwrap_or_else(|| out.to_path_buf());
        written.push(dir.join("adapter_config.json"));
        written.push(dir.join("adapter_model.safetensors"));
    }
    Ok(written)
}

pub(crate) fn write(set: &LoraSet, to: LoraFormat, out: &Path) -> Result<Vec<PathBuf>> {
    validate(set, out)?;
    match to {
        LoraFormat::Kohya | LoraFormat::ComfyUi => kohya(set, out),
        LoraFormat::Diffusers => diffusers(set, out),
        LoraFormat::Peft => peft(set, out),
    }
}
