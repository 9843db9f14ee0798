//! Training-side tensor helpers: the forward process (`DDPMScheduler.add_noise`), the v target
//! (`get_velocity`) and x̂0 from a prediction (differentiable: the identity loss decodes it), all
//! over core/diffusion's `alphas_cumprod`; and their flow-matching counterparts (rectified flow:
//! `x_t = (1 − σ)·x0 + σ·ε`, target `v = ε − x0`, `x̂0 = x_t − σ·v̂`). The LoRA trainer
//! ([`crate::trainer`]) calls these; gradient checkpointing is
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

/// The target of a DDPM prediction type: ε for epsilon, [`v_target`] for v, x0 for sample.
pub fn ddpm_target(
    alphas_cumprod: &[f64],
    x0: &Tensor,
    noise: &Tensor,
    t: &Tensor,
    prediction: Prediction,
) -> Result<Tensor> {
    same_shape(x0, noise, "noise")?;
    Ok(match prediction {
        Prediction::Epsilon => noise.shallow_clone(),
        Prediction::VPrediction => v_target(alphas_cumprod, x0, noise, t)?,
        Prediction::Sample => x0.shallow_clone(),
    })
}

/// σ `[B]` shaped `[B, 1, …]` to broadcast over `like`, in `like`'s kind and device.
fn per_sample(sigma: &Tensor, like: &Tensor) -> Result<Tensor> {
    if sigma.dim() != 1 || sigma.size()[0] != like.size()[0] {
        return Err(Error::Config {
            path: "<training>".into(),
            field: "sigma".into(),
            msg: format!("shape {:?}: pass one noise level per sample ([{}])", sigma.size(), like.size()[0]),
        });
    }
    let mut shape = vec![like.size()[0]];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    Ok(sigma.view(shape.as_slice()).to_kind(like.kind()).to_device(like.device()))
}

/// The flow-matching forward process `x_t = (1 − σ)·x0 + σ·noise` (diffusers'
/// `FlowMatchEulerDiscreteScheduler.scale_noise`, musubi-tuner's / sd-scripts' training), σ `[B]`.
pub fn flow_add_noise(x0: &Tensor, noise: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    same_shape(x0, noise, "noise")?;
    let s = per_sample(sigma, x0)?;
    Ok(x0 * (s.neg() + 1.0) + noise * s)
}

/// The flow-matching target: the velocity `v = noise − x0` (d x_t / dσ).
pub fn flow_target(x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    same_shape(x0, noise, "noise")?;
    Ok(noise - x0)
}

/// x̂0 from a predicted velocity: `x̂0 = x_t − σ·v̂` (σ `[B]`); differentiable in `v_hat`.
pub fn flow_predict_x0(x_t: &Tensor, v_hat: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    same_shape(x_t, v_hat, "model_out")?;
    let s = per_sample(sigma, x_t)?;
    Ok(x_t - v_hat * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.flatten(0, -1)).unwrap()
    }

    /// The three flow-matching helpers against their formulas written out element by element in
    /// f64 (σ per sample, broadcast over C·h·w), and x̂0 of the exact velocity is x0. Inputs
    /// are N(0, 1), σ ∈ (0, 1): every value is a few f64 roundings of numbers ≲ 10, so 1e-13
    /// holds; a swapped σ / 1 − σ, a wrong sign or a per-element (not per-sample) σ is off by O(1).
    #[test]
    fn flow_matching_helpers_follow_the_formulas() {
        tch::manual_seed(3);
        let opts = (Kind::Double, tch::Device::Cpu);
        let (x0, eps) = (Tensor::randn([3, 2, 2, 2], opts), Tensor::randn([3, 2, 2, 2], opts));
        let sigma = [0.1, 0.5, 0.93];
        let s = Tensor::from_slice(&sigma);
        let (xs, es) = (values(&x0), values(&eps));
        let per = xs.len() / 3;
        let x_t = flow_add_noise(&x0, &eps, &s).unwrap();
        let v = flow_target(&x0, &eps).unwrap();
        let back = flow_predict_x0(&x_t, &v, &s).unwrap();
        let (xt, vs, bs) = (values(&x_t), values(&v), values(&back));
        for k in 0..xs.len() {
            let sg = sigma[k / per];
            let want_xt = (1.0 - sg) * xs[k] + sg * es[k];
            assert!((xt[k] - want_xt).abs() <= 1e-13, "x_t[{k}]: {} vs {want_xt}", xt[k]);
            assert!((vs[k] - (es[k] - xs[k])).abs() <= 1e-13, "v[{k}]");
            assert!((bs[k] - xs[k]).abs() <= 1e-13, "x̂0[{k}]: {} vs {}", bs[k], xs[k]);
            let want_x0 = xt[k] - sg * 0.25;
            let got = values(&flow_predict_x0(&x_t, &Tensor::full_like(&x_t, 0.25), &s).unwrap())[k];
            assert!((got - want_x0).abs() <= 1e-13, "x̂0 of v̂ = 0.25 at {k}");
        }
        assert!(flow_add_noise(&x0, &eps, &Tensor::from_slice(&[0.5, 0.5])).is_err(), "one σ per sample");
    }

    /// `ddpm_target` dispatches to ε, [`v_target`] and x0 (bitwise: the same tensors).
    #[test]
    fn ddpm_target_per_prediction_type() {
        let ac = likeness_diffusion::schedules::alphas_cumprod(
            &likeness_diffusion::schedules::betas(likeness_diffusion::schedules::BetaSchedule::SD15, 1000).unwrap(),
        );
        tch::manual_seed(4);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (x0, eps) = (Tensor::randn([2, 4, 2, 2], opts), Tensor::randn([2, 4, 2, 2], opts));
        let t = Tensor::from_slice(&[10i64, 900]);
        let same = |a: &Tensor, b: &Tensor| bool::try_from(a.eq_tensor(b).all()).unwrap();
        assert!(same(&ddpm_target(&ac, &x0, &eps, &t, Prediction::Epsilon).unwrap(), &eps));
        assert!(same(&ddpm_target(&ac, &x0, &eps, &t, Prediction::Sample).unwrap(), &x0));
        let v = v_target(&ac, &x0, &eps, &t).unwrap();
        assert!(same(&ddpm_target(&ac, &x0, &eps, &t, Prediction::VPrediction).unwrap(), &v));
    }
}
