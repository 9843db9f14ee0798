//! `likeness-mtcnn`: MTCNN face detection (P-, R-, O-Net) in tch with facenet-pytorch 2.6.0's
//! weights, numerically facenet-pytorch's `MTCNN(keep_all=True).detect(img, landmarks=True)`.
//!
//! The pipeline (`models/utils/detect_face.py`), with every float step done by the same libtorch
//! op on the same dtype (f32) as the reference, so results agree to the last bit wherever the
//! convolutions do:
//! 1. scale pyramid `m = 12 / min_face_size`, × `factor` while `min(h, w)·scale ≥ 12` (f64, as
//!    Python computes it); each level resampled with `interpolate(mode='area')` =
//!    `adaptive_avg_pool2d` (for `u8` images on the CPU from summed-area tables, bit-identical:
//!    area.rs), normalised `(x − 127.5)·0.0078125`;
//! 2. P-Net → cells with probability ≥ 0.6 → boxes; NMS 0.5 per scale and image, then 0.7
//!    across scales (torchvision's `batched_nms`), box regression, squaring (`rerec`);
//! 3. crops (`pad`: whole pixels clamped to the image, *not* zero-padded) area-resampled to
//!    24×24 → R-Net, probability > 0.7, NMS 0.7, regression, squaring;
//! 4. 48×48 crops → O-Net, probability > 0.7, landmarks, regression, 'Min' NMS 0.7;
//! 5. per image, largest box first (`select_largest=True`) or by probability.
//!
//! Detection runs without gradient.

mod area;
pub mod nets;
pub mod nms;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

pub use nets::Nets;

/// Everything that can go wrong, each naming the file or input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum MtcnnError {
    #[error(
        "MTCNN weights folder {folder}: {msg}; it must hold facenet-pytorch 2.6.0's pnet.pt, rnet.pt and onet.pt \
         (set `mtcnn_weights` to that folder, or run scripts/setup.sh, which unpacks them into \
         $LIKENESS_DATA/reference/facenet_pytorch-2.6.0/facenet_pytorch/data)"
    )]
    MissingWeights { folder: PathBuf, msg: String },
    /// [`Mtcnn::load_configured`] found no weights: names the plugin, its config key, the
    /// folder searched and both fixes.
    #[error(
        "plugin `{plugin}` needs facenet-pytorch's MTCNN weights, but `{key}` {problem}; run scripts/setup.sh \
         (or `python scripts/fetch_reference.py`), which unpacks the wheel's pnet.pt, rnet.pt and onet.pt into \
         $LIKENESS_DATA/{DEFAULT_WEIGHTS_SUBDIR}, or set `{key}` to a folder holding those three files"
    )]
    NotConfigured { plugin: String, key: String, problem: String },
    #[error("MTCNN weights {file}: {msg}")]
    Weights { file: String, msg: String },
    #[error("MTCNN input `{field}`: {msg}")]
    Input { field: String, msg: String },
    #[error("MTCNN: libtorch failed: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, MtcnnError>;

/// One detected face, in the input image's pixel coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Face {
    /// `[x1, y1, x2, y2]` (may reach outside the image, as facenet-pytorch's do).
    pub bbox: [f32; 4],
    /// O-Net's face probability.
    pub prob: f32,
    /// Left eye, right eye, nose, left and right mouth corner: `[x, y]`.
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    /// `(x2 − x1)·(y2 − y1)` in f32, the key facenet-pytorch sorts by.
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// Where one detection's time went, in seconds ([`Mtcnn::detect_profiled`]; summable with `+=`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// Area resampling + normalisation of every pyramid level.
    pub pyramid: f64,
    /// P-Net over the pyramid.
    pub pnet: f64,
    /// Candidate boxes, the two P-Net NMS rounds, regression and squaring.
    pub stage1_boxes: f64,
    /// R-Net's 24×24 and O-Net's 48×48 crops (one area resampling per box).
    pub crops: f64,
    /// R-Net and O-Net.
    pub rnet_onet: f64,
    /// Thresholds, NMS, regression, landmarks after R-Net and O-Net, and the read-back.
    pub stage23_boxes: f64,
}

impl StageTimes {
    pub fn total(&self) -> f64 {
        self.pyramid + self.pnet + self.stage1_boxes + self.crops + self.rnet_onet + self.stage23_boxes
    }
}

impl std::ops::AddAssign for StageTimes {
    fn add_assign(&mut self, o: Self) {
        self.pyramid += o.pyramid;
        self.pnet += o.pnet;
        self.stage1_boxes += o.stage1_boxes;
        self.crops += o.crops;
        self.rnet_onet += o.rnet_onet;
        self.stage23_boxes += o.stage23_boxes;
    }
}

impl std::fmt::Display for StageTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.total();
        let pc = |v: f64| if t > 0.0 { 100.0 * v / t } else { 0.0 };
        write!(
            f,
            "total {t:.3}: pyramid resampling {:.3} ({:.0}%), P-Net {:.3} ({:.0}%), P-Net boxes+NMS {:.3} ({:.0}%), \
             R/O-Net crops {:.3} ({:.0}%), R-Net+O-Net {:.3} ({:.0}%), R/O boxes+NMS {:.3} ({:.0}%)",
            self.pyramid,
            pc(self.pyramid),
            self.pnet,
            pc(self.pnet),
            self.stage1_boxes,
            pc(self.stage1_boxes),
            self.crops,
            pc(self.crops),
            self.rnet_onet,
            pc(self.rnet_onet),
            self.stage23_boxes,
            pc(self.stage23_boxes)
        )
    }
}

/// Adds the seconds since `*t` to `acc` and restarts `*t`.
fn lap(t: &mut std::time::Instant, acc: &mut f64) {
    let now = std::time::Instant::now();
    *acc += (now - *t).as_secs_f64();
    *t = now;
}

/// facenet-pytorch's `MTCNN(...)` detection arguments (defaults = its defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct MtcnnConfig {
    pub min_face_size: f64,
    pub thresholds: [f64; 3],
    pub factor: f64,
    /// Largest box first (facenet-pytorch's default), else by decreasing probability.
    pub select_largest: bool,
}

impl Default for MtcnnConfig {
    fn default() -> Self {
        MtcnnConfig { min_face_size: 20.0, thresholds: [0.6, 0.7, 0.7], factor: 0.709, select_largest: true }
    }
}

/// Where scripts/setup.sh (scripts/fetch_reference.py) unpacks the wheel's weights, under
/// `$LIKENESS_DATA`.
pub const DEFAULT_WEIGHTS_SUBDIR: &str = "reference/facenet_pytorch-2.6.0/facenet_pytorch/data";

/// `$LIKENESS_DATA/reference/facenet_pytorch-2.6.0/facenet_pytorch/data`, where scripts/setup.sh
/// unpacks the wheel's weights, with `LIKENESS_DATA` defaulting as scripts/common.sh does
/// ([`likeness_sdk::venv::likeness_data`]); `None` only when no home folder is known at all.
pub fn default_weights_dir() -> Option<PathBuf> {
    likeness_sdk::venv::likeness_data().map(|d| d.join(DEFAULT_WEIGHTS_SUBDIR))
}

/// Reads one network's state dict from `folder/<net>.pt` (the wheel's legacy torch pickle,
/// read without running code by `likeness_sdk::torch_pickle`, torch's `weights_only`
/// semantics), else from `folder/<net>.safetensors` (the same tensors converted, e.g. by
/// `tests/python/mtcnn_oracle.py --weights-st <folder>`).
fn load_net(folder: &Path, net: &str, expected: &[(&str, &[i64])]) -> Result<nets::Weights> {
    let st = folder.join(format!("{net}.safetensors"));
    let pt = folder.join(format!("{net}.pt"));
    if pt.is_file() {
        let file = pt.display().to_string();
        let sd = likeness_sdk::torch_pickle::load_state_dict(&pt)
            .map_err(|e| MtcnnError::Weights { file: file.clone(), msg: e.to_string() })?;
        let tensors = sd
            .into_iter()
            .map(|(name, t)| pickled_to_tensor(&file, &name, &t).map(|t| (name, t)))
            .collect::<Result<Vec<_>>>()?;
        return nets::Weights::new(&pt, tensors, expected);
    }
    if st.is_file() {
        let tensors = Tensor::read_safetensors(&st)
            .map_err(|e| MtcnnError::Weights { file: st.display().to_string(), msg: e.to_string() })?;
        return nets::Weights::new(&st, tensors, expected);
    }
    Err(MtcnnError::MissingWeights { folder: folder.to_path_buf(), msg: format!("{net}.pt not found") })
}

/// A pickled f32/f64 tensor (row-major little-endian bytes) → a CPU f32 tensor.
fn pickled_to_tensor(file: &str, name: &str, t: &likeness_sdk::torch_pickle::PickledTensor) -> Result<Tensor> {
    use likeness_sdk::torch_pickle::DType;
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let vals: Vec<f32> = match t.dtype {
        DType::F32 => t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F64 => t
            .data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(MtcnnError::Weights {
                file: file.into(),
                msg: format!("tensor `{name}` is {other:?}; MTCNN weights are float32"),
            })
        }
    };
    if vals.len() != shape.iter().product::<i64>() as usize {
        return Err(MtcnnError::Weights {
            file: file.into(),
            msg: format!("tensor `{name}`: {} values for shape {shape:?}", vals.len()),
        });
    }
    Ok(Tensor::from_slice(&vals).reshape(shape))
}

/// The detector.
pub struct Mtcnn {
    nets: Nets,
    pub config: MtcnnConfig,
    device: Device,
}

/// Image batch in `[N, 3, H, W]` f32 0..255 on the nets' device.
struct Batch {
    imgs: Tensor,
    h: i64,
    w: i64,
    /// The same images' summed-area tables (`u8` input on the CPU): the area resampling then
    /// skips libtorch's per-call copy (area.rs; bit-identical). `None`: libtorch resamples.
    sums: Option<area::AreaSums>,
}

impl Batch {
    /// `imgs` `[N, 3, H, W]` f32 and, per image, its planar `u8` pixels when it has them.
    fn new(imgs: Tensor, planar: Vec<Option<Vec<u8>>>) -> Self {
        let (n, h, w) = (imgs.size()[0], imgs.size()[2], imgs.size()[3]);
        let sums = if planar.iter().all(Option::is_some) {
            let px: Vec<u8> = planar.into_iter().flatten().flatten().collect();
            area::AreaSums::new(px, n as usize, h as usize, w as usize)
        } else {
            None
        };
        Batch { imgs, h, w, sums }
    }

    /// `interpolate(mode='area')` of image `img`'s rows `y0..y0+rh`, columns `x0..x0+rw` to
    /// `oh`×`ow` → `[1, 3, oh, ow]`.
    fn area(&self, img: i64, (y0, x0): (i64, i64), (rh, rw): (i64, i64), (oh, ow): (i64, i64)) -> Result<Tensor> {
        match &self.sums {
            Some(s) => {
                let mut v = Vec::with_capacity((3 * oh * ow) as usize);
                let u = |a: i64| a as usize;
                s.resample(u(img), (u(y0), u(x0)), (u(rh), u(rw)), (u(oh), u(ow)), &mut v);
                Ok(Tensor::from_slice(&v).reshape([1, 3, oh, ow]).to_device(self.imgs.device()))
            }
            None => Ok(self
                .imgs
                .get(img)
                .narrow(1, y0, rh)
                .narrow(2, x0, rw)
                .unsqueeze(0)
                .f_adaptive_avg_pool2d([oh, ow])?),
        }
    }
}

impl Mtcnn {
    /// Loads `folder/{pnet,rnet,onet}` (see [`load_net`] for the formats).
    pub fn from_dir(folder: &Path, config: MtcnnConfig, device: Device) -> Result<Self> {
        if !folder.is_dir() {
            return Err(MtcnnError::MissingWeights { folder: folder.to_path_buf(), msg: "no such folder".into() });
        }
        let nets = Nets {
            pnet: load_net(folder, "pnet", nets::PNET)?,
            rnet: load_net(folder, "rnet", nets::RNET)?,
            onet: load_net(folder, "onet", nets::ONET)?,
        };
        let nets = if device == Device::Cpu { nets } else { nets.into_device(device) };
        Ok(Mtcnn { nets, config, device })
    }

    /// The detector of a plugin whose config has an optional weights folder `config_key`: that
    /// folder when given, else [`default_weights_dir`]. Missing weights become
    /// [`MtcnnError::NotConfigured`], one message for every plugin (it names `plugin_id`,
    /// `config_key`, the folder searched and the fix); a file that is there but unreadable keeps
    /// its own [`MtcnnError::Weights`] error, which names the file.
    pub fn load_configured(
        explicit: Option<&Path>,
        plugin_id: &str,
        config_key: &str,
        config: MtcnnConfig,
        device: Device,
    ) -> Result<Self> {
        let not_configured =
            |problem: String| MtcnnError::NotConfigured { plugin: plugin_id.into(), key: config_key.into(), problem };
        let (dir, what) = match (explicit, default_weights_dir()) {
            (Some(d), _) => (d.to_path_buf(), "is".to_string()),
            (None, Some(d)) => (
                d,
                format!(
                    "is not set and the default folder $LIKENESS_DATA/{DEFAULT_WEIGHTS_SUBDIR} ({}) =",
                    likeness_sdk::venv::describe_data_dir()
                ),
            ),
            (None, None) => {
                return Err(not_configured(format!(
                    "is not set and neither LIKENESS_DATA, LIKENESS_HOME, XDG_CACHE_HOME nor HOME is set, so the \
                     default folder $LIKENESS_DATA/{DEFAULT_WEIGHTS_SUBDIR} could not be searched"
                )))
            }
        };
        match Mtcnn::from_dir(&dir, config, device) {
            Err(MtcnnError::MissingWeights { folder, msg }) => {
                Err(not_configured(format!("{what} {} ({msg})", folder.display())))
            }
            other => other,
        }
    }

    /// Faces in one `[H, W, 3]` RGB image (`u8`, or float 0..255), ordered like
    /// facenet-pytorch's `detect` (largest first by default).
    pub fn detect(&self, image: &Tensor) -> Result<Vec<Face>> {
        Ok(self.detect_profiled(image)?.0)
    }

    /// [`Mtcnn::detect`] and where its time went (the stages are timed on every call: a few
    /// clock reads against milliseconds of convolution).
    pub fn detect_profiled(&self, image: &Tensor) -> Result<(Vec<Face>, StageTimes)> {
        let (img, planar) = self.prepare(image, "image")?;
        let b = Batch::new(img.unsqueeze(0), vec![planar]);
        let mut t = StageTimes::default();
        let faces = self.detect_prepared(&b, &mut t)?.pop().unwrap_or_default();
        Ok((faces, t))
    }

    /// [`Mtcnn::detect`] over several images. Images of one size go through the networks as one
    /// batch, as facenet-pytorch batches them (its NMS separates images by coordinate offsets,
    /// which we reproduce); mixed sizes, which facenet-pytorch refuses, run one by one.
    pub fn detect_batch(&self, images: &[Tensor]) -> Result<Vec<Vec<Face>>> {
        let (prepared, planar): (Vec<Tensor>, Vec<Option<Vec<u8>>>) = images
            .iter()
            .enumerate()
            .map(|(i, t)| self.prepare(t, &format!("images[{i}]")))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        if prepared.is_empty() {
            return Ok(vec![]);
        }
        let same = prepared.iter().all(|t| t.size() == prepared[0].size());
        if !same {
            return prepared
                .iter()
                .zip(planar)
                .map(|(t, px)| {
                    let b = Batch::new(t.unsqueeze(0), vec![px]);
                    Ok(self.detect_prepared(&b, &mut StageTimes::default())?.pop().unwrap_or_default())
                })
                .collect();
        }
        self.detect_prepared(&Batch::new(Tensor::stack(&prepared, 0), planar), &mut StageTimes::default())
    }

    /// `[H, W, 3]` → `[3, H, W]` f32 on the device, and the planar `u8` pixels of a `u8` image
    /// on the CPU (for [`area::AreaSums`]).
    fn prepare(&self, image: &Tensor, field: &str) -> Result<(Tensor, Option<Vec<u8>>)> {
        let s = image.size();
        if s.len() != 3 || s[2] != 3 {
            return Err(MtcnnError::Input {
                field: field.into(),
                msg: format!("expected an [H, W, 3] RGB image, got shape {s:?} (convert grey/RGBA to RGB first)"),
            });
        }
        if !matches!(image.kind(), Kind::Uint8 | Kind::Float | Kind::Double) {
            return Err(MtcnnError::Input {
                field: field.into(),
                msg: format!("expected u8 or float 0..255 pixels, got {:?}", image.kind()),
            });
        }
        if s[0] < 1 || s[1] < 1 {
            return Err(MtcnnError::Input { field: field.into(), msg: format!("empty image {s:?}") });
        }
        let chw = image.to_device(self.device).permute([2, 0, 1]);
        let planar = if image.kind() == Kind::Uint8 && self.device == Device::Cpu {
            Some(Vec::<u8>::try_from(&chw.contiguous().flatten(0, -1))?)
        } else {
            None
        };
        Ok((chw.to_kind(Kind::Float).contiguous(), planar))
    }

    /// The scale pyramid (f64, exactly Python's loop).
    pub fn scales(&self, h: i64, w: i64) -> Vec<f64> {
        let m = 12.0 / self.config.min_face_size;
        let mut minl = h.min(w) as f64 * m;
        let mut scale = m;
        let mut out = Vec::new();
        while minl >= 12.0 {
            out.push(scale);
            scale *= self.config.factor;
            minl *= self.config.factor;
        }
        out
    }

    fn detect_prepared(&self, b: &Batch, t: &mut StageTimes) -> Result<Vec<Vec<Face>>> {
        let _g = tch::no_grad_guard();
        let n = b.imgs.size()[0];
        let (boxes, inds) = self.stage1(b, t)?;
        let (boxes, inds) = if boxes.size()[0] > 0 { self.stage2(b, boxes, inds, t)? } else { (boxes, inds) };
        let (boxes, points, inds) = if boxes.size()[0] > 0 {
            self.stage3(b, boxes, inds, t)?
        } else {
            (boxes, Tensor::zeros([0, 5, 2], (Kind::Float, Device::Cpu)), inds)
        };
        let mut clock = std::time::Instant::now();
        let bx = to_f32(&boxes)?;
        let pt = to_f32(&points)?;
        let id = to_i64(&inds)?;
        let mut out: Vec<Vec<Face>> = (0..n).map(|_| Vec::new()).collect();
        for (k, &img) in id.iter().enumerate() {
            let r = &bx[k * 5..k * 5 + 5];
            let p = &pt[k * 10..k * 10 + 10];
            let mut landmarks = [[0f32; 2]; 5];
            for (j, l) in landmarks.iter_mut().enumerate() {
                *l = [p[2 * j], p[2 * j + 1]];
            }
            out[img as usize].push(Face { bbox: [r[0], r[1], r[2], r[3]], prob: r[4], landmarks });
        }
        if self.config.select_largest {
            for faces in &mut out {
                // `np.argsort(area)[::-1]`: ascending, then reversed (ties: see nms::batched_nms_min).
                let mut order: Vec<usize> = (0..faces.len()).collect();
                order.sort_by(|&x, &y| faces[x].area().total_cmp(&faces[y].area()));
                *faces = order.iter().rev().map(|&i| faces[i]).collect();
            }
        }
        lap(&mut clock, &mut t.stage23_boxes);
        Ok(out)
    }

    /// P-Net over the pyramid → `[K, 9]` boxes (x1 y1 x2 y2 score reg×4 after the regression:
    /// only the first 5 columns are used later) and `[K]` image indices, CPU.
    fn stage1(&self, b: &Batch, t: &mut StageTimes) -> Result<(Tensor, Tensor)> {
        let (mut all, mut all_inds, mut picks) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0i64;
        let mut clock = std::time::Instant::now();
        for scale in self.scales(b.h, b.w) {
            // Python: (int(h * scale + 1), int(w * scale + 1)) — f64 truncation.
            let hs = (b.h as f64 * scale + 1.0) as i64;
            let ws = (b.w as f64 * scale + 1.0) as i64;
            let im = match &b.sums {
                Some(_) => {
                    let n = b.imgs.size()[0];
                    let levels = (0..n).map(|i| b.area(i, (0, 0), (b.h, b.w), (hs, ws))).collect::<Result<Vec<_>>>()?;
                    normalise(&Tensor::cat(&levels, 0))
                }
                None => normalise(&b.imgs.f_adaptive_avg_pool2d([hs, ws])?),
            };
            lap(&mut clock, &mut t.pyramid);
            let (reg, probs) = self.nets.pnet(&im);
            lap(&mut clock, &mut t.pnet);
            let (boxes, inds) = generate_bounding_box(&reg, &probs.select(1, 1), scale, self.config.thresholds[0]);
            let pick = nms::batched_nms(&boxes.narrow(1, 0, 4), &boxes.select(1, 4), &inds, 0.5);
            picks.push(pick + offset);
            offset += boxes.size()[0];
            all.push(boxes);
            all_inds.push(inds);
            lap(&mut clock, &mut t.stage1_boxes);
        }
        if all.is_empty() {
            return Ok((
                Tensor::zeros([0, 5], (Kind::Float, Device::Cpu)),
                Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            ));
        }
        let picks = Tensor::cat(&picks, 0);
        let boxes = Tensor::cat(&all, 0).index_select(0, &picks);
        let inds = Tensor::cat(&all_inds, 0).index_select(0, &picks);
        let pick = nms::batched_nms(&boxes.narrow(1, 0, 4), &boxes.select(1, 4), &inds, 0.7);
        let boxes = boxes.index_select(0, &pick);
        let inds = inds.index_select(0, &pick);
        let c = |i: i64| boxes.select(1, i);
        let regw = c(2) - c(0);
        let regh = c(3) - c(1);
        let q1 = c(0) + c(5) * &regw;
        let q2 = c(1) + c(6) * &regh;
        let q3 = c(2) + c(7) * &regw;
        let q4 = c(3) + c(8) * &regh;
        let boxes = rerec(&Tensor::stack(&[q1, q2, q3, q4, c(4)], 1));
        lap(&mut clock, &mut t.stage1_boxes);
        Ok((boxes, inds))
    }

    /// Crops of `boxes` (`pad`) area-resampled to `size`×`size`, normalised; also the kept rows
    /// (facenet-pytorch skips empty crops, which would misalign its arrays; we drop those boxes).
    fn crops(&self, b: &Batch, boxes: &Tensor, inds: &Tensor, size: i64) -> Result<(Tensor, Vec<i64>)> {
        let r = to_i32(&boxes.narrow(1, 0, 4).trunc().to_kind(Kind::Int))?;
        let id = to_i64(inds)?;
        let (mut out, mut kept) = (Vec::new(), Vec::new());
        for (k, &img) in id.iter().enumerate() {
            let (x, y) = (r[4 * k].max(1) as i64, r[4 * k + 1].max(1) as i64);
            let (ex, ey) = ((r[4 * k + 2] as i64).min(b.w), (r[4 * k + 3] as i64).min(b.h));
            if ey > y - 1 && ex > x - 1 {
                out.push(b.area(img, (y - 1, x - 1), (ey - y + 1, ex - x + 1), (size, size))?);
                kept.push(k as i64);
            }
        }
        let data = if out.is_empty() {
            Tensor::zeros([0, 3, size, size], (Kind::Float, self.device))
        } else {
            normalise(&Tensor::cat(&out, 0))
        };
        Ok((data, kept))
    }

    fn stage2(&self, b: &Batch, boxes: Tensor, inds: Tensor, t: &mut StageTimes) -> Result<(Tensor, Tensor)> {
        let mut clock = std::time::Instant::now();
        let (data, kept) = self.crops(b, &boxes, &inds, 24)?;
        let kept = Tensor::from_slice(&kept);
        let (boxes, inds) = (boxes.index_select(0, &kept), inds.index_select(0, &kept));
        lap(&mut clock, &mut t.crops);
        let (reg, prob) = chunked2(&data, |x| self.nets.rnet(x));
        lap(&mut clock, &mut t.rnet_onet);
        let score = prob.select(1, 1).to_device(Device::Cpu);
        let ipass = score.gt(self.config.thresholds[1]).nonzero().squeeze_dim(1);
        let sc = score.index_select(0, &ipass);
        let boxes = Tensor::cat(&[boxes.narrow(1, 0, 4).index_select(0, &ipass), sc.unsqueeze(1)], 1);
        let inds = inds.index_select(0, &ipass);
        let mv = reg.to_device(Device::Cpu).index_select(0, &ipass);
        let pick = nms::batched_nms(&boxes.narrow(1, 0, 4), &boxes.select(1, 4), &inds, 0.7);
        let boxes = bbreg(&boxes.index_select(0, &pick), &mv.index_select(0, &pick));
        let out = (rerec(&boxes), inds.index_select(0, &pick));
        lap(&mut clock, &mut t.stage23_boxes);
        Ok(out)
    }

    fn stage3(&self, b: &Batch, boxes: Tensor, inds: Tensor, t: &mut StageTimes) -> Result<(Tensor, Tensor, Tensor)> {
        let mut clock = std::time::Instant::now();
        let (data, kept) = self.crops(b, &boxes, &inds, 48)?;
        let kept = Tensor::from_slice(&kept);
        let (boxes, inds) = (boxes.index_select(0, &kept), inds.index_select(0, &kept));
        lap(&mut clock, &mut t.crops);
        let (reg, lm, prob) = chunked3(&data, |x| self.nets.onet(x));
        lap(&mut clock, &mut t.rnet_onet);
        let score = prob.select(1, 1).to_device(Device::Cpu);
        let ipass = score.gt(self.config.thresholds[2]).nonzero().squeeze_dim(1);
        let lm = lm.to_device(Device::Cpu).index_select(0, &ipass);
        let sc = score.index_select(0, &ipass);
        let boxes = Tensor::cat(&[boxes.narrow(1, 0, 4).index_select(0, &ipass), sc.unsqueeze(1)], 1);
        let inds = inds.index_select(0, &ipass);
        let mv = reg.to_device(Device::Cpu).index_select(0, &ipass);
        // Landmarks from the pre-regression box: w·p + x1 − 1 (three f32 roundings, in this order).
        let w_i = boxes.select(1, 2) - boxes.select(1, 0) + 1.0;
        let h_i = boxes.select(1, 3) - boxes.select(1, 1) + 1.0;
        let px = w_i.unsqueeze(1) * lm.narrow(1, 0, 5) + boxes.select(1, 0).unsqueeze(1) - 1.0;
        let py = h_i.unsqueeze(1) * lm.narrow(1, 5, 5) + boxes.select(1, 1).unsqueeze(1) - 1.0;
        let points = Tensor::stack(&[px, py], 2); // [K, 5, 2]
        let boxes = bbreg(&boxes, &mv);
        let pick = nms::batched_nms_min(&boxes.narrow(1, 0, 4), &boxes.select(1, 4), &inds, 0.7);
        let out = (boxes.index_select(0, &pick), points.index_select(0, &pick), inds.index_select(0, &pick));
        lap(&mut clock, &mut t.stage23_boxes);
        Ok(out)
    }
}

fn normalise(x: &Tensor) -> Tensor {
    (x - 127.5) * 0.0078125
}

/// facenet-pytorch's `fixed_batch_process`: the networks see at most 512 crops at a time, so
/// the convolutions run on the same batch shapes as the reference's.
fn chunked2(x: &Tensor, f: impl Fn(&Tensor) -> (Tensor, Tensor)) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < n {
        let (p, q) = f(&x.narrow(0, i, (n - i).min(512)));
        a.push(p);
        b.push(q);
        i += 512;
    }
    if a.is_empty() {
        return (Tensor::zeros([0, 4], (Kind::Float, x.device())), Tensor::zeros([0, 2], (Kind::Float, x.device())));
    }
    (Tensor::cat(&a, 0), Tensor::cat(&b, 0))
}

fn chunked3(x: &Tensor, f: impl Fn(&Tensor) -> (Tensor, Tensor, Tensor)) -> (Tensor, Tensor, Tensor) {
    let n = x.size()[0];
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while i < n {
        let (p, q, r) = f(&x.narrow(0, i, (n - i).min(512)));
        a.push(p);
        b.push(q);
        c.push(r);
        i += 512;
    }
    if a.is_empty() {
        let z = |k| Tensor::zeros([0, k], (Kind::Float, x.device()));
        return (z(4), z(10), z(2));
    }
    (Tensor::cat(&a, 0), Tensor::cat(&b, 0), Tensor::cat(&c, 0))
}

/// P-Net cells with probability ≥ `thresh` → `[K, 9]` (x1, y1, x2, y2, score, reg×4), CPU.
fn generate_bounding_box(reg: &Tensor, probs: &Tensor, scale: f64, thresh: f64) -> (Tensor, Tensor) {
    let reg = reg.to_device(Device::Cpu);
    let probs = probs.to_device(Device::Cpu);
    let mask = probs.ge(thresh);
    let mi = mask.nonzero(); // [K, 3]: image, row, column (row-major, as boolean indexing)
    let inds = mi.select(1, 0);
    let score = probs.masked_select(&mask);
    let flat = mask.flatten(0, -1).nonzero().squeeze_dim(1);
    let r = reg.permute([1, 0, 2, 3]).reshape([4, -1]).index_select(1, &flat).transpose(0, 1);
    let bb = mi.narrow(1, 1, 2).to_kind(Kind::Float).flip([1]); // (x, y)
    let q1 = ((&bb * 2.0 + 1.0) / scale).floor();
    let q2 = ((&bb * 2.0 + 12.0 - 1.0 + 1.0) / scale).floor();
    (Tensor::cat(&[q1, q2, score.unsqueeze(1), r], 1), inds)
}

/// Squares each box about its centre on its longer side (in place in the reference: x1, y1
/// first, then x2, y2 from the new corner).
fn rerec(b: &Tensor) -> Tensor {
    let c = |i: i64| b.select(1, i);
    let h = c(3) - c(1);
    let w = c(2) - c(0);
    let l = w.maximum(&h);
    let x1 = c(0) + &w * 0.5 - &l * 0.5;
    let y1 = c(1) + &h * 0.5 - &l * 0.5;
    let x2 = &x1 + &l;
    let y2 = &y1 + &l;
    let mut cols = vec![x1, y1, x2, y2];
    if b.size()[1] > 4 {
        cols.push(b.narrow(1, 4, b.size()[1] - 4));
        let rest = cols.pop().expect("pushed");
        let first = Tensor::stack(&cols, 1);
        return Tensor::cat(&[first, rest], 1);
    }
    Tensor::stack(&cols, 1)
}

/// Box regression with the Caffe +1 widths; keeps the score column.
fn bbreg(b: &Tensor, reg: &Tensor) -> Tensor {
    let c = |i: i64| b.select(1, i);
    let r = |i: i64| reg.select(1, i);
    let w = c(2) - c(0) + 1.0;
    let h = c(3) - c(1) + 1.0;
    let b1 = c(0) + r(0) * &w;
    let b2 = c(1) + r(1) * &h;
    let b3 = c(2) + r(2) * &w;
    let b4 = c(3) + r(3) * &h;
    Tensor::cat(&[Tensor::stack(&[b1, b2, b3, b4], 1), b.narrow(1, 4, b.size()[1] - 4)], 1)
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1))?)
}

fn to_i64(t: &Tensor) -> Result<Vec<i64>> {
    Ok(Vec::<i64>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous().flatten(0, -1))?)
}

fn to_i32(t: &Tensor) -> Result<Vec<i32>> {
    Ok(Vec::<i32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Int).contiguous().flatten(0, -1))?)
}

/// facenet-pytorch's `extract_face` on a tensor image: the box grown by `margin` pixels *of the
/// output* (`margin·(x2 − x1)/(size − margin)`, f32 as numpy computes it), truncated to whole
/// pixels and clamped to the image, cropped, area-resampled to `size`×`size` and truncated to
/// bytes (`.byte()`). Returns `[3, size, size]` f32 holding those whole values 0..255, as
/// `extract_face` returns them (no /255).
pub fn face_crop(image: &Tensor, face: &Face, size: i64, margin: i64) -> Result<Tensor> {
    let s = image.size();
    if s.len() != 3 || s[2] != 3 {
        return Err(MtcnnError::Input {
            field: "image".into(),
            msg: format!("expected an [H, W, 3] RGB image, got shape {s:?}"),
        });
    }
    if size <= margin || size < 1 || margin < 0 {
        return Err(MtcnnError::Input {
            field: "size".into(),
            msg: format!("need 0 ≤ margin < size, got size {size}, margin {margin}"),
        });
    }
    let b = face.bbox;
    let (mf, den) = (margin as f32, (size - margin) as f32);
    let m0 = mf * (b[2] - b[0]) / den;
    let m1 = mf * (b[3] - b[1]) / den;
    let (h, w) = (s[0], s[1]);
    // int(max(v, 0)) / int(min(v, W)): truncation toward zero of the f32 value.
    let x1 = (b[0] - m0 / 2.0).max(0.0) as i64;
    let y1 = (b[1] - m1 / 2.0).max(0.0) as i64;
    let x2 = ((b[2] + m0 / 2.0) as f64).min(w as f64) as i64;
    let y2 = ((b[3] + m1 / 2.0) as f64).min(h as f64) as i64;
    if x2 <= x1 || y2 <= y1 {
        return Err(MtcnnError::Input {
            field: "face.bbox".into(),
            msg: format!("box {b:?} (with margin) has no pixels inside the {w}×{h} image"),
        });
    }
    let _g = tch::no_grad_guard();
    let crop = image.narrow(0, y1, y2 - y1).narrow(1, x1, x2 - x1).permute([2, 0, 1]).unsqueeze(0);
    let out = crop.to_kind(Kind::Float).f_adaptive_avg_pool2d([size, size])?.to_kind(Kind::Uint8);
    Ok(out.squeeze_dim(0).to_kind(Kind::Float))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rerec_squares_about_the_centre() {
        let t = Tensor::from_slice(&[0f32, 0., 10., 20., 0.9]).reshape([1, 5]);
        let r = to_f32(&rerec(&t)).unwrap();
        // 10×20 box squared to 20×20 about its centre (5, 10); the score column is kept.
        assert_eq!(r, vec![-5.0, 0.0, 15.0, 20.0, 0.9]);
    }

    #[test]
    fn missing_folder_names_it_and_the_fix() {
        let e = Mtcnn::from_dir(Path::new("/nonexistent/mtcnn"), MtcnnConfig::default(), Device::Cpu)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            e.contains("/nonexistent/mtcnn") && e.contains("scripts/setup.sh") && e.contains("mtcnn_weights"),
            "{e}"
        );
    }

    #[test]
    fn load_configured_names_plugin_key_folder_and_fix() {
        let e = Mtcnn::load_configured(
            Some(Path::new("/nonexistent/w")),
            "some-plugin",
            "det_weights",
            MtcnnConfig::default(),
            Device::Cpu,
        )
        .err()
        .expect("must fail")
        .to_string();
        for part in [
            "plugin `some-plugin`",
            "`det_weights` is /nonexistent/w (no such folder)",
            "scripts/setup.sh",
            "scripts/fetch_reference.py",
            DEFAULT_WEIGHTS_SUBDIR,
        ] {
            assert!(e.contains(part), "`{part}` missing from: {e}");
        }
        // A folder that exists but lacks the files says which file.
        let dir = std::env::temp_dir();
        let e = Mtcnn::load_configured(Some(&dir), "p", "k", MtcnnConfig::default(), Device::Cpu)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains("pnet.pt not found") && e.contains(&dir.display().to_string()), "{e}");
        // Without an explicit folder the message names the default searched (whether or not
        // LIKENESS_DATA is set in this environment; with the set-up's data it loads).
        match Mtcnn::load_configured(None, "p", "k", MtcnnConfig::default(), Device::Cpu) {
            Ok(_) => assert!(default_weights_dir().is_some_and(|d| d.join("pnet.pt").is_file())),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("`k` is not set") && e.contains(DEFAULT_WEIGHTS_SUBDIR), "{e}");
            }
        }
    }
}
