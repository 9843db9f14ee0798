//! The generic denoising loop ([`run`] over a [`Stepper`]): DDIM η = 0 and Euler over betas, as
//! diffusers 0.42.1's `StableDiffusionPipeline` runs them with `DDIMScheduler` /
//! `EulerDiscreteScheduler`, and flow-matching Euler ([`FlowSchedule`]) as `FluxPipeline` runs
//! `FlowMatchEulerDiscreteScheduler` (sigmas `linspace(1, 1/N, N)`, static shift or μ from the
//! image token count). Guidance is one of three kinds kept apart ([`Guidance`]: embedded,
//! CFG batch doubling, true CFG with two forwards), applied by [`guided_model`]. Scheduler
//! configs are read by `_class_name` ([`AnySchedulerConfig`]; [`SchedulerConfig`] for the beta
//! family, [`FlowMatchConfig`] for flow matching); anything else is refused by name.
//!
//! The scheduler maths is core/diffusion's (`likeness_diffusion::schedules`: betas,
//! `alphas_cumprod`, `ddim_timesteps`, `ddim_step`, `euler_schedule`, `euler_input_std`,
//! `euler_step`), not a second copy. Its steps work on slices; every DDIM and Euler update is
//! linear and homogeneous in (model output, sample) per element, so one call on the unit pair
//! `(m, x) = (1, 0), (0, 1)` yields the two coefficients of `x_next = c_m·m + c_x·x` (computed
//! in f64), which are then applied to whole tensors on their device.

use crate::config::{read_json, Fields};
use crate::error::{Error, Result};
use crate::unet::UNet2DConditionModel;
use likeness_diffusion::schedules::{self, BetaSchedule, FlowShift};
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
        Self::from_value(path, &read_json(path)?)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let f = Fields { path, v };
        let err = |field: &str, msg: String| f.err(field, msg);
        let num = |field: &str, default: f64| f.number(field, default);
        let string = |field: &str, default: &str| -> Result<String> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(x) => x.as_str().map(String::from).ok_or_else(|| err(field, format!("{x} is not a string"))),
            }
        };
        check_ddpm_class(path, v)?;
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

/// The `_class_name`s read as a DDPM-family beta schedule that [`Sampler::Ddim`] /
/// [`Sampler::Euler`] sample over. PNDM (what SD1.5 folders ship), DPM-Solver++ (many
/// fine-tunes') and DDPM (training folders') are read for their betas only: the sampler is the
/// caller's choice, as diffusers' `DDIMScheduler.from_config(pipe.scheduler.config)` does.
pub const DDPM_CLASSES: &[&str] =
    &["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"];

/// The flow-matching class [`FlowMatchConfig`] reads.
pub const FLOW_CLASS: &str = "FlowMatchEulerDiscreteScheduler";

fn class_name<'v>(path: &Path, v: &'v Value) -> Result<Option<&'v str>> {
    match v.get("_class_name") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(c)) => Ok(Some(c)),
        Some(x) => {
            Err(Error::Config { path: path.into(), field: "_class_name".into(), msg: format!("{x} is not a string") })
        }
    }
}

/// A file without `_class_name` is read as the class asked for (as `SomeScheduler.from_config`
/// does); a flow-matching or unknown class is refused, naming what is supported.
fn check_ddpm_class(path: &Path, v: &Value) -> Result<()> {
    let Some(c) = class_name(path, v)? else { return Ok(()) };
    if DDPM_CLASSES.contains(&c) {
        return Ok(());
    }
    let msg = if c == FLOW_CLASS {
        format!("{c} is a flow-matching scheduler, not a beta schedule; read it with FlowMatchConfig (or AnySchedulerConfig)")
    } else {
        format!("{c:?} is not supported; supported: {}, {FLOW_CLASS}", DDPM_CLASSES.join(", "))
    };
    Err(Error::Config { path: path.into(), field: "_class_name".into(), msg })
}

/// `FlowMatchEulerDiscreteScheduler`'s `scheduler_config.json` (Flux, Qwen-Image, SD3). The
/// fields that change the schedule beyond these are refused by name.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    /// The static shift (used when `use_dynamic_shifting` is false).
    pub shift: f64,
    /// Resolution-dependent exponential shift with μ = `calculate_shift(image_seq_len, …)`.
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: f64,
    pub max_image_seq_len: f64,
    /// Stretch the shifted sigmas so the last one is this (Qwen-Image: 0.02); `None` or 0 = off.
    pub shift_terminal: Option<f64>,
}

impl FlowMatchConfig {
    /// FLUX.1-dev's scheduler_config.json.
    pub fn flux_dev() -> Self {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256.0,
            max_image_seq_len: 4096.0,
            shift_terminal: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, &read_json(path)?)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let err = |field: &str, msg: String| Error::Config { path: path.into(), field: field.into(), msg };
        match class_name(path, v)? {
            Some(FLOW_CLASS) => {}
            Some(c) => return Err(err("_class_name", format!("{c:?}; FlowMatchConfig reads {FLOW_CLASS} only"))),
            None => return Err(err("_class_name", format!("missing; a flow-matching config names {FLOW_CLASS}"))),
        }
        let f = Fields { path, v };
        let num = |field: &str, default: f64| f.number(field, default);
        let flag = |field: &str| f.flag(field);
        for field in
            ["invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"]
        {
            if flag(field)? {
                return Err(err(
                    field,
                    "true is not supported (deterministic Euler over shifted linear sigmas only); set it to false"
                        .into(),
                ));
            }
        }
        if let Some(x) = v.get("time_shift_type").filter(|x| !x.is_null()) {
            if x.as_str() != Some("exponential") {
                return Err(err("time_shift_type", format!("{x} is not supported; use \"exponential\" (Flux's)")));
            }
        }
        let train = num("num_train_timesteps", 1000.0)?;
        if train < 2.0 || train.fract() != 0.0 {
            return Err(err("num_train_timesteps", format!("{train} must be an integer ≥ 2")));
        }
        let shift = num("shift", 1.0)?;
        if !(shift > 0.0 && shift.is_finite()) {
            return Err(err("shift", format!("{shift} must be a positive number")));
        }
        let shift_terminal = match v.get("shift_terminal") {
            None | Some(Value::Null) => None,
            Some(x) => match x.as_f64() {
                Some(z) if (0.0..1.0).contains(&z) => Some(z),
                _ => return Err(err("shift_terminal", format!("{x} must be null or a number in [0, 1)"))),
            },
        };
        let c = FlowMatchConfig {
            num_train_timesteps: train as usize,
            shift,
            use_dynamic_shifting: flag("use_dynamic_shifting")?,
            base_shift: num("base_shift", 0.5)?,
            max_shift: num("max_shift", 1.15)?,
            base_image_seq_len: num("base_image_seq_len", 256.0)?,
            max_image_seq_len: num("max_image_seq_len", 4096.0)?,
            shift_terminal,
        };
        if c.use_dynamic_shifting && c.max_image_seq_len == c.base_image_seq_len {
            return Err(err("max_image_seq_len", "equals base_image_seq_len: μ's line is undefined".into()));
        }
        Ok(c)
    }

    /// μ of the dynamic shift for `image_seq_len` image tokens, as FluxPipeline computes it:
    /// `calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)`.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        schedules::calculate_shift(
            image_seq_len as f64,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift,
            self.max_shift,
        )
    }

    /// The shift of an inference run over `image_seq_len` tokens (μ only if dynamic).
    pub fn flow_shift(&self, image_seq_len: usize) -> FlowShift {
        if self.use_dynamic_shifting {
            FlowShift::Dynamic { shift: self.shift, mu: self.mu(image_seq_len) }
        } else {
            FlowShift::Static(self.shift)
        }
    }
}

/// A `scheduler_config.json` of either family, chosen by its `_class_name`.
#[derive(Clone, Debug, PartialEq)]
pub enum AnySchedulerConfig {
    Ddpm(SchedulerConfig),
    FlowMatch(FlowMatchConfig),
}

impl AnySchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, &read_json(path)?)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        match class_name(path, v)? {
            Some(FLOW_CLASS) => Ok(AnySchedulerConfig::FlowMatch(FlowMatchConfig::from_value(path, v)?)),
            _ => Ok(AnySchedulerConfig::Ddpm(SchedulerConfig::from_value(path, v)?)),
        }
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

/// A flow-matching Euler schedule: `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas, mu)`
/// as FluxPipeline calls it (core/diffusion's `flow_match_schedule_from_sigmas`, f64).
#[derive(Clone, Debug)]
pub struct FlowSchedule {
    /// σ·num_train_timesteps per step, descending (what FluxPipeline passes as `timestep`; its
    /// transformer is given `timestep / 1000`).
    pub timesteps: Vec<f64>,
    /// σ per step plus the trailing 0.
    pub sigmas: Vec<f64>,
}

impl FlowSchedule {
    /// FluxPipeline's default: sigmas `linspace(1, 1/steps, steps)`, shifted by the config
    /// (μ from `image_seq_len`, the packed latent's token count, when `use_dynamic_shifting`).
    pub fn new(cfg: &FlowMatchConfig, steps: usize, image_seq_len: usize) -> Result<Self> {
        Self::from_sigmas(cfg, &schedules::pipeline_flow_sigmas(steps), cfg.flow_shift(image_seq_len))
    }

    /// Given (unshifted) sigmas in (0, 1] and the shift.
    pub fn from_sigmas(cfg: &FlowMatchConfig, sigmas: &[f64], shift: FlowShift) -> Result<Self> {
        let (timesteps, sigmas) =
            schedules::flow_match_schedule_from_sigmas(cfg.num_train_timesteps, sigmas, shift, cfg.shift_terminal)
                .map_err(lib)?;
        Ok(FlowSchedule { timesteps, sigmas })
    }
}

/// What the denoising loop needs of a schedule: DDIM/Euler over betas ([`Schedule`]) or
/// flow-matching Euler ([`FlowSchedule`]).
pub trait Stepper {
    /// The model's timesteps, descending.
    fn timesteps(&self) -> &[f64];
    /// What the initial N(0, 1) noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;
    /// The model's input at step `i`.
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Tensor;
    /// The update of step `i` from `x` given the (guided) model output.
    fn step(&self, i: usize, model_output: &Tensor, x: &Tensor) -> Result<Tensor>;
}

impl Stepper for Schedule {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Tensor {
        Schedule::scale_model_input(self, x, i)
    }
    fn step(&self, i: usize, model_output: &Tensor, x: &Tensor) -> Result<Tensor> {
        Schedule::step(self, i, model_output, x)
    }
}

impl Stepper for FlowSchedule {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// Flow matching starts from pure noise at σ = 1 (FluxPipeline does not scale latents).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, x: &Tensor, _i: usize) -> Tensor {
        x.shallow_clone()
    }
    /// `x + (σ_{i+1} − σ_i)·v`; the coefficients come from core/diffusion's `flow_euler_step`
    /// on the unit pair, as [`Schedule::step`] does.
    fn step(&self, i: usize, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let mut c = [0.0f64; 2];
        schedules::flow_euler_step(&self.sigmas, i, &[1.0, 0.0], &[0.0, 1.0], &mut c).map_err(lib)?;
        Ok(v * c[0] + x * c[1])
    }
}

fn loop_err(field: &str, msg: String) -> Error {
    Error::Config { path: "<denoise>".into(), field: field.into(), msg }
}

/// The loop over any schedule. `model(x_in, t)` returns the final (already guided, see
/// [`guided_model`]) prediction for `x_in` `[B, …]` at timestep `t`; `x_t` is the initial N(0, 1)
/// noise (multiplied by `init_noise_sigma` here, as the pipelines' `prepare_latents` does).
pub fn run(
    sched: &impl Stepper,
    x_t: &Tensor,
    mut model: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut x = x_t * sched.init_noise_sigma();
    for (i, &t) in sched.timesteps().iter().enumerate() {
        let inp = sched.scale_model_input(&x, i);
        let out = model(&inp, t)?;
        if out.size() != inp.size() {
            return Err(loop_err(
                "model output",
                format!(
                    "shape {:?} for input {:?}; the model must return one prediction per row",
                    out.size(),
                    inp.size()
                ),
            ));
        }
        x = sched.step(i, &out.to_kind(x.kind()), &x)?;
    }
    Ok(x)
}

/// How a sampler's guidance scale reaches the model; the three kinds never mix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guidance {
    /// One forward on the prompt per step.
    None,
    /// A guidance-distilled model (FLUX.1-dev): the scale is a model input (`guidance` `[B]`),
    /// one forward per step on the prompt, no batch doubling, no negative prompt.
    Embedded(f64),
    /// Classifier-free guidance as StableDiffusionPipeline runs it: one forward on `[x; x]` with
    /// each conditioning tensor `cat([negative, prompt])` (same shapes but the batch), then
    /// `uncond + s·(cond − uncond)`.
    Cfg(f64),
    /// "True" CFG as FluxPipeline's / QwenImagePipeline's `true_cfg_scale`: two separate forwards
    /// (prompt, then negative prompt, whose encodings may differ in length), then
    /// `neg + s·(pos − neg)`. `embedded` is also fed to both forwards (FLUX.1-dev's
    /// `guidance_scale` stays an input under true CFG).
    TrueCfg { scale: f64, embedded: Option<f64> },
    /// QwenImagePipeline's true CFG (two forwards, as `TrueCfg`) with its renormalisation:
    /// `comb = neg + s·(pos − neg)`, then `comb · ‖pos‖ / ‖comb‖`, the norms per packed token
    /// (`torch.norm(dim=-1)` over the C·p·p channels of a p×p latent patch; p = 2).
    TrueCfgRenorm { scale: f64, patch: i64 },
}

/// The L2 norm of each p×p patch of a `[B, C, h, w]` tensor over its C·p·p values (one packed
/// token), broadcast back to `[B, 1, h, w]`.
fn patch_norm(x: &Tensor, p: i64) -> Result<Tensor> {
    let (b, c, h, w) = x.size4().map_err(|e| loop_err("guidance", e.to_string()))?;
    if h % p != 0 || w % p != 0 {
        return Err(loop_err("guidance", format!("latents {h}×{w} do not split into {p}×{p} tokens")));
    }
    let n = x.square().view([b, c, h / p, p, w / p, p]).sum_dim_intlist([1i64, 3, 5].as_slice(), true, None).sqrt();
    Ok(n.expand([b, 1, h / p, p, w / p, p], false).reshape([b, 1, h, w]))
}

impl Guidance {
    /// StableDiffusionPipeline's rule: CFG only when the scale is > 1.
    pub fn cfg(scale: f64) -> Self {
        if scale > 1.0 {
            Guidance::Cfg(scale)
        } else {
            Guidance::None
        }
    }

    /// Whether it needs the negative prompt's conditioning.
    pub fn needs_negative(&self) -> bool {
        matches!(self, Guidance::Cfg(_) | Guidance::TrueCfg { .. } | Guidance::TrueCfgRenorm { .. })
    }

    fn embedded(&self) -> Option<f64> {
        match *self {
            Guidance::Embedded(g) => Some(g),
            Guidance::TrueCfg { embedded, .. } => embedded,
            Guidance::None | Guidance::Cfg(_) | Guidance::TrueCfgRenorm { .. } => None,
        }
    }
}

/// A denoiser as [`run`]'s model with guidance applied: `denoiser(x, t [B], guidance, context)`
/// gets the timestep as f32 `[B]`, the embedded guidance scale as f32 `[B]` (only for
/// [`Guidance::Embedded`] / `TrueCfg { embedded: Some(_) }`, else `None`) and the conditioning
/// tensors (`[B, …]` each, or `[2B, …]` under CFG), and returns its prediction (ε, v, velocity).
/// `negative`: the negative prompt's conditioning, required by `Cfg` and `TrueCfg`.
pub fn guided_model<'a, D>(
    denoiser: D,
    cond: &'a [Tensor],
    negative: Option<&'a [Tensor]>,
    guidance: Guidance,
) -> Result<impl FnMut(&Tensor, f64) -> Result<Tensor> + 'a>
where
    D: Fn(&Tensor, &Tensor, Option<&Tensor>, &[Tensor]) -> Result<Tensor> + 'a,
{
    let neg: &'a [Tensor] = match (guidance.needs_negative(), negative) {
        (true, None) => {
            return Err(loop_err(
                "negative",
                format!("{guidance:?} needs the negative prompt's conditioning (encode \"\" for none)"),
            ))
        }
        (true, Some(n)) => n,
        (false, _) => &[],
    };
    if neg.len() != if guidance.needs_negative() { cond.len() } else { 0 } {
        return Err(loop_err("negative", format!("{} tensors for {} of the prompt", neg.len(), cond.len())));
    }
    let doubled: Vec<Tensor> = match guidance {
        Guidance::Cfg(_) => cat_for_cfg(cond, neg)?,
        _ => Vec::new(),
    };
    let embedded = guidance.embedded();
    Ok(move |x: &Tensor, t: f64| -> Result<Tensor> {
        let rows = |n: i64| Tensor::full([n], t, (Kind::Float, x.device()));
        let scale = |n: i64| embedded.map(|g| Tensor::full([n], g, (Kind::Float, x.device())));
        let b = x.size()[0];
        match guidance {
            Guidance::None | Guidance::Embedded(_) => denoiser(x, &rows(b), scale(b).as_ref(), cond),
            Guidance::Cfg(s) => {
                let out = denoiser(&Tensor::cat(&[x, x], 0), &rows(2 * b), None, &doubled)?;
                check_rows(&out, 2 * b)?;
                let p = out.chunk(2, 0);
                Ok(&p[0] + (&p[1] - &p[0]) * s)
            }
            Guidance::TrueCfg { scale: s, .. } => {
                let g = scale(b);
                let pos = denoiser(x, &rows(b), g.as_ref(), cond)?;
                let neg = denoiser(x, &rows(b), g.as_ref(), neg)?;
                Ok(&neg + (&pos - &neg) * s)
            }
            Guidance::TrueCfgRenorm { scale: s, patch } => {
                let pos = denoiser(x, &rows(b), None, cond)?;
                let neg = denoiser(x, &rows(b), None, neg)?;
                let comb = &neg + (&pos - &neg) * s;
                Ok(&comb * patch_norm(&pos, patch)? / patch_norm(&comb, patch)?)
            }
        }
    })
}

/// CFG's one batch: each conditioning tensor `cat([negative, prompt])` (diffusers' order), which
/// needs equal shapes but the batch; prompts of different lengths are what `TrueCfg` is for.
fn cat_for_cfg(cond: &[Tensor], neg: &[Tensor]) -> Result<Vec<Tensor>> {
    cond.iter()
        .zip(neg)
        .enumerate()
        .map(|(i, (c, n))| {
            if c.size() != n.size() {
                return Err(loop_err(
                    "negative",
                    format!(
                        "CFG batches prompt and negative together, so conditioning {i} must have one shape: {:?} vs {:?}; use Guidance::TrueCfg for encodings of different lengths",
                        c.size(),
                        n.size()
                    ),
                ));
            }
            Ok(Tensor::cat(&[n, c], 0))
        })
        .collect()
}

fn check_rows(out: &Tensor, n: i64) -> Result<()> {
    if out.size().first() != Some(&n) {
        return Err(loop_err(
            "model output",
            format!("shape {:?}; expected {n} rows (CFG's doubled batch)", out.size()),
        ));
    }
    Ok(())
}

/// A flow-matching run: FluxPipeline's loop over `sched` with `denoiser` returning the velocity
/// (see [`guided_model`] for its arguments). `x_t`: the initial N(0, 1) latents in the layout the
/// denoiser takes.
pub fn denoise_flow<'a, D>(
    sched: &FlowSchedule,
    x_t: &Tensor,
    denoiser: D,
    cond: &'a [Tensor],
    negative: Option<&'a [Tensor]>,
    guidance: Guidance,
) -> Result<Tensor>
where
    D: Fn(&Tensor, &Tensor, Option<&Tensor>, &[Tensor]) -> Result<Tensor> + 'a,
{
    run(sched, x_t, guided_model(denoiser, cond, negative, guidance)?)
}

/// The DDIM/Euler loop with a raw model, as before [`Guidance`]: `model(x_in, t)` returns the
/// network's prediction for `x_in` at timestep `t`. With `guidance > 1` (diffusers' condition for
/// classifier-free guidance) `x_in` is `[x; x]` (2B rows) and the model must condition the first
/// half on the unconditional and the second on the prompt embeddings (diffusers' order:
/// `cat([negative, positive])`, see [`conditioned_model`]); the output mixes
/// `uncond + g·(cond − uncond)`. For other guidance kinds use [`run`] with [`guided_model`].
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
    // The model input is scaled per element, so scaling x then doubling equals doubling then
    // scaling bit for bit.
    run(&sched, x_t, |x: &Tensor, t: f64| {
        if !cfg_on {
            return model(x, t);
        }
        let out = model(&Tensor::cat(&[x, x], 0), t)?;
        if out.size().first() != Some(&(2 * x.size()[0])) || out.size()[1..] != x.size()[1..] {
            return Err(loop_err(
                "model output",
                format!(
                    "shape {:?} for input {:?} doubled; the model must return one prediction per row",
                    out.size(),
                    x.size()
                ),
            ));
        }
        let p = out.chunk(2, 0);
        Ok(&p[0] + (&p[1] - &p[0]) * guidance)
    })
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
