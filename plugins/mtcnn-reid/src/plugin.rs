//! The `mtcnn-reid` metric plugin (DRIP's face loss).
//!
//! Per image (`pixels` `[B, 3, H, W]` f32 RGB in `[0, 1]`, the SDK's metric convention):
//! 1. **Detection, no gradient**: `round(255·x)` → `u8` → facenet-pytorch's MTCNN
//!    ([`likeness_mtcnn`]); the face with the highest O-Net probability is kept. No face →
//!    `valid = 0`, a zero embedding and a zero gradient.
//! 2. **Crop box** ([`crop_box`]): the face box grown by `margin` (a fraction of its width and
//!    height, on every side; default 0.2, so the crop holds hair, chin and some background as a
//!    re-ID crop of a head does) and then widened or heightened about its centre to OSNet's 2:1
//!    (H:W) input aspect, so the face is not squashed. The box is a constant (held fixed).
//! 3. **Differentiable crop** ([`crop`]): bilinear `grid_sample` (align_corners = false, zero
//!    padding: outside the image reads black) of the box onto 256×128 output-pixel centres; the
//!    gradient flows to the pixels. No antialiasing: a large box is sampled, not averaged.
//! 4. ImageNet normalisation → OSNet ([`crate::osnet`]) → the 512-d `fc` feature → L2-normalised.
//!
//! `backward(d_embeddings)` is the VJP through the normalisation, OSNet and the crop by autograd;
//! `backward_scaled` is the SDK's default (scales that result). No same-person threshold is
//! declared: re-ID features of an arbitrary checkpoint have no calibrated one (`-2`, "none").

use std::path::PathBuf;

use likeness_mtcnn::{Face, Mtcnn, MtcnnConfig, MtcnnError};
use likeness_sdk::{
    err, parse_config, CpuTensor, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode,
    MetricInterface, MetricOutput, MetricPlugin, PluginDescriptor, PluginError, PluginKind, Result, TensorView,
};
use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::osnet::{expected_tensors, Arch, OsNet, FEATURE_DIM, INPUT_HW};
use crate::ReidError;

pub const ID: &str = "mtcnn-reid";
pub const DIM: usize = FEATURE_DIM as usize;
pub const DEFAULT_MARGIN: f64 = 0.2;

fn default_arch() -> Arch {
    Arch::X1_0
}
fn default_margin() -> f64 {
    DEFAULT_MARGIN
}

/// The plugin's config (JSON).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_arch")]
    pub arch: Arch,
    /// torchreid checkpoint (`.pth`, `.pth.tar`, `.safetensors`).
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// Tests only: without `weights`, a seeded random OSNet.
    #[serde(default)]
    pub allow_random_weights: bool,
    /// facenet-pytorch's `pnet.pt`, `rnet.pt`, `onet.pt` folder (default: the set-up's).
    #[serde(default)]
    pub mtcnn_weights: Option<PathBuf>,
    #[serde(default = "default_margin")]
    pub margin: f64,
}

fn schema() -> likeness_sdk::serde_json::Value {
    likeness_sdk::serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "arch": {"type": "string", "enum": ["osnet_x1_0", "osnet_x0_25"], "default": "osnet_x1_0"},
            "weights": {"type": "string"},
            "allow_random_weights": {"type": "boolean", "default": false},
            "mtcnn_weights": {"type": "string"},
            "margin": {"type": "number", "minimum": 0, "default": DEFAULT_MARGIN}
        }
    })
}

fn parse(config_json: &str) -> Result<Config> {
    let c: Config = parse_config(ID, config_json)?;
    if !(c.margin.is_finite() && (0.0..=4.0).contains(&c.margin)) {
        return Err(ReidError::Config {
            field: "margin",
            msg: format!("{} is not in [0, 4] (a fraction of the face box added on every side; default 0.2)", c.margin),
        }
        .into());
    }
    if c.weights.is_none() && !c.allow_random_weights {
        return Err(ReidError::Config {
            field: "weights",
            msg: format!(
                "is required: the path of a torchreid {} checkpoint (.pth / .pth.tar / .safetensors), e.g. the \
                 ImageNet or Market-1501 weights from torchreid's model zoo \
                 (https://kaiyangzhou.github.io/deep-person-reid/MODEL_ZOO); a random OSNet is allowed only with \
                 `allow_random_weights = true` (tests)",
                c.arch.name()
            ),
        }
        .into());
    }
    Ok(c)
}

/// A seeded random OSNet (tests only): He-normal convolutions/linear as torchreid's
/// `_init_params`, identity BatchNorm.
pub fn random_osnet(arch: Arch, seed: u64) -> std::result::Result<OsNet, ReidError> {
    tch::manual_seed(seed as i64);
    let tensors = expected_tensors(arch)
        .into_iter()
        .map(|(n, s)| {
            let t = if n.ends_with("running_var") || (n.ends_with(".weight") && s.len() == 1) {
                Tensor::ones(&s[..], (Kind::Float, tch::Device::Cpu))
            } else if s.len() == 1 {
                Tensor::zeros(&s[..], (Kind::Float, tch::Device::Cpu))
            } else {
                let fan_out = s[0] * s[2..].iter().product::<i64>();
                Tensor::randn(&s[..], (Kind::Float, tch::Device::Cpu)) * (2.0 / fan_out as f64).sqrt()
            };
            (n, t)
        })
        .collect();
    OsNet::from_tensors(arch, tensors, "<random init>")
}

/// The crop box `[x1, y1, x2, y2]` (pixel-edge coordinates: pixel k spans [k, k+1]) for a face:
/// the face box grown by `margin`·size on each side, then grown about its centre to height =
/// 2·width (OSNet's 256×128).
pub fn crop_box(face: &Face, margin: f64) -> [f64; 4] {
    let b = face.bbox.map(|v| v as f64);
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    let w = (b[2] - b[0]).max(1.0) * (1.0 + 2.0 * margin);
    let h = (b[3] - b[1]).max(1.0) * (1.0 + 2.0 * margin);
    let aspect = (INPUT_HW.0 as f64) / (INPUT_HW.1 as f64);
    let (w, h) = if h >= aspect * w { (h / aspect, h) } else { (w, aspect * w) };
    [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]
}

/// `[3, H, W]` image → `[3, 256, 128]` bilinear samples of `bx` at the output pixel centres
/// (differentiable in the image; the box is a constant).
pub fn crop(image: &Tensor, bx: &[f64; 4]) -> Tensor {
    let (h, w) = (image.size()[1] as f64, image.size()[2] as f64);
    let (oh, ow) = INPUT_HW;
    // Normalised coordinates with align_corners = false: −1 and +1 are the image's outer edges.
    let xs: Vec<f64> =
        (0..ow).map(|j| 2.0 * (bx[0] + (j as f64 + 0.5) / ow as f64 * (bx[2] - bx[0])) / w - 1.0).collect();
    let ys: Vec<f64> =
        (0..oh).map(|i| 2.0 * (bx[1] + (i as f64 + 0.5) / oh as f64 * (bx[3] - bx[1])) / h - 1.0).collect();
    let (dev, kind) = (image.device(), image.kind());
    let gx = Tensor::from_slice(&xs).reshape([1, ow]).expand([oh, ow], false);
    let gy = Tensor::from_slice(&ys).reshape([oh, 1]).expand([oh, ow], false);
    let grid = Tensor::stack(&[gx, gy], -1).unsqueeze(0).to_kind(kind).to_device(dev);
    // interpolation 0 = bilinear, padding 0 = zeros.
    image.unsqueeze(0).grid_sampler(&grid, 0, 0, false).squeeze_dim(0)
}

/// The `mtcnn-reid` metric.
pub struct ReidMetric {
    pub net: OsNet,
    pub config: Config,
    pub detector: Mtcnn,
    device: tch::Device,
    pending: Option<Pending>,
}

struct Pending {
    pixels: Tensor,
    rows: Vec<i64>,
    emb: Option<Tensor>,
}

impl ReidMetric {
    /// The crop box of each image (`None`: no face), from `[0, 1]` CHW f32 data; no gradient.
    pub fn crop_boxes(&self, data: &[f32], b: usize, h: usize, w: usize) -> Result<Vec<Option<[f64; 4]>>> {
        let _g = tch::no_grad_guard();
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let rgb = likeness_sdk::image::chw_to_rgb_u8(&data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
            let img = Tensor::from_slice(&rgb).reshape([h as i64, w as i64, 3]).to_device(self.device);
            let faces = self.detector.detect(&img).map_err(ReidError::from)?;
            let best = faces.into_iter().max_by(|a, b| a.prob.total_cmp(&b.prob));
            out.push(best.map(|f| crop_box(&f, self.config.margin)));
        }
        Ok(out)
    }

    /// The differentiable part with the boxes held fixed: `[B, 3, H, W]` `[0, 1]` images (any
    /// kind the net was cast to) and one box per row → `[B, 512]` L2-normalised embeddings.
    pub fn embed_boxes(net: &OsNet, pixels: &Tensor, boxes: &[[f64; 4]]) -> Tensor {
        let crops: Vec<Tensor> = boxes.iter().enumerate().map(|(i, bx)| crop(&pixels.get(i as i64), bx)).collect();
        let f = net.forward(&OsNet::normalize(&Tensor::stack(&crops, 0)));
        let n = f.square().sum_dim_intlist(&[1i64][..], true, f.kind()).sqrt();
        f / n
    }

    fn run(&mut self, x: &CpuTensor<f32>, b: usize, h: usize, w: usize, train: bool) -> Result<MetricOutput> {
        let boxes = self.crop_boxes(&x.data, b, h, w)?;
        let leaf = Tensor::from_slice(&x.data)
            .reshape([b as i64, 3, h as i64, w as i64])
            .to_device(self.device)
            .detach()
            .set_requires_grad(train);
        let _g = if train { None } else { Some(tch::no_grad_guard()) };
        let faced: Vec<i64> = (0..b as i64).filter(|&i| boxes[i as usize].is_some()).collect();
        let (mut out, mut valid, mut rows, mut emb) = (vec![0f32; b * DIM], vec![0u8; b], Vec::new(), None);
        if !faced.is_empty() {
            let idx = Tensor::from_slice(&faced).to_device(self.device);
            let sel = leaf.index_select(0, &idx);
            let bx: Vec<[f64; 4]> = faced.iter().map(|&i| boxes[i as usize].expect("faced")).collect();
            let e = Self::embed_boxes(&self.net, &sel, &bx);
            let v = likeness_sdk_torch::tensor_to_vec_f32(&e, &format!("metric `{ID}`: embeddings"))?;
            // A zero feature (every fc unit at its ReLU floor) has no direction: its row is NaN
            // after the normalisation and is reported invalid, with no gradient (`keep`).
            let mut keep = Vec::new();
            for (k, &r) in faced.iter().enumerate() {
                let row = &v[k * DIM..(k + 1) * DIM];
                if row.iter().all(|x| x.is_finite()) {
                    out[r as usize * DIM..(r as usize + 1) * DIM].copy_from_slice(row);
                    valid[r as usize] = 1;
                    keep.push(k as i64);
                    rows.push(r);
                }
            }
            if !keep.is_empty() {
                emb = Some(e.index_select(0, &Tensor::from_slice(&keep).to_device(self.device)));
            }
        }
        if train {
            self.pending = Some(Pending { pixels: leaf, rows, emb });
        }
        Ok(MetricOutput {
            embeddings: CpuTensor::new(vec![b as i64, DIM as i64], out).into_managed(),
            valid: CpuTensor::new(vec![b as i64], valid).into_managed(),
        })
    }
}

impl MetricPlugin for ReidMetric {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Metric, env!("CARGO_PKG_VERSION"))
            .summary("DRIP's face loss: MTCNN detection (no gradient), a differentiable expanded-box crop to 256x128, torchreid's OSNet (osnet_x1_0 / osnet_x0_25) in libtorch; L2-normalised 512-d; no same-person threshold")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(schema())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self> {
        let config = parse(config_json)?;
        let tch_device = likeness_sdk_torch::to_tch_device(device)?;
        let net = match &config.weights {
            Some(p) => OsNet::load(config.arch, p)?,
            None => random_osnet(config.arch, seed)?,
        }
        .to(tch_device, Kind::Float);
        let detector = Mtcnn::load_configured(
            config.mtcnn_weights.as_deref(),
            ID,
            "mtcnn_weights",
            MtcnnConfig::default(),
            tch_device,
        )
        .map_err(|e| match e {
            // The shared message already names this plugin, the key, the folder and the fix.
            MtcnnError::NotConfigured { .. } => likeness_sdk::err::config(e.to_string()),
            e => ReidError::Config { field: "mtcnn_weights", msg: e.to_string() }.into(),
        })?;
        Ok(ReidMetric { net, config, detector, device: tch_device, pending: None })
    }

    fn interface(config_json: &str) -> Result<MetricInterface> {
        let _config = parse(config_json)?;
        // No calibrated same-person threshold for re-ID features (module comment): < −1 = none.
        Ok(MetricInterface { same_person_threshold: -2.0, embeds_texts: false, subject: "face".into() })
    }

    fn embed(&mut self, pixels: &TensorView, mode: ForwardMode) -> Result<MetricOutput> {
        let x = CpuTensor::<f32>::from_view(pixels, "pixels")?;
        if x.shape.len() != 4 || x.shape[1] != 3 {
            return Err(
                ReidError::Input(format!("`pixels` must be [B, 3, H, W] RGB in [0, 1], got {:?}", x.shape)).into()
            );
        }
        let (b, h, w) = (x.shape[0] as usize, x.shape[2] as usize, x.shape[3] as usize);
        if b > 0 && (h < 2 || w < 2) {
            return Err(ReidError::Input(format!("images of {w}×{h} pixels are too small")).into());
        }
        self.run(&x, b, h, w, mode == ForwardMode::Train)
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
            return Err(ReidError::Input(format!(
                "`d_embeddings` must have the embeddings' shape [{batch}, {DIM}], got {:?}",
                d.shape
            ))
            .into());
        }
        let p = self.pending.take().expect("checked above");
        let dx = match &p.emb {
            None => p.pixels.zeros_like().detach(),
            Some(emb) => {
                let g = Tensor::from_slice(&d.data).reshape([batch, DIM as i64]);
                let idx = Tensor::from_slice(&p.rows);
                let g = g.index_select(0, &idx).to_device(emb.device()).to_kind(emb.kind());
                let s = (emb * g).sum(Kind::Float);
                let grads = Tensor::f_run_backward(&[&s], &[&p.pixels], false, false).map_err(ReidError::from)?;
                grads.into_iter().next().ok_or_else(|| err::internal(format!("metric `{ID}`: no gradient")))?
            }
        };
        let shape = dx.size();
        let v = likeness_sdk_torch::tensor_to_vec_f32(&dx, &format!("metric `{ID}`: d_pixels"))?;
        Ok(CpuTensor::new(shape, v).into_managed())
    }
}
