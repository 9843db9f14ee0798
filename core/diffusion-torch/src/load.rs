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
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A tensor of a safetensors file, known by its header and read only when [`apply`] copies it
/// into the model: loading then never holds a second copy of the weights (a whole-file read
/// would double a component's memory until the copies end; that transient was most of the
/// training process's peak RSS above diffusers', which loads the same way).
pub struct Stored {
    shape: Vec<i64>,
    src: Src,
}

enum Src {
    File { file: Arc<std::fs::File>, path: Arc<PathBuf>, kind: Kind, file_shape: Vec<i64>, start: u64, len: usize },
}

impl Stored {
    pub fn size(&self) -> Vec<i64> {
        self.shape.clone()
    }

    pub fn dim(&self) -> usize {
        self.shape.len()
    }

    /// The same data viewed as `[d0, d1·d2·…]` (a 1×1 conv kernel read as a Linear weight).
    fn flattened(self) -> Stored {
        let rest: i64 = self.shape[1..].iter().product();
        Stored { shape: vec![self.shape[0], rest], src: self.src }
    }

    /// Reads the bytes now.
    pub fn load(&self) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        match &self.src {
            Src::File { file, path, kind, file_shape, start, len } => {
                let mut bytes = vec![0u8; *len];
                file.read_exact_at(&mut bytes, *start).map_err(|e| Error::Safetensors {
                    path: path.as_ref().clone(),
                    msg: format!("cannot read {len} bytes at offset {start}: {e}"),
                })?;
                Ok(Tensor::from_data_size(&bytes, file_shape, *kind).reshape(&self.shape))
            }
        }
    }
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
        _ => return None,
    })
}

/// The tensors of one safetensors file from its header (`likeness_sdk::st::read_header`: at
/// most 8 bytes + the JSON are read, and every length is checked against the file's before use).
fn read_st(path: &Path) -> Result<Vec<(String, Stored)>> {
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
                kind,
                file_shape: shape.clone(),
                start: data_start + begin as u64,
                len: end - begin,
            };
            Ok((t.name, Stored { shape, src }))
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
        out.extend(read_st(&dir.join(&s))?);
    }
    Ok(out)
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
            p.copy_(&t.to_kind(store.kind).to_device(store.device));
        }
        Ok(())
    })
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
        let read_all = |b: &[u8]| -> Result<()> {
            std::fs::write(&damaged, b).unwrap();
            for (_, s) in read_st(&damaged)? {
                let _ = s.load()?;
            }
            Ok(())
        };
        for cut in 0..bytes.len() {
            assert!(
                read_all(&bytes[..cut]).is_err(),
                "a file cut at {cut} of {} bytes read without error",
                bytes.len()
            );
        }
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for i in 0..header_end {
            for v in [0u8, b'9', b'"', 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                // Either a clean error or a file that still parses: only a panic fails the test.
                let _ = read_all(&b);
            }
        }
    }
}
