//! LoRA files: the injected LoRA weights → core/diffusion's canonical [`LoraSet`] → each tool's
//! layout (`lora_keys::write`), and back (`lora_keys::read` → the injected slots). No key
//! mapping lives here: module names are diffusers module paths on both sides, and the backbone
//! names which [`Component`]s it has and their stores ([`Backbone::store`]).
//!
//! | format | what `export_adapter(dir, …)` writes | loaded by |
//! |---|---|---|
//! | `kohya` | `<dir>/<ss_output_name>.safetensors`, `ss_*` + `modelspec.*` metadata | ComfyUI, A1111/Forge, sd-scripts, diffusers' `load_lora_weights` (via its converter) |
//! | `diffusers` | `<dir>/pytorch_lora_weights.safetensors` (`<component>.` keys) | diffusers' `pipe.load_lora_weights(dir)` |
//! | `peft` | `<dir>/adapter_config.json` + `adapter_model.safetensors` (the denoiser's adapter; a text encoder's in `<dir>/text_encoder/`) | `PeftModel.from_pretrained(model, dir)` — not diffusers' `load_lora_weights`, which accepts a PEFT folder and silently changes nothing |
//!
//! The diffusers layout has no alpha key: `lora_keys::write` folds alpha/r into lora_B, so a
//! file re-read gives the same product (bitwise when alpha = r, the default).

use likeness_sdk_torch::save_tensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use likeness_diffusion::lora_keys::{self, BaseArch, Component, LoraFormat, LoraModule, LoraSet, RawTensor};
use likeness_diffusion::lora_meta::{kohya_metadata, TrainingInfo};
use tch::{Kind, Tensor};

use super::error::{file, input, Result};
use crate::backbone::{Backbone, BackboneConfig};
use crate::nn::LoraWeights;
use crate::store::Store;

/// The formats `export_adapter` writes.
pub const FORMATS: [&str; 5] = ["kohya", "diffusers", "peft", "pairedit", "identity"];

/// The formats a config can export: the LoRA formats when LoRA trains, `pairedit` under
/// PairEdit, `identity` (the injection weights) under DTBack.
pub fn formats(c: &super::TrainConfig) -> Vec<&'static str> {
    let mut v = Vec::new();
    if c.identity.as_ref().is_none_or(|i| i.train_lora) {
        v.extend(["kohya", "diffusers", "peft"]);
    }
    if c.pairedit.is_some() {
        v.push("pairedit");
    }
    if c.identity.is_some() {
        v.push("identity");
    }
    v
}

fn to_tensor(t: &RawTensor, what: &str) -> Result<Tensor> {
    use safetensors::Dtype;
    let kind = match t.dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        other => {
            return Err(input(format!("LoRA tensor {what} has dtype {other:?}; only float tensors are LoRA weights")))
        }
    };
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_data_size(&t.data, &shape, kind))
}

fn raw_f32(t: &Tensor) -> RawTensor {
    let t = t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
    let v: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 tensor");
    RawTensor {
        dtype: safetensors::Dtype::F32,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The architectures a file may be read as for backbone `B` (`Unknown`: no arch key).
fn check_arch<B: Backbone>(set: &LoraSet, path: &Path) -> Result<()> {
    if !matches!(set.arch, BaseArch::Unknown) && set.arch != B::ARCH {
        return Err(file(path.display(), format!("is a LoRA for {}, not for {}", set.arch, B::ARCH)));
    }
    Ok(())
}

/// Injects exactly the modules of the LoRA at `path` (any format `lora_keys::read` knows), with
/// the file's ranks, alphas and values, as `kind`. A module the networks do not have, or whose
/// shapes do not fit the layer, is an error naming the module.
pub fn inject_from_file<B: Backbone>(b: &B, path: &Path, kind: Kind, dropout: f64) -> Result<()> {
    let set = lora_keys::read(path)?;
    check_arch::<B>(&set, path)?;
    if set.modules.is_empty() {
        return Err(file(path.display(), "holds no LoRA modules"));
    }
    // A NaN LoRA would train on from NaN outputs (the divergence check only fires at the first
    // step's gradient norm, after the weights are loaded): refuse it by key now.
    set.check_finite(path)?;
    for m in &set.modules {
        let missing = || {
            file(
                path.display(),
                format!(
                    "LoRA module `{}` ({}) does not exist in this model's {}; is the LoRA for another base model or size?",
                    m.path,
                    m.component.as_str(),
                    m.component.as_str()
                ),
            )
        };
        let store = b.store(m.component, true)?.ok_or_else(missing)?;
        let targets = store.targets();
        let t = targets.iter().find(|t| t.path == m.path).ok_or_else(missing)?;
        let r = m.rank() as i64;
        let down = to_tensor(&m.down, &format!("{}.down", m.path))?;
        let up = to_tensor(&m.up, &format!("{}.up", m.path))?;
        let ws = &t.weight_shape;
        let want_down: Vec<i64> = [vec![r, ws[1]], ws[2..].to_vec()].concat();
        let want_up: Vec<i64> = if ws.len() == 4 { vec![ws[0], r, 1, 1] } else { vec![ws[0], r] };
        if down.size() != want_down || up.size() != want_up {
            return Err(file(
                path.display(),
                format!(
                    "LoRA module `{}`: down {:?} / up {:?} do not fit the layer's weight {ws:?} (expected {want_down:?} / {want_up:?})",
                    m.path,
                    down.size(),
                    up.size()
                ),
            ));
        }
        let dev = store.device;
        *t.slot.lock().unwrap() = Some(LoraWeights {
            down: down.to_kind(kind).to_device(dev).set_requires_grad(true),
            up: up.to_kind(kind).to_device(dev).set_requires_grad(true),
            alpha_over_r: m.alpha / r as f64,
            adapter_scale: 1.0,
            dropout,
            training: false,
        });
    }
    Ok(())
}

/// Whether the LoRA at `path` has modules on a component other than `denoiser`: then `create`
/// makes that text encoder a trained parameter group, so its texts cannot be cached, and the
/// declared interface must say so before `create` (issue 14, part 7: the interface promised
/// cached `text_embeddings` and the default cache then asked for them).
pub fn file_has_text_encoder(path: &Path, denoiser: Component) -> Result<bool> {
    if path.extension().is_some_and(|e| e == "pt" || e == "pth") {
        // A torch.save pickle is read only in PairEdit's layout, which has no text encoder.
        return Ok(false);
    }
    match lora_keys::read(path) {
        Ok(set) => Ok(set.modules.iter().any(|m| m.component != denoiser)),
        // PairEdit's safetensors (diffusers paths under `lora_unet_`) may not read as kohya's
        // layout; it has denoiser modules only. Anything else keeps its error.
        Err(e) => match likeness_sdk::st::read_header(path) {
            Ok(h) if !h.tensors.is_empty() && h.tensors.iter().all(|t| t.name.starts_with("lora_unet_")) => Ok(false),
            _ => Err(e.into()),
        },
    }
}

/// `precision = fp64`: the LoRA weights in f64 too, so the whole chain is f64.
pub fn lora_to_f64(store: &Store) {
    for t in store.targets() {
        for slot in [&t.slot, &t.content] {
            if let Some(l) = &mut *slot.lock().unwrap() {
                l.down = l.down.detach().to_kind(Kind::Double).set_requires_grad(true);
                l.up = l.up.detach().to_kind(Kind::Double).set_requires_grad(true);
            }
        }
    }
}

/// The injected LoRA weights of every loaded component as a canonical set (f32 tensors).
pub fn lora_set<B: Backbone>(b: &B, metadata: BTreeMap<String, String>) -> Result<LoraSet> {
    let mut modules = Vec::new();
    for &c in B::COMPONENTS {
        for t in b.store(c, false)?.map(|s| s.targets()).unwrap_or_default() {
            if let Some(l) = &*t.slot.lock().unwrap() {
                let r = l.down.size()[0] as f64;
                modules.push(LoraModule {
                    component: c,
                    path: t.path.clone(),
                    down: raw_f32(&l.down),
                    up: raw_f32(&l.up),
                    alpha: l.alpha_over_r * r,
                });
            }
        }
    }
    Ok(LoraSet { format: LoraFormat::Diffusers, arch: B::ARCH, modules, metadata })
}

/// The keys only the model can fill in truly: the trainer passes generic placeholders for them
/// (`modelspec.architecture = "<plugin id>/lora"`, `ss_base_model_version = "<plugin id>"`, the
/// full `pretrained` path), which would otherwise overwrite `kohya_metadata`'s per-architecture
/// values (SD1.5: `stable-diffusion-v1/lora`, `sd_v1`, …) that ComfyUI / A1111 read.
const MODEL_KEYS: [&str; 6] = [
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.sai_model_spec",
    "modelspec.prediction_type",
    "ss_base_model_version",
    "ss_sd_model_name",
];

/// The trainer's run metadata (steps, epochs, lr, seed, dataset …) without [`MODEL_KEYS`], plus
/// the prediction type as sd-scripts' model spec spells it.
fn run_metadata(given: &BTreeMap<String, String>, prediction: &str) -> BTreeMap<String, String> {
    let mut extra = given.clone();
    for k in MODEL_KEYS {
        extra.remove(k);
    }
    extra.insert("modelspec.prediction_type".into(), prediction.into());
    extra
}

/// The caller's metadata as strings (non-string JSON values as JSON text).
fn string_metadata(meta: &serde_json::Map<String, serde_json::Value>) -> BTreeMap<String, String> {
    meta.iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect()
}

/// Writes the adapter into the existing directory `dir` in `format`; returns the files written.
pub fn export<B: Backbone>(
    b: &B,
    cfg: &B::Config,
    dir: &Path,
    format: &str,
    meta: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<PathBuf>> {
    if !FORMATS.contains(&format) {
        return Err(input(format!(
            "cannot export an adapter in format `{format}`; valid formats: {}",
            FORMATS.join(", ")
        )));
    }
    if !dir.is_dir() {
        return Err(file(dir.display(), "the adapter directory does not exist"));
    }
    if format == "identity" {
        let inj = b.identity().ok_or_else(|| {
            input("format `identity` exports DTBack's injection: this config has no `identity` object")
        })?;
        let path = dir.join("identity.safetensors");
        let mut m = BTreeMap::from([(
            "likeness.identity".to_string(),
            serde_json::to_string(&inj.config).map_err(|e| input(e.to_string()))?,
        )]);
        m.extend(string_metadata(meta));
        save_tensors(&path, &inj.parameters(), &m)?;
        return Ok(vec![path]);
    }
    if format == "pairedit" {
        let c = B::COMPONENTS[0];
        let store = b.store(c, false)?.ok_or_else(|| input("the denoiser is not loaded"))?;
        return super::pairedit::export(store, dir);
    }
    let given = string_metadata(meta);
    let num = |k: &str| given.get(k).and_then(|v| v.parse::<f64>().ok());
    let mut set = lora_set(b, BTreeMap::new())?;
    if set.modules.is_empty() {
        return Err(input("the model has no LoRA modules to export"));
    }
    let rank = set.modules.iter().map(|m| m.rank()).max().unwrap_or(0);
    let alpha = set.modules.iter().find(|m| m.rank() == rank).map(|m| m.alpha).unwrap_or(rank as f64);
    let title = given
        .get("modelspec.title")
        .or_else(|| given.get("ss_output_name"))
        .cloned()
        .unwrap_or_else(|| "likeness".into());
    let res = b.sampling().resolution;
    let info = TrainingInfo {
        arch: B::ARCH,
        qwen_variant: B::QWEN_VARIANT,
        rank,
        alpha,
        title: title.clone(),
        resolution: (res, res),
        base_model: cfg.base_model().to_string(),
        steps: num("ss_steps").unwrap_or(0.0) as u64,
        epochs: num("ss_epoch").unwrap_or(0.0) as u64,
        learning_rate: num("ss_learning_rate").unwrap_or(0.0),
        // Deterministic bytes: a start time only when the trainer gives one.
        started_at_unix: num("ss_training_started_at").unwrap_or(0.0) as u64,
        extra: run_metadata(&given, b.objective().modelspec_prediction()),
    };
    let mut metadata = kohya_metadata(&info);
    if !given.contains_key("ss_training_started_at") {
        // No start time from the trainer: leave the date out rather than write 1970 (the bytes
        // stay deterministic either way).
        metadata.remove("ss_training_started_at");
        metadata.remove("modelspec.date");
    }
    set.metadata = metadata;
    let files = match format {
        "kohya" => {
            let name: String =
                title.chars().map(|ch| if ch.is_alphanumeric() || "-_.".contains(ch) { ch } else { '_' }).collect();
            lora_keys::write(&set, LoraFormat::Kohya, &dir.join(format!("{name}.safetensors")))?
        }
        "diffusers" => lora_keys::write(&set, LoraFormat::Diffusers, dir)?,
        // The denoiser's adapter at `<dir>/`, a text encoder's (if any) at `<dir>/text_encoder/`.
        _ => lora_keys::write(&set, LoraFormat::Peft, dir)?,
    };
    Ok(files)
}
