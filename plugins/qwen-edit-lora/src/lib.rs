//! `qwen-edit-lora`: Qwen-Image-Edit-2509 (musubi-tuner's `--edit_plus`) LoRA training with
//! control images, as a likeness model plugin.
//!
//! This crate is Qwen-Image-Edit's backbone and nothing else: the pipeline's files and networks
//! ([`model`]: QwenImageTransformer2DModel, the Qwen-Image VAE on single frames, Qwen2.5-VL text
//! and vision conditioning with the processor's tokenizer, the flow-matching scheduler), its
//! config keys ([`config`]), and the [`Backbone`] impl below. The training step, x̂0, optimizer
//! groups, save/load, sampling and adapter I/O are core/diffusion-torch's generic [`LoraModel`];
//! the networks are core/diffusion-torch's (`qwen_image`, `qwen_vae`, `qwen_vl`); key maps and
//! LoRA presets core/diffusion's (`lora_keys::qwen`).
//!
//! # Interface (ABI 1.1)
//! * images `target` (required, f32 `[B, 3, H, W]` in [0, 1], sides multiples of 16, or its
//!   `latents`), `control_*` (optional: `control`, `control_1`, … — the edit's input images, each
//!   its own size, multiples of 16), `reference` (optional: read by the engine's identity term);
//! * texts `caption` (required);
//! * cacheable encodings `latents` (of `target`), `prompt_embeds` (of `caption+control_*`:
//!   Qwen2.5-VL reads the caption with the control images; variable-length, with
//!   `prompt_embeds_mask`) and `control_latents` (of `control_*`: `latents.<role>` per control);
//! * outputs `pixels` (x̂0 decoded with gradient), `timesteps`, `timestep_weights`;
//! * parameter group `transformer`; adapter formats `kohya` (musubi-tuner's `lora_unet_…` with an
//!   `.alpha` per module), `diffusers`, `peft`; `can_sample` (QwenImageEditPlusPipeline's loop,
//!   true CFG with renormalisation).
//!
//! # Conditioning (QwenImageEditPlusPipeline / musubi-tuner's edit-plus path)
//! Each control image is (a) resized to ≈384² area for Qwen2.5-VL and embedded with the caption
//! under the edit-plus template (`Picture k: <|vision_start|><|image_pad|><|vision_end|>`, the
//! first 64 tokens dropped), and (b) VAE-encoded at its own size (posterior mean, normalised),
//! packed 2×2 and appended after the noisy target's tokens; RoPE frame k = the image's index.
//! The prediction is the target's tokens only. Training feeds the transformer `σ + 0.001`
//! (musubi-tuner's `t·1000 + 1`), sampling `σ`.

use likeness_diffusion::lora_keys::{qwen as qwen_keys, BaseArch, Component};
use likeness_diffusion::lora_meta::QwenImageVariant;
use likeness_diffusion_torch::checkpoint::Tape;
use likeness_diffusion_torch::flux::{pack_latents, unpack_latents};
use likeness_diffusion_torch::qwen_image::QwenInputs;
use likeness_diffusion_torch::qwen_vl;
use likeness_diffusion_torch::sampling::{FlowMatchConfig, Guidance};
use likeness_diffusion_torch::trainer::{ModelError, Result, TimestepSamplingName, TrainConfig};
use likeness_diffusion_torch::{
    replay_tape, Backbone, ConditionEncoding, ConditionImage, LatentSpace, Lazy, LoraModel, Objective, Replay,
    SampleScheduler, SampleSettings, Store, TextEncoding, Vae,
};
use tch::{Device, Kind, Tensor};

pub mod config;
pub mod model;

use config::QwenEditLoraConfig;
use model::Pipeline;

/// The plugin id users type.
pub const ID: &str = "qwen-edit-lora";

/// The plugin: the toolkit's LoRA trainer over the Qwen-Image-Edit backbone.
pub type QwenEditLora = LoraModel<QwenEdit>;

/// musubi-tuner's training timestep offset for its t-based samplings (`shift`, `qwen_shift`,
/// `uniform`, …): the DiT sees `(t·1000 + 1)/1000` (trainer_base.py:704-708). Its `sigma`
/// sampling feeds the table's timestep as drawn (no offset).
const TRAIN_TIMESTEP_OFFSET: f64 = 1.0;

/// Qwen-Image-Edit's networks and settings.
pub struct QwenEdit {
    pipe: Pipeline,
    config: QwenEditLoraConfig,
    /// The training timestep offset ([`TRAIN_TIMESTEP_OFFSET`], 0 under `sigma` sampling).
    train_offset: f64,
    /// `sample_shift`'s static-shift schedule (the scheduler config with the dynamic shift off).
    sample_scheduler: FlowMatchConfig,
}

/// The condition encodings and their outputs: Qwen2.5-VL's `prompt_embeds` (with its mask) and
/// the control images' VAE latents, `latents.<role>` (`latents.control`, `latents.control_1`, …).
const PROMPT_EMBEDS: &str = "prompt_embeds";
const PROMPT_MASK: &str = "prompt_embeds_mask";
const CONTROL_LATENTS: &str = "control_latents";
const LATENTS_OF: &str = "latents.";

/// The conditioning tensors' layout: `[prompt_embeds, mask, control latents…]`.
const EMBEDS: usize = 0;
const MASK: usize = 1;
const CONTROLS: usize = 2;

impl QwenEdit {
    /// The transformer's inputs for latents `[B, 16, h, w]` and the conditioning
    /// `[embeds, mask, control latents…]`: the packed sequence, the image shapes and σ.
    fn run(
        &self,
        noisy: &Tensor,
        timestep: &Tensor,
        offset: f64,
        cond: &[Tensor],
        checkpointed: Option<Option<i64>>,
    ) -> likeness_diffusion_torch::Result<(Tensor, Option<Tape>)> {
        let (_, _, h, w) = noisy.size4()?;
        let mut images = vec![noisy.shallow_clone()];
        images.extend(cond[CONTROLS..].iter().map(Tensor::shallow_clone));
        let mut shapes = Vec::with_capacity(images.len());
        for z in &images {
            let (_, _, zh, zw) = z.size4()?;
            if zh % 2 != 0 || zw % 2 != 0 {
                return Err(likeness_diffusion_torch::Error::Config {
                    path: ID.into(),
                    field: "resolution".into(),
                    msg: format!(
                        "latents of {zh}×{zw} cannot be packed into 2×2 patches: image sides (target and controls) must \
                         be multiples of 16"
                    ),
                });
            }
            shapes.push((1, zh / 2, zw / 2));
        }
        let packed: Vec<Tensor> = images.iter().map(pack_latents).collect();
        let hidden = Tensor::cat(&packed, 1);
        let sigma = (timestep.to_kind(Kind::Float) + offset) / self.pipe.scheduler.num_train_timesteps as f64;
        // QwenImageEditPlusPipeline passes no mask when every token is real (always at batch 1).
        let mask = &cond[MASK];
        let mask = (mask.to_kind(Kind::Int64).min().int64_value(&[]) == 0).then_some(mask);
        let inputs = QwenInputs {
            hidden_states: &hidden,
            encoder_hidden_states: &cond[EMBEDS],
            encoder_hidden_states_mask: mask,
            timestep: &sigma,
            img_shapes: &shapes,
        };
        let tr = &self.pipe.transformer;
        let (v, tape) = match checkpointed {
            Some(seed) => {
                let (v, tape) = tr.forward_checkpointed(&inputs, seed)?;
                (v, Some(tape))
            }
            None => (tr.forward(&inputs)?, None),
        };
        let target_tokens = (h / 2) * (w / 2);
        Ok((unpack_latents(&v.narrow(1, 0, target_tokens), h, w), tape))
    }

    /// The VL encoder's view of one control batch `[n, 3, H, W]`: each image resized to
    /// QwenImageEditPlusPipeline's condition size (≈384² area, sides multiples of 32).
    fn vl_images(x: &Tensor) -> Result<Vec<Tensor>> {
        let (n, _, h, w) = x.size4().map_err(|e| ModelError::Input(e.to_string()))?;
        let (cw, ch) = qwen_vl::condition_size(w, h);
        let resized = if (cw, ch) == (w, h) {
            x.shallow_clone()
        } else {
            // The pipeline resizes with PIL's Lanczos; antialiased bicubic is libtorch's closest.
            x.internal_upsample_bicubic2d_aa([ch, cw], false, None, None).clamp(0.0, 1.0)
        };
        Ok((0..n).map(|i| resized.get(i)).collect())
    }

    /// VAE latents of one control batch: the posterior mean, normalised, no graph.
    pub fn control_latents(&self, x01: &Tensor) -> Result<Tensor> {
        let vae = self.vae()?;
        let x = x01.to_kind(vae.store.kind) * 2.0 - 1.0;
        Ok(tch::no_grad(|| vae.model.scale_latent(&vae.model.encode(&x).0).contiguous()))
    }
}

impl Backbone for QwenEdit {
    type Config = QwenEditLoraConfig;
    const ID: &'static str = ID;
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str = "Qwen-Image-Edit-2509 LoRA with control images: flow matching, x̂0 pixels for identity losses, QwenImageEditPlusPipeline sampling (true CFG), musubi (kohya)/diffusers/PEFT adapters";
    const ARCH: BaseArch = BaseArch::QwenImage;
    const COMPONENTS: &'static [Component] = &[Component::Transformer];
    const LATENTS_KEYS: &'static [&'static str] = &["pretrained", "vae", "precision"];
    /// 2×2 latent patches per token; the dynamic shift counts the noisy target's tokens only.
    const PATCH: i64 = 2;
    const TEXT_ENCODINGS: &'static [TextEncoding] = &[];
    /// musubi-tuner's `--edit_plus` metadata: `Qwen-Image-Edit-Plus/lora`, `qwen_image_edit`.
    const QWEN_VARIANT: QwenImageVariant = QwenImageVariant::EditPlus;
    /// Both parts of the conditioning are cached: the VL encoding varies in length with the
    /// caption and the controls' sizes (padded per batch with its mask).
    const CONDITION_ENCODINGS: &'static [ConditionEncoding] = &[
        ConditionEncoding {
            name: PROMPT_EMBEDS,
            sources: &["caption", "control_*"],
            outputs: &[PROMPT_EMBEDS, PROMPT_MASK],
            keys: &["pretrained", "text_encoder", "tokenizer", "precision"],
        },
        ConditionEncoding {
            name: CONTROL_LATENTS,
            sources: &["control_*"],
            outputs: &["latents.*"],
            keys: &["pretrained", "vae", "precision"],
        },
    ];
    const CONDITION_IMAGES: &'static [ConditionImage] = &[ConditionImage {
        name: "control_*",
        required: false,
        doc: "the edit's input images (`control`, `control_1`, …; musubi-tuner's control_0, control_1, …), f32 [B, 3, H, W] in [0, 1], each its own size, sides multiples of 16",
    }];

    fn load(config: &QwenEditLoraConfig, train: &TrainConfig, device: Device) -> Result<Self> {
        if train.train_text_encoder {
            return Err(ModelError::NotImplemented(
                "train_text_encoder: qwen-edit-lora trains the transformer only (as musubi-tuner does for Qwen-Image); set train_text_encoder = false".into(),
            ));
        }
        let pipe = Pipeline::load(config, train.precision.kind(), device)?;
        let mut sample_scheduler = pipe.scheduler.clone();
        if let Some(s) = config.sample_shift {
            sample_scheduler.use_dynamic_shifting = false;
            sample_scheduler.shift = s;
        }
        let train_offset =
            if train.timestep_sampling == TimestepSamplingName::Sigma { 0.0 } else { TRAIN_TIMESTEP_OFFSET };
        Ok(QwenEdit { pipe, config: config.clone(), train_offset, sample_scheduler })
    }

    /// Training's forward: σ + 0.001 (musubi-tuner's `t·1000 + 1`).
    fn denoise(
        &self,
        noisy: &Tensor,
        timestep: &Tensor,
        conditioning: &[Tensor],
        _: Option<i64>,
    ) -> likeness_diffusion_torch::Result<Tensor> {
        Ok(self.run(noisy, timestep, self.train_offset, conditioning, None)?.0)
    }

    /// Sampling's forward: σ, as QwenImageEditPlusPipeline feeds it; Qwen-Image has no guidance
    /// embedding (`guidance_embeds = false`), its scale is true CFG.
    fn denoise_guided(
        &self,
        noisy: &Tensor,
        timestep: &Tensor,
        embedded: Option<&Tensor>,
        conditioning: &[Tensor],
        _: Option<i64>,
    ) -> likeness_diffusion_torch::Result<Tensor> {
        match embedded {
            None => Ok(self.run(noisy, timestep, 0.0, conditioning, None)?.0),
            Some(_) => Err(likeness_diffusion_torch::Error::Config {
                path: ID.into(),
                field: "guidance".into(),
                msg: "Qwen-Image has no guidance embedding (guidance_embeds = false); its scale is true CFG".into(),
            }),
        }
    }

    /// One checkpointing segment per transformer block.
    fn denoise_checkpointed(
        &self,
        noisy: &Tensor,
        timestep: &Tensor,
        conditioning: &[Tensor],
        reseed: Option<i64>,
    ) -> Result<(Tensor, Replay<Self>)> {
        let (v, tape) = self.run(noisy, timestep, self.train_offset, conditioning, Some(reseed))?;
        Ok((v, replay_tape(tape, |q: &QwenEdit| &q.pipe.transformer)))
    }

    fn lazy_vae(&self) -> &Lazy<Vae> {
        &self.pipe.vae
    }

    fn latent_space(&self) -> LatentSpace {
        LatentSpace { channels: self.pipe.vae_config.z_dim, factor: self.pipe.vae_config.factor() }
    }

    fn text_shapes(&self) -> Vec<Vec<i64>> {
        Vec::new()
    }

    /// A caption without control images: the edit-plus template with no pictures.
    fn encode_texts(&self, texts: &[&str], grad: bool) -> Result<Vec<Tensor>> {
        self.condition(texts, &[], grad)
    }

    /// Qwen2.5-VL's embedding of the caption with the control images
    /// (`prompt_embeds` `[n, L, 3584]` with `prompt_embeds_mask` `[n, L]`), and each control
    /// image's VAE latents (`latents.<role>` `[n, 16, hₖ, wₖ]`).
    fn encode_condition(
        &self,
        name: &str,
        texts: &[&str],
        images: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>> {
        match name {
            PROMPT_EMBEDS => {
                let n = texts.len();
                let mut per_prompt: Vec<Vec<Tensor>> = (0..n).map(|_| Vec::new()).collect();
                for (_, x) in images {
                    for (b, img) in Self::vl_images(x)?.into_iter().enumerate() {
                        per_prompt[b].push(img);
                    }
                }
                let text = self.pipe.text.get()?;
                let (embeds, mask) = tch::no_grad(|| text.model.encode_edit_plus(texts, &per_prompt))?;
                Ok(vec![(PROMPT_EMBEDS.into(), embeds), (PROMPT_MASK.into(), mask)])
            }
            CONTROL_LATENTS => {
                images.iter().map(|(role, x)| Ok((format!("{LATENTS_OF}{role}"), self.control_latents(x)?))).collect()
            }
            _ => Err(ModelError::Input(format!("{ID} has no condition encoding `{name}`"))),
        }
    }

    /// `[prompt_embeds [n, L, 3584], mask [n, L] (int64), control latents [n, 16, hₖ, wₖ]…]`, the
    /// controls by index (`control`, `control_1`, …: RoPE frames 1, 2, …).
    fn assemble_condition(&self, parts: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        let get = |name: &str| parts.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let embeds = get(PROMPT_EMBEDS).ok_or_else(|| {
            ModelError::Input(format!(
                "needs `caption` or its encoding `{PROMPT_EMBEDS}` (got: {})",
                parts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let (n, l) = (embeds.size()[0], embeds.size()[1]);
        // A missing mask is all real (core/abi's EncodingDecl: a cached batch of equal lengths).
        let mask = match get(PROMPT_MASK) {
            Some(m) if m.size() == [n, l] => m.to_kind(Kind::Int64),
            Some(m) => {
                return Err(ModelError::Input(format!(
                    "`{PROMPT_MASK}` must be [{n}, {l}] like `{PROMPT_EMBEDS}`, got {:?}",
                    m.size()
                )))
            }
            None => Tensor::ones([n, l], (Kind::Int64, embeds.device())),
        };
        let mut controls: Vec<(usize, &Tensor)> = parts
            .iter()
            .filter_map(|(name, t)| Some((likeness_diffusion_torch::role_index(name.strip_prefix(LATENTS_OF)?), t)))
            .collect();
        controls.sort_by_key(|(i, _)| *i);
        let mut out = vec![embeds.shallow_clone(), mask];
        out.extend(controls.into_iter().map(|(_, t)| t.shallow_clone()));
        Ok(out)
    }

    /// Rectified flow over the scheduler's 1000 training timesteps.
    fn objective(&self) -> &Objective {
        &self.pipe.objective
    }

    fn store(&self, c: Component, _load: bool) -> Result<Option<&Store>> {
        Ok((c == Component::Transformer).then_some(&self.pipe.transformer_store))
    }

    /// The transformer and the VAE; the text encoder's once loaded (counting it would mean
    /// reading its 8.3 B-parameter header set at creation).
    fn base_parameter_count(&self) -> i64 {
        let text = self.pipe.text.loaded().map_or(0, |t| t.store.parameter_count());
        self.pipe.transformer_store.parameter_count() + self.pipe.vae_parameters + text
    }

    fn lora_targets(_c: Component, targets: &[String]) -> (Vec<String>, bool) {
        (qwen_keys::target_patterns(targets), false)
    }

    fn sampling(&self) -> SampleSettings<'_> {
        let c = &self.config;
        SampleSettings {
            scheduler: SampleScheduler::FlowMatch(&self.sample_scheduler),
            steps: c.sample_steps,
            guidance: c.guidance,
            resolution: c.resolution,
        }
    }

    /// True CFG with QwenImagePipeline's renormalisation when the scale is > 1.
    fn guidance(&self, scale: f64) -> Guidance {
        if scale > 1.0 {
            Guidance::TrueCfgRenorm { scale, patch: 2 }
        } else {
            Guidance::None
        }
    }
}

likeness_sdk::export_model_plugin!(QwenEditLora);
