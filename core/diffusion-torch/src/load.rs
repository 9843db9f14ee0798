//! Loading weights: a diffusers folder (`unet/`, `vae/`, `text_encoder/`: config.json +
//! safetensors, sharded or not) or the original single-file checkpoint (LDM key layout). Every
//! missing, unexpected and wrong-shape tensor is reported by name in one error.
//!
//! A [`Stored`] tensor can be a row range of a stored one ([`Stored::rows`]: BFL single files
//! fuse `qkv` and `linear1`, diffusers keeps `to_q`/`to_k`/`to_v`/`proj_mlp` apart), and may be
//! fp8 (`F8_E4M3` = torch's `float8_e4m3fn`, `F8_E5M2`), optionally scaled per tensor as
//! ComfyUI's "fp8 scaled" files are (`<name>.scale_weight` beside `<name>.weight`): see
//! [`fold_fp8_scales`].

use crate::clip_text::{ClipTextConfig, ClipTextModel};
use crate::config::{UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::ldm;
use crate::store::{Mode, Store};
use crate::t5::{T5Config, T5EncoderModel};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A tensor of a safetensors file, known by its header and read only when [`apply`] copies it
/// into the model: loading then never holds a second copy of the weights (a whole-file read
/// would double a component's memory until the copies end; that transient was most of the
/// training process's peak RSS above diffusers', which loads the same way).
pub struct Stored {
    shape: Vec<i64>,
    src: Src,
    /// ComfyUI's per-tensor `scale_weight`: the tensor is `decoded.to(f32) · scale`.
    scale: Option<f32>,
}

#[derive(Clone)]
enum Src {
    File {
        file: Arc<std::fs::File>,
        path: Arc<PathBuf>,
        /// The tensor's name in the file (for messages).
        name: Arc<str>,
        kind: Kind,
        /// The shape of the bytes `start..start + len` (the rows read, for a row slice).
        file_shape: Vec<i64>,
        start: u64,
        len: usize,
    },
    /// Several stored tensors concatenated along dimension 0 (BFL's final modulation, whose two
    /// halves diffusers keeps in the other order).
    Cat(Vec<Stored>),
}

impl Clone for Stored {
    fn clone(&self) -> Self {
        Stored { shape: self.shape.clone(), src: self.src.clone(), scale: self.scale }
    }
}

fn is_fp8(kind: Kind) -> bool {
    matches!(kind, Kind::Float8e4m3fn | Kind::Float8e5m2)
}

impl Stored {
    pub fn size(&self) -> Vec<i64> {
        self.shape.clone()
    }

    pub fn dim(&self) -> usize {
        self.shape.len()
    }

    /// The dtype stored in the file (fp8 kinds included; [`Stored::load`] decodes them).
    pub fn kind(&self) -> Kind {
        match &self.src {
            Src::File { kind, .. } => *kind,
            Src::Cat(parts) => parts[0].kind(),
        }
    }

    /// `parts` concatenated along dimension 0 (read part by part on [`Stored::load`]); the parts
    /// must agree on every other dimension.
    pub fn concat(parts: Vec<Stored>) -> Result<Stored> {
        let first = parts.first().ok_or_else(|| Error::Lora("concat of no tensors".into()))?;
        let rest = first.shape[1..].to_vec();
        if parts.iter().any(|p| p.shape.len() != first.shape.len() || p.shape[1..] != rest[..]) {
            let shapes: Vec<_> = parts.iter().map(|p| p.shape.clone()).collect();
            return Err(Error::NotImplemented(format!("concatenating tensors of shapes {shapes:?} along dim 0")));
        }
        let rows: i64 = parts.iter().map(|p| p.shape[0]).sum();
        Ok(Stored { shape: [&[rows], &rest[..]].concat(), src: Src::Cat(parts), scale: None })
    }

    /// The per-tensor scale folded in by [`fold_fp8_scales`].
    pub fn scale(&self) -> Option<f32> {
        self.scale
    }

    /// The same data viewed as `[d0, d1·d2·…]` (a 1×1 conv kernel read as a Linear weight).
    fn flattened(self) -> Stored {
        let rest: i64 = self.shape[1..].iter().product();
        Stored { shape: vec![self.shape[0], rest], src: self.src, scale: self.scale }
    }

    /// Rows `start..start + n` of dimension 0 (a fused `qkv` weight `[3d, d]` or bias `[3d]`
    /// split into q, k and v). Row-major rows are contiguous, so this is a byte range of the file:
    /// only those bytes are read on [`Stored::load`]. The scale, if any, applies to every row.
    pub fn rows(&self, start: i64, n: i64) -> Result<Stored> {
        let Src::File { file, path, name, kind, file_shape, start: offset, .. } = &self.src else {
            return Err(Error::NotImplemented("row slices of a concatenation".into()));
        };
        let bad =
            |msg: String| Error::Safetensors { path: path.as_ref().clone(), msg: format!("tensor {name}: {msg}") };
        let Some(&total) = self.shape.first() else {
            return Err(bad("a 0-d tensor has no rows to slice".into()));
        };
        if start < 0 || n < 0 || start + n > total {
            return Err(bad(format!(
                "rows {start}..{} are outside its {total} rows (shape {:?})",
                start + n,
                self.shape
            )));
        }
        // file_shape and shape share dimension 0 (flattening only merges the trailing ones).
        let row_bytes = file_shape[1..].iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
        let src = Src::File {
            file: file.clone(),
            path: path.clone(),
            name: name.clone(),
            kind: *kind,
            file_shape: [&[n], &file_shape[1..]].concat(),
            start: offset + start as u64 * row_bytes,
            len: (n as u64 * row_bytes) as usize,
        };
        Ok(Stored { shape: [&[n], &self.shape[1..]].concat(), src, scale: self.scale })
    }

    /// Reads the bytes now: the file's dtype, except fp8, which is decoded to f32 (libtorch's own
    /// conversion; CPU libtorch has no fp8 arithmetic, and every fp8 value is exact in f32, bf16
    /// and f16 alike), and a scaled tensor, which is `value.to(f32) · scale` in f32 as torch
    /// computes it (a 0-d f32 scale tensor, not an f64 scalar, so the product rounds as torch's).
    pub fn load(&self) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let Src::File { file, path, name, kind, file_shape, start, len } = &self.src else {
            let Src::Cat(parts) = &self.src else { unreachable!("two variants") };
            let loaded = parts.iter().map(Stored::load).collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&loaded, 0));
        };
        let mut bytes = vec![0u8; *len];
        file.read_exact_at(&mut bytes, *start).map_err(|e| Error::Safetensors {
            path: path.as_ref().clone(),
            msg: format!("tensor {name}: cannot read {len} bytes at offset {start}: {e}"),
        })?;
        let t = Tensor::f_from_data_size(&bytes, file_shape, *kind)?;
        let t = match self.scale {
            Some(s) => t.to_kind(Kind::Float) * Tensor::from(s),
            None if is_fp8(*kind) => t.to_kind(Kind::Float),
            None => t,
        };
        Ok(t.reshape(&self.shape))
    }
}

/// ComfyUI's "fp8 scaled" convention: `<p>.scale_weight` (a one-element tensor) multiplies
/// `<p>.weight` after decoding. Each scale is read now (one element) and folded into its weight;
/// the `scale_weight` and `scale_input` tensors (the latter only scales activations for fp8
/// matmuls, which a dequantising loader does not do — ComfyUI ignores it too unless it runs fp8
/// matmuls) and the `scaled_fp8` marker tensor are dropped. A scale without its weight, or with
/// more than one element (a per-channel format this loader does not know), is an error naming it.
pub fn fold_fp8_scales(tensors: Vec<(String, Stored)>) -> Result<Vec<(String, Stored)>> {
    let mut scales: HashMap<String, (String, f32, PathBuf)> = HashMap::new();
    let mut rest = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        if let Some(base) = n.strip_suffix(".scale_weight") {
            let Src::File { path, .. } = &t.src else { unreachable!("read_st gives file tensors only") };
            if t.shape.iter().product::<i64>() != 1 {
                return Err(Error::Safetensors {
                    path: path.as_ref().clone(),
                    msg: format!(
                        "tensor {n} has shape {:?}; only one-element (per-tensor) fp8 scales are supported",
                        t.shape
                    ),
                });
            }
            let s = t.load()?.to_kind(Kind::Float).double_value(&[]) as f32;
            let path = path.as_ref().clone();
            scales.insert(format!("{base}.weight"), (n, s, path));
        } else if !(n.ends_with(".scale_input") || n == "scaled_fp8" || n.ends_with(".scaled_fp8")) {
            rest.push((n, t));
        }
    }
    for (n, t) in rest.iter_mut() {
        if let Some((_, s, _)) = scales.remove(n.as_str()) {
            t.scale = Some(s);
        }
    }
    if let Some((weight, (scale, _, path))) = scales.into_iter().min_by(|a, b| a.0.cmp(&b.0)) {
        return Err(Error::Safetensors {
            path,
            msg: format!(
                "tensor {scale} is an fp8 scale, but there is no {weight} to scale; the checkpoint is incomplete"
            ),
        });
    }
    Ok(rest)
}

fn st_kind(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F64 => Kind::Double,
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        // safetensors' F8_E4M3 is torch's float8_e4m3fn (no infinities, NaN = S.1111.111).
        D::F8_E4M3 => Kind::Float8e4m3fn,
        D::F8_E5M2 => Kind::Float8e5m2,
        _ => return None,
    })
}

/// The tensors of one safetensors file (a single-file checkpoint), fp8 scales folded in
/// ([`fold_fp8_scales`]); nothing but the header and the scales is read yet.
pub fn read_st(path: &Path) -> Result<Vec<(String, Stored)>> {
    fold_fp8_scales(read_st_raw(path)?)
}

/// The tensors of one safetensors file from its header (`likeness_sdk::st::read_header`: at
/// most 8 bytes + the JSON are read, and every length is checked against the file's before use).
fn read_st_raw(path: &Path) -> Result<Vec<(String, Stored)>> {
    let header = likeness_sdk::st::read_header(path)
        .map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })?;
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let (file, shared_path) = (Arc::new(file), Arc::new(path.to_path_buf()));
    let data_start = header.data_start() as u64;
    header
        .tensors
        .into_iter()
        .map(|t| {
            let kind = st_kind(t.dtype).ok_or_else(|| Error::Safetensors {
                path: path.into(),
                msg: format!("tensor {}: dtype {:?} is not supported", t.name, t.dtype),
            })?;
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let (begin, end) = t.data_offsets;
            let src = Src::File {
                file: file.clone(),
                path: shared_path.clone(),
                name: Arc::from(t.name.as_str()),
                kind,
                file_shape: shape.clone(),
                start: data_start + begin as u64,
                len: end - begin,
            };
            Ok((t.name, Stored { shape, src, scale: None }))
        })
        .collect()
}

/// The tensors of a component folder: `diffusion_pytorch_model.safetensors`, or every shard the
/// `diffusion_pytorch_model.safetensors.index.json` weight_map names.
pub fn read_component_weights(dir: &Path) -> Result<Vec<(String, Stored)>> {
    read_weights(dir, "diffusion_pytorch_model")
}

/// `<stem>.safetensors`, or every shard `<stem>.safetensors.index.json` names (diffusers writes
/// `diffusion_pytorch_model`, transformers `model`).
pub fn read_weights(dir: &Path, stem: &str) -> Result<Vec<(String, Stored)>> {
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
        out.extend(read_st_raw(&dir.join(&s))?);
    }
    // After all shards: a scale may sit in another shard than its weight.
    fold_fp8_scales(out)
}

/// Checks `tensors` (diffusers names) against the store's parameters — every missing,
/// unexpected and wrong-shape tensor named in one error — and, unless the store only plans,
/// reads each one and copies it in, cast to the store's dtype (one tensor in memory at a time).
pub fn apply(store: &Store, tensors: Vec<(String, Stored)>, source: &str, model: &'static str) -> Result<()> {
    let params: BTreeMap<String, Tensor> = store.named_parameters().into_iter().collect();
    let mut given: HashMap<String, Stored> = HashMap::new();
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
            let t = given.remove(n).expect("checked above").load()?;
            let mut p = p.shallow_clone();
            match store.fp8_scale(n) {
                Some(scale) => quantize_into(&mut p, scale, &t.to_device(store.device)),
                None => p.copy_(&t.to_kind(store.kind).to_device(store.device)),
            }
        }
        Ok(())
    })
}

/// fp8 storage of one weight (musubi-tuner's `--fp8_base`, ComfyUI's fp8-scaled convention):
/// `scale = max|w| / 448` in f32 (1 for an all-zero weight), `q = fp8_e4m3fn(w / scale)`.
fn quantize_into(p: &mut Tensor, mut scale: Tensor, w: &Tensor) {
    let w = w.to_kind(Kind::Float);
    let max = w.abs().max();
    let s = if max.double_value(&[]) > 0.0 {
        max / crate::store::FP8_E4M3_MAX
    } else {
        Tensor::ones([], (Kind::Float, w.device()))
    };
    p.copy_(&(&w / &s).to_kind(Kind::Float8e4m3fn));
    scale.copy_(&s);
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
    vae_from_diffusers_mode(dir, kind, device, Mode::Alloc)
}

/// `Plan`: checks names and shapes against the file headers only (no weight is read); what a
/// loader that defers the weights calls up front, so a broken file still fails early.
pub fn vae_from_diffusers_mode(dir: &Path, kind: Kind, device: Device, mode: Mode) -> Result<(Store, AutoencoderKL)> {
    let dir = component(dir, "vae");
    let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(mode, kind, device);
    let model = AutoencoderKL::new(&store, &cfg);
    apply(&store, read_component_weights(&dir)?, &dir.display().to_string(), "AutoencoderKL")?;
    Ok((store, model))
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix, transformers 4 (SD1.5's
/// files) with it; the buffer `embeddings.position_ids` (persistent in transformers < 4.31) is
/// not a parameter. Normalised to this crate's `text_model.…` names.
fn text_encoder_names(tensors: Vec<(String, Stored)>) -> Vec<(String, Stored)> {
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
    text_encoder_from_diffusers_mode(dir, kind, device, Mode::Alloc)
}

/// `Plan`: the header-only check (see [`vae_from_diffusers_mode`]).
pub fn text_encoder_from_diffusers_mode(
    dir: &Path,
    kind: Kind,
    device: Device,
    mode: Mode,
) -> Result<(Store, ClipTextModel)> {
    let dir = component(dir, "text_encoder");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let store = Store::new(mode, kind, device);
    let model = ClipTextModel::new(&store, &cfg);
    let tensors = text_encoder_names(read_weights(&dir, "model")?);
    apply(&store, tensors, &dir.display().to_string(), "CLIPTextModel")?;
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
    text_encoder_from_single_file_mode(file, cfg, kind, device, Mode::Alloc)
}

/// `Plan`: the header-only check (see [`vae_from_diffusers_mode`]).
pub fn text_encoder_from_single_file_mode(
    file: &Path,
    cfg: &ClipTextConfig,
    kind: Kind,
    device: Device,
    mode: Mode,
) -> Result<(Store, ClipTextModel)> {
    let store = Store::new(mode, kind, device);
    let model = ClipTextModel::new(&store, cfg);
    let tensors = read_st(file)?
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix(ldm::TEXT_ENCODER_PREFIX).map(|s| (s.to_string(), t)))
        .collect();
    let source = format!("{} ({}*)", file.display(), ldm::TEXT_ENCODER_PREFIX);
    apply(&store, text_encoder_names(tensors), &source, "CLIPTextModel")?;
    Ok((store, model))
}

/// transformers' names of a T5 encoder normalised to [`T5EncoderModel`]'s: the decoder half
/// and `lm_head` of a full `T5ForConditionalGeneration` checkpoint are not the encoder's
/// (transformers ignores them too); `encoder.embed_tokens.weight` is tied to `shared.weight`
/// (save_pretrained writes one of the two; it stands in for a missing `shared.weight` and is
/// dropped otherwise).
fn t5_names(tensors: Vec<(String, Stored)>) -> Vec<(String, Stored)> {
    let has_shared = tensors.iter().any(|(n, _)| n == "shared.weight");
    tensors
        .into_iter()
        .filter(|(n, _)| !n.starts_with("decoder.") && n != "lm_head.weight")
        .filter_map(|(n, t)| match n.as_str() {
            "encoder.embed_tokens.weight" if has_shared => None,
            "encoder.embed_tokens.weight" => Some(("shared.weight".to_string(), t)),
            _ => Some((n, t)),
        })
        .collect()
}

/// A transformers `T5EncoderModel` folder (`<model>/text_encoder_2`, Flux's, or the folder
/// itself): config.json + model.safetensors (or its sharded index).
pub fn t5_encoder_from_diffusers(dir: &Path, kind: Kind, device: Device) -> Result<(Store, T5EncoderModel)> {
    t5_encoder_from_diffusers_mode(dir, kind, device, Mode::Alloc)
}

/// `Plan`: the header-only check (see [`vae_from_diffusers_mode`]).
pub fn t5_encoder_from_diffusers_mode(
    dir: &Path,
    kind: Kind,
    device: Device,
    mode: Mode,
) -> Result<(Store, T5EncoderModel)> {
    let dir = component(dir, "text_encoder_2");
    let cfg = T5Config::from_file(&dir.join("config.json"))?;
    let store = Store::new(mode, kind, device);
    let model = T5EncoderModel::new(&store, &cfg);
    apply(&store, t5_names(read_weights(&dir, "model")?), &dir.display().to_string(), "T5EncoderModel")?;
    Ok((store, model))
}

/// A T5 encoder in one safetensors file with transformers' names (ComfyUI's `t5xxl_*.safetensors`,
/// fp8-scaled ones included).
pub fn t5_encoder_from_single_file(
    file: &Path,
    cfg: &T5Config,
    kind: Kind,
    device: Device,
) -> Result<(Store, T5EncoderModel)> {
    let store = Store::new(Mode::Alloc, kind, device);
    let model = T5EncoderModel::new(&store, cfg);
    apply(&store, t5_names(read_st(file)?), &file.display().to_string(), "T5EncoderModel")?;
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
    tensors: Vec<(String, Stored)>,
    prefix: &str,
    idx: &HashMap<String, (String, bool)>,
) -> Vec<(String, Stored)> {
    tensors
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| match idx.get(&n) {
            Some((d, true)) if t.dim() == 4 => (d.clone(), t.flattened()),
            Some((d, _)) => (d.clone(), t),
            // Kept under its LDM name so the mismatch report shows it as unexpected.
            None => (n, t),
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
    let tensors = from_ldm(read_st(file)?, ldm::UNET_PREFIX, &idx);
    apply(&store, tensors, &format!("{} ({}*)", file.display(), ldm::UNET_PREFIX), "UNet2DConditionModel")?;
    Ok((store, model))
}

pub fn vae_from_single_file(
    file: &Path,
    cfg: &VaeConfig,
    kind: Kind,
    device: Device,
) -> Result<(Store, AutoencoderKL)> {
    vae_from_single_file_mode(file, cfg, kind, device, Mode::Alloc)
}

/// `Plan`: the header-only check (see [`vae_from_diffusers_mode`]).
pub fn vae_from_single_file_mode(
    file: &Path,
    cfg: &VaeConfig,
    kind: Kind,
    device: Device,
    mode: Mode,
) -> Result<(Store, AutoencoderKL)> {
    let store = Store::new(mode, kind, device);
    let model = AutoencoderKL::new(&store, cfg);
    let nb = cfg.block_out_channels.len();
    let idx = ldm_index(&store, ldm::VAE_PREFIX, |n| ldm::vae_to_ldm(n, nb))?;
    let tensors = from_ldm(read_st(file)?, ldm::VAE_PREFIX, &idx);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written by libtorch's own safetensors writer, read back header-first and tensor by
    /// tensor, gives the same tensors bitwise (every dtype the checkpoints use, a 0-d and an
    /// empty tensor); then every truncation and a sweep of corrupted header bytes of it give an
    /// error, never a panic or a wrong read.
    #[test]
    fn header_first_reading_matches_libtorch_and_refuses_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let o = (Kind::Float, Device::Cpu);
        let tensors = vec![
            ("a.weight".to_string(), Tensor::arange(24, o).view([2, 3, 4]) * 0.37),
            ("b.half".to_string(), (Tensor::arange(6, o) * 1.5).to_kind(Kind::Half)),
            ("c.bf16".to_string(), (Tensor::arange(5, o) - 2.25).to_kind(Kind::BFloat16)),
            ("d.f64".to_string(), Tensor::arange(3, (Kind::Double, Device::Cpu)) / 3.0),
            ("e.ids".to_string(), Tensor::arange(4, (Kind::Int64, Device::Cpu))),
            ("f.scalar".to_string(), Tensor::from(2.5f32)),
            ("g.empty".to_string(), Tensor::zeros([0, 4], o)),
        ];
        Tensor::write_safetensors(&tensors, &path).unwrap();
        let read = read_st(&path).unwrap();
        assert_eq!(read.len(), tensors.len());
        for (name, t) in &tensors {
            let (_, s) = read.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not read"));
            assert_eq!(s.size(), t.size(), "{name}");
            let got = s.load().unwrap();
            assert_eq!(got.kind(), t.kind(), "{name}");
            assert!(bool::try_from(got.eq_tensor(t).all()).unwrap(), "{name}: values differ");
        }
        // A 1×1 conv kernel viewed as a Linear weight.
        let conv = Tensor::arange(6, o).view([3, 2, 1, 1]);
        let p2 = dir.path().join("conv.safetensors");
        Tensor::write_safetensors(&[("k", &conv)], &p2).unwrap();
        let (_, k) = read_st(&p2).unwrap().pop().unwrap();
        let flat = k.flattened();
        assert_eq!(flat.size(), vec![3, 2]);
        assert!(bool::try_from(flat.load().unwrap().eq_tensor(&conv.view([3, 2])).all()).unwrap());

        let bytes = std::fs::read(&path).unwrap();
        let damaged = dir.path().join("damaged.safetensors");
        // What each tensor reads: (dtype, byte range), in file order.
        let read_all = |b: &[u8]| -> Result<Vec<(Kind, u64, usize)>> {
            std::fs::write(&damaged, b).unwrap();
            let mut out = Vec::new();
            for (_, s) in read_st(&damaged)? {
                let _ = s.load()?;
                let Src::File { kind, start, len, .. } = &s.src else { unreachable!("a file tensor") };
                out.push((*kind, *start, *len));
            }
            out.sort_by_key(|r| r.1);
            Ok(out)
        };
        let intact = read_all(&bytes).unwrap();
        for cut in 0..bytes.len() {
            match read_all(&bytes[..cut]) {
                Ok(_) => panic!("a file cut at {cut} of {} bytes read without error", bytes.len()),
                Err(e) => assert_names_file_and_problem(&e, &damaged, &format!("cut at {cut}")),
            }
        }
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let (mut refused, mut parsed) = (0, 0);
        for i in 0..header_end {
            for v in [0u8, b'9', b'"', 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                match read_all(&b) {
                    Err(e) => {
                        assert_names_file_and_problem(&e, &damaged, &format!("byte {i} = {v:#04x}"));
                        refused += 1;
                    }
                    // A change the format cannot see (a tensor's name, padding, the shape of
                    // an empty tensor: [0, 4] → [0, 9]) must still read exactly the intact
                    // file's bytes, with the same dtypes.
                    Ok(got) => {
                        assert_eq!(got, intact, "byte {i} = {v:#04x} parsed into other tensors");
                        parsed += 1;
                    }
                }
            }
        }
        eprintln!("damaged headers: {refused} refused, {parsed} still parse (same tensors)");
        assert!(refused > 3 * parsed, "{refused} refused vs {parsed} parsed: the header checks let too much through");
    }

    /// A damaged file's error is a safetensors error naming the file and saying what is wrong
    /// with it (one of the header checks' or the reader's sentences).
    fn assert_names_file_and_problem(e: &Error, file: &Path, what: &str) {
        let Error::Safetensors { path, msg } = e else { panic!("{what}: not a safetensors error: {e}") };
        assert_eq!(path, file, "{what}: the error names another file: {e}");
        let problems = [
            "is not a safetensors file: the file has",
            "is not a safetensors file: the header claims",
            "is not a safetensors file: the JSON header does not parse",
            "is not a safetensors file: tensor `",
            "is not a safetensors file: the tensors cover",
            "is not supported",
        ];
        assert!(
            msg.contains(&file.display().to_string()) && problems.iter().any(|p| msg.contains(p)),
            "{what}: the error does not name the file and a known problem: {e}"
        );
    }

    /// Writes a safetensors file by hand (dtype strings as the format spells them), for dtypes
    /// libtorch's writer does not write.
    fn write_raw(path: &Path, tensors: &[(&str, &str, &[usize], &[u8])]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let range = [data.len(), data.len() + bytes.len()];
            header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": range}));
            data.extend_from_slice(bytes);
        }
        let mut json = serde_json::Value::Object(header).to_string().into_bytes();
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend(json);
        file.extend(data);
        std::fs::write(path, file).unwrap();
    }

    fn values(s: &Stored) -> Vec<f32> {
        Vec::<f32>::try_from(&s.load().unwrap().to_kind(Kind::Float).view([-1])).unwrap()
    }

    /// Row ranges of a fused tensor are bit-identical to slicing the whole loaded tensor, and
    /// only their bytes are read: the rest of the tensor is overwritten with garbage on disk
    /// after the header was read, and the slices do not see it.
    #[test]
    fn row_slices_match_narrow_and_read_only_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fused.safetensors");
        let o = (Kind::Float, Device::Cpu);
        let qkv = Tensor::arange(12 * 5, o).view([12, 5]) * 0.37 - 3.0;
        let bias = (Tensor::arange(12, o) * 0.11).to_kind(Kind::BFloat16);
        let conv = Tensor::arange(6 * 2, o).view([6, 2, 1, 1]);
        let scalar = Tensor::from(1.5f32);
        Tensor::write_safetensors(&[("qkv", &qkv), ("bias", &bias), ("conv", &conv), ("s", &scalar)], &path).unwrap();
        let mut read: HashMap<String, Stored> = read_st(&path).unwrap().into_iter().collect();
        let whole = |n: &str| read[n].load().unwrap();
        for (name, full) in [("qkv", whole("qkv")), ("bias", whole("bias"))] {
            for (start, n) in [(0, 4), (4, 4), (8, 4), (0, 12), (11, 1), (5, 0)] {
                let part = read[name].rows(start, n).unwrap();
                let got = part.load().unwrap();
                let want = full.narrow(0, start, n);
                assert_eq!((got.size(), got.kind()), (want.size(), want.kind()), "{name} rows {start}+{n}");
                assert!(bool::try_from(got.eq_tensor(&want).all()).unwrap(), "{name} rows {start}+{n} differ");
            }
        }
        // Rows of a 1×1 conv kernel viewed as a Linear weight.
        let flat = read.remove("conv").unwrap().flattened();
        let got = flat.rows(2, 3).unwrap().load().unwrap();
        assert!(bool::try_from(got.eq_tensor(&conv.view([6, 2]).narrow(0, 2, 3)).all()).unwrap());
        // Out of range and 0-d: errors naming the file, the tensor and the rows.
        let e = read["qkv"].rows(10, 3).err().unwrap().to_string();
        assert!(
            e.contains("fused.safetensors") && e.contains("tensor qkv: rows 10..13 are outside its 12 rows"),
            "{e}"
        );
        let e = read["s"].rows(0, 1).err().unwrap().to_string();
        assert!(e.contains("tensor s: a 0-d tensor has no rows"), "{e}");

        let (k, v) = (read["qkv"].rows(4, 4).unwrap(), read["qkv"].rows(8, 4).unwrap());
        let (k_want, v_want) = (values(&k), values(&v));
        let Src::File { start, len, .. } = &read["qkv"].src else { unreachable!("a file tensor") };
        let Src::File { start: ks, len: kl, .. } = &k.src else { unreachable!("a file tensor") };
        assert_eq!((*ks, *kl), (start + 4 * 5 * 4, 4 * 5 * 4), "k is bytes 80..160 of qkv");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            // Garbage (NaN) over q's rows only.
            f.write_all_at(&vec![0xff; (ks - start) as usize], *start).unwrap();
        }
        assert_eq!(values(&k), k_want, "k read bytes outside its rows");
        assert_eq!(values(&v), v_want, "v read bytes outside its rows");
        assert!(values(&read["qkv"]).iter().take(20).all(|x| x.is_nan()), "the garbage is really there");
        assert_eq!(*len, 12 * 5 * 4);
    }

    /// fp8 codes whose values are known by the format's definition (the exhaustive comparison
    /// with torch is tests/fp8.rs), and the fold of ComfyUI scales with its errors.
    #[test]
    fn fp8_decodes_and_scales_fold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fp8.safetensors");
        let one = 1.0f32.to_le_bytes();
        write_raw(
            &path,
            &[
                // e4m3fn: 1.0, 448 (max), 2⁻⁹ (min subnormal), -2.0, NaN.
                ("a.weight", "F8_E4M3", &[5], &[0x38, 0x7e, 0x01, 0xc0, 0x7f]),
                ("a.scale_weight", "F32", &[], &0.5f32.to_le_bytes()),
                ("a.scale_input", "F32", &[], &one),
                // e5m2: 1.0, 57344 (max), -inf, 2⁻¹⁶ (min subnormal).
                ("b.weight", "F8_E5M2", &[2, 2], &[0x3c, 0x7b, 0xfc, 0x01]),
                ("scaled_fp8", "F8_E4M3", &[0], &[]),
            ],
        );
        let read: HashMap<String, Stored> = read_st(&path).unwrap().into_iter().collect();
        let mut names: Vec<&String> = read.keys().collect();
        names.sort();
        assert_eq!(names, ["a.weight", "b.weight"]);
        let a = values(&read["a.weight"]);
        assert_eq!(&a[..4], &[0.5, 224.0, 2f32.powi(-10), -1.0]);
        assert!(a[4].is_nan());
        assert_eq!(values(&read["b.weight"]), [1.0, 57344.0, f32::NEG_INFINITY, 2f32.powi(-16)]);
        assert_eq!(values(&read["a.weight"].rows(1, 2).unwrap()), [224.0, 2f32.powi(-10)], "scaled rows");

        let orphan = dir.path().join("orphan.safetensors");
        write_raw(&orphan, &[("x.scale_weight", "F32", &[], &one), ("y.weight", "F8_E4M3", &[1], &[0x38])]);
        let e = read_st(&orphan).err().unwrap().to_string();
        assert!(e.contains("orphan.safetensors") && e.contains("x.scale_weight") && e.contains("no x.weight"), "{e}");
        let per_channel = dir.path().join("per_channel.safetensors");
        let two = [one, one].concat();
        write_raw(
            &per_channel,
            &[("x.scale_weight", "F32", &[2], &two), ("x.weight", "F8_E4M3", &[2, 1], &[0x38, 0x38])],
        );
        let e = read_st(&per_channel).err().unwrap().to_string();
        assert!(e.contains("x.scale_weight has shape [2]; only one-element"), "{e}");
    }
}
