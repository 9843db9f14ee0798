//! `sd15-lora`: Stable Diffusion 1.5 LoRA training as a likeness model plugin.
//!
//! The networks (UNet2DConditionModel, AutoencoderKL, CLIP text encoder) and LoRA injection are
//! core/diffusion-torch's; schedules, timestep sampling, loss weightings and LoRA file formats
//! core/diffusion's; the tokenizer core/clip's. This crate holds the SD1.5 pipeline, the
//! training objective, sampling and the plugin calls.
//!
//! # Interface (ABI 1.1 `interface`, see [`config::interface_for`])
//! * images `target` (required, f32 `[B, 3, H, W]` in [0, 1], H and W multiples of the VAE
//!   factor; or its encoding `latents`), `reference` (optional: the identity term reads it
//!   through the engine, the model does not);
//! * texts `caption` (required; or its encoding `text_embeddings` when the text encoder is frozen);
//! * outputs `pixels` (x̂0 → VAE decode with gradient → (x+1)/2, f32 `[B, 3, H, W]`, not clamped;
//!   only with `decode_pixels`), `timesteps` (`[B]` f32, t / num_train_timesteps) and
//!   `timestep_weights` (`[B]` f32, the min-SNR-γ weight of each sample, 1 without);
//!   `internal_loss` = mean over the batch of the weighted per-sample MSE;
//! * encodings `latents` (the VAE posterior mean × scaling_factor) and `text_embeddings`;
//! * parameter groups `unet` (+ `text_encoder` with `train_text_encoder`); adapter formats
//!   `kohya`, `diffusers`, `peft`; `can_sample`.
//!
//! # The training step
//! Sample i draws, from `ctx.sample_seeds[i]` only ([`rng`]): its timestep (core/diffusion's
//! `TimestepSampler`, t·1000 floored), its noise ε and the noise offset. Then
//! `x_t = √ᾱ·z0 + √(1−ᾱ)·ε` (ε including the offset, as sd-scripts), the UNet predicts ε or
//! v, the loss is `mean_i w_i·mean((pred − target)²)`, and x̂0 is recovered from the prediction.
//! `backward_scaled` runs one backward of `weight·L + Σ_k scale_k·⟨g_k, pixels⟩`. Only LoRA
//! weights require gradients; the base weights never get a `.grad`.
//!
//! # Saved state
//! `model.safetensors`: the LoRA weights (`unet.<module>.lora_{A,B}.weight`,
//! `text_encoder.…`), metadata `likeness.plugin`, `likeness.config`; `optimizer.safetensors`:
//! AdamW's `exp_avg.<name>` / `exp_avg_sq.<name>`. The base weights are not saved (they come
//! from `pretrained`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use likeness_diffusion::timesteps::TimestepSampler;
use likeness_diffusion::weighting::min_snr_weight;
use likeness_diffusion_torch::sampling::{self, Sampler};
use likeness_diffusion_torch::{lora, LoraConfig, LoraInit, UNetTape};
use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::{
    err, DataType, DescriptorBuilder, Device, DeviceType, ErrorCode, ForwardMode, GroupHyper, Inputs, ModelInterface,
    ModelOutput, ModelPlugin, OptimizerStep, ParameterInfo, PluginDescriptor, PluginError, PluginKind, SampleRequest,
    ScaledView, StepContext, StepReport, TensorView, Texts,
};
use likeness_sdk_torch::{load_into, save_tensors, tensor_to_managed, to_tch_device, view_to_tensor, AdamW};
use tch::{Kind, Tensor};

pub mod adapter;
pub mod config;
pub mod error;
pub mod model;
pub mod rng;
pub mod text;

use config::{Config, LoraInitName, Precision};
use error::{input, Sd15Error};
use model::Pipeline;

/// The plugin id users type.
pub const ID: &str = "sd15-lora";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The timestep of an `Eval` forward without seeds (the middle of the schedule).
pub const EVAL_TIMESTEP: usize = 500;

/// libtorch's generator is process-global: LoRA initialisation and LoRA dropout seed it under
/// this lock so that concurrent instances still get what their seeds promise.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// The config keys that decide the adapter's shape: a saved state must agree on them.
fn structural(c: &Config) -> serde_json::Value {
    serde_json::json!({
        "lora_rank": c.lora_rank, "lora_alpha": c.alpha(), "lora_targets": c.lora_targets,
        "train_text_encoder": c.train_text_encoder, "lora": c.lora, "precision": c.precision,
    })
}

/// What `backward` needs from the last `forward_batch(Train)`.
struct Pending {
    loss: Tensor,
    pixels: Option<Tensor>,
    n: i64,
    /// With `gradient_checkpointing`: the UNet's kept activations, replayed after the backward
    /// into its output.
    tape: Option<UNetTape>,
}

/// The plugin instance.
pub struct Sd15Lora {
    config: Config,
    device: tch::Device,
    /// The kind of everything computed outside the networks (f32; f64 with `precision = fp64`).
    compute: Kind,
    pipe: Pipeline,
    unet_opt: AdamW,
    text_opt: Option<AdamW>,
    pending: Option<Pending>,
}

fn shape_of(v: &TensorView) -> Vec<i64> {
    // SAFETY: views handed to a plugin method are valid for the call.
    unsafe { v.shape() }.to_vec()
}

/// A borrowed view copied onto `device` as `kind` (the graph must not point into host memory
/// the host reuses after the call).
fn owned(v: &TensorView, device: tch::Device, kind: Kind) -> likeness_sdk::Result<Tensor> {
    if v.device.device_type == DeviceType::Cuda && v.stream != 0 {
        tch::Cuda::synchronize(v.device.device_id as i64);
    }
    Ok(view_to_tensor(v)?.to_device(device).to_kind(kind).copy())
}

fn managed(t: &Tensor) -> likeness_sdk::Result<ManagedTensor> {
    // A detached f32 copy: the host may write into what it receives.
    tensor_to_managed(t.detach().to_kind(Kind::Float).copy())
}

fn prefixed(prefix: &str, v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)).collect()
}

impl Sd15Lora {
    pub fn new(config: Config, device: Device, seed: u64) -> Result<Self, PluginError> {
        let device = to_tch_device(device)?;
        let pipe = Pipeline::load(&config, device)?;
        let compute = config.precision.compute_kind();
        match &config.lora {
            Some(path) => adapter::inject_from_file(&pipe, Path::new(path), config.precision, config.lora_dropout)?,
            None => {
                let _lock = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
                tch::manual_seed(seed as i64);
                let init = match config.lora_init {
                    LoraInitName::Kaiming => LoraInit::KaimingUniform,
                    LoraInitName::Gaussian => LoraInit::Gaussian,
                };
                let (targets, conv) = config.unet_patterns();
                let cfg = LoraConfig {
                    r: config.lora_rank,
                    alpha: config.alpha(),
                    dropout: config.lora_dropout,
                    target_modules: targets,
                    init,
                    conv,
                };
                lora::inject(&pipe.unet_store, &cfg).map_err(Sd15Error::from)?;
                if config.train_text_encoder {
                    let cfg = LoraConfig {
                        target_modules: config::TEXT_ENCODER_TARGETS.map(String::from).to_vec(),
                        conv: false,
                        ..cfg
                    };
                    lora::inject(pipe.text.get()?.store(), &cfg).map_err(Sd15Error::from)?;
                }
            }
        }
        if config.precision == Precision::Fp64 {
            adapter::lora_to_f64(&pipe.unet_store);
            if let Some(t) = pipe.text.loaded() {
                adapter::lora_to_f64(t.store());
            }
        }
        let unet_opt = AdamW::new(prefixed("unet", lora::parameters(&pipe.unet_store)));
        let text_params =
            prefixed("text_encoder", pipe.text.loaded().map(|t| lora::parameters(t.store())).unwrap_or_default());
        // Text-encoder LoRA is a parameter group when trained, or when a loaded file has it.
        let text_opt = (!text_params.is_empty()).then(|| AdamW::new(text_params));
        Ok(Sd15Lora { config, device, compute, pipe, unet_opt, text_opt, pending: None })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipe
    }

    /// Every LoRA weight by its saved name (`unet.<module>.lora_A.weight` …), sharing storage.
    pub fn lora_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.unet_opt.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        if let Some(o) = &self.text_opt {
            v.extend(o.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        }
        v
    }

    /// Every base (frozen) weight by name, `unet.` / `vae.` / `text_encoder.` prefixed (loads
    /// the VAE and the text encoder if they are not yet).
    pub fn base_parameters(&self) -> Result<Vec<(String, Tensor)>, PluginError> {
        let mut v = prefixed("unet", self.pipe.unet_store.named_parameters());
        v.extend(prefixed("vae", self.pipe.vae.get()?.store.named_parameters()));
        v.extend(prefixed("text_encoder", self.pipe.text.get()?.store().named_parameters()));
        Ok(v)
    }

    /// Whether the VAE and the text encoder weights are loaded (they load on first use).
    pub fn encoders_loaded(&self) -> (bool, bool) {
        (self.pipe.vae.loaded().is_some(), self.pipe.text.loaded().is_some())
    }

    /// `pixels` of the pending `forward_batch(Train)`, attached to its graph and in the compute
    /// kind (f64 with `precision = fp64`): what finite-difference checks compare.
    pub fn pending_pixels(&self) -> Option<Tensor> {
        self.pending.as_ref().and_then(|p| p.pixels.as_ref().map(|t| t.detach()))
    }

    fn optimizers(&mut self) -> Vec<(&'static str, &mut AdamW)> {
        let mut v = vec![("unet", &mut self.unet_opt)];
        if let Some(o) = self.text_opt.as_mut() {
            v.push(("text_encoder", o));
        }
        v
    }

    fn trains_text(&self) -> bool {
        self.text_opt.is_some()
    }

    fn check_images(&self, what: &str, shape: &[i64]) -> Result<(), Sd15Error> {
        let f = self.pipe.vae_factor;
        if shape.len() != 4 || shape[0] < 1 || shape[1] != 3 || shape[2] % f != 0 || shape[3] % f != 0 || shape[2] < f {
            return Err(input(format!(
                "`{what}` must be f32 [B, 3, H, W] in [0, 1] with H and W positive multiples of {f} (the VAE factor), got {shape:?}"
            )));
        }
        Ok(())
    }

    /// Scaled latents `[B, C, h, w]`: the `latents` input if given, else the encoded `target`.
    fn latents_of(&self, images: &Inputs<'_>) -> Result<Tensor, PluginError> {
        let lc = self.pipe.vae_config.latent_channels;
        if let Some(v) = images.try_get("latents") {
            let s = shape_of(v);
            if s.len() != 4 || s[0] < 1 || s[1] != lc || s[2] < 1 || s[3] < 1 {
                return Err(
                    input(format!("`latents` must be [B, {lc}, h, w] (the `latents` encoding), got {s:?}")).into()
                );
            }
            return owned(v, self.device, self.compute);
        }
        let v = images.try_get("target").ok_or_else(|| {
            input(format!("needs image `target` or its encoding `latents` (got: {})", images.names().join(", ")))
        })?;
        self.check_images("target", &shape_of(v))?;
        let x = owned(v, self.device, self.compute)?;
        Ok(self.pipe.encode_images(&x, self.compute)?)
    }

    /// The UNet conditioning `[B, 77, D]`: `text_embeddings` if given (frozen text encoder
    /// only), else the encoded `caption`.
    fn context_of(&self, images: &Inputs<'_>, texts: &Texts<'_>, n: i64, grad: bool) -> Result<Tensor, PluginError> {
        let d = self.pipe.text_config.hidden_size;
        if let Some(v) = images.try_get("text_embeddings") {
            if self.trains_text() {
                return Err(input(
                    "`text_embeddings` were given but the text encoder has LoRA (train_text_encoder): pass `caption` (the engine must not cache texts for this config)",
                )
                .into());
            }
            let s = shape_of(v);
            if s != [n, model::CONTEXT_LENGTH as i64, d] {
                return Err(input(format!(
                    "`text_embeddings` must be [{n}, {}, {d}] (the `text_embeddings` encoding), got {s:?}",
                    model::CONTEXT_LENGTH
                ))
                .into());
            }
            return owned(v, self.device, self.compute);
        }
        let caps = texts.try_get("caption").ok_or_else(|| {
            input(format!(
                "needs text `caption` or its encoding `text_embeddings` (got texts: {}; images: {})",
                texts.names().join(", "),
                images.names().join(", ")
            ))
        })?;
        if caps.len() as i64 != n {
            return Err(input(format!("{} captions for a batch of {n}", caps.len())).into());
        }
        Ok(self.pipe.embed_texts(&caps, self.config.clip_skip, self.device, grad)?.to_kind(self.compute))
    }

    /// Timestep, noise `[C·h·w]` per sample from the seeds, or the Eval defaults.
    fn draws(&self, seeds: &[u64], n: usize, per_sample: usize, mode: ForwardMode) -> Result<Draws, PluginError> {
        let nt = self.pipe.scheduler.num_train_timesteps;
        let c = &self.config;
        let lc = self.pipe.vae_config.latent_channels as usize;
        if seeds.len() == n {
            let mut d = Draws { t: Vec::new(), noise: Vec::new() };
            for &s in seeds {
                let mut ts = TimestepSampler::new(c.sampling(), c.min_timestep, c.max_timestep, rng::timestep_seed(s))
                    .map_err(Sd15Error::from)?;
                let t = ((ts.sample() * nt as f64).floor() as usize).min(nt - 1);
                let mut eps = rng::noise(s, per_sample);
                if c.noise_offset > 0.0 {
                    // sd-scripts: noise + offset·randn(B, C, 1, 1): one draw per channel.
                    let off = rng::offset(s, lc);
                    let hw = per_sample / lc;
                    for (k, e) in eps.iter_mut().enumerate() {
                        *e += c.noise_offset * off[k / hw];
                    }
                }
                d.t.push(t);
                d.noise.extend(eps);
            }
            Ok(d)
        } else if seeds.is_empty() && mode == ForwardMode::Eval {
            let eps = rng::noise(0, per_sample);
            Ok(Draws { t: vec![EVAL_TIMESTEP.min(nt - 1); n], noise: eps.repeat(n) })
        } else {
            Err(input(format!(
                "forward_batch({mode:?}) needs one seed per sample in the step context (ctx.sample_seeds), got {} for a batch of {n}",
                seeds.len()
            ))
            .into())
        }
    }

    fn forward_impl(
        &mut self,
        images: Inputs<'_>,
        texts: Texts<'_>,
        ctx: &StepContext<'_>,
        mode: ForwardMode,
    ) -> Result<ModelOutput, PluginError> {
        let train = mode == ForwardMode::Train;
        // LoRA dropout (UNet and text encoder) draws from libtorch's global generator: seed it
        // from this batch's seeds and hold the lock for the whole forward, so a resumed run
        // drops the same units.
        let dropout = train && self.config.lora_dropout > 0.0;
        let batch_seed = ctx.sample_seeds.as_slice().iter().fold(0x5eed_u64, |a, &s| a.rotate_left(7) ^ s);
        let _rng = dropout.then(|| {
            let lock = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed((batch_seed >> 1) as i64);
            lock
        });
        // The UNet reseeds before each of its segments, so the masks do not depend on whether
        // its activations are checkpointed (the recomputation draws what the forward drew).
        let unet_seed = dropout.then(|| (batch_seed.rotate_left(29) >> 1) as i64);
        lora::set_training(&self.pipe.unet_store, train);
        if let Some(t) = self.pipe.text.loaded() {
            lora::set_training(t.store(), train);
        }
        let z0 = self.latents_of(&images)?;
        let [n, lc, h, w]: [i64; 4] = z0.size().try_into().expect("4-d latents");
        if let Some(r) = images.try_get("reference") {
            let s = shape_of(r);
            if s.len() != 4 || s[0] != n || s[1] != 3 {
                return Err(input(format!("`reference` must be [{n}, 3, H, W], got {s:?}")).into());
            }
        }
        let cond = self.context_of(&images, &texts, n, train && self.trains_text())?;
        let d = self.draws(ctx.sample_seeds.as_slice(), n as usize, (lc * h * w) as usize, mode)?;
        let sched = &self.pipe.scheduler;
        let nt = sched.num_train_timesteps as f64;
        let sa: Vec<f64> = d.t.iter().map(|&t| sched.alphas_cumprod[t].sqrt()).collect();
        let sb: Vec<f64> = d.t.iter().map(|&t| (1.0 - sched.alphas_cumprod[t]).sqrt()).collect();
        let weights: Vec<f64> =
            d.t.iter()
                .map(|&t| {
                    self.config.min_snr_gamma.map(|g| min_snr_weight(sched.snr(t), g, sched.prediction)).unwrap_or(1.0)
                })
                .collect();
        let col = |v: &[f64]| Tensor::from_slice(v).to_kind(self.compute).to_device(self.device).view([n, 1, 1, 1]);
        let (sa_t, sb_t) = (col(&sa), col(&sb));
        let eps = Tensor::from_slice(&d.noise).to_kind(self.compute).to_device(self.device).view([n, lc, h, w]);
        let x_t = &z0 * &sa_t + &eps * &sb_t;
        let t_in = Tensor::from_slice(&d.t.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(self.device);
        let prediction = sched.prediction;
        let target = match prediction {
            likeness_diffusion::schedules::Prediction::VPrediction => &eps * &sa_t - &z0 * &sb_t,
            _ => eps.shallow_clone(),
        };
        let w_t = Tensor::from_slice(&weights).to_kind(self.compute).to_device(self.device);
        let decode = self.config.decode_pixels;
        let checkpoint = train && self.config.gradient_checkpointing;
        let mut tape = None;
        let mut run = || {
            let out = if checkpoint {
                let (out, t) = self.pipe.unet.forward_checkpointed(&x_t, &t_in, &cond, unet_seed);
                tape = Some(t);
                out
            } else {
                self.pipe.unet.forward_reseeded(&x_t, &t_in, &cond, unet_seed)
            };
            let out = out.to_kind(self.compute);
            let mse = (&out - &target).square().mean_dim([1i64, 2, 3].as_slice(), false, self.compute);
            let loss = (mse * &w_t).mean(self.compute);
            let x0 = match prediction {
                likeness_diffusion::schedules::Prediction::VPrediction => &x_t * &sa_t - &out * &sb_t,
                _ => (&x_t - &out * &sb_t) / &sa_t,
            };
            let pixels = decode.then(|| self.pipe.decode_latents(&x0, self.compute)).transpose()?;
            Ok::<_, Sd15Error>((loss, pixels))
        };
        let (loss, pixels) = if train { run()? } else { tch::no_grad(run)? };
        let ts: Vec<f32> = d.t.iter().map(|&t| (t as f64 / nt) as f32).collect();
        let ws: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let mut outputs = Vec::new();
        if let Some(p) = &pixels {
            outputs.push(("pixels".to_string(), managed(p)?));
        }
        outputs.push(("timesteps".into(), tensor_to_managed(Tensor::from_slice(&ts))?));
        outputs.push(("timestep_weights".into(), tensor_to_managed(Tensor::from_slice(&ws))?));
        let value = loss.to_kind(Kind::Double).double_value(&[]);
        if train {
            self.pending = Some(Pending { loss, pixels, n, tape });
        }
        Ok(ModelOutput { outputs, internal_loss: Some(value) })
    }

    fn backward_impl(&mut self, grads: &[(&str, &TensorView, f64)], weight: f64) -> Result<(), PluginError> {
        let pending = self.pending.take().ok_or_else(|| {
            PluginError::new(
                ErrorCode::NoPendingForward,
                format!("model `{ID}`: backward without a pending forward_batch(Train) (each allows one backward)"),
            )
        })?;
        let mut g_pixels: Option<Tensor> = None;
        for (name, view, scale) in grads {
            let s = shape_of(view);
            match *name {
                // Drawn or fixed per sample, not functions of the parameters: zero contribution.
                "timesteps" | "timestep_weights" => {
                    if s != [pending.n] {
                        return Err(
                            input(format!("gradient of `{name}` has shape {s:?}, expected [{}]", pending.n)).into()
                        );
                    }
                }
                "pixels" => {
                    let Some(p) = &pending.pixels else {
                        return Err(input("a gradient for `pixels` was given, but decode_pixels = false: this config outputs no pixels").into());
                    };
                    if s != p.size() {
                        return Err(
                            input(format!("gradient of `pixels` has shape {s:?}, expected {:?}", p.size())).into()
                        );
                    }
                    let g = owned(view, self.device, self.compute)? * *scale;
                    g_pixels = Some(match g_pixels {
                        Some(acc) => acc + g,
                        None => g,
                    });
                }
                other => {
                    return Err(input(format!(
                        "has no output `{other}` to take a gradient for (outputs: pixels, timesteps, timestep_weights)"
                    ))
                    .into())
                }
            }
        }
        let mut objective: Option<Tensor> = (weight != 0.0).then(|| &pending.loss * weight);
        if let (Some(g), Some(p)) = (g_pixels, &pending.pixels) {
            let term = (p * g).sum(self.compute);
            objective = Some(match objective {
                Some(o) => o + term,
                None => term,
            });
        }
        if let Some(o) = objective {
            // One backward through the shared graph: the diffusion loss and the pixel
            // gradients accumulate into the LoRA weights together.
            o.backward();
            if let Some(tape) = pending.tape {
                // The recomputation reseeds dropout from the forward's seeds: hold the
                // generator as the forward did.
                let _rng =
                    (self.config.lora_dropout > 0.0).then(|| TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner()));
                tape.backward(&self.pipe.unet);
            }
        }
        Ok(())
    }
}

struct Draws {
    t: Vec<usize>,
    noise: Vec<f64>,
}

impl ModelPlugin for Sd15Lora {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(ID, PluginKind::Model, env!("CARGO_PKG_VERSION"))
            .summary("Stable Diffusion 1.5 LoRA: diffusion loss, x̂0 pixels for identity losses, DDIM/Euler sampling, kohya/diffusers/PEFT adapters")
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(config::config_schema())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn interface(config_json: &str) -> likeness_sdk::Result<ModelInterface> {
        Ok(config::interface_for(&Config::parse(config_json)?))
    }

    fn create(config_json: &str, device: Device, seed: u64) -> likeness_sdk::Result<Self> {
        Sd15Lora::new(Config::parse(config_json)?, device, seed)
    }

    fn parameters(&self) -> likeness_sdk::Result<ParameterInfo> {
        let trainable: i64 = self.lora_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
        // Counted by shape for the encoders, so asking does not load them.
        let base = model::parameter_count(&self.pipe.unet_store) + self.pipe.encoder_parameters;
        Ok(ParameterInfo { trainable: trainable as u64, total: (trainable + base) as u64 })
    }

    /// The 1.0 form (no texts, no step context): only `Eval` with cached `text_embeddings`.
    fn forward(&mut self, inputs: Inputs<'_>, mode: ForwardMode) -> likeness_sdk::Result<ModelOutput> {
        self.forward_batch(inputs, Texts::none(), &StepContext::NONE, mode)
    }

    fn forward_batch(
        &mut self,
        images: Inputs<'_>,
        texts: Texts<'_>,
        ctx: &StepContext<'_>,
        mode: ForwardMode,
    ) -> likeness_sdk::Result<ModelOutput> {
        self.pending = None;
        self.forward_impl(images, texts, ctx, mode)
    }

    fn backward(&mut self, grads: Inputs<'_>, internal_loss_weight: f64) -> likeness_sdk::Result<()> {
        let names = grads.names();
        let views: Vec<(&str, &TensorView, f64)> =
            names.iter().map(|n| (*n, grads.try_get(n).expect("listed"), 1.0)).collect();
        self.backward_impl(&views, internal_loss_weight)
    }

    fn backward_scaled(&mut self, grads: &[ScaledView<'_>], internal_loss_weight: f64) -> likeness_sdk::Result<()> {
        let views: Vec<(&str, &TensorView, f64)> = grads.iter().map(|g| (g.name.as_str(), &g.view, g.scale)).collect();
        self.backward_impl(&views, internal_loss_weight)
    }

    fn optimizer_step(&mut self, step: OptimizerStep) -> likeness_sdk::Result<StepReport> {
        self.optimizer_step_groups(step, &[])
    }

    fn optimizer_step_groups(
        &mut self,
        s: OptimizerStep,
        groups: &[GroupHyper<'_>],
    ) -> likeness_sdk::Result<StepReport> {
        if s.step == 0 {
            return Err(err::input("optimizer step numbers start at 1"));
        }
        let names: Vec<&str> = self.optimizers().iter().map(|(n, _)| *n).collect();
        for g in groups {
            if !names.contains(&g.name.as_str()) {
                return Err(err::input(format!(
                    "model `{ID}` has no parameter group `{}`; groups: {}{}",
                    g.name,
                    names.join(", "),
                    if names.len() == 1 { " (text_encoder needs train_text_encoder = true)" } else { "" }
                )));
            }
        }
        // clip_grad_norm_ over every LoRA weight of every group, then each group's AdamW
        // with its own lr / weight decay and clipping off (the gradients are already clipped).
        let _g = tch::no_grad_guard();
        let mut total = 0f64;
        for (_, o) in self.optimizers() {
            let n = o.grad_norm();
            total += n * n;
        }
        let norm = total.sqrt();
        if !norm.is_finite() {
            return Err(err::internal(format!("gradient norm is {norm}: the loss diverged (lower the learning rate)")));
        }
        let clip = if s.max_grad_norm > 0.0 { (s.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
        for (name, o) in self.optimizers() {
            if clip < 1.0 {
                for (_, p) in o.params() {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(clip);
                    }
                }
            }
            let (lr, wd) = groups
                .iter()
                .rev()
                .find(|g| g.name.as_str() == name)
                .map(|g| (g.lr, g.weight_decay))
                .unwrap_or((s.lr, s.weight_decay));
            o.step(&OptimizerStep { lr, weight_decay: wd, max_grad_norm: 0.0, ..s })?;
        }
        Ok(StepReport { grad_norm: norm })
    }

    fn zero_grad(&mut self) -> likeness_sdk::Result<()> {
        for (_, o) in self.optimizers() {
            o.zero_grad();
        }
        Ok(())
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> likeness_sdk::Result<()> {
        let config = serde_json::to_string(&self.config).map_err(|e| err::internal(e.to_string()))?;
        let meta = |extra: Option<(&str, &str)>| {
            let mut m = BTreeMap::from([
                ("likeness.plugin".to_string(), ID.to_string()),
                ("likeness.config".to_string(), config.clone()),
            ]);
            if let Some((k, v)) = extra {
                m.insert(k.into(), v.into());
            }
            m
        };
        save_tensors(&dir.join(MODEL_FILE), &self.lora_parameters(), &meta(None))?;
        if with_optimizer {
            let mut state = self.unet_opt.state();
            if let Some(o) = &self.text_opt {
                state.extend(o.state());
            }
            save_tensors(&dir.join(OPTIMIZER_FILE), &state, &meta(Some(("likeness.optimizer", "adamw"))))?;
        }
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> likeness_sdk::Result<()> {
        let model = dir.join(MODEL_FILE);
        let meta = likeness_sdk::st::read_header(&model)?.metadata;
        if let Some(id) = meta.get("likeness.plugin") {
            if id != ID {
                return Err(err::input(format!("{} was saved by plugin `{id}`, not `{ID}`", model.display())));
            }
        }
        if let Some(json) = meta.get("likeness.config") {
            let saved: Config = serde_json::from_str(json).map_err(|e| {
                err::input(format!("{}: metadata `likeness.config` is not a valid config: {e}", model.display()))
            })?;
            if structural(&saved) != structural(&self.config) {
                return Err(err::config(format!(
                    "{} was saved with LoRA settings {}, this instance has {}; create the model with the saved config",
                    model.display(),
                    structural(&saved),
                    structural(&self.config)
                )));
            }
        }
        load_into(&model, &self.lora_parameters())?;
        let opt = dir.join(OPTIMIZER_FILE);
        let mut state = self.unet_opt.state();
        if let Some(o) = &self.text_opt {
            state.extend(o.state());
        }
        if opt.exists() {
            load_into(&opt, &state)?;
        } else {
            // Weights only: the moments start afresh.
            let _g = tch::no_grad_guard();
            for (_, mut t) in state {
                let _ = t.zero_();
            }
        }
        self.pending = None;
        self.zero_grad()
    }

    fn sample(&mut self, r: &SampleRequest<'_>) -> likeness_sdk::Result<ManagedTensor> {
        let prompts: Vec<&str> = r.prompts.as_slice().iter().map(|s| s.as_str()).collect();
        let n = prompts.len();
        if n == 0 {
            return Err(input("sample needs at least one prompt").into());
        }
        let negatives: Vec<&str> = r.negative_prompts.as_slice().iter().map(|s| s.as_str()).collect();
        if !negatives.is_empty() && negatives.len() != n {
            return Err(input(format!("{} negative prompts for {n} prompts", negatives.len())).into());
        }
        let res = self.config.resolution;
        let (width, height) = (if r.width == 0 { res } else { r.width }, if r.height == 0 { res } else { r.height });
        let f = self.pipe.vae_factor as u32;
        if width % f != 0 || height % f != 0 {
            return Err(
                input(format!("sample size {width}×{height} must be a multiple of {f} (the VAE factor)")).into()
            );
        }
        let steps = if r.steps == 0 { self.config.sample_steps } else { r.steps } as usize;
        let guidance = if r.guidance <= 0.0 { self.config.guidance } else { r.guidance };
        if !r.adapter_scale.is_finite() {
            return Err(input(format!("adapter_scale must be finite, got {}", r.adapter_scale)).into());
        }
        let lc = self.pipe.vae_config.latent_channels;
        let (h, w) = ((height / f) as i64, (width / f) as i64);
        let per = (lc * h * w) as usize;
        let mut noise = Vec::with_capacity(n * per);
        for i in 0..n {
            noise.extend(rng::noise(r.seed.wrapping_add(i as u64), per));
        }
        let uncond_texts: Vec<&str> = if negatives.is_empty() { vec![""; n] } else { negatives };
        let stores = [&self.pipe.unet_store, self.pipe.text.get()?.store()];
        for s in stores {
            lora::set_adapter_scale(s, r.adapter_scale);
            lora::set_training(s, false);
        }
        let result = (|| -> Result<Tensor, PluginError> {
            let cond =
                self.pipe.embed_texts(&prompts, self.config.clip_skip, self.device, false)?.to_kind(self.compute);
            let uncond =
                self.pipe.embed_texts(&uncond_texts, self.config.clip_skip, self.device, false)?.to_kind(self.compute);
            let x = Tensor::from_slice(&noise).to_kind(self.compute).to_device(self.device).view([n as i64, lc, h, w]);
            let sampler = match self.config.sampler {
                config::SamplerName::Ddim => Sampler::Ddim,
                config::SamplerName::Euler => Sampler::Euler,
            };
            // The toolkit's loop (core/diffusion-torch, checked against diffusers' pipeline); no graph.
            let z = tch::no_grad(|| -> Result<Tensor, PluginError> {
                let unet =
                    sampling::unet_model(&self.pipe.unet, &cond, Some(&uncond), guidance).map_err(Sd15Error::from)?;
                Ok(sampling::denoise(sampler, &self.pipe.scheduler.sampling, steps, &x, guidance, unet)
                    .map_err(Sd15Error::from)?)
            })?;
            Ok(tch::no_grad(|| self.pipe.decode_latents(&z, self.compute))?.clamp(0.0, 1.0))
        })();
        for s in stores {
            lora::set_adapter_scale(s, 1.0);
        }
        managed(&result?)
    }

    fn export_adapter(
        &mut self,
        dir: &Path,
        format: &str,
        metadata: &serde_json::Map<String, serde_json::Value>,
    ) -> likeness_sdk::Result<Vec<PathBuf>> {
        Ok(adapter::export(&self.pipe, &self.config, dir, format, metadata)?)
    }

    fn encode(
        &mut self,
        name: &str,
        images: Inputs<'_>,
        texts: Texts<'_>,
    ) -> likeness_sdk::Result<Vec<(String, ManagedTensor)>> {
        match name {
            "latents" => {
                let v = images.get("target")?;
                self.check_images("target", &shape_of(v))?;
                let x = owned(v, self.device, self.compute)?;
                Ok(vec![("latents".into(), managed(&self.pipe.encode_images(&x, self.compute)?)?)])
            }
            "text_embeddings" if !self.trains_text() => {
                let caps = texts.get("caption")?;
                let e = self.pipe.embed_texts(&caps, self.config.clip_skip, self.device, false)?;
                Ok(vec![("text_embeddings".into(), managed(&e.to_kind(self.compute))?)])
            }
            _ => Err(err::input(format!(
                "model `{ID}` declares no encoding `{name}` (it has: {})",
                if self.trains_text() {
                    "latents; texts are not cached while the text encoder trains"
                } else {
                    "latents, text_embeddings"
                }
            ))),
        }
    }
}

likeness_sdk::export_model_plugin!(Sd15Lora);
