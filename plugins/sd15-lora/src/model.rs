//! The SD1.5 pipeline: UNet, VAE, text encoder, tokenizer and scheduler settings, loaded from a
//! diffusers folder or an original single-file checkpoint.

use std::path::{Path, PathBuf};

use likeness_clip::{ClipTokenizer, Padding};
use likeness_diffusion::schedules::Prediction;
use likeness_diffusion_torch::sampling::SchedulerConfig;
use likeness_diffusion_torch::{load, AutoencoderKL, Store, UNet2DConditionModel, UNetConfig, VaeConfig};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::config::{Config, PredictionName};
use crate::error::{config as bad, file, Result};
use crate::text::TextEncoder;

const SD15_UNET: &str = include_str!("presets/unet_config.json");
const SD15_VAE: &str = include_str!("presets/vae_config.json");
const SD15_TEXT: &str = include_str!("presets/text_encoder_config.json");
const SD15_SCHEDULER: &str = include_str!("presets/scheduler_config.json");

/// The text context length of SD1.5's tokenizer (`model_max_length`).
pub const CONTEXT_LENGTH: usize = 77;

/// diffusers' scheduler_config.json as the toolkit reads it (`likeness_diffusion_torch::sampling::
/// SchedulerConfig`: the same parser, defaults and refusals the samplers use), plus what the
/// training objective needs: ᾱ_t and the prediction type (the plugin's `prediction_type`
/// overrides the file's).
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub num_train_timesteps: usize,
    pub prediction: Prediction,
    /// ᾱ_t in f64 (`cumprod(1 − β)`).
    pub alphas_cumprod: Vec<f64>,
    /// What `sampling::denoise` reads.
    pub sampling: SchedulerConfig,
}

impl Scheduler {
    fn from_value(path: &str, v: &Value, override_prediction: Option<PredictionName>) -> Result<Self> {
        let mut sampling = SchedulerConfig::from_value(Path::new(path), v)?;
        if let Some(p) = override_prediction {
            sampling.prediction = p.prediction();
        }
        if sampling.prediction == Prediction::Sample {
            return Err(file(
                path,
                "field `prediction_type`: `sample` is not supported for training (epsilon, v_prediction); set the plugin's `prediction_type`",
            ));
        }
        let alphas_cumprod = sampling.alphas_cumprod()?;
        Ok(Scheduler {
            num_train_timesteps: sampling.num_train_timesteps,
            prediction: sampling.prediction,
            alphas_cumprod,
            sampling,
        })
    }

    /// SNR(t) = ᾱ / (1 − ᾱ).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }
}

/// The loaded networks.
pub struct Pipeline {
    pub unet_store: Store,
    pub unet: UNet2DConditionModel,
    pub vae_store: Store,
    pub vae: AutoencoderKL,
    pub text: TextEncoder,
    pub tokenizer: ClipTokenizer,
    pub scheduler: Scheduler,
    /// Pixels per latent pixel: 2^(VAE blocks − 1).
    pub vae_factor: i64,
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

fn tokenizer_path(c: &Config, config_dir: Option<&Path>) -> Result<PathBuf> {
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
    Ok(if path.is_dir() { ClipTokenizer::from_hf_folder(path)? } else { ClipTokenizer::from_open_clip_vocab(path)? })
}

impl Pipeline {
    pub fn load(c: &Config, device: Device) -> Result<Pipeline> {
        let kind = c.precision.kind();
        let root = Path::new(&c.pretrained);
        let (unet_store, unet, vae_store, vae, text, sched_json) = if root.is_dir() {
            let (us, u) = load::unet_from_diffusers(root, kind, device)?;
            let (vs, v) = load::vae_from_diffusers(root, kind, device)?;
            let text = TextEncoder::from_diffusers(root, kind, device)?;
            let p = root.join("scheduler").join("scheduler_config.json");
            let sched = if p.exists() {
                (p.display().to_string(), read_json(&p)?)
            } else {
                component_json(None, "scheduler", "scheduler_config.json", SD15_SCHEDULER)?
            };
            (us, u, vs, v, text, sched)
        } else {
            let cfg_dir = c.config.as_deref().map(Path::new);
            let (up, uj) = component_json(cfg_dir, "unet", "config.json", SD15_UNET)?;
            let (vp, vj) = component_json(cfg_dir, "vae", "config.json", SD15_VAE)?;
            let (tp, tj) = component_json(cfg_dir, "text_encoder", "config.json", SD15_TEXT)?;
            let ucfg = UNetConfig::from_value(Path::new(&up), uj)?;
            let vcfg = VaeConfig::from_value(Path::new(&vp), vj)?;
            let (us, u) = load::unet_from_single_file(root, &ucfg, kind, device)?;
            let (vs, v) = load::vae_from_single_file(root, &vcfg, kind, device)?;
            let text = TextEncoder::from_single_file(root, &tp, &tj, kind, device)?;
            let sched = match cfg_dir {
                Some(d) if d.join("scheduler/scheduler_config.json").exists() => {
                    let p = d.join("scheduler/scheduler_config.json");
                    (p.display().to_string(), read_json(&p)?)
                }
                _ => component_json(None, "scheduler", "scheduler_config.json", SD15_SCHEDULER)?,
            };
            (us, u, vs, v, text, sched)
        };
        let scheduler = Scheduler::from_value(&sched_json.0, &sched_json.1, c.prediction_type)?;
        let tokenizer = load_tokenizer(&tokenizer_path(c, c.config.as_deref().map(Path::new))?)?;
        if unet.config.cross_attention_dim != text.hidden_size() {
            return Err(file(
                &c.pretrained,
                format!(
                    "the UNet's cross_attention_dim ({}) differs from the text encoder's hidden_size ({}): the components do not belong together",
                    unet.config.cross_attention_dim,
                    text.hidden_size()
                ),
            ));
        }
        let vae_factor = 1i64 << (vae.config.block_out_channels.len().saturating_sub(1));
        Ok(Pipeline { unet_store, unet, vae_store, vae, text, tokenizer, scheduler, vae_factor })
    }

    /// Token ids `[n, 77]` (int64, on `device`) as SD1.5's CLIPTokenizer pads: with `<|endoftext|>`.
    pub fn token_ids(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        let e = self.tokenizer.encode(texts, CONTEXT_LENGTH, Padding::Eot)?;
        Ok(Tensor::from_slice(&e.ids).view([e.batch as i64, e.context_length as i64]).to_device(device))
    }

    /// The UNet's conditioning `[n, 77, D]` for `texts` (with a graph when the text encoder
    /// has trainable LoRA and `grad`).
    pub fn embed_texts(&self, texts: &[&str], clip_skip: u32, device: Device, grad: bool) -> Result<Tensor> {
        let ids = self.token_ids(texts, device)?;
        if grad {
            self.text.forward(&ids, clip_skip)
        } else {
            tch::no_grad(|| self.text.forward(&ids, clip_skip))
        }
    }

    /// `latents` of images in [0, 1] `[B, 3, H, W]`: the VAE posterior's **mean** times
    /// `scaling_factor` (sd-scripts caches the mean too; diffusers' train script samples), no graph.
    pub fn encode_images(&self, x01: &Tensor, compute: Kind) -> Tensor {
        tch::no_grad(|| {
            let (mean, _logvar) = self.vae.encode(&(x01 * 2.0 - 1.0));
            // Contiguous: `mean` is a channel slice of the encoder's output, and a strided input
            // can make libtorch pick other conv kernels downstream (other rounding) than the
            // same values read back from the `latents` cache.
            self.vae.scale_latent(&mean).to_kind(compute).contiguous()
        })
    }

    /// Scaled latents → pixels in [0, 1] (not clamped), differentiable.
    pub fn decode_latents(&self, z: &Tensor, compute: Kind) -> Tensor {
        let x = self.vae.decode(&self.vae.unscale_latent(z));
        (x.to_kind(compute) + 1.0) / 2.0
    }
}
