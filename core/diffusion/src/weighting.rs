//! Loss weightings: sd-scripts' `apply_snr_weight` / `apply_debiased_estimation` (DDPM) and
//! `compute_loss_weighting_for_sd3` (flow matching).

use crate::schedules::Prediction;

/// min-SNR-γ: min(SNR, γ)/SNR (epsilon) or min(SNR, γ)/(SNR + 1) (v-prediction).
pub fn min_snr_weight(snr: f64, gamma: f64, prediction: Prediction) -> f64 {
    let m = snr.min(gamma);
    match prediction {
        Prediction::VPrediction => m / (snr + 1.0),
        _ => m / snr,
    }
}

/// sd-scripts' debiased estimation: SNR clamped to 1000, then 1/√SNR (epsilon) or 1/(SNR + 1)
/// (v-prediction).
pub fn debiased_weight(snr: f64, prediction: Prediction) -> f64 {
    let s = snr.min(1000.0);
    match prediction {
        Prediction::VPrediction => 1.0 / (s + 1.0),
        _ => 1.0 / s.sqrt(),
    }
}

/// `weighting_scheme` of compute_loss_weighting_for_sd3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowWeighting {
    None,
    SigmaSqrt,
    Cosmap,
}

impl FlowWeighting {
    /// The weight at noise level σ: 1, σ⁻², or 2/(π(1 − 2σ + 2σ²)).
    pub fn weight(self, sigma: f64) -> f64 {
        match self {
            FlowWeighting::None => 1.0,
            FlowWeighting::SigmaSqrt => sigma.powi(-2),
            FlowWeighting::Cosmap => 2.0 / (std::f64::consts::PI * (1.0 - 2.0 * sigma + 2.0 * sigma * sigma)),
        }
    }
}
