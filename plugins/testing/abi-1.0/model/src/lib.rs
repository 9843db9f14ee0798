//! Test fixture `testing-abi10-model`: a model plugin built against the **frozen ABI-1.0 SDK**
//! (`../sdk`, `../abi`), so that every later host proves it still loads and trains 1.0 plugins.
//!
//! # The model
//! Six parameters, a gain `a_c` and an offset `b_c` per RGB channel:
//! ```text
//! pixels[n, c, y, x] = clamp(a_c · reference[n, c, y, x] + b_c, 0, 1)
//! ```
//! * input `reference`: f32 NCHW `[B, 3, H, W]` RGB in [0, 1] (required);
//! * input `target`: optional; when given it must have the shape of `reference` (it is only
//!   checked: the host's content loss compares `pixels` with it);
//! * output `pixels`: f32 `[B, 3, H, W]`; `internal_loss`: `None`.
//!
//! Initial values from the create seed (a SplitMix64 stream): `a_c = 1 + 0.2·(u − 0.5)`,
//! `b_c = 0.1·(u − 0.5)`.
//!
//! # Backward
//! For `d = dL/dpixels` and `m = 1` where the clamp was inactive (`0 < a·r + b < 1`), else 0
//! (the clamp's derivative; at exactly 0 or 1 it is taken as 0):
//! ```text
//! dL/da_c += Σ_{n,y,x} d · m · reference        dL/db_c += Σ_{n,y,x} d · m
//! ```
//! accumulated in f64. `internal_loss_weight` is ignored (the model has no loss of its own).
//!
//! # Optimizer
//! `torch.optim.AdamW` (foreach = False) after `torch.nn.utils.clip_grad_norm_`:
//! ```text
//! clip = min(1, max_grad_norm / (‖g‖ + 1e-6))  (when max_grad_norm > 0)       g ← clip · g
//! p ← p · (1 − lr · wd)        m ← m + (1 − β1)(g − m)     v ← β2 · v + (1 − β2) · g²
//! p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//! Each update is computed in f64 from the stored values; parameters and moments are
//! *stored* as f32 (like a real f32 model), because the frozen SDK's safetensors helpers write
//! f32 and a resumed run must continue from exactly the saved numbers.
//!
//! # Saved state
//! `dir/model.safetensors`: `a` `[3]`, `b` `[3]`, metadata `likeness.plugin`;
//! `dir/optimizer.safetensors` (with the optimizer): `exp_avg.{a,b}`, `exp_avg_sq.{a,b}`.
//!
//! # Config
//! `{}`: no keys (unknown keys are rejected).

use std::collections::BTreeMap;
use std::path::Path;

use likeness_sdk::st::{self, StTensor};
use likeness_sdk::{
    err, parse_config, CpuTensor, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, Inputs, ModelOutput,
    ModelPlugin, OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, PluginKind, Result, StepReport,
};
use serde::Deserialize;

/// The plugin id users type.
pub const ID: &str = "testing-abi10-model";
/// Weights inside a state directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// AdamW's moments inside a state directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The (empty) config.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

/// What `backward` needs from the last `forward(Train)`.
struct Pending {
    dims: [usize; 4],
    /// `reference` as f64.
    reference: Vec<f64>,
    /// 1 where the clamp was inactive.
    mask: Vec<bool>,
}

pub struct Abi10Model {
    /// `[a_0, a_1, a_2, b_0, b_1, b_2]`.
    params: [f32; 6],
    grads: [f64; 6],
    exp_avg: [f32; 6],
    exp_avg_sq: [f32; 6],
    pending: Option<Pending>,
}

/// SplitMix64 uniform numbers in [0, 1).
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
        return Err(err::input(format!(
            "model `{ID}`: input `{name}` must be f32 NCHW RGB [B, 3, H, W] with B, H, W ≥ 1, got shape {shape:?}"
        )));
    }
    Ok([shape[0] as usize, 3, shape[2] as usize, shape[3] as usize])
}

impl Abi10Model {
    /// `pixels` for `reference` (f64), with the clamp mask.
    fn compute(&self, r: &[f64], dims: [usize; 4]) -> (Vec<f32>, Vec<bool>) {
        let [b, c, h, w] = dims;
        let p = h * w;
        let mut out = Vec::with_capacity(r.len());
        let mut mask = Vec::with_capacity(r.len());
        for n in 0..b {
            for ch in 0..c {
                let (a, o) = (self.params[ch] as f64, self.params[3 + ch] as f64);
                for q in 0..p {
                    let y = a * r[(n * c + ch) * p + q] + o;
                    mask.push(y > 0.0 && y < 1.0);
                    out.push(y.clamp(0.0, 1.0) as f32);
                }
            }
        }
        (out, mask)
    }
}

fn split(v: &[f32; 6]) -> ([f32; 3], [f32; 3]) {
    ([v[0], v[1], v[2]], [v[3], v[4], v[5]])
}

fn read3(tensors: &[StTensor], name: &str, path: &Path) -> Result<[f32; 3]> {
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| err::input(format!("{} has no tensor `{name}`", path.display())))?;
    if t.shape != [3] {
        return Err(err::input(format!("{}: tensor `{name}` has shape {:?}, expected [3]", path.display(), t.shape)));
    }
    let v = t.to_f32()?;
    Ok([v[0], v[1], v[2]])
}

fn join(a: [f32; 3], b: [f32; 3]) -> [f32; 6] {
    [a[0], a[1], a[2], b[0], b[1], b[2]]
}

impl ModelPlugin for Abi10Model {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Model, env!("CARGO_PKG_VERSION"))
            .summary("Test fixture: per-channel affine model built for ABI 1.0")
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .config_schema(likeness_sdk::serde_json::json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {}
            }))
            .build()
    }

    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self> {
        let _: Config = parse_config(ID, config_json)?;
        if device.device_type != DeviceType::Cpu {
            return Err(err::unsupported(format!("model `{ID}` runs on the CPU only, not on {device}")));
        }
        let u = uniform(seed, 6);
        let mut params = [0f32; 6];
        for c in 0..3 {
            params[c] = (1.0 + 0.2 * (u[c] - 0.5)) as f32;
            params[3 + c] = (0.1 * (u[3 + c] - 0.5)) as f32;
        }
        Ok(Abi10Model { params, grads: [0.0; 6], exp_avg: [0.0; 6], exp_avg_sq: [0.0; 6], pending: None })
    }

    fn parameters(&self) -> Result<ParameterInfo> {
        Ok(ParameterInfo { trainable: 6, total: 6 })
    }

    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> Result<ModelOutput> {
        let r = CpuTensor::<f32>::from_view(inputs.get("reference")?, "reference")?;
        let dims = dims_of("reference", &r.shape)?;
        if let Some(t) = inputs.try_get("target") {
            // SAFETY: the view is valid for this call.
            let shape = unsafe { t.shape() }.to_vec();
            if shape != r.shape {
                return Err(err::input(format!(
                    "model `{ID}`: input `target` has shape {shape:?} but `reference` has {:?}",
                    r.shape
                )));
            }
        }
        let reference: Vec<f64> = r.data.iter().map(|&v| v as f64).collect();
        let (pixels, mask) = self.compute(&reference, dims);
        if mode == ForwardMode::Train {
            self.pending = Some(Pending { dims, reference, mask });
        }
        Ok(ModelOutput {
            outputs: vec![("pixels".to_string(), CpuTensor::new(r.shape.clone(), pixels).into_managed())],
            internal_loss: None,
        })
    }

    fn backward(&mut self, grads: Inputs<'_>, _internal_loss_weight: f64) -> Result<()> {
        for name in grads.names() {
            if name != "pixels" {
                return Err(err::input(format!("model `{ID}` has no output `{name}` (it produces `pixels`)")));
            }
        }
        let pending = self.pending.take().ok_or_else(|| {
            PluginError::new(
                ErrorCode::NoPendingForward,
                format!("model `{ID}`: backward without a pending forward(Train)"),
            )
        })?;
        let Some(view) = grads.try_get("pixels") else { return Ok(()) };
        let d = CpuTensor::<f32>::from_view(view, "pixels")?;
        let [b, c, h, w] = pending.dims;
        if d.shape != [b as i64, c as i64, h as i64, w as i64] {
            return Err(err::input(format!(
                "model `{ID}`: gradient of `pixels` has shape {:?}, expected {:?}",
                d.shape, pending.dims
            )));
        }
        let p = h * w;
        for n in 0..b {
            for ch in 0..c {
                let (mut ga, mut gb) = (0.0, 0.0);
                for q in 0..p {
                    let i = (n * c + ch) * p + q;
                    if pending.mask[i] {
                        let g = d.data[i] as f64;
                        ga += g * pending.reference[i];
                        gb += g;
                    }
                }
                self.grads[ch] += ga;
                self.grads[3 + ch] += gb;
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
        let bc1 = 1.0 - s.beta1.powi(s.step as i32);
        let bc2 = 1.0 - s.beta2.powi(s.step as i32);
        let step_size = s.lr / bc1;
        for i in 0..6 {
            let g = self.grads[i] * clip;
            let mut p = self.params[i] as f64;
            p *= 1.0 - s.lr * s.weight_decay;
            let mut m = self.exp_avg[i] as f64;
            m += (1.0 - s.beta1) * (g - m);
            let v = s.beta2 * self.exp_avg_sq[i] as f64 + (1.0 - s.beta2) * g * g;
            let denom = v.sqrt() / bc2.sqrt() + s.eps;
            p -= step_size * m / denom;
            self.params[i] = p as f32;
            self.exp_avg[i] = m as f32;
            self.exp_avg_sq[i] = v as f32;
        }
        Ok(StepReport { grad_norm: norm })
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grads = [0.0; 6];
        Ok(())
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("likeness.plugin".to_string(), ID.to_string());
        let (a, b) = split(&self.params);
        st::save(
            &dir.join(MODEL_FILE),
            &[StTensor::from_f32("a", &[3], &a), StTensor::from_f32("b", &[3], &b)],
            &meta,
        )?;
        if with_optimizer {
            meta.insert("likeness.optimizer".to_string(), "adamw".to_string());
            let (ma, mb) = split(&self.exp_avg);
            let (va, vb) = split(&self.exp_avg_sq);
            st::save(
                &dir.join(OPTIMIZER_FILE),
                &[
                    StTensor::from_f32("exp_avg.a", &[3], &ma),
                    StTensor::from_f32("exp_avg.b", &[3], &mb),
                    StTensor::from_f32("exp_avg_sq.a", &[3], &va),
                    StTensor::from_f32("exp_avg_sq.b", &[3], &vb),
                ],
                &meta,
            )?;
        }
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(MODEL_FILE);
        let (tensors, meta) = st::load(&path)?;
        if let Some(id) = meta.get("likeness.plugin") {
            if id != ID {
                return Err(err::input(format!("{} was saved by plugin `{id}`, not `{ID}`", path.display())));
            }
        }
        let params = join(read3(&tensors, "a", &path)?, read3(&tensors, "b", &path)?);
        let opt = dir.join(OPTIMIZER_FILE);
        let (m, v) = if opt.exists() {
            let (t, _) = st::load(&opt)?;
            (
                join(read3(&t, "exp_avg.a", &opt)?, read3(&t, "exp_avg.b", &opt)?),
                join(read3(&t, "exp_avg_sq.a", &opt)?, read3(&t, "exp_avg_sq.b", &opt)?),
            )
        } else {
            ([0.0; 6], [0.0; 6])
        };
        self.params = params;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.grads = [0.0; 6];
        self.pending = None;
        Ok(())
    }
}

likeness_sdk::export_model_plugin!(Abi10Model);

#[cfg(test)]
mod tests {
    use super::*;
    use likeness_sdk::abi::NamedView;
    use likeness_sdk::abi_stable::std_types::{RSlice, RStr};

    fn inputs<'a>(views: &'a [NamedView<'a>]) -> Inputs<'a> {
        Inputs::new(RSlice::from_slice(views))
    }

    fn step(n: u64) -> OptimizerStep {
        OptimizerStep { step: n, lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: 1.0 }
    }

    /// For a fixed gradient `d` the loss `L = Σ d · pixels` is linear in the parameters while
    /// the clamp mask is fixed (every pixel here lies in [0.04, 0.93], far from 0 and 1), so
    /// central differences have no truncation error: what is left is cancellation,
    /// ≈ 2⁻⁵² · |L| / h ≈ 2e-16 · 20 / 1e-6 ≈ 4e-9. The bound 1e-7 is 25× that.
    #[test]
    fn backward_matches_finite_differences() {
        let mut m = Abi10Model::create("{}", Device::CPU, 3).unwrap();
        let p = 2 * 3;
        let r: Vec<f32> = uniform(9, 36).iter().map(|&u| (0.1 + 0.7 * u) as f32).collect();
        let d: Vec<f32> = uniform(10, 36).iter().map(|&u| (2.0 * u - 1.0) as f32).collect();
        let shape = vec![2i64, 3, 2, 3];
        let rt = CpuTensor::new(shape.clone(), r.clone());
        let views = [NamedView { name: RStr::from_str("reference"), view: rt.view() }];
        m.forward(inputs(&views), ForwardMode::Train).unwrap();
        let dt = CpuTensor::new(shape, d.clone());
        let g = [NamedView { name: RStr::from_str("pixels"), view: dt.view() }];
        m.backward(inputs(&g), 0.0).unwrap();
        let loss = |params: [f64; 6]| -> f64 {
            r.iter()
                .zip(&d)
                .enumerate()
                .map(|(i, (&x, &g))| {
                    let c = (i / p) % 3;
                    g as f64 * (params[c] * x as f64 + params[3 + c]).clamp(0.0, 1.0)
                })
                .sum()
        };
        let base: [f64; 6] = m.params.map(|v| v as f64);
        for k in 0..6 {
            let h = 1e-6;
            let (mut pp, mut pm) = (base, base);
            pp[k] += h;
            pm[k] -= h;
            let fd = (loss(pp) - loss(pm)) / (2.0 * h);
            assert!((fd - m.grads[k]).abs() < 1e-7, "param {k}: fd {fd} vs analytic {}", m.grads[k]);
        }
        // A second backward has nothing to consume.
        let e = m.backward(inputs(&g), 0.0).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoPendingForward);
    }

    #[test]
    fn adamw_first_step_and_state_round_trip() {
        let mut m = Abi10Model::create("", Device::CPU, 1).unwrap();
        let before = m.params;
        m.grads = [0.5, -0.25, 0.0, 1e-3, 2.0, -1.0];
        let norm = m.grads.iter().map(|g| g * g).sum::<f64>().sqrt();
        let rep = m.optimizer_step(step(1)).unwrap();
        assert!((rep.grad_norm - norm).abs() < 1e-15);
        // First AdamW step: m̂ = g, v̂ = g², so p ← p(1 − lr·wd) − lr · sign(g)·|g|/(|g| + ε).
        for i in 0..6 {
            let g = m.grads[i] * (1.0 / (norm + 1e-6));
            let expect = before[i] as f64 * (1.0 - 1e-4) - 1e-2 * g / (g.abs() + 1e-8);
            assert!((m.params[i] as f64 - expect).abs() < 1e-6, "{i}: {} vs {expect}", m.params[i]);
        }
        let dir = std::env::temp_dir().join(format!("abi10-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        m.save_state(&dir, true).unwrap();
        let mut n = Abi10Model::create("{}", Device::CPU, 99).unwrap();
        n.load_state(&dir).unwrap();
        assert_eq!(n.params, m.params);
        assert_eq!(n.exp_avg, m.exp_avg);
        assert_eq!(n.exp_avg_sq, m.exp_avg_sq);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_config_keys_and_devices_are_refused() {
        assert!(Abi10Model::create(r#"{"image_size": 32}"#, Device::CPU, 0).is_err());
        assert!(Abi10Model::create("{}", Device::cuda(0), 0).is_err());
    }
}
