//! Qwen-Image-Edit's own config keys (the pipeline folder or musubi-tuner's three files, the
//! model version, sampling defaults); its LoRA target presets are core/diffusion's
//! (`lora_keys::qwen::target_patterns`: `musubi`, `attn`, `all`). The LoRA, noise, timestep and
//! loss keys are the toolkit's (`likeness_diffusion_torch::TrainConfig`); both sit in one JSON
//! object.

use std::path::Path;

use likeness_diffusion_torch::trainer::{bad_config as bad, check_paths_exist, check_sample_defaults, Result};
use likeness_diffusion_torch::BackboneConfig;
use serde::{Deserialize, Serialize};

/// Qwen-Image-Edit's keys. See [`BackboneConfig::properties`] for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QwenEditLoraConfig {
    /// A QwenImageEditPlusPipeline folder, or the transformer alone (musubi-tuner's `--dit`: a
    /// diffusers `transformer/` folder or a ComfyUI / musubi single file).
    pub pretrained: String,
    /// For a single transformer: the pipeline folder of the other components (its
    /// `transformer/config.json` too; without one the real 2509 config is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// musubi-tuner's `--vae`: the VAE folder, or one `.safetensors` file in diffusers' or
    /// ComfyUI's (Wan-2.1) names (default `<pipeline>/vae`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// musubi-tuner's `--text_encoder`: the Qwen2.5-VL folder or file (default
    /// `<pipeline>/text_encoder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<String>,
    /// The processor / tokenizer folder (default `<pipeline>/processor`, else `tokenizer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// musubi-tuner's `--model_version` (`--edit_plus` = `edit-2509`).
    #[serde(default = "d_model_version")]
    pub model_version: String,
    #[serde(default = "musubi_sample_steps")]
    pub sample_steps: u32,
    /// Sampling's true-CFG scale (with QwenImagePipeline's renormalisation; ≤ 1: no CFG).
    #[serde(default = "true_cfg_scale")]
    pub guidance: f64,
    #[serde(default = "pipeline_side")]
    pub resolution: u32,
    /// musubi-tuner's sample `--fs`: a static (linear) shift of the sampling sigmas instead of
    /// the scheduler's dynamic one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_shift: Option<f64>,
}

// The defaults of the keys above.
fn d_model_version() -> String {
    "edit-2509".into()
}
fn musubi_sample_steps() -> u32 {
    // musubi-tuner's Qwen sample default (`--s`); QwenImageEditPlusPipeline's is 50.
    20
}
fn true_cfg_scale() -> f64 {
    // QwenImageEditPlusPipeline's `true_cfg_scale` and musubi-tuner's `--l` default.
    4.0
}
fn pipeline_side() -> u32 {
    // The pipeline's output area (calculate_dimensions(1024²)) for a square control.
    1024
}

impl BackboneConfig for QwenEditLoraConfig {
    fn required() -> &'static [&'static str] {
        &["pretrained"]
    }

    fn validate(&self) -> Result<()> {
        if self.model_version != "edit-2509" {
            return Err(bad(
                "model_version",
                format!(
                    "`{}` is not implemented: qwen-edit-lora trains Qwen-Image-Edit-2509 (musubi-tuner's --edit_plus, \
                     model_version = \"edit-2509\"); `original`, `edit`, `edit-2511` and `layered` use other prompt \
                     templates or conditioning and are refused rather than trained wrongly",
                    self.model_version
                ),
            ));
        }
        let p = Path::new(&self.pretrained);
        if !p.exists() {
            return Err(bad(
                "pretrained",
                format!(
                    "{} does not exist; give a diffusers QwenImageEditPlusPipeline folder (transformer/ vae/ \
                     text_encoder/ processor/ scheduler/), or the transformer (musubi-tuner's --dit) with `vae` and \
                     `text_encoder`",
                    self.pretrained
                ),
            ));
        }
        if p.is_file() && !self.pretrained.ends_with(".safetensors") {
            return Err(bad("pretrained", format!("{}: only .safetensors single files are read", self.pretrained)));
        }
        check_paths_exist(&[
            ("config", &self.config),
            ("vae", &self.vae),
            ("text_encoder", &self.text_encoder),
            ("tokenizer", &self.tokenizer),
        ])?;
        if let Some(s) = self.sample_shift {
            if !(s.is_finite() && s > 0.0) {
                return Err(bad("sample_shift", format!("must be > 0 (musubi-tuner's --fs), got {s}")));
            }
        }
        check_sample_defaults(self.sample_steps, self.guidance, self.resolution)?;
        match self.resolution % 16 {
            0 => Ok(()),
            _ => Err(bad(
                "resolution",
                format!("{} must be a multiple of 16 (the VAE's 8 × the 2×2 packing)", self.resolution),
            )),
        }
    }

    fn properties() -> serde_json::Value {
        serde_json::json!({
            "pretrained": {"type": "string",
                "description": "a diffusers QwenImageEditPlusPipeline folder (transformer/ vae/ text_encoder/ processor/ scheduler/), a Hugging Face id in the local cache, or the transformer alone (musubi-tuner's --dit: a transformer/ folder or a single .safetensors file such as ComfyUI's qwen_image_edit_2509_bf16.safetensors) with `vae` and `text_encoder`"},
            "config": {"type": "string",
                "description": "for a transformer given alone: a pipeline folder holding the other components (default: the folder above a transformer/ folder)"},
            "vae": {"type": "string", "description": "musubi-tuner's --vae: the AutoencoderKLQwenImage folder, or one .safetensors file in diffusers' names (vae/diffusion_pytorch_model.safetensors) or the Wan-2.1 names of ComfyUI's qwen_image_vae.safetensors (its config.json beside it, else Qwen-Image's); default <pipeline>/vae"},
            "text_encoder": {"type": "string", "description": "musubi-tuner's --text_encoder: the Qwen2.5-VL folder or single file; default <pipeline>/text_encoder"},
            "tokenizer": {"type": "string", "description": "the Qwen2 processor/tokenizer folder (tokenizer.json, or vocab.json + merges.txt); default <pipeline>/processor, else <pipeline>/tokenizer"},
            "model_version": {"type": "string", "enum": ["edit-2509"], "default": "edit-2509",
                "description": "musubi-tuner's --model_version (--edit_plus = edit-2509): Qwen-Image-Edit-2509's multi-image conditioning"},
            "lora_targets": {"type": "array", "items": {"type": "string"},
                "default": ["to_q", "to_k", "to_v", "to_out.0"],
                "description": "transformer modules (peft suffix rules or `*` globs over diffusers paths) plus presets: `musubi` = `kohya` = `all-linear` (every Linear of the 60 blocks incl. img_mod.1/txt_mod.1: musubi-tuner's networks.lora_qwen_image, 840 modules; what musubi-tuner's --network_module networks.lora_qwen_image selects), `attn` (both streams' attention), `all` (musubi's set plus the top-level img_in, txt_in, proj_out, norm_out.linear and the timestep MLP)"},
            "sample_steps": {"type": "integer", "minimum": 1, "default": 20, "description": "sampling steps (musubi-tuner's sample default)"},
            "guidance": {"type": "number", "default": 4.0,
                "description": "sampling's true-CFG scale with QwenImagePipeline's renormalisation (the negative prompt is encoded with the same control images); ≤ 1: one forward per step, no CFG"},
            "resolution": {"type": "integer", "minimum": 16, "default": 1024, "description": "sample size (px) when a request gives none; a multiple of 16"},
            "sample_shift": {"type": "number", "exclusiveMinimum": 0,
                "description": "musubi-tuner's sample --fs: a static shift s·σ/(1+(s−1)σ) of the sampling sigmas (then the scheduler's shift_terminal) instead of the scheduler's dynamic μ"}
        })
    }

    /// The transformer's file or folder, as adapter metadata names the base model.
    fn base_model(&self) -> &str {
        &self.pretrained
    }
}
