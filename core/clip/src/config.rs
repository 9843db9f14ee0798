//! Tower shapes: transformers' `config.json` (CLIPConfig), open_clip's model config JSON
//! (`model_configs/*.json`), and the built-in presets `ViT-B-32` / `ViT-L-14` (open_clip 3.3.0's
//! numbers). Any size works: nothing below is specialised to a preset.
use crate::{ClipError, Result};
use serde_json::Value;
use std::path::Path;

/// One transformer tower's shape (text or image).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub layers: usize,
    pub heads: usize,
    pub width: usize,
    /// The MLP's hidden width (transformers' `intermediate_size`, open_clip's `mlp_ratio·width`).
    pub mlp: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eps: f64,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (exact erf form).
    pub quick_gelu: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub layers: usize,
    pub heads: usize,
    pub width: usize,
    pub mlp: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub eps: f64,
    pub quick_gelu: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    /// The shared embedding width (transformers' `projection_dim`, open_clip's `embed_dim`).
    pub projection_dim: usize,
    /// ln(1/0.07) = 2.6592 unless the config says otherwise; the checkpoint's `logit_scale`
    /// tensor, when present, wins.
    pub logit_scale_init: f64,
}

/// open_clip's preset names (`-quickgelu` variants: the same shapes with OpenAI's activation).
pub const PRESETS: &[&str] = &["ViT-B-32", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu"];

fn bad(path: &Path, field: &str, what: impl std::fmt::Display) -> ClipError {
    ClipError::BadConfig { path: path.to_path_buf(), field: field.to_string(), what: what.to_string() }
}

/// `obj[key]` as a positive integer, `default` when absent (transformers' save_pretrained writes
/// only the values that differ from the class defaults).
fn uint(path: &Path, obj: &Value, section: &str, key: &str, default: Option<usize>) -> Result<usize> {
    let field = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
    match obj.get(key) {
        None | Some(Value::Null) => default.ok_or_else(|| bad(path, &field, "is missing")),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(bad(path, &field, format!("is {v}, expected a positive integer"))),
        },
    }
}

fn float(path: &Path, obj: &Value, field: &str, key: &str, default: f64) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| bad(path, field, format!("is {v}, expected a number"))),
    }
}

fn act(path: &Path, obj: &Value, field: &str) -> Result<bool> {
    match obj.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu") {
        "quick_gelu" => Ok(true),
        "gelu" => Ok(false),
        other => Err(bad(path, field, format!("is {other:?}; supported: \"quick_gelu\", \"gelu\""))),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ClipError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| bad(path, "<file>", format!("is not JSON: {e}")))
}

impl ClipConfig {
    /// transformers' CLIPConfig `config.json`; absent keys take transformers 5's defaults.
    pub fn from_hf_config_json(path: &Path) -> Result<Self> {
        let j = read_json(path)?;
        let (t, v) = (&j["text_config"], &j["vision_config"]);
        if !t.is_object() || !v.is_object() {
            return Err(bad(path, "text_config / vision_config", "missing: not a transformers CLIPModel config.json"));
        }
        let text = TextConfig {
            layers: uint(path, t, "text_config", "num_hidden_layers", Some(12))?,
            heads: uint(path, t, "text_config", "num_attention_heads", Some(8))?,
            width: uint(path, t, "text_config", "hidden_size", Some(512))?,
            mlp: uint(path, t, "text_config", "intermediate_size", Some(2048))?,
            context_length: uint(path, t, "text_config", "max_position_embeddings", Some(77))?,
            vocab_size: uint(path, t, "text_config", "vocab_size", Some(49408))?,
            eps: float(path, t, "text_config.layer_norm_eps", "layer_norm_eps", 1e-5)?,
            quick_gelu: act(path, t, "text_config.hidden_act")?,
        };
        let vision = VisionConfig {
            layers: uint(path, v, "vision_config", "num_hidden_layers", Some(12))?,
            heads: uint(path, v, "vision_config", "num_attention_heads", Some(12))?,
            width: uint(path, v, "vision_config", "hidden_size", Some(768))?,
            mlp: uint(path, v, "vision_config", "intermediate_size", Some(3072))?,
            image_size: uint(path, v, "vision_config", "image_size", Some(224))?,
            patch_size: uint(path, v, "vision_config", "patch_size", Some(32))?,
            eps: float(path, v, "vision_config.layer_norm_eps", "layer_norm_eps", 1e-5)?,
            quick_gelu: act(path, v, "vision_config.hidden_act")?,
        };
        if let Some(c) = v.get("num_channels").and_then(Value::as_u64) {
            if c != 3 {
                return Err(bad(path, "vision_config.num_channels", format!("is {c}; only RGB (3) is supported")));
            }
        }
        let cfg = ClipConfig {
            text,
            vision,
            projection_dim: uint(path, &j, "", "projection_dim", Some(512))?,
            logit_scale_init: float(path, &j, "logit_scale_init_value", "logit_scale_init_value", 2.6592)?,
        };
        cfg.check(path)
    }

    /// open_clip's model config JSON (`embed_dim`, `vision_cfg`, `text_cfg`, optional
    /// `quick_gelu`). Only the plain ViT + text-transformer CLIP is supported; timm / HF text
    /// towers, attentional pooling and the like are refused by field name.
    pub fn from_open_clip_json(path: &Path) -> Result<Self> {
        let j = read_json(path)?;
        Self::from_open_clip_value(path, &j)
    }

    fn from_open_clip_value(path: &Path, j: &Value) -> Result<Self> {
        let (v, t) = (&j["vision_cfg"], &j["text_cfg"]);
        if !v.is_object() || !t.is_object() {
            return Err(bad(path, "vision_cfg / text_cfg", "missing: not an open_clip model config"));
        }
        for (section, obj, keys) in [
            ("vision_cfg", v, &["timm_model_name", "attentional_pool", "attn_pooler_queries", "no_ln_pre"][..]),
            ("text_cfg", t, &["hf_model_name", "hf_tokenizer_name", "no_causal_mask", "pool_type"][..]),
        ] {
            for k in keys {
                if obj.get(*k).is_some_and(|x| !x.is_null() && x != &Value::Bool(false)) {
                    return Err(bad(
                        path,
                        &format!("{section}.{k}"),
                        "is not supported (plain OpenAI-style CLIP only)",
                    ));
                }
            }
        }
        let quick_gelu = j.get("quick_gelu").and_then(Value::as_bool).unwrap_or(false);
        let vw = uint(path, v, "vision_cfg", "width", Some(768))?;
        let head_width = uint(path, v, "vision_cfg", "head_width", Some(64))?;
        let ratio = |obj: &Value, section: &str| float(path, obj, &format!("{section}.mlp_ratio"), "mlp_ratio", 4.0);
        let vision = VisionConfig {
            layers: uint(path, v, "vision_cfg", "layers", Some(12))?,
            heads: vw / head_width,
            width: vw,
            mlp: (vw as f64 * ratio(v, "vision_cfg")?) as usize,
            image_size: uint(path, v, "vision_cfg", "image_size", Some(224))?,
            patch_size: uint(path, v, "vision_cfg", "patch_size", Some(16))?,
            eps: 1e-5,
            quick_gelu,
        };
        let tw = uint(path, t, "text_cfg", "width", Some(512))?;
        let text = TextConfig {
            layers: uint(path, t, "text_cfg", "layers", Some(12))?,
            heads: uint(path, t, "text_cfg", "heads", Some(8))?,
            width: tw,
            mlp: (tw as f64 * ratio(t, "text_cfg")?) as usize,
            context_length: uint(path, t, "text_cfg", "context_length", Some(77))?,
            vocab_size: uint(path, t, "text_cfg", "vocab_size", Some(49408))?,
            eps: 1e-5,
            quick_gelu,
        };
        let cfg = ClipConfig {
            text,
            vision,
            projection_dim: uint(path, j, "", "embed_dim", None)?,
            logit_scale_init: (1.0f64 / 0.07).ln(),
        };
        cfg.check(path)
    }

    /// A built-in preset (open_clip 3.3.0's `model_configs/<name>.json`).
    pub fn preset(name: &str) -> Result<Self> {
        let (base, quick) = match name.strip_suffix("-quickgelu") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let j = match base {
            "ViT-B-32" => serde_json::json!({
                "embed_dim": 512,
                "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
                "quick_gelu": quick,
            }),
            "ViT-L-14" => serde_json::json!({
                "embed_dim": 768,
                "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
                "quick_gelu": quick,
            }),
            _ => return Err(ClipError::UnknownPreset(name.to_string())),
        };
        Self::from_open_clip_value(Path::new(&format!("<preset {name}>")), &j)
    }

    fn check(self, path: &Path) -> Result<Self> {
        let (t, v) = (&self.text, &self.vision);
        if t.width % t.heads != 0 {
            return Err(bad(path, "text width / heads", format!("{} is not divisible by {} heads", t.width, t.heads)));
        }
        if v.width % v.heads != 0 {
            return Err(bad(
                path,
                "vision width / heads",
                format!("{} is not divisible by {} heads", v.width, v.heads),
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(bad(
                path,
                "vision image_size / patch_size",
                format!("{} is not a multiple of the patch size {}", v.image_size, v.patch_size),
            ));
        }
        if t.context_length < 2 {
            return Err(bad(path, "text context_length", format!("{} < 2", t.context_length)));
        }
        Ok(self)
    }
}
