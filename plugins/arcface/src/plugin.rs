//! The `arcface` metric plugin (ONNX Runtime path): pixels → InsightFace pipeline → embedding.

use std::path::PathBuf;

use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ForwardMode, MetricOutput,
    MetricPlugin, PluginDescriptor, PluginKind, Result, TensorView,
};
use serde::Deserialize;

use crate::align::{self, WarpKernel};
use crate::detector::{Detector, Provider};
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
            "device": {"type": "string", "enum": ["cpu", "cuda"]}
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
            Some(other) => return Err(err::config(format!("config of plugin `{ID}`: device `{other}` is not `cpu` or `cuda`"))),
        };
        if config.det_size == 0 || !config.det_size.is_multiple_of(32) {
            return Err(err::config(format!("config of plugin `{ID}`: det_size {} must be a positive multiple of 32", config.det_size)));
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
        Ok(Pipeline { detector, recognizer, choice: config.face_choice.face_choice() })
    }

    /// Every face (`max_num` 0) or the `max_num` chosen ones, with embeddings for the first
    /// `max_embed`: `FaceAnalysis.get` on an interleaved RGB `u8` image.
    pub fn analyze(&mut self, rgb: &[u8], w: usize, h: usize, max_num: usize, max_embed: usize) -> Result<Vec<Face>> {
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
        let mut embs = self.recognizer.embed(&crops)?.into_iter();
        Ok(dets.into_iter().map(|det| Face { det, embedding: embs.next() }).collect())
    }
}

/// `[0, 1]` float RGB planes → the interleaved `u8` image insightface would have read
/// (`round(255·x)`, clamped).
pub fn to_rgb_u8(planes: &[f32], h: usize, w: usize) -> Vec<u8> {
    let plane = h * w;
    let mut out = vec![0u8; plane * 3];
    for p in 0..plane {
        for c in 0..3 {
            out[p * 3 + c] = (planes[c * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// The `arcface` metric.
pub struct ArcFaceMetric {
    pub pipeline: Pipeline,
}

impl MetricPlugin for ArcFaceMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("InsightFace ArcFace identity embedding (SCRFD detection, 5-point alignment, ArcFace recognizer; insightface 0.7.3 pipeline on ONNX Runtime)")
            .differentiable(false)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(schema())
            .onnxruntime(likeness_sdk_onnx::ONNXRUNTIME_EXPECTED)
            .build()
    }

    fn create(config_json: &str, device: Device, _seed: u64) -> Result<Self> {
        let config: Config = parse_config(ID, config_json)?;
        Ok(ArcFaceMetric { pipeline: Pipeline::new(&config, device)? })
    }

    fn embed(&mut self, pixels: &TensorView, _mode: ForwardMode) -> Result<MetricOutput> {
        let x = CpuTensor::<f32>::from_view(pixels, "pixels")?;
        if x.shape.len() != 4 || x.shape[1] != 3 {
            return Err(err::input(format!("metric `{ID}`: `pixels` must be [B, 3, H, W] RGB in [0, 1], got {:?}", x.shape)));
        }
        let (b, h, w) = (x.shape[0] as usize, x.shape[2] as usize, x.shape[3] as usize);
        let mut rows: Vec<Option<Vec<f32>>> = Vec::with_capacity(b);
        for i in 0..b {
            let rgb = to_rgb_u8(&x.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            let faces = self.pipeline.analyze(&rgb, w, h, 1, 1)?;
            rows.push(faces.into_iter().next().and_then(|f| f.embedding));
        }
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
