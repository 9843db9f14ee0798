//! The `arcface` metric plugin: pixels → InsightFace pipeline → embedding.
//!
//! `embed(Eval)` runs the ONNX Runtime pipeline (detector → `u8` warp → recognizer), as
//! insightface does. `embed(Train)` with `differentiable_backend = "tch"` (the default) runs
//! [`crate::diff_path`]: the same detector without gradient, then `grid_sample` crops of the
//! float pixels and the recognizer rebuilt in libtorch from the same ONNX file, keeping the graph
//! for `backward` (d_embeddings → d_pixels).

use std::path::PathBuf;

use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode,
    MetricOutput, MetricPlugin, PluginDescriptor, PluginError, PluginKind, Result, TensorView,
};
use serde::Deserialize;
use tch::Kind;

use crate::align::{self, WarpKernel};
use crate::bf16::{cpu_has_bf16, Bf16Recognizer};
use crate::detector::{Detector, Provider};
use crate::diff_path::{DiffRecognizer, Pending};
use crate::pack;
use crate::recognizer::Recognizer;
use crate::scrfd::{self, Detection, FaceChoice};

pub const ID: &str = "arcface";

/// Which face a sample's embedding comes from when the detector finds several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// insightface's `detect(max_num=1, metric='default')`: area − 2·(centre offset)².
    #[default]
    Default,
    /// The largest box (`metric='max'`).
    Largest,
    /// The box whose centre is nearest the image centre.
    Central,
}

impl Choice {
    pub fn face_choice(self) -> FaceChoice {
        match self {
            Choice::Default => FaceChoice::Default,
            Choice::Largest => FaceChoice::Largest,
            Choice::Central => FaceChoice::MostCentral,
        }
    }
}

/// What `embed(Train)` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffBackend {
    /// The recognizer in libtorch from the same ONNX file, crops by `grid_sample`; `backward` works.
    #[default]
    Tch,
    /// No differentiable path: `embed(Train)` runs the ONNX Runtime pipeline and `backward` is
    /// an `Unsupported` error.
    None,
}

/// The float precision of the libtorch recognizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffPrecision {
    #[default]
    F32,
    /// Double precision (slow; for gradient checks by finite differences).
    F64,
}

/// The precision of the `Eval` recognizer (`precision` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// ONNX Runtime f32, as insightface runs it (the parity the oracle tests check).
    #[default]
    Fp32,
    /// The recognizer in bf16 through libtorch ([`crate::bf16`]); a config error on a CPU
    /// without bf16 units (emulated bf16 is slower than f32) or on CUDA.
    Bf16,
    /// bf16 where the CPU has the units and the pipeline runs on the CPU, fp32 elsewhere.
    Auto,
}

fn default_pack() -> String {
    pack::DEFAULT_PACK.to_string()
}
fn default_det_size() -> usize {
    scrfd::DEFAULT_DET_SIZE
}
fn default_det_thresh() -> f32 {
    scrfd::DEFAULT_DET_THRESH
}

/// The plugin's config (JSON).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A folder holding `<model_name>/` packs (searched before `$INSIGHTFACE_HOME/models` and
    /// `~/.insightface/models`).
    #[serde(default)]
    pub model_root: Option<PathBuf>,
    #[serde(default = "default_pack")]
    pub model_name: String,
    /// Explicit detector ONNX file (overrides the pack's).
    #[serde(default)]
    pub detector: Option<PathBuf>,
    /// Explicit recognizer ONNX file (overrides the pack's).
    #[serde(default)]
    pub recognizer: Option<PathBuf>,
    #[serde(default = "default_det_size")]
    pub det_size: usize,
    #[serde(default = "default_det_thresh")]
    pub det_thresh: f32,
    #[serde(default)]
    pub face_choice: Choice,
    /// `"cpu"`, `"cuda"`, or absent: the device the host creates the plugin on.
    #[serde(default)]
    pub device: Option<String>,
    /// `"tch"` (default) or `"none"`: what `embed(Train)` runs (see [`DiffBackend`]).
    #[serde(default)]
    pub differentiable_backend: DiffBackend,
    /// `"f32"` (default) or `"f64"`: precision of the libtorch recognizer.
    #[serde(default)]
    pub differentiable_precision: DiffPrecision,
    /// `"fp32"` (default), `"bf16"` or `"auto"`: the `Eval` recognizer (see [`Precision`]).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for Config {
    fn default() -> Self {
        parse_config(ID, "{}").expect("the empty config is valid")
    }
}

fn schema() -> likeness_sdk::serde_json::Value {
    likeness_sdk::serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "model_root": {"type": "string"},
            "model_name": {"type": "string", "enum": ["buffalo_l", "buffalo_s", "antelopev2"], "default": "buffalo_l"},
            "detector": {"type": "string"},
            "recognizer": {"type": "string"},
            "det_size": {"type": "integer", "default": 640},
            "det_thresh": {"type": "number", "default": 0.5},
            "face_choice": {"type": "string", "enum": ["default", "largest", "central"], "default": "default"},
            "device": {"type": "string", "enum": ["cpu", "cuda"]},
            "differentiable_backend": {"type": "string", "enum": ["tch", "none"], "default": "tch"},
            "differentiable_precision": {"type": "string", "enum": ["f32", "f64"], "default": "f32"},
            "precision": {"type": "string", "enum": ["fp32", "bf16", "auto"], "default": "fp32"}
        }
    })
}

/// One face found by [`Pipeline::analyze`].
#[derive(Clone, Debug)]
pub struct Face {
    pub det: Detection,
    /// L2-normalised embedding (`None` past `max_embed`).
    pub embedding: Option<Vec<f32>>,
}

/// Detector + recognizer: `FaceAnalysis.get` on ONNX Runtime.
pub struct Pipeline {
    pub detector: Detector,
    pub recognizer: Recognizer,
    /// The bf16 recognizer when `precision` selects it; it then replaces `recognizer` in
    /// [`Pipeline::embed_crops`] (the ORT session stays: its shapes and normalisation are the
    /// reference the bf16 path is built from).
    pub bf16: Option<Bf16Recognizer>,
    pub choice: FaceChoice,
}

impl Pipeline {
    pub fn new(config: &Config, device: Device) -> Result<Pipeline> {
        let provider = match config.device.as_deref() {
            Some("cpu") => Provider::Cpu,
            Some("cuda") => Provider::Cuda,
            None => match device.device_type {
                DeviceType::Cpu => Provider::Cpu,
                DeviceType::Cuda => Provider::Cuda,
            },
            Some(other) => {
                return Err(err::config(format!("config of plugin `{ID}`: device `{other}` is not `cpu` or `cuda`")))
            }
        };
        if config.det_size == 0 || !config.det_size.is_multiple_of(32) {
            return Err(err::config(format!(
                "config of plugin `{ID}`: det_size {} must be a positive multiple of 32",
                config.det_size
            )));
        }
        let files = pack::resolve(
            &config.model_name,
            config.model_root.as_deref(),
            config.detector.as_deref(),
            config.recognizer.as_deref(),
        )
        .map_err(|e| err::io(format!("plugin `{ID}`: {e}")))?;
        let detector = Detector::load(&files.detector, provider, config.det_size, config.det_thresh)?;
        let recognizer = Recognizer::load(&files.recognizer, provider)?;
        let use_bf16 = match config.precision {
            Precision::Fp32 => false,
            Precision::Auto => provider == Provider::Cpu && cpu_has_bf16(),
            Precision::Bf16 if provider != Provider::Cpu => {
                return Err(err::config(format!(
                    "config of plugin `{ID}`: precision \"bf16\" runs on the CPU only; use \"fp32\" or \"auto\" with device cuda"
                )))
            }
            Precision::Bf16 if !cpu_has_bf16() => {
                return Err(err::config(format!(
                    "config of plugin `{ID}`: precision \"bf16\" needs a CPU with AVX512_BF16 (this one has none; \
                     emulated bf16 is slower than f32); use \"auto\" (bf16 where available) or \"fp32\""
                )))
            }
            Precision::Bf16 => true,
        };
        let bf16 = if use_bf16 {
            Some(Bf16Recognizer::load(
                &files.recognizer,
                recognizer.input_size,
                recognizer.input_mean,
                recognizer.input_std,
            )?)
        } else {
            None
        };
        Ok(Pipeline { detector, recognizer, bf16, choice: config.face_choice.face_choice() })
    }

    /// L2-normalised embeddings of aligned crops, all in one batch, by the configured recognizer.
    pub fn embed_crops(&mut self, crops: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        match &self.bf16 {
            Some(r) => r.embed(crops),
            None => self.recognizer.embed(crops),
        }
    }

    /// Every face (`max_num` 0) or the `max_num` chosen ones, with embeddings for the first
    /// `max_embed`: `FaceAnalysis.get` on an interleaved RGB `u8` image.
    pub fn analyze(&mut self, rgb: &[u8], w: usize, h: usize, max_num: usize, max_embed: usize) -> Result<Vec<Face>> {
        let (dets, crops) = self.detect_and_crop(rgb, w, h, max_num, max_embed)?;
        let mut embs = self.embed_crops(&crops)?.into_iter();
        Ok(dets.into_iter().map(|det| Face { det, embedding: embs.next() }).collect())
    }

    /// Detection and the aligned crops of the first `max_embed` faces, without recognition,
    /// so that callers can recognise the crops of many images in one batch.
    pub fn detect_and_crop(
        &mut self,
        rgb: &[u8],
        w: usize,
        h: usize,
        max_num: usize,
        max_embed: usize,
    ) -> Result<(Vec<Detection>, Vec<Vec<u8>>)> {
        let dets = self.detector.detect(rgb, w, h, max_num, self.choice)?;
        let s = self.recognizer.input_size;
        let mut crops = Vec::new();
        for d in dets.iter().take(max_embed) {
            let kps = d.kps.as_ref().ok_or_else(|| {
                err::input("the detector has no key points (6/10-output layout): alignment needs the 5 points")
            })?;
            let (crop, _) = align::norm_crop_u8(rgb, w, h, 3, kps, s, WarpKernel::default()).map_err(err::internal)?;
            crops.push(crop);
        }
        Ok((dets, crops))
    }
}

/// `[0, 1]` float RGB planes → interleaved `u8` RGB (`round(255·x)`, clamped).
pub use likeness_sdk::image::chw_to_rgb_u8 as to_rgb_u8;

/// The `arcface` metric.
pub struct ArcFaceMetric {
    pub pipeline: Pipeline,
    config: Config,
    /// The recognizer file the ORT session runs (the tch path loads it lazily).
    recognizer_path: PathBuf,
    /// The device the host created the plugin on (the tch path runs there, or on `config.device`).
    device: Device,
    diff: Option<DiffRecognizer>,
    pending: Option<Pending>,
}

impl ArcFaceMetric {
    /// The differentiable recognizer, loaded on first use.
    pub fn diff_recognizer(&mut self) -> Result<&DiffRecognizer> {
        if self.diff.is_none() {
            let kind = match self.config.differentiable_precision {
                DiffPrecision::F32 => Kind::Float,
                DiffPrecision::F64 => Kind::Double,
            };
            // Resolved here, not in `create`: an ORT-only (Eval) user never needs libtorch's CUDA.
            let tch_device = match self.config.device.as_deref() {
                Some("cpu") => tch::Device::Cpu,
                Some("cuda") => likeness_sdk_torch::to_tch_device(Device::cuda(self.device.device_id.max(0)))?,
                _ => likeness_sdk_torch::to_tch_device(self.device)?,
            };
            let r = &self.pipeline.recognizer;
            let d =
                DiffRecognizer::load(&self.recognizer_path, tch_device, kind, r.input_size, r.input_mean, r.input_std)
                    .map_err(|e| err::input(format!("plugin `{ID}` (differentiable path): {e}")))?;
            self.diff = Some(d);
        }
        Ok(self.diff.as_ref().expect("loaded above"))
    }

    /// The chosen face's similarity matrix per image (`None`: no face), from the `u8`-rounded
    /// image, without gradient — the landmarks both paths align with.
    pub fn face_matrices(
        &mut self,
        planes: &[f32],
        b: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<Option<align::Affine>>> {
        let s = self.pipeline.recognizer.input_size;
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let rgb = to_rgb_u8(&planes[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            let dets = self.pipeline.detector.detect(&rgb, w, h, 1, self.pipeline.choice)?;
            out.push(match dets.first() {
                None => None,
                Some(d) => {
                    let kps = d.kps.as_ref().ok_or_else(|| {
                        err::input("the detector has no key points (6/10-output layout): alignment needs the 5 points")
                    })?;
                    Some(align::estimate_norm(kps, s).map_err(err::internal)?)
                }
            });
        }
        Ok(out)
    }

    /// `embed(Train)` on the tch path: the output, and the pending state for `backward`.
    fn embed_train(&mut self, pixels: &TensorView) -> Result<MetricOutput> {
        let leaf = likeness_sdk_torch::view_to_tensor(pixels)?;
        let shape = leaf.size();
        if shape.len() != 4 || shape[1] != 3 {
            return Err(err::input(format!(
                "metric `{ID}`: `pixels` must be [B, 3, H, W] RGB in [0, 1], got {shape:?}"
            )));
        }
        let leaf = leaf.to_kind(Kind::Float).detach().set_requires_grad(true);
        let (b, h, w) = (shape[0] as usize, shape[2] as usize, shape[3] as usize);
        let planes = likeness_sdk_torch::tensor_to_vec_f32(&leaf, &format!("metric `{ID}`: pixels"))?;
        let ms = self.face_matrices(&planes, b, h, w)?;
        let faces: Vec<(usize, align::Affine)> = ms.iter().enumerate().filter_map(|(i, m)| m.map(|m| (i, m))).collect();
        let rows: Vec<i64> = faces.iter().map(|(i, _)| *i as i64).collect();
        let emb = if faces.is_empty() {
            None
        } else {
            let d = self.diff_recognizer()?;
            Some(d.embed_faces(&leaf, &faces).map_err(|e| err::internal(format!("metric `{ID}` (tch path): {e}")))?)
        };
        let dim = match &emb {
            Some(e) => e.size()[1] as usize,
            None => self.pipeline.recognizer.dim.max(1),
        };
        let mut out = vec![0f32; b * dim];
        let mut valid = vec![0u8; b];
        if let Some(e) = &emb {
            let v = likeness_sdk_torch::tensor_to_vec_f32(e, &format!("metric `{ID}`: embeddings"))?;
            for (k, &r) in rows.iter().enumerate() {
                out[r as usize * dim..(r as usize + 1) * dim].copy_from_slice(&v[k * dim..(k + 1) * dim]);
                valid[r as usize] = 1;
            }
        }
        self.pending = Some(Pending { pixels: leaf, rows, emb, dim: dim as i64 });
        Ok(MetricOutput {
            embeddings: CpuTensor::new(vec![b as i64, dim as i64], out).into_managed(),
            valid: CpuTensor::new(vec![b as i64], valid).into_managed(),
        })
    }

    /// `embed` on the ONNX Runtime path (what `Eval` runs).
    fn embed_ort(&mut self, pixels: &TensorView) -> Result<MetricOutput> {
        let x = CpuTensor::<f32>::from_view(pixels, "pixels")?;
        if x.shape.len() != 4 || x.shape[1] != 3 {
            return Err(err::input(format!(
                "metric `{ID}`: `pixels` must be [B, 3, H, W] RGB in [0, 1], got {:?}",
                x.shape
            )));
        }
        let (b, h, w) = (x.shape[0] as usize, x.shape[2] as usize, x.shape[3] as usize);
        // Detect and crop per image, then recognise every crop of the batch in one call.
        let mut crops = Vec::with_capacity(b);
        let mut has_face = Vec::with_capacity(b);
        for i in 0..b {
            let rgb = to_rgb_u8(&x.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            let (_, c) = self.pipeline.detect_and_crop(&rgb, w, h, 1, 1)?;
            has_face.push(!c.is_empty());
            crops.extend(c);
        }
        let mut embs = self.pipeline.embed_crops(&crops)?.into_iter();
        let rows: Vec<Option<Vec<f32>>> = has_face.iter().map(|&f| if f { embs.next() } else { None }).collect();
        let dim = rows.iter().flatten().map(|r| r.len()).next().unwrap_or(self.pipeline.recognizer.dim.max(1));
        let mut emb = vec![0f32; b * dim];
        let mut valid = vec![0u8; b];
        for (i, r) in rows.into_iter().enumerate() {
            if let Some(r) = r {
                emb[i * dim..(i + 1) * dim].copy_from_slice(&r);
                valid[i] = 1;
            }
        }
        Ok(MetricOutput {
            embeddings: CpuTensor::new(vec![b as i64, dim as i64], emb).into_managed(),
            valid: CpuTensor::new(vec![b as i64], valid).into_managed(),
        })
    }
}

impl MetricPlugin for ArcFaceMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("InsightFace ArcFace identity embedding (SCRFD detection, 5-point alignment, ArcFace recognizer; insightface 0.7.3 pipeline on ONNX Runtime; differentiable through the recognizer rebuilt in libtorch)")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(schema())
            .onnxruntime(likeness_sdk_onnx::ONNXRUNTIME_EXPECTED)
            .build()
    }

    fn create(config_json: &str, device: Device, _seed: u64) -> Result<Self> {
        let config: Config = parse_config(ID, config_json)?;
        let pipeline = Pipeline::new(&config, device)?;
        let files = pack::resolve(
            &config.model_name,
            config.model_root.as_deref(),
            config.detector.as_deref(),
            config.recognizer.as_deref(),
        )
        .map_err(|e| err::io(format!("plugin `{ID}`: {e}")))?;
        Ok(ArcFaceMetric { pipeline, config, recognizer_path: files.recognizer, device, diff: None, pending: None })
    }

    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> Result<MetricOutput> {
        if mode == ForwardMode::Train && self.config.differentiable_backend == DiffBackend::Tch {
            self.embed_train(pixels)
        } else {
            self.embed_ort(pixels)
        }
    }

    fn backward(&mut self, d_embeddings: &TensorView) -> Result<likeness_sdk::abi::ManagedTensor> {
        if self.config.differentiable_backend == DiffBackend::None {
            return Err(err::unsupported(format!(
                "metric `{ID}`: differentiable_backend is \"none\" (use \"tch\" for gradients)"
            )));
        }
        let Some(p) = self.pending.as_ref() else {
            return Err(PluginError::new(
                ErrorCode::NoPendingForward,
                format!("metric `{ID}`: backward without a pending embed(Train) (or called twice)"),
            ));
        };
        let d = likeness_sdk_torch::view_to_tensor(d_embeddings)?;
        let expect = vec![p.batch(), p.dim];
        if d.size() != expect {
            return Err(err::input(format!(
                "metric `{ID}`: `d_embeddings` must have the embeddings' shape {expect:?}, got {:?}",
                d.size()
            )));
        }
        let p = self.pending.take().expect("checked above");
        let dx = p.backward(&d).map_err(|e| err::internal(format!("metric `{ID}`: {e}")))?;
        likeness_sdk_torch::tensor_to_managed(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_config() {
        assert_eq!(Config::default().precision, Precision::Fp32, "fp32 (insightface parity) is the default");
        for (s, p) in [("fp32", Precision::Fp32), ("bf16", Precision::Bf16), ("auto", Precision::Auto)] {
            let c: Config = parse_config(ID, &format!(r#"{{"precision": "{s}"}}"#)).unwrap();
            assert_eq!(c.precision, p);
        }
        let e = parse_config::<Config>(ID, r#"{"precision": "fp16"}"#).unwrap_err();
        assert!(e.message.contains("fp16") && e.message.contains("arcface"), "{}", e.message);
        let enumed = &schema()["properties"]["precision"]["enum"];
        assert_eq!(enumed, &likeness_sdk::serde_json::json!(["fp32", "bf16", "auto"]));
    }
}
