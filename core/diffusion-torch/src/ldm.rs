//! The original single-file (LDM / CompVis) key layout ↔ diffusers names: the inverse of
//! diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`, written as
//! diffusers name → LDM name so that the model's own name list drives the map.

use crate::config::UNetConfig;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD1.x's CLIP text encoder: `cond_stage_model.transformer.text_model.*` = transformers' names.
pub const TEXT_ENCODER_PREFIX: &str = "cond_stage_model.transformer.";

fn resnet_ldm(rest: &str) -> String {
    let map = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ];
    for (d, l) in map {
        if let Some(r) = rest.strip_prefix(d) {
            return format!("{l}{r}");
        }
    }
    rest.to_string()
}

fn split_idx(s: &str) -> Option<(usize, &str)> {
    let (i, r) = s.split_once('.')?;
    Some((i.parse().ok()?, r))
}

/// The LDM name of a diffusers UNet parameter (without the `model.diffusion_model.` prefix);
/// `None` for a name this layout has no place for.
pub fn unet_to_ldm(name: &str, c: &UNetConfig) -> Option<String> {
    let n = c.layers_per_block as usize;
    let simple = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (d, l) in simple {
        if let Some(r) = name.strip_prefix(d) {
            return Some(format!("{l}{r}"));
        }
    }
    if let Some(r) = name.strip_prefix("down_blocks.") {
        let (i, r) = split_idx(r)?;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("input_blocks.{}.0.{}", (n + 1) * i + j + 1, resnet_ldm(r)));
        }
        if let Some(r) = r.strip_prefix("attentions.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("input_blocks.{}.1.{r}", (n + 1) * i + j + 1));
        }
        if let Some(r) = r.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{r}", (n + 1) * (i + 1)));
        }
        return None;
    }
    if let Some(r) = name.strip_prefix("mid_block.") {
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("middle_block.{}.{}", 2 * j, resnet_ldm(r)));
        }
        if let Some(r) = r.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{r}"));
        }
        return None;
    }
    if let Some(r) = name.strip_prefix("up_blocks.") {
        let (i, r) = split_idx(r)?;
        let m = n + 1;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("output_blocks.{}.0.{}", m * i + j, resnet_ldm(r)));
        }
        if let Some(r) = r.strip_prefix("attentions.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("output_blocks.{}.1.{r}", m * i + j));
        }
        if let Some(r) = r.strip_prefix("upsamplers.0.conv.") {
            // After the last resnet of the block: index 1 without attention, 2 with.
            let at = if c.up_block_types.get(i)? == "CrossAttnUpBlock2D" { 2 } else { 1 };
            return Some(format!("output_blocks.{}.{at}.conv.{r}", m * i + n));
        }
    }
    None
}

/// The LDM name of a diffusers VAE parameter (without `first_stage_model.`), and whether the
/// tensor is a 1×1 conv in LDM where diffusers has a Linear (the mid attention's q/k/v/out).
pub fn vae_to_ldm(name: &str, num_blocks: usize) -> Option<(String, bool)> {
    for part in ["encoder.", "decoder."] {
        let Some(r) = name.strip_prefix(part) else { continue };
        let res = |r: &str| r.replacen("conv_shortcut.", "nin_shortcut.", 1);
        if let Some(r) = r.strip_prefix("conv_norm_out.") {
            return Some((format!("{part}norm_out.{r}"), false));
        }
        if r.starts_with("conv_in.") || r.starts_with("conv_out.") {
            return Some((name.to_string(), false));
        }
        if let Some(r) = r.strip_prefix("down_blocks.") {
            let (i, r) = split_idx(r)?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, r) = split_idx(r)?;
                return Some((format!("{part}down.{i}.block.{j}.{}", res(r)), false));
            }
            let r = r.strip_prefix("downsamplers.0.conv.")?;
            return Some((format!("{part}down.{i}.downsample.conv.{r}"), false));
        }
        if let Some(r) = r.strip_prefix("up_blocks.") {
            // LDM numbers the decoder's up blocks from the lowest resolution's opposite end.
            let (i, r) = split_idx(r)?;
            let li = num_blocks.checked_sub(1 + i)?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, r) = split_idx(r)?;
                return Some((format!("{part}up.{li}.block.{j}.{}", res(r)), false));
            }
            let r = r.strip_prefix("upsamplers.0.conv.")?;
            return Some((format!("{part}up.{li}.upsample.conv.{r}"), false));
        }
        if let Some(r) = r.strip_prefix("mid_block.") {
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, r) = split_idx(r)?;
                return Some((format!("{part}mid.block_{}.{}", j + 1, res(r)), false));
            }
            let r = r.strip_prefix("attentions.0.")?;
            let map = [
                ("group_norm.", "norm.", false),
                ("to_q.", "q.", true),
                ("to_k.", "k.", true),
                ("to_v.", "v.", true),
                ("to_out.0.", "proj_out.", true),
            ];
            for (d, l, lin) in map {
                if let Some(x) = r.strip_prefix(d) {
                    return Some((format!("{part}mid.attn_1.{l}{x}"), lin && x == "weight"));
                }
            }
        }
        return None;
    }
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Some((name.to_string(), false));
    }
    None
}
