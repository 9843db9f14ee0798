//! SD1.x module names: which diffusers modules a LoRA can patch, and the diffusers ↔ original
//! LDM (CompVis / sgm) module map that kohya files in the `lora_unet_input_blocks_…` spelling use.
//!
//! The map is the module-level form of diffusers' `convert_ldm_unet_checkpoint` (and of
//! `core/diffusion-torch/src/ldm.rs`, its weight-level inverse), written for any block count:
//! the LDM → diffusers direction needs only `layers_per_block`; diffusers → LDM also needs to
//! know which up blocks have attention (the upsampler sits at index 1 without, 2 with).

/// What kind of layer a module is: decides the LoRA tensor ranks we accept (2-D for Linear,
/// 4-D for Conv2d; `proj_in/out` are 1×1 convs in SD1.5 and Linear with `use_linear_projection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    Conv,
    LinearOrConv,
}

/// The UNet's block structure, as far as the LDM numbering depends on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sd15Layout {
    pub layers_per_block: usize,
    /// One entry per up block: true for `CrossAttnUpBlock2D`.
    pub up_block_attention: Vec<bool>,
}

impl Sd15Layout {
    /// The real SD1.x UNet: 2 layers per block, up blocks `UpBlock2D` then 3× `CrossAttnUpBlock2D`.
    pub fn sd15() -> Self {
        Sd15Layout { layers_per_block: 2, up_block_attention: vec![false, true, true, true] }
    }
}

fn idx(s: &str) -> Option<(usize, &str)> {
    let (i, r) = s.split_once('.').unwrap_or((s, ""));
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) || (i.len() > 1 && i.starts_with('0')) {
        return None;
    }
    Some((i.parse().ok()?, r))
}

fn resnet_leaf(r: &str) -> Option<LayerKind> {
    match r {
        "conv1" | "conv2" | "conv_shortcut" => Some(LayerKind::Conv),
        "time_emb_proj" => Some(LayerKind::Linear),
        _ => None,
    }
}

/// The inside of a `Transformer2DModel` (diffusers and LDM spell it the same).
fn attention_leaf(r: &str) -> Option<LayerKind> {
    match r {
        "proj_in" | "proj_out" => return Some(LayerKind::LinearOrConv),
        _ => {}
    }
    let r = r.strip_prefix("transformer_blocks.")?;
    let (_, r) = idx(r)?;
    match r {
        "attn1.to_q" | "attn1.to_k" | "attn1.to_v" | "attn1.to_out.0" | "attn2.to_q" | "attn2.to_k" | "attn2.to_v"
        | "attn2.to_out.0" | "ff.net.0.proj" | "ff.net.2" => Some(LayerKind::Linear),
        _ => None,
    }
}

/// The layer kind of a LoRA-targetable SD1.x UNet module (diffusers path), `None` for anything
/// else (norms, unknown names, wrong nesting).
pub fn unet_module(path: &str) -> Option<LayerKind> {
    match path {
        "conv_in" | "conv_out" => return Some(LayerKind::Conv),
        "time_embedding.linear_1" | "time_embedding.linear_2" => return Some(LayerKind::Linear),
        _ => {}
    }
    let (r, mid) = if let Some(r) = path.strip_prefix("mid_block.") {
        (r, true)
    } else {
        let r = path.strip_prefix("down_blocks.").or_else(|| path.strip_prefix("up_blocks."))?;
        (idx(r)?.1, false)
    };
    if let Some(r) = r.strip_prefix("resnets.") {
        return resnet_leaf(idx(r)?.1);
    }
    if let Some(r) = r.strip_prefix("attentions.") {
        let (j, r) = idx(r)?;
        return if mid && j != 0 { None } else { attention_leaf(r) };
    }
    if !mid
        && (r == "downsamplers.0.conv" && path.starts_with("down_")
            || r == "upsamplers.0.conv" && path.starts_with("up_"))
    {
        return Some(LayerKind::Conv);
    }
    None
}

/// The layer kind of a LoRA-targetable CLIP text-encoder module
/// (`text_model.encoder.layers.<i>.{self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2}`).
pub fn text_encoder_module(path: &str) -> Option<LayerKind> {
    let r = path.strip_prefix("text_model.encoder.layers.")?;
    let (_, r) = idx(r)?;
    match r {
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" | "self_attn.out_proj" | "mlp.fc1" | "mlp.fc2" => {
            Some(LayerKind::Linear)
        }
        _ => None,
    }
}

fn resnet_to_ldm(r: &str) -> Option<&'static str> {
    Some(match r {
        "conv1" => "in_layers.2",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    })
}

fn resnet_from_ldm(r: &str) -> Option<&'static str> {
    Some(match r {
        "in_layers.2" => "conv1",
        "out_layers.3" => "conv2",
        "emb_layers.1" => "time_emb_proj",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    })
}

/// The LDM module path (without `model.diffusion_model.`) of a targetable diffusers UNet module.
pub fn unet_to_ldm(path: &str, layout: &Sd15Layout) -> Option<String> {
    unet_module(path)?;
    let m = layout.layers_per_block + 1;
    let simple = [
        ("conv_in", "input_blocks.0.0"),
        ("conv_out", "out.2"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
    ];
    if let Some((_, l)) = simple.iter().find(|(d, _)| *d == path) {
        return Some(l.to_string());
    }
    if let Some(r) = path.strip_prefix("down_blocks.") {
        let (i, r) = idx(r)?;
        if r == "downsamplers.0.conv" {
            return Some(format!("input_blocks.{}.0.op", m * (i + 1)));
        }
        let (res, r) =
            if let Some(r) = r.strip_prefix("resnets.") { (true, r) } else { (false, r.strip_prefix("attentions.")?) };
        let (j, leaf) = idx(r)?;
        if j >= layout.layers_per_block {
            return None;
        }
        let b = m * i + j + 1;
        return Some(if res {
            format!("input_blocks.{b}.0.{}", resnet_to_ldm(leaf)?)
        } else {
            format!("input_blocks.{b}.1.{leaf}")
        });
    }
    if let Some(r) = path.strip_prefix("mid_block.") {
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, leaf) = idx(r)?;
            if j > 1 {
                return None;
            }
            return Some(format!("middle_block.{}.{}", 2 * j, resnet_to_ldm(leaf)?));
        }
        return Some(format!("middle_block.1.{}", r.strip_prefix("attentions.0.")?));
    }
    let r = path.strip_prefix("up_blocks.")?;
    let (i, r) = idx(r)?;
    if r == "upsamplers.0.conv" {
        let at = if *layout.up_block_attention.get(i)? { 2 } else { 1 };
        return Some(format!("output_blocks.{}.{at}.conv", m * i + layout.layers_per_block));
    }
    let (res, r) =
        if let Some(r) = r.strip_prefix("resnets.") { (true, r) } else { (false, r.strip_prefix("attentions.")?) };
    let (j, leaf) = idx(r)?;
    if j >= m {
        return None;
    }
    let b = m * i + j;
    Some(if res {
        format!("output_blocks.{b}.0.{}", resnet_to_ldm(leaf)?)
    } else {
        format!("output_blocks.{b}.1.{leaf}")
    })
}

/// The diffusers module path of an LDM UNet module path (the inverse of [`unet_to_ldm`]; needs
/// only `layers_per_block`). `None` when the LDM name has no targetable diffusers module.
pub fn unet_from_ldm(path: &str, layers_per_block: usize) -> Option<String> {
    let n = layers_per_block;
    let m = n + 1;
    let simple = [
        ("input_blocks.0.0", "conv_in"),
        ("out.2", "conv_out"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
    ];
    if let Some((_, d)) = simple.iter().find(|(l, _)| *l == path) {
        return Some(d.to_string());
    }
    let out = if let Some(r) = path.strip_prefix("input_blocks.") {
        let (b, r) = idx(r)?;
        if b == 0 {
            return None;
        }
        if r == "0.op" {
            if b % m != 0 {
                return None;
            }
            format!("down_blocks.{}.downsamplers.0.conv", b / m - 1)
        } else {
            let (i, j) = ((b - 1) / m, (b - 1) % m);
            if j >= n {
                return None;
            }
            if let Some(leaf) = r.strip_prefix("0.") {
                format!("down_blocks.{i}.resnets.{j}.{}", resnet_from_ldm(leaf)?)
            } else {
                format!("down_blocks.{i}.attentions.{j}.{}", r.strip_prefix("1.")?)
            }
        }
    } else if let Some(r) = path.strip_prefix("middle_block.") {
        let (k, leaf) = idx(r)?;
        match k {
            0 | 2 => format!("mid_block.resnets.{}.{}", k / 2, resnet_from_ldm(leaf)?),
            1 => format!("mid_block.attentions.0.{leaf}"),
            _ => return None,
        }
    } else if let Some(r) = path.strip_prefix("output_blocks.") {
        let (b, r) = idx(r)?;
        let (i, j) = (b / m, b % m);
        let (k, leaf) = idx(r)?;
        match (k, leaf) {
            (0, leaf) => format!("up_blocks.{i}.resnets.{j}.{}", resnet_from_ldm(leaf)?),
            (1 | 2, "conv") if j == n => format!("up_blocks.{i}.upsamplers.0.conv"),
            (1, leaf) => format!("up_blocks.{i}.attentions.{j}.{leaf}"),
            _ => return None,
        }
    } else {
        return None;
    };
    unet_module(&out).map(|_| out)
}

/// Multi-word names of the SD1.x UNet (diffusers and LDM) and CLIP text encoder, for turning a
/// kohya key (`.` replaced by `_`) back into a dotted path. Longest first.
const COMPOUNDS: &[&str] = &[
    "time_emb_proj",
    "conv_norm_out",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "time_embedding",
    "linear_1",
    "linear_2",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "time_embed",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
];

/// `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` →
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`. Only the known multi-word
/// names keep their `_`; the caller validates the result (an unknown name fails there).
pub fn dotted(underscored: &str) -> String {
    super::dotted_with(underscored, COMPOUNDS)
}

/// The kind label a module is grouped under in summaries (`to_q`, `to_out.0`, `ff.net.0.proj`,
/// `conv1`, `downsamplers.0.conv`, `self_attn.q_proj`, …).
pub fn kind_label(path: &str) -> String {
    for tail in [
        "to_out.0",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "ff.net.0.proj",
        "ff.net.2",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "mlp.fc1",
        "mlp.fc2",
        "norm1_context.linear",
        "norm1.linear",
        "norm.linear",
        "norm_out.linear",
    ] {
        if path.ends_with(tail) {
            return tail.to_string();
        }
    }
    if path.starts_with("time_embedding.") || path.starts_with("time_text_embed.") {
        return path.to_string();
    }
    path.rsplit('.').next().unwrap_or(path).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_keeps_compound_words() {
        assert_eq!(
            dotted("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        );
        assert_eq!(dotted("time_embedding_linear_1"), "time_embedding.linear_1");
        assert_eq!(dotted("mid_block_resnets_1_time_emb_proj"), "mid_block.resnets.1.time_emb_proj");
        assert_eq!(dotted("output_blocks_5_2_conv"), "output_blocks.5.2.conv");
        assert_eq!(dotted("input_blocks_4_0_skip_connection"), "input_blocks.4.0.skip_connection");
        assert_eq!(dotted("time_embed_2"), "time_embed.2");
        assert_eq!(dotted("out_2"), "out.2");
        assert_eq!(
            dotted("text_model_encoder_layers_11_self_attn_out_proj"),
            "text_model.encoder.layers.11.self_attn.out_proj"
        );
        assert_eq!(dotted("text_model_encoder_layers_0_mlp_fc2"), "text_model.encoder.layers.0.mlp.fc2");
    }

    #[test]
    fn grammar_rejects_non_targets() {
        for bad in [
            "down_blocks.0.attentions.0.norm",
            "mid_block.attentions.1.proj_in",
            "down_blocks.0.upsamplers.0.conv",
            "down_blocks.01.resnets.0.conv1",
            "conv_norm_out",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out",
        ] {
            assert_eq!(unet_module(bad), None, "{bad}");
        }
        assert_eq!(text_encoder_module("text_model.encoder.layers.3.layer_norm1"), None);
        assert_eq!(text_encoder_module("text_model.encoder.layers.3.mlp.fc1"), Some(LayerKind::Linear));
    }

    #[test]
    fn ldm_examples_from_the_sd15_checkpoint_layout() {
        let l = Sd15Layout::sd15();
        for (d, ldm) in [
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            ),
            ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
            ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
            ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
            ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
            ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
                "output_blocks.11.1.transformer_blocks.0.ff.net.2",
            ),
            ("conv_out", "out.2"),
        ] {
            assert_eq!(unet_to_ldm(d, &l).as_deref(), Some(ldm), "{d}");
            assert_eq!(unet_from_ldm(ldm, 2).as_deref(), Some(d), "{ldm}");
        }
        assert_eq!(unet_from_ldm("input_blocks.3.0.in_layers.2", 2), None, "input_blocks.3 is a downsampler");
    }
}
