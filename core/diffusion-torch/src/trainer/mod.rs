//! The generic LoRA-training model: everything a diffusion backbone plugin does that is not its
//! networks, written once over the [`Backbone`] trait. `LoraModel<B>` implements the SDK's
//! `ModelPlugin`, so a backbone plugin is a type alias and `export_model_plugin!`.
//!
//! Why a generic `ModelPlugin` impl rather than a forwarding layer in each plugin: the ABI calls
//! (forward_batch, backward_scaled, optimizer_step_groups, save/load, sample, encode, export) are
//! the same for every backbone; a per-plugin forwarding impl would be ~100 identical lines in
//! SD1.5, Flux and Qwen-Image-Edit, which is exactly the copying issue 15 removes.
//!
//! # The training step ([`step`])
//! Sample i draws, from `ctx.sample_seeds[i]` only ([`crate::rng`]): its timestep (core/diffusion's
//! `TimestepSampler`; DDPM: t·num_train_timesteps floored), its noise ε and the noise offset.
//! Then x_t, the target and x̂0 come from [`crate::training`] (DDPM: `add_noise`, `ddpm_target`,
//! `predict_x0`; flow matching: `flow_add_noise`, `flow_target`, `flow_predict_x0`), the loss is
//! `mean_i w_i·mean((pred − target)²)` (w: min-SNR-γ or 1). `backward_scaled` runs one backward
//! of `weight·L + Σ_k scale_k·⟨g_k, pixels⟩`. Only LoRA weights require gradients.
//!
//! # Saved state ([`state`])
//! `model.safetensors`: the LoRA weights (`<component>.<module>.lora_{A,B}.weight`), metadata
//! `likeness.plugin`, `likeness.config`; `optimizer.safetensors`: AdamW's `exp_avg.<name>` /
//! `exp_avg_sq.<name>`. The base weights are not saved (they come from the backbone's files).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use likeness_diffusion::lora_keys::Component;
use likeness_sdk::abi::ManagedTensor;
use likeness_sdk::{
    DataType, DescriptorBuilder, Device, DeviceType, ForwardMode, GroupHyper, Inputs, ModelInterface, ModelOutput,
    ModelPlugin, OptimizerStep, ParameterInfo, PluginDescriptor, SampleRequest, ScaledView, StepContext, StepReport,
    TensorView, Texts,
};
use likeness_sdk_torch::{to_tch_device, AdamW};
use tch::{Kind, Tensor};

pub mod adapter;
pub mod config;
pub mod error;
mod inputs;
pub mod pairedit;
mod state;
mod step;

pub use config::{
    check_paths_exist, check_sample_defaults, LoraInitName, ModelConfig, Precision, TimestepSamplingName, TrainConfig,
};
pub use error::{config as bad_config, file, input, ModelError, Result};

use crate::backbone::{Backbone, Objective};
use crate::lora::{self, LoraConfig, LoraInit};
use crate::nn::Net;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// libtorch's generator is process-global: LoRA initialisation and LoRA dropout seed it under
/// this lock so that concurrent instances still get what their seeds promise.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn torch_rng() -> MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// A LoRA-training model over backbone `B`.
pub struct LoraModel<B: Backbone> {
    config: ModelConfig<B::Config>,
    device: tch::Device,
    /// The kind of everything computed outside the networks (f32; f64 with `precision = fp64`).
    compute: Kind,
    backbone: B,
    /// One AdamW per parameter group: the denoiser's always, a text encoder's when it has LoRA.
    groups: Vec<(Component, AdamW)>,
    pending: Option<step::Pending<B>>,
    /// PairEdit's fixed prompt, encoded on first use (the text encoders are frozen).
    pairedit_prompt: std::cell::OnceCell<Vec<Tensor>>,
}

fn prefixed(prefix: &str, v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)).collect()
}

/// Settings that only one noise process has: min-SNR-γ weighs DDPM timesteps by their SNR, and
/// `flux_shift` shifts flow-matching σ; each is refused, naming the key, on the other.
fn check_objective(t: &TrainConfig, objective: &Objective) -> Result<()> {
    match objective {
        Objective::FlowMatching { .. } if t.min_snr_gamma.is_some() => Err(error::config(
            "min_snr_gamma",
            "min-SNR-γ weighs DDPM timesteps by their SNR; this backbone is flow matching, which has no such schedule: remove it (choose timestep_sampling instead)",
        )),
        Objective::Ddpm { .. } if t.timestep_sampling == TimestepSamplingName::FluxShift => Err(error::config(
            "timestep_sampling",
            "flux_shift shifts flow-matching σ by Flux's μ; this backbone is DDPM: use uniform, sigmoid, logit_normal, mode or shift",
        )),
        _ => Ok(()),
    }
}

impl<B: Backbone> LoraModel<B> {
    pub fn new(config: ModelConfig<B::Config>, device: Device, seed: u64) -> Result<Self> {
        let device = to_tch_device(device)?;
        let mut backbone = B::load(&config.backbone, &config.train, device)?;
        let t = &config.train;
        check_objective(t, backbone.objective())?;
        let compute = t.precision.compute_kind();
        if let Some(ic) = &t.identity {
            backbone.install_identity(ic, compute, seed)?;
            if let Some(w) = &t.identity_weights {
                let inj = backbone.identity().expect("installed above");
                likeness_sdk_torch::load_into(Path::new(w), &inj.parameters())?;
            }
        }
        let lora_trains = t.identity.as_ref().is_none_or(|i| i.train_lora);
        if !lora_trains {
            // DTBack without train_lora: the injection alone trains; a given LoRA still applies.
            if let Some(path) = &t.lora {
                inject_file(&backbone, Path::new(path), compute, t.lora_dropout)?;
            }
        } else if t.pairedit.is_some() {
            inject_pairedit(&backbone, t, compute, seed)?;
        } else {
            match &t.lora {
                Some(path) => inject_file(&backbone, Path::new(path), compute, t.lora_dropout)?,
                None => inject_fresh(&backbone, t, seed)?,
            }
        }
        let mut groups = Vec::new();
        for (k, &c) in B::COMPONENTS.iter().enumerate() {
            let Some(store) = backbone.store(c, false)? else { continue };
            if t.precision == Precision::Fp64 {
                adapter::lora_to_f64(store);
            }
            let mut params = prefixed(c.as_str(), lora::parameters(store));
            // PairEdit's content LoRA shares the denoiser's group (PairEdit gives both networks
            // the same AdamW hyper-parameters), saved as `<component>.content.<module>…`.
            params.extend(prefixed(&format!("{}.content", c.as_str()), lora::parameters_at(store, Net::Content)));
            if k == 0 {
                if let Some(inj) = backbone.identity() {
                    // The identity injection trains in the denoiser's group, saved as `identity.<name>`.
                    params.extend(prefixed("identity", inj.parameters()));
                }
            }
            // A text encoder is a parameter group when trained, or when a loaded file has it.
            if k == 0 || !params.is_empty() {
                groups.push((c, AdamW::new(params)));
            }
        }
        Ok(LoraModel { config, device, compute, backbone, groups, pending: None, pairedit_prompt: Default::default() })
    }

    pub fn config(&self) -> &ModelConfig<B::Config> {
        &self.config
    }

    pub fn backbone(&self) -> &B {
        &self.backbone
    }

    /// Every LoRA weight by its saved name (`<component>.<module>.lora_A.weight` …), sharing storage.
    pub fn lora_parameters(&self) -> Vec<(String, Tensor)> {
        self.groups.iter().flat_map(|(_, o)| o.params().iter().map(|(n, t)| (n.clone(), t.shallow_clone()))).collect()
    }

    /// Every base (frozen) weight by name, prefixed by component (the denoiser's, `vae.`, then
    /// the text encoders'); loads the VAE and the text encoders if they are not yet.
    pub fn base_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = Vec::new();
        for (k, &c) in B::COMPONENTS.iter().enumerate() {
            if let Some(s) = self.backbone.store(c, true)? {
                v.extend(prefixed(c.as_str(), s.named_parameters()));
            }
            if k == 0 {
                v.extend(prefixed("vae", self.backbone.vae()?.store.named_parameters()));
            }
        }
        Ok(v)
    }

    /// Whether the VAE and every text encoder are loaded (they may load on first use).
    pub fn encoders_loaded(&self) -> (bool, bool) {
        let texts = B::COMPONENTS[1..].iter().all(|&c| matches!(self.backbone.store(c, false), Ok(Some(_))));
        (self.backbone.vae_loaded(), texts)
    }

    /// `pixels` of the pending `forward_batch(Train)`, attached to its graph and in the compute
    /// kind (f64 with `precision = fp64`): what finite-difference checks compare.
    pub fn pending_pixels(&self) -> Option<Tensor> {
        self.pending.as_ref().and_then(|p| p.pixels.as_ref().map(|t| t.detach()))
    }

    /// Whether a text encoder has LoRA (then texts are encoded with a graph, never cached).
    fn trains_text(&self) -> bool {
        self.groups.len() > 1
    }
}

/// Fresh LoRA on the denoiser (the config's targets, presets expanded by the backbone) and, with
/// `train_text_encoder`, on every text encoder, initialised from libtorch's generator seeded
/// with `seed` (under the lock; components in order, so the draws are reproducible).
fn inject_fresh<B: Backbone>(b: &B, t: &TrainConfig, seed: u64) -> Result<()> {
    let _lock = torch_rng();
    tch::manual_seed(seed as i64);
    let init = match t.lora_init {
        LoraInitName::Kaiming => LoraInit::KaimingUniform,
        LoraInitName::KaimingA1 => LoraInit::KaimingUniformA1,
        LoraInitName::Gaussian => LoraInit::Gaussian,
    };
    for (k, &c) in B::COMPONENTS.iter().enumerate() {
        if k > 0 && !t.train_text_encoder {
            continue;
        }
        let (target_modules, conv) = B::lora_targets(c, &t.lora_targets);
        let cfg = LoraConfig { r: t.lora_rank, alpha: t.alpha(), dropout: t.lora_dropout, target_modules, init, conv };
        let store = b.store(c, true)?.ok_or_else(|| input(format!("backbone has no component `{}`", c.as_str())))?;
        lora::inject(store, &cfg)?;
    }
    Ok(())
}

/// An initial LoRA file: PairEdit's layout (its `.pt` pickles and safetensors) on the denoiser's
/// Linears, else every layout core/diffusion's `lora_keys` reads.
fn inject_file<B: Backbone>(b: &B, path: &Path, kind: Kind, dropout: f64) -> Result<()> {
    let c = B::COMPONENTS[0];
    if let Some(store) = b.store(c, true)? {
        if let Some(mods) = pairedit::read_layout(path, store)? {
            return pairedit::inject_layout(mods, store, Net::Main, kind, dropout);
        }
    }
    adapter::inject_from_file(b, path, kind, dropout)
}

/// PairEdit's two networks on the denoiser (content first, then semantic, as PairEdit builds
/// them): each from its file (`lora_content`, `lora`: PairEdit's layout, .pt or .safetensors,
/// or any layout `lora` reads) or fresh from `seed`; no content network for variants without one.
fn inject_pairedit<B: Backbone>(b: &B, t: &TrainConfig, kind: Kind, seed: u64) -> Result<()> {
    let variant = t.pairedit.as_ref().expect("a pairedit config").variant;
    let c = B::COMPONENTS[0];
    let store = b.store(c, true)?.ok_or_else(|| input(format!("backbone has no component `{}`", c.as_str())))?;
    let (target_modules, conv) = B::lora_targets(c, &t.lora_targets);
    let init = match t.lora_init {
        LoraInitName::Kaiming => LoraInit::KaimingUniform,
        LoraInitName::KaimingA1 => LoraInit::KaimingUniformA1,
        LoraInitName::Gaussian => LoraInit::Gaussian,
    };
    let cfg = LoraConfig { r: t.lora_rank, alpha: t.alpha(), dropout: t.lora_dropout, target_modules, init, conv };
    let _lock = torch_rng();
    tch::manual_seed(seed as i64);
    let fill = |file: Option<&String>, net: Net, key: &'static str| -> Result<()> {
        match file {
            Some(path) => {
                let path = Path::new(path);
                match pairedit::read_layout(path, store)? {
                    Some(mods) => pairedit::inject_layout(mods, store, net, kind, t.lora_dropout),
                    None if net == Net::Main => adapter::inject_from_file(b, path, kind, t.lora_dropout),
                    None => Err(bad_config(
                        key,
                        format!("{} is not in PairEdit's layout (lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha on this model's layers)", path.display()),
                    )),
                }
            }
            None => lora::inject_at(store, &cfg, net).map(|_| ()).map_err(Into::into),
        }
    };
    if variant.has_content() {
        fill(t.lora_content.as_ref(), Net::Content, "lora_content")?;
    } else if t.lora_content.is_some() {
        return Err(bad_config(
            "lora_content",
            format!("the `{variant:?}` variant has no content LoRA: remove the key"),
        ));
    }
    if variant.has_semantic() || t.lora.is_some() {
        // `real` trains no semantic LoRA, but may carry one to edit with (`lora`).
        fill(t.lora.as_ref(), Net::Main, "lora")?;
    }
    Ok(())
}

/// The trainer's parsing of a config, with the plugin id on its errors.
fn parse<B: Backbone>(json: &str) -> likeness_sdk::Result<ModelConfig<B::Config>> {
    ModelConfig::parse(json).map_err(|e| e.plugin(B::ID))
}

impl<B: Backbone> ModelPlugin for LoraModel<B> {
    fn descriptor() -> PluginDescriptor {
        DescriptorBuilder::new(B::ID, likeness_sdk::PluginKind::Model, B::VERSION)
            .summary(B::SUMMARY)
            .differentiable(true)
            .devices(&[DeviceType::Cpu, DeviceType::Cuda])
            .dtypes(&[DataType::F32])
            .config_schema(config::schema::<B>())
            .libtorch(likeness_sdk_torch::LIBTORCH_VERSION)
            .build()
    }

    fn interface(config_json: &str) -> likeness_sdk::Result<ModelInterface> {
        let c = parse::<B>(config_json)?;
        // A text encoder trains with `train_text_encoder`, or when the initial LoRA has
        // text-encoder modules (`new` makes them a parameter group): the same rule as `new`'s.
        let trains_text = c.train.train_text_encoder
            || match &c.train.lora {
                Some(path) => {
                    adapter::file_has_text_encoder(Path::new(path), B::COMPONENTS[0]).map_err(|e| e.plugin(B::ID))?
                }
                None => false,
            };
        Ok(config::interface::<B>(&c.train, trains_text))
    }

    fn create(config_json: &str, device: Device, seed: u64) -> likeness_sdk::Result<Self> {
        LoraModel::new(parse::<B>(config_json)?, device, seed).map_err(|e| e.plugin(B::ID))
    }

    fn parameters(&self) -> likeness_sdk::Result<ParameterInfo> {
        let trainable: i64 = self.lora_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
        // Counted by shape, so asking does not load the encoders.
        let base = self.backbone.base_parameter_count();
        Ok(ParameterInfo { trainable: trainable as u64, total: (trainable + base) as u64 })
    }

    /// The 1.0 form (no texts, no step context): only `Eval` with cached text encodings.
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
        self.forward_impl(images, texts, ctx, mode).map_err(|e| e.plugin(B::ID))
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
        self.step_groups(s, groups)
    }

    fn zero_grad(&mut self) -> likeness_sdk::Result<()> {
        for (_, o) in self.groups.iter_mut() {
            o.zero_grad();
        }
        Ok(())
    }

    fn save_state(&mut self, dir: &Path, with_optimizer: bool) -> likeness_sdk::Result<()> {
        self.save(dir, with_optimizer).map_err(|e| e.plugin(B::ID))
    }

    fn load_state(&mut self, dir: &Path) -> likeness_sdk::Result<()> {
        self.load(dir).map_err(|e| e.plugin(B::ID))?;
        self.pending = None;
        self.zero_grad()
    }

    fn sample(&mut self, r: &SampleRequest<'_>) -> likeness_sdk::Result<ManagedTensor> {
        self.sample_impl(r).map_err(|e| e.plugin(B::ID))
    }

    fn export_adapter(
        &mut self,
        dir: &Path,
        format: &str,
        metadata: &serde_json::Map<String, serde_json::Value>,
    ) -> likeness_sdk::Result<Vec<PathBuf>> {
        adapter::export(&self.backbone, &self.config.backbone, dir, format, metadata).map_err(|e| e.plugin(B::ID))
    }

    fn encode(
        &mut self,
        name: &str,
        images: Inputs<'_>,
        texts: Texts<'_>,
    ) -> likeness_sdk::Result<Vec<(String, ManagedTensor)>> {
        self.encode_impl(name, images, texts).map_err(|e| e.plugin(B::ID))
    }
}
