//! diffusers' `config.json` for `UNet2DConditionModel` and `AutoencoderKL` (the fields SD1.5/SD2
//! use; any other non-default feature is refused by name rather than silently ignored).

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(i64),
    Each(Vec<i64>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> i64 {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }
}

fn d_in() -> i64 {
    4
}
fn d_groups() -> i64 {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_layers() -> i64 {
    2
}
fn d_cross() -> i64 {
    1280
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_one() -> i64 {
    1
}
fn d_sample() -> i64 {
    64
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_in")]
    pub in_channels: i64,
    #[serde(default = "d_in")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers")]
    pub layers_per_block: i64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: i64,
    /// In `UNet2DConditionModel` this is the number of heads when `num_attention_heads` is unset
    /// (a diffusers naming quirk kept for compatibility: SD1.5 says 8).
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_sample")]
    pub sample_size: i64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: i64,
    #[serde(default = "d_one")]
    pub downsample_padding: i64,
    #[serde(default)]
    pub upcast_attention: bool,
}

fn d_vae_blocks() -> Vec<i64> {
    vec![64]
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_latent() -> i64 {
    4
}
fn d_three() -> i64 {
    3
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    #[serde(default = "d_vae_blocks")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_one")]
    pub layers_per_block: i64,
    #[serde(default = "d_latent")]
    pub latent_channels: i64,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// Flux's VAE centres its latents: the denoiser sees `(z − shift_factor) · scaling_factor`.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// false in the Flux VAE (no 1×1 convs around the latent).
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })
}

pub(crate) fn cfg_err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config { path: path.into(), field: field.into(), msg: msg.into() }
}

/// A `config.json` object read field by field with the reference library's defaults for absent
/// (or null) fields; every error names the file and the field. One reader for the scheduler,
/// CLIP text and T5 configs.
pub(crate) struct Fields<'a> {
    pub path: &'a Path,
    pub v: &'a Value,
}

impl Fields<'_> {
    pub fn err(&self, field: &str, msg: String) -> Error {
        cfg_err(self.path, field, msg)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|x| !x.is_null())
    }

    pub fn number(&self, field: &str, default: f64) -> Result<f64> {
        self.get(field)
            .map_or(Ok(default), |x| x.as_f64().ok_or_else(|| self.err(field, format!("{x} is not a number"))))
    }

    /// A number > 0 (norm epsilons).
    pub fn positive(&self, field: &str, default: f64) -> Result<f64> {
        self.get(field).map_or(Ok(default), |x| {
            x.as_f64().filter(|e| *e > 0.0).ok_or_else(|| self.err(field, format!("{x} is not > 0")))
        })
    }

    /// An integer > 0 (widths, counts).
    pub fn positive_int(&self, field: &str, default: i64) -> Result<i64> {
        self.integer(field, default, |n| n > 0)
    }

    /// An integer that `ok` accepts (token ids may be any integer).
    pub fn integer(&self, field: &str, default: i64, ok: impl Fn(i64) -> bool) -> Result<i64> {
        self.get(field).map_or(Ok(default), |x| {
            x.as_i64().filter(|&n| ok(n)).ok_or_else(|| self.err(field, format!("{x} is not a positive integer")))
        })
    }

    /// A boolean, false when absent.
    pub fn flag(&self, field: &str) -> Result<bool> {
        self.get(field)
            .map_or(Ok(false), |x| x.as_bool().ok_or_else(|| self.err(field, format!("{x} is not a boolean"))))
    }
}

/// Fields whose non-default values change the network in ways this crate does not build.
fn refuse(path: &Path, v: &Value, fields: &[(&str, Value)]) -> Result<()> {
    for (f, default) in fields {
        if let Some(x) = v.get(*f) {
            if !x.is_null() && x != default {
                return Err(cfg_err(
                    path,
                    f,
                    format!("{x} is not supported (only {default}); this crate builds SD1.5/SD2-style models"),
                ));
            }
        }
    }
    Ok(())
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_value(path, v)
    }

    pub fn from_value(path: &Path, v: Value) -> Result<Self> {
        use serde_json::json;
        refuse(
            path,
            &v,
            &[
                ("class_embed_type", Value::Null),
                ("addition_embed_type", Value::Null),
                ("encoder_hid_dim", Value::Null),
                ("time_embedding_type", json!("positional")),
                ("act_fn", json!("silu")),
                ("only_cross_attention", json!(false)),
                ("dual_cross_attention", json!(false)),
                ("resnet_time_scale_shift", json!("default")),
                ("center_input_sample", json!(false)),
                ("transformer_layers_per_block", json!(1)),
                ("mid_block_only_cross_attention", Value::Null),
                ("conv_in_kernel", json!(3)),
                ("conv_out_kernel", json!(3)),
            ],
        )?;
        let c: UNetConfig = serde_json::from_value(v).map_err(|e| cfg_err(path, "(schema)", e.to_string()))?;
        let n = c.block_out_channels.len();
        if c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(cfg_err(path, "down_block_types", format!("needs one entry per block_out_channels ({n})")));
        }
        for t in &c.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(cfg_err(
                    path,
                    "down_block_types",
                    format!("{t} is not supported (CrossAttnDownBlock2D, DownBlock2D)"),
                ));
            }
        }
        for t in &c.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(cfg_err(
                    path,
                    "up_block_types",
                    format!("{t} is not supported (CrossAttnUpBlock2D, UpBlock2D)"),
                ));
            }
        }
        if c.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(cfg_err(
                path,
                "mid_block_type",
                format!("{:?} is not supported (UNetMidBlock2DCrossAttn)", c.mid_block_type),
            ));
        }
        for (i, b) in c.block_out_channels.iter().enumerate() {
            if b % c.norm_num_groups != 0 || b % c.heads(i) != 0 {
                return Err(cfg_err(
                    path,
                    "block_out_channels",
                    format!("{b} must divide by norm_num_groups and the heads"),
                ));
            }
        }
        Ok(c)
    }

    /// Heads of down block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> i64 {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }
}

impl VaeConfig {
    /// The spatial downscale factor, 2^(blocks − 1): 8 for SD1.5's and Flux's VAEs.
    pub fn downscale_factor(&self) -> i64 {
        1i64 << self.block_out_channels.len().saturating_sub(1)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_value(path, v)
    }

    pub fn from_value(path: &Path, v: Value) -> Result<Self> {
        use serde_json::json;
        refuse(path, &v, &[("act_fn", json!("silu")), ("force_upcast", json!(true))]).or_else(|e| match &e {
            // force_upcast only matters in fp16 pipelines; accepting false is harmless.
            Error::Config { field, .. } if field == "force_upcast" => Ok(()),
            _ => Err(e),
        })?;
        let c: VaeConfig = serde_json::from_value(v).map_err(|e| cfg_err(path, "(schema)", e.to_string()))?;
        for t in &c.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(cfg_err(path, "down_block_types", format!("{t} is not supported (DownEncoderBlock2D)")));
            }
        }
        for t in &c.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(cfg_err(path, "up_block_types", format!("{t} is not supported (UpDecoderBlock2D)")));
            }
        }
        if !c.mid_block_add_attention {
            return Err(cfg_err(path, "mid_block_add_attention", "false is not supported"));
        }
        Ok(c)
    }
}
