//! Noise schedules as diffusers 0.42.1's DDPM/DDIM/Euler/FlowMatchEuler schedulers compute them.
//! Everything is computed in f64; diffusers builds betas and `alphas_cumprod` in float32, so the
//! oracle tests compare with a bound derived from f32 rounding (see tests/diffusers_oracle.rs).

use crate::{invalid, Result};

/// `beta_schedule` of diffusers' DDPMScheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BetaSchedule {
    Linear { beta_start: f64, beta_end: f64 },
    ScaledLinear { beta_start: f64, beta_end: f64 },
    SquaredCosCapV2,
}

impl BetaSchedule {
    /// SD1.5's schedule: `scaled_linear` 0.00085..0.012.
    pub const SD15: BetaSchedule = BetaSchedule::ScaledLinear { beta_start: 0.00085, beta_end: 0.012 };
}

/// numpy/torch `linspace`: `start + i·step`, the last point set to `stop` exactly.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = stop;
    v
}

/// numpy's `round` (half to even): DDIM's `linspace` spacing hits exact halves (e.g. 499.5).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The betas of `n` training steps.
pub fn betas(schedule: BetaSchedule, n: usize) -> Result<Vec<f64>> {
    if n < 2 {
        return Err(invalid("num_train_timesteps", format!("{n}; needs at least 2 (SD1.5 uses 1000)")));
    }
    Ok(match schedule {
        BetaSchedule::Linear { beta_start, beta_end } => linspace(beta_start, beta_end, n),
        BetaSchedule::ScaledLinear { beta_start, beta_end } => {
            linspace(beta_start.sqrt(), beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
        }
        BetaSchedule::SquaredCosCapV2 => {
            // diffusers' betas_for_alpha_bar(alpha_transform_type="cosine", max_beta=0.999).
            let ab = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - ab(t2) / ab(t1)).min(0.999)
                })
                .collect()
        }
    })
}

/// `alphas_cumprod = cumprod(1 − β)`.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// SNR(t) = ᾱ / (1 − ᾱ) (sd-scripts' `all_snr`).
pub fn snr(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod.iter().map(|a| a / (1.0 - a)).collect()
}

/// The Euler/Karras sigma: σ = √((1 − ᾱ)/ᾱ).
pub fn sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// diffusers' `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl std::str::FromStr for Spacing {
    type Err = crate::DiffusionError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linspace" => Ok(Spacing::Linspace),
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            _ => Err(invalid("timestep_spacing", format!("{s:?}; use linspace, leading or trailing"))),
        }
    }
}

/// numpy `arange(start, stop, step)` for a float step.
fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start + i as f64 * step).collect()
}

/// A step's model output, sample and output buffer must have one length.
fn check_lengths(model_output: usize, sample: usize, out: usize) -> Result<()> {
    if model_output != sample || out != sample {
        return Err(invalid(
            "model_output",
            format!("{model_output} values vs sample {sample} and out {out}; pass equal lengths"),
        ));
    }
    Ok(())
}

fn check_steps(train: usize, steps: usize) -> Result<()> {
    if steps == 0 || steps > train {
        return Err(invalid("num_inference_steps", format!("{steps}; must be in 1..={train} (num_train_timesteps)")));
    }
    Ok(())
}

/// `DDIMScheduler.set_timesteps`: integer timesteps, descending.
pub fn ddim_timesteps(train: usize, steps: usize, spacing: Spacing, steps_offset: i64) -> Result<Vec<i64>> {
    check_steps(train, steps)?;
    let t = train as f64;
    Ok(match spacing {
        Spacing::Linspace => {
            linspace(0.0, t - 1.0, steps).into_iter().rev().map(|x| round_half_even(x) as i64).collect()
        }
        Spacing::Leading => {
            let ratio = (train / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        Spacing::Trailing => {
            let ratio = t / steps as f64;
            arange(t, 0.0, -ratio).into_iter().map(|x| round_half_even(x) as i64 - 1).collect()
        }
    })
}

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// One DDIM step with η = 0 (deterministic), as `DDIMScheduler.step`: `prev_t = t − train/steps`,
/// ᾱ_prev = 1 when `prev_t < 0` and `set_alpha_to_one`, else ᾱ[0]. Generic over f32/f64 slices:
/// the coefficients are computed in f64 and applied in `T`. No `clip_sample`/thresholding (SD1.5
/// ships `clip_sample = false`; the oracle sets it so).
#[allow(clippy::too_many_arguments)]
pub fn ddim_step<T: Float>(
    alphas_cumprod: &[f64],
    steps: usize,
    t: usize,
    model_output: &[T],
    sample: &[T],
    prediction: Prediction,
    set_alpha_to_one: bool,
    out: &mut [T],
) -> Result<()> {
    let train = alphas_cumprod.len();
    check_steps(train, steps)?;
    if t >= train {
        return Err(invalid("timestep", format!("{t}; must be < num_train_timesteps {train}")));
    }
    check_lengths(model_output.len(), sample.len(), out.len())?;
    let prev = t as i64 - (train / steps) as i64;
    let a_t = alphas_cumprod[t];
    let a_prev = if prev >= 0 {
        alphas_cumprod[prev as usize]
    } else if set_alpha_to_one {
        1.0
    } else {
        alphas_cumprod[0]
    };
    let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
    let (sap, sbp) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
    for ((o, &m), &x) in out.iter_mut().zip(model_output).zip(sample) {
        let (m, x) = (m.to_f64(), x.to_f64());
        let (x0, eps) = match prediction {
            Prediction::Epsilon => ((x - sb * m) / sa, m),
            Prediction::Sample => (m, (x - sa * m) / sb),
            Prediction::VPrediction => (sa * x - sb * m, sa * m + sb * x),
        };
        *o = T::from_f64(sap * x0 + sbp * eps);
    }
    Ok(())
}

/// `EulerDiscreteScheduler.scale_model_input`'s divisor: the model sees `x / √(σ² + 1)`, the
/// noisy sample brought back to unit variance (σ of the current step, `sigmas[i]` of
/// [`euler_schedule`]). A divisor rather than its reciprocal because diffusers divides: one
/// rounding, as there, instead of two.
pub fn euler_input_std(sigma: f64) -> f64 {
    (sigma * sigma + 1.0).sqrt()
}

/// One `EulerDiscreteScheduler.step` with no churn (`s_churn = 0`, so σ̂ = σ, no added noise),
/// from step `i` of `sigmas` (as [`euler_schedule`] returns them, trailing 0 included) to
/// `i + 1`: `x̂0` from the prediction — ε: `x − σ·m`; v: `m·(−σ/√(σ²+1)) + x/(σ²+1)`; sample:
/// `m` — then `d = (x − x̂0)/σ` and `x_next = x + d·(σ_next − σ)`. Generic over f32/f64 slices
/// like [`ddim_step`]: computed in f64 and stored in `T`. The update is linear and homogeneous
/// in (model output, sample), so the unit pair `(m, x) = (1, 0), (0, 1)` yields its two
/// coefficients (for ε they are exactly `σ_next − σ` and 1, as `σ/σ = 1` in floating point).
pub fn euler_step<T: Float>(
    sigmas: &[f64],
    i: usize,
    model_output: &[T],
    sample: &[T],
    prediction: Prediction,
    out: &mut [T],
) -> Result<()> {
    if i + 1 >= sigmas.len() {
        return Err(invalid(
            "step",
            format!(
                "{i}; an Euler step goes from sigmas[i] to sigmas[i + 1], so i must be < {}",
                sigmas.len().max(1) - 1
            ),
        ));
    }
    let (s, s_next) = (sigmas[i], sigmas[i + 1]);
    // d divides by σ: a zero or non-finite σ (only the trailing σ = 0 is zero in a schedule)
    // means the caller stepped from the end of the schedule or passed a broken one.
    if !(s > 0.0 && s.is_finite() && s_next.is_finite()) {
        return Err(invalid("sigmas", format!("step {i} goes from σ = {s} to σ = {s_next}; σ must be finite and > 0")));
    }
    check_lengths(model_output.len(), sample.len(), out.len())?;
    let var = s * s + 1.0;
    let dt = s_next - s;
    for ((o, &m), &x) in out.iter_mut().zip(model_output).zip(sample) {
        let (m, x) = (m.to_f64(), x.to_f64());
        let x0 = match prediction {
            Prediction::Epsilon => x - s * m,
            Prediction::VPrediction => m * (-s / var.sqrt()) + x / var,
            Prediction::Sample => m,
        };
        let d = (x - x0) / s;
        *o = T::from_f64(x + d * dt);
    }
    Ok(())
}

/// The element types the slice formulas accept.
pub trait Float: Copy {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}
impl Float for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl Float for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// numpy `interp(x, arange(len), fp)`.
fn interp_index(x: f64, fp: &[f64]) -> f64 {
    if x <= 0.0 {
        return fp[0];
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    let i = x.floor() as usize;
    let f = x - i as f64;
    fp[i] + f * (fp[i + 1] - fp[i])
}

/// `EulerDiscreteScheduler.set_timesteps` (linear interpolation, no Karras): (timesteps, sigmas
/// with the trailing 0).
pub fn euler_schedule(
    alphas_cumprod: &[f64],
    steps: usize,
    spacing: Spacing,
    steps_offset: i64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let train = alphas_cumprod.len();
    check_steps(train, steps)?;
    let t = train as f64;
    let ts: Vec<f64> = match spacing {
        Spacing::Linspace => linspace(0.0, t - 1.0, steps).into_iter().rev().collect(),
        Spacing::Leading => {
            let ratio = (train / steps) as f64;
            (0..steps).rev().map(|i| round_half_even(i as f64 * ratio) + steps_offset as f64).collect()
        }
        Spacing::Trailing => {
            let ratio = t / steps as f64;
            arange(t, 0.0, -ratio).into_iter().map(|x| round_half_even(x) - 1.0).collect()
        }
    };
    let base = sigmas(alphas_cumprod);
    let mut sig: Vec<f64> = ts.iter().map(|&x| interp_index(x, &base)).collect();
    sig.push(0.0);
    Ok((ts, sig))
}

/// The static shift: σ ← s·σ / (1 + (s − 1)·σ).
pub fn shift_sigma(s: f64, sigma: f64) -> f64 {
    s * sigma / (1.0 + (s - 1.0) * sigma)
}

/// Flux's exponential `time_shift(mu, sigma, t) = e^μ / (e^μ + (1/t − 1)^σ)`.
pub fn time_shift(mu: f64, sigma: f64, t: f64) -> f64 {
    mu.exp() / (mu.exp() + (1.0 / t - 1.0).powf(sigma))
}

/// lin(x1 → y1, x2 → y2)(x): diffusers' `calculate_shift(seq_len, base_seq_len, max_seq_len,
/// base_shift, max_shift)`.
pub fn calculate_shift(seq_len: f64, base_seq_len: f64, max_seq_len: f64, base_shift: f64, max_shift: f64) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len - base_seq_len);
    let b = base_shift - m * base_seq_len;
    seq_len * m + b
}

/// Flux's μ: `calculate_shift(seq_len, 256, 4096, 0.5, 1.15)`.
pub fn flux_mu(seq_len: f64) -> f64 {
    calculate_shift(seq_len, 256.0, 4096.0, 0.5, 1.15)
}

/// Qwen-Image's μ: `calculate_shift(seq_len, 256, 8192, 0.5, 0.9)`.
pub fn qwen_mu(seq_len: f64) -> f64 {
    calculate_shift(seq_len, 256.0, 8192.0, 0.5, 0.9)
}

/// How FlowMatchEulerDiscreteScheduler shifts its sigmas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FlowShift {
    /// `shift` (1.0 = none).
    Static(f64),
    /// `use_dynamic_shifting` with `mu` (exponential `time_shift`). diffusers ignores `shift`
    /// then (its `__init__` shifts the training sigmas only without dynamic shifting); the field
    /// is kept for callers that record it.
    Dynamic { shift: f64, mu: f64 },
}

/// `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(steps, mu)`:
/// (timesteps = σ·T, sigmas with the trailing 0).
pub fn flow_match_schedule(train: usize, steps: usize, shift: FlowShift) -> Result<(Vec<f64>, Vec<f64>)> {
    check_steps(train, steps)?;
    let t = train as f64;
    // __init__: sigmas = linspace(1, T, T)[::-1] / T, statically shifted unless dynamic.
    let init_shift = match shift {
        FlowShift::Static(s) => Some(s),
        FlowShift::Dynamic { .. } => None,
    };
    let train_sigma = |x: f64| match init_shift {
        Some(s) => shift_sigma(s, x),
        None => x,
    };
    let (smax, smin) = (train_sigma(1.0), train_sigma(1.0 / t));
    let ts = linspace(smax * t, smin * t, steps);
    let mut sig: Vec<f64> = ts
        .iter()
        .map(|x| {
            let s = x / t;
            match shift {
                FlowShift::Static(k) => shift_sigma(k, s),
                FlowShift::Dynamic { mu, .. } => time_shift(mu, 1.0, s),
            }
        })
        .collect();
    let timesteps = sig.iter().map(|s| s * t).collect();
    sig.push(0.0);
    Ok((timesteps, sig))
}

/// FluxPipeline's and QwenImagePipeline's default inference sigmas, before the scheduler shifts
/// them: `np.linspace(1.0, 1 / steps, steps)`.
pub fn pipeline_flow_sigmas(steps: usize) -> Vec<f64> {
    linspace(1.0, 1.0 / steps as f64, steps)
}

/// `FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal`: σ ← 1 − (1 − σ)/k with
/// k = (1 − σ_last)/(1 − terminal), so the last σ becomes `terminal` (Qwen-Image: 0.02).
pub fn stretch_to_terminal(sigmas: &mut [f64], terminal: f64) {
    let Some(&last) = sigmas.last() else { return };
    let k = (1.0 - last) / (1.0 - terminal);
    for s in sigmas.iter_mut() {
        *s = 1.0 - (1.0 - *s) / k;
    }
}

/// `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=sigmas, mu=mu)` as the Flux and
/// Qwen-Image pipelines call it: each given σ shifted (`FlowShift::Static` or the exponential
/// `time_shift` with μ), stretched to `shift_terminal` if set, timesteps = σ·T, then the
/// trailing σ = 0. The given sigmas must lie in (0, 1] (1/σ − 1 is taken).
pub fn flow_match_schedule_from_sigmas(
    train: usize,
    sigmas: &[f64],
    shift: FlowShift,
    shift_terminal: Option<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_steps(train, sigmas.len())?;
    if let Some(s) = sigmas.iter().find(|s| !(**s > 0.0 && **s <= 1.0)) {
        return Err(invalid(
            "sigmas",
            format!("{s} is outside (0, 1]; pass flow-matching sigmas such as linspace(1, 1/N, N)"),
        ));
    }
    if let Some(z) = shift_terminal.filter(|z| !(*z >= 0.0 && *z < 1.0)) {
        return Err(invalid("shift_terminal", format!("{z} is outside [0, 1)")));
    }
    let mut sig: Vec<f64> = sigmas
        .iter()
        .map(|&s| match shift {
            FlowShift::Static(k) => shift_sigma(k, s),
            FlowShift::Dynamic { mu, .. } => time_shift(mu, 1.0, s),
        })
        .collect();
    // diffusers tests `if self.config.shift_terminal:`, so 0.0 means "off" as None does.
    if let Some(z) = shift_terminal.filter(|z| *z != 0.0) {
        // The stretch divides by 1 − σ_last: a schedule ending at σ = 1 (one step) has none to
        // stretch (diffusers returns NaN there).
        if sig.last().is_some_and(|s| *s >= 1.0) {
            return Err(invalid("shift_terminal", format!("{z} needs a last σ below 1; use at least 2 steps")));
        }
        stretch_to_terminal(&mut sig, z);
    }
    let timesteps = sig.iter().map(|s| s * train as f64).collect();
    sig.push(0.0);
    Ok((timesteps, sig))
}

/// One `FlowMatchEulerDiscreteScheduler.step` (no stochastic sampling): `x + (σ_{i+1} − σ_i)·v`.
pub fn flow_euler_step<T: Float>(sigmas: &[f64], i: usize, velocity: &[T], sample: &[T], out: &mut [T]) -> Result<()> {
    if i + 1 >= sigmas.len() {
        return Err(invalid(
            "step",
            format!("{i}; must be < {} (the sigmas end with the trailing 0)", sigmas.len().max(1) - 1),
        ));
    }
    check_lengths(velocity.len(), sample.len(), out.len())?;
    let dt = sigmas[i + 1] - sigmas[i];
    for ((o, v), x) in out.iter_mut().zip(velocity).zip(sample) {
        *o = T::from_f64(x.to_f64() + dt * v.to_f64());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even() {
        assert_eq!(round_half_even(499.5), 500.0);
        assert_eq!(round_half_even(498.5), 498.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }

    #[test]
    fn sd15_leading_ddim() {
        let ts = ddim_timesteps(1000, 50, Spacing::Leading, 1).unwrap();
        assert_eq!(ts[0], 981);
        assert_eq!(*ts.last().unwrap(), 1);
        assert_eq!(ts.len(), 50);
    }

    /// Hand-derived updates on σ = [2, 0.5, 0] from (m, x) = (1, 3): dt = σ_next − σ = −1.5 and
    /// dt/σ = −0.75, so x_next = x + (x − x̂0)·(−0.75) = 0.25·x + 0.75·x̂0.
    ///  - ε: x̂0 = 3 − 2 = 1 → 0.75 + 0.75 = 1.5 (= x + m·dt).
    ///  - v: x̂0 = −2/√5 + 3/5 → 0.75 + 0.45 − 1.5/√5 = 1.2 − 0.3·√5 ≈ 0.529180.
    ///  - sample: x̂0 = m = 1 → 1.5.
    ///
    /// The last step (σ 0.5 → 0) lands on x̂0 itself: ε gives x − 0.5·m = 2.5. Both sides are at
    /// most ~10 f64 roundings of values ≤ 3 (ε₆₄·3 ≈ 6.7e-16 each): bound 1e-14. A wrong sign or
    /// coefficient moves a value by ≥ 0.05.
    #[test]
    fn euler_step_hand_derived() {
        let sig = [2.0, 0.5, 0.0];
        let step = |i, p, m: f64, x: f64| {
            let mut o = [0.0f64];
            euler_step(&sig, i, &[m], &[x], p, &mut o).unwrap();
            o[0]
        };
        let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-14, "{a} vs {b}");
        close(step(0, Prediction::Epsilon, 1.0, 3.0), 1.5);
        close(step(0, Prediction::VPrediction, 1.0, 3.0), 1.2 - 0.3 * 5f64.sqrt());
        close(step(0, Prediction::Sample, 1.0, 3.0), 1.5);
        close(step(1, Prediction::Epsilon, 1.0, 3.0), 2.5);
        // v at the last step is x̂0 = m·(−σ/√(σ²+1)) + x/(σ²+1) with σ = 0.5: −1/√5 + 2.4.
        close(step(1, Prediction::VPrediction, 1.0, 3.0), 2.4 - 1.0 / 5f64.sqrt());
        // The unit-pair coefficients the tch side uses: ε gives exactly (dt, 1).
        let mut c = [0.0f64; 2];
        euler_step(&sig, 0, &[1.0, 0.0], &[0.0, 1.0], Prediction::Epsilon, &mut c).unwrap();
        assert_eq!(c, [-1.5, 1.0]);
        // …and they reproduce the direct update for any (m, x): linearity, checked on v.
        euler_step(&sig, 0, &[1.0, 0.0], &[0.0, 1.0], Prediction::VPrediction, &mut c).unwrap();
        close(c[0] * 1.0 + c[1] * 3.0, step(0, Prediction::VPrediction, 1.0, 3.0));
        // f32 slices: the f64 result rounded once (1.5 is exact in f32).
        let mut o = [0.0f32];
        euler_step(&sig, 0, &[1.0f32], &[3.0f32], Prediction::Epsilon, &mut o).unwrap();
        assert_eq!(o[0], 1.5);
        // The input scaling divides by √(σ²+1) = √5 at σ = 2.
        close(euler_input_std(2.0), 5f64.sqrt());
    }

    #[test]
    fn euler_step_refuses_the_end_of_the_schedule_and_bad_lengths() {
        let sig = [2.0, 0.5, 0.0];
        let mut o = [0.0f64];
        let e = euler_step(&sig, 2, &[1.0], &[1.0], Prediction::Epsilon, &mut o).unwrap_err().to_string();
        assert!(e.contains("`step`") && e.contains("< 2"), "{e}");
        let e = euler_step(&[0.0, 0.0], 0, &[1.0], &[1.0], Prediction::Epsilon, &mut o).unwrap_err().to_string();
        assert!(e.contains("`sigmas`"), "{e}");
        let e = euler_step(&sig, 0, &[1.0, 2.0], &[1.0], Prediction::Epsilon, &mut o).unwrap_err().to_string();
        assert!(e.contains("`model_output`"), "{e}");
    }

    /// Hand-derived: linspace(1, 1/4, 4) = [1, 0.75, 0.5, 0.25]; the static shift s = 3 maps σ
    /// to 3σ/(1 + 2σ): [1, 0.9, 0.75, 0.5]; the exponential shift with μ = ln 2 maps σ to
    /// 2/(2 + 1/σ − 1): [1, 6/7, 2/3, 0.4]; stretching [1, 0.9, 0.75, 0.5] to terminal 0.02 divides
    /// 1 − σ by k = 0.5/0.98: [1, 0.804, 0.51, 0.02]. Each side is a few f64 roundings of values
    /// ≤ 1000: bound 1e-12. A missing shift or stretch moves a value by ≥ 0.1.
    #[test]
    fn flow_sigmas_hand_derived() {
        let close = |a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-12, "{a:?} vs {b:?}");
            }
        };
        let base = pipeline_flow_sigmas(4);
        close(&base, &[1.0, 0.75, 0.5, 0.25]);
        let (ts, sg) = flow_match_schedule_from_sigmas(1000, &base, FlowShift::Static(3.0), None).unwrap();
        close(&sg, &[1.0, 0.9, 0.75, 0.5, 0.0]);
        close(&ts, &[1000.0, 900.0, 750.0, 500.0]);
        let mu = 2f64.ln();
        let (_, sg) =
            flow_match_schedule_from_sigmas(1000, &base, FlowShift::Dynamic { shift: 3.0, mu }, None).unwrap();
        close(&sg, &[1.0, 6.0 / 7.0, 2.0 / 3.0, 0.4, 0.0]);
        let (_, sg) = flow_match_schedule_from_sigmas(1000, &base, FlowShift::Static(3.0), Some(0.02)).unwrap();
        close(&sg, &[1.0, 0.804, 0.51, 0.02, 0.0]);
        // shift_terminal 0.0 is diffusers' "off" (a falsy value).
        let (_, sg) = flow_match_schedule_from_sigmas(1000, &base, FlowShift::Static(3.0), Some(0.0)).unwrap();
        close(&sg, &[1.0, 0.9, 0.75, 0.5, 0.0]);
        let e = flow_match_schedule_from_sigmas(1000, &[1.0, 0.0], FlowShift::Static(1.0), None).unwrap_err();
        assert!(e.to_string().contains("sigmas"), "{e}");
        // The Euler step: x + (σ_next − σ)·v = 3 + (0.9 − 1)·2 = 2.8; the end of the schedule is refused.
        let mut o = [0.0f64];
        flow_euler_step(&[1.0, 0.9, 0.0], 0, &[2.0], &[3.0], &mut o).unwrap();
        assert!((o[0] - 2.8).abs() <= 1e-15, "{}", o[0]);
        assert!(flow_euler_step(&[1.0, 0.9, 0.0], 2, &[2.0], &[3.0], &mut o).is_err());
    }

    #[test]
    fn bad_steps_named() {
        let e = ddim_timesteps(1000, 0, Spacing::Leading, 1).unwrap_err();
        assert!(e.to_string().contains("num_inference_steps"), "{e}");
    }
}
