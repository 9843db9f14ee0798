//! Loading weights: a diffusers folder (`unet/`, `vae/`, `text_encoder/`: config.json +
//! safetensors, sharded or not) or the original single-file checkpoint (LDM key layout). Every
//! missing, unexpected and wrong-shape tensor is reported by name in one error.

use crate::clip_text::{ClipTextConfig, ClipTextModel};
use crate::config::{UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::ldm;
use crate::store::{Mode, Store};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn read_st(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })
}

/// The tensors of a component folder: `diffusion_pytorch_model.safetensors`, or every shard the
/// `diffusion_pytorch_model.safetensors.index.json` weight_map names.
pub fn read_component_weights(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    read_weights(dir, "diffusion_pytorch_model")
}

/// `<stem>.safetensors`, or every shard `<stem>.safetensors.index.json` names (diffusers writes
/// `diffusion_pytorch_model`, transformers `model`).
pub fn read_weights(dir: &Path, stem: &str) -> Result<Vec<(String, Tensor)>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.exists() {
        return read_st(&single);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if !index.exists() {
        let bin = if dir.join(format!("{stem}.bin")).exists() || dir.join("pytorch_model.bin").exists() {
            " (a pickled .bin is there: convert it to safetensors, e.g. save_pretrained(..., safe_serialization=True))"
        } else {
            ""
        };
        return Err(Error::Config {
            path: dir.into(),
            field: format!("{stem}.safetensors"),
            msg: format!(
                "neither it nor {stem}.safetensors.index.json exists{bin}; point at a diffusers component \
                 folder (e.g. <model>/unet, <model>/text_encoder)"
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Io { path: index.clone(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), source })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
        path: index.clone(),
        field: "weight_map".into(),
        msg: "missing or not an object of tensor name → shard file".into(),
    })?;
    let mut shards: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    let mut out = Vec::new();
    for s in shards {
        out.extend(read_st(&dir.join(&s))?);
    }
    Ok(out)
}

/// Copies `tensors` (diffusers names) into the store's parameters, cast to the store's dtype.
pub fn apply(store: &Store, tensors: Vec<(String, Tensor)>, source: &str, model: &'static str) -> Result<()> {
    let params: BTreeMap<String, Tensor> = store.named_parameters().into_iter().collect();
    let mut given: HashMap<String, Tensor> = HashMap::new();
    let mut unexpected = Vec::new();
    for (n, t) in tensors {
        if params.contains_key(&n) {
            given.insert(n, t);
        } else {
            unexpected.push(n);
        }
    }
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (n, p) in &params {
        match given.get(n) {
            None => missing.push(n.clone()),
            Some(t) if t.size() != p.size() => wrong.push((n.clone(), p.size(), t.size())),
            Some(_) => {}
        }
    }
    if !missing.is_empty() || !unexpected.is_empty() || !wrong.is_empty() {
        unexpected.sort();
        return Err(Error::Mismatch { source_desc: source.into(), model, missing, unexpected, wrong_shape: wrong });
    }
    if store.mode == Mode::Plan {
        return Ok(());
    }
    tch::no_grad(|| {
        for (n, p) in &params {
            let mut p = p.shallow_clone();
            p.copy_(&given[n].to_kind(store.kind).to_device(store.device));
        }
    });
    Ok(())
}

fn component(dir: &Path, name: &str) -> PathBuf {
    // Accept both the model root (with unet/ and vae/) and the component folder itself.
    if dir.join(name).join("config.json").exists() {
        dir.join(name)
    } else {
        dir.to_path_buf()
    }
}

pub fn unet_from_diffusers(dir: &Path, kind: Kind, device: Device) -> Result<(Store, UNet2DConditionModel)> {
    let dir = component(dir, "unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(Mode::Alloc, kind, device);
    let model = UNet2DConditionModel::new(&store, &cfg);
    apply(&store, read_component_weights(&dir)?, &dir.display().to_string(), "UNet2DConditionModel")?;
    Ok((store, model))
}

pub fn vae_from_diffusers(dir: &Path, kind: Kind, device: Device) -> Result<(Store, AutoencoderKL)> {
    let dir = component(dir, "vae");
    let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(Mode::Alloc, kind, device);
    let model = AutoencoderKL::new(&store, &cfg);
    apply(&store, read_component_weights(&dir)?, &dir.display().to_string(), "AutoencoderKL")?;
    Ok((store, model))
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix, transformers 4 (SD1.5's
/// files) with it; the buffer `embeddings.position_ids` (persistent in transformers < 4.31) is
/// not a parameter. Normalised to this crate's `text_model.…` names.
fn text_encoder_names(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .filter(|(n, _)| !n.ends_with("embeddings.position_ids"))
        .map(|(n, t)| {
            let bare = ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| n.starts_with(p));
            (if bare { format!("text_model.{n}") } else { n }, t)
        })
        .collect()
}

/// A transformers `CLIPTextModel` folder (`<model>/text_encoder` or the model root): config.json +
/// model.safetensors (or its sharded index).
pub fn text_encoder_from_diffusers(dir: &Path, kind: Kind, device: Device) -> Result<(Store, ClipTextModel)> {
    let dir = component(dir, "text_encoder");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(Mode::Alloc, kind, device);
    let model = ClipTextModel::new(&store, &cfg);
    apply(&store, text_encoder_names(read_weights(&dir, "model")?), &dir.display().to_string(), "CLIPTextModel")?;
    Ok((store, model))
}

/// The text encoder of an original SD1.x single file: `cond_stage_model.transformer.*` (with or
/// without `text_model.`) → `text_model.*`.
pub fn text_encoder_from_single_file(
    file: &Path,
    cfg: &ClipTextConfig,
    kind: Kind,
    device: Device,
) -> Result<(Store, ClipTextModel)> {
    let store = Store::new(Mode::Alloc, kind, device);
    let model = ClipTextModel::new(&store, cfg);
    let tensors = read_st(file)?
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix(ldm::TEXT_ENCODER_PREFIX).map(|s| (s.to_string(), t)))
        .collect();
    let source = format!("{} ({}*)", file.display(), ldm::TEXT_ENCODER_PREFIX);
    apply(&store, text_encoder_names(tensors), &source, "CLIPTextModel")?;
    Ok((store, model))
}

/// LDM name → (diffusers name, reshape to [C, C]) for every parameter of `store`.
fn ldm_index(
    store: &Store,
    prefix: &str,
    to_ldm: impl Fn(&str) -> Option<(String, bool)>,
) -> Result<HashMap<String, (String, bool)>> {
    let mut idx = HashMap::new();
    for (n, _) in store.shapes() {
        let (l, reshape) = to_ldm(&n).ok_or_else(|| Error::NotImplemented(format!("no LDM name for parameter {n}")))?;
        idx.insert(format!("{prefix}{l}"), (n, reshape));
    }
    Ok(idx)
}

/// Tensors under `prefix` of a single-file checkpoint, renamed to diffusers names; tensors
/// outside the prefix (text encoder, EMA, the other network) are not this model's business.
fn from_ldm(
    tensors: &[(String, Tensor)],
    prefix: &str,
    idx: &HashMap<String, (String, bool)>,
) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| match idx.get(n) {
            Some((d, true)) if t.dim() == 4 => (d.clone(), t.flatten(1, -1)),
            Some((d, _)) => (d.clone(), t.shallow_clone()),
            // Kept under its LDM name so the mismatch report shows it as unexpected.
            None => (n.clone(), t.shallow_clone()),
        })
        .collect()
}

pub fn unet_from_single_file(
    file: &Path,
    cfg: &UNetConfig,
    kind: Kind,
    device: Device,
) -> Result<(Store, UNet2DConditionModel)> {
    let store = Store::new(Mode::Alloc, kind, device);
    let model = UNet2DConditionModel::new(&store, cfg);
    let idx = ldm_index(&store, ldm::UNET_PREFIX, |n| ldm::unet_to_ldm(n, cfg).map(|l| (l, false)))?;
    let tensors = from_ldm(&read_st(file)?, ldm::UNET_PREFIX, &idx);
    apply(&store, tensors, &format!("{} ({}*)", file.display(), ldm::UNET_PREFIX), "UNet2DConditionModel")?;
    Ok((store, model))
}

pub fn vae_from_single_file(
    file: &Path,
    cfg: &VaeConfig,
    kind: Kind,
    device: Device,
) -> Result<(Store, AutoencoderKL)> {
    let store = Store::new(Mode::Alloc, kind, device);
    let model = AutoencoderKL::new(&store, cfg);
    let nb = cfg.block_out_channels.len();
    let idx = ldm_index(&store, ldm::VAE_PREFIX, |n| ldm::vae_to_ldm(n, nb))?;
    let tensors = from_ldm(&read_st(file)?, ldm::VAE_PREFIX, &idx);
    apply(&store, tensors, &format!("{} ({}*)", file.display(), ldm::VAE_PREFIX), "AutoencoderKL")?;
    Ok((store, model))
}

/// The single-file names and shapes of a planned/built store (the LDM layout of a model).
pub fn ldm_shapes(
    store: &Store,
    prefix: &str,
    to_ldm: impl Fn(&str) -> Option<(String, bool)>,
) -> Result<Vec<(String, Vec<i64>)>> {
    let mut out = Vec::new();
    for (n, s) in store.shapes() {
        let (l, reshape) = to_ldm(&n).ok_or_else(|| Error::NotImplemented(format!("no LDM name for parameter {n}")))?;
        let s = if reshape { [s, vec![1, 1]].concat() } else { s };
        out.push((format!("{prefix}{l}"), s));
    }
    Ok(out)
}
