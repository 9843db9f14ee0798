//! The trainer's config keys (LoRA shape and initialisation, precision, noise and timestep
//! draws, loss weighting, pixels, checkpointing), merged with a backbone's keys into one JSON
//! object ([`ModelConfig`]: unknown keys rejected, each error naming the key and the fix), the
//! merged JSON Schema and the declared interface.

use std::path::Path;

use likeness_diffusion::lora_keys::Component;
use likeness_diffusion::timesteps::Sampling;
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
        }
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
        "timestep_sampling": {"enum": ["uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift"], "default": "uniform",
            "description": "how t is drawn (DDPM: then t·1000 floored to an integer timestep in [min_timestep, max_timestep); flow matching: σ = t). flux_shift (flow matching only): sigmoid draws time-shifted by Flux's μ at the batch's image token count, as musubi-tuner / sd-scripts do"},
        "sigmoid_scale": {"type": "number", "default": 1.0, "description": "for sigmoid / shift / flux_shift"},
        "logit_mean": {"type": "number", "default": 0.0, "description": "for logit_normal"},
        "logit_std": {"type": "number", "default": 1.0, "description": "for logit_normal"},
        "mode_scale": {"type": "number", "default": 1.29, "description": "for mode"},
        "discrete_flow_shift": {"type": "number", "default": 1.0, "description": "for shift"},
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
        )
        .text(
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
    if !trains_text {
        for e in B::TEXT_ENCODINGS {
            s = s.encoding(e.name, "caption", InputKind::Text, e.keys);
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
