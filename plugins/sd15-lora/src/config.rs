//! The plugin config (JSON, unknown keys rejected), its JSON Schema and the declared interface.

use std::path::Path;

use likeness_diffusion::schedules::Prediction;
use likeness_diffusion::timesteps::Sampling;
use likeness_sdk::{InputKind, ModelInterface, ModelSpec};
use serde::{Deserialize, Serialize};

use crate::error::{config as bad, Result};

/// Base-weight precision. LoRA weights are f32 in every mode but `fp64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
    /// Everything (base and LoRA) in f64: for gradient checks against finite differences.
    Fp64,
}

impl Precision {
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::Fp32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
            Precision::Fp16 => tch::Kind::Half,
            Precision::Fp64 => tch::Kind::Double,
        }
    }

    /// The kind of the LoRA weights and of every value computed outside the networks.
    pub fn compute_kind(self) -> tch::Kind {
        if self == Precision::Fp64 {
            tch::Kind::Double
        } else {
            tch::Kind::Float
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInitName {
    Kaiming,
    Gaussian,
}

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
#[serde(rename_all = "snake_case")]
pub enum TimestepSamplingName {
    Uniform,
    Sigmoid,
    LogitNormal,
    Mode,
    Shift,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerName {
    Ddim,
    Euler,
}

fn d_rank() -> i64 {
    16
}
fn d_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec()
}
fn d_one() -> f64 {
    1.0
}
fn d_max_t() -> f64 {
    1000.0
}
fn d_mode_scale() -> f64 {
    1.29
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
fn yes() -> bool {
    true
}
fn d_precision() -> Precision {
    Precision::Fp32
}
fn d_init() -> LoraInitName {
    LoraInitName::Kaiming
}
fn d_sampling() -> TimestepSamplingName {
    TimestepSamplingName::Uniform
}
fn d_sampler() -> SamplerName {
    SamplerName::Ddim
}

/// The config object `interface` and `create` accept. See [`config_schema`] for each key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pretrained: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default = "d_precision")]
    pub precision: Precision,
    #[serde(default = "d_rank")]
    pub lora_rank: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "d_init")]
    pub lora_init: LoraInitName,
    #[serde(default = "d_targets")]
    pub lora_targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
    #[serde(default)]
    pub train_text_encoder: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionName>,
    #[serde(default)]
    pub noise_offset: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    #[serde(default = "d_sampling")]
    pub timestep_sampling: TimestepSamplingName,
    #[serde(default = "d_one")]
    pub sigmoid_scale: f64,
    #[serde(default)]
    pub logit_mean: f64,
    #[serde(default = "d_one")]
    pub logit_std: f64,
    #[serde(default = "d_mode_scale")]
    pub mode_scale: f64,
    #[serde(default = "d_one")]
    pub discrete_flow_shift: f64,
    #[serde(default)]
    pub min_timestep: f64,
    #[serde(default = "d_max_t")]
    pub max_timestep: f64,
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
    #[serde(default = "yes")]
    pub decode_pixels: bool,
    /// sd-scripts' / musubi-tuner's `--gradient_checkpointing`: the UNet keeps only the
    /// activations between its resnets/transformers in the forward and recomputes them in
    /// backward (same gradients, about one more UNet forward per step).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl Config {
    /// Parses and checks a config; every error names the key and the fix. Paths must exist
    /// (checked here, so `interface` refuses a bad path before any weight loads).
    pub fn parse(json: &str) -> Result<Config> {
        let json = if json.trim().is_empty() { "{}" } else { json };
        let c: Config = serde_json::from_str(json).map_err(|e| {
            bad("(config)", format!("{e}; `pretrained` (a diffusers folder or a single-file .safetensors) is required"))
        })?;
        c.validate()?;
        Ok(c)
    }

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
        for (field, v) in [("config", &self.config), ("tokenizer", &self.tokenizer), ("lora", &self.lora)] {
            if let Some(v) = v {
                if !Path::new(v).exists() {
                    return Err(bad(field, format!("{v} does not exist")));
                }
            }
        }
        if self.lora_rank <= 0 {
            return Err(bad("lora_rank", format!("must be ≥ 1, got {}", self.lora_rank)));
        }
        if let Some(a) = self.lora_alpha {
            if !(a.is_finite() && a > 0.0) {
                return Err(bad("lora_alpha", format!("must be a number > 0, got {a}")));
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(bad("lora_dropout", format!("must be in [0, 1), got {}", self.lora_dropout)));
        }
        if self.lora_targets.is_empty() {
            return Err(bad("lora_targets", "must name at least one module (default: to_q, to_k, to_v, to_out.0)"));
        }
        if !(self.noise_offset.is_finite() && self.noise_offset >= 0.0) {
            return Err(bad("noise_offset", format!("must be ≥ 0, got {}", self.noise_offset)));
        }
        if let Some(g) = self.min_snr_gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(bad("min_snr_gamma", format!("must be > 0 (5 is the paper's value) or null, got {g}")));
            }
        }
        if !(0.0..=1000.0).contains(&self.min_timestep)
            || !(0.0..=1000.0).contains(&self.max_timestep)
            || self.min_timestep >= self.max_timestep
        {
            return Err(bad(
                "min_timestep/max_timestep",
                format!("need 0 ≤ min < max ≤ 1000, got {} / {}", self.min_timestep, self.max_timestep),
            ));
        }
        if !(1..=2).contains(&self.clip_skip) {
            return Err(bad("clip_skip", format!("must be 1 or 2, got {}", self.clip_skip)));
        }
        if self.sample_steps == 0 {
            return Err(bad("sample_steps", "must be ≥ 1"));
        }
        if !self.guidance.is_finite() {
            return Err(bad("guidance", "must be a finite number"));
        }
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return Err(bad("resolution", format!("must be a positive multiple of 8, got {}", self.resolution)));
        }
        Ok(())
    }

    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.lora_rank as f64)
    }

    /// The timestep sampler's method.
    pub fn sampling(&self) -> Sampling {
        match self.timestep_sampling {
            TimestepSamplingName::Uniform => Sampling::Uniform,
            TimestepSamplingName::Sigmoid => Sampling::Sigmoid { sigmoid_scale: self.sigmoid_scale },
            TimestepSamplingName::LogitNormal => Sampling::LogitNormal { mean: self.logit_mean, std: self.logit_std },
            TimestepSamplingName::Mode => Sampling::Mode { mode_scale: self.mode_scale },
            TimestepSamplingName::Shift => {
                Sampling::Shift { sigmoid_scale: self.sigmoid_scale, discrete_flow_shift: self.discrete_flow_shift }
            }
        }
    }

    /// The UNet module-name patterns of `lora_targets`, presets expanded: `ff` → the
    /// feed-forward (`ff.net.0.proj`, `ff.net.2`), `proj` → `proj_in`, `proj_out`, `conv` →
    /// LoCon on the resnet convolutions (`conv1`, `conv2`, `conv_shortcut`). Returns the
    /// patterns and whether any is a convolution.
    pub fn unet_patterns(&self) -> (Vec<String>, bool) {
        let mut out = Vec::new();
        let mut conv = false;
        for t in &self.lora_targets {
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
}

/// The text-encoder LoRA targets (`train_text_encoder = true`): the attention projections.
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// The JSON Schema of [`Config`]: every key with its default and meaning.
pub fn config_schema() -> serde_json::Value {
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sd15-lora config",
        "type": "object",
        "additionalProperties": false,
        "required": ["pretrained"],
        "properties": {
            "pretrained": {"type": "string",
                "description": "a diffusers StableDiffusionPipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or an original single-file .safetensors checkpoint (model.diffusion_model.* / first_stage_model.* / cond_stage_model.*)"},
            "config": {"type": "string",
                "description": "for a single file: a diffusers folder holding the component json configs (unet/config.json …) and tokenizer/; default: the built-in SD1.5 configs"},
            "tokenizer": {"type": "string",
                "description": "CLIP tokenizer: a transformers tokenizer folder (vocab.json + merges.txt) or open_clip's bpe_simple_vocab_16e6.txt.gz; default <pretrained or config>/tokenizer"},
            "precision": {"enum": ["fp32", "bf16", "fp16", "fp64"], "default": "fp32",
                "description": "base weight precision (LoRA weights are always f32; fp64 makes everything f64, for gradient checks)"},
            "lora_rank": {"type": "integer", "minimum": 1, "default": 16, "description": "LoRA rank r"},
            "lora_alpha": {"type": "number", "exclusiveMinimum": 0,
                "description": "LoRA alpha (scale alpha/r); default = lora_rank"},
            "lora_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
                "description": "dropout on the LoRA input while training (seeded per step)"},
            "lora_init": {"enum": ["kaiming", "gaussian"], "default": "kaiming",
                "description": "peft's init of lora_A (kaiming_uniform a=√5, or N(0, 1/r)); lora_B starts at 0"},
            "lora_targets": {"type": "array", "items": {"type": "string"},
                "default": ["to_q", "to_k", "to_v", "to_out.0"],
                "description": "UNet modules (peft suffix rules or `*` globs over diffusers paths) plus presets: `ff` (ff.net.0.proj, ff.net.2), `proj` (proj_in, proj_out), `conv` (LoCon on resnet conv1/conv2/conv_shortcut)"},
            "lora": {"type": "string",
                "description": "an existing LoRA (kohya .safetensors, diffusers pytorch_lora_weights.safetensors, or a PEFT folder) to start from / generate with: exactly its modules, ranks and alphas are injected (lora_rank/lora_alpha/lora_targets are then ignored)"},
            "train_text_encoder": {"type": "boolean", "default": false,
                "description": "also LoRA on the text encoder's q/k/v/out_proj, parameter group `text_encoder` (then texts cannot be cached)"},
            "prediction_type": {"enum": ["epsilon", "v_prediction"],
                "description": "the UNet's target; default: scheduler_config.json's prediction_type, else epsilon"},
            "noise_offset": {"type": "number", "minimum": 0, "default": 0.0,
                "description": "sd-scripts' noise offset: noise + offset·randn(B, C, 1, 1)"},
            "min_snr_gamma": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": null,
                "description": "min-SNR-γ weighting of the diffusion loss (null = off); also the `timestep_weights` output"},
            "timestep_sampling": {"enum": ["uniform", "sigmoid", "logit_normal", "mode", "shift"], "default": "uniform",
                "description": "how t is drawn (then t·1000 floored to an integer DDPM timestep in [min_timestep, max_timestep))"},
            "sigmoid_scale": {"type": "number", "default": 1.0, "description": "for sigmoid / shift"},
            "logit_mean": {"type": "number", "default": 0.0, "description": "for logit_normal"},
            "logit_std": {"type": "number", "default": 1.0, "description": "for logit_normal"},
            "mode_scale": {"type": "number", "default": 1.29, "description": "for mode"},
            "discrete_flow_shift": {"type": "number", "default": 1.0, "description": "for shift"},
            "min_timestep": {"type": "number", "minimum": 0, "maximum": 1000, "default": 0},
            "max_timestep": {"type": "number", "minimum": 0, "maximum": 1000, "default": 1000},
            "clip_skip": {"enum": [1, 2], "default": 1,
                "description": "2 = the penultimate text-encoder layer (then the final layer norm), as sd-scripts"},
            "sampler": {"enum": ["ddim", "euler"], "default": "ddim", "description": "sampling scheduler"},
            "sample_steps": {"type": "integer", "minimum": 1, "default": 30, "description": "default sampling steps"},
            "guidance": {"type": "number", "default": 7.5, "description": "default classifier-free guidance scale"},
            "resolution": {"type": "integer", "minimum": 8, "multipleOf": 8, "default": 512,
                "description": "default sample size; training images must be multiples of the VAE factor (8)"},
            "decode_pixels": {"type": "boolean", "default": true,
                "description": "output `pixels` (x̂0 decoded through the VAE, with gradient) from forward; false saves the decode but then no pixel loss or identity term can be planned"},
            "gradient_checkpointing": {"type": "boolean", "default": false,
                "description": "recompute the UNet's resnet/transformer activations in backward instead of keeping them: less memory, about one more UNet forward per training step, the same gradients"}
        }
    })
}

/// The declared interface for a config.
pub fn interface_for(c: &Config) -> ModelInterface {
    let mut s = ModelSpec::new()
        .image(
            "target",
            true,
            "the image to learn, f32 [B, 3, H, W] in [0, 1], H and W multiples of 8 (or its `latents`)",
        )
        .image(
            "reference",
            false,
            "identity reference (read by the identity term through the engine, not by the model)",
        )
        .text(
            "caption",
            true,
            if c.train_text_encoder {
                "the prompt of the image"
            } else {
                "the prompt of the image (or its `text_embeddings`)"
            },
        );
    if c.decode_pixels {
        s = s.output(
            "pixels",
            "x̂0 from the prediction, VAE-decoded with gradient, (x+1)/2, f32 [B, 3, H, W], not clamped",
        );
    }
    s = s
        .output("timesteps", "t / num_train_timesteps per sample, [B] f32 in [0, 1]")
        .output("timestep_weights", "the diffusion loss weight of each sample (min-SNR-γ; 1 without), [B] f32")
        .internal_loss(true)
        .encoding("latents", "target", InputKind::Image, &["pretrained", "config", "precision"]);
    if !c.train_text_encoder {
        s = s.encoding(
            "text_embeddings",
            "caption",
            InputKind::Text,
            &["pretrained", "config", "tokenizer", "precision", "clip_skip"],
        );
    }
    s = s.param_group("unet");
    if c.train_text_encoder {
        s = s.param_group("text_encoder");
    }
    for f in crate::adapter::FORMATS {
        s = s.adapter_format(f);
    }
    s.can_sample(true).build()
}
