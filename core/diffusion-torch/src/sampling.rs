//! A generic denoising loop: DDIM (eta = 0) with classifier-free guidance on the UNet.
//!
//! LOCAL SCHEDULER MATHS — to be unified with core/diffusion: the schedule and the DDIM step
//! below belong to core/diffusion (the pure-Rust schedules crate, another engineer's), which
//! did not exist yet when this was written. They reproduce diffusers 0.42.1's `DDIMScheduler`
//! (`scaled_linear` betas, `leading` spacing, `steps_offset`, `set_alpha_to_one`, epsilon
//! prediction, no clipping) and are kept small so that the swap is a one-function change.

use crate::error::{Error, Result};
use crate::unet::UNet2DConditionModel;
use tch::{Kind, Tensor};

/// diffusers `DDIMScheduler` settings (SD1.5's scheduler_config.json values by default).
#[derive(Clone, Debug)]
pub struct DdimConfig {
    pub num_train_timesteps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
    pub steps_offset: i64,
    pub set_alpha_to_one: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            steps_offset: 1,
            set_alpha_to_one: false,
        }
    }
}

pub struct Ddim {
    alphas_cumprod: Tensor,
    final_alpha_cumprod: f64,
    pub timesteps: Vec<i64>,
    step_ratio: i64,
}

impl Ddim {
    /// `scaled_linear` betas in f32 as diffusers computes them, and `leading` timesteps.
    pub fn new(cfg: &DdimConfig, steps: i64) -> Result<Self> {
        if steps <= 0 || steps > cfg.num_train_timesteps {
            return Err(Error::Config {
                path: "<sampler>".into(),
                field: "steps".into(),
                msg: format!("{steps} must be in 1..={}", cfg.num_train_timesteps),
            });
        }
        let n = cfg.num_train_timesteps;
        let opts = (Kind::Float, tch::Device::Cpu);
        let betas = Tensor::linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n, opts).pow_tensor_scalar(2);
        let alphas_cumprod = (betas.neg() + 1.0).cumprod(0, Kind::Float);
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod.double_value(&[0]) };
        let step_ratio = n / steps;
        let timesteps = (0..steps).rev().map(|i| i * step_ratio + cfg.steps_offset).collect();
        Ok(Ddim { alphas_cumprod, final_alpha_cumprod, timesteps, step_ratio })
    }

    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod.double_value(&[t])
        } else {
            self.final_alpha_cumprod
        }
    }

    /// One DDIM step (eta = 0) from `x` at `t` given the predicted noise.
    pub fn step(&self, eps: &Tensor, t: i64, x: &Tensor) -> Tensor {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(t - self.step_ratio);
        // f32 scalars, as diffusers' tensors hold them.
        let (sa, sb) = ((a_t as f32).sqrt() as f64, ((1.0 - a_t) as f32).sqrt() as f64);
        let x0 = (x - eps * sb) / sa;
        let (pa, pb) = ((a_prev as f32).sqrt() as f64, ((1.0 - a_prev) as f32).sqrt() as f64);
        x0 * pa + eps * pb
    }
}

/// DDIM with classifier-free guidance: each step runs the UNet on `[uncond; cond]` (as diffusers'
/// pipeline) and mixes `uncond + g·(cond − uncond)`. `latents` are the initial noise (already
/// multiplied by `init_noise_sigma` = 1 for DDIM).
pub fn ddim_cfg(
    unet: &UNet2DConditionModel,
    sched: &Ddim,
    latents: &Tensor,
    cond: &Tensor,
    uncond: &Tensor,
    guidance: f64,
) -> Tensor {
    let ctx = Tensor::cat(&[uncond, cond], 0);
    let b = latents.size()[0];
    let mut x = latents.shallow_clone();
    for &t in &sched.timesteps {
        let inp = Tensor::cat(&[&x, &x], 0);
        let ts = Tensor::full([2 * b], t, (Kind::Int64, latents.device()));
        let eps = unet.forward(&inp, &ts, &ctx).to_kind(x.kind());
        let parts = eps.chunk(2, 0);
        let e = &parts[0] + (&parts[1] - &parts[0]) * guidance;
        x = sched.step(&e, t, &x);
    }
    x
}
