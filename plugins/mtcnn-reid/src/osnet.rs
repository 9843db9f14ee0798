//! torchreid's OSNet (`torchreid/reid/models/osnet.py`, 0.2.5) in tch, eval mode.
//!
//! The layer layout and the state-dict names are torchreid's (`conv1.conv.weight`,
//! `conv2.0.conv2a.conv1.weight`, `conv2.2.0.conv.weight`, `fc.0.weight`, `fc.1.running_var`, …),
//! so a torchreid checkpoint loads by name. BatchNorm uses the running statistics (eps 1e-5,
//! PyTorch's default); the output is the `fc` feature (Linear → BatchNorm1d → ReLU, 512-d), what
//! `model.eval()(x)` returns. The identity `classifier.*` is accepted in a checkpoint and ignored.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::ReidError;

/// The two supported widths (`osnet_x1_0`, `osnet_x0_25`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum Arch {
    #[serde(rename = "osnet_x1_0")]
    X1_0,
    #[serde(rename = "osnet_x0_25")]
    X0_25,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::X1_0 => "osnet_x1_0",
            Arch::X0_25 => "osnet_x0_25",
        }
    }
    /// torchreid's `channels` argument.
    pub fn channels(self) -> [i64; 4] {
        match self {
            Arch::X1_0 => [64, 256, 384, 512],
            Arch::X0_25 => [16, 64, 96, 128],
        }
    }
}

/// torchreid's `feature_dim`.
pub const FEATURE_DIM: i64 = 512;
/// Input size torchreid's models are trained at (height, width).
pub const INPUT_HW: (i64, i64) = (256, 128);
/// ImageNet normalisation (torchreid's FeatureExtractor defaults).
pub const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const STD: [f64; 3] = [0.229, 0.224, 0.225];
const BN_EPS: f64 = 1e-5;

/// Every tensor the model needs, with its shape, in torchreid's `state_dict()` order.
pub fn expected_tensors(arch: Arch) -> Vec<(String, Vec<i64>)> {
    let c = arch.channels();
    let mut v = Vec::new();
    let bn = |v: &mut Vec<(String, Vec<i64>)>, p: &str, n: i64| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            v.push((format!("{p}.{s}"), vec![n]));
        }
    };
    let conv = |v: &mut Vec<(String, Vec<i64>)>, p: &str, o: i64, i: i64, k: i64| {
        v.push((format!("{p}.conv.weight"), vec![o, i, k, k]));
        bn(v, &format!("{p}.bn"), o);
    };
    let light = |v: &mut Vec<(String, Vec<i64>)>, p: &str, m: i64| {
        v.push((format!("{p}.conv1.weight"), vec![m, m, 1, 1]));
        v.push((format!("{p}.conv2.weight"), vec![m, 1, 3, 3]));
        bn(v, &format!("{p}.bn"), m);
    };
    let block = |v: &mut Vec<(String, Vec<i64>)>, p: &str, i: i64, o: i64| {
        let m = o / 4;
        conv(v, &format!("{p}.conv1"), m, i, 1);
        light(v, &format!("{p}.conv2a"), m);
        for (name, n) in [("conv2b", 2), ("conv2c", 3), ("conv2d", 4)] {
            for k in 0..n {
                light(v, &format!("{p}.{name}.{k}"), m);
            }
        }
        let r = m / 16;
        v.push((format!("{p}.gate.fc1.weight"), vec![r, m, 1, 1]));
        v.push((format!("{p}.gate.fc1.bias"), vec![r]));
        v.push((format!("{p}.gate.fc2.weight"), vec![m, r, 1, 1]));
        v.push((format!("{p}.gate.fc2.bias"), vec![m]));
        conv(v, &format!("{p}.conv3"), o, m, 1);
        if i != o {
            conv(v, &format!("{p}.downsample"), o, i, 1);
        }
    };
    conv(&mut v, "conv1", c[0], 3, 7);
    for (stage, reduce) in [(2usize, true), (3, true), (4, false)] {
        let (i, o) = (c[stage - 2], c[stage - 1]);
        block(&mut v, &format!("conv{stage}.0"), i, o);
        block(&mut v, &format!("conv{stage}.1"), o, o);
        if reduce {
            conv(&mut v, &format!("conv{stage}.2.0"), o, o, 1);
        }
    }
    conv(&mut v, "conv5", c[3], c[3], 1);
    v.push(("fc.0.weight".into(), vec![FEATURE_DIM, c[3]]));
    v.push(("fc.0.bias".into(), vec![FEATURE_DIM]));
    bn(&mut v, "fc.1", FEATURE_DIM);
    v
}

/// The model: named tensors, checked against [`expected_tensors`].
pub struct OsNet {
    pub arch: Arch,
    params: BTreeMap<String, Tensor>,
}

/// Reads every tensor of a checkpoint: `.safetensors`, or torchreid's `torch.save` files
/// (`.pth`, `.pth.tar`, `.pt`), whose tensors may sit under `state_dict.` (torchreid's
/// `save_checkpoint`) and carry DataParallel's `module.` prefix; both are stripped.
pub fn read_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>, ReidError> {
    let file = path.display().to_string();
    let bad = |msg: String| ReidError::Checkpoint { file: file.clone(), msg };
    let raw: Vec<(String, Tensor)> = if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        // libtorch's own reader: every dtype (the SDK's reader has no f64/i64 BatchNorm counters).
        Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?
    } else {
        likeness_sdk_torch::load_torch_checkpoint(path).map_err(|e| bad(e.message.to_string()))?
    };
    Ok(raw
        .into_iter()
        .map(|(n, t)| {
            let n = n.strip_prefix("state_dict.").unwrap_or(&n);
            let n = n.strip_prefix("module.").unwrap_or(n);
            (n.to_string(), t)
        })
        .collect())
}

impl OsNet {
    /// Builds the model from named tensors; every missing, unexpected or wrong-shaped tensor is
    /// reported by name (`file` names the source in the message). `classifier.*` (the training
    /// head) and BatchNorm's `num_batches_tracked` are ignored.
    pub fn from_tensors(arch: Arch, tensors: Vec<(String, Tensor)>, file: &str) -> Result<Self, ReidError> {
        let expected = expected_tensors(arch);
        let mut given: BTreeMap<String, Tensor> = tensors
            .into_iter()
            .filter(|(n, _)| !n.starts_with("classifier.") && !n.ends_with(".num_batches_tracked"))
            .collect();
        let (mut missing, mut shapes, mut params) = (Vec::new(), Vec::new(), BTreeMap::new());
        for (name, shape) in &expected {
            match given.remove(name) {
                None => missing.push(name.clone()),
                Some(t) if t.size() != *shape => shapes.push(format!("`{name}` is {:?}, expected {shape:?}", t.size())),
                Some(t) => {
                    params.insert(name.clone(), t.to_kind(Kind::Float).detach());
                }
            }
        }
        let unexpected: Vec<String> = given.into_keys().collect();
        if !missing.is_empty() || !shapes.is_empty() || !unexpected.is_empty() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!("missing tensors: {}", missing.join(", ")));
            }
            if !shapes.is_empty() {
                parts.push(format!("wrong shapes: {}", shapes.join("; ")));
            }
            if !unexpected.is_empty() {
                parts.push(format!("unexpected tensors: {}", unexpected.join(", ")));
            }
            return Err(ReidError::Checkpoint {
                file: file.to_string(),
                msg: format!(
                    "not a torchreid {} state dict ({}); check `arch` matches the checkpoint",
                    arch.name(),
                    parts.join("; ")
                ),
            });
        }
        Ok(OsNet { arch, params })
    }

    /// Loads a checkpoint file (see [`read_checkpoint`]).
    pub fn load(arch: Arch, path: &Path) -> Result<Self, ReidError> {
        Self::from_tensors(arch, read_checkpoint(path)?, &path.display().to_string())
    }

    /// Moves/casts every parameter (f64 for the finite-difference checks, CUDA for training).
    pub fn to(&self, device: tch::Device, kind: Kind) -> Self {
        let params = self.params.iter().map(|(n, t)| (n.clone(), t.to_device(device).to_kind(kind))).collect();
        OsNet { arch: self.arch, params }
    }

    fn p(&self, name: &str) -> &Tensor {
        // Every name used by `forward` is in `expected_tensors`, checked at load.
        &self.params[name]
    }

    fn bn(&self, x: &Tensor, p: &str) -> Tensor {
        x.batch_norm(
            Some(self.p(&format!("{p}.weight"))),
            Some(self.p(&format!("{p}.bias"))),
            Some(self.p(&format!("{p}.running_mean"))),
            Some(self.p(&format!("{p}.running_var"))),
            false,
            0.1,
            BN_EPS,
            false,
        )
    }

    /// ConvLayer / Conv1x1 / Conv3x3 (`relu`) and Conv1x1Linear (no relu).
    fn conv_bn(&self, x: &Tensor, p: &str, stride: i64, pad: i64, relu: bool) -> Tensor {
        let y = x.conv2d(self.p(&format!("{p}.conv.weight")), None::<Tensor>, [stride, stride], [pad, pad], [1, 1], 1);
        let y = self.bn(&y, &format!("{p}.bn"));
        if relu {
            y.relu()
        } else {
            y
        }
    }

    fn light(&self, x: &Tensor, p: &str) -> Tensor {
        let y = x.conv2d(self.p(&format!("{p}.conv1.weight")), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let groups = y.size()[1];
        let y = y.conv2d(self.p(&format!("{p}.conv2.weight")), None::<Tensor>, [1, 1], [1, 1], [1, 1], groups);
        self.bn(&y, &format!("{p}.bn")).relu()
    }

    fn gate(&self, x: &Tensor, p: &str) -> Tensor {
        let g = x.adaptive_avg_pool2d([1, 1]);
        let g = g.conv2d(
            self.p(&format!("{p}.fc1.weight")),
            Some(self.p(&format!("{p}.fc1.bias"))),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        let g = g.relu();
        let g = g.conv2d(
            self.p(&format!("{p}.fc2.weight")),
            Some(self.p(&format!("{p}.fc2.bias"))),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        x * g.sigmoid()
    }

    fn block(&self, x: &Tensor, p: &str) -> Tensor {
        let x1 = self.conv_bn(x, &format!("{p}.conv1"), 1, 0, true);
        let chain = |name: &str, n: usize| {
            let mut y = x1.shallow_clone();
            for k in 0..n {
                y = self.light(&y, &format!("{p}.{name}.{k}"));
            }
            y
        };
        let x2a = self.light(&x1, &format!("{p}.conv2a"));
        let (x2b, x2c, x2d) = (chain("conv2b", 2), chain("conv2c", 3), chain("conv2d", 4));
        // One shared gate module applied to the four streams, summed in torchreid's order.
        let g = format!("{p}.gate");
        let x2 = self.gate(&x2a, &g) + self.gate(&x2b, &g) + self.gate(&x2c, &g) + self.gate(&x2d, &g);
        let x3 = self.conv_bn(&x2, &format!("{p}.conv3"), 1, 0, false);
        let down = format!("{p}.downsample.conv.weight");
        let identity = if self.params.contains_key(&down) {
            self.conv_bn(x, &format!("{p}.downsample"), 1, 0, false)
        } else {
            x.shallow_clone()
        };
        (x3 + identity).relu()
    }

    /// `[B, 3, H, W]` ImageNet-normalised images → `[B, 512]` features (torchreid's eval output,
    /// not L2-normalised). Works at any size ≥ 32×32; torchreid's models are trained at 256×128.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.conv_bn(x, "conv1", 2, 3, true);
        x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for (stage, reduce) in [(2, true), (3, true), (4, false)] {
            x = self.block(&x, &format!("conv{stage}.0"));
            x = self.block(&x, &format!("conv{stage}.1"));
            if reduce {
                x = self.conv_bn(&x, &format!("conv{stage}.2.0"), 1, 0, true);
                x = x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
            }
        }
        x = self.conv_bn(&x, "conv5", 1, 0, true);
        let v = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        let v = v.linear(self.p("fc.0.weight"), Some(self.p("fc.0.bias")));
        self.bn(&v, "fc.1").relu()
    }

    /// `[0, 1]` RGB → ImageNet-normalised (torchreid's `Normalize(mean, std)` after `ToTensor`).
    pub fn normalize(x: &Tensor) -> Tensor {
        let (dev, kind) = (x.device(), x.kind());
        let mean = Tensor::from_slice(&MEAN).to_kind(kind).to_device(dev).reshape([1, 3, 1, 1]);
        let std = Tensor::from_slice(&STD).to_kind(kind).to_device(dev).reshape([1, 3, 1, 1]);
        (x - mean) / std
    }
}
