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
    pub lora: LoraSlot,
}

impl Linear {
    pub fn new(p: &P, inp: i64, out: i64, bias: bool) -> Self {
        let weight = p.param("weight", &[out, inp]);
        let bias = bias.then(|| p.param("bias", &[out]));
        let lora: LoraSlot = Arc::new(Mutex::new(None));
        p.add_target(Target {
            path: p.path().to_string(),
            weight_shape: vec![out, inp],
            stride: 1,
            padding: 0,
            slot: lora.clone(),
        });
        Linear { weight, bias, lora }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &*self.lora.lock().unwrap() {
            None => y,
            Some(l) => {
                let h = lora_input(l, x).linear::<&Tensor>(&l.down, None).linear::<&Tensor>(&l.up, None);
                let k = y.kind();
                y + (h * l.scale()).to_kind(k)
            }
        }
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    pub lora: LoraSlot,
}

impl Conv2d {
    pub fn new(p: &P, inp: i64, out: i64, k: i64, stride: i64, padding: i64) -> Self {
        let weight = p.param("weight", &[out, inp, k, k]);
        let bias = Some(p.param("bias", &[out]));
        let lora: LoraSlot = Arc::new(Mutex::new(None));
        p.add_target(Target {
            path: p.path().to_string(),
            weight_shape: vec![out, inp, k, k],
            stride,
            padding,
            slot: lora.clone(),
        });
        Conv2d { weight, bias, stride, padding, lora }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(&self.weight, self.bias.as_ref(), [self.stride], [self.padding], [1], 1);
        match &*self.lora.lock().unwrap() {
            None => y,
            Some(l) => {
                // LoCon as kohya/peft: the down conv has the base kernel, stride and padding; the
                // up conv is 1×1.
                let h = lora_input(l, x)
                    .conv2d::<&Tensor>(&l.down, None, [self.stride], [self.padding], [1], 1)
                    .conv2d::<&Tensor>(&l.up, None, [1], [0], [1], 1);
                let k = y.kind();
                y + (h * l.scale()).to_kind(k)
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
