//! What a diffusion backbone provides to the toolkit's LoRA trainer ([`crate::trainer`]): its
//! denoiser's forward on the toolkit's [`Store`]s, its VAE, its text encoder(s), its training
//! objective (prediction type and noise schedule), its LoRA components and their stores (the hook
//! of core/diffusion's `lora_keys` for adapter import/export), its LoRA target presets, its
//! checkpointing and its own config keys. Everything else — draws, targets, x̂0, the internal
//! loss, optimizer groups, save/load, encode/cache, sampling dispatch, adapter I/O — is the
//! trainer's, written once.
//!
//! A backbone plugin is `pub type MyLora = LoraModel<MyBackbone>;` plus
//! `likeness_sdk::export_model_plugin!(MyLora);`: the trainer implements `ModelPlugin` for every
//! `LoraModel<B: Backbone>`, so no plugin writes (or copies) the forwarding of the ABI calls.

use crate::identity::{IdentityConfig, IdentityInjection};
use std::cell::OnceCell;
use std::fmt::Debug;

use likeness_diffusion::lora_keys::{BaseArch, Component};
use likeness_diffusion::lora_meta::QwenImageVariant;
use likeness_diffusion::schedules::{self, Prediction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::{Device, Tensor};

use crate::config::VaeConfig;
use crate::qwen_vae::QwenImageVae;
use crate::sampling::{FlowMatchConfig, Guidance, Sampler, SchedulerConfig};
use crate::store::Store;
use crate::trainer::{file, ModelError, Result, TrainConfig};
use crate::vae::AutoencoderKL;

/// What the denoiser is trained to predict, and over which noise process.
#[derive(Clone, Debug, PartialEq)]
pub enum Objective {
    /// DDPM: integer timesteps `0..alphas_cumprod.len()`, `x_t = √ᾱ·x0 + √(1−ᾱ)·ε`, the
    /// network predicts ε or v (`training::add_noise`, `v_target`, `predict_x0`).
    Ddpm { prediction: Prediction, alphas_cumprod: Vec<f64> },
    /// Rectified flow: σ ∈ [0, 1], `x_t = (1−σ)·x0 + σ·ε`, the network predicts the velocity
    /// `ε − x0` at timestep `σ·num_train_timesteps` (`training::flow_add_noise`, `flow_target`,
    /// `flow_predict_x0`).
    FlowMatching { num_train_timesteps: usize },
}

impl Objective {
    /// The DDPM objective of a scheduler config (`prediction_type` already overridden by the
    /// plugin's config if it has one); `sample` prediction is refused for training.
    pub fn ddpm(path: &str, scheduler: &SchedulerConfig) -> Result<Self> {
        if scheduler.prediction == Prediction::Sample {
            return Err(file(
                path,
                "field `prediction_type`: `sample` is not supported for training (epsilon, v_prediction); set the plugin's `prediction_type`",
            ));
        }
        Ok(Objective::Ddpm { prediction: scheduler.prediction, alphas_cumprod: scheduler.alphas_cumprod()? })
    }

    pub fn num_train_timesteps(&self) -> usize {
        match self {
            Objective::Ddpm { alphas_cumprod, .. } => alphas_cumprod.len(),
            Objective::FlowMatching { num_train_timesteps } => *num_train_timesteps,
        }
    }

    /// The timestep of an `Eval` forward without seeds, the middle of the training schedule:
    /// DDPM `num_train_timesteps / 2` (t = 500 for SD's 1000), flow σ = ½ (timestep T/2).
    pub fn eval_timestep(&self) -> f64 {
        match self {
            Objective::Ddpm { .. } => (self.num_train_timesteps() / 2) as f64,
            Objective::FlowMatching { .. } => 0.5,
        }
    }

    /// SNR(t) = ᾱ/(1 − ᾱ) of a DDPM timestep (`None` for flow matching, which has no min-SNR-γ).
    pub fn snr(&self, t: usize) -> Option<f64> {
        match self {
            Objective::Ddpm { alphas_cumprod, .. } => Some(schedules::snr(&alphas_cumprod[t..=t])[0]),
            Objective::FlowMatching { .. } => None,
        }
    }

    /// As sd-scripts' model spec spells the prediction type.
    pub fn modelspec_prediction(&self) -> &'static str {
        match self {
            Objective::Ddpm { prediction: Prediction::VPrediction, .. } => "v",
            Objective::Ddpm { .. } => "epsilon",
            Objective::FlowMatching { .. } => "flow",
        }
    }
}

/// What the trainer needs of a VAE: images in [−1, 1] ↔ latents, and the map between the VAE's
/// raw latents and the denoiser's (SD's `scaling_factor`, Flux's shift + scale, Qwen-Image's
/// per-channel mean / std). The toolkit's `AutoencoderKL` and Qwen-Image's causal-3D VAE on
/// single frames implement it.
pub trait LatentCodec: Send {
    /// Images `[B, 3, H, W]` in [−1, 1] → the posterior's (mean, logvar), raw latents.
    fn encode(&self, x: &Tensor) -> (Tensor, Tensor);
    /// Raw latents → images in [−1, 1] (differentiable).
    fn decode(&self, z: &Tensor) -> Tensor;
    /// Raw latents → the denoiser's latents.
    fn scale_latent(&self, z: &Tensor) -> Tensor;
    /// The denoiser's latents → raw latents.
    fn unscale_latent(&self, z: &Tensor) -> Tensor;
}

impl LatentCodec for AutoencoderKL {
    fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        AutoencoderKL::encode(self, x)
    }
    fn decode(&self, z: &Tensor) -> Tensor {
        AutoencoderKL::decode(self, z)
    }
    fn scale_latent(&self, z: &Tensor) -> Tensor {
        AutoencoderKL::scale_latent(self, z)
    }
    fn unscale_latent(&self, z: &Tensor) -> Tensor {
        AutoencoderKL::unscale_latent(self, z)
    }
}

impl LatentCodec for QwenImageVae {
    fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        QwenImageVae::encode(self, x)
    }
    fn decode(&self, z: &Tensor) -> Tensor {
        QwenImageVae::decode(self, z)
    }
    /// QwenImageEditPlusPipeline's `(z − latents_mean) / latents_std`.
    fn scale_latent(&self, z: &Tensor) -> Tensor {
        self.normalize(z)
    }
    fn unscale_latent(&self, z: &Tensor) -> Tensor {
        self.denormalize(z)
    }
}

/// A VAE with its store.
pub struct Vae {
    pub store: Store,
    pub model: Box<dyn LatentCodec>,
}

impl Vae {
    pub fn new(store: Store, model: impl LatentCodec + 'static) -> Self {
        Vae { store, model: Box::new(model) }
    }

    /// The `AutoencoderKL` of a diffusers pipeline folder (`<root>/vae`), loaded on first use.
    pub fn lazy_from_diffusers(root: &std::path::Path, kind: tch::Kind, device: Device) -> Lazy<Vae> {
        let root = root.to_path_buf();
        Lazy::new(move || {
            let (store, model) = crate::load::vae_from_diffusers(&root, kind, device)?;
            Ok(Vae::new(store, model))
        })
    }
}

/// A VAE's latent space as the trainer sees it (known from the VAE's config, before its weights
/// load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentSpace {
    /// Latent channels (SD 4, Flux and Qwen-Image 16).
    pub channels: i64,
    /// Pixels per latent pixel per side (8).
    pub factor: i64,
}

impl From<&VaeConfig> for LatentSpace {
    fn from(c: &VaeConfig) -> Self {
        LatentSpace { channels: c.latent_channels, factor: c.downscale_factor() }
    }
}

/// An image input the backbone conditions on besides `target` (edit models' control images),
/// declared in the model's interface. A name ending in `_*` is a role pattern: `control_*`
/// matches `control` and every `control_<n>` (core/abi's ModelInterface docs).
#[derive(Clone, Copy, Debug)]
pub struct ConditionImage {
    pub name: &'static str,
    pub required: bool,
    pub doc: &'static str,
}

/// Whether role `role` is matched by a declared image `name` (exactly, or as a `_*` pattern).
pub fn role_matches(name: &str, role: &str) -> bool {
    match name.strip_suffix("_*") {
        Some(stem) => role == stem || role.strip_prefix(stem).and_then(|r| r.strip_prefix('_')).is_some_and(is_index),
        None => role == name,
    }
}

fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The position of a pattern-matched role: `control` is 0, `control_<n>` is n.
pub fn role_index(role: &str) -> usize {
    role.rsplit_once('_').and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
}

/// One cacheable part of the conditioning of a backbone with condition images
/// ([`Backbone::CONDITION_ENCODINGS`]), an encoding of several inputs (issue 17: Qwen2.5-VL reads
/// the caption with the control images; the VAE reads the control images alone).
#[derive(Clone, Copy, Debug)]
pub struct ConditionEncoding {
    /// The encoding's name (`encode`'s and the cache's).
    pub name: &'static str,
    /// What it reads: `caption` and/or condition-image names or patterns (`control_*`).
    pub sources: &'static [&'static str],
    /// The names of its outputs, which are also the inputs a cached value comes back as; an
    /// entry ending in `*` is a prefix (`latents.*`: one output per control role). An output
    /// `x` with an `x_mask` is variable-length (core/abi's `EncodingDecl`).
    pub outputs: &'static [&'static str],
    /// The config keys whose change invalidates a cached value.
    pub keys: &'static [&'static str],
}

impl ConditionEncoding {
    /// Whether input `name` is one of its outputs.
    pub fn produces(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| match o.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix) && name.len() > prefix.len(),
            None => *o == name,
        })
    }

    /// Whether it reads the caption.
    pub fn reads_caption(&self) -> bool {
        self.sources.contains(&"caption")
    }

    /// Whether it reads condition image `role`.
    pub fn reads_image(&self, role: &str) -> bool {
        self.sources.iter().any(|s| *s != "caption" && role_matches(s, role))
    }

    /// The condition images among `images` that it reads, in their order.
    pub fn images_read(&self, images: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        images.iter().filter(|(r, _)| self.reads_image(r)).map(|(r, x)| (r.clone(), x.shallow_clone())).collect()
    }
}

/// One cacheable text encoding: its name (an input and an `encode` output) and the config keys
/// whose change invalidates a cached value.
#[derive(Clone, Copy, Debug)]
pub struct TextEncoding {
    pub name: &'static str,
    pub keys: &'static [&'static str],
}

/// The schedule `sample` steps along: a DDPM-family sampler over its betas (SD's DDIM / Euler),
/// or flow-matching Euler (FluxPipeline's sigmas, shifted by μ at the image's token count).
pub enum SampleScheduler<'a> {
    Ddpm { sampler: Sampler, config: &'a SchedulerConfig },
    FlowMatch(&'a FlowMatchConfig),
}

/// The defaults of `sample`, from the backbone's config.
pub struct SampleSettings<'a> {
    pub scheduler: SampleScheduler<'a>,
    pub steps: u32,
    pub guidance: f64,
    pub resolution: u32,
}

/// The backbone's config keys, beside the toolkit's [`TrainConfig`] in one JSON object.
pub trait BackboneConfig: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + 'static {
    /// JSON Schema `properties` of the backbone's keys (a key also in [`TrainConfig`]'s schema
    /// replaces its description there, e.g. `lora_targets` with the backbone's presets).
    fn properties() -> serde_json::Value;
    /// The keys that must be given.
    fn required() -> &'static [&'static str] {
        &[]
    }
    /// Checks beyond the types (paths exist, ranges); every error names the key and the fix.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// The base model, as written into adapter metadata (`ss_sd_model_name`).
    fn base_model(&self) -> &str;
}

/// Called after the trainer back-propagated into a checkpointed denoiser output: recomputes the
/// segments and pushes the gradient into the LoRA weights (see
/// [`Backbone::denoise_checkpointed`]).
pub type Replay<B> = Box<dyn FnOnce(&B) + Send>;

/// The [`Replay`] of a checkpointed forward: the tape's backward through the backbone's
/// network `net` (the transformer whose segments the tape recorded).
pub fn replay_tape<B: Backbone, N: crate::checkpoint::Segments + 'static>(
    tape: Option<crate::checkpoint::Tape>,
    net: fn(&B) -> &N,
) -> Replay<B> {
    let tape = tape.expect("a checkpointed forward returns its tape");
    Box::new(move |b: &B| {
        tape.backward(net(b));
    })
}

/// A diffusion backbone. Required: the networks and what they are; the rest has defaults.
pub trait Backbone: Send + Sized + 'static {
    type Config: BackboneConfig;
    /// The plugin id users type (also the prefix of every message).
    const ID: &'static str;
    /// The plugin's version (its crate's `env!("CARGO_PKG_VERSION")`, not the toolkit's).
    const VERSION: &'static str;
    /// The descriptor's one-line summary.
    const SUMMARY: &'static str;
    /// The architecture adapter files are written for and read as.
    const ARCH: BaseArch;
    /// The networks LoRA may patch, denoiser first; each is a parameter group named
    /// [`Component::as_str`] and a key-map component of core/diffusion's `lora_keys`.
    const COMPONENTS: &'static [Component];
    /// The config keys whose change invalidates cached `latents`.
    const LATENTS_KEYS: &'static [&'static str];
    /// The cacheable text encodings, in the order of [`encode_texts`](Self::encode_texts).
    const TEXT_ENCODINGS: &'static [TextEncoding];
    /// The side of the latent patches the denoiser packs into one token (Flux and Qwen-Image: 2;
    /// a UNet: 1).
    const PATCH: i64 = 1;
    /// The Qwen-Image variant adapter metadata names (`modelspec.architecture`,
    /// `ss_base_model_version`; read for [`BaseArch::QwenImage`] only).
    const QWEN_VARIANT: QwenImageVariant = QwenImageVariant::TextToImage;
    /// Images the denoiser is conditioned on besides `target` (edit models' `control_*`), given
    /// to [`condition`](Self::condition). Default: none.
    const CONDITION_IMAGES: &'static [ConditionImage] = &[];
    /// The cacheable parts of [`condition`](Self::condition) (frozen encoders: computed without a
    /// graph), each computed by [`encode_condition`](Self::encode_condition) and joined by
    /// [`assemble_condition`](Self::assemble_condition). Default: none (the conditioning is not
    /// cached).
    const CONDITION_ENCODINGS: &'static [ConditionEncoding] = &[];

    /// Loads the networks (the denoiser now; encoders may load on first use).
    fn load(config: &Self::Config, train: &TrainConfig, device: Device) -> Result<Self>;

    fn objective(&self) -> &Objective;

    /// The denoiser: `x_t` `[B, C, h, w]`, timesteps `[B]` in the model's units (DDPM: integer
    /// t; flow: σ·num_train_timesteps), the conditioning of [`encode_texts`](Self::encode_texts)
    /// → the prediction `[B, C, h, w]`. With `reseed`, libtorch's generator is seeded per segment
    /// (LoRA dropout; the trainer holds the generator's lock).
    fn denoise(&self, x_t: &Tensor, t: &Tensor, cond: &[Tensor], reseed: Option<i64>) -> crate::Result<Tensor>;

    /// The denoiser with gradient checkpointing: the output is a leaf; after the backward into it
    /// the trainer calls the returned [`Replay`]. Default: the backbone declares no segments.
    fn denoise_checkpointed(
        &self,
        _x_t: &Tensor,
        _t: &Tensor,
        _cond: &[Tensor],
        _reseed: Option<i64>,
    ) -> Result<(Tensor, Replay<Self>)> {
        Err(ModelError::NotImplemented(format!(
            "gradient checkpointing: backbone `{}` declares no checkpointing segments; set gradient_checkpointing = false",
            Self::ID
        )))
    }

    /// Installs DTBack's identity injection (crate::identity) at the backbone's injection
    /// points. Default: the backbone has none.
    fn install_identity(&mut self, _c: &IdentityConfig, _kind: tch::Kind, _seed: u64) -> Result<()> {
        Err(ModelError::NotImplemented(format!(
            "identity: backbone `{}` has no identity-injection points (DTBack's injection is implemented for Flux: flux-lora)",
            Self::ID
        )))
    }

    /// The installed identity injection, if any.
    fn identity(&self) -> Option<&IdentityInjection> {
        None
    }

    /// [`denoise_checkpointed`](Self::denoise_checkpointed) with an explicit embedded guidance
    /// scale `[B]` (PairEdit's `guidance_scale`). Default: without one, the plain checkpointed
    /// denoiser; with one, not implemented.
    fn denoise_checkpointed_guided(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        guidance: Option<&Tensor>,
        cond: &[Tensor],
        reseed: Option<i64>,
    ) -> Result<(Tensor, Replay<Self>)> {
        match guidance {
            None => self.denoise_checkpointed(x_t, t, cond, reseed),
            Some(_) => Err(ModelError::NotImplemented(format!(
                "gradient checkpointing with an explicit guidance scale: backbone `{}` has no guidance input",
                Self::ID
            ))),
        }
    }

    /// The VAE, loaded on first use (the trainer reaches it through [`vae`](Self::vae)).
    fn lazy_vae(&self) -> &Lazy<Vae>;
    /// Its latent space (known without loading the weights).
    fn latent_space(&self) -> LatentSpace;
    /// The VAE (loading it now if this is its first use).
    fn vae(&self) -> Result<&Vae> {
        self.lazy_vae().get()
    }
    /// Whether the VAE weights are loaded.
    fn vae_loaded(&self) -> bool {
        self.lazy_vae().loaded().is_some()
    }

    /// Per-sample shape of each [`TEXT_ENCODINGS`](Self::TEXT_ENCODINGS) entry.
    fn text_shapes(&self) -> Vec<Vec<i64>>;
    /// The conditioning of `texts`, one tensor per text encoding (with a graph when `grad` and a
    /// text encoder has trainable LoRA).
    fn encode_texts(&self, texts: &[&str], grad: bool) -> Result<Vec<Tensor>>;

    /// The conditioning of a batch whose [`CONDITION_IMAGES`](Self::CONDITION_IMAGES) are
    /// `images`: (role, f32 `[B, 3, H, W]` in [0, 1] on the model's device), in declaration order
    /// and, within a pattern, by index (`control`, `control_1`, …); empty when the batch has
    /// none. Default: the text encodings, refusing images (a backbone that declares condition
    /// images overrides this).
    /// With [`CONDITION_ENCODINGS`](Self::CONDITION_ENCODINGS), the default computes each and
    /// assembles them.
    fn condition(&self, texts: &[&str], images: &[(String, Tensor)], grad: bool) -> Result<Vec<Tensor>> {
        if !Self::CONDITION_ENCODINGS.is_empty() {
            let mut parts = Vec::new();
            for e in Self::CONDITION_ENCODINGS {
                let texts: &[&str] = if e.reads_caption() { texts } else { &[] };
                let read = e.images_read(images);
                if texts.is_empty() && read.is_empty() {
                    continue;
                }
                parts.extend(tch::no_grad(|| self.encode_condition(e.name, texts, &read))?);
            }
            return self.assemble_condition(&parts);
        }
        if let Some((role, _)) = images.first() {
            return Err(ModelError::Input(format!(
                "backbone `{}` declares no condition image, got `{role}`",
                Self::ID
            )));
        }
        self.encode_texts(texts, grad)
    }

    /// [`CONDITION_ENCODINGS`](Self::CONDITION_ENCODINGS) entry `name` of `texts` (empty when it
    /// does not read the caption) and the condition images it reads (as in
    /// [`condition`](Self::condition)): its named outputs, batch first; a variable-length `x`
    /// with `x_mask` `[n, L]`.
    fn encode_condition(
        &self,
        name: &str,
        _texts: &[&str],
        _images: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>> {
        Err(ModelError::Input(format!("backbone `{}` declares no condition encoding `{name}`", Self::ID)))
    }

    /// The conditioning from every condition encoding's outputs (computed now, or cached and
    /// passed back as inputs, a variable-length `x`'s padding marked by `x_mask`, f32): what
    /// [`condition`](Self::condition) returns.
    fn assemble_condition(&self, _parts: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        Err(ModelError::Input(format!("backbone `{}` declares no condition encodings", Self::ID)))
    }

    /// A component's store: `load` loads a lazily loaded component; without it an unloaded one
    /// is `None` (it carries no LoRA). `None` too for a component this backbone lacks.
    fn store(&self, c: Component, load: bool) -> Result<Option<&Store>>;
    /// Parameters of every network, counted by shape (asking must not load the encoders).
    fn base_parameter_count(&self) -> i64;

    /// The LoRA patterns of component `c` for the config's `lora_targets` (presets expanded),
    /// and whether convolutions are targeted (LoCon). Default: the names as given, Linear only.
    fn lora_targets(_c: Component, targets: &[String]) -> (Vec<String>, bool) {
        (targets.to_vec(), false)
    }

    /// `sample`'s sampler, scheduler and defaults.
    fn sampling(&self) -> SampleSettings<'_>;

    /// Image tokens of a `[h, w]` latent, the dynamic shift's `image_seq_len` (FluxPipeline:
    /// `latents.shape[1]` after its 2×2 packing, h·w/4). Default: the latent's
    /// [`PATCH`](Self::PATCH)×`PATCH` patches.
    fn image_seq_len(&self, h: i64, w: i64) -> usize {
        ((h / Self::PATCH) * (w / Self::PATCH)) as usize
    }

    /// How `sample` applies a guidance scale (the request's, else `sampling().guidance`).
    /// Default: classifier-free guidance when > 1 ([`Guidance::cfg`], StableDiffusionPipeline's
    /// rule). A guidance-distilled model (FLUX.1-dev) returns `Guidance::Embedded(scale)`.
    fn guidance(&self, scale: f64) -> Guidance {
        Guidance::cfg(scale)
    }

    /// The denoiser as `sample` calls it: [`denoise`](Self::denoise) plus the embedded guidance
    /// scale `[B]` (f32) when [`guidance`](Self::guidance) is `Embedded` or `TrueCfg { embedded:
    /// Some(_) }`. Default: `denoise`, refusing a scale (the model has no guidance input).
    fn denoise_guided(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        guidance: Option<&Tensor>,
        cond: &[Tensor],
        reseed: Option<i64>,
    ) -> crate::Result<Tensor> {
        if guidance.is_some() {
            return Err(crate::Error::Config {
                path: Self::ID.into(),
                field: "guidance".into(),
                msg: "this backbone's denoiser has no guidance input; override denoise_guided or return CFG from guidance()"
                    .into(),
            });
        }
        self.denoise(x_t, t, cond, reseed)
    }
}

/// A component whose weights load on first use (a backbone's VAE and text encoders: a run on a
/// warm encoding cache never needs them).
pub struct Lazy<T> {
    cell: OnceCell<T>,
    load: Box<dyn Fn() -> Result<T> + Send>,
}

impl<T> Lazy<T> {
    pub fn new(load: impl Fn() -> Result<T> + Send + 'static) -> Self {
        Lazy { cell: OnceCell::new(), load: Box::new(load) }
    }

    /// The component, loading it now if this is the first use.
    pub fn get(&self) -> Result<&T> {
        if let Some(v) = self.cell.get() {
            return Ok(v);
        }
        let v = (self.load)()?;
        Ok(self.cell.get_or_init(|| v))
    }

    /// The component if it has been loaded.
    pub fn loaded(&self) -> Option<&T> {
        self.cell.get()
    }
}
