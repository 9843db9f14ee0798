//! SD1.5's own config keys (the pipeline's files, the prediction type, clip skip, sampling
//! defaults) and its LoRA target presets. The LoRA, noise, timestep and loss keys are the
//! toolkit's (`likeness_diffusion_torch::TrainConfig`); both sit in one JSON object.

use std::path::Path;

use likeness_diffusion::schedules::Prediction;
use likeness_diffusion_torch::sampling::Sampler;
use likeness_diffusion_torch::trainer::{bad_config as bad, check_paths_exist, check_sample_defaults, Result};
use likeness_diffusion_torch::BackboneConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionName {
    Epsilon,
    VPrediction,
}

impl PredictionName {
    pub fn prediction(self) -> Prediction {
        match self {
            PredictionName::Epsilon => Prediction::Epsilon,
            PredictionName::VPrediction => Prediction::VPrediction,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerName {
    Ddim,
    Euler,
}

impl SamplerName {
    pub fn sampler(self) -> Sampler {
        match self {
            SamplerName::Ddim => Sampler::Ddim,
            SamplerName::Euler => Sampler::Euler,
        }
    }
}

fn d_clip_skip() -> u32 {
    1
}
fn d_steps() -> u32 {
    30
}
fn d_guidance() -> f64 {
    7.5
}
fn d_resolution() -> u32 {
    512
}
fn d_sampler() -> SamplerName {
    SamplerName::Ddim
}

/// SD1.5's keys. See [`BackboneConfig::properties`] for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sd15Config {
    pub pretrained: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionName>,
    #[serde(default = "d_clip_skip")]
    pub clip_skip: u32,
    #[serde(default = "d_sampler")]
    pub sampler: SamplerName,
    #[serde(default = "d_steps")]
    pub sample_steps: u32,
    #[serde(default = "d_guidance")]
    pub guidance: f64,
    #[serde(default = "d_resolution")]
    pub resolution: u32,
}

impl BackboneConfig for Sd15Config {
    fn required() -> &'static [&'static str] {
        &["pretrained"]
    }

    /// Paths must exist (checked here, so `interface` refuses a bad path before any weight loads).
    fn validate(&self) -> Result<()> {
        let p = Path::new(&self.pretrained);
        if !p.exists() {
            return Err(bad("pretrained", format!("{} does not exist; give a diffusers folder (with unet/, vae/, text_encoder/, tokenizer/) or a single-file .safetensors checkpoint", self.pretrained)));
        }
        if p.is_file() && !self.pretrained.ends_with(".safetensors") {
            return Err(bad(
                "pretrained",
                format!("{}: only .safetensors single files are read (convert a .ckpt first)", self.pretrained),
            ));
        }
        check_paths_exist(&[("config", &self.config), ("tokenizer", &self.tokenizer)])?;
        if !(1..=2).contains(&self.clip_skip) {
            return Err(bad("clip_skip", format!("must be 1 or 2, got {}", self.clip_skip)));
        }
        check_sample_defaults(self.sample_steps, self.guidance, self.resolution)
    }

    fn base_model(&self) -> &str {
        &self.pretrained
    }

    fn properties() -> serde_json::Value {
        serde_json::json!({
            "pretrained": {"type": "string",
                "description": "a diffusers StableDiffusionPipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or an original single-file .safetensors checkpoint (model.diffusion_model.* / first_stage_model.* / cond_stage_model.*)"},
            "config": {"type": "string",
                "description": "for a single file: a diffusers folder holding the component json configs (unet/config.json …) and tokenizer/; default: the built-in SD1.5 configs"},
            "tokenizer": {"type": "string",
                "description": "CLIP tokenizer: a transformers tokenizer folder (vocab.json + merges.txt) or open_clip's bpe_simple_vocab_16e6.txt.gz; default <pretrained or config>/tokenizer"},
            "lora_targets": {"type": "array", "items": {"type": "string"},
                "default": ["to_q", "to_k", "to_v", "to_out.0"],
                "description": "UNet modules (peft suffix rules or `*` globs over diffusers paths) plus presets: `ff` (ff.net.0.proj, ff.net.2), `proj` (proj_in, proj_out), `conv` (LoCon on resnet conv1/conv2/conv_shortcut)"},
            "train_text_encoder": {"type": "boolean", "default": false,
                "description": "also LoRA on the text encoder's q/k/v/out_proj, parameter group `text_encoder` (then texts cannot be cached)"},
            "prediction_type": {"enum": ["epsilon", "v_prediction"],
                "description": "the UNet's target; default: scheduler_config.json's prediction_type, else epsilon"},
            "clip_skip": {"enum": [1, 2], "default": 1,
                "description": "2 = the penultimate text-encoder layer (then the final layer norm), as sd-scripts"},
            "sampler": {"enum": ["ddim", "euler"], "default": "ddim", "description": "sampling scheduler"},
            "sample_steps": {"type": "integer", "minimum": 1, "default": 30, "description": "default sampling steps"},
            "guidance": {"type": "number", "default": 7.5, "description": "default classifier-free guidance scale"},
            "resolution": {"type": "integer", "minimum": 1, "default": 512,
                "description": "default sample size, a multiple of the VAE factor 2^(len(vae block_out_channels) − 1) (8 for SD1.5); so must training images be"}
        })
    }
}

/// The UNet module-name patterns of `lora_targets`, presets expanded: `ff` → the feed-forward
/// (`ff.net.0.proj`, `ff.net.2`), `proj` → `proj_in`, `proj_out`, `conv` → LoCon on the resnet
/// convolutions (`conv1`, `conv2`, `conv_shortcut`). Returns the patterns and whether any is a
/// convolution.
pub fn unet_patterns(targets: &[String]) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut conv = false;
    for t in targets {
        match t.as_str() {
            "ff" => out.extend(["ff.net.0.proj", "ff.net.2"].map(String::from)),
            "proj" => out.extend(["proj_in", "proj_out"].map(String::from)),
            "conv" => {
                conv = true;
                out.extend(["resnets.*.conv1", "resnets.*.conv2", "resnets.*.conv_shortcut"].map(String::from))
            }
            _ => out.push(t.clone()),
        }
    }
    // `proj_in`/`proj_out` are 1×1 convolutions in SD1.5 (use_linear_projection = false):
    // they need the conv switch too.
    if out.iter().any(|p| p.contains("proj_in") || p.contains("proj_out") || p.contains("conv")) {
        conv = true;
    }
    (out, conv)
}

/// The text-encoder LoRA targets (`train_text_encoder = true`): the attention projections.
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];
