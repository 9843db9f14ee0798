//! Timestep sampling for flow-matching training as musubi-tuner / sd-scripts do it
//! (/work/shared/reference/timesteps.md). The transforms take the raw draws (uniform u or
//! standard normal n) so they can be compared with the reference formulas on the same draws;
//! [`TimestepSampler`] draws from a ChaCha stream seeded by a u64.

use crate::schedules::{flux_mu, qwen_mu, shift_sigma, time_shift};
use crate::{invalid, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `timestep_sampling` and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Uniform,
    Sigmoid {
        sigmoid_scale: f64,
    },
    LogitNormal {
        mean: f64,
        std: f64,
    },
    Mode {
        mode_scale: f64,
    },
    Shift {
        sigmoid_scale: f64,
        discrete_flow_shift: f64,
    },
    /// Latent height and width (h, w): μ at `(h/2)·(w/2)`.
    FluxShift {
        sigmoid_scale: f64,
        latent_h: usize,
        latent_w: usize,
    },
    /// Image sequence length.
    QwenShift {
        sigmoid_scale: f64,
        seq_len: usize,
    },
    /// musubi-tuner's default `sigma` (training/trainer_base.py:709-728 at 30c658c): u from
    /// `density` (compute_density_for_timestep_sampling: uniform, logit_normal or mode) indexes
    /// the 1000-step *unshifted* `FlowMatchDiscreteScheduler.timesteps` (1000, 999, …, 1), so
    /// t = (1000 − ⌊u·(max − min) + min⌋)/1000 ∈ {1, …, 1000}/1000; the scheduler's shift is
    /// never applied there, so `discrete_flow_shift` has no effect.
    Sigma {
        density: Density,
    },
}

/// The density u of [`Sampling::Sigma`] (musubi-tuner's `weighting_scheme`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Density {
    Uniform,
    LogitNormal { mean: f64, std: f64 },
    Mode { mode_scale: f64 },
}

impl Density {
    fn needs_normal(self) -> bool {
        matches!(self, Density::LogitNormal { .. })
    }

    /// u from one raw draw (uniform, or normal for logit_normal).
    fn u(self, draw: f64) -> f64 {
        match self {
            Density::Uniform => draw,
            Density::LogitNormal { mean, std } => sigmoid(mean + std * draw),
            Density::Mode { mode_scale } => Sampling::Mode { mode_scale }.transform(draw),
        }
    }
}

/// [`Sampling::Sigma`]'s t for u and the timestep range (of 1000): the index `⌊u·(max − min) + min⌋`
/// (torch's `.long()`, clamped into the 1000-entry table) into timesteps 1000, 999, …, 1.
pub fn sigma_table_t(u: f64, min_timestep: f64, max_timestep: f64) -> f64 {
    let idx = (u * (max_timestep - min_timestep) + min_timestep).floor().clamp(0.0, 999.0);
    (1000.0 - idx) / 1000.0
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Sampling {
    /// Whether the method consumes a normal draw (else a uniform one).
    pub fn needs_normal(&self) -> bool {
        match self {
            Sampling::Sigma { density } => density.needs_normal(),
            _ => !matches!(self, Sampling::Uniform | Sampling::Mode { .. }),
        }
    }

    /// Maps one raw draw (u ~ U(0,1) or n ~ N(0,1), per [`Self::needs_normal`]) to t in [0, 1].
    pub fn transform(&self, draw: f64) -> f64 {
        match *self {
            Sampling::Uniform => draw,
            Sampling::Sigmoid { sigmoid_scale } => sigmoid(sigmoid_scale * draw),
            Sampling::LogitNormal { mean, std } => sigmoid(mean + std * draw),
            Sampling::Mode { mode_scale } => {
                let u = draw;
                let c = (std::f64::consts::PI * u / 2.0).cos();
                1.0 - u - mode_scale * (c * c - 1.0 + u)
            }
            Sampling::Shift { sigmoid_scale, discrete_flow_shift } => {
                shift_sigma(discrete_flow_shift, sigmoid(sigmoid_scale * draw))
            }
            Sampling::FluxShift { sigmoid_scale, latent_h, latent_w } => {
                let mu = flux_mu(((latent_h / 2) * (latent_w / 2)) as f64);
                time_shift(mu, 1.0, sigmoid(sigmoid_scale * draw))
            }
            Sampling::QwenShift { sigmoid_scale, seq_len } => {
                let mu = qwen_mu(seq_len as f64);
                time_shift(mu, 1.0, sigmoid(sigmoid_scale * draw))
            }
            Sampling::Sigma { density } => sigma_table_t(density.u(draw), 0.0, 1000.0),
        }
    }
}

/// Draws t deterministically from a seed; `min_timestep`/`max_timestep` (of 1000) rescale t
/// linearly: t ← min/1000 + t·(max − min)/1000 (the rejection variant,
/// `preserve_distribution_shape`, is not implemented and refused).
pub struct TimestepSampler {
    sampling: Sampling,
    min_t: f64,
    max_t: f64,
    rng: ChaCha8Rng,
}

impl TimestepSampler {
    pub fn new(sampling: Sampling, min_timestep: f64, max_timestep: f64, seed: u64) -> Result<Self> {
        if !(0.0..=1000.0).contains(&min_timestep)
            || !(0.0..=1000.0).contains(&max_timestep)
            || min_timestep >= max_timestep
        {
            return Err(invalid(
                "min_timestep/max_timestep",
                format!("{min_timestep}/{max_timestep}; need 0 ≤ min < max ≤ 1000"),
            ));
        }
        Ok(Self {
            sampling,
            min_t: min_timestep / 1000.0,
            max_t: max_timestep / 1000.0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The `rejection` variant of min/max: refused loudly until written.
    pub fn preserve_distribution_shape() -> Result<Self> {
        Err(crate::DiffusionError::NotImplemented(
            "preserve_distribution_shape (rejection sampling of min/max timestep)",
        ))
    }

    /// u in the open interval (0, 1): 53 random bits, offset by half an ulp so that ln(u) and
    /// logit(u) are finite.
    fn uniform(&mut self) -> f64 {
        ((self.rng.gen::<u64>() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Box–Muller (one draw per pair kept, so the stream position per sample is fixed).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// The next t in [min, max] ⊂ [0, 1].
    pub fn sample(&mut self) -> f64 {
        let draw = if self.sampling.needs_normal() { self.normal() } else { self.uniform() };
        if let Sampling::Sigma { density } = self.sampling {
            // musubi-tuner scales u into the index range, not t into [min, max].
            return sigma_table_t(density.u(draw), self.min_t * 1000.0, self.max_t * 1000.0);
        }
        let t = self.sampling.transform(draw);
        self.min_t + t * (self.max_t - self.min_t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_in_seed() {
        let s = Sampling::Shift { sigmoid_scale: 1.0, discrete_flow_shift: 3.0 };
        let a: Vec<f64> = {
            let mut r = TimestepSampler::new(s, 0.0, 1000.0, 7).unwrap();
            (0..8).map(|_| r.sample()).collect()
        };
        let b: Vec<f64> = {
            let mut r = TimestepSampler::new(s, 0.0, 1000.0, 7).unwrap();
            (0..8).map(|_| r.sample()).collect()
        };
        let c: Vec<f64> = {
            let mut r = TimestepSampler::new(s, 0.0, 1000.0, 8).unwrap();
            (0..8).map(|_| r.sample()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn sigma_is_musubi_tuners_unshifted_table() {
        // musubi-tuner: indices = (u * (t_max - t_min) + t_min).long(); timesteps =
        // (linspace(1, 0, 1001)[:-1] * 1000)[indices]; sigma = timesteps / 1000.
        assert_eq!(sigma_table_t(0.0, 0.0, 1000.0), 1.0);
        assert_eq!(sigma_table_t(0.2345, 0.0, 1000.0), 0.766);
        assert_eq!(sigma_table_t(0.9999, 0.0, 1000.0), 0.001);
        assert_eq!(sigma_table_t(0.5, 200.0, 300.0), 0.75);
        let s = Sampling::Sigma { density: Density::Uniform };
        let mut r = TimestepSampler::new(s, 0.0, 1000.0, 3).unwrap();
        for _ in 0..2000 {
            let t = r.sample();
            let k = t * 1000.0;
            assert!((1.0..=1000.0).contains(&k) && (k - k.round()).abs() < 1e-9, "{t}");
        }
        // logit_normal changes the density only: still on the table.
        let ln = Sampling::Sigma { density: Density::LogitNormal { mean: 0.0, std: 1.0 } };
        assert!(ln.needs_normal() && !s.needs_normal());
        assert_eq!(ln.transform(0.0), 0.5);
    }

    #[test]
    fn min_max_bounds() {
        let mut r = TimestepSampler::new(Sampling::Uniform, 200.0, 300.0, 1).unwrap();
        for _ in 0..1000 {
            let t = r.sample();
            assert!((0.2..=0.3).contains(&t), "{t}");
        }
        assert!(TimestepSampler::new(Sampling::Uniform, 300.0, 200.0, 1).is_err());
    }
}
