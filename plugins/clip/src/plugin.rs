//! The `clip` metric plugin.
//!
//! - `embed(pixels)`: `[B, 3, H, W]` f32 RGB in `[0, 1]` (any size) → the differentiable
//!   preprocessing [`likeness_clip::preprocess::resize_crop_normalize`] (bicubic antialiased
//!   resize of the short side to the config's `image_size`, centre crop, CLIP mean/std — the
//!   tensor path, parity with torchvision v2 `resize(antialias=True)`; used for Train *and*
//!   Eval so a generated image and its reference see the same function) → the image tower →
//!   L2-normalised `[B, projection_dim]`, valid = 1 (0 only for a row with no direction).
//!   The exact-Pillow path (`preprocess::pil_exact`) needs 8-bit decoded images and is not
//!   differentiable; it is the library's evaluation path, not used here.
//! - `backward` / `backward_scaled`: the VJP to the pixels by autograd (weights frozen); the
//!   scale is applied to the incoming gradient before the backward pass.
//! - `embed_texts`: CLIP BPE (context length from the config, truncation keeps EOT last) → the
//!   text tower pooled at EOT → L2-normalised, no gradient.
//! - `interface`: `embeds_texts = true`, **no same-person threshold** (−2): CLIP scores
//!   semantic image–text alignment and is not an identity verifier.

use std::path::{Path, PathBuf};

use likeness_clip::preprocess::resize_crop_normalize;
use likeness_clip::{l2_normalize, ClipConfig, ClipModel, ClipTokenizer, Padding};
use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode,
    MetricInterface, MetricOutput, MetricPlugin, PluginDescriptor, PluginError, PluginKind, Result, TensorView,
};
use likeness_sdk_torch::tensor_to_vec_f32;
use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::ClipPluginError;

pub const ID: &str = "clip";
/// Where scripts/setup.sh (fetch_reference.py) unpacks open_clip's wheel under $LIKENESS_DATA.
pub const OPEN_CLIP_VOCAB: &str = "reference/open_clip-3.3.0/open_clip/bpe_simple_vocab_16e6.txt.gz";

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum Precision {
    /// The metric's precision (and transformers' default).
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// For checks (finite differences); ~2× slower.
    #[serde(rename = "f64")]
    F64,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::F64 => Kind::Double,
        }
    }
}

/// The plugin's config (JSON).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A transformers CLIPModel `model.safetensors` (its folder's config.json and tokenizer files
    /// are found next to it) or an OpenAI/open_clip state dict in safetensors.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// A transformers `config.json` or an open_clip model config JSON.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// An open_clip preset name (ViT-B-32, ViT-L-14, with -quickgelu for OpenAI weights).
    #[serde(default)]
    pub arch: Option<String>,
    /// open_clip's `bpe_simple_vocab_16e6.txt.gz` or a transformers tokenizer folder.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Tests only: without `weights`, seeded random towers of the configured shape.
    #[serde(default)]
    pub allow_random_weights: bool,
    #[serde(default)]
    pub precision: Precision,
}

fn schema() -> likeness_sdk::serde_json::Value {
    likeness_sdk::serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "weights": {"type": "string"},
            "config": {"type": "string"},
            "arch": {"type": "string", "enum": likeness_clip::config::PRESETS},
            "tokenizer": {"type": "string"},
            "allow_random_weights": {"type": "boolean", "default": false},
            "precision": {"type": "string", "enum": ["f32", "f64"], "default": "f32"}
        }
    })
}

fn cfg_err(field: &'static str, msg: impl Into<String>) -> PluginError {
    ClipPluginError::Config { field, msg: msg.into() }.into()
}

fn parse(config_json: &str) -> Result<Config> {
    let c: Config = parse_config(ID, config_json)?;
    if c.weights.is_none() && !c.allow_random_weights {
        return Err(cfg_err(
            "weights",
            "is required: the path of a transformers CLIPModel model.safetensors (e.g. openai/clip-vit-base-patch32's) \
             or an OpenAI/open_clip state dict in safetensors (with `arch`, e.g. \"ViT-B-32-quickgelu\"); random towers \
             are allowed only with `allow_random_weights = true` (tests)",
        ));
    }
    if c.weights.is_some() && c.allow_random_weights {
        return Err(cfg_err("allow_random_weights", "is true but `weights` is set: remove one of them"));
    }
    if let Some(a) = &c.arch {
        if !likeness_clip::config::PRESETS.contains(&a.as_str()) {
            return Err(cfg_err("arch", format!("{a:?} is not one of {:?}", likeness_clip::config::PRESETS)));
        }
        if c.config.is_some() {
            return Err(cfg_err("arch", "and `config` are both set: name the shapes once"));
        }
    }
    Ok(c)
}

/// The towers' shapes: `config` (transformers or open_clip JSON, told apart by their top-level
/// keys), else the weights folder's config.json, else `arch`.
pub fn resolve_config(c: &Config) -> Result<ClipConfig> {
    let from_file = |p: &Path| -> Result<ClipConfig> {
        let text =
            std::fs::read_to_string(p).map_err(|e| cfg_err("config", format!("cannot read {}: {e}", p.display())))?;
        let r = if text.contains("\"text_config\"") {
            ClipConfig::from_hf_config_json(p)
        } else {
            ClipConfig::from_open_clip_json(p)
        };
        r.map_err(|e| ClipPluginError::from(e).into())
    };
    if let Some(p) = &c.config {
        return from_file(p);
    }
    if let Some(a) = &c.arch {
        return ClipConfig::preset(a).map_err(|e| ClipPluginError::from(e).into());
    }
    if let Some(folder_cfg) = c.weights.as_deref().and_then(Path::parent).map(|d| d.join("config.json")) {
        if folder_cfg.is_file() {
            return from_file(&folder_cfg);
        }
    }
    Err(cfg_err(
        "config",
        "cannot tell the towers' shapes: the weights' folder has no config.json; set `config` (a transformers \
         config.json or an open_clip model config) or `arch` (ViT-B-32, ViT-L-14, …-quickgelu for OpenAI weights)",
    ))
}

/// `tokenizer`, else the weights folder's tokenizer files (tokenizer.json or vocab.json +
/// merges.txt, as a transformers folder has them), else open_clip's vocab under $LIKENESS_DATA.
/// The padding is the source's: transformers' CLIPTokenizer pads with EOT, open_clip with 0 (with
/// the causal mask the pooled EOT never sees the padding; this only keeps the ids the source's).
pub fn resolve_tokenizer(c: &Config) -> Result<(ClipTokenizer, Padding)> {
    let load = |p: &Path| -> Result<(ClipTokenizer, Padding)> {
        let r = if p.is_dir() {
            ClipTokenizer::from_hf_folder(p).map(|t| (t, Padding::Eot))
        } else {
            ClipTokenizer::from_open_clip_vocab(p).map(|t| (t, Padding::Zero))
        };
        r.map_err(|e| ClipPluginError::from(e).into())
    };
    if let Some(p) = &c.tokenizer {
        return load(p);
    }
    if let Some(dir) = c.weights.as_deref().and_then(Path::parent) {
        if dir.join("tokenizer.json").is_file() || dir.join("vocab.json").is_file() {
            return load(dir);
        }
    }
    // LIKENESS_DATA defaults as scripts/common.sh's does, so `host` finds it outside the scripts.
    match likeness_sdk::venv::likeness_data() {
        Some(d) if d.join(OPEN_CLIP_VOCAB).is_file() => load(&d.join(OPEN_CLIP_VOCAB)),
        _ => Err(cfg_err(
            "tokenizer",
            format!(
                "not set, the weights' folder has no tokenizer.json / vocab.json, and $LIKENESS_DATA/{OPEN_CLIP_VOCAB} \
                 does not exist (scripts/setup.sh puts it there): pass open_clip's bpe_simple_vocab_16e6.txt.gz or a \
                 transformers tokenizer folder"
            ),
        )),
    }
}

/// The `clip` metric.
pub struct ClipMetric {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub config: Config,
    padding: Padding,
    device: tch::Device,
    pending: Option<Pending>,
}

struct Pending {
    pixels: Tensor,
    /// The rows that are valid, and their embeddings (with graph).
    rows: Vec<i64>,
    emb: Option<Tensor>,
}

impl ClipMetric {
    pub fn dim(&self) -> usize {
        self.model.cfg.projection_dim
    }

    /// The differentiable image embedding: `[B, 3, H, W]` in [0, 1] (the model's kind and
    /// device) → `[B, D]` L2-normalised.
    pub fn embed_tensor(model: &ClipModel, pixels: &Tensor) -> Result<Tensor> {
        let x = resize_crop_normalize(pixels, model.cfg.vision.image_size);
        let out = model.vision.forward(&x).map_err(ClipPluginError::from)?;
        Ok(l2_normalize(&out.image_embeds))
    }

    /// Text embeddings `[N, D]` L2-normalised, in the model's kind.
    pub fn embed_text_tensor(&self, texts: &[&str]) -> Result<Tensor> {
        let ctx = self.model.cfg.text.context_length;
        let enc = self.tokenizer.encode(texts, ctx, self.padding).map_err(ClipPluginError::from)?;
        let ids = Tensor::from_slice(&enc.ids).view([enc.batch as i64, ctx as i64]);
        let _g = tch::no_grad_guard();
        let out = self.model.text.forward(&ids, &enc.eot_positions).map_err(ClipPluginError::from)?;
        Ok(l2_normalize(&out.text_embeds))
    }
}

impl MetricPlugin for ClipMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("CLIP (transformers or OpenAI/open_clip checkpoints) in libtorch: differentiable image embedding (bicubic antialiased resize, centre crop, CLIP normalisation, ViT) and text embeddings (BPE, 77 tokens); L2-normalised; image-text alignment, not an identity verifier: no same-person threshold")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(schema())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self> {
        let config = parse(config_json)?;
        let cfg = resolve_config(&config)?;
        let (tokenizer, padding) = resolve_tokenizer(&config)?;
        let tch_device = likeness_sdk_torch::to_tch_device(device)?;
        let kind = config.precision.kind();
        let model = match &config.weights {
            Some(p) => ClipModel::load(p, &cfg, kind, tch_device),
            None => ClipModel::random(&cfg, seed as i64, kind, tch_device),
        }
        .map_err(ClipPluginError::from)?;
        Ok(ClipMetric { model, tokenizer, config, padding, device: tch_device, pending: None })
    }

    fn interface(config_json: &str) -> Result<MetricInterface> {
        let _config = parse(config_json)?;
        // Not an identity verifier (module comment): no same-person threshold, < −1 = none.
        Ok(MetricInterface { same_person_threshold: -2.0, embeds_texts: true, subject: "image-text alignment".into() })
    }

    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> Result<MetricOutput> {
        let x = CpuTensor::<f32>::from_view(pixels, "pixels")?;
        if x.shape.len() != 4 || x.shape[1] != 3 || x.shape[2] < 1 || x.shape[3] < 1 {
            return Err(ClipPluginError::Input(format!(
                "`pixels` must be [B, 3, H, W] RGB in [0, 1] (any H, W >= 1), got {:?}",
                x.shape
            ))
            .into());
        }
        let train = mode == ForwardMode::Train;
        let b = x.shape[0] as usize;
        let d = self.dim();
        let leaf = Tensor::from_slice(&x.data)
            .reshape(&x.shape[..])
            .to_device(self.device)
            .to_kind(self.config.precision.kind())
            .detach()
            .set_requires_grad(train);
        let _g = if train { None } else { Some(tch::no_grad_guard()) };
        let (mut out, mut valid, mut rows, mut emb) = (vec![0f32; b * d], vec![0u8; b], Vec::new(), None);
        if b > 0 {
            let e = Self::embed_tensor(&self.model, &leaf)?;
            let v = tensor_to_vec_f32(&e, &format!("metric `{ID}`: embeddings"))?;
            // A zero projection has no direction: NaN after the normalisation, reported invalid.
            for r in 0..b {
                let row = &v[r * d..(r + 1) * d];
                if row.iter().all(|x| x.is_finite()) {
                    out[r * d..(r + 1) * d].copy_from_slice(row);
                    valid[r] = 1;
                    rows.push(r as i64);
                }
            }
            if !rows.is_empty() {
                emb = Some(e.index_select(0, &Tensor::from_slice(&rows).to_device(self.device)));
            }
        }
        if train {
            self.pending = Some(Pending { pixels: leaf, rows, emb });
        }
        Ok(MetricOutput {
            embeddings: CpuTensor::new(vec![b as i64, d as i64], out).into_managed(),
            valid: CpuTensor::new(vec![b as i64], valid).into_managed(),
        })
    }

    fn backward(&mut self, d_embeddings: &TensorView) -> Result<likeness_sdk::abi::ManagedTensor> {
        self.backward_scaled(d_embeddings, 1.0)
    }

    fn backward_scaled(&mut self, d_embeddings: &TensorView, scale: f64) -> Result<likeness_sdk::abi::ManagedTensor> {
        let Some(p) = self.pending.as_ref() else {
            return Err(PluginError::new(
                ErrorCode::NoPendingForward,
                format!("metric `{ID}`: backward without a pending embed(Train) (or called twice)"),
            ));
        };
        let d = CpuTensor::<f32>::from_view(d_embeddings, "d_embeddings")?;
        let (batch, dim) = (p.pixels.size()[0], self.dim() as i64);
        if d.shape != vec![batch, dim] {
            return Err(ClipPluginError::Input(format!(
                "`d_embeddings` must have the embeddings' shape [{batch}, {dim}], got {:?}",
                d.shape
            ))
            .into());
        }
        if !scale.is_finite() {
            return Err(ClipPluginError::Input(format!("backward scale {scale} is not finite")).into());
        }
        let p = self.pending.take().expect("checked above");
        let dx = match &p.emb {
            None => p.pixels.zeros_like().detach(),
            Some(emb) => {
                let g = Tensor::from_slice(&d.data).reshape([batch, dim]);
                let g = g.index_select(0, &Tensor::from_slice(&p.rows)).to_device(emb.device()).to_kind(emb.kind());
                let s = (emb * (g * scale)).sum(emb.kind());
                let grads = Tensor::f_run_backward(&[&s], &[&p.pixels], false, false).map_err(ClipPluginError::from)?;
                grads.into_iter().next().ok_or_else(|| err::internal(format!("metric `{ID}`: no gradient")))?
            }
        };
        let shape = dx.size();
        Ok(CpuTensor::new(shape, tensor_to_vec_f32(&dx, &format!("metric `{ID}`: d_pixels"))?).into_managed())
    }

    fn embed_texts(&mut self, texts: &[&str]) -> Result<likeness_sdk::abi::ManagedTensor> {
        let n = texts.len();
        let d = self.dim();
        if n == 0 {
            return Ok(CpuTensor::new(vec![0, d as i64], Vec::<f32>::new()).into_managed());
        }
        let t = self.embed_text_tensor(texts)?;
        let v = tensor_to_vec_f32(&t, &format!("metric `{ID}`: text embeddings"))?;
        Ok(CpuTensor::new(vec![n as i64, d as i64], v).into_managed())
    }
}
