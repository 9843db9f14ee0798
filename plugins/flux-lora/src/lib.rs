//! `flux-lora`: Flux.1 LoRA training as a likeness model plugin.
//!
//! This crate is Flux's backbone and nothing else: the pipeline's files and networks
//! ([`model`]: FluxTransformer2DModel, the 16-channel Flux VAE, CLIP-L pooled + T5, both
//! tokenizers, the flow-matching scheduler), its config keys and LoRA presets ([`config`]), and
//! the [`Backbone`] impl below. The training step (flow matching: `x_t = (1−σ)·x0 + σ·ε`, target
//! `ε − x0`, x̂0 = x_t − σ·v̂), optimizer groups, save/load, encode/cache, sampling dispatch and
//! adapter import/export are core/diffusion-torch's generic [`LoraModel`]; the networks are
//! core/diffusion-torch's too (`flux`, `vae`, `clip_text`, `t5`), timestep samplings and LoRA file
//! formats core/diffusion's.
//!
//! # Interface (ABI 1.1 `interface`, the toolkit's `trainer::config::interface`)
//! * images `target` (required, f32 `[B, 3, H, W]` in [0, 1], H and W multiples of twice the
//!   VAE factor — the 2×2 packing; or its encoding `latents`), `reference` (optional: read by the
//!   engine's identity term);
//! * texts `caption` (required; or its encodings `t5_embeddings` + `pooled_embeddings`);
//! * outputs `pixels` (x̂0 decoded with gradient, with `decode_pixels`), `timesteps` (σ) and
//!   `timestep_weights`;
//! * parameter group `transformer`; adapter formats `kohya` (BFL names), `diffusers`, `peft`;
//!   `can_sample` (FluxPipeline's Euler loop with Flux-dev's embedded guidance).

use likeness_diffusion::lora_keys::{BaseArch, Component};
use likeness_diffusion_torch::flux::{self, FluxInputs};
use likeness_diffusion_torch::identity::{IdentityConfig, IdentityInjection};
use likeness_diffusion_torch::sampling::Guidance;
use likeness_diffusion_torch::trainer::{ModelError, Result, TrainConfig};
use likeness_diffusion_torch::{
    replay_tape, Backbone, LatentSpace, Lazy, LoraModel, Objective, Replay, SampleScheduler, SampleSettings, Store,
    TextEncoding, Vae,
};
use tch::{Device, Kind, Tensor};

pub mod config;
pub mod model;

use config::FluxLoraConfig;
use model::Pipeline;

/// The plugin id users type.
pub const ID: &str = "flux-lora";

/// The plugin: the toolkit's LoRA trainer over the Flux backbone.
pub type FluxLora = LoraModel<Flux>;

/// Flux's networks and settings.
pub struct Flux {
    pipe: Pipeline,
    config: FluxLoraConfig,
    device: Device,
}

impl Flux {
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipe
    }

    /// The transformer's inputs for latents `[B, 16, h, w]`: packed tokens, position ids, σ and
    /// the embedded guidance (Flux-dev).
    fn run(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        guidance: Option<&Tensor>,
        cond: &[Tensor],
        checkpointed: Option<Option<i64>>,
        reseed: Option<i64>,
    ) -> likeness_diffusion_torch::Result<(Tensor, Option<flux::FluxTape>)> {
        let (b, _, h, w) = x_t.size4()?;
        if h % 2 != 0 || w % 2 != 0 {
            let f = 2 * self.pipe.vae_config.downscale_factor();
            return Err(likeness_diffusion_torch::Error::Config {
                path: ID.into(),
                field: "resolution".into(),
                msg: format!(
                    "latents of {h}×{w} cannot be packed into 2×2 patches: image sides must be multiples of {f} \
                     (twice the VAE factor); pick a resolution / bucket size that is"
                ),
            });
        }
        let dev = x_t.device();
        let packed = flux::pack_latents(x_t);
        let img_ids = flux::latent_image_ids(h / 2, w / 2, dev);
        let txt_ids = Tensor::zeros([cond[0].size()[1], 3], (Kind::Float, dev));
        // FluxPipeline: `timestep = t / 1000` (σ) in f32.
        let sigma = t.to_kind(Kind::Float) / self.pipe.scheduler.num_train_timesteps as f64;
        let train_guidance;
        let guidance = match (guidance, self.pipe.transformer.config.guidance_embeds) {
            (Some(g), _) => Some(g),
            (None, true) => {
                train_guidance = Tensor::full([b], self.config.guidance_scale, (Kind::Float, dev));
                Some(&train_guidance)
            }
            (None, false) => None,
        };
        let inputs = FluxInputs {
            hidden_states: &packed,
            encoder_hidden_states: &cond[0],
            pooled_projections: &cond[1],
            timestep: &sigma,
            img_ids: &img_ids,
            txt_ids: &txt_ids,
            guidance,
            // The identity tokens ride as a third conditioning tensor (crate docs).
            id_tokens: cond.get(2),
        };
        let tr = &self.pipe.transformer;
        let (v, tape) = match checkpointed {
            Some(seed) => {
                let (v, tape) = tr.forward_checkpointed(&inputs, seed)?;
                (v, Some(tape))
            }
            None => (tr.forward_reseeded(&inputs, reseed)?, None),
        };
        Ok((flux::unpack_latents(&v, h, w), tape))
    }
}

impl Backbone for Flux {
    type Config = FluxLoraConfig;
    const ID: &'static str = ID;
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str = "Flux.1 LoRA: flow matching, x̂0 pixels for identity losses, FluxPipeline sampling with embedded guidance, kohya (BFL)/diffusers/PEFT adapters";
    const ARCH: BaseArch = BaseArch::Flux;
    const COMPONENTS: &'static [Component] = &[Component::Transformer];
    const LATENTS_KEYS: &'static [&'static str] = &["pretrained", "precision"];
    /// FluxPipeline packs 2×2 latent patches per token (its `image_seq_len` counts them).
    const PATCH: i64 = 2;
    const TEXT_ENCODINGS: &'static [TextEncoding] = &[
        TextEncoding {
            name: "t5_embeddings",
            keys: &["pretrained", "tokenizer_2", "precision", "max_sequence_length"],
        },
        TextEncoding { name: "pooled_embeddings", keys: &["pretrained", "tokenizer", "precision"] },
    ];

    fn load(config: &FluxLoraConfig, train: &TrainConfig, device: Device) -> Result<Self> {
        if train.train_text_encoder {
            return Err(ModelError::NotImplemented(
                "train_text_encoder: flux-lora trains the transformer only (as musubi-tuner and ai-toolkit do for Flux); set train_text_encoder = false".into(),
            ));
        }
        let pipe = Pipeline::load(config, train.precision.kind(), device)?;
        Ok(Flux { pipe, config: config.clone(), device })
    }

    /// Flow matching over the scheduler's `num_train_timesteps` (1000 for FLUX.1).
    fn objective(&self) -> &Objective {
        &self.pipe.objective
    }

    /// Training's forward: the embedded guidance is `guidance_scale` (Flux-dev), none for schnell.
    fn denoise(
        &self,
        latents_t: &Tensor,
        timesteps: &Tensor,
        t5_and_pooled: &[Tensor],
        reseed: Option<i64>,
    ) -> likeness_diffusion_torch::Result<Tensor> {
        Ok(self.run(latents_t, timesteps, None, t5_and_pooled, None, reseed)?.0)
    }

    /// Per-block checkpointing: the transformer's tape replays its blocks after the backward
    /// (the training guidance, `guidance_scale`).
    fn denoise_checkpointed(
        &self,
        latents_t: &Tensor,
        timesteps: &Tensor,
        t5_and_pooled: &[Tensor],
        reseed: Option<i64>,
    ) -> Result<(Tensor, Replay<Self>)> {
        self.denoise_checkpointed_guided(latents_t, timesteps, None, t5_and_pooled, reseed)
    }

    /// The checkpointed forward with an explicit embedded guidance (PairEdit's guidance_scale;
    /// None: the training guidance). The unpacked output is a view of the leaf: its gradient
    /// reaches the leaf through the (exact) permutation, and the tape replays the transformer.
    fn denoise_checkpointed_guided(
        &self,
        latents_t: &Tensor,
        timesteps: &Tensor,
        embedded_guidance: Option<&Tensor>,
        t5_and_pooled: &[Tensor],
        reseed: Option<i64>,
    ) -> Result<(Tensor, Replay<Self>)> {
        let (v, tape) = self.run(latents_t, timesteps, embedded_guidance, t5_and_pooled, Some(reseed), None)?;
        Ok((v, replay_tape(tape, |f: &Flux| &f.pipe.transformer)))
    }

    /// Sampling's forward: Flux-dev's embedded scale is the sampler's (`Guidance::Embedded`).
    fn denoise_guided(
        &self,
        latents_t: &Tensor,
        timesteps: &Tensor,
        embedded_guidance: Option<&Tensor>,
        t5_and_pooled: &[Tensor],
        reseed: Option<i64>,
    ) -> likeness_diffusion_torch::Result<Tensor> {
        Ok(self.run(latents_t, timesteps, embedded_guidance, t5_and_pooled, None, reseed)?.0)
    }

    /// The 16-channel Flux VAE (shift and scale factors from its config).
    fn lazy_vae(&self) -> &Lazy<Vae> {
        &self.pipe.vae
    }

    /// Known at creation from `vae/config.json`, before any VAE weight loads.
    fn latent_space(&self) -> LatentSpace {
        (&self.pipe.vae_config).into()
    }

    fn text_shapes(&self) -> Vec<Vec<i64>> {
        let tc = &self.pipe.transformer.config;
        vec![vec![self.pipe.max_sequence_length as i64, tc.joint_attention_dim], vec![tc.pooled_projection_dim]]
    }

    fn encode_texts(&self, texts: &[&str], _grad: bool) -> Result<Vec<Tensor>> {
        self.pipe.embed_texts(texts, self.device)
    }

    fn store(&self, c: Component, _load: bool) -> Result<Option<&Store>> {
        Ok((c == Component::Transformer).then_some(&self.pipe.transformer_store))
    }

    fn base_parameter_count(&self) -> i64 {
        self.pipe.transformer_store.parameter_count() + self.pipe.encoder_parameters
    }

    /// Injection points after the double and single blocks (likeness_diffusion_torch::identity).
    fn install_identity(&mut self, c: &IdentityConfig, kind: Kind, seed: u64) -> Result<()> {
        let tr = &mut self.pipe.transformer;
        let (dim, nd, ns) = (tr.config.inner_dim(), tr.double.len(), tr.single.len());
        tr.identity = Some(IdentityInjection::new(c, dim, nd, ns, kind, self.device, seed)?);
        Ok(())
    }

    fn identity(&self) -> Option<&IdentityInjection> {
        self.pipe.transformer.identity.as_ref()
    }

    fn lora_targets(_c: Component, targets: &[String]) -> (Vec<String>, bool) {
        (config::transformer_patterns(targets), false)
    }

    fn sampling(&self) -> SampleSettings<'_> {
        let c = &self.config;
        SampleSettings {
            scheduler: SampleScheduler::FlowMatch(&self.pipe.scheduler),
            steps: c.sample_steps,
            guidance: c.guidance,
            resolution: c.resolution,
        }
    }

    /// Flux-dev embeds the scale (one forward per step); a model without the embedding runs
    /// unguided, as FluxPipeline does without `true_cfg_scale`.
    fn guidance(&self, scale: f64) -> Guidance {
        if self.pipe.transformer.config.guidance_embeds {
            Guidance::Embedded(scale)
        } else {
            Guidance::None
        }
    }
}

likeness_sdk::export_model_plugin!(FluxLora);
