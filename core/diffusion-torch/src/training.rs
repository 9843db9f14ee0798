//! Training-side tensor helpers: the forward process (`DDPMScheduler.add_noise`), the v target
//! (`get_velocity`) and x̂0 from a prediction (differentiable: the identity loss decodes it), all
//! over core/diffusion's `alphas_cumprod`. Gradient checkpointing is
//! [`crate::unet::UNet2DConditionModel::forward_checkpointed`].

use crate::error::{Error, Result};
use likeness_diffusion::schedules::Prediction;
use tch::{Kind, Tensor};

/// `alphas_cumprod[t]` for integer timesteps `t` `[B]`, shaped `[B, 1, …]` to broadcast over
/// `like` and in `like`'s kind and device.
pub fn alpha_bar(alphas_cumprod: &[f64], t: &Tensor, like: &Tensor) -> Result<Tensor> {
    if t.dim() != 1 || t.size()[0] != like.size()[0] {
        return Err(Error::Config {
            path: "<timesteps>".into(),
            field: "t".into(),
            msg: format!("shape {:?}: pass one timestep per sample ([{}])", t.size(), like.size()[0]),
        });
    }
    let t = t.to_kind(Kind::Int64).to_device(tch::Device::Cpu);
    let (lo, hi) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
    if lo < 0 || hi as usize >= alphas_cumprod.len() {
        return Err(Error::Config {
            path: "<timesteps>".into(),
            field: "t".into(),
            msg: format!("timesteps span {lo}..={hi}; they must be in 0..{}", alphas_cumprod.len()),
        });
    }
    let table = Tensor::from_slice(alphas_cumprod);
    let mut shape = vec![like.size()[0]];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    Ok(table.index_select(0, &t).view(shape.as_slice()).to_kind(like.kind()).to_device(like.device()))
}

fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.size() != b.size() {
        return Err(Error::Config {
            path: "<training>".into(),
            field: what.into(),
            msg: format!("shape {:?} differs from {:?}; pass tensors of one shape", b.size(), a.size()),
        });
    }
    Ok(())
}

/// `x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·noise` (`DDPMScheduler.add_noise`).
pub fn add_noise(alphas_cumprod: &[f64], x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
    same_shape(x0, noise, "noise")?;
    let a = alpha_bar(alphas_cumprod, t, x0)?;
    Ok(x0 * a.sqrt() + noise * (a.neg() + 1.0).sqrt())
}

/// The v-prediction target `v = √ᾱ_t·noise − √(1 − ᾱ_t)·x0` (`DDPMScheduler.get_velocity`).
pub fn v_target(alphas_cumprod: &[f64], x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
    same_shape(x0, noise, "noise")?;
    let a = alpha_bar(alphas_cumprod, t, x0)?;
    Ok(noise * a.sqrt() - x0 * (a.neg() + 1.0).sqrt())
}

/// x̂0 from the model output at `x_t` with `alpha_bar_t` = ᾱ_t (`[B, 1, …]`, from [`alpha_bar`]):
/// ε: `(x_t − √(1−ᾱ)·ε̂)/√ᾱ`; v: `√ᾱ·x_t − √(1−ᾱ)·v̂`; sample: the output itself. Differentiable
/// in `model_out` (and `x_t`).
pub fn predict_x0(x_t: &Tensor, model_out: &Tensor, alpha_bar_t: &Tensor, prediction: Prediction) -> Result<Tensor> {
    same_shape(x_t, model_out, "model_out")?;
    let sa = alpha_bar_t.sqrt();
    let sb = (alpha_bar_t.neg() + 1.0).sqrt();
    Ok(match prediction {
        Prediction::Epsilon => (x_t - model_out * sb) / sa,
        Prediction::VPrediction => x_t * sa - model_out * sb,
        Prediction::Sample => model_out.shallow_clone(),
    })
}
