//! The tch half of the shared diffusion toolkit: SD1.5's `UNet2DConditionModel`, Flux.1's
//! `FluxTransformer2DModel`, `AutoencoderKL`
//! (numerically diffusers 0.42.1) and CLIP text encoder (transformers 5.24's `CLIPTextModel`),
//! each one module tree whose parameter names are the reference state-dict names; loading from a
//! diffusers folder (sharded or not) or the original single-file (LDM) checkpoint; LoRA/LoCon
//! injection by module-name patterns (UNet and text encoder); the denoising loop and the
//! training-side tensor helpers.
//!
//! Construction goes through a [`store::Store`]: in `Alloc` mode it allocates each parameter, in
//! `Plan` mode it hands out zero-stride expanded views of one scalar, so the real SD1.5 tree
//! (860 M + 123 M parameters) can be built and its name→shape table checked without allocating
//! GBs (tch 0.26 has no meta device).
//!
//! What is here:
//! - [`unet`], [`vae`], [`clip_text`] ([`ClipTextModel`], the one CLIP text transformer of the
//!   project — SD1.5's and Flux's text encoder and, with its `text_projection`, core/clip's text
//!   tower for the CLIP metric: causal mask, last hidden state, the
//!   penultimate hidden state for clip skip, the pooled EOT token by transformers 5's rule);
//! - [`load`]: diffusers/transformers folders, single files (`model.diffusion_model.*`,
//!   `first_stage_model.*`, `cond_stage_model.transformer.*`); every mismatch named; row slices
//!   of fused tensors read on their own (`Stored::rows`), fp8 e4m3fn/e5m2 storage with ComfyUI's
//!   per-tensor scales (`fold_fp8_scales`);
//! - [`lora`]: inject / parameters / adapter scale / peft load / merge;
//! - precision: a [`Store`]'s kind (fp32 / bf16 / fp16) is the base weights'; LoRA weights are
//!   always fp32 and the low-rank path runs in fp32, cast back at the layer's output
//!   ([`nn::Linear::forward`]);
//! - [`sampling`]: one loop (`run`) over DDIM/Euler (betas) or flow-matching Euler
//!   (`FlowSchedule`: FluxPipeline's sigmas and μ), over core/diffusion's schedules (no second
//!   copy of the scheduler maths); guidance as `Guidance::{None, Embedded, Cfg, TrueCfg}` through
//!   `guided_model`; scheduler configs read by `_class_name` (`AnySchedulerConfig`), an
//!   unimplemented class refused; epsilon / v / sample / velocity prediction;
//! - [`flux`]: Flux.1's `FluxTransformer2DModel` (double/single blocks, RoPE, guidance
//!   embedding; one checkpointing segment per block), 2×2 latent packing, the BFL single-file
//!   map, fp8 block weights with per-tensor scales; [`t5`]: transformers' T5 encoder (Flux's
//!   `text_encoder_2`); [`qwen_vl`]: Qwen2.5-VL (transformers 5.24) as Qwen-Image-Edit-2509's
//!   text encoder (decoder, vision tower, `Qwen2VLImageProcessor`, the Qwen2 tokenizer, diffusers'
//!   edit-plus prompt encoding);
//! - [`training`]: `add_noise`, `v_target`, `predict_x0`, `ddpm_target` and the flow-matching
//!   `flow_add_noise`, `flow_target`, `flow_predict_x0`;
//! - gradient checkpointing over a network's declared segment list ([`checkpoint`]; the UNet's:
//!   [`UNet2DConditionModel::forward_checkpointed`] + [`UNetTape::backward`]): a hand-driven
//!   segment-wise recomputation, because tch 0.26 has no `torch.utils.checkpoint`, custom
//!   autograd Function or backward hook;
//! - [`backbone`] + [`trainer`]: the `Backbone` trait a diffusion plugin implements and the
//!   generic LoRA-training model (`LoraModel<B>`, a `ModelPlugin`) over it.
//!
//! Deliberately absent:
//! - checkpointing of the VAE decoder and the text encoder (the UNet holds most activations of
//!   a training step; diffusers' training scripts checkpoint the UNet too);
//! - SDXL's second encoder, PNDM/DPM samplers, Karras sigmas, `clip_sample` / thresholding
//!   (refused by name in the scheduler config);
//! - the tokenizer: `likeness_clip::ClipTokenizer::from_hf_folder(<model>/tokenizer)` (core/clip)
//!   gives transformers' `CLIPTokenizer` ids (tested here against the tiny model's folder).

pub mod attention;
pub mod backbone;
pub mod checkpoint;
pub mod clip_text;
pub mod config;
pub mod error;
pub mod flux;
pub mod identity;
pub mod ldm;
pub mod load;
pub mod lora;
pub mod nn;
pub mod qwen_image;
pub mod qwen_vae;
pub mod qwen_vl;
pub mod rng;
pub mod sampling;
pub mod store;
pub mod t5;
pub mod trainer;
pub mod training;
pub mod unet;
pub mod vae;

pub use backbone::{
    replay_tape, role_index, role_matches, Backbone, BackboneConfig, ConditionEncoding, ConditionImage, LatentCodec,
    LatentSpace, Lazy, Objective, Replay, SampleScheduler, SampleSettings, TextEncoding, Vae,
};
pub use clip_text::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use config::{UNetConfig, VaeConfig};
pub use error::{Error, Result};
pub use lora::{LoraConfig, LoraInit};
pub use sampling::{denoise, Prediction, Sampler, Schedule, SchedulerConfig};
pub use store::{Mode, Store};
pub use trainer::{LoraModel, ModelConfig, ModelError, TrainConfig};
pub use unet::{UNet2DConditionModel, UNetTape};
pub use vae::AutoencoderKL;
