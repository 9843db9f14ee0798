//! The trainer's config keys (LoRA shape and initialisation, precision, noise and timestep
//! draws, loss weighting, pixels, checkpointing), merged with a backbone's keys into one JSON
//! object ([`ModelConfig`]: unknown keys rejected, each error naming the key and the fix), the
//! merged JSON Schema and the declared interface.

use std::path::Path;

use likeness_diffusion::lora_keys::Component;
use likeness_diffusion::timesteps::{Density, Sampling};
use likeness_diffusion::weighting::FlowWeighting;
use likeness_sdk::{InputKind, ModelInterface, ModelSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{config as bad, Result};
use crate::backbone::{Backbone, BackboneConfig};

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
    /// PairEdit's / kohya's `kaiming_uniform_(down, a=1)`: bound √3/√fan_in.
    #[serde(rename = "kaiming_a1")]
    KaimingA1,
    Gaussian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSamplingName {
    Uniform,
    Sigmoid,
    LogitNormal,
    Mode,
    Shift,
    /// musubi-tuner's / sd-scripts' `flux_shift`: sigmoid draws shifted by Flux's
    /// resolution-dependent μ (flow matching only).
    FluxShift,
    /// musubi-tuner's `qwen_shift`: sigmoid draws shifted by s = e^μ, μ = lin(256 → 0.5,
    /// 8192 → 0.9) of the target's packed token count (h/2)·(w/2) (controls do not count).
    QwenShift,
    /// musubi-tuner's default `sigma`: t uniform on {1, …, 1000}/1000 (or logit_normal / mode
    /// by `weighting_scheme`), `discrete_flow_shift` ignored, as musubi-tuner's unshifted table.
    Sigma,
}

/// musubi-tuner's `--weighting_scheme` (training/timesteps.py:37-94): `logit_normal` and `mode`
/// change the density of `sigma` sampling only; `cosmap` and `sigma_sqrt` weight the loss
/// (flow matching); `none` neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightingScheme {
    #[default]
    None,
    LogitNormal,
    Mode,
    Cosmap,
    SigmaSqrt,
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

/// The trainer's keys. See [`properties`] for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
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
    #[serde(default)]
    pub noise_offset: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    #[serde(default = "d_sampling")]
    pub timestep_sampling: TimestepSamplingName,
    #[serde(default)]
    pub weighting_scheme: WeightingScheme,
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
    #[serde(default = "yes")]
    pub decode_pixels: bool,
    /// sd-scripts' / musubi-tuner's `--gradient_checkpointing`: the denoiser keeps only the
    /// activations between its segments in the forward and recomputes them in backward (same
    /// gradients, about one more denoiser forward per step).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// DTBack's identity injection (seeds 000/001): face/body embeddings → tokens → added
    /// cross-attention; see crate::identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::identity::IdentityConfig>,
    /// Trained injection weights to start from / generate with (the `identity` export's
    /// `identity.safetensors`, e.g. DTBack's best model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_weights: Option<String>,
    /// PairEdit's objective (seed 003) instead of the plain diffusion loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairedit: Option<super::pairedit::PairEditConfig>,
    /// PairEdit's content LoRA (its `_0` file) to start from; with `pairedit` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_content: Option<String>,
    /// `sample`: the adapter is applied at steps i > k only (PairEdit's `skips`); none = always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_adapter_skip: Option<usize>,
    /// `sample` edits with two adapters (PairEdit's `generate_real_image`): at each step where the
    /// adapter is on, v = v_c + g·(v_s − v_c), v_c with the content LoRA alone, v_s with the
    /// semantic LoRA alone at the request's scale; v_c elsewhere. g = this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_edit_cfg: Option<f64>,
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        if let Some(v) = &self.lora {
            if !Path::new(v).exists() {
                return Err(bad("lora", format!("{v} does not exist")));
            }
        }
        if let Some(v) = &self.lora_content {
            if self.pairedit.is_none() {
                return Err(bad(
                    "lora_content",
                    "is PairEdit's content LoRA: it needs a `pairedit` object (or use `lora`)",
                ));
            }
            if !Path::new(v).exists() {
                return Err(bad("lora_content", format!("{v} does not exist")));
            }
        }
        if let Some(c) = &self.identity {
            c.validate().map_err(|(k, m)| bad("identity", format!("`{k}` {m}")))?;
            if self.pairedit.is_some() {
                return Err(bad(
                    "identity",
                    "DTBack's identity injection and PairEdit's objective are separate workflows: use one",
                ));
            }
        }
        if let Some(v) = &self.identity_weights {
            if self.identity.is_none() {
                return Err(bad("identity_weights", "holds DTBack injection weights: it needs an `identity` object"));
            }
            if !Path::new(v).exists() {
                return Err(bad("identity_weights", format!("{v} does not exist")));
            }
        }
        if let Some(g) = self.sample_edit_cfg {
            if !g.is_finite() {
                return Err(bad("sample_edit_cfg", format!("must be a finite number (PairEdit: 0.75), got {g}")));
            }
            if self.pairedit.is_none() || self.lora_content.is_none() {
                return Err(bad(
                    "sample_edit_cfg",
                    "edits with a content LoRA: it needs a `pairedit` object and `lora_content` (and the semantic LoRA as `lora`)",
                ));
            }
        }
        if let Some(p) = &self.pairedit {
            p.validate()?;
            if self.decode_pixels {
                return Err(bad(
                    "decode_pixels",
                    "PairEdit's objective has no pixel output (its losses are on latents): set decode_pixels = false",
                ));
            }
            if self.train_text_encoder {
                return Err(bad(
                    "train_text_encoder",
                    "PairEdit trains the denoiser's LoRA pair only: set it to false",
                ));
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
        Ok(())
    }

    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.lora_rank as f64)
    }

    /// The timestep sampler's method for latents of `latent_h`×`latent_w` (`flux_shift`'s μ
    /// depends on the image's token count).
    pub fn sampling(&self, latent_h: usize, latent_w: usize) -> Sampling {
        match self.timestep_sampling {
            TimestepSamplingName::Uniform => Sampling::Uniform,
            TimestepSamplingName::Sigmoid => Sampling::Sigmoid { sigmoid_scale: self.sigmoid_scale },
            TimestepSamplingName::LogitNormal => Sampling::LogitNormal { mean: self.logit_mean, std: self.logit_std },
            TimestepSamplingName::Mode => Sampling::Mode { mode_scale: self.mode_scale },
            TimestepSamplingName::Shift => {
                Sampling::Shift { sigmoid_scale: self.sigmoid_scale, discrete_flow_shift: self.discrete_flow_shift }
            }
            TimestepSamplingName::FluxShift => {
                Sampling::FluxShift { sigmoid_scale: self.sigmoid_scale, latent_h, latent_w }
            }
            // musubi-tuner: lin(…)((h // 2) * (w // 2)) of the target's latents.
            TimestepSamplingName::QwenShift => {
                Sampling::QwenShift { sigmoid_scale: self.sigmoid_scale, seq_len: (latent_h / 2) * (latent_w / 2) }
            }
            TimestepSamplingName::Sigma => Sampling::Sigma {
                density: match self.weighting_scheme {
                    WeightingScheme::LogitNormal => Density::LogitNormal { mean: self.logit_mean, std: self.logit_std },
                    WeightingScheme::Mode => Density::Mode { mode_scale: self.mode_scale },
                    _ => Density::Uniform,
                },
            },
        }
    }

    /// The flow-matching loss weight of a sample drawn at σ = `t` (`weighting_scheme` cosmap /
    /// sigma_sqrt, else 1). musubi-tuner looks σ up in its unshifted 1000-step table at the
    /// *model* timestep (`get_sigmas`, nearest entry): that is t·1000 itself for `sigma`
    /// sampling and t·1000 + 1 for the t-based methods (trainer_base.py:704-708).
    pub fn flow_loss_weight(&self, t: f64) -> f64 {
        let w = match self.weighting_scheme {
            WeightingScheme::Cosmap => FlowWeighting::Cosmap,
            WeightingScheme::SigmaSqrt => FlowWeighting::SigmaSqrt,
            _ => return 1.0,
        };
        let model_t = match self.timestep_sampling {
            TimestepSamplingName::Sigma => t * 1000.0,
            _ => t * 1000.0 + 1.0,
        };
        w.weight(model_t.round().clamp(1.0, 1000.0) / 1000.0)
    }

    /// The keys that decide the adapter's shape: a saved state must agree on them.
    pub fn structural(&self) -> Value {
        serde_json::json!({
            "lora_rank": self.lora_rank, "lora_alpha": self.alpha(), "lora_targets": self.lora_targets,
            "train_text_encoder": self.train_text_encoder, "lora": self.lora, "precision": self.precision,
            "pairedit": self.pairedit.as_ref().map(|p| p.variant.has_content()), "lora_content": self.lora_content,
            "identity": self.identity,
        })
    }
}

/// Optional path keys (`config`, `tokenizer`, …) must name something that exists.
pub fn check_paths_exist(fields: &[(&'static str, &Option<String>)]) -> Result<()> {
    for (field, v) in fields {
        if let Some(v) = v {
            if !Path::new(v).exists() {
                return Err(bad(field, format!("{v} does not exist")));
            }
        }
    }
    Ok(())
}

/// The sampling defaults every backbone config has (`sample_steps`, `guidance`, `resolution`);
/// the resolution's multiple of the VAE factor is the backbone's to check at load, where the
/// VAE config is known.
pub fn check_sample_defaults(sample_steps: u32, guidance: f64, resolution: u32) -> Result<()> {
    if sample_steps == 0 {
        return Err(bad("sample_steps", "must be ≥ 1"));
    }
    if !guidance.is_finite() {
        return Err(bad("guidance", format!("must be a finite number, got {guidance}")));
    }
    if resolution == 0 {
        return Err(bad("resolution", "must be a positive multiple of the VAE factor, got 0"));
    }
    Ok(())
}

/// The JSON Schema `properties` of [`TrainConfig`]: every key with its default and meaning.
pub fn properties() -> Value {
    serde_json::json!({
        "precision": {"enum": ["fp32", "bf16", "fp16", "fp64"], "default": "fp32",
            "description": "base weight precision (LoRA weights are always f32; fp64 makes everything f64, for gradient checks)"},
        "lora_rank": {"type": "integer", "minimum": 1, "default": 16, "description": "LoRA rank r"},
        "lora_alpha": {"type": "number", "exclusiveMinimum": 0,
            "description": "LoRA alpha (scale alpha/r); default = lora_rank"},
        "lora_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
            "description": "dropout on the LoRA input while training (seeded per step)"},
        "lora_init": {"enum": ["kaiming", "kaiming_a1", "gaussian"], "default": "kaiming",
            "description": "init of lora_A: peft's kaiming_uniform a=√5 (bound 1/√fan_in), PairEdit's kaiming_uniform a=1 (bound √3/√fan_in), or N(0, 1/r); lora_B starts at 0"},
        "lora_targets": {"type": "array", "items": {"type": "string"},
            "default": ["to_q", "to_k", "to_v", "to_out.0"],
            "description": "denoiser modules (peft suffix rules or `*` globs over diffusers paths)"},
        "lora": {"type": "string",
            "description": "an existing LoRA (kohya .safetensors, diffusers pytorch_lora_weights.safetensors, or a PEFT folder) to start from / generate with: exactly its modules, ranks and alphas are injected (lora_rank/lora_alpha/lora_targets are then ignored)"},
        "train_text_encoder": {"type": "boolean", "default": false,
            "description": "also LoRA on the text encoder's attention projections, parameter group `text_encoder` (then texts cannot be cached)"},
        "noise_offset": {"type": "number", "minimum": 0, "default": 0.0,
            "description": "sd-scripts' noise offset: noise + offset·randn(B, C, 1, 1)"},
        "min_snr_gamma": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": null,
            "description": "min-SNR-γ weighting of the diffusion loss (null = off); also the `timestep_weights` output"},
        "timestep_sampling": {"enum": ["uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift", "qwen_shift", "sigma"], "default": "uniform",
            "description": "how t is drawn (DDPM: then t·1000 floored to an integer timestep in [min_timestep, max_timestep); flow matching: σ = t). flux_shift / qwen_shift (flow matching only): sigmoid draws time-shifted by Flux's / Qwen-Image's μ at the target's packed token count, as musubi-tuner / sd-scripts do. sigma: musubi-tuner's default, t uniform on {1..1000}/1000 (density by weighting_scheme), discrete_flow_shift ignored"},
        "weighting_scheme": {"enum": ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"], "default": "none",
            "description": "musubi-tuner's --weighting_scheme: logit_normal / mode set the density of `sigma` sampling (no effect on other samplings, as in musubi-tuner); cosmap (2/(π(1−2σ+2σ²))) / sigma_sqrt (σ⁻²) weight each sample's flow-matching loss, σ from the 1000-step table at the model timestep; none: neither"},
        "sigmoid_scale": {"type": "number", "default": 1.0, "description": "for sigmoid / shift / flux_shift / qwen_shift"},
        "logit_mean": {"type": "number", "default": 0.0, "description": "for logit_normal (sampling or weighting_scheme)"},
        "logit_std": {"type": "number", "default": 1.0, "description": "for logit_normal (sampling or weighting_scheme)"},
        "mode_scale": {"type": "number", "default": 1.29, "description": "for mode (sampling or weighting_scheme)"},
        "discrete_flow_shift": {"type": "number", "default": 1.0, "description": "for shift (no effect with sigma, as in musubi-tuner)"},
        "min_timestep": {"type": "number", "minimum": 0, "maximum": 1000, "default": 0},
        "max_timestep": {"type": "number", "minimum": 0, "maximum": 1000, "default": 1000},
        "decode_pixels": {"type": "boolean", "default": true,
            "description": "output `pixels` (x̂0 decoded through the VAE, with gradient) from forward; false saves the decode but then no pixel loss or identity term can be planned"},
        "gradient_checkpointing": {"type": "boolean", "default": false,
            "description": "recompute the denoiser's activations in backward instead of keeping them: less memory, about one more denoiser forward per training step, the same gradients"},
        "pairedit": super::pairedit::property(),
        "identity": crate::identity::IdentityConfig::property(),
        "identity_weights": {"type": "string",
            "description": "with `identity`: trained injection weights (identity.safetensors of the `identity` adapter export, e.g. best_model) to start from or generate with"},
        "lora_content": {"type": "string",
            "description": "with `pairedit`: PairEdit's content LoRA (its `_0` .pt or .safetensors) to start from"},
        "sample_adapter_skip": {"type": "integer", "minimum": 0,
            "description": "sampling applies the adapter only at steps i > k (PairEdit's `skips`, 0-based); unset = every step"},
        "sample_edit_cfg": {"type": "number",
            "description": "PairEdit's real-image editing (semantic_cfg_scale): sampling runs the content LoRA (lora_content) and the semantic LoRA (lora, at the request's scale) separately and takes v_c + g·(v_s − v_c) where the adapter is on"}
    })
}

/// The merged JSON Schema of a backbone's config.
pub fn schema<B: Backbone>() -> Value {
    let mut props = properties();
    let own = B::Config::properties();
    let (map, extra) = (props.as_object_mut().expect("an object"), own.as_object().expect("an object"));
    for (k, v) in extra {
        map.insert(k.clone(), v.clone());
    }
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": format!("{} config", B::ID),
        "type": "object",
        "additionalProperties": false,
        "required": B::Config::required(),
        "properties": props,
    })
}

/// A model's whole config: the trainer's keys and the backbone's, one JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig<C> {
    pub train: TrainConfig,
    pub backbone: C,
}

impl<C: BackboneConfig> ModelConfig<C> {
    /// Parses and checks a config; every error names the key and the fix. Paths must exist
    /// (checked here, so `interface` refuses a bad path before any weight loads).
    pub fn parse(json: &str) -> Result<Self> {
        let c = Self::read(json)?;
        c.train.validate()?;
        c.backbone.validate()?;
        Ok(c)
    }

    /// Splits the object between the two key sets (a key in neither is an error) without the
    /// checks of [`parse`](Self::parse): also for configs read back from saved metadata.
    pub fn read(json: &str) -> Result<Self> {
        let json = if json.trim().is_empty() { "{}" } else { json };
        let v: Value = serde_json::from_str(json).map_err(|e| bad("(config)", format!("not JSON: {e}")))?;
        let Value::Object(all) = v else { return Err(bad("(config)", "must be a JSON object")) };
        let (ours, theirs) = (properties(), C::properties());
        let (ours, theirs) = (ours.as_object().expect("an object"), theirs.as_object().expect("an object"));
        let (mut train, mut backbone) = (serde_json::Map::new(), serde_json::Map::new());
        for (k, v) in all {
            // A key the backbone redefines (a description) is still the trainer's.
            if ours.contains_key(&k) {
                train.insert(k, v);
            } else if theirs.contains_key(&k) {
                backbone.insert(k, v);
            } else {
                let mut keys: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
                keys.sort();
                let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
                return Err(bad("(config)", format!("unknown key `{k}`; the keys are: {}", keys.join(", "))));
            }
        }
        let required = C::required().join(", ");
        let train = serde_json::from_value(Value::Object(train)).map_err(|e| bad("(config)", e.to_string()))?;
        let backbone = serde_json::from_value(Value::Object(backbone)).map_err(|e| {
            bad("(config)", if required.is_empty() { e.to_string() } else { format!("{e}; required: {required}") })
        })?;
        Ok(ModelConfig { train, backbone })
    }

    /// The one JSON object (what `likeness.config` metadata holds).
    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(&self.backbone).map_err(|e| bad("(config)", e.to_string()))?;
        let t = serde_json::to_value(&self.train).map_err(|e| bad("(config)", e.to_string()))?;
        if let (Some(m), Value::Object(t)) = (v.as_object_mut(), t) {
            m.extend(t);
        }
        Ok(v.to_string())
    }
}

/// The declared interface for a config; `trains_text`: whether a text encoder has LoRA (its
/// `train_text_encoder`, or an initial LoRA with text-encoder modules).
pub fn interface<B: Backbone>(c: &TrainConfig, trains_text: bool) -> ModelInterface {
    if let Some(p) = &c.pairedit {
        return pairedit_interface::<B>(p.variant.reads_source());
    }
    let mut s = ModelSpec::new()
        .image(
            "target",
            true,
            "the image to learn, f32 [B, 3, H, W] in [0, 1], H and W multiples of the VAE factor (or its `latents`)",
        )
        .image(
            "reference",
            false,
            "identity reference (read by the identity term through the engine, not by the model)",
        );
    for d in B::CONDITION_IMAGES {
        s = s.image(d.name, d.required, d.doc);
    }
    s = s.text(
        "caption",
        // DTBack's data may have no captions: identity.prompt stands in.
        c.identity.is_none(),
        if trains_text { "the prompt of the image" } else { "the prompt of the image (or its text encodings)" },
    );
    if let Some(ic) = &c.identity {
        s = s.image(
            "face_embedding",
            true,
            "DTBack: the reference's face identity embedding [B, face_dim] (the engine embeds `reference` with the face metric)",
        );
        if ic.num_body_latents > 0 {
            s = s.image(
                "body_embedding",
                true,
                "DTBack: the reference's body identity embedding [B, body_dim] (the body metric's, e.g. mtcnn-reid)",
            );
        }
    }
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
        .encoding("latents", "target", InputKind::Image, B::LATENTS_KEYS);
    // A backbone conditioned on images caches its condition encodings (each over its sources,
    // `caption+control_*`), the others their text encodings; nothing of a text encoder that trains.
    if !trains_text && B::CONDITION_IMAGES.is_empty() {
        for e in B::TEXT_ENCODINGS {
            s = s.encoding(e.name, "caption", InputKind::Text, e.keys);
        }
    }
    if !trains_text && !B::CONDITION_IMAGES.is_empty() {
        for e in B::CONDITION_ENCODINGS {
            let kind = if e.sources.first() == Some(&"caption") { InputKind::Text } else { InputKind::Image };
            s = s.encoding(e.name, &e.sources.join("+"), kind, e.keys);
        }
    }
    // The denoiser's group always; the text encoders' while they train.
    for (k, comp) in B::COMPONENTS.iter().enumerate() {
        if k == 0 || trains_text {
            s = s.param_group(comp.as_str());
        }
    }
    for f in super::adapter::formats(c) {
        s = s.adapter_format(f);
    }
    s.can_sample(true).build()
}

/// Under `pairedit`: the pair's two images, no texts (the model encodes its own prompt), the
/// internal loss, no pixels, the denoiser's group.
fn pairedit_interface<B: Backbone>(reads_source: bool) -> ModelInterface {
    let mut s = ModelSpec::new().image("target", true, "PairEdit's target image (B), f32 [B, 3, H, W] in [0, 1]");
    if reads_source {
        s = s.image("control", true, "PairEdit's source image (A), the same size as `target`");
    }
    s = s
        .output("timesteps", "σ of the drawn schedule index per sample, [B] f32 in (0, 1]")
        .output("timestep_weights", "1 per sample, [B] f32")
        .internal_loss(true)
        .param_group(B::COMPONENTS[0].as_str());
    for f in ["kohya", "diffusers", "peft", "pairedit"] {
        s = s.adapter_format(f);
    }
    s.can_sample(true).build()
}

/// Whether component `c` is a text encoder (every component but the denoiser).
pub fn is_text_encoder<B: Backbone>(c: Component) -> bool {
    B::COMPONENTS.first() != Some(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(json: serde_json::Value) -> TrainConfig {
        serde_json::from_value(json).expect("a valid trainer config")
    }

    /// Expected values: musubi-tuner's own lines run in Python (torch, f64 draws) —
    /// trainer_base.py:599-612 (`qwen_shift`: h, w = latents.shape[-2:], μ = lin(256 → 0.5,
    /// 8192 → 0.9)((h // 2)·(w // 2)), shift = e^μ, t = σ(n)·shift / (1 + (shift − 1)·σ(n))).
    #[test]
    fn qwen_shift_uses_the_targets_packed_token_count() {
        let c = train(serde_json::json!({"timestep_sampling": "qwen_shift"}));
        for (h, w, n, want) in [
            (128, 128, 0.0, 0.6667558177123246),
            (128, 128, 0.7, 0.8011581187707747),
            (96, 64, -1.3, 0.3239924851748767),
            (166, 166, 0.25, 0.7473115003916622),
        ] {
            let s = c.sampling(h, w);
            assert!(s.needs_normal());
            let t = s.transform(n);
            assert!((t - want).abs() < 1e-12, "{h}x{w} n={n}: {t} vs musubi-tuner {want}");
        }
    }

    #[test]
    fn sigma_sampling_ignores_the_flow_shift_and_takes_its_density_from_weighting_scheme() {
        let c = train(serde_json::json!({"timestep_sampling": "sigma", "discrete_flow_shift": 2.2}));
        assert_eq!(c.sampling(64, 64), Sampling::Sigma { density: Density::Uniform });
        let c = train(
            serde_json::json!({"timestep_sampling": "sigma", "weighting_scheme": "logit_normal", "logit_std": 2.0}),
        );
        assert_eq!(c.sampling(64, 64), Sampling::Sigma { density: Density::LogitNormal { mean: 0.0, std: 2.0 } });
        let c = train(serde_json::json!({"timestep_sampling": "sigma", "weighting_scheme": "mode"}));
        assert_eq!(c.sampling(64, 64), Sampling::Sigma { density: Density::Mode { mode_scale: 1.29 } });
        // An unknown value is refused by name.
        let e = serde_json::from_value::<TrainConfig>(serde_json::json!({"weighting_scheme": "snr"})).unwrap_err();
        assert!(e.to_string().contains("snr"), "{e}");
    }

    /// Expected values: musubi-tuner's compute_loss_weighting_for_sd3 + get_sigmas
    /// (training/timesteps.py:58-94) in Python on its float32 table `linspace(1, 0, 1001)`, at
    /// model timestep 1000·t + 1 (t-based sampling) or the table's own timestep (`sigma`).
    #[test]
    fn cosmap_and_sigma_sqrt_weights_are_musubi_tuners() {
        let shift = |w: &str| train(serde_json::json!({"timestep_sampling": "shift", "weighting_scheme": w}));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.abs().max(1.0);
        assert!(close(shift("cosmap").flow_loss_weight(0.3), 1.0991325955496305));
        assert!(close(shift("sigma_sqrt").flow_loss_weight(0.3), 11.037403652439359));
        // 1000·0.9996 + 1 lies past the table's last timestep 1000: σ = 1.
        assert!(close(shift("sigma_sqrt").flow_loss_weight(0.9996), 1.0));
        let sigma = train(serde_json::json!({"timestep_sampling": "sigma", "weighting_scheme": "cosmap"}));
        assert!(close(sigma.flow_loss_weight(0.766), 0.9923739556957012));
        for w in ["none", "logit_normal", "mode"] {
            assert_eq!(shift(w).flow_loss_weight(0.3), 1.0, "{w}");
        }
    }
}
