//! Flux's own config keys (the pipeline folder, the guidance the transformer is trained with,
//! the T5 length, sampling defaults) and its LoRA target presets. The LoRA, noise, timestep and
//! loss keys are the toolkit's (`likeness_diffusion_torch::TrainConfig`); both sit in one JSON
//! object.

use std::path::Path;

use likeness_diffusion_torch::trainer::{bad_config as bad, check_paths_exist, check_sample_defaults, Result};
use likeness_diffusion_torch::BackboneConfig;
use serde::{Deserialize, Serialize};

fn d_guidance_scale() -> f64 {
    // musubi-tuner's / sd-scripts' flux_train_network `--guidance_scale` default for dev LoRA.
    1.0
}
fn d_max_sequence_length() -> u32 {
    // FluxPipeline's default for dev (schnell: 256).
    512
}
fn d_steps() -> u32 {
    // FluxPipeline's num_inference_steps default.
    28
}
fn d_sample_guidance() -> f64 {
    // FluxPipeline's guidance_scale default (the distilled embedding's scale).
    3.5
}
fn d_resolution() -> u32 {
    1024
}

/// Flux's keys. See [`BackboneConfig::properties`] for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxLoraConfig {
    /// A FluxPipeline folder, or a BFL transformer file (then `config` holds the rest).
    pub pretrained: String,
    /// The distilled guidance fed to Flux-dev's embedding while training.
    #[serde(default = "d_guidance_scale")]
    pub guidance_scale: f64,
    /// For a single transformer file: the FluxPipeline folder of the other components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// musubi-tuner's `--fp8_base`: the blocks' Linear weights held in fp8 (e4m3fn, per-tensor
    /// scale), dequantised to `precision` in each forward.
    #[serde(default)]
    pub fp8_base: bool,
    /// T5 tokens per prompt.
    #[serde(default = "d_max_sequence_length")]
    pub max_sequence_length: u32,
    /// CLIP's tokenizer folder (default `<pretrained>/tokenizer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// T5's tokenizer folder with `tokenizer.json` (default `<pretrained>/tokenizer_2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_2: Option<String>,
    #[serde(default = "d_steps")]
    pub sample_steps: u32,
    #[serde(default = "d_sample_guidance")]
    pub guidance: f64,
    #[serde(default = "d_resolution")]
    pub resolution: u32,
}

/// diffusers' `train_dreambooth_lora_flux.py` default: attention of both streams.
pub const ATTN: &[&str] = &["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"];
/// The MLPs of both streams and the single blocks' MLP in/out.
pub const MLP: &[&str] = &["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"];
/// The single blocks' output projection (BFL `linear2`; matched by full path, so the model's
/// final `proj_out` is not).
pub const SINGLE_OUT: &str = "single_transformer_blocks.*.proj_out";
/// The adaLN modulations (BFL `img_mod.lin`, `txt_mod.lin`, `modulation.lin`).
pub const MODULATION: &[&str] = &["norm1.linear", "norm1_context.linear", "single_transformer_blocks.*.norm.linear"];

/// The transformer's patterns for `lora_targets`, presets expanded:
/// - `attn`: [`ATTN`] (diffusers' Flux DreamBooth default); `pairedit`: the same set;
/// - `all-linear`: every Linear of the double and single blocks — kohya/musubi-tuner's
///   `networks.lora_flux` set (`img_attn.qkv/proj`, `img_mlp.0/2`, `img_mod.lin`, the `txt_`
///   twins, `linear1`, `linear2`, `modulation.lin`) in diffusers names;
/// - `musubi` / `kohya`: the same as `all-linear` (their default module set);
/// - anything else: a peft name or a `*` glob, as given.
pub fn transformer_patterns(targets: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |xs: &[&str]| out.extend(xs.iter().map(|s| s.to_string()));
    for t in targets {
        match t.as_str() {
            // PairEdit's `train_method: full`: every Linear child of an `Attention` module, which
            // on Flux.1 is exactly ATTN (266 layers: no to_out in the single blocks).
            "attn" | "pairedit" => add(ATTN),
            "all-linear" | "all_linear" | "musubi" | "kohya" => {
                add(ATTN);
                add(MLP);
                add(&[SINGLE_OUT]);
                add(MODULATION);
            }
            other => add(&[other]),
        }
    }
    out.sort();
    out.dedup();
    out
}

impl BackboneConfig for FluxLoraConfig {
    fn required() -> &'static [&'static str] {
        &["pretrained"]
    }

    fn validate(&self) -> Result<()> {
        let p = Path::new(&self.pretrained);
        if p.is_file() {
            if !self.pretrained.ends_with(".safetensors") {
                return Err(bad("pretrained", format!("{}: only .safetensors single files are read", self.pretrained)));
            }
            if self.config.is_none() {
                return Err(bad(
                    "config",
                    format!(
                        "{} is a single transformer file (BFL's flux1-dev.safetensors layout): set `config` to a \
                         FluxPipeline folder with the other components (vae/ text_encoder/ text_encoder_2/ tokenizer/ \
                         tokenizer_2/ scheduler/) and transformer/config.json",
                        self.pretrained
                    ),
                ));
            }
        } else if !p.is_dir() {
            return Err(bad(
                "pretrained",
                format!(
                    "{} does not exist; give a diffusers FluxPipeline folder (transformer/ vae/ text_encoder/ \
                     text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/), e.g. black-forest-labs/FLUX.1-dev from the \
                     Hugging Face cache, or a BFL single file with `config`",
                    self.pretrained
                ),
            ));
        }
        check_paths_exist(&[
            ("config", &self.config),
            ("tokenizer", &self.tokenizer),
            ("tokenizer_2", &self.tokenizer_2),
        ])?;
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(bad(
                "guidance_scale",
                format!("must be ≥ 0 (musubi's default 1.0), got {}", self.guidance_scale),
            ));
        }
        if self.max_sequence_length == 0 || self.max_sequence_length > 512 {
            return Err(bad(
                "max_sequence_length",
                format!("must be in 1..=512 (T5's length in FluxPipeline), got {}", self.max_sequence_length),
            ));
        }
        check_sample_defaults(self.sample_steps, self.guidance, self.resolution)
    }

    fn properties() -> serde_json::Value {
        serde_json::json!({
            "pretrained": {"type": "string",
                "description": "a diffusers FluxPipeline folder (transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/), a Hugging Face id in the local cache, or an original BFL transformer file (flux1-dev.safetensors; ComfyUI's model.diffusion_model. prefix and fp8-scaled files too) with `config`"},
            "config": {"type": "string",
                "description": "for a single transformer file: a FluxPipeline folder with the other components and transformer/config.json"},
            "tokenizer": {"type": "string",
                "description": "CLIP tokenizer folder (vocab.json + merges.txt); default <pretrained>/tokenizer"},
            "tokenizer_2": {"type": "string",
                "description": "T5 tokenizer folder with tokenizer.json; default <pretrained>/tokenizer_2"},
            "lora_targets": {"type": "array", "items": {"type": "string"},
                "default": ["to_q", "to_k", "to_v", "to_out.0"],
                "description": "transformer modules (peft suffix rules or `*` globs over diffusers paths) plus presets: `attn` (both streams' attention, diffusers' Flux default), `all-linear` = `musubi` = `kohya` (every Linear of the double and single blocks, kohya/musubi-tuner's set)"},
            "guidance_scale": {"type": "number", "minimum": 0, "default": 1.0,
                "description": "the distilled guidance fed to Flux-dev's guidance embedding while training (musubi-tuner's --guidance_scale); ignored by a model without one (schnell)"},
            "fp8_base": {"type": "boolean", "default": false,
                "description": "musubi-tuner's --fp8_base: hold the transformer blocks' Linear weights in fp8 (e4m3fn, one scale per tensor), dequantised to `precision` in each forward: half the memory of bf16 weights (12 B parameters: 11.9 GB instead of 23.8 GB). A LoRA cannot be merged into them"},
            "max_sequence_length": {"type": "integer", "minimum": 1, "maximum": 512, "default": 512,
                "description": "T5 tokens (FluxPipeline: 512 for dev, 256 for schnell)"},
            "sample_steps": {"type": "integer", "minimum": 1, "default": 28, "description": "sampling steps"},
            "guidance": {"type": "number", "default": 3.5,
                "description": "sampling guidance: Flux-dev's embedded scale (one forward per step, no CFG)"},
            "resolution": {"type": "integer", "minimum": 1, "default": 1024, "description": "sample size (px)"}
        })
    }

    /// The transformer's file or folder, as adapter metadata names the base model.
    fn base_model(&self) -> &str {
        &self.pretrained
    }
}
