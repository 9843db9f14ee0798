//! The generic denoising loop (DDIM η = 0 and Euler) with classifier-free guidance, as diffusers
//! 0.42.1's `StableDiffusionPipeline` runs it with `DDIMScheduler` / `EulerDiscreteScheduler`.
//!
//! The scheduler maths is core/diffusion's (`likeness_diffusion::schedules`: betas,
//! `alphas_cumprod`, `ddim_timesteps`, `ddim_step`, `euler_schedule`, `euler_input_std`,
//! `euler_step`), not a second copy. Its steps work on slices; every DDIM and Euler update is
//! linear and homogeneous in (model output, sample) per element, so one call on the unit pair
//! `(m, x) = (1, 0), (0, 1)` yields the two coefficients of `x_next = c_m·m + c_x·x` (computed
//! in f64), which are then applied to whole tensors on their device.

use crate::error::{Error, Result};
use crate::unet::UNet2DConditionModel;
use likeness_diffusion::schedules::{self, BetaSchedule};
pub use likeness_diffusion::schedules::{Prediction, Spacing};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// `DDIMScheduler`, η = 0.
    Ddim,
    /// `EulerDiscreteScheduler` (no churn, linear sigma interpolation, final σ = 0).
    Euler,
}

/// `scheduler/scheduler_config.json`: the fields both samplers use. `timestep_spacing` and
/// `set_alpha_to_one` default per class as diffusers does when the file lacks them (SD1.5's
/// original file, written by diffusers 0.6, has no `timestep_spacing`: DDIM then uses `leading`,
/// Euler `linspace`).
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub steps_offset: i64,
    pub timestep_spacing: Option<Spacing>,
    pub prediction: Prediction,
    pub set_alpha_to_one: Option<bool>,
}

impl SchedulerConfig {
    /// SD1.5's scheduler_config.json.
    pub fn sd15() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::SD15,
            steps_offset: 1,
            timestep_spacing: None,
            prediction: Prediction::Epsilon,
            set_alpha_to_one: Some(false),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })?;
        Self::from_value(path, &v)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let err = |field: &str, msg: String| Error::Config { path: path.into(), field: field.into(), msg };
        let num = |field: &str, default: f64| -> Result<f64> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| err(field, format!("{x} is not a number"))),
            }
        };
        let string = |field: &str, default: &str| -> Result<String> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(x) => x.as_str().map(String::from).ok_or_else(|| err(field, format!("{x} is not a string"))),
            }
        };
        // Features that change the update and are not built: refused by name, never ignored.
        for (field, off) in [("clip_sample", false), ("thresholding", false), ("rescale_betas_zero_snr", false)] {
            if v.get(field).and_then(Value::as_bool).unwrap_or(off) != off {
                return Err(err(field, format!("true is not supported; set it to {off} (SD1.5 ships {off})")));
            }
        }
        if v.get("trained_betas").is_some_and(|x| !x.is_null()) {
            return Err(err("trained_betas", "explicit betas are not supported; use beta_schedule".into()));
        }
        for field in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"] {
            if v.get(field).and_then(Value::as_bool).unwrap_or(false) {
                return Err(err(field, "true is not supported (Euler with linearly interpolated sigmas only)".into()));
            }
        }
        for (field, want) in
            [("interpolation_type", "linear"), ("final_sigmas_type", "zero"), ("timestep_type", "discrete")]
        {
            if let Some(x) = v.get(field).filter(|x| !x.is_null()) {
                if x.as_str() != Some(want) {
                    return Err(err(field, format!("{x} is not supported; use {want:?}")));
                }
            }
        }
        for field in ["sigma_min", "sigma_max"] {
            if v.get(field).is_some_and(|x| !x.is_null()) {
                return Err(err(field, "explicit sigma bounds are not supported; set it to null".into()));
            }
        }
        let train = num("num_train_timesteps", 1000.0)?;
        if train < 2.0 || train.fract() != 0.0 {
            return Err(err("num_train_timesteps", format!("{train} must be an integer ≥ 2")));
        }
        let (beta_start, beta_end) = (num("beta_start", 0.0001)?, num("beta_end", 0.02)?);
        let beta_schedule = match string("beta_schedule", "linear")?.as_str() {
            "linear" => BetaSchedule::Linear { beta_start, beta_end },
            "scaled_linear" => BetaSchedule::ScaledLinear { beta_start, beta_end },
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err(err(
                    "beta_schedule",
                    format!("{other:?} is not supported; use linear, scaled_linear or squaredcos_cap_v2"),
                ))
            }
        };
        let prediction = match string("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => return Err(err("prediction_type", format!("{other:?}; use epsilon, v_prediction or sample"))),
        };
        let timestep_spacing = match v.get("timestep_spacing") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                x.as_str()
                    .ok_or_else(|| err("timestep_spacing", format!("{x} is not a string")))?
                    .parse::<Spacing>()
                    .map_err(|e| err("timestep_spacing", e.to_string()))?,
            ),
        };
        let steps_offset = num("steps_offset", 0.0)?;
        if steps_offset.fract() != 0.0 {
            return Err(err("steps_offset", format!("{steps_offset} must be an integer")));
        }
        Ok(SchedulerConfig {
            num_train_timesteps: train as usize,
            beta_schedule,
            steps_offset: steps_offset as i64,
            timestep_spacing,
            prediction,
            set_alpha_to_one: v.get("set_alpha_to_one").and_then(Value::as_bool),
        })
    }

    /// `alphas_cumprod` of the training schedule (core/diffusion, f64).
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>> {
        Ok(schedules::alphas_cumprod(&schedules::betas(self.beta_schedule, self.num_train_timesteps).map_err(lib)?))
    }

    pub fn spacing(&self, sampler: Sampler) -> Spacing {
        self.timestep_spacing.unwrap_or(match sampler {
            Sampler::Ddim => Spacing::Leading,
            Sampler::Euler => Spacing::Linspace,
        })
    }
}

fn lib(e: likeness_diffusion::DiffusionError) -> Error {
    Error::Config { path: PathBuf::from("<scheduler>"), field: "(schedule)".into(), msg: e.to_string() }
}

/// One inference schedule: the timesteps the model sees and the per-step update.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub sampler: Sampler,
    /// The model's timesteps, descending (integers for DDIM; Euler's are integer-valued floats).
    pub timesteps: Vec<f64>,
    /// Euler: σ per step plus the trailing 0; empty for DDIM.
    pub sigmas: Vec<f64>,
    /// What the initial N(0, 1) noise is multiplied by (1 for DDIM).
    pub init_noise_sigma: f64,
    alphas_cumprod: Vec<f64>,
    steps: usize,
    prediction: Prediction,
    set_alpha_to_one: bool,
}

impl Schedule {
    pub fn new(sampler: Sampler, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let ac = cfg.alphas_cumprod()?;
        let spacing = cfg.spacing(sampler);
        let (timesteps, sigmas, init_noise_sigma) = match sampler {
            Sampler::Ddim => {
                let ts = schedules::ddim_timesteps(ac.len(), steps, spacing, cfg.steps_offset).map_err(lib)?;
                if let Some(&t) = ts.iter().find(|&&t| t < 0 || t as usize >= ac.len()) {
                    return Err(Error::Config {
                        path: "<scheduler>".into(),
                        field: "steps_offset".into(),
                        msg: format!("timestep {t} falls outside 0..{}; lower steps_offset", ac.len()),
                    });
                }
                (ts.into_iter().map(|t| t as f64).collect(), Vec::new(), 1.0)
            }
            Sampler::Euler => {
                let (ts, sig) = schedules::euler_schedule(&ac, steps, spacing, cfg.steps_offset).map_err(lib)?;
                let max = sig.iter().cloned().fold(0.0, f64::max);
                // diffusers' `init_noise_sigma`: σ_max for linspace/trailing, √(σ_max² + 1) otherwise.
                let init = match spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
                (ts, sig, init)
            }
        };
        Ok(Schedule {
            sampler,
            timesteps,
            sigmas,
            init_noise_sigma,
            alphas_cumprod: ac,
            steps,
            prediction: cfg.prediction,
            set_alpha_to_one: cfg.set_alpha_to_one.unwrap_or(true),
        })
    }

    /// Euler divides the model input by √(σ² + 1) (core/diffusion's `euler_input_std`); DDIM leaves it.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Tensor {
        match self.sampler {
            Sampler::Ddim => x.shallow_clone(),
            Sampler::Euler => x / schedules::euler_input_std(self.sigmas[i]),
        }
    }

    /// The update of step `i` from `x` given the (guided) model output.
    pub fn step(&self, i: usize, model_output: &Tensor, x: &Tensor) -> Result<Tensor> {
        let mut c = [0.0f64; 2];
        match self.sampler {
            Sampler::Ddim => {
                let t = self.timesteps[i] as usize;
                schedules::ddim_step(
                    &self.alphas_cumprod,
                    self.steps,
                    t,
                    &[1.0, 0.0],
                    &[0.0, 1.0],
                    self.prediction,
                    self.set_alpha_to_one,
                    &mut c,
                )
                .map_err(lib)?;
            }
            Sampler::Euler => {
                schedules::euler_step(&self.sigmas, i, &[1.0, 0.0], &[0.0, 1.0], self.prediction, &mut c)
                    .map_err(lib)?;
            }
        }
        Ok(model_output * c[0] + x * c[1])
    }
}

/// The whole loop. `x_t`: the initial N(0, 1) latents (multiplied by `init_noise_sigma` here, as
/// the pipeline's `prepare_latents` does with given latents). `model(x_in, t)` returns the
/// network's prediction for `x_in` at timestep `t`. With `guidance > 1` (diffusers' condition for
/// classifier-free guidance) `x_in` is `[x; x]` (2B rows) and the model must condition the first
/// half on the unconditional and the second on the prompt embeddings (diffusers' order:
/// `cat([negative, positive])`); the output mixes `uncond + g·(cond − uncond)`.
pub fn denoise(
    sampler: Sampler,
    cfg: &SchedulerConfig,
    steps: usize,
    x_t: &Tensor,
    guidance: f64,
    mut model: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    let sched = Schedule::new(sampler, cfg, steps)?;
    let cfg_on = guidance > 1.0;
    let mut x = x_t * sched.init_noise_sigma;
    for (i, &t) in sched.timesteps.iter().enumerate() {
        let inp = if cfg_on { Tensor::cat(&[&x, &x], 0) } else { x.shallow_clone() };
        let inp = sched.scale_model_input(&inp, i);
        let out = model(&inp, t)?;
        if out.size() != inp.size() {
            return Err(Error::Config {
                path: "<denoise>".into(),
                field: "model output".into(),
                msg: format!(
                    "shape {:?} for input {:?}; the model must return one prediction per row",
                    out.size(),
                    inp.size()
                ),
            });
        }
        let out = out.to_kind(x.kind());
        let e = if cfg_on {
            let p = out.chunk(2, 0);
            &p[0] + (&p[1] - &p[0]) * guidance
        } else {
            out
        };
        x = sched.step(i, &e, &x)?;
    }
    Ok(x)
}

/// A conditioned denoiser as `denoise`'s model: `denoiser(x, t [B], conditioning)` with `cond`
/// the prompt's conditioning tensors (`[B, …]` each) and `uncond` the negative prompt's (needed
/// when `guidance > 1`: each tensor is then `cat([uncond, cond])`, diffusers' order).
pub fn conditioned_model<'a>(
    denoiser: impl Fn(&Tensor, &Tensor, &[Tensor]) -> Result<Tensor> + 'a,
    cond: &[Tensor],
    uncond: Option<&[Tensor]>,
    guidance: f64,
) -> Result<impl FnMut(&Tensor, f64) -> Result<Tensor> + 'a> {
    let ctx: Vec<Tensor> = match (guidance > 1.0, uncond) {
        (true, Some(u)) => u.iter().zip(cond).map(|(u, c)| Tensor::cat(&[u, c], 0)).collect(),
        (true, None) => {
            return Err(Error::Config {
                path: "<denoise>".into(),
                field: "uncond".into(),
                msg: format!("guidance {guidance} > 1 needs negative prompt embeddings (encode \"\" for none)"),
            })
        }
        (false, _) => cond.iter().map(|c| c.shallow_clone()).collect(),
    };
    Ok(move |x: &Tensor, t: f64| {
        let ts = Tensor::full([x.size()[0]], t, (Kind::Float, x.device()));
        denoiser(x, &ts, &ctx)
    })
}

/// The SD UNet as `denoise`'s model: `cond` `[B, L, C]` prompt embeddings, `uncond` the negative
/// ones (needed when `guidance > 1`).
pub fn unet_model<'a>(
    unet: &'a UNet2DConditionModel,
    cond: &Tensor,
    uncond: Option<&Tensor>,
    guidance: f64,
) -> Result<impl FnMut(&Tensor, f64) -> Result<Tensor> + 'a> {
    conditioned_model(
        move |x: &Tensor, t: &Tensor, c: &[Tensor]| Ok(unet.forward(x, t, &c[0])),
        std::slice::from_ref(cond),
        uncond.map(std::slice::from_ref),
        guidance,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Schedule::step` applies core/diffusion's coefficients to tensors: checked in f64 against
    /// the Euler update written out on tensors (`x̂0`, `d = (x − x̂0)/σ`, `x + d·(σ_next − σ)`),
    /// every step of SD1.5's 10-step schedule, every prediction type. Inputs: m ~ N(0, 1), x ~
    /// 14·N(0, 1) (σ_max ≈ 14.6), so every intermediate is ≲ 130 (σ·m, x). Nothing amplifies a
    /// rounding: the only division, (x − x̂0)/σ, is multiplied back by |σ_next − σ| ≤ σ. Both
    /// sides are ≲ 10 f64 roundings of values ≲ 130 (≈ 1.4e-14 each): bound 1e-12. A wrong
    /// coefficient or a swapped (m, x) pair is off by O(1).
    #[test]
    fn euler_step_applies_core_diffusion_coefficients() {
        let sched = Schedule::new(Sampler::Euler, &SchedulerConfig::sd15(), 10).unwrap();
        tch::manual_seed(0);
        let opts = (Kind::Double, tch::Device::Cpu);
        let (m, x) = (Tensor::randn([2, 4, 3, 3], opts), Tensor::randn([2, 4, 3, 3], opts) * 14.0);
        for pred in [Prediction::Epsilon, Prediction::VPrediction, Prediction::Sample] {
            let sched = Schedule { prediction: pred, ..sched.clone() };
            for i in 0..sched.timesteps.len() {
                let (s, s_next) = (sched.sigmas[i], sched.sigmas[i + 1]);
                let x0 = match pred {
                    Prediction::Epsilon => &x - &m * s,
                    Prediction::VPrediction => &m * (-s / (s * s + 1.0).sqrt()) + &x / (s * s + 1.0),
                    Prediction::Sample => m.shallow_clone(),
                };
                let want = &x + (&x - x0) / s * (s_next - s);
                let got = sched.step(i, &m, &x).unwrap();
                let d = (got - want).abs().max().double_value(&[]);
                assert!(d <= 1e-12, "{pred:?} step {i}: {d}");
            }
            // The input is divided by √(σ² + 1).
            let s = sched.sigmas[0];
            let d = (sched.scale_model_input(&x, 0) - &x / (s * s + 1.0).sqrt()).abs().max().double_value(&[]);
            assert!(d <= 1e-12, "scale_model_input: {d}");
        }
        // Stepping from the trailing σ = 0 is refused by core/diffusion, not a division by zero.
        assert!(sched.step(sched.timesteps.len(), &m, &x).is_err());
    }
}
