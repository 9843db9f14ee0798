//! The Flux.1 pipeline: transformer, VAE, CLIP-L (pooled) and T5 text encoders, their
//! tokenizers and the flow-matching scheduler settings, loaded from a diffusers FluxPipeline
//! folder.
//!
//! The transformer, the tokenizers and every component config load at creation; the VAE's and
//! both text encoders' tensor names and shapes are checked there from the file headers, and
//! their **weights** load on first use (a run whose latents and text encodings all come from the
//! encoding cache never needs them: T5-XXL alone is 4.7 B parameters, 9.5 GB in bf16).

use std::path::{Path, PathBuf};

use likeness_clip::{ClipTokenizer, Padding};
use likeness_diffusion_torch::clip_text::{ClipTextConfig, ClipTextModel};
use likeness_diffusion_torch::flux::{self, FluxConfig, FluxTransformer2DModel};
use likeness_diffusion_torch::sampling::FlowMatchConfig;
use likeness_diffusion_torch::t5::{T5Config, T5EncoderModel};
use likeness_diffusion_torch::trainer::{bad_config as bad, file, ModelError, Result};
use likeness_diffusion_torch::{load, Lazy, Mode, Objective, Store, Vae, VaeConfig};
use tch::{Device, Kind, Tensor};

use crate::config::FluxLoraConfig;

/// A text encoder with its store (loaded on first use).
pub struct Encoder<M> {
    pub store: Store,
    pub model: M,
}

/// The networks: the transformer loaded, the VAE and text encoders on first use.
pub struct Pipeline {
    pub transformer_store: Store,
    pub transformer: FluxTransformer2DModel,
    pub vae: Lazy<Vae>,
    pub vae_config: VaeConfig,
    pub clip: Lazy<Encoder<ClipTextModel>>,
    pub clip_config: ClipTextConfig,
    pub t5: Lazy<Encoder<T5EncoderModel>>,
    pub t5_config: T5Config,
    /// Parameters of the VAE and both text encoders, loaded or not (counted from their planned
    /// stores at creation).
    pub encoder_parameters: i64,
    pub clip_tokenizer: ClipTokenizer,
    pub t5_tokenizer: tokenizers::Tokenizer,
    pub scheduler: FlowMatchConfig,
    pub objective: Objective,
    /// T5 tokens per prompt.
    pub max_sequence_length: usize,
}

fn folder(c: &Option<String>, root: &Path, sub: &str) -> PathBuf {
    c.as_ref().map(PathBuf::from).unwrap_or_else(|| root.join(sub))
}

/// T5's tokenizer from `tokenizer_2/tokenizer.json` through Hugging Face's `tokenizers` crate,
/// set to FluxPipeline's call: `padding="max_length"`, `truncation=True`, `</s>` appended (the
/// file's post-processor), padded with `<pad>`.
fn t5_tokenizer(dir: &Path, max_len: usize) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        file(
            path.display(),
            format!(
                "cannot read the T5 tokenizer: {e}; set `tokenizer_2` to a folder with a tokenizers tokenizer.json"
            ),
        )
    })?;
    let pad_id = tok.token_to_id("<pad>").ok_or_else(|| {
        file(path.display(), "no `<pad>` token: this is not a T5 tokenizer (T5's pads with <pad> = 0)")
    })?;
    tok.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(max_len),
        pad_id,
        pad_token: "<pad>".into(),
        ..Default::default()
    }));
    tok.with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    Ok(tok)
}

impl Pipeline {
    pub fn load(c: &FluxLoraConfig, kind: Kind, device: Device) -> Result<Pipeline> {
        let given = PathBuf::from(&c.pretrained);
        // A single transformer file takes every other component from `config` (validated).
        let (root, (transformer_store, transformer)) = if given.is_file() {
            let root = PathBuf::from(c.config.as_deref().unwrap_or_default());
            let cfg = FluxConfig::from_file(&root.join("transformer").join("config.json"))?;
            (root, flux::flux_from_bfl_single_file(&given, &cfg, kind, device, Mode::Alloc, c.fp8_base)?)
        } else {
            (given.clone(), flux::flux_from_diffusers(&given, kind, device, Mode::Alloc, c.fp8_base)?)
        };
        // Header-only checks now (a broken file fails at creation); the weights on first use.
        let (vs, v) = load::vae_from_diffusers_mode(&root, kind, device, Mode::Plan)?;
        let (cs, clip) = load::text_encoder_from_diffusers_mode(&root, kind, device, Mode::Plan)?;
        let (ts, t5) = load::t5_encoder_from_diffusers_mode(&root, kind, device, Mode::Plan)?;
        let encoder_parameters = vs.parameter_count() + cs.parameter_count() + ts.parameter_count();
        let (vae_config, clip_config, t5_config) = (v.config, clip.config, t5.config);
        check_widths(c, &transformer, &clip_config, &t5_config, &vae_config)?;
        // Samples are packed 2×2 after the VAE: sides are multiples of twice its factor (16).
        let multiple = 2 * vae_config.downscale_factor() as u32;
        if !c.resolution.is_multiple_of(multiple) {
            return Err(bad(
                "resolution",
                format!(
                    "{} must be a multiple of {multiple} (twice the VAE factor: latents are packed 2×2)",
                    c.resolution
                ),
            ));
        }
        let vae = Vae::lazy_from_diffusers(&root, kind, device);
        let r = root.clone();
        let clip = Lazy::new(move || {
            let (store, model) = load::text_encoder_from_diffusers(&r, kind, device)?;
            Ok(Encoder { store, model })
        });
        let r = root.clone();
        let t5 = Lazy::new(move || {
            let (store, model) = load::t5_encoder_from_diffusers(&r, kind, device)?;
            Ok(Encoder { store, model })
        });
        let tok_dir = folder(&c.tokenizer, &root, "tokenizer");
        let clip_tokenizer = ClipTokenizer::from_hf_folder(&tok_dir)
            .map_err(|e| bad("tokenizer", format!("{}: {e}", tok_dir.display())))?;
        let max_sequence_length = c.max_sequence_length as usize;
        let t5_tokenizer = t5_tokenizer(&folder(&c.tokenizer_2, &root, "tokenizer_2"), max_sequence_length)?;
        let sched_path = root.join("scheduler").join("scheduler_config.json");
        let scheduler = FlowMatchConfig::from_file(&sched_path)?;
        let objective = Objective::FlowMatching { num_train_timesteps: scheduler.num_train_timesteps };
        Ok(Pipeline {
            transformer_store,
            transformer,
            vae,
            vae_config,
            clip,
            clip_config,
            t5,
            t5_config,
            encoder_parameters,
            clip_tokenizer,
            t5_tokenizer,
            scheduler,
            objective,
            max_sequence_length,
        })
    }

    /// CLIP token ids `[n, L]` as FluxPipeline's CLIPTokenizer pads (with `<|endoftext|>`), L the
    /// text encoder's `max_position_embeddings` (77, the tokenizer's `model_max_length`).
    pub fn clip_ids(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        let e = self
            .clip_tokenizer
            .encode(texts, self.clip_config.max_position_embeddings as usize, Padding::Eot)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Tensor::from_slice(&e.ids).view([e.batch as i64, e.context_length as i64]).to_device(device))
    }

    /// T5 token ids `[n, max_sequence_length]`.
    pub fn t5_ids(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        let enc = self
            .t5_tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(format!("T5: {e}")))?;
        let ids: Vec<i64> = enc.iter().flat_map(|e| e.get_ids().iter().map(|&i| i as i64)).collect();
        Ok(Tensor::from_slice(&ids).view([texts.len() as i64, self.max_sequence_length as i64]).to_device(device))
    }

    /// FluxPipeline's `encode_prompt`: T5's last hidden state `[n, L, joint]` (no attention
    /// mask, as the pipeline calls it) and CLIP's pooled output `[n, pooled]`.
    pub fn embed_texts(&self, texts: &[&str], device: Device) -> Result<Vec<Tensor>> {
        let (t5_ids, clip_ids) = (self.t5_ids(texts, device)?, self.clip_ids(texts, device)?);
        let (t5, clip) = (self.t5.get()?, self.clip.get()?);
        tch::no_grad(|| Ok(vec![t5.model.forward(&t5_ids, None)?, clip.model.forward(&clip_ids)?.pooled]))
    }
}

/// The components must fit each other: T5's width is the transformer's joint attention width,
/// CLIP's the pooled width, and the VAE's latent channels ×4 its input.
fn check_widths(
    c: &FluxLoraConfig,
    t: &FluxTransformer2DModel,
    clip: &ClipTextConfig,
    t5: &T5Config,
    vae: &VaeConfig,
) -> Result<()> {
    let tc = &t.config;
    for (what, got, want) in [
        ("text_encoder_2 (T5) d_model", t5.d_model, tc.joint_attention_dim),
        ("text_encoder (CLIP) hidden_size", clip.hidden_size, tc.pooled_projection_dim),
        ("vae latent_channels × 4", vae.latent_channels * 4, tc.in_channels),
    ] {
        if got != want {
            return Err(file(
                &c.pretrained,
                format!("{what} = {got} does not fit the transformer's config ({want}): the components do not belong together"),
            ));
        }
    }
    Ok(())
}
