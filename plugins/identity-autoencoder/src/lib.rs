//! `identity-autoencoder`: seed 000's `SimpleIdentityAutoencoder` as a likeness model plugin.
//!
//! It takes a character's **reference** image and generates another image of the same
//! character through a small identity code. It is the quick, CPU-trainable model of the
//! project: identity-loss training (`model.forward` → metric → loss → `metric.backward` →
//! `model.backward`) works end to end with it in seconds.
//!
//! # Inputs and outputs
//! * input `reference`: f32 NCHW `[B, 3, S, S]`, RGB in [0, 1], `S = image_size`, on any device
//!   (it is copied onto the model's device). Every other input (`target`, …) is ignored.
//! * output `pixels`: f32 NCHW `[B, 3, S, S]` in [0, 1] (a sigmoid), on the model's device.
//! * `internal_loss`: always `None` (the model has no loss of its own; `backward`'s
//!   `internal_loss_weight` is therefore ignored).
//!
//! # Architecture
//! With `c_i = base_channels · 2^i` and `s = image_size / 2^depth`:
//!
//! | stage | layers | parameter names |
//! |---|---|---|
//! | encoder block `i` (0 ≤ i < depth) | conv 3×3, stride 2, padding 1, `c_{i-1} → c_i` (`c_{-1} = 3`) · GroupNorm(8 groups, ε = 1e-5, affine) · SiLU | `encoder.{i}.conv.{weight,bias}`, `encoder.{i}.norm.{weight,bias}` |
//! | identity code | flatten `[B, c_{depth-1}·s·s]` → linear → `[B, latent_dim]` (no activation) | `to_code.{weight,bias}` |
//! | back to a map | linear `latent_dim → c_{depth-1}·s·s` · SiLU · reshape `[B, c_{depth-1}, s, s]` | `from_code.{weight,bias}` |
//! | decoder block `j` (0 ≤ j < depth) | nearest upsample ×2 · conv 3×3, padding 1, `c_{depth-1-j} → c_{max(depth-2-j, 0)}` · GroupNorm(8) · SiLU | `decoder.{j}.conv.…`, `decoder.{j}.norm.…` |
//! | to RGB | conv 3×3, padding 1, `c_0 → 3` · sigmoid | `to_rgb.{weight,bias}` |
//!
//! Weights are laid out as in PyTorch (`conv: [out, in, 3, 3]`, `linear: [out, in]`), and the
//! flatten/reshape are row-major over `(C, H, W)`, so a `torch.nn.Module` with the same names
//! loads `model.safetensors` with `load_state_dict(strict=True)` (the parity oracle,
//! `tests/python/autoencoder_oracle.py`, does exactly that). With the defaults (64 px, 32
//! channels, depth 3, 256-d code) the model has 4,399,075 parameters, all trainable.
//!
//! # Config (JSON, unknown keys rejected)
//! `{"image_size": 64, "base_channels": 32, "depth": 3, "latent_dim": 256}`; every key is
//! optional. `image_size` must be divisible by `2^depth`; `base_channels` by 8 (GroupNorm).
//!
//! # Determinism
//! Parameters are drawn on the CPU under `tch::manual_seed(seed)` (serialised by a process-wide
//! lock) and then moved to the device, so a seed gives the same initial weights on CPU and CUDA.
//!
//! # Saved state
//! `dir/model.safetensors`: every parameter by name, metadata `likeness.plugin` (the id) and
//! `likeness.config` (the config JSON). `dir/optimizer.safetensors` (with the optimizer):
//! AdamW's `exp_avg.<param>` / `exp_avg_sq.<param>`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::{
    err, parse_config, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, Inputs, ModelOutput,
    ModelPlugin, OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, PluginKind, Result, StepReport,
    TensorView,
};
use likeness_sdk_torch::{load_into, save_tensors, tensor_to_managed, to_tch_device, view_to_tensor, AdamW};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The plugin id users type.
pub const PLUGIN_ID: &str = "identity-autoencoder";
/// File holding the weights inside a state directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// File holding AdamW's moments inside a state directory (optional).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Name of the input read by `forward`.
pub const INPUT_REFERENCE: &str = "reference";
/// Name of the output of `forward` (and of the gradient `backward` reads).
pub const OUTPUT_PIXELS: &str = "pixels";
/// GroupNorm groups of every block.
pub const GROUPS: i64 = 8;

/// The config object `create` accepts. See the crate docs for what each field shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Side of the square input and output images, in pixels. Divisible by `2^depth`.
    pub image_size: i64,
    /// Channels of the first encoder block (doubled by each further block). Divisible by 8.
    pub base_channels: i64,
    /// Number of stride-2 encoder blocks (and of ×2 decoder blocks), 1 to 8.
    pub depth: u32,
    /// Size of the identity code.
    pub latent_dim: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config { image_size: 64, base_channels: 32, depth: 3, latent_dim: 256 }
    }
}

impl Config {
    /// Checks the values; the message names the key and the rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(err::config(format!("config of plugin `{PLUGIN_ID}`: {m}")));
        if !(1..=8).contains(&self.depth) {
            return bad(format!("`depth` must be between 1 and 8, got {}", self.depth));
        }
        let stride = 1i64 << self.depth;
        if self.image_size <= 0 || self.image_size % stride != 0 {
            return bad(format!(
                "`image_size` must be a positive multiple of 2^depth = {stride}, got {}",
                self.image_size
            ));
        }
        if self.base_channels <= 0 || self.base_channels % GROUPS != 0 {
            return bad(format!(
                "`base_channels` must be a positive multiple of {GROUPS} (GroupNorm groups), got {}",
                self.base_channels
            ));
        }
        if self.latent_dim <= 0 {
            return bad(format!("`latent_dim` must be positive, got {}", self.latent_dim));
        }
        Ok(())
    }

    /// Channels of encoder block `i`.
    pub fn channels(&self, i: u32) -> i64 {
        self.base_channels << i
    }

    /// Side of the bottleneck feature map.
    pub fn bottleneck_size(&self) -> i64 {
        self.image_size >> self.depth
    }

    /// JSON Schema (draft 2020-12) of the config object.
    pub fn schema() -> serde_json::Value {
        let d = Config::default();
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "identity-autoencoder config",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "image_size": {"type": "integer", "minimum": 2, "default": d.image_size,
                    "description": "side of the square input/output images; divisible by 2^depth"},
                "base_channels": {"type": "integer", "minimum": 8, "multipleOf": 8, "default": d.base_channels,
                    "description": "channels of the first encoder block, doubled per block"},
                "depth": {"type": "integer", "minimum": 1, "maximum": 8, "default": d.depth,
                    "description": "number of stride-2 encoder blocks and x2 decoder blocks"},
                "latent_dim": {"type": "integer", "minimum": 1, "default": d.latent_dim,
                    "description": "size of the identity code"}
            }
        })
    }
}

struct Block {
    conv: nn::Conv2D,
    norm: nn::GroupNorm,
}

impl Block {
    fn new(p: nn::Path<'_>, cin: i64, cout: i64, stride: i64) -> Block {
        let conv = nn::conv2d(&p / "conv", cin, cout, 3, nn::ConvConfig { stride, padding: 1, ..Default::default() });
        let norm = nn::group_norm(&p / "norm", GROUPS, cout, Default::default());
        Block { conv, norm }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.norm.forward(&self.conv.forward(x)).silu()
    }
}

struct Net {
    encoder: Vec<Block>,
    to_code: nn::Linear,
    from_code: nn::Linear,
    decoder: Vec<Block>,
    to_rgb: nn::Conv2D,
    bottleneck: [i64; 3],
}

impl Net {
    fn new(root: nn::Path<'_>, c: &Config) -> Net {
        let d = c.depth;
        let encoder = (0..d)
            .map(|i| {
                let cin = if i == 0 { 3 } else { c.channels(i - 1) };
                Block::new(&root / "encoder" / i, cin, c.channels(i), 2)
            })
            .collect();
        let s = c.bottleneck_size();
        let top = c.channels(d - 1);
        let flat = top * s * s;
        let to_code = nn::linear(&root / "to_code", flat, c.latent_dim, Default::default());
        let from_code = nn::linear(&root / "from_code", c.latent_dim, flat, Default::default());
        let decoder = (0..d)
            .map(|j| {
                let cin = c.channels(d - 1 - j);
                let cout = c.channels((d as i64 - 2 - j as i64).max(0) as u32);
                Block::new(&root / "decoder" / j, cin, cout, 1)
            })
            .collect();
        let to_rgb =
            nn::conv2d(&root / "to_rgb", c.channels(0), 3, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        Net { encoder, to_code, from_code, decoder, to_rgb, bottleneck: [top, s, s] }
    }

    /// `[B, 3, S, S]` in [0, 1] → `[B, 3, S, S]` in [0, 1].
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for b in &self.encoder {
            h = b.forward(&h);
        }
        let code = self.to_code.forward(&h.flatten(1, -1));
        let [c, s, _] = self.bottleneck;
        let mut h = self.from_code.forward(&code).silu().reshape([-1, c, s, s]);
        for b in &self.decoder {
            let (hh, ww) = (h.size()[2], h.size()[3]);
            h = b.forward(&h.upsample_nearest2d([hh * 2, ww * 2], None, None));
        }
        self.to_rgb.forward(&h).sigmoid()
    }
}

/// Serialises `manual_seed` + parameter creation across threads, so that concurrent `create`
/// calls in one process still get the weights their seed promises.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The plugin instance.
pub struct IdentityAutoencoder {
    config: Config,
    device: tch::Device,
    vs: nn::VarStore,
    net: Net,
    opt: AdamW,
    /// `pixels` of the last `forward(Train)`, still attached to its graph.
    pending: Option<Tensor>,
}

impl IdentityAutoencoder {
    /// Creates an instance directly (what `create` does, with a parsed config).
    pub fn new(config: Config, device: Device, seed: u64) -> Result<Self> {
        config.validate()?;
        let device = to_tch_device(device)?;
        let (mut vs, net) = {
            let _lock = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(seed as i64);
            // Drawn on the CPU so that a seed means the same weights on every device.
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let net = Net::new(vs.root(), &config);
            (vs, net)
        };
        if device != tch::Device::Cpu {
            vs.set_device(device);
        }
        let params = sorted_variables(&vs);
        Ok(IdentityAutoencoder { config, device, vs, net, opt: AdamW::new(params), pending: None })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// Every parameter by name (`encoder.0.conv.weight` …), sorted by name. The tensors share
    /// storage with the model.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        sorted_variables(&self.vs)
    }

    /// The accumulated gradient of every parameter, sorted by name; zeros where none was
    /// accumulated yet. Copies.
    pub fn named_gradients(&self) -> Vec<(String, Tensor)> {
        self.named_parameters()
            .into_iter()
            .map(|(n, p)| {
                let g = p.grad();
                let g = if g.defined() { g.detach().copy() } else { p.zeros_like().detach() };
                (n, g)
            })
            .collect()
    }

    /// Runs the network on an owned tensor (no input checks), keeping or not the graph.
    fn run(&self, x: &Tensor, mode: ForwardMode) -> Tensor {
        match mode {
            ForwardMode::Train => self.net.forward(x),
            ForwardMode::Eval => tch::no_grad(|| self.net.forward(x)),
        }
    }

    fn check_image(&self, what: &str, v: &TensorView, batch: Option<i64>) -> Result<()> {
        // SAFETY: views passed to a plugin method are valid for the call.
        let shape = unsafe { v.shape() }.to_vec();
        let s = self.config.image_size;
        if v.dtype != DataType::F32 {
            return Err(err::input(format!("`{what}` must be f32, got {}", v.dtype.name())));
        }
        let ok = shape.len() == 4 && shape[0] >= 1 && shape[1] == 3 && shape[2] == s && shape[3] == s;
        if !ok || batch.is_some_and(|b| b != shape[0]) {
            let b = batch.map(|b| b.to_string()).unwrap_or_else(|| "B".into());
            return Err(err::input(format!(
                "`{what}` must have shape [{b}, 3, {s}, {s}] (NCHW RGB; image_size = {s}), got {shape:?}"
            )));
        }
        Ok(())
    }

    /// A borrowed view copied onto the model's device (waiting for the producer's stream first).
    fn owned(&self, v: &TensorView) -> Result<Tensor> {
        if v.device.device_type == DeviceType::Cuda && v.stream != 0 {
            tch::Cuda::synchronize(v.device.device_id as i64);
        }
        Ok(view_to_tensor(v)?.to_device(self.device).to_kind(Kind::Float))
    }
}

fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    vars.into_iter().collect()
}

fn managed(t: &Tensor) -> Result<ManagedTensor> {
    // A copy: the host may write into what it receives, while the saved graph (sigmoid's
    // backward keeps its output) must stay untouched until `backward`.
    tensor_to_managed(t.detach().copy())
}

/// Reads the metadata of a safetensors file without reading its tensors (8-byte little-endian
/// header length, then a JSON header whose `__metadata__` holds strings).
fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    // The SDK's header reader bounds the header by the file's size before allocating it.
    Ok(likeness_sdk::st::read_header(path)?.metadata)
}

impl ModelPlugin for IdentityAutoencoder {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(PLUGIN_ID, PluginKind::Model, env!("CARGO_PKG_VERSION"))
            .summary("Small identity autoencoder (seed 000): reference image -> identity code -> image of the same character")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(Config::schema())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self> {
        let config: Config = parse_config(PLUGIN_ID, config_json)?;
        IdentityAutoencoder::new(config, device, seed)
    }

    fn parameters(&self) -> Result<ParameterInfo> {
        let total: i64 = self.vs.variables().values().map(|t| t.numel() as i64).sum();
        let trainable: i64 = self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        Ok(ParameterInfo { trainable: trainable as u64, total: total as u64 })
    }

    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> Result<ModelOutput> {
        let view = inputs.get(INPUT_REFERENCE)?;
        self.check_image(INPUT_REFERENCE, view, None)?;
        // A copy even in Train mode: the graph saves its input, the view ends with this call.
        let x = self.owned(view)?;
        let pixels = self.run(&x, mode);
        let out = managed(&pixels)?;
        if mode == ForwardMode::Train {
            self.pending = Some(pixels);
        }
        Ok(ModelOutput { outputs: vec![(OUTPUT_PIXELS.to_string(), out)], internal_loss: None })
    }

    fn backward(&mut self, grads: Inputs<'_>, _internal_loss_weight: f64) -> Result<()> {
        let Some(pixels) = self.pending.as_ref() else {
            return Err(PluginError::new(
                ErrorCode::NoPendingForward,
                format!("`{PLUGIN_ID}`: backward needs a preceding forward in Train mode (each forward(Train) allows one backward)"),
            ));
        };
        for name in grads.names() {
            if name != OUTPUT_PIXELS {
                return Err(err::input(format!(
                    "`{PLUGIN_ID}` has no output `{name}` to take a gradient for (outputs: {OUTPUT_PIXELS})"
                )));
            }
        }
        let grad = match grads.try_get(OUTPUT_PIXELS) {
            Some(v) => {
                self.check_image("grads.pixels", v, Some(pixels.size()[0]))?;
                Some(self.owned(v)?)
            }
            None => None,
        };
        let pixels = self.pending.take().expect("checked above");
        if let Some(g) = grad {
            // d/dθ Σ pixels·g = (dpixels/dθ)ᵀ g: the VJP, accumulated into θ.grad.
            (pixels * g).sum(Kind::Float).backward();
        }
        Ok(())
    }

    fn optimizer_step(&mut self, step: OptimizerStep) -> Result<StepReport> {
        self.opt.step(&step)
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.opt.zero_grad();
        Ok(())
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let config = serde_json::to_string(&self.config).map_err(|e| err::internal(e.to_string()))?;
        let mut meta = BTreeMap::new();
        meta.insert("likeness.plugin".to_string(), PLUGIN_ID.to_string());
        meta.insert("likeness.config".to_string(), config);
        save_tensors(&dir.join(MODEL_FILE), &self.named_parameters(), &meta)?;
        if with_optimizer {
            let mut meta = BTreeMap::new();
            meta.insert("likeness.plugin".to_string(), PLUGIN_ID.to_string());
            meta.insert("likeness.optimizer".to_string(), "adamw".to_string());
            save_tensors(&dir.join(OPTIMIZER_FILE), &self.opt.state(), &meta)?;
        }
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let model = dir.join(MODEL_FILE);
        let meta = read_metadata(&model)?;
        if let Some(id) = meta.get("likeness.plugin") {
            if id != PLUGIN_ID {
                return Err(err::input(format!("{} was saved by plugin `{id}`, not `{PLUGIN_ID}`", model.display())));
            }
        }
        if let Some(json) = meta.get("likeness.config") {
            let saved: Config = serde_json::from_str(json).map_err(|e| {
                err::input(format!("{}: metadata `likeness.config` is not a valid config: {e}", model.display()))
            })?;
            if saved != self.config {
                return Err(err::config(format!(
                    "{} was saved with config {json}, this instance has {}; create the model with the saved config",
                    model.display(),
                    serde_json::to_string(&self.config).unwrap_or_default()
                )));
            }
        }
        load_into(&model, &self.named_parameters())?;
        let opt = dir.join(OPTIMIZER_FILE);
        if opt.exists() {
            load_into(&opt, &self.opt.state())?;
        } else {
            // Weights only: start the moments afresh.
            let _g = tch::no_grad_guard();
            for (_, mut t) in self.opt.state() {
                let _ = t.zero_();
            }
        }
        self.pending = None;
        self.opt.zero_grad();
        Ok(())
    }
}

likeness_sdk::export_model_plugin!(IdentityAutoencoder);
