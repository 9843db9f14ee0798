//! The leaf layers, with diffusers' parameter names (`weight`, `bias`), and the LoRA slot each
//! Linear/Conv2d carries.

use crate::store::{Target, P};
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

/// An injected low-rank pair on one layer (peft's `lora_A` = `down`, `lora_B` = `up`).
pub struct LoraWeights {
    /// `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d, same kernel/stride/padding as the base).
    pub down: Tensor,
    /// `[out, r]` (Linear) or `[out, r, 1, 1]` (Conv2d).
    pub up: Tensor,
    /// `alpha / r`, peft's `scaling`.
    pub alpha_over_r: f64,
    /// The inference-time adapter scale (1 while training).
    pub adapter_scale: f64,
    pub dropout: f64,
    pub training: bool,
}

impl LoraWeights {
    pub fn scale(&self) -> f64 {
        self.alpha_over_r * self.adapter_scale
    }
}

pub type LoraSlot = Arc<Mutex<Option<LoraWeights>>>;

/// Which of a layer's two adapter slots: `Main` is the trained LoRA every format exports;
/// `Content` is a second network on the same layers (PairEdit's content LoRA), whose delta adds
/// to the main one's (as two kohya/sliders networks wrapping the same `Linear` do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Main,
    Content,
}

/// A layer's two adapter slots (see [`Net`]).
#[derive(Clone, Default)]
pub struct LoraSlots {
    pub main: LoraSlot,
    pub content: LoraSlot,
}

impl LoraSlots {
    /// The sum of both adapters' deltas for input `x` (`None` when neither is injected);
    /// `apply(l, x)` is one adapter's low-rank product before its scale.
    fn delta(&self, x: &Tensor, apply: impl Fn(&LoraWeights, &Tensor) -> Tensor) -> Option<Tensor> {
        let mut acc: Option<Tensor> = None;
        for slot in [&self.main, &self.content] {
            if let Some(l) = &*slot.lock().unwrap() {
                let h = apply(l, &lora_input(l, x)) * l.scale();
                acc = Some(match acc {
                    Some(a) => a + h,
                    None => h,
                });
            }
        }
        acc
    }
}

fn lora_input(l: &LoraWeights, x: &Tensor) -> Tensor {
    // LoRA weights stay fp32 whatever the base dtype: the low-rank path runs in fp32 and is cast
    // back to the base activation dtype when added.
    let x = x.to_kind(l.down.kind());
    if l.training && l.dropout > 0.0 {
        x.dropout(l.dropout, true)
    } else {
        x
    }
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: LoraSlots,
    /// For an fp8-stored weight: its per-tensor scale (`w = fp8 · scale`, dequantised to the
    /// input's kind in each forward).
    pub fp8_scale: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &P, inp: i64, out: i64, bias: bool) -> Self {
        let (weight, fp8_scale) = p.linear_weight(&[out, inp]);
        let bias = bias.then(|| p.param("bias", &[out]));
        let lora = LoraSlots::default();
        p.add_target(Target {
            path: p.path().to_string(),
            weight_shape: vec![out, inp],
            stride: 1,
            padding: 0,
            slot: lora.main.clone(),
            content: lora.content.clone(),
        });
        Linear { weight, bias, lora, fp8_scale }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = match &self.fp8_scale {
            // Dequantised for this call only (a transient copy of one layer), in f32 then the
            // input's kind, as ComfyUI's and musubi-tuner's fp8 layers compute.
            Some(s) => x.linear(&(self.weight.to_kind(Kind::Float) * s).to_kind(x.kind()), self.bias.as_ref()),
            None => x.linear(&self.weight, self.bias.as_ref()),
        };
        match self.lora.delta(x, |l, x| x.linear::<&Tensor>(&l.down, None).linear::<&Tensor>(&l.up, None)) {
            None => y,
            Some(h) => {
                let k = y.kind();
                y + h.to_kind(k)
            }
        }
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    pub lora: LoraSlots,
}

impl Conv2d {
    pub fn new(p: &P, inp: i64, out: i64, k: i64, stride: i64, padding: i64) -> Self {
        let weight = p.param("weight", &[out, inp, k, k]);
        let bias = Some(p.param("bias", &[out]));
        let lora = LoraSlots::default();
        p.add_target(Target {
            path: p.path().to_string(),
            weight_shape: vec![out, inp, k, k],
            stride,
            padding,
            slot: lora.main.clone(),
            content: lora.content.clone(),
        });
        Conv2d { weight, bias, stride, padding, lora }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(&self.weight, self.bias.as_ref(), [self.stride], [self.padding], [1], 1);
        // LoCon as kohya/peft: the down conv has the base kernel, stride and padding; the up
        // conv is 1×1.
        let (stride, padding) = (self.stride, self.padding);
        match self.lora.delta(x, |l, x| {
            x.conv2d::<&Tensor>(&l.down, None, [stride], [padding], [1], 1).conv2d::<&Tensor>(
                &l.up,
                None,
                [1],
                [0],
                [1],
                1,
            )
        }) {
            None => y,
            Some(h) => {
                let k = y.kind();
                y + h.to_kind(k)
            }
        }
    }
}

pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(p: &P, groups: i64, c: i64, eps: f64) -> Self {
        GroupNorm { weight: p.param("weight", &[c]), bias: p.param("bias", &[c]), groups, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &P, c: i64, eps: f64) -> Self {
        LayerNorm { weight: p.param("weight", &[c]), bias: p.param("bias", &[c]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c = *x.size().last().unwrap();
        x.layer_norm([c], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// torch's `RMSNorm` over the last dimension (`x / sqrt(mean(x²) + eps) · weight`), through
/// libtorch's own `rms_norm` so the rounding is torch's.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: &P, c: i64, eps: f64) -> Self {
        RmsNorm { weight: p.param("weight", &[c]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c = *x.size().last().unwrap();
        x.rms_norm([c], Some(&self.weight), self.eps)
    }
}

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift)` in fp32
/// (as diffusers computes it before casting): `[B]` → `[B, dim]`.
pub fn sinusoidal_embedding(t: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln())) / (half as f64 - freq_shift);
    let emb = t.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (s, c) = (emb.sin(), emb.cos());
    if flip_sin_to_cos {
        Tensor::cat(&[c, s], -1)
    } else {
        Tensor::cat(&[s, c], -1)
    }
}

/// Kind check for fp32 activations through a reduced-precision base: inputs follow the weights.
pub fn to_weight_kind(x: &Tensor, w: &Tensor) -> Tensor {
    if x.kind() == w.kind() {
        x.shallow_clone()
    } else {
        x.to_kind(w.kind())
    }
}

pub fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}
