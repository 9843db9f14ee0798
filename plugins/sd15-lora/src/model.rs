//! The SD1.5 pipeline: UNet, VAE, text encoder, tokenizer and scheduler settings, loaded from a
//! diffusers folder or an original single-file checkpoint.
//!
//! The UNet, the tokenizer and every component config load at creation, and the VAE's and the
//! text encoder's tensor names and shapes are checked there from the file headers (a wrong
//! folder, a renamed tensor or a mismatched component fails before training); their **weights**
//! load on first use. A training run whose latents and text embeddings all come from the
//! encoding cache, with `decode_pixels = false`, never needs them — sd-scripts frees them after
//! caching for the same reason — so their memory (CLIP-L: 123 M parameters, 0.49 GB in fp32) is
//! never taken.

use std::path::{Path, PathBuf};

use likeness_clip::{ClipTokenizer, Padding};
use likeness_diffusion_torch::clip_text::ClipTextConfig;
use likeness_diffusion_torch::sampling::SchedulerConfig;
use likeness_diffusion_torch::trainer::{bad_config as bad, file, ModelError, Result};
use likeness_diffusion_torch::{load, Lazy, Mode, Objective, Store, UNet2DConditionModel, UNetConfig, Vae, VaeConfig};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::config::Sd15Config;
use crate::text::TextEncoder;

const SD15_UNET: &str = include_str!("presets/unet_config.json");
const SD15_VAE: &str = include_str!("presets/vae_config.json");
const SD15_TEXT: &str = include_str!("presets/text_encoder_config.json");
const SD15_SCHEDULER: &str = include_str!("presets/scheduler_config.json");

/// The networks: the UNet loaded, the VAE and text encoder on first use.
pub struct Pipeline {
    pub unet_store: Store,
    pub unet: UNet2DConditionModel,
    pub vae: Lazy<Vae>,
    pub vae_config: VaeConfig,
    pub text: Lazy<TextEncoder>,
    pub text_config: ClipTextConfig,
    /// Parameters of the VAE and the text encoder, loaded or not (counted from their planned
    /// stores at creation).
    pub encoder_parameters: i64,
    pub tokenizer: ClipTokenizer,
    /// diffusers' scheduler_config.json as the toolkit's samplers read it (the plugin's
    /// `prediction_type` overrides the file's).
    pub scheduler: SchedulerConfig,
    /// The training objective of that scheduler (ᾱ_t and the prediction type).
    pub objective: Objective,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| file(path.display(), format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| file(path.display(), format!("invalid JSON: {e}")))
}

/// A component config: `<dir>/<sub>/<name>` when a config folder is given, else the built-in.
fn component_json(dir: Option<&Path>, sub: &str, name: &str, builtin: &str) -> Result<(String, Value)> {
    match dir {
        Some(d) => {
            let p = d.join(sub).join(name);
            Ok((p.display().to_string(), read_json(&p)?))
        }
        None => Ok((
            format!("<built-in SD1.5 {sub}/{name}>"),
            serde_json::from_str(builtin).expect("built-in configs are valid JSON"),
        )),
    }
}

fn tokenizer_path(c: &Sd15Config, config_dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(t) = &c.tokenizer {
        return Ok(PathBuf::from(t));
    }
    let root = Path::new(&c.pretrained);
    let candidates: Vec<PathBuf> = if root.is_dir() {
        vec![root.join("tokenizer")]
    } else {
        config_dir.map(|d| vec![d.join("tokenizer")]).unwrap_or_default()
    };
    candidates.into_iter().find(|p| p.is_dir()).ok_or_else(|| {
        bad(
            "tokenizer",
            format!(
                "no CLIP tokenizer found for {}: set `tokenizer` to a transformers tokenizer folder (vocab.json + merges.txt) or open_clip's bpe_simple_vocab_16e6.txt.gz, or `config` to a diffusers folder with tokenizer/",
                c.pretrained
            ),
        )
    })
}

fn load_tokenizer(path: &Path) -> Result<ClipTokenizer> {
    if path.is_dir() { ClipTokenizer::from_hf_folder(path) } else { ClipTokenizer::from_open_clip_vocab(path) }
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

impl Pipeline {
    pub fn load(c: &Sd15Config, kind: Kind, device: Device) -> Result<Pipeline> {
        let root = PathBuf::from(&c.pretrained);
        // Each branch checks the VAE's and the text encoder's names and shapes now, from the
        // headers alone (`Mode::Plan`), so a broken file fails at creation; the planned stores
        // also give their parameter counts.
        type Parts = (Store, UNet2DConditionModel, Lazy<Vae>, VaeConfig, Lazy<TextEncoder>, ClipTextConfig, i64);
        let ((unet_store, unet, vae, vae_config, text, text_config, encoder_parameters), sched_json): (Parts, _) =
            if root.is_dir() {
                let (us, u) = load::unet_from_diffusers(&root, kind, device)?;
                let (vs, v) = load::vae_from_diffusers_mode(&root, kind, device, Mode::Plan)?;
                let (ts, t) = load::text_encoder_from_diffusers_mode(&root, kind, device, Mode::Plan)?;
                let (vcfg, tcfg, counted) = (v.config, t.config, vs.parameter_count() + ts.parameter_count());
                let vae = Vae::lazy_from_diffusers(&root, kind, device);
                let r = root.clone();
                let text = Lazy::new(move || TextEncoder::from_diffusers(&r, kind, device));
                let p = root.join("scheduler").join("scheduler_config.json");
                let sched = if p.exists() {
                    (p.display().to_string(), read_json(&p)?)
                } else {
                    component_json(None, "scheduler", "scheduler_config.json", SD15_SCHEDULER)?
                };
                ((us, u, vae, vcfg, text, tcfg, counted), sched)
            } else {
                let cfg_dir = c.config.as_deref().map(Path::new);
                let (up, uj) = component_json(cfg_dir, "unet", "config.json", SD15_UNET)?;
                let (vp, vj) = component_json(cfg_dir, "vae", "config.json", SD15_VAE)?;
                let (tp, tj) = component_json(cfg_dir, "text_encoder", "config.json", SD15_TEXT)?;
                let ucfg = UNetConfig::from_value(Path::new(&up), uj)?;
                let vcfg = VaeConfig::from_value(Path::new(&vp), vj)?;
                let tcfg = ClipTextConfig::from_value(Path::new(&tp), &tj)?;
                let (us, u) = load::unet_from_single_file(&root, &ucfg, kind, device)?;
                let (vs, _) = load::vae_from_single_file_mode(&root, &vcfg, kind, device, Mode::Plan)?;
                let (ts, _) = load::text_encoder_from_single_file_mode(&root, &tcfg, kind, device, Mode::Plan)?;
                let counted = vs.parameter_count() + ts.parameter_count();
                let (r, v) = (root.clone(), vcfg.clone());
                let vae = Lazy::new(move || {
                    let (store, model) = load::vae_from_single_file(&r, &v, kind, device)?;
                    Ok(Vae::new(store, model))
                });
                let r = root.clone();
                let text = Lazy::new(move || TextEncoder::from_single_file(&r, &tp, &tj, kind, device));
                let sched = match cfg_dir {
                    Some(d) if d.join("scheduler/scheduler_config.json").exists() => {
                        let p = d.join("scheduler/scheduler_config.json");
                        (p.display().to_string(), read_json(&p)?)
                    }
                    _ => component_json(None, "scheduler", "scheduler_config.json", SD15_SCHEDULER)?,
                };
                ((us, u, vae, vcfg, text, tcfg, counted), sched)
            };
        let mut scheduler = SchedulerConfig::from_value(Path::new(&sched_json.0), &sched_json.1)?;
        if let Some(p) = c.prediction_type {
            scheduler.prediction = p.prediction();
        }
        let objective = Objective::ddpm(&sched_json.0, &scheduler)?;
        let tokenizer = load_tokenizer(&tokenizer_path(c, c.config.as_deref().map(Path::new))?)?;
        // Sample sizes are multiples of the VAE factor 2^(blocks − 1) (8 for SD1.5's VAE).
        let factor = vae_config.downscale_factor() as u32;
        if !c.resolution.is_multiple_of(factor) {
            return Err(file(
                &c.pretrained,
                format!("resolution {} must be a multiple of {factor}, the VAE's downsampling factor", c.resolution),
            ));
        }
        if unet.config.cross_attention_dim != text_config.hidden_size {
            return Err(file(
                &c.pretrained,
                format!(
                    "the UNet's cross_attention_dim ({}) differs from the text encoder's hidden_size ({}): the components do not belong together",
                    unet.config.cross_attention_dim, text_config.hidden_size
                ),
            ));
        }
        Ok(Pipeline {
            unet_store,
            unet,
            vae,
            vae_config,
            text,
            text_config,
            encoder_parameters,
            tokenizer,
            scheduler,
            objective,
        })
    }

    /// The text context length: the text encoder's `max_position_embeddings` (77 for SD1.5, as
    /// its tokenizer's `model_max_length`; the encoder cannot take more).
    pub fn context_length(&self) -> usize {
        self.text_config.max_position_embeddings as usize
    }

    /// Token ids `[n, L]` (L = [`context_length`](Self::context_length); int64, on `device`) as
    /// SD1.5's CLIPTokenizer pads: with `<|endoftext|>`.
    pub fn token_ids(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        let e = self
            .tokenizer
            .encode(texts, self.context_length(), Padding::Eot)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Tensor::from_slice(&e.ids).view([e.batch as i64, e.context_length as i64]).to_device(device))
    }

    /// The UNet's conditioning `[n, 77, D]` for `texts` (with a graph when the text encoder
    /// has trainable LoRA and `grad`).
    pub fn embed_texts(&self, texts: &[&str], clip_skip: u32, device: Device, grad: bool) -> Result<Tensor> {
        let ids = self.token_ids(texts, device)?;
        let text = self.text.get()?;
        if grad {
            text.forward(&ids, clip_skip)
        } else {
            tch::no_grad(|| text.forward(&ids, clip_skip))
        }
    }
}
