//! The pure-Rust half of the diffusion toolkit (issue 8 part 1): DDPM/DDIM/Euler/flow-matching
//! schedules as diffusers 0.42.1 computes them, musubi-tuner/sd-scripts timestep sampling and
//! loss weightings. No libtorch: the host links this crate.
//!
//! Not yet here (fails loudly through [`lora_keys`]): LoRA key maps and format conversion.

pub mod lora_keys;
pub mod schedules;
pub mod timesteps;
pub mod weighting;

/// Every failure of this crate: the message names the parameter and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("invalid `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
}

pub type Result<T> = std::result::Result<T, DiffusionError>;

pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> DiffusionError {
    DiffusionError::Invalid { field, why: why.into() }
}
