//! The original Wan-2.1 names of the Qwen-Image VAE, which ComfyUI's single file
//! `qwen_image_vae.safetensors` (Comfy-Org/Qwen-Image_ComfyUI) keeps and musubi-tuner's `--vae`
//! reads besides diffusers'. Only the names differ: every tensor has the same shape in both
//! layouts (an RMS-norm γ is `[C, 1, 1, 1]`, `[C, 1, 1]` in attention, in both; the causal convs
//! are 5-D and the resample convs 4-D in both), so a file maps tensor for tensor, unchanged.
//!
//! diffusers → Wan:
//! * `quant_conv` → `conv1`, `post_quant_conv` → `conv2`;
//! * `<coder>.conv_in` → `<coder>.conv1`, `.norm_out` → `.head.0`, `.conv_out` → `.head.2` (Wan's
//!   head is `Sequential(RMS_norm, SiLU, conv)`);
//! * `<coder>.mid_block.resnets.0` / `.attentions.0` / `.resnets.1` → `<coder>.middle.0` / `.1` / `.2`;
//! * `encoder.down_blocks.K` → `encoder.downsamples.K`: both encoders are one flat list;
//! * `decoder.up_blocks.i.resnets.j` and `.upsamplers.0` → `decoder.upsamples.N`, Wan's flat list:
//!   per stage `num_res_blocks + 1` residual blocks (each followed by an attention block where the
//!   stage's scale is in `attn_scales`, which diffusers' decoder does not have), then the stage's
//!   Resample — for Qwen-Image N = 4i + j, and 4i + 3 for the upsampler of stages 0…2;
//! * inside a residual block `norm1`, `conv1`, `norm2`, `conv2` → `residual.0`, `.2`, `.3`, `.6`
//!   (their indices in Wan's `Sequential(RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv)`) and
//!   `conv_shortcut` → `shortcut`; attention (`norm`, `to_qkv`, `proj`) and Resample
//!   (`resample.1`, `time_conv`) keep their names.

use super::QwenVaeConfig;

/// The diffusers → Wan renaming for one config (the decoder's flat indices depend on it).
pub(super) struct WanNames {
    /// `decoder.upsamples` index of `up_blocks.i.resnets.j`: `resnets[i][j]`.
    resnets: Vec<Vec<usize>>,
    /// … and of `up_blocks.i.upsamplers.0` (none after the last stage).
    upsamplers: Vec<Option<usize>>,
}

impl WanNames {
    pub(super) fn new(c: &QwenVaeConfig) -> Self {
        let n = c.dim_mult.len();
        // Wan's decoder starts at the deepest scale, 1 / 2^(stages − 2), and doubles it per stage.
        let mut scale = 1.0 / 2f64.powi(n as i32 - 2);
        let (mut k, mut resnets, mut upsamplers) = (0, Vec::new(), Vec::new());
        for i in 0..n {
            let mut stage = Vec::new();
            for _ in 0..=c.num_res_blocks {
                stage.push(k);
                k += if c.attn_scales.contains(&scale) { 2 } else { 1 };
            }
            resnets.push(stage);
            if i + 1 < n {
                upsamplers.push(Some(k));
                k += 1;
                scale *= 2.0;
            } else {
                upsamplers.push(None);
            }
        }
        WanNames { resnets, upsamplers }
    }

    /// The Wan name of one of this crate's (diffusers') parameter names.
    pub(super) fn name(&self, ours: &str) -> Option<String> {
        let p: Vec<&str> = ours.split('.').collect();
        let (module, tail): (String, &[&str]) = match p.as_slice() {
            ["quant_conv", t @ ..] => ("conv1".into(), t),
            ["post_quant_conv", t @ ..] => ("conv2".into(), t),
            [coder @ ("encoder" | "decoder"), rest @ ..] => {
                let (m, t): (String, &[&str]) = match rest {
                    ["conv_in", t @ ..] => ("conv1".into(), t),
                    ["norm_out", t @ ..] => ("head.0".into(), t),
                    ["conv_out", t @ ..] => ("head.2".into(), t),
                    ["mid_block", "resnets", j, t @ ..] => (format!("middle.{}", 2 * j.parse::<usize>().ok()?), t),
                    ["mid_block", "attentions", "0", t @ ..] => ("middle.1".into(), t),
                    ["down_blocks", k, t @ ..] if *coder == "encoder" => (format!("downsamples.{k}"), t),
                    ["up_blocks", i, "resnets", j, t @ ..] if *coder == "decoder" => {
                        let (i, j) = (i.parse::<usize>().ok()?, j.parse::<usize>().ok()?);
                        (format!("upsamples.{}", self.resnets.get(i)?.get(j)?), t)
                    }
                    ["up_blocks", i, "upsamplers", "0", t @ ..] if *coder == "decoder" => {
                        (format!("upsamples.{}", (*self.upsamplers.get(i.parse::<usize>().ok()?)?)?), t)
                    }
                    _ => return None,
                };
                (format!("{coder}.{m}"), t)
            }
            _ => return None,
        };
        let (first, rest) = tail.split_first()?;
        let first = match *first {
            "norm1" => "residual.0",
            "conv1" => "residual.2",
            "norm2" => "residual.3",
            "conv2" => "residual.6",
            "conv_shortcut" => "shortcut",
            other => other,
        };
        Some([module.as_str(), first].into_iter().chain(rest.iter().copied()).collect::<Vec<_>>().join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spot checks against names of ComfyUI's real file (its full map is checked through
    /// diffusers' converter in tests/qwen_vae_layouts.rs).
    #[test]
    fn qwen_image_names() {
        let c: QwenVaeConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        let w = WanNames::new(&c);
        for (ours, wan) in [
            ("quant_conv.weight", "conv1.weight"),
            ("post_quant_conv.bias", "conv2.bias"),
            ("encoder.conv_in.weight", "encoder.conv1.weight"),
            ("encoder.down_blocks.0.norm1.gamma", "encoder.downsamples.0.residual.0.gamma"),
            ("encoder.down_blocks.3.conv_shortcut.weight", "encoder.downsamples.3.shortcut.weight"),
            ("encoder.down_blocks.5.time_conv.weight", "encoder.downsamples.5.time_conv.weight"),
            ("encoder.down_blocks.8.resample.1.bias", "encoder.downsamples.8.resample.1.bias"),
            ("encoder.mid_block.attentions.0.to_qkv.weight", "encoder.middle.1.to_qkv.weight"),
            ("encoder.mid_block.resnets.1.conv2.weight", "encoder.middle.2.residual.6.weight"),
            ("encoder.norm_out.gamma", "encoder.head.0.gamma"),
            ("decoder.conv_out.bias", "decoder.head.2.bias"),
            ("decoder.up_blocks.0.upsamplers.0.time_conv.weight", "decoder.upsamples.3.time_conv.weight"),
            ("decoder.up_blocks.1.resnets.0.conv_shortcut.bias", "decoder.upsamples.4.shortcut.bias"),
            ("decoder.up_blocks.2.upsamplers.0.resample.1.weight", "decoder.upsamples.11.resample.1.weight"),
            ("decoder.up_blocks.3.resnets.2.norm2.gamma", "decoder.upsamples.14.residual.3.gamma"),
        ] {
            assert_eq!(w.name(ours).as_deref(), Some(wan), "{ours}");
        }
        // No down blocks in the decoder, no upsampler after its last stage.
        let not_ours = ["decoder.down_blocks.0.norm1.gamma", "decoder.up_blocks.3.upsamplers.0.resample.1.bias", "x"];
        for not_ours in not_ours {
            assert_eq!(w.name(not_ours), None, "{not_ours}");
        }
    }
}
