//! `sd15-lora`: Stable Diffusion 1.5 LoRA training as a likeness model plugin.
//!
//! This crate is SD1.5's backbone and nothing else: the pipeline's files and networks
//! ([`model`]: UNet2DConditionModel, AutoencoderKL, CLIP text encoder with `clip_skip`, the
//! tokenizer, the scheduler), its config keys and LoRA presets ([`config`], `src/presets/`), and
//! the [`Backbone`] impl below. The training step, optimizer groups, save/load, encode/cache,
//! sampling dispatch and adapter import/export are core/diffusion-torch's generic
//! [`LoraModel`] (its module docs describe the step and the saved state); the networks, LoRA
//! injection and the denoising loop are core/diffusion-torch's too, schedules, timestep
//! sampling, weightings and LoRA file formats core/diffusion's, the tokenizer core/clip's.
//!
//! # Interface (ABI 1.1 `interface`, the toolkit's `trainer::config::interface`)
//! * images `target` (required, f32 `[B, 3, H, W]` in [0, 1], H and W multiples of the VAE
//!   factor; or its encoding `latents`), `reference` (optional: the identity term reads it
//!   through the engine, the model does not);
//! * texts `caption` (required; or its encoding `text_embeddings` when the text encoder is frozen);
//! * outputs `pixels` (x̂0 → VAE decode with gradient → (x+1)/2, only with `decode_pixels`),
//!   `timesteps` (`[B]` f32, t / num_train_timesteps) and `timestep_weights` (min-SNR-γ);
//! * encodings `latents` (the VAE posterior mean × scaling_factor) and `text_embeddings`
//!   (`[B, 77, D]`, the UNet's conditioning after `clip_skip`);
//! * parameter groups `unet` (+ `text_encoder` with `train_text_encoder`); adapter formats
//!   `kohya`, `diffusers`, `peft`; `can_sample`.

use likeness_diffusion::lora_keys::{BaseArch, Component};
use likeness_diffusion_torch::trainer::{Result, TrainConfig};
use likeness_diffusion_torch::{
    Backbone, LatentSpace, Lazy, LoraModel, Objective, Replay, SampleScheduler, SampleSettings, Store, TextEncoding,
    Vae,
};
use tch::{Device, Tensor};

pub mod config;
pub mod model;
pub mod text;

/// The per-sample draws (re-exported: tests reproduce the plugin's noise).
pub use likeness_diffusion_torch::rng;

use config::Sd15Config;
use model::Pipeline;

/// The plugin id users type.
pub const ID: &str = "sd15-lora";

/// The plugin: the toolkit's LoRA trainer over the SD1.5 backbone.
pub type Sd15Lora = LoraModel<Sd15>;

/// SD1.5's networks and settings.
pub struct Sd15 {
    pipe: Pipeline,
    config: Sd15Config,
    device: Device,
}

impl Sd15 {
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipe
    }
}

impl Backbone for Sd15 {
    type Config = Sd15Config;
    const ID: &'static str = ID;
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str = "Stable Diffusion 1.5 LoRA: diffusion loss, x̂0 pixels for identity losses, DDIM/Euler sampling, kohya/diffusers/PEFT adapters";
    const ARCH: BaseArch = BaseArch::Sd15;
    const COMPONENTS: &'static [Component] = &[Component::Unet, Component::TextEncoder];
    const LATENTS_KEYS: &'static [&'static str] = &["pretrained", "config", "precision"];
    const TEXT_ENCODINGS: &'static [TextEncoding] = &[TextEncoding {
        name: "text_embeddings",
        keys: &["pretrained", "config", "tokenizer", "precision", "clip_skip"],
    }];

    fn load(config: &Sd15Config, train: &TrainConfig, device: Device) -> Result<Self> {
        let pipe = Pipeline::load(config, train.precision.kind(), device)?;
        Ok(Sd15 { pipe, config: config.clone(), device })
    }

    fn objective(&self) -> &Objective {
        &self.pipe.objective
    }

    fn denoise(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &[Tensor],
        reseed: Option<i64>,
    ) -> likeness_diffusion_torch::Result<Tensor> {
        Ok(self.pipe.unet.forward_reseeded(x_t, t, &cond[0], reseed))
    }

    fn denoise_checkpointed(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &[Tensor],
        reseed: Option<i64>,
    ) -> Result<(Tensor, Replay<Self>)> {
        let (out, tape) = self.pipe.unet.forward_checkpointed(x_t, t, &cond[0], reseed);
        Ok((
            out,
            Box::new(move |b: &Sd15| {
                tape.backward(&b.pipe.unet);
            }),
        ))
    }

    fn lazy_vae(&self) -> &Lazy<Vae> {
        &self.pipe.vae
    }

    fn latent_space(&self) -> LatentSpace {
        (&self.pipe.vae_config).into()
    }

    fn text_shapes(&self) -> Vec<Vec<i64>> {
        vec![vec![self.pipe.context_length() as i64, self.pipe.text_config.hidden_size]]
    }

    fn encode_texts(&self, texts: &[&str], grad: bool) -> Result<Vec<Tensor>> {
        Ok(vec![self.pipe.embed_texts(texts, self.config.clip_skip, self.device, grad)?])
    }

    fn store(&self, c: Component, load: bool) -> Result<Option<&Store>> {
        // `if`s, not a `match`: core/diffusion's components grow with the DiT backbones.
        Ok(if c == Component::Unet {
            Some(&self.pipe.unet_store)
        } else if c != Component::TextEncoder {
            None
        } else if load {
            Some(self.pipe.text.get()?.store())
        } else {
            self.pipe.text.loaded().map(|t| t.store())
        })
    }

    fn base_parameter_count(&self) -> i64 {
        self.pipe.unet_store.parameter_count() + self.pipe.encoder_parameters
    }

    fn lora_targets(c: Component, targets: &[String]) -> (Vec<String>, bool) {
        if c == Component::Unet {
            config::unet_patterns(targets)
        } else {
            (config::TEXT_ENCODER_TARGETS.map(String::from).to_vec(), false)
        }
    }

    fn sampling(&self) -> SampleSettings<'_> {
        let c = &self.config;
        SampleSettings {
            scheduler: SampleScheduler::Ddpm { sampler: c.sampler.sampler(), config: &self.pipe.scheduler },
            steps: c.sample_steps,
            guidance: c.guidance,
            resolution: c.resolution,
        }
    }
}

likeness_sdk::export_model_plugin!(Sd15Lora);
