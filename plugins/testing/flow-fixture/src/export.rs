//! `export_adapter`: the trained deltas `ΔW = W − W₀`, `Δb = b − b₀`, `ΔP = P − P₀` as a
//! rank-3 LoRA in the formats users already have. Tensors are f32.
//!
//! A LoRA module applies `Δ = up · down · (alpha / rank)`. Here `alpha = rank = 3`, so the
//! factors multiply to the delta exactly:
//! * `proj` of the UNet (`W`, 3×3): `down = I₃`, `up = ΔW`; the bias delta goes in
//!   `diff_b` (kohya/LyCORIS, read by ComfyUI) or `lora_B.bias` (PEFT's `lora_bias`);
//! * `proj` of the text encoder (`P`, 3 out × 8 in): the identity goes on the other side,
//!   `up = I₃`, `down = ΔP` (3×8), so that this module has rank 3 too.
//!
//! | format | file(s) | keys |
//! |---|---|---|
//! | `kohya` | `adapter.safetensors` | `lora_unet_proj.{lora_down.weight, lora_up.weight, alpha, diff_b}`, `lora_te_proj.{lora_down.weight, lora_up.weight, alpha}`; metadata: the caller's plus `ss_network_module = networks.lora`, `ss_network_dim = 3`, `ss_network_alpha = 3` |
//! | `diffusers` | `pytorch_lora_weights.safetensors` | `unet.proj.lora_A.weight` (= down), `unet.proj.lora_B.weight` (= up), `unet.proj.lora_B.bias`, `text_encoder.proj.lora_{A,B}.weight`; metadata: the caller's plus `format = pt` |
//! | `peft` | `adapter_model.safetensors` + `adapter_config.json` | `base_model.model.{unet,text_encoder}.proj.lora_{A,B}.weight`, `base_model.model.unet.proj.lora_B.bias`; config `peft_type = LORA`, `r = 3`, `lora_alpha = 3`, `target_modules = ["proj"]`, `lora_bias = true` |
//!
//! Without text (`use_text = false`) the text-encoder module is left out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use likeness_sdk::st::{self, StTensor};
use likeness_sdk::{err, Result};

use crate::flow::{self, C, N_PARAMS, TEXT_DIM};

/// The formats `export_adapter` writes.
pub const FORMATS: [&str; 3] = ["kohya", "diffusers", "peft"];
/// LoRA rank (and alpha) of every module.
pub const RANK: usize = 3;

fn identity() -> Vec<f32> {
    (0..C * C).map(|i| if i / C == i % C { 1.0 } else { 0.0 }).collect()
}

/// The LoRA factors of the deltas: (module, down `[r, in]`, up `[out, r]`, bias delta).
struct Module {
    down: (Vec<usize>, Vec<f32>),
    up: (Vec<usize>, Vec<f32>),
    bias: Option<Vec<f32>>,
}

fn modules(theta: &[f64; N_PARAMS], init: &[f64; N_PARAMS], use_text: bool) -> (Module, Option<Module>) {
    let delta = |r: std::ops::Range<usize>| -> Vec<f32> { r.map(|i| (theta[i] - init[i]) as f32).collect() };
    let unet =
        Module { down: (vec![RANK, C], identity()), up: (vec![C, RANK], delta(flow::W)), bias: Some(delta(flow::B)) };
    let te = use_text.then(|| Module {
        down: (vec![RANK, TEXT_DIM], delta(flow::P)),
        up: (vec![C, RANK], identity()),
        bias: None,
    });
    (unet, te)
}

/// The caller's metadata as strings (non-string JSON values are written as JSON text).
fn string_metadata(meta: &serde_json::Map<String, serde_json::Value>) -> BTreeMap<String, String> {
    meta.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            )
        })
        .collect()
}

/// Writes the adapter into `dir` in `format`; returns the files written.
pub fn export(
    dir: &Path,
    format: &str,
    meta: &serde_json::Map<String, serde_json::Value>,
    theta: &[f64; N_PARAMS],
    init: &[f64; N_PARAMS],
    use_text: bool,
) -> Result<Vec<PathBuf>> {
    if !FORMATS.contains(&format) {
        return Err(err::input(format!(
            "model `{}` cannot export an adapter in format `{format}`; valid formats: {}",
            crate::ID,
            FORMATS.join(", ")
        )));
    }
    if !dir.is_dir() {
        return Err(err::io(format!("adapter directory {} does not exist", dir.display())));
    }
    let (unet, te) = modules(theta, init, use_text);
    let mut metadata = string_metadata(meta);
    let mut tensors = Vec::new();
    let mut push = |name: String, shape: &[usize], data: &[f32]| tensors.push(StTensor::from_f32(&name, shape, data));
    let files = match format {
        "kohya" => {
            for (prefix, m) in [("lora_unet_proj", Some(&unet)), ("lora_te_proj", te.as_ref())] {
                let Some(m) = m else { continue };
                push(format!("{prefix}.lora_down.weight"), &m.down.0, &m.down.1);
                push(format!("{prefix}.lora_up.weight"), &m.up.0, &m.up.1);
                push(format!("{prefix}.alpha"), &[], &[RANK as f32]);
                if let Some(b) = &m.bias {
                    push(format!("{prefix}.diff_b"), &[C], b);
                }
            }
            metadata.insert("ss_network_module".into(), "networks.lora".into());
            metadata.insert("ss_network_dim".into(), RANK.to_string());
            metadata.insert("ss_network_alpha".into(), RANK.to_string());
            let path = dir.join("adapter.safetensors");
            st::save(&path, &tensors, &metadata)?;
            vec![path]
        }
        "diffusers" | "peft" => {
            let root = if format == "peft" { "base_model.model." } else { "" };
            for (module, m) in [("unet.proj", Some(&unet)), ("text_encoder.proj", te.as_ref())] {
                let Some(m) = m else { continue };
                push(format!("{root}{module}.lora_A.weight"), &m.down.0, &m.down.1);
                push(format!("{root}{module}.lora_B.weight"), &m.up.0, &m.up.1);
                if let Some(b) = &m.bias {
                    push(format!("{root}{module}.lora_B.bias"), &[C], b);
                }
            }
            metadata.insert("format".into(), "pt".into());
            if format == "diffusers" {
                let path = dir.join("pytorch_lora_weights.safetensors");
                st::save(&path, &tensors, &metadata)?;
                vec![path]
            } else {
                let weights = dir.join("adapter_model.safetensors");
                st::save(&weights, &tensors, &metadata)?;
                let config = serde_json::json!({
                    "peft_type": "LORA",
                    "task_type": null,
                    "r": RANK,
                    "lora_alpha": RANK,
                    "lora_dropout": 0.0,
                    "target_modules": ["proj"],
                    "bias": "none",
                    "lora_bias": true,
                    "fan_in_fan_out": false,
                    "init_lora_weights": true,
                    "base_model_name_or_path": meta.get("base_model_name_or_path").and_then(|v| v.as_str()),
                });
                let cfg = dir.join("adapter_config.json");
                let text = serde_json::to_string_pretty(&config).map_err(|e| err::internal(e.to_string()))?;
                st::write_atomic(&cfg, text.as_bytes())?;
                vec![weights, cfg]
            }
        }
        _ => unreachable!("checked above"),
    };
    Ok(files)
}
