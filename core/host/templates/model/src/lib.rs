//! `@NAME@`: a likeness model plugin, written by `host plugins new` as a starting point.
//!
//! A model owns its parameters and their optimizer. The host calls `forward(Train)`, chains
//! the losses' gradients of its outputs into `backward`, then `optimizer_step` and
//! `zero_grad`; checkpoints go through `save_state` / `load_state` (a resumed run must continue
//! from exactly the saved numbers).
//!
//! This one is a colour transform of the reference image, twelve parameters:
//! ```text
//! pixels[n, c, y, x] = clamp(Σ_k W[c][k] · reference[n, k, y, x] + b[c], 0, 1)
//! ```
//! It reads the `reference` image and produces `pixels`; the content loss compares them with
//! the `target` image (the bundles layout gives both: `<root>/<bundle>/char_*/img_*`, the first
//! image of a character is its reference). W starts at the identity, b at 0, both plus a little
//! noise from the create seed. Backward, for d = dL/dpixels and m = 1 where the clamp is
//! inactive:
//! ```text
//! dL/dW[c][k] += Σ d[c] · m[c] · reference[k]          dL/db[c] += Σ d[c] · m[c]
//! ```
//! and the optimizer is AdamW after gradient-norm clipping, as `torch.optim.AdamW`.
//! Replace [`transform`] and the backward with your model.

use std::collections::BTreeMap;
use std::path::Path;

use likeness_sdk::interface::ModelSpec;
use likeness_sdk::serde_json::json;
use likeness_sdk::st::{self, StTensor};
use likeness_sdk::{
    err, parse_config, CpuTensor, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, Inputs,
    ModelInterface, ModelOutput, ModelPlugin, OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, PluginKind,
    Result, StepReport,
};
use serde::Deserialize;

/// The id configs name. `plugin.toml` repeats it: after changing it (or the version or the
/// description in Cargo.toml), rebuild and write the manifest again:
/// `host plugins manifest target/release/@LIB@ > plugin.toml`.
pub const ID: &str = "@NAME@";
/// Parameters: W (3×3, row-major) then b (3).
const N: usize = 12;

/// The config (`[model.config]` in a run config); unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Scale of the initial noise on W and b.
    #[serde(default = "default_init_noise")]
    init_noise: f64,
}

fn default_init_noise() -> f64 {
    0.05
}

/// What `backward` needs from the last `forward(Train)`: a copy, never the borrowed view.
struct Pending {
    dims: [usize; 4],
    reference: Vec<f64>,
    /// true where the clamp was inactive.
    mask: Vec<bool>,
}

pub struct Model {
    params: [f32; N],
    grads: [f64; N],
    exp_avg: [f32; N],
    exp_avg_sq: [f32; N],
    pending: Option<Pending>,
}

/// SplitMix64 numbers in [0, 1): initial weights derive from the create seed only, so a run
/// is reproducible.
fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn dims_of(name: &str, shape: &[i64]) -> Result<[usize; 4]> {
    if shape.len() != 4 || shape[1] != 3 || shape.iter().any(|&d| d <= 0) {
        return Err(err::input(format!("model `{ID}`: `{name}` must be f32 [B, 3, H, W] with B, H, W ≥ 1, got {shape:?}")));
    }
    Ok([shape[0] as usize, 3, shape[2] as usize, shape[3] as usize])
}

/// `pixels` for `reference` with parameters `w` (W row-major, then b), and the clamp mask.
fn transform(w: &[f64; N], r: &[f64], dims: [usize; 4]) -> (Vec<f64>, Vec<bool>) {
    let [b, c, h, wd] = dims;
    let p = h * wd;
    let (mut out, mut mask) = (Vec::with_capacity(r.len()), Vec::with_capacity(r.len()));
    for n in 0..b {
        for ch in 0..c {
            for q in 0..p {
                let y = (0..3).map(|k| w[ch * 3 + k] * r[(n * c + k) * p + q]).sum::<f64>() + w[9 + ch];
                mask.push(y > 0.0 && y < 1.0);
                out.push(y.clamp(0.0, 1.0));
            }
        }
    }
    (out, mask)
}

impl Model {
    fn compute(&self, r: &[f64], dims: [usize; 4]) -> (Vec<f64>, Vec<bool>) {
        transform(&self.params.map(|v| v as f64), r, dims)
    }
}

fn read(tensors: &[StTensor], name: &str, path: &Path) -> Result<Vec<f32>> {
    let t = tensors.iter().find(|t| t.name == name).ok_or_else(|| err::input(format!("{} has no tensor `{name}`", path.display())))?;
    let v = t.to_f32()?;
    if v.len() != N {
        return Err(err::input(format!("{}: `{name}` has {} values, expected {N}", path.display(), v.len())));
    }
    Ok(v)
}

impl ModelPlugin for Model {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Model, env!("CARGO_PKG_VERSION"))
            .summary(env!("CARGO_PKG_DESCRIPTION"))
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {"init_noise": {"type": "number", "minimum": 0, "default": 0.05}}
            }))
            .build()
    }

    /// What the model reads and produces (asked before `create`, checked against the dataset).
    fn interface(_config_json: &str) -> Result<ModelInterface> {
        Ok(ModelSpec::new()
            .image("reference", true, "the image to transform")
            .image("target", false, "what the content loss compares `pixels` with")
            .output("pixels", "the transformed image, f32 NCHW RGB in [0, 1]")
            .build())
    }

    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self> {
        let c: Config = parse_config(ID, config_json)?;
        if device.device_type != DeviceType::Cpu {
            return Err(err::unsupported(format!("model `{ID}` runs on the CPU only, not on {device}")));
        }
        let u = uniform(seed, N);
        let mut params = [0f32; N];
        for (i, p) in params.iter_mut().enumerate() {
            let identity = if i < 9 && i % 4 == 0 { 1.0 } else { 0.0 };
            *p = (identity + c.init_noise * (2.0 * u[i] - 1.0)) as f32;
        }
        Ok(Model { params, grads: [0.0; N], exp_avg: [0.0; N], exp_avg_sq: [0.0; N], pending: None })
    }

    fn parameters(&self) -> Result<ParameterInfo> {
        Ok(ParameterInfo { trainable: N as u64, total: N as u64 })
    }

    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> Result<ModelOutput> {
        // `from_view` copies: the borrowed view must not be read after this call.
        let r = CpuTensor::<f32>::from_view(inputs.get("reference")?, "reference")?;
        let dims = dims_of("reference", &r.shape)?;
        let reference: Vec<f64> = r.data.iter().map(|&v| v as f64).collect();
        let (pixels, mask) = self.compute(&reference, dims);
        let pixels: Vec<f32> = pixels.into_iter().map(|v| v as f32).collect();
        if mode == ForwardMode::Train {
            self.pending = Some(Pending { dims, reference, mask });
        }
        Ok(ModelOutput {
            outputs: vec![("pixels".to_string(), CpuTensor::new(r.shape.clone(), pixels).into_managed())],
            internal_loss: None,
        })
    }

    fn backward(&mut self, grads: Inputs<'_>, _internal_loss_weight: f64) -> Result<()> {
        let pending = self.pending.take().ok_or_else(|| {
            PluginError::new(ErrorCode::NoPendingForward, format!("model `{ID}`: backward without a pending forward(Train)"))
        })?;
        let Some(view) = grads.try_get("pixels") else { return Ok(()) };
        let d = CpuTensor::<f32>::from_view(view, "pixels")?;
        let [b, c, h, w] = pending.dims;
        if d.shape != [b as i64, c as i64, h as i64, w as i64] {
            return Err(err::input(format!("model `{ID}`: the gradient of `pixels` is {:?}, expected {:?}", d.shape, pending.dims)));
        }
        let p = h * w;
        for n in 0..b {
            for ch in 0..c {
                for q in (0..p).filter(|&q| pending.mask[(n * c + ch) * p + q]) {
                    let g = d.data[(n * c + ch) * p + q] as f64;
                    for k in 0..3 {
                        self.grads[ch * 3 + k] += g * pending.reference[(n * c + k) * p + q];
                    }
                    self.grads[9 + ch] += g;
                }
            }
        }
        Ok(())
    }

    fn optimizer_step(&mut self, s: OptimizerStep) -> Result<StepReport> {
        if s.step == 0 {
            return Err(err::input("optimizer step numbers start at 1"));
        }
        let norm = self.grads.iter().map(|g| g * g).sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(err::internal(format!("gradient norm is {norm}: the loss diverged (lower the learning rate)")));
        }
        let clip = if s.max_grad_norm > 0.0 { (s.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
        let (bc1, bc2) = (1.0 - s.beta1.powi(s.step as i32), 1.0 - s.beta2.powi(s.step as i32));
        for i in 0..N {
            // Computed in f64 from the stored f32 values, stored as f32: what is saved is
            // exactly what the next step reads, so a resumed run continues bit for bit.
            let g = self.grads[i] * clip;
            let m = self.exp_avg[i] as f64 + (1.0 - s.beta1) * (g - self.exp_avg[i] as f64);
            let v = s.beta2 * self.exp_avg_sq[i] as f64 + (1.0 - s.beta2) * g * g;
            let p = self.params[i] as f64 * (1.0 - s.lr * s.weight_decay);
            self.params[i] = (p - (s.lr / bc1) * m / (v.sqrt() / bc2.sqrt() + s.eps)) as f32;
            self.exp_avg[i] = m as f32;
            self.exp_avg_sq[i] = v as f32;
        }
        Ok(StepReport { grad_norm: norm })
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grads = [0.0; N];
        Ok(())
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("likeness.plugin".to_string(), ID.to_string());
        st::save(&dir.join("model.safetensors"), &[StTensor::from_f32("params", &[N], &self.params)], &meta)?;
        if with_optimizer {
            let tensors =
                [StTensor::from_f32("exp_avg", &[N], &self.exp_avg), StTensor::from_f32("exp_avg_sq", &[N], &self.exp_avg_sq)];
            st::save(&dir.join("optimizer.safetensors"), &tensors, &meta)?;
        }
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("model.safetensors");
        let (tensors, _) = st::load(&path)?;
        self.params.copy_from_slice(&read(&tensors, "params", &path)?);
        let opt = dir.join("optimizer.safetensors");
        if opt.exists() {
            let (t, _) = st::load(&opt)?;
            self.exp_avg.copy_from_slice(&read(&t, "exp_avg", &opt)?);
            self.exp_avg_sq.copy_from_slice(&read(&t, "exp_avg_sq", &opt)?);
        } else {
            (self.exp_avg, self.exp_avg_sq) = ([0.0; N], [0.0; N]);
        }
        self.grads = [0.0; N];
        self.pending = None;
        Ok(())
    }
}

likeness_sdk::export_model_plugin!(Model);

#[cfg(test)]
mod tests {
    use super::*;

    /// With the clamp mask fixed (every pixel here stays inside (0, 1)), L = Σ d · pixels is
    /// linear in the parameters: f64 central differences have only rounding error, ~1e-16 ·
    /// |L| / h ≈ 1e-9, far below the 1e-7 allowed.
    #[test]
    fn backward_matches_finite_differences() {
        use likeness_sdk::abi::NamedView;
        use likeness_sdk::abi_stable::std_types::{RSlice, RStr};
        let mut m = Model::create("{}", Device::CPU, 3).unwrap();
        let dims = [2, 3, 2, 3];
        let r: Vec<f64> = uniform(9, 36).iter().map(|&u| 0.2 + 0.5 * u).collect();
        let d: Vec<f32> = uniform(10, 36).iter().map(|&u| (2.0 * u - 1.0) as f32).collect();
        let (_, mask) = m.compute(&r, dims);
        assert!(mask.iter().all(|&x| x), "the test wants no clamped pixel");
        m.pending = Some(Pending { dims, reference: r.clone(), mask });
        let dt = CpuTensor::new(vec![2, 3, 2, 3], d.clone());
        let views = [NamedView { name: RStr::from_str("pixels"), view: dt.view() }];
        m.backward(Inputs::new(RSlice::from_slice(&views)), 0.0).unwrap();
        let loss = |w: &[f64; N]| -> f64 { transform(w, &r, dims).0.iter().zip(&d).map(|(p, g)| p * *g as f64).sum() };
        let base = m.params.map(|v| v as f64);
        for i in 0..N {
            let h = 1e-6;
            let (mut up, mut down) = (base, base);
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!((fd - m.grads[i]).abs() < 1e-7, "parameter {i}: finite differences {fd}, analytic {}", m.grads[i]);
        }
    }

    #[test]
    fn state_round_trips() {
        let mut m = Model::create("{}", Device::CPU, 1).unwrap();
        m.grads = [0.1; N];
        m.optimizer_step(OptimizerStep { step: 1, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0 })
            .unwrap();
        let dir = std::env::temp_dir().join(format!("{ID}-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        m.save_state(&dir, true).unwrap();
        let mut n = Model::create("{}", Device::CPU, 2).unwrap();
        n.load_state(&dir).unwrap();
        assert_eq!((n.params, n.exp_avg, n.exp_avg_sq), (m.params, m.exp_avg, m.exp_avg_sq));
        std::fs::remove_dir_all(&dir).ok();
    }
}
