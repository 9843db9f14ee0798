//! `@NAME@`: a likeness model plugin in libtorch (tch), written by `host plugins new --torch`
//! as a starting point.
//!
//! A model owns its parameters and their optimizer. The host calls `forward(Train)`, chains
//! the losses' gradients of its outputs into `backward`, then `optimizer_step` and
//! `zero_grad`; checkpoints go through `save_state` / `load_state`.
//!
//! This one is a 1×1 convolution of the reference image (a colour transform, W 3×3 + b):
//! ```text
//! pixels = clamp(conv1x1(reference; W, b), 0, 1)
//! ```
//! W starts at the identity and b at 0, plus a little noise from the create seed. libtorch's
//! autograd does the backward: `forward(Train)` keeps the output, `backward` runs
//! `(pixels · dL/dpixels).sum().backward()`, which accumulates dL/dW and dL/db. The optimizer
//! is the SDK's AdamW (`torch.optim.AdamW` after `clip_grad_norm_`). Replace [`Model::net`]
//! with your network (a `tch::nn` module works the same way: keep its parameters in AdamW).

use std::collections::BTreeMap;
use std::path::Path;

use likeness_sdk::interface::ModelSpec;
use likeness_sdk::serde_json::json;
use likeness_sdk::{
    err, parse_config, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, Inputs, ModelInterface,
    ModelOutput, ModelPlugin, OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, PluginKind, Result,
    StepReport,
};
use likeness_sdk_torch::{load_into, save_tensors, tensor_to_managed, to_tch_device, view_to_tensor, AdamW};
use serde::Deserialize;
use tch::{Kind, Tensor};

/// The id configs name. `plugin.toml` repeats it: after changing it (or the version or the
/// description in Cargo.toml), rebuild and write the manifest again:
/// `host plugins manifest target/release/@LIB@ > plugin.toml`.
pub const ID: &str = "@NAME@";

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

pub struct Model {
    device: tch::Device,
    /// `weight` [3, 3, 1, 1] and `bias` [3], leaf tensors with requires_grad.
    opt: AdamW,
    /// The output of the last `forward(Train)`, with its graph.
    pending: Option<Tensor>,
}

impl Model {
    fn net(&self, x: &Tensor) -> Tensor {
        let p = self.opt.params();
        x.conv2d(&p[0].1, Some(&p[1].1), [1, 1], [0, 0], [1, 1], 1).clamp(0.0, 1.0)
    }
}

impl ModelPlugin for Model {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Model, env!("CARGO_PKG_VERSION"))
            .summary(env!("CARGO_PKG_DESCRIPTION"))
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            // The host refuses to load two libtorch versions into one process: the stamp says which.
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
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
        let device = to_tch_device(device)?;
        // Initial weights derive from the create seed only, so a run is reproducible.
        tch::manual_seed(seed as i64);
        let noise = |shape: &[i64]| (Tensor::rand(shape, (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0) * c.init_noise;
        let weight = (Tensor::eye(3, (Kind::Float, tch::Device::Cpu)).view([3, 3, 1, 1]) + noise(&[3, 3, 1, 1]))
            .to_device(device)
            .set_requires_grad(true);
        let bias = noise(&[3]).to_device(device).set_requires_grad(true);
        let opt = AdamW::new(vec![("weight".into(), weight), ("bias".into(), bias)]);
        Ok(Model { device, opt, pending: None })
    }

    fn parameters(&self) -> Result<ParameterInfo> {
        let n: i64 = self.opt.params().iter().map(|(_, p)| p.numel() as i64).sum();
        Ok(ParameterInfo { trainable: n as u64, total: n as u64 })
    }

    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> Result<ModelOutput> {
        // A copy: the borrowed view must not be read by a later backward.
        let x = view_to_tensor(inputs.get("reference")?)?.to_kind(Kind::Float).to_device(self.device);
        if x.dim() != 4 || x.size()[1] != 3 {
            return Err(err::input(format!("model `{ID}`: `reference` must be [B, 3, H, W], got {:?}", x.size())));
        }
        let y = if mode == ForwardMode::Train {
            let y = self.net(&x);
            self.pending = Some(y.shallow_clone());
            y
        } else {
            let _no_grad = tch::no_grad_guard();
            self.net(&x)
        };
        Ok(ModelOutput { outputs: vec![("pixels".to_string(), tensor_to_managed(y)?)], internal_loss: None })
    }

    fn backward(&mut self, grads: Inputs<'_>, _internal_loss_weight: f64) -> Result<()> {
        let y = self.pending.take().ok_or_else(|| {
            PluginError::new(ErrorCode::NoPendingForward, format!("model `{ID}`: backward without a pending forward(Train)"))
        })?;
        let Some(view) = grads.try_get("pixels") else { return Ok(()) };
        let g = view_to_tensor(view)?.to_kind(Kind::Float).to_device(self.device);
        if g.size() != y.size() {
            return Err(err::input(format!("model `{ID}`: the gradient of `pixels` is {:?}, expected {:?}", g.size(), y.size())));
        }
        (y * g).sum(Kind::Float).backward();
        Ok(())
    }

    fn optimizer_step(&mut self, s: OptimizerStep) -> Result<StepReport> {
        self.opt.step(&s)
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.opt.zero_grad();
        Ok(())
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("likeness.plugin".to_string(), ID.to_string());
        let params: Vec<(String, Tensor)> =
            self.opt.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        save_tensors(&dir.join("model.safetensors"), &params, &meta)?;
        if with_optimizer {
            save_tensors(&dir.join("optimizer.safetensors"), &self.opt.state(), &meta)?;
        }
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let params: Vec<(String, Tensor)> =
            self.opt.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        load_into(&dir.join("model.safetensors"), &params)?;
        let opt = dir.join("optimizer.safetensors");
        if opt.exists() {
            load_into(&opt, &self.opt.state())?;
        }
        self.pending = None;
        Ok(())
    }
}

likeness_sdk::export_model_plugin!(Model);
