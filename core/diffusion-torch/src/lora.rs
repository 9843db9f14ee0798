//! LoRA / LoCon injection into the Linear and Conv2d layers of a built model, selected by
//! module-name patterns over diffusers module paths; peft-compatible naming and initialisation.

use crate::error::{Error, Result};
use crate::nn::{LoraWeights, Net};
use crate::store::{Store, Target};
use std::collections::HashMap;
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// peft's default: `kaiming_uniform_(A, a=√5)` (bound 1/√fan_in), B = 0.
    KaimingUniform,
    /// PairEdit's `kaiming_uniform_(down, a=1)` (bound √3/√fan_in), up = 0.
    KaimingUniformA1,
    /// peft's `init_lora_weights="gaussian"`: A ~ N(0, 1/r), B = 0.
    Gaussian,
}

#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// A plain name matches as peft's `target_modules` does (the whole path, or its last
    /// components after a `.`: `to_q`, `attn1.to_q`); a pattern with `*` is a glob over the
    /// whole path (`*` = any run of characters, including dots).
    pub target_modules: Vec<String>,
    pub init: LoraInit,
    /// Also inject into Conv2d layers that match (LoCon); Linear-only when false.
    pub conv: bool,
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

pub fn matches(pattern: &str, path: &str) -> bool {
    if pattern.contains('*') {
        glob(pattern.as_bytes(), path.as_bytes())
    } else {
        path == pattern || path.ends_with(&format!(".{pattern}"))
    }
}

fn is_conv(t: &Target) -> bool {
    t.weight_shape.len() == 4
}

/// Injects fresh LoRA pairs (fp32, on the base weights' device) into every matching layer;
/// returns the module paths injected. No match is an error (a typo would otherwise train
/// nothing).
pub fn inject(store: &Store, cfg: &LoraConfig) -> Result<Vec<String>> {
    inject_at(store, cfg, Net::Main)
}

/// [`inject`] into one of the layers' two slots (PairEdit's content network is [`Net::Content`]).
pub fn inject_at(store: &Store, cfg: &LoraConfig, net: Net) -> Result<Vec<String>> {
    if cfg.r <= 0 {
        return Err(Error::Lora(format!("rank r = {} must be positive", cfg.r)));
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        return Err(Error::Lora(format!("dropout = {} must be in [0, 1)", cfg.dropout)));
    }
    let mut done = Vec::new();
    for t in store.targets() {
        if !cfg.target_modules.iter().any(|p| matches(p, &t.path)) || (is_conv(&t) && !cfg.conv) {
            continue;
        }
        let (out, inp) = (t.weight_shape[0], t.weight_shape[1]);
        let opts = (Kind::Float, store.device);
        let (down_shape, up_shape) = if is_conv(&t) {
            (vec![cfg.r, inp, t.weight_shape[2], t.weight_shape[3]], vec![out, cfg.r, 1, 1])
        } else {
            (vec![cfg.r, inp], vec![out, cfg.r])
        };
        let fan_in: i64 = down_shape[1..].iter().product();
        let down = match cfg.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                Tensor::empty(&down_shape, opts).uniform_(-bound, bound)
            }
            LoraInit::KaimingUniformA1 => {
                let bound = (3.0 / fan_in as f64).sqrt();
                Tensor::empty(&down_shape, opts).uniform_(-bound, bound)
            }
            LoraInit::Gaussian => Tensor::randn(&down_shape, opts) / cfg.r as f64,
        };
        let up = Tensor::zeros(&up_shape, opts);
        *t.slot_of(net).lock().unwrap() = Some(LoraWeights {
            down: down.set_requires_grad(true),
            up: up.set_requires_grad(true),
            alpha_over_r: cfg.alpha / cfg.r as f64,
            adapter_scale: 1.0,
            dropout: cfg.dropout,
            training: false,
        });
        done.push(t.path.clone());
    }
    if done.is_empty() {
        return Err(Error::Lora(format!(
            "target_modules {:?} match no Linear{} layer; names look like `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`",
            cfg.target_modules,
            if cfg.conv { "/Conv2d" } else { "" }
        )));
    }
    Ok(done)
}

/// The LoRA parameters with peft's names (`<module>.lora_A.weight` = down, `lora_B` = up).
pub fn parameters(store: &Store) -> Vec<(String, Tensor)> {
    parameters_at(store, Net::Main)
}

/// [`parameters`] of one slot.
pub fn parameters_at(store: &Store, net: Net) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for t in store.targets() {
        if let Some(l) = &*t.slot_of(net).lock().unwrap() {
            out.push((format!("{}.lora_A.weight", t.path), l.down.shallow_clone()));
            out.push((format!("{}.lora_B.weight", t.path), l.up.shallow_clone()));
        }
    }
    out
}

fn for_each(store: &Store, nets: &[Net], mut f: impl FnMut(&mut LoraWeights)) {
    for t in store.targets() {
        for &net in nets {
            if let Some(l) = &mut *t.slot_of(net).lock().unwrap() {
                f(l)
            }
        }
    }
}

/// The inference-time adapter scale of the main adapter (multiplies alpha/r; 0 disables it).
pub fn set_adapter_scale(store: &Store, s: f64) {
    set_adapter_scale_at(store, s, Net::Main);
}

/// The multiplier of one slot's adapter (PairEdit's `set_lora_slider`; 0 turns it off).
pub fn set_adapter_scale_at(store: &Store, s: f64, net: Net) {
    for_each(store, &[net], |l| l.adapter_scale = s);
}

/// Training mode enables LoRA dropout (both slots).
pub fn set_training(store: &Store, training: bool) {
    for_each(store, &[Net::Main, Net::Content], |l| l.training = training);
}

/// Copies a peft state dict (`[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`) into
/// the injected adapters; every adapter must be covered and every tensor used.
pub fn load_peft(store: &Store, tensors: Vec<(String, Tensor)>, source: &str) -> Result<()> {
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    for (n, t) in tensors {
        let n = n.strip_prefix("base_model.model.").unwrap_or(&n).replace(".default.weight", ".weight");
        by_name.insert(n, t);
    }
    let mut problems = Vec::new();
    tch::no_grad(|| {
        for (n, p) in parameters(store) {
            match by_name.remove(&n) {
                None => problems.push(format!("missing: {n}")),
                Some(t) if t.size() != p.size() => {
                    problems.push(format!("wrong shape: {n}: adapter has {:?}, file has {:?}", p.size(), t.size()))
                }
                Some(t) => {
                    let mut p = p;
                    p.copy_(&t.to_kind(Kind::Float).to_device(p.device()));
                }
            }
        }
    });
    let mut rest: Vec<String> = by_name.into_keys().collect();
    rest.sort();
    problems.extend(rest.into_iter().map(|n| format!("unexpected: {n}")));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Lora(format!(
            "{source}: the LoRA tensors do not match the injected adapters (check r and target_modules):\n  {}",
            problems.join("\n  ")
        )))
    }
}

/// `W + scale · B·A` for the layer at `path` (in the base dtype): what merging writes.
pub fn merged_weight(store: &Store, path: &str) -> Result<Tensor> {
    let t =
        store.targets().into_iter().find(|t| t.path == path).ok_or_else(|| Error::Lora(format!("no layer {path}")))?;
    let w = store
        .named_parameters()
        .into_iter()
        .find(|(n, _)| *n == format!("{path}.weight"))
        .map(|(_, w)| w)
        .ok_or_else(|| Error::Lora(format!("no weight for {path}")))?;
    if store.fp8_scale(&format!("{path}.weight")).is_some() {
        return Err(Error::NotImplemented(format!(
            "merging a LoRA into the fp8-stored weight of {path}: load the base in bf16/fp32 to merge"
        )));
    }
    let guard = t.slot.lock().unwrap();
    let l = guard.as_ref().ok_or_else(|| Error::Lora(format!("{path} has no adapter")))?;
    let delta = if is_conv(&t) {
        // up [out, r, 1, 1] ∘ down [r, in, k, k] = [out, in, k, k].
        let up = l.up.flatten(1, -1);
        let down = l.down.flatten(1, -1);
        up.matmul(&down).view(t.weight_shape.as_slice())
    } else {
        l.up.matmul(&l.down)
    };
    Ok(&w + (delta * l.scale()).to_kind(w.kind()))
}

/// Merges every adapter into its base weight and removes it (inference export).
pub fn merge_all(store: &Store) -> Result<()> {
    let params: HashMap<String, Tensor> = store.named_parameters().into_iter().collect();
    for t in store.targets() {
        if t.slot.lock().unwrap().is_none() {
            continue;
        }
        let merged = merged_weight(store, &t.path)?;
        tch::no_grad(|| {
            let mut w = params[&format!("{}.weight", t.path)].shallow_clone();
            w.copy_(&merged);
        });
        *t.slot.lock().unwrap() = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mode, UNet2DConditionModel, UNetConfig};
    use tch::Device;

    fn tiny() -> (Store, UNet2DConditionModel) {
        let v = serde_json::json!({
            "block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
            "attention_head_dim": 2, "norm_num_groups": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]
        });
        let cfg = UNetConfig::from_value(std::path::Path::new("<test>"), v).unwrap();
        let store = Store::new(Mode::Alloc, Kind::Float, Device::Cpu);
        let unet = UNet2DConditionModel::new(&store, &cfg);
        (store, unet)
    }

    fn cfg(targets: &[&str], init: LoraInit, conv: bool) -> LoraConfig {
        LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            init,
            conv,
        }
    }

    #[test]
    fn patterns_follow_peft_suffix_rules_and_globs() {
        let p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert!(matches("to_q", p) && matches("attn1.to_q", p) && matches(p, p));
        assert!(!matches("o_q", p) && !matches("attn2.to_q", p));
        assert!(matches("down_blocks.*.attn1.*", p) && matches("*to_?", "x.to_?") && !matches("up_blocks.*", p));
    }

    #[test]
    fn injection_selects_layers_and_initialises_as_peft() {
        let (store, _unet) = tiny();
        let done = inject(&store, &cfg(&["to_out.0", "conv1"], LoraInit::KaimingUniform, false)).unwrap();
        // conv1 is a Conv2d and conv = false: Linear layers only. 4 transformer blocks (down 0:
        // 1, mid: 1, up 1: 2) × (attn1 + attn2).
        assert_eq!(done.len(), 8, "{done:?}");
        assert!(done.iter().all(|d| d.ends_with("to_out.0")));
        for (n, t) in parameters(&store) {
            if n.contains("lora_B") {
                assert_eq!(t.abs().max().double_value(&[]), 0.0, "{n}: B starts at zero");
            } else {
                // kaiming_uniform_(a=√5) on [r, in]: U(−1/√in, 1/√in), in = 8 here.
                let m = t.abs().max().double_value(&[]);
                assert!(m > 0.0 && m <= 1.0 / 8f64.sqrt(), "{n}: {m}");
            }
        }
        let (store, _unet) = tiny();
        let done = inject(&store, &cfg(&["conv1"], LoraInit::Gaussian, true)).unwrap();
        // One conv1 per resnet: down 1 + 1, mid 2, up 2 + 2.
        assert_eq!(done.len(), 8, "{done:?}");
        let p = parameters(&store);
        assert_eq!(p[0].1.size(), vec![2, 8, 3, 3], "LoCon down: the base kernel");
        assert_eq!(p[1].1.size()[2..], [1, 1], "LoCon up: 1×1");
    }

    #[test]
    fn a_pattern_matching_nothing_is_an_error() {
        let (store, _unet) = tiny();
        let e = inject(&store, &cfg(&["to_qq"], LoraInit::KaimingUniform, true)).unwrap_err().to_string();
        assert!(e.contains("to_qq") && e.contains("match no"), "{e}");
        let mut c = cfg(&["to_q"], LoraInit::KaimingUniform, true);
        c.r = 0;
        assert!(inject(&store, &c).is_err());
    }
}
