//! Test fixture `testing-flow`: a tiny flow-matching "diffusion model" in pure Rust that
//! exercises every ABI 1.1 call, so the trainer can be tested without a real backbone.
//!
//! The mathematics (encodings, velocity, noising, loss, decoding, the exact VJP, Euler
//! sampling, AdamW) is in [`flow`]; the adapter formats in [`export`]. In short:
//! `v̂ = W·x_t + b + P·e_text` per latent pixel, `x_t = (1 − t)·z0 + t·ε`, loss
//! `mean((v̂ − (ε − z0))²)`, output `pixels` = decoded `x̂0 = x_t − t·v̂`.
//!
//! # Interface (ABI 1.1 `interface`)
//! * images: `target` (required; f32 `[B, 3, H, W]` in [0, 1], H and W even), `reference`
//!   (optional; only checked to be `[B, 3, …]`);
//! * texts: `caption` (required unless `use_text = false`, then ignored);
//! * outputs: `pixels` (decoded x̂0, f32 `[B, 3, H, W]`, *not* clamped so gradients stay
//!   exact) and `timesteps` (`[B]` f32, t in [0, 1]); `internal_loss = true`;
//! * encodings: `latents` (source `target`, image, config key `latent_scale`) and
//!   `text_embeddings` (source `caption`, text; only with `use_text`). `forward_batch`
//!   accepts either the source or the encoding under its name (the encoding wins when both
//!   come); the two give bit-identical results;
//! * parameter groups `unet` (`W`, `b`) and `text_encoder` (`P`, only with `use_text`);
//! * adapter formats `kohya`, `diffusers`, `peft`; `can_sample = true`.
//!
//! # Randomness
//! `forward_batch(Train)` draws sample i's `t` and `ε` from `ctx.sample_seeds[i]` only
//! ([`flow::draw`]); missing or mis-sized seeds are an error. `Eval` uses the seeds when
//! given, else `t = 0.5` and the noise of seed 0 for every sample. `sample` uses seed
//! `request.seed + i` for prompt i. Nothing else is random, so a resumed run is
//! bit-identical.
//!
//! # Config (unknown keys rejected)
//! `latent_scale` (number > 0, default 1), `use_text` (default true), `image_size`
//! (optional: inputs must then be that size; also the default size of `sample`),
//! `pretrained` (optional path, unused, must exist: the key every backbone accepts).
//!
//! # Saved state
//! `model.safetensors`: `W` `[3,3]`, `b` `[3]`, `P` `[3,8]` and their initial values
//! `init.W`, `init.b`, `init.P` (so adapter deltas and `adapter_scale` survive a resume), all
//! f64 so that nothing is rounded; metadata `likeness.plugin`, `likeness.config`.
//! `optimizer.safetensors`: `exp_avg.{W,b,P}`, `exp_avg_sq.{W,b,P}` (f64).

use std::collections::HashMap;
use std::path::Path;

use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::{
    err, parse_config, CpuTensor, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, GroupHyper, InputKind,
    Inputs, ModelInterface, ModelOutput, ModelPlugin, ModelSpec, OptimizerStep, ParameterInfo, PluginDescriptor,
    PluginError, PluginKind, Result, SampleRequest, ScaledView, StepContext, StepReport, TensorView, Texts,
};
use serde::{Deserialize, Serialize};

pub mod export;
pub mod flow;

use flow::{C, N_PARAMS, TEXT_DIM};

/// The plugin id users type.
pub const ID: &str = "testing-flow";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Euler steps of `sample` when the request says 0.
pub const DEFAULT_STEPS: u32 = 8;
/// The timestep of an `Eval` forward without seeds.
pub const EVAL_T: f64 = 0.5;

/// The config object `create` and `interface` accept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Latents are `latent_scale · (2·x − 1)` pooled 2×2.
    #[serde(default = "one")]
    pub latent_scale: f64,
    /// Whether the caption conditions the velocity (`P·e_text`).
    #[serde(default = "yes")]
    pub use_text: bool,
    /// When set, images must be `image_size × image_size` (even).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<u32>,
    /// The convention key of every backbone; unused here, but it must name an existing path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl Config {
    pub fn parse(json: &str) -> Result<Config> {
        let c: Config = parse_config(ID, json)?;
        if !(c.latent_scale.is_finite() && c.latent_scale > 0.0) {
            return Err(err::config(format!(
                "config of plugin `{ID}`: latent_scale must be a finite number > 0, got {}",
                c.latent_scale
            )));
        }
        if let Some(s) = c.image_size {
            if s < 2 || s % 2 != 0 {
                return Err(err::config(format!("config of plugin `{ID}`: image_size must be even and ≥ 2, got {s}")));
            }
        }
        if let Some(p) = &c.pretrained {
            if !Path::new(p).exists() {
                return Err(err::config(format!("config of plugin `{ID}`: pretrained = \"{p}\" does not exist")));
            }
        }
        Ok(c)
    }
}

/// The JSON Schema of [`Config`].
pub fn config_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "latent_scale": {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                "description": "latents = latent_scale · (2·x − 1), pooled 2×2 (part of the latent cache key)"},
            "use_text": {"type": "boolean", "default": true,
                "description": "condition the velocity on the caption (requires a `caption` text)"},
            "image_size": {"type": "integer", "minimum": 2, "multipleOf": 2,
                "description": "when set, images must be image_size × image_size; default size of `sample`"},
            "pretrained": {"type": "string",
                "description": "weights path (the key every backbone accepts); unused by this fixture, must exist"}
        }
    })
}

/// The declared interface for a config.
pub fn interface_for(c: &Config) -> ModelInterface {
    let mut s = ModelSpec::new()
        .image("target", true, "the image to learn, f32 [B, 3, H, W] in [0, 1], H and W even (or its `latents`)")
        .image("reference", false, "identity reference image (checked, not used)");
    s = if c.use_text {
        s.text("caption", true, "what the image shows (or its `text_embeddings`)")
    } else {
        s.text("caption", false, "ignored: use_text = false")
    };
    s = s
        .output("pixels", "decoded x̂0, f32 [B, 3, H, W], nominally [0, 1] (not clamped)")
        .output("timesteps", "noise level t per sample, [B] f32 in [0, 1]")
        .internal_loss(true)
        .encoding("latents", "target", InputKind::Image, &["latent_scale"]);
    if c.use_text {
        s = s.encoding("text_embeddings", "caption", InputKind::Text, &[]);
    }
    s = s.param_group("unet");
    if c.use_text {
        s = s.param_group("text_encoder");
    }
    for f in export::FORMATS {
        s = s.adapter_format(f);
    }
    s.can_sample(true).build()
}

/// What `backward` needs from the last `forward_batch(Train)`.
struct Pending {
    fwd: flow::Forward,
    /// The image size `[H, W]` of `pixels`.
    image: [usize; 2],
}

pub struct FlowFixture {
    config: Config,
    theta: [f64; N_PARAMS],
    init: [f64; N_PARAMS],
    grad: [f64; N_PARAMS],
    exp_avg: [f64; N_PARAMS],
    exp_avg_sq: [f64; N_PARAMS],
    pending: Option<Pending>,
}

fn shape_of(v: &TensorView) -> Vec<i64> {
    // SAFETY: the view is valid for the call that handed it to us.
    unsafe { v.shape() }.to_vec()
}

fn f64s(v: &TensorView, what: &str) -> Result<(Vec<i64>, Vec<f64>)> {
    let t = CpuTensor::<f32>::from_view(v, what)?;
    Ok((t.shape, t.data.into_iter().map(|x| x as f64).collect()))
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn check_image_size(c: &Config, h2: usize, w2: usize, what: &str) -> Result<()> {
    match c.image_size {
        Some(s) if (h2, w2) != (s as usize, s as usize) => Err(err::input(format!(
            "model `{ID}`: `{what}` is for {h2}×{w2} images but the config says image_size = {s}"
        ))),
        _ => Ok(()),
    }
}

/// `latents` `[n, 3, H/2, W/2]` of the image view `target`.
fn encode_target(c: &Config, v: &TensorView) -> Result<(Vec<f64>, [usize; 3])> {
    let (shape, x) = f64s(v, "target")?;
    let ok = shape.len() == 4 && shape[1] == C as i64 && shape[0] > 0 && shape[2] >= 2 && shape[3] >= 2;
    if !ok || shape[2] % 2 != 0 || shape[3] % 2 != 0 {
        return Err(err::input(format!(
            "model `{ID}`: `target` must be f32 [B, 3, H, W] with B ≥ 1 and H, W even, got {shape:?}"
        )));
    }
    let (n, h2, w2) = (shape[0] as usize, shape[2] as usize, shape[3] as usize);
    check_image_size(c, h2, w2, "target")?;
    Ok((flow::encode_latents(&x, n, h2, w2, c.latent_scale), [n, h2 / 2, w2 / 2]))
}

/// The batch's latents `[n, 3, h, w]`: `latents` if given, else encoded from `target`.
fn latents_of(c: &Config, images: &Inputs<'_>) -> Result<(Vec<f64>, [usize; 3])> {
    if let Some(v) = images.try_get("latents") {
        let (shape, z) = f64s(v, "latents")?;
        if shape.len() != 4 || shape[1] != C as i64 || shape.iter().any(|&d| d <= 0) {
            return Err(err::input(format!(
                "model `{ID}`: `latents` must be [B, 3, h, w] with B, h, w ≥ 1, got {shape:?}"
            )));
        }
        let (n, h, w) = (shape[0] as usize, shape[2] as usize, shape[3] as usize);
        check_image_size(c, 2 * h, 2 * w, "latents")?;
        return Ok((z, [n, h, w]));
    }
    let v = images.try_get("target").ok_or_else(|| {
        err::input(format!(
            "model `{ID}` needs image `target` or its encoding `latents` (got: {})",
            images.names().join(", ")
        ))
    })?;
    encode_target(c, v)
}

/// The batch's text embeddings `[n, 8]` (zeros without text).
fn embeddings_of(c: &Config, images: &Inputs<'_>, texts: &Texts<'_>, n: usize) -> Result<Vec<f64>> {
    if !c.use_text {
        return Ok(vec![0.0; n * TEXT_DIM]);
    }
    if let Some(v) = images.try_get("text_embeddings") {
        let (shape, e) = f64s(v, "text_embeddings")?;
        if shape != [n as i64, TEXT_DIM as i64] {
            return Err(err::input(format!(
                "model `{ID}`: `text_embeddings` must be [{n}, {TEXT_DIM}], got {shape:?}"
            )));
        }
        return Ok(e);
    }
    let caps = texts.try_get("caption").ok_or_else(|| {
        err::input(format!(
            "model `{ID}` needs text `caption` or its encoding `text_embeddings` (got texts: {}; images: {}); set model.config.use_text = false to train without captions",
            texts.names().join(", "),
            images.names().join(", ")
        ))
    })?;
    if caps.len() != n {
        return Err(err::input(format!("model `{ID}`: {} captions for a batch of {n}", caps.len())));
    }
    Ok(caps.iter().flat_map(|s| flow::embed_text(s)).collect())
}

fn group_range(name: &str, use_text: bool) -> Option<std::ops::Range<usize>> {
    match name {
        "unet" => Some(0..flow::P.start),
        "text_encoder" if use_text => Some(flow::P),
        _ => None,
    }
}

impl FlowFixture {
    fn trainable(&self) -> usize {
        if self.config.use_text {
            N_PARAMS
        } else {
            flow::P.start
        }
    }

    fn backward_impl(&mut self, grads: &[(&str, &TensorView, f64)], weight: f64) -> Result<()> {
        for (name, _, _) in grads {
            if !matches!(*name, "pixels" | "timesteps") {
                return Err(err::input(format!(
                    "model `{ID}` has no output `{name}` (it produces `pixels` and `timesteps`)"
                )));
            }
        }
        let pending = self.pending.take().ok_or_else(|| {
            PluginError::new(
                ErrorCode::NoPendingForward,
                format!("model `{ID}`: backward without a pending forward_batch(Train)"),
            )
        })?;
        let n = pending.fwd.dims[0];
        let [ih, iw] = pending.image;
        let mut g: Option<Vec<f64>> = None;
        for (name, view, scale) in grads {
            let (shape, data) = f64s(view, name)?;
            if *name == "timesteps" {
                // t is drawn, not computed from the parameters: its gradient contributes 0.
                if shape != [n as i64] {
                    return Err(err::input(format!(
                        "model `{ID}`: gradient of `timesteps` has shape {shape:?}, expected [{n}]"
                    )));
                }
                continue;
            }
            let want = [n as i64, C as i64, ih as i64, iw as i64];
            if shape != want {
                return Err(err::input(format!(
                    "model `{ID}`: gradient of `pixels` has shape {shape:?}, expected {want:?}"
                )));
            }
            let acc = g.get_or_insert_with(|| vec![0.0; data.len()]);
            for (a, d) in acc.iter_mut().zip(&data) {
                *a += scale * d;
            }
        }
        let d = flow::backward(&pending.fwd, g.as_deref(), weight, self.config.latent_scale, self.config.use_text);
        for (a, b) in self.grad.iter_mut().zip(d) {
            *a += b;
        }
        Ok(())
    }

    fn named_params<'a>(&self, v: &'a [f64; N_PARAMS]) -> [(&'static str, Vec<usize>, &'a [f64]); 3] {
        [("W", vec![C, C], &v[flow::W]), ("b", vec![C], &v[flow::B]), ("P", vec![C, TEXT_DIM], &v[flow::P])]
    }
}

fn save_f64(path: &Path, tensors: &[(String, Vec<usize>, &[f64])], meta: HashMap<String, String>) -> Result<()> {
    // The SDK's writer: the same bytes on every run (sorted metadata), so two runs that reach
    // the same state write byte-identical files.
    let f64_type = likeness_sdk::DataType { code: 2, bits: 64, lanes: 1 };
    let tensors: Vec<likeness_sdk::st::StTensor> = tensors
        .iter()
        .map(|(name, shape, d)| likeness_sdk::st::StTensor {
            name: name.clone(),
            dtype: f64_type,
            shape: shape.clone(),
            bytes: d.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let meta: std::collections::BTreeMap<String, String> = meta.into_iter().collect();
    likeness_sdk::st::save(path, &tensors, &meta)
}

/// f64 tensors in the order asked for, and the file's metadata.
type Loaded = (Vec<Vec<f64>>, HashMap<String, String>);

/// Reads f64 tensors `names` (with the given element counts) and the metadata of `path`.
fn load_f64(path: &Path, names: &[(String, usize)]) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| err::io(format!("cannot read {}: {e}", path.display())))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| err::io(format!("{} is not a safetensors file: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err::io(format!("{} is not a safetensors file: {e}", path.display())))?;
    let mut out = Vec::new();
    for (name, len) in names {
        let t = st.tensor(name).map_err(|_| err::input(format!("{} has no tensor `{name}`", path.display())))?;
        if t.dtype() != safetensors::Dtype::F64 || t.shape().iter().product::<usize>() != *len {
            return Err(err::input(format!(
                "{}: tensor `{name}` is {:?} {:?}, expected {len} f64 values",
                path.display(),
                t.dtype(),
                t.shape()
            )));
        }
        out.push(t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect());
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

fn fill(dst: &mut [f64; N_PARAMS], parts: &[Vec<f64>]) {
    let mut i = 0;
    for p in parts {
        dst[i..i + p.len()].copy_from_slice(p);
        i += p.len();
    }
}

impl ModelPlugin for FlowFixture {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Model, env!("CARGO_PKG_VERSION"))
            .summary("Test fixture: a tiny flow-matching model exercising every ABI 1.1 call")
            .differentiable(true)
            .devices(&[DeviceType::Cpu])
            .config_schema(config_schema())
            .build()
    }

    fn interface(config_json: &str) -> Result<ModelInterface> {
        Ok(interface_for(&Config::parse(config_json)?))
    }

    fn create(config_json: &str, device: Device, seed: u64) -> Result<Self> {
        let config = Config::parse(config_json)?;
        if device.device_type != DeviceType::Cpu {
            return Err(err::unsupported(format!("model `{ID}` runs on the CPU only, not on {device}")));
        }
        let theta = flow::init(seed);
        Ok(FlowFixture {
            config,
            theta,
            init: theta,
            grad: [0.0; N_PARAMS],
            exp_avg: [0.0; N_PARAMS],
            exp_avg_sq: [0.0; N_PARAMS],
            pending: None,
        })
    }

    fn parameters(&self) -> Result<ParameterInfo> {
        Ok(ParameterInfo { trainable: self.trainable() as u64, total: N_PARAMS as u64 })
    }

    /// The 1.0 form: no texts and no step context, so it serves `Eval` with
    /// `use_text = false` (or cached `text_embeddings`); `Train` needs the seeds of `forward_batch`.
    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> Result<ModelOutput> {
        self.forward_batch(inputs, Texts::none(), &StepContext::NONE, mode)
    }

    fn forward_batch(
        &mut self,
        images: Inputs<'_>,
        texts: Texts<'_>,
        ctx: &StepContext<'_>,
        mode: ForwardMode,
    ) -> Result<ModelOutput> {
        let c = self.config.clone();
        let (z0, dims) = latents_of(&c, &images)?;
        let [n, h, w] = dims;
        if let Some(r) = images.try_get("reference") {
            let s = shape_of(r);
            if s.len() != 4 || s[0] != n as i64 || s[1] != C as i64 {
                return Err(err::input(format!("model `{ID}`: `reference` must be [{n}, 3, H, W], got {s:?}")));
            }
        }
        let e = embeddings_of(&c, &images, &texts, n)?;
        let seeds = ctx.sample_seeds.as_slice();
        let m = C * h * w;
        let (t, eps): (Vec<f64>, Vec<Vec<f64>>) = if seeds.len() == n {
            seeds.iter().map(|&s| flow::draw(s, m)).unzip()
        } else if seeds.is_empty() && mode == ForwardMode::Eval {
            let (_, eps) = flow::draw(0, m);
            (vec![EVAL_T; n], vec![eps; n])
        } else {
            return Err(err::input(format!(
                "model `{ID}`: forward_batch({mode:?}) needs one seed per sample in the step context (ctx.sample_seeds), got {} for a batch of {n}",
                seeds.len()
            )));
        };
        let f = flow::forward(&self.theta, &z0, &e, dims, &t, &eps, c.use_text);
        let pixels = flow::decode(&f.x0_hat, dims, c.latent_scale, false);
        let out = ModelOutput {
            outputs: vec![
                (
                    "pixels".into(),
                    CpuTensor::new(vec![n as i64, C as i64, 2 * h as i64, 2 * w as i64], to_f32(&pixels))
                        .into_managed(),
                ),
                ("timesteps".into(), CpuTensor::new(vec![n as i64], to_f32(&t)).into_managed()),
            ],
            internal_loss: Some(f.loss),
        };
        if mode == ForwardMode::Train {
            self.pending = Some(Pending { fwd: f, image: [2 * h, 2 * w] });
        }
        Ok(out)
    }

    fn backward(&mut self, grads: Inputs<'_>, internal_loss_weight: f64) -> Result<()> {
        let names = grads.names();
        let views: Vec<(&str, &TensorView, f64)> =
            names.iter().map(|n| (*n, grads.try_get(n).expect("listed"), 1.0)).collect();
        self.backward_impl(&views, internal_loss_weight)
    }

    fn backward_scaled(&mut self, grads: &[ScaledView<'_>], internal_loss_weight: f64) -> Result<()> {
        let views: Vec<(&str, &TensorView, f64)> = grads.iter().map(|g| (g.name.as_str(), &g.view, g.scale)).collect();
        self.backward_impl(&views, internal_loss_weight)
    }

    fn optimizer_step(&mut self, step: OptimizerStep) -> Result<StepReport> {
        self.optimizer_step_groups(step, &[])
    }

    fn optimizer_step_groups(&mut self, s: OptimizerStep, groups: &[GroupHyper<'_>]) -> Result<StepReport> {
        if s.step == 0 {
            return Err(err::input("optimizer step numbers start at 1"));
        }
        let use_text = self.config.use_text;
        for g in groups {
            if group_range(g.name.as_str(), use_text).is_none() {
                let valid = if use_text { "unet, text_encoder" } else { "unet (text_encoder needs use_text = true)" };
                return Err(err::input(format!("model `{ID}` has no parameter group `{}`; groups: {valid}", g.name)));
            }
        }
        let names: &[&str] = if use_text { &["unet", "text_encoder"] } else { &["unet"] };
        let plan: Vec<(std::ops::Range<usize>, flow::Hyper)> = names
            .iter()
            .map(|name| {
                let hyper = groups
                    .iter()
                    .rev()
                    .find(|g| g.name.as_str() == *name)
                    .map(|g| flow::Hyper { lr: g.lr, weight_decay: g.weight_decay })
                    .unwrap_or(flow::Hyper { lr: s.lr, weight_decay: s.weight_decay });
                (group_range(name, use_text).expect("declared"), hyper)
            })
            .collect();
        let norm: f64 =
            plan.iter().flat_map(|(r, _)| r.clone()).map(|i| self.grad[i] * self.grad[i]).sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(err::internal(format!("gradient norm is {norm}: the loss diverged (lower the learning rate)")));
        }
        let norm = flow::adamw(
            &mut self.theta,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            &self.grad,
            &plan,
            s.step,
            (s.beta1, s.beta2),
            s.eps,
            s.max_grad_norm,
        );
        Ok(StepReport { grad_norm: norm })
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grad = [0.0; N_PARAMS];
        Ok(())
    }

    fn sample(&mut self, r: &SampleRequest<'_>) -> Result<ManagedTensor> {
        let prompts: Vec<&str> = r.prompts.as_slice().iter().map(|s| s.as_str()).collect();
        let n = prompts.len();
        if n == 0 {
            return Err(err::input(format!("model `{ID}`: sample needs at least one prompt")));
        }
        let negatives: Vec<&str> = r.negative_prompts.as_slice().iter().map(|s| s.as_str()).collect();
        if !negatives.is_empty() && negatives.len() != n {
            return Err(err::input(format!("model `{ID}`: {} negative prompts for {n} prompts", negatives.len())));
        }
        for img in r.images.as_slice() {
            let s = shape_of(&img.view);
            if s.first() != Some(&(n as i64)) {
                return Err(err::input(format!(
                    "model `{ID}`: sample image `{}` has shape {s:?}, expected a batch of {n}",
                    img.name
                )));
            }
        }
        let size = self.config.image_size;
        let (width, height) = match (r.width, r.height, size) {
            (0, 0, Some(s)) => (s, s),
            (0, _, _) | (_, 0, _) => {
                return Err(err::input(format!(
                    "model `{ID}`: sample needs a width and a height (or model.config.image_size)"
                )))
            }
            (w, h, _) => (w, h),
        };
        if width % 2 != 0 || height % 2 != 0 {
            return Err(err::input(format!("model `{ID}`: sample size must be even, got {width}×{height}")));
        }
        let (h, w) = (height as usize / 2, width as usize / 2);
        let steps = if r.steps == 0 { DEFAULT_STEPS } else { r.steps } as usize;
        let guidance = if r.guidance <= 0.0 { 1.0 } else { r.guidance };
        let th = flow::scaled_params(&self.theta, &self.init, r.adapter_scale);
        let use_text = self.config.use_text;
        let mut z = Vec::with_capacity(n * C * h * w);
        for (i, prompt) in prompts.iter().enumerate() {
            let x = flow::Rng::new(r.seed.wrapping_add(i as u64)).normals(C * h * w);
            let e_c = flow::embed_text(prompt);
            let e_u = flow::embed_text(negatives.get(i).copied().unwrap_or(""));
            z.extend(flow::euler(&th, x, &e_c, &e_u, steps, guidance, use_text));
        }
        let px = flow::decode(&z, [n, h, w], self.config.latent_scale, true);
        Ok(CpuTensor::new(vec![n as i64, C as i64, height as i64, width as i64], to_f32(&px)).into_managed())
    }

    fn export_adapter(
        &mut self,
        dir: &Path,
        format: &str,
        metadata: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<std::path::PathBuf>> {
        export::export(dir, format, metadata, &self.theta, &self.init, self.config.use_text)
    }

    fn encode(&mut self, name: &str, images: Inputs<'_>, texts: Texts<'_>) -> Result<Vec<(String, ManagedTensor)>> {
        let c = &self.config;
        match name {
            "latents" => {
                let (z, [n, h, w]) = encode_target(c, images.get("target")?)?;
                Ok(vec![(
                    "latents".into(),
                    CpuTensor::new(vec![n as i64, C as i64, h as i64, w as i64], to_f32(&z)).into_managed(),
                )])
            }
            "text_embeddings" if c.use_text => {
                let caps = texts.get("caption")?;
                let e: Vec<f64> = caps.iter().flat_map(|s| flow::embed_text(s)).collect();
                Ok(vec![(
                    "text_embeddings".into(),
                    CpuTensor::new(vec![caps.len() as i64, TEXT_DIM as i64], to_f32(&e)).into_managed(),
                )])
            }
            _ => Err(err::input(format!(
                "model `{ID}` declares no encoding `{name}` (it has: {})",
                if c.use_text { "latents, text_embeddings" } else { "latents" }
            ))),
        }
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let config = serde_json::to_string(&self.config).map_err(|e| err::internal(e.to_string()))?;
        let meta = |extra: Option<(&str, &str)>| {
            let mut m = HashMap::from([
                ("likeness.plugin".to_string(), ID.to_string()),
                ("likeness.config".to_string(), config.clone()),
            ]);
            if let Some((k, v)) = extra {
                m.insert(k.into(), v.into());
            }
            m
        };
        let mut t: Vec<(String, Vec<usize>, &[f64])> = Vec::new();
        for (prefix, v) in [("", &self.theta), ("init.", &self.init)] {
            for (name, shape, data) in self.named_params(v) {
                t.push((format!("{prefix}{name}"), shape, data));
            }
        }
        save_f64(&dir.join(MODEL_FILE), &t, meta(None))?;
        if with_optimizer {
            let mut t: Vec<(String, Vec<usize>, &[f64])> = Vec::new();
            for (prefix, v) in [("exp_avg.", &self.exp_avg), ("exp_avg_sq.", &self.exp_avg_sq)] {
                for (name, shape, data) in self.named_params(v) {
                    t.push((format!("{prefix}{name}"), shape, data));
                }
            }
            save_f64(&dir.join(OPTIMIZER_FILE), &t, meta(Some(("likeness.optimizer", "adamw"))))?;
        }
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let names = |prefixes: [&str; 2]| -> Vec<(String, usize)> {
            prefixes.iter().flat_map(|p| [("W", 9), ("b", 3), ("P", 24)].map(|(n, l)| (format!("{p}{n}"), l))).collect()
        };
        let path = dir.join(MODEL_FILE);
        let (v, meta) = load_f64(&path, &names(["", "init."]))?;
        if let Some(id) = meta.get("likeness.plugin") {
            if id != ID {
                return Err(err::input(format!("{} was saved by plugin `{id}`, not `{ID}`", path.display())));
            }
        }
        if let Some(json) = meta.get("likeness.config") {
            let saved: Config = serde_json::from_str(json).map_err(|e| {
                err::input(format!("{}: metadata `likeness.config` is not a valid config: {e}", path.display()))
            })?;
            if saved.latent_scale != self.config.latent_scale || saved.use_text != self.config.use_text {
                return Err(err::config(format!(
                    "{} was saved with latent_scale = {}, use_text = {}; this instance has latent_scale = {}, use_text = {}",
                    path.display(),
                    saved.latent_scale,
                    saved.use_text,
                    self.config.latent_scale,
                    self.config.use_text
                )));
            }
        }
        let (mut theta, mut init) = ([0.0; N_PARAMS], [0.0; N_PARAMS]);
        fill(&mut theta, &v[0..3]);
        fill(&mut init, &v[3..6]);
        let opt = dir.join(OPTIMIZER_FILE);
        let (mut m, mut s) = ([0.0; N_PARAMS], [0.0; N_PARAMS]);
        if opt.exists() {
            let (v, _) = load_f64(&opt, &names(["exp_avg.", "exp_avg_sq."]))?;
            fill(&mut m, &v[0..3]);
            fill(&mut s, &v[3..6]);
        }
        self.theta = theta;
        self.init = init;
        self.exp_avg = m;
        self.exp_avg_sq = s;
        self.grad = [0.0; N_PARAMS];
        self.pending = None;
        Ok(())
    }
}

likeness_sdk::export_model_plugin!(FlowFixture);

#[cfg(test)]
mod tests;
