//! Qwen-Image (and its Edit / Edit-Plus 2509 variants, the same transformer) module names: the
//! LoRA-targetable Linear layers of diffusers' `QwenImageTransformer2DModel` (60
//! `transformer_blocks.<i>`, manifest `shared/reference/manifests/qwen_image_transformer_diffusers.json`).
//!
//! Unlike Flux there is no second layout: musubi-tuner, kohya-style tools, ComfyUI
//! (`comfy/ldm/qwen_image/model.py` uses the diffusers names) and diffusers all name a module by
//! its diffusers path, so every format maps one to one (`original_names: false`):
//! - kohya / musubi-tuner (`networks/lora_qwen_image.py`): `lora_unet_` + the path with `.` → `_`
//!   (`lora_unet_transformer_blocks_0_attn_to_out_0`, `…_img_mlp_net_0_proj`, `…_img_mod_1`),
//!   `.lora_down.weight` `[r, in]`, `.lora_up.weight` `[out, r]`, a 0-d `.alpha` on every module;
//! - diffusers: `transformer.<path>.lora_A.weight` / `.lora_B.weight`;
//! - PEFT: `base_model.model.<path>…` + adapter_config.json;
//! - ComfyUI (`comfy/lora.py` `model_lora_keys_unet`): `lora_unet_<path _>`, `diffusion_model.<path>`,
//!   bare `<path>`, `transformer.<path>`, `lycoris_<path _>`.
//!
//! musubi's targets: every Linear inside a `QwenImageTransformerBlock`, 14 per block
//! ([`MUSUBI_TARGETS`]), 840 modules on the 60-block model. **The modulation layers `img_mod.1` /
//! `txt_mod.1` are included**: `lora_qwen_image.py` adds the exclude pattern `.*(_mod_).*`, but it
//! is matched against the *dotted* module name (`transformer_blocks.0.img_mod.1`), which never
//! contains `_mod_` — so shared/reference/lora-formats.md's "musubi excludes `_mod_` layers" is
//! wrong about what musubi writes. The top-level Linears ([`TOP_LEVEL`]) get no LoRA from musubi
//! but do from diffusers / peft / ai-toolkit targets, so they are read and written too (diffusers'
//! converter `_convert_non_diffusers_qwen_lora_to_diffusers` maps their kohya names explicitly).

use super::dotted_with;
use super::sd15::LayerKind;

/// The transformer blocks of the released Qwen-Image / Qwen-Image-Edit(-2509) models.
pub const NUM_BLOCKS: usize = 60;

/// The Linears of one `transformer_blocks.<i>` that musubi-tuner's `networks.lora_qwen_image`
/// gives a LoRA (its default: every Linear of the block), as peft suffixes.
pub const MUSUBI_TARGETS: &[&str] = &[
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
];

/// Both streams' attention projections (the first 8 of [`MUSUBI_TARGETS`]).
pub const ATTN: &[&str] = MUSUBI_TARGETS.split_at(8).0;

/// The Linears outside the blocks (full paths): no LoRA from musubi, targetable by other tools.
pub const TOP_LEVEL: &[&str] = &[
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
];

/// The patterns a `lora_targets` list stands for, presets expanded (sorted, deduplicated; peft
/// suffix rules, so `attn.to_q` selects `transformer_blocks.<i>.attn.to_q` in every block):
/// - `musubi` / `kohya` / `all-linear` (`all_linear`): [`MUSUBI_TARGETS`], musubi-tuner's default
///   set, the 14 Linears of every block (modulation included);
/// - `attn`: [`ATTN`], both streams' attention;
/// - `all`: [`MUSUBI_TARGETS`] + [`TOP_LEVEL`], every Linear of the transformer (846);
/// - anything else: passed through as given (a peft suffix or the plugin's own glob).
pub fn target_patterns(targets: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |xs: &[&str]| out.extend(xs.iter().map(|s| s.to_string()));
    for t in targets {
        match t.as_str() {
            "musubi" | "kohya" | "all-linear" | "all_linear" => add(MUSUBI_TARGETS),
            "attn" => add(ATTN),
            "all" => {
                add(MUSUBI_TARGETS);
                add(TOP_LEVEL);
            }
            other => add(&[other]),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The module paths musubi-tuner puts a LoRA on for a transformer with `num_blocks` blocks
/// (840 for [`NUM_BLOCKS`]), block by block in [`MUSUBI_TARGETS`] order.
pub fn musubi_modules(num_blocks: usize) -> Vec<String> {
    (0..num_blocks).flat_map(|i| MUSUBI_TARGETS.iter().map(move |l| format!("transformer_blocks.{i}.{l}"))).collect()
}

/// The layer kind of a LoRA-targetable `QwenImageTransformer2DModel` module (diffusers path):
/// every Linear of a block and [`TOP_LEVEL`]; `None` for norms (`txt_norm`, `attn.norm_q`, …)
/// and unknown names. Block indices are canonical decimals (no leading zeros, as the model's
/// `ModuleList` names them); any count of blocks is accepted (tiny test models have 2).
pub fn transformer_module(path: &str) -> Option<LayerKind> {
    if TOP_LEVEL.contains(&path) {
        return Some(LayerKind::Linear);
    }
    let (i, leaf) = path.strip_prefix("transformer_blocks.")?.split_once('.')?;
    let canonical = !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) && (i == "0" || !i.starts_with('0'));
    (canonical && MUSUBI_TARGETS.contains(&leaf)).then_some(LayerKind::Linear)
}

/// Multi-word names of the Qwen-Image transformer, for turning kohya keys back into dotted
/// paths: the pairs and triplets diffusers' `_convert_non_diffusers_qwen_lora_to_diffusers`
/// protects (`to_q`, …, `img_mod`, `add_q_proj`, `to_add_out`) plus the ones its explicit
/// top-level map spells out (`img_in`, `norm_out`, `time_text_embed`, …). Longest first where
/// one is a prefix of another.
const COMPOUNDS: &[&str] = &[
    "transformer_blocks",
    "time_text_embed",
    "timestep_embedder",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "img_mlp",
    "txt_mlp",
    "img_mod",
    "txt_mod",
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out",
    "linear_1",
    "linear_2",
];

/// `transformer_blocks_0_attn_to_out_0` → `transformer_blocks.0.attn.to_out.0`; the caller
/// validates the result with [`transformer_module`].
pub fn dotted(underscored: &str) -> String {
    dotted_with(underscored, COMPOUNDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_musubi_and_top_level_name_round_trips_through_its_kohya_spelling() {
        let all: Vec<String> =
            musubi_modules(NUM_BLOCKS).into_iter().chain(TOP_LEVEL.iter().map(|s| s.to_string())).collect();
        assert_eq!(all.len(), 846, "840 block Linears + 6 top-level, as in the diffusers manifest");
        for p in &all {
            assert_eq!(transformer_module(p), Some(LayerKind::Linear), "{p}");
            assert_eq!(dotted(&p.replace('.', "_")), *p, "kohya spelling of {p}");
        }
        assert_eq!(dotted("transformer_blocks_59_img_mlp_net_0_proj"), "transformer_blocks.59.img_mlp.net.0.proj");
        for bad in [
            "transformer_blocks.0.attn.norm_q",
            "transformer_blocks.01.attn.to_q",
            "transformer_blocks.x.attn.to_q",
            "txt_norm",
            "transformer_blocks.0.ff.net.2",
            "single_transformer_blocks.0.proj_out",
        ] {
            assert_eq!(transformer_module(bad), None, "{bad}");
        }
    }

    #[test]
    fn presets_expand_to_musubi_set() {
        let p = target_patterns(&["musubi".into()]);
        assert_eq!(p.len(), 14);
        assert!(p.contains(&"img_mod.1".to_string()) && p.contains(&"txt_mod.1".to_string()), "{p:?}");
        assert_eq!(target_patterns(&["all".into(), "kohya".into()]).len(), 20);
        assert_eq!(target_patterns(&["attn".into(), "img_mlp.net.2".into()]).len(), 9);
    }
}
